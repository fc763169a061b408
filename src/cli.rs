//! The command line: `dptrain train | eval | data synth | data inspect | devices`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::autotune::{self, AutotuneMode};
use crate::backend::{self, BackendInit, Precision, Split};
use crate::bench::StepBenchConfig;
use crate::comm::{Communicator, SingleProcess};
use crate::consistency;
use crate::data::{self, CsvOptions, Dataset, HeaderMode, LabelColumn, NormKind, synth};
use crate::model::{Activation, ModelKind};
use crate::optim::{OptimArgs, OptimConfig, ScheduleKind};
use crate::train::{
    self, CheckpointUnit, DeviceKind, NanPolicy, ResumeFrom, RunControl, ShardMode, StepPlan,
    SyncMode, TrainConfig,
};

#[derive(Parser, Debug)]
#[command(
    name = "dptrain",
    version,
    about = "Data-parallel training: WGSL gradients on every GPU, MPI allreduce between ranks"
)]
pub struct Cli {
    /// More diagnostics on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model.
    Train(Box<TrainArgs>),
    /// Evaluate a saved model on a dataset.
    Eval(EvalArgs),
    /// Make or inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// List the GPU adapters wgpu can see, with their limits and features.
    Devices,
    /// Benchmarks: `bench --workload NAME` times the training step, `bench comm` the allreduce.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub step: StepBenchArgs,
}

#[derive(Args, Debug)]
pub struct StepBenchArgs {
    /// A reference workload: seed-logreg, mnist-mlp, wide-mlp (or --model/--features/--hidden/--classes).
    #[arg(long)]
    pub workload: Option<String>,
    /// Custom model instead of a named workload.
    #[arg(long, value_enum)]
    pub model: Option<ModelKind>,
    #[arg(long, default_value_t = 784)]
    pub features: usize,
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Per-rank batch (default: the workload's first reference batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Steps per timed repeat.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceKind,
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Matrix-product inputs: f32, or f16 with f32 accumulation.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Kernel tuning before timing: auto, on, off, cached (as `train`).
    #[arg(long, value_enum, default_value = "auto")]
    pub autotune: AutotuneMode,
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
    #[arg(long)]
    pub gpu: Option<usize>,
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
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also write the rows as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Write a seeded synthetic dataset as CSV (label first, no header).
    Synth(SynthArgs),
    /// Samples, features, classes, class counts and value ranges of a dataset.
    Inspect {
        /// A CSV file, an MNIST directory, or a synth: spec.
        path: String,
        #[command(flatten)]
        csv: CsvArgs,
    },
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long, value_enum, default_value = "seed")]
    pub kind: SynthKind,
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Features (ignored by --kind seed, which has 2).
    #[arg(long, default_value_t = 2)]
    pub features: usize,
    /// Classes for blobs and random (0 with random: regression targets).
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// Noise standard deviation for --kind linear.
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SynthKind {
    /// The seed document's example: 2 features, labels 0/1 from a noisy linear boundary.
    Seed,
    /// Gaussian blobs, one per class.
    Blobs,
    /// x ~ N(0,1), uniform random labels (for benchmarks).
    Random,
    /// y = w·x + b + noise (regression).
    Linear,
}

