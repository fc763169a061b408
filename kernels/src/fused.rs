//! Launcher for `shaders/fused_linear.wgsl`: one whole training step of a one-dense-layer model
//! (gather, forward, loss, gradient and its reduction, totals and history) in one dispatch, or two
//! for big batches; and its CPU reference.
//!
//! Replaces the seven dispatches of the unfused step (gather, matmul forward, loss, reduce_stats,
//! matmul weight gradient, bias gradient — the update stays separate) for models whose parameters
//! are few: P = (inputs + 1)·outputs ≤ [`MAX_PARAMS`]. The pipelines are specialised per shape
//! (inputs, outputs), built on the first [`FusedLinear::prepare`] of that shape and kept; they are
//! `trusted` (no runtime checks in release builds), every index being in range by construction.
//!
//! GPU time of one step on an H200 (timestamps, release-like unchecked shaders, default G):
//! 6–9 µs for batches of 32 rows (2→1 … 63→1 layers), 6.6–11 µs at 100 rows, 7–16 µs at 1024,
//! 13–28 µs at 65536; with runtime checks (debug builds) about twice that. Buffers θ, grads,
//! totals and history must be distinct (one is read while the others are written).

use std::sync::Mutex;

use crate::gather::DeviceData;
use crate::loss::{LossKind, loss_row};
use crate::{
    Dispatch, GpuContext, Kernel, KernelError, RING_SLOTS, Slot, UniformRing, need, u32_of,
};

/// Most parameters (W and b) of an eligible layer.
pub const MAX_PARAMS: u64 = 64;
/// Most inputs of an eligible layer.
pub const MAX_INPUTS: u64 = 64;
/// Most outputs of an eligible layer.
pub const MAX_OUTPUTS: u64 = 16;
/// Threads per workgroup.
pub const WORKGROUP: u64 = 256;
/// Rows per workgroup of the partial-sum dispatch, while there are at most [`MAX_GROUPS`].
pub const ROWS_PER_GROUP: u64 = 128;
/// Most workgroups of the partial-sum dispatch (about one per SM of an H100/H200: more ran slower
/// there, each workgroup holding a whole SM's registers).
pub const MAX_GROUPS: u64 = 128;
/// Most rows of a batch: the correct count is summed in f32, exact up to 2^24.
pub const MAX_ROWS: u64 = 1 << 24;
/// Workgroup memory of the kernel in bytes (one 4096-f32 array: θ and the normaliser while rows
/// are processed, then the reduction's rounds).
pub const WORKGROUP_BYTES: u64 = 16 * 256 * 4;

const K: &str = "fused_linear";

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    chunk: u32,
    groups: u32,
    offset: u32,
    w_off: u32,
    b_off: u32,
    slot: u32,
    accumulate: u32,
    samples: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

crate::params_layout!(Params {
    rows,
    chunk,
    groups,
    offset,
    w_off,
    b_off,
    slot,
    accumulate,
    samples
});

const SLOTS: &[Slot] = &[
    Slot::Read,      // data
    Slot::Read,      // targets
    Slot::Read,      // index
    Slot::Read,      // norm
    Slot::Read,      // theta
    Slot::ReadWrite, // grads
    Slot::ReadWrite, // totals
    Slot::ReadWrite, // history
    Slot::ReadWrite, // workspace
    Slot::UniformRing(std::mem::size_of::<Params>() as u64),
];

/// Storage buffers the kernel binds (the adapter must allow as many per stage).
const STORAGE_BINDINGS: u32 = 9;

/// Whether a dense layer of this shape can take the fused step under `loss`.
pub fn eligible(loss: LossKind, inputs: u64, outputs: u64) -> bool {
    inputs >= 1
        && outputs >= 1
        && inputs <= MAX_INPUTS
        && outputs <= MAX_OUTPUTS
        && (inputs + 1) * outputs <= MAX_PARAMS
        && (loss == LossKind::SoftmaxXent || outputs == 1)
}

/// Workgroups of the partial-sum pass for a batch of `rows` of a layer `inputs` → `outputs`
/// (1: a single dispatch). One workgroup takes a few rows per thread before a second dispatch
/// (about 5 µs on an H200) pays: fewer the more work a row is; past that, chunks of
/// [`ROWS_PER_GROUP`] rows (smaller chunks reduce in fewer rounds) over up to [`MAX_GROUPS`]
/// workgroups. Fitted to H200 timings of 2→1 … 63→1 layers at 32 … 65536 rows.
pub fn groups_for(rows: u64, inputs: u64, outputs: u64) -> u64 {
    // a row's cost in rough units: its loads, its multiply-adds (forward and gradient), its loss
    let units = 4 + inputs + (inputs + 1) * outputs / 2;
    let rows_per_thread = (130 / units).max(1);
    if rows <= WORKGROUP * rows_per_thread {
        1
    } else {
        rows.div_ceil(ROWS_PER_GROUP).min(MAX_GROUPS)
    }
}

