//! `nn.MaxPool2d`, `nn.AvgPool2d` and global average pooling (`nn.AdaptiveAvgPool2d(1)`), through
//! the pooling kernels' references. Max pooling keeps the index of each window's chosen tap for its
//! backward, as `shaders/max_pool.wgsl` does.

use dptrain_kernels::im2col::Window;
use dptrain_kernels::pool::{
    avg_pool_backward_ref, avg_pool_ref, max_pool_backward_ref, max_pool_ref,
};
use ndarray::{Array2, ArrayView2};
use num_traits::Float;
use serde::{Deserialize, Serialize};

use crate::model::net::Shape;

/// A pooling window; the stride defaults to the kernel, as in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool2d {
    pub kernel: usize,
    #[serde(default)]
    pub stride: Option<usize>,
    #[serde(default)]
    pub padding: usize,
}

/// Which pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolOp {
    Max(Pool2d),
    Avg(Pool2d),
    /// Average over the whole plane: C×H×W → C×1×1.
    Global,
}

impl PoolOp {
    pub fn window(&self, n: usize, input: Shape) -> Window {
        let (kh, kw, stride, pad) = match *self {
            Self::Max(p) | Self::Avg(p) => {
                (p.kernel, p.kernel, p.stride.unwrap_or(p.kernel), p.padding)
            }
            Self::Global => (input.h, input.w, 1, 0),
        };
        Window {
            n,
            c: input.c,
            h: input.h,
            w: input.w,
            kh,
            kw,
            stride,
            pad,
        }
    }

    pub fn out_shape(&self, input: Shape) -> Result<Shape, String> {
        if let Self::Max(p) | Self::Avg(p) = self {
            if p.kernel == 0 || p.stride == Some(0) {
                return Err("kernel and stride must be at least 1".into());
            }
            // PyTorch's rule: padding at most half the kernel
            if 2 * p.padding > p.kernel {
                return Err(format!(
                    "padding {} is more than half the kernel {}",
                    p.padding, p.kernel
                ));
            }
        }
        let win = self.window(1, input);
        let (h, w) = win.out().ok_or_else(|| {
            format!(
                "a {}×{} window does not fit a {input} input",
                win.kh, win.kw
            )
        })?;
        Ok(Shape { c: input.c, h, w })
    }

    /// The output and, for max pooling, each output's chosen tap.
    pub fn forward<T: Float>(&self, input: Shape, x: ArrayView2<T>) -> (Array2<T>, Vec<u32>) {
        let n = x.nrows();
        let win = self.window(n, input);
        let out = self
            .out_shape(input)
            .expect("checked when the net was built");
        let flat = x.as_standard_layout();
        let xs = flat.as_slice().expect("standard layout");
        let (y, arg) = match self {
            Self::Max(_) => max_pool_ref(&win, xs).expect("checked when the net was built"),
            _ => (
                avg_pool_ref(&win, xs).expect("checked when the net was built"),
                Vec::new(),
            ),
        };
        (
            Array2::from_shape_vec((n, out.len()), y).expect("the pool gives N·C·OH·OW values"),
            arg,
        )
    }

    pub fn backward<T: Float>(&self, input: Shape, dy: ArrayView2<T>, arg: &[u32]) -> Array2<T> {
        let n = dy.nrows();
        let win = self.window(n, input);
        let flat = dy.as_standard_layout();
        let d = flat.as_slice().expect("standard layout");
        let dx = match self {
            Self::Max(_) => max_pool_backward_ref(&win, d, arg),
            _ => avg_pool_backward_ref(&win, d),
        }
        .expect("checked when the net was built");
        Array2::from_shape_vec((n, input.len()), dx).expect("the pool's backward gives N·C·H·W")
    }
}
