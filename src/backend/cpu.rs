//! The CPU reference backend (ndarray): the same mathematics as the WGSL kernels, written plainly.
//!
//! `loss_and_grad` is generic over f32/f64: the backend trains in f32 like the GPU, and the tests run
//! it in f64 against central finite differences.

use std::ops::Range;

use dptrain_kernels::loss::LossKind;
use dptrain_kernels::reduce_stats::Totals;
use dptrain_kernels::sgd::{SgdStep, sgd_ref};
use ndarray::{Array2, ArrayView1, ArrayView2, Axis, LinalgScalar};
use num_traits::Float;

use super::{Backend, BackendInit, Split};
use crate::model::{Activation, ModelSpec};

fn act<T: Float>(a: Activation, v: T) -> T {
    match a {
        Activation::Relu => v.max(T::zero()),
        Activation::Tanh => v.tanh(),
        Activation::Sigmoid => T::one() / (T::one() + (-v).exp()),
    }
}

/// Derivative from the activation's output y.
fn dact<T: Float>(a: Activation, y: T) -> T {
    match a {
        Activation::Relu => {
            if y > T::zero() {
                T::one()
            } else {
                T::zero()
            }
        }
        Activation::Tanh => T::one() - y * y,
        Activation::Sigmoid => y * (T::one() - y),
    }
}

/// Layer l's weight [out, in] and bias [out] views into the flat buffer.
fn views<'a, T>(
    spec: &ModelSpec,
    theta: &'a [T],
    l: usize,
) -> (ArrayView2<'a, T>, ArrayView1<'a, T>) {
    let (fi, fo) = spec.layer(l);
    let (wo, bo) = spec.offsets(l);
    let w =
        ArrayView2::from_shape((fo, fi), &theta[wo..wo + fi * fo]).expect("layout matches spec");
    let b = ArrayView1::from(&theta[bo..bo + fo]);
    (w, b)
}

/// Forward pass: every layer's output (the last one is the logits).
pub fn forward<T: Float + LinalgScalar>(
    spec: &ModelSpec,
    theta: &[T],
    x: ArrayView2<T>,
) -> Vec<Array2<T>> {
    let n_layers = spec.hidden.len() + 1;
    let mut outs: Vec<Array2<T>> = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let (w, b) = views(spec, theta, l);
        let input = if l == 0 { x } else { outs[l - 1].view() };
        let mut z = input.dot(&w.t()) + b;
        if l + 1 < n_layers {
            z.mapv_inplace(|v| act(spec.activation, v));
        }
        outs.push(z);
    }
    outs
}

/// Per-row loss, correctness and dz for the model's loss, as the fused GPU kernels compute them.
pub fn loss_rows<T: Float>(kind: LossKind, z: ArrayView2<T>, t: &[T]) -> (Array2<T>, Totals) {
    let mut dz = Array2::<T>::zeros(z.raw_dim());
    let mut tot = Totals {
        count: t.len() as u64,
        ..Totals::default()
    };
    for (r, zr) in z.outer_iter().enumerate() {
        let y = t[r];
        match kind {
            LossKind::SoftmaxXent => {
                let label = y.to_usize().unwrap_or(0);
                let (mut arg, mut m) = (0, zr[0]);
                for (j, &v) in zr.iter().enumerate() {
                    if v > m {
                        m = v;
                        arg = j;
                    }
                }
                let s = zr.iter().fold(T::zero(), |s, &v| s + (v - m).exp());
                for (j, &v) in zr.iter().enumerate() {
                    let onehot = if j == label { T::one() } else { T::zero() };
                    dz[[r, j]] = (v - m).exp() / s - onehot;
                }
                tot.loss_sum += (m + s.ln() - zr[label]).to_f64().unwrap_or(f64::NAN);
                tot.correct += u64::from(arg == label);
            }
            LossKind::SigmoidBce => {
                let v = zr[0];
                let e = (-v.abs()).exp();
                let sig = if v >= T::zero() {
                    T::one() / (T::one() + e)
                } else {
                    e / (T::one() + e)
                };
                dz[[r, 0]] = sig - y;
                let l = v.max(T::zero()) - v * y + e.ln_1p();
                tot.loss_sum += l.to_f64().unwrap_or(f64::NAN);
                let half = T::from(0.5).unwrap_or(T::zero());
                tot.correct += u64::from((v > T::zero()) == (y > half));
            }
            LossKind::Mse => {
                let d = zr[0] - y;
                dz[[r, 0]] = d + d;
                tot.loss_sum += (d * d).to_f64().unwrap_or(f64::NAN);
            }
        }
    }
    (dz, tot)
}

