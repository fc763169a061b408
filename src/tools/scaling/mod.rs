//! `bench scaling`: the alpha-beta model of `model.rs` fed with measured figures.

pub mod model;

use anyhow::{Context, ensure};
use serde::Serialize;

use std::path::PathBuf;

use clap::Args;

use crate::distributed::comm::Communicator;
use crate::tools::bench::{CommRow, Workload};

#[derive(Args, Debug)]
pub struct ScalingBenchArgs {
    /// Workloads to model (default: seed-logreg, mnist-mlp, wide-mlp).
    #[arg(long, value_delimiter = ',')]
    pub workload: Vec<String>,
    /// A `bench comm --json` file to fit the allreduce's latency and bandwidth to (default: the
    /// H200 machine's shared-memory figures of WORKLOADS.md).
    #[arg(long)]
    pub comm_json: Option<PathBuf>,
    /// Fit only rows of at most this many bytes (the trainer's buckets are 4 MiB; at 8 ranks
    /// Open MPI's default algorithm already slows at 16 MiB).
    #[arg(long, default_value_t = 8 << 20)]
    pub fit_max_bytes: u64,
    /// One rank's step time without exchange, WORKLOAD=MS (repeatable; default: the H200 figures).
    #[arg(long = "step-ms", value_parser = parse_step_ms)]
    pub step_ms: Vec<(String, f64)>,
    /// Ranks per node; collectives over more ranks also cross the network.
    #[arg(long, default_value_t = 8)]
    pub ranks_per_node: usize,
    /// Network bandwidth per node, GB/s (25: InfiniBand HDR; 12.5: 100 GbE); an assumption.
    #[arg(long, default_value_t = 25.0)]
    pub inter_gbs: f64,
    /// Network latency per message step, µs; an assumption.
    #[arg(long, default_value_t = 5.0)]
    pub inter_alpha_us: f64,
    /// Allreduce algorithm of the printed tables: ring or tree (the JSON holds both).
    #[arg(long, value_enum, default_value = "ring")]
    pub algo: model::Algo,
    /// Gradient bucket size in bytes (0: one allreduce for all gradients).
    #[arg(long, default_value_t = 4 << 20)]
    pub bucket_bytes: u64,
    /// PowerSGD rank.
    #[arg(long, default_value_t = 4)]
    pub powersgd_rank: usize,
    /// Local SGD: average the parameters every H steps.
    #[arg(long, default_value_t = 8)]
    pub sync_every: u64,
    /// Share of one rank's step the exchange can overlap (the backward pass, about 2/3).
    #[arg(long, default_value_t = 2.0 / 3.0)]
    pub overlap_share: f64,
    /// Largest rank count (2, 4, 8, ... up to this).
    #[arg(long, default_value_t = 512)]
    pub max_ranks: usize,
    /// Also write the predictions as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One rank's measured step time (no exchange) of each reference workload at its reference batch
/// (`Workload::reference_batch`), on one NVIDIA H200, fp32, with where it was measured:
/// (workload, ms, source).
pub const MEASURED_STEP_MS: [(&str, f64, &str); 3] = [
    (
        "seed-logreg",
        0.019,
        "dptrain on one H200, fp32, fused step: docs/PERF.md, H200 run 2",
    ),
    (
        "mnist-mlp",
        0.645,
        "dptrain on one H200, fp32: docs/PERF.md, H200 run 2",
    ),
    (
        "wide-mlp",
        56.9,
        "dptrain on one H200, fp32: docs/PERF.md, H200 run 1",
    ),
];

/// Host-side MPI allreduce of f32 on the H200 machine (Open MPI 4.1.6, one node, shared memory,
/// defaults, median): (ranks, bytes, ms), from ../shared/design/WORKLOADS.md. The 150.6 MB rows
/// lie beyond Open MPI's 16 MiB algorithm switch and are left out of the default fit (8 MiB).
pub const MEASURED_SHM_ALLREDUCE: [(usize, u64, f64); 12] = [
    (2, 12, 0.001),
    (2, 1 << 20, 0.27),
    (2, 7_454_772, 2.59),
    (2, 150_600_000, 158.0),
    (4, 12, 0.003),
    (4, 1 << 20, 0.46),
    (4, 7_454_772, 3.96),
    (4, 150_600_000, 207.0),
    (8, 12, 0.004),
    (8, 1 << 20, 0.86),
    (8, 7_454_772, 7.70),
    (8, 150_600_000, 300.0),
];

const MEASURED_SHM_SOURCE: &str = "../shared/design/WORKLOADS.md (H200 machine, Open MPI 4.1.6, shared memory, 2/4/8 ranks, medians)";

/// Ranks of a `bench comm` row: its own field, or, in files of older builds, from busbw / algbw
/// = 2(p−1)/p.
fn row_ranks(r: &CommRow) -> usize {
    if r.ranks > 0 {
        return r.ranks as usize;
    }
    let q = if r.algbw_gbs > 0.0 {
        r.busbw_gbs / r.algbw_gbs
    } else {
        0.0
    };
    if q > 0.0 && q < 2.0 {
        (2.0 / (2.0 - q)).round() as usize
    } else {
        1
    }
}

/// `WORKLOAD=MS` of `bench scaling --step-ms`.
pub fn parse_step_ms(s: &str) -> Result<(String, f64), String> {
    let (w, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("expected WORKLOAD=MS, e.g. mnist-mlp=0.645 (got {s:?})"))?;
    let ms: f64 = ms
        .trim()
        .parse()
        .map_err(|_| format!("{ms:?} is not a number of milliseconds"))?;
    if !(ms.is_finite() && ms > 0.0) {
        return Err(format!("the step time must be above 0 ms (got {ms})"));
    }
    Ok((w.trim().to_string(), ms))
}

/// One workload's part of `bench scaling --json`.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingWorkload {
    pub workload: String,
    pub batch: Option<usize>,
    pub parameters: usize,
    pub f32_bytes: u64,
    pub compute_ms: f64,
    pub compute_source: String,
    pub powersgd_factor: f64,
    /// Every rank count × exchange × overlap × algorithm.
    pub predictions: Vec<model::Prediction>,
}

