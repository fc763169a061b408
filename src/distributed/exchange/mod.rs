//! The exchange between ranks: each step's gradients and training totals summed over the ranks,
//! bucket by bucket, and the parameter averaging of local SGD.
//!
//! - `buckets.rs`: the buckets of whole layers and their codecs (`distributed/codec/`): the step
//!   says when a bucket's layers are done, its exchange starts at once, and the sums come back
//!   in order (every codec, the f32 sum, the 16-bit wire and PowerSGD, alike);
//! - `delayed.rs`: `--staleness 1`, the same exchange with one step's sums in flight;
//! - `local_sgd.rs`: `--sync params`, parameter averaging (synchronous or `--async-average`);
//! - `totals.rs`: the step's totals as they travel beside the gradients;
//! - `record.rs`: the exchange's state in a checkpoint;
//! - `config.rs`: the exchange's settings (`ExchangeArgs` → `ExchangeConfig`).

use std::ops::Range;
use std::time::Instant;

use anyhow::ensure;
use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

mod buckets;
pub mod config;
mod delayed;
mod local_sgd;
pub mod record;
mod totals;

pub use buckets::{Bucket, buckets};
pub use config::{CompressKind, ExchangeConfig, SyncMode};
pub use record::{ExchangeRecord, RankRecord};
pub use totals::StepTotals;

use crate::backend::Backend;
use crate::distributed::codec::{CodecKind, WireFormat, weight_matrices};
use crate::distributed::comm::Communicator;
use buckets::Bucketed;
use delayed::Delayed;
use local_sgd::LocalSgd;

