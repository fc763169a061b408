// softmax_xent.wgsl — softmax + cross-entropy + its gradient, fused: one pass per row of logits.
//
// For each row r with label y: loss_r = logsumexp(z_r) - z_r[y], dz_r = softmax(z_r) - onehot(y),
// correct_r = (first argmax of z_r == y). The gradient is that of the per-sample loss; the update
// divides by the number of samples in the (global) batch, so ranks with unequal shares still average
// exactly. Max-subtracted for stability. Labels are checked on the host before upload. dz is multiplied
// by the loss scale (mixed precision keeps small gradients above f16's underflow; 1 in f32 runs).

struct Params {
    rows: u32,
    classes: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> z: array<f32>;           // logits [rows, classes]
@group(0) @binding(1) var<storage, read> t: array<f32>;           // labels as f32 [rows]
@group(0) @binding(2) var<storage, read_write> dz: array<f32>;    // [rows, classes]
@group(0) @binding(3) var<storage, read_write> stats: array<f32>; // [rows, 2]: loss, correct
@group(0) @binding(4) var<storage, read> scaler: array<f32>;  // [0]: the loss scale (1 in f32 runs)
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x + gid.y * 65535u * 64u;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.classes;
    let y = u32(t[r]);
    var m = z[base];
    var arg = 0u;
    for (var j = 1u; j < p.classes; j++) {
        let v = z[base + j];
        if (v > m) {
            m = v;
            arg = j;
        }
    }
    var s = 0.0;
    for (var j = 0u; j < p.classes; j++) {
        s += exp(z[base + j] - m);
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < p.classes; j++) {
        dz[base + j] = (exp(z[base + j] - m) * inv - select(0.0, 1.0, j == y)) * scaler[0];
    }
    stats[2u * r] = m + log(s) - z[base + min(y, p.classes - 1u)];
    stats[2u * r + 1u] = select(0.0, 1.0, arg == y);
}
