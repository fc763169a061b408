//! Communication between ranks behind one small trait; a single-process implementation for runs and
//! tests without mpirun. The MPI implementation lives in `comm::mpi` (feature `mpi`).

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
}

/// A sum over the ranks in flight (see [`Communicator::start_sum_f32`]).
pub struct PendingSum {
    ready: Option<(Vec<f32>, f64)>,
    #[cfg(feature = "mpi")]
    waiting: Option<mpi_comm::Waiting>,
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

/// Whether this process was started by an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx).
pub fn launched_by_mpi() -> bool {
    match std::env::var("DPTRAIN_MPI").as_deref() {
        Ok("0") | Ok("off") => return false,
        Ok("1") | Ok("on") => return true,
        _ => {}
    }
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// What non-MPI launchers say about the job: (variable, ranks) when torchrun's `WORLD_SIZE` or
/// Slurm's `SLURM_NTASKS` names more than one rank.
fn other_launcher() -> Option<(&'static str, u64)> {
    ["WORLD_SIZE", "SLURM_NTASKS"].into_iter().find_map(|v| {
        let n = std::env::var(v).ok()?.trim().parse::<u64>().ok()?;
        (n > 1).then_some((v, n))
    })
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
        return Ok(Box::new(mpi_comm::Threaded::start(timeout)?));
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
    fn abort(&self, _code: i32) {}
    fn describe(&self) -> String {
        "single process".into()
    }
}

#[cfg(feature = "mpi")]
pub mod mpi_comm {
    //! Open MPI through the `mpi` crate. MPI errors are fatal (MPI's default handler), so a failed
    //! collective ends the job rather than returning; a rank that dies makes mpirun end the job.
    //!
    //! The stall watchdog: with a timeout, every collective is preceded by an arrival check, a
    //! one-word non-blocking allreduce that is polled, while each rank sends rank 0 a small "arrived
    //! at collective k" message. When the check has not completed within the timeout, rank 0 names
    //! the ranks whose arrival it has not received and aborts the job; the other ranks give rank 0 a
    //! few seconds to report, then abort too. Once everyone has arrived, the data moves through MPI's
    //! own blocking (tuned) collective, so the watchdog costs one tiny collective, not bandwidth.
    //! Without a timeout there is no check.

    use std::cell::Cell;
    use std::time::{Duration, Instant};

    use mpi::collective::SystemOperation;
    use mpi::datatype::{Equivalence, Partition, PartitionMut};
    use mpi::environment::{Threading, Universe};
    use mpi::raw::AsRaw;
    use mpi::request::{LocalScope, Request, Scope};
    use mpi::topology::Communicator as _;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{CommunicatorCollectives, Destination, Root, Source};

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
        pub fn init(timeout: Option<Duration>) -> anyhow::Result<Self> {
            Self::init_with(timeout, Threading::Single).map(|(c, _)| c)
        }

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
            Ok(Self {
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
            }
            .with_provided(provided))
        }

        fn with_provided(self, provided: Threading) -> (Self, Threading) {
            (self, provided)
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

        /// Run one collective under the watchdog: `start` begins it non-blocking in `scope`.
        #[allow(clippy::too_many_arguments)]
        fn guarded<'a, 'b, B: ?Sized + 'a, S: Scope<'a>>(
            &self,
            scope: &'b LocalScope<'a>,
            what: &str,
            timeout: Duration,
            kbuf: &'a u64,
            arrived: &'a mut [u64],
            start: impl FnOnce() -> Request<'a, B, S>,
        ) {
            let k = *kbuf;
            let mut send = None;
            let mut recvs: Vec<Option<Request<'a, u64, &'b LocalScope<'a>>>> = Vec::new();
            if self.rank == 0 {
                for (r, slot) in arrived.iter_mut().enumerate().skip(1) {
                    let p = self.world.process_at_rank(r as i32);
                    recvs.push(Some(p.immediate_receive_into_with_tag(scope, slot, ARRIVE)));
                }
            } else {
                let root = self.world.process_at_rank(0);
                send = Some(root.immediate_send_with_tag(scope, kbuf, ARRIVE));
            }
            let mut req = Some(start());
            let t0 = Instant::now();
            let mut polls = 0u64;
            while let Some(r) = req.take() {
                match r.test() {
                    Ok(_) => break,
                    Err(r) => req = Some(r),
                }
                for slot in recvs.iter_mut() {
                    if let Some(r) = slot.take() {
                        if let Err(r) = r.test() {
                            *slot = Some(r);
                        }
                    }
                }
                let waited = t0.elapsed();
                if waited > timeout {
                    let pending: Vec<bool> = recvs.iter().map(Option::is_some).collect();
                    self.stalled(k, what, waited, &pending);
                }
                // poll hard while the collective is young (non-blocking collectives progress only
                // inside MPI calls), then back off once it is clearly waiting for a slow rank
                polls += 1;
                if waited > Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(1));
                } else if polls.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            // everyone arrived, so every arrival message has been sent and can complete
            if let Some(s) = send {
                s.wait();
            }
            for r in recvs.into_iter().flatten() {
                r.wait();
            }
        }

        /// Report a stalled collective and end the job.
        /// `pending[i]`: rank i + 1's arrival has not been received (meaningful on rank 0).
        fn stalled(&self, k: u64, what: &str, waited: Duration, pending: &[bool]) -> ! {
            if self.rank == 0 {
                let missing: Vec<String> = pending
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| **p)
                    .map(|(i, _)| (i + 1).to_string())
                    .collect();
                eprintln!(
                    "error: collective #{k} ({what}) did not complete within {:.0} s (--collective-timeout): rank(s) {} have not arrived; aborting the job",
                    waited.as_secs_f64(),
                    missing.join(", ")
                );
            } else {
                // let rank 0 name the missing ranks first; if it cannot, it is the one missing
                std::thread::sleep(GRACE);
                eprintln!(
                    "error: rank {}: collective #{k} ({what}) did not complete within {:.0} s (--collective-timeout); rank 0 has not reported, so it has probably not arrived; aborting the job",
                    self.rank,
                    waited.as_secs_f64()
                );
            }
            self.world.abort(3)
        }

