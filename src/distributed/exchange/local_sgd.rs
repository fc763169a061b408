//! Local SGD (`--sync params`): each rank steps on its own rows, and the ranks average their
//! parameters every `--sync-every` steps and after the last, θ = Σ nᵢθᵢ / Σ nᵢ, nᵢ being the
//! samples rank i trained on since the last average.
//!
//! With `--async-average` the average of a round travels while the ranks take the next round's
//! steps; at the next boundary each rank adds (average − its parameters when the round's average
//! started) to its parameters, then starts the next round's average (Wang et al., 2020, overlap
//! local SGD). The run's last average is synchronous, so that every rank ends with the same
//! parameters. The stop request travels with the averages.

use std::time::Instant;

use anyhow::ensure;

use super::ExchangeTimes;
use super::record::RankRecord;
use crate::backend::Backend;
use crate::distributed::comm::{Communicator, PendingSum};

/// An average over the ranks: in flight, or arrived (after a checkpoint or a resume).
enum AverageSum {
    InFlight(PendingSum),
    Arrived(Vec<f32>),
}

/// Local SGD's parameter averaging on this rank.
pub struct LocalSgd {
    every: u64,
    ranks: usize,
    asynchronous: bool,
    /// Samples this rank trained on since the last average.
    since: u64,
    /// `--async-average`: the last round's [Σ nᵢθᵢ, Σ nᵢ, stop requests] in flight, and this
    /// rank's parameters when it started (the anchor the correction is taken from).
    inflight: Option<AverageSum>,
    anchor: Vec<f32>,
    buf: Vec<f32>,
    send: Vec<f32>,
    recv: Vec<f32>,
}

impl LocalSgd {
    /// Averaging every `every` steps over `ranks` ranks of `n_params` parameters.
    pub fn new(every: u64, ranks: usize, asynchronous: bool, n_params: usize) -> Self {
        let len = if ranks > 1 { n_params + 1 } else { 0 };
        Self {
            every,
            ranks,
            asynchronous,
            since: 0,
            inflight: None,
            anchor: Vec::new(),
            buf: Vec::new(),
            send: vec![0.0; len],
            recv: vec![0.0; len],
        }
    }

    /// Whether the averages travel while the ranks step on (`--async-average`).
    pub fn asynchronous(&self) -> bool {
        self.asynchronous
    }

    /// This rank trained on `rows` more samples.
    pub fn trained(&mut self, rows: usize) {
        self.since += rows as u64;
    }

