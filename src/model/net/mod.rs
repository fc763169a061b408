//! Networks that are graphs of layers with shapes: the convolutional models (LeNet-5, the CIFAR
//! ResNets) and any later one. A [`Net`] is built from the input's shape by [`Builder`], which infers
//! every node's output shape and declares every node's tensors with PyTorch's `state_dict` names
//! (`presets.rs` builds LeNet-5 and ResNet-20/32/56 as `../shared/anchors/pytorch_cnn.py` does, so
//! a saved file loads into those modules by name and shape).
//!
//! The flat buffer holds the trainable tensors first, in node order, then the buffers (BatchNorm's
//! running statistics), which the optimizer never touches. Each node reads earlier nodes' outputs
//! (or the input), so a residual block (a skip path added to a main path) is two edges into an
//! `Add`. Forward walks the nodes in order; backward walks them in reverse, adding the gradients
//! of a node's output that several nodes read.
//!
//! Layers: `layers/` holds each one's mathematics; [`Op`] is where a layer type is registered.

pub mod arch;
pub mod layers;
pub mod presets;

use std::fmt;
use std::ops::Range;

use ndarray::{Array2, ArrayView2, LinalgScalar};
use num_traits::Float;
use serde::{Deserialize, Serialize};

use self::layers::batch_norm;
use self::layers::conv2d::Conv2d;
use self::layers::linear::Linear;
use self::layers::pointwise;
use self::layers::pool::PoolOp;
use self::layers::{Declared, Init};
use super::{Layout, TensorSlot};
use crate::rng::Rng;

/// The shape of one sample's activation: channels, height, width; rows of F features are (F, 1, 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub fn image(c: usize, h: usize, w: usize) -> Self {
        Self { c, h, w }
    }
    pub fn rows(f: usize) -> Self {
        Self { c: f, h: 1, w: 1 }
    }
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_rows(&self) -> bool {
        self.h == 1 && self.w == 1
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_rows() {
            write!(f, "{}", self.c)
        } else {
            write!(f, "{}×{}×{}", self.c, self.h, self.w)
        }
    }
}

/// Largest kernel, stride or padding of a layer.
const MAX_WINDOW: usize = 1 << 12;
/// Largest number of output channels or features of a layer.
const MAX_CHANNELS: usize = crate::limits::MAX_WIDTH;
/// Largest number of values in one sample's output of a layer.
const MAX_VALUES: usize = 1 << 28;

/// Adds a vector over all ranks (an allreduce): SyncBatchNorm's statistics.
pub trait StatSum {
    fn sum(&mut self, v: &mut [f64]) -> anyhow::Result<()>;
}

/// What a node computes: the one place where a layer type is registered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Conv2d(Conv2d),
    Pool(PoolOp),
    BatchNorm2d,
    Linear(Linear),
    Relu,
    Flatten,
    /// The sum of its two inputs (a residual connection).
    Add,
}

