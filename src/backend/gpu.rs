//! The WGSL backend: every phase of the step on the GPU, recorded into one command encoder.
//!
//! Training data is uploaded once (u8 pixels stay u8); each batch is gathered on the GPU through the
//! epoch's permutation. For each batch size the model's layers are compiled once into a plan of
//! dispatches ("plans", `build_plan`), fusing each dense layer's bias and activation into its matrix
//! product, and its activation's derivative into the product that computes the gradient at its
//! output. Per-step uniform values (gather offset, loss-history slot, dropout step, learning rate)
//! go to their own block of small uniform rings bound with dynamic offsets, so several steps share
//! one submission, which is what a step as small as logistic regression's needs. In a
//! single-process run the host waits for the GPU only when it reads something back (logging,
//! evaluation), and otherwise only to keep at most a few submissions in flight.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use anyhow::Context;
use dptrain_kernels::dropout::{Dropout, DropoutCall};
use dptrain_kernels::fused::{self, FusedArgs, FusedCall, FusedLinear};
use dptrain_kernels::gather::{DeviceData, Gather, GatherCall};
use dptrain_kernels::loss::{Loss, LossArgs};
use dptrain_kernels::matmul::{At, Choice, Epilogue, Matmul, MatmulArgs, MatmulCall};
use dptrain_kernels::optimizer::{OptimizerCall, Rule, UpdateStep};
use dptrain_kernels::reduce_stats::{ReduceCall, ReduceStats, Totals};
use dptrain_kernels::tune::{Product, Tuned, Tuner, candidates};
use dptrain_kernels::{AdapterChoice, Dispatch, F32, GpuContext, KernelError, RING_SLOTS};

use super::{Backend, BackendInit, Batch, Split, state_in_order};
use crate::data::{Dataset, Features, Normalizer};
use crate::model::{Layer, ModelSpec};

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

/// One recorded operation of a plan.
enum Op {
    /// A matrix product (one dispatch, or a split-K pass and its sum): the same every step.
    Matmul(Product, MatmulCall),
    /// Dropout, whose per-step block (batch offset, step) is written at `gather`.
    Dropout(DropoutCall),
}

/// The product `args` computes, as the tuner names it.
fn product_of(args: &MatmulArgs<'_>, f16: bool) -> Product {
    Product {
        m: args.m,
        n: args.n,
        k: args.k,
        trans_a: args.trans_a,
        trans_b: args.trans_b,
        epilogue: args.epilogue,
        f16,
    }
}

/// Prepare `args` with the tuned choice for its product (the default one when it has none, or when
/// this adapter cannot build the tuned one, as a rank whose GPU differs from rank 0's may not).
fn prepare_product(
    mm: &mut Matmul,
    ctx: &GpuContext,
    choices: &HashMap<Product, Choice>,
    args: &MatmulArgs<'_>,
    f16: bool,
) -> anyhow::Result<Op> {
    let p = product_of(args, f16);
    let default = p.default_choice();
    let choice = choices.get(&p.tuned_as()).copied().unwrap_or(default);
    let call = match mm.prepare_with(ctx, args, choice) {
        Err(e) if choice != default => {
            tracing::warn!(
                "{}: {} cannot run here ({e}); using {}",
                p.name(),
                choice.name(),
                default.name()
            );
            mm.prepare_with(ctx, args, default)?
        }
        other => other?,
    };
    Ok(Op::Matmul(p, call))
}

/// Everything recorded for one batch size of one pass.
struct Plan {
    /// None for host-fed data: the batch is uploaded instead.
    gather: Option<GatherCall>,
    forward: Vec<(String, Op)>,
    loss: Dispatch,
    reduce: ReduceCall,
    backward: Vec<(String, Op)>,
    /// For each dense layer, the number of backward ops after which its parameter gradients are
    /// final (backward runs from the last layer): where a staged backward may stop.
    layer_ends: Vec<(usize, usize)>,
    /// A training step of a small one-layer model as one dispatch (or two for large batches):
    /// gather, forward, loss, gradient and its reduction (`fused_linear.wgsl`). When present, it
    /// is what the step records in place of all of the above.
    fused: Option<FusedCall>,
}

/// The batch being recorded: its plan and the uniform-ring offsets its dispatches read.
struct Current {
    key: PlanKey,
    gather_at: Option<u32>,
    reduce_at: u32,
    /// The ring offset of each dropout op, forward ops first, then backward ops.
    dropout_at: Vec<u32>,
    /// The fused step's ring offset, when the plan has one.
    fused_at: Option<u32>,
    /// Backward ops recorded so far (a staged backward records them in stretches).
    backward_done: usize,
}

