//! The timeline (`dptrain::observe::trace`): nothing allocated while recording is off (this binary counts
//! allocations), and three real MPI ranks whose clocks start apart merged onto one clock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dptrain::observe::trace;
use serde_json::Value;

mod util;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call goes straight to the system allocator; the count is a thread-local Cell.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract is passed on unchanged
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: as above
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn recording_off_allocates_nothing() {
    assert!(!trace::enabled());
    let kernels = vec![("matmul".to_string(), 1e-5)];
    let t = Instant::now();
    let before = allocs();
    for step in 0..1000u64 {
        let _s = trace::span("step", "step").arg("step", step);
        let v = trace::instrument_phase("forward", || step * 2);
        std::hint::black_box(v);
        trace::complete("allreduce", "comm", t, Duration::from_micros(3), &[]);
        trace::counter("loss", 0.25);
        trace::instant("mark", "run");
        trace::gpu_kernels(t, Instant::now(), &kernels);
    }
    assert_eq!(allocs() - before, 0, "allocations while recording is off");
    // the count does count
    std::hint::black_box(vec![1u8; 16]);
    assert!(allocs() > before);
}

const CHILD: &str = "DPTRAIN_TRACE_TEST_OUT";

/// The tests that start mpirun take turns: on a 2-core machine, five ranks at once can deschedule
/// one for longer than the clock test's tolerance right after its barrier.
static MPIRUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One rank of `three_ranks_share_one_clock` (does nothing unless started by it).
#[test]
fn mpi_rank() {
    let Some(out) = std::env::var_os(CHILD) else {
        return;
    };
    let comm = dptrain::distributed::comm::from_env(Some(Duration::from_secs(60))).expect("MPI");
    // each rank's clock starts 150 ms after the one before
    std::thread::sleep(Duration::from_millis(150 * comm.rank() as u64));
    trace::enable();
    {
        let _g = trace::span("work", "phase").arg("rank", comm.rank());
        std::thread::sleep(Duration::from_millis(5));
    }
    comm.barrier().unwrap();
    trace::instant("after barrier", "test");
    dptrain::distributed::gather::write_trace(comm.as_ref(), &PathBuf::from(out)).unwrap();
}

#[test]
fn three_ranks_share_one_clock() {
    let _turn = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("skipped: no mpirun (apt-get install openmpi-bin)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dptrain-it-{}-trace", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mpi.trace.json");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-np", "3"])
        .arg(&exe)
        .args(["--exact", "mpi_rank", "--nocapture", "--test-threads", "1"])
        .env(CHILD, &path)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mpirun failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let evs = v["traceEvents"].as_array().unwrap();
    let meta = &v["metadata"];
    assert_eq!(meta["ranks"], 3);
    let offsets: Vec<f64> = meta["clock_offset_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_f64().unwrap())
        .collect();
    // rank r's clock started about 150 r ms after rank 0's
    assert_eq!(offsets[0], 0.0);
    assert!(
        offsets[1] > 100e3 && offsets[2] > offsets[1] + 100e3,
        "{offsets:?}"
    );
    let marks: Vec<f64> = (1..=3)
        .map(|pid| {
            let n = format!("rank {}", pid - 1);
            assert!(evs.iter().any(|e| e["name"] == "process_name"
                && e["pid"] == pid
                && e["args"]["name"] == n.as_str()));
            evs.iter()
                .find(|e| e["pid"] == pid && e["name"] == "after barrier")
                .unwrap()["ts"]
                .as_f64()
                .unwrap()
        })
        .collect();
    // on one clock the moments after a common barrier agree, though the ranks' own clocks
    // differ by 150 ms and more (40 ms allows for an oversubscribed machine)
    let spread = marks.iter().cloned().fold(f64::MIN, f64::max)
        - marks.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread < 40e3, "after-barrier marks {marks:?} µs");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `dptrain train --trace` under mpirun (2 ranks, lavapipe, several buckets): one process per rank,
/// each with its steps and phases on the training lane, every bucket's readback, wait and upload
/// there and its allreduce on the communication lane, and one step's GPU kernels; a path that is
/// the data file is refused before any work.
#[test]
fn training_writes_a_timeline_per_rank() {
    let _turn = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let d = util::tmpdir("trace-train");
    let digits = util::shared("digits.csv");
    let path = d.join("run.trace.json");
    let ps = path.display().to_string();
    util::mpirun(
        2,
        &[
            "train",
            "--data",
            &digits,
            "--model",
            "mlp",
            "--hidden",
            "64,64",
            "--epochs",
            "1",
            "--device",
            "gpu",
            "--bucket-mb",
            "0.01",
            "--trace",
            &ps,
        ],
        &[],
    )
    .ok();
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let evs = v["traceEvents"].as_array().unwrap();
    assert_eq!(v["metadata"]["ranks"], 2);
    let on = |pid: u64, tid: u64, name: &str| -> Vec<&Value> {
        evs.iter()
            .filter(|e| e["pid"] == pid && e["tid"] == tid && e["name"] == name)
            .collect()
    };
    // digits: 1437 training rows, batch 64 per rank: 12 steps
    for pid in [1u64, 2] {
        assert_eq!(on(pid, 1, "step").len(), 12, "rank {}", pid - 1);
        for phase in ["gather", "forward", "loss", "exchange", "update"] {
            assert_eq!(on(pid, 1, phase).len(), 12, "{phase} on rank {}", pid - 1);
        }
        let buckets = |tid: u64, name: &str| -> Vec<u64> {
            on(pid, tid, name)
                .iter()
                .map(|e| e["args"]["bucket"].as_u64().unwrap())
                .collect()
        };
        let read = buckets(1, "readback");
        assert!(read.iter().max().unwrap() >= &1, "buckets {read:?}");
        assert_eq!(read.len() % 12, 0);
        assert_eq!(buckets(1, "upload").len(), read.len());
        assert_eq!(buckets(1, "wait for sum").len(), read.len());
        let sums = on(pid, 2, "allreduce");
        assert_eq!(sums.len(), read.len(), "one allreduce per bucket per step");
        // each allreduce runs after its bucket was read back: the k-th readback before the k-th sum
        let readbacks = on(pid, 1, "readback");
        for (r, s) in readbacks.iter().zip(&sums) {
            assert!(s["ts"].as_f64().unwrap() >= r["ts"].as_f64().unwrap());
        }
        assert!(
            evs.iter()
                .any(|e| e["pid"] == pid && e["tid"] == 3 && e["name"] == "gpu step"),
            "no GPU kernels on rank {}",
            pid - 1
        );
    }
    util::dptrain(&[
        "train", "--data", &digits, "--epochs", "1", "--trace", &digits,
    ])
    .fails_with("--trace");
    let _ = std::fs::remove_dir_all(&d);
}
