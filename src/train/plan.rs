//! Which rows each rank trains on: steps per epoch, shards, micro-batches, and the epoch's order.

use super::config::{ShardMode, TrainConfig};
use crate::backend::Batch;
use crate::rng::Rng;

/// Which rows of the epoch's order this rank trains on at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Global optimiser steps per epoch (agreed by all ranks).
    pub steps_per_epoch: u64,
    /// Rows per rank per step (batch size × micro-batches).
    per_rank: usize,
    /// Rows per micro-batch (the batch size).
    micro: usize,
    ranks: usize,
    rank: usize,
    /// Samples in this rank's order (the whole set in global mode, its shard in split mode).
    local_samples: usize,
    shard: ShardMode,
    total_samples: usize,
    /// `--balance auto`: where each rank's part of a full global batch starts (ranks + 1 prefix
    /// sums of the agreed shares, the last being the global batch). None: equal parts. Leaked once
    /// per agreement, so that the plan stays `Copy`.
    bounds: Option<&'static [usize]>,
}

impl StepPlan {
    /// The plan for `rank` of `ranks` over `total` training samples, `per_rank` rows each step.
    pub fn new(shard: ShardMode, total: usize, per_rank: usize, rank: usize, ranks: usize) -> Self {
        let (local, steps) = match shard {
            ShardMode::Global => (total, total.div_ceil(per_rank * ranks)),
            ShardMode::Split => {
                let (lo, hi) = shard_range(total, rank, ranks);
                // the largest shard decides the epoch; smaller ones sit out its last steps
                let largest = (0..ranks)
                    .map(|r| {
                        let (a, b) = shard_range(total, r, ranks);
                        b - a
                    })
                    .max()
                    .unwrap_or(0);
                (hi - lo, largest.div_ceil(per_rank))
            }
        };
        Self {
            steps_per_epoch: steps as u64,
            per_rank,
            micro: per_rank,
            ranks,
            rank,
            local_samples: local,
            shard,
            total_samples: total,
            bounds: None,
        }
    }

    /// The plan of a run: `cfg`'s sharding and batch, each step split into micro-batches.
    pub fn of(cfg: &TrainConfig, total: usize, rank: usize, ranks: usize) -> Self {
        Self {
            micro: cfg.batch_size,
            ..Self::new(cfg.shard, total, cfg.rows_per_step(), rank, ranks)
        }
    }

    /// (offset, rows) of `rank`'s part of step `s` within the epoch's order; rows may be 0.
    pub fn rows_of(&self, s: u64, rank: usize) -> (usize, usize) {
        let s = s as usize;
        match self.shard {
            ShardMode::Global => {
                let (start, m) = self.global_span(s as u64);
                let (lo, hi) = (self.cut(m, rank), self.cut(m, rank + 1));
                (start + lo, hi - lo)
            }
            ShardMode::Split => {
                let (a, b) = shard_range(self.total_samples, rank, self.ranks);
                let n = b - a;
                let lo = (s * self.per_rank).min(n);
                let hi = ((s + 1) * self.per_rank).min(n);
                (lo, hi - lo)
            }
        }
    }

    /// This rank's rows of step s.
    pub fn mine(&self, s: u64) -> (usize, usize) {
        self.rows_of(s, self.rank)
    }

    /// This rank's rows of step s (the `step`-th of the run) as micro-batches of at most the batch
    /// size; every one but the first adds to the gradients. Empty when the rank sits the step out.
    pub fn micro_batches(&self, s: u64, step: u64) -> Vec<Batch> {
        let (offset, rows) = self.mine(s);
        (0..rows)
            .step_by(self.micro.max(1))
            .map(|start| Batch {
                offset: offset + start,
                rows: self.micro.min(rows - start),
                step,
                accumulate: start > 0,
            })
            .collect()
    }

    /// As [`StepPlan::micro_batches`], padded with empty micro-batches to the count of the rank
    /// with the most (SyncBatchNorm: every rank joins every micro-batch's collectives).
    pub fn micro_batches_padded(&self, s: u64, step: u64) -> Vec<Batch> {
        let mut v = self.micro_batches(s, step);
        let most = (0..self.ranks)
            .map(|r| self.rows_of(s, r).1.div_ceil(self.micro.max(1)))
            .max()
            .unwrap_or(0);
        let offset = self.mine(s).0.min(self.local_samples);
        while v.len() < most {
            v.push(Batch {
                offset,
                rows: 0,
                step,
                accumulate: !v.is_empty(),
            });
        }
        v
    }

