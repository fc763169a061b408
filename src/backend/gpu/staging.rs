//! Gradients on their way to and from the exchange. `read_back` copies a bucket (and, when asked,
//! the training totals behind it) into one buffer and waits for it; `stage`/`collect` do the same
//! without waiting at the copy: the copy is submitted after the work recorded so far, mapped
//! asynchronously into a mappable buffer kept per exchange slot, and collected when the exchange
//! needs the bucket, so that a bucket travels while later layers' backward runs. `write_back`
//! replaces a bucket with its sum over ranks.

use std::ops::Range;

use anyhow::Context;
use dptrain_kernels::F32;
use dptrain_kernels::reduce_stats::{TOTALS_BYTES, Totals};

use super::{GpuBackend, TOTALS_WORDS};

/// A gradient bucket on its way to the host: a copy into a mappable buffer, submitted, mapping.
pub(super) struct Staged {
    buf: wgpu::Buffer,
    bytes: u64,
    submission: wgpu::SubmissionIndex,
    mapped: std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

impl GpuBackend {
    /// Record copying gradients `range` (and with `totals` the training totals, which are then
    /// zeroed) into `dst` from offset 0: the bucket, then the total words.
    fn record_bucket_copy(&mut self, range: &Range<usize>, dst: &wgpu::Buffer, totals: bool) {
        let (grads, totals_buf) = (self.grads.clone(), self.train_totals.clone());
        let enc = self.encoder();
        let gbytes = F32.bytes(range.len() as u64);
        enc.copy_buffer_to_buffer(&grads, F32.bytes(range.start as u64), dst, 0, gbytes);
        if totals {
            enc.copy_buffer_to_buffer(&totals_buf, 0, dst, gbytes, TOTALS_BYTES);
            enc.clear_buffer(&totals_buf, 0, None);
        }
    }

    /// The gradients `range` into `out` now (and the training totals, then reset), in one wait.
    pub(super) fn read_back(
        &mut self,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        anyhow::ensure!(
            out.len() == range.len() && range.end <= self.n_params,
            "gradient range mismatch"
        );
        let exchange = self.exchange.clone();
        self.record_bucket_copy(&range, &exchange, totals);
        let words = range.len() + if totals { TOTALS_WORDS } else { 0 };
        let words: Vec<u32> = self.flush_and_read(|s| &s.exchange, words)?;
        out.copy_from_slice(bytemuck::cast_slice(&words[..range.len()]));
        Ok(totals.then(|| Totals::from_words(&words[range.len()..])))
    }

    /// Start copying gradients `range` (and the totals) to the host through exchange slot `slot`.
    pub(super) fn stage(
        &mut self,
        slot: usize,
        range: Range<usize>,
        totals: bool,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(range.end <= self.n_params, "gradient range mismatch");
        let bytes = staged_bytes(range.len(), totals);
        let buf = self.staging_buffer(slot, bytes);
        self.record_bucket_copy(&range, &buf, totals);
        self.submit()?;
        let submission = self
            .in_flight
            .back()
            .cloned()
            .context("the staging copy was not submitted")?;
        let (tx, mapped) = std::sync::mpsc::channel();
        buf.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        if self.staged.len() <= slot {
            self.staged.resize_with(slot + 1, || None);
        }
        self.staged[slot] = Some(Staged {
            buf,
            bytes,
            submission,
            mapped,
        });
        Ok(())
    }

    /// The gradients staged through `slot` into `out`, waiting for them if need be; read now
    /// when nothing was staged there.
    pub(super) fn collect(
        &mut self,
        slot: usize,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        let Some(st) = self.staged.get_mut(slot).and_then(Option::take) else {
            return self.read_back(range, out, totals);
        };
        anyhow::ensure!(
            out.len() == range.len() && st.bytes == staged_bytes(range.len(), totals),
            "gradient range mismatch"
        );
        let result = loop {
            match st.mapped.try_recv() {
                Ok(r) => break r,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    anyhow::bail!("GPU: the gradient readback was dropped")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    self.ctx
                        .device
                        .poll(wgpu::PollType::Wait {
                            submission_index: Some(st.submission.clone()),
                            timeout: None,
                        })
                        .map_err(|e| anyhow::anyhow!("GPU: {e}"))?;
                }
            }
        };
        result.map_err(|e| anyhow::anyhow!("GPU: gradient readback failed: {e}"))?;
        let t = {
            let view = st
                .buf
                .slice(..st.bytes)
                .get_mapped_range()
                .map_err(|e| anyhow::anyhow!("GPU: gradient readback map: {e}"))?;
            let words: &[u32] = bytemuck::cast_slice(&view);
            out.copy_from_slice(bytemuck::cast_slice(&words[..range.len()]));
            totals.then(|| Totals::from_words(&words[range.len()..range.len() + TOTALS_WORDS]))
        };
        st.buf.unmap();
        self.ctx.check()?;
        Ok(t)
    }

    /// Replace gradients `range` with `g`, after the recorded work that reads them.
    pub(super) fn write_back(&mut self, range: Range<usize>, g: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            g.len() == range.len() && range.end <= self.n_params,
            "gradient range mismatch"
        );
        // recorded work that reads the gradients runs before they change
        self.submit()?;
        self.ctx.write(
            &self.grads,
            F32.bytes(range.start as u64),
            bytemuck::cast_slice(g),
        );
        Ok(())
    }

    /// A mappable buffer of at least `bytes` for exchange slot `slot`, kept for the next steps.
    fn staging_buffer(&mut self, slot: usize, bytes: u64) -> wgpu::Buffer {
        if self.staging.len() <= slot {
            self.staging.resize_with(slot + 1, || None);
        }
        match &self.staging[slot] {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                let b = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("gradient bucket staging"),
                    size: bytes.div_ceil(4) * 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                self.staging[slot] = Some(b.clone());
                b
            }
        }
    }
}

/// Bytes a staged bucket of `len` gradients takes (with the totals behind it when `totals`).
fn staged_bytes(len: usize, totals: bool) -> u64 {
    F32.bytes(len as u64) + if totals { TOTALS_BYTES } else { 0 }
}