/// Shapes and buffers of one fused step.
#[derive(Clone, Copy)]
pub struct FusedArgs<'a> {
    /// The resident training set; the layer's inputs are its features.
    pub data: &'a DeviceData,
    /// Sample numbers (u32, each < data.samples; the kernel clamps any other); a step reads
    /// index[offset .. offset + rows], its offset set per step by [`FusedCall::write_step`].
    pub index: &'a wgpu::Buffer,
    pub rows: u64,
    pub outputs: u64,
    /// The flat parameters: W [outputs, inputs] row-major at `w_off`, b [outputs] at `b_off`.
    pub theta: &'a wgpu::Buffer,
    pub w_off: u64,
    pub b_off: u64,
    /// The flat gradient, written (or added into) at the same offsets as θ.
    pub grads: &'a wgpu::Buffer,
    /// The running total, 4 words as [`crate::reduce_stats::ReduceStats::total_buffer`].
    pub totals: &'a wgpu::Buffer,
    /// The per-step loss sums, one f32 per step slot.
    pub history: &'a wgpu::Buffer,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// G = 1: rows to outputs.
    Single,
    /// G > 1, first pass: rows to the workspace.
    Partial,
    /// G > 1, second pass: the workspace to outputs.
    Finish,
}

type Key = (u64, u64, Mode);

/// The fused step's pipelines for one loss and one feature storage, per shape.
pub struct FusedLinear {
    pub loss: LossKind,
    pub u8_pixels: bool,
    kernels: Mutex<Vec<(Key, Kernel)>>,
}

impl FusedLinear {
    /// Pipelines are specialised per (inputs, outputs) and built by the first `prepare` of a shape.
    pub fn new(_ctx: &GpuContext, loss: LossKind, u8_pixels: bool) -> Self {
        Self {
            loss,
            u8_pixels,
            kernels: Mutex::new(Vec::new()),
        }
    }

    fn kernel(
        &self,
        ctx: &GpuContext,
        inputs: u64,
        outputs: u64,
        mode: Mode,
    ) -> Result<Kernel, KernelError> {
        let key = (inputs, outputs, mode);
        let mut cache = self
            .kernels
            .lock()
            .map_err(|_| KernelError::Device("fused_linear: pipeline cache poisoned".into()))?;
        if let Some((_, k)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(k.clone());
        }
        let loss = match self.loss {
            LossKind::SoftmaxXent => 0.0,
            LossKind::SigmoidBce => 1.0,
            LossKind::Mse => 2.0,
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let kernel = Kernel::try_new(
            ctx,
            K,
            &[
                ("LOSS", loss),
                ("PIXELS_U8", flag(self.u8_pixels)),
                ("PARTIAL", flag(mode == Mode::Partial)),
                ("FINISH", flag(mode == Mode::Finish)),
                ("INPUTS", inputs as f64),
                ("OUTPUTS", outputs as f64),
            ],
            SLOTS,
            // every index is in range by construction: sizes checked here and in `write_step`,
            // sample numbers clamped below `samples` in the kernel, every ring block written
            true,
        )?;
        cache.push((key, kernel.clone()));
        Ok(kernel)
    }

    /// Check every size and bind the step's buffers; the batch's offset, history slot and
    /// accumulate flag are set per step with [`FusedCall::write_step`].
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        args: &FusedArgs<'_>,
    ) -> Result<FusedCall, KernelError> {
        let groups = groups_for(args.rows, args.data.features, args.outputs);
        self.prepare_with_groups(ctx, args, groups)
    }

