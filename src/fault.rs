//! Fault injection for the reliability tests, through one environment variable:
//! - `DPTRAIN_FAULT=stall:RANK:STEP` makes rank RANK stop (sleep for an hour) before step STEP, so
//!   that the others wait in a collective and the stall watchdog can be seen to act;
//! - `DPTRAIN_FAULT=slow:RANK:F` makes rank RANK's compute take F times as long (F ≥ 1): after its
//!   micro-batches, each step sleeps F − 1 times the compute of its previous step, so that the
//!   rank looks like a slower device to the others and to `--balance auto`.
//!
//! Unset (always, outside tests) it costs one cached lookup per step.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Stall { rank: usize, step: u64 },
    Slow { rank: usize, factor: f64 },
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
        _ => return None,
    };
    it.next().is_none().then_some(fault)
}

fn fault() -> Option<Fault> {
    static F: OnceLock<Option<Fault>> = OnceLock::new();
    *F.get_or_init(|| {
        std::env::var("DPTRAIN_FAULT")
            .ok()
            .as_deref()
            .and_then(parse)
    })
}

/// Called by every rank before each training step (0-based `step`).
pub fn before_step(rank: usize, step: u64) {
    if let Some(Fault::Stall { rank: r, step: s }) = fault() {
        if r == rank && s == step {
            eprintln!("dptrain: DPTRAIN_FAULT: rank {rank} stalls before step {step}");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// How many times as long `rank`'s compute is to take (`slow:RANK:F`); None: as long as it takes.
pub fn slow_factor(rank: usize) -> Option<f64> {
    match fault() {
        Some(Fault::Slow { rank: r, factor }) if r == rank && factor > 1.0 => Some(factor),
        _ => None,
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
        assert_eq!(parse("stall:x:5"), None);
        assert_eq!(parse("slow:1:0.5"), None);
        assert_eq!(parse("slow:1:inf"), None);
        assert_eq!(parse("slow:1:4:9"), None);
        assert_eq!(parse("boom"), None);
    }
}
