//! A scaling model of data-parallel training on paper: the α–β cost of an allreduce (ring or tree),
//! fitted to `bench comm` rows, and the step time and efficiency it predicts for p ranks with each
//! way of exchanging (f32 or bf16 on the wire, PowerSGD, local SGD, and the two asynchronous modes:
//! one-step-stale gradients and overlapped local SGD), with or without overlapping the exchange
//! with the backward pass. Pure arithmetic: `dptrain bench scaling` feeds it the
//! measured figures and prints its predictions (docs/SCALING.md).
//!
//! Every number this module returns is a prediction. The only measurements are its inputs.

use serde::Serialize;

/// One link in the α–β (Hockney) model: a message of n bytes costs α + n/β.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Link {
    /// Latency per message step (s).
    pub alpha_s: f64,
    /// Bandwidth (bytes/s). For a ring this is the bus bandwidth `bench comm` reports at large sizes.
    pub beta_bytes_per_s: f64,
}

/// The allreduce algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Reduce-scatter then all-gather around a ring: 2(p−1) steps of n/p bytes each.
    Ring,
    /// Binary tree: reduce to the root in ⌈log₂ p⌉ levels, then broadcast back, each level carrying
    /// the whole message (no pipelining).
    Tree,
}

/// Seconds for one allreduce of `bytes` bytes over `p` ranks.
///
/// - ring: 2(p−1)·α + 2(p−1)/p · n/β (bandwidth-optimal, latency linear in p);
/// - tree: 2·⌈log₂ p⌉·α + 2·⌈log₂ p⌉ · n/β (latency logarithmic in p, but every level moves all
///   n bytes). This is the unpipelined reduce + broadcast, the upper bound of the tree family;
///   recursive doubling would take half of it (⌈log₂ p⌉ exchanges of n bytes), a pipelined tree
///   approaches the ring's bandwidth term. The unpipelined form is what a small-message tuned MPI
///   algorithm does, and the pessimistic choice for large messages.
///
/// One rank (or nothing to send) costs nothing.
pub fn allreduce_s(algo: Algo, p: usize, bytes: f64, link: Link) -> f64 {
    if p <= 1 || bytes <= 0.0 {
        return 0.0;
    }
    let pf = p as f64;
    match algo {
        Algo::Ring => {
            2.0 * (pf - 1.0) * link.alpha_s + 2.0 * (pf - 1.0) / pf * bytes / link.beta_bytes_per_s
        }
        Algo::Tree => {
            let levels = pf.log2().ceil();
            2.0 * levels * (link.alpha_s + bytes / link.beta_bytes_per_s)
        }
    }
}

/// `bytes` sent as ⌈bytes / bucket⌉ equal allreduces (`bucket` None or 0: one message).
pub fn bucketed_allreduce_s(
    algo: Algo,
    p: usize,
    bytes: f64,
    bucket: Option<f64>,
    link: Link,
) -> f64 {
    let k = match bucket {
        Some(b) if b > 0.0 && bytes > 0.0 => (bytes / b).ceil().max(1.0),
        _ => 1.0,
    };
    k * allreduce_s(algo, p, bytes / k, link)
}

/// Where ranks sit: up to `ranks_per_node` share a node's links, measured for some rank counts
/// (`intra`: the allreduce's fit at each measured count); beyond that the collective also crosses
/// the network (`inter`). A flat ring (or tree) runs at its slowest link.
///
/// Shared memory slows as more ranks copy through it at once (on the H200 machine the bus
/// bandwidth of 7.45 MB fell from 2.9 GB/s at 2 ranks to 1.7 at 8), so p ranks take the slowest of
/// the fits measured at up to min(p, ranks_per_node) ranks (the largest α, the smallest β; the
/// smallest measured count when p is below all of them): never faster for more ranks, and no
/// extrapolation beyond the largest count measured. No hierarchical (node-aware) algorithm is
/// modelled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    /// (ranks, link) of each measured rank count, ascending.
    pub intra: Vec<(usize, Link)>,
    pub inter: Link,
    pub ranks_per_node: usize,
}

impl Network {
    /// One intra-node link for every rank count.
    pub fn uniform(intra: Link, inter: Link, ranks_per_node: usize) -> Self {
        Self {
            intra: vec![(1, intra)],
            inter,
            ranks_per_node,
        }
    }

