//! Where a training run's figures go, on rank 0: the log lines, the progress display, the
//! `--metrics-out` JSON lines, TensorBoard event files and the best model (`--save-best`).
//! Writing a figure never stops training: the first write error is kept and reported at the end.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::data::Normalizer;
use crate::model::ModelSpec;
use crate::observe::events::{EpochReport, Observer, StepInfo, StepRecord, ValRecord};
use crate::observe::progress::Progress;
use crate::observe::tensorboard::EventWriter;
use crate::store::modelfile::ModelMeta;

/// The columns of a CSV metrics file, in order; a record leaves the ones it lacks empty.
pub const CSV_COLUMNS: [&str; 15] = [
    "kind",
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_rmse",
    "val_loss",
    "val_accuracy",
    "val_rmse",
    "best",
    "samples_per_s",
    "elapsed_s",
];

pub use crate::observe::metrics::is_csv;

/// The best model's destination and what it is saved with.
pub struct BestModel<'a> {
    pub path: &'a Path,
    pub spec: &'a ModelSpec,
    pub norm: &'a Normalizer,
    pub meta: &'a ModelMeta,
}

/// Rank 0's observer of a run (the other ranks' is quiet: `root == false`).
pub struct Recorder<'a> {
    pub root: bool,
    /// The run's epochs, when it is counted in epochs (for "epoch 3/10").
    pub epochs: Option<u64>,
    pub progress: Progress,
    pub metrics: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    pub tensorboard: Option<EventWriter>,
    pub best: Option<BestModel<'a>>,
    /// The first failure to write metrics or TensorBoard events ("what: why").
    pub write_error: Option<String>,
    /// Samples trained on by this run (all ranks).
    pub samples: u64,
    /// Whether the last `--log-every` record carried the learning rate to TensorBoard.
    step_lr: bool,
}

impl<'a> Recorder<'a> {
    pub fn new(root: bool, epochs: Option<u64>, progress: Progress) -> Self {
        Self {
            root,
            epochs,
            progress,
            metrics: None,
            tensorboard: None,
            best: None,
            write_error: None,
            samples: 0,
            step_lr: false,
        }
    }

    /// Append one record of `kind` to the metrics file: a JSON line, or a CSV row when the file's
    /// name ends in `.csv` (the header first when the file is empty).
    fn record(&mut self, kind: &str, value: &impl serde::Serialize) {
        let Some((path, w)) = self.metrics.as_mut() else {
            return;
        };
        let mut v = serde_json::to_value(value).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), kind.into());
        }
        let csv = is_csv(path);
        let written = if csv {
            let empty = w
                .get_ref()
                .metadata()
                .map(|m| m.len() == 0)
                .unwrap_or(false)
                && w.buffer().is_empty();
            let head = if empty {
                format!("{}\n", CSV_COLUMNS.join(","))
            } else {
                String::new()
            };
            let row: Vec<String> = CSV_COLUMNS
                .iter()
                .map(|c| match v.get(*c) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Null) | None => String::new(),
                    Some(x) => x.to_string(),
                })
                .collect();
            writeln!(w, "{head}{}", row.join(","))
        } else {
            writeln!(w, "{v}")
        };
        if let Err(e) = written.and_then(|_| w.flush()) {
            let msg = format!("{}: cannot write metrics: {e}", path.display());
            self.write_error.get_or_insert(msg);
            self.metrics = None;
        }
    }

    fn scalars(&mut self, step: u64, values: &[(&str, Option<f64>)]) {
        let Some(tb) = self.tensorboard.as_mut() else {
            return;
        };
        let present: Vec<(&str, f64)> = values
            .iter()
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .collect();
        if let Err(e) = tb.scalars(step, &present).and_then(|_| tb.flush()) {
            let msg = format!("--tensorboard: {e}");
            self.write_error.get_or_insert(msg);
            self.tensorboard = None;
        }
    }
}

