//! The exchange's own settings: what crosses ranks (gradients or parameters), in what buckets,
//! in what form (f32, a 16-bit wire, PowerSGD), and whether the next step waits for it. The
//! trainer builds one from its flags; checkpoints compare it with the rest of the run's settings.

use anyhow::ensure;
use serde::Serialize;

use crate::distributed::codec::WireFormat;

/// The default gradient bucket: large enough that an allreduce's latency is small beside its
/// transfer, well below the 16 MiB above which Open MPI's default algorithm was measured to drop
/// to a third of the ring's bandwidth on the H200 machine (docs/PERF.md).
pub const DEFAULT_BUCKET_MB: f64 = 4.0;

/// What ranks exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Allreduce the gradients every step (synchronous data-parallel SGD).
    Grads,
    /// Local SGD: `--sync-every` local steps, then θ = Σ nᵢθᵢ / Σ nᵢ weighted by samples seen.
    Params,
}

/// Gradient compression between ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressKind {
    /// Every gradient value travels (in the --grad-wire format).
    #[default]
    None,
    /// PowerSGD (Vogels et al., 2019): each weight matrix as a rank-R product, with error feedback.
    Powersgd,
}

/// Everything that decides how the exchange runs. Serialized flat into the run's settings (the
/// names are the settings records' keys, so older checkpoints still match).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExchangeConfig {
    pub sync: SyncMode,
    /// Local steps between parameter averages for `SyncMode::Params`.
    pub sync_every: u64,
    /// Target size of a gradient bucket in MiB (0: one bucket, no overlap with backward).
    pub bucket_mb: f64,
    /// How gradients travel between ranks: f32, or 16 bits with error feedback.
    pub grad_wire: WireFormat,
    /// Gradient compression: none, or PowerSGD of rank `powersgd_rank` after `powersgd_warmup`
    /// steps of plain allreduce.
    pub compress: CompressKind,
    pub powersgd_rank: usize,
    pub powersgd_warmup: u64,
    /// `--staleness 1`: each step applies the previous step's summed gradient while its own sums
    /// travel (absent from the settings records when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub staleness: u64,
    /// `--async-average` (with `--sync params`): each round's parameter average travels while the
    /// ranks take the next round's local steps.
    #[serde(skip_serializing_if = "is_false")]
    pub async_average: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl Default for ExchangeConfig {
    /// The CLI's defaults: synchronous f32 gradients in 4 MiB buckets.
    fn default() -> Self {
        Self {
            sync: SyncMode::Grads,
            sync_every: 1,
            bucket_mb: DEFAULT_BUCKET_MB,
            grad_wire: WireFormat::F32,
            compress: CompressKind::None,
            powersgd_rank: 4,
            powersgd_warmup: 100,
            staleness: 0,
            async_average: false,
        }
    }
}

impl ExchangeConfig {
    /// `--bucket-mb` in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1u64 << 20) as f64) as usize
    }

    /// Whether gradients travel compressed (a 16-bit wire or PowerSGD).
    pub fn compressed(&self) -> bool {
        self.compress != CompressKind::None || self.grad_wire != WireFormat::F32
    }

    /// Refuse settings that cannot run, each with a one-line reason naming the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.sync_every >= 1, "--sync-every must be at least 1");
        ensure!(
            self.bucket_mb.is_finite() && (0.0..=4096.0).contains(&self.bucket_mb),
            "--bucket-mb must be between 0 and 4096 (got {})",
            self.bucket_mb
        );
        ensure!(
            self.powersgd_rank >= 1,
            "--powersgd-rank must be at least 1"
        );
        ensure!(
            !(self.compress == CompressKind::Powersgd && self.grad_wire != WireFormat::F32),
            "--compress powersgd sends its factors in f32; leave --grad-wire at f32"
        );
        ensure!(
            !self.compressed() || self.sync == SyncMode::Grads,
            "--grad-wire and --compress apply to --sync grads"
        );
        ensure!(
            self.staleness <= 1,
            "--staleness must be 0 (synchronous) or 1 (each step applies the previous step's gradient); got {}",
            self.staleness
        );
        if self.staleness == 1 {
            ensure!(
                self.sync == SyncMode::Grads,
                "--staleness 1 delays the gradient exchange: it needs --sync grads (for --sync params use --async-average)"
            );
            ensure!(
                !self.compressed(),
                "--staleness 1 does not combine with --grad-wire or --compress yet"
            );
        }
        ensure!(
            !self.async_average || self.sync == SyncMode::Params,
            "--async-average overlaps parameter averaging: it needs --sync params (for --sync grads use --staleness 1)"
        );
        Ok(())
    }
}

/// The exchange's flags, flattened into `train` and `bench` alike (as `OptimArgs` is).
#[derive(clap::Args, Clone, Debug, Serialize)]
#[command(next_help_heading = "Distributed")]
pub struct ExchangeArgs {
    /// Under mpirun: allreduce gradients every step, or average parameters every --sync-every steps.
    #[arg(long, value_enum, default_value = "grads")]
    pub sync: SyncMode,
    /// Local steps between parameter averages with --sync params.
    #[arg(long, default_value_t = 1)]
    pub sync_every: u64,
    /// Target size of a gradient bucket in MiB: buckets of whole layers, last layers first, are
    /// summed over the ranks while backward goes on (0: one bucket after backward).
    #[arg(long, default_value_t = DEFAULT_BUCKET_MB)]
    pub bucket_mb: f64,
    /// How gradients travel between ranks: f32, or bf16/f16 (half the bytes) with error feedback,
    /// summed in f32 at each segment's owner.
    #[arg(long, value_enum, default_value = "f32")]
    pub grad_wire: WireFormat,
    /// Gradient compression: none, or powersgd (each weight matrix sent as a rank-R product, with
    /// error feedback, after --powersgd-warmup steps of plain allreduce).
    #[arg(long, value_enum, default_value = "none")]
    pub compress: CompressKind,
    /// The rank R of PowerSGD's factors.
    #[arg(long, default_value_t = 4)]
    pub powersgd_rank: usize,
    /// Steps of plain allreduce before PowerSGD starts [default: 100 in train, 0 in bench].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub powersgd_warmup: Option<u64>,
    /// 1: each step applies the previous step's summed gradient while its own gradient's sums
    /// travel (one-step-delayed SGD; also with one rank); 0: synchronous.
    #[arg(long, default_value_t = 0)]
    pub staleness: u64,
    /// The momentum to use with --staleness 1 instead of --momentum (a delay acts like extra
    /// momentum; see the README for measured values).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staleness_momentum: Option<f64>,
    /// With --sync params: compute each round's parameter average in the background while the
    /// ranks take the next --sync-every local steps, then apply it as a correction.
    #[arg(long)]
    pub async_average: bool,
}

impl ExchangeArgs {
    /// The settings these flags give; `powersgd_warmup` when the flag is absent.
    pub fn config(&self, powersgd_warmup: u64) -> ExchangeConfig {
        ExchangeConfig {
            sync: self.sync,
            sync_every: self.sync_every,
            bucket_mb: self.bucket_mb,
            grad_wire: self.grad_wire,
            compress: self.compress,
            powersgd_rank: self.powersgd_rank,
            powersgd_warmup: self.powersgd_warmup.unwrap_or(powersgd_warmup),
            staleness: self.staleness,
            async_average: self.async_average,
        }
    }

    /// `--staleness-momentum`, when it applies (with `--staleness 1`).
    pub fn momentum(&self) -> Option<f64> {
        self.staleness_momentum.filter(|_| self.staleness == 1)
    }
}
