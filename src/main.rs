//! The `dptrain` binary: parse the command line, run, and turn any error into one line and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use dptrain::cli::{self, Cli, Command};

fn main() -> ExitCode {
    // Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" on headless machines
    // (clusters, CI) when it is unset; point it at the temp folder so stderr carries only our lines.
    // a closed pipe on stdout (`dptrain ... | head`) ends the process quietly, as it does other
    // command-line tools, instead of a panic in println!
    // SAFETY: first statements of main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: first statement of main, before any thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    // `train --config FILE` puts the file's flags before the command line's
    let args = match cli::expand_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    // usage errors in clap's own words (suggestions, valid values, usage) and exit status 2
    let cli = Cli::parse_from(args);
    init_tracing(cli.verbose);
    let timeout = match &cli.command {
        Command::Train(a) => a.collective_timeout,
        _ => 300.0,
    };
    // the value parser has checked the range
    let timeout = dptrain::limits::collective_timeout(timeout).unwrap_or(None);
    if matches!(cli.command, Command::Train(_))
        && let Err(e) = dptrain::distributed::stop::install()
    {
        eprintln!("error: cannot catch the stop signals: {e}");
        return ExitCode::FAILURE;
    }
    let comm = match dptrain::distributed::comm::from_env(timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    match cli::run(&cli, comm.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        // a stop asked for by a signal: every rank leaves normally, rank 0 says where to resume
        Err(e)
            if e.downcast_ref::<dptrain::distributed::stop::Stopped>()
                .is_some() =>
        {
            let stopped = e.downcast_ref::<dptrain::distributed::stop::Stopped>();
            if comm.is_root() {
                eprintln!("dptrain: {e}");
            }
            ExitCode::from(stopped.map_or(143, |s| s.status()))
        }
        Err(e) => {
            // an error all ranks agreed on is reported once, by rank 0, and every rank exits
            // non-zero; an error on one rank alone ends the whole job so nobody waits for it
            let agreed = e
                .downcast_ref::<dptrain::distributed::agree::Agreed>()
                .is_some();
            if comm.size() == 1 || (agreed && comm.is_root()) {
                eprintln!("error: {}", one_line(&e));
            } else if !agreed {
                eprintln!("error: rank {}: {}", comm.rank(), one_line(&e));
                comm.abort(1);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the line already holds
/// (typed errors often quote their source, e.g. "x.csv: cannot read: No such file").
fn one_line(e: &anyhow::Error) -> String {
    dptrain::distributed::agree::one_line(e)
}

/// dptrain's own diagnostics at -v (info) and -vv (debug); the libraries under it (wgpu, naga, ...)
/// speak only of errors until -vvv (or RUST_LOG, which overrides). Colour only on a terminal.
fn init_tracing(verbose: u8) {
    use std::io::IsTerminal;
    let default = match verbose {
        0 => "error,dptrain=warn,dptrain_kernels=warn",
        1 => "error,dptrain=info,dptrain_kernels=info",
        2 => "warn,dptrain=debug,dptrain_kernels=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .try_init();
}
