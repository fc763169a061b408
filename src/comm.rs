//! Communication between ranks behind one small trait; a single-process implementation for runs and
//! tests without mpirun. The MPI implementation lives in `comm::mpi` (feature `mpi`).

/// Collectives the trainer needs. Every rank must make the same calls in the same order.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Rank within this node (for choosing a GPU).
    fn local_rank(&self) -> usize;
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> anyhow::Result<()>;
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> anyhow::Result<()>;
    fn allreduce_sum_u64(&self, buf: &mut [u64]) -> anyhow::Result<()>;
    /// Rank 0's values to every rank.
    fn broadcast_f32(&self, buf: &mut [f32]) -> anyhow::Result<()>;
    /// Every rank's bytes, in rank order (for comparing configurations).
    fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>>;
    fn barrier(&self) -> anyhow::Result<()>;
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

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
    fn allreduce_sum_f32(&self, _: &mut [f32]) -> anyhow::Result<()> {
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
}
