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
    pub shard: ShardMode,
    pub sync: SyncMode,
    /// Local steps between parameter averages for `SyncMode::Params`.
    pub sync_every: u64,
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
            shard: ShardMode::Global,
            sync: SyncMode::Grads,
            sync_every: 1,
        }
    }

    /// The run's length in optimiser steps: --steps, else --epochs (10 when neither is set).
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * steps_per_epoch,
            (None, None) => 10 * steps_per_epoch,
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
        ensure!(self.sync_every >= 1, "--sync-every must be at least 1");
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
    /// This rank's training samples (all of them in global mode, its shard in split mode).
    pub train: Dataset,
    pub test: Option<Dataset>,
    /// Training samples over all ranks.
    pub total_train: usize,
}

/// Check the data against the configuration and derive the model (one process).
pub fn setup(cfg: &TrainConfig, train: Dataset, test: Option<Dataset>) -> anyhow::Result<Setup> {
    setup_rank(cfg, train, test, 0, 1)
}

/// As [`setup`], for rank `rank` of `ranks`: the normaliser and classes come from the whole
/// training set so that every rank agrees; in split mode the rank then keeps only its shard.
pub fn setup_rank(
    cfg: &TrainConfig,
    train: Dataset,
    test: Option<Dataset>,
    rank: usize,
    ranks: usize,
) -> anyhow::Result<Setup> {
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
    if cfg.shard == ShardMode::Split {
        let smallest = train.n_samples / ranks;
        ensure!(
            smallest >= 1,
            "--shard split: {} training samples cannot give each of {ranks} ranks one",
            train.n_samples
        );
    }
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
    ensure!(
        cfg.batch_size <= train.n_samples,
        "--batch-size {} is larger than the {} training samples",
        cfg.batch_size,
        train.n_samples
    );
    let norm = Normalizer::fit(&train, cfg.normalize);
    let total_train = train.n_samples;
    let train = match cfg.shard {
        ShardMode::Split if ranks > 1 => {
            let (lo, hi) = shard_range(total_train, rank, ranks);
            train.subset(&(lo..hi).collect::<Vec<_>>())
        }
        _ => train,
    };
    Ok(Setup {
        spec,
        norm,
        train,
        test,
        total_train,
    })
}

