//! The cooperative-matrix matmul core (`matmul_coop.wgsl`) compiles to SPIR-V in every form, no GPU
//! needed. Lavapipe has no cooperative matrices, so the kernel cannot run on the CPU machines; what can
//! be checked here is what wgpu's Vulkan backend does with it before the driver sees it: parse and
//! validate with naga, resolve the override constants of one pipeline (`process_overrides`), and write
//! SPIR-V (`spv::write_vec`) with the options wgpu-hal uses on a Vulkan 1.3 device with SHADER_F16,
//! SUBGROUP and EXPERIMENTAL_COOPERATIVE_MATRIX: SPIR-V 1.6, an explicit capability list (the writer
//! refuses a module that needs CooperativeMatrixKHR, VulkanMemoryModel or Float16 when the list lacks
//! it), and bounds checks on (`Restrict`, a module built with runtime checks) or off (a trusted module,
//! as the launcher builds it). A runtime cooperative-matrix stride makes naga panic at exactly this
//! step, so a pass here also shows every stride is a constant. The same path runs on `matmul128` and
//! `matmul_half`, kernels known to run, to show that the method itself works.
//!
//! `DPTRAIN_SPIRV_DUMP=dir` also writes every module it builds to `dir`, for `spirv-val` and
//! `spirv-dis`.

use naga::back::spv;
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
use naga::valid::{Capabilities, ValidationFlags, Validator};

const SPIRV_MAGIC: u32 = 0x0723_0203;
const OP_TYPE_COOPERATIVE_MATRIX_KHR: u32 = 4456;
const OP_COOPERATIVE_MATRIX_LOAD_KHR: u32 = 4457;
const OP_COOPERATIVE_MATRIX_STORE_KHR: u32 = 4458;
const OP_COOPERATIVE_MATRIX_MUL_ADD_KHR: u32 = 4459;

fn shader(stem: &str) -> &'static str {
    dptrain_kernels::SHADERS
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, src)| *src)
        .unwrap_or_else(|| panic!("{stem} is not in SHADERS"))
}

/// Options as wgpu-hal's Vulkan backend builds them for a Vulkan 1.3 device with SHADER_F16,
/// SUBGROUP and EXPERIMENTAL_COOPERATIVE_MATRIX; `checked` picks the bounds-check policies of a module
/// built with runtime checks (`Restrict`) or without (`Unchecked`).
fn vulkan_options(checked: bool) -> spv::Options<'static> {
    use spv::Capability as C;
    let capabilities = [
        C::Shader,
        C::Matrix,
        C::Sampled1D,
        C::Image1D,
        C::ImageQuery,
        C::DerivativeControl,
        C::StorageImageExtendedFormats,
        C::GroupNonUniform,
        C::GroupNonUniformVote,
        C::GroupNonUniformArithmetic,
        C::GroupNonUniformBallot,
        C::GroupNonUniformShuffle,
        C::GroupNonUniformShuffleRelative,
        C::GroupNonUniformQuad,
        C::Float16,
        C::CooperativeMatrixKHR,
        C::VulkanMemoryModel,
    ];
    // checked: what wgpu-hal picks without robustBufferAccess2; a trusted module has no checks
    let policy = if checked {
        BoundsCheckPolicy::Restrict
    } else {
        BoundsCheckPolicy::Unchecked
    };
    spv::Options {
        lang_version: (1, 6),
        flags: spv::WriterFlags::LABEL_VARYINGS | spv::WriterFlags::FORCE_POINT_SIZE,
        capabilities: Some(capabilities.into_iter().collect()),
        bounds_check_policies: BoundsCheckPolicies {
            index: policy,
            buffer: policy,
            image_load: policy,
            binding_array: BoundsCheckPolicy::Unchecked,
        },
        // the launcher builds its pipelines without zeroing workgroup memory
        zero_initialize_workgroup_memory: if checked {
            spv::ZeroInitializeWorkgroupMemoryMode::Native
        } else {
            spv::ZeroInitializeWorkgroupMemoryMode::None
        },
        ..spv::Options::default()
    }
}

/// Parse, validate, resolve the overrides for entry point `main`, write SPIR-V; returns the words.
fn compile(stem: &str, overrides: &[(&str, f64)], options: &spv::Options) -> Vec<u32> {
    let src = shader(stem);
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{stem}: {}", e.emit_to_string(src)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{stem}: {}", e.emit_to_string(src)));
    let mut constants = naga::back::PipelineConstants::default();
    for &(name, value) in overrides {
        constants.insert(name.to_string(), value);
    }
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .unwrap_or_else(|e| panic!("{stem} {overrides:?}: overrides: {e}"));
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".to_string(),
    };
    let words = spv::write_vec(&module, &info, options, Some(&pipeline))
        .unwrap_or_else(|e| panic!("{stem} {overrides:?}: SPIR-V: {e}"));
    assert!(words.len() > 5, "{stem} {overrides:?}: empty SPIR-V");
    assert_eq!(
        words[0], SPIRV_MAGIC,
        "{stem} {overrides:?}: no SPIR-V magic"
    );
    dump(stem, overrides, options, &words);
    words
}

