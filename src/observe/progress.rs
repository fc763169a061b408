//! The training progress display of rank 0, and the one-line summary at the end of a run.
//!
//! [`Progress`] picks one of three [`Mode`]s:
//!
//! - [`Mode::Bar`] when stderr is a terminal: an `indicatif` bar on stderr,
//!   `epoch 2/5 [#####>----] step 1200/4690  loss 0.2345  12.3k samples/s  eta 1m 12s`;
//! - [`Mode::Lines`] when it is not (under `mpirun`, or redirected to a file): no bar and no ANSI
//!   codes, but a plain line at most every `every_s` seconds (the first one after `every_s` seconds,
//!   none when `every_s` is 0),
//!   `dptrain: epoch 2/5  step 1200/4690 (25.6%)  loss 0.2345  12.3k samples/s  eta 1m 12s`;
//! - [`Mode::Hidden`] on the ranks other than 0: nothing at all.
//!
//! The rate counts only the samples passed to [`Progress::step`] since the `Progress` was created, so
//! a run resumed at step 3000 does not count the 3000 earlier steps; the ETA is the number of remaining
//! steps times the mean time per step seen so far.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How the progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An `indicatif` bar on stderr (stderr is a terminal).
    Bar,
    /// Plain lines without ANSI codes, at most one every `every_s` seconds.
    Lines,
    /// Nothing (ranks other than 0).
    Hidden,
}

impl Mode {
    /// `Hidden` unless `visible`; then `Bar` when stderr is a terminal and `Lines` otherwise.
    pub fn detect(visible: bool) -> Mode {
        if !visible {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }
}

/// The progress display of a training run. Every method takes `&self` (the state sits behind a
/// mutex), so it can be shared by the closures of the training loop.
pub struct Progress {
    mode: Mode,
    /// The bar in [`Mode::Bar`]; `None` otherwise.
    bar: Option<ProgressBar>,
    start: Instant,
    total_steps: u64,
    epochs: Option<u64>,
    every_s: f64,
    state: Mutex<State>,
}

struct State {
    /// Where the plain lines go in [`Mode::Lines`].
    out: Box<dyn Write + Send>,
    /// Samples seen since the `Progress` was created.
    samples: u64,
    /// Seconds (since creation) of the last plain line; 0 before the first.
    last_line_s: f64,
    /// Steps done before this process's first: given, or learnt from the first step when the run
    /// resumed further on (a run that resumes at step 3000 reports step 3001 first).
    start_step: u64,
    seen: bool,
}

impl Progress {
    /// The display for `dptrain train`: hidden unless `visible` (rank 0), a bar when stderr is a
    /// terminal, plain lines on stderr every `every_s` seconds otherwise (0: none).
    ///
    /// `total_steps` is the step count at the end of the run (0: unknown), `start_step` the count
    /// already done when this process starts (a resumed run), `epochs` the number of epochs, or
    /// `None` for a step-bounded run.
    pub fn new(
        visible: bool,
        total_steps: u64,
        start_step: u64,
        epochs: Option<u64>,
        every_s: f64,
    ) -> Self {
        Self::with_mode(
            Mode::detect(visible),
            Box::new(std::io::stderr()),
            total_steps,
            start_step,
            epochs,
            every_s,
        )
    }

    /// Like [`Progress::new`] with the mode forced. In [`Mode::Lines`] the plain lines go to `out`;
    /// the bar of [`Mode::Bar`] always draws on stderr, and [`Mode::Hidden`] ignores `out`.
    pub fn with_mode(
        mode: Mode,
        out: Box<dyn Write + Send>,
        total_steps: u64,
        start_step: u64,
        epochs: Option<u64>,
        every_s: f64,
    ) -> Self {
        let target = match mode {
            Mode::Bar => Some(ProgressDrawTarget::stderr()),
            Mode::Lines | Mode::Hidden => None,
        };
        Self::build(mode, target, out, total_steps, start_step, epochs, every_s)
    }

    fn build(
        mode: Mode,
        target: Option<ProgressDrawTarget>,
        out: Box<dyn Write + Send>,
        total_steps: u64,
        start_step: u64,
        epochs: Option<u64>,
        every_s: f64,
    ) -> Self {
        let bar = target.map(|target| {
            let bar =
                ProgressBar::with_draw_target((total_steps > 0).then_some(total_steps), target);
            if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {msg}") {
                bar.set_style(style.progress_chars("#>-"));
            }
            bar.set_position(start_step);
            bar
        });
        Progress {
            mode,
            bar,
            start: Instant::now(),
            total_steps,
            epochs,
            every_s,
            state: Mutex::new(State {
                out,
                samples: 0,
                last_line_s: 0.0,
                start_step,
                seen: false,
            }),
        }
    }

