//! Benchmarks behind `dptrain bench`: the allreduce itself (`bench comm`), laid out like nccl-tests
//! so that the trainer's exchange can be set beside raw MPI.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, ensure};
use serde::{Deserialize, Serialize};

use crate::comm::Communicator;

/// One row of `bench comm`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CommRow {
    /// Ranks in the allreduce (absent in files of older builds: `bench scaling` then infers it
    /// from busbw / algbw).
    #[serde(default)]
    pub ranks: u64,
    pub bytes: u64,
    pub count: u64,
    pub time_us: f64,
    /// bytes / time
    pub algbw_gbs: f64,
    /// algbw · 2(n-1)/n: the per-link traffic of a ring allreduce, comparable across rank counts
    pub busbw_gbs: f64,
    /// elements whose sum was wrong
    pub wrong: u64,
    /// The same allreduce through the stall watchdog (non-blocking, polled), as training runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guarded_time_us: Option<f64>,
    /// A one-process `copy_from_slice` of the same bytes between two preallocated buffers, on every
    /// rank at once, as many times as the allreduce (the fastest copy, slowest rank): bytes / time.
    #[serde(default)]
    pub memcpy_gbs: f64,
    /// busbw / memcpy: how close the allreduce comes to the memory copy (a shared-memory ring moves
    /// every byte twice, so about 0.5 is as good as it gets on one node).
    #[serde(default)]
    pub busbw_over_memcpy: f64,
}

/// Sizes from `min` to `max` bytes, doubling (each a multiple of 4).
pub fn sizes(min: u64, max: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut b = min.max(4) / 4 * 4;
    while b <= max {
        v.push(b);
        b *= 2;
    }
    v
}

