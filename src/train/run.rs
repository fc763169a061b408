//! The run: resume or initialise, then epochs of steps with logging, evaluation, checkpoints, and
//! rollback when the loss stops being finite. The step itself is `step.rs`.

use std::time::Instant;

use anyhow::{Context, ensure};
use dptrain_kernels::reduce_stats::Totals;

use super::config::{BalanceMode, ShardMode, TrainConfig};
use super::plan::{StepPlan, epoch_order, proportional_shares};
use super::report::{
    EpochReport, EvalReport, Observer, Quiet, StepInfo, StepRecord, ValRecord, evaluate_rows,
};
use super::resume::{
    CheckpointUnit, Checkpoints, NanPolicy, Position, ResumeFrom, RunControl, position_of,
};
use super::setup::{Setup, initial_params, resume_settings, settings_defaults};
use super::step::Stepper;
use crate::backend::{Backend, Split};
use crate::distributed::comm::Communicator;
use crate::distributed::exchange::sum_totals;

/// What a finished run leaves.
pub struct Outcome {
    pub params: Vec<f32>,
    pub reports: Vec<EpochReport>,
    pub steps: u64,
    /// The validation record of the best model, and whether early stopping ended the run.
    pub watch: super::watch::WatchState,
    pub early_stopped: bool,
}

