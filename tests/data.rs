//! The vendored test datasets in `tests/data/`: the bytes their SHA256SUMS name, found by `shared()`
//! inside the repository (so a bare `git clone` has them), and the shapes their README states.

mod util;
use std::path::{Path, PathBuf};
use std::process::Command;

use dptrain::data::{self, CsvOptions};
use util::{mnist_dir, shared};

const CSVS: [&str; 4] = ["iris.csv", "wine.csv", "breast_cancer.csv", "digits.csv"];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

#[test]
fn vendored_csvs_match_their_sha256sums() {
    let dir = data_dir();
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).expect("tests/data/SHA256SUMS");
    let mut listed: Vec<&str> = sums
        .lines()
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .expect("'<sha256>  <file>' line")
        })
        .collect();
    listed.sort_unstable();
    let mut want = CSVS.to_vec();
    want.sort_unstable();
    assert_eq!(
        listed, want,
        "SHA256SUMS must list exactly the vendored CSVs"
    );
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".csv"))
        .collect();
    on_disk.sort_unstable();
    assert_eq!(
        on_disk, want,
        "a CSV in tests/data/ that SHA256SUMS does not cover"
    );

    let out = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dir)
        .output()
        .expect("run sha256sum (coreutils)");
    assert!(
        out.status.success(),
        "sha256sum -c SHA256SUMS in {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": OK"))
        .count();
    assert_eq!(ok, CSVS.len(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn shared_csvs_come_from_inside_the_repository() {
    let dir = data_dir();
    for name in CSVS {
        let p = PathBuf::from(shared(name));
        assert_eq!(p, dir.join(name), "shared({name:?})");
        assert!(p.is_file(), "{} is missing", p.display());
        assert!(!p.display().to_string().contains("/../"), "{}", p.display());
    }
}

#[test]
fn vendored_csvs_have_the_shapes_their_readme_states() {
    // (file, samples, features, samples per class)
    let cases: [(&str, usize, usize, &[usize]); 4] = [
        ("iris.csv", 150, 4, &[50, 50, 50]),
        ("wine.csv", 178, 13, &[59, 71, 48]),
        ("breast_cancer.csv", 569, 30, &[212, 357]),
        (
            "digits.csv",
            1797,
            64,
            &[178, 182, 177, 183, 181, 182, 181, 179, 174, 180],
        ),
    ];
    for (name, n, nf, counts) in cases {
        let ds = data::load_csv(Path::new(&shared(name)), &CsvOptions::default()).unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (n, nf), "{name}");
        assert_eq!(ds.class_counts().unwrap(), counts, "{name}");
        assert!(!ds.pixels, "{name}");
    }
}

/// MNIST is not vendored: `shared("mnist")` finds it through `$DPTRAIN_MNIST`, `../shared` or
/// `data/mnist` (raw or gzipped IDX), and it is the real test set.
#[test]
fn mnist_is_found_and_has_the_known_test_set_class_counts() {
    let dir = mnist_dir();
    assert_eq!(PathBuf::from(shared("mnist")), dir);
    let images = PathBuf::from(shared("mnist/t10k-images-idx3-ubyte.gz"));
    let labels = PathBuf::from(shared("mnist/t10k-labels-idx1-ubyte.gz"));
    assert!(images.is_file() && labels.is_file(), "{}", dir.display());
    let ds = data::load_idx_pair(&images, &labels).unwrap();
    assert_eq!((ds.n_samples, ds.n_features), (10000, 784));
    assert_eq!(
        ds.class_counts().unwrap(),
        vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
}
