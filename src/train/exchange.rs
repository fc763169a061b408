//! The exchange between ranks: each step's gradients and training totals summed over the ranks,
//! bucket by bucket, and the parameter averaging of local SGD. It owns the host buffers the sums
//! travel through and the packing of the totals beside the gradients.
//!
//! Buckets are contiguous ranges of the flat gradient buffer. Today there is one, holding every
//! gradient; the unit of exchange is already the bucket, so exchanging per layer group, overlapped
//! with backward, changes this file and the backend, not the step.

use std::ops::Range;
use std::time::Instant;

use anyhow::ensure;
use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

use super::config::{SyncMode, TrainConfig};
use crate::backend::Backend;
use crate::comm::Communicator;

/// Words that travel after the first bucket: loss sum, correct, count, and the number of ranks that
/// were asked to stop (so that all stop at the same step).
const TOTAL_WORDS: usize = 4;

/// Host time spent in the exchange, summed over a run (seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ExchangeTimes {
    /// Waiting for the gradients and copying them to the host (includes the GPU's compute).
    pub readback: f64,
    /// The allreduce itself.
    pub allreduce: f64,
    /// Copying the summed gradients back to the device.
    pub upload: f64,
}

impl ExchangeTimes {
    /// Every part multiplied by `k`.
    pub fn scaled(&self, k: f64) -> Self {
        Self {
            readback: self.readback * k,
            allreduce: self.allreduce * k,
            upload: self.upload * k,
        }
    }
}

/// What a step's exchange yields.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summed {
    /// Samples the update divides by: the global batch, or this rank's rows in local SGD.
    pub samples: u64,
    /// The step's totals over all ranks, when they travelled with the gradients.
    pub totals: Option<Totals>,
    /// Some rank was asked to stop (a signal): every rank stops after this step.
    pub stop: bool,
}

pub struct Exchange {
    sync: SyncMode,
    sync_every: u64,
    ranks: usize,
    buckets: Vec<Range<usize>>,
    send: Vec<f32>,
    recv: Vec<f32>,
    /// Samples this rank trained on since the last parameter average.
    since_average: u64,
    pub times: ExchangeTimes,
}

impl Exchange {
    pub fn new(cfg: &TrainConfig, n_params: usize, ranks: usize) -> Self {
        let len = if ranks > 1 { n_params + TOTAL_WORDS } else { 0 };
        Self {
            sync: cfg.sync,
            sync_every: cfg.sync_every,
            ranks,
            // one bucket today; the exchange already works bucket by bucket
            buckets: std::iter::once(0..n_params).collect(),
            send: vec![0.0; len],
            recv: vec![0.0; len],
            since_average: 0,
            times: ExchangeTimes::default(),
        }
    }

    /// Whether gradients travel every step (several ranks, `--sync grads`).
    pub fn exchanges_gradients(&self) -> bool {
        self.ranks > 1 && self.sync == SyncMode::Grads
    }

    /// The ranges of the flat gradient buffer exchanged one at a time.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Sum this step's gradients and totals over the ranks, bucket by bucket, leaving the sums in
    /// the backend. `local_rows` is this rank's share of the step (0: it contributes zeros);
    /// `global_rows` the step's rows over all ranks (what a single rank divides by).
    pub fn gradients(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        local_rows: usize,
        global_rows: usize,
    ) -> anyhow::Result<Summed> {
        self.since_average += local_rows as u64;
        let asked = u64::from(crate::stop::requested().is_some());
        if !self.exchanges_gradients() {
            let samples = match self.sync {
                // local SGD: each rank steps on its own rows
                SyncMode::Params => local_rows,
                SyncMode::Grads => global_rows,
            };
            // ranks that exchange no gradients agree on a stop with a one-word collective
            let mut stop = [asked];
            if self.ranks > 1 {
                comm.allreduce_sum_u64(&mut stop)?;
            }
            return Ok(Summed {
                samples: samples as u64,
                totals: None,
                stop: stop[0] > 0,
            });
        }
        let mut stop = false;
        let mut totals = Totals::default();
        for (i, bucket) in self.buckets.iter().enumerate() {
            let first = i == 0;
            let n = bucket.len();
            let len = n + if first { TOTAL_WORDS } else { 0 };
            let t0 = Instant::now();
            let local = if local_rows > 0 {
                backend.read_grads(bucket.clone(), &mut self.send[..n], first)?
            } else {
                self.send[..n].fill(0.0);
                None
            };
            if first {
                let local = local.unwrap_or_default();
                self.send[n] = local.loss_sum as f32;
                self.send[n + 1] = local.correct as f32;
                self.send[n + 2] = local.count as f32;
                self.send[n + 3] = asked as f32;
            }
            let t1 = Instant::now();
            comm.allreduce_sum_f32_into(&self.send[..len], &mut self.recv[..len])?;
            let t2 = Instant::now();
            backend.write_grads(bucket.clone(), &self.recv[..n])?;
            self.times.readback += (t1 - t0).as_secs_f64();
            self.times.allreduce += (t2 - t1).as_secs_f64();
            self.times.upload += t2.elapsed().as_secs_f64();
            if first {
                totals = Totals {
                    loss_sum: f64::from(self.recv[n]),
                    correct: self.recv[n + 1] as u64,
                    count: self.recv[n + 2] as u64,
                };
                stop = self.recv[n + 3] > 0.0;
            }
        }
        Ok(Summed {
            samples: totals.count,
            totals: Some(totals),
            stop,
        })
    }

    /// In local SGD, after every `--sync-every` steps and after the last: θ = Σ nᵢθᵢ / Σ nᵢ over
    /// ranks, nᵢ being the samples rank i trained on since the last average. `done` counts the
    /// steps taken so far.
    pub fn average_if_due(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        done: u64,
        total_steps: u64,
    ) -> anyhow::Result<()> {
        let due = done.is_multiple_of(self.sync_every) || done == total_steps;
        if self.sync != SyncMode::Params || self.ranks == 1 || !due {
            return Ok(());
        }
        let theta = backend.params()?;
        let n = theta.len();
        let w = self.since_average as f32;
        for (s, v) in self.send.iter_mut().zip(&theta) {
            *s = v * w;
        }
        self.send[n] = w;
        comm.allreduce_sum_f32_into(&self.send[..n + 1], &mut self.recv[..n + 1])?;
        let total = self.recv[n];
        ensure!(total > 0.0, "parameter averaging over zero samples");
        let avg: Vec<f32> = self.recv[..n].iter().map(|v| v / total).collect();
        self.since_average = 0;
        backend.set_params(&avg)
    }
}

/// Sum totals over ranks (loss in f64, counts exactly).
pub fn sum_totals(comm: &dyn Communicator, t: &Totals) -> anyhow::Result<Totals> {
    let mut f = [t.loss_sum];
    let mut u = [t.correct, t.count];
    comm.allreduce_sum_f64(&mut f)?;
    comm.allreduce_sum_u64(&mut u)?;
    Ok(Totals {
        loss_sum: f[0],
        correct: u[0],
        count: u[1],
    })
}
