//! Launcher for `shaders/layer_norm.wgsl`: layer normalisation over the last dimension, forward
//! (keeping each row's mean and 1/std) and backward (the input's gradient by row reductions, the
//! weight's and bias's by column sums), with the CPU references the CPU backend uses. Every
//! reduction runs in a fixed order, so results do not depend on the device.

use crate::context::groups_1d;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, tree_reduce, u32_of};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

crate::params_layout!(Params { rows, c, eps });

const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::Uniform,
];

/// The three passes, built once per device.
pub struct LayerNorm {
    forward: Kernel,
    backward_x: Kernel,
    backward_wb: Kernel,
}

/// Which pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// out = y; stats = (mean, 1/std) per row.
    Forward,
    /// out = dx, from the forward's stats.
    BackwardX,
    /// out = dw then db (2c values), from the forward's stats.
    BackwardWeights,
}

impl LayerNorm {
    pub fn new(ctx: &GpuContext) -> Self {
        let k = |m: f64| Kernel::new(ctx, "layer_norm", &[("MODE", m)], SLOTS, false);
        Self {
            forward: k(0.0),
            backward_x: k(1.0),
            backward_wb: k(2.0),
        }
    }

    /// One pass over `rows` rows of width `c`: `x` is the forward's input, `dy` the output's gradient
    /// (any buffer in the forward), `wb` the weight then the bias, `stats` two values per row.
    #[allow(clippy::too_many_arguments)]
    pub fn pass(
        &self,
        ctx: &GpuContext,
        pass: Pass,
        rows: usize,
        c: usize,
        eps: f32,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        wb: &wgpu::Buffer,
        stats: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "layer_norm";
        let len = (rows as u64) * (c as u64);
        u32_of(K, "elements", len)?;
        if c == 0 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: "rows of width 0".into(),
            });
        }
        need(K, "x", x, len)?;
        if pass != Pass::Forward {
            need(K, "dy", dy, len)?;
        }
        need(K, "wb", wb, 2 * c as u64)?;
        need(K, "stats", stats, 2 * rows as u64)?;
        need(
            K,
            "out",
            out,
            if pass == Pass::BackwardWeights {
                2 * c as u64
            } else {
                len
            },
        )?;
        let p = Params {
            rows: u32_of(K, "rows", rows as u64)?,
            c: u32_of(K, "c", c as u64)?,
            eps,
            _pad: 0,
        };
        let u = ctx.uniform("layer norm params", &p);
        let (k, groups) = match pass {
            Pass::Forward | Pass::BackwardX => {
                let r = p.rows.max(1);
                let k = if pass == Pass::Forward {
                    &self.forward
                } else {
                    &self.backward_x
                };
                (k, (r.min(65535), r.div_ceil(65535)))
            }
            Pass::BackwardWeights => (&self.backward_wb, groups_1d(p.c, 256)),
        };
        Ok(k.dispatch(ctx, &[x, dy, wb, stats, out, &u], groups))
    }
}

/// The sum of `v(j)` for j in 0..c as the kernel adds it.
fn tree_sum(c: usize, v: impl Fn(usize) -> f32) -> f32 {
    tree_reduce(c, v, 0.0, |a, b| a + b)
}

/// CPU reference of the forward: (y, stats) with stats = (mean, 1/std) per row.
pub fn forward_ref(rows: usize, c: usize, eps: f32, x: &[f32], wb: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; rows * c];
    let mut stats = vec![0f32; 2 * rows];
    for r in 0..rows {
        let xs = &x[r * c..(r + 1) * c];
        let mean = tree_sum(c, |j| xs[j]) / c as f32;
        let var = tree_sum(c, |j| (xs[j] - mean) * (xs[j] - mean)) / c as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            y[r * c + j] = (xs[j] - mean) * rstd * wb[j] + wb[c + j];
        }
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
    (y, stats)
}

