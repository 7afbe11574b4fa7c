//! Project tasks that cargo alone cannot do: provisioning the eBPF toolchain and test tools,
//! running the agent as root, and the privileged integration tests.
mod kernel_vm;
mod provision;
mod shell;

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use dns_proxy_tools::{bench, chaos, race, soak};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The rows `cargo xtask bench --rows` measures.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BenchRows {
    All,
    Uncached,
    Cached,
    Logging,
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
    /// The conntrack race of the iptables design, side by side with the agent (needs root).
    /// Builds a topology of its own per mode, in network namespaces it removes afterwards.
    Race {
        /// Lookups per mode, each from a fresh UDP socket, as a resolver makes them.
        #[arg(long, default_value_t = 3000)]
        lookups: u32,
        /// The workload namespace's ephemeral port range, e.g. 40000-40099: narrower makes
        /// the race frequent. Default: the kernel's.
        #[arg(long, value_name = "LOW-HIGH", value_parser = parse_port_range)]
        port_range: Option<(u16, u16)>,
        /// Each lookup's timeout (no retries).
        #[arg(long, value_name = "MS", default_value_t = 500)]
        timeout_ms: u64,
        /// Which modes to run, in order.
        #[arg(long, value_delimiter = ',', default_value = "iptables,iptables+notrack,agent", value_parser = parse_mode)]
        modes: Vec<race::Mode>,
    },
    /// dns-proxy side by side with the direct path and with iptables REDIRECT to dnsdist:
    /// throughput, latency, CPU, memory, and the kernel side's syscall cost (needs root).
    /// Release builds; topologies of its own, removed afterwards. See docs/performance.md.
    Bench {
        /// Rounds; every configuration runs once per round, interleaved, and medians are
        /// reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Length of each dnsperf run.
        #[arg(long, value_name = "SECONDS", default_value_t = 4)]
        seconds: u64,
        /// Measure this agent binary instead of this tree's release build (another commit's,
        /// for a before/after comparison in one run of the same harness).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// Which rows: all, uncached (the relay), cached (through caches), or logging (the
        /// closed loops of the plain agent and of the agent logging: issue 17's budget).
        #[arg(long, value_enum, default_value_t = BenchRows::All)]
        rows: BenchRows,
    },
    /// The agent under mixed clients (UDP, TCP, large answers, a failing upstream) for a
    /// while, in a topology of its own (needs root): every lookup's outcome, and the agent's
    /// RSS and open descriptors at start and end. Fails on a lost lookup or growth.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Pause between one client thread's lookups.
        #[arg(long, value_name = "MS", default_value_t = 2)]
        interval_ms: u64,
        /// Chaos: clients in two pods and the node (node mode) and long-lived sockets, while
        /// the agent is restarted by takeover and by SIGKILL at random intervals; every lookup
        /// retried once. Fails on a lookup lost after its retry, a retry not at a SIGKILL, or
        /// growth across instances.
        #[arg(long)]
        chaos: bool,
    },
    /// Run the cargo fuzz targets (fuzz/), each for a while; a crash stops it, and the input
    /// that caused it is saved under fuzz/artifacts/. Installs cargo-fuzz if need be.
    Fuzz {
        /// How long each target runs.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        seconds: u64,
        /// Which targets. Default: all of them.
        targets: Vec<String>,
    },
    /// Start the container tests' dockerd (in a network namespace of its own) and build their
    /// images, and leave it running: `cargo xtask test` uses a dockerd that answers, so
    /// container tests can then be run one by one. `--stop` stops it.
    Docker {
        #[arg(long)]
        stop: bool,
    },
    /// Set up, then run every test, the privileged integration tests included (needs root),
    /// and, without a filter, the client and redirect tests again in Linux 6.1 (`kernel-vm`)
    /// and a short run of every fuzz target.
    Test {
        /// Passed to `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run e2e tests in Debian 12's own kernel (Linux 6.1), booted in qemu on this machine's
    /// files (needs root): what an older verifier refuses shows here. `cargo xtask test` runs
    /// the default set.
    KernelVm {
        /// Test name filters (default: the client and redirect tests).
        filters: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup { tests } => provision::setup(tests),
        Task::Run { args } => run(&root, &args),
        Task::Test { args } => test(&root, &args),
        Task::Docker { stop } => docker(&root, stop),
        Task::KernelVm { filters } => {
            if !shell::is_root() {
                bail!("the tests in Linux 6.1 need root, as the other integration tests do");
            }
            set_up_for_tests(&root)?;
            kernel_vm(&root, &filters)
        }
        Task::Fuzz { seconds, targets } => fuzz(&root, seconds, &targets),
        Task::Soak {
            minutes,
            interval_ms,
            chaos,
        } => run_soak(&root, minutes, interval_ms, chaos),
        Task::Bench {
            rounds,
            seconds,
            agent,
            rows,
        } => {
            let settings = bench::Settings {
                rounds,
                duration: std::time::Duration::from_secs(seconds),
                rows: match rows {
                    BenchRows::All => bench::Rows::All,
                    BenchRows::Uncached => bench::Rows::Uncached,
                    BenchRows::Cached => bench::Rows::Cached,
                    BenchRows::Logging => bench::Rows::Logging,
                },
                ..Default::default()
            };
            run_bench(&root, &settings, agent)
        }
        Task::Race {
            lookups,
            port_range,
            timeout_ms,
            modes,
        } => {
            let settings = race::Settings {
                lookups,
                port_range,
                timeout: std::time::Duration::from_millis(timeout_ms),
            };
            run_race(&root, &settings, &modes)
        }
    }
}

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text
        .split_once('-')
        .ok_or("write it as LOW-HIGH, e.g. 40000-40099")?;
    let low: u16 = low.parse().map_err(|_| format!("{low}: not a port"))?;
    let high: u16 = high.parse().map_err(|_| format!("{high}: not a port"))?;
    if low < 1024 || low >= high {
        return Err("need 1024 <= LOW < HIGH".to_owned());
    }
    Ok((low, high))
}

