//! Checkpoints around the loop: where the run stands (`Position`), writing it, finding and
//! broadcasting the one to resume from, and what to do when the loss stops being finite.

use std::path::PathBuf;

use anyhow::Context;
use dptrain_kernels::reduce_stats::Totals;
use serde::Serialize;

use super::config::{ShardMode, TrainConfig};
use super::plan::StepPlan;
use super::setup::Setup;
use crate::backend::Backend;
use crate::distributed::comm::Communicator;
use crate::store::checkpoint;

/// What to do when the training loss stops being finite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop with an error naming the step.
    #[default]
    Stop,
    /// Go back to the newest checkpoint and lower the learning rate (up to --max-rollbacks times).
    Rollback,
}

/// Checkpoint counting unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointUnit {
    Step,
    #[default]
    Epoch,
}

/// Where to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// This checkpoint file.
    Path(PathBuf),
    /// The newest intact checkpoint in the checkpoint folder; a fresh start when there is none.
    Auto,
}

/// Checkpointing, resuming and failure handling around the training loop.
#[derive(Clone, Debug)]
pub struct RunControl {
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N units (0: only at the end).
    pub checkpoint_every: u64,
    pub checkpoint_unit: CheckpointUnit,
    /// Checkpoints kept in the folder.
    pub keep: usize,
    pub resume: Option<ResumeFrom>,
    pub on_nan: NanPolicy,
    pub max_rollbacks: u32,
    /// Learning-rate factor applied at each rollback.
    pub rollback_lr_factor: f64,
    /// The kernel choices the run uses, recorded in its checkpoints so that a resume runs the same.
    pub kernels: crate::backend::KernelChoices,
    /// Resume from a checkpoint trained on other data (`--resume-allow-changed-data`).
    pub allow_changed_data: bool,
    /// A `"kind":"step"` record every N steps (0: none).
    pub log_every: u64,
    /// Evaluate the validation set every N steps as well as at each epoch's end (0: epochs only).
    pub eval_every: u64,
    /// Stop after this many evaluations without an improvement (0: never).
    pub patience: u64,
    pub monitor: super::watch::Monitor,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            checkpoint_dir: None,
            checkpoint_every: 0,
            checkpoint_unit: CheckpointUnit::Epoch,
            keep: 3,
            resume: None,
            on_nan: NanPolicy::Stop,
            max_rollbacks: 3,
            rollback_lr_factor: 0.5,
            kernels: Default::default(),
            allow_changed_data: false,
            log_every: 0,
            eval_every: 0,
            patience: 0,
            monitor: super::watch::Monitor::ValLoss,
        }
    }
}

/// Where the run stands: what a checkpoint records.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Position {
    pub step: u64,
    pub epochs_done: u64,
    pub steps_in_epoch: u64,
    pub totals: Totals,
    pub lr_scale: f64,
    /// Early stopping's record of the validation evaluations.
    pub watch: super::watch::WatchState,
}

/// What this run's checkpoints hold and what a checkpoint must match to be resumed.
pub(super) struct Checkpoints<'a> {
    pub ctl: &'a RunControl,
    pub setup: &'a Setup,
    /// The settings that must match (`setup::resume_settings`), and the values of settings that
    /// older checkpoints predate.
    pub settings: serde_json::Value,
    pub defaults: serde_json::Value,
    pub optimizer: &'static str,
    pub state_names: &'static [&'static str],
    pub global_shard: bool,
    /// The kernel choices written into checkpoints (a resumed run takes the checkpoint's).
    pub kernels: crate::backend::KernelChoices,
}

