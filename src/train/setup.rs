//! Set-up: the data checked against the configuration, the model derived from it, the initial
//! parameters, and the one settings record from which ranks' agreement and resume checks are drawn.

use anyhow::{bail, ensure};

use super::config::{ShardMode, TrainConfig};
use super::plan::{StepPlan, shard_range};
use crate::backend::BackendInit;
pub use crate::data::fingerprint::DataFingerprint;
use crate::data::{Dataset, Normalizer};
use crate::model::{ModelKind, ModelSpec};

/// Data, normaliser and model spec, checked against each other.
pub struct Setup {
    pub spec: ModelSpec,
    pub norm: Normalizer,
    /// This rank's training samples (all of them in global mode, its shard in split mode).
    pub train: Dataset,
    pub test: Option<Dataset>,
    /// The validation set (`--val-fraction`), held out of the training data before sharding.
    pub val: Option<Dataset>,
    /// What the backend evaluates as its held-out split when there is a validation set: the
    /// validation rows, then the test rows (see [`Setup::val_rows`], [`Setup::test_rows`]).
    pub heldout: Option<Dataset>,
    /// Class names when the labels were text, class i first.
    pub labels: Option<Vec<String>>,
    /// Training samples over all ranks.
    pub total_train: usize,
    /// What the whole training set was, for checking that a resume trains on the same data.
    pub data: DataFingerprint,
}

impl Setup {
    /// The validation rows of the backend's held-out split.
    pub fn val_rows(&self) -> Option<std::ops::Range<usize>> {
        self.val.as_ref().map(|v| 0..v.n_samples)
    }

    /// The test rows of the backend's held-out split.
    pub fn test_rows(&self) -> Option<std::ops::Range<usize>> {
        let start = self.val.as_ref().map_or(0, |v| v.n_samples);
        self.test.as_ref().map(|t| start..start + t.n_samples)
    }

    /// What a backend needs to train this set-up with `cfg` on the rank that `plan` describes.
    pub fn backend_init<'a>(&'a self, cfg: &TrainConfig, plan: &StepPlan) -> BackendInit<'a> {
        BackendInit {
            spec: &self.spec,
            train: &self.train,
            test: self.heldout.as_ref().or(self.test.as_ref()),
            norm: &self.norm,
            max_rows: cfg.batch_size,
            rule: cfg.optim.rule(),
            seed: cfg.seed,
            sample_base: plan.sample_base(),
            precision: cfg.precision,
            // through a plain f32 sum only: a 16-bit wire would round the statistics (and
            // overflow the batch count), PowerSGD and error feedback would mix them, and a stale
            // exchange would hand back last step's; there each rank keeps its own (rank 0's are saved)
            average_buffers: plan.ranks() > 1
                && !cfg.sync_bn
                && cfg.exchange.sync == crate::distributed::exchange::SyncMode::Grads
                && !cfg.exchange.compressed()
                && cfg.exchange.staleness == 0,
            augment: cfg.augment,
        }
    }
}

/// Check the data against the configuration and derive the model (one process).
pub fn setup(cfg: &TrainConfig, train: Dataset, test: Option<Dataset>) -> anyhow::Result<Setup> {
    setup_rank(cfg, train, test, 0, 1)
}

