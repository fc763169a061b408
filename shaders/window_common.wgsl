// window_common.wgsl — the uniform block of the window kernels (im2col, col2im, max_pool, avg_pool),
// prepended to each: an NCHW input of n × c × h × w, a kh × kw window moved by `stride` over the input
// padded by `pad` zeros on each side, and the output's oh × ow (kernels/src/im2col.rs `Params`).

struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    _pad0: u32,
    _pad1: u32,
}