    /// The link a flat collective over p ranks runs at. With one rank per node there is no
    /// intra-node hop: the network alone.
    pub fn link(&self, p: usize) -> Link {
        let q = p.min(self.ranks_per_node.max(1));
        let smallest = self.intra.iter().map(|f| f.0).min().unwrap_or(1);
        let mut link = Link {
            alpha_s: 0.0,
            beta_bytes_per_s: f64::INFINITY,
        };
        let shared = self.ranks_per_node >= 2;
        for &(_, l) in self
            .intra
            .iter()
            .filter(|f| shared && f.0 <= q.max(smallest))
        {
            link.alpha_s = link.alpha_s.max(l.alpha_s);
            link.beta_bytes_per_s = link.beta_bytes_per_s.min(l.beta_bytes_per_s);
        }
        if p > self.ranks_per_node.max(1) {
            link.alpha_s = link.alpha_s.max(self.inter.alpha_s);
            link.beta_bytes_per_s = link.beta_bytes_per_s.min(self.inter.beta_bytes_per_s);
        }
        link
    }
}

/// How the ranks exchange each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Exchange {
    /// The f32 gradients, every step (what the trainer does today).
    F32,
    /// The gradients rounded to bf16 on the wire: n/2 bytes.
    Bf16,
    /// PowerSGD of rank `rank`: each m×n weight matrix as P (m×r) and Q (n×r), two allreduces per
    /// step; matrices where r(m+n) ≥ m·n, and every bias, go uncompressed with P.
    PowerSgd { rank: usize },
    /// Local SGD: the f32 parameters averaged every `every` steps (the cost per step is 1/every of
    /// one allreduce); never overlapped, it follows the update.
    LocalSgd { every: u64 },
    /// One-step-stale gradients (`--staleness 1`): the f32 exchange of step t travels while step
    /// t+1 computes, and step t+1 applies it. The whole step hides it: step = max(compute,
    /// exchange). The `overlap` flag is ignored (the mode is its own overlap).
    StaleF32,
    /// Overlapped local SGD (`--sync params --sync-every every --async-average`, Wang et al. 2020):
    /// each round's f32 parameter average travels while the next `every` local steps run, so a
    /// round costs max(every·compute, exchange): step = max(compute, exchange / every). The
    /// `overlap` flag is ignored.
    LocalSgdAsync { every: u64 },
}

impl Exchange {
    pub fn label(&self) -> String {
        match self {
            Exchange::F32 => "f32".into(),
            Exchange::Bf16 => "bf16".into(),
            Exchange::PowerSgd { rank } => format!("psgd-r{rank}"),
            Exchange::LocalSgd { every } => format!("local-h{every}"),
            Exchange::StaleF32 => "f32-stale1".into(),
            Exchange::LocalSgdAsync { every } => format!("local-h{every}-async"),
        }
    }

    /// Whether the exchange runs behind the following step(s) by itself (the asynchronous modes):
    /// exposed = max(0, exchange − compute), whatever the overlap flag says.
    pub fn is_async(&self) -> bool {
        matches!(self, Exchange::StaleF32 | Exchange::LocalSgdAsync { .. })
    }
}

/// What a model sends: its weight matrices (rows = fan_out, cols = fan_in) and everything else
/// (biases, the step's loss and count sums) as plain elements.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    /// (m, n) = (fan_out, fan_in) of each weight matrix.
    pub matrices: Vec<(usize, usize)>,
    /// Elements outside the matrices.
    pub vectors: usize,
}

impl ModelShape {
    /// From the dense layers' (fan_in, fan_out), each with a bias of fan_out, plus `extra` elements
    /// (the trainer's exchange buffer carries 3: loss sum, correct count, sample count).
    pub fn from_linears(name: &str, linears: &[(usize, usize)], extra: usize) -> Self {
        Self {
            name: name.into(),
            matrices: linears.iter().map(|&(i, o)| (o, i)).collect(),
            vectors: linears.iter().map(|&(_, o)| o).sum::<usize>() + extra,
        }
    }

    /// Elements of one uncompressed exchange.
    pub fn elements(&self) -> usize {
        self.matrices.iter().map(|(m, n)| m * n).sum::<usize>() + self.vectors
    }

