//! `nn.Conv2d`: a square kernel, stride, zero padding, optional bias. On the CPU it is im2col
//! (the kernels' reference, the same column layout as `shaders/im2col.wgsl`) around a matrix
//! product, and its input gradient is col2im of the columns' gradient.

use dptrain_kernels::im2col::{Window, col2im_ref, im2col_ref};
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

    pub fn forward<T: Float + LinalgScalar>(
        &self,
        input: Shape,
        x: ArrayView2<T>,
        params: &[&[T]],
    ) -> Array2<T> {
        let n = x.nrows();
        let win = self.window(n, input);
        let out = self
            .out_shape(input)
            .expect("checked when the net was built");
        let p = out.h * out.w;
        let cols = columns(&win, x);
        let w = self.weight(input, params[0]);
        let mut y = Array2::zeros((n, out.len()));
        // sample by sample, y_n (OC × P) = W · cols_nᵀ: NCHW without a transpose pass
        for (i, yr) in y.outer_iter_mut().enumerate() {
            let mut yn = yr
                .into_shape_with_order((self.out, p))
                .expect("a row holds OC·P values");
            let block = cols.slice(ndarray::s![i * p..(i + 1) * p, ..]);
            general_mat_mul(T::one(), &w, &block.t(), T::zero(), &mut yn);
            if self.bias {
                for (mut plane, &b) in yn.outer_iter_mut().zip(params[1]) {
                    plane.mapv_inplace(|v| v + b);
                }
            }
        }
        y
    }

    /// Writes the weight (and bias) gradients into `grads` (the node's tensors, in order) and
    /// returns the input's gradient when `need_dx`.
    pub fn backward<T: Float + LinalgScalar>(
        &self,
        input: Shape,
        x: ArrayView2<T>,
        dy: ArrayView2<T>,
        params: &[&[T]],
        grads: &mut [&mut [T]],
        need_dx: bool,
    ) -> Option<Array2<T>> {
        let n = x.nrows();
        let win = self.window(n, input);
        let out = self
            .out_shape(input)
            .expect("checked when the net was built");
        let p = out.h * out.w;
        let k = input.c * self.kernel * self.kernel;
        let cols = columns(&win, x);
        let w = self.weight(input, params[0]);
        let mut dw = Array2::<T>::zeros((self.out, k));
        let mut db = vec![T::zero(); self.out];
        let mut dcols = need_dx.then(|| Array2::<T>::zeros((n * p, k)));
        for (i, dr) in dy.outer_iter().enumerate() {
            let dyn_ = dr
                .into_shape_with_order((self.out, p))
                .expect("a row holds OC·P values");
            let block = cols.slice(ndarray::s![i * p..(i + 1) * p, ..]);
            // dW += dy_n · cols_n; db += Σ_p dy_n; dcols_n = dy_nᵀ · W
            general_mat_mul(T::one(), &dyn_, &block, T::one(), &mut dw);
            if self.bias {
                for (acc, plane) in db.iter_mut().zip(dyn_.outer_iter()) {
                    *acc = plane.iter().fold(*acc, |a, &v| a + v);
                }
            }
            if let Some(dc) = dcols.as_mut() {
                let mut target = dc.slice_mut(ndarray::s![i * p..(i + 1) * p, ..]);
                general_mat_mul(T::one(), &dyn_.t(), &w, T::zero(), &mut target);
            }
        }
        for (g, v) in grads[0].iter_mut().zip(dw.iter()) {
            *g = *v;
        }
        if self.bias {
            grads[1].copy_from_slice(&db);
        }
        dcols.map(|dc| {
            let dx = col2im_ref(&win, dc.as_slice().expect("standard layout"))
                .expect("checked when the net was built");
            Array2::from_shape_vec((n, input.len()), dx).expect("col2im gives N·C·H·W values")
        })
    }
}

/// The column matrix [N·OH·OW, C·K·K] of a batch.
fn columns<T: Float>(win: &Window, x: ArrayView2<T>) -> Array2<T> {
    let flat = x.as_standard_layout();
    let cols = im2col_ref(win, flat.as_slice().expect("standard layout"))
        .expect("checked when the net was built");
    let (r, c) = win.cols_shape().expect("checked when the net was built");
    Array2::from_shape_vec((r, c), cols).expect("im2col gives rows × columns values")
}