    /// Samples in step s over all ranks.
    pub fn global_rows(&self, s: u64) -> usize {
        match self.shard {
            ShardMode::Global => self.global_span(s).1,
            ShardMode::Split => (0..self.ranks).map(|r| self.rows_of(s, r).1).sum(),
        }
    }

    /// Global mode: (first row in the epoch's order, rows) of step s's global batch.
    fn global_span(&self, s: u64) -> (usize, usize) {
        let global = self.global_batch();
        let start = s as usize * global;
        (start, global.min(self.total_samples.saturating_sub(start)))
    }

    /// Rows of a full global batch over all ranks (global mode): per-rank rows × ranks, however
    /// they are shared out.
    pub fn global_batch(&self) -> usize {
        self.per_rank * self.ranks
    }

    /// Global mode: where rank r's part of a global batch of m rows starts (r = ranks: m), at
    /// ⌊m·Pᵣ/G⌋ (Pᵣ: the prefix sum of the shares, G: the full batch). A full batch is cut at the
    /// prefix sums themselves; a short one (the epoch's last) in the same proportions, each part
    /// within one row of its exact quota. With equal shares this is ⌊m·r/ranks⌋, the even split.
    fn cut(&self, m: usize, r: usize) -> usize {
        let p = match self.bounds {
            Some(b) => b[r],
            None => r * self.per_rank,
        };
        (m as u128 * p as u128 / self.global_batch() as u128) as usize
    }

    /// This plan with each full global batch shared out as `shares` (global mode; one per rank,
    /// each at least 1, summing to the global batch): rank r takes the contiguous `shares[r]`
    /// rows after those of ranks 0..r, and a short last batch is cut in the same proportions
    /// (where a rank's quota is under one row it may get none, as with equal parts).
    pub fn with_shares(self, shares: &[usize]) -> Self {
        assert_eq!(self.shard, ShardMode::Global, "shares need --shard global");
        assert_eq!(shares.len(), self.ranks, "one share per rank");
        assert!(shares.iter().all(|&x| x >= 1), "every share at least 1");
        let mut bounds = Vec::with_capacity(self.ranks + 1);
        bounds.push(0);
        for x in shares {
            bounds.push(bounds[bounds.len() - 1] + x);
        }
        assert_eq!(
            bounds[self.ranks],
            self.global_batch(),
            "shares sum to the batch"
        );
        Self {
            bounds: Some(Vec::leak(bounds)),
            ..self
        }
    }

    /// Rows of each rank in a full global batch (global mode; split mode: the rows per step).
    pub fn shares(&self) -> Vec<usize> {
        match self.bounds {
            Some(b) => b.windows(2).map(|w| w[1] - w[0]).collect(),
            None => vec![self.per_rank; self.ranks],
        }
    }

    /// Whether agreed shares replace the equal parts.
    pub fn balanced(&self) -> bool {
        self.bounds.is_some()
    }

    /// The most micro-batches any rank runs in one step (the same on every rank).
    pub fn max_micro_batches(&self) -> usize {
        let most = self.shares().into_iter().max().unwrap_or(0);
        most.div_ceil(self.micro.max(1))
    }

    /// Size of this rank's order each epoch.
    pub fn local_samples(&self) -> usize {
        self.local_samples
    }

    /// This rank's first sample in the whole training set (its shard's start in split mode).
    pub fn sample_base(&self) -> usize {
        match self.shard {
            ShardMode::Global => 0,
            ShardMode::Split => shard_range(self.total_samples, self.rank, self.ranks).0,
        }
    }

