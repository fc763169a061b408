//! Launchers for `shaders/im2col.wgsl` and `shaders/col2im.wgsl`: the columns of a 2-D convolution
//! (so that it runs on the tuned matrix products) and their adjoint (the input's gradient), with
//! CPU references that the CPU backend uses.
//!
//! Layout: `x` is NCHW; `cols` is [N·OH·OW, C·KH·KW], one row per output pixel, its columns in
//! PyTorch's weight order (c, kh, kw). The convolution is then `cols · Wᵀ` with W = [OC, C·KH·KW].

use crate::context::groups_1d;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

/// The geometry of a 2-D convolution or pooling window over an NCHW tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Batch, channels, height and width of the input.
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl Window {
    /// Output height and width, as PyTorch computes them: ⌊(H + 2·pad − KH) / stride⌋ + 1; None
    /// when the window does not fit or the stride is 0.
    pub fn out(&self) -> Option<(usize, usize)> {
        if self.stride == 0 || self.kh == 0 || self.kw == 0 {
            return None;
        }
        let (h, w) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        if h < self.kh || w < self.kw {
            return None;
        }
        Some((
            (h - self.kh) / self.stride + 1,
            (w - self.kw) / self.stride + 1,
        ))
    }

    /// Elements of the input.
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Rows and columns of the column matrix.
    pub fn cols_shape(&self) -> Option<(usize, usize)> {
        let (oh, ow) = self.out()?;
        Some((self.n * oh * ow, self.c * self.kh * self.kw))
    }

    /// The kernels' uniform block for this window (an error naming `kernel` when it does not fit).
    pub(crate) fn params_for(&self, kernel: &'static str) -> Result<Params, KernelError> {
        let (oh, ow) = self.out().ok_or_else(|| KernelError::Shape {
            kernel,
            msg: format!(
                "a {}×{} window with stride {} and padding {} does not fit a {}×{} input",
                self.kh, self.kw, self.stride, self.pad, self.h, self.w
            ),
        })?;
        let (rows, width) = (self.n * oh * ow, self.c * self.kh * self.kw);
        u32_of(kernel, "column elements", (rows as u64) * (width as u64))?;
        u32_of(kernel, "input elements", self.input_len() as u64)?;
        Ok(Params {
            n: u32_of(kernel, "n", self.n as u64)?,
            c: u32_of(kernel, "c", self.c as u64)?,
            h: u32_of(kernel, "h", self.h as u64)?,
            w: u32_of(kernel, "w", self.w as u64)?,
            kh: u32_of(kernel, "kh", self.kh as u64)?,
            kw: u32_of(kernel, "kw", self.kw as u64)?,
            stride: u32_of(kernel, "stride", self.stride as u64)?,
            pad: u32_of(kernel, "pad", self.pad as u64)?,
            oh: u32_of(kernel, "oh", oh as u64)?,
            ow: u32_of(kernel, "ow", ow as u64)?,
            _pad0: 0,
            _pad1: 0,
        })
    }
}

/// The uniform block of im2col, col2im and the pooling kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    _pad0: u32,
    _pad1: u32,
}

crate::params_layout!(Params {
    n,
    c,
    h,
    w,
    kh,
    kw,
    stride,
    pad,
    oh,
    ow
});

const SLOTS: &[Slot] = &[Slot::Read, Slot::ReadWrite, Slot::Uniform];

/// The two kernels, built once per device.
pub struct Im2col {
    im2col: Kernel,
    col2im: Kernel,
}

impl Im2col {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            im2col: Kernel::new(ctx, "im2col", &[], SLOTS, false),
            col2im: Kernel::new(ctx, "col2im", &[], SLOTS, false),
        }
    }

    /// cols = im2col(x) for the window `win`.
    pub fn im2col(
        &self,
        ctx: &GpuContext,
        win: &Window,
        x: &wgpu::Buffer,
        cols: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "im2col";
        let p = win.params_for(K)?;
        let (rows, width) = win.cols_shape().unwrap_or((0, 0));
        need(K, "x", x, win.input_len() as u64)?;
        need(K, "cols", cols, (rows * width) as u64)?;
        let u = ctx.uniform("im2col params", &p);
        let total = u32_of(K, "column elements", (rows * width) as u64)?;
        Ok(self
            .im2col
            .dispatch(ctx, &[x, cols, &u], groups_1d(total, 256)))
    }

    /// dx = col2im(dcols): the adjoint of [`Im2col::im2col`] (overwrites dx).
    pub fn col2im(
        &self,
        ctx: &GpuContext,
        win: &Window,
        dcols: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "col2im";
        let p = win.params_for(K)?;
        let (rows, width) = win.cols_shape().unwrap_or((0, 0));
        need(K, "dcols", dcols, (rows * width) as u64)?;
        need(K, "dx", dx, win.input_len() as u64)?;
        let u = ctx.uniform("col2im params", &p);
        let total = u32_of(K, "input elements", win.input_len() as u64)?;
        Ok(self
            .col2im
            .dispatch(ctx, &[dcols, dx, &u], groups_1d(total, 256)))
    }
}

