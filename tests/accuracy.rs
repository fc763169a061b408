//! Accuracy bars: one training run per model kind on real data, on the GPU backend (lavapipe in CI)
//! and on the CPU reference, seeds fixed.

mod util;
use util::{shared, train_last};

fn acc(v: &serde_json::Value) -> f64 {
    v["test_accuracy"].as_f64().expect("test_accuracy")
}

fn both(name: &str, args: &[&str], bar: f64) {
    for device in ["gpu", "cpu"] {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--device", device]);
        let last = train_last(&format!("{name}-{device}"), &a);
        assert!(acc(&last) >= bar, "{name} on {device}: {last}");
        assert!(last["samples_per_s"].as_f64().unwrap() > 0.0);
        for key in ["epoch", "step", "train_loss", "test_loss", "elapsed_s"] {
            assert!(last.get(key).is_some(), "{key} missing: {last}");
        }
    }
}

#[test]
fn iris_softmax_reaches_0_93() {
    both(
        "iris",
        &[
            "--data",
            &shared("iris.csv"),
            "--model",
            "softmax",
            "--epochs",
            "60",
            "--batch-size",
            "16",
            "--lr",
            "0.1",
            "--seed",
            "1",
        ],
        0.93,
    );
}

#[test]
fn breast_cancer_logreg_reaches_0_95() {
    both(
        "bc",
        &[
            "--data",
            &shared("breast_cancer.csv"),
            "--model",
            "logreg",
            "--epochs",
            "30",
            "--batch-size",
            "32",
            "--lr",
            "0.1",
            "--seed",
            "1",
        ],
        0.95,
    );
}

#[test]
fn digits_softmax_reaches_0_95() {
    both(
        "digits-softmax",
        &[
            "--data",
            &shared("digits.csv"),
            "--model",
            "softmax",
            "--epochs",
            "30",
            "--batch-size",
            "32",
            "--lr",
            "0.1",
            "--seed",
            "1",
        ],
        0.95,
    );
}

#[test]
fn digits_mlp_reaches_0_96() {
    both(
        "digits-mlp",
        &[
            "--data",
            &shared("digits.csv"),
            "--model",
            "mlp",
            "--hidden",
            "128",
            "--epochs",
            "20",
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--seed",
            "1",
        ],
        0.96,
    );
}

#[test]
fn the_seed_synthetic_problem_reaches_0_95() {
    both(
        "seed",
        &[
            "--data",
            "synth:seed:2000",
            "--model",
            "logreg",
            "--epochs",
            "10",
            "--lr",
            "0.5",
            "--seed",
            "3",
        ],
        0.95,
    );
}

#[test]
fn tanh_and_sigmoid_mlps_train_too() {
    for act in ["tanh", "sigmoid"] {
        let last = train_last(
            &format!("act-{act}"),
            &[
                "--data",
                &shared("iris.csv"),
                "--model",
                "mlp",
                "--hidden",
                "16,8",
                "--activation",
                act,
                "--epochs",
                "80",
                "--batch-size",
                "16",
                "--lr",
                "0.1",
                "--momentum",
                "0.9",
                "--seed",
                "2",
                "--device",
                "gpu",
            ],
        );
        assert!(acc(&last) >= 0.9, "{act}: {last}");
    }
}

/// MNIST, MLP 784-256-10, 5 epochs on the GPU backend: ≥ 0.975 test accuracy. Several minutes on
/// lavapipe with runtime checks on, so it runs from scripts/mnist.sh rather than in every CI run.
#[test]
#[ignore]
fn mnist_mlp_reaches_0_975_in_5_epochs_on_the_gpu() {
    let last = train_last(
        "mnist-gpu",
        &[
            "--data",
            &shared("mnist"),
            "--model",
            "mlp",
            "--hidden",
            "256",
            "--epochs",
            "5",
            "--batch-size",
            "128",
            "--lr",
            "0.1",
            "--momentum",
            "0.9",
            "--seed",
            "1",
            "--device",
            "gpu",
        ],
    );
    assert!(acc(&last) >= 0.975, "{last}");
}

/// The same bar on the CPU reference backend, in every CI run (about a minute on 2 cores).
#[test]
fn mnist_mlp_reaches_0_975_in_5_epochs_on_the_cpu_reference() {
    let last = train_last(
        "mnist-cpu",
        &[
            "--data",
            &shared("mnist"),
            "--model",
            "mlp",
            "--hidden",
            "256",
            "--epochs",
            "5",
            "--batch-size",
            "128",
            "--lr",
            "0.1",
            "--momentum",
            "0.9",
            "--seed",
            "1",
            "--device",
            "cpu",
        ],
    );
    assert!(acc(&last) >= 0.975, "{last}");
}

/// MNIST on the GPU in every CI run, briefly: its pixels go up as u8 (47 MB; as f32 they would be
/// 188 MB, more than lavapipe's 128 MiB binding), and 150 steps already learn.
#[test]
fn mnist_trains_on_the_gpu_from_u8_pixels() {
    let last = train_last(
        "mnist-gpu-short",
        &[
            "--data",
            &shared("mnist"),
            "--model",
            "mlp",
            "--hidden",
            "64",
            "--steps",
            "150",
            "--batch-size",
            "128",
            "--lr",
            "0.1",
            "--momentum",
            "0.9",
            "--seed",
            "1",
            "--device",
            "gpu",
        ],
    );
    assert!(acc(&last) >= 0.85, "{last}");
}

/// Adam at PyTorch's default rate on the CPU reference: the mean of three seeds reaches 0.978 with
/// the default batch (64) and a cosine schedule. (PyTorch eager, Adam 1e-3, batch 128, constant
/// rate, reached 0.9735–0.9753 on the same data; see docs/PERF.md.)
#[test]
fn mnist_mlp_with_adam_reaches_0_978_in_5_epochs_on_the_cpu_reference() {
    let mnist = shared("mnist");
    let accs: Vec<f64> = ["1", "2", "3"]
        .iter()
        .map(|seed| {
            acc(&train_last(
                &format!("mnist-adam-{seed}"),
                &[
                    "--data",
                    &mnist,
                    "--model",
                    "mlp",
                    "--hidden",
                    "256",
                    "--epochs",
                    "5",
                    "--optimizer",
                    "adam",
                    "--lr",
                    "1e-3",
                    "--schedule",
                    "cosine",
                    "--seed",
                    seed,
                    "--device",
                    "cpu",
                ],
            ))
        })
        .collect();
    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!(mean >= 0.978, "test accuracy {accs:?}, mean {mean}");
}
