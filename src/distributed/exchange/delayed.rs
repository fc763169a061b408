//! `--staleness 1`: the exchange with one step's sums in flight. Each step's sums start as its
//! backward produces them and arrive during the next step, whose update applies them (the
//! previous step's rate and count, so that the optimizer sees synchronous SGD's sequence of
//! updates, each gradient one step older). This type holds the sums in flight; the buckets and
//! their codec are the exchange's.

use super::ExchangeTimes;
use super::buckets::{BucketSum, Bucketed};
use super::totals::StepTotals;
use crate::backend::Backend;
use crate::distributed::comm::Communicator;

/// One step's sums in flight, with the step they belong to.
#[derive(Default)]
pub struct Delayed {
    inflight: Option<(u64, Vec<BucketSum>)>,
}

impl Delayed {
    /// Step `step`'s sums, just started, go in flight; the previous step's, if any, arrive into
    /// the device's gradient buffer: their step and totals.
    pub fn swap(
        &mut self,
        ex: &mut Bucketed,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        step: u64,
        sums: Vec<BucketSum>,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Option<(u64, StepTotals)>> {
        let prev = self.drain(ex, backend, comm, times)?;
        self.inflight = Some((step, sums));
        Ok(prev)
    }

    /// The sums in flight, if any, into the device's gradient buffer: their step and totals.
    pub fn drain(
        &mut self,
        ex: &mut Bucketed,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Option<(u64, StepTotals)>> {
        match self.inflight.take() {
            Some((s, sums)) => Ok(Some((s, ex.receive(backend, comm, sums, times)?))),
            None => Ok(None),
        }
    }

    /// For a checkpoint: the sums in flight, waited for (they stay, arrived, for the next
    /// step), flat in parameter order with the totals' words after.
    pub fn checkpoint(
        &mut self,
        ex: &mut Bucketed,
        comm: &dyn Communicator,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Option<Vec<f32>>> {
        let Some((at, sums)) = self.inflight.take() else {
            return Ok(None);
        };
        let ready = ex.arrive_all(comm, sums, times)?;
        let n = ex.len();
        let mut flat = vec![0.0; n + StepTotals::WORDS];
        for (b, buf) in ex.buckets.iter().zip(&ready) {
            flat[b.range.clone()].copy_from_slice(&buf[..b.range.len()]);
        }
        let n0 = ex.buckets[0].range.len();
        flat[n..].copy_from_slice(&ready[0][n0..n0 + StepTotals::WORDS]);
        self.inflight = Some((at, ready.into_iter().map(BucketSum::Arrived).collect()));
        Ok(Some(flat))
    }

    /// Restore a checkpoint's sums in flight (`flat`, as [`Delayed::checkpoint`] gave them),
    /// those of the step before `step`, the checkpoint's position.
    pub fn restore(&mut self, ex: &Bucketed, flat: &[f32], step: u64) -> anyhow::Result<()> {
        let n = ex.len();
        anyhow::ensure!(
            flat.len() == n + StepTotals::WORDS,
            "the checkpoint's gradient sums in flight have {} values, the model {n}",
            flat.len().saturating_sub(StepTotals::WORDS)
        );
        let sums = ex
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut buf = flat[b.range.clone()].to_vec();
                if i == 0 {
                    buf.extend_from_slice(&flat[n..]);
                }
                BucketSum::Arrived(buf)
            })
            .collect();
        self.inflight = Some((step.saturating_sub(1), sums));
        Ok(())
    }
}
