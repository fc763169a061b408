//! Bytes from every rank to rank 0, in rounds of bounded size (checkpoints' per-rank state, the
//! trace), and the trace's gathering: clock offsets across barriers, then rank 0 merges and writes.

use std::path::Path;

use anyhow::{Context, ensure};

use crate::distributed::comm::Communicator;
use crate::observe::trace::{self, Recorder};

/// Every rank: stop `recorder`, measure the clock offsets (barriers), and send the events to rank
/// 0, which merges them and writes `path` atomically. A collective: call it on every rank, after
/// the run's last other collective. Rank 0 returns the write's error.
pub fn gather_and_write(
    recorder: &Recorder,
    comm: &dyn Communicator,
    path: &Path,
) -> anyhow::Result<()> {
    recorder.disable();
    let mut sync_us = Vec::with_capacity(trace::SYNC_ROUNDS);
    for _ in 0..trace::SYNC_ROUNDS {
        comm.barrier()?;
        sync_us.push(recorder.now_us());
    }
    let mine = recorder.take(comm.rank(), sync_us);
    let bytes = trace::encode(&mine)?;
    drop(mine);
    let Some(parts) = gather_to_root(comm, &bytes, chunk_bytes(comm.size()))? else {
        return Ok(());
    };
    drop(bytes);
    trace::write_merged(&parts, path)
}

/// [`gather_and_write`] of the process's recorder (`--trace FILE`).
pub fn write_trace(comm: &dyn Communicator, path: &Path) -> anyhow::Result<()> {
    gather_and_write(trace::global(), comm, path)
}

/// Bytes each rank sends per gather round: all ranks receive every round, so a round stays
/// near 64 MiB in all.
pub fn chunk_bytes(ranks: usize) -> usize {
    ((64 << 20) / ranks.max(1)).clamp(64 << 10, 16 << 20)
}

/// Every rank's `mine`, in rank order, on rank 0 (None elsewhere), in rounds of at most `chunk`
/// bytes a rank.
pub fn gather_to_root(
    comm: &dyn Communicator,
    mine: &[u8],
    chunk: usize,
) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
    ensure!(chunk > 0, "gather chunk of 0 bytes");
    let lens: Vec<usize> = comm
        .all_gather_bytes(&(mine.len() as u64).to_le_bytes())?
        .iter()
        .map(|b| {
            let a: [u8; 8] = b.as_slice().try_into().context("a rank's trace length")?;
            Ok(u64::from_le_bytes(a) as usize)
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        lens.len() == comm.size(),
        "trace lengths from {} of {} ranks",
        lens.len(),
        comm.size()
    );
    let rounds = lens.iter().map(|l| l.div_ceil(chunk)).max().unwrap_or(0);
    let root = comm.is_root();
    let mut out: Vec<Vec<u8>> = if root {
        lens.iter().map(|&l| Vec::with_capacity(l)).collect()
    } else {
        Vec::new()
    };
    for k in 0..rounds {
        let part = mine
            .get(k * chunk..((k + 1) * chunk).min(mine.len()))
            .unwrap_or(&[]);
        let parts = comm.all_gather_bytes(part)?;
        if root {
            ensure!(parts.len() == out.len(), "trace parts from too few ranks");
            for (o, p) in out.iter_mut().zip(parts) {
                o.extend_from_slice(&p);
            }
        }
    }
    if !root {
        return Ok(None);
    }
    for (r, (o, &l)) in out.iter().zip(&lens).enumerate() {
        ensure!(
            o.len() == l,
            "rank {r}'s trace arrived with {} of {l} bytes",
            o.len()
        );
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use super::*;
    use crate::distributed::comm::SingleProcess;

    fn sleep_us(us: u64) {
        std::thread::sleep(Duration::from_micros(us));
    }

    #[test]
    fn gather_reassembles_chunks() {
        let bytes: Vec<u8> = (0..100u8).collect();
        for chunk in [1, 7, 100, 1000] {
            let got = gather_to_root(&SingleProcess, &bytes, chunk)
                .unwrap()
                .unwrap();
            assert_eq!(got, vec![bytes.clone()]);
        }
        let got = gather_to_root(&SingleProcess, &[], 7).unwrap().unwrap();
        assert_eq!(got, vec![Vec::<u8>::new()]);
        assert_eq!(chunk_bytes(1), 16 << 20);
        assert_eq!(chunk_bytes(4096), 64 << 10);
    }

    #[test]
    fn single_process_writes_a_trace_that_loads() {
        let dir = std::env::temp_dir().join(format!("dptrain-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.trace.json");
        let r = Recorder::new();
        r.enable();
        for step in 0..3 {
            let _s = r.span("step", "step").arg("step", step);
            for phase in ["gather", "forward", "loss"] {
                let _p = r.span(phase, "phase");
                sleep_us(20);
            }
            let t = Instant::now();
            {
                let _x = r.span("exchange", "phase");
                sleep_us(30);
            }
            r.gpu_kernels(
                t,
                Instant::now(),
                &[("matmul".into(), 1e-5), ("relu".into(), 2e-6)],
            );
            r.counter("loss", 1.0 / f64::from(step + 1));
        }
        r.instant("done", "run");
        gather_and_write(&r, &SingleProcess, &path).unwrap();
        assert!(!r.enabled(), "writing stops the recording");
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["displayTimeUnit"], "ms");
        assert_eq!(v["metadata"]["ranks"], 1);
        assert_eq!(v["metadata"]["capped"], false);
        let evs = v["traceEvents"].as_array().unwrap();
        let mut last: std::collections::HashMap<(u64, u64), f64> = Default::default();
        for e in evs {
            let ph = e["ph"].as_str().unwrap();
            assert!(["X", "i", "C", "M"].contains(&ph), "{e}");
            assert!(e["name"].as_str().is_some_and(|n| !n.is_empty()), "{e}");
            let (pid, tid) = (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
            assert_eq!(pid, 1);
            let ts = e["ts"].as_f64().unwrap();
            assert!(ts >= 0.0);
            if ph == "X" {
                assert!(e["dur"].as_f64().unwrap() >= 0.0);
            }
            if ph != "M" {
                let prev = last.insert((pid, tid), ts).unwrap_or(f64::MIN);
                assert!(prev <= ts, "lane {tid} goes back in time at {e}");
            }
        }
        let meta = |name: &str, tid: u64| {
            evs.iter()
                .find(|e| e["ph"] == "M" && e["name"] == name && e["tid"] == tid)
                .map(|e| e["args"]["name"].clone())
        };
        assert_eq!(meta("process_name", 0), Some(Value::from("rank 0")));
        assert_eq!(meta("thread_name", 1), Some(Value::from("training")));
        assert_eq!(meta("thread_name", 3), Some(Value::from("gpu")));
        let count = |name: &str| evs.iter().filter(|e| e["name"] == name).count();
        assert_eq!(count("step"), 3);
        assert_eq!(count("forward"), 3);
        assert_eq!(count("matmul"), 3);
        assert_eq!(count("loss"), 6, "the phase and the counter");
        assert_eq!(count("done"), 1);
        // the recorder was emptied; no temporary file is left behind
        assert!(r.take(0, vec![]).events.is_empty());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