    /// PowerSGD of rank r: (elements of the first allreduce: every P plus what goes uncompressed,
    /// elements of the second: every Q).
    pub fn powersgd_elements(&self, r: usize) -> (usize, usize) {
        let (mut first, mut second) = (self.vectors, 0);
        for &(m, n) in &self.matrices {
            if r * (m + n) < m * n {
                first += r * m;
                second += r * n;
            } else {
                first += m * n;
            }
        }
        (first, second)
    }

    /// How many times fewer bytes PowerSGD of rank r sends than the f32 exchange.
    pub fn powersgd_factor(&self, r: usize) -> f64 {
        let (a, b) = self.powersgd_elements(r);
        self.elements() as f64 / (a + b) as f64
    }
}

/// One workload as the model sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    pub shape: ModelShape,
    /// One rank's step without any exchange (s), at its per-rank batch (weak scaling: every rank
    /// keeps its batch, the global batch grows with p).
    pub compute_s: f64,
    /// Share of the step that the exchange can hide behind (the backward pass ≈ 2/3 of the
    /// FLOPs: weight and input gradients against the forward product).
    pub overlap_share: f64,
}

/// How the collective runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub network: Network,
    pub algo: Algo,
    /// Bucket size in bytes (None: one allreduce per tensor set).
    pub bucket_bytes: Option<f64>,
}

/// The model's prediction for one (workload, p, exchange, overlap).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub ranks: usize,
    pub algo: Algo,
    pub exchange: Exchange,
    pub overlap: bool,
    /// Bytes on the wire per exchange.
    pub bytes: f64,
    /// Exchange time per step (ms), before overlap.
    pub comm_ms: f64,
    /// The part of it the step waits for (ms).
    pub exposed_ms: f64,
    pub step_ms: f64,
    /// compute / step: the share of one rank's throughput each rank keeps.
    pub efficiency: f64,
}

/// The step time of `sc` on p ranks: compute + exposed exchange, where exposed = the exchange
/// without overlap, max(0, exchange − overlap_share·compute) with it, and max(0, exchange −
/// compute) for the asynchronous modes (the whole next step hides it, so step = max(compute,
/// exchange); their `overlap` is reported false). For local SGD, synchronous or not, the exchange
/// per step is 1/every of one allreduce of the f32 parameters.
pub fn predict(
    sc: &Scenario,
    s: &Settings,
    p: usize,
    exchange: Exchange,
    overlap: bool,
) -> Prediction {
    let link = s.network.link(p);
    let t = |bytes: f64| bucketed_allreduce_s(s.algo, p, bytes, s.bucket_bytes, link);
    let f32_bytes = 4.0 * sc.shape.elements() as f64;
    let (bytes, comm) = match exchange {
        Exchange::F32 => (f32_bytes, t(f32_bytes)),
        Exchange::Bf16 => (f32_bytes / 2.0, t(f32_bytes / 2.0)),
        Exchange::PowerSgd { rank } => {
            let (a, b) = sc.shape.powersgd_elements(rank);
            let (a, b) = (4.0 * a as f64, 4.0 * b as f64);
            (a + b, t(a) + t(b))
        }
        Exchange::LocalSgd { every } | Exchange::LocalSgdAsync { every } => {
            (f32_bytes, t(f32_bytes) / every.max(1) as f64)
        }
        Exchange::StaleF32 => (f32_bytes, t(f32_bytes)),
    };
    let overlap = overlap && !matches!(exchange, Exchange::LocalSgd { .. }) && !exchange.is_async();
    let exposed = if exchange.is_async() {
        (comm - sc.compute_s).max(0.0)
    } else if overlap {
        (comm - sc.overlap_share * sc.compute_s).max(0.0)
    } else {
        comm
    };
    let step = sc.compute_s + exposed;
    Prediction {
        ranks: p,
        algo: s.algo,
        exchange,
        overlap,
        bytes,
        comm_ms: comm * 1e3,
        exposed_ms: exposed * 1e3,
        step_ms: step * 1e3,
        efficiency: if step > 0.0 { sc.compute_s / step } else { 1.0 },
    }
}

/// One measured allreduce: `ranks`, `bytes`, `seconds` (mean per call).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub ranks: usize,
    pub bytes: f64,
    pub seconds: f64,
}

