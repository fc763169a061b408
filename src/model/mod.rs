//! What a model is: the spec (kind, widths, activation, dropout) that a file stores, the list of
//! layers plus a loss that both backends walk (`layer.rs`), the flat parameter layout, and seeded
//! initialisation.
//!
//! Logistic, softmax and linear regression are one dense layer; an MLP has hidden dense layers, each
//! followed by its activation and, with `--dropout`, a dropout layer. All parameters live in one flat
//! f32 buffer; the layout table names each tensor as PyTorch's `nn.Linear` does (`layers.0.weight`
//! shaped [out, in], `layers.0.bias`), numbering the dense layers only.

pub mod layer;
pub mod net;

pub use layer::Layer;

use dptrain_kernels::loss::LossKind;
use dptrain_kernels::matmul::Epilogue;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Logistic regression: one sigmoid output, binary cross-entropy, labels 0/1.
    Logreg,
    /// Softmax (multinomial logistic) regression: cross-entropy over K classes.
    Softmax,
    /// Linear regression: one output, mean squared error, reports RMSE.
    Linreg,
    /// Multi-layer perceptron with `--hidden` widths, softmax cross-entropy.
    Mlp,
    /// LeNet-5 on 1×28×28 images (MNIST): two 5×5 convolutions with max pooling, three linear layers.
    Lenet5,
    /// CIFAR-style ResNet-20: 3 stages of 3 basic blocks (16/32/64 channels, BatchNorm).
    Resnet20,
    /// ResNet-32: 3 stages of 5 basic blocks.
    Resnet32,
    /// ResNet-56: 3 stages of 9 basic blocks.
    Resnet56,
    /// The network of a definition file (`--arch net.toml`).
    Custom,
}

impl ModelKind {
    /// A convolutional network (a graph of layers on images) rather than rows through dense layers.
    pub fn is_conv(self) -> bool {
        matches!(
            self,
            Self::Lenet5 | Self::Resnet20 | Self::Resnet32 | Self::Resnet56 | Self::Custom
        )
    }

    /// The name `--model` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Logreg => "logreg",
            Self::Softmax => "softmax",
            Self::Linreg => "linreg",
            Self::Mlp => "mlp",
            Self::Lenet5 => "lenet5",
            Self::Resnet20 => "resnet20",
            Self::Resnet32 => "resnet32",
            Self::Resnet56 => "resnet56",
            Self::Custom => "custom",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    Sigmoid,
}

impl Activation {
    /// The forward epilogue: bias then this activation.
    pub fn forward(self) -> Epilogue {
        match self {
            Self::Relu => Epilogue::BiasRelu,
            Self::Tanh => Epilogue::BiasTanh,
            Self::Sigmoid => Epilogue::BiasSigmoid,
        }
    }
    /// The backward epilogue: times the derivative, from the stored output.
    pub fn backward(self) -> Epilogue {
        match self {
            Self::Relu => Epilogue::DRelu,
            Self::Tanh => Epilogue::DTanh,
            Self::Sigmoid => Epilogue::DSigmoid,
        }
    }
}

/// What a model is: enough to rebuild it from a saved file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub inputs: usize,
    /// Hidden widths (empty for the one-layer models).
    pub hidden: Vec<usize>,
    pub outputs: usize,
    pub activation: Activation,
    /// Dropout probability after each hidden layer (0: none). Absent in files of older builds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropout: f64,
    /// Channels, height and width of each sample, for the convolutional models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// The definition of a `custom` model (`--arch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<net::arch::Arch>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("--hidden: layer widths must be at least 1 (got {0:?})")]
    ZeroWidth(Vec<usize>),
    #[error("--hidden is only for --model mlp")]
    HiddenWithoutMlp,
    #[error("the data has no features")]
    NoFeatures,
    #[error("{0}")]
    Classes(String),
    #[error("--dropout must be in [0, 1) (got {0})")]
    Dropout(f64),
    #[error("--dropout is only for --model mlp with --hidden layers")]
    DropoutWithoutHidden,
    #[error("--model {model}: {msg}")]
    Net { model: &'static str, msg: String },
}

