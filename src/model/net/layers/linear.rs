//! `nn.Linear`: y = x·Wᵀ + b, W shaped [out, in] (the dense layers' mathematics).

use ndarray::{Array2, ArrayView1, ArrayView2, Axis, LinalgScalar};
use num_traits::Float;
use serde::{Deserialize, Serialize};

use super::{Declared, Init};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    /// Output features; a definition file's last linear layer may leave it out (0): the classes.
    #[serde(default)]
    pub out: usize,
    #[serde(default = "yes")]
    pub bias: bool,
    /// Input features, when a definition states them: checked against the inferred width.
    #[serde(default, rename = "in")]
    pub inputs: Option<usize>,
}

impl Linear {
    pub fn new(out: usize) -> Self {
        Self {
            out,
            bias: true,
            inputs: None,
        }
    }
}

fn yes() -> bool {
    true
}

impl Linear {
    pub fn tensors(&self, fan_in: usize) -> Vec<Declared> {
        let b = 1.0 / (fan_in as f64).sqrt();
        let mut v = vec![Declared::param(
            "weight",
            vec![self.out, fan_in],
            Init::Uniform(b),
        )];
        if self.bias {
            v.push(Declared::param("bias", vec![self.out], Init::Uniform(b)));
        }
        v
    }

    fn weight<'a, T>(&self, fan_in: usize, w: &'a [T]) -> ArrayView2<'a, T> {
        ArrayView2::from_shape((self.out, fan_in), w).expect("the layout holds the weight")
    }

    pub fn forward<T: Float + LinalgScalar>(&self, x: ArrayView2<T>, params: &[&[T]]) -> Array2<T> {
        let mut y = x.dot(&self.weight(x.ncols(), params[0]).t());
        if self.bias {
            let b = ArrayView1::from(params[1]);
            for mut r in y.outer_iter_mut() {
                r.zip_mut_with(&b, |a, &v| *a = *a + v);
            }
        }
        y
    }

    pub fn backward<T: Float + LinalgScalar>(
        &self,
        x: ArrayView2<T>,
        dy: ArrayView2<T>,
        params: &[&[T]],
        grads: &mut [&mut [T]],
        need_dx: bool,
    ) -> Option<Array2<T>> {
        let dw = dy.t().dot(&x);
        for (g, v) in grads[0].iter_mut().zip(dw.iter()) {
            *g = *v;
        }
        if self.bias {
            for (g, v) in grads[1].iter_mut().zip(dy.sum_axis(Axis(0)).iter()) {
                *g = *v;
            }
        }
        need_dx.then(|| dy.dot(&self.weight(x.ncols(), params[0])))
    }
}
