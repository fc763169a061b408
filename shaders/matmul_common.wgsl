// matmul_common.wgsl — what every matrix-product kernel shares: its forms, parameters, bindings,
// bounded loads and fused epilogues. It is valid WGSL on its own (validated by the naga test), and
// the launcher prepends it to each kernel's register-blocked core (matmul.wgsl, matmul128.wgsl).
//
// C[M,N] = op(A) · op(B), then the epilogue, for the products of forward and backward:
//   TRANS_A = false: A is stored [M,K] row-major;  true: A is stored [K,M] (so op(A) = Aᵀ).
//   TRANS_B = false: B is stored [K,N] row-major;  true: B is stored [N,K] (so op(B) = Bᵀ).
// Forward  Y = X·Wᵀ + b      : NT (TRANS_B), epilogue bias [+ activation].
// Backward dW = dZᵀ·X        : TN (TRANS_A), epilogue none, or "accumulate" for micro-batches.
// Backward dX = (dZ·W) ⊙ f'(A): NN, epilogue "times the activation's derivative", f' taken from the
//                              stored activation output A (aux).
// Loads outside [0,M)×[0,K) or [0,K)×[0,N) read 0 and stores outside [0,M)×[0,N) are skipped, so any
// size works; every buffer index is in range by construction (tested with runtime checks on).
//
// Split-K: workgroup z multiplies only K range [z·k_chunk, (z+1)·k_chunk) and writes its partial
// product, without epilogue, to C + z·M·N (a workspace); `matmul_splitk.wgsl` then sums the `splits`
// partials in a fixed order and applies the epilogue. Without a split, k_chunk = K and z = 0.

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// 0 none, 1 +bias, 2 +bias then ReLU, 3 +bias then tanh, 4 +bias then sigmoid,
// 5 ×relu'(aux), 6 ×tanh'(aux), 7 ×sigmoid'(aux) where aux holds the activation's output,
// 8 accumulate: C += the product (gradient accumulation over micro-batches).
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
    k_chunk: u32,  // K per workgroup along z (split-K); K when the product is not split
    splits: u32,   // partial products that matmul_splitk.wgsl sums
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

// This workgroup's K range ends at k_end; its output starts c_split elements into C.
var<private> k_end: u32;
var<private> c_split: u32;

// Set this workgroup's K range from its z index; returns where the range starts.
fn begin_k(z: u32) -> u32 {
    let lo = z * p.k_chunk;
    k_end = min(p.k, lo + p.k_chunk);
    c_split = z * p.m * p.n;
    return lo;
}

fn load_a(row: u32, kk: u32) -> f32 {
    if (row >= p.m || kk >= k_end) {
        return 0.0;
    }
    if (TRANS_A) {
        return a[p.a_off + kk * p.m + row];
    }
    return a[p.a_off + row * p.k + kk];
}

fn load_b(kk: u32, col: u32) -> f32 {
    if (kk >= k_end || col >= p.n) {
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
        case 8u: { return c[p.c_off + row * p.n + col] + v; }
        default: { return v; }
    }
}

// One output element: the epilogue and the store, skipped outside C. Register-blocked cores call it
// with their accumulators indexed by constants only, so that the accumulators stay in registers.
fn store(row: u32, col: u32, v: f32) {
    if (row < p.m && col < p.n) {
        c[p.c_off + c_split + row * p.n + col] = epilogue(v, row, col);
    }
}