        /// recv = Σ over ranks of send.
        fn sum_into<T: Equivalence>(&self, send: &[T], recv: &mut [T], ty: &str) {
            self.arrive(|| format!("allreduce of {} {ty}", send.len()));
            self.world
                .all_reduce_into(send, recv, SystemOperation::sum());
        }

        /// The watchdog's arrival check before collective k (nothing without a timeout).
        fn arrive(&self, what: impl FnOnce() -> String) {
            let k = self.next_seq();
            let Some(t) = self.timeout.get() else {
                return;
            };
            let what = what();
            let mut arrived = vec![0u64; self.size];
            let one = [1u64];
            let mut all = [0u64];
            mpi::request::scope(|scope| {
                self.guarded(scope, &what, t, &k, &mut arrived, || {
                    self.world.immediate_all_reduce_into(
                        scope,
                        &one[..],
                        &mut all[..],
                        SystemOperation::sum(),
                    )
                })
            });
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

    /// A job the training thread hands the communication thread.
    type Job = Box<dyn FnOnce(&MpiComm) + Send>;

    /// A borrowed buffer handed to the communication thread. The training thread waits for the
    /// job that uses it (or ends the process), so the borrow outlives every use.
    struct Raw<T>(*mut T, usize);
    // SAFETY: see above; the pointee is only touched by one thread at a time.
    unsafe impl<T> Send for Raw<T> {}
    impl<T> Raw<T> {
        fn of(s: &[T]) -> Self {
            Raw(s.as_ptr().cast_mut(), s.len())
        }
        fn of_mut(s: &mut [T]) -> Self {
            Raw(s.as_mut_ptr(), s.len())
        }
        /// SAFETY: the slice this came from is alive and not used by anyone else meanwhile.
        unsafe fn get<'a>(&self) -> &'a mut [T] {
            unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
        }
    }

    /// A background sum's reply.
    pub struct Waiting {
        rx: std::sync::mpsc::Receiver<(Vec<f32>, f64)>,
        k: u64,
        what: String,
    }

    /// MPI on a dedicated communication thread, the only one that calls MPI (apart from MPI_Abort
    /// when the library is thread-multiple). The training thread hands it jobs and waits for each
    /// with a deadline, `--collective-timeout` plus a little: a rank that stops inside the data
    /// transfer itself (where the arrival check has already passed) still ends the job in time.
    /// Background sums (`start_sum_f32`) let the training thread go on while they run.
    pub struct Threaded {
        jobs: std::sync::mpsc::Sender<Job>,
        rank: usize,
        size: usize,
        local_rank: usize,
        describe: String,
        multiple: bool,
        timeout: Cell<Option<Duration>>,
        /// Collectives handed over so far (the k of "collective k", as the thread counts them).
        seq: Cell<u64>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Threaded {
        pub fn start(timeout: Option<Duration>) -> anyhow::Result<Self> {
            let (jobs, rx) = std::sync::mpsc::channel::<Job>();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("dptrain-comm".into())
                .spawn(move || {
                    let comm = match MpiComm::init_with(timeout, Threading::Multiple) {
                        Ok((c, provided)) => {
                            let _ = ready_tx.send(Ok((
                                c.rank,
                                c.size,
                                c.local_rank,
                                c.describe(),
                                provided == Threading::Multiple,
                            )));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    // jobs in order until the training side hangs up; dropping `comm` finalises MPI
                    while let Ok(job) = rx.recv() {
                        job(&comm);
                    }
                })?;
            let (rank, size, local_rank, describe, multiple) = ready
                .recv()
                .map_err(|_| anyhow::anyhow!("the MPI communication thread ended at start-up"))??;
            Ok(Self {
                jobs,
                rank,
                size,
                local_rank,
                describe,
                multiple,
                timeout: Cell::new(timeout),
                seq: Cell::new(0),
                thread: Some(thread),
            })
        }

        fn next_seq(&self) -> u64 {
            let k = self.seq.get() + 1;
            self.seq.set(k);
            k
        }

        /// Hand `job` (collective k, described by `what`) to the communication thread.
        fn submit<R: Send + 'static>(
            &self,
            job: impl FnOnce(&MpiComm) -> R + Send + 'static,
        ) -> std::sync::mpsc::Receiver<R> {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let sent = self.jobs.send(Box::new(move |c: &MpiComm| {
                let _ = tx.send(job(c));
            }));
            if sent.is_err() {
                self.end("the MPI communication thread has ended");
            }
            rx
        }

        /// Wait for a job's reply under the deadline.
        fn wait<R>(
            &self,
            rx: &std::sync::mpsc::Receiver<R>,
            k: u64,
            what: &dyn Fn() -> String,
        ) -> R {
            use std::sync::mpsc::RecvTimeoutError;
            match self.timeout.get() {
                None => match rx.recv() {
                    Ok(r) => r,
                    Err(_) => self.end("the MPI communication thread has ended"),
                },
                Some(t) => match rx.recv_timeout(t + GRACE + SLACK) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => self.end(&format!(
                        "collective #{k} ({}) did not complete within {:.0} s (--collective-timeout): every rank arrived, then a rank stopped responding during the transfer; aborting the job",
                        what(),
                        (t + GRACE + SLACK).as_secs_f64()
                    )),
                    Err(RecvTimeoutError::Disconnected) => {
                        self.end("the MPI communication thread has ended")
                    }
                },
            }
        }

        /// Run `job` as collective k and wait for it.
        fn run<R: Send + 'static>(
            &self,
            what: impl Fn() -> String,
            job: impl FnOnce(&MpiComm) -> R + Send + 'static,
        ) -> R {
            let k = self.next_seq();
            // the description is formatted only for the timeline or for a deadline's message
            let rx = match crate::trace::enabled() {
                true => {
                    let name = what();
                    self.submit(move |c| {
                        let _g = crate::trace::span(name, "comm").arg("collective", k);
                        job(c)
                    })
                }
                false => self.submit(job),
            };
            self.wait(&rx, k, &what)
        }

        /// One line, then the job ends: MPI_Abort from this thread when MPI is thread-multiple,
        /// else an exit without MPI_Finalize, which mpirun turns into the job's end.
        fn end(&self, msg: &str) -> ! {
            let line = format!("error: rank {}: {msg}\n", self.rank);
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            if self.multiple && self.size > 1 {
                // SAFETY: MPI is initialised at MPI_THREAD_MULTIPLE, so any thread may call it.
                unsafe {
                    mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 3);
                }
            }
            // SAFETY: _exit ends the process at once; no Rust state is observed afterwards.
            unsafe { libc::_exit(3) }
        }
    }

