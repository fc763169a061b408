//! Seeded synthetic datasets for examples, tests and benchmarks: the same (n, shape, seed) always gives the same data.
//!
//! Each generator draws from its own `Rng::derive` stream, so two generators given one seed are not correlated.

use super::{Dataset, Features};
use crate::rng::Rng;

const SEED_EXAMPLE_STREAM: u64 = 0x5EED_E8A3;
const BLOB_CENTRES_STREAM: u64 = 0xB10B_C3E7;
const BLOB_SAMPLES_STREAM: u64 = 0xB10B_5A3F;
const RANDOM_STREAM: u64 = 0x4A4D_D0A7;
const LINEAR_TRUTH_STREAM: u64 = 0x11AE_7247;
const LINEAR_SAMPLES_STREAM: u64 = 0x11AE_5A3F;

fn dataset(n: usize, features: usize, x: Vec<f32>, y: Vec<f32>, name: &str) -> Dataset {
    Dataset {
        n_samples: n,
        n_features: features,
        x: Features::F32(x),
        y,
        pixels: false,
        image: None,
        source: format!("synthetic:{name}"),
        labels: None,
    }
}

/// The seed document's example: 2 features ~ U(-1,1), labels 0/1 with
/// y = 1 if 1.5*x0 - 2*x1 + 0.25 + 0.1*N(0,1) > 0.
pub fn seed_example(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng::derive(seed, SEED_EXAMPLE_STREAM);
    let mut x = Vec::with_capacity(2 * n);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let x0 = rng.uniform_range(-1.0, 1.0);
        let x1 = rng.uniform_range(-1.0, 1.0);
        let z = 1.5 * x0 - 2.0 * x1 + 0.25 + 0.1 * rng.normal();
        x.push(x0 as f32);
        x.push(x1 as f32);
        y.push(if z > 0.0 { 1.0 } else { 0.0 });
    }
    dataset(n, 2, x, y, "seed_example")
}

/// K Gaussian blobs in `features` dims: centres ~ U(-5,5)^d (from the seed), unit std; labels 0..K-1
/// round-robin (so classes are balanced to within one sample). `classes == 0` is treated as 1.
pub fn blobs(n: usize, features: usize, classes: usize, seed: u64) -> Dataset {
    let k = classes.max(1);
    let mut crng = Rng::derive(seed, BLOB_CENTRES_STREAM);
    let centres: Vec<f64> = (0..k * features)
        .map(|_| crng.uniform_range(-5.0, 5.0))
        .collect();
    let mut rng = Rng::derive(seed, BLOB_SAMPLES_STREAM);
    let mut x = Vec::with_capacity(n * features);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % k;
        for j in 0..features {
            x.push((centres[c * features + j] + rng.normal()) as f32);
        }
        y.push(c as f32);
    }
    dataset(n, features, x, y, "blobs")
}

/// Random data of any shape for benchmarks: x ~ N(0,1), labels uniform in 0..classes
/// (classes == 0 → regression targets N(0,1)).
pub fn random(n: usize, features: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = Rng::derive(seed, RANDOM_STREAM);
    let x: Vec<f32> = (0..n * features).map(|_| rng.normal() as f32).collect();
    let y: Vec<f32> = (0..n)
        .map(|_| {
            if classes == 0 {
                rng.normal() as f32
            } else {
                rng.below(classes as u64) as f32
            }
        })
        .collect();
    dataset(n, features, x, y, "random")
}

/// Linear regression problem: y = w·x + b + noise*N(0,1), x ~ N(0,1), with w ~ N(0,1) per feature and
/// b ~ U(-1,1); returns the dataset and the true (w, b).
pub fn linear(n: usize, features: usize, noise: f64, seed: u64) -> (Dataset, Vec<f32>, f32) {
    let mut trng = Rng::derive(seed, LINEAR_TRUTH_STREAM);
    let w: Vec<f64> = (0..features).map(|_| trng.normal()).collect();
    let b = trng.uniform_range(-1.0, 1.0);
    let mut rng = Rng::derive(seed, LINEAR_SAMPLES_STREAM);
    let mut x = Vec::with_capacity(n * features);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let mut t = b;
        for wj in &w {
            let v = rng.normal();
            t += wj * v;
            x.push(v as f32);
        }
        y.push((t + noise * rng.normal()) as f32);
    }
    let ds = dataset(n, features, x, y, "linear");
    (ds, w.iter().map(|&v| v as f32).collect(), b as f32)
}

