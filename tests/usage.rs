//! Everyday use of the commands around training: predict, eval --report, model show, metrics and
//! TensorBoard files, plots, the command line itself (clap), launchers, --config, early stopping,
//! progress lines, synthetic defaults and one-process commands under mpirun. Each figure a command
//! prints is checked against one the test computes on its own (from a CSV, a metrics file or the
//! bytes of an event file).

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::{Run, dptrain, metrics, params, shared, tmpdir};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The value after `key` in a line like `...  loss 0.4526  accuracy 0.8733`.
fn figure(line: &str, key: &str) -> f64 {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            let v = words
                .next()
                .unwrap_or_else(|| panic!("{key} has no value in {line:?}"));
            return v
                .parse()
                .unwrap_or_else(|_| panic!("{key} {v:?} in {line:?}"));
        }
    }
    panic!("{key:?} not in {line:?}")
}

/// The one line of `text` that contains `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "want one line with {needle:?} in\n{text}");
    lines[0]
}

/// `eval`'s summary line: (samples, loss, accuracy).
fn eval_summary(run: &Run) -> (usize, f64, f64) {
    let out = run.stdout();
    let l = line_with(&out, " samples  loss ");
    let n = l
        .split_whitespace()
        .rev()
        .skip_while(|w| *w != "samples")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("sample count in {l:?}"));
    (n, figure(l, "loss"), figure(l, "accuracy"))
}

/// A predictions CSV: header and rows, split on commas (no test value holds one).
struct Preds {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Preds {
    fn parse(text: &str) -> Preds {
        let mut lines = text.lines();
        let header = lines
            .next()
            .expect("header")
            .split(',')
            .map(str::to_string)
            .collect::<Vec<_>>();
        let rows = lines
            .map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>())
            .collect::<Vec<_>>();
        for r in &rows {
            assert_eq!(r.len(), header.len(), "ragged row {r:?} under {header:?}");
        }
        Preds { header, rows }
    }
    fn col(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name:?} in {:?}", self.header))
    }
    fn column(&self, name: &str) -> Vec<String> {
        let c = self.col(name);
        self.rows.iter().map(|r| r[c].clone()).collect()
    }
    /// Fraction of rows whose `predicted` equals their `label`.
    fn accuracy(&self) -> f64 {
        let (p, l) = (self.col("predicted"), self.col("label"));
        let right = self.rows.iter().filter(|r| r[p] == r[l]).count();
        right as f64 / self.rows.len() as f64
    }
    /// The class names of the p_<class> columns, in order.
    fn classes(&self) -> Vec<String> {
        self.header
            .iter()
            .filter_map(|h| h.strip_prefix("p_").map(str::to_string))
            .collect()
    }
    /// Every row's probabilities sum to 1, and `predicted` is the class of the largest.
    fn check_probabilities(&self) {
        let classes = self.classes();
        assert!(classes.len() >= 2, "p_ columns in {:?}", self.header);
        let cols: Vec<usize> = classes
            .iter()
            .map(|c| self.col(&format!("p_{c}")))
            .collect();
        let pred = self.col("predicted");
        for r in &self.rows {
            let p: Vec<f64> = cols.iter().map(|&c| r[c].parse().expect("prob")).collect();
            let sum: f64 = p.iter().sum();
            assert!((sum - 1.0).abs() <= 1e-5, "row {r:?} sums to {sum}");
            assert!(p.iter().all(|&x| (0.0..=1.0).contains(&x)), "row {r:?}");
            let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            // ties at 6 decimals may go either way
            let chosen = classes.iter().position(|c| *c == r[pred]).expect("class");
            assert!(
                chosen == best || (p[chosen] - p[best]).abs() < 2e-6,
                "row {r:?}: predicted {} but the largest probability is {}",
                r[pred],
                classes[best]
            );
        }
    }
}

/// The newest `ckpt-*.safetensors` in `dir`.
fn newest_checkpoint(dir: &Path) -> PathBuf {
    let mut ck: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("checkpoint dir")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("ckpt-") && n.ends_with(".safetensors")
        })
        .collect();
    ck.sort();
    ck.pop().expect("a checkpoint")
}

// ---------------------------------------------------------------------------------------------
// 1. predict

