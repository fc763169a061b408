//! The timeline (`--trace FILE`): Chrome trace-event JSON, which opens in Perfetto
//! (ui.perfetto.dev) and chrome://tracing. Each rank is one process of the file (`pid` = rank + 1,
//! named "rank N"; Perfetto treats pid 0 as the kernel's idle task) with one lane (`tid`) each for
//! the training thread, the communication thread and the GPU's kernels. Rank 0 gathers every
//! rank's events and puts them on its own clock, the offsets measured across MPI barriers, so
//! overlap and stragglers show at a glance.
//!
//! Recording is off until [`enable`]; while it is off every call costs one relaxed atomic load and
//! allocates nothing. An event carries microseconds since this process's epoch (the recorder's
//! first use); `distributed::gather::write_trace` brings every rank's events to rank 0, and
//! [`merge`] (`merge.rs`, with the file's own types) shifts them onto rank 0's clock.
//!
//! Lanes follow threads: the thread that called [`enable`] is "training", the thread named
//! `dptrain-comm` (the MPI communication thread) is "communication", [`gpu_kernels`] fills "gpu",
//! and any other thread gets a lane of its own under its name. Events on one lane must nest (a
//! span inside another, or one after another): spans do by construction; [`complete`] events are
//! the caller's to place.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod merge;

pub use merge::{Trace, TraceEvent, TraceMeta, encode, merge, write_merged};

/// The lane of the thread that called [`enable`].
pub const LANE_TRAINING: u32 = 1;
/// The lane of the communication thread.
pub const LANE_COMMUNICATION: u32 = 2;
/// The lane of the GPU's kernels ([`gpu_kernels`]).
pub const LANE_GPU: u32 = 3;
/// Other threads get lanes from here on, in the order they first record.
const LANE_FIRST_OTHER: u32 = 4;
/// The name `distributed/comm/mpi/threaded.rs` gives the MPI communication thread.
const COMM_THREAD: &str = "dptrain-comm";
/// Events kept per process (about 100 bytes each); later ones are counted, not kept, and the
/// file's metadata says so.
pub const DEFAULT_CAP: usize = 2_000_000;
/// Barriers whose exit times give the clock offsets (the median is taken).
pub const SYNC_ROUNDS: usize = 5;

/// What an event is: a span with a duration, a moment, or a counter's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "X")]
    Complete,
    #[serde(rename = "i")]
    Instant,
    #[serde(rename = "C")]
    Counter,
}

/// One recorded event, on this process's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub name: Cow<'static, str>,
    pub cat: Cow<'static, str>,
    pub kind: Kind,
    /// Microseconds since this process's epoch (negative for a moment before it).
    pub ts: f64,
    /// Microseconds (spans only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dur: Option<f64>,
    pub lane: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
}

/// A lane's number and the name it is shown under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneName {
    pub lane: u32,
    pub name: String,
}

/// One rank's events as it sends them to rank 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankTrace {
    pub rank: usize,
    pub host: String,
    /// This rank's clock (µs since its epoch) just after each synchronising barrier.
    pub sync_us: Vec<f64>,
    pub lanes: Vec<LaneName>,
    pub events: Vec<Event>,
    /// Events not kept because the cap was reached.
    pub dropped: u64,
    pub cap: usize,
}

struct Inner {
    events: Vec<Event>,
    /// Each recording thread's lane.
    threads: Vec<(ThreadId, u32)>,
    lanes: Vec<LaneName>,
    training: Option<ThreadId>,
    next_lane: u32,
}

/// An event recorder. The process has one ([`global`]), which the free functions use; tests make
/// their own.
pub struct Recorder {
    on: AtomicBool,
    epoch: OnceLock<Instant>,
    cap: usize,
    dropped: AtomicU64,
    inner: Mutex<Inner>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// Off, keeping up to [`DEFAULT_CAP`] events.
    pub const fn new() -> Self {
        Self::with_cap(DEFAULT_CAP)
    }