/// The kinds of synthetic data: `train --data synth:KIND[:N[:F[:K]]]` and `data synth --kind KIND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthKind {
    /// The seed document's example: 2 features, labels 0/1 from a noisy linear boundary.
    Seed,
    /// Gaussian blobs, one per class.
    Blobs,
    /// x ~ N(0,1), uniform random labels (for benchmarks).
    Random,
    /// y = w·x + b + noise (regression).
    Linear,
}

impl SynthKind {
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "seed" => Some(Self::Seed),
            "blobs" => Some(Self::Blobs),
            "random" => Some(Self::Random),
            "linear" => Some(Self::Linear),
            _ => None,
        }
    }

    /// The features and classes when none are given.
    pub fn defaults(self) -> (usize, usize) {
        match self {
            Self::Seed => (2, 2),
            Self::Blobs => (2, 3),
            Self::Random => (10, 2),
            Self::Linear => (5, 0),
        }
    }

    /// `n` rows of this kind. The seed example always has 2 features; `classes` applies to blobs
    /// and random, `noise` to linear. The callers check the sizes, each naming its own flags.
    pub fn generate(
        self,
        n: usize,
        features: usize,
        classes: usize,
        noise: f64,
        seed: u64,
    ) -> Dataset {
        match self {
            Self::Seed => seed_example(n, seed),
            Self::Blobs => blobs(n, features, classes, seed),
            Self::Random => random(n, features, classes, seed),
            Self::Linear => linear(n, features, noise, seed).0,
        }
    }
}