/// What `bench scaling --json` writes.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingReport {
    /// Always "prediction": nothing here was measured except the inputs.
    pub kind: &'static str,
    pub network: model::Network,
    pub fit_rows: usize,
    pub fit_source: String,
    /// The fitted ring time of each fitted row beside its measurement: (ranks, bytes, measured ms, fitted ms).
    pub fit_check: Vec<(usize, f64, f64, f64)>,
    pub bucket_bytes: u64,
    pub overlap_share: f64,
    pub workloads: Vec<ScalingWorkload>,
}

/// `dptrain bench scaling`: predicted step time and efficiency for 2 … max ranks, per workload and
/// way of exchanging; printed on rank 0 (no collective runs).
pub fn scaling_command(a: &ScalingBenchArgs, comm: &dyn Communicator) -> anyhow::Result<()> {
    use model::{self as scaling, Algo, Link, Network, Sample, Scenario, Settings};
    ensure!(
        a.inter_gbs.is_finite() && a.inter_gbs > 0.0,
        "--inter-gbs must be above 0"
    );
    ensure!(
        a.inter_alpha_us.is_finite() && a.inter_alpha_us >= 0.0,
        "--inter-alpha-us must be 0 or more"
    );
    ensure!(
        (0.0..=1.0).contains(&a.overlap_share),
        "--overlap-share must be in [0, 1]"
    );
    ensure!(
        a.powersgd_rank >= 1 && a.sync_every >= 1 && a.ranks_per_node >= 1,
        "--powersgd-rank, --sync-every and --ranks-per-node must be at least 1"
    );
    ensure!(a.max_ranks >= 2, "--max-ranks must be at least 2");
    if !comm.is_root() {
        return Ok(());
    }
    // the intra-node link: fitted to bench comm rows
    let (samples, source): (Vec<Sample>, String) = match &a.comm_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let rows: Vec<CommRow> = serde_json::from_str(&text).with_context(|| {
                format!("{}: not the JSON of `bench comm --json`", path.display())
            })?;
            (
                rows.iter()
                    .map(|r| Sample {
                        ranks: row_ranks(r),
                        bytes: r.bytes as f64,
                        seconds: r.time_us / 1e6,
                    })
                    .collect(),
                path.display().to_string(),
            )
        }
        None => (
            MEASURED_SHM_ALLREDUCE
                .iter()
                .map(|&(ranks, bytes, ms)| Sample {
                    ranks,
                    bytes: bytes as f64,
                    seconds: ms / 1e3,
                })
                .collect(),
            MEASURED_SHM_SOURCE.to_string(),
        ),
    };
    let used: Vec<Sample> = samples
        .into_iter()
        .filter(|s| s.bytes <= a.fit_max_bytes as f64 && s.ranks >= 2)
        .collect();
    let intra = scaling::fit_ring_by_ranks(&used).with_context(|| format!("fitting {source}"))?;
    let fitted = |s: &Sample| {
        let link = intra.iter().find(|f| f.0 == s.ranks).map(|f| f.1);
        link.map(|l| scaling::allreduce_s(Algo::Ring, s.ranks, s.bytes, l))
    };
    // how well one α and one β per rank count describe the rows: the worst relative miss
    let worst = used
        .iter()
        .filter_map(|s| fitted(s).map(|m| (s, m, m / s.seconds - 1.0)))
        .max_by(|a, b| a.2.abs().total_cmp(&b.2.abs()));
    let network = Network {
        intra: intra.clone(),
        inter: Link {
            alpha_s: a.inter_alpha_us * 1e-6,
            beta_bytes_per_s: a.inter_gbs * 1e9,
        },
        ranks_per_node: a.ranks_per_node,
    };
    let fits = intra
        .iter()
        .map(|(p, l)| {
            format!(
                "{p} ranks: alpha {:.2} us, beta {:.2} GB/s",
                l.alpha_s * 1e6,
                l.beta_bytes_per_s / 1e9
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let bucket = (a.bucket_bytes > 0).then_some(a.bucket_bytes as f64);
    let ranks = scaling::rank_counts(a.max_ranks);
    let modes = scaling::table_modes(a.powersgd_rank, a.sync_every);
    let names: Vec<String> = if a.workload.is_empty() {
        // the model counts dense layers' bytes; the networks are not in it yet
        Workload::reference_names()
            .filter(|n| Workload::named(n).is_ok_and(|w| w.image.is_none()))
            .map(str::to_string)
            .collect()
    } else {
        a.workload.clone()
    };
    for (w, _) in &a.step_ms {
        ensure!(
            names.contains(w),
            "--step-ms names {w:?}, which is not among the workloads ({})",
            names.join(", ")
        );
    }
    let beyond = network.link(a.ranks_per_node + 1);
    let mut out = format!(
        "# bench scaling: PREDICTIONS of the model in src/tools/scaling/model.rs (docs/SCALING.md), not measurements\n\
         # allreduce within a node, fitted (ring model, 1/t^2 weights) to {} rows <= {} B of {}:\n\
         #   {fits}; {}\n\
         # {}\n\
         # across nodes (p > {}): alpha {:.2} us, beta {:.2} GB/s assumed (--inter-alpha-us, --inter-gbs); a flat collective runs at its slowest link: alpha {:.2} us, beta {:.2} GB/s\n\
         # {:?} allreduce, buckets of {} B, overlap hides the exchange behind up to {:.1}% of the step (the backward pass), PowerSGD rank {}, local SGD every {} steps\n\
         # each cell: predicted step time and efficiency (one rank's step / predicted step; weak scaling, per-rank batch fixed)\n",
        used.len(),
        a.fit_max_bytes,
        source,
        if a.ranks_per_node >= 2 {
            format!(
                "p ranks take the slowest fit of at most min(p, {}) ranks",
                a.ranks_per_node
            )
        } else {
            "unused: one rank per node".to_string()
        },
        worst.map_or_else(String::new, |(s, model, rel)| format!(
            "the fit's worst row: {} ranks, {} B: measured {:.4} ms, fitted {:.4} ms ({:+.0}%)",
            s.ranks,
            s.bytes,
            s.seconds * 1e3,
            model * 1e3,
            rel * 100.0
        )),
        a.ranks_per_node,
        a.inter_alpha_us,
        a.inter_gbs,
        beyond.alpha_s * 1e6,
        beyond.beta_bytes_per_s / 1e9,
        a.algo,
        a.bucket_bytes,
        a.overlap_share * 100.0,
        a.powersgd_rank,
        a.sync_every
    );
    let mut report = ScalingReport {
        kind: "prediction",
        network: network.clone(),
        fit_rows: used.len(),
        fit_check: used
            .iter()
            .filter_map(|s| fitted(s).map(|m| (s.ranks, s.bytes, s.seconds * 1e3, m * 1e3)))
            .collect(),
        fit_source: source,
        bucket_bytes: a.bucket_bytes,
        overlap_share: a.overlap_share,
        workloads: Vec::new(),
    };
    for name in &names {
        let w = Workload::named(name)?;
        anyhow::ensure!(
            w.image.is_none(),
            "bench scaling models the dense workloads (seed-logreg, mnist-mlp, wide-mlp); {name} is a convolutional network"
        );
        let spec = crate::model::ModelSpec::new(
            w.model,
            w.features,
            w.classes,
            w.hidden.clone(),
            crate::model::Activation::Relu,
        )?;
        let measured = MEASURED_STEP_MS.iter().find(|m| m.0 == name);
        let (batch, ms, from) = match a.step_ms.iter().rev().find(|(n, _)| n == name) {
            Some((_, ms)) => (None, *ms, "--step-ms".to_string()),
            None => {
                let m = measured.with_context(|| {
                    format!("no measured step time for {name}: give --step-ms {name}=MS")
                })?;
                (Workload::reference_batch(name), m.1, m.2.to_string())
            }
        };
        let shape = scaling::ModelShape::from_linears(name, &spec.linears(), 3);
        let sc = Scenario {
            shape,
            compute_s: ms / 1e3,
            overlap_share: a.overlap_share,
        };
        let settings = Settings {
            network: network.clone(),
            algo: a.algo,
            bucket_bytes: bucket,
        };
        let f32_bytes = 4 * sc.shape.elements() as u64;
        let factor = sc.shape.powersgd_factor(a.powersgd_rank);
        out += &format!(
            "\n# {name}: {} parameters, {f32_bytes} B per f32 exchange (PowerSGD rank {}: {factor:.1}x fewer), one rank's step {ms} ms{} ({from})\n",
            spec.layout().total,
            a.powersgd_rank,
            batch.map_or_else(String::new, |b| format!(" at batch {b}")),
        );
        out += &scaling::table(&sc, &settings, &ranks, &modes);
        let mut predictions = Vec::new();
        for algo in [Algo::Ring, Algo::Tree] {
            let s = Settings {
                algo,
                ..settings.clone()
            };
            for &p in &ranks {
                for &(e, o) in &modes {
                    predictions.push(scaling::predict(&sc, &s, p, e, o));
                }
            }
        }
        report.workloads.push(ScalingWorkload {
            workload: name.clone(),
            batch,
            parameters: spec.layout().total,
            f32_bytes,
            compute_ms: ms,
            compute_source: from,
            powersgd_factor: factor,
            predictions,
        });
    }
    print!("{out}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("{}: cannot write", p.display()))?;
    }
    Ok(())
}
