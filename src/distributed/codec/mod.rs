//! Bucket codecs: how one bucket of gradients crosses the ranks. The exchange
//! (`distributed/exchange/`) hands each bucket, as soon as backward has produced it, to its
//! codec: [`BucketCodec::encode`] on the training thread, then [`BucketCodec::reduce`], the
//! collectives and the work between them, as one job on the communication thread; what comes
//! back is the sum over the ranks in f32, ready to upload. PyTorch's reducer treats the plain
//! sum as one comm hook among others; so does this.
//!
//! - `sum.rs`: the f32 allreduce-sum, exact;
//! - `wire16.rs`: the 16-bit wire (bf16 or f16) with two-sided error feedback ([`WireFeedback`]);
//! - `powersgd.rs`: PowerSGD, a low-rank approximation with error feedback ([`PowerSgd`]).
//!
//! The mathematics, and the measurements behind the 16-bit wire's design, are in
//! `docs/CODECS.md`. Everything here is deterministic: fixed summation orders, in f32, in rank
//! order.

mod powersgd;
mod sum;
mod wire16;

use std::ops::Range;

pub use powersgd::{
    ORTHO_EPS, PowerSgd, PowerSgdCodec, PowerSgdState, Round, orthonormalize, simulate_powersgd,
    weight_matrices,
};
pub use sum::Sum;
pub use wire16::{
    ErrorFeedback, Wire16, WireFeedback, WireFormat, bf16_bits, bf16_value, decode, encode,
    f16_bits, f16_value, segments, simulate_exchange, sum_decoded, wire_bytes_per_rank,
};

use crate::distributed::comm::Communicator;

/// How one bucket of the gradient crosses the ranks. One instance per bucket: it keeps the
/// bucket's state from step to step (error-feedback residuals, PowerSGD's warm start). While its
/// exchange is in flight the codec itself travels to the communication thread and back.
pub trait BucketCodec: Send {
    /// The codec's name (the timeline, messages).
    fn name(&self) -> &'static str;
    /// The collectives one exchange makes: its deadline is that many collectives long.
    fn collectives(&self) -> u32;
    /// Training thread: this rank's part. `buf` holds the bucket's gradient (its first
    /// `grad_len` values), then words that every codec sums exactly in f32 (the step's totals,
    /// in the first bucket).
    fn encode(&mut self, buf: &[f32], grad_len: usize);
    /// Communication thread: the collectives and the work between them. Afterwards `buf` holds
    /// the sum over the ranks in `encode`'s layout (every rank the same bits). Returns the bytes
    /// this rank sent.
    fn reduce(
        &mut self,
        comm: &dyn Communicator,
        buf: &mut [f32],
        grad_len: usize,
    ) -> anyhow::Result<usize>;
    /// A codec without state gives another instance of itself, for while this one is in flight
    /// (`--staleness 1` keeps two steps' sums in flight); codecs with state give None.
    fn spare(&self) -> Option<Box<dyn BucketCodec>> {
        None
    }
    /// The state a checkpoint keeps.
    fn state(&self) -> CodecState {
        CodecState::None
    }
    /// Restore a state saved by [`BucketCodec::state`] for the same bucket and world size.
    fn set_state(&mut self, state: CodecState) -> Result<(), CompressError> {
        match state {
            CodecState::None => Ok(()),
            _ => Err(CompressError::State(self.name())),
        }
    }
}

/// Which codec the buckets use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodecKind {
    /// The f32 sum.
    Sum,
    /// The 16-bit wire in this format.
    Wire(WireFormat),
    /// PowerSGD of this rank, after `warmup` steps of plain sums.
    PowerSgd { rank: usize, warmup: u64 },
}

/// One codec's state for a checkpoint, over its bucket.
#[derive(Clone, Debug, PartialEq)]
pub enum CodecState {
    None,
    /// The 16-bit wire's residuals: over the bucket, and over this rank's owned segment of it.
    Wire {
        local: Vec<f32>,
        owned: Vec<f32>,
    },
    /// PowerSGD's (its matrices numbered from the bucket's first).
    PowerSgd(PowerSgdState),
}

/// The codec of the bucket `range` of a gradient whose weight matrices are `matrices` (offset,
/// rows, columns; [`weight_matrices`]), on rank `rank` of `ranks`. `seed` draws PowerSGD's first
/// Q; its matrices are numbered from `first_matrix` (their number over the whole gradient).
pub fn for_bucket(
    kind: CodecKind,
    range: &Range<usize>,
    matrices: &[(usize, usize, usize)],
    rank: usize,
    ranks: usize,
    seed: u64,
    first_matrix: usize,
) -> Result<Box<dyn BucketCodec>, CompressError> {
    Ok(match kind {
        CodecKind::Sum => Box::new(Sum),
        CodecKind::Wire(fmt) => Box::new(Wire16::new(fmt, range.len(), rank, ranks)),
        CodecKind::PowerSgd { rank: r, warmup } => {
            let inside: Vec<(usize, usize, usize)> = matrices
                .iter()
                .filter(|&&(o, m, n)| o >= range.start && o + m * n <= range.end)
                .map(|&(o, m, n)| (o - range.start, m, n))
                .collect();
            Box::new(PowerSgdCodec::new(PowerSgd::numbered(
                r,
                &inside,
                range.len(),
                warmup,
                seed,
                first_matrix,
            )?))
        }
    })
}

/// A caller's buffer or state did not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    #[error("{what}: expected {expected} values, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("a checkpoint's state is not the {0} codec's")]
    State(&'static str),
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

#[cfg(test)]
mod test_util {
    //! Helpers the codecs' tests share.
    use crate::rng::Rng;

    pub fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * scale) as f32).collect()
    }

    pub fn rel_l2(approx: &[f32], exact: &[f64]) -> f64 {
        let num: f64 = approx
            .iter()
            .zip(exact)
            .map(|(a, e)| (f64::from(*a) - e).powi(2))
            .sum();
        let den: f64 = exact.iter().map(|e| e * e).sum();
        (num / den).sqrt()
    }

    pub fn exact_sum(grads: &[Vec<f32>]) -> Vec<f64> {
        let mut s = vec![0f64; grads[0].len()];
        for g in grads {
            s.iter_mut().zip(g).for_each(|(s, g)| *s += f64::from(*g));
        }
        s
    }

    pub fn rank_order_sum(grads: &[Vec<f32>]) -> Vec<f32> {
        let mut s = grads[0].clone();
        for g in &grads[1..] {
            s.iter_mut().zip(g).for_each(|(s, g)| *s += g);
        }
        s
    }

    pub fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
