//! dptrain-kernels: the WGSL compute kernels of the trainer, each with a typed launcher and a CPU reference.
//!
//! One kernel = one WGSL file in `shaders/` + one module here with the same stem: the launcher checks
//! every size against the buffers it binds (so kernels built without runtime bounds checks stay in
//! range), the reference computes the same thing in f64 on the host, and a test compares the two at
//! sizes that are not multiples of the kernel's tile.

pub mod adam;
pub mod batch_norm;
pub mod causal_softmax;
pub mod context;
pub mod dropout;
pub mod dtype;
pub mod embedding;
pub mod fused;
pub mod gather;
pub mod gelu;
pub mod grad_norm;
pub mod im2col;
pub mod layer_norm;
pub mod loss;
pub mod matmul;
pub mod max_diff;
pub mod optimizer;
pub mod pack;
pub mod pool;
pub mod reduce_stats;
pub mod sgd;
#[cfg(test)]
pub(crate) mod testutil;
pub mod tune;

pub use context::{AdapterChoice, AdapterReport, GpuContext, ShaderChecks, list_adapters};
pub use dtype::{DType, Element, F32};

/// Snippets that kernels share, prepended to a kernel's own file when its module is built. Each is
/// valid WGSL on its own (the naga test validates it alone and with every kernel that uses it).
pub const SNIPPETS: &[(&str, &str)] = &[
    (
        "enable_coop",
        include_str!("../../shaders/enable_coop.wgsl"),
    ),
    ("enable_f16", include_str!("../../shaders/enable_f16.wgsl")),
    (
        "matmul_common",
        include_str!("../../shaders/matmul_common.wgsl"),
    ),
    (
        "window_common",
        include_str!("../../shaders/window_common.wgsl"),
    ),
];

