//! Launcher for `shaders/grad_norm.wgsl`: the global gradient norm and the clipping factor of
//! `torch.nn.utils.clip_grad_norm_`, and the CPU reference.

use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

/// Workgroups of the first (partial-sum) dispatch; the second sums their results.
const GROUPS: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    grad_scale: f32,
    max_norm: f32,
    scaling: u32,
}

crate::params_layout!(Params {
    n,
    grad_scale,
    max_norm,
    scaling
});

/// Both dispatches, prepared over one gradient buffer; `out` receives [factor, norm, skip].
pub struct GradNormCall {
    pub partial: Dispatch,
    pub finish: Dispatch,
    ring: UniformRing,
    n: u32,
    scaling: bool,
}

impl GradNormCall {
    /// Ring block `slot` holds this step's scale and threshold (0: no clipping); returns its
    /// dynamic offset.
    pub fn write_step(
        &self,
        ctx: &GpuContext,
        slot: u64,
        grad_scale: f32,
        max_norm: f32,
    ) -> Result<u32, KernelError> {
        let p = Params {
            n: self.n,
            grad_scale,
            max_norm,
            scaling: u32::from(self.scaling),
        };
        self.ring.write(ctx, slot, bytemuck::bytes_of(&p))
    }

    /// Record both dispatches with ring block offset `at`.
    pub fn record_at(&self, pass: &mut wgpu::ComputePass<'_>, at: u32) {
        self.partial.record_at(pass, at);
        self.finish.record_at(pass, at);
    }
}

pub struct GradNorm {
    partial: Kernel,
    finish: Kernel,
}

const SLOTS: &[Slot] = &[
    Slot::Read,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::ReadWrite,
    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
];

impl GradNorm {
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            partial: Kernel::new(ctx, "grad_norm", &[("PARTIAL", 1.0)], SLOTS, false),
            finish: Kernel::new(ctx, "grad_norm", &[("PARTIAL", 0.0)], SLOTS, false),
        }
    }

    /// The norm of grad[0..n] · scale and its clipping factor into `out` ([factor, norm, skip]).
    /// With a `scaler` ([loss scale, good steps, skipped]), gradients carry the loss scale: it is
    /// divided out, overflowed steps are skipped, and the scale is adjusted on the device.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        n: u64,
        grad: &wgpu::Buffer,
        out: &wgpu::Buffer,
        scaler: Option<&wgpu::Buffer>,
    ) -> Result<GradNormCall, KernelError> {
        const K: &str = "grad_norm";
        need(K, "gradients", grad, n)?;
        need(K, "out", out, 3)?;
        let unused;
        let scaler_buf = match scaler {
            Some(s) => {
                need(K, "scaler", s, 3)?;
                s
            }
            None => {
                unused = ctx.array("no scaler", crate::F32, 3)?;
                &unused
            }
        };
        let n32 = u32_of(K, "parameters", n)?;
        let partials = ctx.array("norm partials", crate::F32, u64::from(GROUPS))?;
        let ring = UniformRing::new(
            ctx,
            "grad_norm params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        let bufs = [grad, &partials, out, scaler_buf, &ring.buffer];
        Ok(GradNormCall {
            partial: self.partial.dispatch(ctx, &bufs, (GROUPS, 1)),
            finish: self.finish.dispatch(ctx, &bufs, (1, 1)),
            ring,
            n: n32,
            scaling: scaler.is_some(),
        })
    }
}

/// CPU reference: (factor, norm) in f64, as clip_grad_norm_ defines them (factor 1 when `max_norm`
/// is not positive).
pub fn grad_norm_ref(grad: &[f32], grad_scale: f32, max_norm: f32) -> (f64, f64) {
    let norm = grad
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt()
        * f64::from(grad_scale);
    let factor = if max_norm > 0.0 {
        (f64::from(max_norm) / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    (factor, norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ctx, random};

    #[test]
    fn norm_and_factor_match_the_reference_at_unaligned_sizes() {
        let ctx = ctx();
        for (n, max_norm) in [(1usize, 0.1f32), (70_001, 5.0), (300_007, 1e9)] {
            let g = random(n, 3);
            let gb = ctx.upload("g", &g).unwrap();
            let out = ctx.storage("out", 12).unwrap();
            let call = GradNorm::new(&ctx)
                .prepare(&ctx, n as u64, &gb, &out, None)
                .unwrap();
            let at = call.write_step(&ctx, 0, 0.5, max_norm).unwrap();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                call.record_at(&mut pass, at);
            }
            ctx.queue.submit([enc.finish()]);
            let got: Vec<f32> = ctx.read(&out, 0, 3).unwrap();
            assert_eq!(got[2], 0.0, "no skip without loss scaling");
            let (factor, norm) = grad_norm_ref(&g, 0.5, max_norm);
            let rel = |a: f32, b: f64| (f64::from(a) - b).abs() / b.abs().max(1e-30);
            assert!(
                rel(got[1], norm) <= 1e-5,
                "n {n}: norm {} vs {norm}",
                got[1]
            );
            assert!(
                rel(got[0], factor) <= 1e-5,
                "n {n}: factor {} vs {factor}",
                got[0]
            );
        }
    }

    fn run_scaled(ctx: &GpuContext, g: &[f32], scaler: &wgpu::Buffer) -> Vec<f32> {
        let gb = ctx.upload("g", g).unwrap();
        let out = ctx.storage("out", 12).unwrap();
        let call = GradNorm::new(ctx)
            .prepare(ctx, g.len() as u64, &gb, &out, Some(scaler))
            .unwrap();
        let at = call.write_step(ctx, 0, 0.5, 0.0).unwrap();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            call.record_at(&mut pass, at);
        }
        ctx.queue.submit([enc.finish()]);
        ctx.read(&out, 0, 3).unwrap()
    }

    #[test]
    fn loss_scaling_unscales_skips_overflow_and_adjusts_the_scale() {
        let ctx = ctx();
        let scaler = ctx.upload("scaler", &[1024.0f32, 1999.0, 0.0]).unwrap();
        let g: Vec<f32> = random(1000, 5).iter().map(|v| v * 1024.0).collect();
        let got = run_scaled(&ctx, &g, &scaler);
        // the factor carries 1/S; the norm is that of the unscaled mean gradient
        assert_eq!((got[0], got[2]), (1.0 / 1024.0, 0.0));
        let (_, norm) = grad_norm_ref(&g, 0.5 / 1024.0, 0.0);
        assert!((f64::from(got[1]) - norm).abs() <= 1e-5 * norm);
        // the 2000th finite step in a row doubles the scale
        assert_eq!(
            ctx.read::<f32>(&scaler, 0, 3).unwrap(),
            vec![2048.0, 0.0, 0.0]
        );
        let mut bad = g.clone();
        bad[17] = f32::INFINITY;
        let got = run_scaled(&ctx, &bad, &scaler);
        assert_eq!((got[0], got[2]), (0.0, 1.0), "overflow skips the step");
        assert_eq!(
            ctx.read::<f32>(&scaler, 0, 3).unwrap(),
            vec![1024.0, 0.0, 1.0]
        );
    }
}
