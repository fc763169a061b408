//! The WGSL backend: every phase of the step on the GPU, recorded into one command encoder.
//!
//! Training data is uploaded once (u8 pixels stay u8); each batch is gathered on the GPU through the
//! epoch's permutation. For each batch size the model's layers are compiled once into a plan of
//! dispatches (`plan.rs`). Per-step uniform values (gather offset, loss-history slot, dropout step,
//! learning rate) go to their own block of small uniform rings bound with dynamic offsets, so
//! several steps share one submission (`record.rs`), which is what a step as small as logistic
//! regression's needs. In a single-process run the host waits for the GPU only when it reads
//! something back (logging, evaluation), and otherwise only to keep at most a few submissions in
//! flight. What lives on the device is in `residency.rs`, the exchange's gradient readback in
//! `staging.rs`, and kernel timing in `profiling.rs`; this file holds the backend's state, its
//! construction, and the `Backend` methods, each a short call into those.

mod plan;
mod profiling;
mod record;
mod residency;
mod staging;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use anyhow::Context;
use dptrain_kernels::dropout::Dropout;
use dptrain_kernels::fused::FusedLinear;
use dptrain_kernels::gather::Gather;
use dptrain_kernels::loss::Loss;
use dptrain_kernels::matmul::{Choice, Matmul};
use dptrain_kernels::optimizer::{OptimizerCall, Rule, UpdateStep};
use dptrain_kernels::reduce_stats::{ReduceStats, TOTALS_BYTES, Totals};
use dptrain_kernels::tune::{Product, Tuned, Tuner, candidates};
use dptrain_kernels::{AdapterChoice, F32, GpuContext, RING_SLOTS};

use super::{Backend, BackendInit, Batch, Split};
use crate::model::{Layer, ModelSpec};
use plan::{Op, Plan};
use record::{BatchPhase, Current};
use residency::{Activations, Resident, upload_data};
use staging::Staged;

/// Submissions allowed in flight before the host waits for the oldest.
const MAX_IN_FLIGHT: usize = 4;

/// Training steps recorded into one submission at most.
pub const STEPS_PER_SUBMIT: usize = RING_SLOTS as usize;

/// Per-batch loss sums kept on the GPU between reads (`take_step_losses`).
pub const HISTORY: usize = 1024;

/// What a recorded pass does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    /// Gather through the epoch's order, forward, loss, backward; totals into the training totals.
    Train,
    /// Forward and loss over training rows in file order, into the evaluation totals.
    EvalTrain,
    /// Forward and loss over test rows, into the evaluation totals.
    EvalTest,
}

/// A plan's key: the pass, the batch's rows, and whether backward adds to the gradients.
type PlanKey = (Pass, usize, bool);

/// The u32 words of a training or evaluation total (`TOTALS_BYTES`).
const TOTALS_WORDS: usize = (TOTALS_BYTES / 4) as usize;