/// The dataset of a `--data synth:KIND[:N[:F[:K]]]` spec (1000 samples, the kind's features and
/// classes when not given; linear's noise 0.1), drawn from `seed`.
pub fn from_spec(spec: &str, seed: u64) -> anyhow::Result<Dataset> {
    use anyhow::{Context, bail};
    let rest = spec.strip_prefix("synth:").unwrap_or(spec);
    let mut parts = rest.split(':');
    let kind = parts.next().unwrap_or("");
    let nums: Vec<usize> = parts
        .map(|p| {
            p.parse::<usize>()
                .with_context(|| format!("--data {spec}: {p:?} is not a whole number"))
        })
        .collect::<anyhow::Result<_>>()?;
    let arg = |i: usize, default: usize| nums.get(i).copied().unwrap_or(default);
    let n = arg(0, 1000);
    if n == 0 {
        bail!("--data {spec}: the sample count must be at least 1");
    }
    if kind == "images" {
        // synth:images:N[:C:H:W[:K]]: random images for the convolutional models
        let (c, h, w, k) = (arg(1, 3), arg(2, 32), arg(3, 32), arg(4, 10));
        if c == 0 || h == 0 || w == 0 || k < 2 || nums.len() > 5 {
            bail!(
                "--data {spec}: synth:images:N:C:H:W:K takes channels, height and width of at least 1 and at least 2 classes"
            );
        }
        crate::limits::check_dataset(&format!("--data {spec}"), n as u64, (c * h * w) as u64)?;
        let mut ds = random(n, c * h * w, k, seed);
        ds.image = Some([c, h, w]);
        ds.source = "synthetic:images".into();
        return Ok(ds);
    }
    let Some(kind) = SynthKind::named(kind) else {
        bail!(
            "--data {spec}: unknown synthetic kind {kind:?} (seed, blobs, random, linear, images)"
        );
    };
    let (f0, k0) = kind.defaults();
    let features = if kind == SynthKind::Seed {
        2
    } else {
        arg(1, f0)
    };
    crate::limits::check_dataset(&format!("--data {spec}"), n as u64, features as u64)?;
    let classes = arg(2, k0);
    if classes > crate::limits::MAX_CLASSES {
        bail!(
            "--data {spec}: {} classes, more than the {} dptrain takes",
            classes,
            crate::limits::MAX_CLASSES
        );
    }
    if kind == SynthKind::Blobs && classes < 1 {
        bail!("--data {spec}: blobs need at least 1 class");
    }
    Ok(kind.generate(n, features, classes, 0.1, seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generator_is_deterministic_and_seed_dependent() {
        assert_eq!(seed_example(50, 1), seed_example(50, 1));
        assert_ne!(seed_example(50, 1), seed_example(50, 2));
        assert_eq!(blobs(50, 3, 4, 1), blobs(50, 3, 4, 1));
        assert_ne!(blobs(50, 3, 4, 1), blobs(50, 3, 4, 2));
        assert_eq!(random(50, 3, 4, 1), random(50, 3, 4, 1));
        assert_ne!(random(50, 3, 4, 1), random(50, 3, 4, 2));
        assert_eq!(linear(50, 3, 0.1, 1), linear(50, 3, 0.1, 1));
        assert_ne!(linear(50, 3, 0.1, 1), linear(50, 3, 0.1, 2));
    }

    #[test]
    fn generators_produce_the_requested_shapes() {
        for ds in [
            seed_example(37, 0),
            blobs(37, 5, 3, 0),
            random(37, 5, 3, 0),
            random(37, 5, 0, 0),
            linear(37, 5, 0.0, 0).0,
        ] {
            assert_eq!(ds.n_samples, 37);
            assert_eq!(ds.x.len(), 37 * ds.n_features);
            assert_eq!(ds.y.len(), 37);
            assert!(!ds.pixels && ds.source.starts_with("synthetic:"));
        }
        assert_eq!(seed_example(1, 0).n_features, 2);
        assert_eq!(blobs(1, 5, 3, 0).n_features, 5);
    }

    #[test]
    fn seed_example_is_roughly_balanced_and_follows_its_rule() {
        let ds = seed_example(10_000, 3);
        let counts = ds.class_counts().unwrap();
        assert_eq!(counts.len(), 2);
        let frac = counts[1] as f64 / 10_000.0;
        assert!((0.45..0.65).contains(&frac), "fraction of ones {frac}");
        let agree = (0..ds.n_samples)
            .filter(|&i| {
                let z = 1.5 * ds.value(i, 0) - 2.0 * ds.value(i, 1) + 0.25;
                (z > 0.0) == (ds.y[i] == 1.0)
            })
            .count();
        assert!(agree > 9_500, "noise-free rule agrees on {agree}");
        assert!((0..ds.x.len()).all(|k| (-1.0..1.0).contains(&ds.value(k / 2, k % 2))));
    }

    #[test]
    fn blobs_are_balanced_and_separated_by_class() {
        let ds = blobs(300, 4, 3, 5);
        assert_eq!(ds.class_counts().unwrap(), vec![100, 100, 100]);
        // Two samples of the same class are closer on average than the centre spread (U(-5,5)).
        let d = |a: usize, b: usize| -> f32 {
            (0..4)
                .map(|j| (ds.value(a, j) - ds.value(b, j)).powi(2))
                .sum::<f32>()
        };
        let same: f32 = (0..99).map(|i| d(3 * i, 3 * i + 3)).sum::<f32>() / 99.0;
        assert!(same < 16.0, "same-class squared distance {same}");
    }

    #[test]
    fn random_labels_cover_all_classes_and_regression_targets_are_continuous() {
        let ds = random(1000, 2, 5, 7);
        assert_eq!(ds.class_counts().unwrap().len(), 5);
        let reg = random(100, 2, 0, 7);
        assert!(reg.class_labels().is_err());
    }

    #[test]
    fn linear_targets_match_the_returned_weights() {
        let (ds, w, b) = linear(200, 3, 0.0, 11);
        assert_eq!(w.len(), 3);
        for i in 0..ds.n_samples {
            let t: f32 = b + (0..3).map(|j| w[j] * ds.value(i, j)).sum::<f32>();
            assert!((t - ds.y[i]).abs() < 1e-4, "sample {i}: {t} vs {}", ds.y[i]);
        }
    }
}
