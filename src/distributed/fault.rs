//! Fault injection for the reliability tests, through one environment variable:
//! - `DPTRAIN_FAULT=stall:RANK:STEP` makes rank RANK stop (sleep for an hour) before step STEP, so
//!   that the others wait in a collective and the stall watchdog can be seen to act;
//! - `DPTRAIN_FAULT=slow:RANK:F` makes rank RANK's compute take F times as long (F ≥ 1): after its
//!   micro-batches, each step sleeps F − 1 times the compute of its previous step, so that the
//!   rank looks like a slower device to the others and to `--balance auto`;
//! - `DPTRAIN_FAULT=jitter:RANK:P:MS` makes P % of rank RANK's steps (drawn by a hash of the step,
//!   and the rank, the same in every run) wait MS milliseconds before they start.
//!
//! Several faults may be given, separated by commas (`jitter:0:30:20,jitter:1:30:20`).
//!
//! Unset (always, outside tests) it costs one cached lookup per step.

use std::sync::OnceLock;

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
