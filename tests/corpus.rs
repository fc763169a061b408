//! The corpus of bad inputs (tests/corpus/CASES.tsv): every case gives one line on stderr, a
//! non-zero exit and no panic, and leaves the good model file and checkpoints untouched.

mod util;
use std::path::Path;

use util::{dptrain, shared, tmpdir};

/// Checkpoint variants made from a good one: truncated, bit-flipped, another format version.
fn variants(good: &Path, dir: &Path) {
    let bytes = std::fs::read(good).unwrap();
    std::fs::write(
        dir.join("truncated.safetensors"),
        &bytes[..bytes.len() * 2 / 3],
    )
    .unwrap();
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 5] ^= 0x01;
    std::fs::write(dir.join("flipped.safetensors"), flipped).unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(text.contains("dptrain-checkpoint-2"));
    let version = bytes_replace(&bytes, b"dptrain-checkpoint-2", b"dptrain-checkpoint-9");
    std::fs::write(dir.join("version.safetensors"), version).unwrap();
}

fn bytes_replace(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = b.windows(from.len()).position(|w| w == from).unwrap();
    let mut v = b[..at].to_vec();
    v.extend_from_slice(to);
    v.extend_from_slice(&b[at + from.len()..]);
    v
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_bad_input_in_the_corpus_fails_cleanly_and_harms_nothing() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let d = tmpdir("corpus");
    let iris = shared("iris.csv");
    let model = d.join("good-model.safetensors");
    let ck = d.join("ck");
    let variants_dir = d.join("variants");
    std::fs::create_dir_all(&variants_dir).unwrap();
    let (ms, cks) = (model.display().to_string(), ck.display().to_string());
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--save",
        &ms,
        "--checkpoint-dir",
        &cks,
    ])
    .ok();
    let good = dptrain::store::checkpoint::list(&ck)
        .last()
        .unwrap()
        .clone();
    let good_name = good.file_name().unwrap().to_string_lossy().into_owned();
    variants(&good, &variants_dir);
    let model_before = std::fs::read(&model).unwrap();
    let ck_before = snapshot(&ck);
    // the inputs are good files too: no case may change them
    let corpus_before = snapshot(&corpus);
    let iris_before = std::fs::read(&iris).unwrap();
    let text = std::fs::read_to_string(corpus.join("CASES.tsv")).unwrap();
    let mut count = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "malformed case line: {line}");
        let (name, args, want) = (cols[0], cols[1], cols[2]);
        let args = args
            .replace("{c}", &corpus.display().to_string())
            .replace("{iris}", &iris)
            .replace("{model}", &ms)
            .replace("{ck}/GOOD", &good.display().to_string())
            .replace("{ck}", &cks)
            .replace("{ckfile:", &format!("{}/", variants_dir.display()));
        let args = args.replace("}", ".safetensors");
        let mut argv: Vec<&str> = args.split(' ').collect();
        if !argv.contains(&"--device") {
            argv.extend_from_slice(&["--device", "cpu"]);
        }
        let run = dptrain(&argv);
        // usage errors (status 2) keep clap's own several-line text
        let lines_ok =
            run.out.status.code() == Some(2) || run.stderr().trim_end().lines().count() == 1;
        if run.out.status.success() || !run.stderr().contains(want) || !lines_ok {
            panic!(
                "case {name}: expected one error line containing {want:?}\n{}",
                run.show()
            );
        }
        assert!(
            !run.stderr().contains("panicked"),
            "case {name}\n{}",
            run.show()
        );
        assert_eq!(
            std::fs::read(&model).unwrap(),
            model_before,
            "case {name} changed the model file"
        );
        assert_eq!(
            snapshot(&ck),
            ck_before,
            "case {name} changed the checkpoints"
        );
        count += 1;
    }
    assert!(count >= 30, "only {count} cases");
    assert!(ck_before.iter().any(|(n, _)| *n == good_name));
    assert!(
        snapshot(&corpus) == corpus_before,
        "a case changed a corpus file"
    );
    assert_eq!(
        std::fs::read(&iris).unwrap(),
        iris_before,
        "a case changed iris.csv"
    );
    let _ = std::fs::remove_dir_all(&d);
}
