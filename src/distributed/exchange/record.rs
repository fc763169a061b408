//! The exchange's state in a checkpoint, as a typed record, and its tensors. The tensor names are
//! those of the builds before the record (checkpoints they wrote still load):
//!
//! - `exchange.inflight`: `--staleness 1`'s sums in flight, in parameter order, the totals'
//!   words after;
//! - `exchange.average`: `--async-average`'s average in flight ([Σ nᵢθᵢ, Σ nᵢ, stop requests]);
//! - `rank{r}.…`: each rank's own state (rank 0 writes every rank's): `params`, `optim.{name}`,
//!   `anchor` and `since` under `--sync params`; `ef.local` and `ef.owned` (and `ef.buckets`,
//!   the bucket ranges the owned residuals follow; absent: one bucket) for the 16-bit wire;
//!   `psgd.step`, `psgd.q{k}` and `psgd.residual` for PowerSGD.

use std::ops::Range;

use anyhow::Context;

use super::buckets::Bucket;
use crate::distributed::codec::{CodecState, PowerSgdState, segments};

/// The exchange's checkpoint state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExchangeRecord {
    /// `--staleness 1`: the sums in flight, flat (gradient, then the totals' words).
    pub inflight: Option<Vec<f32>>,
    /// `--async-average`: the average in flight.
    pub average: Option<Vec<f32>>,
    /// Each rank's own state, by rank (rank 0's record holds every rank's; a restored record
    /// holds the restoring rank's only, at its index).
    pub ranks: Vec<RankRecord>,
}

/// One rank's own part of the exchange's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankRecord {
    /// `--sync params`: this rank's parameters, optimizer state, anchor and samples since the
    /// last average.
    pub params: Option<Vec<f32>>,
    pub optim: Vec<(String, Vec<f32>)>,
    pub anchor: Option<Vec<f32>>,
    pub since: Option<u64>,
    /// The 16-bit wire's residuals.
    pub wire: Option<WireRecord>,
    /// PowerSGD's state over the whole gradient (matrices in offset order).
    pub powersgd: Option<PowerSgdState>,
}

/// The 16-bit wire's residuals over the whole gradient.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WireRecord {
    /// The local residual, in parameter order.
    pub local: Vec<f32>,
    /// The owner residuals of the segments this rank owns, bucket after bucket.
    pub owned: Vec<f32>,
    /// The buckets they follow (None: one bucket, as builds before the bucketed codecs wrote).
    pub buckets: Option<Vec<Range<usize>>>,
}

impl RankRecord {
    /// Whether there is nothing to keep.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The tensors, by name without the `rank{r}.` prefix, in a fixed order.
    pub fn to_tensors(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        if let Some(p) = &self.params {
            out.push(("params".into(), p.clone()));
        }
        out.extend(
            self.optim
                .iter()
                .map(|(k, v)| (format!("optim.{k}"), v.clone())),
        );
        if let Some(a) = &self.anchor {
            out.push(("anchor".into(), a.clone()));
        }
        if let Some(s) = self.since {
            out.push(("since".into(), u64_words(s)));
        }
        if let Some(w) = &self.wire {
            out.push(("ef.local".into(), w.local.clone()));
            out.push(("ef.owned".into(), w.owned.clone()));
            if let Some(b) = &w.buckets {
                let words = b
                    .iter()
                    .flat_map(|r| {
                        u64_words(r.start as u64)
                            .into_iter()
                            .chain(u64_words(r.end as u64))
                    })
                    .collect();
                out.push(("ef.buckets".into(), words));
            }
        }
        if let Some(p) = &self.powersgd {
            out.push(("psgd.step".into(), u64_words(p.step)));
            for (k, q) in p.q.iter().enumerate() {
                out.push((format!("psgd.q{k}"), q.clone()));
            }
            out.push(("psgd.residual".into(), p.residual.clone()));
        }
        out
    }

    /// The record of [`RankRecord::to_tensors`]' tensors (names without the prefix); unknown
    /// names are left alone.
    pub fn from_tensors<'a>(tensors: impl Iterator<Item = (&'a str, &'a [f32])>) -> Self {
        let mut r = Self::default();
        let (mut local, mut owned, mut buckets) = (None, None, None);
        let (mut step, mut residual, mut q) = (None, None, Vec::new());
        for (name, v) in tensors {
            match name {
                "params" => r.params = Some(v.to_vec()),
                "anchor" => r.anchor = Some(v.to_vec()),
                "since" => r.since = Some(words_u64(v)),
                "ef.local" => local = Some(v.to_vec()),
                "ef.owned" => owned = Some(v.to_vec()),
                "ef.buckets" => {
                    let w: Vec<u64> = v.chunks_exact(2).map(words_u64).collect();
                    buckets = Some(
                        w.chunks_exact(2)
                            .map(|p| p[0] as usize..p[1] as usize)
                            .collect(),
                    );
                }
                "psgd.step" => step = Some(words_u64(v)),
                "psgd.residual" => residual = Some(v.to_vec()),
                _ => {
                    if let Some(o) = name.strip_prefix("optim.") {
                        r.optim.push((o.to_string(), v.to_vec()));
                    } else if let Some(k) = name.strip_prefix("psgd.q") {
                        q.push((k.parse::<usize>().unwrap_or(usize::MAX), v.to_vec()));
                    }
                }
            }
        }
        if let (Some(local), Some(owned)) = (local, owned) {
            r.wire = Some(WireRecord {
                local,
                owned,
                buckets,
            });
        }
        if let (Some(step), Some(residual)) = (step, residual) {
            q.sort_by_key(|(k, _)| *k);
            r.powersgd = Some(PowerSgdState {
                step,
                q: q.into_iter().map(|(_, q)| q).collect(),
                residual,
            });
        }
        r
    }
}