impl ModelSpec {
    /// Build and check a spec for `features` inputs and `classes` classes (0 for regression).
    pub fn new(
        kind: ModelKind,
        features: usize,
        classes: usize,
        hidden: Vec<usize>,
        activation: Activation,
    ) -> Result<Self, ModelError> {
        if features == 0 {
            return Err(ModelError::NoFeatures);
        }
        if hidden.contains(&0) {
            return Err(ModelError::ZeroWidth(hidden));
        }
        if kind != ModelKind::Mlp && !hidden.is_empty() {
            return Err(ModelError::HiddenWithoutMlp);
        }
        let outputs = match kind {
            ModelKind::Logreg => {
                if classes != 2 {
                    return Err(ModelError::Classes(format!(
                        "--model logreg needs labels 0 and 1; the data has {classes} class(es) (use --model softmax for more)"
                    )));
                }
                1
            }
            ModelKind::Linreg => 1,
            ModelKind::Softmax
            | ModelKind::Mlp
            | ModelKind::Lenet5
            | ModelKind::Resnet20
            | ModelKind::Resnet32
            | ModelKind::Resnet56
            | ModelKind::Custom => {
                if classes < 2 {
                    return Err(ModelError::Classes(format!(
                        "classification needs at least 2 classes; the training labels hold {classes}"
                    )));
                }
                classes
            }
        };
        Ok(Self {
            kind,
            inputs: features,
            hidden,
            outputs,
            activation,
            dropout: 0.0,
            image: None,
            arch: None,
        })
    }

    /// A convolutional model's input shape: the data's image shape, or for rows of features the
    /// shape the model is defined for when the widths agree (784 CSV columns are a 1×28×28 image
    /// for LeNet-5). Checks that the network fits it.
    /// A `custom` model's definition (before [`ModelSpec::with_image`], which builds it).
    pub fn with_arch(mut self, arch: Option<net::arch::Arch>) -> Self {
        self.arch = arch;
        self
    }

    pub fn with_image(mut self, image: Option<[usize; 3]>) -> Result<Self, ModelError> {
        if !self.kind.is_conv() {
            return Ok(self);
        }
        let err = |msg: String| ModelError::Net {
            model: self.kind.name(),
            msg,
        };
        let shape = match image {
            Some(s) => s,
            None if self.kind == ModelKind::Lenet5
                && self.inputs == net::presets::LENET5_INPUT.len() =>
            {
                let s = net::presets::LENET5_INPUT;
                [s.c, s.h, s.w]
            }
            None if self
                .arch
                .as_ref()
                .and_then(|a| a.input)
                .is_some_and(|s| s.iter().product::<usize>() == self.inputs) =>
            {
                self.arch.as_ref().and_then(|a| a.input).unwrap_or_default()
            }
            // rows of features through a definition that starts with linear layers
            None if self.kind == ModelKind::Custom => [self.inputs, 1, 1],
            None => {
                return Err(err(format!(
                    "takes images (IDX, CIFAR-10 binary or synth:images data), and the data holds rows of {} features",
                    self.inputs
                )));
            }
        };
        if shape.iter().product::<usize>() != self.inputs {
            return Err(err(format!(
                "images of {}×{}×{} are {} values, and the data rows hold {}",
                shape[0],
                shape[1],
                shape[2],
                shape.iter().product::<usize>(),
                self.inputs
            )));
        }
        self.image = Some(shape);
        self.net()?;
        Ok(self)
    }

    /// The network of a convolutional model (None for the dense models).
    pub fn net(&self) -> Result<Option<net::Net>, ModelError> {
        if !self.kind.is_conv() {
            return Ok(None);
        }
        let err = |msg: String| ModelError::Net {
            model: self.kind.name(),
            msg,
        };
        let [c, h, w] = self
            .image
            .ok_or_else(|| err("no image shape in the model's description".into()))?;
        let input = net::Shape::image(c, h, w);
        let built = match self.kind {
            ModelKind::Lenet5 => net::presets::lenet5(input, self.outputs),
            ModelKind::Resnet20 => net::presets::resnet(20, input, self.outputs),
            ModelKind::Resnet32 => net::presets::resnet(32, input, self.outputs),
            ModelKind::Custom => match &self.arch {
                Some(a) => a.build(input, self.outputs),
                None => Err("no --arch definition".into()),
            },
            _ => net::presets::resnet(56, input, self.outputs),
        };
        built.map(Some).map_err(err)
    }

