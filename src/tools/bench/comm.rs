//! `bench comm`: the allreduce itself, laid out like nccl-tests so that the trainer's exchange can
//! be set beside raw MPI.

use std::time::Instant;

use anyhow::ensure;
use serde::{Deserialize, Serialize};

use crate::distributed::comm::Communicator;
use crate::distributed::probe::{memcpy_secs, slowest};

/// One row of `bench comm`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CommRow {
    /// Ranks in the allreduce (absent in files of older builds: `bench scaling` then infers it
    /// from busbw / algbw).
    #[serde(default)]
    pub ranks: u64,
    pub bytes: u64,
    pub count: u64,
    pub time_us: f64,
    /// bytes / time
    pub algbw_gbs: f64,
    /// algbw · 2(n-1)/n: the per-link traffic of a ring allreduce, comparable across rank counts
    pub busbw_gbs: f64,
    /// elements whose sum was wrong
    pub wrong: u64,
    /// The same allreduce through the stall watchdog (non-blocking, polled), as training runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guarded_time_us: Option<f64>,
    /// A one-process `copy_from_slice` of the same bytes between two preallocated buffers, on every
    /// rank at once, as many times as the allreduce (the fastest copy, slowest rank): bytes / time.
    #[serde(default)]
    pub memcpy_gbs: f64,
    /// busbw / memcpy: how close the allreduce comes to the memory copy (a shared-memory ring moves
    /// every byte twice, so about 0.5 is as good as it gets on one node).
    #[serde(default)]
    pub busbw_over_memcpy: f64,
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

/// Allreduce f32 buffers of each size with MPI's blocking allreduce, `iters` times after `warmup`,
/// checking every element of the result; and, where the communicator has a collective timeout,
/// again through the watchdog's guarded path.
pub fn comm_bench(
    comm: &dyn Communicator,
    sizes: &[u64],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Vec<CommRow>> {
    let guard = comm.collective_timeout();
    comm.set_collective_timeout(None);
    let raw = comm_rows(comm, sizes, warmup, iters);
    comm.set_collective_timeout(guard);
    let mut rows = raw?;
    if guard.is_some() && comm.size() > 1 {
        for (row, g) in rows.iter_mut().zip(comm_rows(comm, sizes, warmup, iters)?) {
            row.guarded_time_us = Some(g.time_us);
            row.wrong += g.wrong;
        }
    }
    for row in &mut rows {
        comm.barrier()?;
        let mine = memcpy_secs(row.bytes, warmup, iters);
        // a timer tick at the least: a few bytes copy faster than the clock resolves
        let secs = slowest(comm, &[mine])?[0].max(1e-9);
        row.memcpy_gbs = row.bytes as f64 / secs / 1e9;
        row.busbw_over_memcpy = row.busbw_gbs / row.memcpy_gbs;
    }
    Ok(rows)
}

fn comm_rows(
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
            ranks: n as u64,
            bytes,
            count: count as u64,
            time_us: secs * 1e6,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (n - 1.0) / n,
            wrong: wrong[0],
            guarded_time_us: None,
            memcpy_gbs: 0.0,
            busbw_over_memcpy: 0.0,
        });
    }
    Ok(rows)
}

/// nccl-tests' table header.
pub fn comm_header(comm: &dyn Communicator) -> String {
    format!(
        "# allreduce f32 sum, {}; time: MPI_Allreduce; guarded: the same through the stall watchdog;\n# memcpy: copy_from_slice of the same bytes on every rank at once (best of the iterations); bus/mem: busbw / memcpy\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7} {:>12} {:>9} {:>8}\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7} {:>12} {:>9} {:>8}",
        comm.describe(),
        "size",
        "count",
        "type",
        "redop",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "guarded",
        "memcpy",
        "bus/mem",
        "(B)",
        "(elements)",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
        "(us)",
        "(GB/s)",
        ""
    )
}

impl CommRow {
    pub fn line(&self) -> String {
        format!(
            " {:>12} {:>12} {:>8} {:>6} {:>12.2} {:>9.2} {:>9.2} {:>7} {:>12} {:>9.2} {:>8.3}",
            self.bytes,
            self.count,
            "float",
            "sum",
            self.time_us,
            self.algbw_gbs,
            self.busbw_gbs,
            self.wrong,
            self.guarded_time_us
                .map_or_else(|| "-".to_string(), |t| format!("{t:.2}")),
            self.memcpy_gbs,
            self.busbw_over_memcpy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::comm::SingleProcess;

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
        assert!(rows.iter().all(|r| r.ranks == 1
            && r.memcpy_gbs > 0.0
            && r.memcpy_gbs.is_finite()
            && r.busbw_over_memcpy == 0.0));
        assert_eq!(rows[0].line().split_whitespace().count(), 11);
        // the JSON rows read back, and so do those of older builds (no ranks, no memcpy)
        let text = serde_json::to_string(&rows).unwrap();
        let back: Vec<CommRow> = serde_json::from_str(&text).unwrap();
        assert!(back.iter().zip(&rows).all(|(b, r)| b.bytes == r.bytes
            && b.ranks == r.ranks
            && (b.memcpy_gbs / r.memcpy_gbs - 1.0).abs() < 1e-12));
        let old = r#"[{"bytes":8,"count":2,"time_us":1.5,"algbw_gbs":0.005,"busbw_gbs":0.005,"wrong":0}]"#;
        let old: Vec<CommRow> = serde_json::from_str(old).unwrap();
        assert_eq!((old[0].ranks, old[0].memcpy_gbs), (0, 0.0));
    }
}