pub struct GpuBackend {
    ctx: GpuContext,
    spec: ModelSpec,
    layers: Vec<Layer>,
    rule: Rule,
    seed: u64,
    sample_base: u64,
    max_rows: usize,
    theta: wgpu::Buffer,
    grads: wgpu::Buffer,
    /// The optimizer's state tensors, in `rule.state_names()` order.
    state: Vec<wgpu::Buffer>,
    n_params: usize,
    train: Resident,
    test: Option<Resident>,
    /// The epoch's order on the host too, for host-fed training data.
    order_host: Vec<u32>,
    order: wgpu::Buffer,
    train_identity: wgpu::Buffer,
    test_identity: Option<wgpu::Buffer>,
    act: Activations,
    train_totals: wgpu::Buffer,
    eval_totals: wgpu::Buffer,
    /// A gradient bucket followed by the training totals, copied together for the exchange.
    exchange: wgpu::Buffer,
    /// Loss sum of each training batch since the last `take_step_losses` (a ring of HISTORY).
    history: wgpu::Buffer,
    history_len: usize,
    /// Evaluation batches write their losses here, never read.
    eval_history: wgpu::Buffer,
    /// Bound where a kernel's optional input is unused.
    placeholder: wgpu::Buffer,
    /// max_rows ones: a bias gradient is the product dZᵀ·1, so it runs on the tuned matmul kernels
    /// (split over the rows when they are many and the columns few).
    ones: wgpu::Buffer,
    /// The kernel chosen for each product (tuned, or given by rank 0 or a checkpoint).
    choices: HashMap<Product, Choice>,
    /// Matrix products take f16 inputs (`--precision f16`).
    f16: bool,
    /// The fused small-model step's pipelines, made when a plan first uses them.
    fused: Option<FusedLinear>,
    /// Whether eligible plans use the fused step (`DPTRAIN_FUSED=off` turns it off, to compare).
    fused_enabled: bool,
    /// [loss scale, finite steps in a row, steps skipped]: the scale multiplies the loss gradient
    /// (1 in f32 runs); with f16 the update divides it out and adjusts it on the device.
    scaler: wgpu::Buffer,
    matmul: Matmul,
    gather: Gather,
    loss: Loss,
    dropout: Dropout,
    reduce: ReduceStats,
    optimizer: OptimizerCall,
    plans: HashMap<PlanKey, Plan>,
    current: Option<Current>,
    /// Mappable buffers for gradient buckets, one per exchange slot, kept between steps.
    staging: Vec<Option<wgpu::Buffer>>,
    /// The buckets in flight to the host, by slot.
    staged: Vec<Option<Staged>>,
    pending: Option<wgpu::CommandEncoder>,
    /// The compute pass open on `pending`: the phases of many steps record into one pass, which
    /// closes only for a copy or a submission (a pass per phase cost a tiny model its speed).
    open_pass: Option<wgpu::ComputePass<'static>>,
    /// Uniform-ring blocks used in `pending` by micro-batches (gather, loss totals, dropout) and
    /// by updates: the next one's block.
    batch_slot: u64,
    update_slot: u64,
    /// Updates recorded into `pending`.
    pending_steps: usize,
    /// Steps per submission (STEPS_PER_SUBMIT; DPTRAIN_STEPS_PER_SUBMIT=1..16 overrides, for
    /// measuring what batching submissions is worth on a given adapter).
    steps_per_submit: usize,
    in_flight: VecDeque<wgpu::SubmissionIndex>,
}

impl GpuBackend {
    pub fn new(init: &BackendInit<'_>, choice: &AdapterChoice) -> anyhow::Result<Self> {
        refuse_networks(init)?;
        let ctx = GpuContext::new(choice)?;
        Self::with_context(ctx, init)
    }

    pub fn with_context(ctx: GpuContext, init: &BackendInit<'_>) -> anyhow::Result<Self> {
        refuse_networks(init)?;
        let spec = init.spec.clone();
        let layers = spec.layers();
        let n_params = spec.layout().total;
        let rows = init.max_rows.max(1) as u64;
        let n = n_params as u64;
        let act = Activations::new(&ctx, &spec, &layers, rows)?;
        let train = upload_data(&ctx, init.train, init.norm)?;
        let test = init
            .test
            .map(|t| upload_data(&ctx, t, init.norm))
            .transpose()?;
        let identity = |n: usize| (0..n as u32).collect::<Vec<u32>>();
        let theta = ctx.array("parameters", F32, n)?;
        let grads = ctx.array("gradients", F32, n)?;
        let state = init
            .rule
            .state_names()
            .iter()
            .map(|name| ctx.array(name, F32, n))
            .collect::<Result<Vec<_>, _>>()?;
        let state_refs: Vec<&wgpu::Buffer> = state.iter().collect();
        let f16 = init.precision == super::Precision::F16;
        anyhow::ensure!(
            !f16 || ctx.features.contains(wgpu::Features::SHADER_F16),
            "--precision f16 needs an adapter with shader-f16; {} lacks it",
            ctx.describe()
        );
        // f16 starts at GradScaler's initial scale, 2^16
        let scaler = ctx.upload(
            "loss scaler",
            &[if f16 { 65536.0f32 } else { 1.0 }, 0.0, 0.0],
        )?;
        let optimizer = OptimizerCall::prepare(
            &ctx,
            &init.rule,
            n,
            &theta,
            &grads,
            &state_refs,
            f16.then_some(&scaler),
        )?;
        let backend = Self {
            order: ctx.array(
                "epoch order",
                dptrain_kernels::DType::U32,
                init.train.n_samples as u64,
            )?,
            order_host: Vec::new(),
            train_identity: ctx.upload("train index", &identity(init.train.n_samples))?,
            test_identity: init
                .test
                .map(|t| ctx.upload("test index", &identity(t.n_samples)))
                .transpose()?,
            train_totals: ReduceStats::total_buffer(&ctx)?,
            eval_totals: ReduceStats::total_buffer(&ctx)?,
            exchange: ctx.array("exchange", F32, n + TOTALS_WORDS as u64)?,
            history: ctx.array("loss history", F32, HISTORY as u64)?,
            history_len: 0,
            eval_history: ctx.array("eval loss history", F32, 1)?,
            placeholder: ctx.array("placeholder", F32, 1)?,
            ones: ctx.upload("ones", &vec![1.0f32; rows as usize])?,
            choices: HashMap::new(),
            f16,
            fused: None,
            fused_enabled: std::env::var("DPTRAIN_FUSED").as_deref() != Ok("off"),
            scaler,
            matmul: Matmul::new(&ctx)?,
            gather: Gather::new(&ctx),
            loss: Loss::new(&ctx, spec.loss()),
            dropout: Dropout::new(&ctx),
            reduce: ReduceStats::new(&ctx),
            optimizer,
            plans: HashMap::new(),
            current: None,
            staging: Vec::new(),
            staged: Vec::new(),
            pending: None,
            open_pass: None,
            batch_slot: 0,
            update_slot: 0,
            pending_steps: 0,
            steps_per_submit: std::env::var("DPTRAIN_STEPS_PER_SUBMIT")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(STEPS_PER_SUBMIT, |v| v.clamp(1, STEPS_PER_SUBMIT)),
            in_flight: VecDeque::new(),
            rule: init.rule,
            seed: init.seed,
            sample_base: init.sample_base as u64,
            max_rows: rows as usize,
            theta,
            grads,
            state,
            n_params,
            train,
            test,
            act,
            layers,
            spec,
            ctx,
        };
        backend.ctx.check()?;
        Ok(backend)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }
}

