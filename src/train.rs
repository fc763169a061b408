//! The training loop: set-up checks, then per step gather → forward → loss → backward → exchange → update,
//! with evaluation and logging after each epoch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::gpu::GpuBackend;
use crate::backend::{Backend, BackendInit, Split};
use crate::comm::Communicator;
use crate::data::{Dataset, NormKind, Normalizer};
use crate::model::{Activation, ModelKind, ModelSpec};
use crate::optim::{Schedule, ScheduleKind, SgdConfig};
use crate::rng::Rng;

/// Where the gradients are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A GPU adapter if wgpu finds one, else the CPU reference.
    Auto,
    /// The WGSL backend on any wgpu adapter (lavapipe included); an error when there is none.
    Gpu,
    /// The ndarray CPU reference backend.
    Cpu,
}

/// Everything that decides a training run apart from the data.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub model: ModelKind,
    pub hidden: Vec<usize>,
    pub activation: Activation,
    pub epochs: Option<u64>,
    pub steps: Option<u64>,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
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
}

impl TrainConfig {
    /// Defaults for `model`: the values the CLI uses.
    pub fn new(model: ModelKind) -> Self {
        Self {
            model,
            hidden: Vec::new(),
            activation: Activation::Relu,
            epochs: Some(10),
            steps: None,
            batch_size: 64,
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
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
        }
    }

    /// Refuse values that cannot train, each with a one-line reason.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr must be a positive number (got {})",
            self.lr
        );
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
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be ≥ 0 (got {})",
            self.weight_decay
        );
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
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
        ensure!(
            self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "--min-lr must be in [0, --lr] (got {})",
            self.min_lr
        );
        if self.hidden.contains(&0) {
            bail!(
                "--hidden: layer widths must be at least 1 (got {:?})",
                self.hidden
            );
        }
        Ok(())
    }
}

/// Data, normaliser and model spec, checked against each other.
pub struct Setup {
    pub spec: ModelSpec,
    pub norm: Normalizer,
    pub train: Dataset,
    pub test: Option<Dataset>,
}

/// Check the data against the configuration and derive the model.
pub fn setup(cfg: &TrainConfig, train: Dataset, test: Option<Dataset>) -> anyhow::Result<Setup> {
    cfg.validate()?;
    ensure!(train.n_samples > 0, "{}: no training samples", train.source);
    if let Some(t) = &test {
        ensure!(
            t.n_features == train.n_features,
            "{}: {} features, but the training data has {}",
            t.source,
            t.n_features,
            train.n_features
        );
    }
    ensure!(
        cfg.batch_size <= train.n_samples,
        "--batch-size {} is larger than the {} training samples",
        cfg.batch_size,
        train.n_samples
    );
    let classes = if cfg.model == ModelKind::Linreg {
        0
    } else {
        let counts = train.class_counts()?;
        let present = counts.iter().filter(|&&c| c > 0).count();
        if present < 2 {
            bail!(
                "{}: the training labels hold a single class; classification needs at least 2",
                train.source
            );
        }
        if let Some(t) = &test {
            let labels = t.class_labels()?;
            if let Some((i, l)) = labels
                .iter()
                .enumerate()
                .find(|(_, l)| **l as usize >= counts.len())
            {
                bail!(
                    "{}: sample {}: label {l} is out of range: the training labels run 0..{}",
                    t.source,
                    i + 1,
                    counts.len() - 1
                );
            }
        }
        counts.len()
    };
    let spec = ModelSpec::new(
        cfg.model,
        train.n_features,
        classes,
        cfg.hidden.clone(),
        cfg.activation,
    )?;
    let norm = Normalizer::fit(&train, cfg.normalize);
    Ok(Setup {
        spec,
        norm,
        train,
        test,
    })
}

/// Open the backend the configuration asks for.
pub fn make_backend(
    device: DeviceKind,
    gpu: Option<usize>,
    init: &BackendInit<'_>,
) -> anyhow::Result<Box<dyn Backend>> {
    let choice = dptrain_kernels::AdapterChoice { index: gpu };
    match device {
        DeviceKind::Cpu => Ok(Box::new(CpuBackend::new(init)?)),
        DeviceKind::Gpu => Ok(Box::new(GpuBackend::new(init, &choice)?)),
        DeviceKind::Auto => match GpuBackend::new(init, &choice) {
            Ok(b) => Ok(Box::new(b)),
            Err(e) => {
                match e.downcast_ref::<dptrain_kernels::KernelError>() {
                    Some(dptrain_kernels::KernelError::NoAdapter) => {}
                    _ => return Err(e),
                }
                tracing::warn!("no GPU adapter ({e}); training on the CPU reference backend");
                Ok(Box::new(CpuBackend::new(init)?))
            }
        },
    }
}

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
    let mut f = [local.loss_sum];
    let mut u = [local.correct, local.count];
    comm.allreduce_sum_f64(&mut f)?;
    comm.allreduce_sum_u64(&mut u)?;
    Ok(EvalReport::from_totals(
        &Totals {
            loss_sum: f[0],
            correct: u[0],
            count: u[1],
        },
        regression,
    ))
}

