// matmul_splitk.wgsl — the second half of a split-K product: C = epilogue(Σ_z W[z]) where the
// workspace W (bound as `a`, from a_off) holds `splits` partial products of M×N, written by a matmul
// core dispatched with z = splits. The sum runs over z in order, so results are deterministic.
// `matmul_common.wgsl` is prepended (params, bindings, epilogue, store).

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 256u;
    let mn = p.m * p.n;
    if (e >= mn) {
        return;
    }
    k_end = p.k;
    c_split = 0u;
    var v = 0.0;
    for (var z = 0u; z < p.splits; z++) {
        v += a[p.a_off + z * mn + e];
    }
    store(e / p.n, e % p.n, v);
}