    /// After `done` of `total_steps` steps: the average when due (see the module's notes); true
    /// when the ranks agreed to stop (async only; the synchronous modes agree every step).
    pub fn average_if_due(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        done: u64,
        total_steps: u64,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<bool> {
        let due = done.is_multiple_of(self.every) || done == total_steps;
        if self.ranks == 1 || !due {
            return Ok(false);
        }
        if !self.asynchronous {
            self.average_now(backend, comm, times)?;
            return Ok(false);
        }
        let stop = self.apply(backend, comm, times)?;
        if done == total_steps {
            self.average_now(backend, comm, times)?;
            return Ok(stop);
        }
        let theta = backend.params()?;
        let n = theta.len();
        let w = self.since as f32;
        let mut send = std::mem::take(&mut self.buf);
        send.clear();
        send.extend(theta.iter().map(|v| v * w));
        send.push(w);
        send.push(f32::from(crate::distributed::stop::requested().is_some()));
        self.anchor = theta;
        self.since = 0;
        times.sent_bytes += (4 * (n + 2)) as f64;
        self.inflight = Some(AverageSum::InFlight(comm.start_sum_f32(send)?));
        Ok(stop)
    }

    /// `--async-average`: wait for the average in flight, if any, and add (average − anchor) to
    /// this rank's parameters; true when a rank asked to stop.
    fn apply(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<bool> {
        let Some(sum) = self.inflight.take() else {
            return Ok(false);
        };
        let buf = self.arrive(comm, sum, times)?;
        let n = self.anchor.len();
        ensure!(
            buf.len() == n + 2,
            "the parameter average in flight has {} values, the model {n}",
            buf.len().saturating_sub(2)
        );
        let total = buf[n];
        ensure!(total > 0.0, "parameter averaging over zero samples");
        let mut theta = backend.params()?;
        for ((t, s), a) in theta.iter_mut().zip(&buf[..n]).zip(&self.anchor) {
            *t += s / total - a;
        }
        let stop = buf[n + 1] > 0.0;
        self.buf = buf;
        backend.set_params(&theta)?;
        Ok(stop)
    }

    fn arrive(
        &mut self,
        comm: &dyn Communicator,
        sum: AverageSum,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Vec<f32>> {
        match sum {
            AverageSum::Arrived(b) => Ok(b),
            AverageSum::InFlight(p) => {
                let t0 = Instant::now();
                let (buf, secs) = comm.finish_sum_f32(p)?;
                times.waited += t0.elapsed().as_secs_f64();
                times.allreduce += secs;
                Ok(buf)
            }
        }
    }

    /// A run that ended before its last step: the average in flight is applied, then the ranks
    /// average once more (nothing changes when no rank trained since the last average). A
    /// collective: call it on every rank.
    pub fn final_average(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<()> {
        if self.ranks == 1 {
            return Ok(());
        }
        self.apply(backend, comm, times)?;
        let mut n = [self.since];
        comm.allreduce_sum_u64(&mut n)?;
        if n[0] > 0 {
            self.average_now(backend, comm, times)?;
        }
        Ok(())
    }

    /// θ = Σ nᵢθᵢ / Σ nᵢ over the ranks, now.
    fn average_now(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<()> {
        let theta = backend.params()?;
        let n = theta.len();
        ensure!(
            self.send.len() == n + 1,
            "parameter averaging of {n} values, set up for {}",
            self.send.len().saturating_sub(1)
        );
        let w = self.since as f32;
        for (s, v) in self.send.iter_mut().zip(&theta) {
            *s = v * w;
        }
        self.send[n] = w;
        let t0 = Instant::now();
        comm.allreduce_sum_f32_into(&self.send[..n + 1], &mut self.recv[..n + 1])?;
        let dt = t0.elapsed().as_secs_f64();
        times.waited += dt;
        times.allreduce += dt;
        times.sent_bytes += (4 * (n + 1)) as f64;
        let total = self.recv[n];
        ensure!(total > 0.0, "parameter averaging over zero samples");
        let avg: Vec<f32> = self.recv[..n].iter().map(|v| v / total).collect();
        self.since = 0;
        backend.set_params(&avg)
    }

    /// The average in flight, waited for (it stays, arrived, for the next boundary), and this
    /// rank's own state into `mine`.
    pub fn checkpoint(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        mine: &mut RankRecord,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Option<Vec<f32>>> {
        let average = match self.inflight.take() {
            Some(sum) => {
                let buf = self.arrive(comm, sum, times)?;
                self.inflight = Some(AverageSum::Arrived(buf.clone()));
                Some(buf)
            }
            None => None,
        };
        mine.params = Some(backend.params()?);
        mine.optim = backend.optim_state()?;
        mine.anchor = Some(self.anchor.clone());
        mine.since = Some(self.since);
        Ok(average)
    }

    /// Restore what [`LocalSgd::checkpoint`] saved.
    pub fn restore(
        &mut self,
        backend: &mut dyn Backend,
        average: Option<&Vec<f32>>,
        mine: &RankRecord,
    ) -> anyhow::Result<()> {
        if let (true, Some(a)) = (self.asynchronous, average) {
            self.inflight = Some(AverageSum::Arrived(a.clone()));
        }
        if let Some(p) = &mine.params {
            backend.set_params(p)?;
        }
        if !mine.optim.is_empty() {
            backend.set_optim_state(&mine.optim)?;
        }
        if let Some(a) = &mine.anchor {
            self.anchor = a.clone();
        }
        if let Some(s) = mine.since {
            self.since = s;
        }
        Ok(())
    }
}
