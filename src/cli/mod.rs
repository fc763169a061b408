//! The command line: `dptrain train | eval | data synth | data inspect | devices`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::train::autotune::{self, AutotuneMode};
use crate::backend::{self, BackendInit, Precision, Split};
use crate::distributed::exchange::config::ExchangeArgs;
use crate::tools::bench::StepBenchConfig;
use crate::distributed::comm::{Communicator, SingleProcess};
use crate::distributed::agree as consistency;
use crate::data::{self, CsvOptions, Dataset, HeaderMode, LabelColumn, NormKind, synth};
use crate::model::{Activation, ModelKind};
use crate::optim::{OptimArgs, OptimConfig, ScheduleKind};
use crate::train::{
    self, CheckpointUnit, DeviceKind, NanPolicy, ResumeFrom, RunControl, ShardMode, StepPlan, TrainConfig,
};

#[derive(Parser, Debug)]
#[command(
    name = "dptrain",
    version,
    about = "Data-parallel training: WGSL gradients on every GPU, MPI allreduce between ranks"
)]
pub struct Cli {
    /// More diagnostics on stderr: -v dptrain's info, -vv its debug, -vvv every library's
    /// (wgpu, naga); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model.
    Train(Box<TrainArgs>),
    /// Evaluate a saved model (or a checkpoint) on a dataset.
    Eval(EvalArgs),
    /// Write a saved model's predictions for a dataset to CSV.
    Predict(PredictArgs),
    /// Look inside a saved model or checkpoint.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Draw the loss, accuracy and learning-rate curves of a --metrics-out file.
    Plot(PlotArgs),
    /// Make or inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// List the GPU adapters wgpu can see, with their limits and features.
    Devices,
    /// Benchmarks: `bench --workload NAME` times the training step, `bench comm` the allreduce.
    Bench(BenchArgs),
    /// Print a shell completion script: `dptrain completions bash > /etc/bash_completion.d/dptrain`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `dptrain man > dptrain.1`.
    Man,
}

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
    /// What to generate (the same kinds and defaults as `train --data synth:KIND`).
    #[arg(long, value_enum, default_value = "seed")]
    pub kind: SynthKind,
    /// Rows to write.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Features (default: blobs 2, random 10, linear 5; seed always has 2).
    #[arg(long)]
    pub features: Option<usize>,
    /// Classes for blobs and random (default: blobs 3, random 2; 0 with random: regression targets).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Noise standard deviation for --kind linear.
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    /// Seed of the generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The CSV file to write (label first, no header).
    #[arg(long)]
    pub out: PathBuf,
}

impl SynthKind {
    fn name(self) -> &'static str {
        match self {
            SynthKind::Seed => "seed",
            SynthKind::Blobs => "blobs",
            SynthKind::Random => "random",
            SynthKind::Linear => "linear",
        }
    }
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

