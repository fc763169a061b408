//! Checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint is a safetensors file with flat f32 tensors: `params`, and the optimizer's state
//! tensors under their own names (`optim.momentum_buffer` for SGD, `optim.exp_avg` and
//! `optim.exp_avg_sq` for Adam), stored without knowing which optimizer made them. Metadata:
//! `dptrain.format`, `dptrain.state` (JSON: position in the run and in the epoch's data order,
//! partial epoch totals, the optimizer's name, the settings that must match on resume, world size,
//! model spec, normaliser), `dptrain.optim` (the state tensors' names, in checksum order) and
//! `dptrain.checksum` (CRC-32 of the state text and every tensor). Files of the first format
//! (`params` and `velocity`, always SGD) are still read: their velocity is SGD's momentum buffer.
//! The epoch's order is derived from (seed, epoch, rank), so the seed and position are the whole RNG
//! state. Files are written atomically (temporary file, fsync, rename) as `ckpt-<step>.safetensors`,
//! and only the newest K are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::data::Normalizer;
use crate::model::ModelSpec;
use crate::store::atomic::write_atomic;

// The formats this build reads (`dptrain.format`). It writes two of them: FORMAT_2 for a run with
// no exchange state, FORMAT_3 for one with some, so that a checkpoint an older build could read
// still says format 2; FORMAT_1 is read only.

/// The first format: SGD only, its momentum buffers stored as `velocity`. Read, never written.
const FORMAT_1: &str = "dptrain-checkpoint-1";
/// Any optimizer's state by name: what a checkpoint without exchange state is written as.
pub const FORMAT_2: &str = "dptrain-checkpoint-2";
/// Format 2 with the exchange's state (`dptrain.extra`): written only when there is some, so that
/// older builds refuse such a file by its format instead of calling it damaged.
pub const FORMAT_3: &str = "dptrain-checkpoint-3";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: cannot read: {msg}")]
    Read { path: String, msg: String },
    #[error("{path}: cannot write: {msg}")]
    Write { path: String, msg: String },
    #[error("{path}: not a dptrain checkpoint: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: checkpoint is damaged: {msg}")]
    Damaged { path: String, msg: String },
    #[error("{path}: checkpoint does not fit this run: {msg}")]
    Mismatch { path: String, msg: String },
}

/// Where the run was and what it was, as JSON in the file's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Optimiser steps taken.
    pub step: u64,
    /// Epochs finished.
    pub epochs_done: u64,
    /// Samples of the next epoch's order already trained on (0 at an epoch boundary).
    pub samples_in_epoch: u64,
    /// Steps of the next epoch already taken.
    pub steps_in_epoch: u64,
    /// Training totals of the epoch in progress (loss sum, correct, count).
    pub partial_loss_sum: f64,
    pub partial_correct: u64,
    pub partial_count: u64,
    /// Multiplier on the learning rate from NaN rollbacks (1 when none).
    pub lr_scale: f64,
    /// The optimizer whose state the file holds (files of the first format: SGD).
    #[serde(default = "sgd_name")]
    pub optimizer: String,
    /// The kernel each matrix product ran (product → choice), so that a resume runs the same ones.
    #[serde(default)]
    pub kernels: std::collections::BTreeMap<String, String>,
    /// The training set it was trained on (absent in checkpoints of older builds).
    #[serde(default)]
    pub data: Option<crate::data::fingerprint::DataFingerprint>,
    pub world_size: usize,
    /// The settings that must match for an exact resume (see `compatible`).
    pub settings: serde_json::Value,
    pub spec: ModelSpec,
    pub norm: Normalizer,
    /// Early stopping's best validation value and evaluations since (absent: none yet).
    #[serde(default)]
    pub watch: WatchState,
    /// Class names when the training labels were text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

fn sgd_name() -> String {
    "sgd".into()
}

