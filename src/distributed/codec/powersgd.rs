//! PowerSGD: a rank-R approximation of each weight matrix's summed gradient, with error feedback
//! (docs/CODECS.md). [`PowerSgdCodec`] is its bucket codec.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{BucketCodec, CodecState, CompressError, check_len};
use crate::distributed::comm::Communicator;
use crate::model::Layout;
use crate::rng::Rng;

// ---------------------------------------------------------------------------------------------
// PowerSGD
// ---------------------------------------------------------------------------------------------

/// A column whose remainder after the projections is at most this fraction of its norm before them
/// (numerically inside the span of the earlier columns), or zero, or not finite, becomes zero
/// instead of being normalised.
pub const ORTHO_EPS: f64 = 1e-5;

/// Orthonormalise the columns of the `rows × cols` matrix `a`, stored column by column (column k
/// is `a[k·rows..(k+1)·rows]`), in place: modified Gram–Schmidt, column 0 first, each column
/// projected twice against the earlier ones ("twice is enough"), in f64. The ε guard
/// ([`ORTHO_EPS`]) turns a numerically dependent column into zeros (PyTorch's hook adds ε = 1e-8
/// to the norm instead). Returns the number of non-zero columns; when it is `cols`, `aᵀa ≈ I` to
/// f32 rounding.
///
/// # Panics
/// When `a.len() != rows * cols`.
pub fn orthonormalize(a: &mut [f32], rows: usize, cols: usize) -> usize {
    assert_eq!(a.len(), rows * cols, "orthonormalize: shape");
    let mut c: Vec<f64> = a.iter().map(|v| f64::from(*v)).collect();
    let mut kept = vec![false; cols];
    for k in 0..cols {
        let (done, rest) = c.split_at_mut(k * rows);
        let col = &mut rest[..rows];
        let before = norm(col);
        for _pass in 0..2 {
            for (j, prev) in done.chunks_exact(rows).enumerate() {
                if kept[j] {
                    let d: f64 = prev.iter().zip(col.iter()).map(|(p, x)| p * x).sum();
                    col.iter_mut().zip(prev).for_each(|(x, p)| *x -= d * p);
                }
            }
        }
        let after = norm(col);
        if before.is_finite() && before > 0.0 && after > ORTHO_EPS * before {
            col.iter_mut().for_each(|x| *x /= after);
            kept[k] = true;
        } else {
            col.fill(0.0);
        }
    }
    a.iter_mut().zip(&c).for_each(|(a, c)| *a = *c as f32);
    kept.iter().filter(|k| **k).count()
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Σ aᵢ·bᵢ in f64, in a fixed order: eight running lanes (element i into lane i mod 8, the tail
/// apart), then the lanes pairwise. The order is the code's, not the machine's: the same inputs
/// give the same bits everywhere (Rust never fuses the multiply-adds).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += f64::from(x[k]) * f64::from(y[k]);
        }
    }
    let l = lanes;
    (((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))) + tail
}

/// acc += k·x, element by element.
fn axpy(acc: &mut [f64], k: f64, x: &[f32]) {
    acc.iter_mut()
        .zip(x)
        .for_each(|(a, x)| *a += k * f64::from(*x));
}

/// The weight matrices of a model's flat layout, as [`PowerSgd::new`] takes them: (offset, rows,
/// columns) of every 2-D tensor (`layers.{i}.weight`, [out, in] row-major).
pub fn weight_matrices(layout: &Layout) -> Vec<(usize, usize, usize)> {
    layout
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| (t.offset, t.shape[0], t.shape[1]))
        .collect()
}

/// What the caller does with the buffer [`PowerSgd::begin`] filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Warm-up: the buffer is the gradient itself. Allreduce-sum it; the sum is the summed
    /// gradient. No further call this step.
    Plain,
    /// The buffer is the P phase. Allreduce-sum it, call [`PowerSgd::project`], allreduce-sum the
    /// Q buffer, call [`PowerSgd::finish`].
    LowRank,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    AwaitP,
    AwaitQ,
}

/// One compressed matrix and where its pieces live.
#[derive(Clone, Debug, PartialEq)]
struct Mat {
    /// Offset in the gradient; rows, columns; the rank used (min(R, m, n)).
    offset: usize,
    m: usize,
    n: usize,
    r: usize,
    /// Offsets in the P buffer, the Q buffer and the residual.
    p_off: usize,
    q_off: usize,
    e_off: usize,
}

/// The state a checkpoint keeps. `q` is the same on every rank; `residual` is per rank (see
/// [`PowerSgd`] for a change of world size).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PowerSgdState {
    /// Steps begun (warm-up steps included).
    pub step: u64,
    /// Per compressed matrix, in offset order: the warm-start Q (n × r, orthonormal columns),
    /// stored column by column (column c at `[c·n..(c+1)·n]`).
    pub q: Vec<Vec<f32>>,
    /// The error-feedback residuals of the compressed matrices, concatenated in offset order.
    pub residual: Vec<f32>,
}