    /// The mode chosen at creation.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Records one step: `epoch` is the current epoch (1-based), `step` the number of steps done so
    /// far (1 after the first step of a fresh run), `samples` the samples of this step over all ranks
    /// (the global batch), `loss` the running training loss if known.
    pub fn step(&self, epoch: u64, step: u64, samples: u64, loss: Option<f64>) {
        self.step_at(self.start.elapsed(), epoch, step, samples, loss);
    }

    /// [`Progress::step`] at `elapsed` time since the `Progress` was created, instead of the clock's
    /// (for deterministic tests).
    pub fn step_at(
        &self,
        elapsed: Duration,
        epoch: u64,
        step: u64,
        samples: u64,
        loss: Option<f64>,
    ) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.samples = st.samples.saturating_add(samples);
        if !st.seen {
            st.seen = true;
            st.start_step = st.start_step.max(step.saturating_sub(1));
        }
        if self.mode == Mode::Hidden {
            return;
        }
        let t = elapsed.as_secs_f64();
        let rate_s = if t > 0.0 {
            rate(st.samples as f64 / t)
        } else {
            "-".to_string()
        };
        let eta_s =
            eta(self.total_steps, st.start_step, t, step).map_or_else(|| "-".to_string(), duration);
        let loss_s = loss.map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
        let epoch_s = match self.epochs {
            Some(n) => format!("epoch {epoch}/{n}"),
            None => format!("epoch {epoch}"),
        };
        let step_s = if self.total_steps > 0 {
            format!("step {step}/{}", self.total_steps)
        } else {
            format!("step {step}")
        };
        let tail = format!("loss {loss_s}  {rate_s} samples/s  eta {eta_s}");
        if let Some(bar) = &self.bar {
            bar.set_prefix(epoch_s);
            bar.set_message(format!("{step_s}  {tail}"));
            bar.set_position(step);
            return;
        }
        // Mode::Lines
        let due = self.every_s > 0.0 && t - st.last_line_s >= self.every_s;
        if !due {
            return;
        }
        st.last_line_s = t;
        let pct = if self.total_steps > 0 {
            format!(
                " ({:.1}%)",
                100.0 * step.min(self.total_steps) as f64 / self.total_steps as f64
            )
        } else {
            String::new()
        };
        let line = format!("dptrain: {epoch_s}  {step_s}{pct}  {tail}");
        // a progress line that cannot be written is not worth stopping the run for
        let _ = writeln!(st.out, "{line}").and_then(|()| st.out.flush());
    }

    /// Prints `line` on stdout (in every mode: the caller decides which rank prints), clearing the bar
    /// first and redrawing it afterwards when one is shown. A failed write is ignored.
    pub fn println(&self, line: &str) {
        let print = || {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }

    /// Clears the bar (nothing to do in the other modes).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Samples passed to [`Progress::step`] so far, in every mode (for [`Summary::samples`]).
    pub fn samples(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).samples
    }

    /// Seconds since the `Progress` was created (for [`Summary::seconds`]).
    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// A rate rounded to 3 significant digits with a `k`, `M`, `G` or `T` suffix: `987`, `12.3k`,
/// Seconds left: remaining steps × mean seconds per step since `start_step`; `None` when unknown.
fn eta(total_steps: u64, start_step: u64, t: f64, step: u64) -> Option<f64> {
    let done = step.saturating_sub(start_step);
    if total_steps == 0 || done == 0 {
        return None;
    }
    Some(total_steps.saturating_sub(step) as f64 * t / done as f64)
}

/// `1.23M`, `1.00k` for 999.5, `0.500` for 0.5; `0` below 0.0005; `-` when negative or not finite.
pub fn rate(x: f64) -> String {
    if !x.is_finite() || x < 0.0 {
        return "-".to_string();
    }
    if x < 0.0005 {
        return "0".to_string();
    }
    // x ≈ m × 10^(e-2) with m a 3-digit integer
    let mut e = x.log10().floor() as i32;
    let mut m = (x / 10f64.powi(e - 2)).round();
    if m >= 1000.0 {
        e += 1;
        m = (x / 10f64.powi(e - 2)).round();
    } else if m < 100.0 {
        e -= 1;
        m = (x / 10f64.powi(e - 2)).round();
    }
    const SUFFIXES: [&str; 5] = ["", "k", "M", "G", "T"];
    let unit = (e.max(0) / 3).min(SUFFIXES.len() as i32 - 1);
    let decimals = (2 - (e - 3 * unit)).max(0) as usize;
    let v = m * 10f64.powi(e - 2 - 3 * unit);
    format!("{v:.decimals$}{}", SUFFIXES[unit as usize])
}

/// A duration, rounded to the second: `45s`, `1m 12s`, `2h 05m`; `-` when negative or not finite.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".to_string();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    }
}

