//! The metrics reader: a `--metrics-out` file (JSON lines, or the CSV form) back as curves, for
//! `dptrain plot` and for resuming a run's records.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, anyhow, bail};

/// The per-record fields drawn; any other field is ignored.
const FIELDS: [&str; 10] = [
    "lr",
    "train_loss",
    "train_accuracy",
    "train_rmse",
    "test_loss",
    "test_accuracy",
    "test_rmse",
    "val_loss",
    "val_accuracy",
    "val_rmse",
];

/// Whether a metrics file is CSV (by its name).
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// A metrics file's curves: for each field, its `(step, value)` points in step order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// From the per-epoch records (those without `"kind"`, or with `"kind":"epoch"` or `"eval"`).
    pub epoch: BTreeMap<String, Vec<(f64, f64)>>,
    /// From the per-step records (`"kind":"step"`).
    pub step: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Metrics {
    pub fn epoch(&self, field: &str) -> &[(f64, f64)] {
        self.epoch.get(field).map_or(&[], Vec::as_slice)
    }
    pub fn step(&self, field: &str) -> &[(f64, f64)] {
        self.step.get(field).map_or(&[], Vec::as_slice)
    }
}

/// Reads a metrics file of JSON lines (see [`parse_metrics`]), or the CSV form that `train
/// --metrics-out FILE.csv` writes (a header row naming the fields; empty cells are absent).
pub fn read_metrics(path: &Path) -> anyhow::Result<Metrics> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let text = if is_csv(path) {
        csv_to_json_lines(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
    } else {
        text
    };
    parse_metrics(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// A CSV metrics file as JSON lines, line for line (the header becomes a blank line, so that line
/// numbers in messages stay the file's): numbers stay numbers, other cells strings.
fn csv_to_json_lines(text: &str) -> anyhow::Result<String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("no metrics records"))?
        .split(',')
        .map(str::trim)
        .collect();
    let mut out = String::from("\n");
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            out += "\n";
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != header.len() {
            bail!(
                "line {}: {} cells, the header names {}",
                i + 2,
                cells.len(),
                header.len()
            );
        }
        let mut o = serde_json::Map::new();
        for (k, c) in header.iter().zip(cells) {
            let c = c.trim();
            if c.is_empty() {
                continue;
            }
            let v = match c.parse::<f64>() {
                Ok(x) => serde_json::json!(x),
                Err(_) => serde_json::Value::String(c.to_string()),
            };
            o.insert((*k).to_string(), v);
        }
        out += &serde_json::Value::Object(o).to_string();
        out += "\n";
    }
    Ok(out)
}

/// Parses JSON lines: one object a line with a numeric `step`, blank lines skipped, unknown
/// fields ignored, records of an unknown `kind` skipped, `null` taken as absent. A line that is
/// not a JSON object, lacks `step` or has a drawn field that is not a number is an error naming
/// its line number. A file without any record is an error.
pub fn parse_metrics(text: &str) -> anyhow::Result<Metrics> {
    let mut m = Metrics::default();
    let mut records = 0usize;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("line {n}: not JSON: {e}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("line {n}: not a JSON object"))?;
        let target = match obj.get("kind") {
            None | Some(serde_json::Value::Null) => &mut m.epoch,
            // validation records between epochs (`--eval-every`) join the epoch curves
            Some(serde_json::Value::String(k)) if k == "epoch" || k == "eval" => &mut m.epoch,
            Some(serde_json::Value::String(k)) if k == "step" => &mut m.step,
            Some(serde_json::Value::String(_)) => continue,
            Some(_) => bail!("line {n}: \"kind\" is not a string"),
        };
        let step = obj
            .get("step")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| anyhow!("line {n}: no numeric \"step\""))?;
        for f in FIELDS {
            match obj.get(f) {
                None | Some(serde_json::Value::Null) => {}
                Some(x) => {
                    let y = x
                        .as_f64()
                        .ok_or_else(|| anyhow!("line {n}: \"{f}\" is not a number: {x}"))?;
                    target.entry(f.to_string()).or_default().push((step, y));
                }
            }
        }
        records += 1;
    }
    if records == 0 {
        bail!("no metrics records");
    }
    for s in m.epoch.values_mut().chain(m.step.values_mut()) {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(m)
}
