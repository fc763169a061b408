//! The CPU reference backend (ndarray): it walks the model's layers (`model::Layer`), whose
//! mathematics are the kernels' own references, so the maths exists once beside each shader.
//!
//! `loss_and_grad` is generic over f32/f64: the backend trains in f32 like the GPU, and the tests run
//! it in f64 against central finite differences.

use std::ops::Range;

use dptrain_kernels::loss::{LossKind, loss_row};
use dptrain_kernels::optimizer::{Rule, UpdateStep, update_ref};
use dptrain_kernels::reduce_stats::Totals;
use ndarray::{Array2, ArrayView2, Axis, LinalgScalar};
use num_traits::Float;

use super::{Backend, BackendInit, Batch, Split, state_in_order};
use crate::model::layer::MaskContext;
use crate::model::net::{Mode, Net, StatSum, Trace};
use crate::model::{Layer, ModelSpec};

/// Every layer's output in order (the last one is the logits). `train` is None in evaluation.
pub fn forward<T: Float + LinalgScalar>(
    spec: &ModelSpec,
    layers: &[Layer],
    theta: &[T],
    x: ArrayView2<T>,
    train: Option<&MaskContext>,
) -> Vec<Array2<T>> {
    let mut outs: Vec<Array2<T>> = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let input = if i == 0 { x } else { outs[i - 1].view() };
        let y = layer.forward(spec, theta, input, train);
        outs.push(y);
    }
    outs
}

/// Per-row loss, correctness and the gradient at the logits, row by row through the kernels' own
/// `loss_row`.
pub fn loss_rows<T: Float>(kind: LossKind, z: ArrayView2<T>, t: &[T]) -> (Array2<T>, Totals) {
    let mut dz = Array2::<T>::zeros(z.raw_dim());
    let mut tot = Totals {
        count: t.len() as u64,
        ..Totals::default()
    };
    let mut d = vec![T::zero(); z.ncols()];
    for ((zr, mut dr), &y) in z.outer_iter().zip(dz.outer_iter_mut()).zip(t) {
        let (l, c) = loss_row(kind, &zr.to_vec(), y, &mut d);
        dr.assign(&ndarray::ArrayView1::from(&d));
        tot.loss_sum += l.to_f64().unwrap_or(f64::NAN);
        tot.correct += u64::from(c);
    }
    (dz, tot)
}

/// Backward from the gradient at the logits `dz`: parameter gradients (flat layout) from the layers'
/// inputs `x` and outputs `outs`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float + LinalgScalar>(
    spec: &ModelSpec,
    layers: &[Layer],
    theta: &[T],
    x: ArrayView2<T>,
    outs: &[Array2<T>],
    dz: Array2<T>,
    train: &MaskContext,
    grads: &mut [T],
) {
    let all = Walk {
        spec,
        layers,
        theta,
        x,
        outs,
        train,
    };
    all.backward(layers.len(), dz, grads, |_, _| false);
}

/// What the backward walk reads: the model, its parameters, and a batch's forward results.
struct Walk<'a, T> {
    spec: &'a ModelSpec,
    layers: &'a [Layer],
    theta: &'a [T],
    /// The batch (layer 0's input).
    x: ArrayView2<'a, T>,
    /// Every layer's output.
    outs: &'a [Array2<T>],
    train: &'a MaskContext<'a>,
}

impl<T: Float + LinalgScalar> Walk<'_, T> {
    /// Run backward from layer `from - 1` down, `dy` being the loss gradient at its output, writing
    /// parameter gradients into `grads`. After each dense layer, `stop(index, grads)` is asked
    /// whether to pause there: then the walk returns where to resume (the layer count to pass as
    /// `from`, and the gradient at that layer's output). None when backward is finished.
    fn backward(
        &self,
        from: usize,
        mut dy: Array2<T>,
        grads: &mut [T],
        mut stop: impl FnMut(usize, &[T]) -> bool,
    ) -> Option<(usize, Array2<T>)> {
        for i in (0..from).rev() {
            let input = if i == 0 {
                self.x
            } else {
                self.outs[i - 1].view()
            };
            let layer = &self.layers[i];
            let next = layer.backward(
                self.spec,
                self.theta,
                input,
                self.outs[i].view(),
                dy,
                self.train,
                grads,
                i > 0,
            );
            let pause = match *layer {
                Layer::Dense { index, .. } => stop(index, grads),
                Layer::Dropout { .. } => false,
            };
            match next {
                Some(d) if pause && i > 0 => return Some((i, d)),
                Some(d) if !pause => dy = d,
                _ => return None,
            }
        }
        None
    }
}