/// Open the backend the configuration asks for.
pub fn make_backend(
    device: DeviceKind,
    gpu: Option<usize>,
    local_rank: usize,
    init: &BackendInit<'_>,
) -> anyhow::Result<Box<dyn Backend>> {
    let choice = dptrain_kernels::AdapterChoice {
        index: gpu,
        local_rank,
    };
    match device {
        DeviceKind::Cpu => Ok(Box::new(CpuBackend::new(init)?)),
        DeviceKind::Gpu => Ok(Box::new(GpuBackend::new(init, &choice)?)),
        DeviceKind::Auto => {
            // A software adapter (lavapipe, SwiftShader) runs the WGSL kernels several times slower
            // than the ndarray backend runs the same mathematics, so auto takes a hardware GPU or
            // the CPU backend; `--device gpu` (or `--gpu N`) still reaches a software adapter.
            let hardware = gpu.is_some()
                || dptrain_kernels::list_adapters()
                    .iter()
                    .any(|a| a.info.device_type != wgpu::DeviceType::Cpu);
            if hardware {
                return Ok(Box::new(GpuBackend::new(init, &choice)?));
            }
            tracing::info!(
                "no hardware GPU adapter: training on the CPU reference backend (--device gpu uses a software adapter)"
            );
            Ok(Box::new(CpuBackend::new(init)?))
        }
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
    Ok(EvalReport::from_totals(
        &allreduce_totals(comm, &local)?,
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

/// Which rows of the epoch's order this rank trains on at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Global optimiser steps per epoch (agreed by all ranks).
    pub steps_per_epoch: u64,
    per_rank: usize,
    ranks: usize,
    rank: usize,
    /// Samples in this rank's order (the whole set in global mode, its shard in split mode).
    local_samples: usize,
    /// Every rank's shard size (split mode) or the whole set (global mode, one entry).
    shard: ShardMode,
    total_samples: usize,
}

impl StepPlan {
    pub fn new(shard: ShardMode, total: usize, per_rank: usize, rank: usize, ranks: usize) -> Self {
        let (local, steps) = match shard {
            ShardMode::Global => (total, total.div_ceil(per_rank * ranks)),
            ShardMode::Split => {
                let (lo, hi) = shard_range(total, rank, ranks);
                // the largest shard decides the epoch; smaller ones sit out its last steps
                let largest = (0..ranks)
                    .map(|r| {
                        let (a, b) = shard_range(total, r, ranks);
                        b - a
                    })
                    .max()
                    .unwrap_or(0);
                (hi - lo, largest.div_ceil(per_rank))
            }
        };
        Self {
            steps_per_epoch: steps as u64,
            per_rank,
            ranks,
            rank,
            local_samples: local,
            shard,
            total_samples: total,
        }
    }

    /// (offset, rows) of `rank`'s part of step `s` within the epoch's order; rows may be 0.
    pub fn rows_of(&self, s: u64, rank: usize) -> (usize, usize) {
        let s = s as usize;
        match self.shard {
            ShardMode::Global => {
                let global = self.per_rank * self.ranks;
                let start = s * global;
                let m = global.min(self.total_samples.saturating_sub(start));
                if m == global {
                    (start + rank * self.per_rank, self.per_rank)
                } else {
                    // a short last batch is spread as evenly as the rows allow
                    let lo = m * rank / self.ranks;
                    let hi = m * (rank + 1) / self.ranks;
                    (start + lo, hi - lo)
                }
            }
            ShardMode::Split => {
                let (a, b) = shard_range(self.total_samples, rank, self.ranks);
                let n = b - a;
                let lo = (s * self.per_rank).min(n);
                let hi = ((s + 1) * self.per_rank).min(n);
                (lo, hi - lo)
            }
        }
    }

    /// This rank's rows of step s.
    pub fn mine(&self, s: u64) -> (usize, usize) {
        self.rows_of(s, self.rank)
    }

    /// Samples in step s over all ranks.
    pub fn global_rows(&self, s: u64) -> usize {
        (0..self.ranks).map(|r| self.rows_of(s, r).1).sum()
    }

    /// Size of this rank's order each epoch.
    pub fn local_samples(&self) -> usize {
        self.local_samples
    }
}

/// Rank r's contiguous share [lo, hi) of n samples over `ranks` ranks (sizes differ by at most one).
pub fn shard_range(n: usize, rank: usize, ranks: usize) -> (usize, usize) {
    (n * rank / ranks, n * (rank + 1) / ranks)
}

/// The epoch's sample order for this rank: the same permutation on every rank in global mode,
/// a per-rank permutation of the shard in split mode.
pub fn epoch_order(cfg: &TrainConfig, plan: &StepPlan, epoch: u64, rank: usize) -> Vec<u32> {
    let stream = match cfg.shard {
        ShardMode::Global => 1000 + epoch,
        ShardMode::Split => ((rank as u64 + 1) << 32) | (1000 + epoch),
    };
    Rng::derive(cfg.seed, stream).permutation(plan.local_samples())
}

/// Sum totals over ranks.
fn allreduce_totals(comm: &dyn Communicator, t: &Totals) -> anyhow::Result<Totals> {
    let mut f = [t.loss_sum];
    let mut u = [t.correct, t.count];
    comm.allreduce_sum_f64(&mut f)?;
    comm.allreduce_sum_u64(&mut u)?;
    Ok(Totals {
        loss_sum: f[0],
        correct: u[0],
        count: u[1],
    })
}

/// θ = Σ nᵢθᵢ / Σ nᵢ over ranks, nᵢ being the samples rank i trained on since the last average.
fn average_params(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    samples: u64,
    buf: &mut Vec<f32>,
    recv: &mut Vec<f32>,
) -> anyhow::Result<()> {
    let theta = backend.params()?;
    let w = samples as f32;
    buf.clear();
    buf.extend(theta.iter().map(|v| v * w));
    buf.push(w);
    recv.resize(buf.len(), 0.0);
    comm.allreduce_sum_f32_into(buf, recv)?;
    let total = recv[theta.len()];
    ensure!(total > 0.0, "parameter averaging over zero samples");
    let avg: Vec<f32> = recv[..theta.len()].iter().map(|v| v / total).collect();
    backend.set_params(&avg)
}

/// Host time spent in each phase of the step, summed over a run (seconds). With one rank the GPU
/// runs behind the host, so these measure recording, not execution (`dptrain bench` adds GPU timestamps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PhaseTimes {
    /// Recording gather, forward, loss and backward.
    pub record: f64,
    /// Waiting for the gradients and copying them to the host (includes the GPU's compute).
    pub readback: f64,
    /// The allreduce itself.
    pub allreduce: f64,
    /// Copying the summed gradients back to the device.
    pub upload: f64,
    /// Recording and submitting the SGD update.
    pub update: f64,
    /// Parameter averaging (`--sync params`).
    pub average: f64,
}

/// The step loop's machinery, shared by `train` and `dptrain bench`: one call per optimiser step.
pub struct Stepper {
    pub plan: StepPlan,
    pub schedule: Schedule,
    sgd: SgdConfig,
    sync: SyncMode,
    sync_every: u64,
    /// Whether gradients travel every step (more than one rank, `--sync grads`).
    pub exchange: bool,
    n_params: usize,
    /// The fused exchange buffer: gradients, then loss sum, correct count, sample count.
    send: Vec<f32>,
    recv: Vec<f32>,
    since_sync: u64,
    pub phases: PhaseTimes,
    /// Multiplier on the schedule's learning rate (lowered by NaN rollbacks).
    pub lr_scale: f64,
}

impl Stepper {
    pub fn new(
        cfg: &TrainConfig,
        plan: StepPlan,
        total_steps: u64,
        n_params: usize,
        ranks: usize,
    ) -> Self {
        let steps_per_epoch = plan.steps_per_epoch;
        let exchange = ranks > 1 && cfg.sync == SyncMode::Grads;
        let len = if ranks > 1 { n_params + 3 } else { 0 };
        Self {
            plan,
            schedule: Schedule {
                kind: cfg.schedule,
                base_lr: cfg.lr,
                warmup: cfg.warmup,
                step_size: cfg.step_size * steps_per_epoch,
                gamma: cfg.gamma,
                min_lr: cfg.min_lr,
                total_steps,
            },
            sgd: SgdConfig {
                momentum: cfg.momentum,
                nesterov: cfg.nesterov,
                weight_decay: cfg.weight_decay,
            },
            sync: cfg.sync,
            sync_every: cfg.sync_every,
            exchange,
            n_params,
            send: vec![0.0; len],
            recv: vec![0.0; len],
            since_sync: 0,
            phases: PhaseTimes::default(),
            lr_scale: 1.0,
        }
    }

    /// Global step `step`, the `s`-th of its epoch: gather → forward → loss → backward → exchange →
    /// update. Returns the step's totals over all ranks when they travelled with the gradients.
    pub fn step(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        s: u64,
        step: u64,
    ) -> anyhow::Result<Option<Totals>> {
        let (offset, rows) = self.plan.mine(s);
        let n = self.n_params;
        let t0 = Instant::now();
        if rows > 0 {
            backend.forward_backward(offset, rows)?;
        }
        let t1 = Instant::now();
        self.phases.record += (t1 - t0).as_secs_f64();
        let (global, totals) = if self.exchange {
            let local = if rows > 0 {
                backend.grads_with_totals(&mut self.send[..n])?
            } else {
                self.send[..n].fill(0.0);
                Totals::default()
            };
            self.send[n] = local.loss_sum as f32;
            self.send[n + 1] = local.correct as f32;
            self.send[n + 2] = local.count as f32;
            let t2 = Instant::now();
            comm.allreduce_sum_f32_into(&self.send, &mut self.recv)?;
            let t3 = Instant::now();
            backend.set_grads(&self.recv[..n])?;
            self.phases.readback += (t2 - t1).as_secs_f64();
            self.phases.allreduce += (t3 - t2).as_secs_f64();
            self.phases.upload += t3.elapsed().as_secs_f64();
            let t = Totals {
                loss_sum: f64::from(self.recv[n]),
                correct: self.recv[n + 1] as u64,
                count: self.recv[n + 2] as u64,
            };
            (t.count, Some(t))
        } else if self.sync == SyncMode::Params {
            // local SGD: each rank steps on its own rows
            (rows as u64, None)
        } else {
            (self.plan.global_rows(s) as u64, None)
        };
        let t4 = Instant::now();
        if global > 0 && (rows > 0 || self.exchange) {
            let mut st = self.sgd.step(&self.schedule, step, global);
            st.lr = (f64::from(st.lr) * self.lr_scale) as f32;
            backend.update(&st)?;
        }
        self.phases.update += t4.elapsed().as_secs_f64();
        self.since_sync += rows as u64;
        let done = step + 1;
        if self.sync == SyncMode::Params
            && comm.size() > 1
            && (done.is_multiple_of(self.sync_every) || done == self.schedule.total_steps)
        {
            let t5 = Instant::now();
            average_params(
                backend,
                comm,
                self.since_sync,
                &mut self.send,
                &mut self.recv,
            )?;
            self.since_sync = 0;
            self.phases.average += t5.elapsed().as_secs_f64();
        }
        Ok(totals)
    }
}

/// What to do when the training loss stops being finite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop with an error naming the step.
    #[default]
    Stop,
    /// Go back to the newest checkpoint and lower the learning rate (up to --max-rollbacks times).
    Rollback,
}

/// Checkpoint counting unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointUnit {
    Step,
    #[default]
    Epoch,
}

