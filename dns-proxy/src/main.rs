use std::process::ExitCode;

use clap::Parser as _;
use dns_proxy::config::{Cli, Command, RunConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Command::Run(args) = cli.command;
    let result = RunConfig::try_from(args)
        .map_err(|err| err.to_string())
        .and_then(|config| dns_proxy::run(config).map_err(|err| err.to_string()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // One line that says what failed and what to do; the error types carry the detail.
        Err(err) => {
            eprintln!("dns-proxy: error: {err}");
            ExitCode::FAILURE
        }
    }
}
