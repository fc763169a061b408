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
                let global = self.per_rank * self.ranks;
                let start = s * global;
                let m = global.min(self.total_samples.saturating_sub(start));
                if m == global {
                    (start + rank * self.per_rank, self.per_rank)
                } else {
                    // a short last batch is spread as evenly as the rows allow
                    let lo = m * rank / self.ranks;
                    let hi = m * (rank + 1) / self.ranks;
                    (start + lo, hi - lo)
                }
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

    /// Samples in step s over all ranks.
    pub fn global_rows(&self, s: u64) -> usize {
        (0..self.ranks).map(|r| self.rows_of(s, r).1).sum()
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
