//! Where a training run's figures go, on rank 0: the log lines, the progress display, the
//! `--metrics-out` JSON lines, TensorBoard event files and the best model (`--save-best`).
//! Writing a figure never stops training: the first write error is kept and reported at the end.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::data::Normalizer;
use crate::model::ModelSpec;
use crate::modelfile::ModelMeta;
use crate::progress::Progress;
use crate::tensorboard::EventWriter;
use crate::train::{EpochReport, Observer, StepInfo, StepRecord, ValRecord};

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

    /// Append one JSON record of `kind` to the metrics file.
    fn record(&mut self, kind: &str, value: &impl serde::Serialize) {
        let Some((path, w)) = self.metrics.as_mut() else {
            return;
        };
        let mut v = serde_json::to_value(value).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), kind.into());
        }
        if let Err(e) = writeln!(w, "{v}").and_then(|_| w.flush()) {
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
            crate::modelfile::save_with(b.path, b.spec, b.norm, params, b.meta)?;
        }
        Ok(())
    }
}
