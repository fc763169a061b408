// col2im.wgsl — the adjoint of im2col: the gradient of a convolution's input from the gradient of its
// columns. Each input element gathers, in a fixed order (kh, then kw, ascending), the column entries
// that read it, so the sum is deterministic and needs no atomics (WGSL has no floating-point atomics).
//
// dx[n, c, ih, iw] = Σ over (kh, kw) with ih + pad − kh = oh·stride and iw + pad − kw = ow·stride
//                    (0 ≤ oh < OH, 0 ≤ ow < OW) of dcols[(n·OH + oh)·OW + ow, (c·KH + kh)·KW + kw].
// One invocation per input element.

// Params: the window's geometry, from window_common.wgsl (prepended).

@group(0) @binding(0) var<storage, read> dcols: array<f32>;
@group(0) @binding(1) var<storage, read_write> dx: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    if (e >= p.n * p.c * p.h * p.w) {
        return;
    }
    let iw = e % p.w;
    let ih = (e / p.w) % p.h;
    let c = (e / (p.w * p.h)) % p.c;
    let n = e / (p.w * p.h * p.c);
    let width = p.c * p.kh * p.kw;
    var sum = 0.0;
    for (var kh = 0u; kh < p.kh; kh++) {
        let th = i32(ih + p.pad) - i32(kh);
        if (th < 0 || u32(th) % p.stride != 0u) {
            continue;
        }
        let oh = u32(th) / p.stride;
        if (oh >= p.oh) {
            continue;
        }
        for (var kw = 0u; kw < p.kw; kw++) {
            let tw = i32(iw + p.pad) - i32(kw);
            if (tw < 0 || u32(tw) % p.stride != 0u) {
                continue;
            }
            let ow = u32(tw) / p.stride;
            if (ow >= p.ow) {
                continue;
            }
            sum += dcols[((n * p.oh + oh) * p.ow + ow) * width + (c * p.kh + kh) * p.kw + kw];
        }
    }
    dx[e] = sum;
}
