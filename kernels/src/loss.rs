//! Launchers for the fused loss kernels (`softmax_xent`, `sigmoid_bce`, `mse` shaders) and their CPU references.
//!
//! Each writes the gradient of the per-sample loss into dz and a (loss, correct) pair per row.

use num_traits::Float;

use crate::context::groups_1d;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

/// Which loss the model's output feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// Softmax + cross-entropy over `classes` logits; targets are class indices.
    SoftmaxXent,
    /// Sigmoid + binary cross-entropy on one logit; targets 0/1.
    SigmoidBce,
    /// Squared error on one output; targets are real values.
    Mse,
}

impl LossKind {
    fn stem(self) -> &'static str {
        match self {
            Self::SoftmaxXent => "softmax_xent",
            Self::SigmoidBce => "sigmoid_bce",
            Self::Mse => "mse",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    classes: u32,
    _pad0: u32,
    _pad1: u32,
}

crate::params_layout!(Params { rows, classes });

/// Shapes and buffers of one loss evaluation.
#[derive(Clone, Copy)]
pub struct LossArgs<'a> {
    pub rows: u64,
    pub classes: u64,
    /// Model outputs [rows, classes].
    pub z: &'a wgpu::Buffer,
    /// Targets [rows].
    pub t: &'a wgpu::Buffer,
    /// Gradient of the per-sample loss [rows, classes].
    pub dz: &'a wgpu::Buffer,
    /// (loss, correct) per row [rows, 2].
    pub stats: &'a wgpu::Buffer,
    /// Its first element multiplies dz: the loss scale of mixed precision (1.0 in f32 runs).
    pub scaler: &'a wgpu::Buffer,
}

pub struct Loss {
    pub kind: LossKind,
    kernel: Kernel,
}

impl Loss {
    pub fn new(ctx: &GpuContext, kind: LossKind) -> Self {
        let kernel = Kernel::new(
            ctx,
            kind.stem(),
            &[],
            &[
                Slot::Read,
                Slot::Read,
                Slot::ReadWrite,
                Slot::ReadWrite,
                Slot::Read,
                Slot::Uniform,
            ],
            false,
        );
        Self { kind, kernel }
    }

    /// z[rows, classes] and targets t[rows] in, dz[rows, classes] and stats[rows, 2] out.
    pub fn prepare(&self, ctx: &GpuContext, args: &LossArgs<'_>) -> Result<Dispatch, KernelError> {
        let LossArgs {
            rows,
            classes,
            z,
            t,
            dz,
            stats,
            scaler,
        } = *args;
        let k = self.kernel.name;
        if classes == 0 || (self.kind != LossKind::SoftmaxXent && classes != 1) {
            return Err(KernelError::Shape {
                kernel: k,
                msg: format!("{classes} outputs"),
            });
        }
        need(k, "z", z, rows * classes)?;
        need(k, "t", t, rows)?;
        need(k, "dz", dz, rows * classes)?;
        need(k, "stats", stats, rows * 2)?;
        need(k, "scaler", scaler, 1)?;
        let params = Params {
            rows: u32_of(k, "rows", rows)?,
            classes: u32_of(k, "classes", classes)?,
            _pad0: 0,
            _pad1: 0,
        };
        u32_of(k, "rows × classes", rows * classes)?;
        let uniform = ctx.uniform("loss params", &params);
        Ok(self.kernel.dispatch(
            ctx,
            &[z, t, dz, stats, scaler, &uniform],
            groups_1d(params.rows, 64),
        ))
    }
}

/// One row of the loss, as the kernels compute it: writes the gradient of the row's loss with
/// respect to its outputs `z` into `dz`, and returns (loss, correct). Generic over the float type:
/// the reference below runs it in f64, the CPU backend in f32 (training) and f64 (finite differences).
pub fn loss_row<T: Float>(kind: LossKind, z: &[T], y: T, dz: &mut [T]) -> (T, bool) {
    match kind {
        LossKind::SoftmaxXent => {
            let label = y.to_usize().unwrap_or(0).min(z.len() - 1);
            let (mut arg, mut m) = (0, z[0]);
            for (j, &v) in z.iter().enumerate() {
                if v > m {
                    m = v;
                    arg = j;
                }
            }
            let s = z.iter().fold(T::zero(), |s, &v| s + (v - m).exp());
            for (j, (d, &v)) in dz.iter_mut().zip(z).enumerate() {
                let onehot = if j == label { T::one() } else { T::zero() };
                *d = (v - m).exp() / s - onehot;
            }
            (m + s.ln() - z[label], arg == label)
        }
        LossKind::SigmoidBce => {
            let v = z[0];
            // sigmoid from one exp of -|v|: stable for either sign
            let e = (-v.abs()).exp();
            let sig = if v >= T::zero() {
                T::one() / (T::one() + e)
            } else {
                e / (T::one() + e)
            };
            dz[0] = sig - y;
            let half = T::from(0.5).unwrap_or_else(T::zero);
            (
                v.max(T::zero()) - v * y + e.ln_1p(),
                (v > T::zero()) == (y > half),
            )
        }
        LossKind::Mse => {
            let d = z[0] - y;
            dz[0] = d + d;
            (d * d, false)
        }
    }
}

