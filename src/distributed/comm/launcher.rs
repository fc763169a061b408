//! Who started this process: an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx), or another
//! launcher that names several ranks without MPI.

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
pub(super) fn other_launcher() -> Option<(&'static str, u64)> {
    ["WORLD_SIZE", "SLURM_NTASKS"].into_iter().find_map(|v| {
        let n = std::env::var(v).ok()?.trim().parse::<u64>().ok()?;
        (n > 1).then_some((v, n))
    })
}
