//! Project tasks that cargo alone cannot do: provisioning the eBPF toolchain and test tools,
//! running the agent as root, and the privileged integration tests.
mod provision;
mod shell;

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building (and with --tests, testing) needs and is not there yet: the
    /// eBPF toolchain, bpf-linker, and the Debian packages of the test tools.
    Setup {
        #[arg(long)]
        tests: bool,
    },
    /// Build the agent (release) and run it for real on this host: `dns-proxy run ARGS`.
    /// Without ARGS it redirects every process on the host to 127.0.0.1:8053.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test, the privileged integration tests included (needs root).
    Test {
        /// Passed to `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup { tests } => provision::setup(tests),
        Task::Run { args } => run(&root, &args),
        Task::Test { args } => test(&root, &args),
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

fn run(root: &std::path::Path, args: &[String]) -> Result<()> {
    provision::setup(false)?;
    shell::run(
        cargo()
            .current_dir(root)
            .args(["build", "--release", "--package", "dns-proxy"]),
    )?;
    let binary = root.join("target/release/dns-proxy");
    let mut command = if shell::is_root() {
        Command::new(&binary)
    } else {
        eprintln!("xtask: the agent needs root; running it with sudo");
        let mut sudo = Command::new("sudo");
        sudo.args(["--preserve-env=RUST_LOG", "--"]).arg(&binary);
        sudo
    };
    command.arg("run").args(args);
    eprintln!("xtask: exec {command:?}");
    // exec: the agent gets SIGINT/SIGTERM itself and its exit code is ours.
    let err = command.exec();
    Err(err).with_context(|| format!("cannot start {}", binary.display()))
}

fn test(root: &std::path::Path, args: &[String]) -> Result<()> {
    if !shell::is_root() {
        bail!(
            "the integration tests need root (they load eBPF programs and make cgroups and \
             network namespaces); run `cargo xtask test` as root"
        );
    }
    provision::setup(true)?;
    // The integration tests start the real binary; build it first, with the tests' profile.
    shell::run(
        cargo()
            .current_dir(root)
            .args(["build", "--package", "dns-proxy", "--bins"]),
    )?;
    let binary = root.join("target/debug/dns-proxy");
    shell::run(
        cargo()
            .current_dir(root)
            .args(["test", "--workspace", "--exclude", "dns-proxy-ebpf"])
            .args(args)
            .env("DNS_PROXY_BIN", &binary),
    )
}
