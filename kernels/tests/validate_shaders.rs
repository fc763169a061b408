//! Every WGSL file in `shaders/` parses and validates with naga, no GPU needed, and every one is registered.

use std::path::Path;

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
        let src = std::fs::read_to_string(dir.join(name)).expect("readable");
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let stem = name.trim_end_matches(".wgsl");
        let registered = dptrain_kernels::SHADERS.iter().find(|(s, _)| *s == stem);
        assert_eq!(
            registered.map(|(_, s)| *s),
            Some(src.as_str()),
            "{name} is not registered in SHADERS"
        );
    }
    assert_eq!(
        files.len(),
        dptrain_kernels::SHADERS.len(),
        "SHADERS lists a missing file"
    );
}
