//! A clean stop. The first SIGTERM, SIGINT or SIGUSR1 asks the run to finish its current step; the
//! ranks agree on it at that step's exchange, rank 0 writes a checkpoint, and every rank exits with
//! 128 + the signal's number after one line saying where to resume. A second signal ends the
//! process at once. (mpirun forwards SIGTERM and kills the ranks about a second later; it forwards
//! SIGUSR1 without that deadline, which Slurm can send ahead of time with `--signal=USR1@T`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

static SIGNAL: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();

/// Catch the stop signals (once per process).
pub fn install() -> anyhow::Result<()> {
    let which = Arc::new(AtomicUsize::new(0));
    let asked = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        // a second signal, the flag already set, exits at once with 128 + its number
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&asked))?;
        signal_hook::flag::register(sig, Arc::clone(&asked))?;
        signal_hook::flag::register_usize(sig, Arc::clone(&which), sig as usize)?;
    }
    let _ = SIGNAL.set(which);
    Ok(())
}

/// The signal that asked this process to stop, if one did.
pub fn requested() -> Option<i32> {
    SIGNAL
        .get()
        .map(|s| s.load(Ordering::Relaxed))
        .filter(|&s| s != 0)
        .map(|s| s as i32)
}

/// The signal's name, for the last line.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// The run stopped at a step boundary on request: where it can resume. Every rank returns it;
/// the process exits with `status`.
#[derive(Debug)]
pub struct Stopped {
    /// The signal this rank received (ranks that received none stopped because another did).
    pub signal: Option<i32>,
    pub step: u64,
    pub checkpoint: Option<std::path::PathBuf>,
}

impl Stopped {
    /// 128 + the signal's number (SIGTERM's, 143, for a rank that received none).
    pub fn status(&self) -> u8 {
        (128 + self.signal.unwrap_or(SIGTERM)) as u8
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = self.signal.map_or("another rank's signal", name);
        match &self.checkpoint {
            Some(p) => write!(
                f,
                "stopped by {by} after step {}; checkpoint {}: continue with the same command and --resume auto",
                self.step,
                p.display()
            ),
            None => write!(
                f,
                "stopped by {by} after step {} with no checkpoint (give --checkpoint-dir to keep the work of a stopped run)",
                self.step
            ),
        }
    }
}

impl std::error::Error for Stopped {}
