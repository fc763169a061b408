//! Launchers for `shaders/max_pool.wgsl` and `shaders/avg_pool.wgsl`: 2-D pooling over NCHW tensors,
//! forward and backward, with CPU references that the CPU backend uses. The window's geometry is
//! [`Window`], shared with the convolution's columns. Both backward passes gather (each input element
//! sums the outputs that read it, in a fixed order), so they are deterministic and use no atomics.

use crate::context::groups_1d;
pub use crate::im2col::Window;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

/// No tap (a window entirely in the padding; it cannot happen with padding < the window).
pub const NO_ARG: u32 = u32::MAX;

const MAX_SLOTS: &[Slot] = &[Slot::Read, Slot::ReadWrite, Slot::ReadWrite, Slot::Uniform];
const AVG_SLOTS: &[Slot] = &[Slot::Read, Slot::ReadWrite, Slot::Uniform];

/// The four pooling kernels, built once per device.
pub struct Pool {
    max_fwd: Kernel,
    max_bwd: Kernel,
    avg_fwd: Kernel,
    avg_bwd: Kernel,
}

/// Which pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
}

impl Pool {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            max_fwd: Kernel::new(ctx, "max_pool", &[("BACKWARD", 0.0)], MAX_SLOTS, false),
            max_bwd: Kernel::new(ctx, "max_pool", &[("BACKWARD", 1.0)], MAX_SLOTS, false),
            avg_fwd: Kernel::new(ctx, "avg_pool", &[("BACKWARD", 0.0)], AVG_SLOTS, false),
            avg_bwd: Kernel::new(ctx, "avg_pool", &[("BACKWARD", 1.0)], AVG_SLOTS, false),
        }
    }

    /// y = pool(x); max pooling also writes each output's tap into `arg` (u32, one per output).
    pub fn forward(
        &self,
        ctx: &GpuContext,
        kind: PoolKind,
        win: &Window,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        arg: Option<&wgpu::Buffer>,
    ) -> Result<Dispatch, KernelError> {
        let (k, p, outs) = checked(kind, win)?;
        need(k, "x", x, win.input_len() as u64)?;
        need(k, "y", y, outs)?;
        let u = ctx.uniform("pool params", &p);
        let groups = groups_1d(u32_of(k, "outputs", outs)?, 256);
        Ok(match kind {
            PoolKind::Max => {
                let arg = index_buffer(k, arg, outs)?;
                self.max_fwd.dispatch(ctx, &[x, y, arg, &u], groups)
            }
            PoolKind::Avg => self.avg_fwd.dispatch(ctx, &[x, y, &u], groups),
        })
    }

    /// dx = the gradient of the input from dy (overwrites dx); max pooling reads the forward's `arg`.
    pub fn backward(
        &self,
        ctx: &GpuContext,
        kind: PoolKind,
        win: &Window,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        arg: Option<&wgpu::Buffer>,
    ) -> Result<Dispatch, KernelError> {
        let (k, p, outs) = checked(kind, win)?;
        need(k, "dy", dy, outs)?;
        need(k, "dx", dx, win.input_len() as u64)?;
        let u = ctx.uniform("pool params", &p);
        let groups = groups_1d(u32_of(k, "inputs", win.input_len() as u64)?, 256);
        Ok(match kind {
            PoolKind::Max => {
                let arg = index_buffer(k, arg, outs)?;
                self.max_bwd.dispatch(ctx, &[dy, dx, arg, &u], groups)
            }
            PoolKind::Avg => self.avg_bwd.dispatch(ctx, &[dy, dx, &u], groups),
        })
    }
}

fn checked(
    kind: PoolKind,
    win: &Window,
) -> Result<(&'static str, crate::im2col::Params, u64), KernelError> {
    let k = match kind {
        PoolKind::Max => "max_pool",
        PoolKind::Avg => "avg_pool",
    };
    if win.pad * 2 > win.kh || win.pad * 2 > win.kw {
        return Err(KernelError::Shape {
            kernel: k,
            msg: format!(
                "padding {} must be at most half the {}×{} window",
                win.pad, win.kh, win.kw
            ),
        });
    }
    let p = win.params_for(k)?;
    let (oh, ow) = win.out().unwrap_or((0, 0));
    Ok((k, p, (win.n * win.c * oh * ow) as u64))
}

