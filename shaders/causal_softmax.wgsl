// causal_softmax.wgsl — the softmax of attention scores under a causal mask, forward and backward
// (override BACKWARD). Scores are [rows, t] with rows = batch·heads·t: row r is query position
// q = r mod t and sees keys 0..=q; the entries above the diagonal are 0 in the output and the gradient.
//
// Forward:  P[j] = exp(scale·S[j] − m) / Σ_{k≤q} exp(scale·S[k] − m), m = max_{k≤q} scale·S[k]
// Backward: dS[j] = scale·P[j]·(dP[j] − Σ_{k≤q} P[k]·dP[k])
// One workgroup per row; the max and the sums are 256 strided partials in a fixed tree (deterministic).
// forward: src = S, dst = P (aux unused); backward: src = P, aux = dP, dst = dS.

override BACKWARD: bool = false;

struct Params {
    rows: u32,
    t: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> aux: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> part: array<f32, 256>;

fn reduce(t: u32, v: f32, is_max: bool) -> f32 {
    part[t] = v;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (t < half) {
            if (is_max) {
                part[t] = max(part[t], part[t + half]);
            } else {
                part[t] += part[t + half];
            }
        }
        workgroupBarrier();
    }
    let total = part[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x + wg.y * 65535u;
    let t = lid.x;
    let live = r < p.rows;
    let q = r % p.t;
    let base = r * p.t;
    if (BACKWARD) {
        var s = 0.0;
        if (live) {
            for (var j = t; j <= q; j += 256u) {
                s += src[base + j] * aux[base + j];
            }
        }
        let dot = reduce(t, s, false);
        if (live) {
            for (var j = t; j < p.t; j += 256u) {
                var v = 0.0;
                if (j <= q) {
                    v = p.scale * src[base + j] * (aux[base + j] - dot);
                }
                dst[base + j] = v;
            }
        }
    } else {
        var m = -3.4028235e38;
        if (live) {
            for (var j = t; j <= q; j += 256u) {
                m = max(m, p.scale * src[base + j]);
            }
        }
        let mx = reduce(t, m, true);
        var s = 0.0;
        if (live) {
            for (var j = t; j <= q; j += 256u) {
                s += exp(p.scale * src[base + j] - mx);
            }
        }
        let total = reduce(t, s, false);
        if (live) {
            for (var j = t; j < p.t; j += 256u) {
                var v = 0.0;
                if (j <= q) {
                    v = exp(p.scale * src[base + j] - mx) / total;
                }
                dst[base + j] = v;
            }
        }
    }
}