impl Backend for GpuBackend {
    fn describe(&self) -> String {
        self.ctx.describe()
    }

    fn tuning_key(&self) -> Option<String> {
        Some(format!(
            "{} / {} {}",
            self.ctx.info.name, self.ctx.info.driver, self.ctx.info.driver_info
        ))
    }

    fn is_hardware(&self) -> bool {
        self.ctx.info.device_type != wgpu::DeviceType::Cpu
    }

    fn autotune(&mut self, known: &super::KernelChoices) -> anyhow::Result<Vec<Tuned>> {
        self.submit()?;
        self.in_flight.clear();
        // the products of a full training batch, as its plan (with the current choices) has them
        let plan = self.build_plan((Pass::Train, self.max_rows, false))?;
        let mut products: Vec<Product> = plan
            .forward
            .iter()
            .chain(&plan.backward)
            .filter_map(|(_, op)| match op {
                Op::Matmul(p, _) => Some(p.tuned_as()),
                Op::Dropout(_) => None,
            })
            .collect();
        products.sort();
        products.dedup();
        drop(plan);
        let mut tuner = Tuner::new(&self.ctx)?;
        let mut out = Vec::new();
        for p in products {
            if known.contains_key(&p.name()) {
                continue;
            }
            let tuned = tuner.tune(&self.ctx, &p, &candidates(&self.ctx, &p))?;
            self.choices.insert(p, tuned.best);
            out.push(tuned);
        }
        // plans are rebuilt with the new choices
        self.plans.clear();
        self.ctx.check()?;
        Ok(out)
    }

    fn set_kernel_choices(&mut self, choices: &super::KernelChoices) -> anyhow::Result<()> {
        for (product, choice) in choices {
            let p = Product::parse(product)
                .with_context(|| format!("kernel choice for {product:?}: not a product"))?;
            let c = Choice::parse(choice)
                .with_context(|| format!("kernel choice {choice:?} for {product}: unknown"))?;
            self.choices.insert(p, c);
        }
        self.plans.clear();
        Ok(())
    }

    fn loss_scale(&mut self) -> anyhow::Result<Option<(f32, u64)>> {
        if !self.f16 {
            return Ok(None);
        }
        let v: Vec<f32> = self.flush_and_read(|s| &s.scaler, 3)?;
        Ok(Some((v[0], v[2] as u64)))
    }

    fn profile_step(
        &mut self,
        batch: &Batch,
        update: &UpdateStep,
    ) -> anyhow::Result<Option<Vec<(String, f64)>>> {
        self.profile(batch, update)
    }

    fn set_params(&mut self, theta: &[f32]) -> anyhow::Result<()> {
        self.write_params(theta)
    }

    fn params(&mut self) -> anyhow::Result<Vec<f32>> {
        self.read_params()
    }