/// The taps of output (oh, ow) of a plane, in scan order, as in-plane indices.
fn taps(win: &Window, oh: usize, ow: usize) -> impl Iterator<Item = usize> + '_ {
    (0..win.kh).flat_map(move |kh| {
        (0..win.kw).filter_map(move |kw| {
            let ih = (oh * win.stride + kh).checked_sub(win.pad)?;
            let iw = (ow * win.stride + kw).checked_sub(win.pad)?;
            (ih < win.h && iw < win.w).then_some(ih * win.w + iw)
        })
    })
}

/// The outputs whose windows hold input (ih, iw), in the order the kernels visit them.
fn readers(win: &Window, ih: usize, iw: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (oh_n, ow_n) = win.out().unwrap_or((0, 0));
    let (th, tw) = (ih + win.pad, iw + win.pad);
    let lo = |t: usize, k: usize| (t + win.stride).saturating_sub(k) / win.stride;
    let (oh0, ow0) = (lo(th, win.kh), lo(tw, win.kw));
    let (oh1, ow1) = (oh_n.min(th / win.stride + 1), ow_n.min(tw / win.stride + 1));
    (oh0..oh1).flat_map(move |oh| (ow0..ow1).map(move |ow| (oh, ow)))
}

/// Max pooling's index buffer: present, and holding one index per output.
fn index_buffer<'a>(
    k: &'static str,
    arg: Option<&'a wgpu::Buffer>,
    outs: u64,
) -> Result<&'a wgpu::Buffer, KernelError> {
    let arg = arg.ok_or_else(|| KernelError::Shape {
        kernel: k,
        msg: "max pooling needs an index buffer".into(),
    })?;
    need(k, "arg", arg, outs)?;
    Ok(arg)
}

/// CPU reference of max pooling's forward: (y, arg), PyTorch's choice of tap (the first largest in
/// scan order, or the last NaN). None when the window does not fit.
pub fn max_pool_ref<T: num_traits::Float>(win: &Window, x: &[T]) -> Option<(Vec<T>, Vec<u32>)> {
    let (oh_n, ow_n) = win.out()?;
    let plane = win.h * win.w;
    let mut y = Vec::with_capacity(win.n * win.c * oh_n * ow_n);
    let mut arg = Vec::with_capacity(y.capacity());
    for p in 0..win.n * win.c {
        let xs = &x[p * plane..(p + 1) * plane];
        for oh in 0..oh_n {
            // the window's rows and columns inside the input, in scan order (the taps)
            let r0 = (oh * win.stride).saturating_sub(win.pad);
            let r1 = (oh * win.stride + win.kh)
                .saturating_sub(win.pad)
                .min(win.h);
            for ow in 0..ow_n {
                let c0 = (ow * win.stride).saturating_sub(win.pad);
                let c1 = (ow * win.stride + win.kw)
                    .saturating_sub(win.pad)
                    .min(win.w);
                let mut best = (T::zero(), NO_ARG);
                for ih in r0..r1 {
                    for (iw, &v) in xs[ih * win.w + c0..ih * win.w + c1].iter().enumerate() {
                        if best.1 == NO_ARG || v > best.0 || v.is_nan() {
                            best = (v, (ih * win.w + c0 + iw) as u32);
                        }
                    }
                }
                y.push(best.0);
                arg.push(best.1);
            }
        }
    }
    Some((y, arg))
}

/// CPU reference of max pooling's backward: each input sums the dy of the windows that chose it.
/// The kernel gathers per input over its windows in (oh, ow) order; scattering the outputs in
/// that same order adds the same values in the same order, so the two agree bit for bit.
pub fn max_pool_backward_ref<T: num_traits::Float>(
    win: &Window,
    dy: &[T],
    arg: &[u32],
) -> Option<Vec<T>> {
    let (oh_n, ow_n) = win.out()?;
    let (plane, outs) = (win.h * win.w, oh_n * ow_n);
    let mut dx = vec![T::zero(); win.input_len()];
    for p in 0..win.n * win.c {
        let d = &mut dx[p * plane..(p + 1) * plane];
        for o in p * outs..(p + 1) * outs {
            if arg[o] != NO_ARG {
                let i = arg[o] as usize;
                d[i] = d[i] + dy[o];
            }
        }
    }
    Some(dx)
}

