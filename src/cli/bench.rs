//! `dptrain bench`: the flags of its commands and their dispatch. Whole training steps (`bench
//! --workload` or a custom `--model`), the allreduce (`bench comm`) and the product kernels
//! (`bench matmul`) are timed in `tools/bench`; `bench scaling` is `tools/scaling`; `bench comm
//! --probe` prints the start-up transport probe of `distributed/probe.rs`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::backend::Precision;
use crate::distributed::comm::Communicator;
use crate::distributed::exchange::config::ExchangeArgs;
use crate::model::ModelKind;
use crate::tools::bench::{StepBenchConfig, Workload};
use crate::train::DeviceKind;
use crate::train::autotune::AutotuneMode;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub step: Box<StepBenchArgs>,
}

#[derive(Args, Debug)]
pub struct StepBenchArgs {
    /// A reference workload: seed-logreg, mnist-mlp, wide-mlp (or --model/--features/--hidden/--classes).
    #[arg(long)]
    pub workload: Option<String>,
    /// Custom model instead of a named workload.
    #[arg(long, value_enum)]
    pub model: Option<ModelKind>,
    /// Input features of the custom --model.
    #[arg(long, default_value_t = 784)]
    pub features: usize,
    /// Hidden widths of a custom --model mlp, e.g. 1024,1024.
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Classes of the custom --model.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Per-rank batch (default: the workload's first reference batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Steps per timed repeat.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    /// Timed repeats (the report gives the median and the spread).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Untimed steps before the first repeat (shader compilation, caches).
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Where to run: auto (a hardware GPU, else the CPU), gpu or cpu.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceKind,
    /// Adapter index from `dptrain devices`.
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Matrix-product inputs: f32, or f16 with f32 accumulation.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Kernel tuning before timing: auto, on, off, cached (as `train`).
    #[arg(long, value_enum, default_value = "auto")]
    pub autotune: AutotuneMode,
    #[command(flatten)]
    pub exchange: ExchangeArgs,
    /// Also write the result as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Allreduce of f32 buffers across the ranks, reported like nccl-tests (size, count, time,
    /// algorithm and bus bandwidth, wrong elements).
    Comm(CommBenchArgs),
    /// Every matrix-product kernel the trainer can use, verified against the fp32 reference and
    /// timed with GPU timestamps: on size³ (NN, NT, TN, and the epilogues training uses), or on
    /// the products of a workload's step.
    Matmul(MatmulBenchArgs),
    /// Predicted (not measured) step time and scaling efficiency for 2 to 512 ranks, per workload
    /// and exchange (f32, bf16, PowerSGD, local SGD, overlapped or not), from the measured step
    /// times and allreduce figures (docs/SCALING.md).
    Scaling(crate::tools::scaling::ScalingBenchArgs),
}

#[derive(Args, Debug)]
pub struct MatmulBenchArgs {
    /// Square products of this size (ignored with --workload).
    #[arg(long, default_value_t = 4096)]
    pub size: u64,
    /// The products of this workload's training step instead: seed-logreg, mnist-mlp, wide-mlp.
    #[arg(long)]
    pub workload: Option<String>,
    /// Per-rank batch for --workload (default: the workload's first reference batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// One precision (default: f32 and f16).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Timed runs of each kernel (the fastest counts).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Adapter index from `dptrain devices`.
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CommBenchArgs {
    /// Smallest buffer in bytes.
    #[arg(long, default_value_t = 4)]
    pub min_bytes: u64,
    /// Largest buffer in bytes (default 256 MiB).
    #[arg(long, default_value_t = 256 << 20)]
    pub max_bytes: u64,
    /// Untimed allreduces of each size before timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed allreduces of each size (the mean is reported).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also write the rows as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only the start-up transport probe (4 MiB allreduce against a memory copy) and print it.
    #[arg(long, hide = true)]
    pub probe: bool,
}

pub fn run(args: &BenchArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    let Some(cmd) = &args.command else {
        return run_step_bench(&args.step, comm);
    };
    match cmd {
        BenchCommand::Matmul(a) => {
            let precisions = match a.precision {
                Some(p) => vec![p],
                None => vec![Precision::F32, Precision::F16],
            };
            let rows = match &a.workload {
                Some(name) => {
                    let (workload, batch) = workload_and_batch(name)?;
                    let mut rows = Vec::new();
                    for &precision in &precisions {
                        let cfg = StepBenchConfig {
                            workload: workload.clone(),
                            batch: a.batch.unwrap_or(batch),
                            steps: 1,
                            repeats: a.iters,
                            warmup: 0,
                            device: DeviceKind::Gpu,
                            gpu: a.gpu,
                            precision,
                            autotune: AutotuneMode::Off,
                            exchange: Default::default(),
                        };
                        rows.extend(crate::tools::bench::matmul_bench_workload(&cfg, comm)?);
                    }
                    rows
                }
                None => {
                    crate::tools::bench::matmul_bench_square(a.size, &precisions, a.gpu, a.iters)?
                }
            };
            for r in &rows {
                let what = match (&r.rejected, r.ms, r.tflops) {
                    (Some(why), _, _) => format!("rejected: {why}"),
                    (None, Some(ms), Some(tf)) => format!("{ms:.4} ms  {tf:.2} TFLOP/s"),
                    _ => String::new(),
                };
                println!(
                    "matmul {:<36} {:<14} {}{}",
                    r.product,
                    r.kernel,
                    what,
                    if r.best { "  (best)" } else { "" }
                );
            }
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&rows)?)
                    .with_context(|| format!("{}: cannot write", p.display()))?;
            }
            Ok(())
        }
        BenchCommand::Scaling(a) => crate::tools::scaling::scaling_command(a, comm),
        BenchCommand::Comm(a) if a.probe => crate::distributed::probe::print_probe(comm),
        BenchCommand::Comm(a) => {
            if a.min_bytes > a.max_bytes || a.max_bytes < 4 {
                bail!("--min-bytes must be ≤ --max-bytes, and --max-bytes at least 4");
            }
            let sizes = crate::tools::bench::sizes(a.min_bytes, a.max_bytes);
            if comm.is_root() {
                println!("{}", crate::tools::bench::comm_header(comm));
            }
            let rows = crate::tools::bench::comm_bench(comm, &sizes, a.warmup, a.iters)?;
            if comm.is_root() {
                for r in &rows {
                    println!("{}", r.line());
                }
                if let Some(p) = &a.json {
                    let text = serde_json::to_string_pretty(&rows)?;
                    std::fs::write(p, text)
                        .with_context(|| format!("{}: cannot write", p.display()))?;
                }
            }
            let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
            if wrong > 0 {
                bail!("allreduce returned {wrong} wrong elements");
            }
            Ok(())
        }
    }
}