impl Op {
    /// The type's name as `--arch` files and `model show` spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Conv2d(_) => "conv2d",
            Self::Pool(PoolOp::Max(_)) => "max_pool2d",
            Self::Pool(PoolOp::Avg(_)) => "avg_pool2d",
            Self::Pool(PoolOp::Global) => "global_avg_pool",
            Self::BatchNorm2d => "batch_norm2d",
            Self::Linear(_) => "linear",
            Self::Relu => "relu",
            Self::Flatten => "flatten",
            Self::Add => "add",
        }
    }

    /// Settings small enough that the shape arithmetic cannot overflow.
    fn check_sizes(&self) -> Result<(), String> {
        let window = |k: usize, s: usize, p: usize| {
            if k > MAX_WINDOW || s > MAX_WINDOW || p > MAX_WINDOW {
                Err(format!(
                    "kernel, stride and padding must be at most {MAX_WINDOW}"
                ))
            } else {
                Ok(())
            }
        };
        match self {
            Self::Conv2d(c) if c.out > MAX_CHANNELS => {
                Err(format!("out must be at most {MAX_CHANNELS}"))
            }
            Self::Conv2d(c) => window(c.kernel, c.stride, c.padding),
            Self::Pool(PoolOp::Max(p) | PoolOp::Avg(p)) => {
                window(p.kernel, p.stride.unwrap_or(p.kernel), p.padding)
            }
            Self::Linear(l) if l.out > MAX_CHANNELS => {
                Err(format!("out must be at most {MAX_CHANNELS}"))
            }
            _ => Ok(()),
        }
    }

    fn out_shape(&self, inputs: &[Shape]) -> Result<Shape, String> {
        let x = inputs[0];
        match self {
            Self::Conv2d(c) => c.out_shape(x),
            Self::Pool(p) => p.out_shape(x),
            Self::BatchNorm2d | Self::Relu => Ok(x),
            Self::Flatten => Ok(Shape::rows(x.len())),
            Self::Linear(l) => {
                if !x.is_rows() {
                    return Err(format!(
                        "takes rows of features, but its input is {x} images (add a flatten before it)"
                    ));
                }
                if l.out == 0 {
                    return Err("out must be at least 1".into());
                }
                if let Some(k) = l.inputs
                    && k != x.c
                {
                    return Err(format!("in = {k}, but its input has {} features", x.c));
                }
                Ok(Shape::rows(l.out))
            }
            Self::Add => {
                if inputs[1] != x {
                    return Err(format!("adds a {x} input to a {} input", inputs[1]));
                }
                Ok(x)
            }
        }
    }

    fn tensors(&self, x: Shape) -> Vec<Declared> {
        match self {
            Self::Conv2d(c) => c.tensors(x),
            Self::BatchNorm2d => batch_norm::tensors(x.c),
            Self::Linear(l) => l.tensors(x.len()),
            _ => Vec::new(),
        }
    }
}

/// Where a node reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Input,
    Node(usize),
}

/// One node of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The PyTorch module path of the node's tensors (`3.c1` → `3.c1.weight`).
    pub name: String,
    pub op: Op,
    pub inputs: Vec<Src>,
    /// The shape of its (first) input, and of its output.
    pub input: Shape,
    pub out: Shape,
    /// Its trainable tensors (a range of the layout's table, contiguous in the flat buffer).
    pub params: Range<usize>,
    /// Its buffers (a range of the layout's table, contiguous too).
    pub buffers: Range<usize>,
}

/// A network: nodes in an order where each reads only earlier ones, the last giving the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Net {
    pub input: Shape,
    pub nodes: Vec<Node>,
    pub layout: Layout,
    /// Values in the flat buffer that are trained (the rest are buffers).
    pub trainable: usize,
    inits: Vec<Init>,
}

/// Builds a [`Net`] node by node, checking shapes as it goes.
pub struct Builder {
    input: Shape,
    nodes: Vec<(Node, Vec<Declared>)>,
}

impl Builder {
    pub fn new(input: Shape) -> Self {
        Self {
            input,
            nodes: Vec::new(),
        }
    }

    pub fn shape(&self, s: Src) -> Shape {
        match s {
            Src::Input => self.input,
            Src::Node(i) => self.nodes[i].0.out,
        }
    }

    /// The last node added (the input before any).
    pub fn last(&self) -> Src {
        match self.nodes.len() {
            0 => Src::Input,
            n => Src::Node(n - 1),
        }
    }

    /// Add a node reading `inputs`; the error names the node and what does not fit.
    pub fn add(&mut self, name: &str, op: Op, inputs: &[Src]) -> Result<Src, String> {
        let want = if op == Op::Add { 2 } else { 1 };
        if inputs.len() != want {
            return Err(format!(
                "layer {name} ({}): takes {want} input(s), got {}",
                op.kind(),
                inputs.len()
            ));
        }
        let shapes: Vec<Shape> = inputs.iter().map(|&s| self.shape(s)).collect();
        let out = op
            .check_sizes()
            .and_then(|_| op.out_shape(&shapes))
            .and_then(|out| {
                let values = out.c.checked_mul(out.h).and_then(|v| v.checked_mul(out.w));
                match values {
                    Some(v) if v <= MAX_VALUES => Ok(out),
                    _ => Err(format!(
                        "an output of {}×{}×{} values per sample is more than the {MAX_VALUES} dptrain takes",
                        out.c, out.h, out.w
                    )),
                }
            })
            .map_err(|e| format!("layer {name} ({}): {e}", op.kind()))?;
        let decl = op.tensors(shapes[0]);
        self.nodes.push((
            Node {
                name: name.to_string(),
                op,
                inputs: inputs.to_vec(),
                input: shapes[0],
                out,
                params: 0..0,
                buffers: 0..0,
            },
            decl,
        ));
        Ok(self.last())
    }

