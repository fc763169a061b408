//! Launcher for `shaders/dropout.wgsl`: inverted dropout whose mask is a hash of (seed, step, layer,
//! global sample, unit), and the CPU reference that the CPU backend uses.

use crate::context::groups_1d;
use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

/// The mask's fixed settings: which run and which layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub seed: u64,
    pub layer: u32,
    /// Drop probability in [0, 1).
    pub p: f64,
}

impl DropoutMask {
    /// The 24-bit threshold below which a unit is dropped: round(p · 2^24).
    pub fn threshold(&self) -> u32 {
        (self.p * f64::from(1u32 << 24)).round() as u32
    }

    /// 1 / (1 - p), the factor applied to the units kept.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    /// The factor for unit `unit` of global sample `sample` at optimiser step `step`: 0 or 1/(1-p).
    pub fn factor(&self, step: u64, sample: u32, unit: u32) -> f32 {
        let mut h = mix(0x9e37_79b9, self.seed as u32);
        h = mix(h, (self.seed >> 32) as u32);
        h = mix(h, step as u32);
        h = mix(h, (step >> 32) as u32);
        h = mix(h, self.layer);
        h = mix(h, sample);
        h = mix(h, unit);
        if (h >> 8) >= self.threshold() {
            self.scale()
        } else {
            0.0
        }
    }
}

fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

fn mix(h: u32, v: u32) -> u32 {
    lowbias32(h ^ v)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    offset: u32,
    index_base: u32,
    seed_lo: u32,
    seed_hi: u32,
    step_lo: u32,
    step_hi: u32,
    layer: u32,
    threshold: u32,
    scale: f32,
    _pad: u32,
}

crate::params_layout!(Params {
    rows,
    cols,
    offset,
    index_base,
    seed_lo,
    seed_hi,
    step_lo,
    step_hi,
    layer,
    threshold,
    scale
});

/// A prepared dropout over a [rows, cols] activation (forward) or its gradient (backward, in place).
pub struct DropoutCall {
    pub dispatch: Dispatch,
    ring: UniformRing,
    params: Params,
    index_len: u64,
}

impl DropoutCall {
    /// Ring block `slot` drops for the batch at index[offset..] of optimiser step `step`; returns
    /// its dynamic offset.
    pub fn write_step(
        &mut self,
        ctx: &GpuContext,
        slot: u64,
        offset: u64,
        step: u64,
    ) -> Result<u32, KernelError> {
        if offset + u64::from(self.params.rows) > self.index_len {
            return Err(KernelError::Shape {
                kernel: "dropout",
                msg: format!("rows from {offset} past the index ({})", self.index_len),
            });
        }
        self.params.offset = u32_of("dropout", "offset", offset)?;
        self.params.step_lo = step as u32;
        self.params.step_hi = (step >> 32) as u32;
        self.ring.write(ctx, slot, bytemuck::bytes_of(&self.params))
    }
}

pub struct Dropout {
    forward: Kernel,
    backward: Kernel,
}

const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::ReadWrite,
    Slot::Read,
    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
];

impl Dropout {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            forward: Kernel::new(ctx, "dropout", &[("IN_PLACE", 0.0)], SLOTS, false),
            backward: Kernel::new(ctx, "dropout", &[("IN_PLACE", 1.0)], SLOTS, false),
        }
    }

    /// Forward when `src` is given (dst = src · mask), else backward in place on `dst`. `index` holds
    /// the epoch's order; `index_base` shifts its entries to global sample numbers; `placeholder` is
    /// bound for the unused source in place.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        mask: &DropoutMask,
        rows: u64,
        cols: u64,
        src: Option<&wgpu::Buffer>,
        dst: &wgpu::Buffer,
        index: &wgpu::Buffer,
        index_base: u64,
        placeholder: &wgpu::Buffer,
    ) -> Result<DropoutCall, KernelError> {
        const K: &str = "dropout";
        if !(0.0..1.0).contains(&mask.p) {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("drop probability {} outside [0, 1)", mask.p),
            });
        }
        if let Some(s) = src {
            need(K, "src", s, rows * cols)?;
        }
        need(K, "dst", dst, rows * cols)?;
        let total = u32_of(K, "elements", rows * cols)?;
        let params = Params {
            rows: u32_of(K, "rows", rows)?,
            cols: u32_of(K, "cols", cols)?,
            offset: 0,
            index_base: u32_of(K, "index base", index_base)?,
            seed_lo: mask.seed as u32,
            seed_hi: (mask.seed >> 32) as u32,
            step_lo: 0,
            step_hi: 0,
            layer: mask.layer,
            threshold: mask.threshold(),
            scale: mask.scale(),
            _pad: 0,
        };
        let ring = UniformRing::new(
            ctx,
            "dropout params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        ring.write(ctx, 0, bytemuck::bytes_of(&params))?;
        let kernel = if src.is_some() {
            &self.forward
        } else {
            &self.backward
        };
        let dispatch = kernel.dispatch(
            ctx,
            &[src.unwrap_or(placeholder), dst, index, &ring.buffer],
            groups_1d(total, 256),
        );
        Ok(DropoutCall {
            dispatch,
            ring,
            params,
            index_len: index.size() / 4,
        })
    }
}

