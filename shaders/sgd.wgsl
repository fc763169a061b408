// sgd.wgsl — SGD with momentum, Nesterov and weight decay over the flat parameter buffer (PyTorch's rule).
//
//   g = grad · grad_scale · clip[0] + weight_decay · θ
//   v = momentum · v + g                      (v starts at 0, no dampening)
//   step = g + momentum · v  if Nesterov, else v   (momentum = 0 gives plain SGD)
//   θ = θ - lr · step
// grad_scale is 1 / (samples in the global batch): gradients arrive as per-sample sums. clip[0] is the
// global-norm clipping factor (grad_norm.wgsl), 1 without clipping; clip[2] ≠ 0 skips the step.
// One thread per parameter; the 2-D grid is flattened for more than 16 M parameters.

struct Params {
    n: u32,
    nesterov: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    grad_scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> theta: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> vel: array<f32>;
@group(0) @binding(3) var<storage, read> clip: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    // clip[2]: a mixed-precision step whose gradients overflowed is skipped
    if (i >= p.n || clip[2] != 0.0) {
        return;
    }
    let w = theta[i];
    let g = grad[i] * p.grad_scale * clip[0] + p.weight_decay * w;
    let v = p.momentum * vel[i] + g;
    vel[i] = v;
    let step = select(v, g + p.momentum * v, p.nesterov != 0u);
    theta[i] = w - p.lr * step;
}
