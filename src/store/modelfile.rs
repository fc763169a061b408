//! Model files: safetensors with PyTorch `nn.Linear` names plus metadata (model spec, normaliser).
//!
//! Tensors are `layers.{i}.weight` [out, in] and `layers.{i}.bias` [out] in f32, so
//! `torch.nn.ModuleList([nn.Linear(...), ...]).load_state_dict(safetensors.torch.load_file(f), strict=True)`
//! (wrapped as `layers`) or `numpy` via `safetensors.numpy.load_file` read them directly.
//! Files are written atomically (temporary file in the same folder, fsync, rename): a failed or
//! interrupted save never damages the file already there.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::data::Normalizer;
use crate::model::ModelSpec;
use crate::store::atomic::write_atomic;

pub const FORMAT: &str = "dptrain-model-1";

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: {msg}")]
    Content { path: String, msg: String },
}

/// A model as saved: its spec, normaliser and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedModel {
    pub spec: Option<ModelSpec>,
    pub norm: Option<Normalizer>,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: ModelMeta,
}

/// What a model file carries besides the spec and normaliser.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMeta {
    /// Class names when the training labels were text (class i first).
    pub labels: Option<Vec<String>>,
    /// The training run's resolved settings.
    pub settings: Option<serde_json::Value>,
}

/// Write `theta` (laid out by `spec`) with metadata, atomically.
pub fn save(
    path: &Path,
    spec: &ModelSpec,
    norm: &Normalizer,
    theta: &[f32],
) -> Result<(), ModelFileError> {
    save_with(path, spec, norm, theta, &ModelMeta::default())
}

/// As [`save`], with the class names and the run's settings in the metadata.
pub fn save_with(
    path: &Path,
    spec: &ModelSpec,
    norm: &Normalizer,
    theta: &[f32],
    extra: &ModelMeta,
) -> Result<(), ModelFileError> {
    let layout = spec.layout();
    let bytes: &[u8] = bytemuck::cast_slice(theta);
    let p = path.display().to_string();
    let mut views = Vec::new();
    for t in &layout.tensors {
        let data = &bytes[t.offset * 4..(t.offset + t.len()) * 4];
        let view = TensorView::new(Dtype::F32, t.shape.clone(), data).map_err(|e| {
            ModelFileError::Content {
                path: p.clone(),
                msg: e.to_string(),
            }
        })?;
        views.push((t.name.clone(), view));
    }
    let json = |v: Result<String, serde_json::Error>| {
        v.map_err(|e| ModelFileError::Content {
            path: p.clone(),
            msg: e.to_string(),
        })
    };
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("dptrain.format".to_string(), FORMAT.to_string()),
        (
            "dptrain.spec".to_string(),
            json(serde_json::to_string(spec))?,
        ),
        (
            "dptrain.normalizer".to_string(),
            json(serde_json::to_string(norm))?,
        ),
    ]);
    if let Some(l) = &extra.labels {
        meta.insert("dptrain.labels".into(), json(serde_json::to_string(l))?);
    }
    if let Some(v) = &extra.settings {
        meta.insert("dptrain.settings".into(), json(serde_json::to_string(v))?);
    }
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| ModelFileError::Content {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &out).map_err(|e| ModelFileError::Write {
        path: e.path,
        source: e.source,
    })
}

/// Read a model file (any safetensors file with f32 tensors; metadata when present).
pub fn load(path: &Path) -> Result<SavedModel, ModelFileError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ModelFileError::Read {
        path: p.clone(),
        source,
    })?;
    parse(&bytes, &p)
}

/// A model file held in memory (`name` for messages).
pub fn parse(bytes: &[u8], name: &str) -> Result<SavedModel, ModelFileError> {
    let p = name.to_string();
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelFileError::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| ModelFileError::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let content = |msg: String| ModelFileError::Content {
        path: p.clone(),
        msg,
    };
    let spec = meta
        .get("dptrain.spec")
        .map(|s| serde_json::from_str::<ModelSpec>(s))
        .transpose()
        .map_err(|e| content(format!("bad model spec in metadata: {e}")))?;
    let norm = meta
        .get("dptrain.normalizer")
        .map(|s| serde_json::from_str::<Normalizer>(s))
        .transpose()
        .map_err(|e| content(format!("bad normaliser in metadata: {e}")))?;
    let labels = meta
        .get("dptrain.labels")
        .map(|s| serde_json::from_str::<Vec<String>>(s))
        .transpose()
        .map_err(|e| content(format!("bad class names in metadata: {e}")))?;
    let settings = meta
        .get("dptrain.settings")
        .map(|s| serde_json::from_str::<serde_json::Value>(s))
        .transpose()
        .map_err(|e| content(format!("bad settings in metadata: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(content(format!(
                "tensor {name} is {:?}, expected F32",
                view.dtype()
            )));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    Ok(SavedModel {
        spec,
        norm,
        tensors,
        meta: ModelMeta { labels, settings },
    })
}