    /// The op of the first node added (for building one layer elsewhere).
    pub fn first_op(&self) -> Option<Op> {
        self.nodes.first().map(|(n, _)| n.op)
    }

    /// Add a node reading the last one.
    pub fn then(&mut self, name: &str, op: Op) -> Result<Src, String> {
        let last = self.last();
        self.add(name, op, &[last])
    }

    /// Lay the tensors out (trainable ones first, then the buffers) and finish.
    pub fn finish(self) -> Result<Net, String> {
        if self.nodes.is_empty() {
            return Err("the network has no layers".into());
        }
        let mut tensors = Vec::new();
        let mut inits = Vec::new();
        let mut nodes = Vec::new();
        let mut off = 0;
        let mut pending = Vec::new();
        for (mut node, decl) in self.nodes {
            let start = tensors.len();
            for d in decl.iter().filter(|d| !d.buffer) {
                let slot = slot(&node.name, d, off);
                off += slot.len();
                tensors.push(slot);
                inits.push(d.init);
            }
            node.params = start..tensors.len();
            pending.push(decl.into_iter().filter(|d| d.buffer).collect::<Vec<_>>());
            nodes.push(node);
        }
        let trainable = off;
        for (node, decl) in nodes.iter_mut().zip(pending) {
            let start = tensors.len();
            for d in &decl {
                let slot = slot(&node.name, d, off);
                off += slot.len();
                tensors.push(slot);
                inits.push(d.init);
            }
            node.buffers = start..tensors.len();
        }
        Ok(Net {
            input: self.input,
            nodes,
            layout: Layout {
                tensors,
                total: off,
            },
            trainable,
            inits,
        })
    }
}

fn slot(name: &str, d: &Declared, offset: usize) -> TensorSlot {
    TensorSlot {
        name: format!("{name}.{}", d.suffix),
        shape: d.shape.clone(),
        offset,
    }
}

/// How a forward pass runs.
pub enum Mode<'s> {
    /// Running statistics normalise; nothing is kept for backward.
    Eval,
    /// Batch statistics normalise (summed over ranks by `sync` under SyncBatchNorm).
    Train(Option<&'s mut dyn StatSum>),
}

/// What a node's forward keeps for its backward.
#[derive(Clone, Debug)]
pub enum Aux<T> {
    None,
    /// Max pooling's chosen taps.
    Arg(Vec<u32>),
    Norm(batch_norm::Saved<T>),
}

/// A forward pass's results: every node's output (the last is the logits) and what backward needs.
#[derive(Clone, Debug)]
pub struct Trace<T> {
    pub outs: Vec<Array2<T>>,
    pub aux: Vec<Aux<T>>,
}

impl Trace<f32> {
    pub fn logits(&self) -> Option<&Array2<f32>> {
        self.outs.last()
    }
}

