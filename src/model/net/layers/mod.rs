//! One file per layer type: its settings, shape inference, named tensors with their
//! initialisation, and its CPU forward and backward, written through the kernels' references
//! (`dptrain_kernels::{im2col, pool, batch_norm}`), so that the mathematics exists once beside its
//! shader. `super::Op` is the one registration place: a new layer type is a variant there and a
//! file here.
//!
//! Activations are (N, C·H·W) matrices in NCHW order, each with its [`Shape`](super::Shape).

pub mod batch_norm;
pub mod conv2d;
pub mod linear;
pub mod pointwise;
pub mod pool;

/// How a tensor starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(−b, b): PyTorch's default for `nn.Conv2d` and `nn.Linear` weights and biases, with
    /// b = 1/√fan_in (kaiming_uniform with a = √5).
    Uniform(f64),
    /// Every value the same (BatchNorm's weight 1, bias 0, running variance 1).
    Const(f32),
}

/// A tensor a layer declares: its name after the layer's own (`weight`), shape, and start.
#[derive(Clone, Debug, PartialEq)]
pub struct Declared {
    pub suffix: &'static str,
    pub shape: Vec<usize>,
    pub init: Init,
    /// A buffer (BatchNorm's running statistics): saved with the model, never trained.
    pub buffer: bool,
}

impl Declared {
    pub fn param(suffix: &'static str, shape: Vec<usize>, init: Init) -> Self {
        Self {
            suffix,
            shape,
            init,
            buffer: false,
        }
    }
    pub fn buffer(suffix: &'static str, shape: Vec<usize>, init: Init) -> Self {
        Self {
            suffix,
            shape,
            init,
            buffer: true,
        }
    }
}
