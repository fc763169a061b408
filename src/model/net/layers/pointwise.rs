//! Layers without parameters that act value by value: ReLU, the residual add, and flatten (which
//! only renames the shape: activations are NCHW rows already).

use ndarray::{Array2, ArrayView2};
use num_traits::Float;

pub fn relu<T: Float>(x: ArrayView2<T>) -> Array2<T> {
    x.mapv(|v| v.max(T::zero()))
}

/// dy · 1[y > 0], from the stored output.
pub fn relu_backward<T: Float>(y: ArrayView2<T>, dy: ArrayView2<T>) -> Array2<T> {
    let mut d = dy.to_owned();
    d.zip_mut_with(&y, |g, &out| {
        if out <= T::zero() {
            *g = T::zero();
        }
    });
    d
}

/// The sum of a block's main path and its skip path.
pub fn add<T: Float>(a: ArrayView2<T>, b: ArrayView2<T>) -> Array2<T> {
    &a + &b
}
