//! The command line: arguments → calls. `Cli` and `Command` are here with the dispatch; each
//! command's flags, checks and handler are in the file named for it: `train.rs` (flags → the
//! trainer's configuration and `train/app.rs`), `apply.rs` (`eval`, `predict`, `model show`),
//! `data.rs` (`data synth`, `data inspect`, the CSV flags), `bench.rs`, `plot.rs`, `devices.rs`,
//! `completions.rs` (`completions`, `man`), and `config_file.rs` (`train --config`, the settings
//! file).

use clap::{Parser, Subcommand};

use crate::distributed::comm::Communicator;

pub mod apply;
pub mod bench;
pub mod completions;
pub mod config_file;
pub mod data;
pub mod devices;
pub mod plot;
pub mod train;

pub use apply::{EvalArgs, ModelCommand, PredictArgs};
pub use bench::{BenchArgs, BenchCommand, CommBenchArgs, MatmulBenchArgs, StepBenchArgs};
pub use config_file::{expand_config, settings_toml};
pub use data::{CsvArgs, DataCommand, SynthArgs, SynthKind};
pub use plot::PlotArgs;
pub use train::TrainArgs;

#[derive(Parser, Debug)]
#[command(
    name = "dptrain",
    version,
    about = "Data-parallel training: WGSL gradients on every GPU, MPI allreduce between ranks"
)]
pub struct Cli {
    /// More diagnostics on stderr: -v dptrain's info, -vv its debug, -vvv every library's
    /// (wgpu, naga); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model.
    Train(Box<TrainArgs>),
    /// Evaluate a saved model (or a checkpoint) on a dataset.
    Eval(EvalArgs),
    /// Write a saved model's predictions for a dataset to CSV.
    Predict(PredictArgs),
    /// Look inside a saved model or checkpoint.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Draw the loss, accuracy and learning-rate curves of a --metrics-out file.
    Plot(PlotArgs),
    /// Make or inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// List the GPU adapters wgpu can see, with their limits and features.
    Devices,
    /// Benchmarks: `bench --workload NAME` times the training step, `bench comm` the allreduce.
    Bench(BenchArgs),
    /// Print a shell completion script: `dptrain completions bash > /etc/bash_completion.d/dptrain`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `dptrain man > dptrain.1`.
    Man,
}

/// Run the parsed command. Under mpirun, `train` and `bench` run on every rank; the other
/// commands are one process's, run by rank 0 alone (which prints once).
pub fn run(cli: &Cli, comm: &dyn Communicator) -> anyhow::Result<()> {
    let collective = matches!(cli.command, Command::Train(_) | Command::Bench(_));
    if !collective && !comm.is_root() {
        return Ok(());
    }
    match &cli.command {
        Command::Train(a) => train::run(a, comm),
        Command::Eval(a) => apply::run_eval(a),
        Command::Predict(a) => apply::run_predict(a),
        Command::Model(m) => apply::run_model(m),
        Command::Plot(a) => plot::run(a),
        Command::Data(d) => data::run(d),
        Command::Devices => devices::run(),
        Command::Bench(b) => bench::run(b, comm),
        Command::Completions { shell } => completions::run_completions(*shell),
        Command::Man => completions::run_man(),
    }
}