/// Why a stretch of training stopped early.
enum Halt {
    /// The loss was not finite at this (1-based) step.
    NotFinite {
        step: u64,
        loss: f64,
    },
    /// A signal asked the run to stop; it stopped after a step, with a checkpoint if it could.
    Stopped(crate::distributed::stop::Stopped),
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Halt {
    fn from(e: anyhow::Error) -> Self {
        Halt::Error(e)
    }
}

/// Train with the default run control (no checkpoints, stop on a non-finite loss), quietly.
pub fn train(
    cfg: &TrainConfig,
    setup: &Setup,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
) -> anyhow::Result<Outcome> {
    let plan = StepPlan::of(cfg, setup.total_train, comm.rank(), comm.size());
    train_with(
        cfg,
        &RunControl::default(),
        setup,
        &plan,
        backend,
        comm,
        &mut Quiet,
    )
}

/// Train one model: every rank runs this with the same configuration and its own `plan`, and tells
/// `obs` what happens (every rank's observer is called; the caller decides who prints).
///
/// Each step (`step.rs`): gather this rank's rows of the global batch → forward → loss → backward
/// (per-sample gradient sums, over its micro-batches) → exchange: the gradients and totals summed
/// over the ranks → the optimizer's update scaled by 1 / samples in the global batch. Around it:
/// resume from a checkpoint, checkpoints every N steps or epochs and at the end, validation
/// evaluations with early stopping, and a non-finite loss either stops the run naming the step or
/// rolls back to the newest checkpoint.
pub fn train_with(
    cfg: &TrainConfig,
    ctl: &RunControl,
    setup: &Setup,
    plan: &StepPlan,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    obs: &mut dyn Observer,
) -> anyhow::Result<Outcome> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let plan = *plan;
    ensure!(
        plan.local_samples() == setup.train.n_samples,
        "rank {rank} holds {} training samples, its shard is {}",
        setup.train.n_samples,
        plan.local_samples()
    );
    let total_steps = cfg.total_steps(plan.steps_per_epoch)?;
    tracing::info!(
        "rank {rank}/{ranks}: {} local samples, {} steps per epoch, {total_steps} steps in all",
        plan.local_samples(),
        plan.steps_per_epoch
    );
    let rule = cfg.optim.rule();
    let mut cks = Checkpoints {
        ctl,
        setup,
        settings: resume_settings(cfg, setup),
        defaults: settings_defaults(),
        optimizer: cfg.optim.optimizer.name(),
        state_names: rule.state_names(),
        global_shard: cfg.shard == ShardMode::Global,
        kernels: ctl.kernels.clone(),
    };
    let resumed = match &ctl.resume {
        Some(from) => cks.fetch(comm, from)?,
        None => None,
    };
    // the exchange's state from the checkpoint, for the first stretch's stepper
    let mut restore: Vec<(String, Vec<f32>)> = Vec::new();
    let mut pos = match resumed {
        Some(ck) => {
            backend.set_params(&ck.params)?;
            backend.set_optim_state(&ck.optim)?;
            restore = ck.extra.clone();
            if !ck.state.kernels.is_empty() {
                // the kernels that computed the checkpoint compute the rest, bit for bit
                backend.set_kernel_choices(&ck.state.kernels)?;
                cks.kernels = ck.state.kernels.clone();
            }
            position_of(&ck.state, &plan, cfg, ranks)
        }
        None => {
            let mut theta = initial_params(cfg, &setup.spec)?;
            // rank 0's parameters everywhere, whatever each rank's --init or seed produced
            comm.broadcast_f32(&mut theta)?;
            backend.set_params(&theta)?;
            Position {
                lr_scale: 1.0,
                ..Position::default()
            }
        }
    };
    let mut reports = Vec::new();
    let mut rollbacks = 0;
    // this rank's wait for the gradient sums over every stretch, and the last stretch's plan
    let mut waited = 0.0;
    let mut last_plan;
    loop {
        let mut stepper = Stepper::new(cfg, plan, total_steps, setup.spec.layout().total);
        stepper
            .exchange
            .set_buckets(&layer_ranges(&setup.spec), cfg.exchange.bucket_bytes())?;
        stepper
            .exchange
            .set_compression(&cfg.exchange, &setup.spec.layout(), rank, cfg.seed)?;
        if stepper.exchange.exchanges_gradients() {
            tracing::info!(
                "rank {rank}: gradients in {} bucket(s) of {:?} values, last layers first",
                stepper.exchange.buckets().len(),
                stepper
                    .exchange
                    .buckets()
                    .iter()
                    .map(|b| b.range.len())
                    .collect::<Vec<_>>()
            );
        }
        stepper
            .exchange
            .restore(backend, &std::mem::take(&mut restore), rank, pos.step)?;
        stepper.lr.scale = pos.lr_scale;
        let stretch_from = pos.step;
        let result = run_from(
            cfg,
            &cks,
            backend,
            comm,
            &mut stepper,
            &mut pos,
            &mut reports,
            obs,
        );
        waited += stepper.exchange.times.waited;
        last_plan = stepper.plan;
        let t = &stepper.exchange.times;
        if t.f32_bytes > 0.0 && comm.is_root() {
            // this stretch's figures over this stretch's steps (a resume starts a stretch)
            let steps = pos.step.saturating_sub(stretch_from).max(1) as f64;
            let line = format!(
                "dptrain: gradients sent per step per rank: {:.3} MB ({:.1}× fewer bytes than f32); exchange {:.2} ms per step, {:.0}% of it behind backward",
                t.sent_bytes / steps / 1e6,
                t.f32_bytes / t.sent_bytes.max(1.0),
                (t.readback + t.allreduce + t.upload) / steps * 1e3,
                100.0 * t.hidden()
            );
            if cfg.exchange.compress != super::config::CompressKind::None
                || cfg.exchange.grad_wire != crate::distributed::codec::WireFormat::F32
            {
                println!("{line}");
            } else {
                tracing::info!("{line}");
            }
        }
        match result {
            Ok(()) => {
                // a run that ended early (early stopping) applies what is still in flight, and
                // local SGD averages once more, so that every rank ends alike
                stepper.finish(backend, comm, pos.step < total_steps)?;
                break;
            }
            Err(Halt::Error(e)) => return Err(e),
            Err(Halt::Stopped(s)) => return Err(s.into()),
            Err(Halt::NotFinite { step, loss }) => {
                let can = ctl.on_nan == NanPolicy::Rollback
                    && rollbacks < ctl.max_rollbacks
                    && ctl.checkpoint_dir.is_some();
                let back = if can {
                    cks.fetch(comm, &ResumeFrom::Auto)?
                } else {
                    None
                };
                let Some(ck) = back else {
                    return Err(crate::distributed::agree::Agreed(format!(
                        "training diverged: the loss is {loss} at step {step}; lower --lr{}",
                        if ctl.on_nan == NanPolicy::Rollback {
                            " (no checkpoint left to roll back to)"
                        } else {
                            " or use --on-nan rollback with --checkpoint-dir"
                        }
                    ))
                    .into());
                };
                rollbacks += 1;
                backend.set_params(&ck.params)?;
                backend.set_optim_state(&ck.optim)?;
                restore = ck.extra.clone();
                // discard what the failed stretch left in the backend's running totals
                backend.take_step_losses()?;
                backend.take_train_totals()?;
                pos = position_of(&ck.state, &plan, cfg, ranks);
                pos.lr_scale *= ctl.rollback_lr_factor;
                if comm.is_root() {
                    println!(
                        "dptrain: the loss is {loss} at step {step}: rolled back to step {} with the learning rate × {} (rollback {rollbacks} of {})",
                        pos.step, pos.lr_scale, ctl.max_rollbacks
                    );
                }
            }
        }
    }
    if ranks > 1 {
        report_waits(cfg, comm, waited, &last_plan)?;
    }
    let params = backend.params().context("reading the trained parameters")?;
    Ok(Outcome {
        params,
        reports,
        steps: pos.step,
        watch: pos.watch,
        early_stopped: pos.watch.exhausted(ctl.patience) && setup.val.is_some(),
    })
}

