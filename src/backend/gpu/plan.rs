//! Plans: the model's layers compiled into dispatches for one batch size of one pass. A plan is
//! built on a batch size's first use (`GpuBackend::build_plan`) in phases (gather, forward, loss,
//! backward, and the fused small-model step), and each phase asks the layer kinds for their
//! dispatches through a `Builder`: a dense layer fuses its bias and activation into its matrix
//! product, and its activation's derivative into the product that computes the gradient at its
//! output; a dropout scales in place. Adding a layer kind means one forward and one backward arm
//! here (`Builder::forward_ops` / `Builder::backward_ops`) and a method for each.

use std::collections::HashMap;

use anyhow::Context;
use dptrain_kernels::dropout::{Dropout, DropoutCall};
use dptrain_kernels::fused::{self, FusedArgs, FusedCall, FusedLinear};
use dptrain_kernels::gather::GatherCall;
use dptrain_kernels::loss::LossArgs;
use dptrain_kernels::matmul::{At, Choice, Epilogue, Matmul, MatmulArgs, MatmulCall};
use dptrain_kernels::reduce_stats::ReduceCall;
use dptrain_kernels::tune::Product;
use dptrain_kernels::{Dispatch, GpuContext};

use super::residency::{Activations, Resident};
use super::{GpuBackend, Pass, PlanKey};
use crate::model::{Layer, ModelSpec};

/// One recorded operation of a plan.
pub(super) enum Op {
    /// A matrix product (one dispatch, or a split-K pass and its sum): the same every step.
    Matmul(Product, MatmulCall),
    /// Dropout, whose per-step block (batch offset, step) is written at `gather`.
    Dropout(DropoutCall),
}

/// Plan operations with their labels (what a profile calls them), in recording order.
pub(super) type Ops = Vec<(String, Op)>;

/// Everything recorded for one batch size of one pass.
pub(super) struct Plan {
    /// None for host-fed data: the batch is uploaded instead.
    pub gather: Option<GatherCall>,
    pub forward: Ops,
    pub loss: Dispatch,
    pub reduce: ReduceCall,
    pub backward: Ops,
    /// For each dense layer, the number of backward ops after which its parameter gradients are
    /// final (backward runs from the last layer): where a staged backward may stop.
    pub layer_ends: Vec<(usize, usize)>,
    /// A training step of a small one-layer model as one dispatch (or two for large batches):
    /// gather, forward, loss, gradient and its reduction (`fused_linear.wgsl`). When present, it
    /// is what the step records in place of all of the above.
    pub fused: Option<FusedCall>,
}

impl Plan {
    /// The dropout ops among the forward ops (their ring offsets come first in `dropout_at`).
    pub fn forward_dropouts(&self) -> usize {
        dropouts(&self.forward)
    }
}

/// How many of `ops` are dropouts.
pub(super) fn dropouts(ops: &[(String, Op)]) -> usize {
    ops.iter()
        .filter(|(_, op)| matches!(op, Op::Dropout(_)))
        .count()
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

/// What a plan's ops are built from: the buffers they bind, the kernels that prepare them, and
/// the batch's shape.
struct Builder<'a> {
    ctx: &'a GpuContext,
    spec: &'a ModelSpec,
    layers: &'a [Layer],
    matmul: &'a mut Matmul,
    dropout: &'a Dropout,
    /// The kernel chosen for each product (tuned, or given by rank 0 or a checkpoint).
    choices: &'a HashMap<Product, Choice>,
    f16: bool,
    theta: &'a wgpu::Buffer,
    grads: &'a wgpu::Buffer,
    ones: &'a wgpu::Buffer,
    placeholder: &'a wgpu::Buffer,
    act: &'a Activations,
    /// The batch's sample indices (the epoch's order, or file order in evaluation).
    index: &'a wgpu::Buffer,
    seed: u64,
    sample_base: u64,
    rows: u64,
    /// Backward adds to the gradients (every micro-batch but the first).
    accumulate: bool,
    /// Which activation buffer holds tensor j: in evaluation a dropout passes its input through.
    tensor: Vec<usize>,
}

