//! Fault injection for the reliability tests, through one environment variable:
//! - `DPTRAIN_FAULT=stall:RANK:STEP` makes rank RANK stop (sleep for an hour) before step STEP, so
//!   that the others wait in a collective and the stall watchdog can be seen to act;
//! - `DPTRAIN_FAULT=slow:RANK:F` makes rank RANK's compute take F times as long (F ≥ 1): the step
//!   runs on a [`Slowed`] backend, which sleeps F − 1 times the previous step's compute (as the
//!   step's timing helper measured it, without the sleep) when the step's backward begins, so that
//!   the rank looks like a slower device to the others and to `--balance auto`;
//! - `DPTRAIN_FAULT=jitter:RANK:P:MS` makes P % of rank RANK's steps (drawn by a hash of the step,
//!   and the rank, the same in every run) wait MS milliseconds before they start.
//!
//! Several faults may be given, separated by commas (`jitter:0:30:20,jitter:1:30:20`).
//!
//! Unset (always, outside tests) it costs one cached lookup per step.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use dptrain_kernels::optimizer::UpdateStep;
use dptrain_kernels::reduce_stats::Totals;

use crate::backend::{Backend, Batch, KernelChoices, Split};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Stall { rank: usize, step: u64 },
    Slow { rank: usize, factor: f64 },
    Jitter { rank: usize, percent: u32, ms: u64 },
}

fn parse(s: &str) -> Option<Fault> {
    let mut it = s.split(':');
    let fault = match (it.next()?, it.next()?, it.next()?) {
        ("stall", r, st) => Fault::Stall {
            rank: r.parse().ok()?,
            step: st.parse().ok()?,
        },
        ("slow", r, f) => Fault::Slow {
            rank: r.parse().ok()?,
            factor: f
                .parse()
                .ok()
                .filter(|f: &f64| f.is_finite() && *f >= 1.0)?,
        },
        ("jitter", r, p) => Fault::Jitter {
            rank: r.parse().ok()?,
            percent: p.parse().ok().filter(|p: &u32| *p <= 100)?,
            ms: it.next()?.parse().ok()?,
        },
        _ => return None,
    };
    it.next().is_none().then_some(fault)
}

/// The faults asked for: `DPTRAIN_FAULT` holds one, or several separated by commas (each must
/// parse, else none applies).
fn faults() -> &'static [Fault] {
    static F: OnceLock<Vec<Fault>> = OnceLock::new();
    F.get_or_init(|| {
        std::env::var("DPTRAIN_FAULT")
            .ok()
            .and_then(|v| v.split(',').map(parse).collect::<Option<Vec<_>>>())
            .unwrap_or_default()
    })
}

/// Called by every rank before each training step (0-based `step`).
pub fn before_step(rank: usize, step: u64) {
    for f in faults() {
        match *f {
            Fault::Stall { rank: r, step: s } if r == rank && s == step => {
                eprintln!("dptrain: DPTRAIN_FAULT: rank {rank} stalls before step {step}");
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
            Fault::Jitter {
                rank: r,
                percent,
                ms,
            } if r == rank && jittered(rank, step, percent) => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            _ => {}
        }
    }
}

/// Whether `rank`'s `step` is among the `percent` % that wait (a hash of both, fixed across
/// runs: two jittery ranks wait at different steps).
fn jittered(rank: usize, step: u64, percent: u32) -> bool {
    // splitmix64's finaliser
    let mut z = (step ^ ((rank as u64) << 40)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % 100) < u64::from(percent)
}

/// How many times as long `rank`'s compute is to take (`slow:RANK:F`); None: as long as it takes.
pub fn slow_factor(rank: usize) -> Option<f64> {
    faults().iter().find_map(|f| match *f {
        Fault::Slow { rank: r, factor } if r == rank && factor > 1.0 => Some(factor),
        _ => None,
    })
}

/// `slow:RANK:F` on this rank: the factor, and what the slowed backend carries between steps.
#[derive(Debug)]
pub struct SlowClock {
    factor: f64,
    /// The previous step's compute without the sleep that stretched it (seconds).
    last: Cell<f64>,
    /// This step's sleep (seconds), and whether it happened.
    slept: Cell<f64>,
    done: Cell<bool>,
}

impl SlowClock {
    /// The clock of `rank` when `DPTRAIN_FAULT` slows it; None otherwise.
    pub fn for_rank(rank: usize) -> Option<Self> {
        slow_factor(rank).map(|factor| Self {
            factor,
            last: Cell::new(0.0),
            slept: Cell::new(0.0),
            done: Cell::new(false),
        })
    }

    /// The step's compute as the timing helper measured it (its sleep included): kept, without
    /// the sleep, for the next step's.
    pub fn finish(&self, compute: f64) {
        self.last.set((compute - self.slept.get()).max(0.0));
    }
}

/// A backend whose step takes `factor` times as long: at the step's first backward call it sleeps
/// (factor − 1) × the previous step's compute; everything else is delegated as is. Made anew for
/// each step.
pub struct Slowed<'a> {
    inner: &'a mut dyn Backend,
    clock: &'a SlowClock,
}

impl<'a> Slowed<'a> {
    pub fn new(inner: &'a mut dyn Backend, clock: &'a SlowClock) -> Self {
        clock.slept.set(0.0);
        clock.done.set(false);
        Self { inner, clock }
    }

