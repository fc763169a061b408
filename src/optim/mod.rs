//! Optimizers as a part of their own: which rule updates the parameters, its settings and flags,
//! the names of its state tensors (which checkpoints store without knowing the rule), and the one
//! learning rate of each step (`schedule.rs`).
//!
//! The update rules themselves are kernels (`dptrain_kernels::optimizer`: SGD, Adam, AdamW, and the
//! global-norm clipping before them), with CPU references that the CPU backend runs. Adding an
//! optimizer: its shader and launcher, one arm in `dptrain_kernels::optimizer`, and its kind here.

pub mod schedule;

use dptrain_kernels::optimizer::{Rule, UpdateStep};
use serde::{Deserialize, Serialize};

pub use schedule::{LearningRate, Schedule, ScheduleKind};

/// Which update rule trains the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with optional momentum, Nesterov and L2 weight decay (torch.optim.SGD, no dampening).
    #[default]
    Sgd,
    /// Adam with bias correction; weight decay is added to the gradient (torch.optim.Adam).
    Adam,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    Adamw,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sgd => "sgd",
            Self::Adam => "adam",
            Self::Adamw => "adamw",
        }
    }
}

/// An optimizer's settings besides the learning rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub optimizer: OptimizerKind,
    /// SGD momentum in [0, 1).
    pub momentum: f64,
    pub nesterov: bool,
    /// Applied to every tensor, as PyTorch's default parameter group does.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global norm of the (globally summed, accumulated) mean gradient to this value.
    pub clip_grad_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Sgd,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad_norm: None,
        }
    }
}

impl OptimConfig {
    /// The kernels' rule for these settings.
    pub fn rule(&self) -> Rule {
        match self.optimizer {
            OptimizerKind::Sgd => Rule::Sgd {
                momentum: self.momentum as f32,
                nesterov: self.nesterov,
            },
            OptimizerKind::Adam | OptimizerKind::Adamw => Rule::Adam {
                beta1: self.beta1 as f32,
                beta2: self.beta2 as f32,
                eps: self.eps as f32,
                decoupled: self.optimizer == OptimizerKind::Adamw,
            },
        }
    }

    /// The update of (0-based) step `step` at rate `lr`, over a global batch of `samples`.
    pub fn update(&self, lr: f64, step: u64, samples: u64) -> UpdateStep {
        UpdateStep {
            rule: self.rule(),
            lr: lr as f32,
            weight_decay: self.weight_decay as f32,
            grad_scale: 1.0 / samples.max(1) as f32,
            t: step + 1,
            max_norm: self.clip_grad_norm.map(|c| c as f32),
        }
    }

    /// Refuse values that cannot train, each with a one-line reason.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum),
            "--momentum must be in [0, 1) (got {})",
            self.momentum
        );
        ensure!(
            !self.nesterov || self.momentum > 0.0,
            "--nesterov needs --momentum > 0"
        );
        ensure!(
            self.optimizer == OptimizerKind::Sgd || (self.momentum == 0.0 && !self.nesterov),
            "--momentum and --nesterov are for --optimizer sgd; Adam's momentum is --beta1"
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be ≥ 0 (got {})",
            self.weight_decay
        );
        for (flag, v) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            ensure!(
                v.is_finite() && (0.0..1.0).contains(&v),
                "{flag} must be in [0, 1) (got {v})"
            );
        }
        ensure!(
            self.eps.is_finite() && self.eps > 0.0 && (self.eps as f32) > 0.0,
            "--eps must be a positive number representable in f32 (got {})",
            self.eps
        );
        if let Some(c) = self.clip_grad_norm {
            ensure!(
                c.is_finite() && c > 0.0 && (c as f32) > 0.0,
                "--clip-grad-norm must be a positive number (got {c})"
            );
        }
        Ok(())
    }
}

/// The optimizer's flags, shared by every command that trains.
#[derive(clap::Args, Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(next_help_heading = "Optimizer")]
pub struct OptimArgs {
    /// Update rule: sgd, adam (L2 decay added to the gradient) or adamw (decoupled decay).
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    /// SGD momentum in [0, 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Nesterov momentum (SGD; needs --momentum > 0).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay on every tensor: L2 added to the gradient (sgd, adam) or decoupled (adamw).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub beta1: f64,
    /// Adam's second-moment decay.
    #[arg(long, default_value_t = 0.999, allow_negative_numbers = true)]
    pub beta2: f64,
    /// Adam's denominator term.
    #[arg(long, default_value_t = 1e-8, allow_negative_numbers = true)]
    pub eps: f64,
    /// Clip the global norm of the mean gradient (over all ranks and micro-batches) to this value.
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
}

impl OptimArgs {
    pub fn config(&self) -> OptimConfig {
        OptimConfig {
            optimizer: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            clip_grad_norm: self.clip_grad_norm,
        }
    }
}