/// A named workload and its reference batch.
fn workload_and_batch(name: &str) -> anyhow::Result<(Workload, usize)> {
    let w = Workload::named(name)?;
    let b = Workload::reference_batch(name).unwrap_or(crate::tools::bench::CUSTOM_BATCH);
    Ok((w, b))
}

fn run_step_bench(a: &StepBenchArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    if a.exchange.staleness_momentum.is_some() {
        bail!(
            "--staleness-momentum changes what train learns, not a step's time: bench takes no momentum"
        );
    }
    let (workload, default_batch) = match (&a.workload, a.model) {
        (Some(name), None) => workload_and_batch(name)?,
        (None, Some(model)) => (
            Workload {
                name: "custom".into(),
                model,
                features: a.features,
                hidden: a.hidden.clone(),
                classes: a.classes,
                image: None,
            },
            crate::tools::bench::CUSTOM_BATCH,
        ),
        (Some(_), Some(_)) => bail!("give --workload or --model, not both"),
        (None, None) => bail!("give --workload seed-logreg|mnist-mlp|wide-mlp or a custom --model"),
    };
    let cfg = StepBenchConfig {
        workload,
        batch: a.batch.unwrap_or(default_batch),
        steps: a.steps,
        repeats: a.repeats,
        warmup: a.warmup,
        device: a.device,
        gpu: a.gpu,
        precision: a.precision,
        autotune: a.autotune,
        // PowerSGD without warm-up unless asked: the repeats measure the compressed exchange
        exchange: a.exchange.config(0),
    };
    // no agreement round here: the benchmark is full of collectives, and an error part-way on one
    // rank is ended by main's abort
    let r = crate::tools::bench::step_bench(&cfg, comm)?;
    if comm.is_root() {
        println!("{}", r.report());
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&r)?)
                .with_context(|| format!("{}: cannot write", p.display()))?;
        }
    }
    Ok(())
}