/// What a finished run leaves.
pub struct Outcome {
    pub params: Vec<f32>,
    pub reports: Vec<EpochReport>,
    pub steps: u64,
}

/// Initial parameters: from `--init` or seeded.
pub fn initial_params(cfg: &TrainConfig, spec: &ModelSpec) -> anyhow::Result<Vec<f32>> {
    match &cfg.init {
        Some(path) => {
            let saved = crate::modelfile::load(path)?;
            Ok(saved.flat_params(spec, path)?)
        }
        None => Ok(spec.init(cfg.seed)),
    }
}

/// Train one model: every rank runs this with the same configuration; only rank 0's callbacks print.
///
/// Each step, in order: gather this rank's rows of the global batch → forward → loss → backward
/// (per-sample gradient sums) → exchange (allreduce of gradients, loss and counts when there is more
/// than one rank) → SGD update scaled by 1 / samples in the global batch.
pub fn train(
    cfg: &TrainConfig,
    setup: &Setup,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    mut on_epoch: impl FnMut(&EpochReport),
    mut on_step: impl FnMut(u64),
) -> anyhow::Result<Outcome> {
    let n = setup.train.n_samples;
    let batch = cfg.batch_size;
    let steps_per_epoch = n.div_ceil(batch) as u64;
    let total_steps = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * steps_per_epoch,
        (None, None) => 10 * steps_per_epoch,
    };
    let schedule = Schedule {
        kind: cfg.schedule,
        base_lr: cfg.lr,
        warmup: cfg.warmup,
        step_size: cfg.step_size * steps_per_epoch,
        gamma: cfg.gamma,
        min_lr: cfg.min_lr,
        total_steps,
    };
    let sgd = SgdConfig {
        momentum: cfg.momentum,
        nesterov: cfg.nesterov,
        weight_decay: cfg.weight_decay,
    };
    let mut theta = initial_params(cfg, &setup.spec)?;
    comm.broadcast_f32(&mut theta)?;
    backend.set_params(&theta)?;
    let regression = setup.spec.is_regression();
    let start = Instant::now();
    let mut reports = Vec::new();
    let mut step = 0u64;
    let mut epoch = 0u64;
    while step < total_steps {
        epoch += 1;
        let order = Rng::derive(cfg.seed, 1000 + epoch).permutation(n);
        backend.set_order(&order)?;
        let epoch_start = Instant::now();
        let mut s = 0;
        while s < steps_per_epoch && step < total_steps {
            let offset = s as usize * batch;
            let rows = batch.min(n - offset);
            backend.forward_backward(offset, rows)?;
            backend.update(&sgd.step(&schedule, step, rows as u64))?;
            step += 1;
            s += 1;
            on_step(step);
        }
        let totals = backend.take_train_totals()?;
        let secs = epoch_start.elapsed().as_secs_f64();
        let train = EvalReport::from_totals(&totals, regression);
        if !train.loss.is_finite() {
            bail!(
                "training diverged: the loss is {} in epoch {epoch} (by step {step}); lower --lr",
                train.loss
            );
        }
        let test = match &setup.test {
            Some(t) => Some(evaluate(
                backend,
                comm,
                Split::Test,
                t.n_samples,
                regression,
            )?),
            None => None,
        };
        let report = EpochReport {
            epoch,
            step,
            lr: schedule.lr_at(step.saturating_sub(1)),
            train_loss: train.loss,
            train_accuracy: train.accuracy,
            test_loss: test.map(|t| t.loss),
            test_accuracy: test.and_then(|t| t.accuracy),
            test_rmse: test.and_then(|t| t.rmse),
            samples_per_s: totals.count as f64 / secs.max(1e-9),
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        on_epoch(&report);
        reports.push(report);
    }
    let params = backend.params().context("reading the trained parameters")?;
    Ok(Outcome {
        params,
        reports,
        steps: step,
    })
}