/// What a finished run did, for its last line ([`Summary::line`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Steps of the run.
    pub steps: u64,
    /// Epochs of the run.
    pub epochs: u64,
    /// Seconds of training in this process.
    pub seconds: f64,
    /// Samples processed in those seconds (the rate is `samples / seconds`).
    pub samples: u64,
    /// The best value of the metric that selects the model: (name such as `test_accuracy`, value,
    /// epoch).
    pub best: Option<(String, f64, u64)>,
    /// The metrics of the last evaluation, in order: (name, value).
    pub last: Vec<(String, f64)>,
}

impl Summary {
    /// `dptrain: done: 5 epochs, 4690 steps in 1m 12s (65.2k samples/s); final test_loss 0.0712
    /// test_accuracy 0.9781; best test_accuracy 0.9790 at epoch 4` (on one line). The rate is left
    /// out when `seconds` is not positive, the `final` and `best` parts when there is nothing to say.
    pub fn line(&self) -> String {
        let plural = |n: u64, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let mut s = format!(
            "dptrain: done: {}, {} in {}",
            plural(self.epochs, "epoch"),
            plural(self.steps, "step"),
            duration(self.seconds)
        );
        if self.seconds > 0.0 && self.seconds.is_finite() {
            s += &format!(" ({} samples/s)", rate(self.samples as f64 / self.seconds));
        }
        if !self.last.is_empty() {
            s += "; final";
            for (name, v) in &self.last {
                s += &format!(" {name} {v:.4}");
            }
        }
        if let Some((name, v, epoch)) = &self.best {
            s += &format!("; best {name} {v:.4} at epoch {epoch}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn lines(every_s: f64, total: u64, start: u64, epochs: Option<u64>) -> (Progress, Shared) {
        let out = Shared::default();
        let p = Progress::with_mode(
            Mode::Lines,
            Box::new(out.clone()),
            total,
            start,
            epochs,
            every_s,
        );
        (p, out)
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn rate_rounds_to_three_digits() {
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.5), "0.500");
        assert_eq!(rate(7.0), "7.00");
        assert_eq!(rate(12.34), "12.3");
        assert_eq!(rate(99.96), "100");
        assert_eq!(rate(278.5082), "279");
        assert_eq!(rate(987.0), "987");
        assert_eq!(rate(999.4), "999");
        assert_eq!(rate(999.5), "1.00k");
        assert_eq!(rate(1000.0), "1.00k");
        assert_eq!(rate(12_345.0), "12.3k");
        assert_eq!(rate(65_249.0), "65.2k");
        assert_eq!(rate(123_456.0), "123k");
        assert_eq!(rate(999_999.0), "1.00M");
        assert_eq!(rate(1e6), "1.00M");
        assert_eq!(rate(1_234_567.0), "1.23M");
        assert_eq!(rate(2.5e9), "2.50G");
        assert_eq!(rate(f64::NAN), "-");
        assert_eq!(rate(f64::INFINITY), "-");
        assert_eq!(rate(-1.0), "-");
    }

    #[test]
    fn duration_formats() {
        assert_eq!(duration(0.0), "0s");
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(45.0), "45s");
        assert_eq!(duration(59.6), "1m 00s");
        assert_eq!(duration(72.0), "1m 12s");
        assert_eq!(duration(3599.0), "59m 59s");
        assert_eq!(duration(3600.0), "1h 00m");
        assert_eq!(duration(2.0 * 3600.0 + 5.0 * 60.0 + 20.0), "2h 05m");
        assert_eq!(duration(f64::NAN), "-");
        assert_eq!(duration(f64::INFINITY), "-");
        assert_eq!(duration(-3.0), "-");
    }

    #[test]
    fn lines_show_epoch_step_loss_rate_eta() {
        let (p, out) = lines(10.0, 4690, 0, Some(5));
        assert_eq!(p.mode(), Mode::Lines);
        // one line, at 10 s: 1000 steps of 128 samples, 12.8k samples/s, 0.01 s a step, 3690 left
        for s in 1..=1200u64 {
            p.step_at(secs(s as f64 * 0.01), 2, s, 128, Some(0.23449));
        }
        let text = out.text();
        assert_eq!(
            text,
            "dptrain: epoch 2/5  step 1000/4690 (21.3%)  loss 0.2345  12.8k samples/s  eta 37s\n"
        );
        assert!(!text.as_bytes().contains(&0x1b), "no ANSI escape: {text:?}");
        assert_eq!(p.samples(), 1200 * 128);
    }