    impl Drop for Threaded {
        fn drop(&mut self) {
            // hang up, then let the thread finalise MPI
            let (tx, _) = std::sync::mpsc::channel();
            drop(std::mem::replace(&mut self.jobs, tx));
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    impl Communicator for Threaded {
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
            let (s, r) = (Raw::of(send), Raw::of_mut(recv));
            let n = send.len();
            // SAFETY: `run` returns only after the job has run (or ends the process).
            self.run(
                || format!("allreduce of {n} f32"),
                move |c| unsafe { c.sum_into(s.get(), r.get(), "f32") },
            );
            Ok(())
        }
        fn allreduce_sum_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
            let b = Raw::of_mut(buf);
            let n = buf.len();
            // SAFETY: as above
            self.run(
                || format!("allreduce of {n} f32"),
                move |c| unsafe { c.sum_in_place_f32(b.get()) },
            );
            Ok(())
        }
        fn allreduce_sum_f64(&self, buf: &mut [f64]) -> anyhow::Result<()> {
            let b = Raw::of_mut(buf);
            let n = buf.len();
            // SAFETY: as above
            self.run(
                || format!("allreduce of {n} f64"),
                move |c| unsafe { c.allreduce_sum_f64(b.get()) },
            )
        }
        fn allreduce_sum_u64(&self, buf: &mut [u64]) -> anyhow::Result<()> {
            let b = Raw::of_mut(buf);
            let n = buf.len();
            // SAFETY: as above
            self.run(
                || format!("allreduce of {n} u64"),
                move |c| unsafe { c.allreduce_sum_u64(b.get()) },
            )
        }
        fn broadcast_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
            let b = Raw::of_mut(buf);
            let n = buf.len();
            // SAFETY: as above
            self.run(
                || format!("broadcast of {n} f32"),
                move |c| unsafe { c.broadcast_f32(b.get()) },
            )
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
            let mine = mine.to_vec();
            self.run(|| "gather".into(), move |c| c.all_gather_bytes(&mine))
        }
        fn barrier(&self) -> anyhow::Result<()> {
            self.run(|| "barrier".into(), |c| c.barrier())
        }
        fn all_to_all_u16(
            &self,
            send: &[u16],
            send_counts: &[usize],
            recv: &mut [u16],
            recv_counts: &[usize],
        ) -> anyhow::Result<()> {
            let (s, r) = (Raw::of(send), Raw::of_mut(recv));
            let (sc, rc) = (send_counts.to_vec(), recv_counts.to_vec());
            let n = send.len();
            // SAFETY: `run` returns only after the job has run (or ends the process).
            self.run(
                || format!("all-to-all of {n} u16"),
                move |c| unsafe { c.all_to_all_u16(s.get(), &sc, r.get(), &rc) },
            )
        }
        fn all_gather_u16(
            &self,
            mine: &[u16],
            counts: &[usize],
            out: &mut [u16],
        ) -> anyhow::Result<()> {
            let (m, o) = (Raw::of(mine), Raw::of_mut(out));
            let counts = counts.to_vec();
            let n = out.len();
            // SAFETY: as above
            self.run(
                || format!("all-gather of {n} u16"),
                move |c| unsafe { c.all_gather_u16(m.get(), &counts, o.get()) },
            )
        }
        fn set_collective_timeout(&self, t: Option<Duration>) {
            self.timeout.set(t);
            let _ = self.submit(move |c| c.set_collective_timeout(t));
        }
        fn collective_timeout(&self) -> Option<Duration> {
            self.timeout.get()
        }
        fn abort(&self, code: i32) {
            if self.size > 1 {
                if self.multiple {
                    // SAFETY: thread-multiple MPI may be called from any thread.
                    unsafe {
                        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
                    }
                }
                // SAFETY: as in `end`
                unsafe { libc::_exit(code) }
            }
        }
        fn describe(&self) -> String {
            self.describe.clone()
        }
        fn start_sum_f32(&self, mut buf: Vec<f32>) -> anyhow::Result<super::PendingSum> {
            let k = self.next_seq();
            let what = format!("allreduce of {} f32", buf.len());
            let rx = self.submit(move |c| {
                let _g = crate::trace::span("allreduce", "comm")
                    .arg("collective", k)
                    .arg("bytes", 4 * buf.len());
                let t = Instant::now();
                c.sum_in_place_f32(&mut buf);
                (buf, t.elapsed().as_secs_f64())
            });
            Ok(super::PendingSum {
                ready: None,
                waiting: Some(Waiting { rx, k, what }),
            })
        }
        fn finish_sum_f32(&self, p: super::PendingSum) -> anyhow::Result<(Vec<f32>, f64)> {
            match (p.ready, p.waiting) {
                (Some(b), _) => Ok(b),
                (None, Some(w)) => Ok(self.wait(&w.rx, w.k, &|| w.what.clone())),
                (None, None) => anyhow::bail!("an empty background sum"),
            }
        }
    }
}