/// Gradient sums over the batch (flat, in the parameter layout) and the batch's totals.
pub fn loss_and_grad<T: Float + LinalgScalar>(
    spec: &ModelSpec,
    theta: &[T],
    x: ArrayView2<T>,
    t: &[T],
    train: &MaskContext,
) -> (Vec<T>, Totals) {
    let layers = spec.layers();
    let outs = forward(spec, &layers, theta, x, Some(train));
    let (dz, tot) = loss_rows(spec.loss(), outs[outs.len() - 1].view(), t);
    let mut grads = vec![T::zero(); theta.len()];
    backward(spec, &layers, theta, x, &outs, dz, train, &mut grads);
    (grads, tot)
}

/// The batch being computed: its rows, their samples, and what each phase has produced.
struct Current {
    batch: Batch,
    x: Array2<f32>,
    t: Vec<f32>,
    samples: Vec<u32>,
    outs: Vec<Array2<f32>>,
    /// A network's forward record (instead of `outs`).
    trace: Option<Trace<f32>>,
    dz: Option<Array2<f32>>,
    /// A staged backward's position: the next layer to run is `.0 - 1`, with `.1` the loss
    /// gradient at its output.
    back: Option<(usize, Array2<f32>)>,
}

/// The CPU backend: normalised data held as f32 matrices.
pub struct CpuBackend {
    spec: ModelSpec,
    layers: Vec<Layer>,
    /// A convolutional model's graph (the dense models walk `layers`).
    net: Option<Net>,
    /// Values the optimizer trains: the flat buffer's first `trainable` (a network's buffers follow).
    trainable: usize,
    average_buffers: bool,
    augment: crate::data::augment::Augment,
    /// Rows of this rank's step so far (over its micro-batches).
    step_rows: usize,
    rule: Rule,
    seed: u64,
    sample_base: usize,
    theta: Vec<f32>,
    state: Vec<Vec<f32>>,
    grads: Vec<f32>,
    /// One micro-batch's gradients before they are added (gradient accumulation).
    micro: Vec<f32>,
    train_x: Array2<f32>,
    train_t: Vec<f32>,
    test_x: Option<Array2<f32>>,
    test_t: Vec<f32>,
    order: Vec<u32>,
    current: Option<Current>,
    totals: Totals,
    step_losses: Vec<f32>,
}

