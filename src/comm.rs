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
        return Ok(Box::new(mpi_comm::MpiComm::init(timeout)?));
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
    use mpi::datatype::{Equivalence, PartitionMut};
    use mpi::environment::Universe;
    use mpi::request::{LocalScope, Request, Scope};
    use mpi::topology::Communicator as _;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{CommunicatorCollectives, Destination, Root, Source};

    use super::Communicator;

    /// Tag of the arrival messages.
    const ARRIVE: i32 = 7001;
    /// How long the other ranks wait for rank 0's report before aborting themselves.
    const GRACE: Duration = Duration::from_secs(5);

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
            let universe =
                mpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
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
            })
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
}
