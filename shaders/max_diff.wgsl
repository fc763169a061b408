// max_diff.wgsl — how far a result is from a reference, computed where both live: max |x - y| and
// max |y| over n elements, in two dispatches (PARTIAL: GROUPS workgroups each reduce a grid-strided
// share; then one workgroup reduces their partials into out[0] = max |x - y|, out[1] = max |y|).
// The autotuner uses it to verify a kernel variant on the device against the reference kernel
// without reading the whole output back. A NaN or an infinity in x counts as an infinite difference.

override PARTIAL: bool = true;
const GROUPS: u32 = 256u;

struct Params {
    n: u32,
    x_off: u32,
    y_off: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;  // [GROUPS][2]
@group(0) @binding(3) var<storage, read_write> out: array<f32>;       // max |x - y|, max |y|
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> dmax: array<f32, 256>;
var<workgroup> ymax: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    var d = 0.0;
    var m = 0.0;
    if (PARTIAL) {
        for (var i = wg.x * 256u + li; i < p.n; i += GROUPS * 256u) {
            let a = x[p.x_off + i];
            let b = y[p.y_off + i];
            var e = abs(a - b);
            // a comparison with NaN is false: a NaN or an infinity becomes the largest difference
            if (!(e <= 3.0e38)) {
                e = 3.4e38;
            }
            d = max(d, e);
            m = max(m, abs(b));
        }
    } else {
        d = partials[2u * li];
        m = partials[2u * li + 1u];
    }
    dmax[li] = d;
    ymax[li] = m;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h >>= 1u) {
        if (li < h) {
            dmax[li] = max(dmax[li], dmax[li + h]);
            ymax[li] = max(ymax[li], ymax[li + h]);
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        if (PARTIAL) {
            partials[2u * wg.x] = dmax[0];
            partials[2u * wg.x + 1u] = ymax[0];
        } else {
            out[0] = dmax[0];
            out[1] = ymax[0];
        }
    }
}
