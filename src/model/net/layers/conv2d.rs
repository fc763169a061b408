//! `nn.Conv2d`: a square kernel, stride, zero padding, optional bias. On the CPU it is im2col
//! (the kernels' reference, the same column layout as `shaders/im2col.wgsl`) around a matrix
//! product, and its input gradient is col2im of the columns' gradient.

use dptrain_kernels::im2col::Window;
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, LinalgScalar};
use num_traits::Float;
use serde::{Deserialize, Serialize};

use super::{Declared, Init};
use crate::model::net::Shape;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conv2d {
    /// Output channels.
    pub out: usize,
    pub kernel: usize,
    #[serde(default = "one")]
    pub stride: usize,
    #[serde(default)]
    pub padding: usize,
    #[serde(default = "yes")]
    pub bias: bool,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl Conv2d {
    pub fn window(&self, n: usize, input: Shape) -> Window {
        Window {
            n,
            c: input.c,
            h: input.h,
            w: input.w,
            kh: self.kernel,
            kw: self.kernel,
            stride: self.stride,
            pad: self.padding,
        }
    }

    pub fn out_shape(&self, input: Shape) -> Result<Shape, String> {
        if self.out == 0 || self.kernel == 0 || self.stride == 0 {
            return Err("out, kernel and stride must be at least 1".into());
        }
        let (h, w) = self.window(1, input).out().ok_or_else(|| {
            format!(
                "a {k}×{k} kernel with padding {p} does not fit a {input} input",
                k = self.kernel,
                p = self.padding
            )
        })?;
        Ok(Shape { c: self.out, h, w })
    }

    pub fn tensors(&self, input: Shape) -> Vec<Declared> {
        let fan_in = input.c * self.kernel * self.kernel;
        let b = 1.0 / (fan_in as f64).sqrt();
        let mut v = vec![Declared::param(
            "weight",
            vec![self.out, input.c, self.kernel, self.kernel],
            Init::Uniform(b),
        )];
        if self.bias {
            v.push(Declared::param("bias", vec![self.out], Init::Uniform(b)));
        }
        v
    }

    /// Multiply-adds per sample.
    pub fn macs(&self, input: Shape, out: Shape) -> usize {
        out.len() * input.c * self.kernel * self.kernel
    }

    /// The weight as [out, C·K·K].
    fn weight<'a, T>(&self, input: Shape, w: &'a [T]) -> ArrayView2<'a, T> {
        let k = input.c * self.kernel * self.kernel;
        ArrayView2::from_shape((self.out, k), w).expect("the layout holds the weight")
    }

    pub fn forward<T: Float + LinalgScalar + Send + Sync>(
        &self,
        input: Shape,
        x: ArrayView2<T>,
        params: &[&[T]],
    ) -> Array2<T> {
        let n = x.nrows();
        let out = self
            .out_shape(input)
            .expect("checked when the net was built");
        let win = self.window(1, input);
        let (p, k) = (out.h * out.w, input.c * self.kernel * self.kernel);
        let w = self.weight(input, params[0]);
        let mut y = Array2::zeros((n, out.len()));
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        // samples in fixed chunks on all cores; each sample's y_n (OC × P) = W · colsᵀ_n, NCHW
        // without a transpose pass
        let ys = y.as_slice_mut().expect("a new array");
        let work: Vec<(&[T], &mut [T])> = xs
            .chunks(CHUNK * input.len())
            .zip(ys.chunks_mut(CHUNK * out.len()))
            .collect();
        parallel(work, |(xc, yc)| {
            let mut cols = vec![T::zero(); k * p];
            for (xn, yn) in xc.chunks(input.len()).zip(yc.chunks_mut(out.len())) {
                columns_t(&win, xn, &mut cols);
                let c = ArrayView2::from_shape((k, p), &cols).expect("k × p columns");
                let mut yv = ndarray::ArrayViewMut2::from_shape((self.out, p), yn)
                    .expect("a row holds OC·P values");
                general_mat_mul(T::one(), &w, &c, T::zero(), &mut yv);
                if self.bias {
                    for (mut plane, &b) in yv.outer_iter_mut().zip(params[1]) {
                        plane.mapv_inplace(|v| v + b);
                    }
                }
            }
        });
        y
    }

    /// Writes the weight (and bias) gradients into `grads` (the node's tensors, in order) and
    /// returns the input's gradient when `need_dx`. The batch is cut into fixed chunks whose
    /// partial sums are added in chunk order, so the result does not depend on the core count.
    pub fn backward<T: Float + LinalgScalar + Send + Sync>(
        &self,
        input: Shape,
        x: ArrayView2<T>,
        dy: ArrayView2<T>,
        params: &[&[T]],
        grads: &mut [&mut [T]],
        need_dx: bool,
    ) -> Option<Array2<T>> {
        let n = x.nrows();
        let out = self
            .out_shape(input)
            .expect("checked when the net was built");
        let win = self.window(1, input);
        let (p, k) = (out.h * out.w, input.c * self.kernel * self.kernel);
        let w = self.weight(input, params[0]);
        let x = x.as_standard_layout();
        let dy = dy.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let dys = dy.as_slice().expect("standard layout");
        let mut dx = need_dx.then(|| Array2::<T>::zeros((n, input.len())));
        let chunks = n.div_ceil(CHUNK);
        let mut partial: Vec<(Array2<T>, Vec<T>)> = (0..chunks)
            .map(|_| (Array2::zeros((self.out, k)), vec![T::zero(); self.out]))
            .collect();
        let dxs: Vec<Option<&mut [T]>> = match dx.as_mut() {
            Some(d) => d
                .as_slice_mut()
                .expect("a new array")
                .chunks_mut(CHUNK * input.len())
                .map(Some)
                .collect(),
            None => (0..chunks).map(|_| None).collect(),
        };
        let work: Vec<_> = xs
            .chunks(CHUNK * input.len())
            .zip(dys.chunks(CHUNK * out.len()))
            .zip(partial.iter_mut())
            .zip(dxs)
            .collect();
        parallel(work, |(((xc, dyc), (dw, db)), dxc)| {
            let mut cols = vec![T::zero(); k * p];
            let mut dcols = vec![T::zero(); k * p];
            let mut dxc = dxc;
            for (i, (xn, dn)) in xc
                .chunks(input.len())
                .zip(dyc.chunks(out.len()))
                .enumerate()
            {
                columns_t(&win, xn, &mut cols);
                let c = ArrayView2::from_shape((k, p), &cols).expect("k × p columns");
                let d = ArrayView2::from_shape((self.out, p), dn).expect("OC × P");
                // dW += dy_n · cols_nᵀ; db += Σ_p dy_n; dcols_n = Wᵀ · dy_n
                general_mat_mul(T::one(), &d, &c.t(), T::one(), dw);
                if self.bias {
                    for (acc, plane) in db.iter_mut().zip(d.outer_iter()) {
                        *acc = plane.iter().fold(*acc, |a, &v| a + v);
                    }
                }
                if let Some(dxc) = dxc.as_deref_mut() {
                    let mut dc = ndarray::ArrayViewMut2::from_shape((k, p), &mut dcols)
                        .expect("k × p columns");
                    general_mat_mul(T::one(), &w.t(), &d, T::zero(), &mut dc);
                    let dxn = &mut dxc[i * input.len()..(i + 1) * input.len()];
                    col2im_t(&win, &dcols, dxn);
                }
            }
        });
        let mut dw = Array2::<T>::zeros((self.out, k));
        let mut db = vec![T::zero(); self.out];
        for (pw, pb) in &partial {
            dw.zip_mut_with(pw, |a, &b| *a = *a + b);
            db.iter_mut().zip(pb).for_each(|(a, &b)| *a = *a + b);
        }
        for (g, v) in grads[0].iter_mut().zip(dw.iter()) {
            *g = *v;
        }
        if self.bias {
            grads[1].copy_from_slice(&db);
        }
        dx
    }
}

