//! What decides a training run apart from the data: `TrainConfig`, its defaults (the CLI's), and
//! its checks.

use std::path::PathBuf;

use anyhow::{bail, ensure};
use serde::Serialize;

pub use crate::backend::{DeviceKind, Precision};
use crate::data::NormKind;
use crate::model::{Activation, ModelKind};
use crate::optim::{OptimConfig, ScheduleKind};

/// Everything that decides a training run apart from the data.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub model: ModelKind,
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// Dropout probability after each hidden layer.
    pub dropout: f64,
    pub epochs: Option<u64>,
    pub steps: Option<u64>,
    /// Rows per micro-batch (per rank under mpirun).
    pub batch_size: usize,
    /// Micro-batches per optimiser step: the gradients of `accumulate` batches are summed, so a
    /// step sees batch_size × accumulate rows per rank.
    pub accumulate: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub optim: OptimConfig,
    pub schedule: ScheduleKind,
    pub warmup: u64,
    /// Epochs between decays of the step schedule.
    pub step_size: u64,
    pub gamma: f64,
    pub min_lr: f64,
    pub seed: u64,
    pub normalize: NormKind,
    pub init: Option<PathBuf>,
    pub device: DeviceKind,
    pub gpu: Option<usize>,
    pub shard: ShardMode,
    pub sync: SyncMode,
    /// Local steps between parameter averages for `SyncMode::Params`.
    pub sync_every: u64,
    pub precision: Precision,
    /// Fraction of the training data held out, seeded, as the validation set (0: none).
    pub val_fraction: f64,
    /// Target size of a gradient bucket in MiB (0: one bucket, no overlap with backward).
    pub bucket_mb: f64,
    /// How gradients travel between ranks: f32, or 16 bits with error feedback.
    pub grad_wire: crate::compress::WireFormat,
    /// Gradient compression: none, or PowerSGD of rank `powersgd_rank` after `powersgd_warmup`
    /// steps of plain allreduce.
    pub compress: CompressKind,
    pub powersgd_rank: usize,
    pub powersgd_warmup: u64,
    /// `--balance auto`: shares of each global batch proportional to the ranks' measured speed
    /// (absent from the settings records when off, so that older checkpoints still match).
    #[serde(skip_serializing_if = "BalanceMode::is_off")]
    pub balance: BalanceMode,
    /// `--staleness 1`: each step applies the previous step's summed gradient while its own sums
    /// travel (absent from the settings records when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub staleness: u64,
    /// `--async-average` (with `--sync params`): each round's parameter average travels while the
    /// ranks take the next round's local steps.
    #[serde(skip_serializing_if = "is_false")]
    pub async_average: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// How each global batch is shared out between ranks (`--shard global`, `--sync grads`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceMode {
    /// Equal parts.
    #[default]
    Off,
    /// After a few steps of timing each rank's compute, parts proportional to its rows per second.
    Auto,
}

impl BalanceMode {
    pub fn is_off(&self) -> bool {
        *self == BalanceMode::Off
    }
}

/// Gradient compression between ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressKind {
    /// Every gradient value travels (in the --grad-wire format).
    #[default]
    None,
    /// PowerSGD (Vogels et al., 2019): each weight matrix as a rank-R product, with error feedback.
    Powersgd,
}

impl TrainConfig {
    /// `--bucket-mb` in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1u64 << 20) as f64) as usize
    }
}

/// The default gradient bucket: large enough that an allreduce's latency is small beside its
/// transfer, well below the 16 MiB above which Open MPI's default algorithm was measured to drop
/// to a third of the ring's bandwidth on the H200 machine (docs/PERF.md).
pub const DEFAULT_BUCKET_MB: f64 = 4.0;

/// How the training set is divided between ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardMode {
    /// Every rank holds the whole training set and draws the same permutation each epoch; rank r
    /// takes the r-th slice of each global batch, so N ranks with batch b train exactly like one
    /// rank with batch N·b.
    Global,
    /// Each rank keeps only its contiguous 1/N of the training set (sizes may differ by one) and
    /// shuffles it on its own: for data larger than one GPU.
    Split,
}

/// What ranks exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Allreduce the gradients every step (synchronous data-parallel SGD).
    Grads,
    /// Local SGD: `--sync-every` local steps, then θ = Σ nᵢθᵢ / Σ nᵢ weighted by samples seen.
    Params,
}

