//! What lives on the device between steps: the datasets (uploaded once, u8 pixels kept as u8, or
//! left on the host when they cannot fit and fed batch by batch), the activations and their
//! gradients for the largest batch, and the parameters and optimizer state, with the host's ways
//! of reading and replacing them. Every write here first submits what is recorded, so recorded
//! work sees the values it was recorded against.

use dptrain_kernels::gather::DeviceData;
use dptrain_kernels::{F32, GpuContext, KernelError};

use super::{GpuBackend, Pass};
use crate::backend::state_in_order;
use crate::data::{Dataset, Features, Normalizer};
use crate::model::{Layer, ModelSpec};

/// Where a dataset lives: on the GPU (gathered there each step), or, when it does not fit the
/// adapter's largest binding even as bytes, on the host, normalised, each batch uploaded as it is
/// needed (slower: one submission per step).
pub(super) enum Resident {
    Device(DeviceData),
    Host {
        x: Vec<f32>,
        y: Vec<f32>,
        features: usize,
    },
}

impl Resident {
    pub fn samples(&self) -> u64 {
        match self {
            Resident::Device(d) => d.samples,
            Resident::Host { y, .. } => y.len() as u64,
        }
    }
}

/// Upload a dataset, compactly when its values are bytes; keep it on the host when it cannot fit.
/// `DPTRAIN_DEVICE_DATA_LIMIT=BYTES` lowers the limit, to exercise the host path in tests.
pub(super) fn upload_data(
    ctx: &GpuContext,
    ds: &Dataset,
    norm: &Normalizer,
) -> anyhow::Result<Resident> {
    let up = |ds: &Dataset| match &ds.x {
        Features::U8(x) => DeviceData::from_u8(ctx, x, &ds.y, &norm.shift, &norm.scale),
        Features::F32(x) => DeviceData::from_f32(ctx, x, &ds.y, &norm.shift, &norm.scale),
    };
    let limit = std::env::var("DPTRAIN_DEVICE_DATA_LIMIT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = |ds: &Dataset| match &ds.x {
        Features::U8(v) => v.len() as u64,
        Features::F32(v) => F32.bytes(v.len() as u64),
    };
    let fits = |ds: &Dataset| limit.is_none_or(|l| bytes(ds) <= l);
    let host = || {
        tracing::warn!(
            "{}: too large for the adapter's largest binding; batches are fed from the host (slower)",
            ds.source
        );
        Resident::Host {
            x: norm.apply_dataset(ds),
            y: ds.y.clone(),
            features: ds.n_features,
        }
    };
    let result = if fits(ds) {
        up(ds)
    } else {
        Err(KernelError::TooLarge {
            what: ds.source.clone(),
            bytes: bytes(ds),
            limit: limit.unwrap_or(0),
        })
    };
    match result {
        Ok(d) => Ok(Resident::Device(d)),
        Err(KernelError::TooLarge { .. }) => {
            let mut compact = ds.clone();
            if compact.compact_to_u8() && fits(&compact) {
                if let Ok(d) = up(&compact) {
                    tracing::info!(
                        "{}: stored as u8 on the GPU to fit its largest binding",
                        ds.source
                    );
                    return Ok(Resident::Device(d));
                }
            }
            Ok(host())
        }
        Err(e) => Err(anyhow::Error::from(e).context(ds.source.clone())),
    }
}

/// Device-side activations for up to `max_rows` rows.
pub(super) struct Activations {
    /// acts[0] is the gathered batch, acts[i + 1] layer i's output (the last: logits).
    pub acts: Vec<wgpu::Buffer>,
    /// Gradient buffers; grad_of[j] picks the one that holds the loss gradient at tensor j (a dense
    /// layer's pre-activation gradient; a dropout's input shares its output's buffer).
    pub dacts: Vec<wgpu::Buffer>,
    pub grad_of: Vec<usize>,
    pub targets: wgpu::Buffer,
    pub stats: wgpu::Buffer,
}