#[test]
fn predict_agrees_with_eval_for_a_model_file_and_a_checkpoint() {
    let d = tmpdir("predict-iris");
    let iris = shared("iris.csv");
    let model = s(&d.join("m.safetensors"));
    let ck = d.join("ck");
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--epochs",
        "15",
        "--device",
        "cpu",
        "--save",
        &model,
        "--checkpoint-dir",
        &s(&ck),
    ])
    .ok();
    let eval = dptrain(&[
        "eval",
        "--model-file",
        &model,
        "--data",
        &iris,
        "--device",
        "cpu",
    ])
    .ok();
    let (n, _, acc) = eval_summary(&eval);
    assert_eq!(n, 150);

    let out = d.join("preds.csv");
    let run = dptrain(&[
        "predict",
        "--model-file",
        &model,
        "--data",
        &iris,
        "--out",
        &s(&out),
    ])
    .ok();
    // the accuracy on the file's labels, on stderr
    let said = figure(line_with(&run.stderr(), "predictions"), "accuracy");
    assert_eq!(said, acc, "{}", run.show());
    let text = std::fs::read_to_string(&out).unwrap();
    let p = Preds::parse(&text);
    assert_eq!(p.header, ["id", "predicted", "p_0", "p_1", "p_2", "label"]);
    assert_eq!(p.rows.len(), 150);
    // default ids: the 1-based row numbers
    let ids: Vec<String> = (1..=150).map(|i| i.to_string()).collect();
    assert_eq!(p.column("id"), ids);
    // the label column is the file's own labels (iris: column 0)
    let labels: Vec<String> = std::fs::read_to_string(&iris)
        .unwrap()
        .lines()
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect();
    assert_eq!(p.column("label"), labels);
    p.check_probabilities();
    assert!(
        (p.accuracy() - acc).abs() < 6e-5,
        "predict's accuracy {} vs eval's {acc}",
        p.accuracy()
    );

    // the final checkpoint holds the same parameters: the same predictions and the same figures
    let ckpt = s(&newest_checkpoint(&ck));
    let out2 = d.join("preds-ckpt.csv");
    dptrain(&[
        "predict",
        "--model-file",
        &ckpt,
        "--data",
        &iris,
        "--out",
        &s(&out2),
    ])
    .ok();
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), text);
    let eval_ck = dptrain(&[
        "eval",
        "--model-file",
        &ckpt,
        "--data",
        &iris,
        "--device",
        "cpu",
    ])
    .ok();
    assert_eq!(eval_summary(&eval_ck), eval_summary(&eval));

    // `--out -`: the same CSV on stdout
    let stdout = dptrain(&[
        "predict",
        "--model-file",
        &model,
        "--data",
        &iris,
        "--out",
        "-",
    ])
    .ok()
    .stdout();
    assert_eq!(stdout, text);

    // without labels (one column fewer): no label column, the same predictions
    let nolabel = d.join("nolabel.csv");
    let body: String = std::fs::read_to_string(&iris)
        .unwrap()
        .lines()
        .map(|l| format!("{}\n", l.split_once(',').unwrap().1))
        .collect();
    std::fs::write(&nolabel, body).unwrap();
    let q = Preds::parse(
        &dptrain(&[
            "predict",
            "--model-file",
            &model,
            "--data",
            &s(&nolabel),
            "--out",
            "-",
        ])
        .ok()
        .stdout(),
    );
    assert_eq!(q.header, ["id", "predicted", "p_0", "p_1", "p_2"]);
    assert_eq!(q.column("predicted"), p.column("predicted"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn predict_writes_class_names_and_copies_ids() {
    let d = tmpdir("predict-names");
    let data = shared("csv/string-labels.csv");
    let model = s(&d.join("s.safetensors"));
    dptrain(&[
        "train",
        "--data",
        &data,
        "--label-column",
        "species",
        "--epochs",
        "10",
        "--lr",
        "0.5",
        "--device",
        "cpu",
        "--save",
        &model,
    ])
    .ok();
    let eval = dptrain(&[
        "eval",
        "--model-file",
        &model,
        "--data",
        &data,
        "--label-column",
        "last",
        "--device",
        "cpu",
    ])
    .ok();
    let (n, _, acc) = eval_summary(&eval);
    assert_eq!(n, 150);

    let p = Preds::parse(
        &dptrain(&[
            "predict",
            "--model-file",
            &model,
            "--data",
            &data,
            "--label-column",
            "species",
            "--out",
            "-",
        ])
        .ok()
        .stdout(),
    );
    assert_eq!(
        p.header,
        [
            "id",
            "predicted",
            "p_setosa",
            "p_versicolor",
            "p_virginica",
            "label"
        ]
    );
    let species: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().to_string())
        .collect();
    assert_eq!(p.column("label"), species);
    let names: BTreeSet<String> = p.column("predicted").into_iter().collect();
    assert!(
        names
            .iter()
            .all(|n| ["setosa", "versicolor", "virginica"].contains(&n.as_str())),
        "{names:?}"
    );
    p.check_probabilities();
    assert!(
        (p.accuracy() - acc).abs() < 6e-5,
        "predict's accuracy {} vs eval's {acc}",
        p.accuracy()
    );

    // an id column (by name, by index, `last`) is copied and not used as a feature
    let with_id = d.join("with-id.csv");
    let text: String = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{l},row\n")
            } else {
                format!("{l},r{i}\n")
            }
        })
        .collect();
    std::fs::write(&with_id, text).unwrap();
    for id in ["row", "5", "last"] {
        let q = Preds::parse(
            &dptrain(&[
                "predict",
                "--model-file",
                &model,
                "--data",
                &s(&with_id),
                "--label-column",
                "species",
                "--id-column",
                id,
                "--out",
                "-",
            ])
            .ok()
            .stdout(),
        );
        let want: Vec<String> = (1..=150).map(|i| format!("r{i}")).collect();
        assert_eq!(q.column("id"), want, "--id-column {id}");
        assert_eq!(
            q.column("predicted"),
            p.column("predicted"),
            "--id-column {id}"
        );
        assert_eq!(q.column("label"), species, "--id-column {id}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn predict_of_a_regression_matches_eval_rmse() {
    let d = tmpdir("predict-linreg");
    let data = s(&d.join("lin.csv"));
    let model = s(&d.join("lin.safetensors"));
    dptrain(&[
        "data",
        "synth",
        "--kind",
        "linear",
        "--samples",
        "300",
        "--out",
        &data,
    ])
    .ok();
    dptrain(&[
        "train", "--data", &data, "--model", "linreg", "--epochs", "3", "--device", "cpu",
        "--save", &model,
    ])
    .ok();
    let eval = dptrain(&[
        "eval",
        "--model-file",
        &model,
        "--data",
        &data,
        "--device",
        "cpu",
    ])
    .ok()
    .stdout();
    let rmse = figure(line_with(&eval, " samples  loss "), "rmse");
    let p = Preds::parse(
        &dptrain(&[
            "predict",
            "--model-file",
            &model,
            "--data",
            &data,
            "--out",
            "-",
        ])
        .ok()
        .stdout(),
    );
    assert_eq!(p.header[..2], ["id", "predicted"]);
    assert_eq!(p.rows.len(), 300);
    let (pc, tc) = (p.col("predicted"), p.header.len() - 1);
    // the last column holds the file's targets (column 0 of the CSV)
    let targets: Vec<f64> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    let mut se = 0.0;
    for (r, t) in p.rows.iter().zip(&targets) {
        let y: f64 = r[tc].parse().unwrap();
        assert!((y - t).abs() <= 1e-6 * t.abs().max(1.0), "{r:?} vs {t}");
        let e = r[pc].parse::<f64>().unwrap() - y;
        se += e * e;
    }
    let mine = (se / 300.0).sqrt();
    assert!(
        (mine - rmse).abs() < 1e-4 + 1e-3 * rmse,
        "RMSE from predict {mine} vs eval {rmse}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn predict_refuses_to_overwrite_its_data_or_model() {
    let d = tmpdir("predict-refuse");
    let model = s(&d.join("m.safetensors"));
    let data = d.join("x.csv");
    std::fs::copy(shared("iris.csv"), &data).unwrap();
    let before = std::fs::read(&data).unwrap();
    dptrain(&[
        "train",
        "--data",
        &s(&data),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--save",
        &model,
    ])
    .ok();
    let model_before = std::fs::read(&model).unwrap();
    let dot = format!("{}/./x.csv", d.display());
    for out in [s(&data), dot] {
        dptrain(&[
            "predict",
            "--model-file",
            &model,
            "--data",
            &s(&data),
            "--out",
            &out,
        ])
        .fails_with("--out");
        assert_eq!(std::fs::read(&data).unwrap(), before, "--out {out}");
    }
    dptrain(&[
        "predict",
        "--model-file",
        &model,
        "--data",
        &s(&data),
        "--out",
        &model,
    ])
    .fails_with("--out");
    assert_eq!(std::fs::read(&model).unwrap(), model_before);
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 2. eval --report

/// The confusion matrix of `eval --report`: (class names, counts by true row and predicted column).
fn confusion(out: &str) -> (Vec<String>, Vec<Vec<u64>>) {
    let lines: Vec<&str> = out.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("confusion matrix"))
        .unwrap_or_else(|| panic!("no confusion matrix in\n{out}"));
    let names: Vec<String> = lines[at + 1]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut m = Vec::new();
    for (i, l) in lines[at + 2..at + 2 + names.len()].iter().enumerate() {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(w.len(), names.len() + 1, "matrix row {l:?}");
        assert_eq!(w[0], names[i], "row {i} is not class {}", names[i]);
        m.push(w[1..].iter().map(|c| c.parse().expect("count")).collect());
    }
    (names, m)
}

/// The per-class rows of `eval --report`: class -> (precision, recall, f1, support).
fn per_class(out: &str) -> BTreeMap<String, (f64, f64, f64, u64)> {
    let mut r = BTreeMap::new();
    let mut on = false;
    for l in out.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() == Some(&"class") && w.contains(&"precision") {
            on = true;
            continue;
        }
        if on && w.len() == 5 && w[0] != "avg" {
            if w[0] == "macro" || w[0] == "weighted" {
                continue;
            }
            r.insert(
                w[0].to_string(),
                (
                    w[1].parse().unwrap(),
                    w[2].parse().unwrap(),
                    w[3].parse().unwrap(),
                    w[4].parse().unwrap(),
                ),
            );
        }
    }
    r
}

fn check_report(run: &Run) {
    let out = run.stdout();
    let (n, _, acc) = eval_summary(run);
    let (names, m) = confusion(&out);
    let total: u64 = m.iter().flatten().sum();
    assert_eq!(total as usize, n, "matrix total\n{out}");
    let diag: u64 = (0..m.len()).map(|i| m[i][i]).sum();
    assert!(
        (diag as f64 / total as f64 - acc).abs() < 6e-5,
        "diagonal {diag}/{total} vs accuracy {acc}\n{out}"
    );
    let rows = per_class(&out);
    assert_eq!(rows.len(), names.len(), "per-class rows\n{out}");
    for (i, c) in names.iter().enumerate() {
        let (p, r, f, support) = rows[c];
        let tp = m[i][i] as f64;
        let row: u64 = m[i].iter().sum();
        let col: u64 = m.iter().map(|r| r[i]).sum();
        assert_eq!(support, row, "support of {c}");
        let want_p = if col == 0 { 0.0 } else { tp / col as f64 };
        let want_r = if row == 0 { 0.0 } else { tp / row as f64 };
        let want_f = if want_p + want_r == 0.0 {
            0.0
        } else {
            2.0 * want_p * want_r / (want_p + want_r)
        };
        for (what, got, want) in [
            ("precision", p, want_p),
            ("recall", r, want_r),
            ("f1", f, want_f),
        ] {
            assert!(
                (got - want).abs() < 6e-5,
                "{what} of {c}: printed {got}, matrix gives {want}\n{out}"
            );
        }
    }
    let acc_line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("accuracy"))
        .unwrap_or_else(|| panic!("no accuracy row\n{out}"));
    assert_eq!(figure(acc_line, "accuracy"), acc);
}