/// A model ready to use, from a model file or a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Usable {
    pub spec: ModelSpec,
    pub norm: Normalizer,
    pub params: Vec<f32>,
    pub meta: ModelMeta,
    /// The checkpoint's step when the file was a checkpoint.
    pub checkpoint_step: Option<u64>,
}

/// Read a model file (`train --save`, `--save-best`) or a checkpoint, for eval, predict and show.
pub fn load_usable(path: &Path) -> anyhow::Result<Usable> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ModelFileError::Read {
        path: p.clone(),
        source,
    })?;
    let is_checkpoint = SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, h)| h.metadata().clone())
        .and_then(|m| m.get("dptrain.format").cloned())
        .is_some_and(|f| f.starts_with("dptrain-checkpoint"));
    if is_checkpoint {
        let ck = crate::store::checkpoint::parse(&bytes, &p)?;
        return Ok(Usable {
            meta: ModelMeta {
                labels: ck.state.labels.clone(),
                settings: Some(ck.state.settings.clone()),
            },
            spec: ck.state.spec,
            norm: ck.state.norm,
            params: ck.params,
            checkpoint_step: Some(ck.state.step),
        });
    }
    let saved = parse(&bytes, &p)?;
    let spec = saved.spec.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{p}: no dptrain model spec in its metadata (was it written by `dptrain train --save`?)"
        )
    })?;
    let norm = saved
        .norm
        .clone()
        .ok_or_else(|| anyhow::anyhow!("{p}: no normaliser in its metadata"))?;
    let params = saved.flat_params(&spec, path)?;
    Ok(Usable {
        spec,
        norm,
        params,
        meta: saved.meta,
        checkpoint_step: None,
    })
}

impl SavedModel {
    /// The flat parameter vector for `spec`, checking every tensor's presence and shape.
    pub fn flat_params(&self, spec: &ModelSpec, path: &Path) -> Result<Vec<f32>, ModelFileError> {
        let layout = spec.layout();
        let mut theta = vec![0f32; layout.total];
        let content = |msg: String| ModelFileError::Content {
            path: path.display().to_string(),
            msg,
        };
        for t in &layout.tensors {
            let (shape, values) = self
                .tensors
                .get(&t.name)
                .ok_or_else(|| content(format!("tensor {} is missing", t.name)))?;
            if *shape != t.shape {
                return Err(content(format!(
                    "tensor {} has shape {shape:?}, the model needs {:?}",
                    t.name, t.shape
                )));
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(content(format!(
                    "tensor {} holds a non-finite value at {i}",
                    t.name
                )));
            }
            theta[t.offset..t.offset + t.len()].copy_from_slice(values);
        }
        if self.tensors.len() != layout.tensors.len() {
            let extra: Vec<&String> = self
                .tensors
                .keys()
                .filter(|k| !layout.tensors.iter().any(|t| &t.name == *k))
                .collect();
            return Err(content(format!("unexpected tensors {extra:?}")));
        }
        Ok(theta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, ModelKind};

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("dptrain-modelfile-{}-{name}", std::process::id()))
    }

    #[test]
    fn save_then_load_round_trips_parameters_spec_and_normaliser() {
        let spec = ModelSpec::new(ModelKind::Mlp, 3, 4, vec![5], Activation::Tanh).unwrap();
        let theta = spec.init(9);
        let norm = Normalizer::identity(3);
        let path = tmp("rt.safetensors");
        save(&path, &spec, &norm, &theta).unwrap();
        let m = load(&path).unwrap();
        assert_eq!(m.spec.as_ref(), Some(&spec));
        assert_eq!(m.norm.as_ref(), Some(&norm));
        assert_eq!(m.tensors["layers.0.weight"].0, vec![5, 3]);
        assert_eq!(m.flat_params(&spec, &path).unwrap(), theta);
        let other = ModelSpec::new(ModelKind::Mlp, 3, 4, vec![6], Activation::Tanh).unwrap();
        let e = m.flat_params(&other, &path).unwrap_err().to_string();
        assert!(
            e.contains("has shape [5, 3], the model needs [6, 3]"),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_garbage_file_is_a_one_line_error() {
        let path = tmp("garbage.safetensors");
        std::fs::write(&path, b"this is not a model").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        assert!(!e.contains('\n'));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_existing_file_intact() {
        let spec = ModelSpec::new(ModelKind::Softmax, 2, 3, vec![], Activation::Relu).unwrap();
        let dir = tmp("ro-dir");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        save(&path, &spec, &Normalizer::identity(2), &spec.init(1)).unwrap();
        let before = std::fs::read(&path).unwrap();
        // a path whose parent is a file cannot be written; the good file elsewhere is untouched
        let bad = path.join("nested.safetensors");
        assert!(save(&bad, &spec, &Normalizer::identity(2), &spec.init(2)).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
