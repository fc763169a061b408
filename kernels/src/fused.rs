//! PLACEHOLDER: launcher for `shaders/fused_linear.wgsl`, the fused small-model step.

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    _pad: [u32; 3],
}

crate::params_layout!(Params { rows });