impl CpuBackend {
    pub fn new(init: &BackendInit<'_>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            init.precision == super::Precision::F32,
            "--precision f16 needs a GPU adapter with shader-f16; the CPU backend computes in f32"
        );
        let nf = init.train.n_features;
        let to_matrix = |ds: &crate::data::Dataset| {
            Array2::from_shape_vec((ds.n_samples, nf), init.norm.apply_dataset(ds))
        };
        let p = init.spec.layout().total;
        let net = init.spec.net()?;
        let trainable = net.as_ref().map_or(p, |n| n.trainable);
        Ok(Self {
            spec: init.spec.clone(),
            layers: init.spec.layers(),
            net,
            trainable,
            average_buffers: init.average_buffers,
            augment: init.augment,
            step_rows: 0,
            rule: init.rule,
            seed: init.seed,
            sample_base: init.sample_base,
            theta: vec![0.0; p],
            state: init
                .rule
                .state_names()
                .iter()
                .map(|_| vec![0.0; trainable])
                .collect(),
            grads: vec![0.0; p],
            micro: vec![0.0; p],
            train_x: to_matrix(init.train)?,
            train_t: init.train.y.clone(),
            test_x: init.test.map(to_matrix).transpose()?,
            test_t: init.test.map(|d| d.y.clone()).unwrap_or_default(),
            order: Vec::new(),
            current: None,
            totals: Totals::default(),
            step_losses: Vec::new(),
        })
    }

    fn data(&self, split: Split) -> anyhow::Result<(&Array2<f32>, &[f32])> {
        match split {
            Split::Train => Ok((&self.train_x, &self.train_t)),
            Split::Test => match &self.test_x {
                Some(x) => Ok((x, &self.test_t)),
                None => anyhow::bail!("no test set"),
            },
        }
    }

    fn current(&mut self) -> anyhow::Result<&mut Current> {
        self.current
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("a step phase ran before gather"))
    }

    fn forward_with(&mut self, sync: Option<&mut dyn StatSum>) -> anyhow::Result<()> {
        if let Some(net) = &self.net {
            let c = self
                .current
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("forward before gather"))?;
            let trace = net.forward(&self.theta, c.x.view(), Mode::Train(sync))?;
            net.update_running(&mut self.theta, &trace);
            c.trace = Some(trace);
            return Ok(());
        }
        let (spec, layers, theta, seed) = (&self.spec, &self.layers, &self.theta, self.seed);
        let c = self
            .current
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("forward before gather"))?;
        let ctx = MaskContext {
            seed,
            step: c.batch.step,
            samples: &c.samples,
        };
        c.outs = forward(spec, layers, theta, c.x.view(), Some(&ctx));
        Ok(())
    }

    /// A network's whole backward, with BatchNorm's sums over ranks by `sync` (SyncBatchNorm).
    fn net_backward(&mut self, sync: Option<&mut dyn StatSum>) -> anyhow::Result<()> {
        let Some(net) = &self.net else {
            anyhow::bail!("no network")
        };
        let c = self
            .current
            .take()
            .ok_or_else(|| anyhow::anyhow!("backward before gather"))?;
        let dz =
            c.dz.ok_or_else(|| anyhow::anyhow!("backward before loss"))?;
        let trace = c
            .trace
            .ok_or_else(|| anyhow::anyhow!("backward before forward"))?;
        let tr = self.trainable;
        let target = if c.batch.accumulate {
            &mut self.micro
        } else {
            &mut self.grads
        };
        target[..tr].fill(0.0);
        net.backward(&self.theta, c.x.view(), &trace, dz, target, sync)?;
        if c.batch.accumulate {
            for (g, m) in self.grads[..tr].iter_mut().zip(&self.micro[..tr]) {
                *g += m;
            }
            self.step_rows += c.batch.rows;
        } else {
            self.step_rows = c.batch.rows;
        }
        // the buffers travel as running × rows, so that the exchange's sum × 1/rows averages them
        let rows = self.step_rows as f32;
        for (g, v) in self.grads[tr..].iter_mut().zip(&self.theta[tr..]) {
            *g = if self.average_buffers { v * rows } else { 0.0 };
        }
        Ok(())
    }
    fn dense_backward_through(&mut self, layer: usize, first: bool) -> anyhow::Result<()> {
        let (spec, layers, theta, seed) = (&self.spec, &self.layers, &self.theta, self.seed);
        let c = self
            .current
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("backward before gather"))?;
        if first {
            let dz =
                c.dz.take()
                    .ok_or_else(|| anyhow::anyhow!("backward before loss"))?;
            c.back = Some((layers.len(), dz));
        }
        let (from, dy) = c
            .back
            .take()
            .ok_or_else(|| anyhow::anyhow!("a staged backward out of order"))?;
        let ctx = MaskContext {
            seed,
            step: c.batch.step,
            samples: &c.samples,
        };
        let walk = Walk {
            spec,
            layers,
            theta,
            x: c.x.view(),
            outs: &c.outs,
            train: &ctx,
        };
        let resume = if c.batch.accumulate {
            // each layer's micro-batch gradients join the step's sums when it is done
            let step_grads = &mut self.grads;
            walk.backward(from, dy, &mut self.micro, |index, micro| {
                let (w, b) = spec.offsets(index);
                let r = w..b + spec.linear(index).1;
                for (g, m) in step_grads[r.clone()].iter_mut().zip(&micro[r]) {
                    *g += m;
                }
                index == layer
            })
        } else {
            walk.backward(from, dy, &mut self.grads, |index, _| index == layer)
        };
        match resume {
            Some(back) => c.back = Some(back),
            None => self.current = None,
        }
        Ok(())
    }
}