    fn optim_state(&mut self) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        self.read_optim_state()
    }

    fn set_optim_state(&mut self, state: &[(String, Vec<f32>)]) -> anyhow::Result<()> {
        self.write_optim_state(state)
    }

    fn set_order(&mut self, order: &[u32]) -> anyhow::Result<()> {
        self.write_order(order)
    }

    fn gather(&mut self, batch: &Batch) -> anyhow::Result<()> {
        anyhow::ensure!(
            (batch.offset + batch.rows) as u64 <= self.train.samples(),
            "batch past the epoch's order"
        );
        self.begin(Pass::Train, batch)?;
        self.record(BatchPhase::Gather)
    }

    fn forward(&mut self) -> anyhow::Result<()> {
        self.record(BatchPhase::Forward)
    }

    fn loss(&mut self) -> anyhow::Result<()> {
        self.record(BatchPhase::Loss)
    }

    fn backward(&mut self) -> anyhow::Result<()> {
        self.record(BatchPhase::Backward)?;
        self.current = None;
        Ok(())
    }

    fn read_grads(
        &mut self,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        self.read_back(range, out, totals)
    }

    fn backward_through(&mut self, layer: usize, first: bool) -> anyhow::Result<()> {
        let cur = self.current.as_ref().context("backward before gather")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan of the current batch")?;
        if plan.fused.is_some() {
            // the fused step has no stages: all of it at the first call
            return if first { self.backward() } else { Ok(()) };
        }
        let end = plan
            .layer_ends
            .iter()
            .find(|(l, _)| *l == layer)
            .map(|&(_, e)| e)
            .context("no such layer in the backward plan")?;
        if layer == 0 {
            // the whole rest (for layer 0 that is nothing more, but keep it general)
            return self.backward();
        }
        self.record_backward_to(end)
    }

    fn stage_grads(
        &mut self,
        slot: usize,
        range: Range<usize>,
        totals: bool,
    ) -> anyhow::Result<()> {
        self.stage(slot, range, totals)
    }

    fn collect_grads(
        &mut self,
        slot: usize,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        self.collect(slot, range, out, totals)
    }

    fn write_grads(&mut self, range: Range<usize>, g: &[f32]) -> anyhow::Result<()> {
        self.write_back(range, g)
    }

    fn update(&mut self, step: &UpdateStep) -> anyhow::Result<()> {
        let slot = self.next_update_slot()?;
        self.ensure_pass();
        let pass = self.open_pass.as_mut().context("the open pass")?;
        self.optimizer.record(&self.ctx, pass, slot, step)?;
        self.pending_steps += 1;
        if self.pending_steps >= self.steps_per_submit {
            self.submit()?;
        }
        Ok(())
    }

    fn take_step_losses(&mut self) -> anyhow::Result<Vec<f32>> {
        let n = self.history_len;
        anyhow::ensure!(
            n <= HISTORY,
            "{n} batches since the loss history was last read; it holds {HISTORY}"
        );
        let v = self.flush_and_read(|s| &s.history, n)?;
        self.history_len = 0;
        Ok(v)
    }

    fn take_train_totals(&mut self) -> anyhow::Result<Totals> {
        let words: Vec<u32> = self.flush_and_read(|s| &s.train_totals, TOTALS_WORDS)?;
        self.ctx
            .write(&self.train_totals, 0, &[0u8; TOTALS_BYTES as usize]);
        Ok(Totals::from_words(&words))
    }

    fn evaluate(&mut self, split: Split, range: Range<usize>) -> anyhow::Result<Totals> {
        let (pass, n) = match split {
            Split::Train => (Pass::EvalTrain, self.train.samples()),
            Split::Test => (
                Pass::EvalTest,
                self.test.as_ref().context("no test set")?.samples(),
            ),
        };
        anyhow::ensure!(range.end as u64 <= n, "evaluation range past the data");
        self.submit()?;
        self.ctx
            .write(&self.eval_totals, 0, &[0u8; TOTALS_BYTES as usize]);
        let mut start = range.start;
        while start < range.end {
            let rows = (range.end - start).min(self.max_rows);
            let batch = Batch {
                offset: start,
                rows,
                step: 0,
                accumulate: false,
            };
            self.begin(pass, &batch)?;
            for phase in [BatchPhase::Gather, BatchPhase::Forward, BatchPhase::Loss] {
                self.record(phase)?;
            }
            self.current = None;
            start += rows;
        }
        let words: Vec<u32> = self.flush_and_read(|s| &s.eval_totals, TOTALS_WORDS)?;
        Ok(Totals::from_words(&words))
    }
}

/// The GPU plan records dense layers only: a convolutional model is refused before any adapter
/// is opened.
fn refuse_networks(init: &BackendInit<'_>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !init.spec.kind.is_conv(),
        "--model {}: the convolutional models train on the CPU backend for now (--device cpu); their kernels (im2col, pooling, BatchNorm) are verified on the GPU but not yet recorded by the GPU plan",
        init.spec.kind.name()
    );
    Ok(())
}
