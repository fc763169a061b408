//! Launcher for `shaders/matmul.wgsl` (64×64 tiles) and `shaders/matmul128.wgsl` (128×128 tiles,
//! 8×8 per thread): C = op(A)·op(B) with a fused epilogue, and their CPU reference.

use std::collections::HashMap;

use num_traits::Float;

use crate::pack::{Pack, PackArgs};
use crate::{DType, Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

/// What happens to each output element after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Epilogue {
    None,
    Bias,
    BiasRelu,
    BiasTanh,
    BiasSigmoid,
    /// Multiply by ReLU's derivative taken from the stored activation output (aux).
    DRelu,
    DTanh,
    DSigmoid,
    /// C += the product: gradients summed over the micro-batches of one update.
    Accumulate,
}

impl Epilogue {
    pub const ALL: [Epilogue; 9] = [
        Epilogue::None,
        Epilogue::Bias,
        Epilogue::BiasRelu,
        Epilogue::BiasTanh,
        Epilogue::BiasSigmoid,
        Epilogue::DRelu,
        Epilogue::DTanh,
        Epilogue::DSigmoid,
        Epilogue::Accumulate,
    ];

    fn code(self) -> u32 {
        self as u32
    }
    fn uses_bias(self) -> bool {
        matches!(
            self,
            Self::Bias | Self::BiasRelu | Self::BiasTanh | Self::BiasSigmoid
        )
    }
    fn uses_aux(self) -> bool {
        matches!(self, Self::DRelu | Self::DTanh | Self::DSigmoid)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    bias_off: u32,
    aux_off: u32,
    k_chunk: u32,
    splits: u32,
    _pad: [u32; 2],
}

crate::params_layout!(Params {
    m,
    n,
    k,
    a_off,
    b_off,
    c_off,
    bias_off,
    aux_off,
    k_chunk,
    splits
});

/// Which kernel computes a product. Every variant computes the same C; they differ in speed, and
/// the f16 ones in precision (inputs rounded to f16, f32 accumulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// `matmul.wgsl`: 64×64 tiles, 4×4 outputs per thread.
    Tile64,
    /// `matmul128.wgsl`: 128×128 tiles, 8×8 outputs per thread.
    Tile128,
    /// `matmul_skinny.wgsl`: 64×16 tiles for few columns, 16×64 for few rows.
    Skinny,
    /// `matmul_half.wgsl`: 128×128 tiles, inputs rounded to f16 in workgroup memory, f32
    /// accumulation (needs SHADER_F16).
    Half,
    /// `matmul_coop.wgsl`: cooperative 16×16×16 matrices (tensor cores), f16 inputs, f32
    /// accumulation (needs SHADER_F16 and EXPERIMENTAL_COOPERATIVE_MATRIX).
    Coop,
    /// Deliberately wrong: the 64-tile kernel split in two with one partial dropped. It exists so
    /// that a test can watch the tuner's verification reject a variant; it is never a candidate.
    Wrong,
}

impl Variant {
    pub const ALL: [Variant; 6] = [
        Variant::Tile64,
        Variant::Tile128,
        Variant::Skinny,
        Variant::Half,
        Variant::Coop,
        Variant::Wrong,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Tile64 => "tile64",
            Self::Tile128 => "tile128",
            Self::Skinny => "skinny",
            Self::Half => "half",
            Self::Coop => "coop",
            Self::Wrong => "wrong",
        }
    }

    fn stem(self) -> &'static str {
        match self {
            Self::Tile64 | Self::Wrong => "matmul",
            Self::Tile128 => "matmul128",
            Self::Skinny => "matmul_skinny",
            Self::Half => "matmul_half",
            Self::Coop => "matmul_coop",
        }
    }

    /// Whether the variant rounds its inputs to f16.
    pub fn is_f16(self) -> bool {
        matches!(self, Self::Half | Self::Coop)
    }

    /// The device features the variant needs.
    pub fn features(self) -> wgpu::Features {
        match self {
            Self::Half => wgpu::Features::SHADER_F16,
            Self::Coop => {
                wgpu::Features::SHADER_F16 | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            }
            _ => wgpu::Features::empty(),
        }
    }

    /// Output rows and columns per workgroup for an M×N output.
    fn tile(self, m: u64, n: u64) -> (u64, u64) {
        match self {
            Self::Tile64 | Self::Wrong => (64, 64),
            Self::Tile128 | Self::Half | Self::Coop => (128, 128),
            // few columns: tall tiles; else wide ones
            Self::Skinny if n <= m => (64, 16),
            Self::Skinny => (16, 64),
        }
    }
}