    /// Off, keeping up to `cap` events.
    pub const fn with_cap(cap: usize) -> Self {
        Self {
            on: AtomicBool::new(false),
            epoch: OnceLock::new(),
            cap,
            dropped: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                events: Vec::new(),
                threads: Vec::new(),
                lanes: Vec::new(),
                training: None,
                next_lane: LANE_FIRST_OTHER,
            }),
        }
    }

    /// Start recording; the calling thread's events go on the "training" lane.
    pub fn enable(&self) {
        self.epoch();
        {
            let mut g = self.lock();
            let me = std::thread::current().id();
            if g.training != Some(me) {
                // a thread that recorded before keeps its old lane; the training lane is new
                g.threads.retain(|(t, l)| *t != me && *l != LANE_TRAINING);
                g.training = Some(me);
            }
        }
        self.on.store(true, Ordering::Release);
    }

    /// Stop recording (what was recorded stays until taken).
    pub fn disable(&self) {
        self.on.store(false, Ordering::Release);
    }

    /// Whether events are being recorded.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    /// `t` in microseconds since this recorder's epoch.
    pub fn us(&self, t: Instant) -> f64 {
        let e = self.epoch();
        match t.checked_duration_since(e) {
            Some(d) => d.as_secs_f64() * 1e6,
            None => -(e.duration_since(t).as_secs_f64() * 1e6),
        }
    }

    /// Now, in microseconds since this recorder's epoch.
    pub fn now_us(&self) -> f64 {
        self.us(Instant::now())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A span on the calling thread's lane, from now until the guard is dropped.
    #[inline]
    pub fn span(&self, name: impl Into<Cow<'static, str>>, cat: &'static str) -> SpanGuard<'_> {
        if !self.enabled() {
            return SpanGuard { open: None };
        }
        SpanGuard {
            open: Some(Open {
                rec: self,
                name: name.into(),
                cat,
                start: Instant::now(),
                args: None,
            }),
        }
    }

    /// A span measured elsewhere (an allreduce timed on the communication thread, say), on the
    /// calling thread's lane.
    #[inline]
    pub fn complete(
        &self,
        name: impl Into<Cow<'static, str>>,
        cat: &'static str,
        start: Instant,
        dur: Duration,
        args: &[(&'static str, Value)],
    ) {
        if !self.enabled() {
            return;
        }
        let ts = self.us(start);
        self.push(
            None,
            name.into(),
            cat,
            Kind::Complete,
            ts,
            Some(dur),
            args_of(args),
        );
    }

    /// A moment on the calling thread's lane (a stop request, an epoch's end).
    #[inline]
    pub fn instant(&self, name: impl Into<Cow<'static, str>>, cat: &'static str) {
        if !self.enabled() {
            return;
        }
        let ts = self.now_us();
        self.push(None, name.into(), cat, Kind::Instant, ts, None, None);
    }

    /// A counter's value now (the loss, the learning rate, bytes in flight); a value that is not
    /// finite is skipped.
    #[inline]
    pub fn counter(&self, name: &'static str, value: f64) {
        if !self.enabled() || !value.is_finite() {
            return;
        }
        let ts = self.now_us();
        let mut m = Map::new();
        m.insert(name.into(), Value::from(value));
        self.push(
            None,
            name.into(),
            "counter",
            Kind::Counter,
            ts,
            None,
            Some(Value::Object(m)),
        );
    }

    /// GPU kernels timed by timestamp queries, (label, seconds) in execution order (what
    /// `Backend::profile_step` returns), laid back to back on the "gpu" lane inside one
    /// "gpu step" span. The queries give durations, not start times: the kernels are placed to
    /// end when the host saw the work complete (`completed`, after the readback that waited for
    /// it), and never to start before `submitted`.
    pub fn gpu_kernels(&self, submitted: Instant, completed: Instant, kernels: &[(String, f64)]) {
        if !self.enabled() || kernels.is_empty() {
            return;
        }
        let total: f64 = kernels.iter().map(|(_, s)| s.max(0.0) * 1e6).sum();
        let (t0, t1) = (self.us(submitted), self.us(completed));
        let start = (t1 - total).max(t0);
        let mut g = self.lock();
        let mut at = start;
        let step = Event {
            name: "gpu step".into(),
            cat: "gpu".into(),
            kind: Kind::Complete,
            ts: start,
            dur: Some(total),
            lane: LANE_GPU,
            args: Some(serde_json::json!({ "kernels": kernels.len() })),
        };
        self.store(&mut g, step);
        for (label, secs) in kernels {
            let end = at + secs.max(0.0) * 1e6;
            let e = Event {
                name: Cow::Owned(label.clone()),
                cat: "gpu".into(),
                kind: Kind::Complete,
                ts: at,
                // the next kernel starts exactly where this one ends
                dur: Some(end - at),
                lane: LANE_GPU,
                args: None,
            };
            self.store(&mut g, e);
            at = end;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        lane: Option<u32>,
        name: Cow<'static, str>,
        cat: &'static str,
        kind: Kind,
        ts: f64,
        dur: Option<Duration>,
        args: Option<Value>,
    ) {
        let mut g = self.lock();
        let lane = match lane {
            Some(l) => l,
            None => lane_of(&mut g),
        };
        let e = Event {
            name,
            cat: Cow::Borrowed(cat),
            kind,
            ts,
            dur: dur.map(|d| d.as_secs_f64() * 1e6),
            lane,
            args,
        };
        self.store(&mut g, e);
    }

    fn store(&self, g: &mut Inner, e: Event) {
        if g.events.len() < self.cap {
            if e.lane == LANE_GPU && !g.lanes.iter().any(|l| l.lane == LANE_GPU) {
                g.lanes.push(LaneName {
                    lane: LANE_GPU,
                    name: "gpu".into(),
                });
            }
            g.events.push(e);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Everything recorded so far, as rank `rank` sends it (the recorder is left empty).
    pub fn take(&self, rank: usize, sync_us: Vec<f64>) -> RankTrace {
        let mut g = self.lock();
        let events = std::mem::take(&mut g.events);
        RankTrace {
            rank,
            host: crate::store::outputs::host_name().unwrap_or_default(),
            sync_us,
            lanes: g.lanes.clone(),
            events,
            dropped: self.dropped.swap(0, Ordering::Relaxed),
            cap: self.cap,
        }
    }
}

/// The calling thread's lane, assigned on its first event.
fn lane_of(g: &mut Inner) -> u32 {
    let me = std::thread::current();
    if let Some((_, l)) = g.threads.iter().find(|(t, _)| *t == me.id()) {
        return *l;
    }
    let (lane, name) = if g.training == Some(me.id()) {
        (LANE_TRAINING, "training".to_string())
    } else if me.name() == Some(COMM_THREAD) {
        (LANE_COMMUNICATION, "communication".to_string())
    } else {
        let l = g.next_lane;
        g.next_lane += 1;
        let name = me
            .name()
            .map_or_else(|| format!("thread {l}"), str::to_string);
        (l, name)
    };
    g.threads.push((me.id(), lane));
    if !g.lanes.iter().any(|n| n.lane == lane) {
        g.lanes.push(LaneName { lane, name });
    }
    lane
}

fn args_of(args: &[(&'static str, Value)]) -> Option<Value> {
    if args.is_empty() {
        return None;
    }
    Some(Value::Object(
        args.iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect(),
    ))
}

/// A span in progress; it ends (and is recorded) when dropped.
#[must_use = "a span ends when its guard is dropped: bind it (`let _g = ...`)"]
pub struct SpanGuard<'a> {
    open: Option<Open<'a>>,
}

struct Open<'a> {
    rec: &'a Recorder,
    name: Cow<'static, str>,
    cat: &'static str,
    start: Instant,
    args: Option<Map<String, Value>>,
}

impl SpanGuard<'_> {
    /// Attach a value to the span (shown when it is selected); nothing when recording is off.
    pub fn arg(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        if let Some(o) = &mut self.open {
            o.args
                .get_or_insert_with(Map::new)
                .insert(key.into(), value.into());
        }
        self
    }

    /// End the span now.
    pub fn end(self) {}

    /// Run `f` inside the span, then end it.
    pub fn end_after<T>(self, f: impl FnOnce() -> T) -> T {
        let out = f();
        drop(self);
        out
    }
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.open.take()
            && o.rec.enabled()
        {
            let dur = o.start.elapsed();
            let ts = o.rec.us(o.start);
            o.rec.push(
                None,
                o.name,
                o.cat,
                Kind::Complete,
                ts,
                Some(dur),
                o.args.map(Value::Object),
            );
        }
    }
}

/// The process's recorder.
pub fn global() -> &'static Recorder {
    static GLOBAL: Recorder = Recorder::new();
    &GLOBAL
}

/// Start recording (the calling thread is the "training" lane).
pub fn enable() {
    global().enable();
}

/// Stop recording.
pub fn disable() {
    global().disable();
}

/// Whether events are being recorded (to skip building a name that would be thrown away).
#[inline]
pub fn enabled() -> bool {
    global().enabled()
}

/// A span on the calling thread's lane until the guard is dropped.
#[inline]
pub fn span(name: impl Into<Cow<'static, str>>, cat: &'static str) -> SpanGuard<'static> {
    global().span(name, cat)
}

