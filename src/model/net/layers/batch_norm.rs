//! `nn.BatchNorm2d` (eps 1e-5, momentum 0.1, affine, running statistics), through the kernels'
//! references (`dptrain_kernels::batch_norm`): per-channel sums in the kernels' tree order, the
//! mean and 1/std on the host in f64, then the elementwise apply.
//!
//! In training the batch's statistics normalise; with SyncBatchNorm the sums are added over all
//! ranks first ([`StatSum`]), forward (Σx, then Σ(x − mean)²) and backward (Σdy, Σdy·(x − mean)),
//! so N ranks with batch b compute what one rank with batch N·b computes. The running statistics
//! (PyTorch's update, with the unbiased variance) are buffers; evaluation normalises with them.

use dptrain_kernels::batch_norm::{self as bn, STATS, Sums};
use ndarray::{Array2, ArrayView2};
use num_traits::Float;

use super::{Declared, Init};
use crate::model::net::{Shape, StatSum};

pub const EPS: f64 = 1e-5;
pub const MOMENTUM: f64 = 0.1;

/// What a training forward keeps for backward and for the running statistics.
#[derive(Clone, Debug)]
pub struct Saved<T> {
    /// `STATS` values per channel, as the kernels lay them out: mean, 1/std, then the backward sums.
    pub stats: Vec<T>,
    /// Elements per channel that the statistics cover (over all ranks under SyncBatchNorm).
    pub m: usize,
    /// The batch mean and unbiased variance, for the running statistics.
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

pub fn tensors(c: usize) -> Vec<Declared> {
    vec![
        Declared::param("weight", vec![c], Init::Const(1.0)),
        Declared::param("bias", vec![c], Init::Const(0.0)),
        Declared::buffer("running_mean", vec![c], Init::Const(0.0)),
        Declared::buffer("running_var", vec![c], Init::Const(1.0)),
        Declared::buffer("num_batches_tracked", vec![], Init::Const(0.0)),
    ]
}

fn shape(n: usize, input: Shape) -> bn::Shape {
    bn::Shape {
        n,
        c: input.c,
        s: input.h * input.w,
    }
}

fn affine<T: Copy>(params: &[&[T]]) -> Vec<T> {
    [params[0], params[1]].concat()
}

fn slice<T>(x: &ArrayView2<T>) -> Vec<T>
where
    T: Copy,
{
    x.iter().copied().collect()
}

fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect()
}

fn of<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

/// Training forward: batch statistics (summed over ranks by `sync`), the normalised output.
pub fn forward_train<T: Float>(
    input: Shape,
    x: ArrayView2<T>,
    params: &[&[T]],
    sync: Option<&mut (dyn StatSum + '_)>,
) -> anyhow::Result<(Array2<T>, Saved<T>)> {
    let n = x.nrows();
    let sh = shape(n, input);
    let c = input.c;
    let xs = slice(&x);
    let mut stats = vec![T::zero(); STATS * c];
    let mut sums = to_f64(&bn::sums_ref(Sums::X, &sh, &xs, &[], &stats));
    sums.push(sh.m() as f64);
    let mut sync = sync;
    if let Some(s) = sync.as_deref_mut() {
        s.sum(&mut sums)?;
    }
    let m = sums[c] as usize;
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / m as f64).collect();
    for (ch, mu) in mean.iter().enumerate() {
        stats[STATS * ch] = of(*mu);
    }
    let mut sq = to_f64(&bn::sums_ref(Sums::SquaredDeviation, &sh, &xs, &[], &stats));
    if let Some(s) = sync {
        s.sum(&mut sq)?;
    }
    let mut var = Vec::with_capacity(c);
    for (ch, q) in sq.iter().enumerate() {
        stats[STATS * ch + 1] = of(1.0 / (q / m as f64 + EPS).sqrt());
        var.push(if m > 1 { q / (m - 1) as f64 } else { 0.0 });
    }
    let y = bn::apply_ref(&sh, m, &xs, None, &stats, &affine(params));
    Ok((
        Array2::from_shape_vec((n, input.len()), y).expect("the apply keeps the shape"),
        Saved {
            stats,
            m,
            mean,
            var,
        },
    ))
}

/// Evaluation forward: normalised by the running statistics (`params[2]`, `params[3]`).
pub fn forward_eval<T: Float>(input: Shape, x: ArrayView2<T>, params: &[&[T]]) -> Array2<T> {
    let n = x.nrows();
    let sh = shape(n, input);
    let mut stats = vec![T::zero(); STATS * input.c];
    for ch in 0..input.c {
        stats[STATS * ch] = params[2][ch];
        let var = params[3][ch].to_f64().unwrap_or(f64::NAN);
        stats[STATS * ch + 1] = of(1.0 / (var + EPS).sqrt());
    }
    let y = bn::apply_ref(&sh, sh.m(), &slice(&x), None, &stats, &affine(params));
    Array2::from_shape_vec((n, input.len()), y).expect("the apply keeps the shape")
}

/// Backward: γ and β's gradients (this rank's sums) into `grads[0..2]`; the input's gradient
/// from the sums over all ranks (`sync`).
pub fn backward<T: Float>(
    input: Shape,
    x: ArrayView2<T>,
    dy: ArrayView2<T>,
    params: &[&[T]],
    saved: &Saved<T>,
    grads: &mut [&mut [T]],
    sync: Option<&mut (dyn StatSum + '_)>,
) -> anyhow::Result<Array2<T>> {
    let n = x.nrows();
    let sh = shape(n, input);
    let c = input.c;
    let (xs, dys) = (slice(&x), slice(&dy));
    let local = bn::sums_ref(Sums::Backward, &sh, &xs, &dys, &saved.stats);
    for ch in 0..c {
        grads[0][ch] = local[2 * ch + 1] * saved.stats[STATS * ch + 1];
        grads[1][ch] = local[2 * ch];
    }
    let mut stats = saved.stats.clone();
    match sync {
        Some(s) => {
            let mut v = to_f64(&local);
            s.sum(&mut v)?;
            for ch in 0..c {
                stats[STATS * ch + 2] = of(v[2 * ch]);
                stats[STATS * ch + 3] = of(v[2 * ch + 1]);
            }
        }
        None => {
            for ch in 0..c {
                stats[STATS * ch + 2] = local[2 * ch];
                stats[STATS * ch + 3] = local[2 * ch + 1];
            }
        }
    }
    let dx = bn::apply_ref(&sh, saved.m, &xs, Some(&dys), &stats, &affine(params));
    Ok(Array2::from_shape_vec((n, input.len()), dx).expect("the apply keeps the shape"))
}

/// PyTorch's running update after a training forward: running = (1 − momentum)·running +
/// momentum·batch, and one more batch tracked. `buffers` are running_mean, running_var,
/// num_batches_tracked.
pub fn update_running<T: Float>(buffers: &mut [&mut [T]], saved: &Saved<T>) {
    if saved.m == 0 {
        return;
    }
    let m = MOMENTUM;
    for (ch, (mu, var)) in saved.mean.iter().zip(&saved.var).enumerate() {
        let rm = buffers[0][ch].to_f64().unwrap_or(f64::NAN);
        let rv = buffers[1][ch].to_f64().unwrap_or(f64::NAN);
        buffers[0][ch] = of(m * mu + (1.0 - m) * rm);
        buffers[1][ch] = of(m * var + (1.0 - m) * rv);
    }
    buffers[2][0] = buffers[2][0] + T::one();
}
