//! The layers a model is made of. This file is where a layer type is registered: its variant, what
//! it computes on the CPU (through the kernels' references, so the mathematics exists once beside its
//! shader), and its gradient. The GPU backend records the kernels of each variant in
//! `backend/gpu/plan.rs` (`Builder::forward_ops` and `backward_ops`), fusing a dense layer's
//! activation into its matrix product.
//!
//! Both backends walk the same list: `ModelSpec::layers`.

use dptrain_kernels::dropout::DropoutMask;
use dptrain_kernels::matmul::{activate, derivative};
use ndarray::{Array2, ArrayView1, ArrayView2, Axis, LinalgScalar};
use num_traits::Float;

use super::{Activation, ModelSpec};

/// One layer of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layer {
    /// y = f(x·Wᵀ + b), the `index`-th dense layer (`layers.{index}` in model files); `activation`
    /// is None for the output layer, whose logits feed the loss.
    Dense {
        index: usize,
        fan_in: usize,
        fan_out: usize,
        activation: Option<Activation>,
    },
    /// Inverted dropout in training (each unit kept with probability 1 - p and scaled by 1/(1-p)),
    /// the identity in evaluation. `index` numbers the dropout layers, for their masks.
    Dropout { index: usize, width: usize, p: f64 },
}

/// What a training pass gives the layers beyond the data: the run's seed, the optimiser step and
/// each row's global sample number, from which dropout masks are drawn.
#[derive(Clone, Copy, Debug)]
pub struct MaskContext<'a> {
    pub seed: u64,
    pub step: u64,
    pub samples: &'a [u32],
}

impl Layer {
    /// Width of the layer's output.
    pub fn width(&self) -> usize {
        match *self {
            Self::Dense { fan_out, .. } => fan_out,
            Self::Dropout { width, .. } => width,
        }
    }

    /// The dropout mask of a dropout layer.
    pub fn mask(&self, seed: u64) -> Option<DropoutMask> {
        match *self {
            Self::Dropout { index, p, .. } => Some(DropoutMask {
                seed,
                layer: index as u32,
                p,
            }),
            Self::Dense { .. } => None,
        }
    }

    /// The layer's output on the CPU. `train` is None in evaluation.
    pub fn forward<T: Float + LinalgScalar>(
        &self,
        spec: &ModelSpec,
        theta: &[T],
        x: ArrayView2<T>,
        train: Option<&MaskContext>,
    ) -> Array2<T> {
        match *self {
            Self::Dense {
                index, activation, ..
            } => {
                let (w, b) = views(spec, theta, index);
                let mut z = x.dot(&w.t()) + b;
                if let Some(a) = activation {
                    z.mapv_inplace(|v| activate(a.forward(), v));
                }
                z
            }
            Self::Dropout { .. } => match train {
                Some(ctx) => self.apply_mask(ctx, x.to_owned()),
                None => x.to_owned(),
            },
        }
    }

    /// Backward through the layer on the CPU: `x` and `y` are its input and output, `dy` the loss
    /// gradient at its output. Writes parameter gradients into `grads` (the flat layout) and returns
    /// the gradient at its input when `need_dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Float + LinalgScalar>(
        &self,
        spec: &ModelSpec,
        theta: &[T],
        x: ArrayView2<T>,
        y: ArrayView2<T>,
        mut dy: Array2<T>,
        train: &MaskContext,
        grads: &mut [T],
        need_dx: bool,
    ) -> Option<Array2<T>> {
        match *self {
            Self::Dense {
                index, activation, ..
            } => {
                if let Some(a) = activation {
                    dy.zip_mut_with(&y, |d, &out| *d = *d * derivative(a.backward(), out));
                }
                let (w, _) = views(spec, theta, index);
                let (wo, bo) = spec.offsets(index);
                let dw = dy.t().dot(&x);
                let db = dy.sum_axis(Axis(0));
                for (g, &v) in grads[wo..wo + dw.len()].iter_mut().zip(dw.iter()) {
                    *g = v;
                }
                for (g, &v) in grads[bo..bo + db.len()].iter_mut().zip(db.iter()) {
                    *g = v;
                }
                need_dx.then(|| dy.dot(&w))
            }
            Self::Dropout { .. } => Some(self.apply_mask(train, dy)),
        }
    }

    /// a[r, j] · mask(step, sample r, unit j): the same factors as the dropout kernel.
    fn apply_mask<T: Float>(&self, ctx: &MaskContext, mut a: Array2<T>) -> Array2<T> {
        if let Some(mask) = self.mask(ctx.seed) {
            for (mut row, &s) in a.outer_iter_mut().zip(ctx.samples) {
                for (j, v) in row.iter_mut().enumerate() {
                    let f = T::from(mask.factor(ctx.step, s, j as u32)).unwrap_or_else(T::zero);
                    *v = *v * f;
                }
            }
        }
        a
    }
}

/// Dense layer l's weight [out, in] and bias [out] views into the flat buffer.
fn views<'a, T>(
    spec: &ModelSpec,
    theta: &'a [T],
    l: usize,
) -> (ArrayView2<'a, T>, ArrayView1<'a, T>) {
    let (fi, fo) = spec.linear(l);
    let (wo, bo) = spec.offsets(l);
    let w =
        ArrayView2::from_shape((fo, fi), &theta[wo..wo + fi * fo]).expect("layout matches spec");
    let b = ArrayView1::from(&theta[bo..bo + fo]);
    (w, b)
}