#[derive(Args, Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(next_help_heading = "Data")]
pub struct CsvArgs {
    /// CSV label column: 0-based index, header name, or `last`.
    #[arg(long, default_value = "0")]
    pub label_column: String,
    /// Whether the CSV's first row is a header (auto: when any of its cells is not a number).
    #[arg(long, value_enum, default_value = "auto")]
    pub header: HeaderArg,
    /// CSV delimiter: comma, tab or semicolon (default: detected).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<DelimiterArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderArg {
    Auto,
    Yes,
    No,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormArg {
    /// Standardise CSV features (mean 0, std 1 on the training set); scale pixels to [0, 1].
    Auto,
    Standard,
    None,
}

#[derive(Args, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(allow_negative_numbers = true, args_override_self = true)]
pub struct TrainArgs {
    /// Training data: a CSV file, an MNIST directory (train + t10k IDX files, gzip or raw), or
    /// synth:KIND[:N[:F[:K]]] (seed, blobs, random, linear; seeded by --seed).
    #[arg(long, help_heading = "Data")]
    pub data: String,
    /// Test data (CSV file or MNIST directory, whose t10k files are used); default: the MNIST
    /// directory's own test set, else a --test-fraction split.
    #[arg(long, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_data: Option<String>,
    /// Fraction of the training file held out as a seeded test set when no test data is given (0: none).
    #[arg(long, default_value_t = 0.2, help_heading = "Data")]
    pub test_fraction: f64,
    /// Fraction of the training data held out (seeded) as a validation set, evaluated every
    /// --eval-every steps and at each epoch's end; early stopping and --save-best watch it (0: none).
    #[arg(long, default_value_t = 0.0, help_heading = "Data")]
    pub val_fraction: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub csv: CsvArgs,
    /// Feature scaling: auto and standard standardise each feature on the training set (pixels are
    /// scaled to [0, 1] instead); none leaves the values as they are.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Data")]
    pub normalize: NormArg,
    /// The model: logreg (sigmoid + BCE, labels 0/1), softmax (cross-entropy), linreg (MSE), mlp
    /// (hidden layers from --hidden, cross-entropy).
    #[arg(long, value_enum, default_value = "softmax", help_heading = "Model")]
    pub model: ModelKind,
    /// Hidden layer widths for --model mlp, e.g. 1024,1024.
    #[arg(long, value_delimiter = ',', help_heading = "Model")]
    pub hidden: Vec<usize>,
    /// Hidden-layer activation for --model mlp.
    #[arg(long, value_enum, default_value = "relu", help_heading = "Model")]
    pub activation: Activation,
    /// Dropout probability after each hidden layer of --model mlp (0: none; off in evaluation).
    #[arg(long, default_value_t = 0.0, help_heading = "Model")]
    pub dropout: f64,
    /// Initial parameters from a safetensors file (names and shapes as --save writes them).
    #[arg(long, help_heading = "Model")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Passes over the training data (ignored when --steps is given).
    #[arg(long, default_value_t = 10, help_heading = "Run length")]
    pub epochs: u64,
    /// Total optimiser steps (overrides --epochs).
    #[arg(long, help_heading = "Run length")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Evaluate the validation set every N steps as well as at each epoch's end (0: epochs only).
    #[arg(long, default_value_t = 0, help_heading = "Run length")]
    pub eval_every: u64,
    /// Stop when the --monitor value has not improved for K evaluations (0: never).
    #[arg(long, default_value_t = 0, help_heading = "Run length")]
    pub early_stop_patience: u64,
    /// What early stopping and --save-best watch (on the --val-fraction split).
    #[arg(
        long,
        value_enum,
        default_value = "val_loss",
        help_heading = "Run length"
    )]
    pub monitor: crate::train::Monitor,
    /// Samples per micro-batch (per rank under mpirun).
    #[arg(long, default_value_t = 64, help_heading = "Optimizer")]
    pub batch_size: usize,
    /// Micro-batches per optimiser step: their gradients are summed, as one batch N× larger.
    #[arg(long, default_value_t = 1, help_heading = "Optimizer")]
    pub accumulate: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.1, help_heading = "Optimizer")]
    pub lr: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    /// Learning-rate schedule after the warm-up.
    #[arg(
        long,
        value_enum,
        default_value = "constant",
        help_heading = "Schedule"
    )]
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0, help_heading = "Schedule")]
    pub warmup: u64,
    /// Epochs between decays for --schedule step.
    #[arg(long, default_value_t = 10, help_heading = "Schedule")]
    pub step_size: u64,
    /// Decay factor for --schedule step.
    #[arg(long, default_value_t = 0.1, help_heading = "Schedule")]
    pub gamma: f64,
    /// Final learning rate for --schedule cosine.
    #[arg(long, default_value_t = 0.0, help_heading = "Schedule")]
    pub min_lr: f64,
    /// Seed for initialisation, shuffling, the test and validation splits, dropout and synthetic data.
    #[arg(long, default_value_t = 0, help_heading = "Model")]
    pub seed: u64,
    /// Where the gradients are computed: auto (a hardware GPU, else the CPU), gpu (any wgpu
    /// adapter, lavapipe included) or cpu (the ndarray reference).
    #[arg(long, value_enum, default_value = "auto", help_heading = "Device")]
    pub device: DeviceKind,
    /// Adapter index from `dptrain devices`.
    #[arg(long, help_heading = "Device")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<usize>,
    /// Matrix-product inputs: f32, or f16 with f32 accumulation and dynamic loss scaling (GPU).
    #[arg(long, value_enum, default_value = "f32", help_heading = "Device")]
    pub precision: Precision,
    /// Kernel tuning: auto (cached on a hardware GPU, off on lavapipe), on, off, cached.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Device")]
    pub autotune: AutotuneMode,
    /// Under mpirun: how ranks divide the training set (global: every rank holds it all; split:
    /// each keeps its 1/N).
    #[arg(
        long,
        value_enum,
        default_value = "global",
        help_heading = "Distributed"
    )]
    pub shard: ShardMode,
    #[command(flatten)]
    #[serde(flatten)]
    pub exchange: ExchangeArgs,
    /// Under mpirun: share out each global batch between ranks (off: equal parts; auto: after 20
    /// steps of timing each rank's compute, parts proportional to its rows per second).
    #[arg(long, value_enum, default_value = "off", help_heading = "Distributed")]
    pub balance: crate::train::config::BalanceMode,
    /// Under mpirun: seconds any collective may wait before the job is aborted, naming the ranks
    /// that have not arrived (0: wait forever, with MPI's blocking collectives).
    #[arg(long, default_value_t = 300.0, value_parser = non_negative_seconds, help_heading = "Distributed")]
    pub collective_timeout: f64,
    /// Folder for checkpoints (written atomically; locked while the run uses it).
    #[arg(long, help_heading = "Checkpoints")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N --checkpoint-unit (0: only at the end).
    #[arg(long, default_value_t = 1, help_heading = "Checkpoints")]
    pub checkpoint_every: u64,
    /// What --checkpoint-every counts: epochs or steps.
    #[arg(
        long,
        value_enum,
        default_value = "epoch",
        help_heading = "Checkpoints"
    )]
    pub checkpoint_unit: CheckpointUnit,
    /// Checkpoints kept in --checkpoint-dir (the newest).
    #[arg(long, default_value_t = 3, help_heading = "Checkpoints")]
    pub keep_checkpoints: usize,
    /// Resume from a checkpoint file, or `auto`: the newest intact one in --checkpoint-dir
    /// (a fresh start when there is none).
    #[arg(long, help_heading = "Checkpoints")]
    #[serde(skip)]
    pub resume: Option<String>,
    /// Take over a --checkpoint-dir lock held by a run on another host (one whose process is gone).
    #[arg(long, help_heading = "Checkpoints")]
    #[serde(skip)]
    pub break_lock: bool,
    /// Resume even though the training data (its size, contents or normaliser) differ from the
    /// checkpoint's.
    #[arg(long, help_heading = "Checkpoints")]
    pub resume_allow_changed_data: bool,
    /// When the loss is not finite: stop naming the step, or roll back to the newest checkpoint
    /// with the learning rate halved.
    #[arg(long, value_enum, default_value = "stop", help_heading = "Checkpoints")]
    pub on_nan: NanPolicy,
    /// Rollbacks allowed with --on-nan rollback before the run gives up.
    #[arg(long, default_value_t = 3, help_heading = "Checkpoints")]
    pub max_rollbacks: u32,
    /// Save the trained model (safetensors, PyTorch nn.Linear names); its settings go beside it as
    /// <stem>.settings.toml.
    #[arg(long, help_heading = "Output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save: Option<PathBuf>,
    /// Keep the model of the best --monitor value seen (needs --val-fraction).
    #[arg(long, help_heading = "Output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_best: Option<PathBuf>,
    /// Metrics as JSON lines, or CSV when the name ends in .csv: a record per epoch, per --log-every
    /// steps and per validation evaluation; appended to when resuming.
    #[arg(long, help_heading = "Output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_out: Option<PathBuf>,
    /// Also record the training loss and rate every N steps (in --metrics-out and --tensorboard).
    #[arg(long, default_value_t = 0, help_heading = "Output")]
    pub log_every: u64,
    /// Write TensorBoard event files (loss, accuracy, lr, samples/s) into this folder.
    #[arg(long, help_heading = "Output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensorboard: Option<PathBuf>,
    /// Write the run's timeline as Chrome trace-event JSON (open it in ui.perfetto.dev or
    /// chrome://tracing): every rank's phases, each bucket's readback, allreduce and upload, and
    /// one step's GPU kernels, on rank 0's clock.
    #[arg(long, help_heading = "Output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<PathBuf>,
    /// Seconds between the plain progress lines printed when stderr is not a terminal (0: none).
    #[arg(long, default_value_t = 30.0, help_heading = "Output")]
    pub progress_every: f64,
    /// Flags from a TOML file (keys are flag names: lr = 0.1, hidden = [256]); the command line
    /// overrides it.
    #[arg(long, help_heading = "Output")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
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
    /// A model file (`train --save`, `--save-best`) or a checkpoint.
    #[arg(long)]
    pub model_file: PathBuf,
    /// Data to evaluate on: a CSV file (all of it) or an MNIST directory (its t10k test set).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    pub csv: CsvArgs,
    /// Also print the confusion matrix and each class's precision, recall and F1.
    #[arg(long)]
    pub report: bool,
    /// Where to evaluate: auto (a hardware GPU, else the CPU), gpu or cpu.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceKind,
    /// Adapter index from `dptrain devices`.
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Rows evaluated at a time.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A model file (`train --save`, `--save-best`) or a checkpoint.
    #[arg(long)]
    pub model_file: PathBuf,
    /// Rows to predict: a CSV file with the model's features, with or without the label column
    /// (told apart by the column count), or an MNIST directory (its t10k images).
    #[arg(long)]
    pub data: String,
    /// Where to write the predictions (CSV: id, predicted class and each class's probability, or
    /// the predicted value); `-` for stdout.
    #[arg(long)]
    pub out: PathBuf,
    /// A CSV column holding each row's id (index, header name or `last`), copied to the output
    /// and not used as a feature; default: the 1-based row number.
    #[arg(long)]
    pub id_column: Option<String>,
    #[command(flatten)]
    pub csv: CsvArgs,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A metrics file written by `train --metrics-out`.
    pub metrics: PathBuf,
    /// The picture: .svg or .png.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Architecture, parameter count, training settings and, for linear models, the weights in
    /// the raw units of the features.
    Show {
        /// A model file or a checkpoint.
        path: PathBuf,
    },
}