impl<'a> Builder<'a> {
    /// The buffer holding tensor j (0: the batch, i + 1: layer i's output).
    fn t(&self, j: usize) -> &'a wgpu::Buffer {
        let act: &'a Activations = self.act;
        &act.acts[self.tensor[j]]
    }

    /// The buffer holding the loss gradient at tensor j.
    fn g(&self, j: usize) -> &'a wgpu::Buffer {
        let act: &'a Activations = self.act;
        &act.dacts[act.grad_of[j]]
    }

    /// Prepare `args` with the tuned choice for its product (the default one when it has none, or
    /// when this adapter cannot build the tuned one, as a rank whose GPU differs from rank 0's may
    /// not).
    fn product(&mut self, args: &MatmulArgs<'_>, f16: bool) -> anyhow::Result<Op> {
        let p = product_of(args, f16);
        let default = p.default_choice();
        let choice = self.choices.get(&p.tuned_as()).copied().unwrap_or(default);
        let call = match self.matmul.prepare_with(self.ctx, args, choice) {
            Err(e) if choice != default => {
                tracing::warn!(
                    "{}: {} cannot run here ({e}); using {}",
                    p.name(),
                    choice.name(),
                    default.name()
                );
                self.matmul.prepare_with(self.ctx, args, default)?
            }
            other => other?,
        };
        Ok(Op::Matmul(p, call))
    }

    /// Every layer's forward ops, from the input; dropouts only in training.
    fn forward_ops(&mut self, train: bool) -> anyhow::Result<Ops> {
        let mut ops = Vec::new();
        let layers = self.layers;
        for (i, layer) in layers.iter().enumerate() {
            match *layer {
                Layer::Dense {
                    index,
                    fan_in,
                    fan_out,
                    activation,
                } => {
                    let op = self.dense_forward(i, index, fan_in, fan_out, activation)?;
                    let what = match activation {
                        Some(a) => format!("bias + {a:?}"),
                        None => "bias".into(),
                    };
                    ops.push((format!("layer {index} forward (matmul NT + {what})"), op));
                }
                Layer::Dropout { index, .. } if train => {
                    let op = self.dropout(layer, Some(self.t(i)), self.t(i + 1))?;
                    ops.push((format!("dropout {index} forward"), op));
                }
                Layer::Dropout { .. } => {}
            }
        }
        Ok(ops)
    }

    /// Every layer's backward ops, from the last layer down, and where each dense layer's
    /// parameter gradients are final (see `Plan::layer_ends`).
    fn backward_ops(&mut self) -> anyhow::Result<(Ops, Vec<(usize, usize)>)> {
        let mut ops = Vec::new();
        let mut layer_ends = Vec::new();
        let layers = self.layers;
        for (i, layer) in layers.iter().enumerate().rev() {
            match *layer {
                Layer::Dense {
                    index,
                    fan_in,
                    fan_out,
                    ..
                } => {
                    self.dense_backward(&mut ops, i, index, fan_in, fan_out)?;
                    layer_ends.push((index, ops.len()));
                    if i > 0 {
                        let op = self.dense_input_gradient(i, index, fan_in, fan_out)?;
                        ops.push((
                            format!("layer {index} input gradient (matmul NN + activation')"),
                            op,
                        ));
                    }
                }
                Layer::Dropout { index, .. } => {
                    let op = self.dropout(layer, None, self.g(i + 1))?;
                    ops.push((format!("dropout {index} backward"), op));
                }
            }
        }
        Ok((ops, layer_ends))
    }

    /// Dense layer `l` (layer `i` of the list): Y = f(X·Wᵀ + b) as one product with its bias and
    /// activation fused.
    fn dense_forward(
        &mut self,
        i: usize,
        l: usize,
        fan_in: usize,
        fan_out: usize,
        activation: Option<crate::model::Activation>,
    ) -> anyhow::Result<Op> {
        let (wo, bo) = self.spec.offsets(l);
        let (theta, f16) = (self.theta, self.f16);
        self.product(
            &MatmulArgs {
                m: self.rows,
                n: fan_out as u64,
                k: fan_in as u64,
                trans_a: false,
                trans_b: true,
                epilogue: activation.map_or(Epilogue::Bias, |a| a.forward()),
                a: At::start(self.t(i)),
                b: At {
                    buf: theta,
                    off: wo as u64,
                },
                c: At::start(self.t(i + 1)),
                bias: Some(At {
                    buf: theta,
                    off: bo as u64,
                }),
                aux: None,
            },
            f16,
        )
    }

    /// Dense layer `l`'s parameter gradients, dW = dZᵀ·X and db = dZᵀ·1, into `ops`.
    fn dense_backward(
        &mut self,
        ops: &mut Ops,
        i: usize,
        l: usize,
        fan_in: usize,
        fan_out: usize,
    ) -> anyhow::Result<()> {
        let (wo, bo) = self.spec.offsets(l);
        let (grads, ones, f16, r) = (self.grads, self.ones, self.f16, self.rows);
        let grad_ep = if self.accumulate {
            Epilogue::Accumulate
        } else {
            Epilogue::None
        };
        // dW = dZᵀ·X: [out, in] from dZ [rows, out] and X [rows, in]
        let dw = self.product(
            &MatmulArgs {
                m: fan_out as u64,
                n: fan_in as u64,
                k: r,
                trans_a: true,
                trans_b: false,
                epilogue: grad_ep,
                a: At::start(self.g(i + 1)),
                b: At::start(self.t(i)),
                c: At {
                    buf: grads,
                    off: wo as u64,
                },
                bias: None,
                aux: None,
            },
            f16,
        )?;
        ops.push((format!("layer {l} weight gradient (matmul TN)"), dw));
        // db = dZᵀ·1: [out] from dZ [rows, out] and ones [rows]; kept in f32
        let db = self.product(
            &MatmulArgs {
                m: fan_out as u64,
                n: 1,
                k: r,
                trans_a: true,
                trans_b: false,
                epilogue: grad_ep,
                a: At::start(self.g(i + 1)),
                b: At::start(ones),
                c: At {
                    buf: grads,
                    off: bo as u64,
                },
                bias: None,
                aux: None,
            },
            false,
        )?;
        ops.push((format!("layer {l} bias gradient (matmul TN, dZᵀ·1)"), db));
        Ok(())
    }

    /// The gradient at dense layer `l`'s input: dX = (dZ·W) ⊙ f'(Y) for the dense layer Y = f(..)
    /// that produced X, found through any dropouts between (their masks are applied after, in
    /// place).
    fn dense_input_gradient(
        &mut self,
        i: usize,
        l: usize,
        fan_in: usize,
        fan_out: usize,
    ) -> anyhow::Result<Op> {
        let (wo, _) = self.spec.offsets(l);
        let layers = self.layers;
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
            )) => (a.backward(), Some(At::start(self.t(j + 1)))),
            _ => (Epilogue::None, None),
        };
        let (theta, f16) = (self.theta, self.f16);
        self.product(
            &MatmulArgs {
                m: self.rows,
                n: fan_in as u64,
                k: fan_out as u64,
                trans_a: false,
                trans_b: false,
                epilogue,
                a: At::start(self.g(i + 1)),
                b: At {
                    buf: theta,
                    off: wo as u64,
                },
                c: At::start(self.g(i)),
                bias: None,
                aux,
            },
            f16,
        )
    }

    /// A dropout layer's mask applied to `input` into `output` (forward), or to `output` in place
    /// (backward, `input` None).
    fn dropout(
        &self,
        layer: &Layer,
        input: Option<&wgpu::Buffer>,
        output: &wgpu::Buffer,
    ) -> anyhow::Result<Op> {
        let Layer::Dropout { width, .. } = *layer else {
            anyhow::bail!("a dropout op for a layer that is not dropout");
        };
        let mask = layer.mask(self.seed).context("dropout mask")?;
        let c = self.dropout.prepare(
            self.ctx,
            &mask,
            self.rows,
            width as u64,
            input,
            output,
            self.index,
            self.sample_base,
            self.placeholder,
        )?;
        Ok(Op::Dropout(c))
    }
}

