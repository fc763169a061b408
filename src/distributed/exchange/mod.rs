//! The exchange between ranks: each step's gradients and training totals summed over the ranks,
//! bucket by bucket, and the parameter averaging of local SGD. It owns the host buffers the sums
//! travel through and the packing of the totals beside the gradients.
//!
//! Buckets are contiguous ranges of the flat gradient buffer, whole dense layers each, in reverse
//! layer order (the last layers first, as backward produces them). The exchange drives the step's
//! last backward in stretches: as soon as a bucket's layers are done, its copy to the host is
//! submitted; while the GPU goes on with earlier layers, the host collects the previous bucket and
//! hands it to the communication thread, which sums it over the ranks in place. The sums come back
//! in order and are uploaded; the update then runs on the whole gradient (clipping and the f16
//! overflow check need all of it). With one bucket (`--bucket-mb 0`) this is the fused exchange.
//! At 2 ranks every element's sum is a + b whatever the bucketing, so results are bit-identical.

use std::ops::Range;
use std::time::Instant;

use anyhow::{Context, ensure};
use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

pub mod config;

pub use config::{CompressKind, ExchangeConfig, SyncMode};
use crate::backend::Backend;
use crate::distributed::comm::Communicator;

/// Words that travel after the first bucket: loss sum, correct, count, and the number of ranks that
/// were asked to stop (so that all stop at the same step).
const TOTAL_WORDS: usize = 4;

/// Host time spent in the exchange, summed over a run (seconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExchangeTimes {
    /// Waiting for the gradients and copying them to the host (includes the GPU's compute).
    pub readback: f64,
    /// The allreduces themselves, as the communication thread timed them.
    pub allreduce: f64,
    /// How long the training thread waited for the sums: the communication not hidden.
    pub waited: f64,
    /// Backward run inside the exchange (in stretches, between the buckets' sends).
    pub backward: f64,
    /// Copying the summed gradients back to the device.
    pub upload: f64,
    /// The allreduce time of each bucket (bucket 0 holds the last layers).
    pub buckets: Vec<f64>,
    /// Bytes this rank sent for gradients, and what f32 gradients in one allreduce would have been.
    pub sent_bytes: f64,
    pub f32_bytes: f64,
}

impl ExchangeTimes {
    /// Every part multiplied by `k`.
    pub fn scaled(&self, k: f64) -> Self {
        Self {
            readback: self.readback * k,
            allreduce: self.allreduce * k,
            waited: self.waited * k,
            backward: self.backward * k,
            upload: self.upload * k,
            buckets: self.buckets.iter().map(|b| b * k).collect(),
            sent_bytes: self.sent_bytes * k,
            f32_bytes: self.f32_bytes * k,
        }
    }

