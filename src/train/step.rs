//! THE STEP. One optimiser step of one rank, read top to bottom: for each micro-batch of this
//! rank's rows, gather → forward → loss → backward; the last micro-batch's backward runs bucket
//! by bucket, and the exchange starts each bucket's sum over the ranks as soon as its layers are
//! done, so that the gradients travel while backward goes on; then the sums arrive; then the
//! update; then, in local SGD, the parameter average. With `--staleness 1` the update applies
//! the previous step's sums instead ([`Stepper::delayed`]). Timing, idle and compute accounting
//! are the `PhaseTimes` helper's business.

use std::time::Instant;

use serde::Serialize;

use dptrain_kernels::reduce_stats::Totals;

use super::config::TrainConfig;
use super::plan::StepPlan;
use crate::backend::Backend;
use crate::distributed::comm::Communicator;
use crate::distributed::exchange::{Exchange, Summed};
use crate::distributed::fault::{SlowClock, Slowed};
use crate::optim::{LearningRate, OptimConfig, Schedule};

/// The step loop's machinery, shared by `train` and `dptrain bench`: one call per optimiser step.
pub struct Stepper {
    pub plan: StepPlan,
    /// The one learning rate: the schedule times the rollback scale.
    pub lr: LearningRate,
    optim: OptimConfig,
    pub exchange: Exchange,
    total_steps: u64,
    pub phases: PhaseTimes,
    /// The rate of the last update: the value reports show.
    pub last_lr: f64,
    /// `DPTRAIN_FAULT=slow:RANK:F` on this rank: the step runs on a [`Slowed`] backend.
    slow: Option<SlowClock>,
    /// `--staleness 1`: wait for the sums in flight at each epoch's end (the trainer; `bench`
    /// repeats a one-step epoch and turns it off).
    pub drain_at_epoch_end: bool,
    /// `--sync-bn`: BatchNorm's statistics are summed over ranks inside forward and backward, so
    /// every rank runs as many micro-batches as the busiest one (empty ones where it has no rows).
    sync_bn: bool,
}

/// SyncBatchNorm's sums over the ranks: an allreduce on the run's communicator, in program
/// order with the gradient buckets (the communication thread keeps that order).
struct CommSum<'a>(&'a dyn Communicator);

impl crate::model::net::StatSum for CommSum<'_> {
    fn sum(&mut self, v: &mut [f64]) -> anyhow::Result<()> {
        self.0.allreduce_sum_f64(v)
    }
}

impl Stepper {
    pub fn new(cfg: &TrainConfig, plan: StepPlan, total_steps: u64, n_params: usize) -> Self {
        let schedule = Schedule {
            kind: cfg.schedule,
            base_lr: cfg.lr,
            warmup: cfg.warmup,
            step_size: cfg.step_size * plan.steps_per_epoch,
            gamma: cfg.gamma,
            min_lr: cfg.min_lr,
            total_steps,
        };
        Self {
            plan,
            lr: LearningRate::new(schedule),
            optim: cfg.optim,
            exchange: Exchange::new(&cfg.exchange, n_params, plan.ranks()),
            total_steps,
            phases: PhaseTimes::default(),
            last_lr: 0.0,
            slow: SlowClock::for_rank(plan.rank()),
            drain_at_epoch_end: true,
            sync_bn: cfg.sync_bn && plan.ranks() > 1,
        }
    }

    /// Global step `step`, the `s`-th of its epoch. Returns what the exchange summed: the step's
    /// totals over all ranks when they travelled with the gradients, and whether to stop.
    pub fn step(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        s: u64,
        step: u64,
    ) -> anyhow::Result<Summed> {
        let _span = crate::observe::trace::span("step", "step").arg("step", step + 1);
        let clock = self.slow.take();
        let mut slowed;
        let backend: &mut dyn Backend = match &clock {
            Some(c) => {
                slowed = Slowed::new(backend, c);
                &mut slowed
            }
            None => backend,
        };
        let out = self.step_on(backend, comm, s, step);
        if let (Some(c), Ok(_)) = (&clock, &out) {
            c.finish(self.phases.last_compute);
        }
        self.slow = clock;
        out
    }