    /// Values in the flat buffer that the optimizer trains: all of them but a network's buffers
    /// (BatchNorm's running statistics), which come last.
    pub fn trainable(&self) -> usize {
        match self.net() {
            Ok(Some(n)) => n.trainable,
            _ => self.layout().total,
        }
    }

    /// The flat buffer's ranges by layer, from the input: each dense layer's weight and bias, or
    /// each network node's trainable tensors followed by one range of the buffers. The exchange
    /// buckets by these.
    pub fn param_groups(&self) -> Vec<std::ops::Range<usize>> {
        if let Ok(Some(n)) = self.net() {
            return n.groups();
        }
        (0..self.linears().len())
            .map(|l| {
                let (w, b) = self.offsets(l);
                w..b + self.linear(l).1
            })
            .collect()
    }

    /// The same model with dropout probability `p` after each hidden layer.
    pub fn with_dropout(mut self, p: f64) -> Result<Self, ModelError> {
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            return Err(ModelError::Dropout(p));
        }
        if p > 0.0 && self.hidden.is_empty() {
            return Err(ModelError::DropoutWithoutHidden);
        }
        self.dropout = p;
        Ok(self)
    }

    /// The layers in order, from the input to the logits (the loss follows).
    pub fn layers(&self) -> Vec<Layer> {
        let mut v = Vec::new();
        if self.kind.is_conv() {
            // a network is walked as a graph (`net()`)
            return v;
        }
        let dense = self.linears();
        let last = dense.len() - 1;
        for (index, (fan_in, fan_out)) in dense.into_iter().enumerate() {
            v.push(Layer::Dense {
                index,
                fan_in,
                fan_out,
                activation: (index < last).then_some(self.activation),
            });
            if index < last && self.dropout > 0.0 {
                v.push(Layer::Dropout {
                    index,
                    width: fan_out,
                    p: self.dropout,
                });
            }
        }
        v
    }

    pub fn loss(&self) -> LossKind {
        match self.kind {
            ModelKind::Logreg => LossKind::SigmoidBce,
            ModelKind::Linreg => LossKind::Mse,
            _ => LossKind::SoftmaxXent,
        }
    }

    pub fn is_regression(&self) -> bool {
        self.kind == ModelKind::Linreg
    }

    /// Widths from input to output: [inputs, hidden..., outputs].
    pub fn widths(&self) -> Vec<usize> {
        let mut w = vec![self.inputs];
        w.extend(&self.hidden);
        w.push(self.outputs);
        w
    }

    /// (fan_in, fan_out) of each dense layer.
    pub fn linears(&self) -> Vec<(usize, usize)> {
        self.widths().windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Multiply-adds per sample in the forward pass (training costs about 3× this, i.e. 6 FLOPs each).
    pub fn macs_per_sample(&self) -> usize {
        if let Ok(Some(n)) = self.net() {
            return n.macs();
        }
        self.linears().iter().map(|(i, o)| i * o).sum()
    }

    pub fn layout(&self) -> Layout {
        if let Ok(Some(n)) = self.net() {
            return n.layout;
        }
        let mut tensors = Vec::new();
        let mut off = 0;
        for (l, (fi, fo)) in self.linears().into_iter().enumerate() {
            tensors.push(TensorSlot {
                name: format!("layers.{l}.weight"),
                shape: vec![fo, fi],
                offset: off,
            });
            off += fi * fo;
            tensors.push(TensorSlot {
                name: format!("layers.{l}.bias"),
                shape: vec![fo],
                offset: off,
            });
            off += fo;
        }
        Layout {
            tensors,
            total: off,
        }
    }

    /// Seeded initialisation: He (normal, std √(2/fan_in)) before ReLU, Xavier (uniform,
    /// ±√(6/(fan_in+fan_out))) elsewhere and for the output layer; biases zero.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        if let Ok(Some(n)) = self.net() {
            return n.init(seed);
        }
        let layout = self.layout();
        let mut theta = vec![0f32; layout.total];
        let mut rng = Rng::derive(seed, 0x1A17);
        let layers = self.linears();
        for (l, &(fi, fo)) in layers.iter().enumerate() {
            let w = &layout.tensors[2 * l];
            let slice = &mut theta[w.offset..w.offset + fi * fo];
            let hidden = l + 1 < layers.len();
            if hidden && self.activation == Activation::Relu {
                let std = (2.0 / fi as f64).sqrt();
                slice
                    .iter_mut()
                    .for_each(|v| *v = (rng.normal() * std) as f32);
            } else {
                let a = (6.0 / (fi + fo) as f64).sqrt();
                slice
                    .iter_mut()
                    .for_each(|v| *v = rng.uniform_range(-a, a) as f32);
            }
        }
        theta
    }

    /// Width `i` of [inputs, hidden..., outputs], without building the list.
    fn width(&self, i: usize) -> usize {
        match i {
            0 => self.inputs,
            i if i <= self.hidden.len() => self.hidden[i - 1],
            _ => self.outputs,
        }
    }

    /// Dense layer `l`'s (fan_in, fan_out), without allocating (it is on the CPU backend's step path).
    pub fn linear(&self, l: usize) -> (usize, usize) {
        (self.width(l), self.width(l + 1))
    }

    /// Dense layer `l`'s (weight offset, bias offset) in the flat buffer: the same arithmetic as
    /// `layout`, without building the table.
    pub fn offsets(&self, l: usize) -> (usize, usize) {
        let start: usize = (0..l)
            .map(|j| {
                let (fi, fo) = self.linear(j);
                fi * fo + fo
            })
            .sum();
        let (fi, fo) = self.linear(l);
        (start, start + fi * fo)
    }
}

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl TensorSlot {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The layout table of the flat parameter (and gradient) buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub tensors: Vec<TensorSlot>,
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_contiguous_and_named_like_pytorch() {
        let s = ModelSpec::new(ModelKind::Mlp, 5, 3, vec![4, 2], Activation::Relu).unwrap();
        let l = s.layout();
        let names: Vec<&str> = l.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.weight",
                "layers.0.bias",
                "layers.1.weight",
                "layers.1.bias",
                "layers.2.weight",
                "layers.2.bias"
            ]
        );
        assert_eq!(l.tensors[0].shape, vec![4, 5]);
        let mut off = 0;
        for t in &l.tensors {
            assert_eq!(t.offset, off);
            off += t.len();
        }
        assert_eq!(off, l.total);
        assert_eq!(l.total, 5 * 4 + 4 + 4 * 2 + 2 + 2 * 3 + 3);
    }

    #[test]
    fn offsets_and_layers_agree_with_the_layout_table() {
        let s = ModelSpec::new(ModelKind::Mlp, 7, 3, vec![5, 4, 6], Activation::Tanh).unwrap();
        let l = s.layout();
        for (i, (fi, fo)) in s.linears().into_iter().enumerate() {
            assert_eq!(s.linear(i), (fi, fo));
            assert_eq!(
                s.offsets(i),
                (l.tensors[2 * i].offset, l.tensors[2 * i + 1].offset)
            );
        }
    }

    #[test]
    fn init_is_seeded_and_scaled_by_fan_in() {
        let s = ModelSpec::new(ModelKind::Mlp, 400, 10, vec![300], Activation::Relu).unwrap();
        let a = s.init(1);
        assert_eq!(a, s.init(1));
        assert_ne!(a, s.init(2));
        let w0 = &a[..400 * 300];
        let var = w0.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / w0.len() as f64;
        assert!(
            (var - 2.0 / 400.0).abs() < 0.1 * 2.0 / 400.0,
            "He variance {var}"
        );
        let (_, b0) = s.offsets(0);
        assert!(a[b0..b0 + 300].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let e = ModelSpec::new(ModelKind::Mlp, 4, 3, vec![8, 0], Activation::Relu).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        let e = ModelSpec::new(ModelKind::Logreg, 4, 3, vec![], Activation::Relu).unwrap_err();
        assert!(e.to_string().contains("labels 0 and 1"), "{e}");
        let e = ModelSpec::new(ModelKind::Softmax, 4, 1, vec![], Activation::Relu).unwrap_err();
        assert!(e.to_string().contains("at least 2 classes"), "{e}");
    }
}