/// Rank-R PowerSGD with error feedback (Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank
/// Gradient Compression for Distributed Optimization", NeurIPS 2019), following its Algorithm 1
/// (compression and aggregation) inside Algorithm 2 (error feedback), and the authors' reference
/// code (`epfml/powersgd`, `RankKReducer.reduce`), for every matrix M (m × n) being compressed:
///
/// ```text
/// M' = M + E                      error feedback (Algorithm 2)
/// P  = M' Q                       Q: n × r, warm start from the previous step (Algorithm 1)
/// P  = Σ_ranks P                  allreduce #1
/// P̂  = orthonormalise(P)          Gram–Schmidt
/// Q  = M'ᵀ P̂
/// Q  = Σ_ranks Q                  allreduce #2
/// A  = P̂ Qᵀ                       decompress: the approximation of Σ_ranks M'
/// E  = M' − A / W                 the local M' minus the decompressed *average* (W ranks)
/// ```
///
/// **Sums, not means, travel**, because the trainer sums per-sample gradients over the ranks and
/// divides by the global sample count later: `A` approximates the SUM of the ranks' M', and the
/// output is `A`. The paper's all-reduces are means (they divide by W); a mean P only rescales P,
/// which the orthonormalisation undoes, and a summed Q is W × the paper's, so `A` is W × the
/// paper's mean approximation. The residual is the reference code's exactly: the local M' minus
/// the decompressed mean, `M' − A/W` (reference code: `mem = tensor − out`, `out` the mean). Over
/// the ranks, `Σ E = Σ M' − A`: what the sum lost in this step, sent in later ones.
///
/// A consequence of the paper's choice, kept here: each rank's residual also holds its deviation
/// from the ranks' mean, `M'_w − mean(M')`, which the next step carries forward, so a rank's
/// residual takes a random walk in the ranks' differences (Σₜ (g_w − ḡ), growing like √T) even at
/// full rank, while the sum over ranks, the only thing the aggregate depends on (P and Q are
/// sums), stays what compression lost. The alternative `E = M' − P̂P̂ᵀM'` (the local M' minus its
/// own projection) has the same sum and therefore the same aggregate in exact arithmetic; the two
/// differ only in rounding.
///
/// Biases, and matrices with min(m, n) ≤ R (where rank R saves nothing), travel uncompressed in
/// the P buffer. During the first `warmup_steps` steps everything travels uncompressed
/// ([`Round::Plain`]), as the authors' later package (`start_compressing_after_num_steps`) and
/// PyTorch's hook (`start_powerSGD_iter`) do.
///
/// Departures from the reference code. One changes nothing in exact arithmetic: the warm-start Q
/// is kept orthonormalised (Gram–Schmidt of X·R, R upper-triangular with a positive diagonal,
/// gives the same P̂ as of X), which keeps P's scale that of the gradient (with the summed Q, P
/// scales like W·|M'|², which leaves f32's range for gradients below about 1e-19 or above 1e19).
/// Two are for robustness: a column of Q that became zero (a rank-deficient P, e.g. a layer whose
/// gradient is zero) is drawn again from the seeded stream, where the reference code would keep a
/// zero column forever; and when a matrix's summed P or Q is not finite (some rank's gradient
/// was), its output is NaN on every rank (for the trainer's NaN handling), its Q is drawn again
/// and its residual cleared.
///
/// The two-phase API, per step, around exactly two allreduce-sums of flat f32 buffers:
///
/// ```text
/// match ps.begin(&grad, &mut pbuf) {                 // pbuf: [P of each matrix | uncompressed]
///     Round::Plain => { allreduce_sum(&mut pbuf); grad_sum.copy_from_slice(&pbuf[..len]) }
///     Round::LowRank => {
///         allreduce_sum(&mut pbuf);                   // may carry extra words after p_len()
///         ps.project(&pbuf, &mut qbuf);              // qbuf: [Q of each matrix]
///         allreduce_sum(&mut qbuf);
///         ps.finish(&qbuf, ranks, &mut grad_sum);    // the approximated SUM over ranks
///     }
/// }
/// ```
///
/// Every rank must see the same summed buffers (MPI's allreduce gives every rank the same
/// result); then P̂, Q, the output and the warm start are identical on all ranks. Checkpoints:
/// [`PowerSgd::state`] between steps; Q is common, the residual per rank. On a resume with another
/// world size, the sum of the ranks' residuals given to the new rank 0 (the others zero) keeps
/// `Σ E`, which is all the aggregate depends on.
#[derive(Clone, Debug)]
pub struct PowerSgd {
    rank: usize,
    len: usize,
    matrices: Vec<Mat>,
    uncompressed: Vec<Range<usize>>,
    p_len: usize,
    q_len: usize,
    /// Warm-start Q per matrix (n × r, orthonormal columns, column by column).
    q: Vec<Vec<f32>>,
    /// The residual E per matrix, concatenated; between `begin` and `finish` it holds M'.
    residual: Vec<f32>,
    /// P̂ of the current step, concatenated as in the P buffer.
    p_hat: Vec<f32>,
    /// The summed uncompressed values of the current step.
    plain_sum: Vec<f32>,
    /// Per matrix: the current step's summed P was not finite.
    broken: Vec<bool>,
    scratch: Vec<f64>,
    warmup_steps: u64,
    step: u64,
    seed: u64,
    /// The number of the first matrix in the seeded draws (0 unless part of a larger gradient).
    first: usize,
    stage: Stage,
}

/// Stream of the seeded Q draws: matrix `k`, at `step`, column `c` (0 draws the whole matrix).
fn q_stream(k: usize, step: u64, c: usize) -> u64 {
    0x9057_5600_0000_0000 ^ ((k as u64) << 40) ^ (step << 8) ^ c as u64
}

impl PowerSgd {
    /// PowerSGD of rank `rank` for a flat gradient of `len` values whose weight matrices are
    /// `layers` (offset, m, n), as [`weight_matrices`] gives them. Matrices with min(m, n) >
    /// `rank` are compressed; the rest of the buffer (biases, small matrices) is not. `seed`
    /// draws the initial Q (the same on every rank).
    pub fn new(
        rank: usize,
        layers: &[(usize, usize, usize)],
        len: usize,
        warmup_steps: u64,
        seed: u64,
    ) -> Result<Self, CompressError> {
        Self::numbered(rank, layers, len, warmup_steps, seed, 0)
    }