    /// The share of the allreduce time that ran behind other work (0 when none ran).
    pub fn hidden(&self) -> f64 {
        if self.allreduce > 0.0 {
            (1.0 - self.waited / self.allreduce).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Gradient compression's state on this rank.
enum Compressor {
    /// 16-bit wire: two-sided error feedback, and the buffers of the all-to-all and all-gather.
    Wire {
        fmt: crate::distributed::codec::WireFormat,
        state: crate::distributed::codec::ExchangeState,
        wire: Vec<u16>,
        recv: Vec<u16>,
        owned: Vec<u16>,
        gathered: Vec<u16>,
    },
    /// PowerSGD's factors and residuals, and the Q-phase buffer.
    PowerSgd {
        p: Box<crate::distributed::codec::PowerSgd>,
        q: Vec<f32>,
    },
}

/// A bucket: a contiguous range of the flat gradient buffer holding whole dense layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub range: Range<usize>,
    /// The lowest dense layer in it: backward down to this layer completes the bucket.
    pub layer: usize,
}

/// Buckets of about `target` bytes of whole layers, last layers first; `target` 0 gives one.
/// `layers[l]` is dense layer l's parameter range (the layout's order).
pub fn buckets(layers: &[Range<usize>], target: usize) -> Vec<Bucket> {
    let mut out = Vec::new();
    let mut open: Option<Bucket> = None;
    for (l, r) in layers.iter().enumerate().rev() {
        let b = match open.take() {
            Some(b) => Bucket {
                range: r.start..b.range.end,
                layer: l,
            },
            None => Bucket {
                range: r.clone(),
                layer: l,
            },
        };
        if target > 0 && b.range.len() * 4 >= target {
            out.push(b);
        } else {
            open = Some(b);
        }
    }
    out.extend(open);
    out
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
    buckets: Vec<Bucket>,
    /// One host buffer per bucket (the first with the totals' words after the gradients): moved
    /// to the communication thread for its sum and back, reused every step.
    bufs: Vec<Vec<f32>>,
    send: Vec<f32>,
    recv: Vec<f32>,
    /// Samples this rank trained on since the last parameter average.
    since_average: u64,
    /// Gradient compression, when the run asks for it (`set_compression`).
    compressor: Option<Compressor>,
    /// `--staleness 1`: the sums of the last step's gradients, in flight while this step computes
    /// (with the step they belong to).
    inflight: Option<(u64, Sums)>,
    staleness: u64,
    /// `--async-average`: the average of the last round in flight ([Σ nᵢθᵢ, Σ nᵢ]), and this rank's
    /// parameters when it started (the anchor the correction is taken from).
    async_average: bool,
    avg_inflight: Option<Sums>,
    anchor: Vec<f32>,
    pub times: ExchangeTimes,
}

/// Sums over the ranks, per bucket: still in flight, or arrived (after a checkpoint or a resume).
enum Sums {
    Pending(Vec<crate::distributed::comm::PendingSum>),
    Ready(Vec<Vec<f32>>),
}

impl Exchange {
    pub fn new(cfg: &ExchangeConfig, n_params: usize, ranks: usize) -> Self {
        let len = if ranks > 1 { n_params + TOTAL_WORDS } else { 0 };
        Self {
            sync: cfg.sync,
            sync_every: cfg.sync_every,
            ranks,
            // one bucket until `set_buckets` splits it by layer
            buckets: vec![Bucket {
                range: 0..n_params,
                layer: 0,
            }],
            bufs: vec![Vec::new()],
            send: vec![0.0; len],
            recv: vec![0.0; len],
            since_average: 0,
            compressor: None,
            inflight: None,
            staleness: cfg.staleness,
            async_average: cfg.async_average,
            avg_inflight: None,
            anchor: Vec::new(),
            times: ExchangeTimes::default(),
        }
    }

    /// Whether steps apply the previous step's summed gradient (`--staleness 1`, any number of
    /// ranks, so that one rank trains exactly as N do).
    pub fn delayed(&self) -> bool {
        self.staleness > 0 && self.sync == SyncMode::Grads && self.compressor.is_none()
    }

    /// Whether gradients travel every step (several ranks, `--sync grads`).
    pub fn exchanges_gradients(&self) -> bool {
        self.ranks > 1 && self.sync == SyncMode::Grads
    }

    /// Each bucket's bytes as it travels in f32 (the first with the totals' words).
    pub fn bucket_bytes(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| 4 * (b.range.len() + if i == 0 { TOTAL_WORDS } else { 0 }) as u64)
            .collect()
    }

    /// Whether gradients travel compressed (a 16-bit wire or PowerSGD), not in f32 buckets.
    pub fn compressed_mode(&self) -> bool {
        self.compressor.is_some()
    }

    /// The buckets, exchanged one at a time in this order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Compress the gradients as `cfg` asks (16-bit wire or PowerSGD); `layout` is the model's,
    /// `rank` this rank. The error-feedback residuals start at zero; checkpoints keep them
    /// (`checkpoint_state`), so a resume with the same number of ranks continues them.
    pub fn set_compression(
        &mut self,
        cfg: &ExchangeConfig,
        layout: &crate::model::Layout,
        rank: usize,
        seed: u64,
    ) -> anyhow::Result<()> {
        use crate::distributed::codec::{ExchangeState, PowerSgd, WireFormat, weight_matrices};
        if !self.exchanges_gradients() {
            return Ok(());
        }
        let n = layout.total;
        self.compressor = match (cfg.compress, cfg.grad_wire) {
            (CompressKind::None, WireFormat::F32) => None,
            (CompressKind::None, fmt) => Some(Compressor::Wire {
                fmt,
                state: ExchangeState::new(n, rank, self.ranks),
                wire: Vec::new(),
                recv: Vec::new(),
                owned: Vec::new(),
                gathered: Vec::new(),
            }),
            (CompressKind::Powersgd, _) => Some(Compressor::PowerSgd {
                p: Box::new(PowerSgd::new(
                    cfg.powersgd_rank,
                    &weight_matrices(layout),
                    n,
                    cfg.powersgd_warmup,
                    seed,
                )?),
                q: Vec::new(),
            }),
        };
        Ok(())
    }

    /// Exchange in buckets of about `target` bytes of whole layers (`layers[l]`: dense layer l's
    /// parameter range); 0: one bucket.
    pub fn set_buckets(&mut self, layers: &[Range<usize>], target: usize) {
        self.buckets = buckets(layers, target);
        self.bufs = vec![Vec::new(); self.buckets.len()];
    }

    /// Finish the step's backward and sum its gradients and totals over the ranks, bucket by
    /// bucket, leaving the sums in the backend. `local_rows` is this rank's share of the step (0:
    /// it contributes zeros); `global_rows` the step's rows over all ranks (what a single rank
    /// divides by). The backend's last micro-batch has run gather, forward and loss: this runs its
    /// backward (in stretches when gradients are exchanged, see the module's notes).
    pub fn gradients(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        local_rows: usize,
        global_rows: usize,
    ) -> anyhow::Result<Summed> {
        self.since_average += local_rows as u64;
        let asked = u64::from(crate::distributed::stop::requested().is_some());
        if !self.exchanges_gradients() {
            if local_rows > 0 {
                let t0 = Instant::now();
                backend.backward()?;
                self.times.backward += t0.elapsed().as_secs_f64();
            }
            let samples = match self.sync {
                // local SGD: each rank steps on its own rows
                SyncMode::Params => local_rows,
                SyncMode::Grads => global_rows,
            };
            // ranks that exchange no gradients agree on a stop with a one-word collective (with
            // --async-average the request travels with the averages instead: no step waits)
            let mut stop = [asked];
            if self.ranks > 1 && !self.async_average {
                let t0 = Instant::now();
                comm.allreduce_sum_u64(&mut stop)?;
                self.times.waited += t0.elapsed().as_secs_f64();
            } else if self.async_average && self.ranks > 1 {
                stop[0] = 0;
            }
            return Ok(Summed {
                samples: samples as u64,
                totals: None,
                stop: stop[0] > 0,
            });
        }
        if self.compressor.is_some() {
            return self.compressed(backend, comm, local_rows, asked);
        }
        let pending = self.send_all(backend, comm, local_rows, asked)?;
        self.receive_all(backend, comm, Sums::Pending(pending))
    }

    /// Backward in stretches: each bucket's copy is submitted as soon as its layers are done, and
    /// the one before is collected and its sum started while the device works on. Returns the
    /// sums in flight, in bucket order.
    fn send_all(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        local_rows: usize,
        asked: u64,
    ) -> anyhow::Result<Vec<crate::distributed::comm::PendingSum>> {
        let n_b = self.buckets.len();
        self.times.buckets.resize(n_b, 0.0);
        let n_all: usize = self.buckets.iter().map(|b| b.range.len()).sum();
        self.times.sent_bytes += (4 * n_all) as f64;
        self.times.f32_bytes += (4 * n_all) as f64;
        let mut pending = Vec::with_capacity(n_b);
        for i in 0..n_b {
            let b = self.buckets[i].clone();
            if local_rows > 0 {
                let _g = crate::observe::trace::span("backward", "phase").arg("bucket", i);
                let t0 = Instant::now();
                backend.backward_through(b.layer, i == 0)?;
                backend.stage_grads(i, b.range.clone(), i == 0)?;
                self.times.backward += t0.elapsed().as_secs_f64();
            }
            if i > 0 {
                pending.push(self.send_bucket(backend, comm, i - 1, local_rows, asked)?);
            }
        }
        pending.push(self.send_bucket(backend, comm, n_b - 1, local_rows, asked)?);
        Ok(pending)
    }

    /// The sums, in bucket order, back to the device's gradient buffer; the totals and the stop
    /// request from the first bucket.
    fn receive_all(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        sums: Sums,
    ) -> anyhow::Result<Summed> {
        let n_b = self.buckets.len();
        self.times.buckets.resize(n_b, 0.0);
        let mut stop = false;
        let mut totals = Totals::default();
        let (mut pending, mut ready) = match sums {
            Sums::Pending(p) => (p.into_iter().map(Some).collect::<Vec<_>>(), Vec::new()),
            Sums::Ready(r) => (Vec::new(), r.into_iter().map(Some).collect::<Vec<_>>()),
        };
        for i in 0..n_b {
            let t0 = Instant::now();
            let (buf, secs) = match (
                pending.get_mut(i).and_then(Option::take),
                ready.get_mut(i).and_then(Option::take),
            ) {
                (Some(p), _) => {
                    let _g = crate::observe::trace::span("wait for sum", "exchange").arg("bucket", i);
                    comm.finish_sum_f32(p)?
                }
                (None, Some(r)) => (r, 0.0),
                (None, None) => anyhow::bail!("bucket {i}'s sum is missing"),
            };
            let t1 = Instant::now();
            let b = &self.buckets[i];
            let n = b.range.len();
            ensure!(
                buf.len() >= n + if i == 0 { TOTAL_WORDS } else { 0 },
                "bucket {i}'s sum is short"
            );
            {
                let _g = crate::observe::trace::span("upload", "exchange")
                    .arg("bucket", i)
                    .arg("bytes", 4 * n);
                backend.write_grads(b.range.clone(), &buf[..n])?;
            }
            if i == 0 {
                totals = Totals {
                    loss_sum: f64::from(buf[n]),
                    correct: buf[n + 1] as u64,
                    count: buf[n + 2] as u64,
                };
                stop = buf[n + 3] > 0.0;
            }
            self.times.waited += (t1 - t0).as_secs_f64();
            self.times.allreduce += secs;
            self.times.buckets[i] += secs;
            self.times.upload += t1.elapsed().as_secs_f64();
            self.bufs[i] = buf;
        }
        Ok(Summed {
            samples: totals.count,
            totals: Some(totals),
            stop,
        })
    }

    /// `--staleness 1`: finish this step's backward, start its sums, and return the previous
    /// step's sums (its step and what they summed) once they are in the device's gradient buffer;
    /// None at the first step after a start or a drain.
    pub fn delayed_gradients(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        step: u64,
        local_rows: usize,
    ) -> anyhow::Result<Option<(u64, Summed)>> {
        self.since_average += local_rows as u64;
        let asked = u64::from(crate::distributed::stop::requested().is_some());
        let new = self.send_all(backend, comm, local_rows, asked)?;
        let prev = match self.inflight.take() {
            Some((s, sums)) => Some((s, self.receive_all(backend, comm, sums)?)),
            None => None,
        };
        self.inflight = Some((step, Sums::Pending(new)));
        Ok(prev)
    }

    /// Every rank applies the same updates, so the parameters must be the same bits everywhere:
    /// compare a CRC-32 of them across the ranks (one small collective and a readback); an error
    /// names the ranks that differ from rank 0.
    pub fn check_identical(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        step: u64,
    ) -> anyhow::Result<()> {
        if self.ranks < 2 {
            return Ok(());
        }
        let theta = backend.params()?;
        let sum = crc32fast::hash(bytemuck::cast_slice(&theta));
        let all = comm.all_gather_bytes(&sum.to_le_bytes())?;
        let differ: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != all[0])
            .map(|(r, _)| r.to_string())
            .collect();
        ensure!(
            differ.is_empty(),
            "after step {step} the parameters of rank(s) {} differ from rank 0's",
            differ.join(", ")
        );
        Ok(())
    }

