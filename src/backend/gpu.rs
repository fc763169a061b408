//! The WGSL backend: every part of the step on the GPU, one command encoder per step.
//!
//! Training data is uploaded once (u8 pixels stay u8); each batch is gathered on the GPU through the
//! epoch's permutation. Buffers, pipelines and bind groups are made once per batch size ("plans").
//! A step records its dispatches; its few per-step uniform values (gather offset, loss-history
//! slot, learning rate) go to its own block of small uniform rings bound with dynamic offsets, so
//! up to STEPS_PER_SUBMIT steps share one submission, which is what a step as small as logistic
//! regression's needs. In a single-process run the host waits for the GPU only when it reads
//! something back (logging, evaluation), and otherwise only to keep at most a few submissions in
//! flight so that queued work stays bounded.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use anyhow::Context;
use dptrain_kernels::bias_grad::BiasGrad;
use dptrain_kernels::gather::{DeviceData, Gather, GatherCall};
use dptrain_kernels::loss::{Loss, LossArgs};
use dptrain_kernels::matmul::{At, Epilogue, Matmul, MatmulArgs};
use dptrain_kernels::reduce_stats::{ReduceCall, ReduceStats, Totals};
use dptrain_kernels::sgd::{Sgd, SgdCall, SgdStep};
use dptrain_kernels::{AdapterChoice, Dispatch, GpuContext, KernelError};

use super::{Backend, BackendInit, Split};
use crate::data::{Dataset, Features, Normalizer};
use crate::model::ModelSpec;

/// Submissions allowed in flight before the host waits for the oldest.
const MAX_IN_FLIGHT: usize = 4;

/// Training steps recorded into one submission at most (one ring block each).
pub const STEPS_PER_SUBMIT: usize = dptrain_kernels::RING_SLOTS as usize;

/// Per-step loss sums kept on the GPU between reads (`take_step_losses`).
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

/// Everything recorded for one batch size of one pass.
struct Plan {
    /// None for host-fed data: the batch is uploaded instead.
    gather: Option<GatherCall>,
    forward: Vec<Dispatch>,
    loss: Dispatch,
    reduce: ReduceCall,
    backward: Vec<Dispatch>,
    /// What each backward dispatch computes, for profiles.
    backward_labels: Vec<String>,
}

/// Device-side activations for up to `max_rows` rows.
struct Activations {
    /// acts[0] is the gathered batch, acts[l + 1] layer l's output (the last: logits).
    acts: Vec<wgpu::Buffer>,
    /// dacts[l + 1] is the loss gradient at layer l's output (dacts[0] is unused).
    dacts: Vec<wgpu::Buffer>,
    targets: wgpu::Buffer,
    stats: wgpu::Buffer,
}