    /// As [`PowerSgd::new`], for a part of a larger gradient (a bucket): its compressed
    /// matrices are numbered from `first` in the seeded Q draws (their number over the whole
    /// gradient), so that the draws are those of the whole.
    pub fn numbered(
        rank: usize,
        layers: &[(usize, usize, usize)],
        len: usize,
        warmup_steps: u64,
        seed: u64,
        first: usize,
    ) -> Result<Self, CompressError> {
        validate(layers, len)?;
        let big: Vec<_> = layers
            .iter()
            .copied()
            .filter(|&(_, m, n)| m.min(n) > rank)
            .collect();
        let mut p = Self::with_matrices(rank, &big, len, warmup_steps, seed)?;
        if first > 0 {
            p.first = first;
            for (k, (q, mat)) in p.q.iter_mut().zip(&p.matrices).enumerate() {
                let mut rng = Rng::derive(seed, q_stream(first + k, 0, 0));
                q.iter_mut().for_each(|v| *v = rng.normal() as f32);
                orthonormalize(q, mat.n, mat.r);
            }
        }
        Ok(p)
    }

    /// How many matrices [`PowerSgd::new`] compresses at `rank` among `layers`.
    pub fn count_compressed(rank: usize, layers: &[(usize, usize, usize)]) -> usize {
        layers.iter().filter(|&&(_, m, n)| m.min(n) > rank).count()
    }

    /// As [`PowerSgd::new`], but every matrix listed is compressed, at rank min(`rank`, m, n).
    pub fn with_matrices(
        rank: usize,
        matrices: &[(usize, usize, usize)],
        len: usize,
        warmup_steps: u64,
        seed: u64,
    ) -> Result<Self, CompressError> {
        if rank == 0 {
            return Err(CompressError::ZeroRank);
        }
        let sorted = validate(matrices, len)?;
        let (mut p_off, mut q_off, mut e_off, mut at) = (0, 0, 0, 0);
        let mut mats = Vec::new();
        let mut uncompressed = Vec::new();
        for &(offset, m, n) in &sorted {
            let r = rank.min(m).min(n);
            mats.push(Mat {
                offset,
                m,
                n,
                r,
                p_off,
                q_off,
                e_off,
            });
            p_off += m * r;
            q_off += n * r;
            e_off += m * n;
            if offset > at {
                uncompressed.push(at..offset);
            }
            at = offset + m * n;
        }
        if at < len {
            uncompressed.push(at..len);
        }
        let plain: usize = uncompressed.iter().map(|r| r.len()).sum();
        let q = mats
            .iter()
            .enumerate()
            .map(|(k, mat)| {
                let mut rng = Rng::derive(seed, q_stream(k, 0, 0));
                let mut q: Vec<f32> = (0..mat.n * mat.r).map(|_| rng.normal() as f32).collect();
                orthonormalize(&mut q, mat.n, mat.r);
                q
            })
            .collect();
        let max_nr = mats.iter().map(|m| m.n * m.r).max().unwrap_or(0);
        Ok(Self {
            rank,
            len,
            uncompressed,
            p_len: p_off + plain,
            q_len: q_off,
            q,
            residual: vec![0.0; e_off],
            p_hat: vec![0.0; p_off],
            plain_sum: vec![0.0; plain],
            broken: vec![false; mats.len()],
            scratch: vec![0.0; max_nr],
            matrices: mats,
            warmup_steps,
            step: 0,
            seed,
            first: 0,
            stage: Stage::Idle,
        })
    }

    /// The rank R asked for.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Gradient length.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The compressed matrices (offset, m, n), in offset order.
    pub fn compressed(&self) -> Vec<(usize, usize, usize)> {
        self.matrices.iter().map(|m| (m.offset, m.m, m.n)).collect()
    }

    /// The ranges of the gradient that travel uncompressed, in order.
    pub fn uncompressed(&self) -> &[Range<usize>] {
        &self.uncompressed
    }

    /// Length of the P-phase buffer: the P of each compressed matrix (m × r, stored column by
    /// column, in offset order), then the uncompressed values in gradient order.
    #[cfg(test)]
    pub fn p_len(&self) -> usize {
        self.p_len
    }

    /// Length of the Q-phase buffer: the Q of each compressed matrix (n × r, column by column).
    #[cfg(test)]
    pub fn q_len(&self) -> usize {
        self.q_len
    }

    /// Steps begun so far (warm-up included).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether the next [`PowerSgd::begin`] compresses ([`Round::LowRank`]).
    pub fn compressing(&self) -> bool {
        self.step >= self.warmup_steps
    }

    /// Bytes per step once compressing, and the bytes of the uncompressed gradient, both in f32:
    /// (4 × (p_len + q_len), 4 × len).
    pub fn bytes_per_step(&self) -> (usize, usize) {
        (4 * (self.p_len + self.q_len), 4 * self.len)
    }

