// matmul_skinny.wgsl — the matrix-product core for outputs with few rows or few columns (a layer of
// 10 classes, logistic regression's one output, the weight gradient of such a layer): a 64×16 tile
// (TALL) or a 16×64 tile per workgroup of 256 threads, each thread 4 outputs along the long side, so
// that a 1024×10 output fills 16 workgroups with useful work instead of 16 mostly idle 64×64 tiles.
// K advances 16 at a time. `matmul_common.wgsl` is prepended (forms, params, loads, epilogues,
// split-K); combined with split-K it spreads long-K products over the whole GPU.

override TALL: bool = true;

const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [TK][64] (TALL) or [TK][16]
var<workgroup> Bs: array<f32, 1024>; // [TK][16] (TALL) or [TK][64]

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tm = select(16u, 64u, TALL);
    let tn = select(64u, 16u, TALL);
    let row0 = wg.y * tm;
    let col0 = wg.x * tn;
    // thread li owns 4 outputs, 16 apart along the long side: TALL, rows r, r+16, r+32, r+48 of
    // column cc; else columns cc, cc+16, cc+32, cc+48 of row r (every index a constant offset)
    let r = li / 16u;
    let cc = li % 16u;
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    let k_lo = begin_k(wg.z);
    for (var k0 = k_lo; k0 < k_end; k0 += TK) {
        // 256 threads stage TK × 64 elements of the long operand (4 each) and TK × 16 of the short
        // one (1 each), each in the order that is contiguous in memory
        for (var q = 0u; q < 4u; q++) {
            let e = li + q * 256u;
            if (TALL) {
                // A is the long operand: 64 rows
                var i = e / 16u;
                var kk = e % 16u;
                if (TRANS_A) {
                    kk = e / 64u;
                    i = e % 64u;
                }
                As[kk * 64u + i] = load_a(row0 + i, k0 + kk);
            } else {
                // B is the long operand: 64 columns
                var kk = e / 64u;
                var i = e % 64u;
                if (TRANS_B) {
                    i = e / 16u;
                    kk = e % 16u;
                }
                Bs[kk * 64u + i] = load_b(k0 + kk, col0 + i);
            }
        }
        var kk = li / 16u;
        var j = li % 16u;
        if (TALL) {
            if (TRANS_B) {
                j = li / 16u;
                kk = li % 16u;
            }
            Bs[kk * 16u + j] = load_b(k0 + kk, col0 + j);
        } else {
            if (!TRANS_A) {
                j = li / 16u;
                kk = li % 16u;
            }
            As[kk * 16u + j] = load_a(row0 + j, k0 + kk);
        }
        workgroupBarrier();
        for (var k = 0u; k < TK; k++) {
            if (TALL) {
                let bv = Bs[k * 16u + cc];
                acc0 = fma(As[k * 64u + r], bv, acc0);
                acc1 = fma(As[k * 64u + r + 16u], bv, acc1);
                acc2 = fma(As[k * 64u + r + 32u], bv, acc2);
                acc3 = fma(As[k * 64u + r + 48u], bv, acc3);
            } else {
                let av = As[k * 16u + r];
                acc0 = fma(av, Bs[k * 64u + cc], acc0);
                acc1 = fma(av, Bs[k * 64u + cc + 16u], acc1);
                acc2 = fma(av, Bs[k * 64u + cc + 32u], acc2);
                acc3 = fma(av, Bs[k * 64u + cc + 48u], acc3);
            }
        }
        workgroupBarrier();
    }
    if (TALL) {
        store(row0 + r, col0 + cc, acc0);
        store(row0 + r + 16u, col0 + cc, acc1);
        store(row0 + r + 32u, col0 + cc, acc2);
        store(row0 + r + 48u, col0 + cc, acc3);
    } else {
        store(row0 + r, col0 + cc, acc0);
        store(row0 + r, col0 + cc + 16u, acc1);
        store(row0 + r, col0 + cc + 32u, acc2);
        store(row0 + r, col0 + cc + 48u, acc3);
    }
}
