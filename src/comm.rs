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

/// MPI when launched by an MPI launcher (and built with the `mpi` feature), else a single process.
pub fn from_env() -> anyhow::Result<Box<dyn Communicator>> {
    if launched_by_mpi() {
        #[cfg(feature = "mpi")]
        return Ok(Box::new(mpi_comm::MpiComm::init()?));
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started under an MPI launcher, but this dptrain was built without the `mpi` feature"
        );
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
    //! collective ends the job rather than returning.

    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::Communicator as _;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{CommunicatorCollectives, Root};

    use super::Communicator;

    pub struct MpiComm {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        local_rank: usize,
        version: String,
        // dropped last: finalises MPI
        _universe: Universe,
    }

    impl MpiComm {
        pub fn init() -> anyhow::Result<Self> {
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
                _universe: universe,
            })
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
            self.world
                .all_reduce_into(send, recv, SystemOperation::sum());
            Ok(())
        }
        fn allreduce_sum_f64(&self, buf: &mut [f64]) -> anyhow::Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn allreduce_sum_u64(&self, buf: &mut [u64]) -> anyhow::Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn broadcast_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
            self.world.process_at_rank(0).broadcast_into(buf);
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
            // never send an empty buffer: an empty slice's dangling pointer (0x1) is what Open MPI
            // uses for MPI_IN_PLACE, so a leading byte goes with every message and is dropped after
            let framed: Vec<u8> = std::iter::once(1u8).chain(mine.iter().copied()).collect();
            let mine = &framed[..];
            let n = self.size;
            let mut lens = vec![0i32; n];
            let my_len = i32::try_from(mine.len())?;
            self.world.all_gather_into(&my_len, &mut lens[..]);
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
                self.world.all_gather_varcount_into(mine, &mut part);
            }
            Ok(lens
                .iter()
                .zip(&displs)
                .map(|(&l, &d)| all[d as usize + 1..(d + l) as usize].to_vec())
                .collect())
        }
        fn barrier(&self) -> anyhow::Result<()> {
            self.world.barrier();
            Ok(())
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
