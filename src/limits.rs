//! The limits that the data readers and both backends check before they allocate, each failing with
//! one line that names the value and the limit. The GPU refuses what exceeds its buffers on its own;
//! these make the CPU backend (and everything before either backend) refuse the same inputs at once.

use std::time::Duration;

use anyhow::{bail, ensure};

/// Features per sample: a 1024 × 1024 image. (The normaliser of a model file holds two numbers per
/// feature in its JSON header, which safetensors caps at 100 MB.)
pub const MAX_FEATURES: usize = 1 << 20;

/// Classes: far above any label set dptrain is for, and low enough that a stray label cannot make
/// the output layer absurd.
pub const MAX_CLASSES: usize = 1 << 16;

/// A layer's width.
pub const MAX_WIDTH: usize = 1 << 20;

/// Parameters: a GPU buffer is indexed by u32 words, and so is every WGSL kernel.
pub const MAX_PARAMS: u64 = u32::MAX as u64;

/// Samples × features of one dataset in memory (as f32: 16 GiB).
pub const MAX_ELEMENTS: u64 = 1 << 32;

/// Memory this machine can give a run: MemAvailable from /proc/meminfo, else 64 GiB.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(64 << 30, |kb| kb * 1024)
}

/// Classes = largest label + 1, checked against the training samples and MAX_CLASSES before
/// anything is sized by it: one stray label such as 16777215 must not make a 16-million-way layer.
pub fn check_classes(
    source: &str,
    max_label: u32,
    sample: usize,
    rows: usize,
) -> anyhow::Result<()> {
    let classes = max_label as usize + 1;
    if classes > MAX_CLASSES || classes > rows.max(2) {
        bail!(
            "{source}: sample {sample}: label {max_label} would make {classes} classes, more than {} (labels must run 0..K-1 with K at most the number of samples and at most {MAX_CLASSES})",
            if classes > MAX_CLASSES {
                format!("the limit of {MAX_CLASSES}")
            } else {
                format!("the {rows} training samples")
            }
        );
    }
    Ok(())
}

/// A dataset of `samples` × `features` may be built in memory.
pub fn check_dataset(source: &str, samples: u64, features: u64) -> anyhow::Result<()> {
    ensure!(
        features as usize <= MAX_FEATURES,
        "{source}: {features} features per sample, more than the {MAX_FEATURES} dptrain takes"
    );
    let elements = samples.saturating_mul(features);
    ensure!(
        elements <= MAX_ELEMENTS && elements.saturating_mul(4) <= available_memory(),
        "{source}: {samples} samples × {features} features ({} GiB as f32) do not fit in this machine's memory",
        elements.saturating_mul(4) >> 30
    );
    Ok(())
}

/// A network of `params` values (parameters and buffers) whose layers' outputs hold `activations`
/// values per sample, trained in batches of `rows` with `state` optimizer tensors: as
/// [`check_model`] for the dense models.
pub fn check_network(
    params: usize,
    activations: usize,
    rows: usize,
    state: usize,
) -> anyhow::Result<()> {
    let params = params as u64;
    ensure!(
        params <= MAX_PARAMS,
        "the model has {params} parameters, more than the {MAX_PARAMS} a GPU buffer can index"
    );
    // parameters, gradients, micro-batch gradients and optimizer state, plus every layer's output
    // and its gradient for a batch, in f32
    let bytes = 4u64.saturating_mul(
        params.saturating_mul(3 + state as u64).saturating_add(
            2u64.saturating_mul(activations as u64)
                .saturating_mul(rows as u64),
        ),
    );
    let have = available_memory();
    ensure!(
        bytes <= have,
        "the model ({params} parameters) at batch {rows} needs about {} GiB, more than this machine's {} GiB available",
        bytes >> 30,
        have >> 30
    );
    Ok(())
}

