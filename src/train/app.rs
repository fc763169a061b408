//! The training application, what `dptrain train` runs once its arguments are read: the ranks
//! agree on the checks, the checkpoint folder's lock, the data and the settings before any work;
//! rank 0 writes the settings file and opens the metrics and TensorBoard outputs; the backend is
//! opened and its kernels tuned; the loop runs (`run.rs`); then the summary, the model and the
//! timeline are written. The command line gives a [`TrainConfig`] and an [`AppOptions`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::bail;

use super::autotune::{self, AutotuneMode};
use super::config::{SyncMode, TrainConfig};
use super::plan::StepPlan;
use super::report::EpochReport;
use super::resume::RunControl;
use super::run::{Outcome, train_with};
use super::setup::{fingerprint, setup_rank};
use super::watch::Monitor;
use crate::backend::{self, Backend};
use crate::data::{self, CsvOptions, Dataset};
use crate::distributed::agree;
use crate::distributed::comm::Communicator;
use crate::store::outputs::RunPaths;

/// Where the training and test sets come from (`--data`, `--test-data`, `--test-fraction` and
/// the CSV flags); drawn or split with the configuration's seed.
#[derive(Clone, Debug)]
pub struct DataSource {
    pub data: String,
    pub test_data: Option<String>,
    pub test_fraction: f64,
    pub csv: CsvOptions,
}

/// The run's settings file: where it goes and its text (made before the run; an error making it
/// is said, agreed, when rank 0 would write it).
#[derive(Debug)]
pub struct SettingsFile {
    pub path: PathBuf,
    pub text: anyhow::Result<String>,
}

/// Everything `train` does besides the training the [`TrainConfig`] describes: its data, its
/// outputs, checkpoints and recovery.
pub struct AppOptions {
    /// The command line's own checks of its flags, agreed in the run's first collective with the
    /// output checks, so that no rank waits for one that quit.
    pub checked: anyhow::Result<()>,
    pub data: DataSource,
    /// Every path the run reads and writes, checked on rank 0 before any work (the settings file
    /// is added to them).
    pub paths: RunPaths,
    pub settings: Option<SettingsFile>,
    /// The resolved settings as JSON, stored in the saved model files.
    pub settings_json: serde_json::Value,
    /// Take over a checkpoint-folder lock held by a run on another host.
    pub break_lock: bool,
    /// Checkpoints, resuming, recovery, logging and early stopping; the kernel choices are
    /// filled in after tuning.
    pub control: RunControl,
    pub autotune: AutotuneMode,
    pub metrics_out: Option<PathBuf>,
    pub tensorboard: Option<PathBuf>,
    pub save: Option<PathBuf>,
    pub save_best: Option<PathBuf>,
    pub trace: Option<PathBuf>,
    /// Seconds between plain progress lines when stderr is not a terminal (0: none).
    pub progress_every: f64,
}

