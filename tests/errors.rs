//! Bad input: each case gives one clear line on stderr and a non-zero exit, never a panic, and never
//! touches a model file already written.

mod util;
use util::{dptrain, shared, tmpdir};

fn csv(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// `train --data DATA` with short defaults that `extra` may override.
fn train(data: &str, extra: &[&str]) -> util::Run {
    let mut a = vec!["train", "--data", data];
    for (flag, value) in [
        ("--epochs", "1"),
        ("--batch-size", "2"),
        ("--device", "cpu"),
    ] {
        if !extra.contains(&flag) {
            a.extend_from_slice(&[flag, value]);
        }
    }
    a.extend_from_slice(extra);
    dptrain(&a)
}

#[test]
fn malformed_csv_files_are_refused_naming_file_line_and_column() {
    let d = tmpdir("csv");
    train(&csv(&d, "empty.csv", ""), &[]).fails_with("empty.csv: file is empty");
    train(&csv(&d, "ragged.csv", "0,1,2\n1,3\n"), &[])
        .fails_with("ragged.csv: line 2: expected 3 columns, found 2");
    train(&csv(&d, "nan.csv", "0,1,2\n1,NaN,4\n"), &[]).fails_with("nan.csv: line 2, column 2");
    train(&csv(&d, "inf.csv", "0,1,2\n1,2,inf\n0,1,1\n"), &[]).fails_with("line 2, column 3");
    train(&csv(&d, "text.csv", "0,1,2\n1,abc,4\n"), &[]).fails_with("line 2, column 2");
    train(&csv(&d, "missing.csv", "0,1,2\n1,,4\n"), &[]).fails_with("line 2, column 2");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn labels_that_cannot_be_classes_are_refused() {
    let d = tmpdir("labels");
    let rows = "0,1,2\n1,2,3\n0,1.5,2\n1,3,1\n2,5,5\n";
    train(
        &csv(&d, "three.csv", rows),
        &["--model", "logreg", "--test-fraction", "0"],
    )
    .fails_with("--model logreg needs labels 0 and 1");
    train(
        &csv(&d, "frac.csv", "0,1,2\n1.5,2,3\n0,1,1\n"),
        &["--test-fraction", "0"],
    )
    .fails_with("sample 2: target 1.5 is not a class label");
    train(
        &csv(&d, "neg.csv", "0,1,2\n-1,2,3\n0,1,1\n"),
        &["--test-fraction", "0"],
    )
    .fails_with("not a class label");
    train(
        &csv(&d, "single.csv", "0,1,2\n0,2,3\n0,1,1\n"),
        &["--test-fraction", "0"],
    )
    .fails_with("single class");
    let test = csv(&d, "test.csv", "0,1,2\n7,2,3\n");
    train(&csv(&d, "train.csv", rows), &["--test-data", &test])
        .fails_with("sample 2: label 7 is out of range");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn nonsensical_training_settings_are_refused() {
    let iris = shared("iris.csv");
    train(&iris, &["--batch-size", "1000"])
        .fails_with("--batch-size 1000 is larger than the 120 training samples");
    train(&iris, &["--lr", "0"]).fails_with("--lr must be a positive number");
    train(&iris, &["--lr=-0.5"]).fails_with("--lr must be a positive number");
    train(&iris, &["--lr", "NaN"]).fails_with("--lr must be a positive number");
    train(&iris, &["--model", "mlp", "--hidden", "8,0"])
        .fails_with("layer widths must be at least 1");
    train(&iris, &["--epochs", "0"]).fails_with("must be at least 1");
    train(&iris, &["--batch-size", "0"]).fails_with("--batch-size must be at least 1");
    train(&iris, &["--momentum", "1.5"]).fails_with("--momentum must be in [0, 1)");
    train(&iris, &["--test-fraction", "1.5"]).fails_with("--test-fraction must be in [0, 1)");
    train(&iris, &["--epochs", "many"]).fails_with("invalid value 'many'");
    train(&iris, &["--model", "logreg"]).fails_with("needs labels 0 and 1");
    train(&iris, &["--model", "softmax", "--hidden", "8"])
        .fails_with("--hidden is only for --model mlp");
    train("synth:nope", &[]).fails_with("unknown synthetic kind");
}

#[test]
fn unreadable_paths_are_refused() {
    let d = tmpdir("paths");
    train("/nonexistent/data.csv", &[]).fails_with("/nonexistent/data.csv: cannot read");
    // a directory without the MNIST files
    train(&d.display().to_string(), &[]).fails_with("train-images-idx3-ubyte");
    train(
        &shared("iris.csv"),
        &["--init", "/nonexistent/init.safetensors"],
    )
    .fails_with("cannot read");
    let junk = csv(&d, "junk.safetensors", "not a model");
    train(&shared("iris.csv"), &["--init", &junk]).fails_with("not a safetensors file");
    dptrain(&["eval", "--model-file", &junk, "--data", &shared("iris.csv")])
        .fails_with("not a safetensors file");
    dptrain(&["data", "inspect", "/nonexistent"]).fails_with("cannot read");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_failed_run_never_touches_an_existing_model_file() {
    let d = tmpdir("keep");
    let model = d.join("model.safetensors").display().to_string();
    let iris = shared("iris.csv");
    dptrain(&[
        "train", "--data", &iris, "--epochs", "2", "--device", "cpu", "--save", &model,
    ])
    .ok();
    let before = std::fs::read(&model).unwrap();
    train(&iris, &["--lr", "0", "--save", &model]).fails_with("--lr");
    // diverges: the loss becomes non-finite, training stops before saving
    train(
        "synth:linear:500:3",
        &[
            "--model", "linreg", "--lr", "100", "--epochs", "3", "--save", &model,
        ],
    )
    .fails_with("training diverged: the loss is");
    // wrong shapes for --init: refused, nothing written
    train(
        &iris,
        &["--model", "mlp", "--hidden", "5", "--init", &model],
    )
    .fails_with("layers.0.weight has shape [3, 4], the model needs [5, 4]");
    // the model file as both --init and --save: refused before the work
    train(&iris, &["--init", &model, "--save", &model])
        .fails_with("is an input of this run (--init)");
    assert_eq!(std::fs::read(&model).unwrap(), before);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_adapter_index_past_the_list_is_refused() {
    train(&shared("iris.csv"), &["--device", "gpu", "--gpu", "99"])
        .fails_with("--gpu 99 is out of range");
}

#[test]
fn no_adapter_says_how_to_get_one_and_auto_falls_back_to_the_cpu() {
    // hide every Vulkan driver from the loader
    let run = |device: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dptrain"))
            .args([
                "train",
                "--data",
                &shared("iris.csv"),
                "--epochs",
                "1",
                "--device",
                device,
            ])
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .env("WGPU_BACKEND", "vulkan")
            .output()
            .expect("run dptrain");
        util::Run {
            cmd: format!("dptrain train --device {device} (no Vulkan driver)"),
            out,
        }
    };
    run("gpu").fails_with("no GPU adapter found: install a Vulkan driver");
    let auto = run("auto").ok();
    assert!(auto.stdout().contains("CPU reference"), "{}", auto.show());
}

/// The exchange's flags are shared by train and bench; the one that only changes what train learns
/// is refused by bench rather than ignored.
#[test]
fn bench_refuses_the_staleness_momentum_it_would_ignore() {
    dptrain(&[
        "bench",
        "--workload",
        "seed-logreg",
        "--device",
        "cpu",
        "--staleness",
        "1",
        "--staleness-momentum",
        "0.5",
    ])
    .fails_with("--staleness-momentum changes what train learns, not a step's time");
}
