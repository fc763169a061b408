// sigmoid_bce.wgsl — sigmoid + binary cross-entropy + its gradient, fused (logistic regression's loss).
//
// One logit z per row, target y in {0,1}: loss = max(z,0) - z·y + log(1 + exp(-|z|)) (never overflows),
// dz = sigmoid(z) - y, correct = ((z > 0) == (y > 0.5)). Per-sample gradient; the update divides by
// the global batch's sample count. dz is multiplied by the loss scale (1 in f32 runs).

struct Params {
    rows: u32,
    classes: u32,  // always 1 here; kept so every loss kernel shares one parameter block
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> z: array<f32>;
@group(0) @binding(1) var<storage, read> t: array<f32>;
@group(0) @binding(2) var<storage, read_write> dz: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;
@group(0) @binding(4) var<storage, read> scaler: array<f32>;  // [0]: the loss scale (1 in f32 runs)
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x + gid.y * 65535u * 64u;
    if (r >= p.rows) {
        return;
    }
    let v = z[r];
    let y = t[r];
    let e = exp(-abs(v));
    // sigmoid from the same exp: stable for either sign of v
    let sig = select(e / (1.0 + e), 1.0 / (1.0 + e), v >= 0.0);
    dz[r] = (sig - y) * scaler[0];
    stats[2u * r] = max(v, 0.0) - v * y + log(1.0 + e);
    stats[2u * r + 1u] = select(0.0, 1.0, (v > 0.0) == (y > 0.5));
}
