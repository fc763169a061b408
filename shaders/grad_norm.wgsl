// grad_norm.wgsl — the global gradient norm and PyTorch's clipping factor, in two dispatches.
//
// The gradient arrives as per-sample sums g; the optimizer sees g · grad_scale, whose norm is
// ‖g‖ · grad_scale. PARTIAL (the first dispatch, GROUPS workgroups): each workgroup sums the squares of
// a grid-strided share of g and writes one partial sum. The second dispatch (one workgroup) adds the
// GROUPS partials and writes out[0] = min(1, max_norm / (norm + 1e-6)), the factor by which every
// gradient is scaled (torch.nn.utils.clip_grad_norm_), and out[1] = norm. Both reductions run in a
// fixed order, so every rank, holding the same summed gradient, computes the same bits.

override PARTIAL: bool = true;
const GROUPS: u32 = 256u;

struct Params {
    n: u32,
    grad_scale: f32,
    max_norm: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;  // [GROUPS]
@group(0) @binding(2) var<storage, read_write> out: array<f32>;       // factor, norm
@group(0) @binding(3) var<uniform> p: Params;

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
            let norm = sqrt(sums[0]) * p.grad_scale;
            out[0] = min(1.0, p.max_norm / (norm + 1e-6));
            out[1] = norm;
        }
    }
}
