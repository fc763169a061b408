//! Launcher for `shaders/sgd.wgsl`: the SGD update (momentum, Nesterov, weight decay), and its CPU
//! reference. `optimizer.rs` puts it behind the one update type the backends use.

use crate::context::groups_1d;
use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

/// Hyper-parameters of one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    /// 1 / samples in the global batch (gradients arrive as per-sample sums).
    pub grad_scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    nesterov: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    grad_scale: f32,
    _pad: [u32; 2],
}

crate::params_layout!(Params {
    n,
    nesterov,
    lr,
    momentum,
    weight_decay,
    grad_scale
});

/// A prepared update over one parameter/gradient/velocity triple (and the clipping factor's buffer);
/// `set` changes the step's values.
pub struct SgdCall {
    pub dispatch: Dispatch,
    ring: UniformRing,
    n: u32,
}

impl SgdCall {
    pub fn set(&self, ctx: &GpuContext, s: &SgdStep) -> Result<(), KernelError> {
        self.write_step(ctx, 0, s).map(|_| ())
    }

    /// Ring block `slot` holds the update `s`; returns its dynamic offset.
    pub fn write_step(&self, ctx: &GpuContext, slot: u64, s: &SgdStep) -> Result<u32, KernelError> {
        let p = Params {
            n: self.n,
            nesterov: u32::from(s.nesterov),
            lr: s.lr,
            momentum: s.momentum,
            weight_decay: s.weight_decay,
            grad_scale: s.grad_scale,
            _pad: [0; 2],
        };
        self.ring.write(ctx, slot, bytemuck::bytes_of(&p))
    }
}

pub struct Sgd {
    kernel: Kernel,
}

impl Sgd {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            kernel: Kernel::new(
                ctx,
                "sgd",
                &[],
                &[
                    Slot::ReadWrite,
                    Slot::Read,
                    Slot::ReadWrite,
                    Slot::Read,
                    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
                ],
                true,
            ),
        }
    }

    /// `clip` holds the clipping factor in its first element (1.0 without clipping).
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        n: u64,
        theta: &wgpu::Buffer,
        grad: &wgpu::Buffer,
        vel: &wgpu::Buffer,
        clip: &wgpu::Buffer,
    ) -> Result<SgdCall, KernelError> {
        const K: &str = "sgd";
        need(K, "parameters", theta, n)?;
        need(K, "gradients", grad, n)?;
        need(K, "velocity", vel, n)?;
        need(K, "clip", clip, 3)?;
        let n32 = u32_of(K, "parameters", n)?;
        let ring = UniformRing::new(
            ctx,
            "sgd params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        ring.write(ctx, 0, bytemuck::bytes_of(&Params::zeroed_with(n32)))?;
        let dispatch = self.kernel.dispatch(
            ctx,
            &[theta, grad, vel, clip, &ring.buffer],
            groups_1d(n32, 256),
        );
        Ok(SgdCall {
            dispatch,
            ring,
            n: n32,
        })
    }
}

impl Params {
    fn zeroed_with(n: u32) -> Self {
        Self {
            n,
            nesterov: 0,
            lr: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
            grad_scale: 0.0,
            _pad: [0; 2],
        }
    }
}

/// CPU reference: the same rule, in f32 as the shader computes it, element by element; `clip` is the
/// clipping factor (1.0 without clipping).
pub fn sgd_ref(theta: &mut [f32], grad: &[f32], vel: &mut [f32], s: &SgdStep, clip: f32) {
    for i in 0..theta.len() {
        let w = theta[i];
        let g = grad[i] * s.grad_scale * clip + s.weight_decay * w;
        let v = s.momentum * vel[i] + g;
        vel[i] = v;
        let step = if s.nesterov { g + s.momentum * v } else { v };
        theta[i] = w - s.lr * step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    #[test]
    fn three_updates_match_the_reference_with_and_without_nesterov() {
        let ctx = ctx();
        let n = 70_001;
        for nesterov in [false, true] {
            let mut theta = random(n, 1);
            let grad = random(n, 2);
            let mut vel = vec![0f32; n];
            let tb = ctx.upload("theta", &theta).unwrap();
            let gb = ctx.upload("grad", &grad).unwrap();
            let vb = ctx.upload("vel", &vel).unwrap();
            let clip = ctx.upload("clip", &[0.75f32, 0.0, 0.0]).unwrap();
            let call = Sgd::new(&ctx)
                .prepare(&ctx, n as u64, &tb, &gb, &vb, &clip)
                .unwrap();
            for step in 0..3 {
                let s = SgdStep {
                    lr: 0.1 / (step + 1) as f32,
                    momentum: 0.9,
                    weight_decay: 1e-3,
                    nesterov,
                    grad_scale: 0.25,
                };
                call.set(&ctx, &s).unwrap();
                crate::run(&ctx, &[&call.dispatch]);
                sgd_ref(&mut theta, &grad, &mut vel, &s, 0.75);
            }
            assert_close(&ctx.read::<f32>(&tb, 0, n).unwrap(), &theta, 1e-6, "theta");
            assert_close(&ctx.read::<f32>(&vb, 0, n).unwrap(), &vel, 1e-6, "velocity");
        }
    }
}
