//! `dptrain data synth | inspect`, and the CSV flags ([`CsvArgs`]) that every command reading a
//! dataset shares. What a `--data` value means is `data::load_spec`; the generators are
//! `data/synth.rs`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};

pub use crate::data::synth::SynthKind;
use crate::data::{self, CsvOptions, HeaderMode, LabelColumn};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Write a seeded synthetic dataset as CSV (label first, no header).
    Synth(SynthArgs),
    /// Samples, features, classes, class counts and value ranges of a dataset.
    Inspect {
        /// A CSV file, an MNIST directory, or a synth: spec.
        path: String,
        #[command(flatten)]
        csv: CsvArgs,
    },
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// What to generate (the same kinds and defaults as `train --data synth:KIND`).
    #[arg(long, value_enum, default_value = "seed")]
    pub kind: SynthKind,
    /// Rows to write.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Features (default: blobs 2, random 10, linear 5; seed always has 2).
    #[arg(long)]
    pub features: Option<usize>,
    /// Classes for blobs and random (default: blobs 3, random 2; 0 with random: regression targets).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Noise standard deviation for --kind linear.
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    /// Seed of the generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The CSV file to write (label first, no header).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(next_help_heading = "Data")]
pub struct CsvArgs {
    /// CSV label column: 0-based index, header name, or `last`.
    #[arg(long, default_value = "0")]
    pub label_column: String,
    /// Whether the CSV's first row is a header (auto: when any of its cells is not a number).
    #[arg(long, value_enum, default_value = "auto")]
    pub header: HeaderArg,
    /// CSV delimiter: comma, tab or semicolon (default: detected).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<DelimiterArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderArg {
    Auto,
    Yes,
    No,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DelimiterArg {
    Comma,
    Tab,
    Semicolon,
}

impl CsvArgs {
    pub fn options(&self) -> CsvOptions {
        CsvOptions {
            label: self
                .label_column
                .parse::<LabelColumn>()
                .unwrap_or(LabelColumn::Index(0)),
            header: match self.header {
                HeaderArg::Auto => HeaderMode::Auto,
                HeaderArg::Yes => HeaderMode::Yes,
                HeaderArg::No => HeaderMode::No,
            },
            delimiter: self.delimiter.map(|d| match d {
                DelimiterArg::Comma => b',',
                DelimiterArg::Tab => b'\t',
                DelimiterArg::Semicolon => b';',
            }),
        }
    }
}

pub fn run(cmd: &DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Synth(s) => {
            let (f0, k0) = s.kind.defaults();
            let (features, classes) = (s.features.unwrap_or(f0), s.classes.unwrap_or(k0));
            if s.samples == 0 {
                bail!("--samples must be at least 1");
            }
            if s.kind != SynthKind::Seed && features == 0 {
                bail!("--features must be at least 1");
            }
            crate::limits::check_dataset("data synth", s.samples as u64, features as u64)?;
            if classes > crate::limits::MAX_CLASSES {
                bail!(
                    "--classes {} is more than the {} dptrain takes",
                    classes,
                    crate::limits::MAX_CLASSES
                );
            }
            if s.kind == SynthKind::Blobs && classes < 1 {
                bail!("--classes must be at least 1 for blobs");
            }
            if s.kind == SynthKind::Linear && !(s.noise.is_finite() && s.noise >= 0.0) {
                bail!("--noise must be ≥ 0");
            }
            let ds = s
                .kind
                .generate(s.samples, features, classes, s.noise, s.seed);
            data::write_csv(&ds, &s.out)?;
            eprintln!(
                "dptrain: wrote {} samples × {} features to {}",
                ds.n_samples,
                ds.n_features,
                s.out.display()
            );
            Ok(())
        }
        DataCommand::Inspect { path, csv } => {
            let loaded = data::load_spec(path, &csv.options(), 0)?;
            println!("train:\n{}", data::inspect(&loaded.train));
            if let Some(t) = &loaded.test {
                println!("test:\n{}", data::inspect(t));
            }
            Ok(())
        }
    }
}
