use std::process::ExitCode;

use clap::Parser as _;
use dns_proxy::config::{Cli, Command, RunConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Command::Run(args) = cli.command;
    let config = match RunConfig::try_from(args) {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err),
    };
    match runtime.block_on(dns_proxy::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

/// One line that says what failed and what to do; the error types carry the detail.
fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("dns-proxy: error: {err}");
    ExitCode::FAILURE
}
