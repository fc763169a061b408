// matmul_half.wgsl — the 128×128-tile core with its inputs rounded to f16: `--precision f16` on
// adapters with SHADER_F16 but no cooperative matrices (lavapipe among them, so CI runs the whole f16
// path). Operands are staged in workgroup memory as f16 (half the bytes of matmul128.wgsl), products
// of the f16 values are formed and summed in f32 — the arithmetic of a tensor core's f16 × f16 → f32.
// `enable_f16.wgsl` and `matmul_common.wgsl` are prepended.

const TM: u32 = 128u;
const TN: u32 = 128u;
const TK: u32 = 8u;

var<workgroup> As: array<vec4<f16>, 256>; // [TK][TM / 4]
var<workgroup> Bs: array<vec4<f16>, 256>; // [TK][TN / 4]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    // acc[2 * r + h]: block row r (0..7), column half h (0: 4·tx.., 1: 64 + 4·tx..)
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    let k_lo = begin_k(wg.z);
    for (var k0 = k_lo; k0 < k_end; k0 += TK) {
        for (var r = 0u; r < 4u; r++) {
            let e = li + r * 256u;
            var am: u32;
            var ak: u32;
            if (TRANS_A) {
                ak = e / TM;
                am = e % TM;
            } else {
                am = e / TK;
                ak = e % TK;
            }
            As[ak * 32u + am / 4u][am % 4u] = f16(load_a(row0 + am, k0 + ak));
            var bn: u32;
            var bk: u32;
            if (TRANS_B) {
                bn = e / TK;
                bk = e % TK;
            } else {
                bk = e / TN;
                bn = e % TN;
            }
            Bs[bk * 32u + bn / 4u][bn % 4u] = f16(load_b(k0 + bk, col0 + bn));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            // f16 × f16 products are exact in f32: only the inputs are rounded
            let a0 = vec4<f32>(As[kk * 32u + lid.y]);
            let a1 = vec4<f32>(As[kk * 32u + 16u + lid.y]);
            let b0 = vec4<f32>(Bs[kk * 32u + lid.x]);
            let b1 = vec4<f32>(Bs[kk * 32u + 16u + lid.x]);
            for (var r = 0u; r < 4u; r++) {
                acc[2u * r] = fma(vec4<f32>(a0[r]), b0, acc[2u * r]);
                acc[2u * r + 1u] = fma(vec4<f32>(a0[r]), b1, acc[2u * r + 1u]);
                acc[2u * (r + 4u)] = fma(vec4<f32>(a1[r]), b0, acc[2u * (r + 4u)]);
                acc[2u * (r + 4u) + 1u] = fma(vec4<f32>(a1[r]), b1, acc[2u * (r + 4u) + 1u]);
            }
        }
        workgroupBarrier();
    }

    // every accumulator named by a constant index: a loop-indexed store moved all 64 floats to local
    // memory on NVIDIA and cost 12× (measured on an H200: docs/PERF.md)
    let top = row0 + 4u * lid.y;
    let bottom = row0 + 64u + 4u * lid.y;
    let left = col0 + 4u * lid.x;
    store_row(top, left, acc[0], acc[1]);
    store_row(top + 1u, left, acc[2], acc[3]);
    store_row(top + 2u, left, acc[4], acc[5]);
    store_row(top + 3u, left, acc[6], acc[7]);
    store_row(bottom, left, acc[8], acc[9]);
    store_row(bottom + 1u, left, acc[10], acc[11]);
    store_row(bottom + 2u, left, acc[12], acc[13]);
    store_row(bottom + 3u, left, acc[14], acc[15]);
}

// One row of a thread's block: columns left..left+3 from v0 and left+64..left+67 from v1.
fn store_row(row: u32, left: u32, v0: vec4<f32>, v1: vec4<f32>) {
    store(row, left, v0.x);
    store(row, left + 1u, v0.y);
    store(row, left + 2u, v0.z);
    store(row, left + 3u, v0.w);
    store(row, left + 64u, v1.x);
    store(row, left + 65u, v1.y);
    store(row, left + 66u, v1.z);
    store(row, left + 67u, v1.w);
}
