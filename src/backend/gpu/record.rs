//! Recording and submitting. The phases of many steps record into one command encoder and one
//! open compute pass (which closes only for a copy or a submission); each micro-batch and each
//! update takes a block of the uniform rings, and a submission goes out when the blocks run out,
//! after `steps_per_submit` updates, or when the host needs a result, with at most
//! `MAX_IN_FLIGHT` submissions queued. `begin` makes a batch current (its plan, its ring blocks)
//! and `record` records one of its phases.

use anyhow::Context;
use dptrain_kernels::RING_SLOTS;

use super::plan::{Op, dropouts};
use super::{GpuBackend, HISTORY, MAX_IN_FLIGHT, Pass, PlanKey};
use crate::backend::Batch;

/// The batch being recorded: its plan and the uniform-ring offsets its dispatches read.
pub(super) struct Current {
    pub key: PlanKey,
    pub gather_at: Option<u32>,
    pub reduce_at: u32,
    /// The ring offset of each dropout op, forward ops first, then backward ops.
    pub dropout_at: Vec<u32>,
    /// The fused step's ring offset, when the plan has one.
    pub fused_at: Option<u32>,
    /// Backward ops recorded so far (a staged backward records them in stretches).
    pub backward_done: usize,
}

/// The phases of a batch that `record` records (a batch's share of a step, before the update).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BatchPhase {
    Gather,
    Forward,
    Loss,
    Backward,
}

/// Record `ops` into `pass`; the dropouts among them read their ring offsets from `drops`, in
/// order.
fn record_ops(ops: &[(String, Op)], drops: &[u32], pass: &mut wgpu::ComputePass<'_>) {
    let mut k = 0;
    for (_, op) in ops {
        match op {
            Op::Matmul(_, c) => c.record(pass),
            Op::Dropout(c) => {
                c.dispatch.record_at(pass, drops[k]);
                k += 1;
            }
        }
    }
}