/// A gradient bucket on its way to the host: a copy into a mappable buffer, submitted, mapping.
struct Staged {
    buf: wgpu::Buffer,
    bytes: u64,
    submission: wgpu::SubmissionIndex,
    mapped: std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

/// Device-side activations for up to `max_rows` rows.
struct Activations {
    /// acts[0] is the gathered batch, acts[i + 1] layer i's output (the last: logits).
    acts: Vec<wgpu::Buffer>,
    /// Gradient buffers; grad_of[j] picks the one that holds the loss gradient at tensor j (a dense
    /// layer's pre-activation gradient; a dropout's input shares its output's buffer).
    dacts: Vec<wgpu::Buffer>,
    grad_of: Vec<usize>,
    targets: wgpu::Buffer,
    stats: wgpu::Buffer,
}

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

/// Where a dataset lives: on the GPU (gathered there each step), or, when it does not fit the
/// adapter's largest binding even as bytes, on the host, normalised, each batch uploaded as it is
/// needed (slower: one submission per step).
enum Resident {
    Device(DeviceData),
    Host {
        x: Vec<f32>,
        y: Vec<f32>,
        features: usize,
    },
}

impl Resident {
    fn samples(&self) -> u64 {
        match self {
            Resident::Device(d) => d.samples,
            Resident::Host { y, .. } => y.len() as u64,
        }
    }
}

/// Upload a dataset, compactly when its values are bytes; keep it on the host when it cannot fit.
/// `DPTRAIN_DEVICE_DATA_LIMIT=BYTES` lowers the limit, to exercise the host path in tests.
fn upload_data(ctx: &GpuContext, ds: &Dataset, norm: &Normalizer) -> anyhow::Result<Resident> {
    let up = |ds: &Dataset| match &ds.x {
        Features::U8(x) => DeviceData::from_u8(ctx, x, &ds.y, &norm.shift, &norm.scale),
        Features::F32(x) => DeviceData::from_f32(ctx, x, &ds.y, &norm.shift, &norm.scale),
    };
    let limit = std::env::var("DPTRAIN_DEVICE_DATA_LIMIT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = |ds: &Dataset| match &ds.x {
        Features::U8(v) => v.len() as u64,
        Features::F32(v) => F32.bytes(v.len() as u64),
    };
    let fits = |ds: &Dataset| limit.is_none_or(|l| bytes(ds) <= l);
    let host = || {
        tracing::warn!(
            "{}: too large for the adapter's largest binding; batches are fed from the host (slower)",
            ds.source
        );
        Resident::Host {
            x: norm.apply_dataset(ds),
            y: ds.y.clone(),
            features: ds.n_features,
        }
    };
    let result = if fits(ds) {
        up(ds)
    } else {
        Err(KernelError::TooLarge {
            what: ds.source.clone(),
            bytes: bytes(ds),
            limit: limit.unwrap_or(0),
        })
    };
    match result {
        Ok(d) => Ok(Resident::Device(d)),
        Err(KernelError::TooLarge { .. }) => {
            let mut compact = ds.clone();
            if compact.compact_to_u8() && fits(&compact) {
                if let Ok(d) = up(&compact) {
                    tracing::info!(
                        "{}: stored as u8 on the GPU to fit its largest binding",
                        ds.source
                    );
                    return Ok(Resident::Device(d));
                }
            }
            Ok(host())
        }
        Err(e) => Err(anyhow::Error::from(e).context(ds.source.clone())),
    }
}

impl GpuBackend {
    pub fn new(init: &BackendInit<'_>, choice: &AdapterChoice) -> anyhow::Result<Self> {
        let ctx = GpuContext::new(choice)?;
        Self::with_context(ctx, init)
    }