/// Where to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// This checkpoint file.
    Path(PathBuf),
    /// The newest intact checkpoint in the checkpoint folder; a fresh start when there is none.
    Auto,
}

/// Checkpointing, resuming and failure handling around the training loop.
#[derive(Clone, Debug)]
pub struct RunControl {
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N units (0: only at the end).
    pub checkpoint_every: u64,
    pub checkpoint_unit: CheckpointUnit,
    /// Checkpoints kept in the folder.
    pub keep: usize,
    pub resume: Option<ResumeFrom>,
    pub on_nan: NanPolicy,
    pub max_rollbacks: u32,
    /// Learning-rate factor applied at each rollback.
    pub rollback_lr_factor: f64,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            checkpoint_dir: None,
            checkpoint_every: 0,
            checkpoint_unit: CheckpointUnit::Epoch,
            keep: 3,
            resume: None,
            on_nan: NanPolicy::Stop,
            max_rollbacks: 3,
            rollback_lr_factor: 0.5,
        }
    }
}

/// The settings a checkpoint must share with the run that resumes it: everything that shapes the
/// mathematics except the run's length and where it runs.
pub fn resume_settings(cfg: &TrainConfig, setup: &Setup) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        for k in ["device", "gpu", "init", "epochs", "steps"] {
            o.remove(k);
        }
        o.insert("training_samples".into(), setup.total_train.into());
        o.insert("features".into(), setup.spec.inputs.into());
    }
    v
}