impl Net {
    fn view<'a, T>(&self, theta: &'a [T], t: usize) -> &'a [T] {
        let s = &self.layout.tensors[t];
        &theta[s.offset..s.offset + s.len()]
    }

    fn tensors_of<'a, T>(&self, theta: &'a [T], r: &Range<usize>) -> Vec<&'a [T]> {
        r.clone().map(|t| self.view(theta, t)).collect()
    }

    /// Disjoint mutable views of tensors `r` (contiguous in the buffer).
    fn tensors_mut<'a, T>(&self, buf: &'a mut [T], r: &Range<usize>) -> Vec<&'a mut [T]> {
        let Some(first) = self.layout.tensors.get(r.start) else {
            return Vec::new();
        };
        let mut rest = &mut buf[first.offset..];
        let mut out = Vec::new();
        for t in r.clone() {
            let (head, tail) = rest.split_at_mut(self.layout.tensors[t].len());
            out.push(head);
            rest = tail;
        }
        out
    }

    fn input_of<'a, T>(
        &self,
        x: ArrayView2<'a, T>,
        outs: &'a [Array2<T>],
        s: Src,
    ) -> ArrayView2<'a, T> {
        match s {
            Src::Input => x,
            Src::Node(j) => outs[j].view(),
        }
    }

    /// Every node's output for a batch `x` (rows of the input shape).
    pub fn forward<T: Float + LinalgScalar + Send + Sync>(
        &self,
        theta: &[T],
        x: ArrayView2<T>,
        mut mode: Mode<'_>,
    ) -> anyhow::Result<Trace<T>> {
        let mut outs: Vec<Array2<T>> = Vec::with_capacity(self.nodes.len());
        let mut aux = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let p = self.tensors_of(theta, &node.params);
            let a = self.input_of(x, &outs, node.inputs[0]);
            let (y, keep) = match node.op {
                Op::Conv2d(c) => (c.forward(node.input, a, &p), Aux::None),
                Op::Linear(l) => (l.forward(a, &p), Aux::None),
                Op::Pool(pool) => {
                    let (y, arg) = pool.forward(node.input, a);
                    (y, Aux::Arg(arg))
                }
                Op::BatchNorm2d => match &mut mode {
                    Mode::Train(sync) => {
                        let (y, saved) =
                            batch_norm::forward_train(node.input, a, &p, sync.as_deref_mut())?;
                        (y, Aux::Norm(saved))
                    }
                    Mode::Eval => {
                        let b = self.tensors_of(theta, &node.buffers);
                        let all: Vec<&[T]> = p.iter().chain(&b).copied().collect();
                        (batch_norm::forward_eval(node.input, a, &all), Aux::None)
                    }
                },
                Op::Relu => (pointwise::relu(a), Aux::None),
                Op::Flatten => (a.to_owned(), Aux::None),
                Op::Add => {
                    let b = self.input_of(x, &outs, node.inputs[1]);
                    (pointwise::add(a, b), Aux::None)
                }
            };
            outs.push(y);
            aux.push(keep);
        }
        Ok(Trace { outs, aux })
    }

    /// Backward from `dz`, the loss gradient at the logits: every trainable tensor's gradient into
    /// `grads` (the flat layout; buffers untouched).
    pub fn backward<T: Float + LinalgScalar + Send + Sync>(
        &self,
        theta: &[T],
        x: ArrayView2<T>,
        trace: &Trace<T>,
        dz: Array2<T>,
        grads: &mut [T],
        mut sync: Option<&mut (dyn StatSum + '_)>,
    ) -> anyhow::Result<()> {
        let n = self.nodes.len();
        let mut dys: Vec<Option<Array2<T>>> = vec![None; n];
        dys[n - 1] = Some(dz);
        for i in (0..n).rev() {
            let Some(dy) = dys[i].take() else {
                continue;
            };
            let node = &self.nodes[i];
            let p = self.tensors_of(theta, &node.params);
            let mut g = self.tensors_mut(grads, &node.params);
            let a = self.input_of(x, &trace.outs, node.inputs[0]);
            let need = node.inputs.iter().any(|s| matches!(s, Src::Node(_)));
            let dx: Vec<Option<Array2<T>>> = match (&node.op, &trace.aux[i]) {
                (Op::Conv2d(c), _) => vec![c.backward(node.input, a, dy.view(), &p, &mut g, need)],
                (Op::Linear(l), _) => vec![l.backward(a, dy.view(), &p, &mut g, need)],
                (Op::Pool(pool), Aux::Arg(arg)) => {
                    vec![need.then(|| pool.backward(node.input, dy.view(), arg))]
                }
                (Op::BatchNorm2d, Aux::Norm(saved)) => vec![Some(batch_norm::backward(
                    node.input,
                    a,
                    dy.view(),
                    &p,
                    saved,
                    &mut g,
                    sync.as_deref_mut(),
                )?)],
                (Op::Relu, _) => vec![Some(pointwise::relu_backward(
                    trace.outs[i].view(),
                    dy.view(),
                ))],
                (Op::Flatten, _) => vec![Some(dy)],
                (Op::Add, _) => vec![Some(dy.clone()), Some(dy)],
                (op, _) => anyhow::bail!("{}: backward without its forward's record", op.kind()),
            };
            for (src, d) in node.inputs.iter().zip(dx) {
                if let (Src::Node(j), Some(d)) = (src, d) {
                    match &mut dys[*j] {
                        Some(acc) => acc.zip_mut_with(&d, |a, &v| *a = *a + v),
                        slot => *slot = Some(d),
                    }
                }
            }
        }
        Ok(())
    }

    /// After a training forward: each BatchNorm's running statistics, PyTorch's way.
    pub fn update_running<T: Float>(&self, theta: &mut [T], trace: &Trace<T>) {
        for (node, aux) in self.nodes.iter().zip(&trace.aux) {
            if let Aux::Norm(saved) = aux {
                let mut b = self.tensors_mut(theta, &node.buffers);
                batch_norm::update_running(&mut b, saved);
            }
        }
    }

    /// Seeded initialisation, PyTorch's defaults: conv and linear U(±1/√fan_in), BatchNorm
    /// weight 1 and bias 0, running mean 0 and variance 1.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut theta = vec![0f32; self.layout.total];
        let mut rng = Rng::derive(seed, 0xC0_4E75);
        for (t, init) in self.layout.tensors.iter().zip(&self.inits) {
            let v = &mut theta[t.offset..t.offset + t.len()];
            match *init {
                Init::Uniform(b) => v
                    .iter_mut()
                    .for_each(|x| *x = rng.uniform_range(-b, b) as f32),
                Init::Const(c) => v.fill(c),
            }
        }
        theta
    }

    /// Multiply-adds per sample in the forward pass.
    pub fn macs(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| match n.op {
                Op::Conv2d(c) => c.macs(n.input, n.out),
                Op::Linear(l) => n.input.len() * l.out,
                _ => 0,
            })
            .sum()
    }

    /// Each node's trainable range in the flat buffer (nodes with parameters only, in order), then
    /// the buffers' range when there are any: the exchange's layers.
    pub fn groups(&self) -> Vec<Range<usize>> {
        let mut v: Vec<Range<usize>> = self
            .nodes
            .iter()
            .filter(|n| !n.params.is_empty())
            .map(|n| {
                let first = &self.layout.tensors[n.params.start];
                let last = &self.layout.tensors[n.params.end - 1];
                first.offset..last.offset + last.len()
            })
            .collect();
        if self.layout.total > self.trainable {
            v.push(self.trainable..self.layout.total);
        }
        v
    }

    /// Values of every node's output for one sample, for the memory limits.
    pub fn activations(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.out.len())
            .fold(self.input.len(), usize::saturating_add)
    }

    /// The widest activation, for the memory limits.
    pub fn widest(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.out.len())
            .max()
            .unwrap_or(0)
            .max(self.input.len())
    }

    /// `model show`'s table, as torchinfo prints it: each layer's output shape and parameters.
    pub fn summary(&self) -> String {
        let mut rows = vec![(
            "layer".to_string(),
            "type".to_string(),
            "output".to_string(),
            "parameters".to_string(),
        )];
        rows.push((
            "input".into(),
            String::new(),
            self.input.to_string(),
            String::new(),
        ));
        for n in &self.nodes {
            let count: usize = n.params.clone().map(|t| self.layout.tensors[t].len()).sum();
            rows.push((
                n.name.clone(),
                n.op.kind().to_string(),
                n.out.to_string(),
                if count > 0 {
                    count.to_string()
                } else {
                    String::new()
                },
            ));
        }
        let w: Vec<usize> = (0..3)
            .map(|k| {
                rows.iter()
                    .map(|r| [&r.0, &r.1, &r.2][k].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut s = String::new();
        for r in &rows {
            s.push_str(&format!(
                "{:<a$}  {:<b$}  {:<c$}  {:>10}\n",
                r.0,
                r.1,
                r.2,
                r.3,
                a = w[0],
                b = w[1],
                c = w[2]
            ));
        }
        let buffers = self.layout.total - self.trainable;
        s.push_str(&format!(
            "trainable parameters: {}; buffers: {}; forward multiply-adds per sample: {}\n",
            self.trainable,
            buffers,
            self.macs()
        ));
        s
    }
}

#[cfg(test)]
mod tests;
