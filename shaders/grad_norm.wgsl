// grad_norm.wgsl — the global gradient norm and PyTorch's clipping factor, in two dispatches.
//
// The gradient arrives as per-sample sums g; the optimizer sees g · grad_scale, whose norm is
// ‖g‖ · grad_scale. PARTIAL (the first dispatch, GROUPS workgroups): each workgroup sums the squares of
// a grid-strided share of g and writes one partial sum. The second dispatch (one workgroup) adds the
// GROUPS partials and writes out[0] = min(1, max_norm / (norm + 1e-6)), the factor by which every
// gradient is scaled (torch.nn.utils.clip_grad_norm_; 1 when max_norm is 0), out[1] = norm and
// out[2] = 0. Both reductions run in a fixed order, so every rank, holding the same summed gradient,
// computes the same bits.
//
// With loss scaling (mixed precision), the gradients arrive multiplied by the scale S = scaler[0]:
// the norm is taken of g · grad_scale / S and out[0] also carries 1/S. When the sum of squares is not
// finite, the step is skipped (out[2] = 1, which the update kernels obey), S is halved and
// scaler[2] counts the skip; after GROWTH finite steps in a row S doubles (torch.cuda.amp.GradScaler's
// defaults: backoff 0.5, growth 2, interval 2000).

override PARTIAL: bool = true;
const GROUPS: u32 = 256u;
const GROWTH: f32 = 2000.0;

struct Params {
    n: u32,
    grad_scale: f32,
    max_norm: f32,
    scaling: u32,  // 1: gradients carry the loss scale in scaler[0]
}

@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;  // [GROUPS]
@group(0) @binding(2) var<storage, read_write> out: array<f32>;       // factor, norm, skip
@group(0) @binding(3) var<storage, read_write> scaler: array<f32>;    // scale, good steps, skipped
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> sums: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    var s = 0.0;
    if (PARTIAL) {
        for (var i = wg.x * 256u + li; i < p.n; i += GROUPS * 256u) {
            let g = grad[i];
            s += g * g;
        }
    } else {
        s = partials[li];
    }
    sums[li] = s;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h >>= 1u) {
        if (li < h) {
            sums[li] += sums[li + h];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        if (PARTIAL) {
            partials[wg.x] = sums[0];
        } else {
            let scaled = p.scaling != 0u;
            let s = select(1.0, scaler[0], scaled);
            let norm = sqrt(sums[0]) * p.grad_scale / s;
            out[1] = norm;
            // a comparison with NaN or infinity is false
            if (scaled && !(sums[0] <= 3.0e38)) {
                out[0] = 0.0;
                out[2] = 1.0;
                scaler[0] = s * 0.5;
                scaler[1] = 0.0;
                scaler[2] = scaler[2] + 1.0;
            } else {
                let clip = select(1.0, min(1.0, p.max_norm / (norm + 1e-6)), p.max_norm > 0.0);
                out[0] = clip / s;
                out[2] = 0.0;
                if (scaled) {
                    let good = scaler[1] + 1.0;
                    scaler[0] = select(s, s * 2.0, good >= GROWTH);
                    scaler[1] = select(good, 0.0, good >= GROWTH);
                }
            }
        }
    }
}
