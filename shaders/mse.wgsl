// mse.wgsl — squared error and its gradient for regression (one output per row).
//
// loss = (ŷ - y)², dŷ = 2(ŷ - y), as PyTorch's MSELoss before its mean; the update divides by the
// global batch's sample count. The second statistic is unused (0): regression reports RMSE from the loss.
// dz is multiplied by the loss scale (1 in f32 runs).

struct Params {
    rows: u32,
    classes: u32,
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
    let d = z[r] - t[r];
    dz[r] = 2.0 * d * scaler[0];
    stats[2u * r] = d * d;
    stats[2u * r + 1u] = 0.0;
}
