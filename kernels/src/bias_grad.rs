//! Launcher for `shaders/bias_grad.wgsl`: column sums of dZ into the flat gradient buffer, and its CPU reference.

use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    dst_off: u32,
    accumulate: u32,
}

crate::params_layout!(Params {
    rows,
    cols,
    dst_off,
    accumulate
});

pub struct BiasGrad {
    kernel: Kernel,
}

impl BiasGrad {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            kernel: Kernel::new(
                ctx,
                "bias_grad",
                &[],
                &[Slot::Read, Slot::ReadWrite, Slot::Uniform],
                false,
            ),
        }
    }

    /// grads[dst_off + j] = Σ_r dz[r, j], or += with `accumulate` (micro-batches of one update).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        rows: u64,
        cols: u64,
        dz: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        dst_off: u64,
        accumulate: bool,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "bias_grad";
        need(K, "dz", dz, rows * cols)?;
        need(K, "grads", grads, dst_off + cols)?;
        let params = Params {
            rows: u32_of(K, "rows", rows)?,
            cols: u32_of(K, "cols", cols)?,
            dst_off: u32_of(K, "offset", dst_off)?,
            accumulate: u32::from(accumulate),
        };
        // 16 columns per workgroup
        let groups = params.cols.div_ceil(16);
        if groups > 65535 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("{cols} columns"),
            });
        }
        let uniform = ctx.uniform("bias_grad params", &params);
        Ok(self
            .kernel
            .dispatch(ctx, &[dz, grads, &uniform], (groups, 1)))
    }
}

/// CPU reference: column sums in f64.
pub fn bias_grad_ref(dz: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|j| (0..rows).map(|r| f64::from(dz[r * cols + j])).sum::<f64>() as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    #[test]
    fn column_sums_match_the_reference_at_an_offset() {
        let (rows, cols, off) = (203, 71, 9);
        check_sums(rows, cols, off);
        // fewer rows than the 16 lanes, and one column
        check_sums(5, 1, 0);
        check_sums(1000, 33, 3);
    }

    fn check_sums(rows: usize, cols: usize, off: usize) {
        for accumulate in [false, true] {
            let ctx = ctx();
            let dz = random(rows * cols, 8);
            let dzb = ctx.upload("dz", &dz).unwrap();
            let gb = ctx.upload("grads", &vec![5.0f32; off + cols + 3]).unwrap();
            let d = BiasGrad::new(&ctx)
                .prepare(
                    &ctx,
                    rows as u64,
                    cols as u64,
                    &dzb,
                    &gb,
                    off as u64,
                    accumulate,
                )
                .unwrap();
            crate::run(&ctx, &[&d]);
            let g: Vec<f32> = ctx.read(&gb, 0, off + cols + 3).unwrap();
            assert!(g[..off].iter().chain(&g[off + cols..]).all(|&v| v == 5.0));
            let mut want = bias_grad_ref(&dz, rows, cols);
            if accumulate {
                want.iter_mut().for_each(|v| *v += 5.0);
            }
            assert_close(&g[off..off + cols], &want, 1e-5, "db");
        }
    }
}