/// A checkpoint read back and verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub state: State,
    pub params: Vec<f32>,
    /// The optimizer's state tensors by name, in the optimizer's order.
    pub optim: Vec<(String, Vec<f32>)>,
    /// The exchange's state by name, any length (`dptrain.extra`; absent in older files): the
    /// gradient sum in flight with `--staleness 1`, each rank's own parameters and optimizer
    /// state under `--sync params` ("rank{r}.params", "rank{r}.optim.{name}", ...).
    pub extra: Vec<(String, Vec<f32>)>,
}

/// CRC-32 of the state text and the tensors, in order.
fn checksum<'a>(state: &str, tensors: impl IntoIterator<Item = &'a [f32]>) -> String {
    let mut h = crc32fast::Hasher::new();
    h.update(state.as_bytes());
    for t in tensors {
        h.update(bytemuck::cast_slice(t));
    }
    format!("{:08x}", h.finalize())
}

/// The file name of the checkpoint after `step` steps.
pub fn file_name(step: u64) -> String {
    format!("ckpt-{step:012}.safetensors")
}

/// Write a checkpoint into `dir` atomically, then remove all but the newest `keep`.
pub fn save(dir: &Path, ck: &Checkpoint, keep: usize) -> Result<PathBuf, CheckpointError> {
    let werr = |p: &Path, msg: String| CheckpointError::Write {
        path: p.display().to_string(),
        msg,
    };
    std::fs::create_dir_all(dir).map_err(|e| werr(dir, e.to_string()))?;
    let path = dir.join(file_name(ck.state.step));
    let state = serde_json::to_string(&ck.state).map_err(|e| werr(&path, e.to_string()))?;
    let sum = checksum(
        &state,
        std::iter::once(ck.params.as_slice())
            .chain(ck.optim.iter().map(|(_, v)| v.as_slice()))
            .chain(ck.extra.iter().map(|(_, v)| v.as_slice())),
    );
    let names: Vec<&str> = ck.optim.iter().map(|(n, _)| n.as_str()).collect();
    let extra_names: Vec<&str> = ck.extra.iter().map(|(n, _)| n.as_str()).collect();
    let tensors = std::iter::once(("params".to_string(), &ck.params))
        .chain(ck.optim.iter().map(|(n, v)| (format!("optim.{n}"), v)))
        .chain(ck.extra.iter().map(|(n, v)| (format!("extra.{n}"), v)))
        .map(|(name, v)| {
            TensorView::new(Dtype::F32, vec![v.len()], bytemuck::cast_slice(v))
                .map(|view| (name, view))
                .map_err(|e| werr(&path, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut meta = HashMap::from([
        (
            "dptrain.format".to_string(),
            if extra_names.is_empty() {
                FORMAT_2
            } else {
                FORMAT_3
            }
            .to_string(),
        ),
        ("dptrain.state".to_string(), state),
        ("dptrain.optim".to_string(), names.join(",")),
        ("dptrain.checksum".to_string(), sum),
    ]);
    if !extra_names.is_empty() {
        meta.insert("dptrain.extra".to_string(), extra_names.join(","));
    }
    let bytes =
        safetensors::serialize(tensors, Some(meta)).map_err(|e| werr(&path, e.to_string()))?;
    write_atomic(&path, &bytes).map_err(|e| werr(&path, e.to_string()))?;
    prune(dir, keep);
    Ok(path)
}

/// Checkpoint files in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".safetensors"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn prune(dir: &Path, keep: usize) {
    // temporary files of saves that a crash interrupted (write_atomic names them .NAME.tmpPID)
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".ckpt-") && name.contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let all = list(dir);
    if all.len() > keep.max(1) {
        for old in &all[..all.len() - keep.max(1)] {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::warn!("{}: cannot remove old checkpoint: {e}", old.display());
            }
        }
    }
}

/// Read and verify a checkpoint file.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Read {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    parse(&bytes, &p)
}

