//! The start-up transport probe: one node's allreduce measured against a memory copy, with a
//! warning naming what helps when it runs far below it.

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

use crate::distributed::comm::Communicator;

/// Seconds of the fastest of `iters` `copy_from_slice`s of `bytes` bytes between two preallocated
/// f32 buffers, each timed alone, after `warmup` (at least one, which also faults the pages in).
/// The best, not the mean: the copy stands for what the memory can do, and on a busy machine one
/// preemption would otherwise decide a small copy's figure.
pub fn memcpy_secs(bytes: u64, warmup: usize, iters: usize) -> f64 {
    let count = (bytes / 4) as usize;
    let src = vec![1f32; count];
    let mut dst = vec![0f32; count];
    for _ in 0..warmup.max(1) {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// The largest value over the ranks of each of `mine` (collective).
pub fn slowest(comm: &dyn Communicator, mine: &[f64]) -> anyhow::Result<Vec<f64>> {
    let k = mine.len();
    let mut all = vec![0f64; k * comm.size()];
    all[comm.rank() * k..(comm.rank() + 1) * k].copy_from_slice(mine);
    comm.allreduce_sum_f64(&mut all)?;
    Ok((0..k)
        .map(|i| all.iter().skip(i).step_by(k).cloned().fold(0.0, f64::max))
        .collect())
}

// The start-up transport probe

/// Bytes of the probe's allreduce: the trainer's bucket size (docs/PERF.md), well inside Open
/// MPI's ≤ 16 MiB regime, and large enough that the latency is a small part of the time.
pub const PROBE_BYTES: u64 = 4 << 20;

/// The probe warns when the allreduce's bus bandwidth is below this share of a memory copy of the
/// same 4 MiB.
///
/// Measured on the H200 machine's host (16 cores, 300 MiB L3, Open MPI 4.1.6; docs/PERF.md,
/// "Choosing bucket sizes and MPI settings"; docs/data/h200-host-probes.txt): the probe's ratio was
/// 0.16–0.33 over nine runs with shared memory at 2, 4 and 8 ranks, 0.22–0.25 with the ring
/// forced, 0.13–0.17 over the TCP loopback (a working, slower transport), and 0.052 with 32 ranks
/// on the 16 cores. A copy of 4 MiB stays in the cache, so a healthy ratio is well under the 0.5
/// that two copies per byte would allow against memory. One tenth lies 1.6× below the lowest
/// healthy run, so the noise of a 0.05 s probe does not trip it, and 2× above the crowded node.
/// It flags a transport an order of magnitude off, not a slow-but-working one.
pub const PROBE_MIN_RATIO: f64 = 0.1;

/// How long the timed allreduces of the probe may take together (s); the probe as a whole adds a
/// warm-up allreduce, a 4 MiB copy and three small collectives.
const PROBE_TIMED_BUDGET_S: f64 = 0.08;

/// What the transport probe measured (identical on every rank).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransportProbe {
    pub ranks: usize,
    pub bytes: u64,
    /// Timed allreduces (1 to 8, as many as fit the budget).
    pub iters: usize,
    /// Mean time of one allreduce, slowest rank (µs).
    pub allreduce_us: f64,
    pub busbw_gbs: f64,
    /// `copy_from_slice` of the same bytes on every rank at once (fastest of 4, slowest rank).
    pub memcpy_gbs: f64,
    /// busbw / memcpy
    pub ratio: f64,
    /// CPU cores online on the node (rank 0's view).
    pub cores: usize,
    /// Free space in /dev/shm, where Open MPI's shared-memory transport keeps its segments.
    pub shm_free_bytes: Option<u64>,
    /// Wall time of the probe on rank 0 up to its last collective (s).
    pub seconds: f64,
}

impl TransportProbe {
    /// One warning line when the allreduce runs far below a memory copy, naming what helps.
    pub fn warning(&self) -> Option<String> {
        if self.ratio >= PROBE_MIN_RATIO {
            return None;
        }
        let shm = self.shm_free_bytes.map_or_else(
            || "check its free space".to_string(),
            |b| format!("{:.1} GiB free now", b as f64 / (1u64 << 30) as f64),
        );
        let crowded = if self.ranks > self.cores {
            format!(
                "; {} ranks share {} cores here, and MPI's busy polling alone slows that",
                self.ranks, self.cores
            )
        } else {
            String::new()
        };
        Some(format!(
            "warning: the allreduce between the {} ranks on this node runs at {:.2} GB/s bus bandwidth ({} B in {:.0} us), {:.3}× a memory copy of the same bytes ({:.2} GB/s), where a working node gives 0.15–0.35×: try the ring algorithm (OMPI_MCA_coll_tuned_use_dynamic_rules=1 OMPI_MCA_coll_tuned_allreduce_algorithm=4), a single-copy mechanism (OMPI_MCA_btl_vader_single_copy_mechanism=cma, or xpmem or knem where installed), and room for the shared segments in /dev/shm ({shm}){crowded}",
            self.ranks, self.busbw_gbs, self.bytes, self.allreduce_us, self.ratio, self.memcpy_gbs
        ))
    }

    /// The probe's figures on one line (for `bench comm --probe`).
    pub fn line(&self) -> String {
        format!(
            "transport probe: {} ranks on one node, allreduce of {} B {:.1} us (mean of {}), busbw {:.2} GB/s, memcpy {:.2} GB/s, ratio {:.3} (warns below {:.3}), {:.3} s",
            self.ranks,
            self.bytes,
            self.allreduce_us,
            self.iters,
            self.busbw_gbs,
            self.memcpy_gbs,
            self.ratio,
            PROBE_MIN_RATIO,
            self.seconds
        )
    }
}

/// Free bytes of /dev/shm, when it exists.
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between platforms
fn shm_free_bytes() -> Option<u64> {
    let path = std::ffi::CString::new("/dev/shm").ok()?;
    // SAFETY: statvfs is plain old data; the call fills it or fails, and the path is a valid C string
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Measure the allreduce against a memory copy when all ranks share one node (collective: every
/// rank calls it, and all get the same figures). None with one rank, or when the ranks are spread
/// over several nodes (their allreduce then crosses the network, which a copy does not measure).
///
/// Cost: one hostname gather, four 4 MiB copies, one warm-up allreduce of 4 MiB, then as many timed
/// allreduces as fit 0.08 s (1 to 8), and three small agreements: 0.027–0.049 s measured on the
/// H200 machine's host at 2 to 8 ranks, 0.087 s with 32 ranks on its 16 cores; under 0.2 s unless
/// one 4 MiB allreduce takes more than 0.05 s, when the transport is broken anyway.
pub fn measure_transport(comm: &dyn Communicator) -> anyhow::Result<Option<TransportProbe>> {
    let start = Instant::now();
    let n = comm.size();
    if n < 2 {
        return Ok(None);
    }
    let hosts = comm.all_gather_bytes(crate::store::outputs::hostname().as_bytes())?;
    if hosts.iter().any(|h| h != &hosts[0]) {
        return Ok(None);
    }
    let count = (PROBE_BYTES / 4) as usize;
    let send = vec![1f32; count];
    let mut recv = vec![0f32; count];
    let copy = memcpy_secs(PROBE_BYTES, 1, 4);
    let t = Instant::now();
    comm.allreduce_sum_f32_into(&send, &mut recv)?;
    let warm = t.elapsed().as_secs_f64();
    // every rank takes the same decisions from the same (agreed) figures
    let agreed = slowest(comm, &[warm, copy])?;
    let iters = ((PROBE_TIMED_BUDGET_S / agreed[0].max(1e-9)).floor() as usize).clamp(1, 8);
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        comm.allreduce_sum_f32_into(&send, &mut recv)?;
    }
    let mine = t.elapsed().as_secs_f64() / iters as f64;
    // the node's cores, not this process's affinity mask (mpirun binds each rank to one core)
    // SAFETY: sysconf reads a system constant
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cores = usize::try_from(online)
        .ok()
        .filter(|&c| c > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |c| c.get()));
    let secs = slowest(comm, &[mine])?[0].max(1e-9);
    // rank 0's view of the cores and the time, on every rank
    let mut facts = [0f64; 2];
    if comm.is_root() {
        facts = [cores as f64, start.elapsed().as_secs_f64()];
    }
    comm.allreduce_sum_f64(&mut facts)?;
    let busbw = PROBE_BYTES as f64 / secs / 1e9 * 2.0 * (n as f64 - 1.0) / n as f64;
    let memcpy = PROBE_BYTES as f64 / agreed[1].max(1e-9) / 1e9;
    Ok(Some(TransportProbe {
        ranks: n,
        bytes: PROBE_BYTES,
        iters,
        allreduce_us: secs * 1e6,
        busbw_gbs: busbw,
        memcpy_gbs: memcpy,
        ratio: busbw / memcpy,
        cores: facts[0] as usize,
        shm_free_bytes: shm_free_bytes(),
        seconds: facts[1],
    }))
}

/// The start-up transport probe (collective; every rank gets the same answer): when the ranks
/// share one node and their allreduce of 4 MiB runs below 1/10 of a memory copy's bandwidth
/// ([`PROBE_MIN_RATIO`]), one warning line naming the Open MPI settings that help (the ring
/// algorithm, a single-copy mechanism, room in /dev/shm). None otherwise, and with one rank or
/// ranks on several nodes. Takes well under 0.2 s on a working node ([`measure_transport`]).
pub fn probe_transport(comm: &dyn Communicator) -> anyhow::Result<Option<String>> {
    Ok(measure_transport(comm)?.and_then(|p| p.warning()))
}

/// `bench comm --probe`: run the probe and print its figures and verdict on rank 0.
pub fn print_probe(comm: &dyn Communicator) -> anyhow::Result<()> {
    let probe = measure_transport(comm)?;
    if comm.is_root() {
        match &probe {
            None if comm.size() < 2 => println!("transport probe: skipped (one rank)"),
            None => println!("transport probe: skipped (the ranks are on more than one node)"),
            Some(p) => {
                println!("{}", p.line());
                println!(
                    "transport probe: {}",
                    p.warning().unwrap_or_else(|| "ok".to_string())
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::comm::SingleProcess;

    #[test]
    fn one_process_has_no_transport_to_probe() {
        assert!(measure_transport(&SingleProcess).unwrap().is_none());
        assert!(probe_transport(&SingleProcess).unwrap().is_none());
    }

    fn probe(ratio: f64, ranks: usize, cores: usize) -> TransportProbe {
        TransportProbe {
            ranks,
            bytes: PROBE_BYTES,
            iters: 5,
            allreduce_us: 1000.0,
            busbw_gbs: 6.0 * ratio,
            memcpy_gbs: 6.0,
            ratio,
            cores,
            shm_free_bytes: Some(64 << 30),
            seconds: 0.02,
        }
    }

    #[test]
    fn the_probe_warns_only_far_below_a_memory_copy() {
        // the lowest healthy ratio on the H200 machine's host was 0.157, the TCP loopback 0.132
        assert!(probe(0.157, 8, 16).warning().is_none());
        assert!(probe(0.132, 8, 16).warning().is_none());
        assert!(probe(PROBE_MIN_RATIO, 8, 16).warning().is_none());
        let w = probe(0.05, 2, 16).warning().unwrap();
        assert_eq!(w.lines().count(), 1, "{w}");
        for needle in [
            "OMPI_MCA_coll_tuned_use_dynamic_rules=1 OMPI_MCA_coll_tuned_allreduce_algorithm=4",
            "OMPI_MCA_btl_vader_single_copy_mechanism=cma",
            "xpmem",
            "/dev/shm",
            "64.0 GiB free",
        ] {
            assert!(w.contains(needle), "{needle}: {w}");
        }
        assert!(!w.contains("cores"), "{w}");
        // more ranks than cores is named as a cause too
        assert!(
            probe(0.05, 4, 2)
                .warning()
                .unwrap()
                .contains("4 ranks share 2 cores")
        );
    }
}
