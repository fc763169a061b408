//! The checkpoint and model-file readers on arbitrary bytes: they may refuse, never panic.
//!
//! Every input goes through `checkpoint::parse`, `modelfile::parse` (+ `flat_params`) and
//! `modelfile::load_usable` (from a file in /dev/shm: it takes a path). A checkpoint's CRC-32 covers
//! its state text, so a mutated state would almost never get past the checksum to the JSON reader;
//! the input is therefore also parsed as a checkpoint once more with its `dptrain.checksum` recomputed.
#![no_main]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dptrain::{checkpoint, modelfile};
use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;

/// The input with `dptrain.checksum` set to what `checkpoint::parse` will compute; None when the
/// input is not a safetensors file with a state, or its checksum is already right.
fn with_checksum(data: &[u8]) -> Option<Vec<u8>> {
    let (n, header) = SafeTensors::read_metadata(data).ok()?;
    let meta = header.metadata().as_ref()?;
    let state = meta.get("dptrain.state")?;
    let st = SafeTensors::deserialize(data).ok()?;
    let mut names = vec!["params".to_string()];
    match meta.get("dptrain.format").map(String::as_str) {
        Some("dptrain-checkpoint-1") => names.push("velocity".into()),
        _ => names.extend(
            meta.get("dptrain.optim")?
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| format!("optim.{n}")),
        ),
    }
    if let Some(extra) = meta.get("dptrain.extra") {
        names.extend(
            extra
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| format!("extra.{n}")),
        );
    }
    let mut h = crc32fast::Hasher::new();
    h.update(state.as_bytes());
    for name in &names {
        let bytes = st.tensor(name).ok()?.data();
        h.update(&bytes[..bytes.len() / 4 * 4]);
    }
    let sum = format!("{:08x}", h.finalize());
    if meta.get("dptrain.checksum") == Some(&sum) {
        return None;
    }
    let mut json: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).ok()?;
    json.get_mut("__metadata__")?
        .as_object_mut()?
        .insert("dptrain.checksum".into(), sum.into());
    let text = serde_json::to_vec(&json).ok()?;
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&data[8 + n..]);
    Some(out)
}

fn check_checkpoint(data: &[u8]) -> bool {
    match checkpoint::parse(data, "fuzz.ckpt") {
        Ok(ck) => {
            let n = ck.state.spec.layout().total;
            assert_eq!(ck.params.len(), n);
            assert!(ck.optim.iter().all(|(_, v)| v.len() == n));
            let _ = ck.extra.len();
            true
        }
        Err(_) => false,
    }
}

fn scratch() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("dptrain-fuzz-{}.safetensors", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let is_checkpoint = check_checkpoint(data);
    if let Some(fixed) = with_checksum(data) {
        check_checkpoint(&fixed);
    }
    let model = modelfile::parse(data, "fuzz.safetensors");
    if let Ok(m) = &model {
        if let Some(spec) = &m.spec {
            if let Ok(p) = m.flat_params(spec, Path::new("fuzz.safetensors")) {
                assert_eq!(p.len(), spec.layout().total);
            }
        }
    }
    // load_usable: a checkpoint when the format says so, else a model file with a spec and a normaliser
    let path = scratch();
    if std::fs::write(path, data).is_ok() {
        if let Ok(u) = modelfile::load_usable(path) {
            assert_eq!(u.params.len(), u.spec.layout().total);
            assert_eq!(u.checkpoint_step.is_some(), is_checkpoint);
            if !is_checkpoint {
                let m = model.as_ref().expect("load_usable read what parse refused");
                assert_eq!(m.spec.as_ref(), Some(&u.spec));
            }
        }
    }
});
