// gelu.wgsl — GELU with GPT-2's tanh approximation, forward and backward (override BACKWARD):
//   y = ½·x·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)
//   dx = dy·(½·(1 + tanh(u)) + ½·x·(1 − tanh²(u))·√(2/π)·(1 + 3·0.044715·x²))
// u is clamped to ±15 before tanh (tanh(±15) is ±1 in f32), so that no backend's tanh overflows.
// One invocation per element; forward: src = x, dst = y; backward: src = x, dy = dy, dst = dx.

override BACKWARD: bool = false;

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const S: f32 = 0.7978845608028654; // √(2/π)
const K: f32 = 0.044715;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    if (e >= p.len) {
        return;
    }
    let x = src[e];
    let u = clamp(S * (x + K * x * x * x), -15.0, 15.0);
    let th = tanh(u);
    if (BACKWARD) {
        let d = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * S * (1.0 + 3.0 * K * x * x);
        dst[e] = dy[e] * d;
    } else {
        dst[e] = 0.5 * x * (1.0 + th);
    }
}
