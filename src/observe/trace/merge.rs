//! The trace file: every rank's events put on rank 0's clock and written as one Chrome trace-event
//! JSON file. Each rank sends its [`RankTrace`] to rank 0 ([`encode`]); rank 0 takes the median of
//! the clock differences its barriers measured as each rank's offset ([`merge`]), names each rank's
//! process and lanes, and writes the file atomically ([`write_merged`]). The file's own types
//! ([`Trace`], [`TraceEvent`], [`TraceMeta`]) are what Perfetto and chrome://tracing read.

use std::borrow::Cow;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use super::{DEFAULT_CAP, Kind, LANE_TRAINING, RankTrace};

/// This rank's events as they travel to rank 0 (a warning when some were dropped).
pub fn encode(mine: &RankTrace) -> anyhow::Result<Vec<u8>> {
    if mine.dropped > 0 {
        tracing::warn!(
            "trace: rank {} kept its first {} events and dropped {} more",
            mine.rank,
            mine.events.len(),
            mine.dropped
        );
    }
    serde_json::to_vec(mine).context("serialising this rank's trace")
}

/// Rank 0, with every rank's [`encode`]d events in rank order: merge them onto its clock
/// ([`merge`]) and write `path` atomically.
pub fn write_merged(parts: &[Vec<u8>], path: &Path) -> anyhow::Result<()> {
    let per_rank = parts
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice::<RankTrace>(b)
                .with_context(|| format!("reading rank {r}'s trace"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let json = serde_json::to_vec(&merge(per_rank)).context("serialising the trace")?;
    crate::store::atomic::write_atomic(path, &json)
        .with_context(|| format!("writing the trace {}", path.display()))?;
    Ok(())
}

/// One event of the written file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceEvent {
    pub name: Cow<'static, str>,
    pub cat: Cow<'static, str>,
    pub ph: &'static str,
    /// Microseconds on the merged clock.
    pub ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dur: Option<f64>,
    pub pid: usize,
    pub tid: u32,
    /// An instant's scope ("t": its thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
}

/// What the file says about itself (its "metadata" object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceMeta {
    pub tool: String,
    pub ranks: usize,
    pub clock: &'static str,
    /// Added to each rank's times to put them on rank 0's clock (µs).
    pub clock_offset_us: Vec<f64>,
    /// The spread of each rank's offset over the barriers (µs): how far to trust it.
    pub clock_uncertainty_us: Vec<f64>,
    /// Subtracted from every time after the offsets, so that the file starts at 0 (µs).
    pub origin_us: f64,
    pub hosts: Vec<String>,
    /// Events kept per rank.
    pub events: Vec<usize>,
    /// Events dropped per rank once its cap was reached.
    pub dropped_events: Vec<u64>,
    pub capped: bool,
    pub event_cap_per_rank: usize,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trace {
    #[serde(rename = "traceEvents")]
    pub trace_events: Vec<TraceEvent>,
    #[serde(rename = "displayTimeUnit")]
    pub display_time_unit: &'static str,
    pub metadata: TraceMeta,
}

/// (the median, the spread) of `reference[k] - mine[k]`: what to add to this rank's clock to get
/// the reference's. (0, 0) without measurements.
fn clock_offset(reference: &[f64], mine: &[f64]) -> (f64, f64) {
    let mut d: Vec<f64> = reference.iter().zip(mine).map(|(r, m)| r - m).collect();
    if d.is_empty() {
        return (0.0, 0.0);
    }
    d.sort_by(f64::total_cmp);
    let n = d.len();
    let median = if n % 2 == 1 {
        d[n / 2]
    } else {
        (d[n / 2 - 1] + d[n / 2]) / 2.0
    };
    (median, d[n - 1] - d[0])
}

/// Times to whole nanoseconds (the finest a viewer shows), so that spans that touch still touch.
fn ns(us: f64) -> f64 {
    (us * 1e3).round() / 1e3
}

/// Every rank's events on rank 0's clock, each rank a process (`pid` rank + 1) with named lanes,
/// sorted by process, lane and time (a parent before the spans it holds).
pub fn merge(mut per_rank: Vec<RankTrace>) -> Trace {
    per_rank.sort_by_key(|r| r.rank);
    let reference = per_rank
        .iter()
        .find(|r| r.rank == 0)
        .or(per_rank.first())
        .map(|r| r.sync_us.clone())
        .unwrap_or_default();
    let offsets: Vec<(f64, f64)> = per_rank
        .iter()
        .map(|r| clock_offset(&reference, &r.sync_us))
        .collect();
    let origin = per_rank
        .iter()
        .zip(&offsets)
        .flat_map(|(r, (o, _))| r.events.iter().map(move |e| e.ts + o))
        .fold(0.0f64, f64::min);
    let mut meta = TraceMeta {
        tool: format!("dptrain {}", env!("CARGO_PKG_VERSION")),
        ranks: per_rank.len(),
        clock: "rank 0's; each rank's offset is the median over barriers of rank 0's clock minus its own at the barrier's exit",
        clock_offset_us: offsets.iter().map(|o| ns(o.0)).collect(),
        clock_uncertainty_us: offsets.iter().map(|o| ns(o.1)).collect(),
        origin_us: origin,
        hosts: Vec::new(),
        events: Vec::new(),
        dropped_events: Vec::new(),
        capped: false,
        event_cap_per_rank: per_rank.iter().map(|r| r.cap).max().unwrap_or(DEFAULT_CAP),
    };
    let mut head = Vec::new();
    let mut body = Vec::new();
    for (r, (offset, _)) in per_rank.into_iter().zip(offsets) {
        let pid = r.rank + 1;
        let m = |name: &'static str, tid: u32, args: Value| TraceEvent {
            name: name.into(),
            cat: "__metadata".into(),
            ph: "M",
            ts: 0.0,
            dur: None,
            pid,
            tid,
            s: None,
            args: Some(args),
        };
        head.push(m(
            "process_name",
            0,
            serde_json::json!({ "name": format!("rank {}", r.rank) }),
        ));
        head.push(m(
            "process_sort_index",
            0,
            serde_json::json!({ "sort_index": r.rank }),
        ));
        if !r.host.is_empty() {
            head.push(m(
                "process_labels",
                0,
                serde_json::json!({ "labels": r.host }),
            ));
        }
        let mut lanes = r.lanes.clone();
        lanes.sort_by_key(|l| l.lane);
        for l in &lanes {
            head.push(m(
                "thread_name",
                l.lane,
                serde_json::json!({ "name": l.name }),
            ));
            head.push(m(
                "thread_sort_index",
                l.lane,
                serde_json::json!({ "sort_index": l.lane }),
            ));
        }
        meta.hosts.push(r.host);
        meta.events.push(r.events.len());
        meta.dropped_events.push(r.dropped);
        meta.capped |= r.dropped > 0;
        if r.dropped > 0 {
            let last = r.events.iter().map(|e| e.ts).fold(0.0f64, f64::max);
            body.push(TraceEvent {
                name: format!("trace capped: {} later events dropped", r.dropped).into(),
                cat: "trace".into(),
                ph: "i",
                ts: ns(last + offset - origin),
                dur: None,
                pid,
                tid: LANE_TRAINING,
                s: Some("p"),
                args: None,
            });
        }
        for e in r.events {
            let ts = e.ts + offset - origin;
            let (ph, dur, s) = match e.kind {
                Kind::Complete => {
                    let end = ns(ts + e.dur.unwrap_or(0.0).max(0.0));
                    ("X", Some(end - ns(ts)), None)
                }
                Kind::Instant => ("i", None, Some("t")),
                Kind::Counter => ("C", None, None),
            };
            body.push(TraceEvent {
                name: e.name,
                cat: e.cat,
                ph,
                ts: ns(ts),
                dur: dur.map(ns),
                pid,
                tid: e.lane,
                s,
                args: e.args,
            });
        }
    }
    body.sort_by(|a, b| {
        (a.pid, a.tid)
            .cmp(&(b.pid, b.tid))
            .then(a.ts.total_cmp(&b.ts))
            .then(b.dur.unwrap_or(0.0).total_cmp(&a.dur.unwrap_or(0.0)))
    });
    head.extend(body);
    Trace {
        trace_events: head,
        display_time_unit: "ms",
        metadata: meta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::trace::{Event, LaneName};

    fn ev(name: &'static str, ts: f64, dur: f64, lane: u32) -> Event {
        Event {
            name: name.into(),
            cat: "phase".into(),
            kind: Kind::Complete,
            ts,
            dur: Some(dur),
            lane,
            args: None,
        }
    }

    #[test]
    fn merge_puts_every_rank_on_rank_0s_clock() {
        // rank 1 started 1000 µs later than rank 0, so its clock reads 1000 µs less at the same
        // moment; one barrier's exit was 5 µs late on rank 1 (the median ignores it)
        let lanes = vec![LaneName {
            lane: LANE_TRAINING,
            name: "training".into(),
        }];
        let r0 = RankTrace {
            rank: 0,
            host: "a".into(),
            sync_us: vec![5000.0, 5100.0, 5200.0],
            lanes: lanes.clone(),
            events: vec![ev("forward", 2000.0, 10.0, LANE_TRAINING)],
            dropped: 0,
            cap: DEFAULT_CAP,
        };
        let r1 = RankTrace {
            rank: 1,
            host: "b".into(),
            sync_us: vec![4000.0, 4105.0, 4200.0],
            lanes,
            events: vec![
                ev("forward", 1500.0, 10.0, LANE_TRAINING),
                ev("backward", 1000.0, 20.0, LANE_TRAINING),
            ],
            dropped: 2,
            cap: DEFAULT_CAP,
        };
        // given in either order
        let m = merge(vec![r1, r0]);
        assert_eq!(m.metadata.clock_offset_us, vec![0.0, 1000.0]);
        assert_eq!(m.metadata.clock_uncertainty_us, vec![0.0, 5.0]);
        assert_eq!(m.metadata.origin_us, 0.0);
        assert_eq!(m.metadata.hosts, vec!["a", "b"]);
        assert_eq!(m.metadata.events, vec![1, 2]);
        assert_eq!(m.metadata.dropped_events, vec![0, 2]);
        assert!(m.metadata.capped);
        let find = |pid: usize, name: &str| {
            m.trace_events
                .iter()
                .find(|e| e.pid == pid && e.name == name)
                .unwrap_or_else(|| panic!("{name} on pid {pid}"))
        };
        assert_eq!(find(1, "forward").ts, 2000.0);
        assert_eq!(find(2, "forward").ts, 2500.0);
        assert_eq!(find(2, "backward").ts, 2000.0);
        assert_eq!(find(2, "backward").dur, Some(20.0));
        // sorted per lane, metadata first
        let b = m.trace_events.iter().position(|e| e.ph != "M").unwrap();
        assert!(m.trace_events[b..].iter().all(|e| e.ph != "M"));
        let p2: Vec<f64> = m.trace_events[b..]
            .iter()
            .filter(|e| e.pid == 2 && e.ph == "X")
            .map(|e| e.ts)
            .collect();
        assert_eq!(p2, vec![2000.0, 2500.0]);
        assert!(
            m.trace_events
                .iter()
                .any(|e| e.pid == 2 && e.name.starts_with("trace capped"))
        );
        assert_eq!(
            find(2, "process_name").args,
            Some(serde_json::json!({ "name": "rank 1" }))
        );

        // a rank whose events land before rank 0's epoch moves the origin, not the spacing
        let early = RankTrace {
            rank: 1,
            sync_us: vec![0.0],
            events: vec![ev("gather", 100.0, 1.0, LANE_TRAINING)],
            ..Default::default()
        };
        let zero = RankTrace {
            rank: 0,
            sync_us: vec![50.0],
            events: vec![ev("gather", 0.0, 1.0, LANE_TRAINING)],
            ..Default::default()
        };
        let m = merge(vec![zero, early]);
        assert_eq!(m.metadata.origin_us, 0.0);
        assert_eq!(find_ts(&m, 2, "gather") - find_ts(&m, 1, "gather"), 150.0);
        let rank1_first = RankTrace {
            rank: 1,
            sync_us: vec![500.0],
            events: vec![ev("gather", 100.0, 1.0, LANE_TRAINING)],
            ..Default::default()
        };
        let zero = RankTrace {
            rank: 0,
            sync_us: vec![50.0],
            events: vec![ev("gather", 0.0, 1.0, LANE_TRAINING)],
            ..Default::default()
        };
        let m = merge(vec![zero, rank1_first]);
        // rank 1's gather at 100 - 450 = -350 on rank 0's clock: the file starts there
        assert_eq!(m.metadata.origin_us, -350.0);
        assert_eq!(find_ts(&m, 2, "gather"), 0.0);
        assert_eq!(find_ts(&m, 1, "gather"), 350.0);
    }

    fn find_ts(m: &Trace, pid: usize, name: &str) -> f64 {
        m.trace_events
            .iter()
            .find(|e| e.pid == pid && e.name == name)
            .unwrap()
            .ts
    }
}