#[test]
fn eval_report_matrix_adds_up_for_model_files_and_checkpoints() {
    let d = tmpdir("report");
    let iris = shared("iris.csv");
    let model = s(&d.join("m.safetensors"));
    let ck = d.join("ck");
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--epochs",
        "8",
        "--device",
        "cpu",
        "--save",
        &model,
        "--checkpoint-dir",
        &s(&ck),
    ])
    .ok();
    let ckpt = s(&newest_checkpoint(&ck));
    let a = dptrain(&[
        "eval",
        "--model-file",
        &model,
        "--data",
        &iris,
        "--device",
        "cpu",
        "--report",
    ])
    .ok();
    check_report(&a);
    assert_eq!(confusion(&a.stdout()).0, ["0", "1", "2"]);
    let b = dptrain(&[
        "eval",
        "--model-file",
        &ckpt,
        "--data",
        &iris,
        "--device",
        "cpu",
        "--report",
    ])
    .ok();
    check_report(&b);
    assert_eq!(confusion(&a.stdout()), confusion(&b.stdout()));

    // with class names, and against predict's own rows
    let names = shared("csv/string-labels.csv");
    let sm = s(&d.join("s.safetensors"));
    dptrain(&[
        "train",
        "--data",
        &names,
        "--label-column",
        "last",
        "--epochs",
        "4",
        "--device",
        "cpu",
        "--save",
        &sm,
    ])
    .ok();
    let c = dptrain(&[
        "eval",
        "--model-file",
        &sm,
        "--data",
        &names,
        "--label-column",
        "last",
        "--device",
        "cpu",
        "--report",
    ])
    .ok();
    check_report(&c);
    let (classes, m) = confusion(&c.stdout());
    assert_eq!(classes, ["setosa", "versicolor", "virginica"]);
    let p = Preds::parse(
        &dptrain(&[
            "predict",
            "--model-file",
            &sm,
            "--data",
            &names,
            "--label-column",
            "last",
            "--out",
            "-",
        ])
        .ok()
        .stdout(),
    );
    let mut mine = vec![vec![0u64; 3]; 3];
    let at = |c: &str| classes.iter().position(|x| x == c).unwrap();
    for (pr, lb) in p.column("predicted").iter().zip(p.column("label")) {
        mine[at(&lb)][at(pr)] += 1;
    }
    assert_eq!(mine, m, "confusion matrix from predict's CSV");
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 3. model show

