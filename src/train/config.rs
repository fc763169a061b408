//! What decides a training run apart from the data: `TrainConfig`, its defaults (the CLI's), and
//! its checks.

use std::path::PathBuf;

use anyhow::{bail, ensure};
use serde::Serialize;

pub use crate::backend::{DeviceKind, Precision};
use crate::data::NormKind;
pub use crate::distributed::exchange::config::{
    CompressKind, DEFAULT_BUCKET_MB, ExchangeConfig, SyncMode,
};
use crate::model::{Activation, ModelKind};
use crate::optim::{OptimConfig, ScheduleKind};

/// Everything that decides a training run apart from the data.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub model: ModelKind,
    /// `--arch FILE`: the definition of a `custom` model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<PathBuf>,
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
    pub precision: Precision,
    /// Fraction of the training data held out, seeded, as the validation set (0: none).
    pub val_fraction: f64,
    /// How gradients (or parameters) cross ranks: the exchange's own settings.
    #[serde(flatten)]
    pub exchange: ExchangeConfig,
    /// `--balance auto`: shares of each global batch proportional to the ranks' measured speed
    /// (absent from the settings records when off, so that older checkpoints still match).
    #[serde(skip_serializing_if = "BalanceMode::is_off")]
    pub balance: BalanceMode,
    /// `--sync-bn`: BatchNorm's batch statistics summed over all ranks at every forward
    /// (absent from the settings records when off).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sync_bn: bool,
    /// `--augment`: random crops and flips of the training images.
    #[serde(skip_serializing_if = "crate::data::augment::Augment::is_none")]
    pub augment: crate::data::augment::Augment,
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

impl TrainConfig {
    /// Defaults for `model`: the values the CLI uses.
    pub fn new(model: ModelKind) -> Self {
        Self {
            model,
            arch: None,
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
            precision: Precision::F32,
            val_fraction: 0.0,
            exchange: ExchangeConfig::default(),
            balance: BalanceMode::Off,
            sync_bn: false,
            augment: Default::default(),
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
            !(self.sync_bn && self.balance == BalanceMode::Auto),
            "--sync-bn with --balance auto: the ranks wait for each other inside every BatchNorm, so their speeds cannot be told apart; use one or the other"
        );
        ensure!(
            self.augment.is_none() || self.model.is_conv(),
            "--augment transforms images: it is for the convolutional models (lenet5, resnet20, --arch)"
        );
        ensure!(
            (self.model == ModelKind::Custom) == self.arch.is_some(),
            "--model custom is the network of --arch FILE; give --arch (and no --model)"
        );
        ensure!(
            !self.sync_bn
                || matches!(
                    self.model,
                    ModelKind::Resnet20
                        | ModelKind::Resnet32
                        | ModelKind::Resnet56
                        | ModelKind::Custom
                ),
            "--sync-bn: --model {} has no BatchNorm layers",
            self.model.name()
        );
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
        self.exchange.validate()?;
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
            self.balance == BalanceMode::Off
                || (self.shard == ShardMode::Global && self.exchange.sync == SyncMode::Grads),
            "--balance auto shares out global batches: it needs --shard global and --sync grads"
        );
        if self.exchange.staleness == 1 {
            ensure!(
                self.balance == BalanceMode::Off,
                "--staleness 1 does not combine with --balance auto yet"
            );
            ensure!(
                self.precision == Precision::F32,
                "--staleness 1 does not combine with --precision f16 yet (the loss scale may change between a step's backward and its delayed update)"
            );
        }
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