/// α and β of the ring model fitted to measured allreduces by least squares on time vs bytes:
/// t = 2(p−1)·α + 2(p−1)/p·n·(1/β), linear in (α, 1/β), so rows of several rank counts fit
/// together. Each row is weighted by 1/t² (relative error): with plain least squares the megabyte
/// rows decide everything and push α below zero; weighted, the small messages fix α and the large
/// ones β. Rows of one rank carry no information and are skipped. α < 0 is clamped to 0 (and β
/// refitted); a fit with no positive bandwidth is an error.
pub fn fit_ring(samples: &[Sample]) -> anyhow::Result<Link> {
    // features over t: (u/t, v/t) · (α, γ) ≈ 1
    let rows: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.ranks >= 2 && s.seconds > 0.0 && s.bytes >= 0.0)
        .map(|s| {
            let p = s.ranks as f64;
            let u = 2.0 * (p - 1.0);
            let v = 2.0 * (p - 1.0) / p * s.bytes;
            (u / s.seconds, v / s.seconds)
        })
        .collect();
    anyhow::ensure!(
        rows.len() >= 2,
        "the fit needs at least two allreduce rows from 2 or more ranks (got {})",
        rows.len()
    );
    // scale the columns to unit size, for a well-conditioned 2×2 system
    let su = rows.iter().map(|r| r.0 * r.0).sum::<f64>().sqrt();
    let sv = rows.iter().map(|r| r.1 * r.1).sum::<f64>().sqrt();
    anyhow::ensure!(
        su > 0.0 && sv > 0.0,
        "the fit needs rows of more than zero bytes"
    );
    let (mut aa, mut ab, mut bb, mut ay, mut by) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(u, v) in &rows {
        let (a, b) = (u / su, v / sv);
        aa += a * a;
        ab += a * b;
        bb += b * b;
        ay += a;
        by += b;
    }
    let det = aa * bb - ab * ab;
    let (mut alpha, mut gamma) = if det.abs() > 1e-12 {
        (
            (ay * bb - by * ab) / det / su,
            (aa * by - ab * ay) / det / sv,
        )
    } else {
        (f64::NAN, f64::NAN)
    };
    if !alpha.is_finite() || alpha < 0.0 {
        // one size only, or a negative intercept: bandwidth alone
        alpha = 0.0;
        gamma = by / bb / sv;
    }
    anyhow::ensure!(
        gamma.is_finite() && gamma > 0.0,
        "the allreduce rows give no positive bandwidth (1/β = {gamma:e})"
    );
    Ok(Link {
        alpha_s: alpha,
        beta_bytes_per_s: 1.0 / gamma,
    })
}

/// [`fit_ring`] for each rank count of the rows that has at least two sizes: (ranks, link),
/// ascending. Rank counts whose rows cannot be fitted are left out; none at all is an error.
pub fn fit_ring_by_ranks(samples: &[Sample]) -> anyhow::Result<Vec<(usize, Link)>> {
    let mut counts: Vec<usize> = samples
        .iter()
        .map(|s| s.ranks)
        .filter(|&p| p >= 2)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let fits: Vec<(usize, Link)> = counts
        .into_iter()
        .filter_map(|p| {
            let rows: Vec<Sample> = samples.iter().filter(|s| s.ranks == p).copied().collect();
            fit_ring(&rows).ok().map(|l| (p, l))
        })
        .collect();
    if fits.is_empty() {
        // say why, in fit_ring's words
        fit_ring(samples)?;
        anyhow::bail!("no rank count has allreduce rows of two or more sizes");
    }
    Ok(fits)
}

/// 2, 4, 8, … up to `max` (inclusive when a power of two).
pub fn rank_counts(max: usize) -> Vec<usize> {
    std::iter::successors(Some(2usize), |p| p.checked_mul(2))
        .take_while(|&p| p <= max)
        .collect()
}