#[test]
fn model_show_recovers_the_seed_boundary_in_raw_units() {
    let d = tmpdir("show-seed");
    let model = s(&d.join("m.safetensors"));
    dptrain(&[
        "train",
        "--data",
        "synth:seed:2000",
        "--model",
        "logreg",
        "--epochs",
        "20",
        "--lr",
        "0.5",
        "--device",
        "cpu",
        "--save",
        &model,
    ])
    .ok();
    let out = dptrain(&["model", "show", &model]).ok().stdout();
    assert!(out.contains("logreg"), "{out}");
    let l = line_with(&out, "logit:");
    let get = |k: &str| -> f64 {
        let w = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in {l:?}"));
        w.parse().unwrap()
    };
    let (w1, w2, b) = (get("w1"), get("w2"), get("b"));
    // the data come from 1.5x - 2y + 0.25 > 0 (plus a little noise)
    let k = 1.5 / w1;
    assert!(k > 0.0, "w1 {w1} has the wrong sign");
    assert!((w2 * k + 2.0).abs() < 0.05, "w2 scaled {} in {l:?}", w2 * k);
    assert!((b * k - 0.25).abs() < 0.05, "b scaled {} in {l:?}", b * k);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn model_show_of_an_mlp_gives_architecture_and_count_without_weights() {
    let d = tmpdir("show-mlp");
    let model = s(&d.join("m.safetensors"));
    dptrain(&[
        "train",
        "--data",
        &shared("iris.csv"),
        "--model",
        "mlp",
        "--hidden",
        "8,5",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--save",
        &model,
    ])
    .ok();
    let out = dptrain(&["model", "show", &model]).ok().stdout();
    assert!(out.contains("mlp"), "{out}");
    // 4 -> 8 -> 5 -> 3
    let count = 4 * 8 + 8 + 8 * 5 + 5 + 5 * 3 + 3;
    let l = line_with(&out, "parameters");
    assert_eq!(figure(l, "parameters"), f64::from(count), "{out}");
    let widths = line_with(&out, "widths");
    let nums: Vec<&str> = widths
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .collect();
    assert_eq!(nums, ["4", "8", "5", "3"], "{widths:?}");
    assert!(!out.contains("logit:"), "{out}");
    assert!(!out.contains("w1="), "{out}");
    assert!(!out.contains("raw feature units"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 4. metrics: step records, appended on resume

#[test]
fn step_records_every_n_steps_and_resume_appends() {
    let d = tmpdir("metrics-resume");
    let m = d.join("m.jsonl");
    let ck = s(&d.join("ck"));
    let run = |epochs: &str| {
        dptrain(&[
            "train",
            "--data",
            "synth:seed:2000",
            "--model",
            "logreg",
            "--epochs",
            epochs,
            "--device",
            "cpu",
            "--metrics-out",
            &s(&m),
            "--log-every",
            "5",
            "--checkpoint-dir",
            &ck,
            "--resume",
            "auto",
        ])
        .ok()
    };
    run("2");
    let first = std::fs::read_to_string(&m).unwrap();
    let v = metrics(&m);
    // 1600 training rows, batch 64: 25 steps an epoch
    let steps: Vec<u64> = v
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=10).map(|i| i * 5).collect::<Vec<_>>());
    let epochs: Vec<(u64, u64)> = v
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|r| (r["epoch"].as_u64().unwrap(), r["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(epochs, [(1, 25), (2, 50)]);
    for r in v.iter().filter(|r| r["kind"] == "step") {
        assert!(r["train_loss"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["lr"].as_f64(), Some(0.1), "{r}");
    }

    run("3");
    let second = std::fs::read_to_string(&m).unwrap();
    assert!(
        second.starts_with(&first),
        "the first run's records were not kept:\n{first}\n---\n{second}"
    );
    let v = metrics(&m);
    let steps: Vec<u64> = v
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=15).map(|i| i * 5).collect::<Vec<_>>());
    let all: Vec<u64> = v.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert!(all.windows(2).all(|w| w[0] <= w[1]), "steps {all:?}");
    let epochs: Vec<(u64, u64)> = v
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|r| (r["epoch"].as_u64().unwrap(), r["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(epochs, [(1, 25), (2, 50), (3, 75)]);
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 5. TensorBoard event files, read with this file's own TFRecord and protobuf decoders

/// CRC-32C (Castagnoli), bit by bit: reflected polynomial 0x82F63B78.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, every CRC checked.
fn tfrecords(bytes: &[u8], name: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        assert!(i + 12 <= bytes.len(), "{name}: truncated header at {i}");
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(len_crc, masked(len_bytes), "{name}: length CRC at {i}");
        let start = i + 12;
        assert!(
            start + len + 4 <= bytes.len(),
            "{name}: truncated record at {i}"
        );
        let data = &bytes[start..start + len];
        let crc = u32::from_le_bytes(bytes[start + len..start + len + 4].try_into().unwrap());
        assert_eq!(crc, masked(data), "{name}: data CRC at {i}");
        out.push(data.to_vec());
        i = start + len + 4;
    }
    out
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
        assert!(shift < 64, "varint too long");
    }
}

fn fields(b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        let f = match key & 7 {
            0 => Field::Varint(varint(b, &mut i)),
            1 => {
                i += 8;
                Field::Fixed64(b[i - 8..i].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                Field::Bytes(&b[i - n..i])
            }
            5 => {
                i += 4;
                Field::Fixed32(b[i - 4..i].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, f));
    }
    out
}

#[derive(Default, Debug)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    values: Vec<(String, f32)>,
}

fn decode_event(b: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, f) in fields(b) {
        match (n, f) {
            (1, Field::Fixed64(x)) => e.wall_time = f64::from_le_bytes(x),
            (2, Field::Varint(x)) => e.step = x as i64,
            (3, Field::Bytes(x)) => e.file_version = Some(String::from_utf8(x.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, f) in fields(summary) {
                    let (1, Field::Bytes(value)) = (n, f) else {
                        panic!("Summary field {n}");
                    };
                    let (mut tag, mut v) = (None, None);
                    for (n, f) in fields(value) {
                        match (n, f) {
                            (1, Field::Bytes(t)) => {
                                tag = Some(String::from_utf8(t.to_vec()).unwrap())
                            }
                            (2, Field::Fixed32(x)) => v = Some(f32::from_le_bytes(x)),
                            _ => {}
                        }
                    }
                    e.values.push((tag.expect("tag"), v.expect("simple_value")));
                }
            }
            _ => {}
        }
    }
    e
}

/// Every event of every file in `dir` (files in name order); each file starts with its version.
fn events(dir: &Path) -> Vec<Event> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("tensorboard dir")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no event file in {}", dir.display());
    let mut out = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let recs = tfrecords(&std::fs::read(&f).unwrap(), &name);
        assert!(recs.len() >= 2, "{name}: {} records", recs.len());
        let first = decode_event(&recs[0]);
        assert_eq!(
            first.file_version.as_deref(),
            Some("brain.Event:2"),
            "{name}"
        );
        for r in &recs {
            let e = decode_event(r);
            assert!(e.wall_time > 1.5e9, "{name}: wall_time {}", e.wall_time);
            out.push(e);
        }
    }
    out
}

#[test]
fn crc32c_of_this_test_is_castagnoli() {
    // the standard check values of CRC-32C
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
}

/// (tag, step) -> every value written for it.
fn scalars(ev: &[Event]) -> BTreeMap<(String, u64), Vec<f32>> {
    let mut m: BTreeMap<(String, u64), Vec<f32>> = BTreeMap::new();
    for e in ev {
        for (t, v) in &e.values {
            m.entry((t.clone(), e.step as u64)).or_default().push(*v);
        }
    }
    m
}

fn expect_scalar(sc: &BTreeMap<(String, u64), Vec<f32>>, tag: &str, step: u64, want: Option<f64>) {
    let Some(want) = want else { return };
    let got = sc
        .get(&(tag.to_string(), step))
        .unwrap_or_else(|| panic!("no {tag} at step {step}; have {:?}", sc.keys()));
    assert!(
        got.iter().all(|&g| g == want as f32),
        "{tag} at step {step}: events {got:?}, metrics {want}"
    );
}

#[test]
fn tensorboard_events_match_the_metrics_file() {
    let d = tmpdir("tensorboard");
    let iris = shared("iris.csv");
    // with step records: lr goes with them
    let tb = d.join("tb");
    let m = d.join("m.jsonl");
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--val-fraction",
        "0.2",
        "--device",
        "cpu",
        "--log-every",
        "2",
        "--metrics-out",
        &s(&m),
        "--tensorboard",
        &s(&tb),
    ])
    .ok();
    let ev = events(&tb);
    let sc = scalars(&ev);
    let recs = metrics(&m);
    let mut steps_in_metrics = BTreeSet::new();
    let (mut n_step, mut n_epoch) = (0, 0);
    for r in &recs {
        let step = r["step"].as_u64().unwrap();
        steps_in_metrics.insert(step);
        let f = |k: &str| r[k].as_f64();
        match r["kind"].as_str().unwrap() {
            "step" => {
                n_step += 1;
                expect_scalar(&sc, "train/loss_step", step, f("train_loss"));
                expect_scalar(&sc, "train/accuracy_step", step, f("train_accuracy"));
                expect_scalar(&sc, "lr", step, f("lr"));
            }
            "epoch" => {
                n_epoch += 1;
                expect_scalar(&sc, "train/loss", step, f("train_loss"));
                expect_scalar(&sc, "train/accuracy", step, f("train_accuracy"));
                expect_scalar(&sc, "test/loss", step, f("test_loss"));
                expect_scalar(&sc, "test/accuracy", step, f("test_accuracy"));
                expect_scalar(&sc, "val/loss", step, f("val_loss"));
                expect_scalar(&sc, "val/accuracy", step, f("val_accuracy"));
                expect_scalar(&sc, "samples_per_s", step, f("samples_per_s"));
                expect_scalar(&sc, "epoch", step, f("epoch"));
            }
            "eval" => {
                expect_scalar(&sc, "val/loss", step, f("val_loss"));
                expect_scalar(&sc, "val/accuracy", step, f("val_accuracy"));
            }
            k => panic!("kind {k}"),
        }
    }
    // 96 training rows, batch 16: 6 steps an epoch, 18 in all, a record every 2
    assert_eq!((n_step, n_epoch), (9, 3));
    for tag in [
        "train/loss",
        "test/accuracy",
        "lr",
        "val/loss",
        "train/loss_step",
    ] {
        assert!(
            sc.keys().any(|(t, _)| t == tag),
            "no {tag} in {:?}",
            sc.keys()
        );
    }
    for (t, step) in sc.keys() {
        assert!(
            steps_in_metrics.contains(step),
            "{t} at step {step}, a step the metrics file lacks"
        );
    }

    // without step records the epoch events carry lr
    let tb2 = d.join("tb2");
    let m2 = d.join("m2.jsonl");
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--epochs",
        "2",
        "--lr",
        "0.25",
        "--device",
        "cpu",
        "--metrics-out",
        &s(&m2),
        "--tensorboard",
        &s(&tb2),
    ])
    .ok();
    let sc2 = scalars(&events(&tb2));
    let recs2 = metrics(&m2);
    assert_eq!(recs2.len(), 2);
    for r in &recs2 {
        let step = r["step"].as_u64().unwrap();
        expect_scalar(&sc2, "lr", step, r["lr"].as_f64());
        expect_scalar(&sc2, "train/loss", step, r["train_loss"].as_f64());
        expect_scalar(&sc2, "test/accuracy", step, r["test_accuracy"].as_f64());
        assert_eq!(sc2[&("lr".to_string(), step)], [0.25f32]);
    }
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 6. plot

