//! Launcher for `shaders/matmul.wgsl` (64×64 tiles) and `shaders/matmul128.wgsl` (128×128 tiles,
//! 8×8 per thread): C = op(A)·op(B) with a fused epilogue, and their CPU reference.

use std::collections::HashMap;

use num_traits::Float;

use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

/// What happens to each output element after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
}

crate::params_layout!(Params {
    m,
    n,
    k,
    a_off,
    b_off,
    c_off,
    bias_off,
    aux_off
});

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

/// Pipelines for each form and tile, made on first use, plus a placeholder for unused bindings.
pub struct Matmul {
    kernels: HashMap<(bool, bool, Epilogue, u64), Kernel>,
    placeholder: wgpu::Buffer,
    /// Force a tile edge (64 or 128); None picks 128 when the output has at least 128 rows and
    /// 128 columns (fewer would leave most of a large tile idle), else 64.
    pub tile: Option<u64>,
}

impl Matmul {
    pub fn new(ctx: &GpuContext) -> Result<Self, KernelError> {
        Ok(Self {
            kernels: HashMap::new(),
            placeholder: ctx.storage("matmul placeholder", 4)?,
            tile: None,
        })
    }

    /// Check every size against its buffer and bind: the returned dispatch may be recorded each step.
    pub fn prepare(
        &mut self,
        ctx: &GpuContext,
        args: &MatmulArgs<'_>,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "matmul";
        let MatmulArgs { m, n, k, .. } = *args;
        if m == 0 || n == 0 || k == 0 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("empty product {m}×{k}·{k}×{n}"),
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
            (false, _) => At::start(&self.placeholder),
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
            (false, _) => At::start(&self.placeholder),
        };
        let params = Params {
            m: u32_of(K, "M", m)?,
            n: u32_of(K, "N", n)?,
            k: u32_of(K, "K", k)?,
            a_off: u32_of(K, "A offset", args.a.off)?,
            b_off: u32_of(K, "B offset", args.b.off)?,
            c_off: u32_of(K, "C offset", args.c.off)?,
            bias_off: u32_of(K, "bias offset", bias.off)?,
            aux_off: u32_of(K, "aux offset", aux.off)?,
        };
        // every flat index the shader forms must fit in u32 too
        u32_of(K, "A extent", args.a.off + m * k)?;
        u32_of(K, "B extent", args.b.off + k * n)?;
        u32_of(K, "C extent", args.c.off + m * n)?;
        let tile = match self.tile {
            Some(t) if t == TILE || t == BIG_TILE => t,
            Some(t) => {
                return Err(KernelError::Shape {
                    kernel: K,
                    msg: format!("no {t}×{t} tile (64 or 128)"),
                });
            }
            None if m >= BIG_TILE && n >= BIG_TILE => BIG_TILE,
            None => TILE,
        };
        let groups = (
            u32_of(K, "column tiles", n.div_ceil(tile))?,
            u32_of(K, "row tiles", m.div_ceil(tile))?,
        );
        if groups.0 > 65535 || groups.1 > 65535 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("{m}×{n} output needs more than 65535 tiles along one side"),
            });
        }
        let kernel = self
            .kernels
            .entry((args.trans_a, args.trans_b, ep, tile))
            .or_insert_with(|| {
                Kernel::new(
                    ctx,
                    if tile == BIG_TILE {
                        "matmul128"
                    } else {
                        "matmul"
                    },
                    &[
                        ("TRANS_A", f64::from(u8::from(args.trans_a))),
                        ("TRANS_B", f64::from(u8::from(args.trans_b))),
                        ("EPILOGUE", f64::from(ep.code())),
                    ],
                    &[
                        Slot::Read,
                        Slot::Read,
                        Slot::ReadWrite,
                        Slot::Read,
                        Slot::Read,
                        Slot::Uniform,
                    ],
                    true,
                )
            });
        let uniform = ctx.uniform("matmul params", &params);
        Ok(kernel.dispatch(
            ctx,
            &[
                args.a.buf, args.b.buf, args.c.buf, bias.buf, aux.buf, &uniform,
            ],
            groups,
        ))
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

    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, ep: Epilogue) {
        for tile in [TILE, BIG_TILE] {
            check_tile(m, n, k, ta, tb, ep, tile);
        }
    }

    fn check_tile(m: usize, n: usize, k: usize, ta: bool, tb: bool, ep: Epilogue, tile: u64) {
        let ctx = ctx();
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
        let mut mm = Matmul::new(&ctx).unwrap();
        mm.tile = Some(tile);
        let d = mm
            .prepare(
                &ctx,
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
            )
            .unwrap();
        crate::run(&ctx, &[&d]);
        let all: Vec<f32> = ctx.read(&cbuf, 0, m * n + 6).unwrap();
        assert_eq!(all[0], 9.0, "wrote before C");
        assert_eq!(all[m * n + 1], 7.0, "wrote past C");
        let mut want = matmul_ref(&a, &b, m, n, k, ta, tb, ep, Some(&bias), Some(&aux));
        if ep == Epilogue::Accumulate {
            // C held -1 everywhere before the product was added
            want.iter_mut().for_each(|v| *v -= 1.0);
        }
        assert_close(
            &all[1..=m * n],
            &want,
            1e-5,
            &format!("{m}x{n}x{k} {ta} {tb} {ep:?}"),
        );
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