/// Every kernel by file stem, with its whole source (shared snippets first), for building and tools.
pub const SHADERS: &[(&str, &str)] = &[
    ("adam", include_str!("../../shaders/adam.wgsl")),
    (
        "avg_pool",
        concat!(
            include_str!("../../shaders/window_common.wgsl"),
            include_str!("../../shaders/avg_pool.wgsl")
        ),
    ),
    ("batch_norm", include_str!("../../shaders/batch_norm.wgsl")),
    (
        "causal_softmax",
        include_str!("../../shaders/causal_softmax.wgsl"),
    ),
    (
        "channel_sums",
        include_str!("../../shaders/channel_sums.wgsl"),
    ),
    (
        "col2im",
        concat!(
            include_str!("../../shaders/window_common.wgsl"),
            include_str!("../../shaders/col2im.wgsl")
        ),
    ),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    (
        "fused_linear",
        include_str!("../../shaders/fused_linear.wgsl"),
    ),
    ("gather", include_str!("../../shaders/gather.wgsl")),
    ("gelu", include_str!("../../shaders/gelu.wgsl")),
    ("grad_norm", include_str!("../../shaders/grad_norm.wgsl")),
    (
        "im2col",
        concat!(
            include_str!("../../shaders/window_common.wgsl"),
            include_str!("../../shaders/im2col.wgsl")
        ),
    ),
    ("layer_norm", include_str!("../../shaders/layer_norm.wgsl")),
    (
        "matmul",
        concat!(
            include_str!("../../shaders/matmul_common.wgsl"),
            include_str!("../../shaders/matmul.wgsl")
        ),
    ),
    (
        "matmul128",
        concat!(
            include_str!("../../shaders/matmul_common.wgsl"),
            include_str!("../../shaders/matmul128.wgsl")
        ),
    ),
    (
        "matmul_coop",
        concat!(
            include_str!("../../shaders/enable_f16.wgsl"),
            include_str!("../../shaders/enable_coop.wgsl"),
            include_str!("../../shaders/matmul_common.wgsl"),
            include_str!("../../shaders/matmul_coop.wgsl")
        ),
    ),
    (
        "matmul_half",
        concat!(
            include_str!("../../shaders/enable_f16.wgsl"),
            include_str!("../../shaders/matmul_common.wgsl"),
            include_str!("../../shaders/matmul_half.wgsl")
        ),
    ),
    (
        "matmul_skinny",
        concat!(
            include_str!("../../shaders/matmul_common.wgsl"),
            include_str!("../../shaders/matmul_skinny.wgsl")
        ),
    ),
    (
        "matmul_splitk",
        concat!(
            include_str!("../../shaders/matmul_common.wgsl"),
            include_str!("../../shaders/matmul_splitk.wgsl")
        ),
    ),
    ("max_diff", include_str!("../../shaders/max_diff.wgsl")),
    (
        "max_pool",
        concat!(
            include_str!("../../shaders/window_common.wgsl"),
            include_str!("../../shaders/max_pool.wgsl")
        ),
    ),
    ("mse", include_str!("../../shaders/mse.wgsl")),
    (
        "pack_f16",
        concat!(
            include_str!("../../shaders/enable_f16.wgsl"),
            include_str!("../../shaders/pack_f16.wgsl")
        ),
    ),
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

/// A uniform buffer holding several parameter blocks, bound with a dynamic offset: each of the
/// steps recorded into one submission reads its own block, so one submission can carry many steps
/// whose gather offset or learning rate differ.
pub struct UniformRing {
    pub buffer: wgpu::Buffer,
    /// Bytes between blocks (the block size rounded up to the adapter's offset alignment).
    pub stride: u64,
    pub slots: u64,
    /// Bytes of one block.
    pub block: u64,
}

impl UniformRing {
    pub fn new(ctx: &GpuContext, label: &str, block: u64, slots: u64) -> Self {
        let align = u64::from(ctx.limits.min_uniform_buffer_offset_alignment.max(16));
        let stride = block.div_ceil(align) * align;
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: stride * slots.max(1),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self {
            buffer,
            stride,
            slots: slots.max(1),
            block,
        }
    }

    /// Write block `slot` (lands before the next submit); returns its dynamic offset.
    pub fn write(&self, ctx: &GpuContext, slot: u64, bytes: &[u8]) -> Result<u32, KernelError> {
        if slot >= self.slots {
            return Err(KernelError::Shape {
                kernel: "uniform ring",
                msg: format!("slot {slot} of {}", self.slots),
            });
        }
        let off = slot * self.stride;
        ctx.write(&self.buffer, off, bytes);
        u32_of("uniform ring", "offset", off)
    }
}

/// Parameter blocks per ring: the steps one submission may carry.
pub const RING_SLOTS: u64 = 16;

/// How a kernel uses each of its bindings, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Read,
    ReadWrite,
    Uniform,
    /// A uniform bound from a [`UniformRing`] with a dynamic offset; the block's size in bytes.
    UniformRing(u64),
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
    /// As [`Kernel::new`], but a shader or pipeline that the device refuses (a feature it lacks, a
    /// driver that cannot compile it) is an error instead of a deferred device error.
    pub fn try_new(
        ctx: &GpuContext,
        stem: &'static str,
        constants: &[(&str, f64)],
        slots: &[Slot],
        trusted: bool,
    ) -> Result<Self, KernelError> {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernel = Self::new(ctx, stem, constants, slots, trusted);
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(KernelError::Device(format!("{stem}: {e}"))),
            None => Ok(kernel),
        }
    }

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
                    Slot::UniformRing(_) => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
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
            .zip(&self.slots)
            .enumerate()
            .map(|(i, (b, slot))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: match slot {
                    // one block of the ring; the dynamic offset picks which
                    Slot::UniformRing(block) => {
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: b,
                            offset: 0,
                            size: std::num::NonZeroU64::new(*block),
                        })
                    }
                    _ => b.as_entire_binding(),
                },
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
            groups_z: 1,
            dynamic: self.slots.iter().any(|s| matches!(s, Slot::UniformRing(_))),
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
    /// Workgroups along z (the pieces of a split-K product).
    pub groups_z: u32,
    /// Whether its uniform comes from a ring (then `record_at` picks the block).
    dynamic: bool,
}