/// CPU reference of the backward: (dx, dw then db).
pub fn backward_ref(
    rows: usize,
    c: usize,
    x: &[f32],
    dy: &[f32],
    wb: &[f32],
    stats: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; rows * c];
    let mut dwb = vec![0f32; 2 * c];
    for r in 0..rows {
        let (xs, gs) = (&x[r * c..(r + 1) * c], &dy[r * c..(r + 1) * c]);
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        let sum_g = tree_sum(c, |j| gs[j] * wb[j]);
        let sum_gx = tree_sum(c, |j| gs[j] * wb[j] * (xs[j] - mean) * rstd);
        for j in 0..c {
            let xhat = (xs[j] - mean) * rstd;
            dx[r * c + j] = rstd * (gs[j] * wb[j] - sum_g / c as f32 - xhat * sum_gx / c as f32);
        }
    }
    for j in 0..c {
        let (mut dw, mut db) = (0f32, 0f32);
        for r in 0..rows {
            let g = dy[r * c + j];
            dw += g * (x[r * c + j] - stats[2 * r]) * stats[2 * r + 1];
            db += g;
        }
        dwb[j] = dw;
        dwb[c + j] = db;
    }
    (dx, dwb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    const SIZES: [(usize, usize); 4] = [(1, 1), (5, 7), (13, 300), (3, 769)];

    /// L = Σ w ⊙ LN(x): gradients of x, the weight and the bias by central differences in f64.
    #[test]
    fn backward_reference_matches_finite_differences() {
        for (i, (rows, c)) in SIZES.into_iter().enumerate().skip(1) {
            let x: Vec<f32> = random(rows * c, 1 + i as u64)
                .iter()
                .map(|v| 2.0 * v + 0.3)
                .collect();
            let w = random(rows * c, 2 + i as u64);
            let mut wb = random(2 * c, 3 + i as u64);
            wb[..c].iter_mut().for_each(|g| *g += 1.0);
            let eps = 1e-5;
            let loss = |x: &[f32], wb: &[f32]| -> f64 {
                let (y, _) = forward_ref(rows, c, eps, x, wb);
                y.iter()
                    .zip(&w)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            };
            let (_, stats) = forward_ref(rows, c, eps, &x, &wb);
            let (dx, dwb) = backward_ref(rows, c, &x, &w, &wb, &stats);
            let h = 1e-2f32;
            let step = (rows * c / 40).max(1);
            for j in (0..rows * c).step_by(step) {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[j] += h;
                xm[j] -= h;
                let fd = (loss(&xp, &wb) - loss(&xm, &wb)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(dx[j])).abs() < 1e-2 * fd.abs().max(1.0),
                    "({rows}, {c}) dx[{j}]: {fd} vs {}",
                    dx[j]
                );
            }
            for j in (0..2 * c).step_by((2 * c / 20).max(1)) {
                let (mut ap, mut am) = (wb.clone(), wb.clone());
                ap[j] += h;
                am[j] -= h;
                let fd = (loss(&x, &ap) - loss(&x, &am)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(dwb[j])).abs() < 1e-2 * fd.abs().max(1.0),
                    "({rows}, {c}) dwb[{j}]: {fd} vs {}",
                    dwb[j]
                );
            }
        }
    }

    #[test]
    fn the_kernels_match_their_references() {
        let ctx = ctx();
        let k = LayerNorm::new(&ctx);
        for (i, (rows, c)) in SIZES.into_iter().enumerate() {
            let x = random(rows * c, 10 + i as u64);
            let dy = random(rows * c, 20 + i as u64);
            let wb = random(2 * c, 30 + i as u64);
            let eps = 1e-5;
            let xb = ctx.upload("x", &x).unwrap();
            let dyb = ctx.upload("dy", &dy).unwrap();
            let wbb = ctx.upload("wb", &wb).unwrap();
            let sb = ctx.storage("stats", (8 * rows) as u64).unwrap();
            let yb = ctx.storage("y", (4 * rows * c) as u64).unwrap();
            let dxb = ctx.storage("dx", (4 * rows * c) as u64).unwrap();
            let dwbb = ctx.storage("dwb", (8 * c) as u64).unwrap();
            let d = [
                k.pass(&ctx, Pass::Forward, rows, c, eps, &xb, &dyb, &wbb, &sb, &yb)
                    .unwrap(),
                k.pass(
                    &ctx,
                    Pass::BackwardX,
                    rows,
                    c,
                    eps,
                    &xb,
                    &dyb,
                    &wbb,
                    &sb,
                    &dxb,
                )
                .unwrap(),
                k.pass(
                    &ctx,
                    Pass::BackwardWeights,
                    rows,
                    c,
                    eps,
                    &xb,
                    &dyb,
                    &wbb,
                    &sb,
                    &dwbb,
                )
                .unwrap(),
            ];
            crate::run(&ctx, &d.iter().collect::<Vec<_>>());
            let (y, stats) = forward_ref(rows, c, eps, &x, &wb);
            assert_close(&ctx.read::<f32>(&yb, 0, rows * c).unwrap(), &y, 1e-5, "y");
            let got_stats = ctx.read::<f32>(&sb, 0, 2 * rows).unwrap();
            assert_close(&got_stats, &stats, 1e-5, "stats");
            // the backward from the GPU's own statistics
            let (dx, dwb) = backward_ref(rows, c, &x, &dy, &wb, &got_stats);
            assert_close(
                &ctx.read::<f32>(&dxb, 0, rows * c).unwrap(),
                &dx,
                1e-5,
                "dx",
            );
            assert_close(
                &ctx.read::<f32>(&dwbb, 0, 2 * c).unwrap(),
                &dwb,
                1e-5,
                "dwb",
            );
        }
    }

    #[test]
    fn short_buffers_and_empty_rows_are_errors() {
        let ctx = ctx();
        let k = LayerNorm::new(&ctx);
        let b = ctx.storage("b", 4096).unwrap();
        let small = ctx.storage("small", 8).unwrap();
        assert!(
            k.pass(&ctx, Pass::Forward, 4, 0, 1e-5, &b, &b, &b, &b, &b)
                .is_err()
        );
        assert!(
            k.pass(&ctx, Pass::Forward, 4, 8, 1e-5, &b, &b, &small, &b, &b)
                .is_err()
        );
        assert!(
            k.pass(
                &ctx,
                Pass::BackwardWeights,
                4,
                8,
                1e-5,
                &b,
                &b,
                &b,
                &b,
                &small
            )
            .is_err()
        );
    }
}
