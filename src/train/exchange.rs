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

use super::config::{SyncMode, TrainConfig};
use crate::backend::Backend;
use crate::comm::Communicator;

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
        fmt: crate::compress::WireFormat,
        state: crate::compress::ExchangeState,
        wire: Vec<u16>,
        recv: Vec<u16>,
        owned: Vec<u16>,
        gathered: Vec<u16>,
    },
    /// PowerSGD's factors and residuals, and the Q-phase buffer.
    PowerSgd {
        p: Box<crate::compress::PowerSgd>,
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
    pub times: ExchangeTimes,
}

impl Exchange {
    pub fn new(cfg: &TrainConfig, n_params: usize, ranks: usize) -> Self {
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
            times: ExchangeTimes::default(),
        }
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
    /// `rank` this rank. The error-feedback residuals start at zero: a resumed run starts them
    /// afresh (they are not in checkpoints).
    pub fn set_compression(
        &mut self,
        cfg: &TrainConfig,
        layout: &crate::model::Layout,
        rank: usize,
    ) -> anyhow::Result<()> {
        use super::config::CompressKind;
        use crate::compress::{ExchangeState, PowerSgd, WireFormat, weight_matrices};
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
                    cfg.seed,
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
        let asked = u64::from(crate::stop::requested().is_some());
        if !self.exchanges_gradients() {
            if local_rows > 0 {
                backend.backward()?;
            }
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
        if self.compressor.is_some() {
            return self.compressed(backend, comm, local_rows, asked);
        }
        let n_b = self.buckets.len();
        self.times.buckets.resize(n_b, 0.0);
        let n_all: usize = self.buckets.iter().map(|b| b.range.len()).sum();
        self.times.sent_bytes += (4 * n_all) as f64;
        self.times.f32_bytes += (4 * n_all) as f64;
        let mut pending = Vec::with_capacity(n_b);
        // backward in stretches: each bucket's copy is submitted as soon as its layers are done,
        // and the one before is collected and sent while the device works on
        for i in 0..n_b {
            let b = self.buckets[i].clone();
            if local_rows > 0 {
                let _g = crate::trace::span("backward", "phase").arg("bucket", i);
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
        // the sums, in order, back to the device
        let mut stop = false;
        let mut totals = Totals::default();
        for (i, p) in pending.into_iter().enumerate() {
            let t0 = Instant::now();
            let (buf, secs) = {
                let _g = crate::trace::span("wait for sum", "exchange").arg("bucket", i);
                comm.finish_sum_f32(p)?
            };
            let t1 = Instant::now();
            let b = &self.buckets[i];
            let n = b.range.len();
            {
                let _g = crate::trace::span("upload", "exchange")
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
        use crate::compress::{Round, decode, segments, wire_bytes_per_rank};
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
            let _g = crate::trace::span("readback", "exchange").arg("bytes", 4 * n);
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
                crate::trace::span("encode", "exchange")
                    .end_after(|| state.encode(&grad, *fmt, wire));
                recv.resize(counts[rank] * ranks, 0);
                comm.all_to_all_u16(wire, &counts, recv, &vec![counts[rank]; ranks])?;
                crate::trace::span("sum owned segment", "exchange")
                    .end_after(|| state.reduce_owned(recv, *fmt, owned));
                gathered.resize(n * w, 0);
                comm.all_gather_u16(owned, &counts, gathered)?;
                crate::trace::span("decode", "exchange")
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
    ) -> anyhow::Result<crate::comm::PendingSum> {
        let t0 = Instant::now();
        let b = self.buckets.get(i).context("bucket index")?.clone();
        let n = b.range.len();
        let _g = crate::trace::span("readback", "exchange")
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
