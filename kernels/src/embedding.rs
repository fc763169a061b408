//! Launcher for `shaders/embedding.wgsl`: token plus learned position embedding, forward and the two
//! backward passes, with the CPU references the CPU backend uses. The token embedding's backward is
//! deterministic: [`group_by_token`] sorts the rows by token id on the host first (as llm.c does), and
//! each gradient row then sums its rows in increasing order.

use crate::context::groups_1d;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    t: u32,
    c: u32,
    vocab: u32,
}

crate::params_layout!(Params { rows, t, c, vocab });

const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::Read,
    Slot::ReadWrite,
    Slot::Uniform,
];

/// The sizes of one embedding: rows = batch · t, width c, `vocab` token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub rows: usize,
    pub t: usize,
    pub c: usize,
    pub vocab: usize,
}

impl Dims {
    fn params(&self) -> Result<Params, KernelError> {
        const K: &str = "embedding";
        if self.t == 0 || !self.rows.is_multiple_of(self.t) || self.c == 0 {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!(
                    "{} rows of width {} are not whole sequences of {}",
                    self.rows, self.c, self.t
                ),
            });
        }
        u32_of(
            K,
            "elements",
            (self.rows.max(self.vocab) as u64) * (self.c as u64),
        )?;
        Ok(Params {
            rows: u32_of(K, "rows", self.rows as u64)?,
            t: u32_of(K, "t", self.t as u64)?,
            c: u32_of(K, "c", self.c as u64)?,
            vocab: u32_of(K, "vocab", self.vocab as u64)?,
        })
    }
}

/// The rows grouped by token: (starts, order) with order[starts[v]..starts[v + 1]] the rows whose
/// token is v, ascending. None when a token is outside the vocabulary.
pub fn group_by_token(tokens: &[u32], vocab: usize) -> Option<(Vec<u32>, Vec<u32>)> {
    let mut starts = vec![0u32; vocab + 1];
    for &tok in tokens {
        *starts.get_mut(tok as usize + 1)? += 1;
    }
    for v in 0..vocab {
        starts[v + 1] += starts[v];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; tokens.len()];
    for (r, &tok) in tokens.iter().enumerate() {
        order[next[tok as usize] as usize] = r as u32;
        next[tok as usize] += 1;
    }
    Some((starts, order))
}

pub struct Embedding {
    forward: Kernel,
    token_grad: Kernel,
    position_grad: Kernel,
}

impl Embedding {
    pub fn new(ctx: &GpuContext) -> Self {
        let k = |m: f64| Kernel::new(ctx, "embedding", &[("MODE", m)], SLOTS, false);
        Self {
            forward: k(0.0),
            token_grad: k(1.0),
            position_grad: k(2.0),
        }
    }

    /// out = wte[tokens] + wpe[position]. The tokens must be below `vocab` (the caller checks them
    /// on the host; the kernel does not).
    pub fn forward(
        &self,
        ctx: &GpuContext,
        d: &Dims,
        tokens: &wgpu::Buffer,
        wte: &wgpu::Buffer,
        wpe: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "embedding";
        let p = d.params()?;
        need(K, "tokens", tokens, d.rows as u64)?;
        need(K, "wte", wte, (d.vocab * d.c) as u64)?;
        need(K, "wpe", wpe, (d.t * d.c) as u64)?;
        need(K, "out", out, (d.rows * d.c) as u64)?;
        let u = ctx.uniform("embedding params", &p);
        let n = u32_of(K, "elements", (d.rows * d.c) as u64)?;
        Ok(self
            .forward
            .dispatch(ctx, &[tokens, tokens, wte, wpe, out, &u], groups_1d(n, 256)))
    }

    /// dwte from dout, with the rows grouped by [`group_by_token`] (`starts`, `order` uploaded).
    pub fn token_grad(
        &self,
        ctx: &GpuContext,
        d: &Dims,
        starts: &wgpu::Buffer,
        order: &wgpu::Buffer,
        dout: &wgpu::Buffer,
        dwte: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "embedding";
        let p = d.params()?;
        need(K, "starts", starts, d.vocab as u64 + 1)?;
        need(K, "order", order, d.rows as u64)?;
        need(K, "dout", dout, (d.rows * d.c) as u64)?;
        need(K, "dwte", dwte, (d.vocab * d.c) as u64)?;
        let u = ctx.uniform("embedding params", &p);
        let n = u32_of(K, "elements", (d.vocab * d.c) as u64)?;
        Ok(self.token_grad.dispatch(
            ctx,
            &[order, starts, dout, dout, dwte, &u],
            groups_1d(n, 256),
        ))
    }

    /// dwpe from dout: each position's rows summed over the sequences in order.
    pub fn position_grad(
        &self,
        ctx: &GpuContext,
        d: &Dims,
        dout: &wgpu::Buffer,
        dwpe: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const K: &str = "embedding";
        let p = d.params()?;
        need(K, "dout", dout, (d.rows * d.c) as u64)?;
        need(K, "dwpe", dwpe, (d.t * d.c) as u64)?;
        let u = ctx.uniform("embedding params", &p);
        let n = u32_of(K, "elements", (d.t * d.c) as u64)?;
        Ok(self
            .position_grad
            .dispatch(ctx, &[dout, dout, dout, dout, dwpe, &u], groups_1d(n, 256)))
    }
}