/// Samples per piece of work: the batch is cut at these fixed boundaries whatever the core count.
const CHUNK: usize = 8;

/// Run `f` on every item, on up to all cores (each thread takes every t-th item).
fn parallel<I: Send, F: Fn(I) + Sync>(items: Vec<I>, f: F) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(items.len())
        .max(1);
    if threads == 1 {
        items.into_iter().for_each(f);
        return;
    }
    let mut lanes: Vec<Vec<I>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        lanes[i % threads].push(item);
    }
    std::thread::scope(|s| {
        for lane in lanes {
            let f = &f;
            s.spawn(move || lane.into_iter().for_each(f));
        }
    });
}

/// The output columns lo..hi (of `ow_n`) whose tap iw = ow·stride + kw − pad falls inside the
/// input's row; lo = hi when none does.
fn inside(win: &Window, kw: usize, ow_n: usize) -> (usize, usize) {
    let lo = win.pad.saturating_sub(kw).div_ceil(win.stride).min(ow_n);
    let hi = (win.w + win.pad)
        .saturating_sub(kw)
        .div_ceil(win.stride)
        .min(ow_n)
        .max(lo);
    (lo, hi)
}

/// One sample's columns, transposed: [C·K·K, OH·OW], row (c, kh, kw), column (oh, ow): the
/// values `im2col_ref` puts in the sample's rows (a test checks it), laid out so that a stride-1
/// row of the input is one copy.
pub(crate) fn columns_t<T: Float>(win: &Window, x: &[T], out: &mut [T]) {
    let (oh_n, ow_n) = win.out().expect("checked when the net was built");
    let p = oh_n * ow_n;
    let (h, w, pad, s) = (win.h, win.w, win.pad, win.stride);
    for c in 0..win.c {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for kh in 0..win.kh {
            for kw in 0..win.kw {
                let row = &mut out[((c * win.kh + kh) * win.kw + kw) * p..][..p];
                let (lo, hi) = inside(win, kw, ow_n);
                for oh in 0..oh_n {
                    let dst = &mut row[oh * ow_n..(oh + 1) * ow_n];
                    let ih = (oh * s + kh).wrapping_sub(pad);
                    if ih >= h {
                        dst.fill(T::zero());
                        continue;
                    }
                    let src = &plane[ih * w..(ih + 1) * w];
                    dst[..lo].fill(T::zero());
                    dst[hi..].fill(T::zero());
                    if s == 1 {
                        if lo < hi {
                            dst[lo..hi].copy_from_slice(&src[lo + kw - pad..hi + kw - pad]);
                        }
                    } else {
                        for (ow, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = src[ow * s + kw - pad];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`columns_t`] for one sample: dx (zeroed first) gets each column's gradient,
/// added per input in (kh, kw) order, the order of `col2im_ref`, so the two agree bit for bit.
pub(crate) fn col2im_t<T: Float>(win: &Window, dcols: &[T], dx: &mut [T]) {
    let (oh_n, ow_n) = win.out().expect("checked when the net was built");
    let p = oh_n * ow_n;
    let (h, w, pad, s) = (win.h, win.w, win.pad, win.stride);
    dx.fill(T::zero());
    for c in 0..win.c {
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
        for kh in 0..win.kh {
            for kw in 0..win.kw {
                let row = &dcols[((c * win.kh + kh) * win.kw + kw) * p..][..p];
                let (lo, hi) = inside(win, kw, ow_n);
                for oh in 0..oh_n {
                    let ih = (oh * s + kh).wrapping_sub(pad);
                    if ih >= h {
                        continue;
                    }
                    let src = &row[oh * ow_n..(oh + 1) * ow_n];
                    let line = &mut plane[ih * w..(ih + 1) * w];
                    for (ow, &v) in src.iter().enumerate().take(hi).skip(lo) {
                        let iw = ow * s + kw - pad;
                        line[iw] = line[iw] + v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dptrain_kernels::im2col::{col2im_ref, im2col_ref};

    /// The transposed columns hold what the kernels' reference puts in each sample's rows, and
    /// their adjoint gives col2im's sums bit for bit, at strides 1 to 3 and paddings 0 to 2.
    #[test]
    fn transposed_columns_match_the_kernel_references() {
        for (c, h, w, k, s, pad) in [
            (3, 7, 7, 3, 1, 1),
            (2, 13, 11, 5, 2, 2),
            (1, 6, 9, 2, 3, 0),
            (4, 5, 5, 5, 1, 2),
            // kernel wider than the padded input's reach: whole rows of taps in the padding
            (1, 1, 1, 5, 1, 2),
            (2, 2, 2, 7, 1, 3),
            (1, 2, 3, 5, 2, 2),
        ] {
            let win = Window {
                n: 1,
                c,
                h,
                w,
                kh: k,
                kw: k,
                stride: s,
                pad,
            };
            let x: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.37).sin()).collect();
            let rows = im2col_ref(&win, &x).unwrap();
            let (oh, ow) = win.out().unwrap();
            let (p, kk) = (oh * ow, c * k * k);
            let mut t = vec![0f32; kk * p];
            columns_t(&win, &x, &mut t);
            for r in 0..p {
                for j in 0..kk {
                    assert_eq!(
                        t[j * p + r],
                        rows[r * kk + j],
                        "({c},{h},{w},{k},{s},{pad})"
                    );
                }
            }
            let d: Vec<f32> = (0..kk * p).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut drows = vec![0f32; kk * p];
            for r in 0..p {
                for j in 0..kk {
                    drows[r * kk + j] = d[j * p + r];
                }
            }
            let mut dx = vec![1f32; c * h * w];
            col2im_t(&win, &d, &mut dx);
            assert_eq!(dx, col2im_ref(&win, &drows).unwrap());
        }
    }
}