fn parse_mode(text: &str) -> Result<race::Mode, String> {
    race::Mode::parse(text)
        .ok_or_else(|| format!("{text}: one of iptables, iptables+notrack, agent"))
}

fn run_race(root: &std::path::Path, settings: &race::Settings, modes: &[race::Mode]) -> Result<()> {
    if !shell::is_root() {
        bail!("the race needs root (network namespaces, iptables in them, eBPF); run it as root");
    }
    provision::setup(true)?;
    let bin = build_agent_and_test_tools(root, "debug")?;
    let (classic_forwarder, lookup_load) = (bin.join("classic-forwarder"), bin.join("lookup-load"));
    let tools = race::Tools {
        classic_forwarder: &classic_forwarder,
        lookup_load: &lookup_load,
    };
    let range = settings
        .port_range
        .map_or("the kernel's default".to_owned(), |(l, h)| {
            format!("{l}-{h}")
        });
    eprintln!(
        "xtask: race: {} lookups per mode, each from a fresh UDP socket with a {} ms timeout; \
         ephemeral ports: {range}",
        settings.lookups,
        settings.timeout.as_millis()
    );
    let mut outcomes = Vec::new();
    for &mode in modes {
        eprintln!("xtask: race: running {}", mode.name());
        outcomes.push(race::run(mode, settings, &tools));
    }
    print!("{}", race::table(&outcomes));
    Ok(())
}