impl Observer for Recorder<'_> {
    fn step(&mut self, s: &StepInfo) {
        self.samples += s.samples;
        if self.root {
            self.progress.step(s.epoch, s.step, s.samples, s.epoch_loss);
        }
    }

    fn step_record(&mut self, r: &StepRecord) {
        if !self.root {
            return;
        }
        self.record("step", r);
        self.step_lr = true;
        self.scalars(
            r.step,
            &[
                ("train/loss_step", Some(r.train_loss)),
                ("train/accuracy_step", r.train_accuracy),
                ("lr", Some(r.lr)),
            ],
        );
    }

    fn val(&mut self, r: &ValRecord) {
        if !self.root {
            return;
        }
        let mut line = format!("  step {}  val_loss {:.4}", r.step, r.val_loss);
        if let Some(v) = r.val_accuracy {
            line += &format!("  val_acc {v:.4}");
        }
        if let Some(v) = r.val_rmse {
            line += &format!("  val_rmse {v:.4}");
        }
        if r.best {
            line += "  (best)";
        }
        self.progress.println(&line);
        self.record("eval", r);
        self.scalars(
            r.step,
            &[
                ("val/loss", Some(r.val_loss)),
                ("val/accuracy", r.val_accuracy),
                ("val/rmse", r.val_rmse),
            ],
        );
    }

    fn epoch(&mut self, r: &EpochReport) {
        if !self.root {
            return;
        }
        self.progress.println(&r.line(self.epochs));
        self.record("epoch", r);
        let lr = (!self.step_lr).then_some(r.lr);
        self.scalars(
            r.step,
            &[
                ("train/loss", Some(r.train_loss)),
                ("train/accuracy", r.train_accuracy),
                ("test/loss", r.test_loss),
                ("test/accuracy", r.test_accuracy),
                ("test/rmse", r.test_rmse),
                ("val/loss", r.val_loss),
                ("val/accuracy", r.val_accuracy),
                ("val/rmse", r.val_rmse),
                ("lr", lr),
                ("samples_per_s", Some(r.samples_per_s)),
                ("epoch", Some(r.epoch as f64)),
            ],
        );
    }

    fn best(&mut self, params: &[f32], _r: &ValRecord) -> anyhow::Result<()> {
        if let (true, Some(b)) = (self.root, &self.best) {
            crate::store::modelfile::save_with(b.path, b.spec, b.norm, params, b.meta)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::progress::Mode;

    fn report(epoch: u64) -> EpochReport {
        EpochReport {
            epoch,
            step: epoch * 10,
            lr: 0.5,
            train_loss: 1.0 / epoch as f64,
            train_accuracy: Some(0.5),
            test_loss: Some(0.25),
            test_accuracy: Some(0.75),
            test_rmse: None,
            val_loss: None,
            val_accuracy: None,
            val_rmse: None,
            samples_per_s: 100.0,
            elapsed_s: 1.0,
        }
    }

    fn recorder(path: &Path, append: bool) -> Recorder<'static> {
        let progress =
            Progress::with_mode(Mode::Hidden, Box::new(std::io::sink()), 0, 0, None, 0.0);
        let mut r = Recorder::new(true, None, progress);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .unwrap();
        r.metrics = Some((path.to_path_buf(), std::io::BufWriter::new(f)));
        r
    }

    #[test]
    fn csv_metrics_have_one_header_and_read_back_for_plotting() {
        let p = std::env::temp_dir().join(format!("dptrain-rec-{}.csv", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let mut r = recorder(&p, false);
        r.epoch(&report(1));
        r.step_record(&StepRecord {
            epoch: 2,
            step: 15,
            lr: 0.25,
            train_loss: 0.75,
            train_accuracy: None,
            samples_per_s: 9.0,
        });
        drop(r);
        // a resumed run appends without a second header
        let mut r = recorder(&p, true);
        r.epoch(&report(2));
        drop(r);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert!(
            lines[1].starts_with("epoch,1,10,0.5,1.0,0.5,0.25,0.75,,,,,,100.0,1.0"),
            "{text}"
        );
        assert!(lines[2].starts_with("step,2,15,0.25,0.75,,"), "{text}");
        let m = crate::observe::metrics::read_metrics(&p).unwrap();
        assert_eq!(m.epoch["train_loss"], vec![(10.0, 1.0), (20.0, 0.5)]);
        assert_eq!(m.step["train_loss"], vec![(15.0, 0.75)]);
        assert_eq!(m.epoch["test_accuracy"], vec![(10.0, 0.75), (20.0, 0.75)]);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn json_metrics_carry_their_kind() {
        let p = std::env::temp_dir().join(format!("dptrain-rec-{}.jsonl", std::process::id()));
        let mut r = recorder(&p, false);
        r.epoch(&report(3));
        r.val(&ValRecord {
            epoch: 3,
            step: 25,
            val_loss: 0.5,
            val_accuracy: Some(0.9),
            val_rmse: None,
            best: true,
        });
        drop(r);
        let text = std::fs::read_to_string(&p).unwrap();
        let v: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["kind"], "epoch");
        assert_eq!(v[0]["test_accuracy"], 0.75);
        assert_eq!(v[1]["kind"], "eval");
        assert_eq!(v[1]["best"], true);
        let m = crate::observe::metrics::read_metrics(&p).unwrap();
        assert_eq!(m.epoch["val_loss"], vec![(25.0, 0.5)]);
        let _ = std::fs::remove_file(&p);
    }
}
