//! The bucketed exchange of one step's gradients, whatever the codec. Buckets are contiguous
//! ranges of the flat gradient buffer, whole dense layers each, in reverse layer order (the last
//! layers first, as backward produces them). The step runs backward bucket by bucket and says
//! when each bucket's layers are done ([`Bucketed::ready`]): its copy to the host is submitted;
//! while the device goes on with earlier layers, the host collects the previous bucket, its codec
//! encodes it and the communication thread runs the codec's collectives. The sums come back in
//! bucket order and are uploaded ([`Bucketed::receive`]); the update then runs on the whole
//! gradient (clipping and the f16 overflow check need all of it). With one bucket
//! (`--bucket-mb 0`) this is the fused exchange. With the f32 sum at 2 ranks every element's
//! sum is a + b whatever the bucketing, so results are bit-identical.

use std::ops::Range;
use std::time::Instant;

use anyhow::{Context, ensure};

use super::ExchangeTimes;
use super::totals::StepTotals;
use crate::backend::Backend;
use crate::distributed::codec::{BucketCodec, CodecKind, CodecState, for_bucket};
use crate::distributed::comm::{Communicator, JobOutput, PendingJob};

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

/// One bucket's sum over the ranks: in flight on the communication thread, or arrived (after a
/// checkpoint or a resume).
pub enum BucketSum {
    InFlight(PendingJob),
    Arrived(Vec<f32>),
}

/// What a bucket's job takes to the communication thread and brings back.
struct Carried {
    codec: Box<dyn BucketCodec>,
    buf: Vec<f32>,
    sent: usize,
}

/// The step's sends so far: this rank's rows, its stop request, and the sums started.
struct Sending {
    local_rows: usize,
    stop: bool,
    sums: Vec<BucketSum>,
}

/// The buckets and their codecs.
pub struct Bucketed {
    pub buckets: Vec<Bucket>,
    /// Per bucket, the codecs not in flight: one, or for a codec without state also its spare
    /// (`--staleness 1` has two steps' sums in flight).
    codecs: Vec<Vec<Box<dyn BucketCodec>>>,
    pub kind: CodecKind,
    /// One host buffer per bucket (the first with the totals' words after the gradients): moved
    /// to the communication thread for its sum and back, reused every step.
    bufs: Vec<Vec<f32>>,
    sending: Option<Sending>,
}

impl Bucketed {
    /// One bucket of `n_params` values, the f32 sum.
    pub fn new(n_params: usize) -> Self {
        let mut b = Self {
            buckets: Vec::new(),
            codecs: Vec::new(),
            kind: CodecKind::Sum,
            bufs: Vec::new(),
            sending: None,
        };
        let one = vec![Bucket {
            range: 0..n_params,
            layer: 0,
        }];
        // the sum has no state and cannot fail to build
        let _ = b.set(one, CodecKind::Sum, &[], 0, 1, 0);
        b
    }

    /// Exchange `buckets` with codecs of `kind` (on rank `rank` of `ranks`; `matrices`: the
    /// model's weight matrices, for PowerSGD, whose first Q `seed` draws). Their state starts
    /// afresh.
    pub fn set(
        &mut self,
        buckets: Vec<Bucket>,
        kind: CodecKind,
        matrices: &[(usize, usize, usize)],
        rank: usize,
        ranks: usize,
        seed: u64,
    ) -> anyhow::Result<()> {
        let mut codecs = Vec::with_capacity(buckets.len());
        for b in &buckets {
            // PowerSGD numbers its matrices over the whole gradient, in offset order
            let first = matrices
                .iter()
                .filter(|&&(o, m, n)| o + m * n <= b.range.start && compressible(kind, m, n))
                .count();
            let c = for_bucket(kind, &b.range, matrices, rank, ranks, seed, first)
                .map_err(|e| anyhow::anyhow!("the exchange's codec: {e}"))?;
            let mut pool = vec![];
            pool.extend(c.spare());
            pool.push(c);
            codecs.push(pool);
        }
        self.bufs = vec![Vec::new(); buckets.len()];
        self.buckets = buckets;
        self.codecs = codecs;
        self.kind = kind;
        Ok(())
    }