/// Verify a checkpoint held in memory (`name` for messages).
pub fn parse(bytes: &[u8], name: &str) -> Result<Checkpoint, CheckpointError> {
    let p = name.to_string();
    let format = |msg: String| CheckpointError::Format {
        path: p.clone(),
        msg,
    };
    let damaged = |msg: String| CheckpointError::Damaged {
        path: p.clone(),
        msg,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let first_format = match meta.get("dptrain.format").map(String::as_str) {
        Some(FORMAT_2) | Some(FORMAT_3) => false,
        Some(FORMAT_1) => true,
        Some(other) => {
            return Err(format(format!(
                "format {other:?}; this dptrain reads {FORMAT_2:?}, {FORMAT_3:?} and {FORMAT_1:?}"
            )));
        }
        None => return Err(format("no dptrain.format in its metadata".into())),
    };
    let state_text = meta
        .get("dptrain.state")
        .ok_or_else(|| format("no dptrain.state in its metadata".into()))?;
    let sum = meta
        .get("dptrain.checksum")
        .ok_or_else(|| format("no dptrain.checksum in its metadata".into()))?;
    let tensor = |name: &str| -> Result<Vec<f32>, CheckpointError> {
        let v = st
            .tensor(name)
            .map_err(|_| format(format!("no tensor {name:?}")))?;
        if v.dtype() != Dtype::F32 || v.shape().len() != 1 {
            return Err(format(format!(
                "tensor {name:?} is {:?} {:?}, expected a flat F32 vector",
                v.dtype(),
                v.shape()
            )));
        }
        Ok(v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let params = tensor("params")?;
    let optim: Vec<(String, Vec<f32>)> = if first_format {
        vec![("momentum_buffer".to_string(), tensor("velocity")?)]
    } else {
        let names = meta
            .get("dptrain.optim")
            .ok_or_else(|| format("no dptrain.optim in its metadata".into()))?;
        names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| Ok((n.to_string(), tensor(&format!("optim.{n}"))?)))
            .collect::<Result<_, CheckpointError>>()?
    };
    let extra: Vec<(String, Vec<f32>)> = match meta.get("dptrain.extra") {
        Some(names) if !first_format => names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| Ok((n.to_string(), tensor(&format!("extra.{n}"))?)))
            .collect::<Result<_, CheckpointError>>()?,
        _ => Vec::new(),
    };
    let want = checksum(
        state_text,
        std::iter::once(params.as_slice())
            .chain(optim.iter().map(|(_, v)| v.as_slice()))
            .chain(extra.iter().map(|(_, v)| v.as_slice())),
    );
    if *sum != want {
        return Err(damaged(format!("checksum {sum} recorded, {want} computed")));
    }
    let state: State =
        serde_json::from_str(state_text).map_err(|e| format(format!("bad dptrain.state: {e}")))?;
    // the optimizer's state covers the trained values only (a network's buffers follow them)
    let (n, trained) = (state.spec.layout().total, state.spec.trainable());
    if let Some((name, v, want)) = std::iter::once(("params", &params, n))
        .chain(optim.iter().map(|(k, v)| (k.as_str(), v, trained)))
        .find(|(_, v, want)| v.len() != *want)
    {
        return Err(damaged(format!(
            "{name} holds {} values, the model has {want}",
            v.len()
        )));
    }
    Ok(Checkpoint {
        state,
        params,
        optim,
        extra,
    })
}

/// The newest checkpoint in `dir` that verifies; damaged newer ones are skipped with a warning.
/// Ok(None) when the folder holds no checkpoint at all.
pub fn latest(dir: &Path) -> Result<Option<(PathBuf, Checkpoint)>, CheckpointError> {
    let all = list(dir);
    let mut last_err = None;
    for path in all.iter().rev() {
        match load(path) {
            Ok(ck) => return Ok(Some((path.clone(), ck))),
            Err(e) => {
                tracing::warn!("skipping {e}");
                eprintln!("dptrain: skipping {e}");
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// What a run expects of the checkpoint it resumes.
pub struct Expect<'a> {
    pub spec: &'a ModelSpec,
    /// The optimizer's name and the state tensors it needs.
    pub optimizer: &'a str,
    pub state_names: &'a [&'a str],
    /// The settings that must match (see `train::setup::resume_settings`).
    pub settings: &'a serde_json::Value,
    /// What a setting that older checkpoints lack is taken to have been (its value before the
    /// setting existed).
    pub defaults: &'a serde_json::Value,
    pub world_size: usize,
    /// Global sharding lets the world size change.
    pub global_shard: bool,
    /// This run's training data and normaliser, which a checkpoint must share unless
    /// `allow_changed_data`.
    pub data: &'a crate::data::fingerprint::DataFingerprint,
    pub norm: &'a Normalizer,
    pub allow_changed_data: bool,
}

/// Check that a checkpoint can continue this run: same model, optimizer and settings (the run's
/// length may differ; the world size may differ in global sharding mode).
pub fn compatible(path: &Path, ck: &Checkpoint, want: &Expect<'_>) -> Result<(), CheckpointError> {
    let mismatch = |msg: String| CheckpointError::Mismatch {
        path: path.display().to_string(),
        msg,
    };
    let names: Vec<&str> = ck.optim.iter().map(|(n, _)| n.as_str()).collect();
    if ck.state.optimizer != want.optimizer || names != want.state_names {
        return Err(mismatch(format!(
            "it holds the state of optimizer {} ({}); this run uses {} (resume with --optimizer {})",
            ck.state.optimizer,
            names.join(", "),
            want.optimizer,
            ck.state.optimizer
        )));
    }
    let (ck, spec, settings, world_size, global_shard) = (
        &ck.state,
        want.spec,
        want.settings,
        want.world_size,
        want.global_shard,
    );
    if ck.spec != *spec {
        return Err(mismatch(format!(
            "it holds a {:?} model of widths {:?}, this run has {:?} {:?}",
            ck.spec.kind,
            ck.spec.widths(),
            spec.kind,
            spec.widths()
        )));
    }
    if !want.allow_changed_data {
        let changed = match &ck.data {
            Some(d) if d != want.data => Some(
                if (d.samples, d.features) != (want.data.samples, want.data.features) {
                    format!(
                        "it was trained on {} samples × {} features, this run has {} × {}",
                        d.samples, d.features, want.data.samples, want.data.features
                    )
                } else {
                    "it was trained on data of the same shape but other contents".to_string()
                },
            ),
            _ if ck.norm != *want.norm => {
                Some("its normaliser (fitted on its training data) differs from this run's".into())
            }
            _ => None,
        };
        if let Some(what) = changed {
            return Err(mismatch(format!(
                "the training data changed: {what}; pass --resume-allow-changed-data to continue on this data anyway"
            )));
        }
    }
    if ck.world_size != world_size && !global_shard {
        return Err(mismatch(format!(
            "written by {} ranks, resumed by {world_size}; only --shard global may change the world size",
            ck.world_size
        )));
    }
    if let (Some(a), Some(b)) = (ck.settings.as_object(), settings.as_object()) {
        let mut diffs = Vec::new();
        for (k, v) in b {
            let old = a
                .get(k)
                .or_else(|| want.defaults.get(k))
                .unwrap_or(&serde_json::Value::Null);
            if old != v {
                diffs.push(format!("{k}: {old} then, {v} now"));
            }
        }
        if !diffs.is_empty() {
            return Err(mismatch(diffs.join("; ")));
        }
    }
    Ok(())
}

/// The best watched value so far and the evaluations since; checkpoints keep it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchState {
    pub best: Option<f64>,
    pub best_step: u64,
    pub best_epoch: u64,
    /// Evaluations since the best.
    pub since_best: u64,
}

impl WatchState {
    /// Take one evaluation of a metric (`higher_is_better`: accuracy; else a loss or an error); true when it beats every earlier one (strictly; a NaN never does).
    pub fn observe(&mut self, higher_is_better: bool, value: f64, step: u64, epoch: u64) -> bool {
        let better = match self.best {
            _ if value.is_nan() => false,
            None => true,
            Some(b) if higher_is_better => value > b,
            Some(b) => value < b,
        };
        if better {
            *self = WatchState {
                best: Some(value),
                best_step: step,
                best_epoch: epoch,
                since_best: 0,
            };
        } else {
            self.since_best += 1;
        }
        better
    }

    /// Whether `patience` evaluations (0: never) have gone by without an improvement.
    pub fn exhausted(&self, patience: u64) -> bool {
        patience > 0 && self.since_best >= patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, ModelKind};

    fn sample(step: u64) -> Checkpoint {
        let spec = ModelSpec::new(ModelKind::Mlp, 3, 2, vec![4], Activation::Relu).unwrap();
        let n = spec.layout().total;
        Checkpoint {
            state: State {
                step,
                epochs_done: 1,
                samples_in_epoch: 10,
                steps_in_epoch: 2,
                partial_loss_sum: 1.5,
                partial_correct: 7,
                partial_count: 10,
                lr_scale: 1.0,
                optimizer: "adam".into(),
                kernels: Default::default(),
                data: Some(crate::data::fingerprint::DataFingerprint {
                    samples: 10,
                    features: 3,
                    features_crc: "0badcafe".into(),
                    targets_crc: "12345678".into(),
                }),
                world_size: 1,
                settings: serde_json::json!({"lr": 0.1, "seed": 3}),
                norm: Normalizer::identity(3),
                spec: spec.clone(),
                watch: WatchState {
                    best: Some(0.25),
                    best_step: 7,
                    best_epoch: 1,
                    since_best: 2,
                },
                labels: Some(vec!["cat".into(), "dog".into()]),
            },
            params: spec.init(1),
            optim: vec![
                ("exp_avg".into(), (0..n).map(|i| i as f32 * 0.5).collect()),
                (
                    "exp_avg_sq".into(),
                    (0..n).map(|i| i as f32 * 0.25).collect(),
                ),
            ],
            extra: vec![("exchange.inflight".into(), vec![1.5, -2.0, 3.25])],
        }
    }

    fn expect<'a>(ck: &'a Checkpoint, defaults: &'a serde_json::Value) -> Expect<'a> {
        Expect {
            spec: &ck.state.spec,
            optimizer: "adam",
            state_names: &["exp_avg", "exp_avg_sq"],
            settings: &ck.state.settings,
            defaults,
            world_size: 1,
            global_shard: true,
            data: ck.state.data.as_ref().expect("sample has data"),
            norm: &ck.state.norm,
            allow_changed_data: false,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_load_round_trips_and_keeps_the_newest_k() {
        let d = dir("keep");
        for step in [5, 10, 15, 20] {
            save(&d, &sample(step), 2).unwrap();
        }
        let files: Vec<String> = list(&d)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, vec![file_name(15), file_name(20)]);
        let (path, ck) = latest(&d).unwrap().unwrap();
        assert_eq!(path, d.join(file_name(20)));
        assert_eq!(ck, sample(20));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_checkpoint_of_the_first_format_is_read_as_sgd() {
        // written as the builds before named optimizer state wrote it: params, velocity, and a
        // checksum over the state text and both
        let ck = sample(7);
        let mut state = ck.state.clone();
        state.optimizer = "sgd".into();
        let mut text = serde_json::to_value(&state).unwrap();
        text.as_object_mut().unwrap().remove("optimizer");
        let text = text.to_string();
        let velocity: Vec<f32> = (0..ck.params.len()).map(|i| i as f32).collect();
        let sum = checksum(&text, [ck.params.as_slice(), velocity.as_slice()]);
        let views = vec![
            (
                "params".to_string(),
                TensorView::new(
                    Dtype::F32,
                    vec![ck.params.len()],
                    bytemuck::cast_slice(&ck.params),
                )
                .unwrap(),
            ),
            (
                "velocity".to_string(),
                TensorView::new(
                    Dtype::F32,
                    vec![velocity.len()],
                    bytemuck::cast_slice(&velocity),
                )
                .unwrap(),
            ),
        ];
        let meta = HashMap::from([
            ("dptrain.format".to_string(), FORMAT_1.to_string()),
            ("dptrain.state".to_string(), text),
            ("dptrain.checksum".to_string(), sum),
        ]);
        let bytes = safetensors::serialize(views, Some(meta)).unwrap();
        let old = parse(&bytes, "old").unwrap();
        assert_eq!(old.state, state);
        assert_eq!(old.optim, vec![("momentum_buffer".to_string(), velocity)]);
        // and a run with Adam refuses it by name
        let defaults = serde_json::json!({});
        let e = compatible(Path::new("old"), &old, &expect(&ck, &defaults))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("optimizer sgd (momentum_buffer); this run uses adam"),
            "{e}"
        );
    }

    #[test]
    fn a_flipped_bit_or_a_truncation_is_caught_and_auto_falls_back() {
        let d = dir("flip");
        save(&d, &sample(1), 3).unwrap();
        let newest = save(&d, &sample(2), 3).unwrap();
        let mut bytes = std::fs::read(&newest).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x10;
        std::fs::write(&newest, &bytes).unwrap();
        let e = load(&newest).unwrap_err().to_string();
        assert!(e.contains("checkpoint is damaged: checksum"), "{e}");
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&newest).unwrap_err().to_string();
        assert!(e.contains("not a dptrain checkpoint"), "{e}");
        // --resume auto takes the older, intact one
        assert_eq!(latest(&d).unwrap().unwrap().1.state.step, 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_checkpoint_of_other_data_is_refused_unless_allowed() {
        let ck = sample(4);
        let defaults = serde_json::json!({});
        let mut other = ck.state.data.clone().unwrap();
        other.targets_crc = "87654321".into();
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                data: &other,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("same shape but other contents"), "{e}");
        assert!(e.contains("--resume-allow-changed-data"), "{e}");
        other.samples = 11;
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                data: &other,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("10 samples × 3 features, this run has 11 × 3"),
            "{e}"
        );
        let shifted = Normalizer {
            shift: vec![1.0; 3],
            ..Normalizer::identity(3)
        };
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                norm: &shifted,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("normaliser"), "{e}");
        assert!(
            compatible(
                Path::new("c"),
                &ck,
                &Expect {
                    data: &other,
                    norm: &shifted,
                    allow_changed_data: true,
                    ..expect(&ck, &defaults)
                },
            )
            .is_ok()
        );
    }

    #[test]
    fn settings_that_differ_are_named() {
        let ck = sample(3);
        let defaults = serde_json::json!({"accumulate": 1});
        let now = serde_json::json!({"lr": 0.2, "seed": 3});
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                settings: &now,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lr: 0.1 then, 0.2 now"), "{e}");
        // a setting the checkpoint predates matches its default, and only its default
        let now = serde_json::json!({"lr": 0.1, "seed": 3, "accumulate": 1});
        let e = Expect {
            settings: &now,
            ..expect(&ck, &defaults)
        };
        assert!(compatible(Path::new("c"), &ck, &e).is_ok());
        let now = serde_json::json!({"lr": 0.1, "seed": 3, "accumulate": 2});
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                settings: &now,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("accumulate: 1 then, 2 now"), "{e}");
        let other = ModelSpec::new(ModelKind::Softmax, 3, 2, vec![], Activation::Relu).unwrap();
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                spec: &other,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("model of widths [3, 4, 2]"), "{e}");
        let e = compatible(
            Path::new("c"),
            &ck,
            &Expect {
                world_size: 2,
                global_shard: false,
                ..expect(&ck, &defaults)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("only --shard global"), "{e}");
    }
}
