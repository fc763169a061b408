//! `dptrain train`: its flags ([`TrainArgs`]), their checks ([`check_run_args`]), and their
//! mapping onto the trainer's [`TrainConfig`] and the application's [`AppOptions`]; the
//! application itself (agreement, lock, outputs, loop, writes) is `train/app.rs`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::config_file::settings_toml;
use super::data::CsvArgs;
use crate::backend::Precision;
use crate::data::NormKind;
use crate::distributed::comm::Communicator;
use crate::distributed::exchange::config::ExchangeArgs;
use crate::model::{Activation, ModelKind};
use crate::optim::{OptimArgs, ScheduleKind};
use crate::train::app::{self, AppOptions, DataSource, SettingsFile};
use crate::train::autotune::AutotuneMode;
use crate::train::{
    CheckpointUnit, DeviceKind, NanPolicy, ResumeFrom, RunControl, ShardMode, TrainConfig,
};

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
    /// A network from a definition file (TOML: a list of [[layer]] tables; see the README's
    /// "Convolutional networks"): the model is then `custom`.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "model",
        help_heading = "Model"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<PathBuf>,
    /// Augment the training images of a convolutional model: crop:P (a random crop of the image
    /// padded by P pixels), flip (a horizontal flip with probability ½), or crop:4,flip. Drawn from
    /// (seed, step, sample): the same on any number of ranks and after a resume.
    #[arg(long, value_name = "SPEC", value_parser = parse_augment, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub augment: Option<crate::data::augment::Augment>,
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
    /// Under mpirun: SyncBatchNorm. Each BatchNorm's batch mean and variance are summed over all
    /// ranks at every forward (and its backward sums too), so N ranks with batch b normalise as one
    /// rank with batch N·b. Without it each rank normalises with its own batch (DDP's default).
    #[arg(long, help_heading = "Distributed")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sync_bn: bool,
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

fn parse_augment(s: &str) -> Result<crate::data::augment::Augment, String> {
    crate::data::augment::Augment::parse(s)
}

fn train_config(a: &TrainArgs) -> TrainConfig {
    TrainConfig {
        model: if a.arch.is_some() {
            ModelKind::Custom
        } else {
            a.model
        },
        arch: a.arch.clone(),
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
        sync_bn: a.sync_bn,
        augment: a.augment.unwrap_or_default(),
    }
}

/// The train flags the parser cannot check alone: checkpoint and recovery flags that cannot work
/// together, flags that need a validation set, the staleness momentum, the monitor, the progress
/// interval.
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

/// The application's options from the flags: data, outputs, checkpoints and recovery.
fn app_options(a: &TrainArgs) -> AppOptions {
    AppOptions {
        checked: check_run_args(a),
        data: DataSource {
            data: a.data.clone(),
            test_data: a.test_data.clone(),
            test_fraction: a.test_fraction,
            csv: a.csv.options(),
        },
        paths: run_paths(a),
        // the text only where a file is written: a value TOML cannot hold fails only those runs
        settings: settings_path(a).map(|path| SettingsFile {
            path,
            text: settings_toml(a),
        }),
        settings_json: serde_json::to_value(a).unwrap_or_default(),
        break_lock: a.break_lock,
        control: RunControl {
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
            allow_changed_data: a.resume_allow_changed_data,
            log_every: a.log_every,
            eval_every: a.eval_every,
            patience: a.early_stop_patience,
            monitor: a.monitor,
            ..RunControl::default()
        },
        autotune: a.autotune,
        metrics_out: a.metrics_out.clone(),
        tensorboard: a.tensorboard.clone(),
        save: a.save.clone(),
        save_best: a.save_best.clone(),
        trace: a.trace.clone(),
        progress_every: a.progress_every,
    }
}

/// `dptrain train`, on every rank.
pub fn run(a: &TrainArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    app::run(&train_config(a), app_options(a), comm)
}
