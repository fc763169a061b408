// embedding.wgsl — token plus learned position embedding, forward and backward (override MODE), as the
// first layer of GPT-2. Rows are (batch, position) with t positions per sequence; tokens[r] is row r's
// token id.
//
// MODE 0 (forward):   out[r, c] = wte[tokens[r], c] + wpe[r mod t, c]     (one invocation per element)
// MODE 1 (dwte):      dwte[v, c] = Σ dout[r, c] over the rows r whose token is v, in increasing r
//                     (one invocation per element of dwte). The rows are grouped by token on the host
//                     first, as llm.c does: order[starts[v]..starts[v + 1]] are v's rows, ascending, so
//                     the sum is deterministic and needs no atomics (WGSL has none for floats).
// MODE 2 (dwpe):      dwpe[p, c] = Σ over sequences b, in order, of dout[b·t + p, c]

override MODE: u32 = 0u;

struct Params {
    rows: u32,
    t: u32,
    c: u32,
    vocab: u32,
}

@group(0) @binding(0) var<storage, read> tokens: array<u32>;   // MODE 0; MODE 1: order
@group(0) @binding(1) var<storage, read> starts: array<u32>;   // MODE 1 (vocab + 1 offsets)
@group(0) @binding(2) var<storage, read> src: array<f32>;      // MODE 0: wte; 1, 2: dout
@group(0) @binding(3) var<storage, read> wpe: array<f32>;      // MODE 0
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    let c = e % p.c;
    let row = e / p.c;
    if (MODE == 0u) {
        if (e >= p.rows * p.c) {
            return;
        }
        dst[e] = src[tokens[row] * p.c + c] + wpe[(row % p.t) * p.c + c];
    } else if (MODE == 1u) {
        if (e >= p.vocab * p.c) {
            return;
        }
        var sum = 0.0;
        for (var i = starts[row]; i < starts[row + 1u]; i++) {
            sum += src[tokens[i] * p.c + c];
        }
        dst[e] = sum;
    } else {
        if (e >= p.t * p.c) {
            return;
        }
        var sum = 0.0;
        for (var b = 0u; b < p.rows / p.t; b++) {
            sum += src[(b * p.t + row) * p.c + c];
        }
        dst[e] = sum;
    }
}