#[test]
fn plot_draws_svg_and_png_and_refuses_other_formats() {
    let d = tmpdir("plot");
    let m = s(&d.join("m.jsonl"));
    dptrain(&[
        "train",
        "--data",
        "synth:seed:2000",
        "--model",
        "logreg",
        "--epochs",
        "4",
        "--device",
        "cpu",
        "--log-every",
        "5",
        "--metrics-out",
        &m,
    ])
    .ok();
    let svg = d.join("c.svg");
    dptrain(&["plot", &m, "--out", &s(&svg)]).ok();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg"), "not an SVG");
    let lines = text.matches("<polyline").count() + text.matches("<path").count();
    assert!(lines >= 3, "{lines} polylines/paths");
    assert!(text.len() > 2000, "{} bytes", text.len());

    let png = d.join("c.png");
    dptrain(&["plot", &m, "--out", &s(&png)]).ok();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "no PNG signature");
    assert!(bytes.len() > 8 * 1024, "{} bytes", bytes.len());
    // IHDR: a picture of some size
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(w >= 200 && h >= 100, "{w}x{h}");

    let gif = d.join("c.gif");
    dptrain(&["plot", &m, "--out", &s(&gif)]).fails_with("c.gif");
    assert!(!gif.exists());
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 7. the command line

#[test]
fn clap_errors_keep_exit_status_2_and_dptrain_errors_1() {
    let r = dptrain(&["train"]);
    assert_eq!(r.out.status.code(), Some(2), "{}", r.show());
    assert!(r.stderr().contains("--data"), "{}", r.show());

    let r = dptrain(&["train", "--data", "synth:seed", "--model", "cnn"]);
    assert_eq!(r.out.status.code(), Some(2), "{}", r.show());
    let e = r.stderr();
    assert!(e.contains("cnn"), "{}", r.show());
    for v in ["logreg", "softmax", "linreg", "mlp"] {
        assert!(e.contains(v), "possible values lack {v}\n{}", r.show());
    }

    let r = dptrain(&["trian"]);
    assert_eq!(r.out.status.code(), Some(2), "{}", r.show());
    let e = r.stderr();
    assert!(
        (e.contains("similar") || e.contains("tip")) && e.contains("'train'"),
        "no suggestion of train\n{}",
        r.show()
    );

    // a negative number is a value, not a flag: dptrain's own check answers
    let r = dptrain(&[
        "train",
        "--data",
        "synth:seed:200",
        "--lr",
        "-1",
        "--device",
        "cpu",
    ]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.show());
    let r = r.fails_with("--lr");
    assert!(r.stderr().starts_with("error:"), "{}", r.show());

    let r = dptrain(&[
        "train",
        "--data",
        "synth:blobs:200",
        "--model",
        "mlp",
        "--device",
        "cpu",
    ]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.show());
    r.fails_with("--hidden");
}

#[test]
fn lr_error_describes_a_negative_rate_truthfully() {
    // -1 is finite in f32: the message must not say otherwise
    let r = dptrain(&[
        "train",
        "--data",
        "synth:seed:200",
        "--lr",
        "-1",
        "--device",
        "cpu",
    ])
    .fails_with("--lr");
    assert!(
        !r.stderr().contains("not finite"),
        "calls -1 not finite\n{}",
        r.show()
    );
}