/// Gradient sums over the batch (flat, in the parameter layout) and the batch's totals.
pub fn loss_and_grad<T: Float + LinalgScalar>(
    spec: &ModelSpec,
    theta: &[T],
    x: ArrayView2<T>,
    t: &[T],
) -> (Vec<T>, Totals) {
    let outs = forward(spec, theta, x);
    let n_layers = outs.len();
    let (mut dz, tot) = loss_rows(spec.loss(), outs[n_layers - 1].view(), t);
    let mut grads = vec![T::zero(); theta.len()];
    for l in (0..n_layers).rev() {
        let input = if l == 0 { x } else { outs[l - 1].view() };
        let (w, _) = views(spec, theta, l);
        let (wo, bo) = spec.offsets(l);
        let dw = dz.t().dot(&input);
        let db = dz.sum_axis(Axis(0));
        grads[wo..wo + dw.len()]
            .iter_mut()
            .zip(dw.iter())
            .for_each(|(g, &v)| *g = v);
        grads[bo..bo + db.len()]
            .iter_mut()
            .zip(db.iter())
            .for_each(|(g, &v)| *g = v);
        if l > 0 {
            let mut dprev = dz.dot(&w);
            dprev.zip_mut_with(&outs[l - 1], |d, &y| *d = *d * dact(spec.activation, y));
            dz = dprev;
        }
    }
    (grads, tot)
}

/// The CPU backend: normalised data held as f32 matrices.
pub struct CpuBackend {
    spec: ModelSpec,
    theta: Vec<f32>,
    vel: Vec<f32>,
    grads: Vec<f32>,
    train_x: Array2<f32>,
    train_t: Vec<f32>,
    test_x: Option<Array2<f32>>,
    test_t: Vec<f32>,
    order: Vec<u32>,
    totals: Totals,
    step_losses: Vec<f32>,
}

impl CpuBackend {
    pub fn new(init: &BackendInit<'_>) -> anyhow::Result<Self> {
        let nf = init.train.n_features;
        let to_matrix = |ds: &crate::data::Dataset| {
            Array2::from_shape_vec((ds.n_samples, nf), init.norm.apply_dataset(ds))
        };
        let p = init.spec.layout().total;
        Ok(Self {
            spec: init.spec.clone(),
            theta: vec![0.0; p],
            vel: vec![0.0; p],
            grads: vec![0.0; p],
            train_x: to_matrix(init.train)?,
            train_t: init.train.y.clone(),
            test_x: init.test.map(to_matrix).transpose()?,
            test_t: init.test.map(|d| d.y.clone()).unwrap_or_default(),
            order: Vec::new(),
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
    fn velocity(&mut self) -> anyhow::Result<Vec<f32>> {
        Ok(self.vel.clone())
    }
    fn set_velocity(&mut self, v: &[f32]) -> anyhow::Result<()> {
        same_len("velocity", v.len(), self.vel.len())?;
        self.vel.copy_from_slice(v);
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
    fn forward_backward(&mut self, offset: usize, rows: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            offset + rows <= self.order.len(),
            "batch past the epoch's order"
        );
        let idx: Vec<usize> = self.order[offset..offset + rows]
            .iter()
            .map(|&i| i as usize)
            .collect();
        let x = self.train_x.select(Axis(0), &idx);
        let t: Vec<f32> = idx.iter().map(|&i| self.train_t[i]).collect();
        let (g, tot) = loss_and_grad(&self.spec, &self.theta, x.view(), &t);
        self.grads = g;
        self.step_losses.push(tot.loss_sum as f32);
        self.totals.add(&tot);
        Ok(())
    }
    fn grads_with_totals(&mut self, out: &mut [f32]) -> anyhow::Result<Totals> {
        same_len("gradients", out.len(), self.grads.len())?;
        out.copy_from_slice(&self.grads);
        Ok(std::mem::take(&mut self.totals))
    }
    fn set_grads(&mut self, g: &[f32]) -> anyhow::Result<()> {
        same_len("gradients", g.len(), self.grads.len())?;
        self.grads.copy_from_slice(g);
        Ok(())
    }
    fn update(&mut self, step: &SgdStep) -> anyhow::Result<()> {
        sgd_ref(&mut self.theta, &self.grads, &mut self.vel, step);
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
        for start in range.clone().step_by(4096) {
            let end = (start + 4096).min(range.end);
            let outs = forward(
                &self.spec,
                &self.theta,
                x.slice(ndarray::s![start..end, ..]),
            );
            let (_, b) = loss_rows(
                self.spec.loss(),
                outs[outs.len() - 1].view(),
                &t[start..end],
            );
            tot.add(&b);
        }
        Ok(tot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;
    use crate::rng::Rng;

    /// Total loss in f64 for finite differences.
    fn total_loss(spec: &ModelSpec, theta: &[f64], x: ArrayView2<f64>, t: &[f64]) -> f64 {
        let outs = forward(spec, theta, x);
        loss_rows(spec.loss(), outs[outs.len() - 1].view(), t)
            .1
            .loss_sum
    }

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
        let (g, _) = loss_and_grad(spec, &theta, x.view(), &t);
        let h = 1e-6;
        let mut worst: f64 = 0.0;
        for i in 0..theta.len() {
            let mut p = theta.clone();
            p[i] += h;
            let up = total_loss(spec, &p, x.view(), &t);
            p[i] -= 2.0 * h;
            let down = total_loss(spec, &p, x.view(), &t);
            let fd = (up - down) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
        }
        assert!(
            worst < 1e-6,
            "{:?}: worst relative gradient error {worst:e}",
            spec.kind
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
        }
    }
}
