//! Datasets in memory: the `Dataset` type, loading (`load` picks CSV or an MNIST directory), feature
//! normalisation fitted on the training set, the seeded train/test split, `inspect`, and `DataError`.
//!
//! Every loader returns a typed `DataError` whose `Display` is one line naming the file (and line/column
//! where there is one), because the binary prints it as `error: <msg>` and stops; nothing here panics on input.

pub mod augment;
pub mod cifar;
pub mod csv;
pub mod fingerprint;
pub mod idx;
pub mod synth;

use std::fmt;
use std::path::Path;

use crate::rng::Rng;

pub use csv::{CsvOptions, HeaderMode, LabelColumn, load_csv, write_csv};
pub use idx::{load_idx_pair, load_mnist_dir};

/// Why data could not be loaded or used. Each message is one line and starts with the file (or source) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt gzip stream: {source}")]
    Gzip {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is empty")]
    Empty { path: String },
    #[error("{path}: no data rows")]
    NoRows { path: String },
    #[error("{path}: not valid UTF-8 at line {line}")]
    Utf8 { path: String, line: usize },
    #[error("{path}: line {line}: expected {expected} columns, found {found}")]
    Ragged {
        path: String,
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "{path}: line {line}: found {found} column; need a label column and at least one feature column"
    )]
    TooFewColumns {
        path: String,
        line: usize,
        found: usize,
    },
    #[error("{path}: line {line}, column {column}: cannot parse \"{text}\" as a number")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        text: String,
    },
    #[error("{path}: line {line}, column {column}: missing value")]
    Missing {
        path: String,
        line: usize,
        column: usize,
    },
    #[error("{path}: line {line}, column {column}: value is NaN or infinite")]
    NonFinite {
        path: String,
        line: usize,
        column: usize,
    },
    #[error(
        "{path}: line {line}, column {column}: value \"{text}\" is too large for a 32-bit float"
    )]
    OutOfRange {
        path: String,
        line: usize,
        column: usize,
        text: String,
    },
    #[error("{path}: label column \"{name}\" not found in header (columns: {columns})")]
    LabelNotFound {
        path: String,
        name: String,
        columns: String,
    },
    #[error("{path}: label column \"{name}\" is given by name but the file has no header row")]
    LabelNeedsHeader { path: String, name: String },
    #[error("{path}: label column index {index} is out of range: rows have {columns} columns (indices 0..={last})", last = columns - 1)]
    LabelOutOfRange {
        path: String,
        index: usize,
        columns: usize,
    },
    #[error("{path}: not an IDX {kind} file (magic 0x{magic:08x}, expected 0x{expected:08x})")]
    NotIdx {
        path: String,
        kind: &'static str,
        magic: u32,
        expected: u32,
    },
    #[error("{path}: truncated: header says {shape} bytes, file holds {held}")]
    Truncated {
        path: String,
        shape: String,
        held: u64,
    },
    #[error("{path}: truncated: an IDX {kind} header is {need} bytes, file holds {held}")]
    TruncatedHeader {
        path: String,
        kind: &'static str,
        need: usize,
        held: usize,
    },
    #[error("{path}: trailing data: header says {shape} bytes, file holds more")]
    TrailingData { path: String, shape: String },
    #[error("{path}: implausible IDX header: {shape} bytes is more than the 16 GiB limit")]
    ImplausibleHeader { path: String, shape: String },
    #[error("{msg}")]
    Limit { msg: String },
    #[error("{path}: not CIFAR-10 binary data: {msg}")]
    Cifar { path: String, msg: String },
    #[error("{images}: holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        images: String,
        labels: String,
        n_images: usize,
        n_labels: usize,
    },
    #[error(
        "{dir}: no {name} or {name}.gz (an MNIST directory needs train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally gzipped)"
    )]
    MnistFileMissing { dir: String, name: String },
    #[error(
        "{test}: images are {test_features} pixels but the training images ({train}) are {train_features}"
    )]
    FeatureMismatch {
        train: String,
        test: String,
        train_features: usize,
        test_features: usize,
    },
    #[error(
        "{source_name}: sample {sample}: target {value} is not a class label (expected an integer from 0 to 16777215)"
    )]
    NotClassLabel {
        source_name: String,
        sample: usize,
        value: f32,
    },
    #[error(
        "{source_name}: sample {sample}: class \"{value}\" is not one of the {count} known classes ({names})"
    )]
    UnknownClass {
        source_name: String,
        sample: usize,
        value: String,
        count: usize,
        /// The known names, shortened when there are many.
        names: String,
    },
    #[error("test fraction {fraction} must be strictly between 0 and 1")]
    SplitFraction { fraction: f64 },
    #[error(
        "{source_name}: a test fraction of {fraction} on {n} samples gives {n_train} train and {n_test} test samples; both must be non-empty"
    )]
    SplitEmpty {
        source_name: String,
        fraction: f64,
        n: usize,
        n_train: usize,
        n_test: usize,
    },
}

