// matmul_coop.wgsl — PLACEHOLDER being replaced by the cooperative-matrix core (f16 inputs, f32
// accumulation). Until then it is the 64-tile core; the Coop variant is never chosen on adapters
// without cooperative matrices.

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [TK][TM]
var<workgroup> Bs: array<f32, 1024>; // [TK][TN]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }

    let k_lo = begin_k(wg.z);
    for (var k0 = k_lo; k0 < k_end; k0 += TK) {
        // 256 threads stage 1024 elements of each tile, 4 each, in the order that is contiguous in memory.
        for (var r = 0u; r < 4u; r++) {
            let e = li + r * 256u;
            if (TRANS_A) {
                let kk = e / TM;
                let mm = e % TM;
                As[kk * TM + mm] = load_a(row0 + mm, k0 + kk);
            } else {
                let mm = e / TK;
                let kk = e % TK;
                As[kk * TM + mm] = load_a(row0 + mm, k0 + kk);
            }
            if (TRANS_B) {
                let nn = e / TK;
                let kk = e % TK;
                Bs[kk * TN + nn] = load_b(k0 + kk, col0 + nn);
            } else {
                let kk = e / TN;
                let nn = e % TN;
                Bs[kk * TN + nn] = load_b(k0 + kk, col0 + nn);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = As[kk * TM + lid.y + 16u * i];
                bv[i] = Bs[kk * TN + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(av[i], bv[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            store(row0 + lid.y + 16u * i, col0 + lid.x + 16u * j, acc[i * 4u + j]);
        }
    }
}