fn same_len(what: &str, got: usize, want: usize) -> anyhow::Result<()> {
    anyhow::ensure!(got == want, "{what}: {got} values for {want} parameters");
    Ok(())
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        "CPU reference (ndarray)".into()
    }
    fn set_params(&mut self, theta: &[f32]) -> anyhow::Result<()> {
        same_len("parameters", theta.len(), self.theta.len())?;
        self.theta.copy_from_slice(theta);
        Ok(())
    }
    fn params(&mut self) -> anyhow::Result<Vec<f32>> {
        Ok(self.theta.clone())
    }
    fn optim_state(&mut self) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        Ok(self
            .rule
            .state_names()
            .iter()
            .zip(&self.state)
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect())
    }
    fn set_optim_state(&mut self, state: &[(String, Vec<f32>)]) -> anyhow::Result<()> {
        let ordered = state_in_order(&self.rule, state, self.trainable)?;
        for (dst, src) in self.state.iter_mut().zip(ordered) {
            dst.copy_from_slice(src);
        }
        Ok(())
    }
    fn set_order(&mut self, order: &[u32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            order.iter().all(|&i| (i as usize) < self.train_t.len()),
            "sample order indexes past the training set"
        );
        self.order = order.to_vec();
        Ok(())
    }
    fn gather(&mut self, batch: &Batch) -> anyhow::Result<()> {
        anyhow::ensure!(
            batch.offset + batch.rows <= self.order.len(),
            "batch past the epoch's order"
        );
        let idx: Vec<usize> = self.order[batch.offset..batch.offset + batch.rows]
            .iter()
            .map(|&i| i as usize)
            .collect();
        let base = u32::try_from(self.sample_base)?;
        let mut x = self.train_x.select(Axis(0), &idx);
        if let (false, Some(image)) = (self.augment.is_none(), self.spec.image) {
            for (mut row, &i) in x.outer_iter_mut().zip(&idx) {
                let r = row
                    .as_slice_mut()
                    .ok_or_else(|| anyhow::anyhow!("a batch row"))?;
                self.augment
                    .apply(image, r, self.seed, batch.step, i as u32 + base);
            }
        }
        self.current = Some(Current {
            batch: *batch,
            x,
            t: idx.iter().map(|&i| self.train_t[i]).collect(),
            samples: idx.iter().map(|&i| i as u32 + base).collect(),
            outs: Vec::new(),
            trace: None,
            dz: None,
            back: None,
        });
        Ok(())
    }
    fn forward(&mut self) -> anyhow::Result<()> {
        self.forward_with(None)
    }
    fn forward_synced(&mut self, sum: &mut dyn StatSum) -> anyhow::Result<()> {
        self.forward_with(Some(sum))
    }
    fn backward_synced(&mut self, sum: &mut dyn StatSum) -> anyhow::Result<()> {
        if self.net.is_some() {
            self.net_backward(Some(sum))
        } else {
            self.backward()
        }
    }
    fn loss(&mut self) -> anyhow::Result<()> {
        let kind = self.spec.loss();
        let c = self.current()?;
        let logits = match &c.trace {
            Some(t) => t.logits(),
            None => c.outs.last(),
        }
        .ok_or_else(|| anyhow::anyhow!("loss before forward"))?;
        let (dz, tot) = loss_rows(kind, logits.view(), &c.t);
        c.dz = Some(dz);
        // an empty micro-batch (a rank's share under SyncBatchNorm) only joins the collectives
        if c.batch.rows > 0 {
            self.step_losses.push(tot.loss_sum as f32);
            self.totals.add(&tot);
        }
        Ok(())
    }
    fn backward(&mut self) -> anyhow::Result<()> {
        self.backward_through(0, true)
    }
    fn backward_through(&mut self, layer: usize, first: bool) -> anyhow::Result<()> {
        if self.net.is_some() {
            // a network's backward runs whole at the first call
            return if first {
                self.net_backward(None)
            } else {
                Ok(())
            };
        }
        self.dense_backward_through(layer, first)
    }
    fn read_grads(
        &mut self,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        same_len("gradients", out.len(), range.len())?;
        out.copy_from_slice(&self.grads[range]);
        Ok(totals.then(|| std::mem::take(&mut self.totals)))
    }
    fn write_grads(&mut self, range: Range<usize>, g: &[f32]) -> anyhow::Result<()> {
        same_len("gradients", g.len(), range.len())?;
        self.grads[range].copy_from_slice(g);
        Ok(())
    }
    fn update(&mut self, step: &UpdateStep) -> anyhow::Result<()> {
        anyhow::ensure!(step.rule == self.rule, "optimizer changed mid-run");
        let tr = self.trainable;
        update_ref(
            step,
            &mut self.theta[..tr],
            &self.grads[..tr],
            &mut self.state,
        );
        if self.average_buffers {
            for (v, g) in self.theta[tr..].iter_mut().zip(&self.grads[tr..]) {
                *v = g * step.grad_scale;
            }
        }
        Ok(())
    }
    fn take_step_losses(&mut self) -> anyhow::Result<Vec<f32>> {
        Ok(std::mem::take(&mut self.step_losses))
    }
    fn take_train_totals(&mut self) -> anyhow::Result<Totals> {
        Ok(std::mem::take(&mut self.totals))
    }
    fn evaluate(&mut self, split: Split, range: Range<usize>) -> anyhow::Result<Totals> {
        let (x, t) = self.data(split)?;
        anyhow::ensure!(range.end <= t.len(), "evaluation range past the data");
        let mut tot = Totals::default();
        // chunks bound the memory of the activations
        // a network's activations (and im2col's columns) are far wider than rows of features
        let chunk = if self.net.is_some() { 256 } else { 4096 };
        for start in range.clone().step_by(chunk) {
            let end = (start + chunk).min(range.end);
            let rows = x.slice(ndarray::s![start..end, ..]);
            let logits = match &self.net {
                Some(net) => net
                    .forward(&self.theta, rows, Mode::Eval)?
                    .outs
                    .pop()
                    .ok_or_else(|| anyhow::anyhow!("a network without layers"))?,
                None => {
                    let mut outs = forward(&self.spec, &self.layers, &self.theta, rows, None);
                    outs.pop()
                        .ok_or_else(|| anyhow::anyhow!("a model without layers"))?
                }
            };
            let (_, b) = loss_rows(self.spec.loss(), logits.view(), &t[start..end]);
            tot.add(&b);
        }
        Ok(tot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, ModelKind};
    use crate::rng::Rng;

    fn check_against_finite_differences(spec: &ModelSpec, classes: usize) {
        let mut rng = Rng::new(42);
        let n = 7;
        let x = Array2::from_shape_fn((n, spec.inputs), |_| rng.normal());
        let t: Vec<f64> = (0..n)
            .map(|i| match spec.loss() {
                LossKind::Mse => rng.normal(),
                _ => (i % classes) as f64,
            })
            .collect();
        let theta: Vec<f64> = spec
            .init(3)
            .iter()
            .map(|&v| f64::from(v) + 0.1 * rng.normal())
            .collect();
        let samples: Vec<u32> = (0..n as u32).map(|i| 3 * i + 1).collect();
        let ctx = MaskContext {
            seed: 9,
            step: 4,
            samples: &samples,
        };
        let layers = spec.layers();
        let total_loss = |p: &[f64]| {
            let outs = forward(spec, &layers, p, x.view(), Some(&ctx));
            loss_rows(spec.loss(), outs[outs.len() - 1].view(), &t)
                .1
                .loss_sum
        };
        let (g, _) = loss_and_grad(spec, &theta, x.view(), &t, &ctx);
        let h = 1e-6;
        let mut worst: f64 = 0.0;
        for i in 0..theta.len() {
            let mut p = theta.clone();
            p[i] += h;
            let up = total_loss(&p);
            p[i] -= 2.0 * h;
            let down = total_loss(&p);
            let fd = (up - down) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
        }
        assert!(
            worst < 1e-6,
            "{:?} dropout {}: worst relative gradient error {worst:e}",
            spec.kind,
            spec.dropout
        );
    }

    #[test]
    fn gradients_match_central_finite_differences_for_every_model_and_activation() {
        let logreg = ModelSpec::new(ModelKind::Logreg, 4, 2, vec![], Activation::Relu).unwrap();
        check_against_finite_differences(&logreg, 2);
        let softmax = ModelSpec::new(ModelKind::Softmax, 5, 3, vec![], Activation::Relu).unwrap();
        check_against_finite_differences(&softmax, 3);
        let linreg = ModelSpec::new(ModelKind::Linreg, 3, 0, vec![], Activation::Relu).unwrap();
        check_against_finite_differences(&linreg, 0);
        for a in [Activation::Relu, Activation::Tanh, Activation::Sigmoid] {
            let mlp = ModelSpec::new(ModelKind::Mlp, 4, 3, vec![6, 5], a).unwrap();
            check_against_finite_differences(&mlp, 3);
            check_against_finite_differences(&mlp.with_dropout(0.4).unwrap(), 3);
        }
    }
}