/// The features and classes of each synthetic kind when none are given, shared by `synth:KIND` and
/// `data synth --kind KIND`.
pub fn synth_defaults(kind: &str) -> Option<(usize, usize)> {
    match kind {
        "seed" => Some((2, 2)),
        "blobs" => Some((2, 3)),
        "random" => Some((10, 2)),
        "linear" => Some((5, 0)),
        _ => None,
    }
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
        let Some((f0, k0)) = synth_defaults(kind) else {
            bail!("--data {spec}: unknown synthetic kind {kind:?} (seed, blobs, random, linear)");
        };
        let features = if kind == "seed" { 2 } else { arg(1, f0) };
        crate::limits::check_dataset(&format!("--data {spec}"), n as u64, features as u64)?;
        let classes = arg(2, k0);
        if classes > crate::limits::MAX_CLASSES {
            bail!(
                "--data {spec}: {} classes, more than the {} dptrain takes",
                classes,
                crate::limits::MAX_CLASSES
            );
        }
        let ds = match kind {
            "seed" => synth::seed_example(n, seed),
            "blobs" => {
                if classes < 1 {
                    bail!("--data {spec}: blobs need at least 1 class");
                }
                synth::blobs(n, features, classes, seed)
            }
            "random" => synth::random(n, features, classes, seed),
            "linear" => synth::linear(n, features, 0.1, seed).0,
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
        optim: {
            let mut o = a.optim.config();
            if let Some(m) = a.exchange.momentum() {
                o.momentum = m;
            }
            o
        },
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
        precision: a.precision,
        val_fraction: a.val_fraction,
        exchange: a.exchange.config(100),
        balance: a.balance,
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
        let mut test = lt.test.unwrap_or(lt.train);
        // class names mean the training file's classes
        if let Some(names) = &loaded.train.labels {
            test.relabel(names)?;
        } else if test.labels.is_some() {
            bail!(
                "{}: the labels are text, but the training data's are numbers",
                test.source
            );
        }
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

/// Checkpoint and recovery flags that cannot work together.
fn check_run_args(a: &TrainArgs) -> anyhow::Result<()> {
    if a.keep_checkpoints == 0 {
        bail!("--keep-checkpoints must be at least 1");
    }
    if let Some(m) = a.exchange.staleness_momentum {
        if a.exchange.staleness != 1 {
            bail!("--staleness-momentum applies to --staleness 1");
        }
        if !(0.0..1.0).contains(&m) {
            bail!("--staleness-momentum must be in [0, 1) (got {m})");
        }
        if a.optim.optimizer != crate::optim::OptimizerKind::Sgd {
            bail!("--staleness-momentum replaces SGD's --momentum; with adam/adamw lower --beta1");
        }
    }
    if a.resume.as_deref() == Some("auto") && a.checkpoint_dir.is_none() {
        bail!("--resume auto needs --checkpoint-dir");
    }
    if a.on_nan == NanPolicy::Rollback && a.checkpoint_dir.is_none() {
        bail!("--on-nan rollback needs --checkpoint-dir");
    }
    if a.val_fraction == 0.0 {
        for (flag, used) in [
            ("--early-stop-patience", a.early_stop_patience > 0),
            ("--save-best", a.save_best.is_some()),
            ("--eval-every", a.eval_every > 0),
        ] {
            if used {
                bail!(
                    "{flag} needs a validation set: add --val-fraction F (e.g. 0.1); the test set is never used to choose a model"
                );
            }
        }
    }
    a.monitor.check(a.model == ModelKind::Linreg)?;
    if !(a.progress_every.is_finite() && a.progress_every >= 0.0) {
        bail!(
            "--progress-every must be a number of seconds ≥ 0 (got {})",
            a.progress_every
        );
    }
    Ok(())
}

/// Every path `train` reads and writes, for the checks before the run.
fn run_paths(a: &TrainArgs) -> crate::store::outputs::RunPaths {
    let data = |s: &str| (!s.starts_with("synth:")).then(|| PathBuf::from(s));
    let mut p = crate::store::outputs::RunPaths::default();
    p.inputs.extend(data(&a.data).map(|d| ("--data", d)));
    p.inputs.extend(
        a.test_data
            .as_deref()
            .and_then(data)
            .map(|d| ("--test-data", d)),
    );
    p.inputs.extend(a.init.clone().map(|d| ("--init", d)));
    p.inputs.extend(a.config.clone().map(|d| ("--config", d)));
    p.inputs.extend(
        a.resume
            .as_deref()
            .filter(|r| *r != "auto")
            .map(|r| ("--resume", PathBuf::from(r))),
    );
    p.files.extend(a.save.clone().map(|f| ("--save", f)));
    p.files
        .extend(a.metrics_out.clone().map(|f| ("--metrics-out", f)));
    p.files
        .extend(a.save_best.clone().map(|f| ("--save-best", f)));
    p.files.extend(a.trace.clone().map(|f| ("--trace", f)));
    p.dirs
        .extend(a.tensorboard.clone().map(|d| ("--tensorboard", d)));
    p.dirs
        .extend(a.checkpoint_dir.clone().map(|d| ("--checkpoint-dir", d)));
    p
}

/// Where the run's resolved settings go: beside the model file as `<stem>.settings.toml`, else in
/// the checkpoint folder; nowhere when the run saves neither.
fn settings_path(a: &TrainArgs) -> Option<PathBuf> {
    match (&a.save, &a.checkpoint_dir) {
        (Some(m), _) => {
            let stem = m.file_stem().map(|s| s.to_string_lossy().into_owned())?;
            Some(m.with_file_name(format!("{stem}.settings.toml")))
        }
        (None, Some(d)) => Some(d.join("settings.toml")),
        (None, None) => None,
    }
}

/// Open the metrics file: appended to when the run resumes, else created afresh.
fn open_metrics(
    path: &Path,
    resume: bool,
) -> anyhow::Result<(PathBuf, std::io::BufWriter<std::fs::File>)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume)
        .truncate(!resume)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    Ok((path.to_path_buf(), std::io::BufWriter::new(f)))
}