impl Dispatch {
    /// Record with the first block of its uniform ring, if it has one.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_at(pass, 0);
    }

    /// Record with its uniform ring's block at dynamic offset `offset`.
    pub fn record_at(&self, pass: &mut wgpu::ComputePass<'_>, offset: u32) {
        pass.set_pipeline(&self.pipeline);
        if self.dynamic {
            pass.set_bind_group(0, &self.bind, &[offset]);
        } else {
            pass.set_bind_group(0, &self.bind, &[]);
        }
        pass.dispatch_workgroups(self.groups.0, self.groups.1, self.groups_z);
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

/// Fail with a shape error unless `buf` holds at least `elems` f32 elements.
pub(crate) fn need(
    kernel: &'static str,
    what: &str,
    buf: &wgpu::Buffer,
    elems: u64,
) -> Result<(), KernelError> {
    need_of(kernel, what, buf, F32, elems)
}

/// Fail with a shape error unless `buf` holds at least `elems` elements of type `dtype`.
pub(crate) fn need_of(
    kernel: &'static str,
    what: &str,
    buf: &wgpu::Buffer,
    dtype: DType,
    elems: u64,
) -> Result<(), KernelError> {
    if buf.size() < dtype.bytes(elems) {
        return Err(KernelError::Shape {
            kernel,
            msg: format!(
                "{what} needs {elems} elements but its buffer holds {}",
                dtype.count(buf.size())
            ),
        });
    }
    Ok(())
}

/// `params_layout!(Params { field, ... })` gives a launcher's uniform struct a test-only description
/// (size and each named field's offset), which a test compares with the WGSL struct it feeds.
#[macro_export]
macro_rules! params_layout {
    ($t:ty { $($f:ident),* $(,)? }) => {
        #[cfg(test)]
        pub(crate) fn params_layout() -> (usize, Vec<(&'static str, usize)>) {
            (
                std::mem::size_of::<$t>(),
                vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*],
            )
        }
    };
}

/// Threads of the workgroups that reduce a row or a channel (`channel_sums`, `layer_norm`,
/// `causal_softmax`).
pub(crate) const TREE_THREADS: usize = 256;

/// The reduction of `v(0) .. v(n − 1)` by `op` exactly as those kernels do it, for their CPU
/// references: thread t folds the elements t, t + 256, … in order (from `init`), then the 256
/// partials are folded in a fixed tree. Same order, same bits.
pub(crate) fn tree_reduce<T: Copy>(
    n: usize,
    v: impl Fn(usize) -> T,
    init: T,
    op: impl Fn(T, T) -> T,
) -> T {
    let mut part = [init; TREE_THREADS];
    for (t, p) in part.iter_mut().enumerate() {
        let mut j = t;
        while j < n {
            *p = op(*p, v(j));
            j += TREE_THREADS;
        }
    }
    let mut half = TREE_THREADS / 2;
    while half > 0 {
        for t in 0..half {
            part[t] = op(part[t], part[t + half]);
        }
        half /= 2;
    }
    part[0]
}

/// [`tree_reduce`] of a slice under addition from zero: the same partials in the same order
/// (partial t adds v[t], v[t + 256], … in turn), read block by block so the reads are sequential.
pub(crate) fn tree_sum<T: num_traits::Float>(v: &[T]) -> T {
    let mut part = [T::zero(); TREE_THREADS];
    for block in v.chunks(TREE_THREADS) {
        for (p, &x) in part.iter_mut().zip(block) {
            *p = *p + x;
        }
    }
    let mut half = TREE_THREADS / 2;
    while half > 0 {
        for t in 0..half {
            part[t] = part[t] + part[t + half];
        }
        half /= 2;
    }
    part[0]
}

/// Fail with a shape error unless `v` fits in u32 (WGSL indexes with u32).
pub(crate) fn u32_of(kernel: &'static str, what: &str, v: u64) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| KernelError::Shape {
        kernel,
        msg: format!("{what} = {v} exceeds the 32-bit indexing of WGSL"),
    })
}