/// A model of these widths, trained in batches of `rows` with `state` optimizer tensors, fits the
/// indexing of every kernel and this machine's memory (the CPU backend holds all of it on the host;
/// the GPU backend's copies on the host are the parameters, read back for checkpoints).
pub fn check_model(widths: &[usize], rows: usize, state: usize) -> anyhow::Result<()> {
    if let Some(&w) = widths.iter().find(|&&w| w > MAX_WIDTH) {
        bail!("a layer of width {w} is wider than the {MAX_WIDTH} dptrain takes");
    }
    let params: u64 = widths
        .windows(2)
        .map(|w| (w[0] as u64) * (w[1] as u64) + w[1] as u64)
        .sum();
    ensure!(
        params <= MAX_PARAMS,
        "the model has {params} parameters, more than the {MAX_PARAMS} a GPU buffer can index"
    );
    // parameters, gradients, micro-batch gradients and optimizer state, plus each layer's output
    // and its gradient for a batch, in f32
    let activations: u64 = widths.iter().map(|&w| 2 * w as u64 * rows as u64).sum();
    let bytes = 4 * (params * (3 + state as u64) + activations);
    let have = available_memory();
    ensure!(
        bytes <= have,
        "the model ({params} parameters) at batch {rows} needs about {} GiB, more than this machine's {} GiB available",
        bytes >> 30,
        have >> 30
    );
    Ok(())
}

/// The run's length in steps, refusing an epoch count whose steps overflow.
pub fn total_steps(epochs: u64, steps_per_epoch: u64) -> anyhow::Result<u64> {
    epochs.checked_mul(steps_per_epoch).ok_or_else(|| {
        anyhow::anyhow!(
            "--epochs {epochs} × {steps_per_epoch} steps per epoch overflows the step counter"
        )
    })
}

/// A learning rate (or any value the kernels take in f32) must stay positive and finite there.
pub fn check_f32_positive(flag: &str, v: f64) -> anyhow::Result<()> {
    let f = v as f32;
    ensure!(
        !v.is_nan() && v > 0.0,
        "{flag} must be a positive number (got {v})"
    );
    ensure!(
        v.is_finite() && f.is_finite() && f > 0.0,
        "{flag} must be a positive number that f32 can hold (got {v:e}; the kernels compute in f32, where it {})",
        if f == 0.0 { "is 0" } else { "is not finite" }
    );
    Ok(())
}

/// `--collective-timeout SECS` as a Duration (0: none).
pub fn collective_timeout(secs: f64) -> anyhow::Result<Option<Duration>> {
    if secs == 0.0 {
        return Ok(None);
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= Duration::from_secs(365 * 86400) => Ok(Some(d)),
        _ => bail!("--collective-timeout must be between 0 and one year of seconds (got {secs:e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stray_label_is_refused_before_it_sizes_anything() {
        assert!(check_classes("d", 2, 5, 150).is_ok());
        let e = check_classes("d", 16_777_215, 17, 150)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("label 16777215 would make 16777216 classes, more than the limit"),
            "{e}"
        );
        let e = check_classes("d", 200, 3, 150).unwrap_err().to_string();
        assert!(e.contains("more than the 150 training samples"), "{e}");
    }

    #[test]
    fn models_and_steps_beyond_the_limits_are_refused() {
        assert!(check_model(&[784, 256, 10], 128, 1).is_ok());
        let e = check_model(&[784, 100_000_000, 10], 64, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("wider than"), "{e}");
        let e = check_model(&[1 << 20, 1 << 20, 10], 64, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameters, more than"), "{e}");
        assert!(total_steps(u64::MAX / 2, 3).is_err());
        assert_eq!(total_steps(5, 7).unwrap(), 35);
        assert!(check_f32_positive("--lr", 1e-50).is_err());
        assert!(check_f32_positive("--lr", 1e39).is_err());
        assert!(check_f32_positive("--lr", 1e-3).is_ok());
        assert!(collective_timeout(1e300).is_err());
        assert!(collective_timeout(1e20).is_err());
        assert_eq!(collective_timeout(0.0).unwrap(), None);
        assert!(collective_timeout(5.0).unwrap().is_some());
    }
}