/// Feature storage, row-major [n_samples, n_features]. U8 keeps pixel data compact (MNIST as f32 is 188 MB,
/// more than some GPUs can bind; as u8 it is 47 MB).
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

impl Features {
    /// Number of stored values (n_samples * n_features).
    pub fn len(&self) -> usize {
        match self {
            Features::F32(v) => v.len(),
            Features::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// "f32" or "u8", for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Features::F32(_) => "f32",
            Features::U8(_) => "u8",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub n_samples: usize,
    pub n_features: usize,
    pub x: Features,
    /// One target per sample: a class index stored as f32 (0.0, 1.0, ...) or a regression value.
    pub y: Vec<f32>,
    /// Whether x holds raw pixels (0..=255) that should be scaled to [0,1] rather than standardised.
    pub pixels: bool,
    /// The shape (channels, height, width) of each sample when the samples are images (IDX,
    /// CIFAR, synthetic images); None for rows of features.
    pub image: Option<[usize; 3]>,
    /// Where it came from, for messages (a path or "synthetic:blobs").
    pub source: String,
    /// Class names when the labels were text (a CSV label column such as `setosa`): `names[i]` is
    /// class i, in sorted order, so the mapping does not depend on the row order. None for numeric
    /// labels (and for every source other than CSV).
    pub labels: Option<Vec<String>>,
}

/// Largest class label accepted: f32 holds every integer up to 2^24 exactly, and `class_counts`
/// allocates one counter per class, so a stray regression target must not become a huge allocation.
const MAX_CLASS_LABEL: f32 = 16_777_215.0;

impl Dataset {
    /// Raw feature value of sample `i`, feature `j`.
    pub fn value(&self, i: usize, j: usize) -> f32 {
        let k = i * self.n_features + j;
        match &self.x {
            Features::F32(v) => v[k],
            Features::U8(v) => f32::from(v[k]),
        }
    }

    /// Raw row `i` into `out` (which must hold `n_features` values).
    pub fn row(&self, i: usize, out: &mut [f32]) {
        let start = i * self.n_features;
        let end = start + self.n_features;
        match &self.x {
            Features::F32(v) => out.copy_from_slice(&v[start..end]),
            Features::U8(v) => {
                for (o, &b) in out.iter_mut().zip(&v[start..end]) {
                    *o = f32::from(b);
                }
            }
        }
    }

    /// The samples at `idx`, in that order, with the same storage kind.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let nf = self.n_features;
        let x = match &self.x {
            Features::F32(v) => {
                let mut out = Vec::with_capacity(idx.len() * nf);
                for &i in idx {
                    out.extend_from_slice(&v[i * nf..(i + 1) * nf]);
                }
                Features::F32(out)
            }
            Features::U8(v) => {
                let mut out = Vec::with_capacity(idx.len() * nf);
                for &i in idx {
                    out.extend_from_slice(&v[i * nf..(i + 1) * nf]);
                }
                Features::U8(out)
            }
        };
        Dataset {
            n_samples: idx.len(),
            n_features: nf,
            x,
            y: idx.iter().map(|&i| self.y[i]).collect(),
            pixels: self.pixels,
            image: self.image,
            source: self.source.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Class labels as u32, checking every target is a non-negative integer (error names the 1-based sample
    /// number and the value, and the source).
    pub fn class_labels(&self) -> Result<Vec<u32>, DataError> {
        self.y
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if (0.0..=MAX_CLASS_LABEL).contains(&v) && v.fract() == 0.0 {
                    Ok(v as u32)
                } else {
                    Err(DataError::NotClassLabel {
                        source_name: self.source.clone(),
                        sample: i + 1,
                        value: v,
                    })
                }
            })
            .collect()
    }

    /// Samples per class: index = class, len = max label + 1 (empty for an empty dataset). The
    /// class count is checked against the samples and `limits::MAX_CLASSES` before it sizes
    /// anything.
    pub fn class_counts(&self) -> Result<Vec<usize>, DataError> {
        let labels = self.class_labels()?;
        if let Some((i, &m)) = labels.iter().enumerate().max_by_key(|(_, l)| **l) {
            crate::limits::check_classes(&self.source, m, i + 1, self.n_samples)
                .map_err(|e| DataError::Limit { msg: e.to_string() })?;
        }
        let k = labels.iter().max().map_or(0, |&m| m as usize + 1);
        let mut counts = vec![0usize; k];
        for l in labels {
            counts[l as usize] += 1;
        }
        Ok(counts)
    }

    /// Maps this dataset's class labels onto `names` (the training set's `labels`), so that a test
    /// set or a file to predict on numbers its classes as the model does. String labels are looked
    /// up by name; numeric labels (`labels` None) by their text, as the CSV reader writes a number
    /// among class names ("1", "2.5"). Afterwards `labels` is `names`. A label that `names` lacks
    /// is an error naming the 1-based sample and the value; the dataset is then left unchanged.
    pub fn relabel(&mut self, names: &[String]) -> Result<(), DataError> {
        let index: std::collections::HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let unknown = |sample: usize, value: String| {
            const SHOWN: usize = 10;
            // One line whatever the names hold (a quoted CSV cell may hold a line break).
            let one_line = |s: &str| -> String {
                s.chars()
                    .flat_map(|c| {
                        let esc = c.is_control().then(|| c.escape_default());
                        esc.into_iter()
                            .flatten()
                            .chain((!c.is_control()).then_some(c))
                    })
                    .collect()
            };
            let mut list: Vec<String> = names.iter().take(SHOWN).map(|n| one_line(n)).collect();
            if names.len() > SHOWN {
                list.push("...".into());
            }
            DataError::UnknownClass {
                source_name: self.source.clone(),
                sample,
                value: one_line(&value),
                count: names.len(),
                names: list.join(", "),
            }
        };
        let mut y = Vec::with_capacity(self.y.len());
        match &self.labels {
            Some(own) => {
                let map: Vec<Option<usize>> =
                    own.iter().map(|n| index.get(n.as_str()).copied()).collect();
                for (i, &v) in self.y.iter().enumerate() {
                    let class = (v >= 0.0 && v.fract() == 0.0)
                        .then_some(v as usize)
                        .filter(|&c| c < own.len());
                    match class.and_then(|c| map[c]) {
                        Some(k) => y.push(k as f32),
                        None => {
                            let value = class.map_or_else(|| v.to_string(), |c| own[c].clone());
                            return Err(unknown(i + 1, value));
                        }
                    }
                }
            }
            None => {
                for (i, &v) in self.y.iter().enumerate() {
                    let text = v.to_string();
                    match index.get(text.as_str()) {
                        Some(&k) => y.push(k as f32),
                        None => return Err(unknown(i + 1, text)),
                    }
                }
            }
        }
        self.y = y;
        self.labels = Some(names.to_vec());
        Ok(())
    }

    /// Convert F32 storage to U8 when every value is an integer in 0..=255 (returns whether it did;
    /// false when it is already U8 or some value does not fit). `pixels` is left alone: small integer
    /// features (e.g. 8×8 digits in 0..=16) are not necessarily 0..=255 pixels.
    pub fn compact_to_u8(&mut self) -> bool {
        let Features::F32(v) = &self.x else {
            return false;
        };
        if !v
            .iter()
            .all(|&a| (0.0..=255.0).contains(&a) && a.fract() == 0.0)
        {
            return false;
        }
        self.x = Features::U8(v.iter().map(|&a| a as u8).collect());
        true
    }
}

/// Which feature transform to fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    None,
    Standard,
    Pixel,
}

impl fmt::Display for NormKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NormKind::None => "none",
            NormKind::Standard => "standard",
            NormKind::Pixel => "pixel",
        })
    }
}