/// Allreduce f32 buffers of each size with MPI's blocking allreduce, `iters` times after `warmup`,
/// checking every element of the result; and, where the communicator has a collective timeout,
/// again through the watchdog's guarded path.
pub fn comm_bench(
    comm: &dyn Communicator,
    sizes: &[u64],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Vec<CommRow>> {
    let guard = comm.collective_timeout();
    comm.set_collective_timeout(None);
    let raw = comm_rows(comm, sizes, warmup, iters);
    comm.set_collective_timeout(guard);
    let mut rows = raw?;
    if guard.is_some() && comm.size() > 1 {
        for (row, g) in rows.iter_mut().zip(comm_rows(comm, sizes, warmup, iters)?) {
            row.guarded_time_us = Some(g.time_us);
            row.wrong += g.wrong;
        }
    }
    for row in &mut rows {
        comm.barrier()?;
        let mine = memcpy_secs(row.bytes, warmup, iters);
        // a timer tick at the least: a few bytes copy faster than the clock resolves
        let secs = slowest(comm, &[mine])?[0].max(1e-9);
        row.memcpy_gbs = row.bytes as f64 / secs / 1e9;
        row.busbw_over_memcpy = row.busbw_gbs / row.memcpy_gbs;
    }
    Ok(rows)
}

/// Seconds of the fastest of `iters` `copy_from_slice`s of `bytes` bytes between two preallocated
/// f32 buffers, each timed alone, after `warmup` (at least one, which also faults the pages in).
/// The best, not the mean: the copy stands for what the memory can do, and on a busy machine one
/// preemption would otherwise decide a small copy's figure.
fn memcpy_secs(bytes: u64, warmup: usize, iters: usize) -> f64 {
    let count = (bytes / 4) as usize;
    let src = vec![1f32; count];
    let mut dst = vec![0f32; count];
    for _ in 0..warmup.max(1) {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// The largest value over the ranks of each of `mine` (collective).
fn slowest(comm: &dyn Communicator, mine: &[f64]) -> anyhow::Result<Vec<f64>> {
    let k = mine.len();
    let mut all = vec![0f64; k * comm.size()];
    all[comm.rank() * k..(comm.rank() + 1) * k].copy_from_slice(mine);
    comm.allreduce_sum_f64(&mut all)?;
    Ok((0..k)
        .map(|i| all.iter().skip(i).step_by(k).cloned().fold(0.0, f64::max))
        .collect())
}

fn comm_rows(
    comm: &dyn Communicator,
    sizes: &[u64],
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Vec<CommRow>> {
    ensure!(iters >= 1, "--iters must be at least 1");
    let n = comm.size() as f64;
    let mut rows = Vec::new();
    for &bytes in sizes {
        let count = (bytes / 4) as usize;
        let send = vec![(comm.rank() + 1) as f32; count];
        let mut recv = vec![0f32; count];
        for _ in 0..warmup {
            comm.allreduce_sum_f32_into(&send, &mut recv)?;
        }
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            comm.allreduce_sum_f32_into(&send, &mut recv)?;
        }
        let mine = t.elapsed().as_secs_f64() / iters as f64;
        // the slowest rank decides a collective's time
        let mut times = vec![0f64; comm.size()];
        times[comm.rank()] = mine;
        comm.allreduce_sum_f64(&mut times)?;
        let secs = times.iter().cloned().fold(0.0, f64::max);
        let want = (n * (n + 1.0) / 2.0) as f32;
        let mut wrong = [recv.iter().filter(|&&v| v != want).count() as u64];
        comm.allreduce_sum_u64(&mut wrong)?;
        let algbw = bytes as f64 / secs / 1e9;
        rows.push(CommRow {
            ranks: n as u64,
            bytes,
            count: count as u64,
            time_us: secs * 1e6,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (n - 1.0) / n,
            wrong: wrong[0],
            guarded_time_us: None,
            memcpy_gbs: 0.0,
            busbw_over_memcpy: 0.0,
        });
    }
    Ok(rows)
}

/// nccl-tests' table header.
pub fn comm_header(comm: &dyn Communicator) -> String {
    format!(
        "# allreduce f32 sum, {}; time: MPI_Allreduce; guarded: the same through the stall watchdog;\n# memcpy: copy_from_slice of the same bytes on every rank at once (best of the iterations); bus/mem: busbw / memcpy\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7} {:>12} {:>9} {:>8}\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7} {:>12} {:>9} {:>8}",
        comm.describe(),
        "size",
        "count",
        "type",
        "redop",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "guarded",
        "memcpy",
        "bus/mem",
        "(B)",
        "(elements)",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
        "(us)",
        "(GB/s)",
        ""
    )
}

impl CommRow {
    pub fn line(&self) -> String {
        format!(
            " {:>12} {:>12} {:>8} {:>6} {:>12.2} {:>9.2} {:>9.2} {:>7} {:>12} {:>9.2} {:>8.3}",
            self.bytes,
            self.count,
            "float",
            "sum",
            self.time_us,
            self.algbw_gbs,
            self.busbw_gbs,
            self.wrong,
            self.guarded_time_us
                .map_or_else(|| "-".to_string(), |t| format!("{t:.2}")),
            self.memcpy_gbs,
            self.busbw_over_memcpy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::SingleProcess;

    #[test]
    fn sizes_double_from_min_to_max() {
        assert_eq!(sizes(4, 64), vec![4, 8, 16, 32, 64]);
        assert_eq!(sizes(5, 20), vec![4, 8, 16]);
    }

    #[test]
    fn a_single_process_bench_checks_its_sums() {
        let rows = comm_bench(&SingleProcess, &sizes(4, 1024), 1, 3).unwrap();
        assert_eq!(rows.len(), 9);
        assert!(
            rows.iter()
                .all(|r| r.wrong == 0 && r.busbw_gbs == 0.0 && r.time_us >= 0.0)
        );
        assert!(rows[0].line().contains("float"));
        assert!(rows.iter().all(|r| r.ranks == 1
            && r.memcpy_gbs > 0.0
            && r.memcpy_gbs.is_finite()
            && r.busbw_over_memcpy == 0.0));
        assert_eq!(rows[0].line().split_whitespace().count(), 11);
        // the JSON rows read back, and so do those of older builds (no ranks, no memcpy)
        let text = serde_json::to_string(&rows).unwrap();
        let back: Vec<CommRow> = serde_json::from_str(&text).unwrap();
        assert!(back.iter().zip(&rows).all(|(b, r)| b.bytes == r.bytes
            && b.ranks == r.ranks
            && (b.memcpy_gbs / r.memcpy_gbs - 1.0).abs() < 1e-12));
        let old = r#"[{"bytes":8,"count":2,"time_us":1.5,"algbw_gbs":0.005,"busbw_gbs":0.005,"wrong":0}]"#;
        let old: Vec<CommRow> = serde_json::from_str(old).unwrap();
        assert_eq!((old[0].ranks, old[0].memcpy_gbs), (0, 0.0));
    }

    #[test]
    fn one_process_has_no_transport_to_probe() {
        assert!(measure_transport(&SingleProcess).unwrap().is_none());
        assert!(probe_transport(&SingleProcess).unwrap().is_none());
    }

    fn probe(ratio: f64, ranks: usize, cores: usize) -> TransportProbe {
        TransportProbe {
            ranks,
            bytes: PROBE_BYTES,
            iters: 5,
            allreduce_us: 1000.0,
            busbw_gbs: 6.0 * ratio,
            memcpy_gbs: 6.0,
            ratio,
            cores,
            shm_free_bytes: Some(64 << 30),
            seconds: 0.02,
        }
    }

    #[test]
    fn the_probe_warns_only_far_below_a_memory_copy() {
        // the lowest healthy ratio on the H200 machine's host was 0.157, the TCP loopback 0.132
        assert!(probe(0.157, 8, 16).warning().is_none());
        assert!(probe(0.132, 8, 16).warning().is_none());
        assert!(probe(PROBE_MIN_RATIO, 8, 16).warning().is_none());
        let w = probe(0.05, 2, 16).warning().unwrap();
        assert_eq!(w.lines().count(), 1, "{w}");
        for needle in [
            "OMPI_MCA_coll_tuned_use_dynamic_rules=1 OMPI_MCA_coll_tuned_allreduce_algorithm=4",
            "OMPI_MCA_btl_vader_single_copy_mechanism=cma",
            "xpmem",
            "/dev/shm",
            "64.0 GiB free",
        ] {
            assert!(w.contains(needle), "{needle}: {w}");
        }
        assert!(!w.contains("cores"), "{w}");
        // more ranks than cores is named as a cause too
        assert!(
            probe(0.05, 4, 2)
                .warning()
                .unwrap()
                .contains("4 ranks share 2 cores")
        );
    }
}

/// A reference workload (see ../shared/design/WORKLOADS.md) or a custom model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    pub name: String,
    pub model: crate::model::ModelKind,
    pub features: usize,
    pub hidden: Vec<usize>,
    pub classes: usize,
}

impl Workload {
    /// The named reference workloads.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        use crate::model::ModelKind;
        let (model, features, hidden, classes) = match name {
            "seed-logreg" => (ModelKind::Logreg, 2, vec![], 2),
            "mnist-mlp" => (ModelKind::Mlp, 784, vec![1024, 1024], 10),
            "wide-mlp" => (ModelKind::Mlp, 4096, vec![4096, 4096], 1000),
            _ => anyhow::bail!("unknown workload {name:?} (seed-logreg, mnist-mlp, wide-mlp)"),
        };
        Ok(Self {
            name: name.into(),
            model,
            features,
            hidden,
            classes,
        })
    }
}

/// Datasheet fp32 peaks (TFLOP/s, FMA = 2 FLOPs) of cards we compare on, by adapter name.
pub fn fp32_peak_tflops(adapter: &str) -> Option<f64> {
    let a = adapter.to_ascii_uppercase();
    [
        ("H200", 67.0),
        ("H100 PCIE", 51.2),
        ("H100", 67.0),
        ("A100", 19.5),
    ]
    .iter()
    .find(|(k, _)| a.contains(k))
    .map(|&(_, v)| v)
}

/// How a step benchmark runs.
#[derive(Clone, Debug)]
pub struct StepBenchConfig {
    pub workload: Workload,
    /// Per-rank batch.
    pub batch: usize,
    /// Steps per timed repeat.
    pub steps: u64,
    pub repeats: usize,
    pub warmup: u64,
    pub device: crate::train::DeviceKind,
    pub gpu: Option<usize>,
    pub precision: crate::backend::Precision,
    pub autotune: crate::backend::autotune::AutotuneMode,
    /// How the step exchanges gradients under mpirun (as `train`'s flags).
    pub exchange: BenchExchange,
}

/// `train`'s exchange settings, for `bench --workload` under mpirun.
#[derive(Clone, Debug)]
pub struct BenchExchange {
    pub bucket_mb: f64,
    pub grad_wire: crate::compress::WireFormat,
    pub compress: crate::train::config::CompressKind,
    pub powersgd_rank: usize,
    pub staleness: u64,
    pub sync: crate::train::SyncMode,
    pub sync_every: u64,
    pub async_average: bool,
}

impl Default for BenchExchange {
    fn default() -> Self {
        Self {
            bucket_mb: crate::train::config::DEFAULT_BUCKET_MB,
            grad_wire: crate::compress::WireFormat::F32,
            compress: crate::train::config::CompressKind::None,
            powersgd_rank: 4,
            staleness: 0,
            sync: crate::train::SyncMode::Grads,
            sync_every: 1,
            async_average: false,
        }
    }
}

/// A workload's set-up and a backend holding one global batch of its shape, random data on the
/// device: every step trains on it again, so that only the step is timed.
pub struct WorkloadRun {
    pub config: crate::train::TrainConfig,
    pub setup: crate::train::Setup,
    pub backend: Box<dyn crate::backend::Backend>,
    /// Samples over all ranks.
    pub samples: usize,
}

impl WorkloadRun {
    pub fn open(cfg: &StepBenchConfig, comm: &dyn Communicator) -> anyhow::Result<Self> {
        use crate::backend;
        use crate::train::{self, ShardMode, StepPlan, TrainConfig};
        let w = &cfg.workload;
        let ranks = comm.size();
        let n = cfg.batch * ranks;
        let mut ds = crate::data::synth::random(n, w.features, w.classes, 7);
        if w.model == crate::model::ModelKind::Logreg {
            ds.y.iter_mut().for_each(|y| *y = f32::from(*y > 0.5));
        }
        let mut tc = TrainConfig::new(w.model);
        tc.hidden = w.hidden.clone();
        tc.batch_size = cfg.batch;
        tc.lr = 0.01;
        tc.normalize = crate::data::NormKind::None;
        tc.device = cfg.device;
        tc.gpu = cfg.gpu;
        tc.shard = ShardMode::Global;
        tc.sync = cfg.exchange.sync;
        tc.sync_every = cfg.exchange.sync_every;
        tc.staleness = cfg.exchange.staleness;
        tc.async_average = cfg.exchange.async_average;
        tc.precision = cfg.precision;
        tc.bucket_mb = cfg.exchange.bucket_mb;
        tc.grad_wire = cfg.exchange.grad_wire;
        tc.compress = cfg.exchange.compress;
        tc.powersgd_rank = cfg.exchange.powersgd_rank;
        // every timed step compressed
        tc.powersgd_warmup = 0;
        tc.validate()?;
        let setup = train::setup_rank(&tc, ds, None, comm.rank(), ranks)?;
        let plan = StepPlan::of(&tc, n, comm.rank(), ranks);
        let mut backend = backend::open(
            cfg.device,
            cfg.gpu,
            comm.local_rank(),
            &setup.backend_init(&tc, &plan),
        )?;
        backend.set_params(&setup.spec.init(1))?;
        backend.set_order(&(0..n as u32).collect::<Vec<_>>())?;
        Ok(Self {
            config: tc,
            setup,
            backend,
            samples: n,
        })
    }
}

/// What `dptrain bench --workload` reports (one JSON object).
#[derive(Clone, Debug, Serialize)]
pub struct StepBenchResult {
    pub workload: String,
    pub batch: usize,
    pub ranks: usize,
    pub adapter: String,
    pub parameters: usize,
    pub flops_per_step: f64,
    /// Median over repeats of the mean step time in a repeat.
    pub step_ms: f64,
    pub step_ms_repeats: Vec<f64>,
    pub samples_per_s_per_rank: f64,
    pub samples_per_s: f64,
    pub tflops: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp32_peak_share: Option<f64>,
    /// Host time per step in each phase (ms); with one rank the GPU runs behind the host.
    pub phases_ms: crate::train::PhaseTimes,
    /// GPU time per kernel of one step (ms), from timestamp queries where the adapter has them.
    pub kernels_ms: Vec<(String, f64)>,
    pub gpu_step_ms: Option<f64>,
    /// Under mpirun: raw MPI allreduce of the same bytes, the step's exchange, and their ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<ExchangeReport>,
    pub precision: crate::backend::Precision,
    /// The kernel each matrix product ran (tuned, cached or default), and the tuning time.
    pub kernels: crate::backend::KernelChoices,
    pub tuning_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExchangeReport {
    /// The gradients and totals in f32, as one buffer.
    pub bytes: u64,
    /// What this rank sent per step (fewer with a 16-bit wire or PowerSGD).
    pub sent_bytes: u64,
    /// `bench comm`'s allreduce of `bytes` in one piece, in the same run.
    pub raw_allreduce_ms: f64,
    /// The allreduces inside the step (per step, all buckets).
    pub step_allreduce_ms: f64,
    /// step allreduce / raw allreduce of one piece - 1
    pub overhead_vs_raw: f64,
    /// step allreduce / the raw allreduces of the same buckets - 1: what the trainer adds to MPI
    /// itself (the goal: at most +10 %); none for a compressed exchange
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_vs_raw_buckets: Option<f64>,
    /// Each bucket (bucket 0 holds the last layers and the totals): its bytes, its raw MPI
    /// allreduce and its allreduce inside the step.
    pub buckets: Vec<BucketReport>,
    /// Waiting for the gradients and copying them to the host (includes the GPU's compute).
    pub readback_ms: f64,
    /// Copying the summed gradients back to the device.
    pub upload_ms: f64,
    /// The training thread's wait for the sums: the communication not hidden.
    pub waited_ms: f64,
    /// The share of the allreduce time that ran behind backward.
    pub hidden_share: f64,
    /// the same step without exchange (each rank alone)
    pub local_step_ms: f64,
    /// step time / max(compute alone, communication alone): 1 is perfect overlap (the goal for
    /// a 2-rank mnist-mlp/1024 step: at most 1.15)
    pub step_vs_bound: f64,
    /// local step time / step time: the share of one-rank throughput each rank keeps
    pub scaling_efficiency: f64,
}

/// One gradient bucket in `bench --workload` under mpirun.
#[derive(Clone, Debug, Serialize)]
pub struct BucketReport {
    pub bytes: u64,
    pub raw_allreduce_ms: f64,
    pub step_allreduce_ms: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Time `steps` steps `repeats` times after `warmup`; each repeat ends with a GPU sync.
fn time_steps(
    stepper: &mut crate::train::Stepper,
    backend: &mut dyn crate::backend::Backend,
    comm: &dyn Communicator,
    cfg: &StepBenchConfig,
) -> anyhow::Result<Vec<f64>> {
    let mut k = 0u64;
    for _ in 0..cfg.warmup {
        stepper.step(backend, comm, 0, k)?;
        k += 1;
    }
    backend.take_train_totals()?;
    stepper.phases = Default::default();
    stepper.exchange.times = Default::default();
    let mut times = Vec::with_capacity(cfg.repeats);
    for _ in 0..cfg.repeats {
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..cfg.steps {
            stepper.step(backend, comm, 0, k)?;
            k += 1;
        }
        backend.take_train_totals()?;
        times.push(t.elapsed().as_secs_f64() / cfg.steps as f64);
    }
    Ok(times)
}

/// Benchmark one workload's training step on this rank's device, with the exchange under mpirun.
pub fn step_bench(
    cfg: &StepBenchConfig,
    comm: &dyn Communicator,
) -> anyhow::Result<StepBenchResult> {
    use crate::backend::Batch;
    use crate::train::{ShardMode, StepPlan, Stepper};
    ensure!(
        cfg.batch >= 1 && cfg.steps >= 1 && cfg.repeats >= 1,
        "--batch, --steps and --repeats must be at least 1"
    );
    let w = &cfg.workload;
    let ranks = comm.size();
    let WorkloadRun {
        config: tc,
        setup,
        mut backend,
        samples: n,
    } = WorkloadRun::open(cfg, comm)?;
    let tuning = crate::backend::autotune::choose_kernels(backend.as_mut(), comm, cfg.autotune)?;
    let n_params = setup.spec.layout().total;
    let plan = StepPlan::of(&tc, n, comm.rank(), ranks);
    let total = cfg.warmup + cfg.steps * cfg.repeats as u64 + 1;
    let mut stepper = Stepper::new(&tc, plan, total, n_params);
    // every step trains on the same batch, the epoch's only one: with --staleness 1 the sums
    // stay in flight across it
    stepper.drain_at_epoch_end = false;
    stepper.exchange.set_buckets(
        &crate::train::run::layer_ranges(&setup.spec),
        tc.bucket_bytes(),
    );
    stepper
        .exchange
        .set_compression(&tc, &setup.spec.layout(), comm.rank())?;
    let mut times = time_steps(&mut stepper, backend.as_mut(), comm, cfg)?;
    let repeats = times.clone();
    let step_s = median(&mut times);
    let per_step = (cfg.steps * cfg.repeats as u64) as f64;
    let phases_ms = stepper.phases.scaled(1e3 / per_step);
    let exchange_ms = stepper.exchange.times.scaled(1e3 / per_step);
    let (offset, rows) = plan.mine(0);
    let batch = Batch {
        offset,
        rows,
        step: 0,
        accumulate: false,
    };
    let update = tc.optim.update(tc.lr, 0, n as u64);
    let mut kernels_ms = Vec::new();
    let mut gpu_step_ms = None;
    // median of five profiled steps, kernel by kernel
    let mut profiles = Vec::new();
    for _ in 0..5 {
        if let Some(p) = backend.profile_step(&batch, &update)? {
            profiles.push(p);
        }
    }
    if let Some(first) = profiles.first() {
        for (i, (label, _)) in first.iter().enumerate() {
            let mut v: Vec<f64> = profiles.iter().map(|p| p[i].1 * 1e3).collect();
            kernels_ms.push((label.clone(), median(&mut v)));
        }
        gpu_step_ms = Some(kernels_ms.iter().map(|(_, t)| t).sum());
    }
    let exchange = if ranks > 1 {
        let bytes = ((n_params + 3) * 4) as u64;
        // the gradient buckets, when gradients are what travels
        let bucket_bytes = match tc.sync {
            crate::train::SyncMode::Grads => stepper.exchange.bucket_bytes(),
            crate::train::SyncMode::Params => Vec::new(),
        };
        let mut sizes = vec![bytes];
        sizes.extend(&bucket_bytes);
        let raw = comm_bench(comm, &sizes, 3, 10)?;
        let raw_ms = raw[0].time_us / 1e3;
        let compressed = stepper.exchange.compressed_mode() || bucket_bytes.is_empty();
        let buckets: Vec<BucketReport> = match compressed {
            true => Vec::new(),
            false => bucket_bytes
                .iter()
                .zip(&raw[1..])
                .zip(&exchange_ms.buckets)
                .map(|((&bytes, r), &step_ms)| BucketReport {
                    bytes,
                    raw_allreduce_ms: r.time_us / 1e3,
                    step_allreduce_ms: step_ms,
                })
                .collect(),
        };
        let raw_buckets_ms: f64 = buckets.iter().map(|b| b.raw_allreduce_ms).sum();
        // the same step with no exchange: what each rank does alone (synchronously: one rank
        // with --staleness 1 would still read back and upload its gradient)
        let mut solo = tc.clone();
        solo.staleness = 0;
        let mut alone = Stepper::new(
            &solo,
            StepPlan::new(ShardMode::Global, n, cfg.batch, 0, 1),
            total,
            n_params,
        );
        let mut local = time_steps(
            &mut alone,
            backend.as_mut(),
            &crate::comm::SingleProcess,
            cfg,
        )?;
        let local_ms = median(&mut local) * 1e3;
        // communication alone: raw MPI for the buckets as the step sends them (one for a
        // compressed exchange, whose allreduce time is what it measured)
        let comm_ms = match compressed {
            true => exchange_ms.allreduce,
            false => raw_buckets_ms,
        };
        Some(ExchangeReport {
            bytes,
            sent_bytes: (stepper.exchange.times.sent_bytes / per_step) as u64,
            raw_allreduce_ms: raw_ms,
            step_allreduce_ms: exchange_ms.allreduce,
            overhead_vs_raw: exchange_ms.allreduce / raw_ms - 1.0,
            overhead_vs_raw_buckets: match compressed {
                true => None,
                false => Some(exchange_ms.allreduce / raw_buckets_ms - 1.0),
            },
            buckets,
            readback_ms: exchange_ms.readback,
            upload_ms: exchange_ms.upload,
            waited_ms: exchange_ms.waited,
            hidden_share: exchange_ms.hidden(),
            local_step_ms: local_ms,
            step_vs_bound: step_s * 1e3 / local_ms.max(comm_ms),
            scaling_efficiency: local_ms / (step_s * 1e3),
        })
    } else {
        None
    };
    let flops = 6.0 * cfg.batch as f64 * setup.spec.macs_per_sample() as f64;
    let adapter = backend.describe();
    let tflops = flops / step_s / 1e12;
    Ok(StepBenchResult {
        workload: w.name.clone(),
        batch: cfg.batch,
        ranks,
        parameters: n_params,
        flops_per_step: flops,
        step_ms: step_s * 1e3,
        step_ms_repeats: repeats.iter().map(|t| t * 1e3).collect(),
        samples_per_s_per_rank: cfg.batch as f64 / step_s,
        samples_per_s: (cfg.batch * ranks) as f64 / step_s,
        tflops,
        fp32_peak_share: fp32_peak_tflops(&adapter).map(|p| tflops / p),
        adapter,
        phases_ms,
        kernels_ms,
        gpu_step_ms,
        exchange,
        precision: cfg.precision,
        kernels: tuning.choices,
        tuning_s: tuning.seconds,
    })
}

impl StepBenchResult {
    /// A human-readable report with the napkin math beside the time.
    pub fn report(&self) -> String {
        let mut s = format!(
            "{} batch {} × {} rank(s) on {}\n  {} parameters, {:.3} GFLOP per step per rank\n  step {:.3} ms (median of {:?})  {:.0} samples/s per rank, {:.0} in all  {:.3} TFLOP/s",
            self.workload,
            self.batch,
            self.ranks,
            self.adapter,
            self.parameters,
            self.flops_per_step / 1e9,
            self.step_ms,
            self.step_ms_repeats
                .iter()
                .map(|t| (t * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            self.samples_per_s_per_rank,
            self.samples_per_s,
            self.tflops
        );
        if let Some(p) = self.fp32_peak_share {
            s += &format!(" ({:.1}% of the fp32 datasheet peak)", p * 100.0);
        }
        let p = &self.phases_ms;
        s += &format!(
            "\n  host phases per step (ms): gather {:.3}  forward {:.3}  loss {:.3}  backward {:.3}  exchange {:.3}  update {:.3}",
            p.gather, p.forward, p.loss, p.backward, p.exchange, p.update
        );
        if !self.kernels.is_empty() {
            s += &format!(
                "\n  kernels ({:?}, tuned in {:.2} s):",
                self.precision, self.tuning_s
            );
            for (product, choice) in &self.kernels {
                s += &format!("\n    {product}: {choice}");
            }
        }
        if let Some(g) = self.gpu_step_ms {
            s += &format!("\n  GPU time of one step: {g:.3} ms");
            for (label, t) in &self.kernels_ms {
                s += &format!("\n    {t:>9.3} ms  {label}");
            }
        }
        if let Some(e) = &self.exchange {
            s += &format!(
                "\n  exchange of {} B (sent {} B per rank): raw MPI allreduce in one piece {:.3} ms, in the step {:.3} ms ({:+.1}%); readback (incl. GPU compute) {:.3} ms, upload {:.3} ms",
                e.bytes,
                e.sent_bytes,
                e.raw_allreduce_ms,
                e.step_allreduce_ms,
                e.overhead_vs_raw * 100.0,
                e.readback_ms,
                e.upload_ms,
            );
            for (i, b) in e.buckets.iter().enumerate() {
                s += &format!(
                    "\n    bucket {i}: {:>10} B  raw MPI {:.3} ms  in the step {:.3} ms ({:+.1}%)",
                    b.bytes,
                    b.raw_allreduce_ms,
                    b.step_allreduce_ms,
                    (b.step_allreduce_ms / b.raw_allreduce_ms - 1.0) * 100.0
                );
            }
            if let Some(o) = e.overhead_vs_raw_buckets {
                s += &format!(
                    "\n  the step's allreduces against raw MPI of the same buckets: {:.2}x (goal: at most 1.1x)",
                    1.0 + o
                );
            }
            s += &format!(
                "\n  overlap: {:.1}% of the allreduce time hidden behind computation; waited {:.3} ms per step\n  alone each rank steps in {:.3} ms: step / max(compute, communication) = {:.2} (1 is perfect overlap); scaling efficiency {:.1}%",
                e.hidden_share * 100.0,
                e.waited_ms,
                e.local_step_ms,
                e.step_vs_bound,
                e.scaling_efficiency * 100.0
            );
        }
        s
    }
}

/// One candidate kernel of one product in `bench matmul`.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulRow {
    pub product: String,
    pub kernel: String,
    pub adapter: String,
    /// GPU time of one product (the fastest of the timed runs), when the kernel passed.
    pub ms: Option<f64>,
    pub tflops: Option<f64>,
    /// Why the tuner rejected it: it cannot be built on this adapter, or its numbers are wrong.
    pub rejected: Option<String>,
    /// The fastest correct kernel of its product.
    pub best: bool,
}

fn matmul_rows(adapter: &str, tuned: &[dptrain_kernels::tune::Tuned]) -> Vec<MatmulRow> {
    let mut rows = Vec::new();
    for t in tuned {
        let p = &t.product;
        let flops = 2.0 * (p.m * p.n * p.k) as f64;
        for trial in &t.trials {
            rows.push(MatmulRow {
                product: p.name(),
                kernel: trial.choice.name(),
                adapter: adapter.to_string(),
                ms: trial.result.as_ref().ok().map(|s| s * 1e3),
                tflops: trial.result.as_ref().ok().map(|s| flops / s / 1e12),
                rejected: trial.result.as_ref().err().cloned(),
                best: trial.choice == t.best,
            });
        }
    }
    rows
}

/// Every kernel the trainer can use on the products of `size`³ (the three forms plain, and each
/// with the epilogue training gives it: NT + bias + ReLU, TN, NN × ReLU'), in each precision:
/// verified against the fp32 reference, then timed.
pub fn matmul_bench_square(
    size: u64,
    precisions: &[crate::backend::Precision],
    gpu: Option<usize>,
    repeats: usize,
) -> anyhow::Result<Vec<MatmulRow>> {
    use dptrain_kernels::matmul::Epilogue;
    use dptrain_kernels::tune::{Product, Tuner, candidates};
    use dptrain_kernels::{AdapterChoice, GpuContext};
    ensure!(
        size >= 1 && repeats >= 1,
        "--size and --iters must be at least 1"
    );
    let ctx = GpuContext::new(&AdapterChoice {
        index: gpu,
        local_rank: 0,
    })?;
    let mut tuner = Tuner::new(&ctx)?;
    tuner.repeats = repeats;
    let mut tuned = Vec::new();
    for &precision in precisions {
        for (ta, tb, ep) in [
            (false, false, Epilogue::None),
            (false, true, Epilogue::None),
            (true, false, Epilogue::None),
            (false, true, Epilogue::BiasRelu),
            (false, false, Epilogue::DRelu),
        ] {
            let p = Product {
                m: size,
                n: size,
                k: size,
                trans_a: ta,
                trans_b: tb,
                epilogue: ep,
                f16: precision == crate::backend::Precision::F16,
            };
            tuned.push(tuner.tune(&ctx, &p, &candidates(&ctx, &p))?);
        }
    }
    Ok(matmul_rows(&ctx.describe(), &tuned))
}

/// Every kernel the trainer can use on the products of a workload's training step, as the
/// autotuner sees them (every candidate verified and timed) in the given precision.
pub fn matmul_bench_workload(
    cfg: &StepBenchConfig,
    comm: &dyn Communicator,
) -> anyhow::Result<Vec<MatmulRow>> {
    let mut run = WorkloadRun::open(cfg, comm)?;
    let tuned = run.backend.autotune(&Default::default())?;
    Ok(matmul_rows(&run.backend.describe(), &tuned))
}

// ---------------------------------------------------------------------------------------------
// The start-up transport probe

/// Bytes of the probe's allreduce: the trainer's bucket size (docs/PERF.md), well inside Open
/// MPI's ≤ 16 MiB regime, and large enough that the latency is a small part of the time.
pub const PROBE_BYTES: u64 = 4 << 20;

/// The probe warns when the allreduce's bus bandwidth is below this share of a memory copy of the
/// same 4 MiB.
///
/// Measured on the H200 machine's host (16 cores, 300 MiB L3, Open MPI 4.1.6; docs/PERF.md,
/// "Choosing bucket sizes and MPI settings"; docs/data/h200-host-probes.txt): the probe's ratio was
/// 0.16–0.33 over nine runs with shared memory at 2, 4 and 8 ranks, 0.22–0.25 with the ring
/// forced, 0.13–0.17 over the TCP loopback (a working, slower transport), and 0.052 with 32 ranks
/// on the 16 cores. A copy of 4 MiB stays in the cache, so a healthy ratio is well under the 0.5
/// that two copies per byte would allow against memory. One tenth lies 1.6× below the lowest
/// healthy run, so the noise of a 0.05 s probe does not trip it, and 2× above the crowded node.
/// It flags a transport an order of magnitude off, not a slow-but-working one.
pub const PROBE_MIN_RATIO: f64 = 0.1;

/// How long the timed allreduces of the probe may take together (s); the probe as a whole adds a
/// warm-up allreduce, a 4 MiB copy and three small collectives.
const PROBE_TIMED_BUDGET_S: f64 = 0.08;

/// What the transport probe measured (identical on every rank).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransportProbe {
    pub ranks: usize,
    pub bytes: u64,
    /// Timed allreduces (1 to 8, as many as fit the budget).
    pub iters: usize,
    /// Mean time of one allreduce, slowest rank (µs).
    pub allreduce_us: f64,
    pub busbw_gbs: f64,
    /// `copy_from_slice` of the same bytes on every rank at once (fastest of 4, slowest rank).
    pub memcpy_gbs: f64,
    /// busbw / memcpy
    pub ratio: f64,
    /// CPU cores online on the node (rank 0's view).
    pub cores: usize,
    /// Free space in /dev/shm, where Open MPI's shared-memory transport keeps its segments.
    pub shm_free_bytes: Option<u64>,
    /// Wall time of the probe on rank 0 up to its last collective (s).
    pub seconds: f64,
}

impl TransportProbe {
    /// One warning line when the allreduce runs far below a memory copy, naming what helps.
    pub fn warning(&self) -> Option<String> {
        if self.ratio >= PROBE_MIN_RATIO {
            return None;
        }
        let shm = self.shm_free_bytes.map_or_else(
            || "check its free space".to_string(),
            |b| format!("{:.1} GiB free now", b as f64 / (1u64 << 30) as f64),
        );
        let crowded = if self.ranks > self.cores {
            format!(
                "; {} ranks share {} cores here, and MPI's busy polling alone slows that",
                self.ranks, self.cores
            )
        } else {
            String::new()
        };
        Some(format!(
            "warning: the allreduce between the {} ranks on this node runs at {:.2} GB/s bus bandwidth ({} B in {:.0} us), {:.3}× a memory copy of the same bytes ({:.2} GB/s), where a working node gives 0.15–0.35×: try the ring algorithm (OMPI_MCA_coll_tuned_use_dynamic_rules=1 OMPI_MCA_coll_tuned_allreduce_algorithm=4), a single-copy mechanism (OMPI_MCA_btl_vader_single_copy_mechanism=cma, or xpmem or knem where installed), and room for the shared segments in /dev/shm ({shm}){crowded}",
            self.ranks, self.busbw_gbs, self.bytes, self.allreduce_us, self.ratio, self.memcpy_gbs
        ))
    }

    /// The probe's figures on one line (for `bench comm --probe`).
    pub fn line(&self) -> String {
        format!(
            "transport probe: {} ranks on one node, allreduce of {} B {:.1} us (mean of {}), busbw {:.2} GB/s, memcpy {:.2} GB/s, ratio {:.3} (warns below {:.3}), {:.3} s",
            self.ranks,
            self.bytes,
            self.allreduce_us,
            self.iters,
            self.busbw_gbs,
            self.memcpy_gbs,
            self.ratio,
            PROBE_MIN_RATIO,
            self.seconds
        )
    }
}

/// Free bytes of /dev/shm, when it exists.
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between platforms
fn shm_free_bytes() -> Option<u64> {
    let path = std::ffi::CString::new("/dev/shm").ok()?;
    // SAFETY: statvfs is plain old data; the call fills it or fails, and the path is a valid C string
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Measure the allreduce against a memory copy when all ranks share one node (collective: every
/// rank calls it, and all get the same figures). None with one rank, or when the ranks are spread
/// over several nodes (their allreduce then crosses the network, which a copy does not measure).
///
/// Cost: one hostname gather, four 4 MiB copies, one warm-up allreduce of 4 MiB, then as many timed
/// allreduces as fit 0.08 s (1 to 8), and three small agreements: 0.027–0.049 s measured on the
/// H200 machine's host at 2 to 8 ranks, 0.087 s with 32 ranks on its 16 cores; under 0.2 s unless
/// one 4 MiB allreduce takes more than 0.05 s, when the transport is broken anyway.
pub fn measure_transport(comm: &dyn Communicator) -> anyhow::Result<Option<TransportProbe>> {
    let start = Instant::now();
    let n = comm.size();
    if n < 2 {
        return Ok(None);
    }
    let hosts = comm.all_gather_bytes(crate::outputs::hostname().as_bytes())?;
    if hosts.iter().any(|h| h != &hosts[0]) {
        return Ok(None);
    }
    let count = (PROBE_BYTES / 4) as usize;
    let send = vec![1f32; count];
    let mut recv = vec![0f32; count];
    let copy = memcpy_secs(PROBE_BYTES, 1, 4);
    let t = Instant::now();
    comm.allreduce_sum_f32_into(&send, &mut recv)?;
    let warm = t.elapsed().as_secs_f64();
    // every rank takes the same decisions from the same (agreed) figures
    let agreed = slowest(comm, &[warm, copy])?;
    let iters = ((PROBE_TIMED_BUDGET_S / agreed[0].max(1e-9)).floor() as usize).clamp(1, 8);
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        comm.allreduce_sum_f32_into(&send, &mut recv)?;
    }
    let mine = t.elapsed().as_secs_f64() / iters as f64;
    // the node's cores, not this process's affinity mask (mpirun binds each rank to one core)
    // SAFETY: sysconf reads a system constant
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cores = usize::try_from(online)
        .ok()
        .filter(|&c| c > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |c| c.get()));
    let secs = slowest(comm, &[mine])?[0].max(1e-9);
    // rank 0's view of the cores and the time, on every rank
    let mut facts = [0f64; 2];
    if comm.is_root() {
        facts = [cores as f64, start.elapsed().as_secs_f64()];
    }
    comm.allreduce_sum_f64(&mut facts)?;
    let busbw = PROBE_BYTES as f64 / secs / 1e9 * 2.0 * (n as f64 - 1.0) / n as f64;
    let memcpy = PROBE_BYTES as f64 / agreed[1].max(1e-9) / 1e9;
    Ok(Some(TransportProbe {
        ranks: n,
        bytes: PROBE_BYTES,
        iters,
        allreduce_us: secs * 1e6,
        busbw_gbs: busbw,
        memcpy_gbs: memcpy,
        ratio: busbw / memcpy,
        cores: facts[0] as usize,
        shm_free_bytes: shm_free_bytes(),
        seconds: facts[1],
    }))
}

/// The start-up transport probe (collective; every rank gets the same answer): when the ranks
/// share one node and their allreduce of 4 MiB runs below 1/10 of a memory copy's bandwidth
/// ([`PROBE_MIN_RATIO`]), one warning line naming the Open MPI settings that help (the ring
/// algorithm, a single-copy mechanism, room in /dev/shm). None otherwise, and with one rank or
/// ranks on several nodes. Takes well under 0.2 s on a working node ([`measure_transport`]).
pub fn probe_transport(comm: &dyn Communicator) -> anyhow::Result<Option<String>> {
    Ok(measure_transport(comm)?.and_then(|p| p.warning()))
}

/// `bench comm --probe`: run the probe and print its figures and verdict on rank 0.
pub fn print_probe(comm: &dyn Communicator) -> anyhow::Result<()> {
    let probe = measure_transport(comm)?;
    if comm.is_root() {
        match &probe {
            None if comm.size() < 2 => println!("transport probe: skipped (one rank)"),
            None => println!("transport probe: skipped (the ranks are on more than one node)"),
            Some(p) => {
                println!("{}", p.line());
                println!(
                    "transport probe: {}",
                    p.warning().unwrap_or_else(|| "ok".to_string())
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `bench scaling`: the model of src/scaling.rs fed with measured figures

/// One rank's measured step time (no exchange) of each reference workload at its reference batch,
/// on one NVIDIA H200, fp32, with where it was measured: (workload, batch, ms, source).
pub const MEASURED_STEP_MS: [(&str, usize, f64, &str); 3] = [
    (
        "seed-logreg",
        100,
        0.019,
        "dptrain on one H200, fp32, fused step: docs/PERF.md, H200 run 2",
    ),
    (
        "mnist-mlp",
        1024,
        0.645,
        "dptrain on one H200, fp32: docs/PERF.md, H200 run 2",
    ),
    (
        "wide-mlp",
        8192,
        56.9,
        "dptrain on one H200, fp32: docs/PERF.md, H200 run 1",
    ),
];

/// Host-side MPI allreduce of f32 on the H200 machine (Open MPI 4.1.6, one node, shared memory,
/// defaults, median): (ranks, bytes, ms), from ../shared/design/WORKLOADS.md. The 150.6 MB rows
/// lie beyond Open MPI's 16 MiB algorithm switch and are left out of the default fit (8 MiB).
pub const MEASURED_SHM_ALLREDUCE: [(usize, u64, f64); 12] = [
    (2, 12, 0.001),
    (2, 1 << 20, 0.27),
    (2, 7_454_772, 2.59),
    (2, 150_600_000, 158.0),
    (4, 12, 0.003),
    (4, 1 << 20, 0.46),
    (4, 7_454_772, 3.96),
    (4, 150_600_000, 207.0),
    (8, 12, 0.004),
    (8, 1 << 20, 0.86),
    (8, 7_454_772, 7.70),
    (8, 150_600_000, 300.0),
];

const MEASURED_SHM_SOURCE: &str = "../shared/design/WORKLOADS.md (H200 machine, Open MPI 4.1.6, shared memory, 2/4/8 ranks, medians)";

/// Ranks of a `bench comm` row: its own field, or, in files of older builds, from busbw / algbw
/// = 2(p−1)/p.
fn row_ranks(r: &CommRow) -> usize {
    if r.ranks > 0 {
        return r.ranks as usize;
    }
    let q = if r.algbw_gbs > 0.0 {
        r.busbw_gbs / r.algbw_gbs
    } else {
        0.0
    };
    if q > 0.0 && q < 2.0 {
        (2.0 / (2.0 - q)).round() as usize
    } else {
        1
    }
}

/// `WORKLOAD=MS` of `bench scaling --step-ms`.
pub fn parse_step_ms(s: &str) -> Result<(String, f64), String> {
    let (w, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("expected WORKLOAD=MS, e.g. mnist-mlp=0.645 (got {s:?})"))?;
    let ms: f64 = ms
        .trim()
        .parse()
        .map_err(|_| format!("{ms:?} is not a number of milliseconds"))?;
    if !(ms.is_finite() && ms > 0.0) {
        return Err(format!("the step time must be above 0 ms (got {ms})"));
    }
    Ok((w.trim().to_string(), ms))
}

/// One workload's part of `bench scaling --json`.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingWorkload {
    pub workload: String,
    pub batch: Option<usize>,
    pub parameters: usize,
    pub f32_bytes: u64,
    pub compute_ms: f64,
    pub compute_source: String,
    pub powersgd_factor: f64,
    /// Every rank count × exchange × overlap × algorithm.
    pub predictions: Vec<crate::scaling::Prediction>,
}

/// What `bench scaling --json` writes.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingReport {
    /// Always "prediction": nothing here was measured except the inputs.
    pub kind: &'static str,
    pub network: crate::scaling::Network,
    pub fit_rows: usize,
    pub fit_source: String,
    /// The fitted ring time of each fitted row beside its measurement: (ranks, bytes, measured ms, fitted ms).
    pub fit_check: Vec<(usize, f64, f64, f64)>,
    pub bucket_bytes: u64,
    pub overlap_share: f64,
    pub workloads: Vec<ScalingWorkload>,
}

/// `dptrain bench scaling`: predicted step time and efficiency for 2 … max ranks, per workload and
/// way of exchanging; printed on rank 0 (no collective runs).
pub fn scaling_command(
    a: &crate::cli::ScalingBenchArgs,
    comm: &dyn Communicator,
) -> anyhow::Result<()> {
    use crate::scaling::{self, Algo, Link, Network, Sample, Scenario, Settings};
    ensure!(
        a.inter_gbs.is_finite() && a.inter_gbs > 0.0,
        "--inter-gbs must be above 0"
    );
    ensure!(
        a.inter_alpha_us.is_finite() && a.inter_alpha_us >= 0.0,
        "--inter-alpha-us must be 0 or more"
    );
    ensure!(
        (0.0..=1.0).contains(&a.overlap_share),
        "--overlap-share must be in [0, 1]"
    );
    ensure!(
        a.powersgd_rank >= 1 && a.sync_every >= 1 && a.ranks_per_node >= 1,
        "--powersgd-rank, --sync-every and --ranks-per-node must be at least 1"
    );
    ensure!(a.max_ranks >= 2, "--max-ranks must be at least 2");
    if !comm.is_root() {
        return Ok(());
    }
    // the intra-node link: fitted to bench comm rows
    let (samples, source): (Vec<Sample>, String) = match &a.comm_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let rows: Vec<CommRow> = serde_json::from_str(&text).with_context(|| {
                format!("{}: not the JSON of `bench comm --json`", path.display())
            })?;
            (
                rows.iter()
                    .map(|r| Sample {
                        ranks: row_ranks(r),
                        bytes: r.bytes as f64,
                        seconds: r.time_us / 1e6,
                    })
                    .collect(),
                path.display().to_string(),
            )
        }
        None => (
            MEASURED_SHM_ALLREDUCE
                .iter()
                .map(|&(ranks, bytes, ms)| Sample {
                    ranks,
                    bytes: bytes as f64,
                    seconds: ms / 1e3,
                })
                .collect(),
            MEASURED_SHM_SOURCE.to_string(),
        ),
    };
    let used: Vec<Sample> = samples
        .into_iter()
        .filter(|s| s.bytes <= a.fit_max_bytes as f64 && s.ranks >= 2)
        .collect();
    let intra = scaling::fit_ring_by_ranks(&used).with_context(|| format!("fitting {source}"))?;
    let fitted = |s: &Sample| {
        let link = intra.iter().find(|f| f.0 == s.ranks).map(|f| f.1);
        link.map(|l| scaling::allreduce_s(Algo::Ring, s.ranks, s.bytes, l))
    };
    // how well one α and one β per rank count describe the rows: the worst relative miss
    let worst = used
        .iter()
        .filter_map(|s| fitted(s).map(|m| (s, m, m / s.seconds - 1.0)))
        .max_by(|a, b| a.2.abs().total_cmp(&b.2.abs()));
    let network = Network {
        intra: intra.clone(),
        inter: Link {
            alpha_s: a.inter_alpha_us * 1e-6,
            beta_bytes_per_s: a.inter_gbs * 1e9,
        },
        ranks_per_node: a.ranks_per_node,
    };
    let fits = intra
        .iter()
        .map(|(p, l)| {
            format!(
                "{p} ranks: alpha {:.2} us, beta {:.2} GB/s",
                l.alpha_s * 1e6,
                l.beta_bytes_per_s / 1e9
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let bucket = (a.bucket_bytes > 0).then_some(a.bucket_bytes as f64);
    let ranks = scaling::rank_counts(a.max_ranks);
    let modes = scaling::table_modes(a.powersgd_rank, a.sync_every);
    let names: Vec<String> = if a.workload.is_empty() {
        MEASURED_STEP_MS.iter().map(|m| m.0.to_string()).collect()
    } else {
        a.workload.clone()
    };
    for (w, _) in &a.step_ms {
        ensure!(
            names.contains(w),
            "--step-ms names {w:?}, which is not among the workloads ({})",
            names.join(", ")
        );
    }
    let beyond = network.link(a.ranks_per_node + 1);
    let mut out = format!(
        "# bench scaling: PREDICTIONS of the model in src/scaling.rs (docs/SCALING.md), not measurements\n\
         # allreduce within a node, fitted (ring model, 1/t^2 weights) to {} rows <= {} B of {}:\n\
         #   {fits}; {}\n\
         # {}\n\
         # across nodes (p > {}): alpha {:.2} us, beta {:.2} GB/s assumed (--inter-alpha-us, --inter-gbs); a flat collective runs at its slowest link: alpha {:.2} us, beta {:.2} GB/s\n\
         # {:?} allreduce, buckets of {} B, overlap hides the exchange behind up to {:.1}% of the step (the backward pass), PowerSGD rank {}, local SGD every {} steps\n\
         # each cell: predicted step time and efficiency (one rank's step / predicted step; weak scaling, per-rank batch fixed)\n",
        used.len(),
        a.fit_max_bytes,
        source,
        if a.ranks_per_node >= 2 {
            format!(
                "p ranks take the slowest fit of at most min(p, {}) ranks",
                a.ranks_per_node
            )
        } else {
            "unused: one rank per node".to_string()
        },
        worst.map_or_else(String::new, |(s, model, rel)| format!(
            "the fit's worst row: {} ranks, {} B: measured {:.4} ms, fitted {:.4} ms ({:+.0}%)",
            s.ranks,
            s.bytes,
            s.seconds * 1e3,
            model * 1e3,
            rel * 100.0
        )),
        a.ranks_per_node,
        a.inter_alpha_us,
        a.inter_gbs,
        beyond.alpha_s * 1e6,
        beyond.beta_bytes_per_s / 1e9,
        a.algo,
        a.bucket_bytes,
        a.overlap_share * 100.0,
        a.powersgd_rank,
        a.sync_every
    );
    let mut report = ScalingReport {
        kind: "prediction",
        network: network.clone(),
        fit_rows: used.len(),
        fit_check: used
            .iter()
            .filter_map(|s| fitted(s).map(|m| (s.ranks, s.bytes, s.seconds * 1e3, m * 1e3)))
            .collect(),
        fit_source: source,
        bucket_bytes: a.bucket_bytes,
        overlap_share: a.overlap_share,
        workloads: Vec::new(),
    };
    for name in &names {
        let w = Workload::named(name)?;
        let spec = crate::model::ModelSpec::new(
            w.model,
            w.features,
            w.classes,
            w.hidden.clone(),
            crate::model::Activation::Relu,
        )?;
        let measured = MEASURED_STEP_MS.iter().find(|m| m.0 == name);
        let (batch, ms, from) = match a.step_ms.iter().rev().find(|(n, _)| n == name) {
            Some((_, ms)) => (None, *ms, "--step-ms".to_string()),
            None => {
                let m = measured.with_context(|| {
                    format!("no measured step time for {name}: give --step-ms {name}=MS")
                })?;
                (Some(m.1), m.2, m.3.to_string())
            }
        };
        let shape = scaling::ModelShape::from_linears(name, &spec.linears(), 3);
        let sc = Scenario {
            shape,
            compute_s: ms / 1e3,
            overlap_share: a.overlap_share,
        };
        let settings = Settings {
            network: network.clone(),
            algo: a.algo,
            bucket_bytes: bucket,
        };
        let f32_bytes = 4 * sc.shape.elements() as u64;
        let factor = sc.shape.powersgd_factor(a.powersgd_rank);
        out += &format!(
            "\n# {name}: {} parameters, {f32_bytes} B per f32 exchange (PowerSGD rank {}: {factor:.1}x fewer), one rank's step {ms} ms{} ({from})\n",
            spec.layout().total,
            a.powersgd_rank,
            batch.map_or_else(String::new, |b| format!(" at batch {b}")),
        );
        out += &scaling::table(&sc, &settings, &ranks, &modes);
        let mut predictions = Vec::new();
        for algo in [Algo::Ring, Algo::Tree] {
            let s = Settings {
                algo,
                ..settings.clone()
            };
            for &p in &ranks {
                for &(e, o) in &modes {
                    predictions.push(scaling::predict(&sc, &s, p, e, o));
                }
            }
        }
        report.workloads.push(ScalingWorkload {
            workload: name.clone(),
            batch,
            parameters: spec.layout().total,
            f32_bytes,
            compute_ms: ms,
            compute_source: from,
            powersgd_factor: factor,
            predictions,
        });
    }
    print!("{out}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("{}: cannot write", p.display()))?;
    }
    Ok(())
}
