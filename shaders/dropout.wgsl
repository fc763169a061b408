// dropout.wgsl — inverted dropout with a mask that is a pure function of (seed, step, layer, sample,
// unit), so that the GPU, the CPU backend and any number of ranks drop the same units.
//
// Forward (IN_PLACE = false): dst[r, j] = src[r, j] · keep(r, j) / (1 - p) for the batch's rows r, whose
// global sample numbers are index[offset + r] + index_base (the epoch's order, shifted to the whole
// training set in split sharding). Backward (IN_PLACE = true): the gradient dst[r, j] is scaled by the
// same factor in place (src is not read). keep(r, j) = hash(...) >> 8 ≥ threshold, threshold being
// round(p · 2^24): the 24 high bits of a 32-bit integer hash (lowbias32, chained over the inputs).

override IN_PLACE: bool = false;

struct Params {
    rows: u32,
    cols: u32,
    offset: u32,      // first entry of this batch in `index`
    index_base: u32,  // added to each index entry to give the global sample number
    seed_lo: u32,
    seed_hi: u32,
    step_lo: u32,
    step_hi: u32,
    layer: u32,
    threshold: u32,   // drop when the 24-bit hash is below this
    scale: f32,       // 1 / (1 - p)
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> index: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

fn lowbias32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn mix(h: u32, v: u32) -> u32 {
    return lowbias32(h ^ v);
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    if (e >= p.rows * p.cols) {
        return;
    }
    let r = e / p.cols;
    let j = e % p.cols;
    let sample = index[p.offset + r] + p.index_base;
    var h = mix(0x9e3779b9u, p.seed_lo);
    h = mix(h, p.seed_hi);
    h = mix(h, p.step_lo);
    h = mix(h, p.step_hi);
    h = mix(h, p.layer);
    h = mix(h, sample);
    h = mix(h, j);
    let factor = select(0.0, p.scale, (h >> 8u) >= p.threshold);
    if (IN_PLACE) {
        dst[e] = dst[e] * factor;
    } else {
        dst[e] = src[e] * factor;
    }
}