impl std::str::FromStr for NormKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(NormKind::None),
            "standard" => Ok(NormKind::Standard),
            "pixel" => Ok(NormKind::Pixel),
            _ => Err(format!(
                "unknown normalisation \"{s}\" (expected none, standard or pixel)"
            )),
        }
    }
}

/// Affine feature transform x' = (x - shift[j]) * scale[j], fitted on the training set only and stored with the model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalizer {
    pub kind: NormKind,
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
}

impl Normalizer {
    pub fn identity(n_features: usize) -> Self {
        Self {
            kind: NormKind::None,
            shift: vec![0.0; n_features],
            scale: vec![1.0; n_features],
        }
    }

    /// Raw 0..=255 pixels to [0, 1].
    pub fn pixel(n_features: usize) -> Self {
        Self {
            kind: NormKind::Pixel,
            shift: vec![0.0; n_features],
            scale: vec![1.0 / 255.0; n_features],
        }
    }

    /// Per-feature mean and (population) standard deviation, accumulated in f64 so that large
    /// datasets do not lose precision. A constant feature gets scale 1, not inf: it becomes all zeros.
    pub fn fit_standard(ds: &Dataset) -> Self {
        let nf = ds.n_features;
        let n = ds.n_samples;
        let mut sum = vec![0f64; nf];
        let mut min = vec![f32::INFINITY; nf];
        let mut max = vec![f32::NEG_INFINITY; nf];
        let mut row = vec![0f32; nf];
        for i in 0..n {
            ds.row(i, &mut row);
            for j in 0..nf {
                sum[j] += f64::from(row[j]);
                min[j] = min[j].min(row[j]);
                max[j] = max[j].max(row[j]);
            }
        }
        let denom = n.max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / denom).collect();
        // Two passes (mean first) rather than E[x²]-E[x]², which cancels badly for large offsets.
        let mut sq = vec![0f64; nf];
        for i in 0..n {
            ds.row(i, &mut row);
            for j in 0..nf {
                let d = f64::from(row[j]) - mean[j];
                sq[j] += d * d;
            }
        }
        let scale = (0..nf)
            .map(|j| {
                let std = (sq[j] / denom).sqrt();
                // Exact constancy is checked on the values themselves: the f64 mean of identical
                // values can be off by an ulp, which would otherwise give a tiny std and a huge scale.
                let s = (1.0 / std) as f32;
                if n == 0 || min[j] == max[j] || !s.is_finite() {
                    1.0
                } else {
                    s
                }
            })
            .collect();
        Self {
            kind: NormKind::Standard,
            shift: mean.iter().map(|&m| m as f32).collect(),
            scale,
        }
    }

    /// Pixel data → pixel(); otherwise kind Standard → fit_standard, None → identity, Pixel → pixel().
    pub fn fit(ds: &Dataset, kind: NormKind) -> Self {
        if ds.pixels {
            return Self::pixel(ds.n_features);
        }
        match kind {
            NormKind::None => Self::identity(ds.n_features),
            NormKind::Standard => Self::fit_standard(ds),
            NormKind::Pixel => Self::pixel(ds.n_features),
        }
    }

    pub fn apply_row(&self, row: &mut [f32]) {
        for ((v, &m), &s) in row.iter_mut().zip(&self.shift).zip(&self.scale) {
            *v = (*v - m) * s;
        }
    }

    /// All of `ds`'s features, transformed, row-major as f32.
    pub fn apply_dataset(&self, ds: &Dataset) -> Vec<f32> {
        let nf = ds.n_features;
        let mut out = vec![0f32; ds.n_samples * nf];
        for (i, row) in out
            .chunks_exact_mut(nf.max(1))
            .enumerate()
            .take(ds.n_samples)
        {
            ds.row(i, row);
            self.apply_row(row);
        }
        out
    }
}

