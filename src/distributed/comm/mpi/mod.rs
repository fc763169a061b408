//! Open MPI through the `mpi` crate. MPI errors are fatal (MPI's default handler), so a failed
//! collective ends the job rather than returning; a rank that dies makes mpirun end the job.
//! `watchdog.rs` adds the arrival check before each collective; `threaded.rs` runs this
//! communicator on a thread of its own.

pub mod threaded;
mod watchdog;

use std::cell::Cell;
use std::time::Duration;

use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::raw::AsRaw;
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{CommunicatorCollectives, Root};

use super::Communicator;

/// Tag of the arrival messages.
const ARRIVE: i32 = 7001;
/// How long the other ranks wait for rank 0's report before aborting themselves.
const GRACE: Duration = Duration::from_secs(2);
/// How much longer than the timeout and the grace the training thread waits for the
/// communication thread before it ends the job itself: the arrival check (which names the
/// missing ranks) comes first.
const SLACK: Duration = Duration::from_millis(500);

pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    version: String,
    timeout: Cell<Option<Duration>>,
    /// Collectives started so far (the k of "collective k").
    seq: Cell<u64>,
    // dropped last: finalises MPI
    _universe: Universe,
}

impl MpiComm {
    /// Initialise MPI at (up to) `level`; also returns the level the library provides.
    pub fn init_with(
        timeout: Option<Duration>,
        level: Threading,
    ) -> anyhow::Result<(Self, Threading)> {
        let (universe, provided) = mpi::initialize_with_threading(level)
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
        let world = universe.world();
        // ranks sharing a node's memory: the node-local rank picks the GPU
        let local = world.split_shared(world.rank());
        let version = mpi::environment::library_version().unwrap_or_default();
        let comm = Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            local_rank: local.rank() as usize,
            world,
            // "Open MPI v4.1.4, package: ..." → "Open MPI v4.1.4"
            version: version
                .split([',', '\n'])
                .next()
                .unwrap_or("MPI")
                .trim()
                .to_string(),
            timeout: Cell::new(timeout),
            seq: Cell::new(0),
            _universe: universe,
        };
        Ok((comm, provided))
    }

    /// buf = Σ over ranks of buf, in place (Open MPI's MPI_IN_PLACE), under the watchdog's
    /// arrival check.
    fn sum_in_place_f32(&self, buf: &mut [f32]) {
        self.arrive(|| format!("allreduce of {} f32", buf.len()));
        if self.size == 1 || buf.is_empty() {
            return;
        }
        if self.version.starts_with("Open MPI") {
            for chunk in buf.chunks_mut(1 << 30) {
                // SAFETY: Open MPI defines MPI_IN_PLACE as (void *) 1; `chunk` is a live,
                // exclusive f32 slice of the given length (< 2^31), and the call returns
                // when the sum is complete.
                #[allow(clippy::manual_dangling_ptr)] // the sentinel's value, not a pointer
                unsafe {
                    mpi::ffi::MPI_Allreduce(
                        1usize as *const std::ffi::c_void,
                        chunk.as_mut_ptr().cast(),
                        chunk.len() as i32,
                        mpi::ffi::RSMPI_FLOAT,
                        mpi::ffi::RSMPI_SUM,
                        self.world.as_raw(),
                    );
                }
            }
        } else {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
    }

    /// recv = Σ over ranks of send.
    fn sum_into<T: Equivalence>(&self, send: &[T], recv: &mut [T], ty: &str) {
        self.arrive(|| format!("allreduce of {} {ty}", send.len()));
        self.world
            .all_reduce_into(send, recv, SystemOperation::sum());
    }

    fn next_seq(&self) -> u64 {
        let k = self.seq.get() + 1;
        self.seq.set(k);
        k
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn allreduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            send.len() == recv.len(),
            "allreduce buffers differ in length"
        );
        self.sum_into(send, recv, "f32");
        Ok(())
    }
    fn start_job(
        &self,
        _what: &str,
        _collectives: u32,
        job: crate::distributed::comm::Job,
    ) -> anyhow::Result<crate::distributed::comm::PendingJob> {
        Ok(crate::distributed::comm::run_here(self, job))
    }
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        // in place, as the threaded communicator sums (jobs on its thread call this)
        self.sum_in_place_f32(buf);
        Ok(())
    }
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> anyhow::Result<()> {
        let send = buf.to_vec();
        self.sum_into(&send, buf, "f64");
        Ok(())
    }
    fn allreduce_sum_u64(&self, buf: &mut [u64]) -> anyhow::Result<()> {
        let send = buf.to_vec();
        self.sum_into(&send, buf, "u64");
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        self.arrive(|| format!("broadcast of {} f32", buf.len()));
        self.world.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        // never send an empty buffer: an empty slice's dangling pointer (0x1) is what Open MPI
        // uses for MPI_IN_PLACE, so a leading byte goes with every message and is dropped after
        let framed: Vec<u8> = std::iter::once(1u8).chain(mine.iter().copied()).collect();
        let n = self.size;
        let mut lens = vec![0i32; n];
        let my_len = [i32::try_from(framed.len())?];
        self.arrive(|| "gather".to_string());
        self.world.all_gather_into(&my_len[..], &mut lens[..]);
        let displs: Vec<i32> = lens
            .iter()
            .scan(0i32, |acc, &l| {
                let d = *acc;
                *acc += l;
                Some(d)
            })
            .collect();
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &lens[..], &displs[..]);
            self.world.all_gather_varcount_into(&framed[..], &mut part);
        }
        Ok(lens
            .iter()
            .zip(&displs)
            .map(|(&l, &d)| all[d as usize + 1..(d + l) as usize].to_vec())
            .collect())
    }
    fn barrier(&self) -> anyhow::Result<()> {
        self.arrive(|| "barrier".to_string());
        self.world.barrier();
        Ok(())
    }
    fn all_to_all_u16(
        &self,
        send: &[u16],
        send_counts: &[usize],
        recv: &mut [u16],
        recv_counts: &[usize],
    ) -> anyhow::Result<()> {
        let (sc, sd) = counts_displs(send_counts, send.len())?;
        let (rc, rd) = counts_displs(recv_counts, recv.len())?;
        self.arrive(|| format!("all-to-all of {} u16", send.len()));
        let sp = Partition::new(send, &sc[..], &sd[..]);
        let mut rp = PartitionMut::new(recv, &rc[..], &rd[..]);
        self.world.all_to_all_varcount_into(&sp, &mut rp);
        Ok(())
    }
    fn all_gather_u16(
        &self,
        mine: &[u16],
        counts: &[usize],
        out: &mut [u16],
    ) -> anyhow::Result<()> {
        let (c, d) = counts_displs(counts, out.len())?;
        anyhow::ensure!(
            mine.len() == counts[self.rank],
            "all-gather: this rank's part differs from its count"
        );
        self.arrive(|| format!("all-gather of {} u16", out.len()));
        let mut rp = PartitionMut::new(out, &c[..], &d[..]);
        self.world.all_gather_varcount_into(mine, &mut rp);
        Ok(())
    }
    fn set_collective_timeout(&self, t: Option<Duration>) {
        self.timeout.set(t);
    }
    fn collective_timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }
    fn abort(&self, code: i32) {
        if self.size > 1 {
            self.world.abort(code);
        }
    }
    fn describe(&self) -> String {
        format!("{} ranks, {}", self.size, self.version)
    }
}

/// MPI's counts and displacements (i32) of contiguous parts, checked against the buffer.
fn counts_displs(counts: &[usize], len: usize) -> anyhow::Result<(Vec<i32>, Vec<i32>)> {
    let total: usize = counts.iter().sum();
    anyhow::ensure!(total == len, "parts of {total} words for a buffer of {len}");
    let c = counts
        .iter()
        .map(|&n| i32::try_from(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut d = Vec::with_capacity(c.len());
    let mut at = 0i32;
    for &n in &c {
        d.push(at);
        at = at
            .checked_add(n)
            .ok_or_else(|| anyhow::anyhow!("a collective of more than 2^31 words"))?;
    }
    Ok((c, d))
}