pub fn run_train(a: &TrainArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    let cfg = train_config(a);
    let settings = settings_path(a);
    // rank 0 writes every output: its paths are checked, and its checkpoint folder locked, before
    // any work; every failure before the first collective is shared, so no rank waits for one that quit
    let lock = consistency::agree(
        comm,
        check_run_args(a).and_then(|_| match comm.is_root() {
            true => {
                let mut paths = run_paths(a);
                paths
                    .files
                    .extend(settings.clone().map(|f| ("the settings file", f)));
                paths.check().and_then(|_| {
                    a.checkpoint_dir
                        .as_deref()
                        .map(|d| crate::store::outputs::lock_dir(d, a.break_lock))
                        .transpose()
                })
            }
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
    // the step plan, computed once: the progress display's length and the loop's rows
    let plan = StepPlan::of(&cfg, setup.total_train, comm.rank(), comm.size());
    let total = consistency::agree(comm, cfg.total_steps(plan.steps_per_epoch))?;
    let spec = &setup.spec;
    let settings_value = serde_json::to_value(a).unwrap_or_default();
    // the settings file, the metrics file and the TensorBoard folder, on rank 0
    let opened = match comm.is_root() {
        true => (|| {
            if let Some(p) = &settings {
                let text = settings_toml(a)?;
                crate::store::atomic::write_atomic(p, text.as_bytes())?;
            }
            let metrics = a
                .metrics_out
                .as_deref()
                .map(|p| open_metrics(p, a.resume.is_some()))
                .transpose()?;
            let tb = a
                .tensorboard
                .as_deref()
                .map(|d| {
                    crate::observe::tensorboard::EventWriter::new(d)
                        .map_err(|e| anyhow::anyhow!("--tensorboard: {e}"))
                })
                .transpose()?;
            Ok::<_, anyhow::Error>(Some((metrics, tb)))
        })(),
        false => Ok(None),
    };
    let (metrics, tensorboard) = consistency::agree(comm, opened)?.unwrap_or((None, None));
    let init = setup.backend_init(&cfg, &plan);
    let mut backend = consistency::agree(
        comm,
        backend::open(cfg.device, cfg.gpu, comm.local_rank(), &init),
    )?;
    let tuning = autotune::choose_kernels(backend.as_mut(), comm, a.autotune)?;
    // ranks that share a node over a transport far below a memory copy: say once what helps
    let probe = std::env::var("DPTRAIN_TRANSPORT_PROBE").map_or(true, |v| v != "off");
    if probe
        && comm.size() > 1
        && cfg.exchange.sync == train::SyncMode::Grads
        && let Some(w) = crate::distributed::probe::probe_transport(comm)?
        && comm.is_root()
    {
        tracing::warn!("{}", w.trim_start_matches("warning: "));
    }
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
            "dptrain: {} samples × {} features{}{}, model {:?} {:?} ({} parameters), on {}{}",
            setup.total_train,
            setup.train.n_features,
            setup
                .val
                .as_ref()
                .map(|t| format!(", validation {}", t.n_samples))
                .unwrap_or_default(),
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
        log_every: a.log_every,
        eval_every: a.eval_every,
        patience: a.early_stop_patience,
        monitor: a.monitor,
        ..RunControl::default()
    };
    let meta = crate::store::modelfile::ModelMeta {
        labels: setup.labels.clone(),
        settings: Some(settings_value),
    };
    let epochs = cfg.steps.is_none().then_some(a.epochs);
    let progress =
        crate::observe::progress::Progress::new(comm.is_root(), total, 0, epochs, a.progress_every);
    let mut rec = crate::observe::record::Recorder::new(comm.is_root(), epochs, progress);
    rec.metrics = metrics;
    rec.tensorboard = tensorboard;
    rec.best = a.save_best.as_deref().map(|path| crate::observe::record::BestModel {
        path,
        spec,
        norm: &setup.norm,
        meta: &meta,
    });
    if a.trace.is_some() {
        crate::observe::trace::enable();
    }
    let started = std::time::Instant::now();
    let outcome = train::train_with(&cfg, &ctl, &setup, &plan, backend.as_mut(), comm, &mut rec);
    rec.progress.finish();
    let outcome = outcome?;
    if comm.is_root() {
        println!(
            "{}",
            summary(
                &outcome,
                a.monitor,
                started.elapsed().as_secs_f64(),
                rec.samples
            )
            .line()
        );
        if outcome.early_stopped {
            println!(
                "dptrain: early stop: {} has not improved for {} evaluations",
                a.monitor.name(),
                a.early_stop_patience
            );
        }
        if let (Some(p), Some(best)) = (&a.save_best, outcome.watch.best) {
            println!(
                "dptrain: best model ({} {best:.4} at step {}) in {}",
                a.monitor.name(),
                outcome.watch.best_step,
                p.display()
            );
        }
    }
    // the model is saved even when the metrics could not be written, and the other way round
    let saved = match (&a.save, comm.is_root()) {
        (Some(path), true) => {
            crate::store::modelfile::save_with(path, spec, &setup.norm, &outcome.params, &meta)
                .map(|_| println!("dptrain: saved {}", path.display()))
        }
        _ => Ok(()),
    };
    // the timeline last: a collective on every rank; its failure harms neither model nor metrics
    let traced = match &a.trace {
        Some(path) => write_trace(path, &cfg, &plan, backend.as_mut(), comm),
        None => Ok(()),
    };
    drop(lock);
    let errors: Vec<String> = [
        rec.write_error,
        saved
            .err()
            .map(|e| consistency::one_line(&anyhow::Error::new(e))),
        traced.err().map(|e| consistency::one_line(&e)),
    ]
    .into_iter()
    .flatten()
    .collect();
    match errors.is_empty() {
        true => Ok(()),
        false => bail!("{}", errors.join("; and ")),
    }
}

/// `--trace`: one more step timed kernel by kernel where the device has timestamp queries (after
/// training, whose outputs are already taken: the step's update changes nothing kept), then every
/// rank's events to rank 0, which writes the file.
fn write_trace(
    path: &Path,
    cfg: &TrainConfig,
    plan: &StepPlan,
    backend: &mut dyn backend::Backend,
    comm: &dyn Communicator,
) -> anyhow::Result<()> {
    let (offset, rows) = plan.mine(0);
    let mut profiled = Ok(());
    if rows > 0 {
        let batch = backend::Batch {
            offset,
            rows,
            step: 0,
            accumulate: false,
        };
        let update = cfg.optim.update(0.0, 0, rows as u64);
        let submitted = std::time::Instant::now();
        match backend.profile_step(&batch, &update) {
            Ok(Some(kernels)) => {
                crate::observe::trace::gpu_kernels(submitted, std::time::Instant::now(), &kernels)
            }
            Ok(None) => {}
            // the collective below runs on every rank all the same; the error is said after it
            Err(e) => profiled = Err(e.context("--trace: timing one step's GPU kernels")),
        }
    }
    crate::distributed::gather::write_trace(comm, path)?;
    profiled?;
    if comm.is_root() {
        println!(
            "dptrain: timeline in {} (open it in ui.perfetto.dev or chrome://tracing)",
            path.display()
        );
    }
    Ok(())
}

/// The final summary: figures of the last epoch, the best test accuracy (or lowest RMSE or loss)
/// and the run's rate.
fn summary(
    o: &train::Outcome,
    monitor: train::Monitor,
    seconds: f64,
    samples: u64,
) -> crate::observe::progress::Summary {
    let last = o.reports.last();
    let mut fin = Vec::new();
    if let Some(r) = last {
        for (k, v) in [
            ("train_loss", Some(r.train_loss)),
            ("test_loss", r.test_loss),
            ("test_accuracy", r.test_accuracy),
            ("test_rmse", r.test_rmse),
            ("val_loss", r.val_loss),
            ("val_accuracy", r.val_accuracy),
            ("val_rmse", r.val_rmse),
        ] {
            if let Some(v) = v {
                fin.push((k.to_string(), v));
            }
        }
    }
    // the best epoch by the test figure users read first, or by the watched validation value
    let pick = |f: &dyn Fn(&train::EpochReport) -> Option<f64>, higher: bool| {
        o.reports
            .iter()
            .filter_map(|r| f(r).map(|v| (v, r.epoch)))
            .reduce(|b, c| {
                if (c.0 > b.0) == higher && c.0 != b.0 {
                    c
                } else {
                    b
                }
            })
    };
    let best = if o.watch.best.is_some() {
        o.watch
            .best
            .map(|v| (monitor.name().to_string(), v, o.watch.best_epoch))
    } else if let Some((v, e)) = pick(&|r| r.test_accuracy, true) {
        Some(("test_accuracy".to_string(), v, e))
    } else if let Some((v, e)) = pick(&|r| r.test_rmse, false) {
        Some(("test_rmse".to_string(), v, e))
    } else {
        pick(&|r| r.test_loss, false).map(|(v, e)| ("test_loss".to_string(), v, e))
    };
    crate::observe::progress::Summary {
        steps: o.steps,
        epochs: last.map_or(0, |r| r.epoch),
        seconds,
        samples,
        best,
        last: fin,
    }
}

pub fn run_eval(a: &EvalArgs) -> anyhow::Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = crate::store::modelfile::load_usable(&a.model_file)?;
    let spec = &model.spec;
    let loaded = load_data(&a.data, &a.csv.options(), 0)?;
    let mut ds = loaded.test.unwrap_or(loaded.train);
    if ds.n_features != spec.inputs {
        bail!(
            "{}: {} features, but the model takes {}",
            ds.source,
            ds.n_features,
            spec.inputs
        );
    }
    if !spec.is_regression() {
        relabel_for(&mut ds, model.meta.labels.as_deref())?;
        let labels = ds.class_labels()?;
        let k = crate::tools::apply::classes(spec);
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l as usize >= k) {
            bail!(
                "{}: sample {}: label {l} is out of range for a model with {k} classes",
                ds.source,
                i + 1,
            );
        }
    }
    let init = BackendInit {
        spec,
        train: &ds,
        test: None,
        norm: &model.norm,
        max_rows: a.batch_size.min(ds.n_samples).max(1),
        rule: OptimConfig::default().rule(),
        seed: 0,
        sample_base: 0,
        precision: Precision::F32,
    };
    let mut backend = backend::open(a.device, a.gpu, 0, &init)?;
    backend.set_params(&model.params)?;
    let r = train::evaluate(
        backend.as_mut(),
        &SingleProcess,
        Split::Train,
        ds.n_samples,
        spec.is_regression(),
    )?;
    // the metrics are named for what they are, on the data given, not "test_"
    let mut line = format!("{}: {} samples  loss {:.4}", ds.source, r.samples, r.loss);
    if let Some(acc) = r.accuracy {
        line += &format!("  accuracy {acc:.4}");
    }
    if let Some(rmse) = r.rmse {
        line += &format!("  rmse {rmse:.4}");
    }
    println!("{line}");
    if a.report {
        if spec.is_regression() {
            bail!("--report: a confusion matrix needs a classifier; this model is a regression");
        }
        let z = crate::tools::apply::outputs(&model, &ds)?;
        let mut c = crate::tools::apply::Confusion::new(crate::tools::apply::classes(spec));
        for (row, &y) in z.outer_iter().zip(&ds.y) {
            let p = crate::tools::apply::class_of(spec.kind, row.as_slice().unwrap_or(&[]));
            c.add(y as usize, p);
        }
        print!("{}", c.report(model.meta.labels.as_deref()));
    }
    Ok(())
}