    /// As [`FusedLinear::prepare`] with G (1 ..= min(rows, [`MAX_GROUPS`])) chosen by the caller:
    /// for tuning [`groups_for`].
    pub fn prepare_with_groups(
        &self,
        ctx: &GpuContext,
        args: &FusedArgs<'_>,
        groups: u64,
    ) -> Result<FusedCall, KernelError> {
        let FusedArgs {
            data,
            index,
            rows,
            outputs,
            theta,
            w_off,
            b_off,
            grads,
            totals,
            history,
        } = *args;
        let inputs = data.features;
        let shape = |msg: String| KernelError::Shape { kernel: K, msg };
        if !eligible(self.loss, inputs, outputs) {
            return Err(shape(format!(
                "a dense layer {inputs} → {outputs} ({} parameters) under {:?}: the fused step \
                 takes at most {MAX_INPUTS} inputs, {MAX_OUTPUTS} outputs (1 for a binary or \
                 squared-error loss) and {MAX_PARAMS} parameters",
                (inputs + 1) * outputs,
                self.loss
            )));
        }
        if data.u8_pixels != self.u8_pixels {
            return Err(shape(format!(
                "data stored as {} but the pipelines read {}",
                if data.u8_pixels { "u8" } else { "f32" },
                if self.u8_pixels { "u8" } else { "f32" }
            )));
        }
        if ctx.limits.max_storage_buffers_per_shader_stage < STORAGE_BINDINGS {
            return Err(shape(format!(
                "{STORAGE_BINDINGS} storage bindings but the adapter allows {}",
                ctx.limits.max_storage_buffers_per_shader_stage
            )));
        }
        let index_len = index.size() / 4;
        if rows == 0 || rows > index_len || rows > MAX_ROWS {
            return Err(shape(format!(
                "{rows} rows from an index of {index_len} (at most {MAX_ROWS} rows)"
            )));
        }
        let nw = inputs * outputs;
        if w_off < b_off + outputs && b_off < w_off + nw {
            return Err(shape(format!(
                "W at {w_off}..{} overlaps b at {b_off}..{}",
                w_off + nw,
                b_off + outputs
            )));
        }
        if data.samples == 0 {
            return Err(shape("an empty data set".into()));
        }
        need(K, "targets", &data.targets, data.samples)?;
        need(K, "norm", &data.norm, 2 * inputs)?;
        let words = if data.u8_pixels {
            (data.samples * inputs).div_ceil(4)
        } else {
            data.samples * inputs
        };
        need(K, "data", &data.data, words)?;
        u32_of(K, "samples × inputs", data.samples * inputs)?;
        let end = (w_off + nw).max(b_off + outputs);
        need(K, "theta", theta, end)?;
        need(K, "grads", grads, end)?;
        u32_of(K, "parameter end", end)?;
        need(K, "totals", totals, 4)?;
        let history_len = history.size() / 4;
        if history_len == 0 {
            return Err(shape("an empty history buffer".into()));
        }
        if groups == 0 || groups > MAX_GROUPS || groups > rows {
            return Err(shape(format!(
                "{groups} workgroups for {rows} rows (at most {MAX_GROUPS})"
            )));
        }
        let entries = (inputs + 1) * outputs + 2;
        let params = Params {
            rows: u32_of(K, "rows", rows)?,
            chunk: u32_of(K, "chunk", rows.div_ceil(groups))?,
            groups: groups as u32,
            offset: 0,
            w_off: u32_of(K, "w_off", w_off)?,
            b_off: u32_of(K, "b_off", b_off)?,
            slot: 0,
            accumulate: 0,
            samples: u32_of(K, "samples", data.samples)?,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
        };
        let workspace = ctx.storage("fused workspace", 4 * groups.max(2) * entries)?;
        let ring = UniformRing::new(
            ctx,
            "fused_linear params",
            std::mem::size_of::<Params>() as u64,
            RING_SLOTS,
        );
        // every block valid from the start: a step recorded at a block never written stays in range
        for slot in 0..RING_SLOTS {
            ring.write(ctx, slot, bytemuck::bytes_of(&params))?;
        }
        let buffers: [&wgpu::Buffer; 10] = [
            &data.data,
            &data.targets,
            index,
            &data.norm,
            theta,
            grads,
            totals,
            history,
            &workspace,
            &ring.buffer,
        ];
        let dispatches = if groups == 1 {
            vec![
                self.kernel(ctx, inputs, outputs, Mode::Single)?
                    .dispatch(ctx, &buffers, (1, 1)),
            ]
        } else {
            vec![
                self.kernel(ctx, inputs, outputs, Mode::Partial)?.dispatch(
                    ctx,
                    &buffers,
                    (groups as u32, 1),
                ),
                self.kernel(ctx, inputs, outputs, Mode::Finish)?
                    .dispatch(ctx, &buffers, (1, 1)),
            ]
        };
        Ok(FusedCall {
            dispatches,
            ring,
            params,
            index_len,
            history_len,
            _workspace: workspace,
        })
    }
}

/// A prepared fused step: one dispatch (G = 1, see [`groups_for`]) or two (the
/// partial sums of G workgroups, then their sum), all reading the same uniform ring block.
pub struct FusedCall {
    dispatches: Vec<Dispatch>,
    ring: UniformRing,
    params: Params,
    index_len: u64,
    history_len: u64,
    _workspace: wgpu::Buffer,
}

