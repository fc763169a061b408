//! dptrain-kernels: the WGSL compute kernels of the trainer, each with a typed launcher and a CPU reference.
//!
//! One kernel = one WGSL file in `shaders/` + one module here with the same stem: the launcher checks
//! every size against the buffers it binds (so kernels built without runtime bounds checks stay in
//! range), the reference computes the same thing in f64 on the host, and a test compares the two at
//! sizes that are not multiples of the kernel's tile.

pub mod bias_grad;
pub mod context;
pub mod gather;
pub mod loss;
pub mod matmul;
pub mod reduce_stats;
pub mod sgd;
#[cfg(test)]
pub(crate) mod testutil;

pub use context::{AdapterChoice, AdapterReport, GpuContext, ShaderChecks, list_adapters};

/// Every shader, by file stem, for validation and for tools.
pub const SHADERS: &[(&str, &str)] = &[
    ("bias_grad", include_str!("../../shaders/bias_grad.wgsl")),
    ("gather", include_str!("../../shaders/gather.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("matmul128", include_str!("../../shaders/matmul128.wgsl")),
    ("mse", include_str!("../../shaders/mse.wgsl")),
    (
        "reduce_stats",
        include_str!("../../shaders/reduce_stats.wgsl"),
    ),
    ("sgd", include_str!("../../shaders/sgd.wgsl")),
    (
        "sigmoid_bce",
        include_str!("../../shaders/sigmoid_bce.wgsl"),
    ),
    (
        "softmax_xent",
        include_str!("../../shaders/softmax_xent.wgsl"),
    ),
];

/// The source of one shader by stem.
pub(crate) fn source(stem: &str) -> &'static str {
    SHADERS
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, src)| *src)
        .unwrap_or("")
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "no GPU adapter found: install a Vulkan driver (on Debian/Ubuntu without a GPU: `apt-get install mesa-vulkan-drivers libvulkan1` for lavapipe) or use `--device cpu`"
    )]
    NoAdapter,
    #[error("--gpu {index} is out of range: {count} adapter(s) found (see `dptrain devices`)")]
    AdapterIndex { index: usize, count: usize },
    #[error("cannot open the GPU device: {0}")]
    RequestDevice(String),
    #[error("{what} needs {bytes} bytes, more than this adapter's largest binding ({limit} bytes)")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error("{kernel}: {msg}")]
    Shape { kernel: &'static str, msg: String },
    #[error("GPU error: {0}")]
    Device(String),
}

/// New contents for a kernel's uniform buffer: applied at once with `GpuContext::write`, or staged
/// inside a command encoder so that several steps can share one submission.
pub struct UniformUpdate<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub bytes: Vec<u8>,
}

/// How a kernel uses each of its bindings, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Read,
    ReadWrite,
    Uniform,
}

/// One compiled pipeline with its explicit bind-group layout.
#[derive(Clone)]
pub struct Kernel {
    pub name: &'static str,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    slots: Vec<Slot>,
}

impl Kernel {
    /// Build `stem`'s `main` entry with the given override constants. `trusted` kernels are built
    /// without runtime checks when [`ShaderChecks`] allows.
    pub fn new(
        ctx: &GpuContext,
        stem: &'static str,
        constants: &[(&str, f64)],
        slots: &[Slot],
        trusted: bool,
    ) -> Self {
        let module = ctx.shader(stem, source(stem), trusted);
        let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match s {
                    Slot::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Slot::Read | Slot::ReadWrite => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *s == Slot::Read,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = ctx
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(stem),
                entries: &entries,
            });
        let pl = ctx
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(stem),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(stem),
                layout: Some(&pl),
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        Self {
            name: stem,
            pipeline,
            layout,
            slots: slots.to_vec(),
        }
    }

    /// Bind `buffers` (in slot order) and fix the grid: a dispatch ready to record any number of times.
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32),
    ) -> Dispatch {
        debug_assert_eq!(buffers.len(), self.slots.len(), "{}", self.name);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.name),
            layout: &self.layout,
            entries: &entries,
        });
        Dispatch {
            name: self.name,
            pipeline: self.pipeline.clone(),
            bind,
            groups,
        }
    }
}

/// A pipeline, its bound buffers and its grid.
#[derive(Clone)]
pub struct Dispatch {
    pub name: &'static str,
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    pub groups: (u32, u32),
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        pass.dispatch_workgroups(self.groups.0, self.groups.1, 1);
    }
}

/// Record dispatches in order into one compute pass of a new encoder, and submit it.
pub fn run(ctx: &GpuContext, dispatches: &[&Dispatch]) {
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("run"),
            timestamp_writes: None,
        });
        for d in dispatches {
            d.record(&mut pass);
        }
    }
    ctx.queue.submit([enc.finish()]);
}

/// Fail with a shape error unless `buf` holds at least `elems` 4-byte elements.
pub(crate) fn need(
    kernel: &'static str,
    what: &str,
    buf: &wgpu::Buffer,
    elems: u64,
) -> Result<(), KernelError> {
    if buf.size() < elems * 4 {
        return Err(KernelError::Shape {
            kernel,
            msg: format!(
                "{what} needs {elems} elements but its buffer holds {}",
                buf.size() / 4
            ),
        });
    }
    Ok(())
}

/// Fail with a shape error unless `v` fits in u32 (WGSL indexes with u32).
pub(crate) fn u32_of(kernel: &'static str, what: &str, v: u64) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| KernelError::Shape {
        kernel,
        msg: format!("{what} = {v} exceeds the 32-bit indexing of WGSL"),
    })
}
