//! Gradient compression for the exchange: the host-side f32 mathematics only (no MPI here), shaped
//! so that `train/exchange.rs` can drive it around its collectives.
//!
//! Two schemes, both with error feedback so that what compression drops in one step is sent in a
//! later one instead of being lost:
//!
//! 1. **16-bit wire formats** ([`WireFormat`], [`ErrorFeedback`], [`ExchangeState`]): each rank
//!    rounds its gradient to bf16 or f16 with a per-rank residual (Seide et al. 2014, "1-bit SGD";
//!    Karimireddy et al. 2019, "Error Feedback Fixes SignSGD", EF-SGD). The ranks then exchange in
//!    a reduce-scatter / allgather layout:
//!    - [`segments`] cuts the gradient into one balanced, contiguous segment per rank; rank j
//!      *owns* segment j;
//!    - all-to-all: every rank sends its encoded segment j to rank j ([`ExchangeState::encode`],
//!      [`WireFormat::wire_range`]);
//!    - rank j decodes the N parts of its segment and sums them **in f32, in rank order** (rank 0
//!      first), never rounding a partial sum to 16 bits ([`sum_decoded`]);
//!    - the owner rounds its summed segment back to 16 bits with a **second residual of its own**
//!      on the owned segment, so that the rounding of the aggregate is compensated too, at the
//!      owner, in later steps ([`ExchangeState::reduce_owned`]);
//!    - the 16-bit sums are all-gathered and decoded ([`decode`]); every rank holds the same bits.
//!
//!    [`simulate_exchange`] runs the whole protocol for N ranks in memory.
//!
//! 2. **PowerSGD** ([`PowerSgd`]; Vogels, Karimireddy and Jaggi, NeurIPS 2019): a rank-R
//!    approximation of each weight matrix's summed gradient from one step of subspace iteration,
//!    warm-started from the previous step, with error feedback. Two allreduce-sums of flat f32
//!    buffers per step.
//!
//! Everything here is deterministic: single-threaded, fixed summation orders, no dependence on
//! thread count or machine (f16 rounding is IEEE-defined, so software and F16C conversions agree).
//!
//! ## Why partial sums are summed in f32, not in 16 bits
//!
//! The alternative is a ring reduction over a 16-bit datatype (what a ring allreduce of a bf16
//! buffer does): the inputs are rounded to bf16, and each hop adds its value in f32 and rounds the
//! partial sum to bf16 again before sending it on, N − 1 more roundings of growing values, and
//! none of them can be compensated by a per-rank residual, since they depend on other ranks' data.
//! Measured by the test `tests::bf16_hop_error_table` (`cargo test --lib
//! compress::tests::bf16_hop_error_table -- --nocapture`): the relative L2 error against the exact
//! (f64) sum of the true f32 gradients. One step: 65 536 iid N(0, 1) values per rank. Running sums
//! Σₜ of what the ranks hold against Σₜ of the exact sums: 8192 values per rank, each μ + 0.5 ξ
//! with μ ~ N(0, 1) fixed per element (gradients have a persistent part) and ξ fresh N(0, 1)
//! noise; the ring then gets local error feedback on its inputs, this scheme its local and owner
//! residuals. The last column is the RMS error per element of the running sum after 1000 steps, in the units
//! of the gradients.
//!
//! | N | ring, bf16 at each hop, 1 step | f32 sum, one rounding, 1 step | ring + local EF, T = 100 | this scheme, T = 100 | ring + local EF, T = 1000 | this scheme, T = 1000 | RMS error at T = 1000, ring / this scheme |
//! |---|---|---|---|---|---|---|---|
//! | 2 | 2.45e-3 | 2.45e-3 | 2.03e-4 | 2.23e-5 | 6.53e-5 | 2.17e-6 | 1.30e-1 / 4.31e-3 |
//! | 4 | 3.19e-3 | 2.39e-3 | 2.57e-4 | 1.92e-5 | 8.25e-5 | 1.95e-6 | 3.30e-1 / 7.81e-3 |
//! | 8 | 4.05e-3 | 2.35e-3 | 3.10e-4 | 1.82e-5 | 9.87e-5 | 1.81e-6 | 7.93e-1 / 1.45e-2 |
//!
//! In one step, with two ranks the ring's single hop rounding *is* the final rounding, so the two
//! agree; from four ranks on the hop roundings add up (+33 % at N = 4, +72 % at N = 8, growing with
//! N) while the f32 sum stays at its N + 1 roundings. Over many steps the difference is of kind,
//! not degree: the ring's hop roundings are never compensated, so the error of its running sum is
//! a random walk (√T; 0.13 to 0.79 per element at T = 1000 for N = 2 to 8), while this scheme's
//! stays bounded by N + 1 residuals (4e-3 to 1.5e-2 per element; its relative error falls 10×
//! from T = 100 to T = 1000, so the absolute error does not grow), 30 to 55 times smaller at
//! T = 1000.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::model::Layout;
use crate::rng::Rng;