    /// [`Stepper::step`] on the backend it chose.
    fn step_on(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        s: u64,
        step: u64,
    ) -> anyhow::Result<Summed> {
        let (t, ex) = (&mut self.phases, &mut self.exchange);
        let started = Instant::now();
        let idle = ex.times.idle();
        let (mine, all) = (self.plan.mine(s).1, self.plan.global_rows(s));
        let sync_bn = self.sync_bn;
        let batches = if sync_bn {
            self.plan.micro_batches_padded(s, step)
        } else {
            self.plan.micro_batches(s, step)
        };
        let mut sum = CommSum(comm);
        for (i, b) in batches.iter().enumerate() {
            t.time(StepPhase::Gather, || backend.gather(b))?;
            t.time(StepPhase::Forward, || match sync_bn {
                true => backend.forward_synced(&mut sum),
                false => backend.forward(),
            })?;
            t.time(StepPhase::Loss, || backend.loss())?;
            if i + 1 < batches.len() || sync_bn {
                t.time(StepPhase::Backward, || match sync_bn {
                    true => backend.backward_synced(&mut sum),
                    false => backend.backward(),
                })?;
            }
        }
        // the last backward, bucket by bucket when the gradients travel: each bucket's exchange
        // starts as soon as its layers are done
        ex.begin(mine);
        if ex.bucketed() {
            let layers: Vec<usize> = ex.buckets().iter().map(|b| b.layer).collect();
            for (i, layer) in layers.into_iter().enumerate() {
                if mine > 0 && !sync_bn {
                    let _g = crate::observe::trace::span("backward", "phase").arg("bucket", i);
                    t.time_quietly(StepPhase::Backward, || {
                        backend.backward_through(layer, i == 0)
                    })?;
                }
                // timed as exchange; its readback and send have spans of their own
                t.time_quietly(StepPhase::Exchange, || ex.bucket_ready(backend, comm, i))?;
            }
        } else if mine > 0 && !sync_bn {
            t.time(StepPhase::Backward, || backend.backward())?;
        }
        if ex.delayed() {
            let prev = t.time(StepPhase::Exchange, || {
                ex.delayed_gradients(backend, comm, step)
            })?;
            t.computed(started, ex.times.idle() - idle);
            return self.delayed(backend, comm, s, step, prev);
        }
        let summed = t.time(StepPhase::Exchange, || {
            ex.gradients(backend, comm, mine, all)
        })?;
        t.computed(started, ex.times.idle() - idle);
        self.last_lr = self.lr.at(step);
        let update = self.optim.update(self.last_lr, step, summed.samples);
        if summed.samples > 0 {
            t.time(StepPhase::Update, || backend.update(&update))?;
        }
        let total = self.total_steps;
        let stop = t.time(StepPhase::Average, || {
            ex.average_if_due(backend, comm, step + 1, total)
        })?;
        Ok(Summed {
            stop: summed.stop || stop,
            ..summed
        })
    }

    /// `--staleness 1`, after the step's backward: this step's sums are in flight, and `prev`,
    /// the previous step's sums, arrived meanwhile, make the update, at the previous step's rate
    /// and count (so that the optimizer sees the same sequence of updates as synchronous SGD,
    /// each gradient one step older). At an epoch's or the run's last step nothing stays in
    /// flight: this step's sums are waited for and applied too.
    fn delayed(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        s: u64,
        step: u64,
        prev: Option<(u64, Summed)>,
    ) -> anyhow::Result<Summed> {
        let mut out = Summed {
            samples: 0,
            totals: Some(Totals::default()),
            stop: false,
        };
        if let Some((at, summed)) = prev {
            self.apply(backend, at, &summed, &mut out)?;
        }
        let last = (self.drain_at_epoch_end && s + 1 == self.plan.steps_per_epoch)
            || step + 1 == self.total_steps;
        if last {
            let drained = self
                .phases
                .time(StepPhase::Exchange, || self.exchange.drain(backend, comm))?;
            if let Some((at, summed)) = drained {
                self.apply(backend, at, &summed, &mut out)?;
            }
            // nothing in flight: every rank holds the same parameters
            self.exchange.check_identical(backend, comm, step + 1)?;
        }
        Ok(out)
    }

