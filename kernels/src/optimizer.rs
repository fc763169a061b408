//! The optimizer kernels behind one type: SGD (`sgd.wgsl`), Adam and AdamW (`adam.wgsl`), each
//! preceded, when asked, by global-norm clipping (`grad_norm.wgsl`), with the CPU reference that the
//! CPU backend runs. Adding an optimizer means a shader, its launcher, and one arm in each match here.

use crate::adam::{Adam, AdamCall, AdamStep, adam_ref};
use crate::grad_norm::{GradNorm, GradNormCall, grad_norm_ref};
use crate::sgd::{Sgd, SgdCall, SgdStep, sgd_ref};
use crate::{Dispatch, GpuContext, KernelError};

/// An update rule and its fixed hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    Sgd {
        momentum: f32,
        nesterov: bool,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        /// AdamW.
        decoupled: bool,
    },
}

impl Rule {
    /// The names of the rule's state tensors, each shaped like the parameters (PyTorch's names).
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Self::Sgd { .. } => &["momentum_buffer"],
            Self::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// One update: the rule and what changes from step to step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateStep {
    pub rule: Rule,
    pub lr: f32,
    pub weight_decay: f32,
    /// 1 / samples in the global batch (gradients arrive as per-sample sums).
    pub grad_scale: f32,
    /// This update's 1-based count (Adam's bias correction).
    pub t: u64,
    /// Global-norm clipping threshold (None: no clipping).
    pub max_norm: Option<f32>,
}

impl UpdateStep {
    fn sgd(&self) -> Option<SgdStep> {
        match self.rule {
            Rule::Sgd { momentum, nesterov } => Some(SgdStep {
                lr: self.lr,
                momentum,
                weight_decay: self.weight_decay,
                nesterov,
                grad_scale: self.grad_scale,
            }),
            Rule::Adam { .. } => None,
        }
    }

    fn adam(&self) -> Option<AdamStep> {
        match self.rule {
            Rule::Adam {
                beta1,
                beta2,
                eps,
                decoupled,
            } => Some(AdamStep {
                lr: self.lr,
                beta1,
                beta2,
                eps,
                weight_decay: self.weight_decay,
                decoupled,
                grad_scale: self.grad_scale,
                t: self.t,
            }),
            Rule::Sgd { .. } => None,
        }
    }
}

enum RuleCall {
    Sgd(SgdCall),
    Adam(AdamCall),
}

/// The update of one parameter buffer, prepared twice: reading the clipping factor from the norm
/// kernel's output, or from a constant [1, 0, 0] (factor 1, no skip). With loss scaling the norm
/// kernel always runs first: it divides the scale out and skips overflowed steps.
pub struct OptimizerCall {
    rule: Rule,
    plain: RuleCall,
    clipped: RuleCall,
    norm: GradNormCall,
    scaling: bool,
}

fn prepare_rule(
    ctx: &GpuContext,
    rule: &Rule,
    n: u64,
    theta: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    state: &[&wgpu::Buffer],
    clip: &wgpu::Buffer,
) -> Result<RuleCall, KernelError> {
    let want = rule.state_names().len();
    if state.len() != want {
        return Err(KernelError::Shape {
            kernel: "optimizer",
            msg: format!("{} state buffers for a rule with {want}", state.len()),
        });
    }
    Ok(match rule {
        Rule::Sgd { .. } => {
            RuleCall::Sgd(Sgd::new(ctx).prepare(ctx, n, theta, grad, state[0], clip)?)
        }
        Rule::Adam { .. } => {
            RuleCall::Adam(Adam::new(ctx).prepare(ctx, n, theta, grad, state[0], state[1], clip)?)
        }
    })
}

impl OptimizerCall {
    /// Prepare `rule` over θ[0..n], its gradient and its state buffers (in `state_names` order).
    /// `scaler` ([loss scale, good steps, skipped]) is given when gradients carry a loss scale.
    pub fn prepare(
        ctx: &GpuContext,
        rule: &Rule,
        n: u64,
        theta: &wgpu::Buffer,
        grad: &wgpu::Buffer,
        state: &[&wgpu::Buffer],
        scaler: Option<&wgpu::Buffer>,
    ) -> Result<Self, KernelError> {
        let ones = ctx.upload("clip factor 1", &[1.0f32, 0.0, 0.0])?;
        let clip = ctx.array("clip factor, norm, skip", crate::F32, 3)?;
        Ok(Self {
            rule: *rule,
            plain: prepare_rule(ctx, rule, n, theta, grad, state, &ones)?,
            clipped: prepare_rule(ctx, rule, n, theta, grad, state, &clip)?,
            norm: GradNorm::new(ctx).prepare(ctx, n, grad, &clip, scaler)?,
            scaling: scaler.is_some(),
        })
    }