    pub fn shard(&self) -> ShardMode {
        self.shard
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// Shares of a global batch of `global` rows for ranks that process `rates` rows per second:
/// proportional, by the largest remainder method on integer weights (ties to the lower rank), then
/// every rank given at least one row when `global` allows, taken from the largest share (ties to
/// the lower rank). Sums to `global`; the same figures give the same shares on every rank; equal
/// rates give equal shares. Rates that are not all finite and positive count as equal.
pub fn proportional_shares(global: usize, rates: &[f64]) -> Vec<usize> {
    let n = rates.len();
    if n == 0 {
        return Vec::new();
    }
    let valid = rates.iter().all(|r| r.is_finite() && *r > 0.0);
    let max = rates.iter().copied().fold(0.0, f64::max);
    // integer weights, 2^20 for the fastest rank: the rest is exact integer arithmetic
    let w: Vec<u128> = rates
        .iter()
        .map(|&r| {
            if valid {
                ((r / max * (1u64 << 20) as f64).round() as u128).max(1)
            } else {
                1
            }
        })
        .collect();
    let total: u128 = w.iter().sum();
    let g = global as u128;
    let mut shares: Vec<usize> = w.iter().map(|&x| (g * x / total) as usize).collect();
    let left = global - shares.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..n).collect();
    // a stable sort: equal remainders keep rank order
    by_remainder.sort_by_key(|&r| std::cmp::Reverse(g * w[r] % total));
    for &r in by_remainder.iter().take(left) {
        shares[r] += 1;
    }
    if global >= n {
        while let Some(r) = shares.iter().position(|&x| x == 0) {
            let (big, _) = shares
                .iter()
                .enumerate()
                .fold((0, 0), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
            shares[big] -= 1;
            shares[r] = 1;
        }
    }
    shares
}

/// Rank r's contiguous share [lo, hi) of n samples over `ranks` ranks (sizes differ by at most one).
pub fn shard_range(n: usize, rank: usize, ranks: usize) -> (usize, usize) {
    (n * rank / ranks, n * (rank + 1) / ranks)
}

/// The epoch's sample order for this rank: the same permutation on every rank in global mode,
/// a per-rank permutation of the shard in split mode.
pub fn epoch_order(cfg: &TrainConfig, plan: &StepPlan, epoch: u64, rank: usize) -> Vec<u32> {
    let stream = match cfg.shard {
        ShardMode::Global => 1000 + epoch,
        ShardMode::Split => ((rank as u64 + 1) << 32) | (1000 + epoch),
    };
    Rng::derive(cfg.seed, stream).permutation(plan.local_samples())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;

    fn covered(plan_of: impl Fn(usize) -> StepPlan, ranks: usize, n: usize, per_epoch_ok: bool) {
        let plans: Vec<StepPlan> = (0..ranks).map(&plan_of).collect();
        let steps = plans[0].steps_per_epoch;
        assert!(
            plans.iter().all(|p| p.steps_per_epoch == steps),
            "ranks agree on steps"
        );
        let mut seen = vec![0usize; n];
        for s in 0..steps {
            let mut global = 0;
            for (r, p) in plans.iter().enumerate() {
                let (off, rows) = p.mine(s);
                global += rows;
                for i in off..off + rows {
                    match p.shard {
                        ShardMode::Global => seen[i] += 1,
                        ShardMode::Split => seen[shard_range(n, r, ranks).0 + i] += 1,
                    }
                }
            }
            assert_eq!(global, plans[0].global_rows(s));
            assert!(global > 0 || !per_epoch_ok);
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "every sample exactly once per epoch"
        );
    }

    #[test]
    fn global_sharding_visits_each_sample_once_and_splits_the_short_batch() {
        for ranks in 1..=4 {
            for n in [7, 97, 100, 101] {
                covered(
                    |r| StepPlan::new(ShardMode::Global, n, 8, r, ranks),
                    ranks,
                    n,
                    true,
                );
            }
        }
        // 97 samples, 3 ranks of 8: 4 full global batches of 24, then 1 row spread over 3 ranks
        let p = |r| StepPlan::new(ShardMode::Global, 97, 8, r, 3);
        assert_eq!(p(0).steps_per_epoch, 5);
        assert_eq!(
            (p(0).mine(4), p(1).mine(4), p(2).mine(4)),
            ((96, 0), (96, 0), (96, 1))
        );
        assert_eq!(p(1).mine(1), (32, 8));
    }

    #[test]
    fn proportional_shares_sum_to_the_batch_and_follow_the_rates() {
        assert_eq!(proportional_shares(64, &[3.0, 1.0]), vec![48, 16]);
        assert_eq!(proportional_shares(64, &[1.0, 3.0]), vec![16, 48]);
        // equal rates: the even split, whatever their value
        for n in 1..=8 {
            for per in [1, 2, 7, 32] {
                assert_eq!(
                    proportional_shares(per * n, &vec![123.4; n]),
                    vec![per; n],
                    "{n} ranks of {per}"
                );
            }
        }
        // largest remainders, ties to the lower rank: 10 × (1/3 each) = 3.33 → 4, 3, 3
        assert_eq!(proportional_shares(10, &[5.0, 5.0, 5.0]), vec![4, 3, 3]);
        // a very slow rank still gets a row, taken from the largest share
        assert_eq!(proportional_shares(16, &[1000.0, 1e-6]), vec![15, 1]);
        assert_eq!(
            proportional_shares(4, &[1.0, 1e-9, 1e-9, 1e-9]),
            vec![1, 1, 1, 1]
        );
        // not all finite and positive: equal
        assert_eq!(proportional_shares(8, &[f64::NAN, 1.0]), vec![4, 4]);
        assert_eq!(proportional_shares(8, &[0.0, 1.0]), vec![4, 4]);
        assert_eq!(proportional_shares(8, &[f64::INFINITY, 1.0]), vec![4, 4]);
        // fewer rows than ranks: proportional, some ranks without a row
        assert_eq!(
            proportional_shares(2, &[1.0, 1.0, 1.0])
                .iter()
                .sum::<usize>(),
            2
        );
        // sums, the minimum, closeness to the quota, and determinism over many rate sets
        let mut x = 12345u64;
        for _ in 0..500 {
            let n = 1 + (x % 7) as usize;
            let rates: Vec<f64> = (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    0.05 + (x >> 40) as f64 / (1u64 << 24) as f64 * 10.0
                })
                .collect();
            let global = n * (1 + (x % 50) as usize);
            let s = proportional_shares(global, &rates);
            assert_eq!(s, proportional_shares(global, &rates));
            assert_eq!(s.iter().sum::<usize>(), global, "{rates:?}");
            assert!(s.iter().all(|&v| v >= 1), "{s:?} for {rates:?}");
            let sum: f64 = rates.iter().sum();
            let quotas: Vec<f64> = rates.iter().map(|r| global as f64 * r / sum).collect();
            let raised = s
                .iter()
                .zip(&quotas)
                .filter(|(v, q)| **v == 1 && **q < 1.0)
                .count();
            for (v, q) in s.iter().zip(&quotas) {
                // within one row of the quota, less the rows given to ranks raised to one
                assert!(
                    (*v as f64 - q).abs() < 1.0 + raised as f64 + 1e-3,
                    "{s:?} for {rates:?}"
                );
            }
        }
    }

    #[test]
    fn shared_out_global_batches_cover_every_sample_and_keep_the_proportions() {
        fn shared(n: usize, per: usize, shares: &[usize]) -> impl Fn(usize) -> StepPlan + '_ {
            move |r| StepPlan::new(ShardMode::Global, n, per, r, shares.len()).with_shares(shares)
        }
        for n in [7, 97, 100, 101, 1000] {
            covered(shared(n, 8, &[12, 4]), 2, n, true);
            covered(shared(n, 8, &[1, 15]), 2, n, true);
            covered(shared(n, 8, &[20, 1, 3]), 3, n, true);
            covered(shared(n, 8, &[5, 9, 1, 17]), 4, n, true);
        }
        // a full batch: contiguous slices of the shares' lengths
        let p = shared(100, 8, &[12, 4]);
        assert_eq!((p(0).mine(2), p(1).mine(2)), ((32, 12), (44, 4)));
        assert_eq!(p(0).shares(), vec![12, 4]);
        assert_eq!(p(1).global_batch(), 16);
        assert!(p(0).balanced());
        // the short last batch of 4 rows, in the ratio 12 : 4
        assert_eq!((p(0).mine(6), p(1).mine(6)), ((96, 3), (99, 1)));
        // every length of a short batch: sums, and each part within one row of its quota
        for shares in [vec![48, 16], vec![5, 9, 1, 17], vec![1, 1, 31]] {
            let ranks = shares.len();
            let g: usize = shares.iter().sum();
            let plan = StepPlan::new(ShardMode::Global, g, g / ranks, 0, ranks);
            assert_eq!(plan.global_batch(), g);
            let plan = plan.with_shares(&shares);
            for m in 1..=g {
                let rows: Vec<usize> = (0..ranks)
                    .map(|r| plan.cut(m, r + 1) - plan.cut(m, r))
                    .collect();
                assert_eq!(rows.iter().sum::<usize>(), m, "{shares:?}, {m} rows");
                for (x, s) in rows.iter().zip(&shares) {
                    let quota = (m * s) as f64 / g as f64;
                    assert!(
                        (*x as f64 - quota).abs() < 1.0,
                        "{shares:?}, {m} rows: {rows:?}"
                    );
                }
            }
        }
        // the more rows per second, the more rows
        let rates = [310.0, 1234.0];
        let s = proportional_shares(64, &rates);
        assert!(s[1] > 3 * s[0], "{s:?}");
    }