#[cfg(test)]
mod layout_tests {
    //! Every launcher's `Params` against the WGSL struct it feeds, read from naga's module: the same
    //! size, and each named field at the same offset (padding fields are named `_…` on both sides).

    type Layout = fn() -> (usize, Vec<(&'static str, usize)>);

    const LAYOUTS: &[(&str, Layout)] = &[
        ("adam", crate::adam::params_layout),
        ("avg_pool", crate::im2col::params_layout),
        ("batch_norm", crate::batch_norm::params_layout),
        ("causal_softmax", crate::causal_softmax::params_layout),
        (
            "channel_sums",
            crate::batch_norm::sums_layout::params_layout,
        ),
        ("col2im", crate::im2col::params_layout),
        ("dropout", crate::dropout::params_layout),
        ("embedding", crate::embedding::params_layout),
        ("fused_linear", crate::fused::params_layout),
        ("gather", crate::gather::params_layout),
        ("gelu", crate::gelu::params_layout),
        ("grad_norm", crate::grad_norm::params_layout),
        ("im2col", crate::im2col::params_layout),
        ("layer_norm", crate::layer_norm::params_layout),
        ("matmul", crate::matmul::params_layout),
        ("matmul128", crate::matmul::params_layout),
        ("matmul_coop", crate::matmul::params_layout),
        ("matmul_half", crate::matmul::params_layout),
        ("matmul_skinny", crate::matmul::params_layout),
        ("matmul_splitk", crate::matmul::params_layout),
        ("max_diff", crate::max_diff::params_layout),
        ("max_pool", crate::im2col::params_layout),
        ("mse", crate::loss::params_layout),
        ("pack_f16", crate::pack::params_layout),
        ("reduce_stats", crate::reduce_stats::params_layout),
        ("sgd", crate::sgd::params_layout),
        ("sigmoid_bce", crate::loss::params_layout),
        ("softmax_xent", crate::loss::params_layout),
    ];

    #[test]
    fn every_params_struct_matches_its_wgsl_layout() {
        for (stem, src) in crate::SHADERS {
            let (_, layout) = LAYOUTS
                .iter()
                .find(|(s, _)| s == stem)
                .unwrap_or_else(|| panic!("{stem}: no Params layout registered in LAYOUTS"));
            let (size, fields) = layout();
            let module = naga::front::wgsl::parse_str(src).expect("parses");
            let (members, span) = module
                .types
                .iter()
                .find_map(|(_, t)| match (&t.name, &t.inner) {
                    (Some(n), naga::TypeInner::Struct { members, span }) if n == "Params" => {
                        Some((members.clone(), *span))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{stem}: no struct Params"));
            assert_eq!(span as usize, size, "{stem}: Params size");
            for m in &members {
                let name = m.name.clone().unwrap_or_default();
                if name.starts_with('_') {
                    continue;
                }
                let rust = fields.iter().find(|(f, _)| *f == name);
                assert_eq!(
                    rust.map(|(_, o)| *o),
                    Some(m.offset as usize),
                    "{stem}: field {name}"
                );
            }
            assert_eq!(
                fields.len(),
                members
                    .iter()
                    .filter(|m| !m.name.as_deref().unwrap_or("_").starts_with('_'))
                    .count(),
                "{stem}: the Rust struct names a field the WGSL one lacks"
            );
        }
    }
}

#[cfg(test)]
mod tree_tests {
    /// The block-wise sum adds in the strided tree's order: the same bits, at lengths below,
    /// at and well past the 256 partials.
    #[test]
    fn tree_sum_is_tree_reduce_bit_for_bit() {
        for n in [0, 1, 255, 256, 257, 1000, 4099] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1013) as f32 * 1.37e-3 - 0.5)
                .collect();
            let a = super::tree_sum(&v);
            let b = super::tree_reduce(n, |i| v[i], 0.0, |p, q| p + q);
            assert_eq!(a.to_bits(), b.to_bits(), "n = {n}");
        }
    }
}
