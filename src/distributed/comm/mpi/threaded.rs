//! MPI on a dedicated communication thread: the training thread hands it jobs and waits for each
//! under a deadline.

use std::cell::Cell;
use std::time::{Duration, Instant};

use mpi::environment::Threading;

use super::Communicator;

use super::{GRACE, MpiComm, SLACK};
use crate::distributed::comm::{Job as CommJob, JobOutput, PendingJob, PendingSum};

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

/// A background job's reply, and how many collectives it runs (its deadline scales with them).
pub struct WaitingJob {
    rx: std::sync::mpsc::Receiver<(anyhow::Result<JobOutput>, f64)>,
    k: u64,
    collectives: u32,
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
    fn wait<R>(&self, rx: &std::sync::mpsc::Receiver<R>, k: u64, what: &dyn Fn() -> String) -> R {
        self.wait_for(rx, k, 1, what)
    }

    /// Wait for the reply of a job of `collectives` collectives (each under the deadline).
    fn wait_for<R>(
        &self,
        rx: &std::sync::mpsc::Receiver<R>,
        k: u64,
        collectives: u32,
        what: &dyn Fn() -> String,
    ) -> R {
        use std::sync::mpsc::RecvTimeoutError;
        match self.timeout.get() {
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => self.end("the MPI communication thread has ended"),
            },
            Some(t) => match rx.recv_timeout((t + GRACE) * collectives.max(1) + SLACK) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => self.end(&format!(
                    "collective #{k} ({}) did not complete within {:.0} s (--collective-timeout): every rank arrived, then a rank stopped responding during the transfer; aborting the job",
                    what(),
                    ((t + GRACE) * collectives.max(1) + SLACK).as_secs_f64()
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
        let rx = match crate::observe::trace::enabled() {
            true => {
                let name = what();
                self.submit(move |c| {
                    let _g = crate::observe::trace::span(name, "comm").arg("collective", k);
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
    fn start_sum_f32(&self, mut buf: Vec<f32>) -> anyhow::Result<PendingSum> {
        let k = self.next_seq();
        let what = format!("allreduce of {} f32", buf.len());
        let rx = self.submit(move |c| {
            let _g = crate::observe::trace::span("allreduce", "comm")
                .arg("collective", k)
                .arg("bytes", 4 * buf.len());
            let t = Instant::now();
            c.sum_in_place_f32(&mut buf);
            (buf, t.elapsed().as_secs_f64())
        });
        Ok(PendingSum {
            ready: None,
            waiting: Some(Waiting { rx, k, what }),
        })
    }
    fn finish_sum_f32(&self, p: PendingSum) -> anyhow::Result<(Vec<f32>, f64)> {
        match (p.ready, p.waiting) {
            (Some(b), _) => Ok(b),
            (None, Some(w)) => Ok(self.wait(&w.rx, w.k, &|| w.what.clone())),
            (None, None) => anyhow::bail!("an empty background sum"),
        }
    }
    fn start_job(&self, what: &str, collectives: u32, job: CommJob) -> anyhow::Result<PendingJob> {
        // the thread counts each collective of the job
        let k = self.seq.get() + 1;
        self.seq.set(self.seq.get() + u64::from(collectives));
        let name = what.to_string();
        let rx = self.submit(move |c| {
            let _g = crate::observe::trace::span(name, "comm").arg("collective", k);
            let t = Instant::now();
            let out = job(c);
            (out, t.elapsed().as_secs_f64())
        });
        Ok(PendingJob {
            ready: None,
            waiting: Some(WaitingJob {
                rx,
                k,
                collectives,
                what: what.to_string(),
            }),
        })
    }
    fn finish_job(&self, p: PendingJob) -> anyhow::Result<(JobOutput, f64)> {
        match (p.ready, p.waiting) {
            (Some((out, secs)), _) => Ok((out?, secs)),
            (None, Some(w)) => {
                let (out, secs) = self.wait_for(&w.rx, w.k, w.collectives, &|| w.what.clone());
                Ok((out?, secs))
            }
            (None, None) => anyhow::bail!("an empty background job"),
        }
    }
}