impl TrainConfig {
    /// Defaults for `model`: the values the CLI uses.
    pub fn new(model: ModelKind) -> Self {
        Self {
            model,
            hidden: Vec::new(),
            activation: Activation::Relu,
            dropout: 0.0,
            epochs: Some(10),
            steps: None,
            batch_size: 64,
            accumulate: 1,
            lr: 0.1,
            optim: OptimConfig::default(),
            schedule: ScheduleKind::Constant,
            warmup: 0,
            step_size: 10,
            gamma: 0.1,
            min_lr: 0.0,
            seed: 0,
            normalize: NormKind::Standard,
            init: None,
            device: DeviceKind::Auto,
            gpu: None,
            shard: ShardMode::Global,
            sync: SyncMode::Grads,
            sync_every: 1,
            precision: Precision::F32,
            val_fraction: 0.0,
            bucket_mb: DEFAULT_BUCKET_MB,
            grad_wire: crate::compress::WireFormat::F32,
            compress: CompressKind::None,
            powersgd_rank: 4,
            powersgd_warmup: 100,
            balance: BalanceMode::Off,
            staleness: 0,
            async_average: false,
        }
    }

    /// The run's length in optimiser steps: --steps, else --epochs (10 when neither is set).
    pub fn total_steps(&self, steps_per_epoch: u64) -> anyhow::Result<u64> {
        match (self.steps, self.epochs) {
            (Some(s), _) => Ok(s),
            (None, e) => crate::limits::total_steps(e.unwrap_or(10), steps_per_epoch),
        }
    }

    /// Rows each rank trains on per optimiser step.
    pub fn rows_per_step(&self) -> usize {
        self.batch_size * self.accumulate
    }

    /// Refuse values that cannot train, each with a one-line reason.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::limits::check_f32_positive("--lr", self.lr)?;
        self.optim.validate()?;
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        ensure!(self.accumulate >= 1, "--accumulate must be at least 1");
        ensure!(
            self.epochs != Some(0) && self.steps != Some(0),
            "--epochs and --steps must be at least 1"
        );
        ensure!(
            self.gamma.is_finite() && self.gamma > 0.0,
            "--gamma must be positive (got {})",
            self.gamma
        );
        ensure!(self.step_size >= 1, "--step-size must be at least 1");
        ensure!(self.sync_every >= 1, "--sync-every must be at least 1");
        ensure!(
            self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "--min-lr must be in [0, --lr] (got {})",
            self.min_lr
        );
        ensure!(
            self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout),
            "--dropout must be in [0, 1) (got {})",
            self.dropout
        );
        ensure!(
            self.val_fraction.is_finite() && (0.0..1.0).contains(&self.val_fraction),
            "--val-fraction must be in [0, 1) (got {})",
            self.val_fraction
        );
        ensure!(
            self.bucket_mb.is_finite() && (0.0..=4096.0).contains(&self.bucket_mb),
            "--bucket-mb must be between 0 and 4096 (got {})",
            self.bucket_mb
        );
        ensure!(
            self.powersgd_rank >= 1,
            "--powersgd-rank must be at least 1"
        );
        ensure!(
            !(self.compress == CompressKind::Powersgd
                && self.grad_wire != crate::compress::WireFormat::F32),
            "--compress powersgd sends its factors in f32; leave --grad-wire at f32"
        );
        ensure!(
            (self.compress == CompressKind::None
                && self.grad_wire == crate::compress::WireFormat::F32)
                || self.sync == SyncMode::Grads,
            "--grad-wire and --compress apply to --sync grads"
        );
        ensure!(
            self.balance == BalanceMode::Off
                || (self.shard == ShardMode::Global && self.sync == SyncMode::Grads),
            "--balance auto shares out global batches: it needs --shard global and --sync grads"
        );
        ensure!(
            self.staleness <= 1,
            "--staleness must be 0 (synchronous) or 1 (each step applies the previous step's gradient); got {}",
            self.staleness
        );
        if self.staleness == 1 {
            ensure!(
                self.sync == SyncMode::Grads,
                "--staleness 1 delays the gradient exchange: it needs --sync grads (for --sync params use --async-average)"
            );
            ensure!(
                self.compress == CompressKind::None
                    && self.grad_wire == crate::compress::WireFormat::F32,
                "--staleness 1 does not combine with --grad-wire or --compress yet"
            );
            ensure!(
                self.balance == BalanceMode::Off,
                "--staleness 1 does not combine with --balance auto yet"
            );
            ensure!(
                self.precision == Precision::F32,
                "--staleness 1 does not combine with --precision f16 yet (the loss scale may change between a step's backward and its delayed update)"
            );
        }
        ensure!(
            !self.async_average || self.sync == SyncMode::Params,
            "--async-average overlaps parameter averaging: it needs --sync params (for --sync grads use --staleness 1)"
        );
        if self.model == ModelKind::Mlp && self.hidden.is_empty() {
            bail!("--model mlp needs --hidden W1[,W2,...]: the widths of its hidden layers");
        }
        if self.hidden.contains(&0) {
            bail!(
                "--hidden: layer widths must be at least 1 (got {:?})",
                self.hidden
            );
        }
        Ok(())
    }
}