/// As [`setup`], for rank `rank` of `ranks`: the normaliser and classes come from the whole
/// training set so that every rank agrees; in split mode the rank then keeps only its shard.
pub fn setup_rank(
    cfg: &TrainConfig,
    train: Dataset,
    test: Option<Dataset>,
    rank: usize,
    ranks: usize,
) -> anyhow::Result<Setup> {
    cfg.validate()?;
    ensure!(train.n_samples > 0, "{}: no training samples", train.source);
    if let Some(t) = &test {
        ensure!(
            t.n_features == train.n_features,
            "{}: {} features, but the training data has {}",
            t.source,
            t.n_features,
            train.n_features
        );
    }
    let classes = if cfg.model == ModelKind::Linreg {
        0
    } else {
        let counts = train.class_counts()?;
        let present = counts.iter().filter(|&&c| c > 0).count();
        if present < 2 {
            bail!(
                "{}: the training labels hold a single class; classification needs at least 2",
                train.source
            );
        }
        if let Some(t) = &test {
            let labels = t.class_labels()?;
            if let Some((i, l)) = labels
                .iter()
                .enumerate()
                .find(|(_, l)| **l as usize >= counts.len())
            {
                bail!(
                    "{}: sample {}: label {l} is out of range: the training labels run 0..{}",
                    t.source,
                    i + 1,
                    counts.len() - 1
                );
            }
        }
        counts.len()
    };
    let spec = ModelSpec::new(
        cfg.model,
        train.n_features,
        classes,
        cfg.hidden.clone(),
        cfg.activation,
    )?
    .with_dropout(cfg.dropout)?
    .with_arch(match &cfg.arch {
        Some(path) => Some(read_arch(path)?),
        None => None,
    })
    .with_image(train.image)
    .map_err(|e| anyhow::anyhow!("{}: {e}", train.source))?;
    let widths = match spec.net()? {
        Some(net) => {
            if cfg.sync_bn {
                ensure!(
                    net.nodes
                        .iter()
                        .any(|n| n.op == crate::model::net::Op::BatchNorm2d),
                    "--sync-bn: the --arch network has no batch_norm2d layers"
                );
            }
            if !cfg.augment.is_none() {
                ensure!(
                    !net.input.is_rows(),
                    "--augment transforms images, and {} holds rows of features",
                    train.source
                );
            }
            crate::limits::check_network(
                net.layout.total,
                net.activations(),
                cfg.batch_size,
                cfg.optim.rule().state_names().len(),
            )?;
            vec![net.widest(), spec.outputs]
        }
        None => spec.widths(),
    };
    crate::limits::check_model(
        &widths,
        cfg.batch_size,
        cfg.optim.rule().state_names().len(),
    )?;
    // the fingerprint is the whole training file's; the validation rows come out of it, seeded
    let data = DataFingerprint::of(&train);
    let labels = train.labels.clone();
    let (train, val) = if cfg.val_fraction > 0.0 {
        let (tr, mut va) =
            crate::data::train_test_split(&train, cfg.val_fraction, cfg.seed ^ VAL_SEED)?;
        va.source = format!("{} (validation split)", va.source);
        (tr, Some(va))
    } else {
        (train, None)
    };
    ensure!(
        cfg.batch_size <= train.n_samples,
        "--batch-size {} is larger than the {} training samples{}",
        cfg.batch_size,
        train.n_samples,
        if val.is_some() {
            " left after --val-fraction"
        } else {
            ""
        }
    );
    if cfg.shard == ShardMode::Split {
        ensure!(
            train.n_samples / ranks >= 1,
            "--shard split: {} training samples cannot give each of {ranks} ranks one",
            train.n_samples
        );
    }
    let norm = Normalizer::fit(&train, cfg.normalize);
    let total_train = train.n_samples;
    let heldout = val.as_ref().map(|v| match &test {
        Some(t) => concat(v, t),
        None => v.subset(&(0..v.n_samples).collect::<Vec<_>>()),
    });
    let train = match cfg.shard {
        ShardMode::Split if ranks > 1 => {
            let (lo, hi) = shard_range(total_train, rank, ranks);
            train.subset(&(lo..hi).collect::<Vec<_>>())
        }
        _ => train,
    };
    Ok(Setup {
        spec,
        norm,
        train,
        test,
        val,
        heldout,
        labels,
        total_train,
        data,
    })
}

/// Mixed into the seed for the validation split, so that it is not the test split's draw.
const VAL_SEED: u64 = 0x7661_6c69_6461_7465;

