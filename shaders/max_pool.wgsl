// max_pool.wgsl — 2-D max pooling over an NCHW tensor, forward and backward (override BACKWARD).
//
// Forward: y[n, c, oh, ow] = the largest x over the window (taps in the zero padding are skipped, as
// PyTorch pads max pooling with −∞), and arg[n, c, oh, ow] = the in-plane index ih·W + iw of the first
// largest tap in scan order (kh, then kw), or of the last NaN, as PyTorch's CPU kernel picks it.
// Backward: dx[n, c, ih, iw] = Σ of dy over the windows whose arg is this element, gathered in a fixed
// order (oh, then ow, ascending): deterministic, no atomics. One invocation per output (forward) or
// input (backward) element.

override BACKWARD: bool = false;

// Params: the window's geometry, from window_common.wgsl (prepended).

// forward: src = x, dst = y; backward: src = dy, dst = dx
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read_write> arg: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

fn forward(e: u32) {
    let ow = e % p.ow;
    let oh = (e / p.ow) % p.oh;
    let plane = e / (p.ow * p.oh);
    var best = 0.0;
    var at = 0xffffffffu;
    for (var kh = 0u; kh < p.kh; kh++) {
        let ih = i32(oh * p.stride + kh) - i32(p.pad);
        if (ih < 0 || ih >= i32(p.h)) {
            continue;
        }
        for (var kw = 0u; kw < p.kw; kw++) {
            let iw = i32(ow * p.stride + kw) - i32(p.pad);
            if (iw < 0 || iw >= i32(p.w)) {
                continue;
            }
            let i = u32(ih) * p.w + u32(iw);
            let v = src[plane * p.h * p.w + i];
            if (at == 0xffffffffu || v > best || v != v) {
                best = v;
                at = i;
            }
        }
    }
    dst[e] = best;
    arg[e] = at;
}

fn backward(e: u32) {
    let iw = e % p.w;
    let ih = (e / p.w) % p.h;
    let plane = e / (p.w * p.h);
    let me = ih * p.w + iw;
    var sum = 0.0;
    // the windows that contain (ih, iw): oh·stride − pad ≤ ih < oh·stride − pad + KH
    let th = i32(ih + p.pad);
    let tw = i32(iw + p.pad);
    let oh0 = u32(max(0, (th - i32(p.kh) + i32(p.stride)) / i32(p.stride)));
    let ow0 = u32(max(0, (tw - i32(p.kw) + i32(p.stride)) / i32(p.stride)));
    let oh1 = min(p.oh, u32(th) / p.stride + 1u);
    let ow1 = min(p.ow, u32(tw) / p.stride + 1u);
    for (var oh = oh0; oh < oh1; oh++) {
        for (var ow = ow0; ow < ow1; ow++) {
            let o = (plane * p.oh + oh) * p.ow + ow;
            if (arg[o] == me) {
                sum += src[o];
            }
        }
    }
    dst[e] = sum;
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    if (BACKWARD) {
        if (e < p.n * p.c * p.h * p.w) {
            backward(e);
        }
    } else if (e < p.n * p.c * p.oh * p.ow) {
        forward(e);
    }
}
