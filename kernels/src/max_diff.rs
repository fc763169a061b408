//! Launcher for `shaders/max_diff.wgsl`: max |x − y| and max |y| over two device buffers, read back
//! as two numbers (the autotuner's on-device check of a variant against the reference), and its
//! CPU reference.

use crate::{Dispatch, F32, GpuContext, Kernel, KernelError, Slot, need, u32_of};

const GROUPS: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    x_off: u32,
    y_off: u32,
    _pad: u32,
}

crate::params_layout!(Params { n, x_off, y_off });

pub struct MaxDiff {
    partial: Kernel,
    finish: Kernel,
    partials: wgpu::Buffer,
    out: wgpu::Buffer,
}

const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::Uniform,
];

impl MaxDiff {
    pub fn new(ctx: &GpuContext) -> Result<Self, KernelError> {
        Ok(Self {
            partial: Kernel::new(ctx, "max_diff", &[("PARTIAL", 1.0)], SLOTS, false),
            finish: Kernel::new(ctx, "max_diff", &[("PARTIAL", 0.0)], SLOTS, false),
            partials: ctx.array("max_diff partials", F32, 2 * u64::from(GROUPS))?,
            out: ctx.array("max_diff out", F32, 2)?,
        })
    }

    /// (max |x − y|, max |y|) over x[x_off..x_off + n] and y[y_off..y_off + n], waiting for the GPU.
    pub fn run(
        &self,
        ctx: &GpuContext,
        n: u64,
        (x, x_off): (&wgpu::Buffer, u64),
        (y, y_off): (&wgpu::Buffer, u64),
    ) -> Result<(f32, f32), KernelError> {
        const K: &str = "max_diff";
        need(K, "x", x, x_off + n)?;
        need(K, "y", y, y_off + n)?;
        let params = Params {
            n: u32_of(K, "n", n)?,
            x_off: u32_of(K, "x offset", x_off)?,
            y_off: u32_of(K, "y offset", y_off)?,
            _pad: 0,
        };
        let uniform = ctx.uniform("max_diff params", &params);
        let bufs = [x, y, &self.partials, &self.out, &uniform];
        let d1: Dispatch = self.partial.dispatch(ctx, &bufs, (GROUPS, 1));
        let d2: Dispatch = self.finish.dispatch(ctx, &bufs, (1, 1));
        crate::run(ctx, &[&d1, &d2]);
        let v: Vec<f32> = ctx.read(&self.out, 0, 2)?;
        Ok((v[0], v[1]))
    }
}

/// CPU reference: (max |x − y|, max |y|), a NaN or infinity in x counting as f32::MAX.
pub fn max_diff_ref(x: &[f32], y: &[f32]) -> (f32, f32) {
    x.iter().zip(y).fold((0f32, 0f32), |(d, m), (&a, &b)| {
        let e = (a - b).abs();
        let e = if e <= 3.0e38 { e } else { f32::MAX };
        (d.max(e), m.max(b.abs()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    #[test]
    fn the_largest_difference_and_magnitude_match_the_reference() {
        let ctx = ctx();
        let md = MaxDiff::new(&ctx).unwrap();
        for n in [1usize, 300, 70_001] {
            let y = random(n + 2, 1);
            let mut x = random(n + 5, 2);
            let xb = ctx.upload("x", &x).unwrap();
            let yb = ctx.upload("y", &y).unwrap();
            let got = md.run(&ctx, n as u64, (&xb, 5), (&yb, 2)).unwrap();
            assert_eq!(got, max_diff_ref(&x[5..5 + n], &y[2..2 + n]), "n {n}");
            // a NaN anywhere is the largest difference there is
            x[5 + n / 2] = f32::NAN;
            let xb = ctx.upload("x", &x).unwrap();
            let got = md.run(&ctx, n as u64, (&xb, 5), (&yb, 2)).unwrap();
            assert!(got.0 >= 3.0e38, "n {n}: NaN gave {}", got.0);
        }
    }
}