/// A variant and how many pieces K is split into (1: no split).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Choice {
    pub variant: Variant,
    pub splits: u32,
}

impl Choice {
    pub const fn new(variant: Variant, splits: u32) -> Self {
        Self { variant, splits }
    }

    /// "tile128" or "skinny/k8": how the choice is written in caches, logs and checkpoints.
    pub fn name(&self) -> String {
        if self.splits > 1 {
            format!("{}/k{}", self.variant.name(), self.splits)
        } else {
            self.variant.name().to_string()
        }
    }

    /// The choice a `name` wrote.
    pub fn parse(s: &str) -> Option<Self> {
        let (v, k) = match s.split_once("/k") {
            Some((v, k)) => (v, k.parse().ok()?),
            None => (s, 1),
        };
        let variant = Variant::ALL.into_iter().find(|x| x.name() == v)?;
        (k >= 1).then_some(Self::new(variant, k))
    }

    /// The kernels' choice without tuning: 128-tiles for outputs of at least 128×128, 64-tiles
    /// otherwise, the f16 kernel of that size when `f16`; no split.
    pub fn default_for(m: u64, n: u64, f16: bool) -> Self {
        let variant = match (f16, m >= BIG_TILE && n >= BIG_TILE) {
            (true, _) => Variant::Half,
            (false, true) => Variant::Tile128,
            (false, false) => Variant::Tile64,
        };
        Self::new(variant, 1)
    }
}

/// A buffer and the element offset where the operand starts in it.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub buf: &'a wgpu::Buffer,
    pub off: u64,
}

impl<'a> At<'a> {
    pub fn start(buf: &'a wgpu::Buffer) -> Self {
        Self { buf, off: 0 }
    }
}

/// One matrix product: shapes, forms and operands.
pub struct MatmulArgs<'a> {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    /// A is stored [K,M] (use Aᵀ).
    pub trans_a: bool,
    /// B is stored [N,K] (use Bᵀ).
    pub trans_b: bool,
    pub epilogue: Epilogue,
    pub a: At<'a>,
    pub b: At<'a>,
    pub c: At<'a>,
    /// Bias of length N, for the bias epilogues.
    pub bias: Option<At<'a>>,
    /// Stored activation output shaped like C, for the derivative epilogues.
    pub aux: Option<At<'a>>,
}

/// Output tile edge of `matmul.wgsl` (rows and columns per workgroup).
pub const TILE: u64 = 64;
/// Output tile edge of `matmul128.wgsl`.
pub const BIG_TILE: u64 = 128;

/// A prepared product: one dispatch, or a split-K pass and its reduction.
#[derive(Clone)]
pub struct MatmulCall {
    pub choice: Choice,
    pub dispatches: Vec<Dispatch>,
}

impl MatmulCall {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for d in &self.dispatches {
            d.record(pass);
        }
    }
}

/// Pipelines for each variant and form, made on first use; a placeholder for unused bindings, and
/// the workspace that split products share (they run one after another).
pub struct Matmul {
    kernels: HashMap<(Variant, bool, bool, Epilogue, bool), Kernel>,
    reduce: HashMap<Epilogue, Kernel>,
    placeholder: wgpu::Buffer,
    workspace: Option<wgpu::Buffer>,
    pack: Option<Pack>,
    packed_a: Option<wgpu::Buffer>,
    packed_b: Option<wgpu::Buffer>,
    /// Force a tile edge (64 or 128) where no choice is given, for `bench matmul --tile`.
    pub tile: Option<u64>,
}