    /// The end of a run: `--staleness 1` applies the sums still in flight, if any; a run that
    /// ended `early` (every rank alike) under `--sync params` averages once more (after applying
    /// the average in flight with `--async-average`).
    pub fn finish(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        early: bool,
    ) -> anyhow::Result<()> {
        if early {
            self.exchange.final_average(backend, comm)?;
        }
        if let Some((at, summed)) = self.exchange.drain(backend, comm)? {
            let mut out = Summed {
                samples: 0,
                totals: None,
                stop: false,
            };
            self.apply(backend, at, &summed, &mut out)?;
        }
        Ok(())
    }

    /// The update of the step `at`, whose sums are in the gradient buffer; their totals and stop
    /// request added to `out`.
    fn apply(
        &mut self,
        backend: &mut dyn Backend,
        at: u64,
        summed: &Summed,
        out: &mut Summed,
    ) -> anyhow::Result<()> {
        self.last_lr = self.lr.at(at);
        let update = self.optim.update(self.last_lr, at, summed.samples);
        if summed.samples > 0 {
            self.phases
                .time(StepPhase::Update, || backend.update(&update))?;
        }
        out.samples += summed.samples;
        out.stop |= summed.stop;
        if let (Some(o), Some(t)) = (&mut out.totals, &summed.totals) {
            o.add(t);
        }
        Ok(())
    }
}

/// The phases of a step, as timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPhase {
    Gather,
    Forward,
    Loss,
    Backward,
    Exchange,
    Update,
    Average,
}

impl StepPhase {
    /// The phase's name on the timeline (`--trace`).
    pub fn name(self) -> &'static str {
        match self {
            StepPhase::Gather => "gather",
            StepPhase::Forward => "forward",
            StepPhase::Loss => "loss",
            StepPhase::Backward => "backward",
            StepPhase::Exchange => "exchange",
            StepPhase::Update => "update",
            StepPhase::Average => "average",
        }
    }
}

/// Host time spent in each phase of the step, summed over a run (seconds). With one rank the GPU
/// runs behind the host, so these measure recording, not execution (`dptrain bench` adds GPU
/// timestamps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PhaseTimes {
    pub gather: f64,
    pub forward: f64,
    pub loss: f64,
    pub backward: f64,
    /// The whole exchange (its parts are in `Exchange::times`).
    pub exchange: f64,
    pub update: f64,
    /// Parameter averaging (`--sync params`).
    pub average: f64,
    /// This rank's own compute: each step from gather to the end of its exchange, less the
    /// waits for the sums and their upload (what `--balance auto` measures).
    #[serde(skip)]
    pub compute: f64,
    /// The last step's compute alone.
    #[serde(skip)]
    pub last_compute: f64,
}

impl PhaseTimes {
    /// Run `f`, adding its time to `phase` (and a span of the phase to the timeline).
    pub fn time<T>(&mut self, phase: StepPhase, f: impl FnOnce() -> T) -> T {
        self.time_quietly(phase, || {
            crate::observe::trace::instrument_phase(phase.name(), f)
        })
    }

    /// Run `f`, adding its time to `phase`, with no span of its own (the caller's names it).
    pub fn time_quietly<T>(&mut self, phase: StepPhase, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        let dt = t0.elapsed().as_secs_f64();
        *match phase {
            StepPhase::Gather => &mut self.gather,
            StepPhase::Forward => &mut self.forward,
            StepPhase::Loss => &mut self.loss,
            StepPhase::Backward => &mut self.backward,
            StepPhase::Exchange => &mut self.exchange,
            StepPhase::Update => &mut self.update,
            StepPhase::Average => &mut self.average,
        } += dt;
        out
    }

    /// Every phase multiplied by `k` (seconds summed over a run to milliseconds per step, say).
    pub fn scaled(&self, k: f64) -> Self {
        Self {
            gather: self.gather * k,
            forward: self.forward * k,
            loss: self.loss * k,
            backward: self.backward * k,
            exchange: self.exchange * k,
            update: self.update * k,
            average: self.average * k,
            compute: self.compute * k,
            last_compute: self.last_compute,
        }
    }

    /// A step that began at `started` is done with its compute; `idle` seconds of it were
    /// waits for the sums and their upload: the rest joins `compute`, and is returned.
    pub fn computed(&mut self, started: Instant, idle: f64) -> f64 {
        let c = (started.elapsed().as_secs_f64() - idle).max(0.0);
        self.compute += c;
        self.last_compute = c;
        c
    }

    /// Recording gather, forward, loss and backward.
    pub fn record(&self) -> f64 {
        self.gather + self.forward + self.loss + self.backward
    }
}
