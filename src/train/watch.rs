//! Early stopping and the best model: the validation value watched (`--monitor`), the best seen,
//! and how many evaluations have gone by without beating it.

use serde::Serialize;

use super::report::EvalReport;

/// What early stopping and `--save-best` watch, on the validation split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Monitor {
    /// The validation loss (lower is better).
    #[default]
    #[value(name = "val_loss", alias = "val-loss")]
    #[serde(rename = "val_loss")]
    ValLoss,
    /// The validation accuracy of a classifier (higher is better).
    #[value(name = "val_accuracy", alias = "val-accuracy")]
    #[serde(rename = "val_accuracy")]
    ValAccuracy,
    /// The validation RMSE of a regression (lower is better).
    #[value(name = "val_rmse", alias = "val-rmse")]
    #[serde(rename = "val_rmse")]
    ValRmse,
}

impl Monitor {
    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
            Monitor::ValRmse => "val_rmse",
        }
    }

    /// The watched value of an evaluation (None when the model has no such metric).
    pub fn value(self, r: &EvalReport) -> Option<f64> {
        match self {
            Monitor::ValLoss => Some(r.loss),
            Monitor::ValAccuracy => r.accuracy,
            Monitor::ValRmse => r.rmse,
        }
    }

    pub fn higher_is_better(self) -> bool {
        self == Monitor::ValAccuracy
    }

    /// Whether a model of this kind has the watched metric.
    pub fn check(self, regression: bool) -> anyhow::Result<()> {
        match (self, regression) {
            (Monitor::ValAccuracy, true) => {
                anyhow::bail!(
                    "--monitor val_accuracy: a regression model has no accuracy; use val_rmse or val_loss"
                )
            }
            (Monitor::ValRmse, false) => {
                anyhow::bail!(
                    "--monitor val_rmse: a classifier has no RMSE; use val_accuracy or val_loss"
                )
            }
            _ => Ok(()),
        }
    }
}

pub use crate::store::checkpoint::WatchState;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_is_better_for_loss_and_patience_counts_evaluations() {
        let mut w = WatchState::default();
        assert!(w.observe(Monitor::ValLoss.higher_is_better(), 1.0, 10, 1));
        assert!(w.observe(Monitor::ValLoss.higher_is_better(), 0.5, 20, 2));
        assert!(
            !w.observe(Monitor::ValLoss.higher_is_better(), 0.5, 30, 3),
            "equal is no improvement"
        );
        assert!(!w.exhausted(2));
        assert!(!w.observe(Monitor::ValLoss.higher_is_better(), 0.7, 40, 4));
        assert!(w.exhausted(2));
        assert!(!w.exhausted(0), "patience 0 never stops");
        assert_eq!((w.best, w.best_step, w.best_epoch), (Some(0.5), 20, 2));
        assert!(w.observe(Monitor::ValLoss.higher_is_better(), 0.4, 50, 5));
        assert_eq!(w.since_best, 0);
    }

    #[test]
    fn higher_is_better_for_accuracy_and_nan_never_wins() {
        let mut w = WatchState::default();
        assert!(!w.observe(Monitor::ValAccuracy.higher_is_better(), f64::NAN, 1, 1));
        assert!(w.observe(Monitor::ValAccuracy.higher_is_better(), 0.8, 2, 1));
        assert!(!w.observe(Monitor::ValAccuracy.higher_is_better(), 0.7, 3, 1));
        assert!(w.observe(Monitor::ValAccuracy.higher_is_better(), 0.9, 4, 2));
        assert_eq!(w.best, Some(0.9));
    }

    #[test]
    fn the_monitor_must_exist_for_the_model() {
        assert!(Monitor::ValAccuracy.check(true).is_err());
        assert!(Monitor::ValRmse.check(false).is_err());
        assert!(Monitor::ValLoss.check(true).is_ok());
        assert!(Monitor::ValRmse.check(true).is_ok());
        let r = EvalReport {
            samples: 4,
            loss: 0.25,
            accuracy: Some(0.75),
            rmse: None,
        };
        assert_eq!(Monitor::ValAccuracy.value(&r), Some(0.75));
        assert_eq!(Monitor::ValRmse.value(&r), None);
    }
}