    #[test]
    fn lines_respect_the_interval() {
        let (p, out) = lines(5.0, 100, 0, Some(1));
        // nothing at the first step, nor before 5 s
        p.step_at(secs(0.1), 1, 1, 10, None);
        p.step_at(secs(4.9), 1, 2, 10, None);
        assert_eq!(out.text(), "");
        p.step_at(secs(5.0), 1, 3, 10, None);
        p.step_at(secs(9.0), 1, 4, 10, None);
        assert_eq!(out.text().lines().count(), 1);
        p.step_at(secs(10.0), 1, 5, 10, None);
        p.step_at(secs(30.0), 1, 6, 10, None);
        let text = out.text();
        let got: Vec<&str> = text.lines().collect();
        assert_eq!(got.len(), 3, "{text}");
        assert!(got[0].contains("step 3/100 (3.0%)"), "{}", got[0]);
        assert!(got[0].contains("loss -"), "{}", got[0]);
        assert!(got[1].contains("step 5/100"), "{}", got[1]);
        assert!(got[2].contains("step 6/100"), "{}", got[2]);
    }

    #[test]
    fn lines_never_with_zero_interval() {
        let (p, out) = lines(0.0, 100, 0, Some(1));
        for s in 1..=100u64 {
            p.step_at(secs(s as f64 * 60.0), 1, s, 10, Some(1.0));
        }
        p.finish();
        assert_eq!(out.text(), "");
    }

    #[test]
    fn resumed_run_counts_only_its_own_steps() {
        // resumed at step 3000 of 4000; 100 steps of 50 samples in 10 s
        let (p, out) = lines(10.0, 4000, 3000, None);
        for s in 1..=100u64 {
            p.step_at(secs(s as f64 * 0.1), 7, 3000 + s, 50, Some(0.5));
        }
        // 500 samples/s; 900 steps left at 0.1 s each
        assert_eq!(
            out.text(),
            "dptrain: epoch 7  step 3100/4000 (77.5%)  loss 0.5000  500 samples/s  eta 1m 30s\n"
        );
    }

    #[test]
    fn unknown_total_has_no_percent_or_eta() {
        let (p, out) = lines(1.0, 0, 0, None);
        p.step_at(secs(2.0), 1, 10, 1000, Some(2.0));
        assert_eq!(
            out.text(),
            "dptrain: epoch 1  step 10  loss 2.0000  500 samples/s  eta -\n"
        );
    }

    #[test]
    fn hidden_prints_nothing() {
        let out = Shared::default();
        let p = Progress::with_mode(Mode::Hidden, Box::new(out.clone()), 10, 0, Some(1), 0.001);
        for s in 1..=10u64 {
            p.step_at(secs(s as f64), 1, s, 10, Some(1.0));
        }
        p.finish();
        assert_eq!(out.text(), "");
        // the samples still count, for the summary
        assert_eq!(p.samples(), 100);
        assert_eq!(Mode::detect(false), Mode::Hidden);
        assert_eq!(Progress::new(false, 10, 0, None, 1.0).mode(), Mode::Hidden);
    }

    #[test]
    fn bar_message_is_rounded() {
        let p = Progress::build(
            Mode::Bar,
            Some(ProgressDrawTarget::hidden()),
            Box::new(std::io::sink()),
            4690,
            0,
            Some(5),
            10.0,
        );
        p.step_at(secs(1.0), 2, 1, 278, None);
        let bar = p.bar.as_ref().unwrap();
        assert_eq!(bar.prefix(), "epoch 2/5");
        assert_eq!(
            bar.message(),
            "step 1/4690  loss -  278 samples/s  eta 1h 18m"
        );
        assert_eq!(bar.position(), 1);
        p.finish();
        assert!(bar.is_finished());
    }

    #[test]
    fn summary_with_metrics() {
        let s = Summary {
            steps: 4690,
            epochs: 5,
            seconds: 72.0,
            samples: 4_694_400,
            best: Some(("test_accuracy".into(), 0.979, 4)),
            last: vec![
                ("test_loss".into(), 0.07123),
                ("test_accuracy".into(), 0.9781),
            ],
        };
        assert_eq!(
            s.line(),
            "dptrain: done: 5 epochs, 4690 steps in 1m 12s (65.2k samples/s); \
             final test_loss 0.0712 test_accuracy 0.9781; best test_accuracy 0.9790 at epoch 4"
        );
    }

    #[test]
    fn summary_without_metrics_or_time() {
        let s = Summary {
            steps: 1,
            epochs: 1,
            seconds: 0.0,
            samples: 0,
            best: None,
            last: vec![],
        };
        assert_eq!(s.line(), "dptrain: done: 1 epoch, 1 step in 0s");
        let s = Summary {
            steps: 20,
            epochs: 0,
            seconds: 2.0,
            samples: 0,
            ..Summary::default()
        };
        let line = s.line();
        assert_eq!(
            line,
            "dptrain: done: 0 epochs, 20 steps in 2s (0 samples/s)"
        );
        assert!(!line.contains("NaN") && !line.contains("inf"));
    }
}
