//! Helpers shared by the integration tests: run the binary, show everything when it fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a test dataset, named as in `../shared/datasets`: `"iris.csv"`, `"mnist"`, `"mnist/<file>"`.
///
/// The CSVs are vendored in `tests/data/` (byte-for-byte copies, checked by `tests/data.rs`), so a bare
/// `git clone` has them. MNIST is not vendored: see [`mnist_dir`].
pub fn shared(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if rel == "mnist" {
        return mnist_dir().display().to_string();
    }
    if let Some(file) = rel.strip_prefix("mnist/") {
        let dir = mnist_dir();
        let p = dir.join(file);
        // data/mnist holds the raw IDX files, ../shared the gzipped ones; the loader takes both.
        let raw = file.strip_suffix(".gz").map(|f| dir.join(f));
        return match raw {
            Some(raw) if !p.exists() && raw.exists() => raw,
            _ => p,
        }
        .display()
        .to_string();
    }
    let vendored = root.join("tests/data").join(rel);
    if vendored.exists() {
        return vendored.display().to_string();
    }
    // Anything not vendored (nothing the tests use today) still comes from CI's folder beside the repo.
    root.join("../shared/datasets")
        .join(rel)
        .display()
        .to_string()
}

const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Whether `dir` holds the four MNIST IDX files, raw or gzipped.
fn holds_mnist(dir: &Path) -> bool {
    MNIST_FILES
        .iter()
        .all(|f| dir.join(f).is_file() || dir.join(format!("{f}.gz")).is_file())
}

/// The MNIST directory: `$DPTRAIN_MNIST` when set (as `scripts/test.sh` does), else
/// `../shared/datasets/mnist` when it exists (CI), else `data/mnist` in the repository when it holds
/// the four files (`scripts/get-mnist.sh` fills it); else a panic saying what to run.
pub fn mnist_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(d) = std::env::var_os("DPTRAIN_MNIST").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        assert!(
            holds_mnist(&d),
            "DPTRAIN_MNIST={} does not hold the four MNIST IDX files: run `scripts/get-mnist.sh` and set DPTRAIN_MNIST to the directory it prints",
            d.display()
        );
        return d;
    }
    let ci = root.join("../shared/datasets/mnist");
    if ci.is_dir() {
        return ci;
    }
    let local = root.join("data/mnist");
    if holds_mnist(&local) {
        return local;
    }
    panic!(
        "MNIST not found (no $DPTRAIN_MNIST, no ../shared/datasets/mnist, no data/mnist): run `scripts/get-mnist.sh` in {} (it fetches data/mnist), or scripts/test.sh",
        root.display()
    );
}

/// A fresh temporary folder for one test.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dptrain-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

pub struct Run {
    pub cmd: String,
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn show(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
            self.cmd,
            self.out.status,
            self.stdout(),
            self.stderr()
        )
    }
    pub fn ok(self) -> Self {
        assert!(
            self.out.status.success(),
            "expected success\n{}",
            self.show()
        );
        self
    }
    /// Exit non-zero with exactly one line on stderr containing `needle`, and no panic. A usage
    /// error (exit status 2) keeps clap's own text, which may take several lines.
    pub fn fails_with(self, needle: &str) -> Self {
        let err = self.stderr();
        assert!(
            !self.out.status.success(),
            "expected failure\n{}",
            self.show()
        );
        assert!(!err.contains("panicked"), "panicked\n{}", self.show());
        if self.out.status.code() != Some(2) {
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "not one line\n{}",
                self.show()
            );
        }
        assert!(
            err.contains(needle),
            "stderr lacks {needle:?}\n{}",
            self.show()
        );
        self
    }
}

pub fn dptrain(args: &[&str]) -> Run {
    let bin = env!("CARGO_BIN_EXE_dptrain");
    let out = Command::new(bin)
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run dptrain");
    Run {
        cmd: format!("dptrain {}", args.join(" ")),
        out,
    }
}