impl ExchangeRecord {
    /// The checkpoint's tensors.
    pub fn to_tensors(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        if let Some(v) = &self.inflight {
            out.push(("exchange.inflight".to_string(), v.clone()));
        }
        if let Some(v) = &self.average {
            out.push(("exchange.average".to_string(), v.clone()));
        }
        for (r, rec) in self.ranks.iter().enumerate() {
            out.extend(
                rec.to_tensors()
                    .into_iter()
                    .map(|(k, v)| (format!("rank{r}.{k}"), v)),
            );
        }
        out
    }

    /// Rank `rank`'s view of a checkpoint's tensors: the shared state and its own.
    pub fn from_tensors(tensors: &[(String, Vec<f32>)], rank: usize) -> Self {
        let mine = format!("rank{rank}.");
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let own = RankRecord::from_tensors(
            tensors
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&mine)?, v.as_slice()))),
        );
        let mut ranks = vec![RankRecord::default(); rank];
        ranks.push(own);
        Self {
            inflight: get("exchange.inflight"),
            average: get("exchange.average"),
            ranks,
        }
    }
}

/// The per-bucket wire states as one record over the whole gradient.
pub fn wire_record(buckets: &[Bucket], states: Vec<CodecState>, n: usize) -> Option<WireRecord> {
    // one bucket of the whole gradient is the layout builds before the buckets wrote
    let whole = buckets.len() == 1 && buckets[0].range == (0..n);
    let mut rec = WireRecord {
        local: vec![0.0; n],
        owned: Vec::new(),
        buckets: (!whole).then(|| buckets.iter().map(|b| b.range.clone()).collect()),
    };
    for (b, s) in buckets.iter().zip(states) {
        let CodecState::Wire { local, owned } = s else {
            return None;
        };
        rec.local[b.range.clone()].copy_from_slice(&local);
        rec.owned.extend(owned);
    }
    Some(rec)
}

/// A wire record as per-bucket states for `buckets` (on rank `rank` of `ranks`). When the
/// record's buckets differ from these, each owner residual is added to the local residual at
/// its place: what is not yet delivered is kept (it travels in the next step), though not
/// bit for bit as the straight run would have sent it.
pub fn wire_states(
    rec: &WireRecord,
    buckets: &[Bucket],
    rank: usize,
    ranks: usize,
) -> anyhow::Result<Vec<CodecState>> {
    let n: usize = buckets.iter().map(|b| b.range.len()).sum();
    anyhow::ensure!(
        rec.local.len() == n,
        "the checkpoint's error feedback has {} values, the model {n}",
        rec.local.len()
    );
    let now: Vec<Range<usize>> = buckets.iter().map(|b| b.range.clone()).collect();
    let then: Vec<Range<usize>> = rec
        .buckets
        .clone()
        .unwrap_or_else(|| std::iter::once(0..n).collect());
    let owned_at = |bs: &[Range<usize>]| -> Vec<Range<usize>> {
        bs.iter()
            .map(|b| {
                let s = &segments(b.len(), ranks)[rank];
                b.start + s.start..b.start + s.end
            })
            .collect()
    };
    let mut local = rec.local.clone();
    let mut owned = Vec::new();
    if then == now {
        owned = rec.owned.clone();
    } else {
        let mut at = 0;
        for r in owned_at(&then) {
            let part = rec
                .owned
                .get(at..at + r.len())
                .context("the checkpoint's owner residuals are short")?;
            for (l, o) in local[r.clone()].iter_mut().zip(part) {
                *l += o;
            }
            at += r.len();
        }
        owned.resize(owned_at(&now).iter().map(|r| r.len()).sum(), 0.0);
    }
    let mut at = 0;
    let mut out = Vec::new();
    for (b, o) in now.iter().zip(owned_at(&now)) {
        let part = owned
            .get(at..at + o.len())
            .context("the checkpoint's owner residuals are short")?;
        at += o.len();
        out.push(CodecState::Wire {
            local: local[b.clone()].to_vec(),
            owned: part.to_vec(),
        });
    }
    Ok(out)
}