/// Map a dataset's text labels onto the classes a model was trained with (its stored names).
fn relabel_for(ds: &mut Dataset, names: Option<&[String]>) -> anyhow::Result<()> {
    match (names, ds.labels.is_some()) {
        (Some(n), true) => Ok(ds.relabel(n)?),
        (None, true) => bail!(
            "{}: the labels are text, but the model was trained on numeric labels",
            ds.source
        ),
        // numeric labels are class indices, whatever names the model has
        (_, false) => Ok(()),
    }
}

/// `dptrain predict`: the model's outputs for every row, as CSV.
pub fn run_predict(a: &PredictArgs) -> anyhow::Result<()> {
    let to_stdout = a.out.as_os_str() == "-";
    let mut paths = crate::store::outputs::RunPaths::default();
    paths.inputs.push(("--model-file", a.model_file.clone()));
    if !a.data.starts_with("synth:") {
        paths.inputs.push(("--data", PathBuf::from(&a.data)));
    }
    if !to_stdout {
        paths.files.push(("--out", a.out.clone()));
    }
    paths.check()?;
    let model = crate::store::modelfile::load_usable(&a.model_file)?;
    let spec = &model.spec;
    let opts = a.csv.options();
    let id = a
        .id_column
        .as_deref()
        .map(|c| c.parse::<LabelColumn>().unwrap_or(LabelColumn::Index(0)));
    let path = Path::new(&a.data);
    let (mut ds, ids, labelled) = if a.data.starts_with("synth:") || path.is_dir() {
        if id.is_some() {
            bail!("--id-column needs a CSV file");
        }
        let loaded = load_data(&a.data, &opts, 0)?;
        (loaded.test.unwrap_or(loaded.train), None, true)
    } else {
        // with the label column or without: whichever reading gives the model's feature count
        let with = data::csv::load_rows(path, &opts, true, id.as_ref());
        match with {
            Ok(r) if r.ds.n_features == spec.inputs => (r.ds, r.ids, true),
            with => match data::csv::load_rows(path, &opts, false, id.as_ref()) {
                Ok(r) if r.ds.n_features == spec.inputs => (r.ds, r.ids, false),
                Ok(r) => bail!(
                    "{}: {} feature columns{}, but the model takes {} (and a label column may be added)",
                    r.ds.source,
                    r.ds.n_features,
                    if id.is_some() { " besides the id" } else { "" },
                    spec.inputs
                ),
                Err(e) => return Err(with.err().map_or(e.into(), Into::into)),
            },
        }
    };
    if ds.n_features != spec.inputs {
        bail!(
            "{}: {} features, but the model takes {}",
            ds.source,
            ds.n_features,
            spec.inputs
        );
    }
    if labelled && !spec.is_regression() {
        relabel_for(&mut ds, model.meta.labels.as_deref())?;
    }
    let names = model.meta.labels.as_deref();
    let z = crate::tools::apply::outputs(&model, &ds)?;
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut header = vec!["id".to_string(), "predicted".to_string()];
    let classes = crate::tools::apply::classes(spec);
    if !spec.is_regression() {
        header.extend((0..classes).map(|c| format!("p_{}", crate::tools::apply::class_name(names, c))));
    }
    if labelled {
        header.push(
            if spec.is_regression() {
                "target"
            } else {
                "label"
            }
            .to_string(),
        );
    }
    let csv_err = |e: ::csv::Error| anyhow::anyhow!("--out {}: {e}", a.out.display());
    w.write_record(&header).map_err(csv_err)?;
    let mut right = 0u64;
    for (i, row) in z.outer_iter().enumerate() {
        let zr = row.to_vec();
        let id = ids
            .as_ref()
            .and_then(|v| v.get(i).cloned())
            .unwrap_or_else(|| (i + 1).to_string());
        let mut rec = vec![id];
        if spec.is_regression() {
            rec.push(zr[0].to_string());
        } else {
            let c = crate::tools::apply::class_of(spec.kind, &zr);
            rec.push(crate::tools::apply::class_name(names, c));
            rec.extend(
                crate::tools::apply::probabilities(spec.kind, &zr)
                    .iter()
                    .map(|p| format!("{p:.6}")),
            );
            if labelled && ds.y[i] as usize == c {
                right += 1;
            }
        }
        if labelled {
            let y = ds.y[i];
            rec.push(if spec.is_regression() {
                y.to_string()
            } else {
                crate::tools::apply::class_name(names, y as usize)
            });
        }
        w.write_record(&rec).map_err(csv_err)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", a.out.display()))?;
    if to_stdout {
        std::io::stdout()
            .write_all(&bytes)
            .context("cannot write the predictions to stdout")?;
    } else {
        crate::store::atomic::write_atomic(&a.out, &bytes)?;
    }
    let mut line = format!(
        "dptrain: {} predictions{}",
        ds.n_samples,
        if to_stdout {
            String::new()
        } else {
            format!(" in {}", a.out.display())
        }
    );
    if labelled && !spec.is_regression() {
        line += &format!(
            "; accuracy {:.4} on the file's labels",
            right as f64 / ds.n_samples.max(1) as f64
        );
    }
    eprintln!("{line}");
    Ok(())
}

/// `dptrain plot METRICS --out PICTURE`.
pub fn run_plot(a: &PlotArgs) -> anyhow::Result<()> {
    crate::tools::plot::plot(&a.metrics, &a.out)?;
    println!("dptrain: wrote {}", a.out.display());
    Ok(())
}

/// `dptrain model show FILE`.
pub fn run_model(cmd: &ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Show { path } => {
            let m = crate::store::modelfile::load_usable(path)?;
            print!("{}", crate::tools::apply::show(&m, &path.display().to_string()));
            Ok(())
        }
    }
}

