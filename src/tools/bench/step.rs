//! `bench --workload`: whole training steps of a reference workload (the one table of their
//! shapes and reference batches is here) or a custom model, timed by phase, with the exchange set
//! beside raw MPI of the same buckets.

use std::time::Instant;

use anyhow::ensure;
use serde::Serialize;

use super::comm::comm_bench;
use crate::distributed::comm::Communicator;

/// A reference workload (see ../shared/design/WORKLOADS.md) or a custom model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    pub name: String,
    pub model: crate::model::ModelKind,
    pub features: usize,
    pub hidden: Vec<usize>,
    pub classes: usize,
    /// The image shape of a convolutional workload (its `features` are C·H·W).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
}

/// A named reference workload: its shape, and the per-rank batch at which `bench` runs it by
/// default and the scaling model's step times were measured.
struct Reference {
    name: &'static str,
    model: crate::model::ModelKind,
    features: usize,
    hidden: &'static [usize],
    classes: usize,
    batch: usize,
    image: Option<[usize; 3]>,
}

/// The reference workloads: the one place their shapes and batches live.
const REFERENCE: [Reference; 5] = [
    Reference {
        name: "seed-logreg",
        model: crate::model::ModelKind::Logreg,
        features: 2,
        hidden: &[],
        classes: 2,
        batch: 100,
        image: None,
    },
    Reference {
        name: "mnist-mlp",
        model: crate::model::ModelKind::Mlp,
        features: 784,
        hidden: &[1024, 1024],
        classes: 10,
        batch: 1024,
        image: None,
    },
    Reference {
        name: "wide-mlp",
        model: crate::model::ModelKind::Mlp,
        features: 4096,
        hidden: &[4096, 4096],
        classes: 1000,
        batch: 8192,
        image: None,
    },
    Reference {
        name: "lenet5",
        model: crate::model::ModelKind::Lenet5,
        features: 784,
        hidden: &[],
        classes: 10,
        batch: 128,
        image: Some([1, 28, 28]),
    },
    Reference {
        name: "resnet20",
        model: crate::model::ModelKind::Resnet20,
        features: 3072,
        hidden: &[],
        classes: 10,
        batch: 256,
        image: Some([3, 32, 32]),
    },
];

/// The per-rank batch of a custom `--model` when no `--batch` is given.
pub const CUSTOM_BATCH: usize = 1024;

impl Workload {
    /// The named reference workloads.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        let Some(r) = REFERENCE.iter().find(|r| r.name == name) else {
            anyhow::bail!(
                "unknown workload {name:?} (seed-logreg, mnist-mlp, wide-mlp, lenet5, resnet20)"
            );
        };
        Ok(Self {
            name: name.into(),
            model: r.model,
            features: r.features,
            hidden: r.hidden.to_vec(),
            classes: r.classes,
            image: r.image,
        })
    }

    /// The reference batch of a named workload (none for another name).
    pub fn reference_batch(name: &str) -> Option<usize> {
        REFERENCE.iter().find(|r| r.name == name).map(|r| r.batch)
    }

    /// The names of the reference workloads, in order.
    pub fn reference_names() -> impl Iterator<Item = &'static str> {
        REFERENCE.iter().map(|r| r.name)
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
    pub autotune: crate::train::autotune::AutotuneMode,
    /// How the step exchanges gradients under mpirun (as `train`'s flags).
    pub exchange: crate::distributed::exchange::ExchangeConfig,
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
        ds.image = w.image;
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
        tc.exchange = cfg.exchange.clone();
        tc.precision = cfg.precision;
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
    let tuning = crate::train::autotune::choose_kernels(backend.as_mut(), comm, cfg.autotune)?;
    let n_params = setup.spec.layout().total;
    let plan = StepPlan::of(&tc, n, comm.rank(), ranks);
    let total = cfg.warmup + cfg.steps * cfg.repeats as u64 + 1;
    let mut stepper = Stepper::new(&tc, plan, total, n_params);
    // every step trains on the same batch, the epoch's only one: with --staleness 1 the sums
    // stay in flight across it
    stepper.drain_at_epoch_end = false;
    stepper.exchange.set_buckets(
        &crate::train::run::layer_ranges(&setup.spec),
        tc.exchange.bucket_bytes(),
    )?;
    stepper
        .exchange
        .set_compression(&tc.exchange, &setup.spec.layout(), comm.rank(), tc.seed)?;
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
        // the gradients and the totals' words, as the step sends them
        let bytes = (4 * (n_params + crate::distributed::exchange::StepTotals::WORDS)) as u64;
        // the gradient buckets, when gradients are what travels
        let bucket_bytes = match tc.exchange.sync {
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
        solo.exchange.staleness = 0;
        let mut alone = Stepper::new(
            &solo,
            StepPlan::new(ShardMode::Global, n, cfg.batch, 0, 1),
            total,
            n_params,
        );
        let mut local = time_steps(
            &mut alone,
            backend.as_mut(),
            &crate::distributed::comm::SingleProcess,
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