/// What `--data PATH` meant: MNIST directories bring their own test set; a CSV file does not.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub train: Dataset,
    pub test: Option<Dataset>,
}

/// What `--data PATH` means: a directory → MNIST layout (train and test); a file → CSV (train only).
pub fn load(path: &Path, opts: &CsvOptions) -> Result<Loaded, DataError> {
    let meta = std::fs::metadata(path).map_err(|source| DataError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if meta.is_dir() && cifar::is_cifar_dir(path) {
        let (train, test) = cifar::load_dir(path)?;
        Ok(Loaded { train, test })
    } else if meta.is_dir() {
        let (train, test) = load_mnist_dir(path)?;
        Ok(Loaded {
            train,
            test: Some(test),
        })
    } else if path.extension().is_some_and(|e| e == "bin") {
        // a lone batch file takes the class names of its folder, as the folder's own files do
        let names = path.parent().and_then(cifar::class_names);
        Ok(Loaded {
            train: cifar::load_files(&[path.to_path_buf()], names)?,
            test: None,
        })
    } else {
        Ok(Loaded {
            train: load_csv(path, opts)?,
            test: None,
        })
    }
}

/// What a `--data` value means: a `synth:` spec (drawn from `seed`), else [`load`]'s MNIST
/// directory or CSV file.
pub fn load_spec(spec: &str, opts: &CsvOptions, seed: u64) -> anyhow::Result<Loaded> {
    if spec.starts_with("synth:") {
        return Ok(Loaded {
            train: synth::from_spec(spec, seed)?,
            test: None,
        });
    }
    Ok(load(Path::new(spec), opts)?)
}

/// Stream of `Rng::derive` reserved for the train/test split, so the split never depends on other draws.
pub const SPLIT_STREAM: u64 = 0x5EED_5917;

/// Seeded split: shuffles indices with Rng::derive(seed, 0x5EED_5917) and puts round(fraction*n) samples in test
/// (the first ones of the shuffle). Each part keeps the original sample order.
/// Error if fraction not in (0,1) or either part would be empty.
pub fn train_test_split(
    ds: &Dataset,
    fraction: f64,
    seed: u64,
) -> Result<(Dataset, Dataset), DataError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::SplitFraction { fraction });
    }
    let n = ds.n_samples;
    let n_test = (fraction * n as f64).round() as usize;
    if n_test == 0 || n_test >= n {
        return Err(DataError::SplitEmpty {
            source_name: ds.source.clone(),
            fraction,
            n,
            n_train: n.saturating_sub(n_test),
            n_test: n_test.min(n),
        });
    }
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::derive(seed, SPLIT_STREAM).shuffle(&mut idx);
    let (test_idx, train_idx) = idx.split_at_mut(n_test);
    test_idx.sort_unstable();
    train_idx.sort_unstable();
    Ok((ds.subset(train_idx), ds.subset(test_idx)))
}