    /// Write ring block `slot` for `step` and record its dispatches: the norm first when clipping.
    pub fn record(
        &self,
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'_>,
        slot: u64,
        step: &UpdateStep,
    ) -> Result<(), KernelError> {
        for (d, at) in self.prepared(ctx, slot, step)? {
            d.record_at(pass, at);
        }
        Ok(())
    }

    /// The dispatches of `step` with their ring offsets, in order (for recording and for profiles).
    pub fn prepared(
        &self,
        ctx: &GpuContext,
        slot: u64,
        step: &UpdateStep,
    ) -> Result<Vec<(&Dispatch, u32)>, KernelError> {
        if step.rule != self.rule {
            return Err(KernelError::Shape {
                kernel: "optimizer",
                msg: format!("prepared for {:?}, asked for {:?}", self.rule, step.rule),
            });
        }
        let mut list = Vec::new();
        let call = match (step.max_norm, self.scaling) {
            (None, false) => &self.plain,
            (max_norm, _) => {
                let at =
                    self.norm
                        .write_step(ctx, slot, step.grad_scale, max_norm.unwrap_or(0.0))?;
                list.push((&self.norm.partial, at));
                list.push((&self.norm.finish, at));
                &self.clipped
            }
        };
        match call {
            RuleCall::Sgd(c) => {
                let s = step.sgd().ok_or_else(|| mismatch(step))?;
                list.push((&c.dispatch, c.write_step(ctx, slot, &s)?));
            }
            RuleCall::Adam(c) => {
                let s = step.adam().ok_or_else(|| mismatch(step))?;
                list.push((&c.dispatch, c.write_step(ctx, slot, &s)?));
            }
        }
        Ok(list)
    }
}

fn mismatch(step: &UpdateStep) -> KernelError {
    KernelError::Shape {
        kernel: "optimizer",
        msg: format!("no kernel for {:?}", step.rule),
    }
}

/// CPU reference of one update, as the kernels compute it: the clipping factor (in f64, rounded to
/// f32 as the kernel stores it), then the rule element by element in f32.
pub fn update_ref(step: &UpdateStep, theta: &mut [f32], grad: &[f32], state: &mut [Vec<f32>]) {
    let clip = match step.max_norm {
        Some(max_norm) => grad_norm_ref(grad, step.grad_scale, max_norm).0 as f32,
        None => 1.0,
    };
    match (step.sgd(), step.adam(), state) {
        (Some(s), _, [vel]) => sgd_ref(theta, grad, vel, &s, clip),
        (_, Some(s), [m, v]) => adam_ref(theta, grad, m, v, &s, clip),
        (_, _, state) => panic!(
            "update_ref: {:?} with {} state tensors",
            step.rule,
            state.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, ctx, random};

    /// Every rule with and without clipping, through the prepared call, against `update_ref`.
    #[test]
    fn every_rule_with_and_without_clipping_matches_the_reference() {
        let ctx = ctx();
        let n = 5_003;
        let rules = [
            Rule::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            Rule::Adam {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                decoupled: true,
            },
        ];
        for rule in rules {
            for max_norm in [None, Some(0.05f32)] {
                let mut theta = random(n, 1);
                let grad = random(n, 2);
                let mut state: Vec<Vec<f32>> =
                    rule.state_names().iter().map(|_| vec![0f32; n]).collect();
                let tb = ctx.upload("theta", &theta).unwrap();
                let gb = ctx.upload("grad", &grad).unwrap();
                let sb: Vec<wgpu::Buffer> = state
                    .iter()
                    .map(|s| ctx.upload("state", s).unwrap())
                    .collect();
                let refs: Vec<&wgpu::Buffer> = sb.iter().collect();
                let call =
                    OptimizerCall::prepare(&ctx, &rule, n as u64, &tb, &gb, &refs, None).unwrap();
                for t in 1..=3 {
                    let step = UpdateStep {
                        rule,
                        lr: 0.01,
                        weight_decay: 0.01,
                        grad_scale: 0.5,
                        t,
                        max_norm,
                    };
                    let mut enc = ctx.device.create_command_encoder(&Default::default());
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        call.record(&ctx, &mut pass, 0, &step).unwrap();
                    }
                    ctx.queue.submit([enc.finish()]);
                    update_ref(&step, &mut theta, &grad, &mut state);
                }
                let what = format!("{rule:?} clip {max_norm:?}");
                assert_close(&ctx.read::<f32>(&tb, 0, n).unwrap(), &theta, 1e-5, &what);
                for (b, s) in sb.iter().zip(&state) {
                    assert_close(&ctx.read::<f32>(b, 0, n).unwrap(), s, 1e-5, &what);
                }
            }
        }
    }
}