/// CPU reference of `im2col.wgsl` (None when the window does not fit).
pub fn im2col_ref<T: num_traits::Float>(win: &Window, x: &[T]) -> Option<Vec<T>> {
    let (oh_n, ow_n) = win.out()?;
    let (rows, width) = win.cols_shape()?;
    let mut cols = vec![T::zero(); rows * width];
    let plane = win.h * win.w;
    // a gather: every value lands where the kernel puts it, whatever the loop order; rows of the
    // input are copied a kernel row at a time, the padding left zero
    for n in 0..win.n {
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                let r = (n * oh_n + oh) * ow_n + ow;
                let row = &mut cols[r * width..(r + 1) * width];
                for c in 0..win.c {
                    let src = &x[(n * win.c + c) * plane..(n * win.c + c + 1) * plane];
                    for kh in 0..win.kh {
                        let Some(ih) = (oh * win.stride + kh).checked_sub(win.pad) else {
                            continue;
                        };
                        if ih >= win.h {
                            continue;
                        }
                        let line = &src[ih * win.w..(ih + 1) * win.w];
                        let dst =
                            &mut row[(c * win.kh + kh) * win.kw..(c * win.kh + kh + 1) * win.kw];
                        for (kw, d) in dst.iter_mut().enumerate() {
                            if let Some(iw) = (ow * win.stride + kw).checked_sub(win.pad)
                                && iw < win.w
                            {
                                *d = line[iw];
                            }
                        }
                    }
                }
            }
        }
    }
    Some(cols)
}