pub struct GpuBackend {
    ctx: GpuContext,
    spec: ModelSpec,
    max_rows: usize,
    theta: wgpu::Buffer,
    grads: wgpu::Buffer,
    vel: wgpu::Buffer,
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
    /// Gradients followed by the training totals, copied together for the exchange.
    exchange: wgpu::Buffer,
    /// Loss sum of each training batch since the last `take_step_losses` (a ring of HISTORY).
    history: wgpu::Buffer,
    history_len: usize,
    /// Evaluation batches write their losses here, never read.
    eval_history: wgpu::Buffer,
    matmul: Matmul,
    gather: Gather,
    loss: Loss,
    bias_grad: BiasGrad,
    reduce: ReduceStats,
    sgd: SgdCall,
    plans: HashMap<(Pass, usize), Plan>,
    pending: Option<wgpu::CommandEncoder>,
    /// Steps recorded into `pending`: the next step's ring block.
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
        Features::F32(v) => 4 * v.len() as u64,
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
        let n_params = spec.layout().total;
        let bytes = |n: usize| (n as u64) * 4;
        let widths = spec.widths();
        let rows = init.max_rows.max(1);
        let mut acts = Vec::new();
        let mut dacts = Vec::new();
        for (l, &w) in widths.iter().enumerate() {
            acts.push(ctx.storage(&format!("activation {l}"), bytes(rows * w))?);
            dacts.push(if l == 0 {
                ctx.storage("unused", 4)?
            } else {
                ctx.storage(&format!("activation gradient {l}"), bytes(rows * w))?
            });
        }
        let act = Activations {
            acts,
            dacts,
            targets: ctx.storage("batch targets", bytes(rows))?,
            stats: ctx.storage("row stats", bytes(2 * rows))?,
        };
        let train = upload_data(&ctx, init.train, init.norm)?;
        let test = init
            .test
            .map(|t| upload_data(&ctx, t, init.norm))
            .transpose()?;
        let identity = |n: usize| (0..n as u32).collect::<Vec<u32>>();
        let theta = ctx.storage("parameters", bytes(n_params))?;
        let grads = ctx.storage("gradients", bytes(n_params))?;
        let vel = ctx.storage("velocity", bytes(n_params))?;
        let sgd = Sgd::new(&ctx).prepare(&ctx, n_params as u64, &theta, &grads, &vel)?;
        let backend = Self {
            order: ctx.storage("epoch order", bytes(init.train.n_samples))?,
            order_host: Vec::new(),
            train_identity: ctx.upload("train index", &identity(init.train.n_samples))?,
            test_identity: init
                .test
                .map(|t| ctx.upload("test index", &identity(t.n_samples)))
                .transpose()?,
            train_totals: ReduceStats::total_buffer(&ctx)?,
            eval_totals: ReduceStats::total_buffer(&ctx)?,
            exchange: ctx.storage("exchange", bytes(n_params + 4))?,
            history: ctx.storage("loss history", bytes(HISTORY))?,
            history_len: 0,
            eval_history: ctx.storage("eval loss history", 4)?,
            matmul: Matmul::new(&ctx)?,
            gather: Gather::new(&ctx),
            loss: Loss::new(&ctx, spec.loss()),
            bias_grad: BiasGrad::new(&ctx),
            reduce: ReduceStats::new(&ctx),
            sgd,
            plans: HashMap::new(),
            pending: None,
            pending_steps: 0,
            steps_per_submit: std::env::var("DPTRAIN_STEPS_PER_SUBMIT")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(STEPS_PER_SUBMIT, |v| v.clamp(1, STEPS_PER_SUBMIT)),
            in_flight: VecDeque::new(),
            max_rows: rows,
            theta,
            grads,
            vel,
            n_params,
            train,
            test,
            act,
            spec,
            ctx,
        };
        backend.ctx.check()?;
        Ok(backend)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    fn build_plan(&mut self, pass: Pass, rows: usize) -> anyhow::Result<Plan> {
        tracing::debug!("building the {pass:?} plan for batches of {rows} rows");
        let ctx = &self.ctx;
        let spec = &self.spec;
        let r = rows as u64;
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
        let gather = match data {
            Resident::Device(data) => {
                Some(
                    self.gather
                        .prepare(ctx, data, index, r, &act.acts[0], &act.targets)?,
                )
            }
            Resident::Host { .. } => None,
        };
        let layers = spec.layers();
        let last = layers.len() - 1;
        let mut forward = Vec::new();
        for (l, &(fi, fo)) in layers.iter().enumerate() {
            let (wo, bo) = spec.offsets(l);
            forward.push(self.matmul.prepare(
                ctx,
                &MatmulArgs {
                    m: r,
                    n: fo as u64,
                    k: fi as u64,
                    trans_a: false,
                    trans_b: true,
                    epilogue: if l == last {
                        Epilogue::Bias
                    } else {
                        spec.activation.forward()
                    },
                    a: At::start(&act.acts[l]),
                    b: At {
                        buf: &self.theta,
                        off: wo as u64,
                    },
                    c: At::start(&act.acts[l + 1]),
                    bias: Some(At {
                        buf: &self.theta,
                        off: bo as u64,
                    }),
                    aux: None,
                },
            )?);
        }
        let classes = spec.outputs as u64;
        let loss = self.loss.prepare(
            ctx,
            &LossArgs {
                rows: r,
                classes,
                z: &act.acts[last + 1],
                t: &act.targets,
                dz: &act.dacts[last + 1],
                stats: &act.stats,
            },
        )?;
        let totals = if pass == Pass::Train {
            &self.train_totals
        } else {
            &self.eval_totals
        };
        let history = if pass == Pass::Train {
            &self.history
        } else {
            &self.eval_history
        };
        let reduce = self.reduce.prepare(ctx, r, &act.stats, totals, history)?;
        let mut backward = Vec::new();
        let mut backward_labels = Vec::new();
        if pass == Pass::Train {
            for (l, &(fi, fo)) in layers.iter().enumerate().rev() {
                let (wo, bo) = spec.offsets(l);
                // dW = dZᵀ·X: [out, in] from dZ [rows, out] and X [rows, in]
                backward.push(self.matmul.prepare(
                    ctx,
                    &MatmulArgs {
                        m: fo as u64,
                        n: fi as u64,
                        k: r,
                        trans_a: true,
                        trans_b: false,
                        epilogue: Epilogue::None,
                        a: At::start(&act.dacts[l + 1]),
                        b: At::start(&act.acts[l]),
                        c: At {
                            buf: &self.grads,
                            off: wo as u64,
                        },
                        bias: None,
                        aux: None,
                    },
                )?);
                backward_labels.push(format!("layer {l} weight gradient (matmul TN)"));
                backward_labels.push(format!("layer {l} bias gradient"));
                backward.push(self.bias_grad.prepare(
                    ctx,
                    r,
                    fo as u64,
                    &act.dacts[l + 1],
                    &self.grads,
                    bo as u64,
                )?);
                if l > 0 {
                    backward_labels.push(format!(
                        "layer {l} input gradient (matmul NN + activation')"
                    ));
                    // dX = (dZ·W) ⊙ f'(X), X being the previous layer's activation output
                    backward.push(self.matmul.prepare(
                        ctx,
                        &MatmulArgs {
                            m: r,
                            n: fi as u64,
                            k: fo as u64,
                            trans_a: false,
                            trans_b: false,
                            epilogue: spec.activation.backward(),
                            a: At::start(&act.dacts[l + 1]),
                            b: At {
                                buf: &self.theta,
                                off: wo as u64,
                            },
                            c: At::start(&act.dacts[l]),
                            bias: None,
                            aux: Some(At::start(&act.acts[l])),
                        },
                    )?);
                }
            }
        }
        Ok(Plan {
            gather,
            forward,
            loss,
            reduce,
            backward,
            backward_labels,
        })
    }