/// Run `f` inside a span named `name` (category "phase").
#[inline]
pub fn instrument_phase<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let _g = span(name, "phase");
    f()
}

/// A span measured elsewhere, on the calling thread's lane.
#[inline]
pub fn complete(
    name: impl Into<Cow<'static, str>>,
    cat: &'static str,
    start: Instant,
    dur: Duration,
    args: &[(&'static str, Value)],
) {
    global().complete(name, cat, start, dur, args);
}

/// A moment on the calling thread's lane.
#[inline]
pub fn instant(name: impl Into<Cow<'static, str>>, cat: &'static str) {
    global().instant(name, cat);
}

/// A counter's value now.
#[inline]
pub fn counter(name: &'static str, value: f64) {
    global().counter(name, value);
}

/// GPU kernels on the "gpu" lane (see [`Recorder::gpu_kernels`]).
pub fn gpu_kernels(submitted: Instant, completed: Instant, kernels: &[(String, f64)]) {
    global().gpu_kernels(submitted, completed, kernels);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleep_us(us: u64) {
        std::thread::sleep(Duration::from_micros(us));
    }

    #[test]
    fn off_records_nothing_and_allocates_nothing() {
        let r = Recorder::new();
        {
            let _g = r.span("phase", "phase").arg("bucket", 3);
            r.complete("allreduce", "comm", Instant::now(), Duration::ZERO, &[]);
            r.instant("stop", "run");
            r.counter("loss", 0.5);
            r.gpu_kernels(Instant::now(), Instant::now(), &[("k".into(), 1e-6)]);
        }
        let t = r.take(0, vec![]);
        assert!(t.events.is_empty() && t.lanes.is_empty() && t.dropped == 0);
        let g = r.lock();
        assert_eq!(g.events.capacity(), 0, "the recorder allocated while off");
        assert!(g.threads.is_empty());
    }

    #[test]
    fn spans_nest_on_one_lane() {
        let r = Recorder::new();
        r.enable();
        {
            let _outer = r.span("step", "phase").arg("step", 7);
            sleep_us(200);
            {
                let _inner = r.span(format!("bucket {}", 0), "exchange");
                sleep_us(200);
            }
            sleep_us(200);
        }
        let t = r.take(0, vec![]);
        assert_eq!(t.events.len(), 2);
        // the inner span ends first, so it is recorded first
        let (inner, outer) = (&t.events[0], &t.events[1]);
        assert_eq!((&*inner.name, &*outer.name), ("bucket 0", "step"));
        assert_eq!(inner.lane, LANE_TRAINING);
        assert_eq!(outer.lane, LANE_TRAINING);
        assert!(outer.ts <= inner.ts);
        let end = |e: &Event| e.ts + e.dur.unwrap();
        assert!(end(inner) <= end(outer));
        assert!(inner.dur.unwrap() >= 200.0 && outer.dur.unwrap() >= 600.0);
        assert_eq!(outer.args, Some(serde_json::json!({ "step": 7 })));
        assert_eq!(
            t.lanes,
            vec![LaneName {
                lane: LANE_TRAINING,
                name: "training".into()
            }]
        );
        // after a merge the parent comes first and holds the child
        let m = merge(vec![t]);
        let x: Vec<&TraceEvent> = m.trace_events.iter().filter(|e| e.ph == "X").collect();
        assert_eq!((&*x[0].name, &*x[1].name), ("step", "bucket 0"));
        assert!(x[0].ts <= x[1].ts);
        assert!(x[1].ts + x[1].dur.unwrap() <= x[0].ts + x[0].dur.unwrap() + 1e-9);
    }

    #[test]
    fn threads_get_lanes_by_name() {
        let r = Recorder::new();
        r.enable();
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(COMM_THREAD.into())
                .spawn_scoped(s, || {
                    let t = Instant::now();
                    sleep_us(50);
                    r.complete(
                        "allreduce",
                        "comm",
                        t,
                        t.elapsed(),
                        &[("floats", Value::from(1024))],
                    );
                })
                .unwrap()
                .join()
                .unwrap();
            std::thread::Builder::new()
                .name("loader".into())
                .spawn_scoped(s, || {
                    let _g = r.span("prefetch", "data");
                })
                .unwrap()
                .join()
                .unwrap();
        });
        r.span("step", "phase").end();
        let t = r.take(0, vec![]);
        let lane = |n: &str| t.events.iter().find(|e| e.name == n).unwrap().lane;
        assert_eq!(lane("allreduce"), LANE_COMMUNICATION);
        assert_eq!(lane("prefetch"), LANE_FIRST_OTHER);
        assert_eq!(lane("step"), LANE_TRAINING);
        let mut names: Vec<(u32, &str)> =
            t.lanes.iter().map(|l| (l.lane, l.name.as_str())).collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                (LANE_TRAINING, "training"),
                (LANE_COMMUNICATION, "communication"),
                (LANE_FIRST_OTHER, "loader")
            ]
        );
        let ar = t.events.iter().find(|e| e.name == "allreduce").unwrap();
        assert_eq!(ar.args, Some(serde_json::json!({ "floats": 1024 })));
        assert!(ar.dur.unwrap() >= 50.0);
    }

    #[test]
    fn gpu_kernels_end_when_the_host_saw_them_complete() {
        let r = Recorder::new();
        r.enable();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(10);
        let k = vec![
            ("forward".to_string(), 0.002),
            ("backward".to_string(), 0.003),
            ("update".to_string(), 0.001),
        ];
        r.gpu_kernels(t0, t1, &k);
        let t = r.take(0, vec![]);
        let (s0, s1) = (r.us(t0), r.us(t1));
        assert_eq!(t.events.len(), 4);
        assert!(t.events.iter().all(|e| e.lane == LANE_GPU));
        assert_eq!(
            t.lanes,
            vec![LaneName {
                lane: LANE_GPU,
                name: "gpu".into()
            }]
        );
        let step = &t.events[0];
        assert_eq!(step.name, "gpu step");
        assert!((step.ts - (s1 - 6000.0)).abs() < 1e-6);
        assert!((step.dur.unwrap() - 6000.0).abs() < 1e-6);
        for w in t.events[1..].windows(2) {
            assert_eq!(w[0].ts + w[0].dur.unwrap(), w[1].ts, "back to back");
        }
        let last = t.events.last().unwrap();
        assert!((last.ts + last.dur.unwrap() - s1).abs() < 1e-6);
        // more kernel time than the host waited: they start at the submission
        r.gpu_kernels(t0, t0 + Duration::from_millis(1), &k);
        let t = r.take(0, vec![]);
        assert!((t.events[0].ts - s0).abs() < 1e-6);
    }

    #[test]
    fn the_cap_keeps_the_first_events_and_counts_the_rest() {
        let r = Recorder::with_cap(3);
        r.enable();
        for i in 0..5 {
            r.counter("loss", f64::from(i));
        }
        r.counter("nan", f64::NAN);
        let t = r.take(0, vec![]);
        assert_eq!(t.events.len(), 3);
        assert_eq!(t.dropped, 2);
        assert_eq!(t.events[2].args, Some(serde_json::json!({ "loss": 2.0 })));
        let m = merge(vec![t]);
        assert!(m.metadata.capped);
        assert_eq!(m.metadata.event_cap_per_rank, 3);
        // taken: the count starts again
        assert_eq!(r.take(0, vec![]).dropped, 0);
    }

    #[test]
    fn instrument_phase_returns_the_closures_value() {
        // the global recorder is off in the library's tests: only the value comes back
        assert_eq!(instrument_phase("forward", || 41 + 1), 42);
    }
}
