// pack_f16.wgsl — an f32 operand of a matrix product, repacked for the tensor-core kernel: element
// (r, c) of a rows × cols matrix, stored row-major (src[src_off + r·cols + c]) or column-major
// (src[src_off + c·rows + r]), goes to dst[r][c] as f16 in a row-major dst_rows × dst_cols matrix,
// zero outside rows × cols. dst_cols is a multiple of 4: each thread writes one vec4<f16>.
// `enable_f16.wgsl` is prepended.

struct Params {
    rows: u32,
    cols: u32,
    src_off: u32,
    col_major: u32,
    dst_rows: u32,
    dst_cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f16>>;
@group(0) @binding(2) var<uniform> p: Params;

fn at(r: u32, c: u32) -> f16 {
    if (r >= p.rows || c >= p.cols) {
        return f16(0.0);
    }
    if (p.col_major != 0u) {
        return f16(src[p.src_off + c * p.rows + r]);
    }
    return f16(src[p.src_off + r * p.cols + c]);
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    let quads = p.dst_cols / 4u;
    if (e >= p.dst_rows * quads) {
        return;
    }
    let r = e / quads;
    let c = 4u * (e % quads);
    dst[e] = vec4<f16>(at(r, c), at(r, c + 1u), at(r, c + 2u), at(r, c + 3u));
}
