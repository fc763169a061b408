//! The compute backends behind one trait: WGSL on any wgpu adapter, and the ndarray CPU reference;
//! and the factory that opens the one a run asks for.
//!
//! A training step calls the phases in order (see `train/step.rs`): `gather`, `forward`, `loss` and
//! `backward` for each micro-batch of this rank's rows (per-sample gradient sums into the flat
//! gradient buffer), then the exchange reads and writes the gradients bucket by bucket
//! (`read_grads` / `write_grads`) when there are several ranks, then `update` applies the optimizer.
//! Training statistics accumulate on the backend and are read only at logging points.

pub mod cpu;
pub mod gpu;

use std::ops::Range;

use dptrain_kernels::optimizer::{Rule, UpdateStep};
use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

use crate::data::{Dataset, Normalizer};
use crate::model::ModelSpec;
use crate::model::net::StatSum;

/// Which dataset to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

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

/// The precision of the matrix products' inputs. Master weights, optimizer state, activations
/// and accumulation stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Matrix-product inputs rounded to f16 with f32 accumulation (tensor cores through
    /// cooperative matrices where the adapter has them, else a SHADER_F16 kernel), with dynamic
    /// loss scaling. Needs a GPU adapter with shader-f16.
    F16,
}

/// Kernel choices by product name ("1024x1024x784 NT BiasRelu f32" → "tile128/k2"), as tuned,
/// cached, broadcast by rank 0 and recorded in checkpoints.
pub type KernelChoices = std::collections::BTreeMap<String, String>;

/// What every backend gets at construction.
pub struct BackendInit<'a> {
    pub spec: &'a ModelSpec,
    pub train: &'a Dataset,
    pub test: Option<&'a Dataset>,
    pub norm: &'a Normalizer,
    /// Largest number of rows any micro-batch or evaluation batch will have.
    pub max_rows: usize,
    /// The optimizer's rule: which state tensors to hold and which update to run.
    pub rule: Rule,
    /// Seeds dropout masks.
    pub seed: u64,
    /// Added to a training sample's index to give its number in the whole training set (the
    /// rank's shard start in split sharding), so that masks agree across world sizes.
    pub sample_base: usize,
    pub precision: Precision,
    /// Average a network's buffers (BatchNorm's running statistics) over ranks through the
    /// gradient exchange: each rank sends running × its rows in the buffers' gradient slots and
    /// the update sets them to the sum × 1/global rows. For several ranks without SyncBatchNorm,
    /// whose running statistics would otherwise drift apart.
    pub average_buffers: bool,
    /// Random crops and flips of each training image (networks on the CPU backend).
    pub augment: crate::data::augment::Augment,
}

/// One micro-batch of a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Rows order[offset .. offset + rows] of the epoch's order.
    pub offset: usize,
    pub rows: usize,
    /// The optimiser step this batch belongs to (dropout masks depend on it).
    pub step: u64,
    /// Add this batch's gradients to those already in the buffer (every micro-batch but the first).
    pub accumulate: bool,
}

pub trait Backend {
    /// A one-line description (adapter name, or "CPU (ndarray)").
    fn describe(&self) -> String;
    fn set_params(&mut self, theta: &[f32]) -> anyhow::Result<()>;
    fn params(&mut self) -> anyhow::Result<Vec<f32>>;
    /// The optimizer's state tensors, named as `Rule::state_names` names them (for checkpoints).
    fn optim_state(&mut self) -> anyhow::Result<Vec<(String, Vec<f32>)>>;
    /// Replace the optimizer's state; every tensor the rule names must be given.
    fn set_optim_state(&mut self, state: &[(String, Vec<f32>)]) -> anyhow::Result<()>;
    /// The order in which this epoch visits the training samples (indices into the training set).
    fn set_order(&mut self, order: &[u32]) -> anyhow::Result<()>;

    /// Phase 1: gather the batch's rows (normalised) from the resident training set.
    fn gather(&mut self, batch: &Batch) -> anyhow::Result<()>;
    /// Phase 2: every layer's output, through the logits.
    fn forward(&mut self) -> anyhow::Result<()>;
    /// Phase 3: the loss and its gradient at the logits; the batch's loss and correct count join
    /// the running training totals.
    fn loss(&mut self) -> anyhow::Result<()>;
    /// Phase 4: per-sample gradient sums into the gradient buffer (added with `Batch::accumulate`).
    fn backward(&mut self) -> anyhow::Result<()>;
    /// Phase 2 under SyncBatchNorm: as `forward`, with each BatchNorm's batch statistics summed
    /// over all ranks by `sum`. Backends without BatchNorm layers ignore `sum`.
    fn forward_synced(&mut self, sum: &mut dyn StatSum) -> anyhow::Result<()> {
        let _ = sum;
        self.forward()
    }
    /// Phase 4 under SyncBatchNorm: as `backward`, with BatchNorm's backward sums over all ranks.
    fn backward_synced(&mut self, sum: &mut dyn StatSum) -> anyhow::Result<()> {
        let _ = sum;
        self.backward()
    }