    /// Start a step with this rank's gradient: fill `send` (resized) with the buffer to
    /// allreduce-sum. In warm-up that is the gradient itself ([`Round::Plain`]); afterwards it is
    /// the P phase ([`Round::LowRank`], `p_len()` values; the caller may append words of its own).
    ///
    /// # Panics
    /// When `grad` has the wrong length, or a previous step was not finished.
    pub fn begin(&mut self, grad: &[f32], send: &mut Vec<f32>) -> Round {
        assert_eq!(grad.len(), self.len, "PowerSGD: gradient length");
        assert_eq!(self.stage, Stage::Idle, "PowerSGD: begin before finish");
        send.clear();
        if !self.compressing() {
            self.step += 1;
            send.extend_from_slice(grad);
            return Round::Plain;
        }
        self.step += 1;
        send.resize(self.p_len, 0.0);
        for (k, mat) in self.matrices.iter().enumerate() {
            let (m, n, r) = (mat.m, mat.n, mat.r);
            let e = &mut self.residual[mat.e_off..mat.e_off + m * n];
            let g = &grad[mat.offset..mat.offset + m * n];
            // M' = M + E, kept in the residual's place until finish
            e.iter_mut().zip(g).for_each(|(e, g)| *e += g);
            // P = M' Q: P[i, c] = (row i of M') · (column c of Q)
            let q = &self.q[k];
            let p = &mut send[mat.p_off..mat.p_off + m * r];
            for (i, row) in e.chunks_exact(n).enumerate() {
                for (c, qc) in q.chunks_exact(n).enumerate() {
                    p[c * m + i] = dot(row, qc) as f32;
                }
            }
        }
        let mut at = self.p_hat.len();
        for range in &self.uncompressed {
            send[at..at + range.len()].copy_from_slice(&grad[range.clone()]);
            at += range.len();
        }
        self.stage = Stage::AwaitP;
        Round::LowRank
    }

    /// After the first allreduce: `p_sum` is the summed P-phase buffer (its first `p_len()`
    /// values are used). Orthonormalise each P and fill `send` (resized to `q_len()`) with this
    /// rank's Q = M'ᵀ P̂, the buffer of the second allreduce-sum.
    ///
    /// # Panics
    /// Out of order, or when `p_sum` is shorter than `p_len()`.
    pub fn project(&mut self, p_sum: &[f32], send: &mut Vec<f32>) {
        assert_eq!(self.stage, Stage::AwaitP, "PowerSGD: project out of order");
        assert!(p_sum.len() >= self.p_len, "PowerSGD: P buffer length");
        let compressed = self.p_hat.len();
        self.p_hat.copy_from_slice(&p_sum[..compressed]);
        self.plain_sum
            .copy_from_slice(&p_sum[compressed..self.p_len]);
        send.clear();
        send.resize(self.q_len, 0.0);
        for (mat, broken) in self.matrices.iter().zip(&mut self.broken) {
            let (m, n, r) = (mat.m, mat.n, mat.r);
            let p = &mut self.p_hat[mat.p_off..mat.p_off + m * r];
            // a non-finite M' on any rank makes the summed P non-finite on every rank
            *broken = !p.iter().all(|v| v.is_finite());
            orthonormalize(p, m, r);
            // Q = M'ᵀ P̂: column c of Q = Σ_i P̂[i, c] · (row i of M'), rows in order, in f64
            let acc = &mut self.scratch[..n * r];
            acc.fill(0.0);
            let e = &self.residual[mat.e_off..mat.e_off + m * n];
            for (i, row) in e.chunks_exact(n).enumerate() {
                for (c, qc) in acc.chunks_exact_mut(n).enumerate() {
                    let pic = f64::from(p[c * m + i]);
                    if pic != 0.0 {
                        axpy(qc, pic, row);
                    }
                }
            }
            for (s, a) in send[mat.q_off..mat.q_off + n * r]
                .iter_mut()
                .zip(acc.iter())
            {
                *s = *a as f32;
            }
        }
        self.stage = Stage::AwaitQ;
    }

    /// After the second allreduce: `q_sum` is the summed Q buffer (first `q_len()` values used),
    /// `ranks` the world size W. Writes the approximated SUM over ranks of the gradient (plus the
    /// residuals) into `out` (`len()` values: A = P̂ Qᵀ for the compressed matrices, the exact sums
    /// elsewhere), keeps E = M' − A/W, and Q (orthonormalised) as the next warm start.
    ///
    /// # Panics
    /// Out of order, `ranks` = 0, or wrong lengths.
    pub fn finish(&mut self, q_sum: &[f32], ranks: usize, out: &mut [f32]) {
        assert_eq!(self.stage, Stage::AwaitQ, "PowerSGD: finish out of order");
        assert!(q_sum.len() >= self.q_len, "PowerSGD: Q buffer length");
        assert_eq!(out.len(), self.len, "PowerSGD: output length");
        assert!(ranks > 0, "PowerSGD: no ranks");
        let w = ranks as f64;
        for (k, mat) in self.matrices.iter().enumerate() {
            let (m, n, r) = (mat.m, mat.n, mat.r);
            let p = &self.p_hat[mat.p_off..mat.p_off + m * r];
            let qs = &q_sum[mat.q_off..mat.q_off + n * r];
            let e = &mut self.residual[mat.e_off..mat.e_off + m * n];
            let o = &mut out[mat.offset..mat.offset + m * n];
            let finite = !self.broken[k] && qs.iter().all(|v| v.is_finite());
            // A = P̂ Qᵀ: row i of A = Σ_c P̂[i, c] · (column c of Q), c in order, in f64
            let row = &mut self.scratch[..n];
            for (i, (oi, ei)) in o.chunks_exact_mut(n).zip(e.chunks_exact_mut(n)).enumerate() {
                row.fill(0.0);
                for (c, qc) in qs.chunks_exact(n).enumerate() {
                    axpy(row, f64::from(p[c * m + i]), qc);
                }
                for ((o, e), a) in oi.iter_mut().zip(ei.iter_mut()).zip(row.iter()) {
                    *o = *a as f32;
                    *e = (f64::from(*e) - a / w) as f32;
                }
            }
            let q = &mut self.q[k];
            if finite {
                q.copy_from_slice(qs);
                refresh_q(q, n, r, self.seed, self.first + k, self.step);
            } else {
                o.fill(f32::NAN);
                e.fill(0.0);
                let mut rng = Rng::derive(self.seed, q_stream(self.first + k, self.step, 0));
                q.iter_mut().for_each(|v| *v = rng.normal() as f32);
                orthonormalize(q, n, r);
            }
        }
        let mut at = 0;
        for range in &self.uncompressed {
            out[range.clone()].copy_from_slice(&self.plain_sum[at..at + range.len()]);
            at += range.len();
        }
        self.stage = Stage::Idle;
    }