    fn sleep_once(&self) {
        if self.clock.done.replace(true) {
            return;
        }
        let s = (self.clock.factor - 1.0) * self.clock.last.get();
        if s > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(s));
            self.clock.slept.set(s);
        }
    }
}

impl Backend for Slowed<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn set_params(&mut self, theta: &[f32]) -> anyhow::Result<()> {
        self.inner.set_params(theta)
    }
    fn params(&mut self) -> anyhow::Result<Vec<f32>> {
        self.inner.params()
    }
    fn optim_state(&mut self) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
        self.inner.optim_state()
    }
    fn set_optim_state(&mut self, state: &[(String, Vec<f32>)]) -> anyhow::Result<()> {
        self.inner.set_optim_state(state)
    }
    fn set_order(&mut self, order: &[u32]) -> anyhow::Result<()> {
        self.inner.set_order(order)
    }
    fn gather(&mut self, batch: &Batch) -> anyhow::Result<()> {
        self.inner.gather(batch)
    }
    fn forward(&mut self) -> anyhow::Result<()> {
        self.inner.forward()
    }
    fn loss(&mut self) -> anyhow::Result<()> {
        self.inner.loss()
    }
    fn backward(&mut self) -> anyhow::Result<()> {
        self.sleep_once();
        self.inner.backward()
    }
    fn forward_synced(&mut self, sum: &mut dyn crate::model::net::StatSum) -> anyhow::Result<()> {
        self.inner.forward_synced(sum)
    }
    fn backward_synced(&mut self, sum: &mut dyn crate::model::net::StatSum) -> anyhow::Result<()> {
        self.sleep_once();
        self.inner.backward_synced(sum)
    }
    fn read_grads(
        &mut self,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        self.inner.read_grads(range, out, totals)
    }
    fn write_grads(&mut self, range: Range<usize>, g: &[f32]) -> anyhow::Result<()> {
        self.inner.write_grads(range, g)
    }
    fn backward_through(&mut self, layer: usize, first: bool) -> anyhow::Result<()> {
        self.sleep_once();
        self.inner.backward_through(layer, first)
    }
    fn stage_grads(
        &mut self,
        slot: usize,
        range: Range<usize>,
        totals: bool,
    ) -> anyhow::Result<()> {
        self.inner.stage_grads(slot, range, totals)
    }
    fn collect_grads(
        &mut self,
        slot: usize,
        range: Range<usize>,
        out: &mut [f32],
        totals: bool,
    ) -> anyhow::Result<Option<Totals>> {
        self.inner.collect_grads(slot, range, out, totals)
    }
    fn update(&mut self, step: &UpdateStep) -> anyhow::Result<()> {
        self.inner.update(step)
    }
    fn take_step_losses(&mut self) -> anyhow::Result<Vec<f32>> {
        self.inner.take_step_losses()
    }
    fn take_train_totals(&mut self) -> anyhow::Result<Totals> {
        self.inner.take_train_totals()
    }
    fn profile_step(
        &mut self,
        batch: &Batch,
        update: &UpdateStep,
    ) -> anyhow::Result<Option<Vec<(String, f64)>>> {
        self.inner.profile_step(batch, update)
    }
    fn evaluate(&mut self, split: Split, range: Range<usize>) -> anyhow::Result<Totals> {
        self.inner.evaluate(split, range)
    }
    fn tuning_key(&self) -> Option<String> {
        self.inner.tuning_key()
    }
    fn is_hardware(&self) -> bool {
        self.inner.is_hardware()
    }
    fn autotune(
        &mut self,
        known: &KernelChoices,
    ) -> anyhow::Result<Vec<dptrain_kernels::tune::Tuned>> {
        self.inner.autotune(known)
    }
    fn set_kernel_choices(&mut self, choices: &KernelChoices) -> anyhow::Result<()> {
        self.inner.set_kernel_choices(choices)
    }
    fn loss_scale(&mut self) -> anyhow::Result<Option<(f32, u64)>> {
        self.inner.loss_scale()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_faults_parse() {
        assert_eq!(parse("stall:1:5"), Some(Fault::Stall { rank: 1, step: 5 }));
        assert_eq!(
            parse("slow:1:4"),
            Some(Fault::Slow {
                rank: 1,
                factor: 4.0
            })
        );
        assert_eq!(
            parse("slow:0:2.5"),
            Some(Fault::Slow {
                rank: 0,
                factor: 2.5
            })
        );
        assert_eq!(
            parse("jitter:1:30:20"),
            Some(Fault::Jitter {
                rank: 1,
                percent: 30,
                ms: 20
            })
        );
        assert_eq!(parse("jitter:1:130:20"), None);
        assert_eq!(parse("jitter:1:30"), None);
        let hit = (0..10_000).filter(|&s| jittered(1, s, 30)).count();
        assert!(
            (2_700..3_300).contains(&hit),
            "{hit} of 10000 steps at 30 %"
        );
        assert_eq!(parse("stall:x:5"), None);
        assert_eq!(parse("slow:1:0.5"), None);
        assert_eq!(parse("slow:1:inf"), None);
        assert_eq!(parse("slow:1:4:9"), None);
        assert_eq!(parse("boom"), None);
    }
}