    /// Total gradient values.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.range.len()).sum()
    }

    /// A step's exchange begins: `local_rows` is this rank's share of the step (0: it
    /// contributes zeros), `stop` whether it was asked to stop.
    pub fn begin(&mut self, local_rows: usize, stop: bool) {
        self.sending = Some(Sending {
            local_rows,
            stop,
            sums: Vec::with_capacity(self.buckets.len()),
        });
    }

    /// Backward has produced bucket `i`'s gradients (buckets in order): its copy to the host
    /// starts, and the bucket before it is collected and its exchange started.
    pub fn ready(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        i: usize,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<()> {
        let rows = self
            .sending
            .as_ref()
            .context("a bucket before the step's exchange began")?;
        if rows.local_rows > 0 {
            let b = self.buckets.get(i).context("bucket index")?;
            backend.stage_grads(i, b.range.clone(), i == 0)?;
        }
        if i > 0 {
            self.send(backend, comm, i - 1, times)?;
        }
        Ok(())
    }

    /// The last bucket's exchange started too: the step's sums in flight, in bucket order.
    pub fn sent(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Vec<BucketSum>> {
        self.send(backend, comm, self.buckets.len() - 1, times)?;
        let s = self
            .sending
            .take()
            .context("the step's exchange did not begin")?;
        ensure!(
            s.sums.len() == self.buckets.len(),
            "{} of {} buckets were sent",
            s.sums.len(),
            self.buckets.len()
        );
        Ok(s.sums)
    }

    /// Collect bucket `i` from the backend (zeros from a rank without rows; the first bucket also
    /// carries the totals and the stop request), encode it and start its exchange.
    fn send(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        i: usize,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let s = self
            .sending
            .as_mut()
            .context("the step's exchange did not begin")?;
        let b = self.buckets.get(i).context("bucket index")?.clone();
        let n = b.range.len();
        let first = i == 0;
        let mut buf = std::mem::take(&mut self.bufs[i]);
        buf.resize(n + if first { StepTotals::WORDS } else { 0 }, 0.0);
        let mut codec = self.codecs[i]
            .pop()
            .with_context(|| format!("bucket {i}'s codec has an exchange in flight"))?;
        let (what, collectives) = (codec.name(), codec.collectives());
        {
            let _g = crate::observe::trace::span("readback", "exchange")
                .arg("bucket", i)
                .arg("bytes", 4 * n);
            let local = if s.local_rows > 0 {
                backend.collect_grads(i, b.range.clone(), &mut buf[..n], first)?
            } else {
                buf.fill(0.0);
                None
            };
            if first {
                let words = StepTotals {
                    totals: local.unwrap_or_default(),
                    stop: s.stop,
                };
                buf[n..].copy_from_slice(&words.pack());
            }
            codec.encode(&buf, n);
        }
        times.readback += t0.elapsed().as_secs_f64();
        times.f32_bytes += (4 * buf.len()) as f64;
        let job: crate::distributed::comm::Job = Box::new(move |c: &dyn Communicator| {
            let sent = codec.reduce(c, &mut buf, n)?;
            Ok(Box::new(Carried { codec, buf, sent }) as JobOutput)
        });
        s.sums.push(BucketSum::InFlight(comm.start_job(
            what,
            collectives,
            job,
        )?));
        Ok(())
    }

    /// Wait for bucket `i`'s sum (its codec back in place): the summed buffer, with the totals'
    /// words after the gradients in the first bucket.
    pub fn arrive(
        &mut self,
        comm: &dyn Communicator,
        i: usize,
        sum: BucketSum,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Vec<f32>> {
        match sum {
            BucketSum::Arrived(buf) => Ok(buf),
            BucketSum::InFlight(p) => {
                let (out, secs) = {
                    let _g =
                        crate::observe::trace::span("wait for sum", "exchange").arg("bucket", i);
                    comm.finish_job(p)?
                };
                let c = out.downcast::<Carried>().map_err(|_| {
                    anyhow::anyhow!("bucket {i}'s exchange returned something else")
                })?;
                let Carried { codec, buf, sent } = *c;
                self.codecs[i].push(codec);
                times.allreduce += secs;
                times.buckets.resize(self.buckets.len(), 0.0);
                times.buckets[i] += secs;
                times.sent_bytes += sent as f64;
                Ok(buf)
            }
        }
    }

    /// Every sum waited for, in bucket order.
    pub fn arrive_all(
        &mut self,
        comm: &dyn Communicator,
        sums: Vec<BucketSum>,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(sums.len());
        for (i, s) in sums.into_iter().enumerate() {
            out.push(self.arrive(comm, i, s, times)?);
        }
        times.waited += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// The sums, in bucket order, into the device's gradient buffer; the totals and the stop
    /// request from the first bucket.
    pub fn receive(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        sums: Vec<BucketSum>,
        times: &mut ExchangeTimes,
    ) -> anyhow::Result<StepTotals> {
        ensure!(
            sums.len() == self.buckets.len(),
            "{} sums for {} buckets",
            sums.len(),
            self.buckets.len()
        );
        times.buckets.resize(self.buckets.len(), 0.0);
        let mut words = StepTotals::default();
        for (i, sum) in sums.into_iter().enumerate() {
            let t0 = Instant::now();
            let buf = self.arrive(comm, i, sum, times)?;
            let t1 = Instant::now();
            let b = &self.buckets[i];
            let n = b.range.len();
            ensure!(
                buf.len() >= n + if i == 0 { StepTotals::WORDS } else { 0 },
                "bucket {i}'s sum is short"
            );
            {
                let _g = crate::observe::trace::span("upload", "exchange")
                    .arg("bucket", i)
                    .arg("bytes", 4 * n);
                backend.write_grads(b.range.clone(), &buf[..n])?;
            }
            if i == 0 {
                words = StepTotals::unpack(&buf[n..]);
            }
            times.waited += (t1 - t0).as_secs_f64();
            times.upload += t1.elapsed().as_secs_f64();
            self.bufs[i] = buf;
        }
        Ok(words)
    }

    /// Each bucket's codec state, in bucket order (codecs not in flight).
    pub fn states(&self) -> anyhow::Result<Vec<CodecState>> {
        self.codecs
            .iter()
            .enumerate()
            .map(|(i, pool)| {
                pool.last()
                    .map(|c| c.state())
                    .with_context(|| format!("bucket {i}'s codec has an exchange in flight"))
            })
            .collect()
    }

    /// Restore each bucket's codec state (in bucket order).
    pub fn set_states(&mut self, states: Vec<CodecState>) -> anyhow::Result<()> {
        ensure!(
            states.len() == self.codecs.len(),
            "codec states for {} buckets, the exchange has {}",
            states.len(),
            self.codecs.len()
        );
        for (i, (pool, s)) in self.codecs.iter_mut().zip(states).enumerate() {
            let c = pool
                .last_mut()
                .with_context(|| format!("bucket {i}'s codec has an exchange in flight"))?;
            c.set_state(s)
                .map_err(|e| anyhow::anyhow!("bucket {i}'s codec state: {e}"))?;
        }
        Ok(())
    }
}

/// Whether PowerSGD compresses an m × n matrix (what `PowerSgd::new` selects).
fn compressible(kind: CodecKind, m: usize, n: usize) -> bool {
    match kind {
        CodecKind::PowerSgd { rank, .. } => m.min(n) > rank,
        _ => false,
    }
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