    pub fn with_context(ctx: GpuContext, init: &BackendInit<'_>) -> anyhow::Result<Self> {
        let spec = init.spec.clone();
        let layers = spec.layers();
        let n_params = spec.layout().total;
        let rows = init.max_rows.max(1) as u64;
        let n = n_params as u64;
        let mut acts = vec![ctx.array("activation 0", F32, rows * spec.inputs as u64)?];
        let mut dacts = vec![ctx.array("unused", F32, 1)?];
        for (i, layer) in layers.iter().enumerate() {
            let w = rows * layer.width() as u64;
            acts.push(ctx.array(&format!("activation {}", i + 1), F32, w)?);
            dacts.push(ctx.array(&format!("activation gradient {}", i + 1), F32, w)?);
        }
        // a dropout's input gradient is its output gradient scaled in place
        let mut grad_of: Vec<usize> = (0..=layers.len()).collect();
        for i in (1..layers.len()).rev() {
            if matches!(layers[i], Layer::Dropout { .. }) {
                grad_of[i] = grad_of[i + 1];
            }
        }
        let act = Activations {
            acts,
            dacts,
            grad_of,
            targets: ctx.array("batch targets", F32, rows)?,
            stats: ctx.array("row stats", F32, 2 * rows)?,
        };
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
            exchange: ctx.array("exchange", F32, n + 4)?,
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

    /// Compile the layer list into dispatches for batches of `rows` rows.
    fn build_plan(&mut self, (pass, rows, accumulate): PlanKey) -> anyhow::Result<Plan> {
        tracing::debug!("building the {pass:?} plan for batches of {rows} rows");
        let ctx = &self.ctx;
        let spec = &self.spec;
        let layers = &self.layers;
        let r = rows as u64;
        let train = pass == Pass::Train;
        let (data, index) = match pass {
            // training batches go through the epoch's permutation, evaluation reads in file order
            Pass::Train => (&self.train, &self.order),
            Pass::EvalTrain => (&self.train, &self.train_identity),
            Pass::EvalTest => (
                self.test.as_ref().context("no test set")?,
                self.test_identity.as_ref().context("no test set")?,
            ),
        };
        let act = &self.act;
        // which buffer holds tensor j: in evaluation a dropout passes its input through
        let mut tensor: Vec<usize> = (0..=layers.len()).collect();
        if !train {
            for (i, l) in layers.iter().enumerate() {
                if matches!(l, Layer::Dropout { .. }) {
                    tensor[i + 1] = tensor[i];
                }
            }
        }
        let t = |j: usize| &act.acts[tensor[j]];
        let g = |j: usize| &act.dacts[act.grad_of[j]];
        let gather = match data {
            Resident::Device(data) => {
                Some(
                    self.gather
                        .prepare(ctx, data, index, r, &act.acts[0], &act.targets)?,
                )
            }
            Resident::Host { .. } => None,
        };
        let mut forward = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            match *layer {
                Layer::Dense {
                    index: l,
                    fan_in,
                    fan_out,
                    activation,
                } => {
                    let (wo, bo) = spec.offsets(l);
                    let op = prepare_product(
                        &mut self.matmul,
                        ctx,
                        &self.choices,
                        &MatmulArgs {
                            m: r,
                            n: fan_out as u64,
                            k: fan_in as u64,
                            trans_a: false,
                            trans_b: true,
                            epilogue: activation.map_or(Epilogue::Bias, |a| a.forward()),
                            a: At::start(t(i)),
                            b: At {
                                buf: &self.theta,
                                off: wo as u64,
                            },
                            c: At::start(t(i + 1)),
                            bias: Some(At {
                                buf: &self.theta,
                                off: bo as u64,
                            }),
                            aux: None,
                        },
                        self.f16,
                    )?;
                    let what = match activation {
                        Some(a) => format!("bias + {a:?}"),
                        None => "bias".into(),
                    };
                    forward.push((format!("layer {l} forward (matmul NT + {what})"), op));
                }
                Layer::Dropout {
                    index: k, width, ..
                } if train => {
                    let mask = layer.mask(self.seed).context("dropout mask")?;
                    let c = self.dropout.prepare(
                        ctx,
                        &mask,
                        r,
                        width as u64,
                        Some(t(i)),
                        t(i + 1),
                        index,
                        self.sample_base,
                        &self.placeholder,
                    )?;
                    forward.push((format!("dropout {k} forward"), Op::Dropout(c)));
                }
                Layer::Dropout { .. } => {}
            }
        }
        let last = layers.len();
        let loss = self.loss.prepare(
            ctx,
            &LossArgs {
                rows: r,
                classes: spec.outputs as u64,
                z: t(last),
                t: &act.targets,
                dz: g(last),
                stats: &act.stats,
                scaler: &self.scaler,
            },
        )?;
        let (totals, history) = if train {
            (&self.train_totals, &self.history)
        } else {
            (&self.eval_totals, &self.eval_history)
        };
        let reduce = self.reduce.prepare(ctx, r, &act.stats, totals, history)?;
        let mut backward = Vec::new();
        let mut layer_ends = Vec::new();
        for (i, layer) in layers.iter().enumerate().rev().filter(|_| train) {
            match *layer {
                Layer::Dense {
                    index: l,
                    fan_in,
                    fan_out,
                    ..
                } => {
                    let (wo, bo) = spec.offsets(l);
                    let grad_ep = if accumulate {
                        Epilogue::Accumulate
                    } else {
                        Epilogue::None
                    };
                    // dW = dZᵀ·X: [out, in] from dZ [rows, out] and X [rows, in]
                    let dw = prepare_product(
                        &mut self.matmul,
                        ctx,
                        &self.choices,
                        &MatmulArgs {
                            m: fan_out as u64,
                            n: fan_in as u64,
                            k: r,
                            trans_a: true,
                            trans_b: false,
                            epilogue: grad_ep,
                            a: At::start(g(i + 1)),
                            b: At::start(t(i)),
                            c: At {
                                buf: &self.grads,
                                off: wo as u64,
                            },
                            bias: None,
                            aux: None,
                        },
                        self.f16,
                    )?;
                    backward.push((format!("layer {l} weight gradient (matmul TN)"), dw));
                    // db = dZᵀ·1: [out] from dZ [rows, out] and ones [rows]; kept in f32
                    let db = prepare_product(
                        &mut self.matmul,
                        ctx,
                        &self.choices,
                        &MatmulArgs {
                            m: fan_out as u64,
                            n: 1,
                            k: r,
                            trans_a: true,
                            trans_b: false,
                            epilogue: grad_ep,
                            a: At::start(g(i + 1)),
                            b: At::start(&self.ones),
                            c: At {
                                buf: &self.grads,
                                off: bo as u64,
                            },
                            bias: None,
                            aux: None,
                        },
                        false,
                    )?;
                    backward.push((format!("layer {l} bias gradient (matmul TN, dZᵀ·1)"), db));
                    layer_ends.push((l, backward.len()));
                    if i == 0 {
                        continue;
                    }
                    // dX = (dZ·W) ⊙ f'(Y) for the dense layer Y = f(..) that produced X, found
                    // through any dropouts between (their masks are applied after, in place)
                    let producer = (0..i)
                        .rev()
                        .find(|&j| matches!(layers[j], Layer::Dense { .. }));
                    let (epilogue, aux) = match producer.map(|j| (j, layers[j])) {
                        Some((
                            j,
                            Layer::Dense {
                                activation: Some(a),
                                ..
                            },
                        )) => (a.backward(), Some(At::start(t(j + 1)))),
                        _ => (Epilogue::None, None),
                    };
                    let dx = prepare_product(
                        &mut self.matmul,
                        ctx,
                        &self.choices,
                        &MatmulArgs {
                            m: r,
                            n: fan_in as u64,
                            k: fan_out as u64,
                            trans_a: false,
                            trans_b: false,
                            epilogue,
                            a: At::start(g(i + 1)),
                            b: At {
                                buf: &self.theta,
                                off: wo as u64,
                            },
                            c: At::start(g(i)),
                            bias: None,
                            aux,
                        },
                        self.f16,
                    )?;
                    backward.push((
                        format!("layer {l} input gradient (matmul NN + activation')"),
                        dx,
                    ));
                }
                Layer::Dropout {
                    index: k, width, ..
                } => {
                    let mask = layer.mask(self.seed).context("dropout mask")?;
                    let c = self.dropout.prepare(
                        ctx,
                        &mask,
                        r,
                        width as u64,
                        None,
                        g(i + 1),
                        index,
                        self.sample_base,
                        &self.placeholder,
                    )?;
                    backward.push((format!("dropout {k} backward"), Op::Dropout(c)));
                }
            }
        }
        // small one-layer models in f32 with data on the device: the fused step
        let fused = match (&layers[..], data, train && !self.f16) {
            (
                [
                    Layer::Dense {
                        index: 0,
                        fan_in,
                        fan_out,
                        activation: None,
                    },
                ],
                Resident::Device(d),
                true,
            ) if self.fused_enabled
                && fused::eligible(spec.loss(), *fan_in as u64, *fan_out as u64) =>
            {
                let (wo, bo) = spec.offsets(0);
                let kernel = self
                    .fused
                    .get_or_insert_with(|| FusedLinear::new(ctx, spec.loss(), d.u8_pixels));
                Some(kernel.prepare(
                    ctx,
                    &FusedArgs {
                        data: d,
                        index,
                        rows: r,
                        outputs: *fan_out as u64,
                        theta: &self.theta,
                        w_off: wo as u64,
                        b_off: bo as u64,
                        grads: &self.grads,
                        totals: &self.train_totals,
                        history: &self.history,
                    },
                )?)
            }
            _ => None,
        };
        Ok(Plan {
            gather,
            forward,
            loss,
            reduce,
            backward,
            layer_ends,
            fused,
        })
    }