/// CPU reference of `col2im.wgsl`: the same sums, in the same order (kh, then kw, ascending), so
/// the two agree bit for bit.
pub fn col2im_ref<T: num_traits::Float>(win: &Window, dcols: &[T]) -> Option<Vec<T>> {
    let (oh_n, ow_n) = win.out()?;
    let (_, width) = win.cols_shape()?;
    let mut dx = vec![T::zero(); win.input_len()];
    for n in 0..win.n {
        for c in 0..win.c {
            for ih in 0..win.h {
                for iw in 0..win.w {
                    let mut sum = T::zero();
                    for kh in 0..win.kh {
                        let Some(th) = (ih + win.pad).checked_sub(kh) else {
                            continue;
                        };
                        if th % win.stride != 0 || th / win.stride >= oh_n {
                            continue;
                        }
                        let oh = th / win.stride;
                        for kw in 0..win.kw {
                            let Some(tw) = (iw + win.pad).checked_sub(kw) else {
                                continue;
                            };
                            if tw % win.stride != 0 || tw / win.stride >= ow_n {
                                continue;
                            }
                            let ow = tw / win.stride;
                            sum = sum
                                + dcols[((n * oh_n + oh) * ow_n + ow) * width
                                    + (c * win.kh + kh) * win.kw
                                    + kw];
                        }
                    }
                    dx[((n * win.c + c) * win.h + ih) * win.w + iw] = sum;
                }
            }
        }
    }
    Some(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    /// Odd channel counts, 7×7 and 13×13 images, strides 1 and 2, padding 0 to 2, 1×1 to 5×5 windows.
    fn windows() -> Vec<Window> {
        let w = |n, c, h, w, kh, kw, stride, pad| Window {
            n,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
        };
        vec![
            w(2, 3, 7, 7, 3, 3, 1, 1),
            w(3, 5, 13, 13, 3, 3, 2, 1),
            w(1, 1, 13, 7, 5, 5, 1, 2),
            w(2, 7, 7, 13, 1, 1, 2, 0),
            w(2, 3, 7, 7, 2, 3, 2, 0),
            w(1, 6, 5, 5, 5, 5, 1, 0),
        ]
    }

    #[test]
    fn output_sizes_follow_pytorch() {
        let win = Window {
            n: 1,
            c: 1,
            h: 32,
            w: 32,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        };
        assert_eq!(win.out(), Some((16, 16)));
        assert_eq!(Window { pad: 0, ..win }.out(), Some((15, 15)));
        assert_eq!(
            Window {
                kh: 5,
                kw: 5,
                stride: 1,
                pad: 0,
                h: 28,
                w: 28,
                ..win
            }
            .out(),
            Some((24, 24))
        );
        assert_eq!(Window { kh: 40, ..win }.out(), None);
        assert_eq!(Window { stride: 0, ..win }.out(), None);
    }

    /// col2im is the adjoint of im2col: ⟨im2col(x), y⟩ = ⟨x, col2im(y)⟩ in f64, for every window.
    /// (Both are linear, so this is what finite differences check for a non-linear layer: the
    /// backward pass is the transpose of the forward one.)
    #[test]
    fn the_references_are_adjoint() {
        for (i, win) in windows().into_iter().enumerate() {
            let (rows, width) = win.cols_shape().unwrap();
            let x = random(win.input_len(), 10 + i as u64);
            let y = random(rows * width, 20 + i as u64);
            let cx = im2col_ref(&win, &x).unwrap();
            let ty = col2im_ref(&win, &y).unwrap();
            let lhs: f64 = cx
                .iter()
                .zip(&y)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let rhs: f64 = x
                .iter()
                .zip(&ty)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            assert!(
                (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
                "{win:?}: {lhs} vs {rhs}"
            );
        }
    }

    /// A direct convolution in f64 against cols · Wᵀ from the reference columns.
    #[test]
    fn columns_times_weights_is_the_convolution() {
        let win = Window {
            n: 2,
            c: 3,
            h: 7,
            w: 6,
            kh: 3,
            kw: 2,
            stride: 2,
            pad: 1,
        };
        let oc = 4;
        let (oh_n, ow_n) = win.out().unwrap();
        let (rows, width) = win.cols_shape().unwrap();
        let x = random(win.input_len(), 3);
        let wt = random(oc * width, 4);
        let cols = im2col_ref(&win, &x).unwrap();
        for n in 0..win.n {
            for o in 0..oc {
                for oh in 0..oh_n {
                    for ow in 0..ow_n {
                        let mut direct = 0f64;
                        for c in 0..win.c {
                            for kh in 0..win.kh {
                                for kw in 0..win.kw {
                                    let ih = (oh * 2 + kh) as i64 - 1;
                                    let iw = (ow * 2 + kw) as i64 - 1;
                                    if ih < 0 || iw < 0 || ih >= 7 || iw >= 6 {
                                        continue;
                                    }
                                    let xv = x[((n * 3 + c) * 7 + ih as usize) * 6 + iw as usize];
                                    let wv = wt[o * width + (c * 3 + kh) * 2 + kw];
                                    direct += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        let r = (n * oh_n + oh) * ow_n + ow;
                        assert!(r < rows);
                        let gemm: f64 = (0..width)
                            .map(|q| f64::from(cols[r * width + q]) * f64::from(wt[o * width + q]))
                            .sum();
                        assert!((gemm - direct).abs() < 1e-9, "{gemm} vs {direct}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_kernels_match_their_references_bit_for_bit() {
        let ctx = ctx();
        let k = Im2col::new(&ctx);
        for (i, win) in windows().into_iter().enumerate() {
            let (rows, width) = win.cols_shape().unwrap();
            let x = random(win.input_len(), 30 + i as u64);
            let y = random(rows * width, 40 + i as u64);
            let xb = ctx.upload("x", &x).unwrap();
            let yb = ctx.upload("dcols", &y).unwrap();
            let cb = ctx.storage("cols", (rows * width * 4) as u64).unwrap();
            let db = ctx.storage("dx", (win.input_len() * 4) as u64).unwrap();
            let f = k.im2col(&ctx, &win, &xb, &cb).unwrap();
            let b = k.col2im(&ctx, &win, &yb, &db).unwrap();
            crate::run(&ctx, &[&f, &b]);
            assert_eq!(
                ctx.read::<f32>(&cb, 0, rows * width).unwrap(),
                im2col_ref(&win, &x).unwrap(),
                "im2col {win:?}"
            );
            assert_eq!(
                ctx.read::<f32>(&db, 0, win.input_len()).unwrap(),
                col2im_ref(&win, &y).unwrap(),
                "col2im {win:?}"
            );
        }
    }

    #[test]
    fn a_window_that_does_not_fit_or_short_buffers_are_errors() {
        let ctx = ctx();
        let k = Im2col::new(&ctx);
        let win = Window {
            n: 1,
            c: 2,
            h: 4,
            w: 4,
            kh: 5,
            kw: 5,
            stride: 1,
            pad: 0,
        };
        let b = ctx.storage("b", 4096).unwrap();
        let e = k.im2col(&ctx, &win, &b, &b).err().unwrap().to_string();
        assert!(e.contains("does not fit"), "{e}");
        let win = Window {
            kh: 3,
            kw: 3,
            ..win
        };
        let small = ctx.storage("small", 16).unwrap();
        assert!(k.im2col(&ctx, &win, &small, &b).is_err());
        assert!(k.col2im(&ctx, &win, &b, &small).is_err());
    }
}