#[test]
fn every_argument_has_help_and_every_train_argument_a_heading() {
    use clap::CommandFactory;
    let mut root = dptrain::cli::Cli::command();
    root.build();
    let mut missing_help = Vec::new();
    let mut missing_heading = Vec::new();
    let mut seen_train = false;
    fn walk(
        cmd: &clap::Command,
        path: &str,
        missing_help: &mut Vec<String>,
        missing_heading: &mut Vec<String>,
        seen_train: &mut bool,
    ) {
        let is_train = path == "dptrain train";
        *seen_train |= is_train;
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() {
                missing_help.push(format!("{path} {id}"));
            }
            if is_train && !a.is_global_set() && a.get_help_heading().is_none() {
                missing_heading.push(id.to_string());
            }
        }
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            walk(sub, &name, missing_help, missing_heading, seen_train);
        }
    }
    walk(
        &root,
        "dptrain",
        &mut missing_help,
        &mut missing_heading,
        &mut seen_train,
    );
    assert!(seen_train);
    assert!(missing_help.is_empty(), "no help text: {missing_help:?}");
    assert!(
        missing_heading.is_empty(),
        "train arguments without a heading: {missing_heading:?}"
    );
    // the walk reached the nested subcommands too
    let names: Vec<String> = root
        .get_subcommands()
        .flat_map(|c| c.get_subcommands().map(|s| s.get_name().to_string()))
        .collect();
    assert!(names.iter().any(|n| n == "synth"), "{names:?}");
    assert!(names.iter().any(|n| n == "show"), "{names:?}");
}

#[test]
fn completions_and_man_page_are_printed() {
    let c = dptrain(&["completions", "bash"]).ok().stdout();
    assert!(c.contains("dptrain"), "{c}");
    assert!(
        c.contains("--data") && c.contains("train"),
        "bash completions lack train --data"
    );
    let m = dptrain(&["man"]).ok().stdout();
    assert!(m.contains("dptrain"), "{m}");
    assert!(m.contains(".TH"), "not roff:\n{m}");
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    // `dptrain train ... | head -1`: head is gone before the run ends
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_dptrain"))
        .args([
            "train",
            "--data",
            "synth:seed:200",
            "--model",
            "logreg",
            "--epochs",
            "2",
            "--device",
            "cpu",
        ])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("RUST_BACKTRACE")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run dptrain");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "panicked on a closed stdout:\n{err}"
    );
    assert!(
        err.trim_end().lines().count() <= 1,
        "more than one line:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. launchers that are not MPI

/// The binary with a clean launcher environment plus `env`.
fn dptrain_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dptrain"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let launcher = [
            "OMPI_COMM_",
            "OMPI_UNIVERSE",
            "PMI_",
            "PMIX_",
            "SLURM_",
            "MPI_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || ["WORLD_SIZE", "RANK", "LOCAL_RANK", "DPTRAIN_MPI"].contains(&k.as_str());
        if launcher {
            c.env_remove(&k);
        }
    }
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    Run {
        cmd: format!("{env:?} dptrain {}", args.join(" ")),
        out: c.args(args).output().expect("run dptrain"),
    }
}