/// Each dense layer's parameter range in the flat buffer (weights then bias), by layer.
pub fn layer_ranges(spec: &crate::model::ModelSpec) -> Vec<std::ops::Range<usize>> {
    spec.param_groups()
}

/// Move the backend's running loss record and totals into the epoch's totals (over all ranks), and
/// find the first step whose loss was not finite. Every rank calls it at the same steps.
fn flush(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    exchange: bool,
    recorded: &mut Vec<u64>,
    epoch_totals: &mut Totals,
) -> Result<(), Halt> {
    let losses = backend.take_step_losses()?;
    let local = backend.take_train_totals()?;
    let mine = if exchange {
        // the per-step totals travelled with the gradients and were checked then
        None
    } else {
        losses
            .iter()
            .zip(recorded.iter())
            .find(|(l, _)| !l.is_finite())
            .map(|(l, s)| (*s + 1, f64::from(*l)))
    };
    recorded.clear();
    if exchange {
        return Ok(());
    }
    // the first non-finite step over all ranks, so that every rank halts the same way
    let bytes = mine.map_or_else(Vec::new, |(s, l)| format!("{s} {l}").into_bytes());
    let all = comm.all_gather_bytes(&bytes)?;
    let first = all
        .iter()
        .filter_map(|b| {
            let t = String::from_utf8_lossy(b);
            let mut it = t.split(' ');
            Some((
                it.next()?.parse::<u64>().ok()?,
                it.next()?.parse::<f64>().ok()?,
            ))
        })
        .min_by_key(|(s, _)| *s);
    let global = sum_totals(comm, &local)?;
    epoch_totals.add(&global);
    match first {
        Some((step, loss)) => Err(Halt::NotFinite { step, loss }),
        None => Ok(()),
    }
}