/// CPU reference: x[r, j] · factor for rows whose global sample numbers are `samples`.
pub fn dropout_ref(
    mask: &DropoutMask,
    step: u64,
    samples: &[u32],
    x: &[f32],
    cols: usize,
) -> Vec<f32> {
    x.chunks(cols)
        .zip(samples)
        .flat_map(|(row, &s)| {
            row.iter()
                .enumerate()
                .map(move |(j, &v)| v * mask.factor(step, s, j as u32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    #[test]
    fn the_mask_matches_the_reference_forward_and_in_place() {
        let ctx = ctx();
        let (rows, cols, off, base) = (37usize, 129usize, 5usize, 1000u32);
        let index: Vec<u32> = (0..60u32).map(|i| (i * 7) % 60).collect();
        let x = random(rows * cols, 4);
        let mask = DropoutMask {
            seed: 0x1234_5678_9abc,
            layer: 2,
            p: 0.3,
        };
        let ib = ctx.upload("index", &index).unwrap();
        let xb = ctx.upload("x", &x).unwrap();
        let yb = ctx.storage("y", (rows * cols * 4) as u64).unwrap();
        let gb = ctx.upload("g", &x).unwrap();
        let ph = ctx.storage("placeholder", 4).unwrap();
        let d = Dropout::new(&ctx);
        let mut fwd = d
            .prepare(
                &ctx,
                &mask,
                rows as u64,
                cols as u64,
                Some(&xb),
                &yb,
                &ib,
                u64::from(base),
                &ph,
            )
            .unwrap();
        let mut bwd = d
            .prepare(
                &ctx,
                &mask,
                rows as u64,
                cols as u64,
                None,
                &gb,
                &ib,
                u64::from(base),
                &ph,
            )
            .unwrap();
        fwd.write_step(&ctx, 0, off as u64, 77).unwrap();
        bwd.write_step(&ctx, 0, off as u64, 77).unwrap();
        crate::run(&ctx, &[&fwd.dispatch, &bwd.dispatch]);
        let samples: Vec<u32> = index[off..off + rows].iter().map(|i| i + base).collect();
        let want = dropout_ref(&mask, 77, &samples, &x, cols);
        // the same bits: a mask decision that differed would show as 0 against x/(1-p)
        assert_eq!(ctx.read::<f32>(&yb, 0, rows * cols).unwrap(), want);
        assert_eq!(ctx.read::<f32>(&gb, 0, rows * cols).unwrap(), want);
        let dropped = want.iter().filter(|v| **v == 0.0).count() as f64 / want.len() as f64;
        assert!((dropped - 0.3).abs() < 0.03, "dropped share {dropped}");
        assert!(fwd.write_step(&ctx, 0, 30, 1).is_err());
    }

    #[test]
    fn masks_differ_between_steps_samples_and_layers() {
        let m = DropoutMask {
            seed: 1,
            layer: 0,
            p: 0.5,
        };
        let row = |mask: &DropoutMask, step, sample| -> Vec<f32> {
            (0..256).map(|j| mask.factor(step, sample, j)).collect()
        };
        let base = row(&m, 3, 10);
        assert_ne!(base, row(&m, 4, 10));
        assert_ne!(base, row(&m, 3, 11));
        assert_ne!(base, row(&DropoutMask { layer: 1, ..m }, 3, 10));
        assert_eq!(base, row(&m, 3, 10));
        let none = DropoutMask { p: 0.0, ..m };
        assert!(row(&none, 3, 10).iter().all(|&f| f == 1.0));
    }
}