impl GpuBackend {
    /// Compile the layer list into dispatches for batches of `rows` rows.
    pub(super) fn build_plan(&mut self, (pass, rows, accumulate): PlanKey) -> anyhow::Result<Plan> {
        tracing::debug!("building the {pass:?} plan for batches of {rows} rows");
        let r = rows as u64;
        let train = pass == Pass::Train;
        let (data, index) = match pass {
            // training batches go through the epoch's order, evaluation reads in file order
            Pass::Train => (&self.train, &self.order),
            Pass::EvalTrain => (&self.train, &self.train_identity),
            Pass::EvalTest => (
                self.test.as_ref().context("no test set")?,
                self.test_identity.as_ref().context("no test set")?,
            ),
        };
        let mut tensor: Vec<usize> = (0..=self.layers.len()).collect();
        if !train {
            for (i, l) in self.layers.iter().enumerate() {
                if matches!(l, Layer::Dropout { .. }) {
                    tensor[i + 1] = tensor[i];
                }
            }
        }
        let mut b = Builder {
            ctx: &self.ctx,
            spec: &self.spec,
            layers: &self.layers,
            matmul: &mut self.matmul,
            dropout: &self.dropout,
            choices: &self.choices,
            f16: self.f16,
            theta: &self.theta,
            grads: &self.grads,
            ones: &self.ones,
            placeholder: &self.placeholder,
            act: &self.act,
            index,
            seed: self.seed,
            sample_base: self.sample_base,
            rows: r,
            accumulate,
            tensor,
        };
        let gather = match data {
            Resident::Device(data) => Some(self.gather.prepare(
                &self.ctx,
                data,
                index,
                r,
                &self.act.acts[0],
                &self.act.targets,
            )?),
            Resident::Host { .. } => None,
        };
        let forward = b.forward_ops(train)?;
        let last = self.layers.len();
        let loss = self.loss.prepare(
            &self.ctx,
            &LossArgs {
                rows: r,
                classes: self.spec.outputs as u64,
                z: b.t(last),
                t: &self.act.targets,
                dz: b.g(last),
                stats: &self.act.stats,
                scaler: &self.scaler,
            },
        )?;
        let (totals, history) = if train {
            (&self.train_totals, &self.history)
        } else {
            (&self.eval_totals, &self.eval_history)
        };
        let reduce = self
            .reduce
            .prepare(&self.ctx, r, &self.act.stats, totals, history)?;
        let (backward, layer_ends) = if train {
            b.backward_ops()?
        } else {
            (Vec::new(), Vec::new())
        };
        // small one-layer models in f32 with data on the device: the fused step
        let fused = match (data, self.fused_outputs()) {
            (Resident::Device(d), Some(outputs)) if train => {
                let (wo, bo) = self.spec.offsets(0);
                let (ctx, loss) = (&self.ctx, self.spec.loss());
                let kernel = self
                    .fused
                    .get_or_insert_with(|| FusedLinear::new(ctx, loss, d.u8_pixels));
                Some(kernel.prepare(
                    ctx,
                    &FusedArgs {
                        data: d,
                        index,
                        rows: r,
                        outputs,
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

    /// The outputs of a model the fused step can train: a small one-layer model in f32 (and
    /// `DPTRAIN_FUSED` not `off`); None for any other.
    fn fused_outputs(&self) -> Option<u64> {
        match self.layers[..] {
            [
                Layer::Dense {
                    index: 0,
                    fan_in,
                    fan_out,
                    activation: None,
                },
            ] if !self.f16
                && self.fused_enabled
                && fused::eligible(self.spec.loss(), fan_in as u64, fan_out as u64) =>
            {
                Some(fan_out as u64)
            }
            _ => None,
        }
    }
}
