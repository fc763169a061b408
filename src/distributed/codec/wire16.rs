//! The 16-bit wire: gradients rounded to bf16 or f16 with two-sided error feedback, exchanged
//! as an all-to-all of segments, summed in f32 at each segment's owner, and all-gathered
//! (docs/CODECS.md). [`Wire16`] is its bucket codec.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{BucketCodec, CodecState, CompressError, check_len};
use crate::distributed::comm::Communicator;

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
/// Checkpoints: [`WireFeedback::state`] is per rank. Over the ranks, the sum of the local
/// residuals plus the concatenation of the owned residuals is everything not yet delivered; on a
/// resume with another world size, add that vector to the new rank 0's local residual and start
/// the others (and every owner residual) at zero: the running sum is preserved.
#[derive(Clone, Debug, PartialEq)]
pub struct WireFeedback {
    rank: usize,
    ranks: usize,
    segment: Range<usize>,
    local: ErrorFeedback,
    owned: ErrorFeedback,
    sum: Vec<f32>,
}

impl WireFeedback {
    /// Rank `rank` of `ranks`, for gradients of `len` values.
    ///
    /// # Panics
    /// When `rank >= ranks`.
    pub fn new(len: usize, rank: usize, ranks: usize) -> Self {
        assert!(rank < ranks, "WireFeedback: rank {rank} of {ranks}");
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

    /// Restore residuals saved by [`WireFeedback::state`] for the same (rank, ranks, length).
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
    states: &mut [WireFeedback],
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
// The bucket codec
// ---------------------------------------------------------------------------------------------

/// The 16-bit wire as a bucket codec: the bucket's error feedback and the buffers of its
/// all-to-all and all-gather. The words after the gradient (the totals) travel in f32, exactly,
/// in one more allreduce.
pub struct Wire16 {
    fmt: WireFormat,
    feedback: WireFeedback,
    wire: Vec<u16>,
    recv: Vec<u16>,
    owned: Vec<u16>,
    gathered: Vec<u16>,
}

impl Wire16 {
    /// The wire in format `fmt` for a bucket of `len` values, on rank `rank` of `ranks`.
    pub fn new(fmt: WireFormat, len: usize, rank: usize, ranks: usize) -> Self {
        Self {
            fmt,
            feedback: WireFeedback::new(len, rank, ranks),
            wire: Vec::new(),
            recv: Vec::new(),
            owned: Vec::new(),
            gathered: Vec::new(),
        }
    }
}

impl BucketCodec for Wire16 {
    fn name(&self) -> &'static str {
        match self.fmt {
            WireFormat::Bf16 => "bf16 wire",
            WireFormat::F16 => "f16 wire",
            WireFormat::F32 => "f32 wire",
        }
    }
    fn collectives(&self) -> u32 {
        3
    }
    fn encode(&mut self, buf: &[f32], grad_len: usize) {
        crate::observe::trace::span("encode", "exchange").end_after(|| {
            self.feedback
                .encode(&buf[..grad_len], self.fmt, &mut self.wire)
        });
    }
    fn reduce(
        &mut self,
        comm: &dyn Communicator,
        buf: &mut [f32],
        grad_len: usize,
    ) -> anyhow::Result<usize> {
        let (rank, ranks, fmt) = (self.feedback.rank, self.feedback.ranks, self.fmt);
        let w = fmt.words();
        let segs = segments(grad_len, ranks);
        let counts: Vec<usize> = segs.iter().map(|r| r.len() * w).collect();
        self.recv.resize(counts[rank] * ranks, 0);
        comm.all_to_all_u16(
            &self.wire,
            &counts,
            &mut self.recv,
            &vec![counts[rank]; ranks],
        )?;
        crate::observe::trace::span("sum owned segment", "exchange")
            .end_after(|| self.feedback.reduce_owned(&self.recv, fmt, &mut self.owned));
        self.gathered.resize(grad_len * w, 0);
        comm.all_gather_u16(&self.owned, &counts, &mut self.gathered)?;
        let (grad, words) = buf.split_at_mut(grad_len);
        crate::observe::trace::span("decode", "exchange")
            .end_after(|| decode(fmt, &self.gathered, grad));
        comm.allreduce_sum_f32(words)?;
        Ok(wire_bytes_per_rank(grad_len, ranks, rank, fmt) + 4 * words.len())
    }
    fn state(&self) -> CodecState {
        let (local, owned) = self.feedback.state();
        CodecState::Wire {
            local: local.to_vec(),
            owned: owned.to_vec(),
        }
    }
    fn set_state(&mut self, state: CodecState) -> Result<(), CompressError> {
        match state {
            CodecState::Wire { local, owned } => self.feedback.set_state(&local, &owned),
            _ => Err(CompressError::State(self.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{bits, exact_sum, randn, rank_order_sum, rel_l2};
    use super::*;
    use crate::rng::Rng;

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

    fn states(len: usize, n: usize) -> Vec<WireFeedback> {
        (0..n).map(|j| WireFeedback::new(len, j, n)).collect()
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
        let mut st = WireFeedback::new(2, 0, 1);
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
}
