//! The compute backends behind one trait: WGSL on any wgpu adapter, and the ndarray CPU reference.
//!
//! A training step is, in phase order:
//!   `forward_backward` (gather the batch, forward, loss, backward: per-sample gradient sums into the
//!   flat gradient buffer) → the gradient exchange between ranks, if any (`grads_with_totals` / `set_grads`) →
//!   `update` (SGD over the flat buffer, scaled by 1/global samples).
//! Training statistics accumulate on the backend and are read only at logging points.

pub mod cpu;
pub mod gpu;

use dptrain_kernels::reduce_stats::Totals;
use dptrain_kernels::sgd::SgdStep;

use crate::data::{Dataset, Normalizer};
use crate::model::ModelSpec;

/// Which dataset to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// What every backend gets at construction.
pub struct BackendInit<'a> {
    pub spec: &'a ModelSpec,
    pub train: &'a Dataset,
    pub test: Option<&'a Dataset>,
    pub norm: &'a Normalizer,
    /// Largest number of rows any forward_backward or evaluation batch will have.
    pub max_rows: usize,
}

pub trait Backend {
    /// A one-line description (adapter name, or "CPU (ndarray)").
    fn describe(&self) -> String;
    fn set_params(&mut self, theta: &[f32]) -> anyhow::Result<()>;
    fn params(&mut self) -> anyhow::Result<Vec<f32>>;
    /// Momentum buffers, for checkpoints.
    fn velocity(&mut self) -> anyhow::Result<Vec<f32>>;
    fn set_velocity(&mut self, v: &[f32]) -> anyhow::Result<()>;
    /// The order in which this epoch visits the training samples (indices into the training set).
    fn set_order(&mut self, order: &[u32]) -> anyhow::Result<()>;
    /// Gradient sums over the samples order[offset .. offset + rows] into the gradient buffer; the
    /// batch's loss and correct count join the running training totals.
    fn forward_backward(&mut self, offset: usize, rows: usize) -> anyhow::Result<()>;
    /// The gradients into `out` and the training totals since the last take (then reset), in one
    /// wait: what a rank contributes to the fused allreduce.
    fn grads_with_totals(&mut self, out: &mut [f32]) -> anyhow::Result<Totals>;
    fn set_grads(&mut self, g: &[f32]) -> anyhow::Result<()>;
    /// One SGD update from the gradient buffer.
    fn update(&mut self, step: &SgdStep) -> anyhow::Result<()>;
    /// The loss sum of each `forward_backward` batch since the last call, in order (a sync point).
    /// At most `gpu::HISTORY` batches may pass between calls.
    fn take_step_losses(&mut self) -> anyhow::Result<Vec<f32>>;
    /// Training totals since the last call (a sync point), then reset them.
    fn take_train_totals(&mut self) -> anyhow::Result<Totals>;
    /// Time one training step (rows order[offset..offset+rows], then the update) kernel by kernel on
    /// the GPU: (what, seconds) in execution order; None where the device has no timestamps.
    fn profile_step(
        &mut self,
        _offset: usize,
        _rows: usize,
        _step: &SgdStep,
    ) -> anyhow::Result<Option<Vec<(String, f64)>>> {
        Ok(None)
    }
    /// Loss sum and correct count of the current parameters over rows `range` of a dataset.
    fn evaluate(&mut self, split: Split, range: std::ops::Range<usize>) -> anyhow::Result<Totals>;
}
