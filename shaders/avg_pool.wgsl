// avg_pool.wgsl — 2-D average pooling over an NCHW tensor, forward and backward (override BACKWARD),
// with PyTorch's defaults: taps in the zero padding count (count_include_pad), so every window divides
// by KH·KW. Global average pooling is the window of the whole image.
//
// Forward: y[n, c, oh, ow] = Σ over the window of x / (KH·KW), summed in scan order (kh, then kw).
// Backward: dx[n, c, ih, iw] = Σ over the windows containing it of dy / (KH·KW), in a fixed order (oh,
// then ow): deterministic, no atomics.

override BACKWARD: bool = false;

// Params: the window's geometry, from window_common.wgsl (prepended).

// forward: src = x, dst = y; backward: src = dy, dst = dx
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

fn forward(e: u32) {
    let ow = e % p.ow;
    let oh = (e / p.ow) % p.oh;
    let plane = e / (p.ow * p.oh);
    var sum = 0.0;
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
            sum += src[(plane * p.h + u32(ih)) * p.w + u32(iw)];
        }
    }
    dst[e] = sum / f32(p.kh * p.kw);
}

fn backward(e: u32) {
    let iw = e % p.w;
    let ih = (e / p.w) % p.h;
    let plane = e / (p.w * p.h);
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
            sum += src[(plane * p.oh + oh) * p.ow + ow];
        }
    }
    dst[e] = sum / f32(p.kh * p.kw);
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
