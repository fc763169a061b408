// im2col.wgsl — the columns of a 2-D convolution: one row per output pixel (n, oh, ow), one column per
// input tap (c, kh, kw), so that the convolution is one matrix product with the weight [OC, C·KH·KW]
// (PyTorch's [OC, C, KH, KW] flattened).
//
// cols[(n·OH + oh)·OW + ow, (c·KH + kh)·KW + kw] = x[n, c, oh·stride + kh − pad, ow·stride + kw − pad],
// 0 where the tap falls in the zero padding. x is NCHW. One invocation per column element.

// Params: the window's geometry, from window_common.wgsl (prepended).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> cols: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    let width = p.c * p.kh * p.kw;
    if (e >= p.n * p.oh * p.ow * width) {
        return;
    }
    let r = e / width;
    let q = e % width;
    let ow = r % p.ow;
    let oh = (r / p.ow) % p.oh;
    let n = r / (p.ow * p.oh);
    let kw = q % p.kw;
    let kh = (q / p.kw) % p.kh;
    let c = q / (p.kw * p.kh);
    let ih = i32(oh * p.stride + kh) - i32(p.pad);
    let iw = i32(ow * p.stride + kw) - i32(p.pad);
    var v = 0.0;
    if (ih >= 0 && ih < i32(p.h) && iw >= 0 && iw < i32(p.w)) {
        v = x[((n * p.c + c) * p.h + u32(ih)) * p.w + u32(iw)];
    }
    cols[e] = v;
}
