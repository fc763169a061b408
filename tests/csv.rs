//! CSV files the `csv` crate's quoting makes readable, through the binary: a quoted header holding the
//! delimiter, class names in the label column (trained exactly like the numeric copy), and the header that
//! pandas writes for unnamed columns. The files are in tests/data/csv/; each is iris (tests/data/iris.csv).

mod util;
use std::path::Path;

use util::{dptrain, shared, train_last};

fn file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/csv")
        .join(name)
        .display()
        .to_string()
}

/// Training settings shared by the runs compared here.
const RUN: [&str; 14] = [
    "--device",
    "cpu",
    "--model",
    "softmax",
    "--epochs",
    "30",
    "--batch-size",
    "16",
    "--lr",
    "0.1",
    "--test-fraction",
    "0.2",
    "--seed",
    "1",
];

/// The last epoch's metrics of a run on `data` with `extra` flags.
fn last(name: &str, data: &str, extra: &[&str]) -> serde_json::Value {
    let mut a = vec!["--data", data];
    a.extend_from_slice(&RUN);
    a.extend_from_slice(extra);
    train_last(name, &a)
}

fn acc(v: &serde_json::Value) -> f64 {
    v["test_accuracy"].as_f64().expect("test_accuracy")
}

#[test]
fn each_file_trains_for_two_epochs() {
    for (data, extra) in [
        ("quoted-header.csv", &["--label-column", "label"][..]),
        ("string-labels.csv", &["--label-column", "species"]),
        ("string-labels.csv", &["--label-column", "last"]),
        ("pandas-header.csv", &[]),
        ("pandas-header.csv", &["--header", "yes"]),
    ] {
        let path = file(data);
        let mut a = vec!["train", "--data", &path, "--device", "cpu", "--epochs", "2"];
        a.extend_from_slice(extra);
        dptrain(&a).ok();
    }
}

#[test]
fn a_quoted_header_with_commas_trains_like_the_plain_file() {
    let plain = last("plain", &shared("iris.csv"), &[]);
    let quoted = last(
        "quoted",
        &file("quoted-header.csv"),
        &["--label-column", "label"],
    );
    assert_eq!(
        quoted["train_loss"], plain["train_loss"],
        "{quoted}\n{plain}"
    );
    assert_eq!(acc(&quoted), acc(&plain));
    // a quoted header name holding the delimiter names its column
    let path = file("quoted-header.csv");
    dptrain(&[
        "train", "--data", &path, "--device", "cpu", "--label-column", "nope",
    ])
    .fails_with("label column \"nope\" not found in header (columns: label, sepal length, cm, sepal width, cm, petal length, cm, petal width, cm)");
}

#[test]
fn string_class_labels_train_like_their_numeric_copy() {
    let numeric = last("numeric", &shared("iris.csv"), &[]);
    assert!(acc(&numeric) >= 0.9, "{numeric}");
    for label in ["species", "last"] {
        let names = last(
            &format!("names-{label}"),
            &file("string-labels.csv"),
            &["--label-column", label],
        );
        // setosa, versicolor, virginica sort into the numeric copy's 0, 1, 2: the same run
        assert_eq!(acc(&names), acc(&numeric), "{names}\n{numeric}");
        assert_eq!(
            names["train_loss"], numeric["train_loss"],
            "{names}\n{numeric}"
        );
    }
}

#[test]
fn a_pandas_header_is_data_with_a_warning_unless_header_yes() {
    let path = file("pandas-header.csv");
    let auto = dptrain(&["train", "--data", &path, "--device", "cpu", "--epochs", "2"]).ok();
    assert!(
        auto.stderr().contains(
            "pandas-header.csv: the first row (0,1,2,3,4) looks like the header pandas writes"
        ) && auto.stderr().contains("--header yes"),
        "{}",
        auto.show()
    );
    let yes = dptrain(&[
        "train", "--data", &path, "--device", "cpu", "--epochs", "2", "--header", "yes",
    ])
    .ok();
    assert!(!yes.stderr().contains("pandas"), "{}", yes.show());
    // skipping the header leaves exactly iris
    let header = last("pandas-yes", &path, &["--header", "yes"]);
    let plain = last("pandas-plain", &shared("iris.csv"), &[]);
    assert_eq!(
        header["train_loss"], plain["train_loss"],
        "{header}\n{plain}"
    );
}
