// matmul.wgsl — C[M,N] = op(A) · op(B) with a fused epilogue, the one matrix product of forward and backward.
//
// Forms (pipeline-overridable constants, resolved when the pipeline is made):
//   TRANS_A = false: A is stored [M,K] row-major;  true: A is stored [K,M] (so op(A) = Aᵀ).
//   TRANS_B = false: B is stored [K,N] row-major;  true: B is stored [N,K] (so op(B) = Bᵀ).
// Forward  Y = X·Wᵀ + b      : NT (TRANS_B), epilogue bias [+ activation].
// Backward dW = dZᵀ·X        : TN (TRANS_A).
// Backward dX = (dZ·W) ⊙ f'(A): NN, epilogue "times the activation's derivative", f' taken from the
//                              stored activation output A (aux).
//
// Tiling: a 64×64 tile of C per workgroup of 16×16 threads, each thread 4×4 outputs strided by 16 so
// that neighbouring threads read neighbouring words of workgroup memory; K advances 16 at a time.
// Loads outside [0,M)×[0,K) or [0,K)×[0,N) read 0, stores outside [0,M)×[0,N) are skipped, so any
// size works; every buffer index is in range by construction (tested with runtime checks on).

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// 0 none, 1 +bias, 2 +bias then ReLU, 3 +bias then tanh, 4 +bias then sigmoid,
// 5 ×relu'(aux), 6 ×tanh'(aux), 7 ×sigmoid'(aux) where aux holds the activation's output.
override EPILOGUE: u32 = 0u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,    // element offsets into the bound buffers (parameters live in one flat buffer)
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

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [TK][TM]
var<workgroup> Bs: array<f32, 1024>; // [TK][TN]

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
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }

    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // 256 threads stage 1024 elements of each tile, 4 each, in the order that is contiguous in memory.
        for (var r = 0u; r < 4u; r++) {
            let e = li + r * 256u;
            if (TRANS_A) {
                let kk = e / TM;
                let mm = e % TM;
                As[kk * TM + mm] = load_a(row0 + mm, k0 + kk);
            } else {
                let mm = e / TK;
                let kk = e % TK;
                As[kk * TM + mm] = load_a(row0 + mm, k0 + kk);
            }
            if (TRANS_B) {
                let nn = e / TK;
                let kk = e % TK;
                Bs[kk * TN + nn] = load_b(k0 + kk, col0 + nn);
            } else {
                let kk = e / TN;
                let nn = e % TN;
                Bs[kk * TN + nn] = load_b(k0 + kk, col0 + nn);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = As[kk * TM + lid.y + 16u * i];
                bv[i] = Bs[kk * TN + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(av[i], bv[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if (row < p.m && col < p.n) {
                c[p.c_off + row * p.n + col] = epilogue(acc[i * 4u + j], row, col);
            }
        }
    }
}
