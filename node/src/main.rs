//! The `maos` binary: parse the command line, then [`cli::run`]. Exit codes: see [`cli`].

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The fence keeper a node starts beside its command agents: no runtime, no command line.
    if std::env::args().nth(1).as_deref() == Some(maos_node::server::FENCE_KEEPER_SUBCOMMAND) {
        maos_node::server::serve_fence_keeper();
        return ExitCode::SUCCESS;
    }
    let cli = cli::args::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(cli::exit_code(&error))
        }
    }
}