/// A summary of a dataset for `dptrain inspect`-style reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspection {
    pub source: String,
    pub samples: usize,
    pub features: usize,
    /// Number of classes (max label + 1) when every target is a class label.
    pub classes: Option<usize>,
    pub class_counts: Option<Vec<usize>>,
    /// Smallest and largest raw feature value over the whole dataset (0 when it is empty).
    pub min: f32,
    pub max: f32,
    /// Smallest and largest target, for regression data (None when targets are class labels).
    pub target_range: Option<(f32, f32)>,
    pub pixels: bool,
    /// "f32" or "u8".
    pub storage: &'static str,
}

pub fn inspect(ds: &Dataset) -> Inspection {
    let (min, max) = match &ds.x {
        Features::F32(v) => v
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &a| {
                (lo.min(a), hi.max(a))
            }),
        Features::U8(v) => v
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &a| {
                (lo.min(f32::from(a)), hi.max(f32::from(a)))
            }),
    };
    let (min, max) = if ds.x.is_empty() {
        (0.0, 0.0)
    } else {
        (min, max)
    };
    let counts = ds.class_counts().ok();
    let target_range = if counts.is_some() || ds.y.is_empty() {
        None
    } else {
        Some(
            ds.y.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &a| {
                    (lo.min(a), hi.max(a))
                }),
        )
    };
    Inspection {
        source: ds.source.clone(),
        samples: ds.n_samples,
        features: ds.n_features,
        classes: counts.as_ref().map(Vec::len),
        class_counts: counts,
        min,
        max,
        target_range,
        pixels: ds.pixels,
        storage: ds.x.kind(),
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source:   {}", self.source)?;
        writeln!(f, "samples:  {}", self.samples)?;
        writeln!(
            f,
            "features: {} ({} storage{})",
            self.features,
            self.storage,
            if self.pixels { ", pixels" } else { "" }
        )?;
        writeln!(f, "values:   min {}, max {}", self.min, self.max)?;
        match (&self.class_counts, self.target_range) {
            (Some(counts), _) => {
                let list: Vec<String> = counts.iter().map(usize::to_string).collect();
                write!(f, "classes:  {} (counts {})", counts.len(), list.join(", "))
            }
            (None, Some((lo, hi))) => write!(f, "targets:  regression, min {lo}, max {hi}"),
            (None, None) => write!(f, "targets:  none"),
        }
    }
}

