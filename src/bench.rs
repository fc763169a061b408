//! Benchmarks behind `dptrain bench`: the allreduce itself (`bench comm`), laid out like nccl-tests
//! so that the trainer's exchange can be set beside raw MPI.

use std::time::Instant;

use anyhow::ensure;
use serde::Serialize;

use crate::comm::Communicator;

/// One row of `bench comm`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CommRow {
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
    Ok(rows)
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
            bytes,
            count: count as u64,
            time_us: secs * 1e6,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (n - 1.0) / n,
            wrong: wrong[0],
            guarded_time_us: None,
        });
    }
    Ok(rows)
}

/// nccl-tests' table header.
pub fn comm_header(comm: &dyn Communicator) -> String {
    format!(
        "# allreduce f32 sum, {}; time: MPI_Allreduce; guarded: the same through the stall watchdog\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7} {:>12}\n#{:>12} {:>12} {:>8} {:>6} {:>12} {:>9} {:>9} {:>7} {:>12}",
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
        "(B)",
        "(elements)",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
        "(us)"
    )
}

impl CommRow {
    pub fn line(&self) -> String {
        format!(
            " {:>12} {:>12} {:>8} {:>6} {:>12.2} {:>9.2} {:>9.2} {:>7} {:>12}",
            self.bytes,
            self.count,
            "float",
            "sum",
            self.time_us,
            self.algbw_gbs,
            self.busbw_gbs,
            self.wrong,
            self.guarded_time_us
                .map_or_else(|| "-".to_string(), |t| format!("{t:.2}"))
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
        use crate::train::{self, ShardMode, StepPlan, SyncMode, TrainConfig};
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
        tc.sync = SyncMode::Grads;
        tc.precision = cfg.precision;
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
    pub bytes: u64,
    /// `bench comm`'s allreduce of the same bytes, in the same run.
    pub raw_allreduce_ms: f64,
    /// The allreduce inside the step (per step).
    pub step_allreduce_ms: f64,
    /// step allreduce / raw allreduce - 1: what the trainer adds to MPI itself
    pub overhead_vs_raw: f64,
    /// Waiting for the gradients and copying them to the host (includes the GPU's compute).
    pub readback_ms: f64,
    /// Copying the summed gradients back to the device.
    pub upload_ms: f64,
    /// the same step without exchange (each rank alone)
    pub local_step_ms: f64,
    /// local step time / step time: the share of one-rank throughput each rank keeps
    pub scaling_efficiency: f64,
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
        let raw = comm_bench(comm, &[bytes], 3, 10)?;
        let raw_ms = raw[0].time_us / 1e3;
        // the same step with no exchange: what each rank does alone
        let mut alone = Stepper::new(
            &tc,
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
        Some(ExchangeReport {
            bytes,
            raw_allreduce_ms: raw_ms,
            step_allreduce_ms: exchange_ms.allreduce,
            overhead_vs_raw: exchange_ms.allreduce / raw_ms - 1.0,
            readback_ms: exchange_ms.readback,
            upload_ms: exchange_ms.upload,
            local_step_ms: local_ms,
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
                "\n  exchange of {} B: raw MPI allreduce {:.3} ms, in the step {:.3} ms ({:+.1}%); readback (incl. GPU compute) {:.3} ms, upload {:.3} ms\n  alone each rank steps in {:.3} ms: scaling efficiency {:.1}%",
                e.bytes,
                e.raw_allreduce_ms,
                e.step_allreduce_ms,
                e.overhead_vs_raw * 100.0,
                e.readback_ms,
                e.upload_ms,
                e.local_step_ms,
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
