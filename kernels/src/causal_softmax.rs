//! Launcher for `shaders/causal_softmax.wgsl`: the softmax of attention scores under a causal mask,
//! forward and backward, with the CPU references the CPU backend uses. Rows are (batch, head, query)
//! of `t` keys each; query q sees keys 0..=q.

use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, tree_reduce, u32_of};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    t: u32,
    scale: f32,
    _pad: u32,
}

crate::params_layout!(Params { rows, t, scale });

const SLOTS: &[Slot] = &[Slot::Read, Slot::Read, Slot::ReadWrite, Slot::Uniform];

pub struct CausalSoftmax {
    forward: Kernel,
    backward: Kernel,
}

impl CausalSoftmax {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            forward: Kernel::new(ctx, "causal_softmax", &[("BACKWARD", 0.0)], SLOTS, false),
            backward: Kernel::new(ctx, "causal_softmax", &[("BACKWARD", 1.0)], SLOTS, false),
        }
    }

    /// Forward (`dp` None: dst = P from the scores `src`) or backward (src = P, dst = dS from dP)
    /// over `rows` rows of `t` (rows a multiple of t), scores scaled by `scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        ctx: &GpuContext,
        rows: usize,
        t: usize,
        scale: f32,
        src: &wgpu::Buffer,
        dp: Option<&wgpu::Buffer>,
        dst: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const N: &str = "causal_softmax";
        if t == 0 || !rows.is_multiple_of(t) {
            return Err(KernelError::Shape {
                kernel: N,
                msg: format!("{rows} rows are not a whole number of {t}-query blocks"),
            });
        }
        let len = (rows as u64) * (t as u64);
        u32_of(N, "elements", len)?;
        need(N, "src", src, len)?;
        need(N, "dst", dst, len)?;
        if let Some(d) = dp {
            need(N, "dp", d, len)?;
        }
        let p = Params {
            rows: u32_of(N, "rows", rows as u64)?,
            t: u32_of(N, "t", t as u64)?,
            scale,
            _pad: 0,
        };
        let u = ctx.uniform("causal softmax params", &p);
        let (k, aux) = match dp {
            Some(d) => (&self.backward, d),
            None => (&self.forward, src),
        };
        let groups = (p.rows.min(65535), p.rows.div_ceil(65535));
        Ok(k.dispatch(ctx, &[src, aux, dst, &u], groups))
    }
}

/// CPU reference of the forward.
pub fn forward_ref(rows: usize, t: usize, scale: f32, s: &[f32]) -> Vec<f32> {
    let mut p = vec![0f32; rows * t];
    for r in 0..rows {
        let (q, row) = (r % t, &s[r * t..(r + 1) * t]);
        let m = tree_reduce(q + 1, |j| scale * row[j], f32::MIN, f32::max);
        let total = tree_reduce(q + 1, |j| (scale * row[j] - m).exp(), 0.0, |a, b| a + b);
        for j in 0..=q {
            p[r * t + j] = (scale * row[j] - m).exp() / total;
        }
    }
    p
}

/// CPU reference of the backward: dS from P and dP.
pub fn backward_ref(rows: usize, t: usize, scale: f32, p: &[f32], dp: &[f32]) -> Vec<f32> {
    let mut ds = vec![0f32; rows * t];
    for r in 0..rows {
        let q = r % t;
        let (pr, dr) = (&p[r * t..(r + 1) * t], &dp[r * t..(r + 1) * t]);
        let dot = tree_reduce(q + 1, |j| pr[j] * dr[j], 0.0, |a, b| a + b);
        for j in 0..=q {
            ds[r * t + j] = scale * pr[j] * (dr[j] - dot);
        }
    }
    ds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    const SIZES: [(usize, usize); 4] = [(1, 1), (2 * 3 * 7, 7), (13, 13), (2 * 300, 300)];

    /// L = Σ w ⊙ softmax(S): dS by central differences in f64, zero above the diagonal.
    #[test]
    fn backward_reference_matches_finite_differences() {
        for (i, (rows, t)) in SIZES.into_iter().enumerate().take(3) {
            let s: Vec<f32> = random(rows * t, 1 + i as u64)
                .iter()
                .map(|v| 3.0 * v)
                .collect();
            let w = random(rows * t, 2 + i as u64);
            let scale = 0.5;
            let loss = |s: &[f32]| -> f64 {
                forward_ref(rows, t, scale, s)
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            };
            let p = forward_ref(rows, t, scale, &s);
            let ds = backward_ref(rows, t, scale, &p, &w);
            let h = 1e-2f32;
            for j in 0..rows * t {
                let (mut sp, mut sm) = (s.clone(), s.clone());
                sp[j] += h;
                sm[j] -= h;
                let fd = (loss(&sp) - loss(&sm)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(ds[j])).abs() < 1e-3,
                    "({rows}, {t}) element {j}: {fd} vs {}",
                    ds[j]
                );
            }
            // each row sums to 1 over the keys it sees and is 0 beyond them
            for r in 0..rows {
                let q = r % t;
                let row = &p[r * t..(r + 1) * t];
                assert!((row[..=q].iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(row[q + 1..].iter().all(|v| *v == 0.0));
            }
        }
    }

    #[test]
    fn the_kernels_match_their_references() {
        let ctx = ctx();
        let k = CausalSoftmax::new(&ctx);
        for (i, (rows, t)) in SIZES.into_iter().enumerate() {
            let s: Vec<f32> = random(rows * t, 10 + i as u64)
                .iter()
                .map(|v| 8.0 * v)
                .collect();
            let dp = random(rows * t, 20 + i as u64);
            let scale = 1.0 / (t as f32).sqrt();
            let sb = ctx.upload("s", &s).unwrap();
            let dpb = ctx.upload("dp", &dp).unwrap();
            let pb = ctx.storage("p", (4 * rows * t) as u64).unwrap();
            let dsb = ctx.storage("ds", (4 * rows * t) as u64).unwrap();
            let f = k.apply(&ctx, rows, t, scale, &sb, None, &pb).unwrap();
            let b = k
                .apply(&ctx, rows, t, scale, &pb, Some(&dpb), &dsb)
                .unwrap();
            crate::run(&ctx, &[&f, &b]);
            let p = ctx.read::<f32>(&pb, 0, rows * t).unwrap();
            assert_close(&p, &forward_ref(rows, t, scale, &s), 1e-5, "forward");
            let ds = ctx.read::<f32>(&dsb, 0, rows * t).unwrap();
            assert_close(
                &ds,
                &backward_ref(rows, t, scale, &p, &dp),
                1e-5,
                "backward",
            );
        }
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_errors() {
        let ctx = ctx();
        let k = CausalSoftmax::new(&ctx);
        let b = ctx.storage("b", 4096).unwrap();
        assert!(k.apply(&ctx, 10, 3, 1.0, &b, None, &b).is_err());
        assert!(k.apply(&ctx, 10, 0, 1.0, &b, None, &b).is_err());
    }
}