/// The tensor-core core's bindings: the common six, then packed op(A) and op(B).
const COOP_SLOTS: [Slot; 8] = [
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Read,
    Slot::Read,
    Slot::Uniform,
    Slot::Read,
    Slot::Read,
];

const SLOTS: [Slot; 6] = [
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Read,
    Slot::Read,
    Slot::Uniform,
];

impl Matmul {
    pub fn new(ctx: &GpuContext) -> Result<Self, KernelError> {
        Ok(Self {
            kernels: HashMap::new(),
            reduce: HashMap::new(),
            placeholder: ctx.storage("matmul placeholder", 4)?,
            workspace: None,
            pack: None,
            packed_a: None,
            packed_b: None,
            tile: None,
        })
    }

    /// Prepare with the default choice (or the forced tile).
    pub fn prepare(
        &mut self,
        ctx: &GpuContext,
        args: &MatmulArgs<'_>,
    ) -> Result<MatmulCall, KernelError> {
        let choice = match self.tile {
            Some(TILE) => Choice::new(Variant::Tile64, 1),
            Some(BIG_TILE) => Choice::new(Variant::Tile128, 1),
            Some(t) => {
                return Err(KernelError::Shape {
                    kernel: "matmul",
                    msg: format!("no {t}×{t} tile (64 or 128)"),
                });
            }
            None => Choice::default_for(args.m, args.n, false),
        };
        self.prepare_with(ctx, args, choice)
    }