/// CPU reference in f64: (dz, per-row loss, per-row correct).
pub fn loss_ref(
    kind: LossKind,
    z: &[f32],
    t: &[f32],
    classes: usize,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let rows = t.len();
    let mut dz = vec![0f32; rows * classes];
    let mut loss = Vec::with_capacity(rows);
    let mut correct = Vec::with_capacity(rows);
    let mut d64 = vec![0f64; classes];
    for r in 0..rows {
        let zr: Vec<f64> = z[r * classes..(r + 1) * classes]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let (l, c) = loss_row(kind, &zr, f64::from(t[r]), &mut d64);
        for (o, &v) in dz[r * classes..(r + 1) * classes].iter_mut().zip(&d64) {
            *o = v as f32;
        }
        loss.push(l);
        correct.push(if c { 1.0 } else { 0.0 });
    }
    (dz, loss, correct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    fn check(kind: LossKind, rows: usize, classes: usize) {
        check_scaled(kind, rows, classes, 1.0);
    }

    fn check_scaled(kind: LossKind, rows: usize, classes: usize, scale: f32) {
        let ctx = ctx();
        let z: Vec<f32> = random(rows * classes, 5).iter().map(|v| v * 6.0).collect();
        let t: Vec<f32> = (0..rows)
            .map(|r| match kind {
                LossKind::SoftmaxXent => ((r * 7) % classes) as f32,
                LossKind::SigmoidBce => (r % 2) as f32,
                LossKind::Mse => r as f32 * 0.01 - 0.3,
            })
            .collect();
        let zb = ctx.upload("z", &z).unwrap();
        let tb = ctx.upload("t", &t).unwrap();
        let dzb = ctx.storage("dz", (rows * classes * 4) as u64).unwrap();
        let sb = ctx.storage("stats", (rows * 8) as u64).unwrap();
        let scaler = ctx.upload("scaler", &[scale]).unwrap();
        let d = Loss::new(&ctx, kind)
            .prepare(
                &ctx,
                &LossArgs {
                    rows: rows as u64,
                    classes: classes as u64,
                    z: &zb,
                    t: &tb,
                    dz: &dzb,
                    stats: &sb,
                    scaler: &scaler,
                },
            )
            .unwrap();
        crate::run(&ctx, &[&d]);
        let (mut wdz, wl, wc) = loss_ref(kind, &z, &t, classes);
        // the loss scale multiplies the gradient only
        wdz.iter_mut().for_each(|v| *v *= scale);
        assert_close(
            &ctx.read::<f32>(&dzb, 0, rows * classes).unwrap(),
            &wdz,
            1e-5,
            "dz",
        );
        let st: Vec<f32> = ctx.read(&sb, 0, rows * 2).unwrap();
        let gl: Vec<f32> = st.iter().step_by(2).copied().collect();
        let wl32: Vec<f32> = wl.iter().map(|&v| v as f32).collect();
        assert_close(&gl, &wl32, 1e-5, "loss");
        let gc: Vec<f64> = st
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&v| f64::from(v))
            .collect();
        assert_eq!(gc, wc, "correct");
    }

    #[test]
    fn softmax_cross_entropy_matches_the_reference() {
        check(LossKind::SoftmaxXent, 131, 10);
        check(LossKind::SoftmaxXent, 3, 1000);
        check(LossKind::SoftmaxXent, 70, 3);
    }

    #[test]
    fn sigmoid_bce_matches_the_reference() {
        check(LossKind::SigmoidBce, 201, 1);
    }

    #[test]
    fn the_loss_scale_multiplies_the_gradient_and_not_the_loss() {
        check_scaled(LossKind::SoftmaxXent, 67, 10, 1024.0);
        check_scaled(LossKind::Mse, 33, 1, 0.5);
    }

    #[test]
    fn squared_error_matches_the_reference() {
        check(LossKind::Mse, 99, 1);
    }

    #[test]
    fn binary_losses_refuse_more_than_one_output() {
        let ctx = ctx();
        let b = ctx.storage("b", 64).unwrap();
        let err = Loss::new(&ctx, LossKind::SigmoidBce)
            .prepare(
                &ctx,
                &LossArgs {
                    rows: 2,
                    classes: 3,
                    z: &b,
                    t: &b,
                    dz: &b,
                    stats: &b,
                    scaler: &b,
                },
            )
            .err()
            .unwrap();
        assert!(err.to_string().contains("3 outputs"), "{err}");
    }
}