/// Where the run stands: what a checkpoint records.
#[derive(Clone, Debug, Default, PartialEq)]
struct Position {
    step: u64,
    epochs_done: u64,
    steps_in_epoch: u64,
    totals: Totals,
    lr_scale: f64,
}

/// Why a stretch of training stopped early.
enum Halt {
    /// The loss was not finite at this (1-based) step.
    NotFinite {
        step: u64,
        loss: f64,
    },
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Halt {
    fn from(e: anyhow::Error) -> Self {
        Halt::Error(e)
    }
}

/// Train with the default run control (no checkpoints, stop on a non-finite loss).
pub fn train(
    cfg: &TrainConfig,
    setup: &Setup,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    on_epoch: impl FnMut(&EpochReport),
    on_step: impl FnMut(u64),
) -> anyhow::Result<Outcome> {
    train_with(
        cfg,
        &RunControl::default(),
        setup,
        backend,
        comm,
        on_epoch,
        on_step,
    )
}

/// Rank 0 reads a checkpoint (or finds the newest), every rank gets it; errors reach every rank.
fn fetch_checkpoint(
    comm: &dyn Communicator,
    from: &ResumeFrom,
    dir: Option<&std::path::Path>,
    check: impl Fn(&std::path::Path, &crate::checkpoint::State) -> anyhow::Result<()>,
) -> anyhow::Result<Option<crate::checkpoint::Checkpoint>> {
    use crate::checkpoint;
    let found: anyhow::Result<Option<(PathBuf, checkpoint::Checkpoint)>> = if comm.is_root() {
        (|| {
            let found = match from {
                ResumeFrom::Path(p) => Some((p.clone(), checkpoint::load(p)?)),
                ResumeFrom::Auto => {
                    let dir = dir.context("--resume auto needs --checkpoint-dir")?;
                    checkpoint::latest(dir)?
                }
            };
            if let Some((p, ck)) = &found {
                check(p, &ck.state)?;
            }
            Ok(found)
        })()
    } else {
        Ok(None)
    };
    let found = crate::consistency::agree(comm, found)?;
    // rank 0's state text to everyone, then the tensors
    let text = found
        .as_ref()
        .map(|(_, ck)| serde_json::to_string(&ck.state).unwrap_or_default())
        .unwrap_or_default();
    let all = comm.all_gather_bytes(text.as_bytes())?;
    if all[0].is_empty() {
        return Ok(None);
    }
    let state: checkpoint::State = serde_json::from_slice(&all[0])?;
    let n = state.spec.layout().total;
    let (mut params, mut velocity) = match found {
        Some((path, ck)) => {
            if comm.is_root() {
                println!(
                    "dptrain: resuming from {} (step {}, epoch {})",
                    path.display(),
                    ck.state.step,
                    ck.state.epochs_done + 1
                );
            }
            (ck.params, ck.velocity)
        }
        None => (vec![0.0; n], vec![0.0; n]),
    };
    comm.broadcast_f32(&mut params)?;
    comm.broadcast_f32(&mut velocity)?;
    Ok(Some(checkpoint::Checkpoint {
        state,
        params,
        velocity,
    }))
}

/// Train one model: every rank runs this with the same configuration; only rank 0's callbacks print.
///
/// Each step, in order: gather this rank's rows of the global batch → forward → loss → backward
/// (per-sample gradient sums) → exchange: one fused allreduce of [gradients, loss sum, correct,
/// samples] when there is more than one rank → SGD update scaled by 1 / samples in the global batch.
/// Around it: resume from a checkpoint, checkpoints every N steps or epochs and at the end, and a
/// non-finite loss either stops the run naming the step or rolls back to the newest checkpoint.
pub fn train_with(
    cfg: &TrainConfig,
    ctl: &RunControl,
    setup: &Setup,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    mut on_epoch: impl FnMut(&EpochReport),
    mut on_step: impl FnMut(u64),
) -> anyhow::Result<Outcome> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let plan = StepPlan::new(cfg.shard, setup.total_train, cfg.batch_size, rank, ranks);
    ensure!(
        plan.local_samples() == setup.train.n_samples,
        "rank {rank} holds {} training samples, its shard is {}",
        setup.train.n_samples,
        plan.local_samples()
    );
    let total_steps = cfg.total_steps(plan.steps_per_epoch);
    tracing::info!(
        "rank {rank}/{ranks}: {} local samples, {} steps per epoch, {total_steps} steps in all",
        plan.local_samples(),
        plan.steps_per_epoch
    );
    let settings = resume_settings(cfg, setup);
    let check = |p: &std::path::Path, st: &crate::checkpoint::State| -> anyhow::Result<()> {
        crate::checkpoint::compatible(
            p,
            st,
            &setup.spec,
            &settings,
            ranks,
            cfg.shard == ShardMode::Global,
        )?;
        Ok(())
    };
    let dir = ctl.checkpoint_dir.as_deref();
    let resumed = match &ctl.resume {
        Some(from) => fetch_checkpoint(comm, from, dir, check)?,
        None => None,
    };
    let mut pos = match resumed {
        Some(ck) => {
            backend.set_params(&ck.params)?;
            backend.set_velocity(&ck.velocity)?;
            position_of(&ck.state, &plan, cfg, ranks)
        }
        None => {
            let mut theta = initial_params(cfg, &setup.spec)?;
            // rank 0's parameters everywhere, whatever each rank's --init or seed produced
            comm.broadcast_f32(&mut theta)?;
            backend.set_params(&theta)?;
            Position {
                lr_scale: 1.0,
                ..Position::default()
            }
        }
    };
    let mut reports = Vec::new();
    let mut rollbacks = 0;
    loop {
        let mut stepper = Stepper::new(cfg, plan, total_steps, setup.spec.layout().total, ranks);
        stepper.lr_scale = pos.lr_scale;
        let result = run_from(
            cfg,
            ctl,
            setup,
            backend,
            comm,
            &mut stepper,
            &mut pos,
            &settings,
            &mut reports,
            &mut on_epoch,
            &mut on_step,
        );
        match result {
            Ok(()) => break,
            Err(Halt::Error(e)) => return Err(e),
            Err(Halt::NotFinite { step, loss }) => {
                let can = ctl.on_nan == NanPolicy::Rollback
                    && rollbacks < ctl.max_rollbacks
                    && dir.is_some();
                let back = if can {
                    fetch_checkpoint(comm, &ResumeFrom::Auto, dir, check)?
                } else {
                    None
                };
                let Some(ck) = back else {
                    return Err(crate::consistency::Agreed(format!(
                        "training diverged: the loss is {loss} at step {step}; lower --lr{}",
                        if ctl.on_nan == NanPolicy::Rollback {
                            " (no checkpoint left to roll back to)"
                        } else {
                            " or use --on-nan rollback with --checkpoint-dir"
                        }
                    ))
                    .into());
                };
                rollbacks += 1;
                backend.set_params(&ck.params)?;
                backend.set_velocity(&ck.velocity)?;
                // discard what the failed stretch left in the backend's running totals
                backend.take_step_losses()?;
                backend.take_train_totals()?;
                pos = position_of(&ck.state, &plan, cfg, ranks);
                pos.lr_scale *= ctl.rollback_lr_factor;
                if comm.is_root() {
                    println!(
                        "dptrain: the loss is {loss} at step {step}: rolled back to step {} with the learning rate × {} (rollback {rollbacks} of {})",
                        pos.step, pos.lr_scale, ctl.max_rollbacks
                    );
                }
            }
        }
    }
    let params = backend.params().context("reading the trained parameters")?;
    Ok(Outcome {
        params,
        reports,
        steps: pos.step,
    })
}

