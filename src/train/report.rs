//! What a run reports: evaluation sharded over the ranks, each epoch's figures and its log line.

use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

use super::exchange::sum_totals;
use crate::backend::{Backend, Split};
use crate::comm::Communicator;

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
    pub samples_per_s: f64,
    pub elapsed_s: f64,
}

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
        s += &format!(
            "  samples/s {:.0}  elapsed {:.1}s",
            self.samples_per_s, self.elapsed_s
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

/// Evaluate the backend's current parameters on a whole split, sharded across ranks.
pub fn evaluate(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    split: Split,
    n: usize,
    regression: bool,
) -> anyhow::Result<EvalReport> {
    let (r, size) = (comm.rank(), comm.size());
    let range = (n * r / size)..(n * (r + 1) / size);
    let local = if range.is_empty() {
        Totals::default()
    } else {
        backend.evaluate(split, range)?
    };
    Ok(EvalReport::from_totals(
        &sum_totals(comm, &local)?,
        regression,
    ))
}
