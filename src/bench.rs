//! Benchmarks behind `dptrain bench`: the allreduce itself (`bench comm`), laid out like nccl-tests
//! so that the trainer's exchange can be set beside raw MPI.

use std::time::Instant;

use anyhow::ensure;
use serde::Serialize;

use crate::comm::Communicator;

/// One row of `bench comm`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CommRow {
    pub bytes: u64,
    pub count: u64,
    pub time_us: f64,
    /// bytes / time
    pub algbw_gbs: f64,
    /// algbw · 2(n-1)/n: the per-link traffic of a ring allreduce, comparable across rank counts
    pub busbw_gbs: f64,
    /// elements whose sum was wrong
    pub wrong: u64,
}

/// Sizes from `min` to `max` bytes, doubling (each a multiple of 4).
pub fn sizes(min: u64, max: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut b = min.max(4) / 4 * 4;
    while b <= max {
        v.push(b);
        b *= 2;
    }
    v
}

/// Allreduce f32 buffers of each size through the communicator's own path, `iters` times after
/// `warmup`, and check every element of the result.
pub fn comm_bench(
    comm: &dyn Communicator,
    sizes: &[u64],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Vec<CommRow>> {
    ensure!(iters >= 1, "--iters must be at least 1");
    let n = comm.size() as f64;
    let mut rows = Vec::new();
    for &bytes in sizes {
        let count = (bytes / 4) as usize;
        let send = vec![(comm.rank() + 1) as f32; count];
        let mut recv = vec![0f32; count];
        for _ in 0..warmup {
            comm.allreduce_sum_f32_into(&send, &mut recv)?;
        }
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            comm.allreduce_sum_f32_into(&send, &mut recv)?;
        }
        let mine = t.elapsed().as_secs_f64() / iters as f64;
        // the slowest rank decides a collective's time
        let mut times = vec![0f64; comm.size()];
        times[comm.rank()] = mine;
        comm.allreduce_sum_f64(&mut times)?;
        let secs = times.iter().cloned().fold(0.0, f64::max);
        let want = (n * (n + 1.0) / 2.0) as f32;
        let mut wrong = [recv.iter().filter(|&&v| v != want).count() as u64];
        comm.allreduce_sum_u64(&mut wrong)?;
        let algbw = bytes as f64 / secs / 1e9;
        rows.push(CommRow {
            bytes,
            count: count as u64,
            time_us: secs * 1e6,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (n - 1.0) / n,
            wrong: wrong[0],
        });
    }
    Ok(rows)
}

/// nccl-tests' table header.
pub fn comm_header(comm: &dyn Communicator) -> String {
    format!(
        "# allreduce f32 sum, {}\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7}\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7}",
        comm.describe(),
        "size",
        "count",
        "type",
        "redop",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "(B)",
        "(elements)",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        ""
    )
}

impl CommRow {
    pub fn line(&self) -> String {
        format!(
            " {:>12} {:>12} {:>8} {:>6} {:>12.2} {:>9.2} {:>9.2} {:>7}",
            self.bytes,
            self.count,
            "float",
            "sum",
            self.time_us,
            self.algbw_gbs,
            self.busbw_gbs,
            self.wrong
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::SingleProcess;

    #[test]
    fn sizes_double_from_min_to_max() {
        assert_eq!(sizes(4, 64), vec![4, 8, 16, 32, 64]);
        assert_eq!(sizes(5, 20), vec![4, 8, 16]);
    }

    #[test]
    fn a_single_process_bench_checks_its_sums() {
        let rows = comm_bench(&SingleProcess, &sizes(4, 1024), 1, 3).unwrap();
        assert_eq!(rows.len(), 9);
        assert!(
            rows.iter()
                .all(|r| r.wrong == 0 && r.busbw_gbs == 0.0 && r.time_us >= 0.0)
        );
        assert!(rows[0].line().contains("float"));
    }
}