    #[test]
    fn equal_shares_split_every_batch_as_the_even_plan_does() {
        for ranks in 1..=5 {
            for n in [1, 7, 97, 100, 101] {
                for per in [1, 3, 8] {
                    let even = StepPlan::new(ShardMode::Global, n, per, 0, ranks);
                    let same = even.with_shares(&vec![per; ranks]);
                    for s in 0..even.steps_per_epoch {
                        for r in 0..ranks {
                            assert_eq!(same.rows_of(s, r), even.rows_of(s, r));
                        }
                        assert_eq!(same.global_rows(s), even.global_rows(s));
                    }
                    assert_eq!(same.max_micro_batches(), even.max_micro_batches());
                }
            }
        }
    }

    #[test]
    fn a_larger_share_runs_more_micro_batches() {
        let mut cfg = TrainConfig::new(ModelKind::Softmax);
        cfg.batch_size = 4;
        cfg.accumulate = 2;
        // 2 ranks of 8 rows: 16 a step, shared 13 : 3
        let plan = StepPlan::of(&cfg, 100, 0, 2);
        assert_eq!(plan.max_micro_batches(), 2);
        let fast = plan.with_shares(&[13, 3]);
        assert_eq!(fast.max_micro_batches(), 4);
        let rows: Vec<(usize, usize, bool)> = fast
            .micro_batches(1, 0)
            .iter()
            .map(|b| (b.offset, b.rows, b.accumulate))
            .collect();
        assert_eq!(
            rows,
            vec![(16, 4, false), (20, 4, true), (24, 4, true), (28, 1, true)]
        );
    }