/// The columns the table prints: f32, f32 overlapped, bf16, bf16 overlapped, PowerSGD and
/// PowerSGD overlapped, local SGD, then the asynchronous modes: one-step-stale f32 gradients and
/// overlapped local SGD (same H).
pub fn table_modes(powersgd_rank: usize, sync_every: u64) -> Vec<(Exchange, bool)> {
    let psgd = Exchange::PowerSgd {
        rank: powersgd_rank,
    };
    vec![
        (Exchange::F32, false),
        (Exchange::F32, true),
        (Exchange::Bf16, false),
        (Exchange::Bf16, true),
        (psgd, false),
        (psgd, true),
        (Exchange::LocalSgd { every: sync_every }, false),
        (Exchange::StaleF32, false),
        (Exchange::LocalSgdAsync { every: sync_every }, false),
    ]
}

/// One workload's table: a row per rank count, a column per mode, each cell "step ms (efficiency)".
pub fn table(sc: &Scenario, s: &Settings, ranks: &[usize], modes: &[(Exchange, bool)]) -> String {
    let head = |e: &Exchange, o: bool| format!("{}{}", e.label(), if o { "+ovl" } else { "" });
    let mut out = format!("{:>6}", "p");
    for (e, o) in modes {
        out += &format!(" {:>17}", head(e, *o));
    }
    out += "\n";
    for &p in ranks {
        out += &format!("{p:>6}");
        for &(e, o) in modes {
            let r = predict(sc, s, p, e, o);
            out += &format!(
                " {:>17}",
                format!("{} {:>5.1}%", fmt_ms(r.step_ms), r.efficiency * 100.0)
            );
        }
        out += "\n";
    }
    out
}

