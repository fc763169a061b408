//! Using a trained model: its outputs on a dataset (`predict`), the per-class report of `eval
//! --report`, and what `model show` prints (architecture, settings, and a linear model's weights
//! in the raw units of its features).
//!
//! Outputs come from the CPU reference forward pass (`backend::cpu::forward`, f32), in chunks, on
//! the stored normaliser: the same maths, row for row, as `eval --device cpu`.

use ndarray::Array2;

use crate::data::Dataset;
use crate::model::{ModelKind, ModelSpec};
use crate::store::modelfile::Usable;

/// Rows evaluated at a time (bounds the activations' memory).
const CHUNK: usize = 4096;

/// The model's outputs for every row of `ds`: the last layer's values (logits, or the regression
/// value), rows × outputs.
pub fn outputs(model: &Usable, ds: &Dataset) -> anyhow::Result<Array2<f32>> {
    anyhow::ensure!(
        ds.n_features == model.spec.inputs,
        "{}: {} features, but the model takes {}",
        ds.source,
        ds.n_features,
        model.spec.inputs
    );
    let layers = model.spec.layers();
    let net = model.spec.net()?;
    let nf = ds.n_features;
    let mut out = Array2::<f32>::zeros((ds.n_samples, model.spec.outputs));
    let mut row = vec![0f32; nf];
    // a network's activations are far wider than rows of features
    let chunk = if net.is_some() { 256 } else { CHUNK };
    for start in (0..ds.n_samples).step_by(chunk) {
        let end = (start + chunk).min(ds.n_samples);
        let mut x = Array2::<f32>::zeros((end - start, nf));
        for (k, i) in (start..end).enumerate() {
            ds.row(i, &mut row);
            model.norm.apply_row(&mut row);
            x.row_mut(k).assign(&ndarray::ArrayView1::from(&row));
        }
        let z = match &net {
            Some(net) => net
                .forward(&model.params, x.view(), crate::model::net::Mode::Eval)?
                .outs
                .pop(),
            None => {
                crate::backend::cpu::forward(&model.spec, &layers, &model.params, x.view(), None)
                    .pop()
            }
        }
        .ok_or_else(|| anyhow::anyhow!("a model without layers"))?;
        out.slice_mut(ndarray::s![start..end, ..]).assign(&z);
    }
    Ok(out)
}

/// The predicted class of one row of logits, as the loss kernels count it correct: the first
/// largest logit (softmax), or z > 0 (logistic).
pub fn class_of(kind: ModelKind, z: &[f32]) -> usize {
    match kind {
        ModelKind::Logreg => usize::from(z[0] > 0.0),
        _ => {
            let mut arg = 0;
            for (j, &v) in z.iter().enumerate() {
                if v > z[arg] {
                    arg = j;
                }
            }
            arg
        }
    }
}

