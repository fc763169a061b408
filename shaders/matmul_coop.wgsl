// matmul_coop.wgsl — the tensor-core core of the matrix product: 16×16×16 cooperative matrices, f16
// inputs, f32 accumulation. `enable_f16.wgsl`, `enable_coop.wgsl` and `matmul_common.wgsl` (params,
// bindings, epilogues, split-K) are prepended when the module is built.
//
// Its operands arrive packed by `pack_f16.wgsl`: op(A) as f16 [Mp][Kp] and op(B) as f16 [Kp][Np],
// row-major whatever the form, zero-padded to Mp, Np multiples of 128 and Kp a multiple of 32. So the
// staging loop needs no bounds and no form: each thread copies 8 + 8 vec4<f16> per K step (the
// first version converted bounded f32 loads element by element and ran at 17–23 TFLOP/s on an H200).
//
// Structure (the one that ran at 236–263 TFLOP/s measured on an H200, against 105–109 for one subgroup
// per 64×64 tile loading straight from storage):
// - a 128×128 tile of C per workgroup of 128 invocations = 2×2 subgroups of 32 (subgroup index
//   li / 32, NVIDIA's subgroup size; on other subgroup sizes the on-device verification rejects the
//   variant); subgroup (sg_row, sg_col) owns the 64×64 quarter at rows 64·sg_row.., columns
//   64·sg_col.., held as 4×4 accumulator fragments of 16×16 f32 (16 fragments per subgroup is the
//   most that stayed in registers);
// - K advances 32 at a time, staged in workgroup memory as As [128 m][32 k + 8 pad], Bs [32 k][128 n
//   + 8 pad]; without the 8-element (16-byte) padding of each row the same kernel ran at half speed;
// - one barrier after staging, 2 × 16 MMAs per subgroup, one barrier before the next staging.
// Fragment loads and stores need constant strides (a runtime stride makes naga panic writing SPIR-V),
// and cooperative stores cannot skip elements outside C, so the epilogue goes through a 16×16 f32
// scratch per subgroup from which every lane calls `store()` (bounds, epilogue) for 8 elements.
//
// Alignment: every fragment pointer and stride is a multiple of 16 bytes from its array's start
// (rows of 40 f16 = 80 B and 136 f16 = 272 B, fragment columns at multiples of 16 elements), which
// Vulkan asks of cooperative-matrix loads and stores.

@group(0) @binding(6) var<storage, read> ap: array<vec4<f16>>;  // op(A), f16 [Mp][Kp]
@group(0) @binding(7) var<storage, read> bp: array<vec4<f16>>;  // op(B), f16 [Kp][Np]

const TM: u32 = 128u;
const TN: u32 = 128u;
const TK: u32 = 32u;
const LDA: u32 = 40u;  // As row stride in f16: TK + 8
const LDB: u32 = 136u; // Bs row stride in f16: TN + 8
const LDS: u32 = 16u;  // scratch row stride in f32

// Workgroup memory: 10240 + 8704 + 4096 = 23040 bytes (22.5 KiB; lavapipe allows 32 KiB, the H200 48).
var<workgroup> As: array<f16, 5120>;   // [TM][LDA]: (m, k) at m·LDA + k; columns 32..39 unused
var<workgroup> Bs: array<f16, 4352>;   // [TK][LDB]: (k, n) at k·LDB + n; columns 128..135 unused
var<workgroup> scratch: array<f32, 1024>; // 4 subgroups × [16][LDS]: subgroup sg at sg·256

