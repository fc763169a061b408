//! Kernel timing for `--profile`: one training step recorded once more with a timestamp query
//! around each dispatch (`GpuContext::time_dispatches`), labelled by what the plan says each
//! dispatch does. Adapters without timestamp queries, and host-fed data (no gather kernel), give
//! no profile.

use anyhow::Context;
use dptrain_kernels::Dispatch;
use dptrain_kernels::optimizer::UpdateStep;

use super::plan::Op;
use super::{GpuBackend, Pass};
use crate::backend::{Backend, Batch};

/// A dispatch to time: its label and its ring offset.
type Timed<'a> = (String, &'a Dispatch, u32);

/// A plan operation's dispatches for a profile, each with its label and ring offset (a dropout's
/// offset comes from `drops`, in plan order).
fn timed_entries<'a>(
    label: &str,
    op: &'a Op,
    drops: &mut dyn Iterator<Item = &u32>,
) -> Vec<Timed<'a>> {
    match op {
        Op::Dropout(c) => vec![(
            label.to_string(),
            &c.dispatch,
            drops.next().copied().unwrap_or(0),
        )],
        Op::Matmul(_, c) => c
            .dispatches
            .iter()
            .map(|d| {
                let part = match d.name {
                    "pack_f16" => ", packing an operand as f16",
                    "matmul_splitk" => ", summing the partial products",
                    _ if c.choice.splits > 1 => ", partial products",
                    _ => "",
                };
                (format!("{label} [{}{part}]", c.choice.name()), d, 0)
            })
            .collect(),
    }
}

impl GpuBackend {
    /// Time one training step (the batch, then the update) kernel by kernel: (what, seconds) in
    /// execution order; None where the adapter has no timestamps or the data is host-fed.
    pub(super) fn profile(
        &mut self,
        batch: &Batch,
        update: &UpdateStep,
    ) -> anyhow::Result<Option<Vec<(String, f64)>>> {
        if !self.ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        // build the plan through an ordinary step, then time one more with a pass per kernel
        self.gather(batch)?;
        self.forward()?;
        self.loss()?;
        self.backward()?;
        self.update(update)?;
        self.submit()?;
        // every ring-bound dispatch reads block 0, written for this batch
        self.begin(Pass::Train, batch)?;
        self.submit()?;
        let cur = self.current.take().context("current batch")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan for this batch size")?;
        let mut list: Vec<Timed<'_>> = Vec::new();
        if let (Some(f), Some(at)) = (&plan.fused, cur.fused_at) {
            list.extend(
                f.prepared(at)
                    .into_iter()
                    .map(|(d, at)| ("fused step (gather, forward, loss, gradient)".into(), d, at)),
            );
        } else {
            let (Some(gather), Some(gather_at)) = (plan.gather.as_ref(), cur.gather_at) else {
                // host-fed data has no gather kernel to time
                return Ok(None);
            };
            list.push(("gather batch".into(), &gather.dispatch, gather_at));
            let mut drops = cur.dropout_at.iter();
            for (label, op) in plan.forward.iter() {
                list.extend(timed_entries(label, op, &mut drops));
            }
            list.push(("loss + its gradient".into(), &plan.loss, 0));
            list.push(("loss totals".into(), &plan.reduce.dispatch, cur.reduce_at));
            for (label, op) in plan.backward.iter() {
                list.extend(timed_entries(label, op, &mut drops));
            }
        }
        for (d, at) in self.optimizer.prepared(&self.ctx, 0, update)? {
            list.push((format!("update ({})", d.name), d, at));
        }
        let timed: Vec<(&Dispatch, u32)> = list.iter().map(|(_, d, at)| (*d, *at)).collect();
        let Some(secs) = self.ctx.time_dispatches(&timed)? else {
            return Ok(None);
        };
        // the timed pass wrote the loss history and totals once more: leave them as they were
        self.history_len -= 1;
        Ok(Some(
            list.into_iter()
                .zip(secs)
                .map(|((label, _, _), s)| (label, s))
                .collect(),
        ))
    }
}