impl Activations {
    /// Buffers for batches of up to `rows` rows through `layers`.
    pub fn new(
        ctx: &GpuContext,
        spec: &ModelSpec,
        layers: &[Layer],
        rows: u64,
    ) -> anyhow::Result<Self> {
        let mut acts = vec![ctx.array("activation 0", F32, rows * spec.inputs as u64)?];
        let mut dacts = vec![ctx.array("unused", F32, 1)?];
        for (i, layer) in layers.iter().enumerate() {
            let w = rows * layer.width() as u64;
            acts.push(ctx.array(&format!("activation {}", i + 1), F32, w)?);
            dacts.push(ctx.array(&format!("activation gradient {}", i + 1), F32, w)?);
        }
        // a dropout's input gradient is its output gradient scaled in place
        let mut grad_of: Vec<usize> = (0..=layers.len()).collect();
        for i in (1..layers.len()).rev() {
            if matches!(layers[i], Layer::Dropout { .. }) {
                grad_of[i] = grad_of[i + 1];
            }
        }
        Ok(Self {
            acts,
            dacts,
            grad_of,
            targets: ctx.array("batch targets", F32, rows)?,
            stats: ctx.array("row stats", F32, 2 * rows)?,
        })
    }
}

impl GpuBackend {
    /// Replace the parameters.
    pub(super) fn write_params(&mut self, theta: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(theta.len() == self.n_params, "parameter count mismatch");
        self.submit()?;
        self.ctx.write(&self.theta, 0, bytemuck::cast_slice(theta));
        Ok(())
    }

    /// The parameters, after every recorded step.
    pub(super) fn read_params(&mut self) -> anyhow::Result<Vec<f32>> {
        self.flush_and_read(|s| &s.theta, self.n_params)
    }

    /// The optimizer's state tensors by name, after every recorded step.
    pub(super) fn read_optim_state(&mut self) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        self.submit()?;
        self.in_flight.clear();
        let mut out = Vec::new();
        for (name, buf) in self.rule.state_names().iter().zip(&self.state) {
            out.push((name.to_string(), self.ctx.read(buf, 0, self.n_params)?));
        }
        Ok(out)
    }

    /// Replace the optimizer's state (every tensor the rule names).
    pub(super) fn write_optim_state(&mut self, state: &[(String, Vec<f32>)]) -> anyhow::Result<()> {
        let ordered = state_in_order(&self.rule, state, self.n_params)?;
        self.submit()?;
        for (buf, v) in self.state.iter().zip(ordered) {
            self.ctx.write(buf, 0, bytemuck::cast_slice(v));
        }
        Ok(())
    }

    /// The epoch's order, on the device (and on the host too for host-fed training data).
    pub(super) fn write_order(&mut self, order: &[u32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            order.len() as u64 <= self.train.samples()
                && order.iter().all(|&i| u64::from(i) < self.train.samples()),
            "sample order indexes past the training set"
        );
        self.submit()?;
        self.ctx.write(&self.order, 0, bytemuck::cast_slice(order));
        if matches!(self.train, Resident::Host { .. }) {
            self.order_host = order.to_vec();
        }
        Ok(())
    }

    /// For host-fed data, upload rows `offset..offset + rows` of the pass's data (through the
    /// epoch's order in training) into the batch buffers; nothing for data on the device.
    pub(super) fn upload_host_batch(
        &mut self,
        pass: Pass,
        offset: usize,
        rows: usize,
    ) -> anyhow::Result<()> {
        let data = match pass {
            Pass::Train | Pass::EvalTrain => &self.train,
            Pass::EvalTest => self
                .test
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no test set"))?,
        };
        let Resident::Host { x, y, features } = data else {
            return Ok(());
        };
        let idx: Vec<usize> = match pass {
            Pass::Train => self.order_host[offset..offset + rows]
                .iter()
                .map(|&i| i as usize)
                .collect(),
            _ => (offset..offset + rows).collect(),
        };
        let mut bx = Vec::with_capacity(rows * features);
        for &i in &idx {
            bx.extend_from_slice(&x[i * features..(i + 1) * features]);
        }
        let bt: Vec<f32> = idx.iter().map(|&i| y[i]).collect();
        // the recorded steps still read the batch buffers, so they go first
        self.submit()?;
        self.ctx
            .write(&self.act.acts[0], 0, bytemuck::cast_slice(&bx));
        self.ctx
            .write(&self.act.targets, 0, bytemuck::cast_slice(&bt));
        Ok(())
    }
}