#[test]
fn torchrun_and_slurm_variables_without_mpi_are_refused() {
    let d = tmpdir("launchers");
    let model = d.join("m.safetensors");
    let args = [
        "train",
        "--data",
        "synth:seed:200",
        "--model",
        "logreg",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--save",
        &s(&model),
    ];
    let r = dptrain_env(&args, &[("WORLD_SIZE", "2")]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.show());
    r.fails_with("mpirun");
    assert!(!model.exists(), "a refused run wrote its model");

    let r = dptrain_env(&args, &[("SLURM_NTASKS", "2")]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.show());
    let r = r.fails_with("srun --mpi=pmix");
    assert!(r.stderr().contains("mpirun"), "{}", r.show());
    assert!(!model.exists(), "a refused run wrote its model");

    for (k, v) in [("WORLD_SIZE", "1"), ("SLURM_NTASKS", "1")] {
        let r = dptrain_env(&args, &[(k, v)]).ok();
        assert!(r.stdout().contains("dptrain: done:"), "{}", r.show());
        assert!(model.exists(), "{k}={v}: no model");
        std::fs::remove_file(&model).unwrap();
    }
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 9. --config

fn epoch_lines(r: &Run) -> usize {
    r.stdout()
        .lines()
        .filter(|l| l.starts_with("epoch "))
        .count()
}

fn final_line(r: &Run) -> String {
    line_with(&r.stdout(), "dptrain: done:").to_string()
}

#[test]
fn config_files_apply_and_the_command_line_overrides_them() {
    let d = tmpdir("config");
    let iris = shared("iris.csv");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        "epochs = 2\nlr = 0.5\nmodel = \"mlp\"\nhidden = [8]\ndevice = \"cpu\"\n",
    )
    .unwrap();
    let m = d.join("m.jsonl");
    let r = dptrain(&[
        "train",
        "--data",
        &iris,
        "--config",
        &s(&cfg),
        "--metrics-out",
        &s(&m),
    ])
    .ok();
    assert_eq!(epoch_lines(&r), 2, "{}", r.show());
    assert!(
        r.stdout().contains("[4, 8, 3]"),
        "not the file's mlp\n{}",
        r.show()
    );
    let v = metrics(&m);
    assert_eq!(v.len(), 2);
    assert!(v.iter().all(|r| r["lr"].as_f64() == Some(0.5)), "{v:?}");

    let r = dptrain(&[
        "train",
        "--data",
        &iris,
        "--config",
        &s(&cfg),
        "--epochs",
        "3",
        "--lr",
        "0.2",
        "--metrics-out",
        &s(&m),
    ])
    .ok();
    assert_eq!(epoch_lines(&r), 3, "--epochs 3 did not win\n{}", r.show());
    let v = metrics(&m);
    assert!(v.iter().all(|r| r["lr"].as_f64() == Some(0.2)), "{v:?}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn saved_settings_round_trip_as_a_config() {
    let d = tmpdir("config-roundtrip");
    let iris = shared("iris.csv");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        "epochs = 2\nlr = 0.5\nmodel = \"mlp\"\nhidden = [8]\ndevice = \"cpu\"\n",
    )
    .unwrap();
    let m1 = d.join("m1.safetensors");
    let r1 = dptrain(&[
        "train",
        "--data",
        &iris,
        "--config",
        &s(&cfg),
        "--epochs",
        "3",
        "--seed",
        "7",
        "--save",
        &s(&m1),
    ])
    .ok();
    let settings = d.join("m1.settings.toml");
    let text = std::fs::read_to_string(&settings).expect("m1.settings.toml beside m1.safetensors");
    let t: toml::Table = text.parse().expect("settings are TOML");
    assert_eq!(t["epochs"].as_integer(), Some(3), "{text}");
    assert_eq!(t["seed"].as_integer(), Some(7), "{text}");
    assert_eq!(t["lr"].as_float(), Some(0.5), "{text}");
    assert_eq!(t["model"].as_str(), Some("mlp"), "{text}");
    assert_eq!(t["hidden"].as_array().map(|a| a.len()), Some(1), "{text}");

    // the settings file alone (it names the data) trains the same model
    let m2 = d.join("m2.safetensors");
    let r2 = dptrain(&["train", "--config", &s(&settings), "--save", &s(&m2)]).ok();
    assert_eq!(epoch_lines(&r2), 3);
    let strip = |l: String| {
        l.split(" steps in ").nth(1).map(|t| {
            t.split_once("; final ")
                .map(|x| x.1.to_string())
                .unwrap_or_default()
        })
    };
    assert_eq!(strip(final_line(&r1)), strip(final_line(&r2)));
    assert_eq!(params(&m1), params(&m2));

    // its own settings file is the --config: refused, nothing touched
    let model_before = std::fs::read(&m1).unwrap();
    dptrain(&["train", "--config", &s(&settings), "--save", &s(&m1)])
        .fails_with("m1.settings.toml");
    assert_eq!(std::fs::read_to_string(&settings).unwrap(), text);
    assert_eq!(std::fs::read(&m1).unwrap(), model_before);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn malformed_toml_in_a_config_is_one_line_naming_the_file() {
    let d = tmpdir("config-bad-toml");
    let bad = d.join("bad-syntax.toml");
    std::fs::write(&bad, "epochs = = 2\n").unwrap();
    let r = dptrain(&["train", "--data", &shared("iris.csv"), "--config", &s(&bad)]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.show());
    r.fails_with("bad-syntax.toml");
    let missing = d.join("missing.toml");
    dptrain(&[
        "train",
        "--data",
        &shared("iris.csv"),
        "--config",
        &s(&missing),
    ])
    .fails_with("missing.toml");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_bad_key_or_value_in_a_config_is_one_line_naming_the_file() {
    let d = tmpdir("config-bad-key");
    let mut problems = Vec::new();
    for (name, text, word) in [
        ("bad-key.toml", "epochz = 2\n", "epochz"),
        ("bad-value.toml", "epochs = \"two\"\n", "two"),
    ] {
        let f = d.join(name);
        std::fs::write(&f, text).unwrap();
        let r = dptrain(&[
            "train",
            "--data",
            &shared("iris.csv"),
            "--device",
            "cpu",
            "--config",
            &s(&f),
        ]);
        let err = r.stderr();
        let ok = r.out.status.code() == Some(1)
            && err.trim_end().lines().count() == 1
            && err.contains(name)
            && err.contains(word);
        if !ok {
            problems.push(r.show());
        }
    }
    assert!(
        problems.is_empty(),
        "want exit 1 and one line naming the file and the key or value:\n{}",
        problems.join("\n----\n")
    );
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 10. early stopping and --save-best

#[test]
fn early_stopping_keeps_the_best_model() {
    let d = tmpdir("early-stop");
    let iris = shared("iris.csv");
    let best = d.join("best.safetensors");
    let m = d.join("m.jsonl");
    // momentum 0.9 at lr 0.5 with batch 8 makes the validation loss jump about
    let common = [
        "train",
        "--data",
        &iris,
        "--model",
        "mlp",
        "--hidden",
        "32",
        "--lr",
        "0.5",
        "--momentum",
        "0.9",
        "--batch-size",
        "8",
        "--val-fraction",
        "0.2",
        "--device",
        "cpu",
    ];
    let mut args = common.to_vec();
    let (ms, bs) = (s(&m), s(&best));
    args.extend_from_slice(&[
        "--epochs",
        "200",
        "--early-stop-patience",
        "2",
        "--monitor",
        "val_loss",
        "--save-best",
        &bs,
        "--metrics-out",
        &ms,
    ]);
    let r = dptrain(&args).ok();
    let out = r.stdout();
    assert!(out.to_lowercase().contains("early stop"), "{}", r.show());
    let v = metrics(&m);
    let epochs: Vec<&serde_json::Value> = v.iter().filter(|r| r["kind"] == "epoch").collect();
    assert!(epochs.len() < 200, "ran all {} epochs", epochs.len());
    assert!(epochs.len() >= 3, "stopped after {} epochs", epochs.len());
    // every validation figure in the file, epoch ends and --eval-every records alike
    let vals: Vec<(f64, u64, u64)> = v
        .iter()
        .filter_map(|r| {
            Some((
                r["val_loss"].as_f64()?,
                r["step"].as_u64()?,
                r["epoch"].as_u64().unwrap_or(0),
            ))
        })
        .collect();
    let (best_loss, best_step, best_epoch) = vals
        .iter()
        .copied()
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("val_loss in the metrics");
    // patience 2: the run stopped two evaluations after its best
    let last_step = epochs.last().unwrap()["step"].as_u64().unwrap();
    let after = vals.iter().filter(|x| x.1 > best_step).count();
    assert_eq!(
        after, 2,
        "evaluations after the best (step {best_step}, last {last_step})"
    );

    let l = line_with(&out, "best model");
    assert!(l.contains(&bs) || l.contains("best.safetensors"), "{l}");
    let printed = figure(l.replace('(', " ").as_str(), "val_loss");
    assert!(
        (printed - best_loss).abs() < 6e-5,
        "printed best {printed}, metrics best {best_loss}"
    );
    let step_word = l
        .split("at step ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|t| t.parse::<u64>().ok());
    assert_eq!(step_word, Some(best_step), "{l}");

    // the kept model is the one training had at its best epoch: rerun that far and compare
    let show = dptrain(&["model", "show", &bs]).ok().stdout();
    assert!(show.contains("mlp"), "{show}");
    dptrain(&[
        "eval",
        "--model-file",
        &bs,
        "--data",
        &iris,
        "--device",
        "cpu",
    ])
    .ok();
    let short = d.join("short.safetensors");
    let be = best_epoch.to_string();
    let mut args = common.to_vec();
    let ss = s(&short);
    args.extend_from_slice(&["--epochs", &be, "--save", &ss]);
    dptrain(&args).ok();
    assert_eq!(params(&best), params(&short), "best model vs {be} epochs");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_resumed_run_stops_early_where_the_uninterrupted_one_does() {
    let d = tmpdir("early-stop-resume");
    let iris = shared("iris.csv");
    let common = [
        "train",
        "--data",
        &iris,
        "--model",
        "mlp",
        "--hidden",
        "32",
        "--lr",
        "0.5",
        "--momentum",
        "0.9",
        "--batch-size",
        "8",
        "--val-fraction",
        "0.2",
        "--early-stop-patience",
        "2",
        "--device",
        "cpu",
    ];
    let run = |epochs: &str, best: &Path, m: &Path, extra: &[&str]| {
        let (bs, ms) = (s(best), s(m));
        let mut a = common.to_vec();
        a.extend_from_slice(&["--epochs", epochs, "--save-best", &bs, "--metrics-out", &ms]);
        a.extend_from_slice(extra);
        dptrain(&a).ok()
    };
    let epochs = |m: &Path| {
        metrics(m)
            .iter()
            .filter(|r| r["kind"] == "epoch")
            .map(|r| r["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let (b1, m1) = (d.join("b1.safetensors"), d.join("m1.jsonl"));
    let straight = run("200", &b1, &m1, &[]);
    let stopped_at = epochs(&m1);
    let n = *stopped_at.last().unwrap();
    assert!(
        (3..200).contains(&n),
        "stopped at epoch {n}\n{}",
        straight.show()
    );

    // stop one epoch before that, then resume with the long run's length
    let (b2, m2) = (d.join("b2.safetensors"), d.join("m2.jsonl"));
    let ck = s(&d.join("ck"));
    let before = (n - 1).to_string();
    run(&before, &b2, &m2, &["--checkpoint-dir", &ck]);
    let resumed = run(
        "200",
        &b2,
        &m2,
        &["--checkpoint-dir", &ck, "--resume", "auto"],
    );
    assert!(
        resumed.stdout().to_lowercase().contains("early stop"),
        "{}",
        resumed.show()
    );
    assert_eq!(epochs(&m2), stopped_at);
    assert_eq!(params(&b1), params(&b2));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn save_best_and_monitor_are_checked_against_the_setup() {
    let d = tmpdir("monitor");
    let iris = shared("iris.csv");
    let b = s(&d.join("b.safetensors"));
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--device",
        "cpu",
        "--save-best",
        &b,
    ])
    .fails_with("--val-fraction");
    dptrain(&[
        "train",
        "--data",
        &iris,
        "--device",
        "cpu",
        "--val-fraction",
        "0.2",
        "--early-stop-patience",
        "2",
        "--monitor",
        "val_rmse",
    ])
    .fails_with("val_rmse");
    dptrain(&[
        "train",
        "--data",
        "synth:linear:300",
        "--model",
        "linreg",
        "--device",
        "cpu",
        "--val-fraction",
        "0.2",
        "--early-stop-patience",
        "2",
        "--monitor",
        "val_accuracy",
    ])
    .fails_with("val_accuracy");
    assert!(!Path::new(&b).exists());
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 11. progress without a terminal

#[test]
fn progress_lines_are_plain_without_a_terminal() {
    let args = |every: &'static str| {
        vec![
            "train",
            "--data",
            "synth:seed:8000",
            "--model",
            "logreg",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--progress-every",
            every,
        ]
    };
    let r = dptrain(&args("0.01")).ok();
    let (out, err) = (r.stdout(), r.stderr());
    assert!(
        !out.contains('\x1b') && !err.contains('\x1b'),
        "ESC in\n{}",
        r.show()
    );
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("dptrain: epoch "))
        .collect();
    assert!(!progress.is_empty(), "no progress lines\n{}", r.show());
    for l in &progress {
        // dptrain: epoch E/3  step S/T ...
        let w: Vec<&str> = l.split_whitespace().collect();
        let (e, n) = w[2].split_once('/').unwrap_or_else(|| panic!("{l}"));
        assert_eq!(n, "3", "{l}");
        assert!((1..=3).contains(&e.parse::<u32>().unwrap()), "{l}");
        assert_eq!(w[3], "step", "{l}");
        let (st, total) = w[4].split_once('/').unwrap_or_else(|| panic!("{l}"));
        // 6400 training rows, batch 8: 800 steps an epoch
        assert_eq!(total, "2400", "{l}");
        assert!(st.parse::<u64>().unwrap() <= 2400, "{l}");
    }
    assert!(
        !out.contains("dptrain: epoch "),
        "progress on stdout\n{}",
        r.show()
    );
    assert!(
        out.lines().any(|l| l.starts_with("dptrain: done:")),
        "{}",
        r.show()
    );

    let r = dptrain(&args("0")).ok();
    assert!(
        !r.stderr().contains("dptrain: epoch "),
        "progress with --progress-every 0\n{}",
        r.show()
    );
    assert!(!r.stdout().contains('\x1b') && !r.stderr().contains('\x1b'));
    assert!(
        r.stdout().lines().any(|l| l.starts_with("dptrain: done:")),
        "{}",
        r.show()
    );
}

// ---------------------------------------------------------------------------------------------
// 12. synthetic defaults

/// The inspect lines that describe the data (not its source).
fn inspect_body(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with("source:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn data_synth_defaults_are_those_of_train_synth() {
    let d = tmpdir("synth-defaults");
    for (kind, features, classes) in [("random", 10usize, 2usize), ("blobs", 2, 3)] {
        let f = d.join(format!("{kind}.csv"));
        dptrain(&["data", "synth", "--kind", kind, "--out", &s(&f)]).ok();
        let text = std::fs::read_to_string(&f).unwrap();
        let mut labels = BTreeSet::new();
        let mut rows = 0;
        for l in text.lines() {
            let c: Vec<&str> = l.split(',').collect();
            assert_eq!(c.len(), features + 1, "{kind}: {l}");
            labels.insert(c[0].parse::<u32>().expect("integer label"));
            rows += 1;
        }
        assert_eq!(rows, 1000, "{kind}");
        assert_eq!(
            labels,
            (0..classes as u32).collect::<BTreeSet<_>>(),
            "{kind} labels"
        );
        // the same rows as synth:KIND
        let a = dptrain(&["data", "inspect", &s(&f)]).ok().stdout();
        let spec = format!("synth:{kind}");
        let b = dptrain(&["data", "inspect", &spec]).ok().stdout();
        assert_eq!(inspect_body(&a), inspect_body(&b), "{kind}");
        let ta = dptrain(&[
            "train",
            "--data",
            &s(&f),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ])
        .ok();
        let tb = dptrain(&["train", "--data", &spec, "--epochs", "1", "--device", "cpu"]).ok();
        let first = |r: &Run| {
            r.stdout()
                .lines()
                .find(|l| l.starts_with("epoch "))
                .map(|l| l.split("  samples/s").next().unwrap().to_string())
        };
        assert_eq!(
            first(&ta),
            first(&tb),
            "{kind}: training on the file vs {spec}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 13. one-process commands under mpirun

#[test]
fn eval_and_inspect_print_once_under_mpirun() {
    let d = tmpdir("mpi-once");
    let iris = shared("iris.csv");
    let model = s(&d.join("m.safetensors"));
    dptrain(&[
        "train", "--data", &iris, "--epochs", "3", "--device", "cpu", "--save", &model,
    ])
    .ok();
    let single = dptrain(&[
        "eval",
        "--model-file",
        &model,
        "--data",
        &iris,
        "--device",
        "cpu",
        "--report",
    ])
    .ok();
    let r = util::mpirun(
        2,
        &[
            "eval",
            "--model-file",
            &model,
            "--data",
            &iris,
            "--device",
            "cpu",
            "--report",
        ],
        &[],
    )
    .ok();
    let out = r.stdout();
    assert_eq!(out.matches(" samples  loss ").count(), 1, "{}", r.show());
    assert_eq!(out.matches("confusion matrix").count(), 1, "{}", r.show());
    assert_eq!(eval_summary(&r), eval_summary(&single));
    assert_eq!(confusion(&out), confusion(&single.stdout()));

    let r = util::mpirun(2, &["data", "inspect", &iris], &[]).ok();
    let out = r.stdout();
    assert_eq!(out.matches("samples:").count(), 1, "{}", r.show());
    assert_eq!(out.matches("classes:").count(), 1, "{}", r.show());
    let _ = std::fs::remove_dir_all(&d);
}