/// Train as `dptrain train` does, on every rank of `comm`.
pub fn run(cfg: &TrainConfig, opts: AppOptions, comm: &dyn Communicator) -> anyhow::Result<()> {
    let AppOptions {
        checked,
        data,
        mut paths,
        settings,
        settings_json,
        break_lock,
        mut control,
        autotune,
        metrics_out,
        tensorboard,
        save,
        save_best,
        trace,
        progress_every,
    } = opts;
    // rank 0 writes every output: its paths are checked, and its checkpoint folder locked, before
    // any work; every failure before the first collective is shared, so no rank waits for one that quit
    let lock = agree::agree(
        comm,
        checked.and_then(|_| match comm.is_root() {
            true => {
                paths.files.extend(
                    settings
                        .as_ref()
                        .map(|s| ("the settings file", s.path.clone())),
                );
                paths.check().and_then(|_| {
                    control
                        .checkpoint_dir
                        .as_deref()
                        .map(|d| crate::store::outputs::lock_dir(d, break_lock))
                        .transpose()
                })
            }
            false => Ok(None),
        }),
    )?;
    let setup = agree::agree(
        comm,
        cfg.validate()
            .and_then(|_| resolve_datasets(&data, cfg.seed))
            .and_then(|(tr, te)| setup_rank(cfg, tr, te, comm.rank(), comm.size())),
    )?;
    agree::check_same(comm, &fingerprint(cfg, &setup))?;
    // the step plan, computed once: the progress display's length and the loop's rows
    let plan = StepPlan::of(cfg, setup.total_train, comm.rank(), comm.size());
    let total = agree::agree(comm, cfg.total_steps(plan.steps_per_epoch))?;
    let spec = &setup.spec;
    // the settings file, the metrics file and the TensorBoard folder, on rank 0
    let opened = match comm.is_root() {
        true => (|| {
            if let Some(s) = settings {
                let text = s.text?;
                crate::store::atomic::write_atomic(&s.path, text.as_bytes())?;
            }
            let metrics = metrics_out
                .as_deref()
                .map(|p| open_metrics(p, control.resume.is_some()))
                .transpose()?;
            let tb = tensorboard
                .as_deref()
                .map(|d| {
                    crate::observe::tensorboard::EventWriter::new(d)
                        .map_err(|e| anyhow::anyhow!("--tensorboard: {e}"))
                })
                .transpose()?;
            Ok::<_, anyhow::Error>(Some((metrics, tb)))
        })(),
        false => Ok(None),
    };
    let (metrics, tensorboard) = agree::agree(comm, opened)?.unwrap_or((None, None));
    let init = setup.backend_init(cfg, &plan);
    let mut backend = agree::agree(
        comm,
        backend::open(cfg.device, cfg.gpu, comm.local_rank(), &init),
    )?;
    let tuning = autotune::choose_kernels(backend.as_mut(), comm, autotune)?;
    // ranks that share a node over a transport far below a memory copy: say once what helps
    let probe = std::env::var("DPTRAIN_TRANSPORT_PROBE").map_or(true, |v| v != "off");
    if probe
        && comm.size() > 1
        && cfg.exchange.sync == SyncMode::Grads
        && let Some(w) = crate::distributed::probe::probe_transport(comm)?
        && comm.is_root()
    {
        tracing::warn!("{}", w.trim_start_matches("warning: "));
    }
    if tuning.tuned > 0 && comm.is_root() {
        tracing::info!(
            "autotune: {} products tuned in {:.2} s",
            tuning.tuned,
            tuning.seconds
        );
    }
    if comm.size() > 1 {
        // one write, so that mpirun does not interleave the ranks' lines
        let line = format!(
            "dptrain: rank {}/{} (node-local {}): {}\n",
            comm.rank(),
            comm.size(),
            comm.local_rank(),
            backend.describe()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    if comm.is_root() {
        println!(
            "dptrain: {} samples × {} features{}{}, model {:?} {:?} ({} parameters), on {}{}",
            setup.total_train,
            setup.train.n_features,
            setup
                .val
                .as_ref()
                .map(|t| format!(", validation {}", t.n_samples))
                .unwrap_or_default(),
            setup
                .test
                .as_ref()
                .map(|t| format!(", test {}", t.n_samples))
                .unwrap_or_default(),
            spec.kind,
            spec.widths(),
            spec.layout().total,
            backend.describe(),
            if comm.size() > 1 {
                format!(", {}", comm.describe())
            } else {
                String::new()
            }
        );
    }
    control.kernels = tuning.choices.clone();
    let ctl = control;
    let meta = crate::store::modelfile::ModelMeta {
        labels: setup.labels.clone(),
        settings: Some(settings_json),
    };
    let epochs = cfg.epochs.filter(|_| cfg.steps.is_none());
    let progress =
        crate::observe::progress::Progress::new(comm.is_root(), total, 0, epochs, progress_every);
    let mut rec = crate::observe::record::Recorder::new(comm.is_root(), epochs, progress);
    rec.metrics = metrics;
    rec.tensorboard = tensorboard;
    rec.best = save_best
        .as_deref()
        .map(|path| crate::observe::record::BestModel {
            path,
            spec,
            norm: &setup.norm,
            meta: &meta,
        });
    if trace.is_some() {
        crate::observe::trace::enable();
    }
    let started = std::time::Instant::now();
    let outcome = train_with(cfg, &ctl, &setup, &plan, backend.as_mut(), comm, &mut rec);
    rec.progress.finish();
    let outcome = outcome?;
    if comm.is_root() {
        println!(
            "{}",
            summary(
                &outcome,
                ctl.monitor,
                started.elapsed().as_secs_f64(),
                rec.samples
            )
            .line()
        );
        if outcome.early_stopped {
            println!(
                "dptrain: early stop: {} has not improved for {} evaluations",
                ctl.monitor.name(),
                ctl.patience
            );
        }
        if let (Some(p), Some(best)) = (&save_best, outcome.watch.best) {
            println!(
                "dptrain: best model ({} {best:.4} at step {}) in {}",
                ctl.monitor.name(),
                outcome.watch.best_step,
                p.display()
            );
        }
    }
    // the model is saved even when the metrics could not be written, and the other way round
    let saved = match (&save, comm.is_root()) {
        (Some(path), true) => {
            crate::store::modelfile::save_with(path, spec, &setup.norm, &outcome.params, &meta)
                .map(|_| println!("dptrain: saved {}", path.display()))
        }
        _ => Ok(()),
    };
    // the timeline last: a collective on every rank; its failure harms neither model nor metrics
    let traced = match &trace {
        Some(path) => write_trace(path, cfg, &plan, backend.as_mut(), comm),
        None => Ok(()),
    };
    drop(lock);
    let errors: Vec<String> = [
        rec.write_error,
        saved.err().map(|e| agree::one_line(&anyhow::Error::new(e))),
        traced.err().map(|e| agree::one_line(&e)),
    ]
    .into_iter()
    .flatten()
    .collect();
    match errors.is_empty() {
        true => Ok(()),
        false => bail!("{}", errors.join("; and ")),
    }
}

/// Training and test sets as `train` resolves them: the test data given, else the data's own
/// (an MNIST directory's t10k files), else a seeded `test_fraction` split, else none.
pub fn resolve_datasets(src: &DataSource, seed: u64) -> anyhow::Result<(Dataset, Option<Dataset>)> {
    let csv = &src.csv;
    if !(src.test_fraction.is_finite() && (0.0..1.0).contains(&src.test_fraction)) {
        bail!(
            "--test-fraction must be in [0, 1) (got {})",
            src.test_fraction
        );
    }
    let loaded = data::load_spec(&src.data, csv, seed)?;
    if let Some(t) = &src.test_data {
        let lt = data::load_spec(t, csv, seed.wrapping_add(1))?;
        // an MNIST directory as test data means its t10k files
        let mut test = lt.test.unwrap_or(lt.train);
        // class names mean the training file's classes
        if let Some(names) = &loaded.train.labels {
            test.relabel(names)?;
        } else if test.labels.is_some() {
            bail!(
                "{}: the labels are text, but the training data's are numbers",
                test.source
            );
        }
        return Ok((loaded.train, Some(test)));
    }
    match loaded.test {
        Some(test) => Ok((loaded.train, Some(test))),
        None if src.test_fraction > 0.0 => {
            let (train, test) = data::train_test_split(&loaded.train, src.test_fraction, seed)?;
            Ok((train, Some(test)))
        }
        None => Ok((loaded.train, None)),
    }
}

/// Open the metrics file: appended to when the run resumes, else created afresh.
fn open_metrics(
    path: &Path,
    resume: bool,
) -> anyhow::Result<(PathBuf, std::io::BufWriter<std::fs::File>)> {
    use anyhow::Context;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume)
        .truncate(!resume)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    Ok((path.to_path_buf(), std::io::BufWriter::new(f)))
}

/// `--trace`: one more step timed kernel by kernel where the device has timestamp queries (after
/// training, whose outputs are already taken: the step's update changes nothing kept), then every
/// rank's events to rank 0, which writes the file.
fn write_trace(
    path: &Path,
    cfg: &TrainConfig,
    plan: &StepPlan,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
) -> anyhow::Result<()> {
    let (offset, rows) = plan.mine(0);
    let mut profiled = Ok(());
    if rows > 0 {
        let batch = backend::Batch {
            offset,
            rows,
            step: 0,
            accumulate: false,
        };
        let update = cfg.optim.update(0.0, 0, rows as u64);
        let submitted = std::time::Instant::now();
        match backend.profile_step(&batch, &update) {
            Ok(Some(kernels)) => {
                crate::observe::trace::gpu_kernels(submitted, std::time::Instant::now(), &kernels)
            }
            Ok(None) => {}
            // the collective below runs on every rank all the same; the error is said after it
            Err(e) => profiled = Err(e.context("--trace: timing one step's GPU kernels")),
        }
    }
    crate::distributed::gather::write_trace(comm, path)?;
    profiled?;
    if comm.is_root() {
        println!(
            "dptrain: timeline in {} (open it in ui.perfetto.dev or chrome://tracing)",
            path.display()
        );
    }
    Ok(())
}

/// The final summary: figures of the last epoch, the best test accuracy (or lowest RMSE or loss)
/// and the run's rate.
fn summary(
    o: &Outcome,
    monitor: Monitor,
    seconds: f64,
    samples: u64,
) -> crate::observe::progress::Summary {
    let last = o.reports.last();
    let mut fin = Vec::new();
    if let Some(r) = last {
        for (k, v) in [
            ("train_loss", Some(r.train_loss)),
            ("test_loss", r.test_loss),
            ("test_accuracy", r.test_accuracy),
            ("test_rmse", r.test_rmse),
            ("val_loss", r.val_loss),
            ("val_accuracy", r.val_accuracy),
            ("val_rmse", r.val_rmse),
        ] {
            if let Some(v) = v {
                fin.push((k.to_string(), v));
            }
        }
    }
    // the best epoch by the test figure users read first, or by the watched validation value
    let pick = |f: &dyn Fn(&EpochReport) -> Option<f64>, higher: bool| {
        o.reports
            .iter()
            .filter_map(|r| f(r).map(|v| (v, r.epoch)))
            .reduce(|b, c| {
                if (c.0 > b.0) == higher && c.0 != b.0 {
                    c
                } else {
                    b
                }
            })
    };
    let best = if o.watch.best.is_some() {
        o.watch
            .best
            .map(|v| (monitor.name().to_string(), v, o.watch.best_epoch))
    } else if let Some((v, e)) = pick(&|r| r.test_accuracy, true) {
        Some(("test_accuracy".to_string(), v, e))
    } else if let Some((v, e)) = pick(&|r| r.test_rmse, false) {
        Some(("test_rmse".to_string(), v, e))
    } else {
        pick(&|r| r.test_loss, false).map(|(v, e)| ("test_loss".to_string(), v, e))
    };
    crate::observe::progress::Summary {
        steps: o.steps,
        epochs: last.map_or(0, |r| r.epoch),
        seconds,
        samples,
        best,
        last: fin,
    }
}
