//! One process, no communication.

use super::Communicator;

/// One process, no communication: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn allreduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> anyhow::Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn allreduce_sum_f64(&self, _: &mut [f64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn allreduce_sum_u64(&self, _: &mut [u64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_to_all_u16(
        &self,
        send: &[u16],
        _send_counts: &[usize],
        recv: &mut [u16],
        _recv_counts: &[usize],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(send.len() == recv.len(), "all-to-all buffers differ");
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_u16(
        &self,
        mine: &[u16],
        _counts: &[usize],
        out: &mut [u16],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(mine.len() == out.len(), "all-gather buffers differ");
        out.copy_from_slice(mine);
        Ok(())
    }
    fn start_job(
        &self,
        _what: &str,
        _collectives: u32,
        job: super::Job,
    ) -> anyhow::Result<super::PendingJob> {
        Ok(super::run_here(self, job))
    }
    fn abort(&self, _code: i32) {}
    fn describe(&self) -> String {
        "single process".into()
    }
}