    /// Submit whatever is recorded, keeping at most MAX_IN_FLIGHT submissions queued.
    fn submit(&mut self) -> anyhow::Result<()> {
        self.open_pass = None;
        if let Some(enc) = self.pending.take() {
            // the ring blocks written for this submission land before it runs, and the next
            // submission's writes land only after it (queue writes and submissions are ordered)
            let idx = self.ctx.queue.submit([enc.finish()]);
            self.in_flight.push_back(idx);
        }
        self.pending_steps = 0;
        self.batch_slot = 0;
        self.update_slot = 0;
        while self.in_flight.len() > MAX_IN_FLIGHT {
            if let Some(oldest) = self.in_flight.pop_front() {
                self.ctx
                    .device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(oldest),
                        timeout: None,
                    })
                    .map_err(|e| anyhow::anyhow!("GPU: {e}"))?;
            }
        }
        self.ctx.check()?;
        Ok(())
    }

    /// The ring block of the next micro-batch, submitting first when every block is taken.
    fn next_batch_slot(&mut self) -> anyhow::Result<u64> {
        if self.batch_slot >= RING_SLOTS {
            self.submit()?;
        }
        self.batch_slot += 1;
        Ok(self.batch_slot - 1)
    }

    /// The ring block of the next update, submitting first when every block is taken.
    fn next_update_slot(&mut self) -> anyhow::Result<u64> {
        if self.update_slot >= RING_SLOTS {
            self.submit()?;
        }
        self.update_slot += 1;
        Ok(self.update_slot - 1)
    }

    /// The pending encoder for a copy or a clear: the open compute pass (if any) ends first.
    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.open_pass = None;
        let device = &self.ctx.device;
        self.pending.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("steps"),
            })
        })
    }

    /// Open the compute pass that dispatches record into (see `open_pass`).
    fn ensure_pass(&mut self) {
        if self.open_pass.is_none() {
            let pass = self
                .encoder()
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("steps"),
                    timestamp_writes: None,
                })
                .forget_lifetime();
            self.open_pass = Some(pass);
        }
    }

    fn flush_and_read<T: bytemuck::Pod>(
        &mut self,
        which: fn(&Self) -> &wgpu::Buffer,
        count: usize,
    ) -> anyhow::Result<Vec<T>> {
        self.submit()?;
        self.in_flight.clear();
        Ok(self.ctx.read(which(self), 0, count)?)
    }

    /// Make the batch current: its plan (built on first use), host-fed rows uploaded, and its
    /// ring blocks written. Records nothing.
    fn begin(&mut self, pass: Pass, batch: &Batch) -> anyhow::Result<()> {
        let (offset, rows) = (batch.offset, batch.rows);
        anyhow::ensure!(
            rows >= 1 && rows <= self.max_rows,
            "batch of {rows} rows exceeds the {} the backend was sized for",
            self.max_rows
        );
        let key = (pass, rows, batch.accumulate && pass == Pass::Train);
        if !self.plans.contains_key(&key) {
            let plan = self.build_plan(key)?;
            self.plans.insert(key, plan);
        }
        let data = match pass {
            Pass::Train | Pass::EvalTrain => &self.train,
            Pass::EvalTest => self.test.as_ref().context("no test set")?,
        };
        if let Resident::Host { x, y, features } = data {
            // host-fed data: the recorded steps still read the batch buffers, so they go first
            let idx: Vec<usize> = match pass {
                Pass::Train => self.order_host[offset..offset + rows]
                    .iter()
                    .map(|&i| i as usize)
                    .collect(),
                _ => (offset..offset + rows).collect(),
            };
            let mut bx = Vec::with_capacity(rows * features);
            for &i in &idx {
                bx.extend_from_slice(&x[i * features..(i + 1) * features]);
            }
            let bt: Vec<f32> = idx.iter().map(|&i| y[i]).collect();
            self.submit()?;
            self.ctx
                .write(&self.act.acts[0], 0, bytemuck::cast_slice(&bx));
            self.ctx
                .write(&self.act.targets, 0, bytemuck::cast_slice(&bt));
        }
        let slot = self.next_batch_slot()?;
        let history_slot = if pass == Pass::Train {
            self.history_len += 1;
            ((self.history_len - 1) % HISTORY) as u64
        } else {
            0
        };
        let plan = self.plans.get_mut(&key).context("plan just inserted")?;
        let gather_at = match plan.gather.as_mut() {
            Some(g) => Some(g.write_offset(&self.ctx, slot, offset as u64)?),
            None => None,
        };
        let reduce_at = plan.reduce.write_slot(&self.ctx, slot, history_slot)?;
        let fused_at = match plan.fused.as_mut() {
            Some(f) => Some(f.write_step(
                &self.ctx,
                slot,
                offset as u64,
                history_slot,
                batch.accumulate,
            )?),
            None => None,
        };
        let mut dropout_at = Vec::new();
        for (_, op) in plan.forward.iter_mut().chain(plan.backward.iter_mut()) {
            if let Op::Dropout(c) = op {
                dropout_at.push(c.write_step(&self.ctx, slot, offset as u64, batch.step)?);
            }
        }
        self.current = Some(Current {
            key,
            gather_at,
            reduce_at,
            dropout_at,
            fused_at,
            backward_done: 0,
        });
        Ok(())
    }

    /// Record one phase of the current batch into the open compute pass.
    fn record(&mut self, phase: Phase) -> anyhow::Result<()> {
        self.ensure_pass();
        let cur = self
            .current
            .as_ref()
            .context("a step phase was recorded before gather")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan of the current batch")?;
        let pass = self.open_pass.as_mut().context("the open pass")?;
        let n_forward_drops = plan
            .forward
            .iter()
            .filter(|(_, op)| matches!(op, Op::Dropout(_)))
            .count();
        let ops = |list: &[(String, Op)], drops: &[u32], pass: &mut wgpu::ComputePass<'_>| {
            let mut k = 0;
            for (_, op) in list {
                match op {
                    Op::Matmul(_, c) => c.record(pass),
                    Op::Dropout(c) => {
                        c.dispatch.record_at(pass, drops[k]);
                        k += 1;
                    }
                }
            }
        };
        if let (Some(f), Some(at)) = (&plan.fused, cur.fused_at) {
            // the fused step does every phase in one go: it records where backward would
            if phase == Phase::Backward {
                f.record_at(pass, at);
            }
            return Ok(());
        }
        match phase {
            Phase::Gather => {
                if let (Some(g), Some(at)) = (&plan.gather, cur.gather_at) {
                    g.dispatch.record_at(pass, at);
                }
            }
            Phase::Forward => ops(&plan.forward, &cur.dropout_at, pass),
            Phase::Loss => {
                plan.loss.record(pass);
                plan.reduce.dispatch.record_at(pass, cur.reduce_at);
            }
            Phase::Backward => {
                let done = cur.backward_done.min(plan.backward.len());
                let drops_before = plan.backward[..done]
                    .iter()
                    .filter(|(_, op)| matches!(op, Op::Dropout(_)))
                    .count();
                ops(
                    &plan.backward[done..],
                    &cur.dropout_at[n_forward_drops + drops_before..],
                    pass,
                );
            }
        }
        Ok(())
    }

    /// Record the current batch's backward ops up to (not including) op `end`, from where the
    /// last stretch stopped.
    fn record_backward_to(&mut self, end: usize) -> anyhow::Result<()> {
        self.ensure_pass();
        let cur = self
            .current
            .as_ref()
            .context("a step phase was recorded before gather")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan of the current batch")?;
        let pass = self.open_pass.as_mut().context("the open pass")?;
        let n_forward_drops = plan
            .forward
            .iter()
            .filter(|(_, op)| matches!(op, Op::Dropout(_)))
            .count();
        let done = cur.backward_done.min(plan.backward.len());
        let end = end.clamp(done, plan.backward.len());
        let mut k = n_forward_drops
            + plan.backward[..done]
                .iter()
                .filter(|(_, op)| matches!(op, Op::Dropout(_)))
                .count();
        for (_, op) in &plan.backward[done..end] {
            match op {
                Op::Matmul(_, c) => c.record(pass),
                Op::Dropout(c) => {
                    c.dispatch.record_at(pass, cur.dropout_at[k]);
                    k += 1;
                }
            }
        }
        if let Some(c) = self.current.as_mut() {
            c.backward_done = end;
        }
        Ok(())
    }

    /// A mappable buffer of at least `bytes` for exchange slot `slot`, kept for the next steps.
    fn staging_buffer(&mut self, slot: usize, bytes: u64) -> wgpu::Buffer {
        if self.staging.len() <= slot {
            self.staging.resize_with(slot + 1, || None);
        }
        match &self.staging[slot] {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                let b = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("gradient bucket staging"),
                    size: bytes.div_ceil(4) * 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                self.staging[slot] = Some(b.clone());
                b
            }
        }
    }
}