    /// Check every size against its buffer and bind, for `choice`: the returned call may be
    /// recorded each step. A variant the device cannot build (a missing feature, a shader the
    /// driver refuses) is an error, not a fault.
    pub fn prepare_with(
        &mut self,
        ctx: &GpuContext,
        args: &MatmulArgs<'_>,
        choice: Choice,
    ) -> Result<MatmulCall, KernelError> {
        const K: &str = "matmul";
        let MatmulArgs { m, n, k, .. } = *args;
        if m == 0 || n == 0 || k == 0 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("empty product {m}×{k}·{k}×{n}"),
            });
        }
        let placeholder = self.placeholder.clone();
        let variant = choice.variant;
        if !ctx.features.contains(variant.features()) {
            let lacks = match variant {
                Variant::Coop if ctx.features.contains(wgpu::Features::SHADER_F16) => {
                    "cooperative matrices (16×16×16 f16 → f32)"
                }
                Variant::Coop => "cooperative matrices and shader-f16",
                _ => "shader-f16",
            };
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("{} needs {lacks}, which this adapter lacks", variant.name()),
            });
        }
        need(K, "A", args.a.buf, args.a.off + m * k)?;
        need(K, "B", args.b.buf, args.b.off + k * n)?;
        need(K, "C", args.c.buf, args.c.off + m * n)?;
        let ep = args.epilogue;
        let bias = match (ep.uses_bias(), args.bias) {
            (true, Some(b)) => {
                need(K, "bias", b.buf, b.off + n)?;
                b
            }
            (true, None) => {
                return Err(KernelError::Shape {
                    kernel: K,
                    msg: format!("{ep:?} needs a bias"),
                });
            }
            (false, _) => At::start(&placeholder),
        };
        let aux = match (ep.uses_aux(), args.aux) {
            (true, Some(a)) => {
                need(K, "aux", a.buf, a.off + m * n)?;
                a
            }
            (true, None) => {
                return Err(KernelError::Shape {
                    kernel: K,
                    msg: format!("{ep:?} needs the stored activation"),
                });
            }
            (false, _) => At::start(&placeholder),
        };
        // every flat index the shader forms must fit in u32 too
        u32_of(K, "A extent", args.a.off + m * k)?;
        u32_of(K, "B extent", args.b.off + k * n)?;
        u32_of(K, "C extent", args.c.off + m * n)?;
        // the deliberately wrong variant splits in two and drops a partial
        let splits = if variant == Variant::Wrong {
            2
        } else {
            u64::from(choice.splits.max(1)).min(k)
        };
        // the tensor-core kernel steps K by 32 through packed operands: its chunks are multiples
        let k_step = if variant == Variant::Coop { 32 } else { 1 };
        let k_chunk = k.div_ceil(splits).div_ceil(k_step) * k_step;
        let splits = k.div_ceil(k_chunk);
        let (tm, tn) = variant.tile(m, n);
        let groups = (
            u32_of(K, "column tiles", n.div_ceil(tn))?,
            u32_of(K, "row tiles", m.div_ceil(tm))?,
        );
        if groups.0 > 65535 || groups.1 > 65535 || splits > 65535 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("{m}×{n} output needs more than 65535 tiles along one side"),
            });
        }
        let params = Params {
            m: u32_of(K, "M", m)?,
            n: u32_of(K, "N", n)?,
            k: u32_of(K, "K", k)?,
            a_off: u32_of(K, "A offset", args.a.off)?,
            b_off: u32_of(K, "B offset", args.b.off)?,
            c_off: u32_of(K, "C offset", args.c.off)?,
            bias_off: u32_of(K, "bias offset", bias.off)?,
            aux_off: u32_of(K, "aux offset", aux.off)?,
            k_chunk: u32_of(K, "K chunk", k_chunk)?,
            splits: u32_of(K, "splits", splits)?,
            _pad: [0; 2],
        };
        // a split product writes raw partials to the workspace, then sums them with the epilogue
        let core_ep = if splits > 1 { Epilogue::None } else { ep };
        // the skinny kernel's wide form (16×64 tiles) is a pipeline of its own
        let tall = !(variant == Variant::Skinny && tm == 16);
        let key = (variant, args.trans_a, args.trans_b, core_ep, tall);
        let kernel = if let Some(k) = self.kernels.get(&key) {
            k.clone()
        } else {
            let mut constants = vec![
                ("TRANS_A", f64::from(u8::from(args.trans_a))),
                ("TRANS_B", f64::from(u8::from(args.trans_b))),
                ("EPILOGUE", f64::from(core_ep.code())),
            ];
            if variant == Variant::Skinny {
                constants.push(("TALL", f64::from(u8::from(tall))));
            }
            let slots: &[Slot] = if variant == Variant::Coop {
                &COOP_SLOTS
            } else {
                &SLOTS
            };
            let kernel = Kernel::try_new(ctx, variant.stem(), &constants, slots, true)?;
            self.kernels.insert(key, kernel.clone());
            kernel
        };
        // the tensor-core kernel reads op(A) and op(B) packed as padded row-major f16
        let (mut dispatches, packed) = if variant == Variant::Coop {
            let (mp, np, kp) = (
                m.div_ceil(128) * 128,
                n.div_ceil(128) * 128,
                k.div_ceil(32) * 32,
            );
            let (pa, pb) = self.packed(ctx, mp * kp, kp * np)?;
            let pack = match &self.pack {
                Some(p) => p,
                None => self.pack.insert(Pack::try_new(ctx)?),
            };
            let da = pack.prepare(
                ctx,
                &PackArgs {
                    src: args.a.buf,
                    src_off: args.a.off,
                    rows: m,
                    cols: k,
                    col_major: args.trans_a,
                    dst: &pa,
                    dst_rows: mp,
                    dst_cols: kp,
                },
            )?;
            let db = pack.prepare(
                ctx,
                &PackArgs {
                    src: args.b.buf,
                    src_off: args.b.off,
                    rows: k,
                    cols: n,
                    col_major: args.trans_b,
                    dst: &pb,
                    dst_rows: kp,
                    dst_cols: np,
                },
            )?;
            (vec![da, db], vec![pa, pb])
        } else {
            (Vec::new(), Vec::new())
        };
        let bind = |c: &wgpu::Buffer, u: &wgpu::Buffer| -> Vec<wgpu::Buffer> {
            let mut v = vec![
                args.a.buf.clone(),
                args.b.buf.clone(),
                c.clone(),
                bias.buf.clone(),
                aux.buf.clone(),
                u.clone(),
            ];
            v.extend(packed.iter().cloned());
            v
        };
        if splits == 1 {
            let uniform = ctx.uniform("matmul params", &params);
            let bufs = bind(args.c.buf, &uniform);
            let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
            dispatches.push(kernel.dispatch(ctx, &refs, groups));
            return Ok(MatmulCall { choice, dispatches });
        }
        // split K: partials into the shared workspace, then their sum into C
        let ws_elems = splits * m * n;
        let ws = self.workspace(ctx, ws_elems)?;
        let partial = Params { c_off: 0, ..params };
        let pu = ctx.uniform("matmul split params", &partial);
        let bufs = bind(&ws, &pu);
        let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
        let mut first = kernel.dispatch(ctx, &refs, groups);
        first.groups_z = u32_of(K, "splits", splits)?;
        let reduce = match self.reduce.entry(ep) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Kernel::try_new(
                ctx,
                "matmul_splitk",
                &[("EPILOGUE", f64::from(ep.code()))],
                &SLOTS,
                true,
            )?),
        };
        let summed = Params {
            a_off: 0,
            // the wrong variant forgets the last partial
            splits: if variant == Variant::Wrong {
                params.splits - 1
            } else {
                params.splits
            },
            ..params
        };
        let ru = ctx.uniform("matmul reduce params", &summed);
        let second = reduce.dispatch(
            ctx,
            &[&ws, &placeholder, args.c.buf, bias.buf, aux.buf, &ru],
            crate::context::groups_1d(u32_of(K, "M×N", m * n)?, 256),
        );
        dispatches.push(first);
        dispatches.push(second);
        Ok(MatmulCall { choice, dispatches })
    }

    /// The shared packed-operand buffers of the tensor-core kernel, grown to at least `a` and `b`
    /// f16 elements.
    fn packed(
        &mut self,
        ctx: &GpuContext,
        a: u64,
        b: u64,
    ) -> Result<(wgpu::Buffer, wgpu::Buffer), KernelError> {
        let grow = |slot: &mut Option<wgpu::Buffer>, label: &str, elems: u64| match slot {
            Some(w) if w.size() >= DType::F16.bytes(elems) => Ok(w.clone()),
            _ => {
                let w = ctx.array(label, DType::F16, elems)?;
                *slot = Some(w.clone());
                Ok::<_, KernelError>(w)
            }
        };
        Ok((
            grow(&mut self.packed_a, "packed A (f16)", a)?,
            grow(&mut self.packed_b, "packed B (f16)", b)?,
        ))
    }

    /// The shared split-K workspace, grown to at least `elems` f32.
    fn workspace(&mut self, ctx: &GpuContext, elems: u64) -> Result<wgpu::Buffer, KernelError> {
        match &self.workspace {
            Some(w) if w.size() >= crate::F32.bytes(elems) => Ok(w.clone()),
            _ => {
                let w = ctx.array("split-K workspace", crate::F32, elems)?;
                self.workspace = Some(w.clone());
                Ok(w)
            }
        }
    }
}

