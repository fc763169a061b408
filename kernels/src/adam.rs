//! Launcher for `shaders/adam.wgsl`: Adam and AdamW with PyTorch's bias correction, and the CPU
//! reference. `optimizer.rs` puts it behind the one update type the backends use.

use crate::context::groups_1d;
use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

/// Hyper-parameters of one Adam/AdamW update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// AdamW: weight decay applied to θ directly, not added to the gradient.
    pub decoupled: bool,
    /// 1 / samples in the global batch (gradients arrive as per-sample sums).
    pub grad_scale: f32,
    /// The update's 1-based count, for the bias correction.
    pub t: u64,
}

impl AdamStep {
    /// (lr / (1 - β1^t), √(1 - β2^t)), computed in f64 as torch.optim.Adam computes them.
    pub fn corrections(&self) -> (f32, f32) {
        let t = i32::try_from(self.t.max(1)).unwrap_or(i32::MAX);
        let bc1 = 1.0 - f64::from(self.beta1).powi(t);
        let bc2 = 1.0 - f64::from(self.beta2).powi(t);
        ((f64::from(self.lr) / bc1) as f32, bc2.sqrt() as f32)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    decoupled: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    grad_scale: f32,
    step_size: f32,
    bc2_sqrt: f32,
    _pad: [u32; 2],
}

crate::params_layout!(Params {
    n,
    decoupled,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale,
    step_size,
    bc2_sqrt
});

/// A prepared update over θ, its gradient and both moment buffers.
pub struct AdamCall {
    pub dispatch: Dispatch,
    ring: UniformRing,
    n: u32,
}

impl AdamCall {
    /// Ring block `slot` holds the update `s`; returns its dynamic offset.
    pub fn write_step(
        &self,
        ctx: &GpuContext,
        slot: u64,
        s: &AdamStep,
    ) -> Result<u32, KernelError> {
        let (step_size, bc2_sqrt) = s.corrections();
        let p = Params {
            n: self.n,
            decoupled: u32::from(s.decoupled),
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            grad_scale: s.grad_scale,
            step_size,
            bc2_sqrt,
            _pad: [0; 2],
        };
        self.ring.write(ctx, slot, bytemuck::bytes_of(&p))
    }
}

pub struct Adam {
    kernel: Kernel,
}

impl Adam {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            kernel: Kernel::new(
                ctx,
                "adam",
                &[],
                &[
                    Slot::ReadWrite,
                    Slot::Read,
                    Slot::ReadWrite,
                    Slot::ReadWrite,
                    Slot::Read,
                    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
                ],
                true,
            ),
        }
    }

    /// `clip` holds the clipping factor in its first element (1.0 without clipping).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        n: u64,
        theta: &wgpu::Buffer,
        grad: &wgpu::Buffer,
        exp_avg: &wgpu::Buffer,
        exp_avg_sq: &wgpu::Buffer,
        clip: &wgpu::Buffer,
    ) -> Result<AdamCall, KernelError> {
        const K: &str = "adam";
        need(K, "parameters", theta, n)?;
        need(K, "gradients", grad, n)?;
        need(K, "exp_avg", exp_avg, n)?;
        need(K, "exp_avg_sq", exp_avg_sq, n)?;
        need(K, "clip", clip, 3)?;
        let n32 = u32_of(K, "parameters", n)?;
        let ring = UniformRing::new(
            ctx,
            "adam params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        let dispatch = self.kernel.dispatch(
            ctx,
            &[theta, grad, exp_avg, exp_avg_sq, clip, &ring.buffer],
            groups_1d(n32, 256),
        );
        Ok(AdamCall {
            dispatch,
            ring,
            n: n32,
        })
    }
}

/// CPU reference: the same rule, in f32 as the shader computes it, element by element; `clip` is the
/// clipping factor (1.0 without clipping).
pub fn adam_ref(
    theta: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamStep,
    clip: f32,
) {
    let (step_size, bc2_sqrt) = s.corrections();
    for i in 0..theta.len() {
        let mut w = theta[i];
        let mut g = grad[i] * s.grad_scale * clip;
        if s.decoupled {
            w *= 1.0 - s.lr * s.weight_decay;
        } else {
            g += s.weight_decay * w;
        }
        let m = s.beta1 * exp_avg[i] + (1.0 - s.beta1) * g;
        let v = s.beta2 * exp_avg_sq[i] + (1.0 - s.beta2) * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        theta[i] = w - step_size * m / (v.sqrt() / bc2_sqrt + s.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    #[test]
    fn adam_and_adamw_match_the_reference_over_several_steps() {
        let ctx = ctx();
        let n = 70_001;
        for decoupled in [false, true] {
            let mut theta = random(n, 1);
            let grad = random(n, 2);
            let mut m = vec![0f32; n];
            let mut v = vec![0f32; n];
            let tb = ctx.upload("theta", &theta).unwrap();
            let gb = ctx.upload("grad", &grad).unwrap();
            let mb = ctx.upload("m", &m).unwrap();
            let vb = ctx.upload("v", &v).unwrap();
            let clip = ctx.upload("clip", &[0.5f32, 0.0, 0.0]).unwrap();
            let call = Adam::new(&ctx)
                .prepare(&ctx, n as u64, &tb, &gb, &mb, &vb, &clip)
                .unwrap();
            for t in 1..=3 {
                let s = AdamStep {
                    lr: 1e-2 / t as f32,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    decoupled,
                    grad_scale: 0.25,
                    t,
                };
                call.write_step(&ctx, 0, &s).unwrap();
                crate::run(&ctx, &[&call.dispatch]);
                adam_ref(&mut theta, &grad, &mut m, &mut v, &s, 0.5);
            }
            let what = if decoupled { "adamw" } else { "adam" };
            assert_close(&ctx.read::<f32>(&tb, 0, n).unwrap(), &theta, 1e-6, what);
            assert_close(&ctx.read::<f32>(&mb, 0, n).unwrap(), &m, 1e-6, "exp_avg");
            assert_close(&ctx.read::<f32>(&vb, 0, n).unwrap(), &v, 1e-6, "exp_avg_sq");
        }
    }
}