/// A plan operation's dispatches for a profile, each with its label and ring offset (a dropout's
/// offset comes from `drops`, in plan order).
fn timed_entries<'a>(
    label: &str,
    op: &'a Op,
    drops: &mut dyn Iterator<Item = &u32>,
) -> Vec<(String, &'a Dispatch, u32)> {
    match op {
        Op::Dropout(c) => vec![(
            label.to_string(),
            &c.dispatch,
            drops.next().copied().unwrap_or(0),
        )],
        Op::Matmul(_, c) => c
            .dispatches
            .iter()
            .map(|d| {
                let part = match d.name {
                    "pack_f16" => ", packing an operand as f16",
                    "matmul_splitk" => ", summing the partial products",
                    _ if c.choice.splits > 1 => ", partial products",
                    _ => "",
                };
                (format!("{label} [{}{part}]", c.choice.name()), d, 0)
            })
            .collect(),
    }
}

/// The recorded phases of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Gather,
    Forward,
    Loss,
    Backward,
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
        if !self.ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        // build the plan through an ordinary step, then time one more with a pass per kernel
        self.gather(batch)?;
        self.forward()?;
        self.loss()?;
        self.backward()?;
        self.update(update)?;
        self.submit()?;
        // every ring-bound dispatch reads block 0, written for this batch
        self.begin(Pass::Train, batch)?;
        self.submit()?;
        let cur = self.current.take().context("current batch")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan for this batch size")?;
        if let (Some(f), Some(at)) = (&plan.fused, cur.fused_at) {
            let mut list: Vec<(String, &Dispatch, u32)> = f
                .prepared(at)
                .into_iter()
                .map(|(d, at)| ("fused step (gather, forward, loss, gradient)".into(), d, at))
                .collect();
            for (d, at) in self.optimizer.prepared(&self.ctx, 0, update)? {
                list.push((format!("update ({})", d.name), d, at));
            }
            let timed: Vec<(&Dispatch, u32)> = list.iter().map(|(_, d, at)| (*d, *at)).collect();
            let Some(secs) = self.ctx.time_dispatches(&timed)? else {
                return Ok(None);
            };
            self.history_len -= 1;
            return Ok(Some(
                list.into_iter()
                    .zip(secs)
                    .map(|((label, _, _), s)| (label, s))
                    .collect(),
            ));
        }
        let (Some(gather), Some(gather_at)) = (plan.gather.as_ref(), cur.gather_at) else {
            // host-fed data has no gather kernel to time
            return Ok(None);
        };
        let mut list: Vec<(String, &Dispatch, u32)> =
            vec![("gather batch".into(), &gather.dispatch, gather_at)];
        let mut drops = cur.dropout_at.iter();
        for (label, op) in plan.forward.iter() {
            list.extend(timed_entries(label, op, &mut drops));
        }
        list.push(("loss + its gradient".into(), &plan.loss, 0));
        list.push(("loss totals".into(), &plan.reduce.dispatch, cur.reduce_at));
        for (label, op) in plan.backward.iter() {
            list.extend(timed_entries(label, op, &mut drops));
        }
        for (d, at) in self.optimizer.prepared(&self.ctx, 0, update)? {
            list.push((format!("update ({})", d.name), d, at));
        }
        let timed: Vec<(&Dispatch, u32)> = list.iter().map(|(_, d, at)| (*d, *at)).collect();
        let Some(secs) = self.ctx.time_dispatches(&timed)? else {
            return Ok(None);
        };
        // the timed pass wrote the loss history and totals once more: leave them as they were
        self.history_len -= 1;
        Ok(Some(
            list.into_iter()
                .zip(secs)
                .map(|((label, _, _), s)| (label, s))
                .collect(),
        ))
    }

    fn set_params(&mut self, theta: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(theta.len() == self.n_params, "parameter count mismatch");
        self.submit()?;
        self.ctx.write(&self.theta, 0, bytemuck::cast_slice(theta));
        Ok(())
    }

    fn params(&mut self) -> anyhow::Result<Vec<f32>> {
        self.flush_and_read(|s| &s.theta, self.n_params)
    }

    fn optim_state(&mut self) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        self.submit()?;
        self.in_flight.clear();
        let mut out = Vec::new();
        for (name, buf) in self.rule.state_names().iter().zip(&self.state) {
            out.push((name.to_string(), self.ctx.read(buf, 0, self.n_params)?));
        }
        Ok(out)
    }

    fn set_optim_state(&mut self, state: &[(String, Vec<f32>)]) -> anyhow::Result<()> {
        let ordered = state_in_order(&self.rule, state, self.n_params)?;
        self.submit()?;
        for (buf, v) in self.state.iter().zip(ordered) {
            self.ctx.write(buf, 0, bytemuck::cast_slice(v));
        }
        Ok(())
    }

    fn set_order(&mut self, order: &[u32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            order.len() as u64 <= self.train.samples()
                && order.iter().all(|&i| u64::from(i) < self.train.samples()),
            "sample order indexes past the training set"
        );
        self.submit()?;
        self.ctx.write(&self.order, 0, bytemuck::cast_slice(order));
        if matches!(self.train, Resident::Host { .. }) {
            self.order_host = order.to_vec();
        }
        Ok(())
    }

    fn gather(&mut self, batch: &Batch) -> anyhow::Result<()> {
        anyhow::ensure!(
            (batch.offset + batch.rows) as u64 <= self.train.samples(),
            "batch past the epoch's order"
        );
        self.begin(Pass::Train, batch)?;
        self.record(Phase::Gather)
    }

    fn forward(&mut self) -> anyhow::Result<()> {
        self.record(Phase::Forward)
    }

    fn loss(&mut self) -> anyhow::Result<()> {
        self.record(Phase::Loss)
    }

    fn backward(&mut self) -> anyhow::Result<()> {
        self.record(Phase::Backward)?;
        self.current = None;
        Ok(())
    }

    fn read_grads(
        &mut self,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        anyhow::ensure!(
            out.len() == range.len() && range.end <= self.n_params,
            "gradient range mismatch"
        );
        // one staging copy: the bucket then the 4 total words, read in one wait; totals zeroed after
        let (grads, totals_buf, exchange) = (
            self.grads.clone(),
            self.train_totals.clone(),
            self.exchange.clone(),
        );
        let enc = self.encoder();
        let gbytes = F32.bytes(range.len() as u64);
        enc.copy_buffer_to_buffer(&grads, F32.bytes(range.start as u64), &exchange, 0, gbytes);
        let words = range.len() + if totals { 4 } else { 0 };
        if totals {
            enc.copy_buffer_to_buffer(&totals_buf, 0, &exchange, gbytes, 16);
            enc.clear_buffer(&totals_buf, 0, None);
        }
        let words: Vec<u32> = self.flush_and_read(|s| &s.exchange, words)?;
        out.copy_from_slice(bytemuck::cast_slice(&words[..range.len()]));
        Ok(totals.then(|| Totals::from_words(&words[range.len()..])))
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
        anyhow::ensure!(range.end <= self.n_params, "gradient range mismatch");
        let gbytes = F32.bytes(range.len() as u64);
        let bytes = gbytes + if totals { 16 } else { 0 };
        let buf = self.staging_buffer(slot, bytes);
        let (grads, totals_buf) = (self.grads.clone(), self.train_totals.clone());
        let enc = self.encoder();
        enc.copy_buffer_to_buffer(&grads, F32.bytes(range.start as u64), &buf, 0, gbytes);
        if totals {
            enc.copy_buffer_to_buffer(&totals_buf, 0, &buf, gbytes, 16);
            enc.clear_buffer(&totals_buf, 0, None);
        }
        self.submit()?;
        let submission = self
            .in_flight
            .back()
            .cloned()
            .context("the staging copy was not submitted")?;
        let (tx, mapped) = std::sync::mpsc::channel();
        buf.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        if self.staged.len() <= slot {
            self.staged.resize_with(slot + 1, || None);
        }
        self.staged[slot] = Some(Staged {
            buf,
            bytes,
            submission,
            mapped,
        });
        Ok(())
    }

    fn collect_grads(
        &mut self,
        slot: usize,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        let Some(st) = self.staged.get_mut(slot).and_then(Option::take) else {
            return self.read_grads(range, out, totals);
        };
        anyhow::ensure!(
            out.len() == range.len()
                && st.bytes == F32.bytes(range.len() as u64) + if totals { 16 } else { 0 },
            "gradient range mismatch"
        );
        let result = loop {
            match st.mapped.try_recv() {
                Ok(r) => break r,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    anyhow::bail!("GPU: the gradient readback was dropped")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    self.ctx
                        .device
                        .poll(wgpu::PollType::Wait {
                            submission_index: Some(st.submission.clone()),
                            timeout: None,
                        })
                        .map_err(|e| anyhow::anyhow!("GPU: {e}"))?;
                }
            }
        };
        result.map_err(|e| anyhow::anyhow!("GPU: gradient readback failed: {e}"))?;
        let t = {
            let view = st
                .buf
                .slice(..st.bytes)
                .get_mapped_range()
                .map_err(|e| anyhow::anyhow!("GPU: gradient readback map: {e}"))?;
            let words: &[u32] = bytemuck::cast_slice(&view);
            out.copy_from_slice(bytemuck::cast_slice(&words[..range.len()]));
            totals.then(|| Totals::from_words(&words[range.len()..range.len() + 4]))
        };
        st.buf.unmap();
        self.ctx.check()?;
        Ok(t)
    }

    fn write_grads(&mut self, range: Range<usize>, g: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            g.len() == range.len() && range.end <= self.n_params,
            "gradient range mismatch"
        );
        // recorded work that reads the gradients runs before they change
        self.submit()?;
        self.ctx.write(
            &self.grads,
            F32.bytes(range.start as u64),
            bytemuck::cast_slice(g),
        );
        Ok(())
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
        let words: Vec<u32> = self.flush_and_read(|s| &s.train_totals, 4)?;
        self.ctx.write(&self.train_totals, 0, &[0u8; 16]);
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
        self.ctx.write(&self.eval_totals, 0, &[0u8; 16]);
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
            for phase in [Phase::Gather, Phase::Forward, Phase::Loss] {
                self.record(phase)?;
            }
            self.current = None;
            start += rows;
        }
        let words: Vec<u32> = self.flush_and_read(|s| &s.eval_totals, 4)?;
        Ok(Totals::from_words(&words))
    }
}