pub fn run_data(cmd: &DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Synth(s) => {
            let (f0, k0) = synth_defaults(s.kind.name()).unwrap_or((2, 2));
            let (features, classes) = (s.features.unwrap_or(f0), s.classes.unwrap_or(k0));
            if s.samples == 0 {
                bail!("--samples must be at least 1");
            }
            if s.kind != SynthKind::Seed && features == 0 {
                bail!("--features must be at least 1");
            }
            crate::limits::check_dataset("data synth", s.samples as u64, features as u64)?;
            if classes > crate::limits::MAX_CLASSES {
                bail!(
                    "--classes {} is more than the {} dptrain takes",
                    classes,
                    crate::limits::MAX_CLASSES
                );
            }
            let ds = match s.kind {
                SynthKind::Seed => synth::seed_example(s.samples, s.seed),
                SynthKind::Blobs => {
                    if classes < 1 {
                        bail!("--classes must be at least 1 for blobs");
                    }
                    synth::blobs(s.samples, features, classes, s.seed)
                }
                SynthKind::Random => synth::random(s.samples, features, classes, s.seed),
                SynthKind::Linear => {
                    if !(s.noise.is_finite() && s.noise >= 0.0) {
                        bail!("--noise must be ≥ 0");
                    }
                    synth::linear(s.samples, features, s.noise, s.seed).0
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
                            exchange: Default::default(),
                        };
                        rows.extend(crate::tools::bench::matmul_bench_workload(&cfg, comm)?);
                    }
                    rows
                }
                None => crate::tools::bench::matmul_bench_square(a.size, &precisions, a.gpu, a.iters)?,
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

/// A named workload and its first reference batch.
fn workload_and_batch(name: &str) -> anyhow::Result<(crate::tools::bench::Workload, usize)> {
    let w = crate::tools::bench::Workload::named(name)?;
    let b = match name {
        "seed-logreg" => 100,
        "mnist-mlp" => 1024,
        _ => 8192,
    };
    Ok((w, b))
}

fn run_step_bench(a: &StepBenchArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    use crate::tools::bench::Workload;
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

/// `train --config FILE.toml`: the file's keys become flags placed before the command line's own,
/// so that the command line overrides them (every train flag overrides an earlier use of itself).
/// Keys are flag names (`lr`, `batch-size` or `batch_size`); arrays join with commas; `true`
/// gives a switch, `false` leaves it off.
pub fn expand_config(args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let Some(sub) = args.iter().position(|a| a == "train") else {
        return Ok(args);
    };
    let mut path = None;
    for (i, a) in args.iter().enumerate().skip(sub + 1) {
        let s = a.to_string_lossy();
        if s == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
        } else if let Some(p) = s.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--config {}: cannot read", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow::anyhow!("--config {}: {}", path.display(), e.message())
    })?;
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    let cli = {
        use clap::CommandFactory;
        Cli::command()
    };
    let train = cli
        .find_subcommand("train")
        .ok_or_else(|| anyhow::anyhow!("no train command"))?;
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        check_config_entry(train, &path, &key, &value)?;
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "--config {}: {key} = {other}: expected a string, a number or a list of them",
                    path.display()
                ),
            })
        };
        match &value {
            toml::Value::Boolean(true) => flags.push(flag.into()),
            toml::Value::Boolean(false) => {}
            // an empty list is the flag's default (no values)
            toml::Value::Array(items) if items.is_empty() => {}
            toml::Value::Array(items) => {
                let parts = items
                    .iter()
                    .map(scalar)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                flags.push(format!("{flag}={}", parts.join(",")).into());
            }
            v => flags.push(format!("{flag}={}", scalar(v)?).into()),
        }
    }
    let mut out: Vec<std::ffi::OsString> = args[..=sub].to_vec();
    out.extend(flags);
    out.extend(args[sub + 1..].iter().cloned());
    Ok(out)
}