/// The position a checkpoint records, in this run's steps. With another world size (global
/// sharding) the global batch differs: the run restarts at the first batch boundary of this run
/// at or after the samples already seen in the epoch.
fn position_of(
    st: &crate::checkpoint::State,
    plan: &StepPlan,
    cfg: &TrainConfig,
    ranks: usize,
) -> Position {
    let steps_in_epoch = if st.world_size == ranks || cfg.shard == ShardMode::Split {
        st.steps_in_epoch
    } else {
        st.samples_in_epoch
            .div_ceil((cfg.batch_size * ranks) as u64)
    };
    let (epochs_done, steps_in_epoch) = if steps_in_epoch >= plan.steps_per_epoch {
        (st.epochs_done + 1, 0)
    } else {
        (st.epochs_done, steps_in_epoch)
    };
    Position {
        step: st.step,
        epochs_done,
        steps_in_epoch,
        totals: Totals {
            loss_sum: st.partial_loss_sum,
            correct: st.partial_correct,
            count: st.partial_count,
        },
        lr_scale: st.lr_scale,
    }
}

/// Move the backend's running loss record and totals into the epoch's totals (over all ranks), and
/// find the first step whose loss was not finite. Every rank calls it at the same steps.
fn flush(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    exchange: bool,
    recorded: &mut Vec<u64>,
    epoch_totals: &mut Totals,
) -> Result<(), Halt> {
    let losses = backend.take_step_losses()?;
    let local = backend.take_train_totals()?;
    let mine = if exchange {
        // the per-step totals travelled with the gradients and were checked then
        None
    } else {
        losses
            .iter()
            .zip(recorded.iter())
            .find(|(l, _)| !l.is_finite())
            .map(|(l, s)| (*s + 1, f64::from(*l)))
    };
    recorded.clear();
    if exchange {
        return Ok(());
    }
    // the first non-finite step over all ranks, so that every rank halts the same way
    let bytes = mine.map_or_else(Vec::new, |(s, l)| format!("{s} {l}").into_bytes());
    let all = comm.all_gather_bytes(&bytes)?;
    let first = all
        .iter()
        .filter_map(|b| {
            let t = String::from_utf8_lossy(b);
            let mut it = t.split(' ');
            Some((
                it.next()?.parse::<u64>().ok()?,
                it.next()?.parse::<f64>().ok()?,
            ))
        })
        .min_by_key(|(s, _)| *s);
    let global = allreduce_totals(comm, &local)?;
    epoch_totals.add(&global);
    match first {
        Some((step, loss)) => Err(Halt::NotFinite { step, loss }),
        None => Ok(()),
    }
}

