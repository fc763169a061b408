//! `dptrain eval`, `predict` and `model show`: a saved model (or checkpoint) applied to a dataset
//! or described. The flags and the terminal are here; outputs, classes and reports are
//! `tools/apply.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::data::CsvArgs;
use crate::backend::{self, BackendInit, Precision, Split};
use crate::data::{self, Dataset, LabelColumn};
use crate::distributed::comm::SingleProcess;
use crate::optim::OptimConfig;
use crate::train::{self, DeviceKind};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A model file (`train --save`, `--save-best`) or a checkpoint.
    #[arg(long)]
    pub model_file: PathBuf,
    /// Data to evaluate on: a CSV file (all of it) or an MNIST directory (its t10k test set).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    pub csv: CsvArgs,
    /// Also print the confusion matrix and each class's precision, recall and F1.
    #[arg(long)]
    pub report: bool,
    /// Where to evaluate: auto (a hardware GPU, else the CPU), gpu or cpu.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceKind,
    /// Adapter index from `dptrain devices`.
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Rows evaluated at a time.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A model file (`train --save`, `--save-best`) or a checkpoint.
    #[arg(long)]
    pub model_file: PathBuf,
    /// Rows to predict: a CSV file with the model's features, with or without the label column
    /// (told apart by the column count), or an MNIST directory (its t10k images).
    #[arg(long)]
    pub data: String,
    /// Where to write the predictions (CSV: id, predicted class and each class's probability, or
    /// the predicted value); `-` for stdout.
    #[arg(long)]
    pub out: PathBuf,
    /// A CSV column holding each row's id (index, header name or `last`), copied to the output
    /// and not used as a feature; default: the 1-based row number.
    #[arg(long)]
    pub id_column: Option<String>,
    #[command(flatten)]
    pub csv: CsvArgs,
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Architecture, parameter count, training settings and, for linear models, the weights in
    /// the raw units of the features.
    Show {
        /// A model file or a checkpoint.
        path: PathBuf,
    },
}

pub fn run_eval(a: &EvalArgs) -> anyhow::Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = crate::store::modelfile::load_usable(&a.model_file)?;
    let spec = &model.spec;
    let loaded = data::load_spec(&a.data, &a.csv.options(), 0)?;
    let mut ds = loaded.test.unwrap_or(loaded.train);
    if ds.n_features != spec.inputs {
        bail!(
            "{}: {} features, but the model takes {}",
            ds.source,
            ds.n_features,
            spec.inputs
        );
    }
    if !spec.is_regression() {
        relabel_for(&mut ds, model.meta.labels.as_deref())?;
        let labels = ds.class_labels()?;
        let k = crate::tools::apply::classes(spec);
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l as usize >= k) {
            bail!(
                "{}: sample {}: label {l} is out of range for a model with {k} classes",
                ds.source,
                i + 1,
            );
        }
    }
    let init = BackendInit {
        spec,
        train: &ds,
        test: None,
        norm: &model.norm,
        max_rows: a.batch_size.min(ds.n_samples).max(1),
        rule: OptimConfig::default().rule(),
        seed: 0,
        sample_base: 0,
        precision: Precision::F32,
        average_buffers: false,
        augment: Default::default(),
    };
    let mut backend = backend::open(a.device, a.gpu, 0, &init)?;
    backend.set_params(&model.params)?;
    let r = train::evaluate(
        backend.as_mut(),
        &SingleProcess,
        Split::Train,
        ds.n_samples,
        spec.is_regression(),
    )?;
    // the metrics are named for what they are, on the data given, not "test_"
    let mut line = format!("{}: {} samples  loss {:.4}", ds.source, r.samples, r.loss);
    if let Some(acc) = r.accuracy {
        line += &format!("  accuracy {acc:.4}");
    }
    if let Some(rmse) = r.rmse {
        line += &format!("  rmse {rmse:.4}");
    }
    println!("{line}");
    if a.report {
        if spec.is_regression() {
            bail!("--report: a confusion matrix needs a classifier; this model is a regression");
        }
        let z = crate::tools::apply::outputs(&model, &ds)?;
        let mut c = crate::tools::apply::Confusion::new(crate::tools::apply::classes(spec));
        for (row, &y) in z.outer_iter().zip(&ds.y) {
            let p = crate::tools::apply::class_of(spec.kind, row.as_slice().unwrap_or(&[]));
            c.add(y as usize, p);
        }
        print!("{}", c.report(model.meta.labels.as_deref()));
    }
    Ok(())
}

/// Map a dataset's text labels onto the classes a model was trained with (its stored names).
fn relabel_for(ds: &mut Dataset, names: Option<&[String]>) -> anyhow::Result<()> {
    match (names, ds.labels.is_some()) {
        (Some(n), true) => Ok(ds.relabel(n)?),
        (None, true) => bail!(
            "{}: the labels are text, but the model was trained on numeric labels",
            ds.source
        ),
        // numeric labels are class indices, whatever names the model has
        (_, false) => Ok(()),
    }
}

