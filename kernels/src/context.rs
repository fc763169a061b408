//! The GPU context: adapter choice, device with the adapter's own limits, buffers, upload and readback.
//!
//! Everything device-related that every launcher needs lives here, made once (wgpu's
//! `repeated_compute` example holds device, queue and pipelines in one struct the same way).

use std::sync::{Arc, Mutex};

use crate::{DType, Dispatch, KernelError};

/// Which adapter to open.
#[derive(Clone, Debug, Default)]
pub struct AdapterChoice {
    /// Index into [`list_adapters`]; `None` picks by `local_rank`.
    pub index: Option<usize>,
    /// This process's rank on its node: without an index it takes adapter `local_rank % count`,
    /// so ranks on one node spread over its GPUs (0 in a single process: the best adapter).
    pub local_rank: usize,
}

/// What `dptrain devices` prints about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

impl AdapterReport {
    /// The features that matter to this trainer, by name.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let f = self.features;
        let mut v = Vec::new();
        for (flag, name) in [
            (wgpu::Features::SUBGROUP, "subgroup"),
            (wgpu::Features::SHADER_F16, "shader-f16"),
            (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
            (
                wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
                "timestamp-inside-passes",
            ),
            (
                wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
                "cooperative-matrix",
            ),
        ] {
            if f.contains(flag) {
                v.push(name);
            }
        }
        v
    }
}

fn instance() -> wgpu::Instance {
    // Vulkan, Metal and DX12 by default; WGPU_BACKEND=vulkan,gl,... overrides. No validation layers
    // unless WGPU_VALIDATION=1: they are rarely installed and slow every call when they are.
    let backends = wgpu::Backends::PRIMARY.with_env();
    let flags = wgpu::InstanceFlags::empty().with_env();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    desc.flags = flags;
    wgpu::Instance::new(desc)
}

fn rank_of(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Adapters in a stable order: best kind first, then by name, so `--gpu N` means the same thing
/// on every rank of a node.
fn sorted_adapters(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
    let wanted = wgpu::Backends::PRIMARY.with_env();
    adapters.retain(|a| wanted.contains(wgpu::Backends::from(a.get_info().backend)));
    adapters.sort_by(|a, b| {
        let (ia, ib) = (a.get_info(), b.get_info());
        (rank_of(ia.device_type), ia.name.clone(), ia.backend as u8).cmp(&(
            rank_of(ib.device_type),
            ib.name.clone(),
            ib.backend as u8,
        ))
    });
    adapters
}

/// Every adapter wgpu can see, in the order `--gpu INDEX` uses.
pub fn list_adapters() -> Vec<AdapterReport> {
    sorted_adapters(&instance())
        .into_iter()
        .enumerate()
        .map(|(index, a)| AdapterReport {
            index,
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
        })
        .collect()
}

/// How a shader module is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShaderChecks {
    /// wgpu's runtime bounds checks on every access (tests, and any kernel not proven in range).
    Checked,
    /// No runtime checks: 16× faster register-blocked matrix products on NVIDIA. Only for kernels
    /// whose every index is in range by construction and whose tests pass with checks on.
    Unchecked,
}

impl ShaderChecks {
    /// Checked in debug builds (tests), unchecked in release; `DPTRAIN_SHADER_CHECKS=on|off` overrides.
    pub fn from_env() -> Self {
        match std::env::var("DPTRAIN_SHADER_CHECKS").as_deref() {
            Ok("on") | Ok("1") => Self::Checked,
            Ok("off") | Ok("0") => Self::Unchecked,
            _ if cfg!(debug_assertions) => Self::Checked,
            _ => Self::Unchecked,
        }
    }
}

/// One opened device with its queue.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub checks: ShaderChecks,
    /// The first validation or out-of-memory error the device reported; checked at every sync point.
    error: Arc<Mutex<Option<String>>>,
}

