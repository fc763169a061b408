// bias_grad.wgsl — the bias gradient: column sums of dZ[rows, cols] written (or added) into the flat
// gradient buffer.
//
// A workgroup of 16×16 threads owns 16 columns: thread (x, y) sums column x over the rows y, y+16,
// y+32, ..., then the 16 partial sums of each column are added in workgroup memory in a fixed order.
// Sixteen threads per column keep a large GPU busy even when there are few columns (a batch of 8192
// rows and 1024 columns gives 64 workgroups of 256 threads), and each row read by a half-warp is 64
// contiguous bytes. The summation order is fixed, so results are deterministic.

struct Params {
    rows: u32,
    cols: u32,
    dst_off: u32,     // element offset of this bias inside the flat gradient buffer
    accumulate: u32,  // 1: add to the gradient already there (micro-batches of one update)
}

@group(0) @binding(0) var<storage, read> dz: array<f32>;
@group(0) @binding(1) var<storage, read_write> grads: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> partial: array<f32, 256>; // [lane y][column x]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let j = wg.x * 16u + lid.x;
    var s = 0.0;
    if (j < p.cols) {
        for (var r = lid.y; r < p.rows; r += 16u) {
            s += dz[r * p.cols + j];
        }
    }
    partial[lid.y * 16u + lid.x] = s;
    workgroupBarrier();
    for (var half = 8u; half > 0u; half >>= 1u) {
        if (lid.y < half) {
            partial[lid.y * 16u + lid.x] += partial[(lid.y + half) * 16u + lid.x];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && j < p.cols) {
        if (p.accumulate != 0u) {
            grads[p.dst_off + j] += partial[lid.x];
        } else {
            grads[p.dst_off + j] = partial[lid.x];
        }
    }
}
