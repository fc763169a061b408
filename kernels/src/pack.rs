//! Launcher for `shaders/pack_f16.wgsl`: an f32 operand repacked as a zero-padded row-major f16
//! matrix for the tensor-core kernel, and its CPU reference.

use crate::context::groups_1d;
use crate::{DType, Dispatch, GpuContext, Kernel, KernelError, Slot, need, need_of, u32_of};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    src_off: u32,
    col_major: u32,
    dst_rows: u32,
    dst_cols: u32,
    _pad: [u32; 2],
}

crate::params_layout!(Params {
    rows,
    cols,
    src_off,
    col_major,
    dst_rows,
    dst_cols
});

/// Where the operand is and how it is stored.
#[derive(Clone, Copy, Debug)]
pub struct PackArgs<'a> {
    pub src: &'a wgpu::Buffer,
    /// Element offset of the operand in `src`.
    pub src_off: u64,
    pub rows: u64,
    pub cols: u64,
    /// Element (r, c) is at r + c·rows (else r·cols + c).
    pub col_major: bool,
    /// The f16 destination, dst_rows × dst_cols (dst_cols a multiple of 4).
    pub dst: &'a wgpu::Buffer,
    pub dst_rows: u64,
    pub dst_cols: u64,
}

pub struct Pack {
    kernel: Kernel,
}

impl Pack {
    pub fn try_new(ctx: &GpuContext) -> Result<Self, KernelError> {
        Ok(Self {
            kernel: Kernel::try_new(
                ctx,
                "pack_f16",
                &[],
                &[Slot::Read, Slot::ReadWrite, Slot::Uniform],
                true,
            )?,
        })
    }

    pub fn prepare(&self, ctx: &GpuContext, a: &PackArgs<'_>) -> Result<Dispatch, KernelError> {
        const K: &str = "pack_f16";
        if !a.dst_cols.is_multiple_of(4) || a.rows > a.dst_rows || a.cols > a.dst_cols {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!(
                    "{}×{} into {}×{} (columns a multiple of 4)",
                    a.rows, a.cols, a.dst_rows, a.dst_cols
                ),
            });
        }
        need(K, "src", a.src, a.src_off + a.rows * a.cols)?;
        need_of(K, "dst", a.dst, DType::F16, a.dst_rows * a.dst_cols)?;
        u32_of(K, "src extent", a.src_off + a.rows * a.cols)?;
        let params = Params {
            rows: u32_of(K, "rows", a.rows)?,
            cols: u32_of(K, "cols", a.cols)?,
            src_off: u32_of(K, "src offset", a.src_off)?,
            col_major: u32::from(a.col_major),
            dst_rows: u32_of(K, "dst rows", a.dst_rows)?,
            dst_cols: u32_of(K, "dst cols", a.dst_cols)?,
            _pad: [0; 2],
        };
        let quads = u32_of(K, "dst quads", a.dst_rows * a.dst_cols / 4)?;
        let uniform = ctx.uniform("pack params", &params);
        Ok(self
            .kernel
            .dispatch(ctx, &[a.src, a.dst, &uniform], groups_1d(quads, 256)))
    }
}

/// CPU reference: the packed matrix as f16 values widened to f32.
pub fn pack_ref(
    src: &[f32],
    a_rows: u64,
    a_cols: u64,
    col_major: bool,
    dst_rows: u64,
    dst_cols: u64,
) -> Vec<f32> {
    let mut out = vec![0f32; (dst_rows * dst_cols) as usize];
    for r in 0..a_rows {
        for c in 0..a_cols {
            let v = if col_major {
                src[(c * a_rows + r) as usize]
            } else {
                src[(r * a_cols + c) as usize]
            };
            out[(r * dst_cols + c) as usize] = half::f16::from_f32(v).to_f32();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    #[test]
    fn packing_matches_the_reference_in_both_layouts_with_padding() {
        let ctx = ctx();
        let pack = Pack::try_new(&ctx).unwrap();
        let (rows, cols, off) = (37u64, 45u64, 7u64);
        let v = random((off + rows * cols) as usize, 3);
        let src = ctx.upload("src", &v).unwrap();
        for col_major in [false, true] {
            let (dr, dc) = (128u64, 64u64);
            let dst = ctx.array("dst", DType::F16, dr * dc).unwrap();
            let d = pack
                .prepare(
                    &ctx,
                    &PackArgs {
                        src: &src,
                        src_off: off,
                        rows,
                        cols,
                        col_major,
                        dst: &dst,
                        dst_rows: dr,
                        dst_cols: dc,
                    },
                )
                .unwrap();
            crate::run(&ctx, &[&d]);
            let got: Vec<f32> = ctx
                .read::<half::f16>(&dst, 0, (dr * dc) as usize)
                .unwrap()
                .iter()
                .map(|h| h.to_f32())
                .collect();
            let want = pack_ref(&v[off as usize..], rows, cols, col_major, dr, dc);
            assert_eq!(got, want, "col_major {col_major}");
        }
    }
}