/// `dptrain predict`: the model's outputs for every row, as CSV.
pub fn run_predict(a: &PredictArgs) -> anyhow::Result<()> {
    let to_stdout = a.out.as_os_str() == "-";
    let mut paths = crate::store::outputs::RunPaths::default();
    paths.inputs.push(("--model-file", a.model_file.clone()));
    if !a.data.starts_with("synth:") {
        paths.inputs.push(("--data", PathBuf::from(&a.data)));
    }
    if !to_stdout {
        paths.files.push(("--out", a.out.clone()));
    }
    paths.check()?;
    let model = crate::store::modelfile::load_usable(&a.model_file)?;
    let spec = &model.spec;
    let opts = a.csv.options();
    let id = a
        .id_column
        .as_deref()
        .map(|c| c.parse::<LabelColumn>().unwrap_or(LabelColumn::Index(0)));
    let path = Path::new(&a.data);
    let (mut ds, ids, labelled) = if a.data.starts_with("synth:") || path.is_dir() {
        if id.is_some() {
            bail!("--id-column needs a CSV file");
        }
        let loaded = data::load_spec(&a.data, &opts, 0)?;
        (loaded.test.unwrap_or(loaded.train), None, true)
    } else {
        // with the label column or without: whichever reading gives the model's feature count
        let with = data::csv::load_rows(path, &opts, true, id.as_ref());
        match with {
            Ok(r) if r.ds.n_features == spec.inputs => (r.ds, r.ids, true),
            with => match data::csv::load_rows(path, &opts, false, id.as_ref()) {
                Ok(r) if r.ds.n_features == spec.inputs => (r.ds, r.ids, false),
                Ok(r) => bail!(
                    "{}: {} feature columns{}, but the model takes {} (and a label column may be added)",
                    r.ds.source,
                    r.ds.n_features,
                    if id.is_some() { " besides the id" } else { "" },
                    spec.inputs
                ),
                Err(e) => return Err(with.err().map_or(e.into(), Into::into)),
            },
        }
    };
    if ds.n_features != spec.inputs {
        bail!(
            "{}: {} features, but the model takes {}",
            ds.source,
            ds.n_features,
            spec.inputs
        );
    }
    if labelled && !spec.is_regression() {
        relabel_for(&mut ds, model.meta.labels.as_deref())?;
    }
    let names = model.meta.labels.as_deref();
    let z = crate::tools::apply::outputs(&model, &ds)?;
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut header = vec!["id".to_string(), "predicted".to_string()];
    let classes = crate::tools::apply::classes(spec);
    if !spec.is_regression() {
        header.extend(
            (0..classes).map(|c| format!("p_{}", crate::tools::apply::class_name(names, c))),
        );
    }
    if labelled {
        header.push(
            if spec.is_regression() {
                "target"
            } else {
                "label"
            }
            .to_string(),
        );
    }
    let csv_err = |e: ::csv::Error| anyhow::anyhow!("--out {}: {e}", a.out.display());
    w.write_record(&header).map_err(csv_err)?;
    let mut right = 0u64;
    for (i, row) in z.outer_iter().enumerate() {
        let zr = row.to_vec();
        let id = ids
            .as_ref()
            .and_then(|v| v.get(i).cloned())
            .unwrap_or_else(|| (i + 1).to_string());
        let mut rec = vec![id];
        if spec.is_regression() {
            rec.push(zr[0].to_string());
        } else {
            let c = crate::tools::apply::class_of(spec.kind, &zr);
            rec.push(crate::tools::apply::class_name(names, c));
            rec.extend(
                crate::tools::apply::probabilities(spec.kind, &zr)
                    .iter()
                    .map(|p| format!("{p:.6}")),
            );
            if labelled && ds.y[i] as usize == c {
                right += 1;
            }
        }
        if labelled {
            let y = ds.y[i];
            rec.push(if spec.is_regression() {
                y.to_string()
            } else {
                crate::tools::apply::class_name(names, y as usize)
            });
        }
        w.write_record(&rec).map_err(csv_err)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", a.out.display()))?;
    if to_stdout {
        std::io::stdout()
            .write_all(&bytes)
            .context("cannot write the predictions to stdout")?;
    } else {
        crate::store::atomic::write_atomic(&a.out, &bytes)?;
    }
    let mut line = format!(
        "dptrain: {} predictions{}",
        ds.n_samples,
        if to_stdout {
            String::new()
        } else {
            format!(" in {}", a.out.display())
        }
    );
    if labelled && !spec.is_regression() {
        line += &format!(
            "; accuracy {:.4} on the file's labels",
            right as f64 / ds.n_samples.max(1) as f64
        );
    }
    eprintln!("{line}");
    Ok(())
}

/// `dptrain model show FILE`.
pub fn run_model(cmd: &ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Show { path } => {
            let m = crate::store::modelfile::load_usable(path)?;
            print!(
                "{}",
                crate::tools::apply::show(&m, &path.display().to_string())
            );
            Ok(())
        }
    }
}
