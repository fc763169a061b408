// batch_norm.wgsl — batch normalisation of an NCHW tensor with given per-channel statistics, forward
// and backward (override BACKWARD). stats[4c..4c+4] = (mean, 1/std, Σ dy, Σ dy·(x − mean)), the sums
// over the whole batch (all ranks under SyncBatchNorm) from channel_sums.wgsl; m is their count.
//
// Forward:  y = (x − mean)·invstd·gamma + beta
// Backward: dx = gamma·invstd·(dy − Σdy/m − (x − mean)·invstd²·Σdy(x − mean)/m)
// One invocation per element.

override BACKWARD: bool = false;

struct Params {
    n: u32,
    c: u32,
    s: u32,    // h·w
    m: f32,    // the batch's element count per channel (over all ranks)
}

// forward: src = x, dst = y (dy unused); backward: src = x, dy, dst = dx
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> affine: array<f32>;   // gamma[0..c], beta[c..2c]
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    if (e >= p.n * p.c * p.s) {
        return;
    }
    let c = (e / p.s) % p.c;
    let mean = stats[4u * c];
    let invstd = stats[4u * c + 1u];
    let gamma = affine[c];
    let xmu = src[e] - mean;
    if (BACKWARD) {
        let sdy = stats[4u * c + 2u];
        let sdyx = stats[4u * c + 3u];
        dst[e] = gamma * invstd * (dy[e] - sdy / p.m - xmu * invstd * invstd * sdyx / p.m);
    } else {
        dst[e] = xmu * invstd * gamma + affine[p.c + c];
    }
}