    /// Submit whatever is recorded, keeping at most MAX_IN_FLIGHT submissions queued.
    fn submit(&mut self) -> anyhow::Result<()> {
        if let Some(enc) = self.pending.take() {
            // the ring blocks written for this submission land before it runs, and the next
            // submission's writes land only after it (queue writes and submissions are ordered)
            let idx = self.ctx.queue.submit([enc.finish()]);
            self.in_flight.push_back(idx);
        }
        self.pending_steps = 0;
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

    fn flush_and_read<T: bytemuck::Pod>(
        &mut self,
        which: fn(&Self) -> &wgpu::Buffer,
        count: usize,
    ) -> anyhow::Result<Vec<T>> {
        self.submit()?;
        self.in_flight.clear();
        Ok(self.ctx.read(which(self), 0, count)?)
    }

    fn record(&mut self, pass: Pass, offset: usize, rows: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            rows >= 1 && rows <= self.max_rows,
            "batch of {rows} rows exceeds the {} the backend was sized for",
            self.max_rows
        );
        if !self.plans.contains_key(&(pass, rows)) {
            let plan = self.build_plan(pass, rows)?;
            self.plans.insert((pass, rows), plan);
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
        let plan = self
            .plans
            .get_mut(&(pass, rows))
            .context("plan just inserted")?;
        let slot = self.pending_steps as u64;
        let gather_at = match plan.gather.as_mut() {
            Some(g) => Some(g.write_offset(&self.ctx, slot, offset as u64)?),
            None => None,
        };
        let history_slot = if pass == Pass::Train {
            self.history_len += 1;
            ((self.history_len - 1) % HISTORY) as u64
        } else {
            0
        };
        let reduce_at = plan.reduce.write_slot(&self.ctx, slot, history_slot)?;
        let device = &self.ctx.device;
        let enc = self.pending.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            })
        });
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("step"),
            timestamp_writes: None,
        });
        if let (Some(g), Some(at)) = (&plan.gather, gather_at) {
            g.dispatch.record_at(&mut cpass, at);
        }
        for d in plan.forward.iter().chain([&plan.loss]) {
            d.record(&mut cpass);
        }
        plan.reduce.dispatch.record_at(&mut cpass, reduce_at);
        for d in &plan.backward {
            d.record(&mut cpass);
        }
        Ok(())
    }
}

impl Backend for GpuBackend {
    fn describe(&self) -> String {
        self.ctx.describe()
    }