    /// The gradients `range` into `out`; with `totals`, also the training totals since the last
    /// take (then reset), read in the same wait: what a rank contributes to the exchange.
    fn read_grads(
        &mut self,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>>;
    /// Replace gradients `range` (with their sum over ranks).
    fn write_grads(&mut self, range: Range<usize>, g: &[f32]) -> anyhow::Result<()>;

    /// Phase 4 in stretches, so that the exchange can send the last layers' gradients while
    /// backward goes on: record backward down to dense layer `layer`'s parameter gradients
    /// (layers counted from the input; calls go from the last layer down, `first` on the first
    /// call, and layer 0 finishes backward). The default runs all of backward at the first call.
    fn backward_through(&mut self, _layer: usize, first: bool) -> anyhow::Result<()> {
        if first { self.backward() } else { Ok(()) }
    }
    /// Start copying gradients `range` (with `totals`, also the training totals, then reset) to
    /// the host through exchange slot `slot`, after the work recorded so far; `collect_grads`
    /// waits for them. The default does nothing and `collect_grads` reads.
    fn stage_grads(
        &mut self,
        _slot: usize,
        _range: Range<usize>,
        _totals: bool,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    /// The gradients staged through `slot` (same `range` and `totals`), into `out`.
    fn collect_grads(
        &mut self,
        _slot: usize,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        self.read_grads(range, out, totals)
    }
    /// Phase 6: one optimizer update from the gradient buffer.
    fn update(&mut self, step: &UpdateStep) -> anyhow::Result<()>;

    /// The loss sum of each training batch since the last call, in order (a sync point).
    /// At most `gpu::HISTORY` batches may pass between calls.
    fn take_step_losses(&mut self) -> anyhow::Result<Vec<f32>>;
    /// Training totals since the last call (a sync point), then reset them.
    fn take_train_totals(&mut self) -> anyhow::Result<Totals>;
    /// Time one training step (the batch, then the update) kernel by kernel on the GPU:
    /// (what, seconds) in execution order; None where the device has no timestamps.
    fn profile_step(
        &mut self,
        _batch: &Batch,
        _update: &UpdateStep,
    ) -> anyhow::Result<Option<Vec<(String, f64)>>> {
        Ok(None)
    }
    /// Loss sum and correct count of the current parameters over rows `range` of a dataset.
    fn evaluate(&mut self, split: Split, range: Range<usize>) -> anyhow::Result<Totals>;

    /// What a cache of tuned kernel choices is keyed by ("adapter / driver"); None where the
    /// backend has no kernels to choose between (the CPU).
    fn tuning_key(&self) -> Option<String> {
        None
    }
    /// Whether the device is a hardware GPU (tuning by default only there).
    fn is_hardware(&self) -> bool {
        false
    }
    /// Tune the matrix products a step of full batches runs, except those `known` gives a choice
    /// for: every eligible kernel is verified against the fp32 reference on the device and timed.
    fn autotune(
        &mut self,
        _known: &KernelChoices,
    ) -> anyhow::Result<Vec<dptrain_kernels::tune::Tuned>> {
        Ok(Vec::new())
    }
    /// Run these kernels from the next step on (products not named keep their default).
    fn set_kernel_choices(&mut self, _choices: &KernelChoices) -> anyhow::Result<()> {
        Ok(())
    }
    /// Mixed precision's state: (loss scale, steps skipped for overflow); None in f32.
    fn loss_scale(&mut self) -> anyhow::Result<Option<(f32, u64)>> {
        Ok(None)
    }
}

/// Open the backend the configuration asks for.
pub fn open(
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
        DeviceKind::Cpu => Ok(Box::new(cpu::CpuBackend::new(init)?)),
        DeviceKind::Gpu => Ok(Box::new(gpu::GpuBackend::new(init, &choice)?)),
        DeviceKind::Auto => {
            // A software adapter (lavapipe, SwiftShader) runs the WGSL kernels several times slower
            // than the ndarray backend runs the same mathematics, so auto takes a hardware GPU or
            // the CPU backend; `--device gpu` (or `--gpu N`) still reaches a software adapter.
            if init.spec.kind.is_conv() && gpu.is_none() {
                return Ok(Box::new(cpu::CpuBackend::new(init)?));
            }
            let hardware = gpu.is_some()
                || dptrain_kernels::list_adapters()
                    .iter()
                    .any(|a| a.info.device_type != wgpu::DeviceType::Cpu);
            if hardware {
                return Ok(Box::new(gpu::GpuBackend::new(init, &choice)?));
            }
            tracing::info!(
                "no hardware GPU adapter: training on the CPU reference backend (--device gpu uses a software adapter)"
            );
            Ok(Box::new(cpu::CpuBackend::new(init)?))
        }
    }
}

/// Check that `state` holds exactly the tensors `rule` names, each of `n` values, and return them
/// in the rule's order.
pub fn state_in_order<'a>(
    rule: &Rule,
    state: &'a [(String, Vec<f32>)],
    n: usize,
) -> anyhow::Result<Vec<&'a [f32]>> {
    let names = rule.state_names();
    anyhow::ensure!(
        state.len() == names.len(),
        "optimizer state holds {} tensors, the optimizer needs {names:?}",
        state.len()
    );
    names
        .iter()
        .map(|name| {
            let (_, v) = state
                .iter()
                .find(|(k, _)| k == name)
                .ok_or_else(|| anyhow::anyhow!("optimizer state lacks {name:?}"))?;
            anyhow::ensure!(
                v.len() == n,
                "{name}: {} values for {n} parameters",
                v.len()
            );
            Ok(v.as_slice())
        })
        .collect()
}
