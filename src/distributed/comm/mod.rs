//! Communication between ranks behind one small trait ([`Communicator`]).
//!
//! - `single.rs`: one process, every collective the identity (runs and tests without mpirun);
//! - `launcher.rs`: whether an MPI launcher started this process, and what other launchers say;
//! - `mpi/` (feature `mpi`): Open MPI through the `mpi` crate (`mod.rs`), the stall watchdog
//!   (`watchdog.rs`) and the communication thread the trainer talks to (`threaded.rs`).

mod launcher;
#[cfg(feature = "mpi")]
pub mod mpi;
mod single;

pub use launcher::launched_by_mpi;
use launcher::other_launcher;
pub use single::SingleProcess;

/// Collectives the trainer needs. Every rank must make the same calls in the same order.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Rank within this node (for choosing a GPU).
    fn local_rank(&self) -> usize;
    /// recv = Σ over ranks of send (same length on every rank). Kept separate from the in-place form
    /// so that the step can receive straight into the buffer it uploads, with no extra copy.
    fn allreduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> anyhow::Result<()>;
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        let send = buf.to_vec();
        self.allreduce_sum_f32_into(&send, buf)
    }
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
    /// End the whole job after an error on this rank, so that no other rank waits forever in a
    /// collective. Never returns for a multi-rank job.
    fn abort(&self, code: i32);
    /// The communicator's implementation, for logs ("single process", "Open MPI ...").
    fn describe(&self) -> String;
    /// How long a collective may wait before the job is aborted (None: MPI's blocking collectives).
    fn set_collective_timeout(&self, _t: Option<std::time::Duration>) {}
    fn collective_timeout(&self) -> Option<std::time::Duration> {
        None
    }
    /// Begin summing `buf` over the ranks, in place, while the caller goes on (the communication
    /// thread makes the call); [`Communicator::finish_sum_f32`] gives the buffer back summed.
    /// Started sums complete in the order they were started, on every rank alike.
    fn start_sum_f32(&self, mut buf: Vec<f32>) -> anyhow::Result<PendingSum> {
        let t = std::time::Instant::now();
        self.allreduce_sum_f32(&mut buf)?;
        Ok(PendingSum::ready(buf, t.elapsed().as_secs_f64()))
    }
    /// All-to-all of 16-bit words: `send_counts[k]` words (contiguous, in rank order in `send`) go to
    /// rank k; `recv_counts[k]` words from rank k land in `recv`, contiguous in rank order.
    fn all_to_all_u16(
        &self,
        send: &[u16],
        send_counts: &[usize],
        recv: &mut [u16],
        recv_counts: &[usize],
    ) -> anyhow::Result<()>;
    /// All-gather of 16-bit words: rank k's `mine` (`counts[k]` words) lands at its place in `out`.
    fn all_gather_u16(&self, mine: &[u16], counts: &[usize], out: &mut [u16])
    -> anyhow::Result<()>;
    /// Wait for a sum begun by [`Communicator::start_sum_f32`] (under the collective deadline):
    /// the summed buffer and the seconds the sum itself took.
    fn finish_sum_f32(&self, p: PendingSum) -> anyhow::Result<(Vec<f32>, f64)> {
        p.ready.ok_or_else(|| {
            anyhow::anyhow!("a background sum was finished by the wrong communicator")
        })
    }
    /// Begin `job` while the caller goes on: `collectives` collectives, and the work between
    /// them, on the communication thread's own communicator (a bucket codec's exchange, say).
    /// [`Communicator::finish_job`] gives back what it returned. Jobs and background sums
    /// complete in the order they were started, on every rank alike. The default runs the job at
    /// once, on this communicator ([`run_here`]).
    fn start_job(&self, what: &str, collectives: u32, job: Job) -> anyhow::Result<PendingJob>;
    /// Wait for a job begun by [`Communicator::start_job`] (under the collective deadline): what
    /// it returned and the seconds it took.
    fn finish_job(&self, p: PendingJob) -> anyhow::Result<(JobOutput, f64)> {
        match p.ready {
            Some((out, secs)) => Ok((out?, secs)),
            None => anyhow::bail!("a background job was finished by the wrong communicator"),
        }
    }
}

/// Run `job` at once on `comm`: a job already done (how communicators without a thread of their
/// own start jobs).
pub fn run_here(comm: &dyn Communicator, job: Job) -> PendingJob {
    let t = std::time::Instant::now();
    let out = job(comm);
    PendingJob::ready(out, t.elapsed().as_secs_f64())
}

/// What a background job returns (the caller knows its type).
pub type JobOutput = Box<dyn std::any::Any + Send>;

/// A job for the communication thread: it runs collectives on the communicator it is given.
pub type Job = Box<dyn FnOnce(&dyn Communicator) -> anyhow::Result<JobOutput> + Send>;

/// A background job in flight (see [`Communicator::start_job`]).
pub struct PendingJob {
    ready: Option<(anyhow::Result<JobOutput>, f64)>,
    #[cfg(feature = "mpi")]
    waiting: Option<mpi::threaded::WaitingJob>,
}

impl PendingJob {
    /// A job that has already run, and the seconds it took.
    pub fn ready(out: anyhow::Result<JobOutput>, seconds: f64) -> Self {
        Self {
            ready: Some((out, seconds)),
            #[cfg(feature = "mpi")]
            waiting: None,
        }
    }
}

/// A sum over the ranks in flight (see [`Communicator::start_sum_f32`]).
pub struct PendingSum {
    ready: Option<(Vec<f32>, f64)>,
    #[cfg(feature = "mpi")]
    waiting: Option<mpi::threaded::Waiting>,
}

impl PendingSum {
    /// A sum that is already complete, and the seconds it took.
    pub fn ready(buf: Vec<f32>, seconds: f64) -> Self {
        Self {
            ready: Some((buf, seconds)),
            #[cfg(feature = "mpi")]
            waiting: None,
        }
    }
}

/// MPI when launched by an MPI launcher (and built with the `mpi` feature), else a single process.
/// `timeout`: how long any collective may wait before the job is aborted (None: forever).
///
/// A job that another launcher says has several ranks (torchrun's `WORLD_SIZE`, `srun` without
/// PMI) is refused: N lonely copies would each train alone and overwrite one another's files.
pub fn from_env(timeout: Option<std::time::Duration>) -> anyhow::Result<Box<dyn Communicator>> {
    if !launched_by_mpi()
        && let Some((var, n)) = other_launcher()
    {
        let how = if var == "WORLD_SIZE" {
            format!(
                "torchrun-style launch; dptrain's ranks talk through MPI: use `mpirun -np {n} dptrain ...`"
            )
        } else {
            format!(
                "srun without an MPI plug-in: use `srun --mpi=pmix ...` (or `mpirun -np {n} dptrain ...`)"
            )
        };
        anyhow::bail!(
            "{var}={n} says this is one of {n} ranks, but no MPI launcher started it ({how})"
        );
    }
    if launched_by_mpi() {
        #[cfg(feature = "mpi")]
        return Ok(Box::new(mpi::threaded::Threaded::start(timeout)?));
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            anyhow::bail!(
                "started under an MPI launcher, but this dptrain was built without the `mpi` feature"
            );
        }
    }
    Ok(Box::new(SingleProcess))
}
