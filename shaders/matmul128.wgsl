// matmul128.wgsl — the large-tile form of matmul.wgsl: C[M,N] = op(A) · op(B) with the same forms,
// parameters, bindings and epilogues, for products of at least 128 rows and 128 columns.
//
// A 128×128 tile of C per workgroup of 16×16 threads; each thread keeps an 8×8 block in registers:
// rows 4·ty..4·ty+3 and 64+4·ty..64+4·ty+3, columns 4·tx..4·tx+3 and 64+4·tx..64+4·tx+3, so that its
// workgroup-memory reads are vec4s and a warp's reads of B cover 256 contiguous bytes. K advances 8 at a
// time: 2 × 8 × 128 floats (8 KiB) of workgroup memory. Each thread stages 4 elements of each operand
// per step, in the order that is contiguous in memory. Loads outside the matrices read 0 and stores
// outside C are skipped; every index is in range by construction (tested with runtime checks on).

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// 0 none, 1 +bias, 2 +bias then ReLU, 3 +bias then tanh, 4 +bias then sigmoid,
// 5 ×relu'(aux), 6 ×tanh'(aux), 7 ×sigmoid'(aux) where aux holds the activation's output.
override EPILOGUE: u32 = 0u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    bias_off: u32,
    aux_off: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const TM: u32 = 128u;
const TN: u32 = 128u;
const TK: u32 = 8u;

var<workgroup> As: array<vec4<f32>, 256>; // [TK][TM / 4]
var<workgroup> Bs: array<vec4<f32>, 256>; // [TK][TN / 4]

fn load_a(row: u32, kk: u32) -> f32 {
    if (row >= p.m || kk >= p.k) {
        return 0.0;
    }
    if (TRANS_A) {
        return a[p.a_off + kk * p.m + row];
    }
    return a[p.a_off + row * p.k + kk];
}

fn load_b(kk: u32, col: u32) -> f32 {
    if (kk >= p.k || col >= p.n) {
        return 0.0;
    }
    if (TRANS_B) {
        return b[p.b_off + col * p.k + kk];
    }
    return b[p.b_off + kk * p.n + col];
}

fn epilogue(v: f32, row: u32, col: u32) -> f32 {
    switch EPILOGUE {
        case 1u: { return v + bias[p.bias_off + col]; }
        case 2u: { return max(v + bias[p.bias_off + col], 0.0); }
        case 3u: { return tanh(v + bias[p.bias_off + col]); }
        case 4u: { return 1.0 / (1.0 + exp(-(v + bias[p.bias_off + col]))); }
        case 5u: {
            let y = aux[p.aux_off + row * p.n + col];
            return select(0.0, v, y > 0.0);
        }
        case 6u: {
            let y = aux[p.aux_off + row * p.n + col];
            return v * (1.0 - y * y);
        }
        case 7u: {
            let y = aux[p.aux_off + row * p.n + col];
            return v * y * (1.0 - y);
        }
        default: { return v; }
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    // acc[2 * r + h]: block row r (0..7), column half h (0: 4·tx.., 1: 64 + 4·tx..)
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var r = 0u; r < 4u; r++) {
            let e = li + r * 256u;
            var am: u32;
            var ak: u32;
            if (TRANS_A) {
                ak = e / TM;
                am = e % TM;
            } else {
                am = e / TK;
                ak = e % TK;
            }
            As[ak * 32u + am / 4u][am % 4u] = load_a(row0 + am, k0 + ak);
            var bn: u32;
            var bk: u32;
            if (TRANS_B) {
                bn = e / TK;
                bk = e % TK;
            } else {
                bk = e / TN;
                bn = e % TN;
            }
            Bs[bk * 32u + bn / 4u][bn % 4u] = load_b(k0 + bk, col0 + bn);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a0 = As[kk * 32u + lid.y];
            let a1 = As[kk * 32u + 16u + lid.y];
            let b0 = Bs[kk * 32u + lid.x];
            let b1 = Bs[kk * 32u + 16u + lid.x];
            for (var r = 0u; r < 4u; r++) {
                acc[2u * r] = fma(vec4<f32>(a0[r]), b0, acc[2u * r]);
                acc[2u * r + 1u] = fma(vec4<f32>(a0[r]), b1, acc[2u * r + 1u]);
                acc[2u * (r + 4u)] = fma(vec4<f32>(a1[r]), b0, acc[2u * (r + 4u)]);
                acc[2u * (r + 4u) + 1u] = fma(vec4<f32>(a1[r]), b1, acc[2u * (r + 4u) + 1u]);
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 8u; r++) {
        let row = row0 + select(64u + 4u * lid.y + r - 4u, 4u * lid.y + r, r < 4u);
        if (row >= p.m) {
            continue;
        }
        for (var h = 0u; h < 2u; h++) {
            let v = acc[2u * r + h];
            let colh = col0 + 64u * h + 4u * lid.x;
            for (var q = 0u; q < 4u; q++) {
                let col = colh + q;
                if (col < p.n) {
                    c[p.c_off + row * p.n + col] = epilogue(v[q], row, col);
                }
            }
        }
    }
}