/// The rows of `a`, then those of `b` (same feature count); pixels stay pixels when both are.
fn concat(a: &Dataset, b: &Dataset) -> Dataset {
    use crate::data::Features;
    let x = match (&a.x, &b.x) {
        (Features::U8(u), Features::U8(v)) => Features::U8([u.as_slice(), v].concat()),
        (Features::F32(u), Features::F32(v)) => Features::F32([u.as_slice(), v].concat()),
        _ => {
            let mut out = Vec::with_capacity((a.n_samples + b.n_samples) * a.n_features);
            for ds in [a, b] {
                for i in 0..ds.n_samples {
                    for j in 0..ds.n_features {
                        out.push(ds.value(i, j));
                    }
                }
            }
            Features::F32(out)
        }
    };
    Dataset {
        n_samples: a.n_samples + b.n_samples,
        n_features: a.n_features,
        x,
        y: [a.y.as_slice(), &b.y].concat(),
        pixels: a.pixels && b.pixels,
        image: if a.image == b.image { a.image } else { None },
        source: format!("{} + {}", a.source, b.source),
        labels: a.labels.clone(),
    }
}

/// Initial parameters: from `--init` or seeded.
pub fn initial_params(cfg: &TrainConfig, spec: &ModelSpec) -> anyhow::Result<Vec<f32>> {
    match &cfg.init {
        Some(path) => {
            let saved = crate::store::modelfile::load(path)?;
            Ok(saved.flat_params(spec, path)?)
        }
        None => Ok(spec.init(cfg.seed)),
    }
}

/// The settings a checkpoint must share with the run that resumes it: everything that shapes the
/// mathematics except the run's length and where it runs.
pub fn resume_settings(cfg: &TrainConfig, setup: &Setup) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        // the bucket size moves no bits at 2 ranks and only the order of summation beyond
        for k in ["device", "gpu", "init", "epochs", "steps", "bucket_mb"] {
            o.remove(k);
        }
        o.insert("training_samples".into(), setup.total_train.into());
        o.insert("features".into(), setup.spec.inputs.into());
        // absent from the record when off, but a checkpoint of either mode holds state in flight
        // that only that mode applies: compared always (older checkpoints: off)
        o.insert("staleness".into(), cfg.exchange.staleness.into());
        o.insert("async_average".into(), cfg.exchange.async_average.into());
    }
    v
}

/// The settings every rank must share, with what the data turned out to be.
pub fn fingerprint(cfg: &TrainConfig, setup: &Setup) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        // each rank may pick its own adapter and backend; --init is rank 0's (broadcast)
        for k in ["device", "gpu", "init"] {
            o.remove(k);
        }
        o.insert("parameters".into(), setup.spec.layout().total.into());
        o.insert("widths".into(), serde_json::json!(setup.spec.widths()));
        o.insert("features".into(), setup.spec.inputs.into());
        o.insert("classes".into(), setup.spec.outputs.into());
        o.insert("training_samples".into(), setup.total_train.into());
        o.insert(
            "test_samples".into(),
            setup.test.as_ref().map_or(0, |t| t.n_samples).into(),
        );
    }
    v
}

/// The values that settings added since the first checkpoint format had before they existed: a
/// checkpoint that lacks one matches a run that keeps it at this value.
pub fn settings_defaults() -> serde_json::Value {
    serde_json::json!({
        "optimizer": "sgd",
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "clip_grad_norm": null,
        "accumulate": 1,
        "dropout": 0.0,
        "precision": "f32",
        "val_fraction": 0.0,
        "grad_wire": "f32",
        "compress": "none",
        "powersgd_rank": 4,
        "powersgd_warmup": 100,
        "staleness": 0,
        "async_average": false,
    })
}

/// A `--arch` definition file, its errors one line naming the file.
fn read_arch(path: &std::path::Path) -> anyhow::Result<crate::model::net::arch::Arch> {
    let p = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{p}: cannot read: {e}"))?;
    crate::model::net::arch::Arch::parse(&text).map_err(|e| anyhow::anyhow!("{p}: {e}"))
}
