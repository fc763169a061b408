//! Launchers for `shaders/channel_sums.wgsl` and `shaders/batch_norm.wgsl`: batch normalisation of
//! NCHW tensors. The per-channel sums are deterministic tree reductions (no atomics); the host turns
//! them into the mean and 1/std (after an allreduce of the sums under SyncBatchNorm), and the
//! elementwise kernel applies them, forward and backward. The CPU references reproduce the kernels'
//! summation order, so the two agree bit for bit; [`forward_ref`] and [`backward_ref`] compose them
//! into the layer's mathematics (checked against finite differences).

use crate::context::groups_1d;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, tree_sum, u32_of};

/// Values per channel in the statistics buffer: mean, 1/std, Σ dy, Σ dy·(x − mean).
pub const STATS: usize = 4;

/// What a `channel_sums` dispatch adds up per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sums {
    /// Σ x (one value per channel).
    X,
    /// Σ (x − mean)² around the mean in the statistics (one value per channel).
    SquaredDeviation,
    /// Σ dy and Σ dy·(x − mean) (two values per channel).
    Backward,
}

impl Sums {
    fn mode(self) -> f64 {
        match self {
            Sums::X => 0.0,
            Sums::SquaredDeviation => 1.0,
            Sums::Backward => 2.0,
        }
    }

    /// Values written per channel.
    pub fn width(self) -> usize {
        match self {
            Sums::Backward => 2,
            _ => 1,
        }
    }
}

/// An NCHW tensor's shape as the kernels see it: batch, channels, and h·w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n: usize,
    pub c: usize,
    /// Height × width.
    pub s: usize,
}

impl Shape {
    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements per channel.
    pub fn m(&self) -> usize {
        self.n * self.s
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct SumParams {
    n: u32,
    c: u32,
    s: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    s: u32,
    m: f32,
}

crate::params_layout!(Params { n, c, s, m });

/// `channel_sums`' uniform block, for the layout test.
pub(crate) mod sums_layout {
    #[cfg(test)]
    use super::SumParams;
    crate::params_layout!(SumParams { n, c, s });
}

const SUM_SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Uniform,
];
const NORM_SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Uniform,
];

/// The kernels, built once per device.
pub struct BatchNorm {
    sums: [Kernel; 3],
    forward: Kernel,
    backward: Kernel,
}

impl BatchNorm {
    pub fn new(ctx: &GpuContext) -> Self {
        let sums =
            |m: Sums| Kernel::new(ctx, "channel_sums", &[("MODE", m.mode())], SUM_SLOTS, false);
        Self {
            sums: [
                sums(Sums::X),
                sums(Sums::SquaredDeviation),
                sums(Sums::Backward),
            ],
            forward: Kernel::new(ctx, "batch_norm", &[("BACKWARD", 0.0)], NORM_SLOTS, false),
            backward: Kernel::new(ctx, "batch_norm", &[("BACKWARD", 1.0)], NORM_SLOTS, false),
        }
    }

    /// out = the per-channel `what` of `x` (and `dy`), reading the mean from `stats`. `dy` and
    /// `stats` may be any buffer where `what` does not read them.
    #[allow(clippy::too_many_arguments)]
    pub fn sums(
        &self,
        ctx: &GpuContext,
        what: Sums,
        shape: &Shape,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        stats: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "channel_sums";
        u32_of(K, "elements", shape.len() as u64)?;
        need(K, "x", x, shape.len() as u64)?;
        if what == Sums::Backward {
            need(K, "dy", dy, shape.len() as u64)?;
        }
        if what != Sums::X {
            need(K, "stats", stats, (STATS * shape.c) as u64)?;
        }
        need(K, "out", out, (what.width() * shape.c) as u64)?;
        let p = SumParams {
            n: u32_of(K, "n", shape.n as u64)?,
            c: u32_of(K, "c", shape.c as u64)?,
            s: u32_of(K, "s", shape.s as u64)?,
            _pad: 0,
        };
        let u = ctx.uniform("channel sums params", &p);
        let c = u32_of(K, "channels", shape.c as u64)?;
        let groups = (c.clamp(1, 65535), c.div_ceil(65535).max(1));
        let k = &self.sums[what.mode() as usize];
        Ok(k.dispatch(ctx, &[x, dy, stats, out, &u], groups))
    }