    /// The state for a checkpoint (call between steps).
    pub fn state(&self) -> PowerSgdState {
        PowerSgdState {
            step: self.step,
            q: self.q.clone(),
            residual: self.residual.clone(),
        }
    }

    /// Restore a state saved by [`PowerSgd::state`] from an instance built with the same layers
    /// and rank.
    pub fn set_state(&mut self, state: PowerSgdState) -> Result<(), CompressError> {
        check_len("PowerSGD Q matrices", self.q.len(), state.q.len())?;
        for (mine, theirs) in self.q.iter().zip(&state.q) {
            check_len("PowerSGD Q", mine.len(), theirs.len())?;
        }
        check_len(
            "PowerSGD residual",
            self.residual.len(),
            state.residual.len(),
        )?;
        self.step = state.step;
        self.q = state.q;
        self.residual = state.residual;
        self.stage = Stage::Idle;
        Ok(())
    }
}

/// Orthonormalise the warm-start Q; a column that comes out zero is drawn again from the seeded
/// stream (the same on every rank), once.
fn refresh_q(q: &mut [f32], n: usize, r: usize, seed: u64, k: usize, step: u64) {
    if orthonormalize(q, n, r) == r {
        return;
    }
    for (c, col) in q.chunks_exact_mut(n).enumerate() {
        if col.iter().all(|v| *v == 0.0) {
            let mut rng = Rng::derive(seed, q_stream(k, step, c + 1));
            col.iter_mut().for_each(|v| *v = rng.normal() as f32);
        }
    }
    orthonormalize(q, n, r);
}

/// Check that the matrices lie inside the gradient and do not overlap; return them by offset.
fn validate(
    matrices: &[(usize, usize, usize)],
    len: usize,
) -> Result<Vec<(usize, usize, usize)>, CompressError> {
    let mut sorted = matrices.to_vec();
    sorted.sort_unstable();
    let mut at = 0;
    for &(offset, m, n) in &sorted {
        let bad = |problem| CompressError::Matrix {
            offset,
            m,
            n,
            problem,
        };
        if m == 0 || n == 0 {
            return Err(bad("is empty"));
        }
        let end = m
            .checked_mul(n)
            .and_then(|s| s.checked_add(offset))
            .ok_or(bad("is too large"))?;
        if end > len {
            return Err(bad("ends past the gradient"));
        }
        if offset < at {
            return Err(bad("overlaps the previous one"));
        }
        at = end;
    }
    Ok(sorted)
}