/// Train from `pos` to the end of the run (or until a non-finite loss).
#[allow(clippy::too_many_arguments)]
fn run_from(
    cfg: &TrainConfig,
    ctl: &RunControl,
    setup: &Setup,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    stepper: &mut Stepper,
    pos: &mut Position,
    settings: &serde_json::Value,
    reports: &mut Vec<EpochReport>,
    on_epoch: &mut dyn FnMut(&EpochReport),
    on_step: &mut dyn FnMut(u64),
) -> Result<(), Halt> {
    use crate::backend::gpu::HISTORY;
    let rank = comm.rank();
    let plan = stepper.plan;
    let total_steps = stepper.schedule.total_steps;
    let regression = setup.spec.is_regression();
    let start = Instant::now();
    let exchange = stepper.exchange;
    let mut recorded: Vec<u64> = Vec::new();
    let mut since_flush = 0usize;
    while pos.step < total_steps {
        let epoch = pos.epochs_done + 1;
        backend.set_order(&epoch_order(cfg, &plan, epoch, rank))?;
        let epoch_start = Instant::now();
        let mut epoch_totals = pos.totals;
        let mut s = pos.steps_in_epoch;
        while s < plan.steps_per_epoch && pos.step < total_steps {
            if plan.mine(s).1 > 0 {
                recorded.push(pos.step);
            }
            crate::fault::before_step(rank, pos.step);
            let got = stepper.step(backend, comm, s, pos.step)?;
            if let Some(t) = got {
                if !t.loss_sum.is_finite() {
                    return Err(Halt::NotFinite {
                        step: pos.step + 1,
                        loss: t.loss_sum,
                    });
                }
                epoch_totals.add(&t);
            }
            pos.step += 1;
            s += 1;
            since_flush += 1;
            let checkpoint_now = ctl.checkpoint_dir.is_some()
                && ctl.checkpoint_unit == CheckpointUnit::Step
                && ctl.checkpoint_every > 0
                && pos.step.is_multiple_of(ctl.checkpoint_every)
                && s < plan.steps_per_epoch;
            if since_flush >= HISTORY || checkpoint_now {
                flush(backend, comm, exchange, &mut recorded, &mut epoch_totals)?;
                since_flush = 0;
            }
            if checkpoint_now {
                pos.epochs_done = epoch - 1;
                pos.steps_in_epoch = s;
                pos.totals = epoch_totals;
                write_checkpoint(ctl, setup, backend, comm, pos, &plan, settings)?;
            }
            on_step(pos.step);
        }
        flush(backend, comm, exchange, &mut recorded, &mut epoch_totals)?;
        since_flush = 0;
        let secs = epoch_start.elapsed().as_secs_f64();
        let fresh = epoch_totals.count.saturating_sub(pos.totals.count);
        let train = EvalReport::from_totals(&epoch_totals, regression);
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
            step: pos.step,
            lr: stepper.schedule.lr_at(pos.step.saturating_sub(1)) * stepper.lr_scale,
            train_loss: train.loss,
            train_accuracy: train.accuracy,
            test_loss: test.map(|t| t.loss),
            test_accuracy: test.and_then(|t| t.accuracy),
            test_rmse: test.and_then(|t| t.rmse),
            samples_per_s: fresh as f64 / secs.max(1e-9),
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        on_epoch(&report);
        reports.push(report);
        let finished_epoch = s >= plan.steps_per_epoch;
        if finished_epoch {
            pos.epochs_done = epoch;
            pos.steps_in_epoch = 0;
            pos.totals = Totals::default();
        } else {
            pos.epochs_done = epoch - 1;
            pos.steps_in_epoch = s;
            pos.totals = epoch_totals;
        }
        let by_epoch = ctl.checkpoint_unit == CheckpointUnit::Epoch
            && ctl.checkpoint_every > 0
            && finished_epoch
            && epoch.is_multiple_of(ctl.checkpoint_every);
        let by_step_at_boundary = ctl.checkpoint_unit == CheckpointUnit::Step
            && ctl.checkpoint_every > 0
            && pos.step.is_multiple_of(ctl.checkpoint_every);
        if ctl.checkpoint_dir.is_some()
            && (by_epoch || by_step_at_boundary || pos.step >= total_steps)
        {
            write_checkpoint(ctl, setup, backend, comm, pos, &plan, settings)?;
        }
    }
    Ok(())
}