/// A caller's buffer or state did not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    #[error("{what}: expected {expected} values, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("PowerSGD: the rank must be at least 1")]
    ZeroRank,
    #[error("PowerSGD: the matrix at offset {offset} ({m}×{n}) {problem}")]
    Matrix {
        offset: usize,
        m: usize,
        n: usize,
        problem: &'static str,
    },
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), CompressError> {
    if expected == got {
        Ok(())
    } else {
        Err(CompressError::Length {
            what,
            expected,
            got,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Wire formats
// ---------------------------------------------------------------------------------------------

/// How gradient values travel between ranks. The wire is a buffer of `u16` words: one per value
/// in bf16 and f16, two per value in f32 (the low half of the bits first), so that one code path
/// serves all three and f32 stays exact.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// 32-bit floats: exact, no compression.
    #[default]
    F32,
    /// bfloat16: f32's range, 8 significant bits; round to nearest, ties to even.
    Bf16,
    /// IEEE binary16: 11 significant bits, largest finite 65504 (larger values become ±inf, so
    /// scale gradient sums that may exceed it), subnormals down to 2⁻²⁴.
    F16,
}

impl WireFormat {
    /// `u16` words per value on the wire.
    pub const fn words(self) -> usize {
        match self {
            Self::F32 => 2,
            Self::Bf16 | Self::F16 => 1,
        }
    }

    /// Bytes per value on the wire.
    pub const fn bytes_per_value(self) -> usize {
        2 * self.words()
    }

    /// The words of the wire buffer that hold the values `elems`.
    pub fn wire_range(self, elems: &Range<usize>) -> Range<usize> {
        elems.start * self.words()..elems.end * self.words()
    }

    /// `x` after a trip through this format (the value the receivers decode).
    pub fn round_trip(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::Bf16 => bf16_value(bf16_bits(x)),
            Self::F16 => f16_value(f16_bits(x)),
        }
    }
}

/// f32 → bfloat16 bits: round to nearest, ties to even, on the top 16 bits; overflow becomes ±inf,
/// NaN stays NaN (quieted), the sign of zero is kept.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// bfloat16 bits → f32 (exact).
#[inline]
pub fn bf16_value(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

/// f32 → IEEE binary16 bits: round to nearest, ties to even, subnormals included; magnitudes of
/// 65520 and above become ±inf; NaN stays NaN.
#[inline]
pub fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// IEEE binary16 bits → f32 (exact).
#[inline]
pub fn f16_value(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// c = g + r (g itself where r is zero), sent rounded; the rounding error becomes the new residual.
#[inline(always)]
fn feedback_loop(
    g: &[f32],
    residual: &mut [f32],
    out: &mut [u16],
    enc: impl Fn(f32) -> u16,
    dec: impl Fn(u16) -> f32,
) {
    for ((g, r), w) in g.iter().zip(residual).zip(out.iter_mut()) {
        let c = if *r == 0.0 { *g } else { *g + *r };
        *w = enc(c);
        let d = dec(*w);
        // c − d is exact: d is c rounded to fewer significant bits
        *r = if d.is_finite() { c - d } else { 0.0 };
    }
}

#[cfg(test)]
type Encoder = fn(f32) -> u16;
#[cfg(test)]
type Decoder = fn(u16) -> f32;

/// Encode `x` into `out` (`x.len() * fmt.words()` words).
///
/// # Panics
/// When `out` has the wrong length.
pub fn encode(fmt: WireFormat, x: &[f32], out: &mut [u16]) {
    assert_eq!(out.len(), x.len() * fmt.words(), "encode: wire length");
    match fmt {
        WireFormat::F32 => {
            for (v, w) in x.iter().zip(out.chunks_exact_mut(2)) {
                let b = v.to_bits();
                w[0] = b as u16;
                w[1] = (b >> 16) as u16;
            }
        }
        WireFormat::Bf16 => x.iter().zip(out).for_each(|(v, w)| *w = bf16_bits(*v)),
        WireFormat::F16 => x.iter().zip(out).for_each(|(v, w)| *w = f16_bits(*v)),
    }
}

/// Decode `wire` (`out.len() * fmt.words()` words) into `out`, exactly.
///
/// # Panics
/// When `wire` has the wrong length.
pub fn decode(fmt: WireFormat, wire: &[u16], out: &mut [f32]) {
    assert_eq!(wire.len(), out.len() * fmt.words(), "decode: wire length");
    match fmt {
        WireFormat::F32 => {
            for (w, v) in wire.chunks_exact(2).zip(out) {
                *v = f32::from_bits(u32::from(w[0]) | (u32::from(w[1]) << 16));
            }
        }
        WireFormat::Bf16 => wire.iter().zip(out).for_each(|(w, v)| *v = bf16_value(*w)),
        WireFormat::F16 => wire.iter().zip(out).for_each(|(w, v)| *v = f16_value(*w)),
    }
}

/// Add the decoded `wire` to `acc`, element by element, in f32.
fn add_decoded(fmt: WireFormat, wire: &[u16], acc: &mut [f32]) {
    assert_eq!(wire.len(), acc.len() * fmt.words(), "sum: wire length");
    match fmt {
        WireFormat::F32 => {
            for (w, a) in wire.chunks_exact(2).zip(acc) {
                *a += f32::from_bits(u32::from(w[0]) | (u32::from(w[1]) << 16));
            }
        }
        WireFormat::Bf16 => wire.iter().zip(acc).for_each(|(w, a)| *a += bf16_value(*w)),
        WireFormat::F16 => wire.iter().zip(acc).for_each(|(w, a)| *a += f16_value(*w)),
    }
}

/// The deterministic reduction: `out = ((part₀ + part₁) + part₂) + …`, each part decoded exactly
/// and the sum kept in f32 (no partial sum is rounded to 16 bits), rank 0 first. Every rank that
/// sums the same parts gets the same bits. With [`WireFormat::F32`] this is the plain rank-order
/// f32 sum.
///
/// # Panics
/// When `parts` is empty or a part's length is not `out.len() * fmt.words()`.
pub fn sum_decoded(parts: &[&[u16]], fmt: WireFormat, out: &mut [f32]) {
    let (first, rest) = parts.split_first().expect("sum_decoded: no parts");
    decode(fmt, first, out);
    for p in rest {
        add_decoded(fmt, p, out);
    }
}

// ---------------------------------------------------------------------------------------------
// Error feedback
// ---------------------------------------------------------------------------------------------

/// Error feedback for a lossy encoding (Seide et al. 2014; Karimireddy et al. 2019,
/// EF-SGD): a residual `r` as long as the vector. To send `g`: `c = g + r`, send `q = encode(c)`,
/// keep `r = c − decode(q)`. Over T steps the decoded values sent sum to `Σ g + r₀ − r_T`: the
/// error of the running sum is one residual (at most half a 16-bit ulp of `c` per element), and
/// it does not grow with T.
///
/// A value that is not finite (NaN or ±inf in `c`, or an f16 overflow) travels as it is and its
/// residual is reset to 0: it cannot be compensated, and the trainer's non-finite handling sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// A zero residual for vectors of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            residual: vec![0.0; len],
        }
    }

    pub fn len(&self) -> usize {
        self.residual.len()
    }

    pub fn is_empty(&self) -> bool {
        self.residual.is_empty()
    }

    /// Encode `g` plus the residual into `out` (resized to `g.len() * fmt.words()`), and keep what
    /// the encoding dropped. With [`WireFormat::F32`] nothing is dropped: the residual becomes 0.
    ///
    /// # Panics
    /// When `g.len()` differs from the residual's.
    pub fn compress(&mut self, g: &[f32], fmt: WireFormat, out: &mut Vec<u16>) {
        assert_eq!(
            g.len(),
            self.residual.len(),
            "ErrorFeedback: gradient length"
        );
        out.clear();
        out.resize(g.len() * fmt.words(), 0);
        // c = g + r, except that a zero residual leaves g's bits alone (-0.0 + 0.0 would be +0.0),
        // so that the f32 path is bit-exact
        let with = |g: f32, r: f32| if r == 0.0 { g } else { g + r };
        match fmt {
            WireFormat::F32 => {
                for ((g, r), w) in g
                    .iter()
                    .zip(&mut self.residual)
                    .zip(out.chunks_exact_mut(2))
                {
                    let b = with(*g, *r).to_bits();
                    w[0] = b as u16;
                    w[1] = (b >> 16) as u16;
                    *r = 0.0;
                }
            }
            // one loop per format, so that the conversions inline (through a function pointer
            // the loop ran at 5.5 ns per value)
            WireFormat::Bf16 => feedback_loop(g, &mut self.residual, out, bf16_bits, bf16_value),
            WireFormat::F16 => feedback_loop(g, &mut self.residual, out, f16_bits, f16_value),
        }
    }

    /// The residual, for checkpoints.
    pub fn state(&self) -> &[f32] {
        &self.residual
    }

    /// Restore a residual saved by [`ErrorFeedback::state`].
    pub fn set_state(&mut self, residual: &[f32]) -> Result<(), CompressError> {
        check_len(
            "error-feedback residual",
            self.residual.len(),
            residual.len(),
        )?;
        self.residual.copy_from_slice(residual);
        Ok(())
    }

    /// Forget the residual (all zeros).
    pub fn reset(&mut self) {
        self.residual.fill(0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The reduce-scatter / allgather exchange
// ---------------------------------------------------------------------------------------------

/// `len` values cut into `ranks` contiguous segments, in order, whose lengths differ by at most
/// one (the first `len % ranks` are one longer). Rank j owns segment j. Segments are empty when
/// `len < ranks`.
///
/// # Panics
/// When `ranks` is 0.
pub fn segments(len: usize, ranks: usize) -> Vec<Range<usize>> {
    assert!(ranks > 0, "segments: no ranks");
    let (base, extra) = (len / ranks, len % ranks);
    let mut start = 0;
    (0..ranks)
        .map(|j| {
            let end = start + base + usize::from(j < extra);
            let r = start..end;
            start = end;
            r
        })
        .collect()
}

/// Bytes one rank sends per step in the 16-bit exchange: its N − 1 foreign segments in the
/// all-to-all plus its owned segment to N − 1 ranks in the allgather, about 2 (N − 1)/N × `len` ×
/// [`WireFormat::bytes_per_value`] (a ring allreduce's volume, with half the bytes per value in
/// bf16 or f16).
pub fn wire_bytes_per_rank(len: usize, ranks: usize, rank: usize, fmt: WireFormat) -> usize {
    let segs = segments(len, ranks);
    let own = segs[rank].len();
    ((len - own) + own * (ranks - 1)) * fmt.bytes_per_value()
}

/// One rank's state in the 16-bit exchange: the residual of its whole gradient (sent to the
/// owners) and the owner residual of the segment it owns (for the rounding of the summed
/// segment). The segment layout depends on the world size, so both belong to one (rank, ranks).
///
/// The step, on rank `rank` of `ranks`, with `fmt` a 16-bit format:
/// 1. `encode(grad, fmt, &mut wire)`; send `wire[fmt.wire_range(&segments(len, ranks)[j])]` to
///    rank j (MPI_Alltoallv on `u16` words, counts = segment lengths × `fmt.words()`);
/// 2. receive the N parts of the own segment, concatenated in rank order, and
///    `reduce_owned(&received, fmt, &mut owned)`;
/// 3. allgather `owned` (MPI_Allgatherv, same counts): the concatenation, in rank order, is the
///    wire of the summed gradient; [`decode`] it.
///
/// Checkpoints: [`ExchangeState::state`] is per rank. Over the ranks, the sum of the local
/// residuals plus the concatenation of the owned residuals is everything not yet delivered; on a
/// resume with another world size, add that vector to the new rank 0's local residual and start
/// the others (and every owner residual) at zero: the running sum is preserved.
#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeState {
    rank: usize,
    ranks: usize,
    segment: Range<usize>,
    local: ErrorFeedback,
    owned: ErrorFeedback,
    sum: Vec<f32>,
}

impl ExchangeState {
    /// Rank `rank` of `ranks`, for gradients of `len` values.
    ///
    /// # Panics
    /// When `rank >= ranks`.
    pub fn new(len: usize, rank: usize, ranks: usize) -> Self {
        assert!(rank < ranks, "ExchangeState: rank {rank} of {ranks}");
        let segment = segments(len, ranks)[rank].clone();
        Self {
            rank,
            ranks,
            local: ErrorFeedback::new(len),
            owned: ErrorFeedback::new(segment.len()),
            sum: vec![0.0; segment.len()],
            segment,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Gradient length.
    pub fn len(&self) -> usize {
        self.local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }

    /// The values this rank owns: it sums them over the ranks and rounds the sum.
    pub fn segment(&self) -> Range<usize> {
        self.segment.clone()
    }

    /// Step 1: this rank's gradient plus its local residual, encoded into `wire`.
    pub fn encode(&mut self, grad: &[f32], fmt: WireFormat, wire: &mut Vec<u16>) {
        self.local.compress(grad, fmt, wire);
    }

    /// Step 2, at the owner: `received` holds the N ranks' encoded parts of the owned segment,
    /// concatenated in rank order. Sum them in f32 in rank order ([`sum_decoded`]), then round
    /// the sum to `fmt` with the owner residual (the aggregate's rounding is compensated here, in
    /// later steps) into `out`, this rank's share of the allgather.
    ///
    /// # Panics
    /// When `received` is not `ranks × segment length × fmt.words()` words.
    pub fn reduce_owned(&mut self, received: &[u16], fmt: WireFormat, out: &mut Vec<u16>) {
        let part = self.segment.len() * fmt.words();
        assert_eq!(
            received.len(),
            part * self.ranks,
            "reduce_owned: received length"
        );
        if part == 0 {
            out.clear();
            return;
        }
        let parts: Vec<&[u16]> = received.chunks_exact(part).collect();
        sum_decoded(&parts, fmt, &mut self.sum);
        self.owned.compress(&self.sum, fmt, out);
    }

    /// The residuals, for checkpoints: (local, over the whole gradient; owned, over the segment).
    pub fn state(&self) -> (&[f32], &[f32]) {
        (self.local.state(), self.owned.state())
    }

    /// Restore residuals saved by [`ExchangeState::state`] for the same (rank, ranks, length).
    pub fn set_state(&mut self, local: &[f32], owned: &[f32]) -> Result<(), CompressError> {
        check_len("exchange local residual", self.local.len(), local.len())?;
        check_len("exchange owner residual", self.owned.len(), owned.len())?;
        self.local.set_state(local)?;
        self.owned.set_state(owned)
    }
}

/// The whole 16-bit exchange for `grads.len()` simulated ranks, in memory: encode with the local
/// residuals, all-to-all, owner sums and roundings, allgather, decode. Returns what each rank
/// holds afterwards (all bit-identical). `states[j]` must be rank j of `grads.len()`.
///
/// # Panics
/// When the states do not match the ranks or the gradients differ in length.
pub fn simulate_exchange(
    grads: &[Vec<f32>],
    fmt: WireFormat,
    states: &mut [ExchangeState],
) -> Vec<Vec<f32>> {
    let n = grads.len();
    assert!(n > 0 && states.len() == n, "simulate_exchange: ranks");
    let len = grads[0].len();
    for (j, (g, s)) in grads.iter().zip(states.iter()).enumerate() {
        assert_eq!(
            g.len(),
            len,
            "simulate_exchange: gradient length of rank {j}"
        );
        assert!(
            s.rank == j && s.ranks == n && s.len() == len,
            "state of rank {j}"
        );
    }
    let wires: Vec<Vec<u16>> = grads
        .iter()
        .zip(states.iter_mut())
        .map(|(g, s)| {
            let mut w = Vec::new();
            s.encode(g, fmt, &mut w);
            w
        })
        .collect();
    let mut gathered = vec![0u16; len * fmt.words()];
    let mut owned = Vec::new();
    for s in states.iter_mut() {
        let range = fmt.wire_range(&s.segment);
        let received: Vec<u16> = wires
            .iter()
            .flat_map(|w| w[range.clone()].iter().copied())
            .collect();
        s.reduce_owned(&received, fmt, &mut owned);
        gathered[range].copy_from_slice(&owned);
    }
    (0..n)
        .map(|_| {
            let mut out = vec![0.0; len];
            decode(fmt, &gathered, &mut out);
            out
        })
        .collect()
}

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
enum Phase {
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
    phase: Phase,
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
        validate(layers, len)?;
        let big: Vec<_> = layers
            .iter()
            .copied()
            .filter(|&(_, m, n)| m.min(n) > rank)
            .collect();
        Self::with_matrices(rank, &big, len, warmup_steps, seed)
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
            phase: Phase::Idle,
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
        assert_eq!(self.phase, Phase::Idle, "PowerSGD: begin before finish");
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
        self.phase = Phase::AwaitP;
        Round::LowRank
    }

    /// After the first allreduce: `p_sum` is the summed P-phase buffer (its first `p_len()`
    /// values are used). Orthonormalise each P and fill `send` (resized to `q_len()`) with this
    /// rank's Q = M'ᵀ P̂, the buffer of the second allreduce-sum.
    ///
    /// # Panics
    /// Out of order, or when `p_sum` is shorter than `p_len()`.
    pub fn project(&mut self, p_sum: &[f32], send: &mut Vec<f32>) {
        assert_eq!(self.phase, Phase::AwaitP, "PowerSGD: project out of order");
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
        self.phase = Phase::AwaitQ;
    }

    /// After the second allreduce: `q_sum` is the summed Q buffer (first `q_len()` values used),
    /// `ranks` the world size W. Writes the approximated SUM over ranks of the gradient (plus the
    /// residuals) into `out` (`len()` values: A = P̂ Qᵀ for the compressed matrices, the exact sums
    /// elsewhere), keeps E = M' − A/W, and Q (orthonormalised) as the next warm start.
    ///
    /// # Panics
    /// Out of order, `ranks` = 0, or wrong lengths.
    pub fn finish(&mut self, q_sum: &[f32], ranks: usize, out: &mut [f32]) {
        assert_eq!(self.phase, Phase::AwaitQ, "PowerSGD: finish out of order");
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
                refresh_q(q, n, r, self.seed, k, self.step);
            } else {
                o.fill(f32::NAN);
                e.fill(0.0);
                let mut rng = Rng::derive(self.seed, q_stream(k, self.step, 0));
                q.iter_mut().for_each(|v| *v = rng.normal() as f32);
                orthonormalize(q, n, r);
            }
        }
        let mut at = 0;
        for range in &self.uncompressed {
            out[range.clone()].copy_from_slice(&self.plain_sum[at..at + range.len()]);
            at += range.len();
        }
        self.phase = Phase::Idle;
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
        self.phase = Phase::Idle;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, ModelKind, ModelSpec};

    fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * scale) as f32).collect()
    }

    fn rel_l2(approx: &[f32], exact: &[f64]) -> f64 {
        let num: f64 = approx
            .iter()
            .zip(exact)
            .map(|(a, e)| (f64::from(*a) - e).powi(2))
            .sum();
        let den: f64 = exact.iter().map(|e| e * e).sum();
        (num / den).sqrt()
    }

    fn exact_sum(grads: &[Vec<f32>]) -> Vec<f64> {
        let mut s = vec![0f64; grads[0].len()];
        for g in grads {
            s.iter_mut().zip(g).for_each(|(s, g)| *s += f64::from(*g));
        }
        s
    }

    fn rank_order_sum(grads: &[Vec<f32>]) -> Vec<f32> {
        let mut s = grads[0].clone();
        for g in &grads[1..] {
            s.iter_mut().zip(g).for_each(|(s, g)| *s += g);
        }
        s
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    type Codec = (WireFormat, Encoder, Decoder, u16);
    /// (format, encode, decode, largest finite bit pattern)
    const CODECS: [Codec; 2] = [
        (WireFormat::Bf16, bf16_bits, bf16_value, 0x7F7F),
        (WireFormat::F16, f16_bits, f16_value, 0x7BFF),
    ];

    fn is_nan16(fmt: WireFormat, b: u16) -> bool {
        let exp = if fmt == WireFormat::Bf16 {
            0x7F80
        } else {
            0x7C00
        };
        b & exp == exp && b & !(exp | 0x8000) != 0
    }

    // ----- wire formats

    #[test]
    fn every_16_bit_value_decodes_and_encodes_back_exactly() {
        for (fmt, enc, dec, _) in CODECS {
            for b in 0..=u16::MAX {
                let v = dec(b);
                if is_nan16(fmt, b) {
                    assert!(v.is_nan(), "{fmt:?} {b:#06x}");
                    assert!(is_nan16(fmt, enc(v)), "{fmt:?} {b:#06x}: NaN stays NaN");
                } else {
                    assert_eq!(enc(v), b, "{fmt:?} {b:#06x} = {v:e}");
                }
                // the slice functions agree with the scalar ones
                let (mut w, mut back) = ([0u16], [0f32]);
                encode(fmt, &[v], &mut w);
                decode(fmt, &[b], &mut back);
                assert_eq!(w[0], enc(v));
                assert_eq!(back[0].to_bits(), v.to_bits());
            }
        }
    }

    #[test]
    fn ties_round_to_even_at_every_midpoint() {
        // every pair of adjacent finite values, both signs, subnormals included: the midpoint
        // (exact in f32) goes to the even pattern, a hair beyond it to the far one
        for (fmt, enc, dec, max) in CODECS {
            for lo in 0..max {
                for sign in [0u16, 0x8000] {
                    let (a, b) = (lo | sign, (lo + 1) | sign);
                    let (va, vb) = (dec(a), dec(b));
                    let mid = (f64::from(va) + f64::from(vb)) / 2.0;
                    let m = mid as f32;
                    assert_eq!(f64::from(m), mid, "{fmt:?}: midpoint exact in f32");
                    let even = if lo % 2 == 0 { a } else { b };
                    assert_eq!(enc(m), even, "{fmt:?} tie between {a:#06x} and {b:#06x}");
                    let (toward_b, toward_a) = if sign == 0 {
                        (m.next_up(), m.next_down())
                    } else {
                        (m.next_down(), m.next_up())
                    };
                    assert_eq!(enc(toward_b), b, "{fmt:?} just past {m:e}");
                    assert_eq!(enc(toward_a), a, "{fmt:?} just short of {m:e}");
                }
            }
        }
    }

    #[test]
    fn encoding_is_nearest_even_on_random_f32_bit_patterns() {
        // a brute-force check independent of the implementation: no other 16-bit value is closer,
        // and a tie goes to the even pattern
        let mut rng = Rng::new(7);
        for (fmt, enc, dec, max) in CODECS {
            let top = f64::from(dec(max));
            // where rounding goes to inf: halfway between max and the next power of the grid
            let ulp_top = top - f64::from(dec(max - 1));
            let overflow = top + ulp_top / 2.0;
            for _ in 0..400_000 {
                let x = f32::from_bits(rng.next_u64() as u32);
                if !x.is_finite() {
                    continue;
                }
                let h = enc(x);
                let (mag, xa) = (h & 0x7FFF, f64::from(x.abs()));
                assert_eq!(h & 0x8000 != 0, x.is_sign_negative(), "{fmt:?} {x:e}: sign");
                if xa >= overflow {
                    assert!(dec(h).is_infinite(), "{fmt:?} {x:e} overflows");
                    continue;
                }
                assert!(mag <= max, "{fmt:?} {x:e} -> {h:#06x}");
                let err = (f64::from(dec(mag)) - xa).abs();
                for other in [mag.wrapping_sub(1), mag + 1] {
                    if other > max {
                        continue;
                    }
                    let e2 = (f64::from(dec(other)) - xa).abs();
                    assert!(
                        err < e2 || (err == e2 && mag % 2 == 0),
                        "{fmt:?} {x:e}: {mag:#06x} vs {other:#06x}"
                    );
                }
            }
        }
    }

    #[test]
    fn special_values() {
        for (fmt, enc, dec, max) in CODECS {
            assert_eq!(enc(0.0), 0x0000);
            assert_eq!(enc(-0.0), 0x8000, "{fmt:?}: the sign of zero is kept");
            assert_eq!(dec(enc(f32::INFINITY)), f32::INFINITY);
            assert_eq!(dec(enc(f32::NEG_INFINITY)), f32::NEG_INFINITY);
            assert!(dec(enc(f32::NAN)).is_nan());
            assert!(dec(enc(-f32::NAN)).is_nan());
            // a signalling NaN whose payload lives only in the low bits stays NaN
            assert!(dec(enc(f32::from_bits(0x7F80_0001))).is_nan(), "{fmt:?}");
            assert_eq!(enc(dec(max)), max);
            assert_eq!(
                enc(1.0),
                if fmt == WireFormat::Bf16 {
                    0x3F80
                } else {
                    0x3C00
                }
            );
        }
        // f16 overflow: 65504 is the largest; halfway to 65536 rounds to even, which is inf
        assert_eq!(f16_value(f16_bits(65504.0)), 65504.0);
        assert_eq!(f16_value(f16_bits(65519.996)), 65504.0);
        assert_eq!(f16_value(f16_bits(65520.0)), f32::INFINITY);
        assert_eq!(f16_value(f16_bits(-1e6)), f32::NEG_INFINITY);
        // f16 subnormals: 2^-24 is the smallest; half of it ties to 0, a hair more rounds up
        let tiny = 2f32.powi(-24);
        assert_eq!(f16_bits(tiny), 0x0001);
        assert_eq!(f16_bits(tiny / 2.0), 0x0000);
        assert_eq!(f16_bits((tiny / 2.0).next_up()), 0x0001);
        assert_eq!(f16_bits(tiny * 1.5), 0x0002, "1.5 ulp ties to 2");
        assert_eq!(f16_value(0x03FF), 1023.0 * tiny, "largest subnormal");
        assert_eq!(f16_bits(1e-10), 0x0000);
        // bf16: f32::MAX rounds up past the largest finite bf16
        assert_eq!(bf16_value(bf16_bits(f32::MAX)), f32::INFINITY);
        assert_eq!(bf16_bits(f32::from_bits(0x7F7F_7FFF)), 0x7F7F);
        // bf16 keeps f32's subnormals' top bits
        assert_eq!(bf16_bits(f32::from_bits(0x0001_0000)), 0x0001);
        assert_eq!(
            bf16_bits(f32::from_bits(0x0000_8000)),
            0x0000,
            "tie to even"
        );
        assert_eq!(
            bf16_bits(f32::from_bits(0x0001_8000)),
            0x0002,
            "tie to even"
        );
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7 in bf16: to the even 1
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
    }

    #[test]
    fn the_f32_wire_is_bit_exact() {
        let mut rng = Rng::new(3);
        let mut x: Vec<f32> = (0..10_000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .collect();
        x.extend([
            0.0,
            -0.0,
            f32::MIN_POSITIVE / 3.0,
            f32::from_bits(0x7FC1_2345),
        ]);
        let mut w = vec![0u16; 2 * x.len()];
        encode(WireFormat::F32, &x, &mut w);
        let mut back = vec![0f32; x.len()];
        decode(WireFormat::F32, &w, &mut back);
        assert_eq!(bits(&back), bits(&x));
        assert_eq!(WireFormat::F32.wire_range(&(3..5)), 6..10);
        assert_eq!(WireFormat::Bf16.wire_range(&(3..5)), 3..5);
        assert_eq!(WireFormat::F16.bytes_per_value(), 2);
        assert_eq!(WireFormat::F32.round_trip(0.1), 0.1);
    }

    #[test]
    fn wire_format_names() {
        use clap::ValueEnum;
        let names: Vec<String> = WireFormat::value_variants()
            .iter()
            .map(|v| v.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(names, ["f32", "bf16", "f16"]);
        assert_eq!(
            serde_json::to_string(&WireFormat::Bf16).unwrap(),
            "\"bf16\""
        );
        let f: WireFormat = serde_json::from_str("\"f16\"").unwrap();
        assert_eq!(f, WireFormat::F16);
        assert_eq!(WireFormat::default(), WireFormat::F32);
    }

    // ----- error feedback

    /// Sends `steps` gradients from `grad(t)` through `fmt`, with or without error feedback, and
    /// returns the largest |Σ decoded − Σ true| (f64 running sums) over the steps and elements, in
    /// the first and in the second half of the run.
    fn running_sum_error(
        fmt: WireFormat,
        feedback: bool,
        len: usize,
        steps: usize,
        mut grad: impl FnMut(usize) -> Vec<f32>,
    ) -> (f64, f64) {
        let mut ef = ErrorFeedback::new(len);
        let (mut sent, mut truth) = (vec![0f64; len], vec![0f64; len]);
        let (mut wire, mut dec) = (Vec::new(), vec![0f32; len]);
        let mut worst = (0f64, 0f64);
        let mut big = vec![0f64; len];
        for t in 0..steps {
            let g = grad(t);
            big.iter_mut()
                .zip(&g)
                .for_each(|(b, g)| *b = b.max(f64::from(g.abs())));
            if feedback {
                ef.compress(&g, fmt, &mut wire);
                assert!(ef.state().iter().all(|r| r.is_finite()));
            } else {
                wire.resize(len * fmt.words(), 0);
                encode(fmt, &g, &mut wire);
            }
            decode(fmt, &wire, &mut dec);
            let mut err = 0f64;
            for i in 0..len {
                sent[i] += f64::from(dec[i]);
                truth[i] += f64::from(g[i]);
                err = err.max((sent[i] - truth[i]).abs());
                if feedback {
                    // the identity: Σ sent − Σ true = −r_t, up to the rounding of the f32
                    // additions g + r (half an f32 ulp of |c| ≤ 2 max|g| each)
                    let gap = (sent[i] - truth[i] + f64::from(ef.state()[i])).abs();
                    let tol = (t + 1) as f64 * 2f64.powi(-23) * big[i];
                    assert!(gap <= tol, "step {t}: gap {gap:e} > {tol:e}");
                }
            }
            let half = if t < steps / 2 {
                &mut worst.0
            } else {
                &mut worst.1
            };
            *half = half.max(err);
        }
        (worst.0, worst.1)
    }

    #[test]
    fn error_feedback_bounds_the_error_of_a_repeated_unrepresentable_gradient() {
        // 1.001 is not a bf16 value (it rounds to 1.0): without feedback the error of the running
        // sum grows by 0.001 a step; with it, it stays below one bf16 ulp
        for (fmt, g) in [(WireFormat::Bf16, 1.001f32), (WireFormat::F16, 0.1f32)] {
            let steps = 10_000;
            let (_, without) = running_sum_error(fmt, false, 1, steps, |_| vec![g]);
            let (a, b) = running_sum_error(fmt, true, 1, steps, |_| vec![g]);
            let ulp = f64::from(g)
                * if fmt == WireFormat::Bf16 {
                    2f64.powi(-7)
                } else {
                    2f64.powi(-10)
                };
            assert!(
                without > 0.2 * steps as f64 * (f64::from(g) - f64::from(fmt.round_trip(g))).abs()
            );
            assert!(a <= ulp && b <= ulp, "{fmt:?}: {a:e} {b:e} vs {ulp:e}");
            assert!(without > 100.0 * b, "{fmt:?}: {without:e} vs {b:e}");
        }
    }

    #[test]
    fn error_feedback_keeps_the_running_sum_within_one_residual_over_many_random_steps() {
        // elements of very different scales, a persistent mean plus noise, 4000 steps
        let len = 48;
        let scale: Vec<f64> = (0..len).map(|i| 10f64.powi(i as i32 % 7 - 3)).collect();
        let mut rng = Rng::new(11);
        let mean: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
        for fmt in [WireFormat::Bf16, WireFormat::F16] {
            let mut r = Rng::new(12);
            let mut grad = |_t: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((mean[i] + 0.5 * r.normal()) * scale[i]) as f32)
                    .collect()
            };
            let (first, second) = running_sum_error(fmt, true, len, 4000, &mut grad);
            // |c| stays below ~5 scale units, so one residual is at most half an ulp of that
            let half_ulp = if fmt == WireFormat::Bf16 {
                2f64.powi(-9)
            } else {
                2f64.powi(-12)
            };
            let bound = 8.0 * 1e3 * half_ulp; // the largest scale is 1e3
            assert!(
                first <= bound && second <= bound,
                "{fmt:?}: {first:e} {second:e}"
            );
            // no growth: the second half is no worse than the first beyond a small margin
            assert!(
                second <= 2.0 * first.max(bound / 8.0),
                "{fmt:?}: {first:e} → {second:e}"
            );
            // the same stream without feedback drifts far beyond that
            let mut r = Rng::new(12);
            let mut grad = |_t: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((mean[i] + 0.5 * r.normal()) * scale[i]) as f32)
                    .collect()
            };
            let (_, drift) = running_sum_error(fmt, false, len, 4000, &mut grad);
            assert!(drift > 10.0 * second, "{fmt:?}: {drift:e} vs {second:e}");
        }
    }

    #[test]
    fn error_feedback_state_round_trips_and_checks_its_length() {
        let mut rng = Rng::new(5);
        let mut a = ErrorFeedback::new(100);
        let mut w = Vec::new();
        for _ in 0..3 {
            a.compress(&randn(&mut rng, 100, 1.0), WireFormat::Bf16, &mut w);
        }
        let saved = a.state().to_vec();
        assert!(saved.iter().any(|r| *r != 0.0));
        let mut b = ErrorFeedback::new(100);
        b.set_state(&saved).unwrap();
        let g = randn(&mut rng, 100, 1.0);
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        a.compress(&g, WireFormat::Bf16, &mut wa);
        b.compress(&g, WireFormat::Bf16, &mut wb);
        assert_eq!(wa, wb);
        assert_eq!(a, b);
        assert_eq!(
            b.set_state(&[0.0; 3]),
            Err(CompressError::Length {
                what: "error-feedback residual",
                expected: 100,
                got: 3
            })
        );
        b.reset();
        assert!(b.state().iter().all(|r| *r == 0.0));
        // f32 sends everything: the residual empties
        a.compress(&g, WireFormat::F32, &mut wa);
        assert!(a.state().iter().all(|r| *r == 0.0));
    }

    #[test]
    fn non_finite_values_travel_and_do_not_poison_the_residual() {
        let mut ef = ErrorFeedback::new(4);
        let mut w = Vec::new();
        ef.compress(
            &[f32::NAN, f32::INFINITY, 1e6, 1.001],
            WireFormat::F16,
            &mut w,
        );
        let mut d = [0f32; 4];
        decode(WireFormat::F16, &w, &mut d);
        assert!(d[0].is_nan() && d[1] == f32::INFINITY && d[2] == f32::INFINITY);
        assert_eq!(&ef.state()[..3], &[0.0, 0.0, 0.0]);
        assert!(ef.state()[3] != 0.0);
        ef.compress(&[1.0; 4], WireFormat::F16, &mut w);
        decode(WireFormat::F16, &w, &mut d);
        assert_eq!(&d[..3], &[1.0, 1.0, 1.0]);
    }

    // ----- the exchange

    #[test]
    fn segments_are_balanced_contiguous_and_cover_everything() {
        for len in [0, 1, 3, 7, 8, 1001] {
            for ranks in 1..=9 {
                let s = segments(len, ranks);
                assert_eq!(s.len(), ranks);
                assert_eq!(s[0].start, 0);
                assert_eq!(s[ranks - 1].end, len);
                for w in s.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len());
                }
                let (lo, hi) = (s[ranks - 1].len(), s[0].len());
                assert!(hi - lo <= 1, "{len} over {ranks}: {s:?}");
            }
        }
        assert_eq!(segments(10, 3), vec![0..4, 4..7, 7..10]);
    }

    fn states(len: usize, n: usize) -> Vec<ExchangeState> {
        (0..n).map(|j| ExchangeState::new(len, j, n)).collect()
    }

    #[test]
    fn the_f32_exchange_is_exactly_the_rank_order_sum() {
        let mut rng = Rng::new(21);
        for n in 1..=5 {
            for len in [3, 1001] {
                let mut st = states(len, n);
                for _step in 0..3 {
                    let mut grads: Vec<Vec<f32>> =
                        (0..n).map(|_| randn(&mut rng, len, 1.0)).collect();
                    grads[0][0] = -0.0;
                    for g in &mut grads {
                        g[1] = -0.0;
                    }
                    let out = simulate_exchange(&grads, WireFormat::F32, &mut st);
                    let want = bits(&rank_order_sum(&grads));
                    for o in &out {
                        assert_eq!(bits(o), want, "{n} ranks, {len} values");
                    }
                }
            }
        }
    }

    #[test]
    fn the_16_bit_exchange_is_identical_on_every_rank_and_close_to_the_sum() {
        let mut rng = Rng::new(22);
        for (fmt, tol) in [(WireFormat::Bf16, 6e-3), (WireFormat::F16, 8e-4)] {
            for n in [1, 2, 3, 4, 8] {
                let len = 4099;
                let mut st = states(len, n);
                for step in 0..4 {
                    let grads: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut rng, len, 3.0)).collect();
                    let out = simulate_exchange(&grads, fmt, &mut st);
                    for o in &out[1..] {
                        assert_eq!(bits(o), bits(&out[0]), "{fmt:?} {n} ranks step {step}");
                    }
                    let err = rel_l2(&out[0], &exact_sum(&grads));
                    assert!(err < tol, "{fmt:?} {n} ranks step {step}: {err:e}");
                }
            }
        }
    }

    #[test]
    fn the_exchange_keeps_the_running_sum_within_n_plus_one_residuals() {
        // a persistent mean plus noise over 400 steps; the error of the running sum must not grow
        let (n, len, steps) = (4, 1000, 400);
        let mut rng = Rng::new(23);
        let mean: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
        let segs = segments(len, n);
        for fmt in [WireFormat::Bf16, WireFormat::F16] {
            let mut st = states(len, n);
            let (mut held, mut truth) = (vec![0f64; len], vec![0f64; len]);
            let mut worst = [0f64; 2];
            let (mut max_g, mut max_s) = (0f64, 0f64);
            for t in 0..steps {
                let grads: Vec<Vec<f32>> = (0..n)
                    .map(|_| {
                        (0..len)
                            .map(|i| (mean[i] + 0.5 * rng.normal()) as f32)
                            .collect()
                    })
                    .collect();
                let out = simulate_exchange(&grads, fmt, &mut st);
                let exact = exact_sum(&grads);
                let mut err = 0f64;
                for i in 0..len {
                    held[i] += f64::from(out[0][i]);
                    truth[i] += exact[i];
                    err = err.max((held[i] - truth[i]).abs());
                    max_s = max_s.max(exact[i].abs());
                    for g in &grads {
                        max_g = max_g.max(f64::from(g[i].abs()));
                    }
                    // the identity: Σ held − Σ true = −(the N local residuals + the owner's),
                    // up to the f32 roundings of the sums (a few f32 ulps of |Σ| per step)
                    let owner = segs.iter().position(|s| s.contains(&i)).unwrap();
                    let pending: f64 = st.iter().map(|s| f64::from(s.state().0[i])).sum::<f64>()
                        + f64::from(st[owner].state().1[i - segs[owner].start]);
                    let gap = (held[i] - truth[i] + pending).abs();
                    let tol = (t + 1) as f64 * (n + 2) as f64 * 2f64.powi(-24) * 2.0 * max_s;
                    assert!(
                        gap <= tol,
                        "{fmt:?} step {t} element {i}: {gap:e} > {tol:e}"
                    );
                }
                let w = &mut worst[usize::from(t >= steps / 2)];
                *w = w.max(err);
            }
            // each residual is at most half an ulp of its value: 2⁻⁸|x| in bf16, 2⁻¹¹|x| in f16
            let half_ulp = if fmt == WireFormat::Bf16 {
                2f64.powi(-8)
            } else {
                2f64.powi(-11)
            };
            let bound = half_ulp * 1.05 * (n as f64 * max_g + max_s);
            println!(
                "{fmt:?}, {n} ranks: largest error of the running sum, steps 1-200 {:.2e}, 201-400 {:.2e} (bound {bound:.2e})",
                worst[0], worst[1]
            );
            assert!(worst[1] <= bound, "{fmt:?}: {worst:?} vs {bound:e}");
            assert!(worst[1] <= 2.0 * worst[0], "{fmt:?}: grows {worst:?}");
        }
    }

    #[test]
    fn exchange_state_round_trips_and_checks_lengths() {
        let mut rng = Rng::new(24);
        let (n, len) = (3, 50);
        let mut a = states(len, n);
        for _ in 0..2 {
            let grads: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut rng, len, 1.0)).collect();
            simulate_exchange(&grads, WireFormat::Bf16, &mut a);
        }
        let mut b = states(len, n);
        for (sa, sb) in a.iter().zip(&mut b) {
            let (l, o) = sa.state();
            assert_eq!((l.len(), o.len()), (len, sa.segment().len()));
            sb.set_state(l, o).unwrap();
        }
        let grads: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut rng, len, 1.0)).collect();
        let oa = simulate_exchange(&grads, WireFormat::Bf16, &mut a);
        let ob = simulate_exchange(&grads, WireFormat::Bf16, &mut b);
        assert_eq!(bits(&oa[0]), bits(&ob[0]));
        assert_eq!(a, b);
        assert!(b[0].set_state(&[0.0; 50], &[0.0; 3]).is_err());
        assert_eq!(b[2].segment(), 34..50);
        assert_eq!((b[2].rank(), b[2].ranks(), b[2].len()), (2, 3, 50));
    }

    #[test]
    fn owners_sum_in_rank_order_in_f32() {
        let parts: Vec<Vec<f32>> = vec![vec![1.0, 1e8], vec![1e-8, -1e8], vec![3.0, 1.0]];
        let wires: Vec<Vec<u16>> = parts
            .iter()
            .map(|p| {
                let mut w = vec![0u16; 4];
                encode(WireFormat::F32, p, &mut w);
                w
            })
            .collect();
        let refs: Vec<&[u16]> = wires.iter().map(|w| w.as_slice()).collect();
        let mut out = [0f32; 2];
        sum_decoded(&refs, WireFormat::F32, &mut out);
        // ((1 + 1e-8) + 3) and ((1e8 − 1e8) + 1): the order is visible in f32
        assert_eq!(out, [(1.0f32 + 1e-8) + 3.0, (1e8f32 - 1e8) + 1.0]);
        let mut st = ExchangeState::new(2, 0, 1);
        let mut owned = Vec::new();
        st.reduce_owned(&wires[0], WireFormat::F32, &mut owned);
        assert_eq!(owned, wires[0]);
    }

    #[test]
    fn wire_bytes_per_rank_is_the_ring_volume() {
        // 1000 values over 4 ranks, bf16: 750 + 250 × 3 values of 2 bytes
        assert_eq!(wire_bytes_per_rank(1000, 4, 0, WireFormat::Bf16), 3000);
        assert_eq!(wire_bytes_per_rank(1000, 4, 0, WireFormat::F32), 6000);
        assert_eq!(wire_bytes_per_rank(1000, 1, 0, WireFormat::Bf16), 0);
    }

    /// The rejected alternative: a ring reduction over a bf16 datatype. Inputs arrive as bf16;
    /// each hop adds its value in f32 and rounds the partial sum to bf16 for the next hop.
    fn ring_bf16_hops(inputs: &[Vec<f32>], out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let mut p = inputs[0][i];
            for x in &inputs[1..] {
                p = WireFormat::Bf16.round_trip(p + x[i]);
            }
            *o = p;
        }
    }

    #[test]
    fn bf16_hop_error_table() {
        // one step on 65 536 iid N(0, 1) values; running sums over 1000 steps on 8192 values of
        // μ + 0.5 ξ (μ ~ N(0, 1) fixed per element, ξ fresh noise)
        let (len, len_t, checkpoints) = (1 << 16, 1 << 13, [100usize, 1000]);
        println!(
            "| N | ring, bf16 at each hop, 1 step | f32 sum, 1 rounding, 1 step | ring + local EF, T = 100 | ours, T = 100 | ring + local EF, T = 1000 | ours, T = 1000 | RMS error of the running sum at T = 1000, ring / ours |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for n in [2usize, 4, 8] {
            let mut rng = Rng::new(100 + n as u64);
            let grads: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut rng, len, 1.0)).collect();
            let exact = exact_sum(&grads);
            let inputs: Vec<Vec<f32>> = grads
                .iter()
                .map(|g| g.iter().map(|x| WireFormat::Bf16.round_trip(*x)).collect())
                .collect();
            let mut ring = vec![0f32; len];
            ring_bf16_hops(&inputs, &mut ring);
            let ours: Vec<f32> = rank_order_sum(&inputs)
                .iter()
                .map(|s| WireFormat::Bf16.round_trip(*s))
                .collect();
            let ring_1 = rel_l2(&ring, &exact);
            let ours_1 = rel_l2(&ours, &exact);

            let len = len_t;
            let mean: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
            let mut local: Vec<ErrorFeedback> = (0..n).map(|_| ErrorFeedback::new(len)).collect();
            let mut st = states(len, n);
            let (mut ring_sum, mut ours_sum, mut truth) =
                (vec![0f64; len], vec![0f64; len], vec![0f64; len]);
            let (mut wire, mut ring, mut d) = (Vec::new(), vec![0f32; len], vec![0f32; len]);
            let mut cells = Vec::new();
            let mut rms = (0.0, 0.0);
            for t in 1..=checkpoints[1] {
                let grads: Vec<Vec<f32>> = (0..n)
                    .map(|_| {
                        (0..len)
                            .map(|i| (mean[i] + 0.5 * rng.normal()) as f32)
                            .collect()
                    })
                    .collect();
                let inputs: Vec<Vec<f32>> = grads
                    .iter()
                    .zip(&mut local)
                    .map(|(g, ef)| {
                        ef.compress(g, WireFormat::Bf16, &mut wire);
                        decode(WireFormat::Bf16, &wire, &mut d);
                        d.clone()
                    })
                    .collect();
                ring_bf16_hops(&inputs, &mut ring);
                let out = simulate_exchange(&grads, WireFormat::Bf16, &mut st);
                let exact = exact_sum(&grads);
                for i in 0..len {
                    ring_sum[i] += f64::from(ring[i]);
                    ours_sum[i] += f64::from(out[0][i]);
                    truth[i] += exact[i];
                }
                if checkpoints.contains(&t) {
                    let sq = |s: &[f64]| -> f64 {
                        s.iter().zip(&truth).map(|(a, b)| (a - b).powi(2)).sum()
                    };
                    let den: f64 = truth.iter().map(|b| b * b).sum();
                    let (r, o) = (sq(&ring_sum), sq(&ours_sum));
                    cells.push(((r / den).sqrt(), (o / den).sqrt()));
                    rms = ((r / len as f64).sqrt(), (o / len as f64).sqrt());
                }
            }
            println!(
                "| {n} | {ring_1:.2e} | {ours_1:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.2e} / {:.2e} |",
                cells[0].0, cells[0].1, cells[1].0, cells[1].1, rms.0, rms.1
            );
            assert!(ring_1 >= ours_1 * 0.99, "{n}: {ring_1:e} {ours_1:e}");
            if n > 2 {
                assert!(ring_1 > ours_1 * 1.2, "{n}: {ring_1:e} {ours_1:e}");
            }
            for (ring_t, ours_t) in &cells {
                assert!(ours_t * 5.0 < *ring_t, "{n}: {ours_t:e} {ring_t:e}");
            }
            // the ring's error of the running sum keeps growing; ours does not
            assert!(rms.0 > 10.0 * rms.1, "{n}: {rms:?}");
        }
    }

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
