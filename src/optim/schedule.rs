//! Learning-rate schedules (constant, step, cosine, with linear warm-up), and `LearningRate`: the one
//! place where the rate of a step is computed, the same value that the update uses and the report shows.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The base rate throughout.
    Constant,
    /// Multiply by --gamma every --step-size epochs.
    Step,
    /// Cosine from the base rate down to --min-lr over the run.
    Cosine,
}

/// The learning rate as a function of the global step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    /// Linear warm-up from base/warmup to base over this many steps (0: none).
    pub warmup: u64,
    pub step_size: u64,
    pub gamma: f64,
    pub min_lr: f64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn constant(lr: f64) -> Self {
        Self {
            kind: ScheduleKind::Constant,
            base_lr: lr,
            warmup: 0,
            step_size: 1,
            gamma: 1.0,
            min_lr: 0.0,
            total_steps: 1,
        }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step => {
                self.base_lr
                    * self
                        .gamma
                        .powi((step / self.step_size.max(1)).min(i32::MAX as u64) as i32)
            }
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup).max(1);
                let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
                self.min_lr
                    + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// The learning rate of every step: the schedule times a scale that NaN rollbacks lower.
#[derive(Clone, Debug, PartialEq)]
pub struct LearningRate {
    pub schedule: Schedule,
    /// Multiplier on the schedule (1 unless a rollback lowered it).
    pub scale: f64,
}

impl LearningRate {
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            scale: 1.0,
        }
    }

    /// The rate of (0-based) step `step`.
    pub fn at(&self, step: u64) -> f64 {
        self.schedule.lr_at(step) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64) -> Schedule {
        Schedule {
            kind,
            base_lr: 1.0,
            warmup,
            step_size: 10,
            gamma: 0.5,
            min_lr: 0.1,
            total_steps: 110,
        }
    }

    #[test]
    fn warmup_rises_linearly_to_the_base_rate() {
        let s = sched(ScheduleKind::Constant, 4);
        let lrs: Vec<f64> = (0..6).map(|i| s.lr_at(i)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn step_schedule_decays_by_gamma_every_step_size() {
        let s = sched(ScheduleKind::Step, 0);
        assert_eq!(s.lr_at(9), 1.0);
        assert_eq!(s.lr_at(10), 0.5);
        assert_eq!(s.lr_at(25), 0.25);
    }

    #[test]
    fn cosine_runs_from_base_to_min_after_warmup() {
        let s = sched(ScheduleKind::Cosine, 10);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(500) - 0.1).abs() < 1e-12);
    }
}