/// Helpers shared by the tests of this module's files.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A fresh path in the temp directory, unique per process and call, ending in `name`.
    pub fn temp_path(name: &str) -> PathBuf {
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("dptrain-data-{}-{k}-{name}", std::process::id()))
    }

    /// Writes `bytes` to a fresh temp file named `...-name` and returns its path.
    pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = temp_path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Path of a test dataset, named as in `../shared/datasets`, resolved like `shared()` in
    /// `tests/util/mod.rs`: CSVs from the vendored `tests/data/`; `mnist` (and `mnist/<file>`) from
    /// `$DPTRAIN_MNIST`, else `../shared/datasets/mnist`, else `data/mnist` (raw IDX: a `.gz` name
    /// falls back to the raw file), else a panic saying to run `scripts/get-mnist.sh`.
    pub fn shared(rel: &str) -> PathBuf {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let Some(file) = rel.strip_prefix("mnist").map(|f| f.trim_start_matches('/')) else {
            return root.join("tests/data").join(rel);
        };
        let dir = std::env::var_os("DPTRAIN_MNIST")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| Some(root.join("../shared/datasets/mnist")).filter(|d| d.is_dir()))
            .or_else(|| {
                Some(root.join("data/mnist")).filter(|d| d.join("t10k-labels-idx1-ubyte").is_file())
            })
            .unwrap_or_else(|| {
                panic!("MNIST not found (no $DPTRAIN_MNIST, ../shared/datasets/mnist or data/mnist): run scripts/get-mnist.sh")
            });
        if file.is_empty() {
            return dir;
        }
        let p = dir.join(file);
        match file.strip_suffix(".gz").map(|raw| dir.join(raw)) {
            Some(raw) if !p.exists() && raw.exists() => raw,
            _ => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    fn small(x: Vec<f32>, y: Vec<f32>, nf: usize) -> Dataset {
        Dataset {
            n_samples: y.len(),
            n_features: nf,
            x: Features::F32(x),
            y,
            pixels: false,
            image: None,
            source: "test".into(),
            labels: None,
        }
    }

    #[test]
    fn standardised_training_set_has_zero_mean_and_unit_std() {
        let ds = synth::blobs(3000, 5, 3, 9);
        let norm = Normalizer::fit(&ds, NormKind::Standard);
        assert_eq!(norm.kind, NormKind::Standard);
        let z = norm.apply_dataset(&ds);
        for j in 0..5 {
            let col: Vec<f64> = (0..ds.n_samples).map(|i| f64::from(z[i * 5 + j])).collect();
            let mean = col.iter().sum::<f64>() / col.len() as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64;
            assert!(mean.abs() < 1e-4, "feature {j} mean {mean}");
            assert!(
                (var.sqrt() - 1.0).abs() < 1e-4,
                "feature {j} std {}",
                var.sqrt()
            );
        }
    }

    #[test]
    fn constant_column_gets_scale_one_and_becomes_zero() {
        let ds = small(vec![0.1, 1.0, 0.1, 2.0, 0.1, 3.0], vec![0.0, 1.0, 0.0], 2);
        let norm = Normalizer::fit_standard(&ds);
        assert_eq!(norm.scale[0], 1.0);
        assert!(norm.scale[1].is_finite() && norm.scale[1] > 0.0);
        let z = norm.apply_dataset(&ds);
        assert!(z.iter().all(|v| v.is_finite()));
        assert!(z[0].abs() < 1e-6 && z[2].abs() < 1e-6 && z[4].abs() < 1e-6);
    }

    #[test]
    fn pixel_data_is_scaled_to_unit_range_whatever_kind_is_asked() {
        let mut ds = small(vec![0.0, 255.0, 51.0, 0.0], vec![0.0, 1.0], 2);
        assert!(ds.compact_to_u8());
        ds.pixels = true;
        let norm = Normalizer::fit(&ds, NormKind::Standard);
        assert_eq!(norm.kind, NormKind::Pixel);
        let z = norm.apply_dataset(&ds);
        assert_eq!((z[0], z[1], z[3]), (0.0, 1.0, 0.0));
        assert!((z[2] - 0.2).abs() < 1e-6, "{}", z[2]);
        assert_eq!(Normalizer::fit(&ds, NormKind::None).kind, NormKind::Pixel);
        let plain = small(vec![1.0, 2.0], vec![0.0], 2);
        assert_eq!(
            Normalizer::fit(&plain, NormKind::None),
            Normalizer::identity(2)
        );
    }

    #[test]
    fn normalizer_round_trips_through_json_with_lowercase_kind() {
        let norm = Normalizer::pixel(3);
        let s = serde_json::to_string(&norm).unwrap();
        assert!(s.contains("\"pixel\""), "{s}");
        let back: Normalizer = serde_json::from_str(&s).unwrap();
        assert_eq!(back, norm);
        assert_eq!("Standard".parse::<NormKind>(), Ok(NormKind::Standard));
        assert!("zscore".parse::<NormKind>().is_err());
    }

    #[test]
    fn split_has_requested_sizes_disjoint_parts_and_is_deterministic() {
        let mut ds = synth::random(1000, 3, 4, 1);
        // Give every sample a unique first feature so the parts can be identified.
        if let Features::F32(v) = &mut ds.x {
            for i in 0..1000 {
                v[i * 3] = i as f32;
            }
        }
        let (train, test) = train_test_split(&ds, 0.2, 42).unwrap();
        assert_eq!((train.n_samples, test.n_samples), (800, 200));
        let mut ids: Vec<u32> = (0..train.n_samples)
            .map(|i| train.value(i, 0) as u32)
            .chain((0..test.n_samples).map(|i| test.value(i, 0) as u32))
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..1000).collect::<Vec<u32>>());
        let (train2, test2) = train_test_split(&ds, 0.2, 42).unwrap();
        assert_eq!((train, test.clone()), (train2, test2));
        let (_, test3) = train_test_split(&ds, 0.2, 43).unwrap();
        assert_ne!(test, test3);
    }

    #[test]
    fn split_rejects_bad_fractions_and_empty_parts() {
        let ds = synth::random(10, 2, 2, 1);
        for f in [0.0, 1.0, -0.5, f64::NAN] {
            let e = train_test_split(&ds, f, 0).unwrap_err();
            assert!(e.to_string().contains("between 0 and 1"), "{e}");
        }
        let e = train_test_split(&ds, 0.01, 0).unwrap_err().to_string();
        assert!(
            e.contains("synthetic:random") && e.contains("0 test"),
            "{e}"
        );
        assert!(train_test_split(&ds, 0.97, 0).is_err());
    }

    #[test]
    fn class_labels_reject_fractional_and_negative_targets_naming_the_sample() {
        let ds = small(vec![0.0; 3], vec![0.0, 2.0, 1.5], 1);
        let e = ds.class_labels().unwrap_err().to_string();
        assert!(e.starts_with("test: sample 3: target 1.5"), "{e}");
        let ds = small(vec![0.0; 2], vec![-1.0, 0.0], 1);
        assert!(
            ds.class_counts()
                .unwrap_err()
                .to_string()
                .contains("sample 1")
        );
        let ds = small(vec![0.0; 4], vec![0.0, 2.0, 2.0, 0.0], 1);
        assert_eq!(ds.class_counts().unwrap(), vec![2, 0, 2]);
    }

    #[test]
    fn subset_keeps_storage_kind_and_order() {
        let mut ds = small(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![0.0, 1.0, 2.0], 2);
        assert!(ds.compact_to_u8());
        assert!(!ds.compact_to_u8(), "already u8");
        let s = ds.subset(&[2, 0]);
        assert_eq!(s.x, Features::U8(vec![5, 6, 1, 2]));
        assert_eq!(s.y, vec![2.0, 0.0]);
        let mut out = [0f32; 2];
        s.row(0, &mut out);
        assert_eq!(out, [5.0, 6.0]);
    }

    #[test]
    fn compact_to_u8_refuses_values_that_do_not_fit() {
        for bad in [256.0, -1.0, 0.5] {
            let mut ds = small(vec![1.0, bad], vec![0.0], 2);
            assert!(!ds.compact_to_u8());
            assert!(matches!(ds.x, Features::F32(_)));
        }
    }

    #[test]
    fn inspection_reports_shape_range_and_classes() {
        let ds = small(vec![-1.0, 4.0, 2.0, 0.5], vec![1.0, 0.0], 2);
        let r = inspect(&ds);
        assert_eq!((r.samples, r.features, r.classes), (2, 2, Some(2)));
        assert_eq!((r.min, r.max), (-1.0, 4.0));
        assert_eq!(r.storage, "f32");
        let text = r.to_string();
        assert!(
            text.contains("samples:  2") && text.contains("counts 1, 1"),
            "{text}"
        );
        let (reg, _, _) = synth::linear(50, 2, 0.1, 3);
        let r = inspect(&reg);
        assert_eq!(r.classes, None);
        assert!(r.to_string().contains("regression"));
    }

    #[test]
    fn load_picks_mnist_for_a_directory_and_csv_for_a_file() {
        let l = load(&shared("iris.csv"), &CsvOptions::default()).unwrap();
        assert_eq!((l.train.n_samples, l.train.n_features), (150, 4));
        assert!(l.test.is_none());
        let l = load(&shared("mnist"), &CsvOptions::default()).unwrap();
        let test = l.test.unwrap();
        assert_eq!((l.train.n_samples, test.n_samples), (60000, 10000));
        let e = load(&temp_path("absent.csv"), &CsvOptions::default()).unwrap_err();
        assert!(e.to_string().contains("absent.csv: cannot read: "), "{e}");
    }

    #[test]
    fn shared_csv_datasets_load_with_expected_shapes() {
        for (name, n, nf, k) in [
            ("iris.csv", 150, 4, 3),
            ("wine.csv", 178, 13, 3),
            ("digits.csv", 1797, 64, 10),
            ("breast_cancer.csv", 569, 30, 2),
        ] {
            let ds = load_csv(&shared(name), &CsvOptions::default()).unwrap();
            assert_eq!((ds.n_samples, ds.n_features), (n, nf), "{name}");
            assert_eq!(ds.class_counts().unwrap().len(), k, "{name}");
            assert!(!ds.pixels);
        }
    }
}