    /// Forward (`dy` None: dst = y) or backward (dst = dx) of the normalisation with `stats`
    /// (STATS values per channel) and `affine` (gamma then beta, c each); `m` is the element count per
    /// channel over the whole batch (all ranks under SyncBatchNorm).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        ctx: &GpuContext,
        shape: &Shape,
        m: usize,
        x: &wgpu::Buffer,
        dy: Option<&wgpu::Buffer>,
        stats: &wgpu::Buffer,
        affine: &wgpu::Buffer,
        dst: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "batch_norm";
        let total = u32_of(K, "elements", shape.len() as u64)?;
        need(K, "x", x, shape.len() as u64)?;
        if let Some(d) = dy {
            need(K, "dy", d, shape.len() as u64)?;
        }
        need(K, "stats", stats, (STATS * shape.c) as u64)?;
        need(K, "affine", affine, (2 * shape.c) as u64)?;
        need(K, "dst", dst, shape.len() as u64)?;
        if m == 0 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: "a batch of no elements".into(),
            });
        }
        let p = Params {
            n: u32_of(K, "n", shape.n as u64)?,
            c: u32_of(K, "c", shape.c as u64)?,
            s: u32_of(K, "s", shape.s as u64)?,
            m: m as f32,
        };
        let u = ctx.uniform("batch norm params", &p);
        let (k, dyb) = match dy {
            Some(d) => (&self.backward, d),
            None => (&self.forward, x),
        };
        Ok(k.dispatch(
            ctx,
            &[x, dyb, stats, affine, dst, &u],
            groups_1d(total, 256),
        ))
    }
}

/// CPU reference of `channel_sums.wgsl`, in the kernel's order: 256 strided partial sums per
/// channel, then a fixed tree. `stats` holds the mean at `STATS·c` where `what` reads it. Each
/// channel's elements (n-major, then h·w) are first copied out contiguously, so that the tree reads
/// them without index arithmetic; the order of the additions is the kernel's.
pub fn sums_ref<T: num_traits::Float>(
    what: Sums,
    shape: &Shape,
    x: &[T],
    dy: &[T],
    stats: &[T],
) -> Vec<T> {
    let m = shape.m();
    let mut out = vec![T::zero(); what.width() * shape.c];
    let channel = |v: &[T], c: usize| -> Vec<T> {
        let mut buf = Vec::with_capacity(m);
        for n in 0..shape.n {
            let start = (n * shape.c + c) * shape.s;
            buf.extend_from_slice(&v[start..start + shape.s]);
        }
        buf
    };
    for c in 0..shape.c {
        let mean = if what == Sums::X {
            T::zero()
        } else {
            stats[STATS * c]
        };
        match what {
            Sums::X => {
                let xc = channel(x, c);
                out[c] = tree_sum(&xc);
            }
            Sums::SquaredDeviation => {
                let mut xc = channel(x, c);
                for v in &mut xc {
                    let d = *v - mean;
                    *v = d * d;
                }
                out[c] = tree_sum(&xc);
            }
            Sums::Backward => {
                let xc = channel(x, c);
                let mut dc = channel(dy, c);
                out[2 * c] = tree_sum(&dc);
                for (d, &xv) in dc.iter_mut().zip(&xc) {
                    *d = *d * (xv - mean);
                }
                out[2 * c + 1] = tree_sum(&dc);
            }
        }
    }
    out
}

/// CPU reference of `batch_norm.wgsl`: forward (`dy` None) or backward, as the kernel computes it
/// (the same expression for every element, walked plane by plane).
pub fn apply_ref<T: num_traits::Float>(
    shape: &Shape,
    m: usize,
    x: &[T],
    dy: Option<&[T]>,
    stats: &[T],
    affine: &[T],
) -> Vec<T> {
    let mf = T::from(m).unwrap_or_else(T::one);
    let mut out = vec![T::zero(); shape.len()];
    for (p, o) in out.chunks_mut(shape.s.max(1)).enumerate() {
        let c = p % shape.c;
        let (mean, invstd) = (stats[STATS * c], stats[STATS * c + 1]);
        let gamma = affine[c];
        let e0 = p * shape.s;
        match dy {
            Some(dy) => {
                let (sdy, sdyx) = (stats[STATS * c + 2], stats[STATS * c + 3]);
                for (k, v) in o.iter_mut().enumerate() {
                    let xmu = x[e0 + k] - mean;
                    *v = gamma
                        * invstd
                        * (dy[e0 + k] - sdy / mf - xmu * invstd * invstd * sdyx / mf);
                }
            }
            None => {
                let beta = affine[shape.c + c];
                for (k, v) in o.iter_mut().enumerate() {
                    let xmu = x[e0 + k] - mean;
                    *v = xmu * invstd * gamma + beta;
                }
            }
        }
    }
    out
}