impl FusedCall {
    /// Ring block `ring_slot` makes a step over index[offset .. offset + rows] that records its loss
    /// sum in history[history_slot] and adds its gradient into grads when `accumulate` (else
    /// overwrites it); returns the block's dynamic offset, the same for every dispatch of the step.
    /// Lands before the next submit.
    pub fn write_step(
        &mut self,
        ctx: &GpuContext,
        ring_slot: u64,
        offset: u64,
        history_slot: u64,
        accumulate: bool,
    ) -> Result<u32, KernelError> {
        let rows = u64::from(self.params.rows);
        if offset + rows > self.index_len {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!(
                    "rows {offset}..{} past the index buffer ({})",
                    offset + rows,
                    self.index_len
                ),
            });
        }
        if history_slot >= self.history_len {
            return Err(KernelError::Shape {
                kernel: K,
                msg: format!("history slot {history_slot} of {}", self.history_len),
            });
        }
        self.params.offset = u32_of(K, "offset", offset)?;
        self.params.slot = history_slot as u32;
        self.params.accumulate = u32::from(accumulate);
        self.ring
            .write(ctx, ring_slot, bytemuck::bytes_of(&self.params))
    }

    /// Record the step's dispatches in order with the ring block at dynamic offset `offset`.
    pub fn record_at(&self, pass: &mut wgpu::ComputePass<'_>, offset: u32) {
        for d in &self.dispatches {
            d.record_at(pass, offset);
        }
    }

    /// The step's dispatches in order (each reads the ring block that `write_step` returned).
    pub fn dispatches(&self) -> Vec<&Dispatch> {
        self.dispatches.iter().collect()
    }

    /// The dispatches paired with a ring offset, as [`GpuContext::time_dispatches`] takes them.
    pub fn prepared(&self, offset: u32) -> Vec<(&Dispatch, u32)> {
        self.dispatches.iter().map(|d| (d, offset)).collect()
    }

    /// Workgroups of the first dispatch (G).
    pub fn groups(&self) -> u32 {
        self.params.groups
    }
}

