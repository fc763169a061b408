//! Choosing the kernels of a run: `--autotune on|off|cached|auto`, the cache of tuned choices per
//! adapter and driver (`$XDG_CACHE_HOME/dptrain/autotune.json`), and the agreement between ranks:
//! rank 0 tunes (or reads its cache) and every rank runs rank 0's choices.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, KernelChoices};
use crate::distributed::comm::Communicator;

/// When to tune the kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutotuneMode {
    /// `cached` on a hardware GPU, `off` on a software adapter (lavapipe) or the CPU.
    #[default]
    Auto,
    /// Tune every product of the model, and update the cache.
    On,
    /// The default kernels, no tuning.
    Off,
    /// Tune only the products the cache lacks for this adapter and driver.
    Cached,
}

/// Where tuned choices are kept: `$XDG_CACHE_HOME/dptrain/autotune.json`, else
/// `$HOME/.cache/dptrain/autotune.json`; `DPTRAIN_AUTOTUNE_CACHE` names another file.
pub fn cache_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DPTRAIN_AUTOTUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("dptrain").join("autotune.json"))
}

type Cache = std::collections::BTreeMap<String, KernelChoices>;

fn read_cache(path: &std::path::Path) -> Cache {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_cache(path: &std::path::Path, cache: &Cache) {
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::to_vec_pretty(cache).map_err(|e| e.to_string()))
        .and_then(|b| crate::store::atomic::write_atomic(path, &b).map_err(|e| e.to_string()));
    if let Err(e) = result {
        tracing::warn!("{}: cannot write the autotune cache: {e}", path.display());
    }
}

/// What tuning did on rank 0, for logs and benchmarks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TuneReport {
    /// The kernel each product runs.
    pub choices: KernelChoices,
    /// Products tuned in this run (the others came from the cache or the defaults).
    pub tuned: usize,
    pub seconds: f64,
    /// Every candidate of every product tuned here: product, choice, ms or why it was rejected.
    pub trials: Vec<(String, String, Result<f64, String>)>,
}

/// Decide the kernels: rank 0 tunes as `mode` says, every rank takes rank 0's choices, and the
/// backend runs them. Errors reach every rank.
pub fn choose_kernels(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    mode: AutotuneMode,
) -> anyhow::Result<TuneReport> {
    let report = if comm.is_root() {
        tune_here(backend, mode)
    } else {
        Ok(TuneReport::default())
    };
    let report = crate::distributed::agree::agree(comm, report)?;
    let mine = serde_json::to_vec(&report.choices)?;
    let all = comm.all_gather_bytes(&mine)?;
    let choices: KernelChoices = serde_json::from_slice(&all[0])?;
    backend.set_kernel_choices(&choices)?;
    Ok(TuneReport { choices, ..report })
}

fn tune_here(backend: &mut dyn Backend, mode: AutotuneMode) -> anyhow::Result<TuneReport> {
    let Some(key) = backend.tuning_key() else {
        return Ok(TuneReport::default());
    };
    let mode = match mode {
        AutotuneMode::Auto if backend.is_hardware() => AutotuneMode::Cached,
        AutotuneMode::Auto => AutotuneMode::Off,
        m => m,
    };
    if mode == AutotuneMode::Off {
        return Ok(TuneReport::default());
    }
    let path = cache_path();
    let mut cache = path.as_deref().map(read_cache).unwrap_or_default();
    let known = match mode {
        AutotuneMode::Cached => cache.get(&key).cloned().unwrap_or_default(),
        _ => KernelChoices::new(),
    };
    let t0 = Instant::now();
    let tuned = backend.autotune(&known)?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut report = TuneReport {
        choices: known,
        tuned: tuned.len(),
        seconds,
        trials: Vec::new(),
    };
    for t in &tuned {
        let product = t.product.name();
        report.choices.insert(product.clone(), t.best.name());
        for trial in &t.trials {
            report.trials.push((
                product.clone(),
                trial.choice.name(),
                trial.result.as_ref().map(|s| s * 1e3).map_err(Clone::clone),
            ));
        }
    }
    for (product, choice) in &report.choices {
        tracing::info!("autotune: {product}: {choice}");
    }
    tracing::info!(
        "autotune: {} products tuned in {seconds:.2} s, {} from the cache",
        report.tuned,
        report.choices.len() - report.tuned
    );
    if let Some(path) = &path
        && report.tuned > 0
    {
        // only the products of this model change; other models' entries stay
        cache.entry(key).or_default().extend(report.choices.clone());
        write_cache(path, &cache);
    }
    Ok(report)
}