/// Train from `pos` to the end of the run (or until a non-finite loss).
#[allow(clippy::too_many_arguments)]
fn run_from(
    cfg: &TrainConfig,
    cks: &Checkpoints<'_>,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    stepper: &mut Stepper,
    pos: &mut Position,
    reports: &mut Vec<EpochReport>,
    obs: &mut dyn Observer,
) -> Result<(), Halt> {
    use crate::backend::gpu::HISTORY;
    let (ctl, setup) = (cks.ctl, cks.setup);
    let rank = comm.rank();
    let mut plan = stepper.plan;
    let total_steps = stepper.lr.schedule.total_steps;
    let regression = setup.spec.is_regression();
    let start = Instant::now();
    // whether the step's totals travel with the gradients (else they are summed at each flush)
    let exchange = stepper.exchange.exchanges_gradients() || stepper.exchange.delayed();
    // the step of each training batch whose loss the backend keeps, until the next flush
    let mut recorded: Vec<u64> = Vec::new();
    // whether a signal asked the ranks to stop, and the newest checkpoint written (rank 0)
    let mut stop = false;
    let mut written: Option<std::path::PathBuf> = None;
    // early stopping: the run is over once `patience` evaluations have not improved
    let watching = setup.val.is_some();
    let mut early = watching && pos.watch.exhausted(ctl.patience);
    // --balance auto: the steps whose compute is timed before the ranks agree on their shares
    let mut balance =
        (cfg.balance == BalanceMode::Auto && exchange && plan.shard() == ShardMode::Global)
            .then(|| Balancer::new(pos.step, plan.steps_per_epoch));
    while pos.step < total_steps && !early {
        let epoch = pos.epochs_done + 1;
        backend.set_order(&epoch_order(cfg, &plan, epoch, rank))?;
        let epoch_start = Instant::now();
        let mut epoch_totals = pos.totals;
        let mut s = pos.steps_in_epoch;
        // the totals at the previous step record, and when it was written
        let mut mark = (epoch_totals, Instant::now());
        while s < plan.steps_per_epoch && pos.step < total_steps && !early {
            let samples = plan.global_rows(s) as u64;
            let batches = plan.micro_batches(s, pos.step).len();
            recorded.extend(std::iter::repeat_n(pos.step, batches));
            crate::distributed::fault::before_step(rank, pos.step);
            let computed = stepper.phases.compute;
            let summed = stepper.step(backend, comm, s, pos.step)?;
            stop |= summed.stop;
            if let Some(t) = summed.totals {
                if !t.loss_sum.is_finite() {
                    return Err(Halt::NotFinite {
                        step: pos.step + 1,
                        loss: t.loss_sum,
                    });
                }
                epoch_totals.add(&t);
            }
            if let Some(b) = &mut balance
                && b.timed(pos.step, plan.mine(s).1, stepper.phases.compute - computed)
            {
                // every rank at the same step: one collective, the same shares everywhere
                plan = b.agree(comm, &plan)?;
                stepper.plan = plan;
                if !b.next_round(pos.step + 1) {
                    balance = None;
                }
            }
            pos.step += 1;
            s += 1;
            // mid-epoch: by step, or because a signal asked to stop (at an epoch's end, the
            // epoch's own report and checkpoint come first)
            let checkpoint_now = ctl.checkpoint_dir.is_some()
                && s < plan.steps_per_epoch
                && ((ctl.checkpoint_unit == CheckpointUnit::Step
                    && ctl.checkpoint_every > 0
                    && pos.step.is_multiple_of(ctl.checkpoint_every))
                    || stop);
            // the backend keeps the losses of HISTORY batches: read them before the next step's
            if recorded.len() + plan.max_micro_batches() > HISTORY || checkpoint_now {
                flush(backend, comm, exchange, &mut recorded, &mut epoch_totals)?;
            }
            if checkpoint_now {
                pos.epochs_done = epoch - 1;
                pos.steps_in_epoch = s;
                pos.totals = epoch_totals;
                let extra = stepper.exchange.checkpoint_state(backend, comm)?;
                written = cks.write(backend, comm, pos, &plan, extra)?;
            }
            if ctl.log_every > 0 && pos.step.is_multiple_of(ctl.log_every) {
                if !exchange && !recorded.is_empty() {
                    flush(backend, comm, exchange, &mut recorded, &mut epoch_totals)?;
                }
                let d = Totals {
                    loss_sum: epoch_totals.loss_sum - mark.0.loss_sum,
                    correct: epoch_totals.correct.saturating_sub(mark.0.correct),
                    count: epoch_totals.count.saturating_sub(mark.0.count),
                };
                if d.count > 0 {
                    let n = d.count as f64;
                    obs.step_record(&StepRecord {
                        epoch,
                        step: pos.step,
                        lr: stepper.last_lr,
                        train_loss: d.loss_sum / n,
                        train_accuracy: (!regression).then(|| d.correct as f64 / n),
                        samples_per_s: n / mark.1.elapsed().as_secs_f64().max(1e-9),
                    });
                }
                mark = (epoch_totals, Instant::now());
            }
            obs.step(&StepInfo {
                epoch,
                step: pos.step,
                samples,
                lr: stepper.last_lr,
                epoch_loss: (epoch_totals.count > 0)
                    .then(|| epoch_totals.loss_sum / epoch_totals.count as f64),
            });
            // a validation evaluation every --eval-every steps (the epoch's end has its own)
            if watching
                && ctl.eval_every > 0
                && pos.step.is_multiple_of(ctl.eval_every)
                && s < plan.steps_per_epoch
            {
                let (rec, _) = validate(setup, ctl, backend, comm, pos, epoch, obs)?;
                obs.val(&rec);
                early = pos.watch.exhausted(ctl.patience);
            }
            if stop && s < plan.steps_per_epoch {
                return Err(stopped(pos.step, written));
            }
        }
        flush(backend, comm, exchange, &mut recorded, &mut epoch_totals)?;
        let secs = epoch_start.elapsed().as_secs_f64();
        let fresh = epoch_totals.count.saturating_sub(pos.totals.count);
        let train = EvalReport::from_totals(&epoch_totals, regression);
        let test = match setup.test_rows() {
            Some(rows) => Some(evaluate_rows(backend, comm, Split::Test, rows, regression)?),
            None => None,
        };
        let val = if watching && !early {
            let (_, r) = validate(setup, ctl, backend, comm, pos, epoch, obs)?;
            early = pos.watch.exhausted(ctl.patience);
            Some(r)
        } else {
            None
        };
        let report = EpochReport {
            epoch,
            step: pos.step,
            lr: stepper.last_lr,
            train_loss: train.loss,
            train_accuracy: train.accuracy,
            test_loss: test.map(|t| t.loss),
            test_accuracy: test.and_then(|t| t.accuracy),
            test_rmse: test.and_then(|t| t.rmse),
            val_loss: val.map(|v| v.loss),
            val_accuracy: val.and_then(|v| v.accuracy),
            val_rmse: val.and_then(|v| v.rmse),
            samples_per_s: fresh as f64 / secs.max(1e-9),
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        obs.epoch(&report);
        reports.push(report);
        let finished_epoch = s >= plan.steps_per_epoch;
        if finished_epoch {
            pos.epochs_done = epoch;
            pos.steps_in_epoch = 0;
            pos.totals = Totals::default();
        } else {
            pos.epochs_done = epoch - 1;
            pos.steps_in_epoch = s;
            pos.totals = epoch_totals;
        }
        let by_epoch = ctl.checkpoint_unit == CheckpointUnit::Epoch
            && ctl.checkpoint_every > 0
            && finished_epoch
            && epoch.is_multiple_of(ctl.checkpoint_every);
        let by_step_at_boundary = ctl.checkpoint_unit == CheckpointUnit::Step
            && ctl.checkpoint_every > 0
            && pos.step.is_multiple_of(ctl.checkpoint_every);
        if ctl.checkpoint_dir.is_some()
            && (by_epoch || by_step_at_boundary || pos.step >= total_steps || stop || early)
        {
            let extra = stepper.exchange.checkpoint_state(backend, comm)?;
            written = cks.write(backend, comm, pos, &plan, extra)?;
        }
        if stop {
            return Err(stopped(pos.step, written));
        }
    }
    Ok(())
}

/// Evaluate the validation rows, update early stopping's record and, when the model is the best so
/// far, hand its parameters (rank 0's) to the observer.
fn validate(
    setup: &Setup,
    ctl: &RunControl,
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    pos: &mut Position,
    epoch: u64,
    obs: &mut dyn Observer,
) -> Result<(ValRecord, EvalReport), Halt> {
    let regression = setup.spec.is_regression();
    let rows = setup.val_rows().unwrap_or(0..0);
    let r = evaluate_rows(backend, comm, Split::Test, rows, regression)?;
    let value = ctl.monitor.value(&r).unwrap_or(r.loss);
    let best = pos
        .watch
        .observe(ctl.monitor.higher_is_better(), value, pos.step, epoch);
    let rec = ValRecord {
        epoch,
        step: pos.step,
        val_loss: r.loss,
        val_accuracy: r.accuracy,
        val_rmse: r.rmse,
        best,
    };
    if best {
        let params = if comm.is_root() {
            backend.params()?
        } else {
            Vec::new()
        };
        obs.best(&params, &rec)?;
    }
    Ok((rec, r))
}

/// The halt of a run that a signal stopped after `step`, its checkpoint `written` (rank 0's path).
fn stopped(step: u64, written: Option<std::path::PathBuf>) -> Halt {
    Halt::Stopped(crate::distributed::stop::Stopped {
        signal: crate::distributed::stop::requested(),
        step,
        checkpoint: written,
    })
}

/// Steps of each stretch run before `--balance auto` starts timing (start-up costs), and the most
/// it runs (timed or not) before the ranks agree on their shares.
const BALANCE_WARMUP: u64 = 2;
const BALANCE_STEPS: u64 = 20;
/// Agreements per stretch. A step's time is not quite proportional to its rows (fixed costs per
/// step), so shares proportional to rows per second overshoot; each further round measures at
/// the new shares, and the shares move towards the point where every rank's compute takes as
/// long (the fixed point of shares ∝ rows/time).
const BALANCE_ROUNDS: u32 = 3;

/// `--balance auto`: each rank times its own compute over steps [from, until) of the run, then
/// the ranks agree on shares of each global batch proportional to their rows per second.
struct Balancer {
    from: u64,
    until: u64,
    span: u64,
    rounds: u32,
    rows: u64,
    seconds: f64,
}

impl Balancer {
    /// Timing from `start` (where this stretch of the run begins) for BALANCE_STEPS steps, or
    /// one epoch when that is shorter, the first BALANCE_WARMUP of them untimed (fewer when the
    /// epoch is too short to leave a timed step).
    fn new(start: u64, steps_per_epoch: u64) -> Self {
        let span = BALANCE_STEPS.min(steps_per_epoch).max(1);
        Self {
            from: start + BALANCE_WARMUP.min(span - 1),
            until: start + span,
            span,
            rounds: 1,
            rows: 0,
            seconds: 0.0,
        }
    }

    /// After an agreement at the end of step `next` − 1: time the next round from step `next`,
    /// or false when this was the last round.
    fn next_round(&mut self, next: u64) -> bool {
        if self.rounds >= BALANCE_ROUNDS {
            return false;
        }
        self.rounds += 1;
        self.from = next;
        self.until = next + self.span;
        self.rows = 0;
        self.seconds = 0.0;
        true
    }

    /// Step `step` (0-based) took `seconds` of compute on `rows` rows of this rank; true when
    /// it was the last step timed, and the ranks are to agree.
    fn timed(&mut self, step: u64, rows: usize, seconds: f64) -> bool {
        if (self.from..self.until).contains(&step) {
            self.rows += rows as u64;
            self.seconds += seconds;
        }
        step + 1 == self.until
    }

    /// Gather every rank's figures (one collective) and share out `plan`'s global batch in
    /// proportion to them; rank 0 says how on stderr.
    fn agree(&self, comm: &dyn Communicator, plan: &StepPlan) -> anyhow::Result<StepPlan> {
        let mine = [
            self.rows.to_le_bytes(),
            self.seconds.to_bits().to_le_bytes(),
        ]
        .concat();
        let all = comm.all_gather_bytes(&mine)?;
        let figures: Vec<(u64, f64)> = all
            .iter()
            .map(|b| {
                let word = |i: usize| {
                    let w: [u8; 8] = b.get(i * 8..i * 8 + 8)?.try_into().ok()?;
                    Some(u64::from_le_bytes(w))
                };
                Some((word(0)?, f64::from_bits(word(1)?)))
            })
            .collect::<Option<_>>()
            .context("--balance auto: a rank's timing did not arrive whole")?;
        let rates: Vec<f64> = figures.iter().map(|&(r, t)| r as f64 / t).collect();
        let shares = proportional_shares(plan.global_batch(), &rates);
        if comm.is_root() {
            let rates: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            let line = format!(
                "dptrain: balance (round {}/{BALANCE_ROUNDS}): ranks compute {} rows/s (steps {}-{}, at {} rows); each global batch of {} rows shared out as {}",
                self.rounds,
                rates.join(", "),
                self.from + 1,
                self.until,
                join(&plan.shares()),
                plan.global_batch(),
                join(&shares)
            );
            if self.rounds == BALANCE_ROUNDS {
                eprintln!("{line}");
            } else {
                tracing::info!("{line}");
            }
        }
        Ok(plan.with_shares(&shares))
    }
}

/// Every rank's wait at the step's collectives over the run (the gradient sums, the parameter
/// averages, the stop agreement; one collective on every rank), shown by rank 0: on stderr with
/// `--balance auto`, `--staleness 1` or `--async-average`, else at -v.
fn report_waits(
    cfg: &TrainConfig,
    comm: &dyn Communicator,
    waited: f64,
    plan: &StepPlan,
) -> anyhow::Result<()> {
    let all = comm.all_gather_bytes(&waited.to_bits().to_le_bytes())?;
    if !comm.is_root() {
        return Ok(());
    }
    let waits: Vec<String> = all
        .iter()
        .map(|b| {
            let w: [u8; 8] = b.as_slice().try_into().unwrap_or_default();
            format!("{:.3} s", f64::from_bits(u64::from_le_bytes(w)))
        })
        .collect();
    let mut line = format!(
        "dptrain: wait at collectives per rank: {}",
        waits.join(", ")
    );
    if plan.shard() == ShardMode::Global && cfg.exchange.sync == super::config::SyncMode::Grads {
        line += &format!(
            "; rows of each global batch per rank: {}",
            join(&plan.shares())
        );
    }
    if cfg.balance == BalanceMode::Auto || cfg.exchange.staleness > 0 || cfg.exchange.async_average
    {
        eprintln!("{line}");
    } else {
        tracing::info!("{line}");
    }
    Ok(())
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
