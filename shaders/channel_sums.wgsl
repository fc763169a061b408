// channel_sums.wgsl — per-channel sums over (n, h, w) of an NCHW tensor, the reductions of batch
// normalisation. One workgroup per channel; thread t adds the elements t, t + 256, t + 512, … of the
// channel (n-major, then h·w) in that order, then the 256 partial sums are added in a fixed tree. The
// order never depends on the device, so the sums are deterministic (no atomics: WGSL has none for
// floats) and the CPU reference reproduces them bit for bit.
//
// MODE 0: out[c] = Σ x                       (the batch mean's numerator)
// MODE 1: out[c] = Σ (x − mean[c])²          (the variance's, around the mean in aux[4c])
// MODE 2: out[2c] = Σ dy, out[2c + 1] = Σ dy·(x − mean[c])   (backward; mean in aux[4c])
// aux holds 4 values per channel, as batch_norm.wgsl's stats: (mean, 1/std, Σ dy, Σ dy·(x − mean)).

override MODE: u32 = 0u;

struct Params {
    n: u32,
    c: u32,
    s: u32,   // h·w
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> aux: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> part_a: array<f32, 256>;
var<workgroup> part_b: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let c = wg.x + wg.y * 65535u;
    // every thread of a workgroup reaches the barriers: a channel past the end only skips its work
    let live = c < p.c;
    let t = lid.x;
    let m = p.n * p.s;
    var a = 0.0;
    var b = 0.0;
    var mean = 0.0;
    if (live && MODE != 0u) {
        mean = aux[4u * c];
    }
    if (live) {
        for (var i = t; i < m; i += 256u) {
            let e = ((i / p.s) * p.c + c) * p.s + i % p.s;
            if (MODE == 0u) {
                a += x[e];
            } else if (MODE == 1u) {
                let d = x[e] - mean;
                a += d * d;
            } else {
                let g = dy[e];
                a += g;
                b += g * (x[e] - mean);
            }
        }
    }
    part_a[t] = a;
    part_b[t] = b;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (t < half) {
            part_a[t] += part_a[t + half];
            part_b[t] += part_b[t + half];
        }
        workgroupBarrier();
    }
    if (live && t == 0u) {
        if (MODE == 2u) {
            out[2u * c] = part_a[0];
            out[2u * c + 1u] = part_b[0];
        } else {
            out[c] = part_a[0];
        }
    }
}
