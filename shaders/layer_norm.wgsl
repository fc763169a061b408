// layer_norm.wgsl — layer normalisation over the last dimension of a [rows, c] tensor, as GPT-2 uses
// it, forward and backward (override MODE). Every reduction is deterministic: a row's sums are 256
// strided partials added in a fixed tree (one workgroup per row), and the parameters' gradients are
// column sums over the rows in order (one invocation per column). No atomics.
//
// MODE 0 (forward, per row):    mean = Σx/c, rstd = 1/√(Σ(x − mean)²/c + eps),
//                               y = (x − mean)·rstd·w + b; stats[2r] = mean, stats[2r + 1] = rstd.
// MODE 1 (backward dx, per row): g = dy·w, xhat = (x − mean)·rstd,
//                               dx = rstd·(g − Σg/c − xhat·Σ(g·xhat)/c).
// MODE 2 (backward w, b, per column): dw[j] = Σ_r dy·xhat, db[j] = Σ_r dy  (dwb = dw then db).

override MODE: u32 = 0u;

struct Params {
    rows: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> wb: array<f32>;          // w[0..c], b[c..2c]
@group(0) @binding(3) var<storage, read_write> stats: array<f32>; // mean, rstd per row
@group(0) @binding(4) var<storage, read_write> out: array<f32>;   // y, dx, or dw then db
@group(0) @binding(5) var<uniform> p: Params;

var<workgroup> part: array<f32, 256>;

// The sum of the workgroup's 256 partials (every thread returns it), in a fixed tree.
fn tree(t: u32, v: f32) -> f32 {
    part[t] = v;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (t < half) {
            part[t] += part[t + half];
        }
        workgroupBarrier();
    }
    let total = part[0];
    workgroupBarrier();
    return total;
}

// MODE 2: one invocation per column.
fn params_grad(j: u32) {
    if (j >= p.c) {
        return;
    }
    var dw = 0.0;
    var db = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let g = dy[r * p.c + j];
        dw += g * (x[r * p.c + j] - stats[2u * r]) * stats[2u * r + 1u];
        db += g;
    }
    out[j] = dw;
    out[p.c + j] = db;
}

// MODES 0 and 1: one workgroup per row.
fn row(r: u32, t: u32) {
    let live = r < p.rows;
    let base = r * p.c;
    let c = f32(p.c);
    var a = 0.0;
    if (live) {
        for (var j = t; j < p.c; j += 256u) {
            if (MODE == 0u) {
                a += x[base + j];
            } else {
                a += dy[base + j] * wb[j];
            }
        }
    }
    let sum_a = tree(t, a);
    var mean = 0.0;
    var rstd = 0.0;
    if (MODE == 0u) {
        mean = sum_a / c;
    } else if (live) {
        mean = stats[2u * r];
        rstd = stats[2u * r + 1u];
    }
    var s = 0.0;
    if (live) {
        for (var j = t; j < p.c; j += 256u) {
            let d = x[base + j] - mean;
            if (MODE == 0u) {
                s += d * d;
            } else {
                s += dy[base + j] * wb[j] * d * rstd;
            }
        }
    }
    let sum_b = tree(t, s);
    if (!live) {
        return;
    }
    if (MODE == 0u) {
        rstd = 1.0 / sqrt(sum_b / c + p.eps);
        for (var j = t; j < p.c; j += 256u) {
            out[base + j] = (x[base + j] - mean) * rstd * wb[j] + wb[p.c + j];
        }
        if (t == 0u) {
            stats[2u * r] = mean;
            stats[2u * r + 1u] = rstd;
        }
    } else {
        for (var j = t; j < p.c; j += 256u) {
            let xhat = (x[base + j] - mean) * rstd;
            out[base + j] = rstd * (dy[base + j] * wb[j] - sum_a / c - xhat * sum_b / c);
        }
    }
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    if (MODE == 2u) {
        params_grad(gid.x + gid.y * 65535u * 256u);
    } else {
        row(wg.x + wg.y * 65535u, lid.x);
    }
}