/// With `DPTRAIN_SPIRV_DUMP=dir`, also write each module to `dir` (for `spirv-val`, `spirv-dis`):
/// `<stem>_a<TRANS_A>_b<TRANS_B>_e<EPILOGUE>_<checked|unchecked|default>.spv`.
fn dump(stem: &str, overrides: &[(&str, f64)], options: &spv::Options, words: &[u32]) {
    let Some(dir) = std::env::var_os("DPTRAIN_SPIRV_DUMP") else {
        return;
    };
    let mut name = stem.to_string();
    for &(key, value) in overrides {
        let tag = match key {
            "TRANS_A" => "a",
            "TRANS_B" => "b",
            "EPILOGUE" => "e",
            other => other,
        };
        name.push_str(&format!("_{tag}{value}"));
    }
    name.push_str(
        match (
            options.capabilities.is_some(),
            options.bounds_check_policies.buffer,
        ) {
            (false, _) => "_default",
            (true, BoundsCheckPolicy::Unchecked) => "_unchecked",
            (true, _) => "_checked",
        },
    );
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("dump folder");
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.spv")), bytes).expect("dump written");
}

/// How many instructions of each opcode the module holds (after the 5-word header).
fn count_opcode(words: &[u32], opcode: u32) -> usize {
    let mut i = 5;
    let mut n = 0;
    while i < words.len() {
        let count = (words[i] >> 16) as usize;
        assert!(count > 0, "malformed SPIR-V at word {i}");
        if words[i] & 0xffff == opcode {
            n += 1;
        }
        i += count;
    }
    assert_eq!(i, words.len(), "SPIR-V ends inside an instruction");
    n
}

fn forms() -> impl Iterator<Item = (bool, bool)> {
    [(false, false), (false, true), (true, false), (true, true)].into_iter()
}

fn matmul_constants(trans_a: bool, trans_b: bool, epilogue: u32) -> [(&'static str, f64); 3] {
    [
        ("TRANS_A", f64::from(u8::from(trans_a))),
        ("TRANS_B", f64::from(u8::from(trans_b))),
        ("EPILOGUE", f64::from(epilogue)),
    ]
}

#[test]
fn coop_core_writes_spirv_in_every_form_and_epilogue() {
    for checked in [true, false] {
        let options = vulkan_options(checked);
        for (trans_a, trans_b) in forms() {
            for epilogue in 0..=8u32 {
                let words = compile(
                    "matmul_coop",
                    &matmul_constants(trans_a, trans_b, epilogue),
                    &options,
                );
                let what = format!("TRANS_A={trans_a} TRANS_B={trans_b} EPILOGUE={epilogue}");
                // the structure survived: 8 fragment loads and 16 MMAs in the K loop's body, one
                // fragment store (in `drain`, called once per accumulator)
                assert!(
                    count_opcode(&words, OP_TYPE_COOPERATIVE_MATRIX_KHR) >= 3,
                    "{what}: cooperative-matrix types A, B, C"
                );
                assert_eq!(
                    count_opcode(&words, OP_COOPERATIVE_MATRIX_LOAD_KHR),
                    8,
                    "{what}: fragment loads"
                );
                assert_eq!(
                    count_opcode(&words, OP_COOPERATIVE_MATRIX_MUL_ADD_KHR),
                    16,
                    "{what}: MMAs"
                );
                assert_eq!(
                    count_opcode(&words, OP_COOPERATIVE_MATRIX_STORE_KHR),
                    1,
                    "{what}: fragment stores"
                );
            }
        }
    }
}

#[test]
fn kernels_known_to_run_write_spirv_the_same_way() {
    for checked in [true, false] {
        let options = vulkan_options(checked);
        for stem in ["matmul128", "matmul_half"] {
            let words = compile(stem, &matmul_constants(false, true, 2), &options);
            assert_eq!(
                count_opcode(&words, OP_COOPERATIVE_MATRIX_MUL_ADD_KHR),
                0,
                "{stem}"
            );
        }
    }
}

#[test]
fn coop_core_needs_the_cooperative_matrix_capability() {
    // the explicit capability list is enforced: without CooperativeMatrixKHR the writer refuses,
    // so the passes above do check capabilities
    let mut options = vulkan_options(true);
    if let Some(caps) = options.capabilities.as_mut() {
        caps.remove(&spv::Capability::CooperativeMatrixKHR);
    }
    let src = shader("matmul_coop");
    let module = naga::front::wgsl::parse_str(src).expect("parses");
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .expect("validates");
    let mut constants = naga::back::PipelineConstants::default();
    for (name, value) in matmul_constants(false, false, 0) {
        constants.insert(name.to_string(), value);
    }
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .expect("overrides");
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".to_string(),
    };
    assert!(spv::write_vec(&module, &info, &options, Some(&pipeline)).is_err());
}
