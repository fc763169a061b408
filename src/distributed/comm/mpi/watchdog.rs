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

use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::request::{LocalScope, Request, Scope};
use mpi::topology::Communicator as _;
use mpi::traits::{CommunicatorCollectives, Destination, Source};

use super::{ARRIVE, GRACE, MpiComm};

impl MpiComm {
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

    /// The watchdog's arrival check before collective k (nothing without a timeout).
    pub(super) fn arrive(&self, what: impl FnOnce() -> String) {
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
}