/// Host time spent in the exchange, summed over a run (seconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExchangeTimes {
    /// Waiting for the gradients, copying them to the host and encoding them (includes the
    /// GPU's compute).
    pub readback: f64,
    /// The buckets' exchanges (collectives, and a codec's work between them), as the
    /// communication thread timed them.
    pub allreduce: f64,
    /// How long the training thread waited for the sums: the communication not hidden.
    pub waited: f64,
    /// Copying the summed gradients back to the device.
    pub upload: f64,
    /// The exchange time of each bucket (bucket 0 holds the last layers).
    pub buckets: Vec<f64>,
    /// Bytes this rank sent for gradients, and what f32 gradients would have been.
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

    /// The training thread's idle time so far: waits for the sums and their upload.
    pub fn idle(&self) -> f64 {
        self.waited + self.upload
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

impl Summed {
    fn of(t: StepTotals) -> Self {
        Self {
            samples: t.totals.count,
            totals: Some(t.totals),
            stop: t.stop,
        }
    }
}

/// How the codecs are built when the buckets change.
struct CodecSetup {
    kind: CodecKind,
    matrices: Vec<(usize, usize, usize)>,
    rank: usize,
    seed: u64,
}

pub struct Exchange {
    sync: SyncMode,
    ranks: usize,
    bucketed: Bucketed,
    codecs: CodecSetup,
    /// `--staleness 1`: the sums in flight.
    delayed: Option<Delayed>,
    /// `--sync params`: parameter averaging.
    local_sgd: Option<LocalSgd>,
    pub times: ExchangeTimes,
}

impl Exchange {
    pub fn new(cfg: &ExchangeConfig, n_params: usize, ranks: usize) -> Self {
        let local_sgd = (cfg.sync == SyncMode::Params)
            .then(|| LocalSgd::new(cfg.sync_every, ranks, cfg.async_average, n_params));
        let delayed = (cfg.staleness > 0 && cfg.sync == SyncMode::Grads).then(Delayed::default);
        Self {
            sync: cfg.sync,
            ranks,
            // one bucket, the f32 sum, until `set_buckets` and `set_compression`
            bucketed: Bucketed::new(n_params),
            codecs: CodecSetup {
                kind: CodecKind::Sum,
                matrices: Vec::new(),
                rank: 0,
                seed: 0,
            },
            delayed,
            local_sgd,
            times: ExchangeTimes::default(),
        }
    }

    /// Whether steps apply the previous step's summed gradient (`--staleness 1`, any number of
    /// ranks, so that one rank trains exactly as N do).
    pub fn delayed(&self) -> bool {
        self.delayed.is_some() && self.codecs.kind == CodecKind::Sum
    }

    /// Whether gradients travel every step (several ranks, `--sync grads`).
    pub fn exchanges_gradients(&self) -> bool {
        self.ranks > 1 && self.sync == SyncMode::Grads
    }

    /// Whether the step's last backward runs bucket by bucket, each bucket's exchange starting
    /// when its layers are done ([`Exchange::bucket_ready`]).
    pub fn bucketed(&self) -> bool {
        self.exchanges_gradients() || self.delayed()
    }

    /// Each bucket's bytes as it travels in f32 (the first with the totals' words).
    pub fn bucket_bytes(&self) -> Vec<u64> {
        self.bucketed
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| 4 * (b.range.len() + if i == 0 { StepTotals::WORDS } else { 0 }) as u64)
            .collect()
    }

    /// Whether gradients travel compressed (a 16-bit wire or PowerSGD), not as f32 sums.
    pub fn compressed_mode(&self) -> bool {
        self.codecs.kind != CodecKind::Sum
    }

    /// The buckets, exchanged one at a time in this order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.bucketed.buckets
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
        if !self.exchanges_gradients() {
            return Ok(());
        }
        self.codecs = CodecSetup {
            kind: match (cfg.compress, cfg.grad_wire) {
                (CompressKind::None, WireFormat::F32) => CodecKind::Sum,
                (CompressKind::None, fmt) => CodecKind::Wire(fmt),
                (CompressKind::Powersgd, _) => CodecKind::PowerSgd {
                    rank: cfg.powersgd_rank,
                    warmup: cfg.powersgd_warmup,
                },
            },
            matrices: weight_matrices(layout),
            rank,
            seed,
        };
        let b = self.bucketed.buckets.clone();
        self.rebuild(b)
    }

    /// Exchange in buckets of about `target` bytes of whole layers (`layers[l]`: dense layer l's
    /// parameter range); 0: one bucket.
    pub fn set_buckets(&mut self, layers: &[Range<usize>], target: usize) -> anyhow::Result<()> {
        self.rebuild(buckets(layers, target))
    }

    fn rebuild(&mut self, b: Vec<Bucket>) -> anyhow::Result<()> {
        let c = &self.codecs;
        self.bucketed
            .set(b, c.kind, &c.matrices, c.rank, self.ranks.max(1), c.seed)
    }

    /// A step's exchange begins, before its last micro-batch's backward: `local_rows` is this
    /// rank's share of the step (0: it contributes zeros).
    pub fn begin(&mut self, local_rows: usize) {
        if let Some(l) = &mut self.local_sgd {
            l.trained(local_rows);
        }
        let stop = crate::distributed::stop::requested().is_some();
        self.bucketed.begin(local_rows, stop);
    }

    /// Backward has produced bucket `i`'s gradients (buckets in order, when
    /// [`Exchange::bucketed`]): its exchange starts.
    pub fn bucket_ready(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        i: usize,
    ) -> anyhow::Result<()> {
        self.bucketed.ready(backend, comm, i, &mut self.times)
    }

    /// After the step's backward: its gradients and totals summed over the ranks, in the
    /// backend. `local_rows` is this rank's share of the step; `global_rows` the step's rows over
    /// all ranks (what a single rank divides by). Without gradients to exchange, the ranks agree
    /// on a stop with a one-word collective (with `--async-average` the request travels with the
    /// averages instead: no step waits).
    pub fn gradients(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        local_rows: usize,
        global_rows: usize,
    ) -> anyhow::Result<Summed> {
        if self.exchanges_gradients() {
            let sums = self.bucketed.sent(backend, comm, &mut self.times)?;
            let t = self
                .bucketed
                .receive(backend, comm, sums, &mut self.times)?;
            return Ok(Summed::of(t));
        }
        let samples = match self.sync {
            // local SGD: each rank steps on its own rows
            SyncMode::Params => local_rows,
            SyncMode::Grads => global_rows,
        };
        let asynchronous = self.local_sgd.is_some() && self.async_average();
        let mut stop = [u64::from(crate::distributed::stop::requested().is_some())];
        if self.ranks > 1 && !asynchronous {
            let t0 = Instant::now();
            comm.allreduce_sum_u64(&mut stop)?;
            self.times.waited += t0.elapsed().as_secs_f64();
        } else if asynchronous && self.ranks > 1 {
            stop[0] = 0;
        }
        Ok(Summed {
            samples: samples as u64,
            totals: None,
            stop: stop[0] > 0,
        })
    }

    fn async_average(&self) -> bool {
        self.local_sgd.as_ref().is_some_and(LocalSgd::asynchronous)
    }

    /// `--staleness 1`, after the step's backward: its sums go in flight, and the previous
    /// step's arrive into the device's gradient buffer (their step and what they summed); None
    /// at the first step after a start or a drain.
    pub fn delayed_gradients(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        step: u64,
    ) -> anyhow::Result<Option<(u64, Summed)>> {
        let sums = self.bucketed.sent(backend, comm, &mut self.times)?;
        let d = self
            .delayed
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no delayed exchange"))?;
        let prev = d.swap(
            &mut self.bucketed,
            backend,
            comm,
            step,
            sums,
            &mut self.times,
        )?;
        Ok(prev.map(|(s, t)| (s, Summed::of(t))))
    }

    /// `--staleness 1`: the sums still in flight, in the device's gradient buffer (their step
    /// and what they summed); None when nothing is in flight.
    pub fn drain(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<Option<(u64, Summed)>> {
        let Some(d) = &mut self.delayed else {
            return Ok(None);
        };
        let prev = d.drain(&mut self.bucketed, backend, comm, &mut self.times)?;
        Ok(prev.map(|(s, t)| (s, Summed::of(t))))
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

    /// In local SGD, after every `--sync-every` steps and after the last: the parameter average
    /// (`local_sgd.rs`). `done` counts the steps taken so far. True when the ranks agreed to
    /// stop (`--async-average` only; the synchronous modes agree every step).
    pub fn average_if_due(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        done: u64,
        total_steps: u64,
    ) -> anyhow::Result<bool> {
        match &mut self.local_sgd {
            Some(l) => l.average_if_due(backend, comm, done, total_steps, &mut self.times),
            None => Ok(false),
        }
    }

    /// A run that ended before its last step under `--sync params`: the average in flight is
    /// applied, then the ranks average once more. A collective: call it on every rank.
    pub fn final_average(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<()> {
        match &mut self.local_sgd {
            Some(l) => l.final_average(backend, comm, &mut self.times),
            None => Ok(()),
        }
    }

    /// The exchange's state for a checkpoint (a collective: every rank calls it, and rank 0 gets
    /// it all): `--staleness 1`'s sums in flight (waited for; they stay, arrived, for the next
    /// step), local SGD's state and average in flight, the codecs' state (see `record.rs`).
    pub fn checkpoint_state(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
    ) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        let mut rec = ExchangeRecord::default();
        if let Some(d) = &mut self.delayed {
            rec.inflight = d.checkpoint(&mut self.bucketed, comm, &mut self.times)?;
        }
        // this rank's own state, to rank 0
        let mut mine = RankRecord::default();
        if let Some(l) = &mut self.local_sgd
            && self.ranks > 1
        {
            rec.average = l.checkpoint(backend, comm, &mut mine, &mut self.times)?;
        }
        if self.compressed_mode() {
            let states = self.bucketed.states()?;
            let b = &self.bucketed.buckets;
            match self.codecs.kind {
                CodecKind::Wire(_) => {
                    mine.wire = record::wire_record(b, states, self.bucketed.len());
                }
                CodecKind::PowerSgd { .. } => mine.powersgd = record::powersgd_record(b, states),
                CodecKind::Sum => {}
            }
        }
        if !mine.is_empty() {
            rec.ranks = gather_records(comm, &mine)?;
        }
        Ok(rec.to_tensors())
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
        let rec = ExchangeRecord::from_tensors(extra, rank);
        let mine = rec.ranks.get(rank).cloned().unwrap_or_default();
        if let (Some(flat), true) = (&rec.inflight, self.delayed()) {
            if let Some(d) = &mut self.delayed {
                d.restore(&self.bucketed, flat, step)?;
            }
        }
        if let Some(l) = &mut self.local_sgd {
            l.restore(backend, rec.average.as_ref(), &mine)?;
        }
        let b = self.bucketed.buckets.clone();
        match (self.codecs.kind, &mine.wire, &mine.powersgd) {
            (CodecKind::Wire(_), Some(w), _) => {
                let states = record::wire_states(w, &b, rank, self.ranks)
                    .map_err(|e| anyhow::anyhow!("the checkpoint's error feedback: {e}"))?;
                self.bucketed.set_states(states)?;
            }
            (CodecKind::PowerSgd { .. }, _, Some(p)) => {
                let like = self.bucketed.states()?;
                let states = record::powersgd_states(p, &b, &like)
                    .map_err(|e| anyhow::anyhow!("the checkpoint's PowerSGD state: {e}"))?;
                self.bucketed.set_states(states)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Every rank's record to rank 0, in rank order (others get an empty list). The tensors of each
/// rank's record travel framed by their lengths, in the order every rank lists them alike.
fn gather_records(comm: &dyn Communicator, mine: &RankRecord) -> anyhow::Result<Vec<RankRecord>> {
    use anyhow::Context;
    let tensors = mine.to_tensors();
    let mut bytes = Vec::new();
    for (_, v) in &tensors {
        bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
        bytes.extend_from_slice(bytemuck::cast_slice(v));
    }
    let chunk = crate::distributed::gather::chunk_bytes(comm.size());
    let Some(all) = crate::distributed::gather::gather_to_root(comm, &bytes, chunk)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(all.len());
    for b in &all {
        let mut at = 0;
        let mut theirs = Vec::with_capacity(tensors.len());
        for (k, _) in &tensors {
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
            theirs.push((k.clone(), v));
        }
        out.push(RankRecord::from_tensors(
            theirs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        ));
    }
    Ok(out)
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
