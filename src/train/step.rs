//! THE STEP. One optimiser step of one rank, read top to bottom: for each micro-batch of this
//! rank's rows, gather → forward → loss → backward (the last backward runs inside the exchange,
//! bucket by bucket, so that the gradients travel while it goes on); then the exchange of the
//! gradients between ranks; then the update; then, in local SGD, the parameter average. Timing is the `PhaseTimes`
//! helper's business, not the paragraph's. With `--staleness 1` the step branches to
//! [`Stepper::delayed`] after its micro-batches: the update applies the previous step's sums.

use std::time::Instant;

use serde::Serialize;

use dptrain_kernels::reduce_stats::Totals;

use super::config::TrainConfig;
use crate::distributed::exchange::{Exchange, Summed};
use super::plan::StepPlan;
use crate::backend::Backend;
use crate::distributed::comm::Communicator;
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
    /// Seconds of this rank's own compute over the run: gather to the end of backward, the
    /// exchange included but not its waits for the sums nor their upload (what `--balance auto`
    /// measures).
    pub compute: f64,
    /// `DPTRAIN_FAULT=slow:RANK:F` on this rank: F, and the previous step's compute without the
    /// sleep that stretches it.
    slow: Option<f64>,
    last_compute: f64,
    /// `--staleness 1`: wait for the sums in flight at each epoch's end (the trainer; `bench`
    /// repeats a one-step epoch and turns it off).
    pub drain_at_epoch_end: bool,
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
            compute: 0.0,
            slow: crate::distributed::fault::slow_factor(plan.rank()),
            last_compute: 0.0,
            drain_at_epoch_end: true,
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
        let t = &mut self.phases;
        let started = Instant::now();
        let batches = self.plan.micro_batches(s, step);
        for (i, b) in batches.iter().enumerate() {
            t.time(Phase::Gather, || backend.gather(b))?;
            t.time(Phase::Forward, || backend.forward())?;
            t.time(Phase::Loss, || backend.loss())?;
            // the last micro-batch's backward is the exchange's to run, in stretches
            if i + 1 < batches.len() {
                t.time(Phase::Backward, || backend.backward())?;
            }
        }
        let slept = self.slow.map_or(0.0, |f| (f - 1.0) * self.last_compute);
        if slept > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(slept));
        }
        let (mine, all) = (self.plan.mine(s).1, self.plan.global_rows(s));
        if self.exchange.delayed() {
            return self.delayed(backend, comm, s, step, mine);
        }
        let idle = self.exchange.times.waited + self.exchange.times.upload;
        let back = self.exchange.times.backward;
        let summed = t.time(Phase::Exchange, || {
            self.exchange.gradients(backend, comm, mine, all)
        })?;
        let idle = self.exchange.times.waited + self.exchange.times.upload - idle;
        t.backward_inside_exchange(self.exchange.times.backward - back);
        let compute = (started.elapsed().as_secs_f64() - idle).max(0.0);
        self.compute += compute;
        self.last_compute = (compute - slept).max(0.0);
        self.last_lr = self.lr.at(step);
        let update = self.optim.update(self.last_lr, step, summed.samples);
        if summed.samples > 0 {
            t.time(Phase::Update, || backend.update(&update))?;
        }
        let total = self.total_steps;
        let stop = t.time(Phase::Average, || {
            self.exchange.average_if_due(backend, comm, step + 1, total)
        })?;
        Ok(Summed {
            stop: summed.stop || stop,
            ..summed
        })
    }

    /// `--staleness 1`, after the micro-batches: this step's gradients start their sums over the
    /// ranks, and the previous step's sums, arrived meanwhile, make the update, at the previous
    /// step's rate and count (so that the optimizer sees the same sequence of updates as
    /// synchronous SGD, each gradient one step older). At an epoch's or the run's last step
    /// nothing stays in flight: this step's sums are waited for and applied too.
    fn delayed(
        &mut self,
        backend: &mut dyn Backend,
        comm: &dyn Communicator,
        s: u64,
        step: u64,
        mine: usize,
    ) -> anyhow::Result<Summed> {
        let back = self.exchange.times.backward;
        let prev = self.phases.time(Phase::Exchange, || {
            self.exchange.delayed_gradients(backend, comm, step, mine)
        })?;
        self.phases
            .backward_inside_exchange(self.exchange.times.backward - back);
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
                .time(Phase::Exchange, || self.exchange.drain(backend, comm))?;
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
                .time(Phase::Update, || backend.update(&update))?;
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
pub enum Phase {
    Gather,
    Forward,
    Loss,
    Backward,
    Exchange,
    Update,
    Average,
}

impl Phase {
    /// The phase's name on the timeline (`--trace`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Gather => "gather",
            Phase::Forward => "forward",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::Exchange => "exchange",
            Phase::Update => "update",
            Phase::Average => "average",
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
}

impl PhaseTimes {
    /// Run `f`, adding its time to `phase`.
    /// `seconds` of backward that ran inside the exchange (between bucket sends), timed as
    /// exchange: counted as backward instead.
    fn backward_inside_exchange(&mut self, seconds: f64) {
        self.backward += seconds;
        self.exchange -= seconds;
    }

    pub fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = crate::observe::trace::instrument_phase(phase.name(), f);
        let dt = t0.elapsed().as_secs_f64();
        *match phase {
            Phase::Gather => &mut self.gather,
            Phase::Forward => &mut self.forward,
            Phase::Loss => &mut self.loss,
            Phase::Backward => &mut self.backward,
            Phase::Exchange => &mut self.exchange,
            Phase::Update => &mut self.update,
            Phase::Average => &mut self.average,
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
        }
    }

    /// Recording gather, forward, loss and backward.
    pub fn record(&self) -> f64 {
        self.gather + self.forward + self.loss + self.backward
    }
}
