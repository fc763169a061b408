//! Saved models reload: `eval` reports the metrics training ended with, `--init` resumes from a file,
//! and `data synth` / `data inspect` work on what they write.

mod util;
use util::{dptrain, metrics, shared, tmpdir};

#[test]
fn eval_of_a_saved_model_reports_the_final_test_metrics() {
    let d = tmpdir("eval");
    let model = d.join("m.safetensors").display().to_string();
    let m = d.join("m.jsonl");
    let test = d.join("test.csv").display().to_string();
    let train = d.join("train.csv").display().to_string();
    // a fixed split written out, so that eval can read the same test set
    dptrain(&[
        "data",
        "synth",
        "--kind",
        "blobs",
        "--samples",
        "600",
        "--features",
        "5",
        "--classes",
        "4",
        "--seed",
        "1",
        "--out",
        &train,
    ])
    .ok();
    dptrain(&[
        "data",
        "synth",
        "--kind",
        "blobs",
        "--samples",
        "200",
        "--features",
        "5",
        "--classes",
        "4",
        "--seed",
        "1",
        "--out",
        &test,
    ])
    .ok();
    for device in ["gpu", "cpu"] {
        dptrain(&[
            "train",
            "--data",
            &train,
            "--test-data",
            &test,
            "--model",
            "mlp",
            "--hidden",
            "16",
            "--epochs",
            "3",
            "--device",
            device,
            "--save",
            &model,
            "--metrics-out",
            &m.display().to_string(),
        ])
        .ok();
        let last = metrics(&m).pop().unwrap();
        let out = dptrain(&[
            "eval",
            "--model-file",
            &model,
            "--data",
            &test,
            "--device",
            device,
        ])
        .ok()
        .stdout();
        let want = format!(
            "{test}: 200 samples  loss {:.4}  accuracy {:.4}",
            last["test_loss"].as_f64().unwrap(),
            last["test_accuracy"].as_f64().unwrap()
        );
        assert_eq!(out.trim(), want, "{device}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn init_from_a_saved_model_continues_where_it_stopped() {
    let d = tmpdir("init");
    let model = d.join("m.safetensors").display().to_string();
    let iris = shared("iris.csv");
    let m = d.join("m.jsonl").display().to_string();
    dptrain(&[
        "train", "--data", &iris, "--epochs", "30", "--device", "cpu", "--save", &model,
    ])
    .ok();
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--epochs",
        "1",
        "--lr",
        "1e-9",
        "--device",
        "cpu",
        "--init",
        &model,
        "--metrics-out",
        &m,
    ])
    .ok();
    let acc = metrics(std::path::Path::new(&m))[0]["test_accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        acc >= 0.9,
        "a trained init gives a trained model at once: {acc}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn inspect_reports_counts_of_real_and_synthetic_data() {
    let out = dptrain(&["data", "inspect", &shared("iris.csv")])
        .ok()
        .stdout();
    assert!(out.contains("150"), "{out}");
    let out = dptrain(&["data", "inspect", &shared("mnist")])
        .ok()
        .stdout();
    assert!(
        out.contains("60000") && out.contains("10000") && out.contains("1135"),
        "{out}"
    );
    let out = dptrain(&["data", "inspect", "synth:blobs:90:3:3"])
        .ok()
        .stdout();
    assert!(out.contains("90"), "{out}");
}

#[test]
fn devices_lists_the_lavapipe_adapter() {
    let out = dptrain(&["devices"]).ok().stdout();
    assert!(
        out.contains("[0]") && out.contains("max storage binding"),
        "{out}"
    );
}
