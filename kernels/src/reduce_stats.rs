//! Launcher for `shaders/reduce_stats.wgsl`: per-row (loss, correct) pairs added into a running total.

use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    slot: u32,
    _pad: [u32; 2],
}

crate::params_layout!(Params { rows, slot });

/// A prepared reduction; `set_slot` picks the history entry of the next submission.
pub struct ReduceCall {
    pub dispatch: Dispatch,
    ring: UniformRing,
    params: Params,
    history_len: u64,
}

impl ReduceCall {
    pub fn set_slot(&mut self, ctx: &GpuContext, slot: u64) -> Result<(), KernelError> {
        self.write_slot(ctx, 0, slot).map(|_| ())
    }

    /// Ring block `ring_slot` sends its batch's loss to `history[slot]`; returns its dynamic offset.
    pub fn write_slot(
        &mut self,
        ctx: &GpuContext,
        ring_slot: u64,
        slot: u64,
    ) -> Result<u32, KernelError> {
        if slot >= self.history_len {
            return Err(KernelError::Shape {
                kernel: "reduce_stats",
                msg: format!("history slot {slot} of {}", self.history_len),
            });
        }
        self.params.slot = slot as u32;
        self.ring
            .write(ctx, ring_slot, bytemuck::bytes_of(&self.params))
    }
}

/// Bytes of a total buffer: four u32 words (loss sum as f32 bits, correct, count, unused), the
/// layout `Totals::from_words` decodes.
pub const TOTALS_BYTES: u64 = 16;

/// The running total as the host reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub loss_sum: f64,
    pub correct: u64,
    pub count: u64,
}

impl Totals {
    /// Add another batch's or rank's totals into these.
    pub fn add(&mut self, other: &Totals) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.count += other.count;
    }

    /// Decode the four words of a total buffer.
    pub fn from_words(w: &[u32]) -> Self {
        Self {
            loss_sum: f64::from(f32::from_bits(w[0])),
            correct: u64::from(w[1]),
            count: u64::from(w[2]),
        }
    }
}

pub struct ReduceStats {
    kernel: Kernel,
}

impl ReduceStats {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            kernel: Kernel::new(
                ctx,
                "reduce_stats",
                &[],
                &[
                    Slot::Read,
                    Slot::ReadWrite,
                    Slot::ReadWrite,
                    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
                ],
                false,
            ),
        }
    }

    /// A zeroed total buffer (`TOTALS_BYTES`).
    pub fn total_buffer(ctx: &GpuContext) -> Result<wgpu::Buffer, KernelError> {
        ctx.storage("totals", TOTALS_BYTES)
    }

    /// Sum `rows` (loss, correct) pairs of `stats` into `total`, and the loss into `history[slot]`.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        rows: u64,
        stats: &wgpu::Buffer,
        total: &wgpu::Buffer,
        history: &wgpu::Buffer,
    ) -> Result<ReduceCall, KernelError> {
        const K: &str = "reduce_stats";
        need(K, "stats", stats, rows * 2)?;
        need(K, "total", total, 4)?;
        let params = Params {
            rows: u32_of(K, "rows", rows)?,
            slot: 0,
            _pad: [0; 2],
        };
        let ring = UniformRing::new(
            ctx,
            "reduce params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        ring.write(ctx, 0, bytemuck::bytes_of(&params))?;
        let dispatch = self
            .kernel
            .dispatch(ctx, &[stats, total, history, &ring.buffer], (1, 1));
        Ok(ReduceCall {
            dispatch,
            ring,
            params,
            history_len: history.size() / 4,
        })
    }
}

/// CPU reference: the sums in f64.
pub fn reduce_stats_ref(stats: &[f32]) -> Totals {
    Totals {
        loss_sum: stats.iter().step_by(2).map(|&v| f64::from(v)).sum(),
        correct: stats.iter().skip(1).step_by(2).map(|&v| v as u64).sum(),
        count: (stats.len() / 2) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    #[test]
    fn totals_accumulate_over_batches_and_match_the_reference() {
        let ctx = ctx();
        let rows = 1001;
        let stats: Vec<f32> = random(rows * 2, 3)
            .chunks(2)
            .flat_map(|p| [p[0].abs() * 3.0, if p[1] > 0.0 { 1.0 } else { 0.0 }])
            .collect();
        let sb = ctx.upload("stats", &stats).unwrap();
        let tb = ReduceStats::total_buffer(&ctx).unwrap();
        let hb = ctx.upload("history", &[-1.0f32; 3]).unwrap();
        let r = ReduceStats::new(&ctx);
        let mut call = r.prepare(&ctx, rows as u64, &sb, &tb, &hb).unwrap();
        call.set_slot(&ctx, 1).unwrap();
        crate::run(&ctx, &[&call.dispatch, &call.dispatch]);
        assert!(call.set_slot(&ctx, 3).is_err());
        let got = Totals::from_words(&ctx.read::<u32>(&tb, 0, 4).unwrap());
        let history: Vec<f32> = ctx.read(&hb, 0, 3).unwrap();
        assert_eq!(
            (history[0], history[2]),
            (-1.0, -1.0),
            "only slot 1 written"
        );
        let want = reduce_stats_ref(&stats);
        assert_eq!(got.count, 2 * want.count);
        assert_eq!(got.correct, 2 * want.correct);
        let rel = (got.loss_sum - 2.0 * want.loss_sum).abs() / (2.0 * want.loss_sum);
        assert!(rel <= 1e-5, "loss sum rel error {rel:e}");
        let rel = (f64::from(history[1]) - want.loss_sum).abs() / want.loss_sum;
        assert!(rel <= 1e-5, "history rel error {rel:e}");
    }
}