fn run_soak(root: &std::path::Path, minutes: u64, interval_ms: u64, chaos: bool) -> Result<()> {
    if !shell::is_root() {
        bail!("the soak needs root (network namespaces, a cgroup, eBPF)");
    }
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    provision::setup(true)?;
    let bin = build_agent_and_test_tools(root, "release")?;
    let (agent, soak_client, bad_upstream) = (
        bin.join("dns-proxy"),
        bin.join("soak-client"),
        bin.join("bad-upstream"),
    );
    let settings = soak::Settings {
        duration: std::time::Duration::from_secs(minutes * 60),
        interval: std::time::Duration::from_millis(interval_ms),
    };
    if chaos {
        let hostile_client = bin.join("hostile-client");
        let tools = chaos::Tools {
            agent: &agent,
            soak_client: &soak_client,
            bad_upstream: &bad_upstream,
            hostile_client: &hostile_client,
        };
        let (report, passed) = chaos::run(settings.duration, settings.interval, &tools);
        print!("{report}");
        if !passed {
            bail!("the chaos soak failed (see the verdict above)");
        }
        return Ok(());
    }
    let tools = soak::Tools {
        agent: &agent,
        soak_client: &soak_client,
        bad_upstream: &bad_upstream,
    };
    let (report, passed) = soak::run(&settings, &tools);
    print!("{report}");
    if !passed {
        bail!("the soak failed (see the verdict above)");
    }
    Ok(())
}

fn run_bench(
    root: &std::path::Path,
    settings: &bench::Settings,
    agent: Option<PathBuf>,
) -> Result<()> {
    if !shell::is_root() {
        bail!("the benchmark needs root (network namespaces, iptables in them, eBPF)");
    }
    provision::setup(true)?;
    provision::bench_tools()?;
    let bin = build_agent_and_test_tools(root, "release")?;
    let (agent, test_upstream, syscall_cost, bare_relay) = (
        agent.unwrap_or_else(|| bin.join("dns-proxy")),
        bin.join("test-upstream"),
        bin.join("syscall-cost"),
        bin.join("bare-relay"),
    );
    if !agent.is_file() {
        bail!("--agent {}: no such file", agent.display());
    }
    let tools = bench::Tools {
        agent: &agent,
        test_upstream: &test_upstream,
        syscall_cost: &syscall_cost,
        bare_relay: &bare_relay,
    };
    print!("{}", bench::run(settings, &tools));
    Ok(())
}

