//! The preset networks, module for module as `../shared/anchors/pytorch_cnn.py` builds them, so that
//! their tensors carry the same `state_dict` names and shapes:
//! - LeNet-5: `nn.Sequential(conv 5×5 1→6 pad 2, ReLU, max-pool 2, conv 5×5 6→16, ReLU, max-pool 2,
//!   flatten, linear 400→120, ReLU, 120→84, ReLU, 84→classes)`; it takes 1×28×28 images.
//! - ResNet-20/32/56 (CIFAR-style): conv 3×3 →16 (no bias), BatchNorm, ReLU, then 3 stages of
//!   (depth − 2)/6 basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 has
//!   stride 2 and a 1×1 convolution with BatchNorm on its skip path), global average pooling,
//!   flatten, linear 64→classes. The blocks are the Sequential's modules 3, 4, …; inside a block
//!   `c1`, `b1`, `c2`, `b2` and `short.0`, `short.1`.

use super::layers::conv2d::Conv2d;
use super::layers::linear::Linear;
use super::layers::pool::{Pool2d, PoolOp};
use super::{Builder, Net, Op, Shape, Src};

/// The input LeNet-5 is defined for (its flatten is 16×5×5 = 400 wide).
pub const LENET5_INPUT: Shape = Shape { c: 1, h: 28, w: 28 };

fn conv(out: usize, kernel: usize, stride: usize, padding: usize, bias: bool) -> Op {
    Op::Conv2d(Conv2d {
        out,
        kernel,
        stride,
        padding,
        bias,
    })
}

fn max_pool(k: usize) -> Op {
    Op::Pool(PoolOp::Max(Pool2d {
        kernel: k,
        stride: None,
        padding: 0,
    }))
}

pub fn lenet5(input: Shape, classes: usize) -> Result<Net, String> {
    if input != LENET5_INPUT {
        return Err(format!(
            "lenet5 takes {LENET5_INPUT} images, and the data holds {input}"
        ));
    }
    let mut b = Builder::new(input);
    b.then("0", conv(6, 5, 1, 2, true))?;
    b.then("1", Op::Relu)?;
    b.then("2", max_pool(2))?;
    b.then("3", conv(16, 5, 1, 0, true))?;
    b.then("4", Op::Relu)?;
    b.then("5", max_pool(2))?;
    b.then("6", Op::Flatten)?;
    b.then("7", Op::Linear(Linear::new(120)))?;
    b.then("8", Op::Relu)?;
    b.then("9", Op::Linear(Linear::new(84)))?;
    b.then("10", Op::Relu)?;
    b.then("11", Op::Linear(Linear::new(classes)))?;
    b.finish()
}

/// A CIFAR-style ResNet of `depth` = 6n + 2 layers (20, 32, 56, …).
pub fn resnet(depth: usize, input: Shape, classes: usize) -> Result<Net, String> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        return Err(format!(
            "a CIFAR ResNet has 6n + 2 layers (20, 32, 56), not {depth}"
        ));
    }
    let blocks = (depth - 2) / 6;
    let mut b = Builder::new(input);
    b.then("0", conv(16, 3, 1, 1, false))?;
    b.then("1", Op::BatchNorm2d)?;
    b.then("2", Op::Relu)?;
    let mut index = 3;
    let mut cin = 16;
    for (cout, stride) in [(16, 1), (32, 2), (64, 2)] {
        for i in 0..blocks {
            let s = if i == 0 { stride } else { 1 };
            let name = index.to_string();
            let x = b.last();
            b.add(&format!("{name}.c1"), conv(cout, 3, s, 1, false), &[x])?;
            b.then(&format!("{name}.b1"), Op::BatchNorm2d)?;
            b.then(&format!("{name}.relu1"), Op::Relu)?;
            b.then(&format!("{name}.c2"), conv(cout, 3, 1, 1, false))?;
            let main = b.then(&format!("{name}.b2"), Op::BatchNorm2d)?;
            let skip: Src = if s != 1 || cin != cout {
                b.add(&format!("{name}.short.0"), conv(cout, 1, s, 0, false), &[x])?;
                b.then(&format!("{name}.short.1"), Op::BatchNorm2d)?
            } else {
                x
            };
            b.add(&format!("{name}.add"), Op::Add, &[main, skip])?;
            b.then(&format!("{name}.relu2"), Op::Relu)?;
            cin = cout;
            index += 1;
        }
    }
    b.then(&index.to_string(), Op::Pool(PoolOp::Global))?;
    b.then(&(index + 1).to_string(), Op::Flatten)?;
    b.then(&(index + 2).to_string(), Op::Linear(Linear::new(classes)))?;
    b.finish()
}