/// The per-bucket PowerSGD states as one over the whole gradient (matrices in offset order).
pub fn powersgd_record(buckets: &[Bucket], states: Vec<CodecState>) -> Option<PowerSgdState> {
    let mut by_start: Vec<(usize, PowerSgdState)> = Vec::new();
    for (b, s) in buckets.iter().zip(states) {
        let CodecState::PowerSgd(p) = s else {
            return None;
        };
        by_start.push((b.range.start, p));
    }
    by_start.sort_by_key(|(s, _)| *s);
    let mut out = PowerSgdState {
        step: by_start.first().map_or(0, |(_, p)| p.step),
        q: Vec::new(),
        residual: Vec::new(),
    };
    for (_, p) in by_start {
        out.q.extend(p.q);
        out.residual.extend(p.residual);
    }
    Some(out)
}

/// A whole-gradient PowerSGD state cut into per-bucket states shaped like `like` (the codecs'
/// current states, in bucket order).
pub fn powersgd_states(
    rec: &PowerSgdState,
    buckets: &[Bucket],
    like: &[CodecState],
) -> anyhow::Result<Vec<CodecState>> {
    let mut order: Vec<usize> = (0..buckets.len()).collect();
    order.sort_by_key(|&i| buckets[i].range.start);
    let mut out = vec![CodecState::None; buckets.len()];
    let (mut q_at, mut e_at) = (0, 0);
    for i in order {
        let CodecState::PowerSgd(shape) = &like[i] else {
            anyhow::bail!("bucket {i}'s codec is not PowerSGD");
        };
        let (nq, ne) = (shape.q.len(), shape.residual.len());
        let q = rec
            .q
            .get(q_at..q_at + nq)
            .context("the checkpoint's PowerSGD state has fewer matrices than the model")?;
        let residual = rec
            .residual
            .get(e_at..e_at + ne)
            .context("the checkpoint's PowerSGD residual is short")?;
        out[i] = CodecState::PowerSgd(PowerSgdState {
            step: rec.step,
            q: q.to_vec(),
            residual: residual.to_vec(),
        });
        q_at += nq;
        e_at += ne;
    }
    anyhow::ensure!(
        q_at == rec.q.len() && e_at == rec.residual.len(),
        "the checkpoint's PowerSGD state is larger than the model's"
    );
    Ok(out)
}

/// A u64 as two f32 words (their bits), for a checkpoint's f32 tensors.
pub fn u64_words(x: u64) -> Vec<f32> {
    vec![f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)]
}

/// The u64 of [`u64_words`] (0 when the tensor is not two words).
pub fn words_u64(v: &[f32]) -> u64 {
    match v {
        [lo, hi] => u64::from(lo.to_bits()) | (u64::from(hi.to_bits()) << 32),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_tensor_names_and_round_trip() {
        let rank1 = RankRecord {
            since: Some(96),
            wire: Some(WireRecord {
                local: vec![0.5, -1.0, 2.0],
                owned: vec![0.25],
                buckets: None,
            }),
            ..Default::default()
        };
        let rec = ExchangeRecord {
            inflight: Some(vec![1.0, 2.0]),
            average: None,
            ranks: vec![RankRecord::default(), rank1.clone()],
        };
        let t = rec.to_tensors();
        let names: Vec<&str> = t.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "exchange.inflight",
                "rank1.since",
                "rank1.ef.local",
                "rank1.ef.owned"
            ]
        );
        let back = ExchangeRecord::from_tensors(&t, 1);
        assert_eq!(back.inflight, rec.inflight);
        assert_eq!(back.ranks[1], rank1);
    }

    #[test]
    fn wire_residuals_move_between_bucket_layouts_keeping_their_sum() {
        let one = [Bucket {
            range: 0..10,
            layer: 0,
        }];
        let two = [
            Bucket {
                range: 4..10,
                layer: 1,
            },
            Bucket {
                range: 0..4,
                layer: 0,
            },
        ];
        let (rank, ranks) = (1, 2);
        let local: Vec<f32> = (0..10).map(|i| i as f32).collect();
        // rank 1 owns 5..10 of one bucket
        let rec = WireRecord {
            local: local.clone(),
            owned: vec![100.0; 5],
            buckets: None,
        };
        // the same layout: as saved
        let same = wire_states(&rec, &one, rank, ranks).unwrap();
        assert_eq!(
            same,
            vec![CodecState::Wire {
                local: local.clone(),
                owned: vec![100.0; 5]
            }]
        );
        // another layout: the owner residuals join the local residual
        let moved = wire_states(&rec, &two, rank, ranks).unwrap();
        let back = wire_record(&two, moved, 10).unwrap();
        let total = |r: &WireRecord| r.local.iter().chain(&r.owned).sum::<f32>();
        assert_eq!(total(&back), total(&rec));
        assert!(back.owned.iter().all(|v| *v == 0.0));
    }
}