/// The JSON objects of a --metrics-out file.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("metrics file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Train with `args` plus --metrics-out and return the last epoch's object.
pub fn train_last(name: &str, args: &[&str]) -> serde_json::Value {
    let dir = tmpdir(name);
    let m = dir.join("metrics.jsonl");
    let ms = m.display().to_string();
    let mut all: Vec<&str> = vec!["train"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--metrics-out", &ms]);
    dptrain(&all).ok();
    let v = metrics(&m);
    let last = v.last().cloned().expect("at least one epoch");
    let _ = std::fs::remove_dir_all(&dir);
    last
}

/// Open MPI's settings for tests: root allowed (CI runs as root), more ranks than cores.
pub fn mpi_env(c: &mut Command) -> &mut Command {
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        // more ranks than cores here: the start-up probe would warn on every run
        .env("DPTRAIN_TRANSPORT_PROBE", "off")
}

/// `mpirun` with the given arguments as they stand.
pub fn mpirun_raw(args: &[&str]) -> Run {
    let mut c = Command::new("mpirun");
    let out = mpi_env(&mut c)
        .args(args)
        .output()
        .expect("mpirun (apt-get install openmpi-bin)");
    Run {
        cmd: format!("mpirun {}", args.join(" ")),
        out,
    }
}

/// `mpirun --oversubscribe -np N dptrain ARGS` with extra environment variables.
pub fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)]) -> Run {
    let np_s = np.to_string();
    let mut all = vec![
        "--oversubscribe",
        "-np",
        &np_s,
        env!("CARGO_BIN_EXE_dptrain"),
    ];
    all.extend_from_slice(args);
    let mut c = Command::new("mpirun");
    mpi_env(&mut c).args(&all);
    for (k, v) in env {
        c.env(k, v);
    }
    Run {
        cmd: format!("mpirun {}", all.join(" ")),
        out: c.output().expect("mpirun (apt-get install openmpi-bin)"),
    }
}

/// The flat parameters of a saved model file.
pub fn params(path: &Path) -> Vec<f32> {
    let m = dptrain::store::modelfile::load(path).expect("model file");
    let spec = m.spec.clone().expect("spec in metadata");
    m.flat_params(&spec, path).expect("parameters")
}

/// max |a − b| / max |b|: the relative error the multi-rank checks bound.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max);
    d / b.iter().map(|y| f64::from(y.abs())).fold(1e-30, f64::max)
}

/// The MNIST comparison runs: `mpirun -np 2 dptrain train` on MNIST, an MLP-256, 5 epochs,
/// per-rank batch 64, lr 0.1, momentum 0.9, CPU backend, seed `seed`, then `extra`; the last test
/// accuracy and the run's stdout. The metrics file goes into `dir`.
pub fn mnist_mlp256(dir: &Path, seed: &str, extra: &[&str]) -> (f64, String) {
    let m = dir.join(format!("m-{seed}-{}.jsonl", extra.join("_")));
    let ms = m.display().to_string();
    let mnist = shared("mnist");
    let mut args = vec![
        "train",
        "--data",
        &mnist,
        "--model",
        "mlp",
        "--hidden",
        "256",
        "--epochs",
        "5",
        "--batch-size",
        "64",
        "--lr",
        "0.1",
        "--momentum",
        "0.9",
        "--seed",
        seed,
        "--device",
        "cpu",
        "--metrics-out",
        &ms,
    ];
    args.extend_from_slice(extra);
    let out = mpirun(2, &args, &[]).ok().stdout();
    let acc = metrics(&m).pop().expect("an epoch record")["test_accuracy"]
        .as_f64()
        .expect("a test accuracy");
    (acc, out)
}

/// Tests of one binary share the machine through this lock: a test that measures time (a wait
/// counter, a deadline) takes it alone with [`alone`]; every other test that starts ranks takes
/// a shared turn with [`turn`], so that nothing else runs beside a measurement. On 2 cores, four
/// concurrent `mpirun`s made a slowed rank's wait counter meaningless.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A shared turn on the machine (see [`MACHINE`]); a failed test does not poison it.
#[allow(dead_code)]
pub fn turn() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// The machine alone (see [`MACHINE`]), for a test that measures time.
#[allow(dead_code)]
pub fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}
