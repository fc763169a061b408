//! `dptrain plot`: a metrics file drawn as SVG or PNG by `tools/plot`.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A metrics file written by `train --metrics-out`.
    pub metrics: PathBuf,
    /// The picture: .svg or .png.
    #[arg(long)]
    pub out: PathBuf,
}

/// `dptrain plot METRICS --out PICTURE`.
pub fn run(a: &PlotArgs) -> anyhow::Result<()> {
    crate::tools::plot::plot(&a.metrics, &a.out)?;
    println!("dptrain: wrote {}", a.out.display());
    Ok(())
}
