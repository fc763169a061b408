//! Launcher for `shaders/gather.wgsl`: a batch gathered on the GPU through an index buffer, and its CPU reference.

use crate::context::groups_1d;
use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    features: u32,
    offset: u32,
    _pad: u32,
}

crate::params_layout!(Params {
    rows,
    features,
    offset
});

/// A dataset resident on the GPU.
pub struct DeviceData {
    /// f32 words, or u8 packed four to a word.
    pub data: wgpu::Buffer,
    pub targets: wgpu::Buffer,
    /// shift[features] then scale[features].
    pub norm: wgpu::Buffer,
    pub samples: u64,
    pub features: u64,
    pub u8_pixels: bool,
}

impl DeviceData {
    /// Upload features (f32 row-major), targets and the normaliser's shift and scale.
    pub fn from_f32(
        ctx: &GpuContext,
        x: &[f32],
        targets: &[f32],
        shift: &[f32],
        scale: &[f32],
    ) -> Result<Self, KernelError> {
        Self::new(ctx, bytemuck::cast_slice(x), false, targets, shift, scale)
    }

    /// Upload u8 features (row-major), packed four to a 32-bit word.
    pub fn from_u8(
        ctx: &GpuContext,
        x: &[u8],
        targets: &[f32],
        shift: &[f32],
        scale: &[f32],
    ) -> Result<Self, KernelError> {
        Self::new(ctx, x, true, targets, shift, scale)
    }

    fn new(
        ctx: &GpuContext,
        bytes: &[u8],
        u8_pixels: bool,
        targets: &[f32],
        shift: &[f32],
        scale: &[f32],
    ) -> Result<Self, KernelError> {
        const K: &str = "gather";
        let samples = targets.len() as u64;
        let features = shift.len() as u64;
        let elem = if u8_pixels { 1 } else { 4 };
        if scale.len() != shift.len() || bytes.len() as u64 != samples * features * elem {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!(
                    "{} feature bytes for {samples} samples × {features} features",
                    bytes.len()
                ),
            });
        }
        u32_of(K, "samples × features", samples * features)?;
        let data = ctx.storage("training data", bytes.len() as u64)?;
        ctx.write(&data, 0, bytes);
        let mut norm = shift.to_vec();
        norm.extend_from_slice(scale);
        Ok(Self {
            data,
            targets: ctx.upload("targets", targets)?,
            norm: ctx.upload("normaliser", &norm)?,
            samples,
            features,
            u8_pixels,
        })
    }
}

/// A prepared gather of `rows` samples; `set_offset` picks which slice of the index buffer.
pub struct GatherCall {
    pub dispatch: Dispatch,
    ring: UniformRing,
    params: Params,
    index_len: u64,
}

impl GatherCall {
    /// Point the gather at index[offset .. offset + rows]; lands before the next submit.
    pub fn set_offset(&mut self, ctx: &GpuContext, offset: u64) -> Result<(), KernelError> {
        self.write_offset(ctx, 0, offset).map(|_| ())
    }

    /// Point ring block `slot` at index[offset .. offset + rows]; returns its dynamic offset.
    pub fn write_offset(
        &mut self,
        ctx: &GpuContext,
        slot: u64,
        offset: u64,
    ) -> Result<u32, KernelError> {
        if offset + u64::from(self.params.rows) > self.index_len {
            return Err(KernelError::Shape {
                kernel: "gather",
                msg: format!(
                    "rows {offset}..{} past the index buffer ({})",
                    offset + u64::from(self.params.rows),
                    self.index_len
                ),
            });
        }
        self.params.offset = u32_of("gather", "offset", offset)?;
        self.ring.write(ctx, slot, bytemuck::bytes_of(&self.params))
    }
}

pub struct Gather {
    f32_kernel: Kernel,
    u8_kernel: Kernel,
}

const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
];

