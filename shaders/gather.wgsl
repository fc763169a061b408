// gather.wgsl — build one batch on the GPU: rows picked through an index buffer, normalised on the way.
//
// The training set is uploaded once. Each step reads `rows` indices starting at `offset` in `index`
// (an epoch's permutation, or 0..n for evaluation), copies those samples' features into the batch
// matrix X[rows, features] as x' = (x - shift[j]) · scale[j], and their targets into t[rows].
// Features are stored as f32 words, or as u8 packed four to a word (PIXELS_U8) so that pixel data
// takes a quarter of the memory and of the bandwidth.
// One thread per batch element; the 2-D grid is flattened (x + y·65535·256) for batches past 16 M elements.

override PIXELS_U8: bool = false;

struct Params {
    rows: u32,
    features: u32,
    offset: u32,  // first index of this batch inside `index`
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> data: array<u32>;     // f32 bits, or 4 packed u8
@group(0) @binding(1) var<storage, read> targets: array<f32>;  // one per sample
@group(0) @binding(2) var<storage, read> index: array<u32>;
@group(0) @binding(3) var<storage, read> norm: array<f32>;     // shift[features] then scale[features]
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> t: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    if (e >= p.rows * p.features) {
        return;
    }
    let row = e / p.features;
    let j = e % p.features;
    let src = index[p.offset + row];
    let at = src * p.features + j;
    var v: f32;
    if (PIXELS_U8) {
        v = f32((data[at / 4u] >> (8u * (at % 4u))) & 0xffu);
    } else {
        v = bitcast<f32>(data[at]);
    }
    x[e] = (v - norm[j]) * norm[p.features + j];
    if (j == 0u) {
        t[row] = targets[src];
    }
}