/// Rank 0 writes the checkpoint for `pos` (parameters and momentum as the backend holds them).
fn write_checkpoint(
    ctl: &RunControl,
    setup: &Setup,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    pos: &Position,
    plan: &StepPlan,
    settings: &serde_json::Value,
) -> anyhow::Result<()> {
    let Some(dir) = &ctl.checkpoint_dir else {
        return Ok(());
    };
    if !comm.is_root() {
        return Ok(());
    }
    let samples_in_epoch: u64 = (0..pos.steps_in_epoch)
        .map(|s| plan.global_rows(s) as u64)
        .sum();
    let ck = crate::checkpoint::Checkpoint {
        state: crate::checkpoint::State {
            step: pos.step,
            epochs_done: pos.epochs_done,
            samples_in_epoch,
            steps_in_epoch: pos.steps_in_epoch,
            partial_loss_sum: pos.totals.loss_sum,
            partial_correct: pos.totals.correct,
            partial_count: pos.totals.count,
            lr_scale: pos.lr_scale,
            world_size: comm.size(),
            settings: settings.clone(),
            spec: setup.spec.clone(),
            norm: setup.norm.clone(),
        },
        params: backend.params()?,
        velocity: backend.velocity()?,
    };
    let path = crate::checkpoint::save(dir, &ck, ctl.keep)?;
    tracing::info!("checkpoint {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(plan_of: impl Fn(usize) -> StepPlan, ranks: usize, n: usize, per_epoch_ok: bool) {
        let plans: Vec<StepPlan> = (0..ranks).map(&plan_of).collect();
        let steps = plans[0].steps_per_epoch;
        assert!(
            plans.iter().all(|p| p.steps_per_epoch == steps),
            "ranks agree on steps"
        );
        let mut seen = vec![0usize; n];
        for s in 0..steps {
            let mut global = 0;
            for (r, p) in plans.iter().enumerate() {
                let (off, rows) = p.mine(s);
                global += rows;
                for i in off..off + rows {
                    match p.shard {
                        ShardMode::Global => seen[i] += 1,
                        ShardMode::Split => seen[shard_range(n, r, ranks).0 + i] += 1,
                    }
                }
            }
            assert_eq!(global, plans[0].global_rows(s));
            assert!(global > 0 || !per_epoch_ok);
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "every sample exactly once per epoch"
        );
    }

    #[test]
    fn global_sharding_visits_each_sample_once_and_splits_the_short_batch() {
        for ranks in 1..=4 {
            for n in [7, 97, 100, 101] {
                covered(
                    |r| StepPlan::new(ShardMode::Global, n, 8, r, ranks),
                    ranks,
                    n,
                    true,
                );
            }
        }
        // 97 samples, 3 ranks of 8: 4 full global batches of 24, then 1 row spread over 3 ranks
        let p = |r| StepPlan::new(ShardMode::Global, 97, 8, r, 3);
        assert_eq!(p(0).steps_per_epoch, 5);
        assert_eq!(
            (p(0).mine(4), p(1).mine(4), p(2).mine(4)),
            ((96, 0), (96, 0), (96, 1))
        );
        assert_eq!(p(1).mine(1), (32, 8));
    }

    #[test]
    fn split_sharding_covers_uneven_shards_and_agrees_on_steps() {
        for ranks in 1..=4 {
            for n in [7, 101, 1000] {
                covered(
                    |r| StepPlan::new(ShardMode::Split, n, 10, r, ranks),
                    ranks,
                    n,
                    true,
                );
            }
        }
        // 101 samples on 3 ranks: shards of 33, 34, 34; 4 steps of 10 each epoch
        let p = |r| StepPlan::new(ShardMode::Split, 101, 10, r, 3);
        assert_eq!((p(0).local_samples(), p(1).local_samples()), (33, 34));
        assert_eq!(p(0).steps_per_epoch, 4);
        assert_eq!(p(0).mine(3), (30, 3));
        assert_eq!(p(2).global_rows(3), 3 + 4 + 4);
    }

    #[test]
    fn split_orders_differ_between_ranks_and_global_orders_do_not() {
        let mut cfg = TrainConfig::new(ModelKind::Softmax);
        let plan = StepPlan::new(ShardMode::Global, 50, 5, 0, 2);
        assert_eq!(
            epoch_order(&cfg, &plan, 1, 0),
            epoch_order(&cfg, &plan, 1, 1)
        );
        assert_ne!(
            epoch_order(&cfg, &plan, 1, 0),
            epoch_order(&cfg, &plan, 2, 0)
        );
        cfg.shard = ShardMode::Split;
        let plan = StepPlan::new(ShardMode::Split, 50, 5, 0, 2);
        assert_ne!(
            epoch_order(&cfg, &plan, 1, 0),
            epoch_order(&cfg, &plan, 1, 1)
        );
    }
}
