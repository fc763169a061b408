//! The trainer, named after what it does. The step is `step.rs`: one paragraph, in phase order.
//!
//! - `app.rs`: what `dptrain train` runs around the loop: agreement between ranks, the lock,
//!   the outputs, the backend, the writes at the end.
//! - `config.rs`: `TrainConfig` and its checks.
//! - `setup.rs`: data → model → initial parameters; the settings record ranks agree on and
//!   checkpoints are matched against.
//! - `plan.rs`: steps per epoch, shards, micro-batches, the epoch's order.
//! - `step.rs`: THE STEP — gather, forward, loss, backward, exchange, update.
//! - `autotune.rs`: kernel choices tuned, agreed across ranks and cached.
//! - `report.rs`: evaluation and each epoch's figures.
//! - `resume.rs`: checkpoints, resuming, rollback.
//! - `run.rs`: the loop around the step.
//! - `watch.rs`: early stopping and the best model on the validation split.

pub mod app;
pub mod autotune;
pub mod config;
pub mod plan;
pub mod report;
pub mod resume;
pub mod run;
pub mod setup;
pub mod step;
pub mod watch;

pub use config::{DeviceKind, ShardMode, SyncMode, TrainConfig};
pub use plan::{StepPlan, epoch_order, shard_range};
pub use report::{
    EpochReport, EvalReport, Observer, Quiet, StepInfo, StepRecord, ValRecord, evaluate,
    evaluate_rows,
};
pub use resume::{CheckpointUnit, NanPolicy, ResumeFrom, RunControl};
pub use run::{Outcome, train, train_with};
pub use setup::{Setup, fingerprint, initial_params, resume_settings, setup, setup_rank};
pub use step::{PhaseTimes, Stepper};
pub use watch::{Monitor, WatchState};