/// The mean and 1/√(var + eps) of each channel from Σ x and Σ (x − mean)² over `m` elements (the
/// host's step between the two reductions, and after them), in f64, into `stats`.
pub fn mean_from_sums(stats: &mut [f32], sum_x: &[f32], m: usize) {
    for (c, s) in sum_x.iter().enumerate() {
        stats[STATS * c] = (f64::from(*s) / m as f64) as f32;
    }
}

/// 1/√(var + eps), var = Σ (x − mean)² / m (biased, as the normalisation uses it), into `stats`.
pub fn invstd_from_sums(stats: &mut [f32], sum_sq: &[f32], m: usize, eps: f64) {
    for (c, s) in sum_sq.iter().enumerate() {
        stats[STATS * c + 1] = (1.0 / (f64::from(*s) / m as f64 + eps).sqrt()) as f32;
    }
}

/// Batch normalisation's forward in training mode on the CPU, composed of the references: y and the
/// statistics (mean, 1/std; the backward sums still zero).
pub fn forward_ref(shape: &Shape, x: &[f32], affine: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let m = shape.m();
    let mut stats = vec![0f32; STATS * shape.c];
    let sum_x = sums_ref(Sums::X, shape, x, &[], &stats);
    mean_from_sums(&mut stats, &sum_x, m);
    let sq = sums_ref(Sums::SquaredDeviation, shape, x, &[], &stats);
    invstd_from_sums(&mut stats, &sq, m, eps);
    (apply_ref(shape, m, x, None, &stats, affine), stats)
}