/// Class probabilities of one row of logits: [1 − p, p] for logistic, the softmax otherwise.
pub fn probabilities(kind: ModelKind, z: &[f32]) -> Vec<f64> {
    match kind {
        ModelKind::Logreg => {
            let p = 1.0 / (1.0 + (-f64::from(z[0])).exp());
            vec![1.0 - p, p]
        }
        _ => {
            let m = z
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let e: Vec<f64> = z.iter().map(|&v| (f64::from(v) - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        }
    }
}

/// The number of classes a classifier tells apart (2 for logistic regression).
pub fn classes(spec: &ModelSpec) -> usize {
    spec.outputs.max(2)
}

/// A class's name: its text label when the training labels were text, else its index.
pub fn class_name(labels: Option<&[String]>, c: usize) -> String {
    labels
        .and_then(|l| l.get(c).cloned())
        .unwrap_or_else(|| c.to_string())
}

/// Counts of (true class, predicted class).
#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    pub classes: usize,
    /// Row-major: `counts[t * classes + p]`.
    pub counts: Vec<u64>,
}

/// Precision, recall, F1 and support of one class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth * self.classes + predicted] += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let right: u64 = (0..self.classes)
            .map(|c| self.counts[c * self.classes + c])
            .sum();
        right as f64 / self.total().max(1) as f64
    }

    /// Scores of class `c`; a ratio with nothing to count (no prediction, no sample) is 0, as
    /// scikit-learn reports it.
    pub fn scores(&self, c: usize) -> ClassScores {
        let k = self.classes;
        let tp = self.counts[c * k + c] as f64;
        let predicted: u64 = (0..k).map(|t| self.counts[t * k + c]).sum();
        let support: u64 = (0..k).map(|p| self.counts[c * k + p]).sum();
        let ratio = |a: f64, b: u64| if b == 0 { 0.0 } else { a / b as f64 };
        let precision = ratio(tp, predicted);
        let recall = ratio(tp, support);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        ClassScores {
            precision,
            recall,
            f1,
            support,
        }
    }

    /// The confusion matrix (rows: true class, columns: predicted) and per-class table with the
    /// macro and support-weighted averages.
    pub fn report(&self, labels: Option<&[String]>) -> String {
        let k = self.classes;
        let names: Vec<String> = (0..k).map(|c| class_name(labels, c)).collect();
        let w = names
            .iter()
            .map(String::len)
            .chain(self.counts.iter().map(|c| c.to_string().len()))
            .max()
            .unwrap_or(1)
            .max("macro avg".len());
        let mut s = String::from("confusion matrix (rows: true class, columns: predicted)\n");
        s += &format!("{:>w$}", "");
        for n in &names {
            s += &format!(" {n:>w$}");
        }
        s += "\n";
        for (t, n) in names.iter().enumerate() {
            s += &format!("{n:>w$}");
            for p in 0..k {
                s += &format!(" {:>w$}", self.counts[t * k + p]);
            }
            s += "\n";
        }
        s += &format!(
            "\n{:>w$} {:>9} {:>9} {:>9} {:>9}\n",
            "class", "precision", "recall", "f1", "support"
        );
        let (mut macro_, mut weighted) = ([0f64; 3], [0f64; 3]);
        let total = self.total().max(1) as f64;
        for (c, n) in names.iter().enumerate() {
            let r = self.scores(c);
            s += &format!(
                "{n:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                r.precision, r.recall, r.f1, r.support
            );
            for (i, v) in [r.precision, r.recall, r.f1].into_iter().enumerate() {
                macro_[i] += v / k as f64;
                weighted[i] += v * r.support as f64 / total;
            }
        }
        for (name, v) in [("macro avg", macro_), ("weighted", weighted)] {
            s += &format!(
                "{name:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                v[0],
                v[1],
                v[2],
                self.total()
            );
        }
        s += &format!("{:>w$} {:>9.4}\n", "accuracy", self.accuracy());
        s
    }
}

/// A linear model's weights in the raw units of its features: output `o`'s weights w and bias b
/// with z = Σ wⱼ xⱼ + b on unnormalised x (the normaliser x' = (x − shift)·scale folded in).
pub fn raw_linear(model: &Usable) -> Option<Vec<(Vec<f64>, f64)>> {
    let spec = &model.spec;
    if !spec.hidden.is_empty() || spec.kind.is_conv() {
        return None;
    }
    let (fi, fo) = spec.linear(0);
    let (w_off, b_off) = spec.offsets(0);
    let n = &model.norm;
    Some(
        (0..fo)
            .map(|o| {
                let w: Vec<f64> = (0..fi)
                    .map(|j| f64::from(model.params[w_off + o * fi + j]) * f64::from(n.scale[j]))
                    .collect();
                let b = f64::from(model.params[b_off + o])
                    - (0..fi).map(|j| w[j] * f64::from(n.shift[j])).sum::<f64>();
                (w, b)
            })
            .collect(),
    )
}

