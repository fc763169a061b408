//! The f32 sum: the bucket summed over the ranks in one allreduce, exactly (every element's sum
//! is the ranks' values added in f32, as MPI adds them).

use super::BucketCodec;
use crate::distributed::comm::Communicator;

/// The plain f32 allreduce-sum, without state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sum;

impl BucketCodec for Sum {
    fn name(&self) -> &'static str {
        "allreduce"
    }
    fn collectives(&self) -> u32 {
        1
    }
    fn encode(&mut self, _buf: &[f32], _grad_len: usize) {}
    fn reduce(
        &mut self,
        comm: &dyn Communicator,
        buf: &mut [f32],
        _grad_len: usize,
    ) -> anyhow::Result<usize> {
        comm.allreduce_sum_f32(buf)?;
        Ok(4 * buf.len())
    }
    fn spare(&self) -> Option<Box<dyn BucketCodec>> {
        Some(Box::new(Sum))
    }
}