#[derive(Args, Debug, Clone)]
pub struct CsvArgs {
    /// CSV label column: 0-based index or header name.
    #[arg(long, default_value = "0")]
    pub label_column: String,
    /// Whether the CSV's first row is a header.
    #[arg(long, value_enum, default_value = "auto")]
    pub header: HeaderArg,
    /// CSV delimiter: comma, tab or semicolon (default: detected).
    #[arg(long, value_enum)]
    pub delimiter: Option<DelimiterArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HeaderArg {
    Auto,
    Yes,
    No,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DelimiterArg {
    Comma,
    Tab,
    Semicolon,
}

impl CsvArgs {
    pub fn options(&self) -> CsvOptions {
        CsvOptions {
            label: self
                .label_column
                .parse::<LabelColumn>()
                .unwrap_or(LabelColumn::Index(0)),
            header: match self.header {
                HeaderArg::Auto => HeaderMode::Auto,
                HeaderArg::Yes => HeaderMode::Yes,
                HeaderArg::No => HeaderMode::No,
            },
            delimiter: self.delimiter.map(|d| match d {
                DelimiterArg::Comma => b',',
                DelimiterArg::Tab => b'\t',
                DelimiterArg::Semicolon => b';',
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NormArg {
    /// Standardise CSV features (mean 0, std 1 on the training set); scale pixels to [0, 1].
    Auto,
    Standard,
    None,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training data: a CSV file, an MNIST directory (train + t10k IDX files, gzip or raw), or
    /// synth:KIND[:N[:F[:K]]] (seed, blobs, random, linear; seeded by --seed).
    #[arg(long)]
    pub data: String,
    /// Test data (CSV file or MNIST directory, whose t10k files are used); default: the MNIST
    /// directory's own test set, else a --test-fraction split.
    #[arg(long)]
    pub test_data: Option<String>,
    /// Fraction of the training file held out as a seeded test set when no test data is given (0: none).
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    #[command(flatten)]
    pub csv: CsvArgs,
    #[arg(long, value_enum, default_value = "auto")]
    pub normalize: NormArg,
    #[arg(long, value_enum, default_value = "softmax")]
    pub model: ModelKind,
    /// Hidden layer widths for --model mlp, e.g. 1024,1024.
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Hidden-layer activation for --model mlp.
    #[arg(long, value_enum, default_value = "relu")]
    pub activation: Activation,
    /// Dropout probability after each hidden layer of --model mlp (0: none; off in evaluation).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub dropout: f64,
    /// Initial parameters from a safetensors file (names and shapes as --save writes them).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Passes over the training data (ignored when --steps is given).
    #[arg(long, default_value_t = 10)]
    pub epochs: u64,
    /// Total optimiser steps (overrides --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Samples per micro-batch (per rank under mpirun).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step: their gradients are summed, as one batch N× larger.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub lr: f64,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[arg(long, value_enum, default_value = "constant")]
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Epochs between decays for --schedule step.
    #[arg(long, default_value_t = 10)]
    pub step_size: u64,
    /// Decay factor for --schedule step.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Final learning rate for --schedule cosine.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Seed for initialisation, shuffling, test split and synthetic data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceKind,
    /// Adapter index from `dptrain devices`.
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Matrix-product inputs: f32, or f16 with f32 accumulation and dynamic loss scaling (GPU).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Kernel tuning: auto (cached on a hardware GPU, off on lavapipe), on, off, cached.
    #[arg(long, value_enum, default_value = "auto")]
    pub autotune: AutotuneMode,
    /// One JSON object per epoch.
    #[arg(long)]
    pub metrics_out: Option<PathBuf>,
    /// Save the trained model (safetensors, PyTorch nn.Linear names).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Under mpirun: how ranks divide the training set.
    #[arg(long, value_enum, default_value = "global")]
    pub shard: ShardMode,
    /// Under mpirun: allreduce gradients every step, or average parameters every --sync-every steps.
    #[arg(long, value_enum, default_value = "grads")]
    pub sync: SyncMode,
    /// Local steps between parameter averages with --sync params.
    #[arg(long, default_value_t = 1)]
    pub sync_every: u64,
    /// Folder for checkpoints (written atomically; the newest --keep-checkpoints kept).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N --checkpoint-unit (0: only at the end).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: u64,
    #[arg(long, value_enum, default_value = "epoch")]
    pub checkpoint_unit: CheckpointUnit,
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Take over a --checkpoint-dir lock held by a run on another host (one whose process is gone).
    #[arg(long)]
    pub break_lock: bool,
    /// Resume even though the training data (its size, contents or normaliser) differ from the
    /// checkpoint's.
    #[arg(long)]
    pub resume_allow_changed_data: bool,
    /// Resume from a checkpoint file, or `auto`: the newest intact one in --checkpoint-dir
    /// (a fresh start when there is none).
    #[arg(long)]
    pub resume: Option<String>,
    /// When the loss is not finite: stop naming the step, or roll back to the newest checkpoint
    /// with the learning rate halved.
    #[arg(long, value_enum, default_value = "stop")]
    pub on_nan: NanPolicy,
    #[arg(long, default_value_t = 3)]
    pub max_rollbacks: u32,
    /// Under mpirun: seconds any collective may wait before the job is aborted, naming the ranks
    /// that have not arrived (0: wait forever, with MPI's blocking collectives).
    #[arg(long, default_value_t = 300.0, value_parser = non_negative_seconds)]
    pub collective_timeout: f64,
}

fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => crate::limits::collective_timeout(v)
            .map(|_| v)
            .map_err(|e| e.to_string()),
        _ => Err(format!("{s:?} is not a number of seconds ≥ 0")),
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A model file written by `train --save`.
    #[arg(long)]
    pub model_file: PathBuf,
    /// Data to evaluate on: a CSV file (all of it) or an MNIST directory (its t10k test set).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    pub csv: CsvArgs,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceKind,
    #[arg(long)]
    pub gpu: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
}

/// Load `--data`: a synth: spec, an MNIST directory or a CSV file.
pub fn load_data(spec: &str, csv: &CsvOptions, seed: u64) -> anyhow::Result<data::Loaded> {
    if let Some(rest) = spec.strip_prefix("synth:") {
        let mut parts = rest.split(':');
        let kind = parts.next().unwrap_or("");
        let nums: Vec<usize> = parts
            .map(|p| {
                p.parse::<usize>()
                    .with_context(|| format!("--data {spec}: {p:?} is not a whole number"))
            })
            .collect::<anyhow::Result<_>>()?;
        let arg = |i: usize, default: usize| nums.get(i).copied().unwrap_or(default);
        let n = arg(0, 1000);
        if n == 0 {
            bail!("--data {spec}: the sample count must be at least 1");
        }
        let features = match kind {
            "seed" => 2,
            "linear" => arg(1, 5),
            _ => arg(1, 10),
        };
        crate::limits::check_dataset(&format!("--data {spec}"), n as u64, features as u64)?;
        if arg(2, 0) > crate::limits::MAX_CLASSES {
            bail!(
                "--data {spec}: {} classes, more than the {} dptrain takes",
                arg(2, 0),
                crate::limits::MAX_CLASSES
            );
        }
        let ds = match kind {
            "seed" => synth::seed_example(n, seed),
            "blobs" => synth::blobs(n, arg(1, 2), arg(2, 3), seed),
            "random" => synth::random(n, arg(1, 10), arg(2, 2), seed),
            "linear" => synth::linear(n, arg(1, 5), 0.1, seed).0,
            _ => bail!(
                "--data {spec}: unknown synthetic kind {kind:?} (seed, blobs, random, linear)"
            ),
        };
        return Ok(data::Loaded {
            train: ds,
            test: None,
        });
    }
    Ok(data::load(Path::new(spec), csv)?)
}

fn train_config(a: &TrainArgs) -> TrainConfig {
    TrainConfig {
        model: a.model,
        hidden: a.hidden.clone(),
        activation: a.activation,
        dropout: a.dropout,
        epochs: Some(a.epochs),
        steps: a.steps,
        batch_size: a.batch_size,
        accumulate: a.accumulate,
        lr: a.lr,
        optim: a.optim.config(),
        schedule: a.schedule,
        warmup: a.warmup,
        step_size: a.step_size,
        gamma: a.gamma,
        min_lr: a.min_lr,
        seed: a.seed,
        normalize: match a.normalize {
            NormArg::Auto | NormArg::Standard => NormKind::Standard,
            NormArg::None => NormKind::None,
        },
        init: a.init.clone(),
        device: a.device,
        gpu: a.gpu,
        shard: a.shard,
        sync: a.sync,
        sync_every: a.sync_every,
        precision: a.precision,
    }
}

/// Training and test sets as `train` resolves them.
pub fn resolve_datasets(a: &TrainArgs) -> anyhow::Result<(Dataset, Option<Dataset>)> {
    let csv = a.csv.options();
    if !(a.test_fraction.is_finite() && (0.0..1.0).contains(&a.test_fraction)) {
        bail!(
            "--test-fraction must be in [0, 1) (got {})",
            a.test_fraction
        );
    }
    let loaded = load_data(&a.data, &csv, a.seed)?;
    if let Some(t) = &a.test_data {
        let lt = load_data(t, &csv, a.seed.wrapping_add(1))?;
        // an MNIST directory as test data means its t10k files
        let test = lt.test.unwrap_or(lt.train);
        return Ok((loaded.train, Some(test)));
    }
    match loaded.test {
        Some(test) => Ok((loaded.train, Some(test))),
        None if a.test_fraction > 0.0 => {
            let (train, test) = data::train_test_split(&loaded.train, a.test_fraction, a.seed)?;
            Ok((train, Some(test)))
        }
        None => Ok((loaded.train, None)),
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {per_sec} eta {eta}")
    {
        pb.set_style(style);
    }
    pb
}

/// Checkpoint and recovery flags that cannot work together.
fn check_run_args(a: &TrainArgs) -> anyhow::Result<()> {
    if a.keep_checkpoints == 0 {
        bail!("--keep-checkpoints must be at least 1");
    }
    if a.resume.as_deref() == Some("auto") && a.checkpoint_dir.is_none() {
        bail!("--resume auto needs --checkpoint-dir");
    }
    if a.on_nan == NanPolicy::Rollback && a.checkpoint_dir.is_none() {
        bail!("--on-nan rollback needs --checkpoint-dir");
    }
    Ok(())
}

/// Every path `train` reads and writes, for the checks before the run.
fn run_paths(a: &TrainArgs) -> crate::outputs::RunPaths {
    let data = |s: &str| (!s.starts_with("synth:")).then(|| PathBuf::from(s));
    let mut p = crate::outputs::RunPaths::default();
    p.inputs.extend(data(&a.data).map(|d| ("--data", d)));
    p.inputs.extend(
        a.test_data
            .as_deref()
            .and_then(data)
            .map(|d| ("--test-data", d)),
    );
    p.inputs.extend(a.init.clone().map(|d| ("--init", d)));
    p.inputs.extend(
        a.resume
            .as_deref()
            .filter(|r| *r != "auto")
            .map(|r| ("--resume", PathBuf::from(r))),
    );
    p.files.extend(a.save.clone().map(|f| ("--save", f)));
    p.files
        .extend(a.metrics_out.clone().map(|f| ("--metrics-out", f)));
    p.dirs
        .extend(a.checkpoint_dir.clone().map(|d| ("--checkpoint-dir", d)));
    p
}

pub fn run_train(a: &TrainArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    let cfg = train_config(a);
    // rank 0 writes every output: its paths are checked, and its checkpoint folder locked, before
    // any work; every failure before the first collective is shared, so no rank waits for one that quit
    let lock = consistency::agree(
        comm,
        check_run_args(a).and_then(|_| match comm.is_root() {
            true => run_paths(a).check().and_then(|_| {
                a.checkpoint_dir
                    .as_deref()
                    .map(|d| crate::outputs::lock_dir(d, a.break_lock))
                    .transpose()
            }),
            false => Ok(None),
        }),
    )?;
    let setup = consistency::agree(
        comm,
        cfg.validate()
            .and_then(|_| resolve_datasets(a))
            .and_then(|(tr, te)| train::setup_rank(&cfg, tr, te, comm.rank(), comm.size())),
    )?;
    consistency::check_same(comm, &train::fingerprint(&cfg, &setup))?;
    // the step plan, computed once: the progress bar's length and the loop's rows
    let plan = StepPlan::of(&cfg, setup.total_train, comm.rank(), comm.size());
    let total = consistency::agree(comm, cfg.total_steps(plan.steps_per_epoch))?;
    let spec = &setup.spec;
    let metrics_file = match (&a.metrics_out, comm.is_root()) {
        (Some(p), true) => Some(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display())),
        )
        .transpose(),
        _ => Ok(None),
    };
    let mut metrics = consistency::agree(comm, metrics_file)?.map(std::io::BufWriter::new);
    let init = setup.backend_init(&cfg, &plan);
    let mut backend = consistency::agree(
        comm,
        backend::open(cfg.device, cfg.gpu, comm.local_rank(), &init),
    )?;
    let tuning = autotune::choose_kernels(backend.as_mut(), comm, a.autotune)?;
    if tuning.tuned > 0 && comm.is_root() {
        tracing::info!(
            "autotune: {} products tuned in {:.2} s",
            tuning.tuned,
            tuning.seconds
        );
    }
    if comm.size() > 1 {
        // one write, so that mpirun does not interleave the ranks' lines
        let line = format!(
            "dptrain: rank {}/{} (node-local {}): {}\n",
            comm.rank(),
            comm.size(),
            comm.local_rank(),
            backend.describe()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    if comm.is_root() {
        println!(
            "dptrain: {} samples × {} features{}, model {:?} {:?} ({} parameters), on {}{}",
            setup.total_train,
            setup.train.n_features,
            setup
                .test
                .as_ref()
                .map(|t| format!(", test {}", t.n_samples))
                .unwrap_or_default(),
            spec.kind,
            spec.widths(),
            spec.layout().total,
            backend.describe(),
            if comm.size() > 1 {
                format!(", {}", comm.describe())
            } else {
                String::new()
            }
        );
    }
    let pb = if comm.is_root() {
        progress_bar(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let ctl = RunControl {
        checkpoint_dir: a.checkpoint_dir.clone(),
        checkpoint_every: a.checkpoint_every,
        checkpoint_unit: a.checkpoint_unit,
        keep: a.keep_checkpoints,
        resume: a.resume.as_ref().map(|r| {
            if r == "auto" {
                ResumeFrom::Auto
            } else {
                ResumeFrom::Path(PathBuf::from(r))
            }
        }),
        on_nan: a.on_nan,
        max_rollbacks: a.max_rollbacks,
        kernels: tuning.choices.clone(),
        allow_changed_data: a.resume_allow_changed_data,
        ..RunControl::default()
    };
    let mut write_err = None;
    let outcome = train::train_with(
        &cfg,
        &ctl,
        &setup,
        &plan,
        backend.as_mut(),
        comm,
        |r| {
            if comm.is_root() {
                pb.suspend(|| println!("{}", r.line(cfg.steps.is_none().then_some(a.epochs))));
                if let Some(m) = metrics.as_mut() {
                    let line = serde_json::to_string(r).unwrap_or_default();
                    if let Err(e) = writeln!(m, "{line}").and_then(|_| m.flush()) {
                        write_err.get_or_insert(e);
                    }
                }
            }
        },
        |s| pb.set_position(s),
    )?;
    pb.finish_and_clear();
    // the model is saved even when the metrics could not be written, and the other way round
    let saved = match (&a.save, comm.is_root()) {
        (Some(path), true) => crate::modelfile::save(path, spec, &setup.norm, &outcome.params)
            .map(|_| println!("dptrain: saved {}", path.display())),
        _ => Ok(()),
    };
    drop(lock);
    match (write_err, &a.metrics_out, saved) {
        (Some(e), Some(p), Err(s)) => bail!("{}: cannot write metrics: {e}; and {s}", p.display()),
        (Some(e), Some(p), Ok(())) => bail!("{}: cannot write metrics: {e}", p.display()),
        (_, _, saved) => Ok(saved?),
    }
}

pub fn run_eval(a: &EvalArgs) -> anyhow::Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let saved = crate::modelfile::load(&a.model_file)?;
    let spec = saved.spec.clone().with_context(|| {
        format!(
            "{}: no dptrain model spec in its metadata (was it written by `dptrain train --save`?)",
            a.model_file.display()
        )
    })?;
    let norm = saved
        .norm
        .clone()
        .with_context(|| format!("{}: no normaliser in its metadata", a.model_file.display()))?;
    let theta = saved.flat_params(&spec, &a.model_file)?;
    let loaded = load_data(&a.data, &a.csv.options(), 0)?;
    let ds = loaded.test.unwrap_or(loaded.train);
    if ds.n_features != spec.inputs {
        bail!(
            "{}: {} features, but the model takes {}",
            ds.source,
            ds.n_features,
            spec.inputs
        );
    }
    if !spec.is_regression() {
        let labels = ds.class_labels()?;
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= spec.outputs.max(2))
        {
            bail!(
                "{}: sample {}: label {l} is out of range for a model with {} classes",
                ds.source,
                i + 1,
                spec.outputs.max(2)
            );
        }
    }
    let init = BackendInit {
        spec: &spec,
        train: &ds,
        test: None,
        norm: &norm,
        max_rows: a.batch_size.min(ds.n_samples).max(1),
        rule: OptimConfig::default().rule(),
        seed: 0,
        sample_base: 0,
        precision: Precision::F32,
    };
    let mut backend = backend::open(a.device, a.gpu, 0, &init)?;
    backend.set_params(&theta)?;
    let r = train::evaluate(
        backend.as_mut(),
        &SingleProcess,
        Split::Train,
        ds.n_samples,
        spec.is_regression(),
    )?;
    let mut line = format!("samples {}  test_loss {:.4}", r.samples, r.loss);
    if let Some(acc) = r.accuracy {
        line += &format!("  test_acc {acc:.4}");
    }
    if let Some(rmse) = r.rmse {
        line += &format!("  test_rmse {rmse:.4}");
    }
    println!("{line}");
    Ok(())
}

pub fn run_data(cmd: &DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Synth(s) => {
            if s.samples == 0 {
                bail!("--samples must be at least 1");
            }
            if s.kind != SynthKind::Seed && s.features == 0 {
                bail!("--features must be at least 1");
            }
            crate::limits::check_dataset("data synth", s.samples as u64, s.features as u64)?;
            if s.classes > crate::limits::MAX_CLASSES {
                bail!(
                    "--classes {} is more than the {} dptrain takes",
                    s.classes,
                    crate::limits::MAX_CLASSES
                );
            }
            let ds = match s.kind {
                SynthKind::Seed => synth::seed_example(s.samples, s.seed),
                SynthKind::Blobs => {
                    if s.classes < 1 {
                        bail!("--classes must be at least 1 for blobs");
                    }
                    synth::blobs(s.samples, s.features, s.classes, s.seed)
                }
                SynthKind::Random => synth::random(s.samples, s.features, s.classes, s.seed),
                SynthKind::Linear => {
                    if !(s.noise.is_finite() && s.noise >= 0.0) {
                        bail!("--noise must be ≥ 0");
                    }
                    synth::linear(s.samples, s.features, s.noise, s.seed).0
                }
            };
            data::write_csv(&ds, &s.out)?;
            eprintln!(
                "dptrain: wrote {} samples × {} features to {}",
                ds.n_samples,
                ds.n_features,
                s.out.display()
            );
            Ok(())
        }
        DataCommand::Inspect { path, csv } => {
            let loaded = load_data(path, &csv.options(), 0)?;
            println!("train:\n{}", data::inspect(&loaded.train));
            if let Some(t) = &loaded.test {
                println!("test:\n{}", data::inspect(t));
            }
            Ok(())
        }
    }
}

pub fn run_devices() -> anyhow::Result<()> {
    let adapters = dptrain_kernels::list_adapters();
    if adapters.is_empty() {
        bail!("{}", dptrain_kernels::KernelError::NoAdapter);
    }
    for a in adapters {
        let l = &a.limits;
        println!(
            "[{}] {} ({:?}, {:?}, driver {} {})",
            a.index,
            a.info.name,
            a.info.device_type,
            a.info.backend,
            a.info.driver,
            a.info.driver_info
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, {} invocations per workgroup",
            l.max_storage_buffer_binding_size / (1 << 20),
            l.max_buffer_size / (1 << 20),
            l.max_compute_workgroup_storage_size / 1024,
            l.max_compute_invocations_per_workgroup
        );
        println!("    features: {}", a.feature_names().join(", "));
    }
    Ok(())
}

pub fn run_bench(args: &BenchArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
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
                        };
                        rows.extend(crate::bench::matmul_bench_workload(&cfg, comm)?);
                    }
                    rows
                }
                None => crate::bench::matmul_bench_square(a.size, &precisions, a.gpu, a.iters)?,
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
        BenchCommand::Comm(a) => {
            if a.min_bytes > a.max_bytes || a.max_bytes < 4 {
                bail!("--min-bytes must be ≤ --max-bytes, and --max-bytes at least 4");
            }
            let sizes = crate::bench::sizes(a.min_bytes, a.max_bytes);
            if comm.is_root() {
                println!("{}", crate::bench::comm_header(comm));
            }
            let rows = crate::bench::comm_bench(comm, &sizes, a.warmup, a.iters)?;
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

/// A named workload and its first reference batch.
fn workload_and_batch(name: &str) -> anyhow::Result<(crate::bench::Workload, usize)> {
    let w = crate::bench::Workload::named(name)?;
    let b = match name {
        "seed-logreg" => 100,
        "mnist-mlp" => 1024,
        _ => 8192,
    };
    Ok((w, b))
}

fn run_step_bench(a: &StepBenchArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    use crate::bench::Workload;
    let (workload, default_batch) = match (&a.workload, a.model) {
        (Some(name), None) => workload_and_batch(name)?,
        (None, Some(model)) => (
            Workload {
                name: "custom".into(),
                model,
                features: a.features,
                hidden: a.hidden.clone(),
                classes: a.classes,
            },
            1024,
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
    };
    // no agreement round here: the benchmark is full of collectives, and an error part-way on one
    // rank is ended by main's abort
    let r = crate::bench::step_bench(&cfg, comm)?;
    if comm.is_root() {
        println!("{}", r.report());
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&r)?)
                .with_context(|| format!("{}: cannot write", p.display()))?;
        }
    }
    Ok(())
}