/// PowerSGD for `grads.len()` simulated ranks, in memory: each phase buffer is summed over the
/// ranks in rank order in f32, as a deterministic allreduce would. Returns what each rank's
/// output holds. `states` must be built alike (same layers, rank, seed).
pub fn simulate_powersgd(grads: &[Vec<f32>], states: &mut [PowerSgd]) -> Vec<Vec<f32>> {
    assert!(
        !grads.is_empty() && grads.len() == states.len(),
        "simulate_powersgd: ranks"
    );
    let ranks = grads.len();
    let sum = |bufs: &[Vec<f32>]| {
        let mut s = bufs[0].clone();
        for b in &bufs[1..] {
            s.iter_mut().zip(b).for_each(|(s, b)| *s += b);
        }
        s
    };
    let mut rounds = Vec::new();
    let sends: Vec<Vec<f32>> = grads
        .iter()
        .zip(states.iter_mut())
        .map(|(g, s)| {
            let mut b = Vec::new();
            rounds.push(s.begin(g, &mut b));
            b
        })
        .collect();
    let p_sum = sum(&sends);
    if rounds[0] == Round::Plain {
        return vec![p_sum; ranks];
    }
    let q_sends: Vec<Vec<f32>> = states
        .iter_mut()
        .map(|s| {
            let mut b = Vec::new();
            s.project(&p_sum, &mut b);
            b
        })
        .collect();
    let q_sum = sum(&q_sends);
    states
        .iter_mut()
        .map(|s| {
            let mut out = vec![0.0; s.len()];
            s.finish(&q_sum, ranks, &mut out);
            out
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The bucket codec
// ---------------------------------------------------------------------------------------------

/// PowerSGD as a bucket codec: the weight matrices inside the bucket are compressed, the rest
/// travels in the P buffer uncompressed, with the words after the gradient (the totals) appended.
/// Warm-up steps are plain sums ([`Round::Plain`]).
pub struct PowerSgdCodec {
    p: PowerSgd,
    round: Round,
    send: Vec<f32>,
    q: Vec<f32>,
}

impl PowerSgdCodec {
    pub fn new(p: PowerSgd) -> Self {
        Self {
            p,
            round: Round::Plain,
            send: Vec::new(),
            q: Vec::new(),
        }
    }
}

impl BucketCodec for PowerSgdCodec {
    fn name(&self) -> &'static str {
        "powersgd"
    }
    fn collectives(&self) -> u32 {
        2
    }
    fn encode(&mut self, buf: &[f32], grad_len: usize) {
        let _g = crate::observe::trace::span("encode", "exchange");
        self.round = self.p.begin(&buf[..grad_len], &mut self.send);
        self.send.extend_from_slice(&buf[grad_len..]);
    }
    fn reduce(
        &mut self,
        comm: &dyn Communicator,
        buf: &mut [f32],
        grad_len: usize,
    ) -> anyhow::Result<usize> {
        let send = &mut self.send;
        comm.allreduce_sum_f32(send)?;
        let (grad, words) = buf.split_at_mut(grad_len);
        let k = send.len() - words.len();
        words.copy_from_slice(&send[k..]);
        send.truncate(k);
        Ok(match self.round {
            Round::Plain => {
                grad.copy_from_slice(send);
                4 * (k + words.len())
            }
            Round::LowRank => {
                self.p.project(send, &mut self.q);
                comm.allreduce_sum_f32(&mut self.q)?;
                self.p.finish(&self.q, comm.size(), grad);
                4 * (k + words.len() + self.q.len())
            }
        })
    }
    fn state(&self) -> CodecState {
        CodecState::PowerSgd(self.p.state())
    }
    fn set_state(&mut self, state: CodecState) -> Result<(), CompressError> {
        match state {
            CodecState::PowerSgd(s) => self.p.set_state(s),
            _ => Err(CompressError::State(self.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{bits, exact_sum, randn, rank_order_sum, rel_l2};
    use super::*;
    use crate::model::{Activation, ModelKind, ModelSpec};

    // ----- PowerSGD

    /// `aᵀa ≈ I` for `a` stored column by column.
    fn gram_is_identity(a: &[f32], rows: usize, cols: usize, tol: f64) {
        for x in 0..cols {
            for y in 0..cols {
                let d: f64 = (0..rows)
                    .map(|i| f64::from(a[x * rows + i]) * f64::from(a[y * rows + i]))
                    .sum();
                let want = if x == y { 1.0 } else { 0.0 };
                assert!((d - want).abs() < tol, "PᵀP[{x}][{y}] = {d}");
            }
        }
    }

    #[test]
    fn orthonormalize_gives_orthonormal_columns() {
        let mut rng = Rng::new(31);
        for (rows, cols) in [(50, 4), (7, 7), (1000, 1), (300, 16)] {
            let mut a = randn(&mut rng, rows * cols, 1e-3);
            // nearly parallel columns are the hard case
            if cols > 1 {
                for i in 0..rows {
                    a[rows + i] = a[i] * (1.0 + 1e-3) + a[rows + i] * 1e-2;
                }
            }
            assert_eq!(orthonormalize(&mut a, rows, cols), cols);
            gram_is_identity(&a, rows, cols, 1e-6);
        }
    }

    #[test]
    fn orthonormalize_zeroes_dependent_and_empty_columns() {
        let mut rng = Rng::new(32);
        let (rows, cols) = (20, 4);
        let mut a = randn(&mut rng, rows * cols, 1.0);
        for i in 0..rows {
            a[2 * rows + i] = a[i] - 2.0 * a[rows + i];
            a[3 * rows + i] = 0.0;
        }
        assert_eq!(orthonormalize(&mut a, rows, cols), 2);
        assert!(a[2 * rows..].iter().all(|v| *v == 0.0));
        gram_is_identity(&a[..2 * rows], rows, 2, 1e-6);
        let mut nan = vec![f32::NAN; 6];
        assert_eq!(orthonormalize(&mut nan, 3, 2), 0);
        assert!(nan.iter().all(|v| *v == 0.0));
    }

    /// Gradients of `ranks` ranks for a flat buffer of `len`, random everywhere.
    fn random_grads(rng: &mut Rng, ranks: usize, len: usize) -> Vec<Vec<f32>> {
        (0..ranks).map(|_| randn(rng, len, 1.0)).collect()
    }

    fn max_rel(out: &[f32], exact: &[f64]) -> f64 {
        let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        out.iter()
            .zip(exact)
            .fold(0f64, |m, (o, e)| m.max((f64::from(*o) - e).abs() / scale))
    }

    #[test]
    fn full_rank_powersgd_gives_the_exact_sum() {
        let mut rng = Rng::new(41);
        for (m, n) in [(8, 5), (5, 8), (6, 6)] {
            let r = m.min(n);
            let len = m * n + 3;
            let mut ps: Vec<PowerSgd> = (0..3)
                .map(|_| PowerSgd::with_matrices(r, &[(0, m, n)], len, 0, 9).unwrap())
                .collect();
            for step in 0..3 {
                let grads = random_grads(&mut rng, 3, len);
                let out = simulate_powersgd(&grads, &mut ps);
                let err = max_rel(&out[0], &exact_sum(&grads));
                assert!(err < 1e-4, "{m}×{n} step {step}: {err:e}");
                // nothing is lost over the ranks: Σ E = Σ M' − A = 0 (each rank's E is its M'
                // minus the mean, as in the paper's code)
                let e: Vec<Vec<f32>> = ps.iter().map(|p| p.state().residual).collect();
                let lost = rank_order_sum(&e);
                assert!(lost.iter().all(|v| v.abs() < 1e-4), "{lost:?}");
                assert!(e[0].iter().any(|v| v.abs() > 0.1));
            }
        }
    }

    /// Layers of an MLP-like flat buffer: (offset, m, n) weights with a bias of m after each.
    fn mlp_layers(widths: &[usize]) -> (Vec<(usize, usize, usize)>, usize) {
        let mut at = 0;
        let mut layers = Vec::new();
        for w in widths.windows(2) {
            let (n, m) = (w[0], w[1]);
            layers.push((at, m, n));
            at += m * n + m;
        }
        (layers, at)
    }

    #[test]
    fn a_rank_r_sum_is_recovered_exactly_and_biases_pass_unchanged() {
        let mut rng = Rng::new(42);
        let r = 2;
        let (layers, len) = mlp_layers(&[13, 11, 9, 2]);
        let ranks = 3;
        let mut ps: Vec<PowerSgd> = (0..ranks)
            .map(|_| PowerSgd::new(r, &layers, len, 0, 1).unwrap())
            .collect();
        // the 9×2 output layer is too small to compress
        assert_eq!(ps[0].compressed(), vec![layers[0], layers[1]]);
        for step in 0..3 {
            // rank w's weight gradient U Wᵥᵀ shares the column space U: the sum has rank r
            let mut grads = random_grads(&mut rng, ranks, len);
            for &(off, m, n) in &layers[..2] {
                let u = randn(&mut rng, m * r, 1.0);
                for g in &mut grads {
                    let v = randn(&mut rng, n * r, 1.0);
                    for i in 0..m {
                        for j in 0..n {
                            g[off + i * n + j] =
                                (0..r).map(|c| u[i * r + c] * v[j * r + c]).sum::<f32>();
                        }
                    }
                }
            }
            let out = simulate_powersgd(&grads, &mut ps);
            let err = max_rel(&out[0], &exact_sum(&grads));
            assert!(err < 1e-4, "step {step}: {err:e}");
            // uncompressed parts are the plain rank-order f32 sum, bit for bit
            let plain = rank_order_sum(&grads);
            for range in ps[0].uncompressed() {
                assert_eq!(bits(&out[0][range.clone()]), bits(&plain[range.clone()]));
            }
        }
    }

    #[test]
    fn every_rank_reconstructs_the_same_gradient() {
        let mut rng = Rng::new(43);
        let (layers, len) = mlp_layers(&[40, 30, 20, 10]);
        let ranks = 4;
        let mut ps: Vec<PowerSgd> = (0..ranks)
            .map(|_| PowerSgd::new(3, &layers, len, 2, 5).unwrap())
            .collect();
        for step in 0..8 {
            let grads = random_grads(&mut rng, ranks, len);
            let out = simulate_powersgd(&grads, &mut ps);
            for o in &out[1..] {
                assert_eq!(bits(o), bits(&out[0]), "step {step}");
            }
            for p in &ps[1..] {
                assert_eq!(
                    p.state().q,
                    ps[0].state().q,
                    "step {step}: warm starts agree"
                );
            }
            if step < 2 {
                assert_eq!(bits(&out[0]), bits(&rank_order_sum(&grads)), "warm-up");
            }
        }
        // the residuals sum to what the sum lost: Σ E = Σ M' − A, which stays modest
        let e: Vec<Vec<f32>> = ps.iter().map(|p| p.state().residual).collect();
        assert!(e.iter().flatten().all(|v| v.is_finite()));
    }

    #[test]
    fn error_feedback_makes_the_running_mean_converge_to_the_gradient() {
        // one fixed full-rank gradient, compressed at rank 1: each step sends a rank-1 piece,
        // the residual carries the rest, and the mean of what arrives converges to the gradient
        let mut rng = Rng::new(44);
        let (m, n) = (20, 15);
        for ranks in [1usize, 3] {
            let grads = random_grads(&mut rng, ranks, m * n);
            let exact = exact_sum(&grads);
            let mut ps: Vec<PowerSgd> = (0..ranks)
                .map(|_| PowerSgd::new(1, &[(0, m, n)], m * n, 0, 3).unwrap())
                .collect();
            let mut total = vec![0f64; m * n];
            let mut errs = Vec::new();
            for t in 1..=1000 {
                let out = simulate_powersgd(&grads, &mut ps);
                total
                    .iter_mut()
                    .zip(&out[0])
                    .for_each(|(s, o)| *s += f64::from(*o));
                if [10, 100, 1000].contains(&t) {
                    let mean: Vec<f32> = total.iter().map(|s| (s / t as f64) as f32).collect();
                    errs.push(rel_l2(&mean, &exact));
                }
            }
            println!(
                "{ranks} rank(s): relative error of the running mean at T = 10, 100, 1000: {:.2e} {:.2e} {:.2e}",
                errs[0], errs[1], errs[2]
            );
            assert!(
                errs[0] > errs[1] && errs[1] > errs[2],
                "{ranks} ranks: {errs:?}"
            );
            assert!(errs[2] < 0.02, "{ranks} ranks: {errs:?}");
            // the first step alone is a rank-1 approximation, far from the gradient
            assert!(errs[0] > 0.05, "{errs:?}");
        }
    }

    #[test]
    fn warmup_passes_the_gradient_through() {
        let (layers, len) = mlp_layers(&[10, 8, 3]);
        let mut p = PowerSgd::new(2, &layers, len, 2, 0).unwrap();
        let g: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut buf = Vec::new();
        for _ in 0..2 {
            assert!(!p.compressing());
            assert_eq!(p.begin(&g, &mut buf), Round::Plain);
            assert_eq!(buf, g);
        }
        assert!(p.compressing());
        assert_eq!(p.begin(&g, &mut buf), Round::LowRank);
        assert_eq!(buf.len(), p.p_len());
        assert_eq!(p.step(), 3);
    }

    #[test]
    fn state_round_trips_for_checkpoints() {
        let mut rng = Rng::new(45);
        let (layers, len) = mlp_layers(&[30, 20, 5]);
        let mk = || PowerSgd::new(2, &layers, len, 1, 8).unwrap();
        let mut a = vec![mk(), mk()];
        for _ in 0..4 {
            simulate_powersgd(&random_grads(&mut rng, 2, len), &mut a);
        }
        let saved: Vec<PowerSgdState> = a.iter().map(|p| p.state()).collect();
        // through JSON, as a checkpoint would store it
        let text = serde_json::to_string(&saved).unwrap();
        let back: Vec<PowerSgdState> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, saved);
        let mut b = vec![mk(), mk()];
        for (p, s) in b.iter_mut().zip(back) {
            p.set_state(s).unwrap();
        }
        let grads = random_grads(&mut rng, 2, len);
        let oa = simulate_powersgd(&grads, &mut a);
        let ob = simulate_powersgd(&grads, &mut b);
        assert_eq!(bits(&oa[0]), bits(&ob[0]));
        assert_eq!(a[1].state(), b[1].state());
        // a state of another shape is refused
        let other = PowerSgd::new(3, &layers, len, 1, 8).unwrap().state();
        assert!(b[0].set_state(other).is_err());
    }

    #[test]
    fn layout_selection_and_byte_counts() {
        // the MNIST MLP 784-256-10 at rank 4: both weights compressed, the biases not
        let spec = ModelSpec::new(ModelKind::Mlp, 784, 10, vec![256], Activation::Relu).unwrap();
        let layout = spec.layout();
        let mats = weight_matrices(&layout);
        assert_eq!(mats, vec![(0, 256, 784), (200_960, 10, 256)]);
        assert_eq!(layout.total, 203_530);
        let p = PowerSgd::new(4, &mats, layout.total, 0, 1).unwrap();
        assert_eq!(p.compressed(), mats);
        assert_eq!(p.uncompressed(), &[200_704..200_960, 203_520..203_530]);
        assert_eq!(p.p_len(), 256 * 4 + 10 * 4 + 256 + 10);
        assert_eq!(p.q_len(), 784 * 4 + 256 * 4);
        assert_eq!(p.bytes_per_step(), (4 * (1330 + 4160), 4 * 203_530));
        // at rank 10 the output layer (min 10) travels whole
        let p = PowerSgd::new(10, &mats, layout.total, 0, 1).unwrap();
        assert_eq!(p.compressed(), vec![mats[0]]);
        assert_eq!(p.uncompressed().len(), 1);
        assert_eq!(p.uncompressed()[0], 200_704..203_530);
        assert_eq!(p.rank(), 10);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let bad = |m: &[(usize, usize, usize)], len| PowerSgd::new(1, m, len, 0, 0).unwrap_err();
        let problem = |e| match e {
            CompressError::Matrix { problem, .. } => problem,
            other => panic!("{other}"),
        };
        assert!(problem(bad(&[(0, 4, 4), (10, 4, 4)], 100)).contains("overlaps"));
        assert!(problem(bad(&[(90, 4, 4)], 100)).contains("past"));
        assert_eq!(
            bad(&[(90, 4, 4)], 100).to_string(),
            "PowerSGD: the matrix at offset 90 (4×4) ends past the gradient"
        );
        assert!(matches!(
            bad(&[(0, 0, 4)], 100),
            CompressError::Matrix { .. }
        ));
        assert!(matches!(
            bad(&[(0, usize::MAX, 4)], 100),
            CompressError::Matrix { .. }
        ));
        assert_eq!(
            PowerSgd::new(0, &[], 10, 0, 0).unwrap_err(),
            CompressError::ZeroRank
        );
        // no matrices at all: everything travels in the P buffer
        let mut p = vec![PowerSgd::new(2, &[], 5, 0, 0).unwrap(); 2];
        let out = simulate_powersgd(&[vec![1.0; 5], vec![2.0; 5]], &mut p);
        assert_eq!(out[1], vec![3.0; 5]);
        assert_eq!(p[0].bytes_per_step(), (20, 20));
    }

    #[test]
    fn a_zero_or_non_finite_gradient_leaves_powersgd_usable() {
        let mut rng = Rng::new(46);
        let (m, n, r) = (12, 10, 2);
        let mut ps = vec![PowerSgd::new(r, &[(0, m, n)], m * n, 0, 4).unwrap()];
        // a zero gradient: P is zero, every column is dropped, Q is drawn again
        let out = simulate_powersgd(&[vec![0.0; m * n]], &mut ps);
        assert!(out[0].iter().all(|v| *v == 0.0));
        let q = &ps[0].state().q[0];
        gram_is_identity(q, n, r, 1e-6);
        // a NaN on one of two ranks: every rank's output is NaN, every state is reset alike
        let mut two = vec![ps[0].clone(), ps[0].clone()];
        let mut g = randn(&mut rng, m * n, 1.0);
        g[5] = f32::NAN;
        let out = simulate_powersgd(&[randn(&mut rng, m * n, 1.0), g], &mut two);
        assert!(out.iter().flatten().all(|v| v.is_nan()));
        for p in &two {
            let s = p.state();
            assert!(s.residual.iter().all(|e| *e == 0.0));
            gram_is_identity(&s.q[0], n, r, 1e-6);
            assert_eq!(s.q, two[0].state().q);
        }
        ps[0] = two.swap_remove(0);
        // afterwards a rank-r gradient comes through exactly again
        let u = randn(&mut rng, m * r, 1.0);
        let v = randn(&mut rng, n * r, 1.0);
        let g: Vec<f32> = (0..m * n)
            .map(|ij| (0..r).map(|c| u[ij / n * r + c] * v[ij % n * r + c]).sum())
            .collect();
        let out = simulate_powersgd(std::slice::from_ref(&g), &mut ps);
        let exact: Vec<f64> = g.iter().map(|v| f64::from(*v)).collect();
        assert!(max_rel(&out[0], &exact) < 1e-4);
    }

    #[test]
    #[should_panic(expected = "finish out of order")]
    fn out_of_order_calls_panic() {
        let mut p = PowerSgd::new(1, &[(0, 3, 3)], 9, 0, 0).unwrap();
        p.finish(&[0.0; 3], 1, &mut [0.0; 9]);
    }
}