/// Milliseconds with three significant figures or so, in at most 9 characters.
fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{ms:.0}ms")
    } else if ms >= 100.0 {
        format!("{ms:.1}ms")
    } else if ms >= 1.0 {
        format!("{ms:.2}ms")
    } else {
        format!("{ms:.3}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-30)
    }

    const LINK: Link = Link {
        alpha_s: 2e-6,
        beta_bytes_per_s: 4e9,
    };

    fn mnist() -> Scenario {
        Scenario {
            shape: ModelShape::from_linears(
                "mnist-mlp",
                &[(784, 1024), (1024, 1024), (1024, 10)],
                3,
            ),
            compute_s: 0.645e-3,
            overlap_share: 2.0 / 3.0,
        }
    }

    fn settings(algo: Algo) -> Settings {
        Settings {
            network: Network::uniform(
                LINK,
                Link {
                    alpha_s: 5e-6,
                    beta_bytes_per_s: 25e9,
                },
                8,
            ),
            algo,
            bucket_bytes: Some(4.0 * 1048576.0),
        }
    }

    #[test]
    fn the_formulas_match_hand_computed_values() {
        // ring, p = 4, 8 MB: 6·2 µs + 1.5 · 8e6 / 4e9 = 12 µs + 3 ms
        assert!(close(allreduce_s(Algo::Ring, 4, 8e6, LINK), 12e-6 + 3e-3));
        // tree, p = 4: 2·2·(2 µs + 2 ms) = 8.008 ms
        assert!(close(allreduce_s(Algo::Tree, 4, 8e6, LINK), 8.008e-3));
        // tree, p = 5 rounds up to 3 levels: 6·(2 µs + 2 ms)
        assert!(close(allreduce_s(Algo::Tree, 5, 8e6, LINK), 6.0 * 2.002e-3));
        // one rank sends nothing
        assert_eq!(allreduce_s(Algo::Ring, 1, 8e6, LINK), 0.0);
        // buckets: 10 MB in 4 MB buckets = 3 allreduces of 10/3 MB, so only α is paid 3 times
        let b = bucketed_allreduce_s(Algo::Ring, 2, 10e6, Some(4e6), LINK);
        assert!(close(b, 3.0 * 2.0 * 2e-6 + 10e6 / 4e9));
        assert!(close(
            bucketed_allreduce_s(Algo::Ring, 2, 10e6, None, LINK),
            2.0 * 2e-6 + 10e6 / 4e9
        ));
    }

    #[test]
    fn the_network_runs_at_its_slowest_link_beyond_one_node() {
        let s = settings(Algo::Ring);
        assert_eq!(s.network.link(8), LINK);
        let l = s.network.link(16);
        assert_eq!(l.alpha_s, 5e-6);
        assert_eq!(l.beta_bytes_per_s, 4e9);
        // fits at 2 and 8 ranks: 2 and 4 ranks run at the 2-rank fit, 8 and more at the slower one
        let slow = Link {
            alpha_s: 1e-6,
            beta_bytes_per_s: 1.7e9,
        };
        let n = Network {
            intra: vec![(2, LINK), (8, slow)],
            ..s.network
        };
        assert_eq!(n.link(2), LINK);
        assert_eq!(n.link(4), LINK);
        assert_eq!(
            n.link(8),
            Link {
                alpha_s: 2e-6,
                beta_bytes_per_s: 1.7e9
            }
        );
        assert_eq!(n.link(64).beta_bytes_per_s, 1.7e9);
        assert_eq!(n.link(64).alpha_s, 5e-6);
        // one rank per node: the network alone
        let alone = Network {
            ranks_per_node: 1,
            ..n
        };
        assert_eq!(alone.link(2), alone.inter);
        assert_eq!(alone.link(512), alone.inter);
    }

    #[test]
    fn powersgd_counts_factors_and_sends_small_matrices_whole() {
        let sh = mnist().shape;
        assert_eq!(sh.elements(), 1_863_690 + 3);
        // rank 4: P = 4·(1024 + 1024) ; Q = 4·(784 + 1024); the 10×1024 layer: 4·1034 = 4136 < 10240
        let (a, b) = sh.powersgd_elements(4);
        assert_eq!(a, 2058 + 3 + 4 * (1024 + 1024 + 10));
        assert_eq!(b, 4 * (784 + 1024 + 1024));
        // logistic regression 2 → 1: 4·3 ≥ 2, sent whole
        let lr = ModelShape::from_linears("seed-logreg", &[(2, 1)], 3);
        assert_eq!(lr.powersgd_elements(4), (lr.elements(), 0));
        assert_eq!(lr.powersgd_factor(4), 1.0);
        assert!(sh.powersgd_factor(4) > 80.0);
    }

    #[test]
    fn step_time_is_compute_plus_exposed_exchange() {
        let sc = mnist();
        let s = settings(Algo::Ring);
        let bytes = 4.0 * sc.shape.elements() as f64;
        let comm = bucketed_allreduce_s(Algo::Ring, 4, bytes, s.bucket_bytes, LINK);
        let r = predict(&sc, &s, 4, Exchange::F32, false);
        assert!(close(r.step_ms, (sc.compute_s + comm) * 1e3));
        assert!(close(r.efficiency, sc.compute_s / (sc.compute_s + comm)));
        let o = predict(&sc, &s, 4, Exchange::F32, true);
        let hidden = (comm - 2.0 / 3.0 * sc.compute_s).max(0.0);
        assert!(close(o.exposed_ms, hidden * 1e3));
        let l = predict(&sc, &s, 4, Exchange::LocalSgd { every: 8 }, true);
        assert!(!l.overlap && close(l.exposed_ms, comm / 8.0 * 1e3));
        // an exchange shorter than the backward pass hides completely
        let tiny = Scenario {
            compute_s: 1.0,
            ..sc
        };
        assert_eq!(predict(&tiny, &s, 4, Exchange::F32, true).efficiency, 1.0);
    }

    #[test]
    fn the_asynchronous_modes_match_hand_computed_values() {
        // 2,000,000 plain elements = 8 MB; ring on 4 ranks, one message: 6·2 µs + 1.5·8e6/4e9
        // = 3.012 ms
        let s = Settings {
            bucket_bytes: None,
            ..settings(Algo::Ring)
        };
        let at = |compute_s: f64| Scenario {
            shape: ModelShape {
                name: "flat".into(),
                matrices: vec![],
                vectors: 2_000_000,
            },
            compute_s,
            overlap_share: 2.0 / 3.0,
        };
        let ms = |sc: &Scenario, e: Exchange, o: bool| predict(sc, &s, 4, e, o).step_ms;
        let one = at(1e-3);
        // compute 1 ms: f32 1 + 3.012; overlapped 1 + (3.012 − 0.667); stale max(1, 3.012)
        assert!(close(ms(&one, Exchange::F32, false), 4.012));
        assert!(close(
            ms(&one, Exchange::F32, true),
            1.0 + 3.012 - 2.0 / 3.0
        ));
        let st = predict(&one, &s, 4, Exchange::StaleF32, true);
        assert!(close(st.step_ms, 3.012) && close(st.exposed_ms, 2.012));
        assert!(close(st.comm_ms, 3.012) && st.bytes == 8e6 && !st.overlap);
        assert!(close(st.efficiency, 1.0 / 3.012));
        // local SGD every 4: 1 + 3.012/4 = 1.753 ms synchronous, max(1, 0.753) = 1 ms overlapped;
        // every 2: 1 + 1.506 against max(1, 1.506)
        assert!(close(
            ms(&one, Exchange::LocalSgd { every: 4 }, false),
            1.753
        ));
        let la = predict(&one, &s, 4, Exchange::LocalSgdAsync { every: 4 }, false);
        assert!(close(la.step_ms, 1.0) && la.exposed_ms == 0.0 && la.efficiency == 1.0);
        assert!(close(la.comm_ms, 0.753) && la.bytes == 8e6);
        assert!(close(
            ms(&one, Exchange::LocalSgd { every: 2 }, false),
            2.506
        ));
        assert!(close(
            ms(&one, Exchange::LocalSgdAsync { every: 2 }, true),
            1.506
        ));
        // compute 4 ms: the backward pass (2.667 ms) cannot hide 3.012 ms, the whole step can
        let four = at(4e-3);
        assert!(close(
            ms(&four, Exchange::F32, true),
            4.0 + 3.012 - 8.0 / 3.0
        ));
        assert!(close(ms(&four, Exchange::StaleF32, false), 4.0));
        // one rank: nothing to send, nothing to wait for
        assert!(close(
            predict(&one, &s, 1, Exchange::StaleF32, false).step_ms,
            1.0
        ));
        assert_eq!(Exchange::StaleF32.label(), "f32-stale1");
        assert_eq!(
            Exchange::LocalSgdAsync { every: 8 }.label(),
            "local-h8-async"
        );
    }

    #[test]
    fn the_asynchronous_modes_are_never_slower_than_their_synchronous_counterparts() {
        for algo in [Algo::Ring, Algo::Tree] {
            let s = settings(algo);
            for compute in [1e-5, 6.45e-4, 5.69e-2] {
                let sc = Scenario {
                    compute_s: compute,
                    ..mnist()
                };
                for p in rank_counts(1024) {
                    for o in [false, true] {
                        let f = predict(&sc, &s, p, Exchange::F32, o);
                        let st = predict(&sc, &s, p, Exchange::StaleF32, o);
                        assert!(st.step_ms <= f.step_ms, "{algo:?} p {p} {compute} {o}");
                        // staleness 1 is max(compute, the f32 exchange), overlap or not
                        assert!(close(st.comm_ms, f.comm_ms) && st.bytes == f.bytes);
                        assert!(close(st.step_ms, (compute * 1e3).max(f.comm_ms)));
                        for every in [1, 2, 8, 64] {
                            let l = predict(&sc, &s, p, Exchange::LocalSgd { every }, o);
                            let a = predict(&sc, &s, p, Exchange::LocalSgdAsync { every }, o);
                            assert!(a.step_ms <= l.step_ms, "{algo:?} p {p} H {every}");
                            assert!(close(a.comm_ms, l.comm_ms));
                            assert!(close(a.step_ms, (compute * 1e3).max(l.comm_ms)));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ring_efficiency_never_rises_with_more_ranks() {
        let per_ranks = |algo| {
            let mut s = settings(algo);
            s.network.intra = vec![
                (2, LINK),
                (
                    8,
                    Link {
                        alpha_s: 1e-6,
                        beta_bytes_per_s: 1.7e9,
                    },
                ),
            ];
            s
        };
        for s in [
            settings(Algo::Ring),
            settings(Algo::Tree),
            per_ranks(Algo::Ring),
            per_ranks(Algo::Tree),
        ] {
            let algo = s.algo;
            for compute in [1e-5, 6.45e-4, 5.69e-2] {
                let sc = Scenario {
                    compute_s: compute,
                    ..mnist()
                };
                for (e, o) in table_modes(4, 8) {
                    let effs: Vec<f64> = rank_counts(512)
                        .into_iter()
                        .map(|p| predict(&sc, &s, p, e, o).efficiency)
                        .collect();
                    assert!(
                        effs.windows(2).all(|w| w[1] <= w[0]),
                        "{algo:?} {e:?} {o}: {effs:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_is_never_slower_than_f32() {
        for algo in [Algo::Ring, Algo::Tree] {
            let s = settings(algo);
            for p in rank_counts(1024) {
                for o in [false, true] {
                    let f = predict(&mnist(), &s, p, Exchange::F32, o);
                    let b = predict(&mnist(), &s, p, Exchange::Bf16, o);
                    assert!(b.step_ms <= f.step_ms, "{algo:?} p {p}");
                    assert!(b.bytes * 2.0 == f.bytes);
                }
            }
        }
    }

    #[test]
    fn the_fit_recovers_alpha_and_beta_from_synthetic_rows() {
        for link in [
            LINK,
            Link {
                alpha_s: 0.5e-6,
                beta_bytes_per_s: 2.9e9,
            },
        ] {
            let mut rows = Vec::new();
            for p in [2, 4, 8] {
                for bytes in [12.0, 4096.0, 1048576.0, 7454772.0] {
                    rows.push(Sample {
                        ranks: p,
                        bytes,
                        seconds: allreduce_s(Algo::Ring, p, bytes, link),
                    });
                }
            }
            // a one-rank row is ignored
            rows.push(Sample {
                ranks: 1,
                bytes: 64.0,
                seconds: 1.0,
            });
            let fit = fit_ring(&rows).unwrap();
            assert!((fit.alpha_s / link.alpha_s - 1.0).abs() < 1e-9, "{fit:?}");
            assert!((fit.beta_bytes_per_s / link.beta_bytes_per_s - 1.0).abs() < 1e-9);
        }
        // one rank count and two sizes is enough
        let two: Vec<Sample> = [1e3, 1e6]
            .iter()
            .map(|&b| Sample {
                ranks: 2,
                bytes: b,
                seconds: allreduce_s(Algo::Ring, 2, b, LINK),
            })
            .collect();
        let fit = fit_ring(&two).unwrap();
        assert!((fit.alpha_s / LINK.alpha_s - 1.0).abs() < 1e-9);
        assert!(fit_ring(&two[..1]).is_err());
        // per rank count: each its own link
        let slow = Link {
            alpha_s: 1e-6,
            beta_bytes_per_s: 1.7e9,
        };
        let mut rows = Vec::new();
        for (p, link) in [(2, LINK), (8, slow)] {
            for bytes in [12.0, 1048576.0, 7454772.0] {
                rows.push(Sample {
                    ranks: p,
                    bytes,
                    seconds: allreduce_s(Algo::Ring, p, bytes, link),
                });
            }
        }
        // a rank count with one size only is left out
        rows.push(Sample {
            ranks: 4,
            bytes: 64.0,
            seconds: 1e-5,
        });
        let fits = fit_ring_by_ranks(&rows).unwrap();
        assert_eq!(fits.iter().map(|f| f.0).collect::<Vec<_>>(), vec![2, 8]);
        for ((_, got), want) in fits.iter().zip([LINK, slow]) {
            assert!((got.alpha_s / want.alpha_s - 1.0).abs() < 1e-9);
            assert!((got.beta_bytes_per_s / want.beta_bytes_per_s - 1.0).abs() < 1e-9);
        }
        assert!(fit_ring_by_ranks(&rows[6..]).is_err());
    }

    #[test]
    fn the_table_has_a_row_per_rank_count() {
        let t = table(
            &mnist(),
            &settings(Algo::Ring),
            &rank_counts(512),
            &table_modes(4, 8),
        );
        assert_eq!(t.lines().count(), 1 + 9);
        assert!(t.contains("psgd-r4+ovl") && t.contains("local-h8"));
        assert!(t.contains("f32-stale1") && t.contains("local-h8-async"));
        assert!(!t.contains("stale1+ovl") && !t.contains("async+ovl"));
        // the p column, then a step time and an efficiency per mode
        let head: Vec<&str> = t.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(head.len(), 1 + 9);
        assert_eq!(&head[8..], ["f32-stale1", "local-h8-async"]);
        for row in t.lines().skip(1) {
            assert_eq!(row.split_whitespace().count(), 1 + 2 * 9, "{row}");
        }
        assert_eq!(rank_counts(512).last(), Some(&512));
        assert_eq!(rank_counts(600).last(), Some(&512));
    }
}