/// CPU reference of the forward.
pub fn forward_ref(d: &Dims, tokens: &[u32], wte: &[f32], wpe: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; d.rows * d.c];
    for r in 0..d.rows {
        let (tok, pos) = (tokens[r] as usize, r % d.t);
        for j in 0..d.c {
            out[r * d.c + j] = wte[tok * d.c + j] + wpe[pos * d.c + j];
        }
    }
    out
}

/// CPU reference of both backward passes: (dwte, dwpe), each sum over rows in increasing order.
pub fn backward_ref(d: &Dims, tokens: &[u32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dwte = vec![0f32; d.vocab * d.c];
    let mut dwpe = vec![0f32; d.t * d.c];
    for r in 0..d.rows {
        let (tok, pos) = (tokens[r] as usize, r % d.t);
        for j in 0..d.c {
            dwte[tok * d.c + j] += dout[r * d.c + j];
            dwpe[pos * d.c + j] += dout[r * d.c + j];
        }
    }
    (dwte, dwpe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        random(n, seed)
            .iter()
            .map(|v| ((v + 1.0) / 2.0 * vocab as f32) as u32 % vocab as u32)
            .collect()
    }

    #[test]
    fn grouping_by_token_lists_each_tokens_rows_in_order() {
        let (starts, order) = group_by_token(&[3, 1, 3, 0, 1, 3], 5).unwrap();
        assert_eq!(starts, vec![0, 1, 3, 3, 6, 6]);
        assert_eq!(order, vec![3, 1, 4, 0, 2, 5]);
        assert!(group_by_token(&[5], 5).is_none());
    }

    /// The embedding is linear in (wte, wpe): ⟨forward(wte, wpe), g⟩ = ⟨wte, dwte⟩ + ⟨wpe, dwpe⟩.
    #[test]
    fn the_backward_reference_is_the_adjoint() {
        let d = Dims {
            rows: 3 * 7,
            t: 7,
            c: 5,
            vocab: 11,
        };
        let tok = tokens(d.rows, d.vocab, 1);
        let (wte, wpe) = (random(d.vocab * d.c, 2), random(d.t * d.c, 3));
        let g = random(d.rows * d.c, 4);
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum()
        };
        let (dwte, dwpe) = backward_ref(&d, &tok, &g);
        let lhs = dot(&forward_ref(&d, &tok, &wte, &wpe), &g);
        let rhs = dot(&wte, &dwte) + dot(&wpe, &dwpe);
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
    }

    #[test]
    fn the_kernels_match_their_references_bit_for_bit() {
        let ctx = ctx();
        let k = Embedding::new(&ctx);
        for (i, d) in [
            Dims {
                rows: 8,
                t: 8,
                c: 16,
                vocab: 11,
            },
            Dims {
                rows: 3 * 13,
                t: 13,
                c: 37,
                vocab: 65,
            },
            Dims {
                rows: 4 * 64,
                t: 64,
                c: 64,
                vocab: 300,
            },
        ]
        .into_iter()
        .enumerate()
        {
            let tok = tokens(d.rows, d.vocab, 10 + i as u64);
            let (wte, wpe) = (
                random(d.vocab * d.c, 20 + i as u64),
                random(d.t * d.c, 30 + i as u64),
            );
            let dout = random(d.rows * d.c, 40 + i as u64);
            let (starts, order) = group_by_token(&tok, d.vocab).unwrap();
            let up = |name: &str, v: &[f32]| ctx.upload(name, v).unwrap();
            let tb = ctx.upload("tokens", &tok).unwrap();
            let sb = ctx.upload("starts", &starts).unwrap();
            let ob = ctx.upload("order", &order).unwrap();
            let (wteb, wpeb, doutb) = (up("wte", &wte), up("wpe", &wpe), up("dout", &dout));
            let outb = ctx.storage("out", (4 * d.rows * d.c) as u64).unwrap();
            let dwteb = ctx.storage("dwte", (4 * d.vocab * d.c) as u64).unwrap();
            let dwpeb = ctx.storage("dwpe", (4 * d.t * d.c) as u64).unwrap();
            let ds = [
                k.forward(&ctx, &d, &tb, &wteb, &wpeb, &outb).unwrap(),
                k.token_grad(&ctx, &d, &sb, &ob, &doutb, &dwteb).unwrap(),
                k.position_grad(&ctx, &d, &doutb, &dwpeb).unwrap(),
            ];
            crate::run(&ctx, &ds.iter().collect::<Vec<_>>());
            assert_eq!(
                ctx.read::<f32>(&outb, 0, d.rows * d.c).unwrap(),
                forward_ref(&d, &tok, &wte, &wpe)
            );
            let (dwte, dwpe) = backward_ref(&d, &tok, &dout);
            assert_eq!(
                ctx.read::<f32>(&dwteb, 0, d.vocab * d.c).unwrap(),
                dwte,
                "{d:?}"
            );
            assert_eq!(
                ctx.read::<f32>(&dwpeb, 0, d.t * d.c).unwrap(),
                dwpe,
                "{d:?}"
            );
        }
    }

    #[test]
    fn rows_that_are_not_whole_sequences_are_errors() {
        let ctx = ctx();
        let k = Embedding::new(&ctx);
        let b = ctx.storage("b", 4096).unwrap();
        let d = Dims {
            rows: 10,
            t: 3,
            c: 4,
            vocab: 5,
        };
        assert!(k.forward(&ctx, &d, &b, &b, &b, &b).is_err());
        let d = Dims { rows: 9, ..d };
        let small = ctx.storage("small", 8).unwrap();
        assert!(k.position_grad(&ctx, &d, &b, &small).is_err());
    }
}
