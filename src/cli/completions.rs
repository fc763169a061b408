//! `dptrain completions SHELL` and `dptrain man`: generated from the same definitions as the
//! parser.

use super::Cli;

pub fn run_completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "dptrain", &mut std::io::stdout());
    Ok(())
}

pub fn run_man() -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}