impl Checkpoints<'_> {
    /// Rank 0 reads a checkpoint (or finds the newest) and checks it against this run; every rank
    /// gets it; errors reach every rank.
    pub fn fetch(
        &self,
        comm: &dyn Communicator,
        from: &ResumeFrom,
    ) -> anyhow::Result<Option<checkpoint::Checkpoint>> {
        let expect = checkpoint::Expect {
            spec: &self.setup.spec,
            optimizer: self.optimizer,
            state_names: self.state_names,
            settings: &self.settings,
            defaults: &self.defaults,
            world_size: comm.size(),
            global_shard: self.global_shard,
            data: &self.setup.data,
            norm: &self.setup.norm,
            allow_changed_data: self.ctl.allow_changed_data,
        };
        let found: anyhow::Result<Option<(PathBuf, checkpoint::Checkpoint)>> = if comm.is_root() {
            (|| {
                let found = match from {
                    ResumeFrom::Path(p) => Some((p.clone(), checkpoint::load(p)?)),
                    ResumeFrom::Auto => {
                        let dir = self
                            .ctl
                            .checkpoint_dir
                            .as_deref()
                            .context("--resume auto needs --checkpoint-dir")?;
                        checkpoint::latest(dir)?
                    }
                };
                if let Some((p, ck)) = &found {
                    checkpoint::compatible(p, ck, &expect)?;
                }
                Ok(found)
            })()
        } else {
            Ok(None)
        };
        let found = crate::distributed::agree::agree(comm, found)?;
        // rank 0's state text to everyone, then the tensors
        let text = found
            .as_ref()
            .map(|(_, ck)| serde_json::to_string(&ck.state).unwrap_or_default())
            .unwrap_or_default();
        let all = comm.all_gather_bytes(text.as_bytes())?;
        if all[0].is_empty() {
            return Ok(None);
        }
        let state: checkpoint::State = serde_json::from_slice(&all[0])?;
        let n = state.spec.layout().total;
        // the optimizer's state covers the trained values only (a network's buffers follow them)
        let trained = state.spec.trainable();
        // the names and lengths of the exchange's state, then each tensor; a rank keeps the
        // shared ones and its own ("rank{r}.")
        let index = found
            .as_ref()
            .map(|(_, ck)| {
                ck.extra
                    .iter()
                    .map(|(k, v)| format!("{k}:{}", v.len()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let index = comm.all_gather_bytes(index.as_bytes())?.swap_remove(0);
        let index: Vec<(String, usize)> = String::from_utf8_lossy(&index)
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (k, n) = e.rsplit_once(':').context("checkpoint state index")?;
                Ok((k.to_string(), n.parse::<usize>()?))
            })
            .collect::<anyhow::Result<_>>()?;
        let other_world = state.world_size != comm.size();
        if other_world
            && index
                .iter()
                .any(|(k, _)| k.starts_with("rank") && k.ends_with(".params"))
        {
            // every rank sees the same index: an agreed error, said once
            return Err(crate::distributed::agree::Agreed(format!(
                "this checkpoint holds each of its {} ranks' own parameters (--sync params); resume it with {} ranks",
                state.world_size, state.world_size
            ))
            .into());
        }
        if other_world && index.iter().any(|(k, _)| k.starts_with("rank")) && comm.is_root() {
            eprintln!(
                "dptrain: warning: the checkpoint's per-rank exchange state (error-feedback residuals) is for {} ranks; with {} they restart at zero",
                state.world_size,
                comm.size()
            );
        }
        let mine = format!("rank{}.", comm.rank());
        let mut theirs = found
            .as_ref()
            .map(|(_, ck)| ck.extra.clone())
            .unwrap_or_default();
        let mut extra = Vec::new();
        for (i, (k, n)) in index.iter().enumerate() {
            let mut v = match theirs.get_mut(i) {
                Some((_, v)) => std::mem::take(v),
                None => vec![0.0; *n],
            };
            comm.broadcast_f32(&mut v)?;
            if !k.starts_with("rank") || (!other_world && k.starts_with(&mine)) {
                extra.push((k.clone(), v));
            }
        }
        drop(theirs);
        let (mut params, mut optim) = match found {
            Some((path, ck)) => {
                if comm.is_root() {
                    println!(
                        "dptrain: resuming from {} (step {}, epoch {})",
                        path.display(),
                        ck.state.step,
                        ck.state.epochs_done + 1
                    );
                }
                (ck.params, ck.optim)
            }
            // rank 0 checked that its tensors are the ones this run's optimizer names
            None => (
                vec![0.0; n],
                self.state_names
                    .iter()
                    .map(|k| (k.to_string(), vec![0.0; trained]))
                    .collect(),
            ),
        };
        comm.broadcast_f32(&mut params)?;
        for (_, v) in optim.iter_mut() {
            comm.broadcast_f32(v)?;
        }
        Ok(Some(checkpoint::Checkpoint {
            state,
            params,
            optim,
            extra,
        }))
    }

    /// Rank 0 writes the checkpoint for `pos` (parameters and optimizer state as the backend holds
    /// them) and returns its path.
    pub fn write(
        &self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        pos: &Position,
        plan: &StepPlan,
        extra: Vec<(String, Vec<f32>)>,
    ) -> anyhow::Result<Option<PathBuf>> {
        let Some(dir) = &self.ctl.checkpoint_dir else {
            return Ok(None);
        };
        if !comm.is_root() {
            return Ok(None);
        }
        let samples_in_epoch: u64 = (0..pos.steps_in_epoch)
            .map(|s| plan.global_rows(s) as u64)
            .sum();
        let ck = checkpoint::Checkpoint {
            state: checkpoint::State {
                step: pos.step,
                epochs_done: pos.epochs_done,
                samples_in_epoch,
                steps_in_epoch: pos.steps_in_epoch,
                partial_loss_sum: pos.totals.loss_sum,
                partial_correct: pos.totals.correct,
                partial_count: pos.totals.count,
                lr_scale: pos.lr_scale,
                optimizer: self.optimizer.to_string(),
                kernels: self.kernels.clone(),
                data: Some(self.setup.data.clone()),
                world_size: comm.size(),
                settings: self.settings.clone(),
                spec: self.setup.spec.clone(),
                norm: self.setup.norm.clone(),
                watch: pos.watch,
                labels: self.setup.labels.clone(),
            },
            params: backend.params()?,
            optim: backend.optim_state()?,
            extra,
        };
        let path = checkpoint::save(dir, &ck, self.ctl.keep)?;
        tracing::info!("checkpoint {}", path.display());
        Ok(Some(path))
    }
}

/// The position a checkpoint records, in this run's steps. With another world size (global
/// sharding) the global batch differs: the run restarts at the first batch boundary of this run
/// at or after the samples already seen in the epoch.
pub(super) fn position_of(
    st: &checkpoint::State,
    plan: &StepPlan,
    cfg: &TrainConfig,
    ranks: usize,
) -> Position {
    let steps_in_epoch = if st.world_size == ranks || cfg.shard == ShardMode::Split {
        st.steps_in_epoch
    } else {
        st.samples_in_epoch
            .div_ceil((cfg.rows_per_step() * ranks) as u64)
    };
    let (epochs_done, steps_in_epoch) = if steps_in_epoch >= plan.steps_per_epoch {
        (st.epochs_done + 1, 0)
    } else {
        (st.epochs_done, steps_in_epoch)
    };
    Position {
        step: st.step,
        epochs_done,
        steps_in_epoch,
        totals: Totals {
            loss_sum: st.partial_loss_sum,
            correct: st.partial_correct,
            count: st.partial_count,
        },
        lr_scale: st.lr_scale,
        watch: st.watch,
    }
}