/// `model show`'s lines for a dense model: widths, activation, dropout, and the tensors.
fn dense_shape(spec: &crate::model::ModelSpec) -> String {
    let mut s = String::new();
    s += &format!(
        "widths      {}\n",
        spec.widths()
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" → ")
    );
    if !spec.hidden.is_empty() {
        s += &format!(
            "activation  {}\n",
            format!("{:?}", spec.activation).to_lowercase()
        );
        if spec.dropout > 0.0 {
            s += &format!("dropout     {}\n", spec.dropout);
        }
    }
    s += &format!("parameters  {}\n", spec.layout().total);
    for t in &spec.layout().tensors {
        s += &format!("  {:<18} {:?}\n", t.name, t.shape);
    }
    s
}

/// What `model show` prints.
pub fn show(model: &Usable, path: &str) -> String {
    let spec = &model.spec;
    let mut s = format!("{path}: ");
    s += &match model.checkpoint_step {
        Some(step) => format!("checkpoint at step {step}\n"),
        None => "model file\n".to_string(),
    };
    s += &format!(
        "model       {} ({})\n",
        format!("{:?}", spec.kind).to_lowercase(),
        match spec.kind {
            ModelKind::Logreg => "sigmoid + binary cross-entropy",
            ModelKind::Softmax => "softmax + cross-entropy",
            ModelKind::Linreg => "linear + mean squared error",
            ModelKind::Mlp => "multi-layer perceptron + cross-entropy",
            ModelKind::Lenet5
            | ModelKind::Resnet20
            | ModelKind::Resnet32
            | ModelKind::Resnet56
            | ModelKind::Custom => "network of layers + cross-entropy",
        }
    );
    if let Ok(Some(net)) = spec.net() {
        // torchinfo's table: each layer's output shape and parameters, then the tensors
        s += "layers\n";
        for line in net.summary().lines() {
            s += &format!("  {line}\n");
        }
        s += &format!("tensors     {}\n", net.layout.tensors.len());
        for t in &net.layout.tensors {
            s += &format!("  {:<24} {:?}\n", t.name, t.shape);
        }
    } else {
        s += &dense_shape(spec);
    }
    s += &format!(
        "normaliser  {}\n",
        format!("{:?}", model.norm.kind).to_lowercase()
    );
    if let Some(l) = &model.meta.labels {
        s += &format!("classes     {}\n", l.join(", "));
    } else if !spec.is_regression() {
        s += &format!("classes     {}\n", classes(spec));
    }
    if let Some(serde_json::Value::Object(o)) = &model.meta.settings {
        s += "settings\n";
        for (k, v) in o {
            let v = match v {
                serde_json::Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            s += &format!("  {k} = {v}\n");
        }
    }
    if let Some(rows) = raw_linear(model) {
        s += "weights in raw feature units (z = w·x + b on unnormalised x)\n";
        for (o, (w, b)) in rows.iter().enumerate() {
            let name = match spec.kind {
                ModelKind::Softmax => {
                    format!("class {}", class_name(model.meta.labels.as_deref(), o))
                }
                ModelKind::Logreg => "logit".to_string(),
                _ => "output".to_string(),
            };
            let ws: Vec<String> = w
                .iter()
                .enumerate()
                .map(|(j, v)| format!("w{}={v:.6}", j + 1))
                .collect();
            s += &format!("  {name}: {}  b={b:.6}\n", ws.join(" "));
            // scaled so that the first weight is 1.5 (or 1): lines compared up to a factor
            if let Some(&w1) = w.first().filter(|v| v.abs() > 1e-12) {
                let f = 1.0 / w1;
                let ws: Vec<String> = w
                    .iter()
                    .enumerate()
                    .map(|(j, v)| format!("w{}={:.4}", j + 1, v * f))
                    .collect();
                s += &format!("    scaled to w1 = 1: {}  b={:.4}\n", ws.join(" "), b * f);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalizer;
    use crate::model::Activation;
    use crate::store::modelfile::ModelMeta;

    fn usable(spec: ModelSpec, params: Vec<f32>, norm: Normalizer) -> Usable {
        Usable {
            spec,
            norm,
            params,
            meta: ModelMeta::default(),
            checkpoint_step: None,
        }
    }

    #[test]
    fn raw_weights_fold_the_normaliser_in() {
        // z = 2·(x1 − 1)·0.5 − 3·(x2 − 4)·0.25 + 0.5 = x1 − 0.75·x2 + 2.5
        let spec = ModelSpec::new(ModelKind::Logreg, 2, 2, vec![], Activation::Relu).unwrap();
        let norm = Normalizer {
            kind: crate::data::NormKind::Standard,
            shift: vec![1.0, 4.0],
            scale: vec![0.5, 0.25],
        };
        let m = usable(spec, vec![2.0, -3.0, 0.5], norm);
        let rows = raw_linear(&m).unwrap();
        assert_eq!(rows.len(), 1);
        let (w, b) = &rows[0];
        assert!((w[0] - 1.0).abs() < 1e-12 && (w[1] + 0.75).abs() < 1e-12);
        assert!((b - 2.5).abs() < 1e-12, "{b}");
        // and the raw-unit line gives the same logit as the model on a raw row
        let ds = Dataset {
            n_samples: 1,
            n_features: 2,
            x: crate::data::Features::F32(vec![3.0, -1.0]),
            y: vec![0.0],
            pixels: false,
            image: None,
            source: "row".into(),
            labels: None,
        };
        let z = outputs(&m, &ds).unwrap()[[0, 0]];
        assert!((f64::from(z) - (3.0 + 0.75 + 2.5)).abs() < 1e-5, "{z}");
        assert!(show(&m, "m").contains("w1=1.0000 w2=-0.7500  b=2.5000"));
    }

    #[test]
    fn an_mlp_has_no_raw_linear_form() {
        let spec = ModelSpec::new(ModelKind::Mlp, 2, 3, vec![4], Activation::Relu).unwrap();
        let p = spec.init(0);
        assert!(raw_linear(&usable(spec, p, Normalizer::identity(2))).is_none());
    }

    #[test]
    fn classes_and_probabilities_follow_the_loss_kernels() {
        assert_eq!(class_of(ModelKind::Softmax, &[0.1, 2.0, 2.0, -1.0]), 1);
        assert_eq!(class_of(ModelKind::Logreg, &[0.0]), 0);
        assert_eq!(class_of(ModelKind::Logreg, &[1e-6]), 1);
        let p = probabilities(ModelKind::Softmax, &[1000.0, 1000.0, 0.0]);
        assert!((p[0] - 0.5).abs() < 1e-12 && p[2] < 1e-300 && p.iter().all(|v| v.is_finite()));
        let q = probabilities(ModelKind::Logreg, &[0.0]);
        assert_eq!(q, vec![0.5, 0.5]);
    }

    #[test]
    fn confusion_scores_match_a_hand_count() {
        // truth/predicted pairs: class 0 → 0,0,1; class 1 → 1,1; class 2 → 0 (never predicted)
        let mut c = Confusion::new(3);
        for (t, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (2, 0)] {
            c.add(t, p);
        }
        assert!((c.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        let s0 = c.scores(0);
        assert!((s0.precision - 2.0 / 3.0).abs() < 1e-12 && (s0.recall - 2.0 / 3.0).abs() < 1e-12);
        let s1 = c.scores(1);
        assert!((s1.precision - 2.0 / 3.0).abs() < 1e-12 && s1.recall == 1.0);
        assert!((s1.f1 - 0.8).abs() < 1e-12);
        let s2 = c.scores(2);
        assert_eq!(
            (s2.precision, s2.recall, s2.f1, s2.support),
            (0.0, 0.0, 0.0, 1)
        );
        let names = ["cat".to_string(), "dog".into(), "eel".into()];
        let r = c.report(Some(&names));
        assert!(
            r.contains("cat") && r.contains("eel") && r.contains("0.8000"),
            "{r}"
        );
    }
}