/// CPU reference in f64: the gather (f32 features `x` [samples, inputs], x' = (x - shift)·scale),
/// forward, [`loss_row`] and gradient sums over the rows `batch` (the step's slice of the index;
/// sample numbers past the data are clamped to the last sample, as the kernel does).
/// Returns (gradient entries: W [outputs, inputs] row-major then b, loss sum, correct count).
#[allow(clippy::too_many_arguments)]
pub fn fused_ref(
    kind: LossKind,
    x: &[f32],
    targets: &[f32],
    shift: &[f32],
    scale: &[f32],
    batch: &[u32],
    outputs: usize,
    theta: &[f32],
    w_off: usize,
    b_off: usize,
) -> (Vec<f64>, f64, u64) {
    let inputs = shift.len();
    let nw = inputs * outputs;
    let mut grad = vec![0f64; nw + outputs];
    let (mut loss, mut correct) = (0f64, 0u64);
    let mut xr = vec![0f64; inputs];
    let mut z = vec![0f64; outputs];
    let mut dz = vec![0f64; outputs];
    for &s in batch {
        let s = (s as usize).min(targets.len() - 1);
        for (i, v) in xr.iter_mut().enumerate() {
            *v = (f64::from(x[s * inputs + i]) - f64::from(shift[i])) * f64::from(scale[i]);
        }
        for (o, zo) in z.iter_mut().enumerate() {
            *zo = f64::from(theta[b_off + o])
                + (0..inputs)
                    .map(|i| xr[i] * f64::from(theta[w_off + o * inputs + i]))
                    .sum::<f64>();
        }
        let (l, c) = loss_row(kind, &z, f64::from(targets[s]), &mut dz);
        loss += l;
        correct += u64::from(c);
        for (o, &d) in dz.iter().enumerate() {
            for (i, &xi) in xr.iter().enumerate() {
                grad[o * inputs + i] += d * xi;
            }
            grad[nw + o] += d;
        }
    }
    (grad, loss, correct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduce_stats::Totals;
    use crate::testutil::{assert_close, ctx, random};

    fn perm(n: usize, seed: u64) -> Vec<u32> {
        let mut keyed: Vec<(f32, u32)> = random(n, seed).into_iter().zip(0..n as u32).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        keyed.into_iter().map(|(_, i)| i).collect()
    }

    fn rel(got: f64, want: f64) -> f64 {
        (got - want).abs() / want.abs().max(1e-30)
    }

    /// A data set of `n` samples, resident (f32 or u8), with its f32 copy for the reference.
    struct Set {
        data: DeviceData,
        x: Vec<f32>,
        t: Vec<f32>,
        shift: Vec<f32>,
        scale: Vec<f32>,
    }

    fn set(
        ctx: &GpuContext,
        kind: LossKind,
        u8_pixels: bool,
        n: usize,
        f: usize,
        outputs: usize,
    ) -> Set {
        let seed = (n * 31 + f) as u64;
        let t: Vec<f32> = random(n, seed + 1)
            .iter()
            .enumerate()
            .map(|(r, v)| match kind {
                LossKind::SoftmaxXent => ((r * 7 + (v.abs() * 5.0) as usize) % outputs) as f32,
                LossKind::SigmoidBce => f32::from(*v > 0.1),
                LossKind::Mse => v * 2.0 + 0.5,
            })
            .collect();
        if u8_pixels {
            let bytes: Vec<u8> = (0..n * f)
                .map(|i| ((i * 37 + i / 7 + 11) % 256) as u8)
                .collect();
            let shift: Vec<f32> = (0..f).map(|j| 100.0 + j as f32).collect();
            let scale: Vec<f32> = (0..f).map(|j| 1.0 / (60.0 + j as f32)).collect();
            let data = DeviceData::from_u8(ctx, &bytes, &t, &shift, &scale).unwrap();
            let x = bytes.iter().map(|&b| f32::from(b)).collect();
            Set {
                data,
                x,
                t,
                shift,
                scale,
            }
        } else {
            let x: Vec<f32> = random(n * f, seed + 2)
                .iter()
                .map(|v| v * 3.0 + 0.5)
                .collect();
            let shift = random(f, seed + 3);
            let scale: Vec<f32> = random(f, seed + 4).iter().map(|v| 0.5 + v.abs()).collect();
            let data = DeviceData::from_f32(ctx, &x, &t, &shift, &scale).unwrap();
            Set {
                data,
                x,
                t,
                shift,
                scale,
            }
        }
    }

    /// Two steps recorded into one submission: the first overwrites the gradient, the second
    /// (another ring block: another offset and history slot) adds into it.
    fn check(
        ctx: &GpuContext,
        fl: &FusedLinear,
        rows: usize,
        f: usize,
        outputs: usize,
        gap: usize,
    ) {
        let kind = fl.loss;
        let n = rows + 201;
        let s = set(ctx, kind, fl.u8_pixels, n, f, outputs);
        let idx = perm(n, (rows + f) as u64);
        let (off1, off2) = (57usize, 200usize);
        let nw = f * outputs;
        let (w_off, b_off) = (5usize, 5 + nw + gap);
        let len = b_off + outputs + 7;
        let theta: Vec<f32> = random(len, 77 + f as u64).iter().map(|v| v * 0.8).collect();
        let ib = ctx.upload("index", &idx).unwrap();
        let thb = ctx.upload("theta", &theta).unwrap();
        let gb = ctx.upload("grads", &vec![7.0f32; len]).unwrap();
        let tb = ctx.upload("totals", &[0u32; 4]).unwrap();
        let hb = ctx.upload("history", &[-1.0f32; 5]).unwrap();
        let mut call = fl
            .prepare(
                ctx,
                &FusedArgs {
                    data: &s.data,
                    index: &ib,
                    rows: rows as u64,
                    outputs: outputs as u64,
                    theta: &thb,
                    w_off: w_off as u64,
                    b_off: b_off as u64,
                    grads: &gb,
                    totals: &tb,
                    history: &hb,
                },
            )
            .unwrap();
        let groups = groups_for(rows as u64, f as u64, outputs as u64);
        assert_eq!(u64::from(call.groups()), groups);
        assert_eq!(call.dispatches().len(), if groups > 1 { 2 } else { 1 });
        let at1 = call.write_step(ctx, 2, off1 as u64, 1, false).unwrap();
        let at2 = call.write_step(ctx, 5, off2 as u64, 3, true).unwrap();
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            call.record_at(&mut pass, at1);
            call.record_at(&mut pass, at2);
        }
        ctx.queue.submit([enc.finish()]);

        let refs = |off: usize| {
            fused_ref(
                kind,
                &s.x,
                &s.t,
                &s.shift,
                &s.scale,
                &idx[off..off + rows],
                outputs,
                &theta,
                w_off,
                b_off,
            )
        };
        let (g1, l1, c1) = refs(off1);
        let (g2, l2, c2) = refs(off2);
        let what = format!("{kind:?} u8 {} rows {rows} {f}→{outputs}", fl.u8_pixels);
        let g: Vec<f32> = ctx.read(&gb, 0, len).unwrap();
        let want: Vec<f32> = g1.iter().zip(&g2).map(|(a, b)| (a + b) as f32).collect();
        let mut got = g[w_off..w_off + nw].to_vec();
        got.extend_from_slice(&g[b_off..b_off + outputs]);
        assert_close(&got, &want, 1e-5, &format!("{what}: gradient"));
        let outside: Vec<f32> = g[..w_off]
            .iter()
            .chain(&g[w_off + nw..b_off])
            .chain(&g[b_off + outputs..])
            .copied()
            .collect();
        assert!(outside.iter().all(|&v| v == 7.0), "{what}: {outside:?}");

        let tot = Totals::from_words(&ctx.read::<u32>(&tb, 0, 4).unwrap());
        assert_eq!(tot.count, 2 * rows as u64, "{what}: count");
        assert_eq!(tot.correct, c1 + c2, "{what}: correct");
        let r = rel(tot.loss_sum, l1 + l2);
        assert!(
            r <= 1e-5,
            "{what}: loss sum {} want {} ({r:e})",
            tot.loss_sum,
            l1 + l2
        );
        let h: Vec<f32> = ctx.read(&hb, 0, 5).unwrap();
        assert_eq!(
            (h[0], h[2], h[4]),
            (-1.0, -1.0, -1.0),
            "{what}: history {h:?}"
        );
        for (got, want) in [(h[1], l1), (h[3], l2)] {
            let r = rel(f64::from(got), want);
            assert!(r <= 1e-5, "{what}: history {got} want {want} ({r:e})");
        }
    }

    fn check_loss(kind: LossKind, outputs: usize) {
        let ctx = ctx();
        for u8_pixels in [false, true] {
            let fl = FusedLinear::new(&ctx, kind, u8_pixels);
            for f in [2, 4, 13] {
                for rows in [100, 1000, 9000] {
                    check(&ctx, &fl, rows, f, outputs, 0);
                }
            }
        }
    }

    #[test]
    fn fused_softmax_step_matches_the_reference() {
        check_loss(LossKind::SoftmaxXent, 3);
    }

    #[test]
    fn fused_sigmoid_bce_step_matches_the_reference() {
        check_loss(LossKind::SigmoidBce, 1);
    }

    #[test]
    fn fused_squared_error_step_matches_the_reference() {
        check_loss(LossKind::Mse, 1);
    }

    #[test]
    fn fused_largest_shapes_and_a_gap_between_w_and_b() {
        let ctx = ctx();
        // 3 → 16 and 63 → 1: 64 parameters, 66 entries to reduce: one round (chunks of ≤ 32
        // rows), two (≤ 64), three (≤ 128), five (more); b apart from W
        let fl = FusedLinear::new(&ctx, LossKind::SoftmaxXent, false);
        check(&ctx, &fl, 300, 3, 16, 3);
        check(&ctx, &fl, 5000, 3, 16, 0);
        check(&ctx, &fl, 5, 3, 16, 0);
        check(&ctx, &fl, 40, 3, 16, 1);
        let fl = FusedLinear::new(&ctx, LossKind::SigmoidBce, true);
        check(&ctx, &fl, 257, 63, 1, 2);
        check(&ctx, &fl, 4097, 63, 1, 0);
        check(&ctx, &fl, 20, 63, 1, 0);
        check(&ctx, &fl, 100, 63, 1, 0);
        // one row, and one class
        let fl = FusedLinear::new(&ctx, LossKind::SoftmaxXent, false);
        check(&ctx, &fl, 1, 5, 1, 0);
    }

    /// GPU time of the fused step per shape, batch and G (a device check, not run by default).
    #[test]
    #[ignore = "timing: cargo test -p dptrain-kernels fused_step_timings -- --ignored --nocapture"]
    fn fused_step_timings() {
        let ctx = ctx();
        println!("{}", ctx.describe());
        let shapes = [
            (LossKind::SigmoidBce, false, 2, 1),
            (LossKind::SoftmaxXent, false, 4, 3),
            (LossKind::SoftmaxXent, false, 13, 3),
            (LossKind::SoftmaxXent, true, 13, 3),
            (LossKind::SigmoidBce, false, 30, 1),
            (LossKind::SoftmaxXent, false, 3, 16),
            (LossKind::Mse, false, 63, 1),
        ];
        let max_rows = 65536;
        let n = max_rows + 300;
        let idx = perm(n, 5);
        let ib = ctx.upload("index", &idx).unwrap();
        let tb = ctx.upload("totals", &[0u32; 4]).unwrap();
        let hb = ctx.upload("history", &[0.0f32; 16]).unwrap();
        for (kind, u8_pixels, f, outputs) in shapes {
            let s = set(&ctx, kind, u8_pixels, n, f, outputs);
            let fl = FusedLinear::new(&ctx, kind, u8_pixels);
            let theta = random(f * outputs + outputs, 3);
            let thb = ctx.upload("theta", &theta).unwrap();
            let gb = ctx.storage("grads", 4 * theta.len() as u64).unwrap();
            for rows in [32u64, 100, 256, 512, 1024, 2048, 4096, 16384, 65536] {
                let mut gs = vec![groups_for(rows, f as u64, outputs as u64)];
                for per in [4096u64, 2048, 1024, 512, 256, 128] {
                    let g = rows.div_ceil(per).min(MAX_GROUPS);
                    if !gs.contains(&g) {
                        gs.push(g);
                    }
                }
                for g in gs {
                    let mut call = fl
                        .prepare_with_groups(
                            &ctx,
                            &FusedArgs {
                                data: &s.data,
                                index: &ib,
                                rows,
                                outputs: outputs as u64,
                                theta: &thb,
                                w_off: 0,
                                b_off: (f * outputs) as u64,
                                grads: &gb,
                                totals: &tb,
                                history: &hb,
                            },
                            g,
                        )
                        .unwrap();
                    let at = call.write_step(&ctx, 0, 7, 0, false).unwrap();
                    let mut times = Vec::new();
                    for rep in 0..25 {
                        let Some(t) = ctx.time_dispatches(&call.prepared(at)).unwrap() else {
                            println!("no timestamp queries");
                            return;
                        };
                        if rep >= 5 {
                            times.push(t);
                        }
                    }
                    let total = |t: &Vec<f64>| t.iter().sum::<f64>();
                    times.sort_by(|a, b| total(a).total_cmp(&total(b)));
                    let med = &times[times.len() / 2];
                    println!(
                        "{kind:?} u8={u8_pixels} {f}->{outputs} rows {rows:6} G {g:4}: median {:8.2} us (min {:8.2}) per dispatch {:?}",
                        total(med) * 1e6,
                        total(&times[0]) * 1e6,
                        med.iter()
                            .map(|v| (v * 1e7).round() / 10.0)
                            .collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    #[test]
    fn fused_clamps_sample_numbers_past_the_data() {
        let ctx = ctx();
        for u8_pixels in [false, true] {
            let fl = FusedLinear::new(&ctx, LossKind::SoftmaxXent, u8_pixels);
            let (n, f, outputs) = (23, 5, 3);
            let s = set(&ctx, fl.loss, u8_pixels, n, f, outputs);
            // the last sample (5 features: its second group of four starts in the last data word)
            // and numbers past it
            let idx: Vec<u32> = vec![22, 5, 23, 1000, u32::MAX, 0, 21, 22];
            let theta = random(f * outputs + outputs, 9);
            let ib = ctx.upload("index", &idx).unwrap();
            let thb = ctx.upload("theta", &theta).unwrap();
            let gb = ctx.storage("grads", 4 * theta.len() as u64).unwrap();
            let tb = ctx.upload("totals", &[0u32; 4]).unwrap();
            let hb = ctx.upload("history", &[0.0f32; 1]).unwrap();
            let call = fl
                .prepare(
                    &ctx,
                    &FusedArgs {
                        data: &s.data,
                        index: &ib,
                        rows: idx.len() as u64,
                        outputs: outputs as u64,
                        theta: &thb,
                        w_off: 0,
                        b_off: (f * outputs) as u64,
                        grads: &gb,
                        totals: &tb,
                        history: &hb,
                    },
                )
                .unwrap();
            crate::run(&ctx, &call.dispatches());
            let (g, l, c) = fused_ref(
                fl.loss,
                &s.x,
                &s.t,
                &s.shift,
                &s.scale,
                &idx,
                outputs,
                &theta,
                0,
                f * outputs,
            );
            let want: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            assert_close(
                &ctx.read::<f32>(&gb, 0, theta.len()).unwrap(),
                &want,
                1e-5,
                "gradient",
            );
            let tot = Totals::from_words(&ctx.read::<u32>(&tb, 0, 4).unwrap());
            assert_eq!((tot.correct, tot.count), (c, idx.len() as u64));
            assert!(rel(tot.loss_sum, l) <= 1e-5, "{} {l}", tot.loss_sum);
        }
    }

    #[test]
    fn fused_refuses_shapes_it_cannot_take() {
        let ctx = ctx();
        let t = vec![0.0f32; 10];
        let b = ctx.storage("b", 4096).unwrap();
        let args =
            |data: &'_ DeviceData, rows: u64, outputs: u64| -> Result<FusedCall, KernelError> {
                FusedLinear::new(&ctx, LossKind::SoftmaxXent, false).prepare(
                    &ctx,
                    &FusedArgs {
                        data,
                        index: &b,
                        rows,
                        outputs,
                        theta: &b,
                        w_off: 0,
                        b_off: data.features * outputs,
                        grads: &b,
                        totals: &b,
                        history: &b,
                    },
                )
            };
        fn shape_err<T>(r: Result<T, KernelError>, what: &str) {
            match r {
                Err(KernelError::Shape { msg, .. }) => assert!(msg.contains(what), "{msg}"),
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
        let d13 = DeviceData::from_f32(&ctx, &vec![0.0; 130], &t, &[0.0; 13], &[1.0; 13]).unwrap();
        // 14 × 5 = 70 parameters
        shape_err(args(&d13, 4, 5), "70 parameters");
        // 17 outputs
        let d2 = DeviceData::from_f32(&ctx, &[0.0; 20], &t, &[0.0; 2], &[1.0; 2]).unwrap();
        shape_err(args(&d2, 4, 17), "2 → 17");
        // 64 inputs, 1 output: 65 parameters
        let d64 = DeviceData::from_f32(&ctx, &vec![0.0; 640], &t, &[0.0; 64], &[1.0; 64]).unwrap();
        shape_err(args(&d64, 4, 1), "65 parameters");
        // a binary loss with 3 outputs
        let bce = FusedLinear::new(&ctx, LossKind::SigmoidBce, false).prepare(
            &ctx,
            &FusedArgs {
                data: &d2,
                index: &b,
                rows: 4,
                outputs: 3,
                theta: &b,
                w_off: 0,
                b_off: 6,
                grads: &b,
                totals: &b,
                history: &b,
            },
        );
        shape_err(bce, "2 → 3");
        // u8 data to f32 pipelines
        let du8 = DeviceData::from_u8(&ctx, &[0u8; 20], &t, &[0.0; 2], &[1.0; 2]).unwrap();
        shape_err(args(&du8, 4, 3), "data stored as u8");
        // more rows than the index holds
        shape_err(args(&d2, 1025, 3), "1025 rows");
        // θ too short
        let small = ctx.storage("small", 16).unwrap();
        let r = FusedLinear::new(&ctx, LossKind::SoftmaxXent, false).prepare(
            &ctx,
            &FusedArgs {
                data: &d2,
                index: &b,
                rows: 4,
                outputs: 3,
                theta: &small,
                w_off: 0,
                b_off: 6,
                grads: &b,
                totals: &b,
                history: &b,
            },
        );
        shape_err(r, "theta needs 9");
        // W overlapping b
        let r = FusedLinear::new(&ctx, LossKind::SoftmaxXent, false).prepare(
            &ctx,
            &FusedArgs {
                data: &d2,
                index: &b,
                rows: 4,
                outputs: 3,
                theta: &b,
                w_off: 0,
                b_off: 5,
                grads: &b,
                totals: &b,
                history: &b,
            },
        );
        shape_err(r, "overlaps");
        // G beyond the rows
        let fl = FusedLinear::new(&ctx, LossKind::SoftmaxXent, false);
        let a = FusedArgs {
            data: &d2,
            index: &b,
            rows: 4,
            outputs: 3,
            theta: &b,
            w_off: 0,
            b_off: 6,
            grads: &b,
            totals: &b,
            history: &b,
        };
        shape_err(fl.prepare_with_groups(&ctx, &a, 5), "5 workgroups");
        shape_err(fl.prepare_with_groups(&ctx, &a, 0), "0 workgroups");
        // per-step checks: the index's end and the history's length
        let mut call = args(&d2, 4, 3).unwrap();
        assert!(call.write_step(&ctx, 0, 1020, 0, false).is_ok());
        shape_err(call.write_step(&ctx, 0, 1021, 0, false), "past the index");
        shape_err(call.write_step(&ctx, 0, 0, 1024, false), "history slot");
        assert!(call.write_step(&ctx, RING_SLOTS, 0, 0, false).is_err());
        assert!(eligible(LossKind::SoftmaxXent, 13, 3) && eligible(LossKind::SigmoidBce, 30, 1));
        assert!(!eligible(LossKind::Mse, 4, 2));
    }
}