impl Gather {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            f32_kernel: Kernel::new(ctx, "gather", &[("PIXELS_U8", 0.0)], SLOTS, false),
            u8_kernel: Kernel::new(ctx, "gather", &[("PIXELS_U8", 1.0)], SLOTS, false),
        }
    }

    /// Gather `rows` samples of `data` chosen by `index` (u32 sample numbers, each < data.samples:
    /// the caller guarantees it) into x[rows, features] and t[rows].
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        data: &DeviceData,
        index: &wgpu::Buffer,
        rows: u64,
        x: &wgpu::Buffer,
        t: &wgpu::Buffer,
    ) -> Result<GatherCall, KernelError> {
        const K: &str = "gather";
        let index_len = index.size() / 4;
        if rows == 0 || rows > index_len {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("{rows} rows from an index of {index_len}"),
            });
        }
        need(K, "x", x, rows * data.features)?;
        need(K, "t", t, rows)?;
        let params = Params {
            rows: u32_of(K, "rows", rows)?,
            features: u32_of(K, "features", data.features)?,
            offset: 0,
            _pad: 0,
        };
        let ring = UniformRing::new(
            ctx,
            "gather params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        ring.write(ctx, 0, bytemuck::bytes_of(&params))?;
        let kernel = if data.u8_pixels {
            &self.u8_kernel
        } else {
            &self.f32_kernel
        };
        let total = u32_of(K, "batch elements", rows * data.features)?;
        let dispatch = kernel.dispatch(
            ctx,
            &[
                &data.data,
                &data.targets,
                index,
                &data.norm,
                x,
                t,
                &ring.buffer,
            ],
            groups_1d(total, 256),
        );
        Ok(GatherCall {
            dispatch,
            ring,
            params,
            index_len,
        })
    }
}

/// CPU reference: the same gather and normalisation, f32 features.
pub fn gather_ref(
    x: &[f32],
    targets: &[f32],
    features: usize,
    index: &[u32],
    shift: &[f32],
    scale: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut out = Vec::with_capacity(index.len() * features);
    let mut t = Vec::with_capacity(index.len());
    for &i in index {
        let i = i as usize;
        for j in 0..features {
            out.push((x[i * features + j] - shift[j]) * scale[j]);
        }
        t.push(targets[i]);
    }
    (out, t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    fn perm(n: usize, seed: u64) -> Vec<u32> {
        let mut keyed: Vec<(f32, u32)> = random(n, seed).into_iter().zip(0..n as u32).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        keyed.into_iter().map(|(_, i)| i).collect()
    }

    #[test]
    fn f32_gather_matches_the_reference_at_an_offset() {
        let ctx = ctx();
        let (n, f, rows, off) = (301, 13, 77, 150);
        let x = random(n * f, 1);
        let t: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let shift = random(f, 2);
        let scale: Vec<f32> = random(f, 3).iter().map(|v| 1.0 + v.abs()).collect();
        let idx = perm(n, 4);
        let data = DeviceData::from_f32(&ctx, &x, &t, &shift, &scale).unwrap();
        let ibuf = ctx.upload("index", &idx).unwrap();
        let xb = ctx.storage("x", (rows * f * 4) as u64).unwrap();
        let tb = ctx.storage("t", (rows * 4) as u64).unwrap();
        let mut call = Gather::new(&ctx)
            .prepare(&ctx, &data, &ibuf, rows as u64, &xb, &tb)
            .unwrap();
        call.set_offset(&ctx, off as u64).unwrap();
        crate::run(&ctx, &[&call.dispatch]);
        let (wx, wt) = gather_ref(&x, &t, f, &idx[off..off + rows], &shift, &scale);
        assert_close(&ctx.read::<f32>(&xb, 0, rows * f).unwrap(), &wx, 1e-6, "x");
        assert_eq!(ctx.read::<f32>(&tb, 0, rows).unwrap(), wt);
        assert!(call.set_offset(&ctx, (n - rows + 1) as u64).is_err());
    }

    #[test]
    fn packed_u8_gather_unpacks_every_byte_position() {
        let ctx = ctx();
        // 7 features per row so that rows start at every byte position of a word
        let (n, f, rows) = (53, 7, 41);
        let bytes: Vec<u8> = (0..n * f).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let t: Vec<f32> = (0..n).map(|i| (i % 10) as f32).collect();
        let shift = vec![0.0; f];
        let scale = vec![1.0 / 255.0; f];
        let idx = perm(n, 9);
        let data = DeviceData::from_u8(&ctx, &bytes, &t, &shift, &scale).unwrap();
        let ibuf = ctx.upload("index", &idx).unwrap();
        let xb = ctx.storage("x", (rows * f * 4) as u64).unwrap();
        let tb = ctx.storage("t", (rows * 4) as u64).unwrap();
        let mut call = Gather::new(&ctx)
            .prepare(&ctx, &data, &ibuf, rows as u64, &xb, &tb)
            .unwrap();
        call.set_offset(&ctx, 5).unwrap();
        crate::run(&ctx, &[&call.dispatch]);
        let xf: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
        let (wx, wt) = gather_ref(&xf, &t, f, &idx[5..5 + rows], &shift, &scale);
        assert_close(&ctx.read::<f32>(&xb, 0, rows * f).unwrap(), &wx, 1e-6, "x");
        assert_eq!(ctx.read::<f32>(&tb, 0, rows).unwrap(), wt);
    }
}
