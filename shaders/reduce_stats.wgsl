// reduce_stats.wgsl — add a batch's per-row (loss, correct) pairs into a running total on the GPU.
//
// One workgroup of 256 threads: each sums a strided share of the rows, then a tree reduction in
// workgroup memory; thread 0 adds the result to `total` (loss sum as f32 bits, correct and sample
// counts as u32) and records the batch's loss sum in `history[slot]`, so that the host, reading
// both only at logging points, can still name the first step whose loss was not finite.

struct Params {
    rows: u32,
    slot: u32,  // this step's entry in `history`
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> stats: array<f32>;      // [rows, 2]
@group(0) @binding(1) var<storage, read_write> total: array<u32>; // loss bits, correct, count, unused
@group(0) @binding(2) var<storage, read_write> history: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> sl: array<f32, 256>;
var<workgroup> sc: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) li: u32) {
    var l = 0.0;
    var c = 0.0;
    for (var r = li; r < p.rows; r += 256u) {
        l += stats[2u * r];
        c += stats[2u * r + 1u];
    }
    sl[li] = l;
    sc[li] = c;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) {
            sl[li] += sl[li + s];
            sc[li] += sc[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        total[0] = bitcast<u32>(bitcast<f32>(total[0]) + sl[0]);
        total[1] += u32(sc[0] + 0.5);
        total[2] += p.rows;
        history[p.slot] = sl[0];
    }
}