impl GpuBackend {
    /// Submit whatever is recorded, keeping at most MAX_IN_FLIGHT submissions queued.
    pub(super) fn submit(&mut self) -> anyhow::Result<()> {
        self.open_pass = None;
        if let Some(enc) = self.pending.take() {
            // the ring blocks written for this submission land before it runs, and the next
            // submission's writes land only after it (queue writes and submissions are ordered)
            let idx = self.ctx.queue.submit([enc.finish()]);
            self.in_flight.push_back(idx);
        }
        self.pending_steps = 0;
        self.batch_slot = 0;
        self.update_slot = 0;
        while self.in_flight.len() > MAX_IN_FLIGHT {
            if let Some(oldest) = self.in_flight.pop_front() {
                self.ctx
                    .device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(oldest),
                        timeout: None,
                    })
                    .map_err(|e| anyhow::anyhow!("GPU: {e}"))?;
            }
        }
        self.ctx.check()?;
        Ok(())
    }

    /// The ring block of the next micro-batch, submitting first when every block is taken.
    fn next_batch_slot(&mut self) -> anyhow::Result<u64> {
        if self.batch_slot >= RING_SLOTS {
            self.submit()?;
        }
        self.batch_slot += 1;
        Ok(self.batch_slot - 1)
    }

    /// The ring block of the next update, submitting first when every block is taken.
    pub(super) fn next_update_slot(&mut self) -> anyhow::Result<u64> {
        if self.update_slot >= RING_SLOTS {
            self.submit()?;
        }
        self.update_slot += 1;
        Ok(self.update_slot - 1)
    }

    /// The pending encoder for a copy or a clear: the open compute pass (if any) ends first.
    pub(super) fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.open_pass = None;
        let device = &self.ctx.device;
        self.pending.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("steps"),
            })
        })
    }

    /// Open the compute pass that dispatches record into (see `open_pass`).
    pub(super) fn ensure_pass(&mut self) {
        if self.open_pass.is_none() {
            let pass = self
                .encoder()
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("steps"),
                    timestamp_writes: None,
                })
                .forget_lifetime();
            self.open_pass = Some(pass);
        }
    }

    /// Submit everything, wait for it, and read `count` values of the buffer `which` picks.
    pub(super) fn flush_and_read<T: bytemuck::Pod>(
        &mut self,
        which: fn(&Self) -> &wgpu::Buffer,
        count: usize,
    ) -> anyhow::Result<Vec<T>> {
        self.submit()?;
        self.in_flight.clear();
        Ok(self.ctx.read(which(self), 0, count)?)
    }

    /// Make the batch current: its plan (built on first use), host-fed rows uploaded, and its
    /// ring blocks written. Records nothing.
    pub(super) fn begin(&mut self, pass: Pass, batch: &Batch) -> anyhow::Result<()> {
        let (offset, rows) = (batch.offset, batch.rows);
        anyhow::ensure!(
            rows >= 1 && rows <= self.max_rows,
            "batch of {rows} rows exceeds the {} the backend was sized for",
            self.max_rows
        );
        let key = (pass, rows, batch.accumulate && pass == Pass::Train);
        if !self.plans.contains_key(&key) {
            let plan = self.build_plan(key)?;
            self.plans.insert(key, plan);
        }
        self.upload_host_batch(pass, offset, rows)?;
        let slot = self.next_batch_slot()?;
        let history_slot = if pass == Pass::Train {
            self.history_len += 1;
            ((self.history_len - 1) % HISTORY) as u64
        } else {
            0
        };
        let plan = self.plans.get_mut(&key).context("plan just inserted")?;
        let gather_at = match plan.gather.as_mut() {
            Some(g) => Some(g.write_offset(&self.ctx, slot, offset as u64)?),
            None => None,
        };
        let reduce_at = plan.reduce.write_slot(&self.ctx, slot, history_slot)?;
        let fused_at = match plan.fused.as_mut() {
            Some(f) => Some(f.write_step(
                &self.ctx,
                slot,
                offset as u64,
                history_slot,
                batch.accumulate,
            )?),
            None => None,
        };
        let mut dropout_at = Vec::new();
        for (_, op) in plan.forward.iter_mut().chain(plan.backward.iter_mut()) {
            if let Op::Dropout(c) = op {
                dropout_at.push(c.write_step(&self.ctx, slot, offset as u64, batch.step)?);
            }
        }
        self.current = Some(Current {
            key,
            gather_at,
            reduce_at,
            dropout_at,
            fused_at,
            backward_done: 0,
        });
        Ok(())
    }

    /// Record one phase of the current batch into the open compute pass (backward: what a
    /// staged backward has not recorded yet).
    pub(super) fn record(&mut self, phase: BatchPhase) -> anyhow::Result<()> {
        self.ensure_pass();
        let cur = self
            .current
            .as_ref()
            .context("a step phase was recorded before gather")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan of the current batch")?;
        let pass = self.open_pass.as_mut().context("the open pass")?;
        if let (Some(f), Some(at)) = (&plan.fused, cur.fused_at) {
            // the fused step does every phase in one go: it records where backward would
            if phase == BatchPhase::Backward {
                f.record_at(pass, at);
            }
            return Ok(());
        }
        match phase {
            BatchPhase::Gather => {
                if let (Some(g), Some(at)) = (&plan.gather, cur.gather_at) {
                    g.dispatch.record_at(pass, at);
                }
            }
            BatchPhase::Forward => record_ops(&plan.forward, &cur.dropout_at, pass),
            BatchPhase::Loss => {
                plan.loss.record(pass);
                plan.reduce.dispatch.record_at(pass, cur.reduce_at);
            }
            BatchPhase::Backward => return self.record_backward_to(usize::MAX),
        }
        Ok(())
    }

    /// Record the current batch's backward ops up to (not including) op `end`, from where the
    /// last stretch stopped.
    pub(super) fn record_backward_to(&mut self, end: usize) -> anyhow::Result<()> {
        self.ensure_pass();
        let cur = self
            .current
            .as_mut()
            .context("a step phase was recorded before gather")?;
        let plan = self
            .plans
            .get(&cur.key)
            .context("plan of the current batch")?;
        let pass = self.open_pass.as_mut().context("the open pass")?;
        let done = cur.backward_done.min(plan.backward.len());
        let end = end.clamp(done, plan.backward.len());
        let drops_before = plan.forward_dropouts() + dropouts(&plan.backward[..done]);
        record_ops(
            &plan.backward[done..end],
            &cur.dropout_at[drops_before..],
            pass,
        );
        cur.backward_done = end;
        Ok(())
    }
}