    #[test]
    fn split_sharding_covers_uneven_shards_and_agrees_on_steps() {
        for ranks in 1..=4 {
            for n in [7, 101, 1000] {
                covered(
                    |r| StepPlan::new(ShardMode::Split, n, 10, r, ranks),
                    ranks,
                    n,
                    true,
                );
            }
        }
        // 101 samples on 3 ranks: shards of 33, 34, 34; 4 steps of 10 each epoch
        let p = |r| StepPlan::new(ShardMode::Split, 101, 10, r, 3);
        assert_eq!((p(0).local_samples(), p(1).local_samples()), (33, 34));
        assert_eq!(p(0).steps_per_epoch, 4);
        assert_eq!(p(0).mine(3), (30, 3));
        assert_eq!(p(2).global_rows(3), 3 + 4 + 4);
        assert_eq!(p(2).sample_base(), 67);
    }

    #[test]
    fn micro_batches_split_a_step_and_only_the_first_overwrites() {
        let mut cfg = TrainConfig::new(ModelKind::Softmax);
        cfg.batch_size = 4;
        cfg.accumulate = 3;
        // 30 samples, 12 rows a step: steps of 12, 12 and 6 rows
        let plan = StepPlan::of(&cfg, 30, 0, 1);
        assert_eq!(plan.steps_per_epoch, 3);
        let rows = |s| -> Vec<(usize, usize, bool)> {
            plan.micro_batches(s, 9)
                .iter()
                .map(|b| (b.offset, b.rows, b.accumulate))
                .collect()
        };
        assert_eq!(rows(0), vec![(0, 4, false), (4, 4, true), (8, 4, true)]);
        assert_eq!(rows(2), vec![(24, 4, false), (28, 2, true)]);
        assert!(plan.micro_batches(1, 9).iter().all(|b| b.step == 9));
    }

    #[test]
    fn split_orders_differ_between_ranks_and_global_orders_do_not() {
        let mut cfg = TrainConfig::new(ModelKind::Softmax);
        let plan = StepPlan::new(ShardMode::Global, 50, 5, 0, 2);
        assert_eq!(
            epoch_order(&cfg, &plan, 1, 0),
            epoch_order(&cfg, &plan, 1, 1)
        );
        assert_ne!(
            epoch_order(&cfg, &plan, 1, 0),
            epoch_order(&cfg, &plan, 2, 0)
        );
        cfg.shard = ShardMode::Split;
        let plan = StepPlan::new(ShardMode::Split, 50, 5, 0, 2);
        assert_ne!(
            epoch_order(&cfg, &plan, 1, 0),
            epoch_order(&cfg, &plan, 1, 1)
        );
    }
}
