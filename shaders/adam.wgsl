// adam.wgsl — Adam and AdamW over the flat parameter buffer, with PyTorch's definitions.
//
//   g = grad · grad_scale · clip[0]           (gradients arrive as per-sample sums; clip[0] is the
//                                             global-norm clipping factor, 1 without clipping;
//                                             clip[2] ≠ 0 skips the step)
//   Adam:  g += weight_decay · θ              (L2 added to the gradient)
//   AdamW: θ  = θ · (1 - lr · weight_decay)   (decoupled weight decay)
//   m = β1·m + (1 - β1)·g
//   v = β2·v + (1 - β2)·g²
//   θ = θ - step_size · m / (√v / bc2_sqrt + ε)
// with step_size = lr / (1 - β1^t) and bc2_sqrt = √(1 - β2^t) computed on the host in f64 for the
// update's step t (1-based), as torch.optim.Adam does. One thread per parameter.

struct Params {
    n: u32,
    decoupled: u32,      // 1: AdamW
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    grad_scale: f32,
    step_size: f32,
    bc2_sqrt: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> theta: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(4) var<storage, read> clip: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    // clip[2]: a mixed-precision step whose gradients overflowed is skipped
    if (i >= p.n || clip[2] != 0.0) {
        return;
    }
    var w = theta[i];
    var g = grad[i] * p.grad_scale * clip[0];
    if (p.decoupled != 0u) {
        w = w * (1.0 - p.lr * p.weight_decay);
    } else {
        g = g + p.weight_decay * w;
    }
    let m = p.beta1 * exp_avg[i] + (1.0 - p.beta1) * g;
    let v = p.beta2 * exp_avg_sq[i] + (1.0 - p.beta2) * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    theta[i] = w - p.step_size * m / (sqrt(v) / p.bc2_sqrt + p.eps);
}