    fn profile_step(
        &mut self,
        offset: usize,
        rows: usize,
        step: &SgdStep,
    ) -> anyhow::Result<Option<Vec<(String, f64)>>> {
        if !self.ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        // build the plan through an ordinary step, then time one more with a pass per kernel
        self.forward_backward(offset, rows)?;
        self.update(step)?;
        self.submit()?;
        let plan = self
            .plans
            .get_mut(&(Pass::Train, rows))
            .context("plan for this batch size")?;
        let Some(gather) = plan.gather.as_mut() else {
            // host-fed data has no gather kernel to time
            return Ok(None);
        };
        gather.set_offset(&self.ctx, offset as u64)?;
        self.sgd.set(&self.ctx, step)?;
        let n_layers = plan.forward.len();
        let mut list: Vec<(String, &Dispatch)> = vec![("gather batch".into(), &gather.dispatch)];
        for (l, d) in plan.forward.iter().enumerate() {
            let what = if l + 1 == n_layers {
                "bias"
            } else {
                "bias + activation"
            };
            list.push((format!("layer {l} forward (matmul NT + {what})"), d));
        }
        list.push(("loss + its gradient".into(), &plan.loss));
        list.push(("loss totals".into(), &plan.reduce.dispatch));
        for (label, d) in plan.backward_labels.iter().zip(&plan.backward) {
            list.push((label.clone(), d));
        }
        list.push(("SGD update".into(), &self.sgd.dispatch));
        let count = u32::try_from(2 * list.len())?;
        let queries = self.ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolve = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile resolve"),
            size: u64::from(count) * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let out = self.ctx.storage("profile", u64::from(count) * 8)?;
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("profile"),
            });
        for (i, (_, d)) in list.iter().enumerate() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("profile"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &queries,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            d.record(&mut pass);
        }
        enc.resolve_query_set(&queries, 0..count, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &out, 0, u64::from(count) * 8);
        self.ctx.queue.submit([enc.finish()]);
        let ticks: Vec<u64> = self.ctx.read(&out, 0, count as usize)?;
        let period_s = f64::from(self.ctx.queue.get_timestamp_period()) * 1e-9;
        Ok(Some(
            list.iter()
                .enumerate()
                .map(|(i, (label, _))| {
                    let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]);
                    (label.clone(), dt as f64 * period_s)
                })
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

    fn velocity(&mut self) -> anyhow::Result<Vec<f32>> {
        self.flush_and_read(|s| &s.vel, self.n_params)
    }

    fn set_velocity(&mut self, v: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(v.len() == self.n_params, "velocity count mismatch");
        self.submit()?;
        self.ctx.write(&self.vel, 0, bytemuck::cast_slice(v));
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

    fn forward_backward(&mut self, offset: usize, rows: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            (offset + rows) as u64 <= self.train.samples(),
            "batch past the epoch's order"
        );
        self.record(Pass::Train, offset, rows)
    }

    fn grads_with_totals(&mut self, out: &mut [f32]) -> anyhow::Result<Totals> {
        anyhow::ensure!(out.len() == self.n_params, "gradient count mismatch");
        // one staging copy: gradients then the 4 total words, read in one wait; totals zeroed after
        let device = &self.ctx.device;
        let enc = self.pending.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            })
        });
        let gbytes = (self.n_params as u64) * 4;
        enc.copy_buffer_to_buffer(&self.grads, 0, &self.exchange, 0, gbytes);
        enc.copy_buffer_to_buffer(&self.train_totals, 0, &self.exchange, gbytes, 16);
        enc.clear_buffer(&self.train_totals, 0, None);
        let words: Vec<u32> = self.flush_and_read(|s| &s.exchange, self.n_params + 4)?;
        out.copy_from_slice(bytemuck::cast_slice(&words[..self.n_params]));
        Ok(Totals::from_words(&words[self.n_params..]))
    }

    fn set_grads(&mut self, g: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(g.len() == self.n_params, "gradient count mismatch");
        self.ctx.write(&self.grads, 0, bytemuck::cast_slice(g));
        Ok(())
    }

    fn update(&mut self, step: &SgdStep) -> anyhow::Result<()> {
        let at = self
            .sgd
            .write_step(&self.ctx, self.pending_steps as u64, step)?;
        let device = &self.ctx.device;
        let enc = self.pending.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            })
        });
        {
            let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("update"),
                timestamp_writes: None,
            });
            self.sgd.dispatch.record_at(&mut cpass, at);
        }
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
            "{n} steps since the loss history was last read; it holds {HISTORY}"
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
            self.record(pass, start, rows)?;
            // each chunk rewrites the gather offset, so each is its own submission
            self.submit()?;
            start += rows;
        }
        let words: Vec<u32> = self.flush_and_read(|s| &s.eval_totals, 4)?;
        Ok(Totals::from_words(&words))
    }
}
