//! Model files: safetensors with PyTorch `nn.Linear` names plus metadata (model spec, normaliser).
//!
//! Tensors are `layers.{i}.weight` [out, in] and `layers.{i}.bias` [out] in f32, so
//! `torch.nn.ModuleList([nn.Linear(...), ...]).load_state_dict(safetensors.torch.load_file(f), strict=True)`
//! (wrapped as `layers`) or `numpy` via `safetensors.numpy.load_file` read them directly.
//! Files are written atomically (temporary file in the same folder, fsync, rename): a failed or
//! interrupted save never damages the file already there.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::data::Normalizer;
use crate::model::ModelSpec;

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
}

/// Write `theta` (laid out by `spec`) with metadata, atomically.
pub fn save(
    path: &Path,
    spec: &ModelSpec,
    norm: &Normalizer,
    theta: &[f32],
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
    let meta = HashMap::from([
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
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| ModelFileError::Content {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &out)
}

/// Write `bytes` to `path` through a temporary file in the same folder, fsync, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelFileError> {
    let p = path.display().to_string();
    let err = |source| ModelFileError::Write {
        path: p.clone(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
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