/// Builds the agent, the test servers and clients (tests/src/bin) and the tools' own clients
/// (tools/src/bin) with `profile`; returns their directory.
fn build_agent_and_test_tools(root: &std::path::Path, profile: &str) -> Result<PathBuf> {
    shell::run(cargo().current_dir(root).args([
        "build",
        "--profile",
        if profile == "debug" { "dev" } else { profile },
        "--package",
        "dns-proxy",
        "--package",
        "tests",
        "--package",
        "dns-proxy-tools",
        "--bins",
    ]))?;
    Ok(root.join("target").join(profile))
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub(crate) fn cargo() -> Command {
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
    set_up_for_tests(root)?;
    if args.is_empty() {
        fuzz_build(root)?;
    }
    let binary = root.join("target/debug/dns-proxy");
    let deploy_tools = root.join("target/deploy-check-tools");
    provision::deploy_check_tools(&deploy_tools)?;
    // The container tests' dockerd: started here when none answers, stopped (with its
    // containers and namespace) when the tests are done, pass or fail.
    let docker = start_docker(root)?;
    shell::run(
        cargo()
            .current_dir(root)
            .args(["test", "--workspace", "--exclude", "dns-proxy-ebpf"])
            .args(["--exclude", "dns-proxy-fuzz"])
            .args(args)
            .env("DNS_PROXY_BIN", &binary)
            .env("DNS_PROXY_DEPLOY_TOOLS", &deploy_tools)
            .env(tests::docker::DOCKER_HOST_ENV, docker.host()),
    )?;
    drop(docker);
    if args.is_empty() {
        kernel_vm(root, &[])?;
        eprintln!("xtask: a short run of every fuzz target (longer: cargo xtask fuzz)");
        fuzz(root, FUZZ_SMOKE_SECONDS, &[])?;
    }
    Ok(())
}

/// Installs what the tests need, and builds the agent binary they start, with the tests'
/// profile.
fn set_up_for_tests(root: &std::path::Path) -> Result<()> {
    provision::setup(true)?;
    shell::run(
        cargo()
            .current_dir(root)
            .args(["build", "--package", "dns-proxy", "--bins"]),
    )
}

/// The e2e tests `filters` in Linux 6.1; by default [`kernel_vm::DEFAULT_TESTS`] but
/// [`kernel_vm::SKIPPED_BY_DEFAULT`]. Expects [`set_up_for_tests`] done.
fn kernel_vm(root: &std::path::Path, filters: &[String]) -> Result<()> {
    if filters.is_empty() {
        let defaults: Vec<String> = kernel_vm::DEFAULT_TESTS
            .iter()
            .map(|filter| filter.to_string())
            .collect();
        kernel_vm::run(root, &defaults, kernel_vm::SKIPPED_BY_DEFAULT)
    } else {
        kernel_vm::run(root, filters, &[])
    }
}

/// The container tests' dockerd (started unless one answers) with their images built.
fn start_docker(root: &std::path::Path) -> Result<tests::docker::Daemon> {
    let docker_dir = root.join("target/docker");
    let docker = tests::docker::Daemon::ensure(&docker_dir).map_err(anyhow::Error::msg)?;
    let clients = [tests::musl_getaddrinfo(), tests::lookup_from_port()];
    docker
        .build_images(
            root,
            &docker_dir,
            &clients,
            &tests::docker::agent_image(root),
        )
        .map_err(anyhow::Error::msg)?;
    Ok(docker)
}

fn docker(root: &std::path::Path, stop: bool) -> Result<()> {
    if !shell::is_root() {
        bail!("the tests' dockerd needs root");
    }
    if stop {
        return tests::docker::Daemon::stop_running().map_err(anyhow::Error::msg);
    }
    provision::setup(true)?;
    let docker = start_docker(root)?;
    eprintln!(
        "xtask: the tests' dockerd is up: {}={}",
        tests::docker::DOCKER_HOST_ENV,
        docker.host()
    );
    docker.keep_running();
    Ok(())
}

/// `cargo fuzz` with the nightly toolchain (rustup run), whatever toolchain started xtask.
fn cargo_fuzz(root: &std::path::Path) -> Command {
    let mut command = Command::new("rustup");
    command
        .current_dir(root)
        .args(["run", "nightly", "cargo", "fuzz"])
        .env_remove("RUSTC")
        .env_remove("CARGO");
    command
}

/// Builds every fuzz target, so that one the code no longer compiles with fails the run
/// in minutes rather than after the integration tests.
fn fuzz_build(root: &std::path::Path) -> Result<()> {
    provision::fuzz_tools()?;
    shell::run(cargo_fuzz(root).args(["build", "--fuzz-dir", "fuzz"]))
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SMOKE_SECONDS: u64 = 20;
fn fuzz(root: &std::path::Path, seconds: u64, targets: &[String]) -> Result<()> {
    provision::setup(false)?; // dns-proxy's build script builds the eBPF object
    provision::fuzz_tools()?;
    let listed = shell::output(cargo_fuzz(root).args(["list", "--fuzz-dir", "fuzz"]))
        .context("cargo fuzz list")?;
    let all: Vec<&str> = listed.lines().map(str::trim).collect();
    for target in targets {
        if !all.contains(&target.as_str()) {
            bail!("{target}: no such fuzz target; there are {all:?}");
        }
    }
    let targets: Vec<&str> = if targets.is_empty() {
        all
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in targets {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        shell::run(
            cargo_fuzz(root)
                .args(["run", "--fuzz-dir", "fuzz", target, "--"])
                .arg(format!("-max_total_time={seconds}")),
        )?;
    }
    Ok(())
}
