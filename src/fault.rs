//! Fault injection for the reliability tests, through one environment variable:
//! `DPTRAIN_FAULT=stall:RANK:STEP` makes rank RANK stop (sleep for an hour) before step STEP, so
//! that the others wait in a collective and the stall watchdog can be seen to act.
//! Unset (always, outside tests) it costs one cached lookup per step.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Stall { rank: usize, step: u64 },
}

fn parse(s: &str) -> Option<Fault> {
    let mut it = s.split(':');
    match (it.next()?, it.next()?, it.next()?) {
        ("stall", r, st) => Some(Fault::Stall {
            rank: r.parse().ok()?,
            step: st.parse().ok()?,
        }),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_faults_parse() {
        assert_eq!(parse("stall:1:5"), Some(Fault::Stall { rank: 1, step: 5 }));
        assert_eq!(parse("stall:x:5"), None);
        assert_eq!(parse("boom"), None);
    }
}