    /// `--staleness 1`: the sums still in flight, in the device's gradient buffer (their step and
    /// what they summed); None when nothing is in flight.
    pub fn drain(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<Option<(u64, Summed)>> {
        match self.inflight.take() {
            Some((s, sums)) => Ok(Some((s, self.receive_all(backend, comm, sums)?))),
            None => Ok(None),
        }
    }

    /// The compressed exchange: backward whole, then the gradient through the 16-bit wire (an
    /// all-to-all of segments, each summed in f32 at its owner, then an all-gather) or PowerSGD's
    /// two allreduces; the totals travel apart, in f32, exactly.
    fn compressed(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        local_rows: usize,
        asked: u64,
    ) -> anyhow::Result<Summed> {
        use crate::distributed::codec::{Round, decode, segments, wire_bytes_per_rank};
        let n = self.buckets.iter().map(|b| b.range.len()).sum::<usize>();
        let (rank, ranks) = (comm.rank(), self.ranks);
        let t0 = Instant::now();
        let mut grad = std::mem::take(&mut self.bufs[0]);
        grad.resize(n, 0.0);
        let mut back = 0.0;
        let local = if local_rows > 0 {
            let t0 = Instant::now();
            backend.backward()?;
            back = t0.elapsed().as_secs_f64();
            self.times.backward += back;
            let _g = crate::observe::trace::span("readback", "exchange").arg("bytes", 4 * n);
            backend.read_grads(0..n, &mut grad, true)?
        } else {
            grad.fill(0.0);
            None
        }
        .unwrap_or_default();
        let t1 = Instant::now();
        self.times.readback += (t1 - t0).as_secs_f64() - back;
        let mut words = [
            local.loss_sum as f32,
            local.correct as f32,
            local.count as f32,
            asked as f32,
        ];
        let comp = self.compressor.as_mut().context("no compressor")?;
        let sent = match comp {
            Compressor::Wire {
                fmt,
                state,
                wire,
                recv,
                owned,
                gathered,
            } => {
                let w = fmt.words();
                let segs = segments(n, ranks);
                let counts: Vec<usize> = segs.iter().map(|r| r.len() * w).collect();
                crate::observe::trace::span("encode", "exchange")
                    .end_after(|| state.encode(&grad, *fmt, wire));
                recv.resize(counts[rank] * ranks, 0);
                comm.all_to_all_u16(wire, &counts, recv, &vec![counts[rank]; ranks])?;
                crate::observe::trace::span("sum owned segment", "exchange")
                    .end_after(|| state.reduce_owned(recv, *fmt, owned));
                gathered.resize(n * w, 0);
                comm.all_gather_u16(owned, &counts, gathered)?;
                crate::observe::trace::span("decode", "exchange")
                    .end_after(|| decode(*fmt, gathered, &mut grad));
                comm.allreduce_sum_f32(&mut words)?;
                wire_bytes_per_rank(n, ranks, rank, *fmt) + 16
            }
            Compressor::PowerSgd { p, q } => {
                let mut send = Vec::new();
                let round = p.begin(&grad, &mut send);
                let k = send.len();
                send.extend_from_slice(&words);
                comm.allreduce_sum_f32(&mut send)?;
                words.copy_from_slice(&send[k..]);
                send.truncate(k);
                match round {
                    Round::Plain => {
                        grad.copy_from_slice(&send);
                        4 * (k + 4)
                    }
                    Round::LowRank => {
                        p.project(&send, q);
                        comm.allreduce_sum_f32(q)?;
                        p.finish(q, ranks, &mut grad);
                        4 * (k + 4 + q.len())
                    }
                }
            }
        };
        let t2 = Instant::now();
        self.times.allreduce += (t2 - t1).as_secs_f64();
        self.times.waited += (t2 - t1).as_secs_f64();
        self.times.sent_bytes += sent as f64;
        self.times.f32_bytes += (4 * (n + 4)) as f64;
        backend.write_grads(0..n, &grad)?;
        self.times.upload += t2.elapsed().as_secs_f64();
        self.bufs[0] = grad;
        let totals = Totals {
            loss_sum: f64::from(words[0]),
            correct: words[1] as u64,
            count: words[2] as u64,
        };
        Ok(Summed {
            samples: totals.count,
            totals: Some(totals),
            stop: words[3] > 0.0,
        })
    }

    /// Collect bucket `i` from the backend (zeros from a rank without rows; the first bucket also
    /// carries the totals and the stop request) and start its sum over the ranks.
    fn send_bucket(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        i: usize,
        local_rows: usize,
        asked: u64,
    ) -> anyhow::Result<crate::distributed::comm::PendingSum> {
        let t0 = Instant::now();
        let b = self.buckets.get(i).context("bucket index")?.clone();
        let n = b.range.len();
        let _g = crate::observe::trace::span("readback", "exchange")
            .arg("bucket", i)
            .arg("bytes", 4 * n);
        let first = i == 0;
        let mut buf = std::mem::take(&mut self.bufs[i]);
        buf.resize(n + if first { TOTAL_WORDS } else { 0 }, 0.0);
        let local = if local_rows > 0 {
            backend.collect_grads(i, b.range.clone(), &mut buf[..n], first)?
        } else {
            buf.fill(0.0);
            None
        };
        if first {
            let local = local.unwrap_or_default();
            buf[n] = local.loss_sum as f32;
            buf[n + 1] = local.correct as f32;
            buf[n + 2] = local.count as f32;
            buf[n + 3] = asked as f32;
        }
        self.times.readback += t0.elapsed().as_secs_f64();
        comm.start_sum_f32(buf)
    }

    /// In local SGD, after every `--sync-every` steps and after the last: θ = Σ nᵢθᵢ / Σ nᵢ over
    /// ranks, nᵢ being the samples rank i trained on since the last average. `done` counts the
    /// steps taken so far.
    ///
    /// With `--async-average` the average of a round travels while the ranks take the next
    /// round's steps; at the next boundary each rank adds (average − its parameters when the
    /// round's average started) to its parameters, then starts the next round's average (Wang et
    /// al., 2020, overlap local SGD). The run's last average is synchronous, so that every rank
    /// ends with the same parameters. The stop request travels with the averages: true when the
    /// ranks agreed to stop (async only; the synchronous modes agree every step).
    pub fn average_if_due(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        done: u64,
        total_steps: u64,
    ) -> anyhow::Result<bool> {
        let due = done.is_multiple_of(self.sync_every) || done == total_steps;
        if self.sync != SyncMode::Params || self.ranks == 1 || !due {
            return Ok(false);
        }
        if !self.async_average {
            self.average_now(backend, comm)?;
            return Ok(false);
        }
        let stop = self.apply_average(backend, comm)?;
        if done == total_steps {
            self.average_now(backend, comm)?;
            return Ok(stop);
        }
        let theta = backend.params()?;
        let n = theta.len();
        let w = self.since_average as f32;
        let mut send = std::mem::take(&mut self.bufs[0]);
        send.clear();
        send.extend(theta.iter().map(|v| v * w));
        send.push(w);
        send.push(f32::from(crate::distributed::stop::requested().is_some()));
        self.anchor = theta;
        self.since_average = 0;
        self.times.sent_bytes += (4 * (n + 2)) as f64;
        self.avg_inflight = Some(Sums::Pending(vec![comm.start_sum_f32(send)?]));
        Ok(stop)
    }

    /// `--async-average`: wait for the average in flight, if any, and add (average − anchor) to
    /// this rank's parameters; true when a rank asked to stop.
    fn apply_average(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<bool> {
        let Some(sums) = self.avg_inflight.take() else {
            return Ok(false);
        };
        let t0 = Instant::now();
        let (buf, secs) = match sums {
            Sums::Pending(mut p) => {
                comm.finish_sum_f32(p.pop().context("no average in flight")?)?
            }
            Sums::Ready(mut r) => (r.pop().context("no average in flight")?, 0.0),
        };
        self.times.waited += t0.elapsed().as_secs_f64();
        self.times.allreduce += secs;
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
        self.bufs[0] = buf;
        backend.set_params(&theta)?;
        Ok(stop)
    }

    /// A run that ended before its last step under `--sync params`: the average in flight is
    /// applied, then the ranks average once more (nothing changes when no rank trained since the
    /// last average). A collective: call it on every rank.
    pub fn final_average(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<()> {
        if self.sync != SyncMode::Params || self.ranks == 1 {
            return Ok(());
        }
        self.apply_average(backend, comm)?;
        let mut n = [self.since_average];
        comm.allreduce_sum_u64(&mut n)?;
        if n[0] > 0 {
            self.average_now(backend, comm)?;
        }
        Ok(())
    }

    /// θ = Σ nᵢθᵢ / Σ nᵢ over the ranks, now.
    fn average_now(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<()> {
        let theta = backend.params()?;
        let n = theta.len();
        let w = self.since_average as f32;
        for (s, v) in self.send.iter_mut().zip(&theta) {
            *s = v * w;
        }
        self.send[n] = w;
        let t0 = Instant::now();
        comm.allreduce_sum_f32_into(&self.send[..n + 1], &mut self.recv[..n + 1])?;
        let dt = t0.elapsed().as_secs_f64();
        self.times.waited += dt;
        self.times.allreduce += dt;
        self.times.sent_bytes += (4 * (n + 1)) as f64;
        let total = self.recv[n];
        ensure!(total > 0.0, "parameter averaging over zero samples");
        let avg: Vec<f32> = self.recv[..n].iter().map(|v| v / total).collect();
        self.since_average = 0;
        backend.set_params(&avg)
    }

    /// The exchange's state for a checkpoint, by name (a collective: every rank calls it, and
    /// rank 0 gets it all). `--staleness 1`: the sums in flight, waited for (they stay, arrived,
    /// for the next step), in parameter order with the totals' words after. `--sync params`:
    /// every rank's own parameters, optimizer state, anchor and samples since the last average
    /// ("rank{r}.…"), and the average in flight.
    pub fn checkpoint_state(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        if let Some((at, sums)) = self.inflight.take() {
            let ready = self.arrive(comm, sums)?;
            let n: usize = self.buckets.iter().map(|b| b.range.len()).sum();
            let mut flat = vec![0.0; n + TOTAL_WORDS];
            for (b, buf) in self.buckets.iter().zip(&ready) {
                flat[b.range.clone()].copy_from_slice(&buf[..b.range.len()]);
            }
            let n0 = self.buckets[0].range.len();
            flat[n..].copy_from_slice(&ready[0][n0..n0 + TOTAL_WORDS]);
            out.push(("exchange.inflight".to_string(), flat));
            self.inflight = Some((at, Sums::Ready(ready)));
        }
        // this rank's own state, to rank 0
        let mut mine: Vec<(String, Vec<f32>)> = Vec::new();
        if self.sync == SyncMode::Params && self.ranks > 1 {
            if let Some(sums) = self.avg_inflight.take() {
                let ready = self.arrive(comm, sums)?;
                out.push(("exchange.average".to_string(), ready[0].clone()));
                self.avg_inflight = Some(Sums::Ready(ready));
            }
            mine.push(("params".into(), backend.params()?));
            mine.extend(
                backend
                    .optim_state()?
                    .into_iter()
                    .map(|(k, v)| (format!("optim.{k}"), v)),
            );
            mine.push(("anchor".into(), self.anchor.clone()));
            mine.push(("since".into(), u64_words(self.since_average)));
        }
        // the compressors' error-feedback residuals (and PowerSGD's warm start)
        match &self.compressor {
            Some(Compressor::Wire { state, .. }) => {
                let (local, owned) = state.state();
                mine.push(("ef.local".into(), local.to_vec()));
                mine.push(("ef.owned".into(), owned.to_vec()));
            }
            Some(Compressor::PowerSgd { p, .. }) => {
                let st = p.state();
                mine.push(("psgd.step".into(), u64_words(st.step)));
                for (k, q) in st.q.into_iter().enumerate() {
                    mine.push((format!("psgd.q{k}"), q));
                }
                mine.push(("psgd.residual".into(), st.residual));
            }
            None => {}
        }
        if !mine.is_empty() {
            let mut bytes = Vec::new();
            for (_, v) in &mine {
                bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
                bytes.extend_from_slice(bytemuck::cast_slice(v));
            }
            let all =
                crate::distributed::gather::gather_to_root(comm, &bytes, crate::distributed::gather::chunk_bytes(comm.size()))?;
            if let Some(all) = all {
                for (r, b) in all.iter().enumerate() {
                    let mut at = 0;
                    for (k, _) in &mine {
                        let len = b
                            .get(at..at + 8)
                            .and_then(|w| w.try_into().ok())
                            .map(u64::from_le_bytes)
                            .context("a rank's checkpoint state did not arrive whole")?
                            as usize;
                        at += 8;
                        let data = b
                            .get(at..at + 4 * len)
                            .context("a rank's checkpoint state did not arrive whole")?;
                        at += 4 * len;
                        let v: Vec<f32> = data
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect();
                        out.push((format!("rank{r}.{k}"), v));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sums in flight, waited for.
    fn arrive(&mut self, comm: &dyn Communicator, sums: Sums) -> anyhow::Result<Vec<Vec<f32>>> {
        match sums {
            Sums::Ready(r) => Ok(r),
            Sums::Pending(p) => {
                let t0 = Instant::now();
                let mut v = Vec::with_capacity(p.len());
                for p in p {
                    let (b, secs) = comm.finish_sum_f32(p)?;
                    self.times.allreduce += secs;
                    v.push(b);
                }
                self.times.waited += t0.elapsed().as_secs_f64();
                Ok(v)
            }
        }
    }

    /// Restore what [`Exchange::checkpoint_state`] saved (this rank's part of it); `step` is the
    /// checkpoint's step.
    pub fn restore(
        &mut self,
        backend: &mut dyn Backend,
        extra: &[(String, Vec<f32>)],
        rank: usize,
        step: u64,
    ) -> anyhow::Result<()> {
        let mine = format!("rank{rank}.");
        let mut optim = Vec::new();
        let (mut ef_local, mut ef_owned) = (None, None);
        let (mut psgd_step, mut psgd_residual, mut psgd_q) = (None, None, Vec::new());
        for (k, v) in extra {
            match k.as_str() {
                "exchange.inflight" if self.delayed() => {
                    let n: usize = self.buckets.iter().map(|b| b.range.len()).sum();
                    ensure!(
                        v.len() == n + TOTAL_WORDS,
                        "the checkpoint's gradient sums in flight have {} values, the model {n}",
                        v.len().saturating_sub(TOTAL_WORDS)
                    );
                    let ready: Vec<Vec<f32>> = self
                        .buckets
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            let mut buf = v[b.range.clone()].to_vec();
                            if i == 0 {
                                buf.extend_from_slice(&v[n..]);
                            }
                            buf
                        })
                        .collect();
                    // the sums of the step before the checkpoint's position
                    self.inflight = Some((step.saturating_sub(1), Sums::Ready(ready)));
                }
                "exchange.average" if self.async_average => {
                    self.avg_inflight = Some(Sums::Ready(vec![v.clone()]));
                }
                _ => {
                    let Some(name) = k.strip_prefix(&mine) else {
                        continue;
                    };
                    match name {
                        "params" if self.sync == SyncMode::Params => backend.set_params(v)?,
                        "anchor" => self.anchor = v.clone(),
                        "since" => self.since_average = words_u64(v),
                        "ef.local" => ef_local = Some(v.as_slice()),
                        "ef.owned" => ef_owned = Some(v.as_slice()),
                        "psgd.step" => psgd_step = Some(words_u64(v)),
                        "psgd.residual" => psgd_residual = Some(v.clone()),
                        _ => {
                            if let Some(o) = name.strip_prefix("optim.") {
                                if self.sync == SyncMode::Params {
                                    optim.push((o.to_string(), v.clone()));
                                }
                            } else if let Some(k) = name.strip_prefix("psgd.q") {
                                psgd_q.push((k.parse::<usize>().unwrap_or(usize::MAX), v.clone()));
                            }
                        }
                    }
                }
            }
        }
        if !optim.is_empty() {
            backend.set_optim_state(&optim)?;
        }
        match &mut self.compressor {
            Some(Compressor::Wire { state, .. }) => {
                if let (Some(l), Some(o)) = (ef_local, ef_owned) {
                    state
                        .set_state(l, o)
                        .map_err(|e| anyhow::anyhow!("the checkpoint's error feedback: {e}"))?;
                }
            }
            Some(Compressor::PowerSgd { p, .. }) => {
                if let (Some(step), Some(residual)) = (psgd_step, psgd_residual) {
                    psgd_q.sort_by_key(|(k, _)| *k);
                    let q = psgd_q.into_iter().map(|(_, q)| q).collect();
                    p.set_state(crate::distributed::codec::PowerSgdState { step, q, residual })
                        .map_err(|e| anyhow::anyhow!("the checkpoint's PowerSGD state: {e}"))?;
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// A u64 as two f32 words (their bits), for a checkpoint's f32 tensors.
fn u64_words(x: u64) -> Vec<f32> {
    vec![f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)]
}

/// The u64 of [`u64_words`] (0 when the tensor is not two words).
fn words_u64(v: &[f32]) -> u64 {
    match v {
        [lo, hi] => u64::from(lo.to_bits()) | (u64::from(hi.to_bits()) << 32),
        _ => 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_whole_layers_last_first() {
        // four layers of 10, 20, 30 and 40 values (40, 80, 120, 160 bytes)
        let layers = [0..10, 10..30, 30..60, 60..100];
        let one = buckets(&layers, 0);
        assert_eq!(
            one,
            vec![Bucket {
                range: 0..100,
                layer: 0
            }]
        );
        let each = buckets(&layers, 1);
        let ranges: Vec<_> = each.iter().map(|b| (b.range.clone(), b.layer)).collect();
        assert_eq!(
            ranges,
            vec![(60..100, 3), (30..60, 2), (10..30, 1), (0..10, 0)]
        );
        // 200 bytes: layers 3+2 reach 280, then 1+0 stay under and close at the end
        let two = buckets(&layers, 200);
        let ranges: Vec<_> = two.iter().map(|b| (b.range.clone(), b.layer)).collect();
        assert_eq!(ranges, vec![(30..100, 2), (0..30, 0)]);
        // every value in exactly one bucket
        for bs in [&one, &each, &two] {
            let mut all: Vec<usize> = bs.iter().flat_map(|b| b.range.clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..100).collect::<Vec<_>>());
        }
    }
}
