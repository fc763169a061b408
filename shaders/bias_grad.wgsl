// bias_grad.wgsl — the bias gradient: column sums of dZ[rows, cols] written into the flat gradient buffer.
//
// One thread per column walks the rows; neighbouring threads read neighbouring words, so every row
// read is coalesced. Summation order is fixed, so results are deterministic.

struct Params {
    rows: u32,
    cols: u32,
    dst_off: u32,  // element offset of this bias inside the flat gradient buffer
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> dz: array<f32>;
@group(0) @binding(1) var<storage, read_write> grads: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.cols) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        s += dz[r * p.cols + j];
    }
    grads[p.dst_off + j] = s;
}
