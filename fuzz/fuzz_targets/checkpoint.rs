//! The checkpoint and model-file readers on arbitrary bytes: they may refuse, never panic.
#![no_main]
use dptrain::{checkpoint, modelfile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ck) = checkpoint::parse(data, "fuzz.ckpt") {
        assert_eq!(ck.params.len(), ck.state.spec.layout().total);
    }
    if let Ok(m) = modelfile::parse(data, "fuzz.safetensors") {
        if let Some(spec) = &m.spec {
            let _ = m.flat_params(spec, std::path::Path::new("fuzz.safetensors"));
        }
    }
});