/// Batch normalisation's backward on the CPU: (dx, dgamma, dbeta), from the forward's `stats`.
pub fn backward_ref(
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
    affine: &[f32],
    stats: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut stats = stats.to_vec();
    let s = sums_ref(Sums::Backward, shape, x, dy, &stats);
    for c in 0..shape.c {
        stats[STATS * c + 2] = s[2 * c];
        stats[STATS * c + 3] = s[2 * c + 1];
    }
    let dx = apply_ref(shape, shape.m(), x, Some(dy), &stats, affine);
    let dgamma = (0..shape.c)
        .map(|c| s[2 * c + 1] * stats[STATS * c + 1])
        .collect();
    let dbeta = (0..shape.c).map(|c| s[2 * c]).collect();
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    fn shapes() -> Vec<Shape> {
        vec![
            Shape {
                n: 3,
                c: 5,
                s: 7 * 7,
            },
            Shape {
                n: 2,
                c: 3,
                s: 13 * 13,
            },
            Shape { n: 5, c: 1, s: 1 },
            Shape { n: 7, c: 17, s: 1 },
        ]
    }

    /// L = Σ w ⊙ BN(x): the gradients of x, gamma and beta by central differences in f64.
    #[test]
    fn backward_reference_matches_finite_differences() {
        for (i, shape) in shapes().into_iter().enumerate() {
            let x: Vec<f32> = random(shape.len(), 1 + i as u64)
                .iter()
                .map(|v| 2.0 * v + 0.5)
                .collect();
            let w = random(shape.len(), 2 + i as u64);
            let mut affine = random(2 * shape.c, 3 + i as u64);
            affine[..shape.c].iter_mut().for_each(|g| *g += 1.5);
            let eps = 1e-5;
            let loss = |x: &[f32], affine: &[f32]| -> f64 {
                let (y, _) = forward_ref(&shape, x, affine, eps);
                y.iter()
                    .zip(&w)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            };
            let (_, stats) = forward_ref(&shape, &x, &affine, eps);
            let (dx, dgamma, dbeta) = backward_ref(&shape, &x, &w, &affine, &stats);
            let h = 1e-2f32;
            let fd = |xs: &[f32], af: &[f32], j: usize, on_x: bool| -> f64 {
                let (mut xp, mut xm, mut ap, mut am) =
                    (xs.to_vec(), xs.to_vec(), af.to_vec(), af.to_vec());
                if on_x {
                    xp[j] += h;
                    xm[j] -= h;
                } else {
                    ap[j] += h;
                    am[j] -= h;
                }
                (loss(&xp, &ap) - loss(&xm, &am)) / (2.0 * f64::from(h))
            };
            for j in (0..x.len()).step_by(5) {
                let f = fd(&x, &affine, j, true);
                assert!(
                    (f - f64::from(dx[j])).abs() < 2e-2 * f.abs().max(1.0),
                    "{shape:?} dx[{j}]: {f} vs {}",
                    dx[j]
                );
            }
            for c in 0..shape.c {
                let f = fd(&x, &affine, c, false);
                assert!(
                    (f - f64::from(dgamma[c])).abs() < 2e-2 * f.abs().max(1.0),
                    "{shape:?} dgamma[{c}]: {f} vs {}",
                    dgamma[c]
                );
                let f = fd(&x, &affine, shape.c + c, false);
                assert!(
                    (f - f64::from(dbeta[c])).abs() < 2e-2 * f.abs().max(1.0),
                    "{shape:?} dbeta[{c}]: {f} vs {}",
                    dbeta[c]
                );
            }
        }
    }

    /// The normalised output of each channel has mean 0 and variance 1 (before gamma and beta).
    #[test]
    fn forward_normalises_each_channel() {
        let shape = Shape { n: 4, c: 3, s: 25 };
        let x: Vec<f32> = random(shape.len(), 9)
            .iter()
            .map(|v| 3.0 * v - 1.0)
            .collect();
        let affine = [vec![1.0; 3], vec![0.0; 3]].concat();
        let (y, _) = forward_ref(&shape, &x, &affine, 0.0);
        for c in 0..3 {
            let v: Vec<f64> = (0..shape.len())
                .filter(|e| (e / shape.s) % shape.c == c)
                .map(|e| f64::from(y[e]))
                .collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "channel {c}: {mean} {var}"
            );
        }
    }

    #[test]
    fn the_kernels_match_their_references_bit_for_bit() {
        let ctx = ctx();
        let k = BatchNorm::new(&ctx);
        for (i, shape) in shapes().into_iter().enumerate() {
            let x = random(shape.len(), 20 + i as u64);
            let dy = random(shape.len(), 30 + i as u64);
            let affine = random(2 * shape.c, 40 + i as u64);
            let mut stats = random(STATS * shape.c, 50 + i as u64);
            for c in 0..shape.c {
                stats[STATS * c + 1] = stats[STATS * c + 1].abs() + 0.5;
            }
            let xb = ctx.upload("x", &x).unwrap();
            let dyb = ctx.upload("dy", &dy).unwrap();
            let sb = ctx.upload("stats", &stats).unwrap();
            let ab = ctx.upload("affine", &affine).unwrap();
            let outs: Vec<wgpu::Buffer> = [1, 1, 2]
                .iter()
                .map(|w| ctx.storage("sums", (w * shape.c * 4) as u64).unwrap())
                .collect();
            let yb = ctx.storage("y", (shape.len() * 4) as u64).unwrap();
            let dxb = ctx.storage("dx", (shape.len() * 4) as u64).unwrap();
            let kinds = [Sums::X, Sums::SquaredDeviation, Sums::Backward];
            let mut d: Vec<Dispatch> = kinds
                .iter()
                .zip(&outs)
                .map(|(w, o)| k.sums(&ctx, *w, &shape, &xb, &dyb, &sb, o).unwrap())
                .collect();
            let m = shape.m() * 3;
            d.push(k.apply(&ctx, &shape, m, &xb, None, &sb, &ab, &yb).unwrap());
            d.push(
                k.apply(&ctx, &shape, m, &xb, Some(&dyb), &sb, &ab, &dxb)
                    .unwrap(),
            );
            crate::run(&ctx, &d.iter().collect::<Vec<_>>());
            for (w, o) in kinds.iter().zip(&outs) {
                assert_eq!(
                    ctx.read::<f32>(o, 0, w.width() * shape.c).unwrap(),
                    sums_ref(*w, &shape, &x, &dy, &stats),
                    "{w:?} {shape:?}"
                );
            }
            let y = ctx.read::<f32>(&yb, 0, shape.len()).unwrap();
            assert_close(
                &y,
                &apply_ref(&shape, m, &x, None, &stats, &affine),
                1e-6,
                "forward",
            );
            let dx = ctx.read::<f32>(&dxb, 0, shape.len()).unwrap();
            assert_close(
                &dx,
                &apply_ref(&shape, m, &x, Some(&dy), &stats, &affine),
                1e-6,
                "backward",
            );
        }
    }

    #[test]
    fn short_buffers_and_empty_batches_are_errors() {
        let ctx = ctx();
        let k = BatchNorm::new(&ctx);
        let shape = Shape { n: 2, c: 3, s: 4 };
        let b = ctx.storage("b", 4096).unwrap();
        let small = ctx.storage("small", 8).unwrap();
        assert!(k.sums(&ctx, Sums::X, &shape, &small, &b, &b, &b).is_err());
        assert!(
            k.sums(&ctx, Sums::Backward, &shape, &b, &b, &b, &small)
                .is_err()
        );
        assert!(k.apply(&ctx, &shape, 0, &b, None, &b, &b, &b).is_err());
        assert!(k.apply(&ctx, &shape, 8, &b, None, &small, &b, &b).is_err());
    }
}