/// The forward epilogues' activation of `v` (bias already added): the one scalar definition that
/// the reference and the CPU backend share (generic, so the CPU backend can run it in f64).
pub fn activate<T: Float>(ep: Epilogue, v: T) -> T {
    match ep {
        Epilogue::BiasRelu => v.max(T::zero()),
        Epilogue::BiasTanh => v.tanh(),
        Epilogue::BiasSigmoid => T::one() / (T::one() + (-v).exp()),
        _ => v,
    }
}

/// The derivative epilogues' factor f'(x), computed from the activation's output y = f(x).
pub fn derivative<T: Float>(ep: Epilogue, y: T) -> T {
    match ep {
        Epilogue::DRelu => {
            if y > T::zero() {
                T::one()
            } else {
                T::zero()
            }
        }
        Epilogue::DTanh => T::one() - y * y,
        Epilogue::DSigmoid => y * (T::one() - y),
        _ => T::one(),
    }
}

/// CPU reference in f64: the same operand layouts and epilogues as the shader (for `Accumulate` it
/// returns the product alone; the caller adds the old C).
#[allow(clippy::too_many_arguments)]
pub fn matmul_ref(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    epilogue: Epilogue,
    bias: Option<&[f32]>,
    aux: Option<&[f32]>,
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let av = if trans_a { a[p * m + i] } else { a[i * k + p] };
                let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                s += f64::from(av) * f64::from(bv);
            }
            let bv = bias.map_or(0.0, |b| f64::from(b[j]));
            let y = aux.map_or(0.0, |x| f64::from(x[i * n + j]));
            c[i * n + j] = match epilogue {
                // the caller adds the old C
                Epilogue::None | Epilogue::Accumulate => s,
                Epilogue::Bias
                | Epilogue::BiasRelu
                | Epilogue::BiasTanh
                | Epilogue::BiasSigmoid => activate(epilogue, s + bv),
                Epilogue::DRelu | Epilogue::DTanh | Epilogue::DSigmoid => {
                    s * derivative(epilogue, y)
                }
            } as f32;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    /// Every variant this adapter can run, unsplit and split in 3.
    fn choices(ctx: &GpuContext) -> Vec<Choice> {
        let mut v = Vec::new();
        for variant in [
            Variant::Tile64,
            Variant::Tile128,
            Variant::Skinny,
            Variant::Half,
        ] {
            if ctx.features.contains(variant.features()) {
                v.push(Choice::new(variant, 1));
                v.push(Choice::new(variant, 3));
            }
        }
        v
    }

    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, ep: Epilogue) {
        let ctx = ctx();
        for choice in choices(&ctx) {
            check_choice(&ctx, m, n, k, ta, tb, ep, choice);
        }
    }

    fn f16_rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
    }

    /// C from one choice against the f64 reference (on f16-rounded inputs for the f16 variants,
    /// whose only difference is that rounding), with the operands at offsets in larger buffers.
    #[allow(clippy::too_many_arguments)]
    fn run_choice(
        ctx: &GpuContext,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        ep: Epilogue,
        choice: Choice,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let a = random(m * k, 1);
        let b = random(k * n, 2);
        let bias = random(n, 3);
        // a stored activation output in the range its function produces, with exact zeros for ReLU
        let aux: Vec<f32> = random(m * n, 4)
            .iter()
            .map(|v| match ep {
                Epilogue::DRelu => v.max(0.0),
                Epilogue::DTanh => v.tanh(),
                _ => 0.5 + 0.5 * v.tanh(),
            })
            .collect();
        // operands at non-zero offsets in larger buffers, as parameters are in the flat buffer
        let pad = |v: &[f32], off: usize| {
            let mut p = vec![9.0f32; off];
            p.extend_from_slice(v);
            p.extend(std::iter::repeat_n(7.0, 5));
            p
        };
        let abuf = ctx.upload("a", &pad(&a, 3)).unwrap();
        let bbuf = ctx.upload("b", &pad(&b, 5)).unwrap();
        let biasbuf = ctx.upload("bias", &pad(&bias, 2)).unwrap();
        let auxbuf = ctx.upload("aux", &aux).unwrap();
        let cbuf = ctx.upload("c", &pad(&vec![-1.0; m * n], 1)).unwrap();
        let mut mm = Matmul::new(ctx).unwrap();
        let call = mm
            .prepare_with(
                ctx,
                &MatmulArgs {
                    m: m as u64,
                    n: n as u64,
                    k: k as u64,
                    trans_a: ta,
                    trans_b: tb,
                    epilogue: ep,
                    a: At { buf: &abuf, off: 3 },
                    b: At { buf: &bbuf, off: 5 },
                    c: At { buf: &cbuf, off: 1 },
                    bias: Some(At {
                        buf: &biasbuf,
                        off: 2,
                    }),
                    aux: Some(At::start(&auxbuf)),
                },
                choice,
            )
            .unwrap();
        let ds: Vec<&Dispatch> = call.dispatches.iter().collect();
        crate::run(ctx, &ds);
        let all: Vec<f32> = ctx.read(&cbuf, 0, m * n + 6).unwrap();
        assert_eq!(all[0], 9.0, "{choice:?} wrote before C");
        assert_eq!(all[m * n + 1], 7.0, "{choice:?} wrote past C");
        let (ar, br) = if choice.variant.is_f16() {
            (f16_rounded(&a), f16_rounded(&b))
        } else {
            (a.clone(), b.clone())
        };
        let mut want = matmul_ref(&ar, &br, m, n, k, ta, tb, ep, Some(&bias), Some(&aux));
        let mut exact = matmul_ref(&a, &b, m, n, k, ta, tb, ep, Some(&bias), Some(&aux));
        if ep == Epilogue::Accumulate {
            // C held -1 everywhere before the product was added
            want.iter_mut().for_each(|v| *v -= 1.0);
            exact.iter_mut().for_each(|v| *v -= 1.0);
        }
        (all[1..=m * n].to_vec(), want, exact)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_choice(
        ctx: &GpuContext,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        ep: Epilogue,
        choice: Choice,
    ) {
        let (got, want, exact) = run_choice(ctx, m, n, k, ta, tb, ep, choice);
        let what = format!("{m}x{n}x{k} {ta} {tb} {ep:?} {}", choice.name());
        assert_close(&got, &want, 1e-5, &what);
        if choice.variant.is_f16() {
            // and within f16's rounding of the unrounded product
            assert_close(&got, &exact, 1e-2, &what);
        }
    }

    #[test]
    fn the_deliberately_wrong_variant_is_wrong() {
        let ctx = ctx();
        let (got, want, _) = run_choice(
            &ctx,
            70,
            33,
            50,
            false,
            true,
            Epilogue::None,
            Choice::new(Variant::Wrong, 1),
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f32::max);
        assert!(worst > 1e-2, "the wrong variant gave the right answer");
    }

    #[test]
    fn choices_round_trip_through_their_names() {
        for v in Variant::ALL {
            for k in [1, 4] {
                let c = Choice::new(v, k);
                assert_eq!(Choice::parse(&c.name()), Some(c));
            }
        }
        assert_eq!(Choice::parse("tile128/k0"), None);
        assert_eq!(Choice::parse("tile256"), None);
    }

    #[test]
    fn every_form_matches_the_reference_at_unaligned_sizes() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            check(67, 45, 33, ta, tb, Epilogue::None);
        }
    }

    #[test]
    fn every_epilogue_matches_the_reference() {
        for ep in [
            Epilogue::Bias,
            Epilogue::BiasRelu,
            Epilogue::BiasTanh,
            Epilogue::BiasSigmoid,
            Epilogue::DRelu,
            Epilogue::DTanh,
            Epilogue::DSigmoid,
            Epilogue::Accumulate,
        ] {
            check(37, 70, 19, false, true, ep);
        }
        check(70, 37, 131, true, false, Epilogue::Accumulate);
    }

    #[test]
    fn larger_and_degenerate_shapes_match_the_reference() {
        check(130, 129, 200, false, true, Epilogue::BiasRelu);
        check(259, 131, 13, true, false, Epilogue::None);
        check(131, 257, 70, false, false, Epilogue::DTanh);
        check(1, 1, 1, true, false, Epilogue::None);
        check(257, 1, 3, false, false, Epilogue::Bias);
        check(2, 300, 65, true, false, Epilogue::None);
    }

    #[test]
    fn a_buffer_too_small_is_a_shape_error_not_a_fault() {
        let ctx = ctx();
        let small = ctx.storage("small", 16).unwrap();
        let mut mm = Matmul::new(&ctx).unwrap();
        let err = mm
            .prepare(
                &ctx,
                &MatmulArgs {
                    m: 4,
                    n: 4,
                    k: 4,
                    trans_a: false,
                    trans_b: false,
                    epilogue: Epilogue::None,
                    a: At::start(&small),
                    b: At::start(&small),
                    c: At::start(&small),
                    bias: None,
                    aux: None,
                },
            )
            .err()
            .unwrap();
        assert!(err.to_string().contains("A needs 16 elements"), "{err}");
    }
}
