//! Launcher for `shaders/gelu.wgsl`: GELU with GPT-2's tanh approximation, forward and backward,
//! with the CPU reference the CPU backend uses.

use crate::context::groups_1d;
use crate::{Dispatch, GpuContext, Kernel, KernelError, Slot, need, u32_of};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

crate::params_layout!(Params { len });

const SLOTS: &[Slot] = &[Slot::Read, Slot::Read, Slot::ReadWrite, Slot::Uniform];
const S: f32 = 0.797_884_6; // √(2/π)
const K: f32 = 0.044_715;

pub struct Gelu {
    forward: Kernel,
    backward: Kernel,
}

impl Gelu {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            forward: Kernel::new(ctx, "gelu", &[("BACKWARD", 0.0)], SLOTS, false),
            backward: Kernel::new(ctx, "gelu", &[("BACKWARD", 1.0)], SLOTS, false),
        }
    }

    /// Forward (`dy` None: dst = gelu(x)) or backward (dst = dy · gelu'(x)) over `len` elements.
    pub fn apply(
        &self,
        ctx: &GpuContext,
        len: usize,
        x: &wgpu::Buffer,
        dy: Option<&wgpu::Buffer>,
        dst: &wgpu::Buffer,
    ) -> Result<Dispatch, KernelError> {
        const N: &str = "gelu";
        let n = u32_of(N, "elements", len as u64)?;
        need(N, "x", x, len as u64)?;
        need(N, "dst", dst, len as u64)?;
        if let Some(d) = dy {
            need(N, "dy", d, len as u64)?;
        }
        let u = ctx.uniform(
            "gelu params",
            &Params {
                len: n,
                _pad0: 0,
                _pad1: 0,
                _pad2: 0,
            },
        );
        let (k, d) = match dy {
            Some(d) => (&self.backward, d),
            None => (&self.forward, x),
        };
        Ok(k.dispatch(ctx, &[x, d, dst, &u], groups_1d(n, 256)))
    }
}

fn inner(x: f32) -> f32 {
    (S * (x + K * x * x * x)).clamp(-15.0, 15.0)
}

/// CPU reference of the forward.
pub fn gelu_ref(x: f32) -> f32 {
    0.5 * x * (1.0 + inner(x).tanh())
}

/// CPU reference of the derivative (the backward is dy times this).
pub fn gelu_grad_ref(x: f32) -> f32 {
    let th = inner(x).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * S * (1.0 + 3.0 * K * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    #[test]
    fn the_derivative_matches_finite_differences_and_the_exact_gelu() {
        for i in -800..=800 {
            let x = i as f32 / 100.0;
            let h = 1e-3f64;
            let f = |v: f64| {
                let u = (0.797_884_560_802_865_4 * (v + 0.044_715 * v * v * v)).clamp(-15.0, 15.0);
                0.5 * v * (1.0 + u.tanh())
            };
            let fd = (f(f64::from(x) + h) - f(f64::from(x) - h)) / (2.0 * h);
            assert!(
                (fd - f64::from(gelu_grad_ref(x))).abs() < 1e-4,
                "x = {x}: {fd} vs {}",
                gelu_grad_ref(x)
            );
            assert!(
                (f(f64::from(x)) - f64::from(gelu_ref(x))).abs() < 1e-5,
                "x = {x}"
            );
        }
        // far out: the identity and zero, without NaN
        assert_eq!(gelu_ref(1e4), 1e4);
        assert_eq!(gelu_ref(-1e4), 0.0);
        assert!(gelu_grad_ref(1e4).is_finite() && gelu_grad_ref(-1e4).is_finite());
    }

    #[test]
    fn the_kernel_matches_its_reference() {
        let ctx = ctx();
        let k = Gelu::new(&ctx);
        for (i, len) in [1usize, 255, 1000, 70_001].into_iter().enumerate() {
            let x: Vec<f32> = random(len, 1 + i as u64).iter().map(|v| 6.0 * v).collect();
            let dy = random(len, 2 + i as u64);
            let xb = ctx.upload("x", &x).unwrap();
            let dyb = ctx.upload("dy", &dy).unwrap();
            let yb = ctx.storage("y", (4 * len) as u64).unwrap();
            let dxb = ctx.storage("dx", (4 * len) as u64).unwrap();
            let f = k.apply(&ctx, len, &xb, None, &yb).unwrap();
            let b = k.apply(&ctx, len, &xb, Some(&dyb), &dxb).unwrap();
            crate::run(&ctx, &[&f, &b]);
            let want: Vec<f32> = x.iter().map(|v| gelu_ref(*v)).collect();
            assert_close(
                &ctx.read::<f32>(&yb, 0, len).unwrap(),
                &want,
                1e-5,
                "forward",
            );
            let want: Vec<f32> = x
                .iter()
                .zip(&dy)
                .map(|(v, g)| g * gelu_grad_ref(*v))
                .collect();
            assert_close(
                &ctx.read::<f32>(&dxb, 0, len).unwrap(),
                &want,
                1e-5,
                "backward",
            );
        }
    }
}
