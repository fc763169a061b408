// fused_linear.wgsl — one whole training step of a one-dense-layer model (logistic or softmax
// regression, linear least squares) in one dispatch: gather + normalise, forward, loss, gradient and
// its reduction, the batch's totals and its history entry.
//
// The model: z[r, o] = Σ_i x'[r, i]·W[o, i] + b[o], W [OUTPUTS, INPUTS] row-major at θ[w_off], b
// [OUTPUTS] at θ[b_off]; x'[r, i] = (x[index[offset + r], i] - shift[i])·scale[i], as gather.wgsl.
// dz is the gradient of the per-sample loss (softmax_xent / sigmoid_bce / mse .wgsl, not divided by
// rows), and the step's results are those of the unfused kernels:
//   grads[w_off + o·INPUTS + i] = Σ_r dz[r, o]·x'[r, i],   grads[b_off + o] = Σ_r dz[r, o]
//   (or += with `accumulate`), total[0] += loss sum (f32 bits), total[1] += correct, total[2] += rows,
//   history[slot] = loss sum — exactly as reduce_stats.wgsl keeps them.
//
// The shape is specialised (INPUTS, OUTPUTS overrides, P = (INPUTS + 1)·OUTPUTS ≤ 64) so that every
// loop over inputs, outputs or gradient entries has a constant trip count and the per-thread arrays
// below are only ever indexed by constants once unrolled: they live in registers.
//
// Parallel scheme, deterministic (a fixed summation order for a given rows and G):
// - The rows are split into G contiguous chunks of `chunk` rows, one per workgroup of 256 threads.
//   θ, shift and scale are read once per workgroup into workgroup memory. Thread l takes rows
//   l, l + 256, … of its chunk (sample numbers clamped below `samples`, features loaded four at a
//   time) and sums, in its own registers, the E = P + 2 entries of its rows: P gradient entries
//   (W row-major, then b), the loss, the correct count.
// - The workgroup reduces the partials of the first `live` threads (the chunk rounded up to a power
//   of two, 16 … 256) in rounds through 16 KiB of workgroup memory laid out [entry][live + 1]:
//   stage 1, thread (e, s) sums the 16 partials s, s + live/16, … of entry e; stage 2, thread e
//   sums entry e's live/16 stage-1 sums in order. Three barriers per round; E ≤ 66 entries take
//   1 round (chunks ≤ 32 rows), 2 (≤ 64), 3 (≤ 128) or 5 (more).
// - G = 1 (PARTIAL false): the threads holding a reduced entry write it out (grads, totals,
//   history). G > 1: PARTIAL writes each workgroup's E sums to work[wg·E …], then a one-workgroup
//   FINISH dispatch (same bindings and uniform block) has thread (k = l % E, q = l / E) sum
//   partials q, q + c, … of entry k (c = 256 / E copies), and thread k sums its c copies in order
//   and writes entry k out.
//
// Every index is in range by construction once the launcher's checks hold (it builds the kernel
// without runtime checks where ShaderChecks allows): see fused.rs.

override LOSS: u32 = 0u;         // 0 softmax cross-entropy, 1 sigmoid BCE, 2 squared error
override PIXELS_U8: bool = false; // features stored as u8 packed four to a word (else f32 words)
override PARTIAL: bool = false;   // write this workgroup's sums to `work` instead of the outputs
override FINISH: bool = false;    // sum the G workgroups' partials of `work` instead of rows
override INPUTS: u32 = 1u;        // ≤ 64
override OUTPUTS: u32 = 1u;       // ≤ 16, and 1 for LOSS 1 and 2

const WG: u32 = 256u;
const MAX_IN: u32 = 64u;
const MAX_OUT: u32 = 16u;
const MAX_ENTRIES: u32 = 66u; // 64 parameters + loss + correct

