//! Every WGSL file in `shaders/` parses and validates with naga, no GPU needed: shared snippets on
//! their own, and every kernel as it is built (its snippets prepended). Every file is registered.

use std::path::Path;

fn validate(name: &str, src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
}

#[test]
fn every_shader_file_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for name in &files {
        let text = std::fs::read_to_string(dir.join(name)).expect("readable");
        let stem = name.trim_end_matches(".wgsl");
        if let Some((_, snippet)) = dptrain_kernels::SNIPPETS.iter().find(|(s, _)| *s == stem) {
            assert_eq!(*snippet, text, "{name}: registered text differs");
            validate(name, &text);
            continue;
        }
        let (_, built) = dptrain_kernels::SHADERS
            .iter()
            .find(|(s, _)| *s == stem)
            .unwrap_or_else(|| panic!("{name} is not registered in SHADERS or SNIPPETS"));
        assert!(built.ends_with(&text), "{name}: registered text differs");
        validate(name, built);
    }
    assert_eq!(
        files.len(),
        dptrain_kernels::SHADERS.len() + dptrain_kernels::SNIPPETS.len(),
        "SHADERS or SNIPPETS lists a missing file"
    );
}