/// One `--config` entry checked against `train`'s flags, so that a mistake is one line naming the
/// file and the key rather than a command-line error for a flag nobody typed.
fn check_config_entry(
    train: &clap::Command,
    path: &Path,
    key: &str,
    value: &toml::Value,
) -> anyhow::Result<()> {
    let name = key.replace('_', "-");
    let file = path.display();
    if name == "config" {
        bail!("--config {file}: {key}: a config file cannot name another");
    }
    let Some(arg) = train
        .get_arguments()
        .find(|a| a.get_long() == Some(name.as_str()))
    else {
        let near = train
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(|l| (edit_distance(&name, l), l))
            .min()
            .filter(|(d, _)| *d <= 3)
            .map(|(_, l)| format!(" (did you mean {l}?)"))
            .unwrap_or_default();
        bail!("--config {file}: {key} is not a train flag{near}");
    };
    let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
    match (value, switch) {
        (toml::Value::Boolean(_), true) => return Ok(()),
        (_, true) => bail!("--config {file}: {key} = {value}: expected true or false"),
        (toml::Value::Boolean(_), false) => {
            bail!("--config {file}: {key} = {value}: expected a value, not true or false")
        }
        _ => {}
    }
    let text = match value {
        toml::Value::Array(items) if items.is_empty() => return Ok(()),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        toml::Value::String(t) => t.clone(),
        v => v.to_string(),
    };
    // the value through train's own parser, alone (with a stand-in for the required --data)
    let mut line = vec!["train".to_string()];
    if name != "data" {
        line.push("--data=-".into());
    }
    line.push(format!("--{name}={text}"));
    if let Err(e) = train.clone().try_get_matches_from(line) {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or_default();
        bail!(
            "--config {file}: {key} = {value}: {}",
            first.trim_start_matches("error: ")
        );
    }
    Ok(())
}