struct Params {
    rows: u32,       // rows of the batch
    chunk: u32,      // rows per workgroup: ceil(rows / groups)
    groups: u32,     // G, workgroups of the PARTIAL dispatch (1 without it)
    offset: u32,     // first index of this batch inside `index`
    w_off: u32,      // W inside θ and grads
    b_off: u32,      // b inside θ and grads
    slot: u32,       // this step's entry in `history`
    accumulate: u32, // 1: add the gradient into grads; 0: overwrite
    samples: u32,    // sample numbers are clamped below it: every read is in range by construction
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> data: array<u32>;          // f32 bits, or 4 packed u8
@group(0) @binding(1) var<storage, read> targets: array<f32>;       // one per sample
@group(0) @binding(2) var<storage, read> index: array<u32>;
@group(0) @binding(3) var<storage, read> norm: array<f32>;          // shift[INPUTS] then scale[INPUTS]
@group(0) @binding(4) var<storage, read> theta: array<f32>;
@group(0) @binding(5) var<storage, read_write> grads: array<f32>;
@group(0) @binding(6) var<storage, read_write> total: array<u32>;   // loss bits, correct, count, unused
@group(0) @binding(7) var<storage, read_write> history: array<f32>;
@group(0) @binding(8) var<storage, read_write> work: array<f32>;    // [G, E] partial sums
@group(0) @binding(9) var<uniform> p: Params;

// 16 KiB. While rows are processed: θ (W then b) at [0, 64), shift at [64, 128), scale at
// [128, 192); then [entry][live + 1] partials for each reduction round.
var<workgroup> red: array<f32, 4096>;

const SHIFT_AT: u32 = 64u;
const SCALE_AT: u32 = 128u;

// Entry k of the step's sums is `t`: out to the workspace (PARTIAL) or to grads / totals / history.
fn emit(k: u32, t: f32, wg: u32) {
    let nw = INPUTS * OUTPUTS;
    let np = nw + OUTPUTS;
    if (PARTIAL) {
        work[wg * (np + 2u) + k] = t;
    } else if (k < np) {
        var dst = p.w_off + k;
        if (k >= nw) {
            dst = p.b_off + (k - nw);
        }
        if (p.accumulate != 0u) {
            grads[dst] += t;
        } else {
            grads[dst] = t;
        }
    } else if (k == np) {
        total[0] = bitcast<u32>(bitcast<f32>(total[0]) + t);
        history[p.slot] = t;
    } else {
        total[1] += u32(t + 0.5);
        total[2] += p.rows;
    }
}

// Feature `a` (flat, of the whole data set) as f32; u8 features come two words at a time below.
fn feature(a: u32) -> f32 {
    return bitcast<f32>(data[a]);
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let nw = INPUTS * OUTPUTS; // weights
    let np = nw + OUTPUTS;     // parameters P
    let ne = np + 2u;          // entries E: gradient, loss, correct

    if (FINISH) {
        // thread (k = li % E, q = li / E), q < c: partials q, q + c, … of entry k; then entry k's
        // c sums in order of q
        let c = WG / ne;
        let k = li % ne;
        let q = li / ne;
        var t = 0.0;
        if (q < c) {
            var w = q;
            // four partials in flight at a time
            for (; w + 3u * c < p.groups; w += 4u * c) {
                let a = work[w * ne + k];
                let b = work[(w + c) * ne + k];
                let d = work[(w + 2u * c) * ne + k];
                let e = work[(w + 3u * c) * ne + k];
                t += (a + b) + (d + e);
            }
            for (; w < p.groups; w += c) {
                t += work[w * ne + k];
            }
        }
        red[li] = t;
        workgroupBarrier();
        if (li < ne) {
            var s = red[li];
            for (var j = 1u; j < c; j++) {
                s += red[j * ne + li];
            }
            emit(li, s, 0u);
        }
        return;
    }

    // θ and the normaliser, once per workgroup
    if (li < nw) {
        red[li] = theta[p.w_off + li];
    } else if (li < np) {
        red[li] = theta[p.b_off + (li - nw)];
    }
    if (li < INPUTS) {
        red[SHIFT_AT + li] = norm[li];
        red[SCALE_AT + li] = norm[INPUTS + li];
    }
    workgroupBarrier();

    // this thread's sums of the E entries
    var g: array<f32, MAX_ENTRIES>;
    var xr: array<f32, MAX_IN>;
    var zr: array<f32, MAX_OUT>;
    let last = p.samples * INPUTS - 1u; // the data set's last feature
    let start = wid.x * p.chunk;
    let end = min(start + p.chunk, p.rows);
    for (var r = start + li; r < end; r += WG) {
        let src = min(index[p.offset + r], p.samples - 1u);
        let at = src * INPUTS;
        // four features per step, their loads issued together
        for (var i = 0u; i < INPUTS; i += 4u) {
            var v: vec4<f32>;
            if (PIXELS_U8) {
                let a = at + i;
                let w0 = data[a / 4u];
                let w1 = data[min(a / 4u + 1u, last / 4u)];
                let sh = 8u * (a % 4u);
                let b = select((w0 >> sh) | (w1 << (32u - sh)), w0, sh == 0u);
                v = vec4<f32>(f32(b & 0xffu), f32((b >> 8u) & 0xffu), f32((b >> 16u) & 0xffu), f32(b >> 24u));
            } else {
                v = vec4<f32>(
                    feature(at + i),
                    feature(min(at + i + 1u, last)),
                    feature(min(at + i + 2u, last)),
                    feature(min(at + i + 3u, last)),
                );
            }
            xr[i] = (v.x - red[SHIFT_AT + i]) * red[SCALE_AT + i];
            if (i + 1u < INPUTS) {
                xr[i + 1u] = (v.y - red[SHIFT_AT + i + 1u]) * red[SCALE_AT + i + 1u];
            }
            if (i + 2u < INPUTS) {
                xr[i + 2u] = (v.z - red[SHIFT_AT + i + 2u]) * red[SCALE_AT + i + 2u];
            }
            if (i + 3u < INPUTS) {
                xr[i + 3u] = (v.w - red[SHIFT_AT + i + 3u]) * red[SCALE_AT + i + 3u];
            }
        }
        for (var o = 0u; o < OUTPUTS; o++) {
            var z = red[nw + o];
            for (var i = 0u; i < INPUTS; i++) {
                z += xr[i] * red[o * INPUTS + i];
            }
            zr[o] = z;
        }
        // loss and dz (into zr), as loss::loss_row
        let y = targets[src];
        var loss: f32;
        var correct = 0.0;
        if (LOSS == 0u) {
            let label = min(u32(max(y, 0.0)), OUTPUTS - 1u);
            var m = zr[0];
            var arg = 0u;
            var zl = zr[0];
            for (var o = 1u; o < OUTPUTS; o++) {
                if (zr[o] > m) {
                    m = zr[o];
                    arg = o;
                }
                if (o == label) {
                    zl = zr[o];
                }
            }
            var s = 0.0;
            for (var o = 0u; o < OUTPUTS; o++) {
                let e = exp(zr[o] - m);
                zr[o] = e;
                s += e;
            }
            let inv = 1.0 / s;
            for (var o = 0u; o < OUTPUTS; o++) {
                zr[o] = zr[o] * inv - select(0.0, 1.0, o == label);
            }
            loss = m + log(s) - zl;
            correct = select(0.0, 1.0, arg == label);
        } else if (LOSS == 1u) {
            let v = zr[0];
            let e = exp(-abs(v));
            // sigmoid from the same exp: stable for either sign of v
            zr[0] = select(e / (1.0 + e), 1.0 / (1.0 + e), v >= 0.0) - y;
            loss = max(v, 0.0) - v * y + log(1.0 + e);
            correct = select(0.0, 1.0, (v > 0.0) == (y > 0.5));
        } else {
            let d = zr[0] - y;
            zr[0] = d + d;
            loss = d * d;
        }
        for (var o = 0u; o < OUTPUTS; o++) {
            let d = zr[o];
            for (var i = 0u; i < INPUTS; i++) {
                g[o * INPUTS + i] += d * xr[i];
            }
            g[nw + o] += d;
        }
        g[np] += loss;
        g[np + 1u] += correct;
    }
    // everyone is done with θ and the normaliser before the rounds overwrite them
    workgroupBarrier();

    // The workgroup's sums, in rounds through `red`. Only the first `live` threads can hold rows
    // (the chunk rounded up to a power of two, 16 … 256), so a round takes their partials of
    // per_round = 4096 / (live + 1) entries, laid out [entry][live + 1] (the +1 spreads the banks):
    // E ≤ 66 entries take 1 round for chunks ≤ 32 rows, 2 for ≤ 64, 3 for ≤ 128, 5 above. (All in
    // this one function: a helper called per round kept g out of registers on the H200.)
    let live = min(WG, 1u << (32u - countLeadingZeros(clamp(p.chunk, 16u, WG) - 1u)));
    let stride = live + 1u;
    let per_round = 4096u / stride;
    let segs = live / 16u; // slots per entry after stage 1
    let rounds = (ne + per_round - 1u) / per_round;
    let e1 = li / segs;
    let s1 = li % segs;
    for (var rd = 0u; rd < rounds; rd++) {
        let base = rd * per_round;
        if (li < live) {
            // a constant trip count: g is indexed by constants once unrolled
            for (var k = 0u; k < ne; k++) {
                let j = k - base; // past per_round (wrapped) when k < base
                if (j < per_round) {
                    red[j * stride + li] = g[k];
                }
            }
        }
        workgroupBarrier();
        let here = min(per_round, ne - base);
        // stage 1: thread (e1, s1) sums partials s1, s1 + segs, …, s1 + 15·segs of entry e1 into
        // its first one (which no other thread reads)
        if (e1 < here) {
            let at = e1 * stride + s1;
            var v = red[at];
            for (var q = 1u; q < 16u; q++) {
                v += red[at + q * segs];
            }
            red[at] = v;
        }
        workgroupBarrier();
        // stage 2: thread e sums entry e's segs slots in order
        if (li < here) {
            var t = red[li * stride];
            for (var j = 1u; j < segs; j++) {
                t += red[li * stride + j];
            }
            emit(base + li, t, wid.x);
        }
        // the next round overwrites what stage 2 read
        workgroupBarrier();
    }
}