/// CPU reference of average pooling's forward (padding counts: every window divides by KH·KW).
pub fn avg_pool_ref<T: num_traits::Float>(win: &Window, x: &[T]) -> Option<Vec<T>> {
    let (oh_n, ow_n) = win.out()?;
    let plane = win.h * win.w;
    let div = T::from(win.kh * win.kw).unwrap_or_else(T::one);
    let mut y = Vec::with_capacity(win.n * win.c * oh_n * ow_n);
    for p in 0..win.n * win.c {
        let xs = &x[p * plane..(p + 1) * plane];
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                let mut sum = T::zero();
                for i in taps(win, oh, ow) {
                    sum = sum + xs[i];
                }
                y.push(sum / div);
            }
        }
    }
    Some(y)
}

/// CPU reference of average pooling's backward.
pub fn avg_pool_backward_ref<T: num_traits::Float>(win: &Window, dy: &[T]) -> Option<Vec<T>> {
    let (oh_n, ow_n) = win.out()?;
    let div = T::from(win.kh * win.kw).unwrap_or_else(T::one);
    let mut dx = vec![T::zero(); win.input_len()];
    for p in 0..win.n * win.c {
        for ih in 0..win.h {
            for iw in 0..win.w {
                let mut sum = T::zero();
                for (oh, ow) in readers(win, ih, iw) {
                    sum = sum + dy[(p * oh_n + oh) * ow_n + ow];
                }
                dx[(p * win.h + ih) * win.w + iw] = sum / div;
            }
        }
    }
    Some(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

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
            w(2, 3, 7, 7, 2, 2, 2, 0),
            w(3, 5, 13, 13, 3, 3, 2, 1),
            w(1, 1, 13, 7, 3, 2, 1, 1),
            w(2, 7, 7, 13, 5, 5, 3, 2),
            // global average pooling of a 7×13 image
            w(2, 3, 7, 13, 7, 13, 1, 0),
        ]
    }

    /// The loss L = Σ dy ⊙ pool(x): its gradient by central differences in f64 against the backward
    /// reference (max pooling away from ties, which random inputs do not have).
    #[test]
    fn backward_references_match_finite_differences() {
        for (i, win) in windows().into_iter().enumerate() {
            let (oh, ow) = win.out().unwrap();
            let x = random(win.input_len(), 50 + i as u64);
            let dy = random(win.n * win.c * oh * ow, 60 + i as u64);
            let loss = |kind: PoolKind, x: &[f32]| -> f64 {
                let y = match kind {
                    PoolKind::Max => max_pool_ref(&win, x).unwrap().0,
                    PoolKind::Avg => avg_pool_ref(&win, x).unwrap(),
                };
                y.iter()
                    .zip(&dy)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            };
            let (_, arg) = max_pool_ref(&win, &x).unwrap();
            for (kind, g) in [
                (
                    PoolKind::Max,
                    max_pool_backward_ref(&win, &dy, &arg).unwrap(),
                ),
                (PoolKind::Avg, avg_pool_backward_ref(&win, &dy).unwrap()),
            ] {
                let h = 1e-3f32;
                for j in (0..x.len()).step_by(7) {
                    let (mut xp, mut xm) = (x.clone(), x.clone());
                    xp[j] += h;
                    xm[j] -= h;
                    let fd = (loss(kind, &xp) - loss(kind, &xm)) / (2.0 * f64::from(h));
                    assert!(
                        (fd - f64::from(g[j])).abs() < 2e-3,
                        "{kind:?} {win:?} element {j}: finite difference {fd}, backward {}",
                        g[j]
                    );
                }
            }
        }
    }

    #[test]
    fn max_pool_picks_pytorchs_tap() {
        let win = Window {
            n: 1,
            c: 1,
            h: 2,
            w: 3,
            kh: 2,
            kw: 3,
            stride: 1,
            pad: 0,
        };
        // a tie: the first in scan order; NaNs: the last
        assert_eq!(
            max_pool_ref(&win, &[1.0, 5.0, 5.0, 0.0, 5.0, 2.0])
                .unwrap()
                .1,
            vec![1]
        );
        let (y, arg) = max_pool_ref(&win, &[1.0, f32::NAN, 9.0, f32::NAN, 5.0, 2.0]).unwrap();
        assert!(y[0].is_nan());
        assert_eq!(arg, vec![3]);
        // padding never wins: all taps negative
        let win = Window {
            h: 1,
            w: 1,
            kh: 1,
            kw: 1,
            ..win
        };
        assert_eq!(max_pool_ref(&win, &[-3.0]).unwrap(), (vec![-3.0], vec![0]));
    }

    #[test]
    fn the_kernels_match_their_references_bit_for_bit() {
        let ctx = ctx();
        let k = Pool::new(&ctx);
        for (i, win) in windows().into_iter().enumerate() {
            let (oh, ow) = win.out().unwrap();
            let outs = win.n * win.c * oh * ow;
            let x = random(win.input_len(), 70 + i as u64);
            let dy = random(outs, 80 + i as u64);
            let xb = ctx.upload("x", &x).unwrap();
            let dyb = ctx.upload("dy", &dy).unwrap();
            let yb = ctx.storage("y", (outs * 4) as u64).unwrap();
            let ab = ctx.storage("arg", (outs * 4) as u64).unwrap();
            let dxb = ctx.storage("dx", (win.input_len() * 4) as u64).unwrap();
            let ya = ctx.storage("y avg", (outs * 4) as u64).unwrap();
            let dxa = ctx.storage("dx avg", (win.input_len() * 4) as u64).unwrap();
            let d = [
                k.forward(&ctx, PoolKind::Max, &win, &xb, &yb, Some(&ab))
                    .unwrap(),
                k.backward(&ctx, PoolKind::Max, &win, &dyb, &dxb, Some(&ab))
                    .unwrap(),
                k.forward(&ctx, PoolKind::Avg, &win, &xb, &ya, None)
                    .unwrap(),
                k.backward(&ctx, PoolKind::Avg, &win, &dyb, &dxa, None)
                    .unwrap(),
            ];
            crate::run(&ctx, &d.iter().collect::<Vec<_>>());
            let (y, arg) = max_pool_ref(&win, &x).unwrap();
            assert_eq!(ctx.read::<f32>(&yb, 0, outs).unwrap(), y, "max {win:?}");
            assert_eq!(ctx.read::<u32>(&ab, 0, outs).unwrap(), arg, "arg {win:?}");
            assert_eq!(
                ctx.read::<f32>(&dxb, 0, win.input_len()).unwrap(),
                max_pool_backward_ref(&win, &dy, &arg).unwrap(),
                "max backward {win:?}"
            );
            assert_eq!(
                ctx.read::<f32>(&ya, 0, outs).unwrap(),
                avg_pool_ref(&win, &x).unwrap(),
                "avg {win:?}"
            );
            assert_eq!(
                ctx.read::<f32>(&dxa, 0, win.input_len()).unwrap(),
                avg_pool_backward_ref(&win, &dy).unwrap(),
                "avg backward {win:?}"
            );
        }
    }

    #[test]
    fn bad_windows_are_errors() {
        let ctx = ctx();
        let k = Pool::new(&ctx);
        let b = ctx.storage("b", 4096).unwrap();
        let win = Window {
            n: 1,
            c: 1,
            h: 4,
            w: 4,
            kh: 2,
            kw: 2,
            stride: 2,
            pad: 2,
        };
        let e = k
            .forward(&ctx, PoolKind::Avg, &win, &b, &b, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("at most half"), "{e}");
        let win = Window { pad: 0, ..win };
        assert!(
            k.forward(&ctx, PoolKind::Max, &win, &b, &b, None).is_err(),
            "max needs arg"
        );
    }
}