@compute @workgroup_size(128, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    let sg = li / 32u;
    let lane = li % 32u;
    let sg_row = sg / 2u;
    let sg_col = sg % 2u;
    // first element of this subgroup's fragment row i is As[a_base + 16·i·LDA + kk]; of fragment
    // column j, Bs[kk·LDB + b_base + 16·j]
    let a_base = sg_row * 64u * LDA;
    let b_base = sg_col * 64u;

    // accRC: the fragment at rows 64·sg_row + 16·R.., columns 64·sg_col + 16·C.. — sixteen named
    // variables, never an array indexed at run time (that put the accumulators of matmul128 in
    // local memory on NVIDIA and cost 12×)
    var acc00 = coop_mat16x16<f32, C>();
    var acc01 = coop_mat16x16<f32, C>();
    var acc02 = coop_mat16x16<f32, C>();
    var acc03 = coop_mat16x16<f32, C>();
    var acc10 = coop_mat16x16<f32, C>();
    var acc11 = coop_mat16x16<f32, C>();
    var acc12 = coop_mat16x16<f32, C>();
    var acc13 = coop_mat16x16<f32, C>();
    var acc20 = coop_mat16x16<f32, C>();
    var acc21 = coop_mat16x16<f32, C>();
    var acc22 = coop_mat16x16<f32, C>();
    var acc23 = coop_mat16x16<f32, C>();
    var acc30 = coop_mat16x16<f32, C>();
    var acc31 = coop_mat16x16<f32, C>();
    var acc32 = coop_mat16x16<f32, C>();
    var acc33 = coop_mat16x16<f32, C>();

    // the packed operands' row lengths (the launcher packs to these); split-K chunks are multiples
    // of 32, so every K step lies inside the packed K
    let kp = (p.k + TK - 1u) / TK * TK;
    let np = (p.n + TN - 1u) / TN * TN;
    let k_lo = begin_k(wg.z);
    for (var k0 = k_lo; k0 < k_end; k0 += TK) {
        // Staging: 128 × 32 f16 of each packed operand, 8 vec4 of each per thread, element
        // e = li + 128·q: A row e / 8 (of the tile), halves 4·(e % 8)..+3 of the K step — a subgroup
        // reads 4 rows' 64 contiguous bytes each; B row e / 32 (of the K step), halves 4·(e % 32)..+3
        // of the tile's columns — a subgroup reads 256 contiguous bytes. The packed matrices hold
        // every row and column the grid visits, so no index leaves them. Workgroup indices:
        // 127·40 + 31 = 5111 < 5120, 31·136 + 127 = 4343 < 4352.
        for (var q = 0u; q < 8u; q++) {
            let e = li + q * 128u;
            let am = e / 8u;
            let ac = e % 8u;
            let va = ap[((row0 + am) * kp + k0) / 4u + ac];
            let ai = am * LDA + 4u * ac;
            As[ai] = va.x;
            As[ai + 1u] = va.y;
            As[ai + 2u] = va.z;
            As[ai + 3u] = va.w;
            let bk = e / 32u;
            let bc = e % 32u;
            let vb = bp[((k0 + bk) * np + col0) / 4u + bc];
            let bi = bk * LDB + 4u * bc;
            Bs[bi] = vb.x;
            Bs[bi + 1u] = vb.y;
            Bs[bi + 2u] = vb.z;
            Bs[bi + 3u] = vb.w;
        }
        workgroupBarrier();
        // Two 16-deep halves of the K step. Fragment A_i covers As rows 64·sg_row + 16·i + (0..15),
        // columns kk + (0..15), row-major with stride LDA; fragment B_j covers Bs rows kk + (0..15),
        // columns 64·sg_col + 16·j + (0..15), row-major with stride LDB. Largest index read:
        // 127·40 + 31 = 5111 in As, 31·136 + 127 = 4343 in Bs; the padding is never read.
        for (var kk = 0u; kk < TK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&As[a_base + kk], LDA);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&As[a_base + 16u * LDA + kk], LDA);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&As[a_base + 32u * LDA + kk], LDA);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&As[a_base + 48u * LDA + kk], LDA);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&Bs[kk * LDB + b_base], LDB);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&Bs[kk * LDB + b_base + 16u], LDB);
            let b2 = coopLoadT<coop_mat16x16<f16, B>>(&Bs[kk * LDB + b_base + 32u], LDB);
            let b3 = coopLoadT<coop_mat16x16<f16, B>>(&Bs[kk * LDB + b_base + 48u], LDB);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc02 = coopMultiplyAdd(a0, b2, acc02);
            acc03 = coopMultiplyAdd(a0, b3, acc03);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
            acc12 = coopMultiplyAdd(a1, b2, acc12);
            acc13 = coopMultiplyAdd(a1, b3, acc13);
            acc20 = coopMultiplyAdd(a2, b0, acc20);
            acc21 = coopMultiplyAdd(a2, b1, acc21);
            acc22 = coopMultiplyAdd(a2, b2, acc22);
            acc23 = coopMultiplyAdd(a2, b3, acc23);
            acc30 = coopMultiplyAdd(a3, b0, acc30);
            acc31 = coopMultiplyAdd(a3, b1, acc31);
            acc32 = coopMultiplyAdd(a3, b2, acc32);
            acc33 = coopMultiplyAdd(a3, b3, acc33);
        }
        workgroupBarrier();
    }

    // Epilogue, one fragment at a time, in a straight line (the barriers inside need uniform control
    // flow). Fragment (i, j) starts at C row row0 + 64·sg_row + 16·i, column col0 + 64·sg_col + 16·j.
    let top = row0 + sg_row * 64u;
    let left = col0 + sg_col * 64u;
    let s_base = sg * 256u;
    drain(acc00, s_base, lane, top, left);
    drain(acc01, s_base, lane, top, left + 16u);
    drain(acc02, s_base, lane, top, left + 32u);
    drain(acc03, s_base, lane, top, left + 48u);
    drain(acc10, s_base, lane, top + 16u, left);
    drain(acc11, s_base, lane, top + 16u, left + 16u);
    drain(acc12, s_base, lane, top + 16u, left + 32u);
    drain(acc13, s_base, lane, top + 16u, left + 48u);
    drain(acc20, s_base, lane, top + 32u, left);
    drain(acc21, s_base, lane, top + 32u, left + 16u);
    drain(acc22, s_base, lane, top + 32u, left + 32u);
    drain(acc23, s_base, lane, top + 32u, left + 48u);
    drain(acc30, s_base, lane, top + 48u, left);
    drain(acc31, s_base, lane, top + 48u, left + 16u);
    drain(acc32, s_base, lane, top + 48u, left + 32u);
    drain(acc33, s_base, lane, top + 48u, left + 48u);
}

// One accumulator fragment to C: the subgroup stores it row-major into its scratch (element (r, c) at
// s_base + 16·r + c), then lane `lane` takes elements e = lane + 32·t, t = 0..7, i.e. row
// r = e / 16 = 2·t + lane / 16, column c = e % 16 = lane % 16 — each half-subgroup writes 16
// consecutive floats of one row of C — and `store()` applies the epilogue and skips elements outside
// C. The second barrier keeps the next fragment's store from overwriting values not yet read.
fn drain(acc: coop_mat16x16<f32, C>, s_base: u32, lane: u32, row: u32, col: u32) {
    coopStoreT(acc, &scratch[s_base], LDS);
    workgroupBarrier();
    for (var t = 0u; t < 8u; t++) {
        let e = lane + 32u * t;
        store(row + e / 16u, col + e % 16u, scratch[s_base + e]);
    }
    workgroupBarrier();
}