impl GpuContext {
    /// Open an adapter and a device with the adapter's own limits (wgpu's defaults are far lower:
    /// 128 MiB bindings, 16 KiB workgroup memory, 256 invocations).
    pub fn new(choice: &AdapterChoice) -> Result<Self, KernelError> {
        let inst = instance();
        let mut adapters = sorted_adapters(&inst);
        if adapters.is_empty() {
            return Err(KernelError::NoAdapter);
        }
        let index = choice.index.unwrap_or(choice.local_rank % adapters.len());
        if index >= adapters.len() {
            return Err(KernelError::AdapterIndex {
                index,
                count: adapters.len(),
            });
        }
        let adapter = adapters.swap_remove(index);
        let info = adapter.get_info();
        let limits = adapter.limits();
        let wanted = wgpu::Features::SUBGROUP
            | wgpu::Features::SHADER_F16
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let mut features = adapter.features() & wanted;
        // tensor cores from WGSL need 16×16×16 f16 × f16 → f32 fragments
        let coop_16 = adapter.cooperative_matrix_properties().iter().any(|p| {
            p.m_size == 16
                && p.n_size == 16
                && p.k_size == 16
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        });
        if !coop_16 || std::env::var("DPTRAIN_COOP").as_deref() == Ok("off") {
            features.remove(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        }
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: the one experimental feature asked for is cooperative matrices; every kernel
            // that uses them is verified against the f32 reference on the device before a run
            // trusts it (the autotuner), and a variant that fails is never used.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("dptrain"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            ..Default::default()
        }))
        .map_err(|e| KernelError::RequestDevice(e.to_string()))?;
        tracing::info!(
            "opened {} ({:?}, {:?}): storage binding {} MiB, workgroup memory {} KiB, {} invocations, features {:?}",
            info.name,
            info.device_type,
            info.backend,
            limits.max_storage_buffer_binding_size >> 20,
            limits.max_compute_workgroup_storage_size >> 10,
            limits.max_compute_invocations_per_workgroup,
            features
        );
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!("wgpu: {e}");
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| first_line(&e.to_string()));
            }
        }));
        Ok(Self {
            device,
            queue,
            info,
            limits,
            features,
            checks: ShaderChecks::from_env(),
            error,
        })
    }

    /// A short "name (type, backend)" description for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.device_type, self.info.backend
        )
    }

    /// Turn any error the device reported since the last check into a `KernelError`.
    pub fn check(&self) -> Result<(), KernelError> {
        match self.error.lock().ok().and_then(|mut e| e.take()) {
            Some(msg) => Err(KernelError::Device(msg)),
            None => Ok(()),
        }
    }

    /// Compile a WGSL module, honouring [`ShaderChecks`] when `trusted` says the kernel's indexing is proven.
    pub fn shader(&self, label: &str, source: &str, trusted: bool) -> wgpu::ShaderModule {
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        if trusted && self.checks == ShaderChecks::Unchecked {
            // SAFETY: only kernels whose indices are in range by construction pass `trusted`, and
            // each of them is tested on random, tile-unaligned sizes with runtime checks on.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        }
    }

    /// Largest single storage binding in bytes.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// A storage buffer of `bytes` (rounded up to 4, at least 4), zero-initialised.
    pub fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer, KernelError> {
        let size = bytes.max(4).div_ceil(4) * 4;
        if size > self.max_binding() {
            return Err(KernelError::TooLarge {
                what: label.to_string(),
                bytes: size,
                limit: self.max_binding(),
            });
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer of `n` elements of type `dtype`, zero-initialised.
    pub fn array(&self, label: &str, dtype: DType, n: u64) -> Result<wgpu::Buffer, KernelError> {
        self.storage(label, dtype.bytes(n))
    }

    /// A storage buffer holding `data`.
    pub fn upload<T: bytemuck::Pod>(
        &self,
        label: &str,
        data: &[T],
    ) -> Result<wgpu::Buffer, KernelError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buf = self.storage(label, bytes.len() as u64)?;
        self.write(&buf, 0, bytes);
        Ok(buf)
    }

    /// Queue a write of `bytes` at `offset` (padded to 4 bytes); it lands before the next submit.
    pub fn write(&self, buf: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(buf, offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(buf, offset, &padded);
        }
    }

    /// A uniform buffer holding `value`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        let bytes = bytemuck::bytes_of(value);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (bytes.len() as u64).div_ceil(16) * 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buf, 0, bytes);
        buf
    }

    /// The GPU time in seconds of each dispatch (with its uniform ring offset), each recorded in a
    /// pass of its own between two timestamps, in one submission; None when the adapter has no
    /// timestamp queries.
    pub fn time_dispatches(
        &self,
        list: &[(&Dispatch, u32)],
    ) -> Result<Option<Vec<f64>>, KernelError> {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) || list.is_empty() {
            return Ok(None);
        }
        let count = u32::try_from(2 * list.len())
            .map_err(|_| KernelError::Device("too many dispatches to time".into()))?;
        let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = u64::from(count) * 8;
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamp resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let out = self.storage("timestamps", bytes)?;
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("timestamps"),
            });
        for (i, (d, at)) in list.iter().enumerate() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(d.name),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &queries,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            d.record_at(&mut pass, *at);
        }
        enc.resolve_query_set(&queries, 0..count, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &out, 0, bytes);
        self.queue.submit([enc.finish()]);
        let ticks: Vec<u64> = self.read(&out, 0, 2 * list.len())?;
        let period_s = f64::from(self.queue.get_timestamp_period()) * 1e-9;
        Ok(Some(
            ticks
                .chunks_exact(2)
                .map(|t| t[1].saturating_sub(t[0]) as f64 * period_s)
                .collect(),
        ))
    }

    /// Copy `count` elements of type T from `buf` (starting at element `start`) to the host, waiting for the GPU.
    pub fn read<T: bytemuck::Pod>(
        &self,
        buf: &wgpu::Buffer,
        start: usize,
        count: usize,
    ) -> Result<Vec<T>, KernelError> {
        let elem = std::mem::size_of::<T>() as u64;
        let bytes = count as u64 * elem;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let padded = bytes.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read"),
            });
        enc.copy_buffer_to_buffer(buf, start as u64 * elem, &staging, 0, padded);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| KernelError::Device("readback callback dropped".into()))?
            .map_err(|e| KernelError::Device(format!("readback failed: {e}")))?;
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| KernelError::Device(format!("readback map: {e}")))?;
        let out = bytemuck::cast_slice::<u8, T>(&view[..bytes as usize]).to_vec();
        drop(view);
        staging.unmap();
        self.check()?;
        Ok(out)
    }

    /// Block until all submitted work is done.
    pub fn wait(&self) -> Result<(), KernelError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| KernelError::Device(e.to_string()))?;
        self.check()
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Workgroup counts for `n` items at `per_group` items each, split over x and y so that no dimension
/// exceeds the 65535 that every adapter allows. Shaders flatten with `id.x + id.y * 65535 * per_group`.
pub fn groups_1d(n: u32, per_group: u32) -> (u32, u32) {
    let g = n.div_ceil(per_group).max(1);
    if g <= 65535 {
        (g, 1)
    } else {
        (65535, g.div_ceil(65535))
    }
}
