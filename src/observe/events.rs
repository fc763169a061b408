//! What a run reports as it goes, as plain types: each epoch's figures, step and validation
//! records, evaluation metrics, and the [`Observer`] that receives them. The trainer produces
//! them; records, the progress bar and TensorBoard consume them.

use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

/// One epoch's figures, as logged and as written to `--metrics-out`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EpochReport {
    pub epoch: u64,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_rmse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_rmse: Option<f64>,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
}

/// What the loop tells its observer after every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// The epoch in progress (1-based) and the steps taken so far.
    pub epoch: u64,
    pub step: u64,
    /// Samples trained on in this step, over all ranks.
    pub samples: u64,
    /// The learning rate of this step.
    pub lr: f64,
    /// The mean training loss of the epoch so far, over all ranks, when known (with `--sync params`
    /// the ranks' losses are summed only every few steps).
    pub epoch_loss: Option<f64>,
}

/// A `"kind":"step"` record (`--log-every N`): the mean training loss over the steps since the
/// previous record, over all ranks.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepRecord {
    pub epoch: u64,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    pub samples_per_s: f64,
}

/// A `"kind":"eval"` record: the validation set evaluated (`--val-fraction`, every
/// `--eval-every` steps or at each epoch's end) and whether it is the best so far.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ValRecord {
    pub epoch: u64,
    pub step: u64,
    pub val_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_rmse: Option<f64>,
    /// The monitored value improved on every earlier evaluation.
    pub best: bool,
}

/// What a training run reports as it goes; every method defaults to doing nothing. Every rank's
/// loop calls it; the caller decides what rank 0 alone prints or writes.
pub trait Observer {
    fn step(&mut self, _s: &StepInfo) {}
    fn step_record(&mut self, _r: &StepRecord) {}
    fn val(&mut self, _r: &ValRecord) {}
    fn epoch(&mut self, _r: &EpochReport) {}
    /// The best model so far by the monitored value (called when it improves): rank 0 gets the
    /// parameters, the other ranks an empty slice.
    fn best(&mut self, _params: &[f32], _r: &ValRecord) -> anyhow::Result<()> {
        Ok(())
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

impl EpochReport {
    /// The rank-0 log line.
    pub fn line(&self, epochs: Option<u64>) -> String {
        let mut s = match epochs {
            Some(e) => format!("epoch {}/{e}", self.epoch),
            None => format!("epoch {}", self.epoch),
        };
        s += &format!("  step {}  train_loss {:.4}", self.step, self.train_loss);
        if let Some(v) = self.test_loss {
            s += &format!("  test_loss {v:.4}");
        }
        if let Some(v) = self.test_accuracy {
            s += &format!("  test_acc {v:.4}");
        }
        if let Some(v) = self.test_rmse {
            s += &format!("  test_rmse {v:.4}");
        }
        if let Some(v) = self.val_loss {
            s += &format!("  val_loss {v:.4}");
        }
        if let Some(v) = self.val_accuracy {
            s += &format!("  val_acc {v:.4}");
        }
        if let Some(v) = self.val_rmse {
            s += &format!("  val_rmse {v:.4}");
        }
        s += &format!(
            "  samples/s {}  elapsed {:.1}s",
            crate::observe::progress::rate(self.samples_per_s),
            self.elapsed_s
        );
        s
    }
}

/// Test-set metrics of a model: mean loss and accuracy (classification) or RMSE (regression).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub samples: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
}

impl EvalReport {
    pub fn from_totals(t: &Totals, regression: bool) -> Self {
        let n = t.count.max(1) as f64;
        let loss = t.loss_sum / n;
        Self {
            samples: t.count,
            loss,
            accuracy: (!regression).then(|| t.correct as f64 / n),
            rmse: regression.then(|| loss.sqrt()),
        }
    }
}