/// Levenshtein distance, for suggesting a flag.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Flags that name a run's outputs: written into its settings file as comments, so that the file
/// reruns the same training without writing over the first run's files.
const OUTPUT_KEYS: [&str; 5] = [
    "save",
    "save-best",
    "metrics-out",
    "tensorboard",
    "checkpoint-dir",
];

/// The resolved settings of a run as TOML, usable again as `--config` (outputs as comments).
pub fn settings_toml(a: &TrainArgs) -> anyhow::Result<String> {
    let mut table = toml::Table::try_from(a)?;
    let outputs: Vec<(String, toml::Value)> = OUTPUT_KEYS
        .iter()
        .filter_map(|k| table.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let mut text =
        String::from("# dptrain train settings: rerun with `dptrain train --config THIS_FILE`\n");
    text += &toml::to_string(&table)?;
    if !outputs.is_empty() {
        text +=
            "\n# the outputs of the run that wrote this file (choose your own when rerunning):\n";
        for (k, v) in outputs {
            text += &format!("# {k} = {v}\n");
        }
    }
    Ok(text)
}

/// `dptrain completions SHELL` and `dptrain man`: generated from the same definitions as the parser.
pub fn run_completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "dptrain", &mut std::io::stdout());
    Ok(())
}

pub fn run_man() -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}
