//! The real dns-proxy binary under test ([`Agent`]), started in a test namespace and
//! redirecting a test cgroup, its log collected for assertions and killed on drop; and
//! [`Harness`], the usual set-up of a topology, its DNS server and an agent.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{DnsServer, Netns, Process, Topology, wait_for};

/// The agent's listener inside the client namespace.
pub const PROXY_LISTEN: &str = "127.0.0.1:8053";

/// The path of the dns-proxy binary under test: `DNS_PROXY_BIN` (set by `cargo xtask test`),
/// else `dns-proxy` in the target directory of the running executable: beside it (xtask), or
/// one level up (a test binary in `target/<profile>/deps`).
pub fn agent_binary() -> PathBuf {
    let path = std::env::var_os("DNS_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            let dir = exe.parent().expect("the executable's directory");
            let beside = dir.join("dns-proxy");
            if beside.is_file() {
                return beside;
            }
            dir.parent().expect("target dir").join("dns-proxy")
        });
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// The real dns-proxy binary running in the client namespace, redirecting the test cgroup.
/// Its log (stderr) is collected for assertions; it is killed on drop.
pub struct Agent {
    process: Process,
    log: Arc<Mutex<String>>,
    /// Set once the log reader has read the end of the agent's stderr: every line it wrote
    /// is in `log`.
    log_ended: Arc<AtomicBool>,
}

/// Where the agent process starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Outside the redirected cgroup, in its namespace's [`Netns::agent_home`].
    Outside,
    /// Inside the redirected cgroup, as on a hybrid host where the agent starts in the
    /// cgroup2 root it redirects: only its self-exclusion keeps its upstream queries direct.
    InsideRedirectedCgroup,
}

impl Agent {
    pub fn start(topology: &Topology, extra_args: &[&str]) -> Self {
        Self::start_at(topology, Placement::Outside, extra_args)
    }

    pub fn start_at(topology: &Topology, placement: Placement, extra_args: &[&str]) -> Self {
        let join = match placement {
            Placement::Outside => None,
            Placement::InsideRedirectedCgroup => Some(topology.cgroup.path.as_path()),
        };
        let mut args = vec![format!("--listen={PROXY_LISTEN}")];
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        Self::launch(&topology.client, &topology.cgroup.path, join, &args)
    }

    /// As [`start`](Self::start), with `env` set for the agent.
    pub fn start_with_env(topology: &Topology, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = vec![format!("--listen={PROXY_LISTEN}")];
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        let mut command = Self::command(&topology.client, &topology.cgroup.path, None, &args);
        command.envs(env.iter().copied());
        Self::spawn(command)
    }

    /// As [`start`](Self::start), but logging at info level: for a test of many queries, whose
    /// debug lines would only cost time and the test's memory.
    pub fn start_quiet(topology: &Topology, extra_args: &[&str]) -> Self {
        let mut args = vec![format!("--listen={PROXY_LISTEN}")];
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        let mut command = Self::command(&topology.client, &topology.cgroup.path, None, &args);
        command.env("RUST_LOG", "info");
        Self::spawn(command)
    }

    /// As [`start`](Self::start), with the soft limit on open files lowered to `soft` first
    /// (`prlimit`), as a service manager may leave it.
    pub fn start_with_soft_file_limit(topology: &Topology, soft: u64) -> Self {
        let mut prlimit = Command::new("prlimit");
        prlimit.arg(format!("--nofile={soft}:"));
        Self::start_through(topology, prlimit)
    }

    /// As [`start`](Self::start), in a time namespace of its own whose `CLOCK_MONOTONIC` is
    /// `offset_seconds` off the host's (`unshare --time`; the agent runs as its child, killed
    /// with it).
    pub fn start_in_time_namespace(topology: &Topology, offset_seconds: i64) -> Self {
        let mut unshare = Command::new("unshare");
        unshare
            .args(["--time", "--fork", "--kill-child"])
            .arg(format!("--monotonic={offset_seconds}"));
        Self::start_through(topology, unshare)
    }

    /// The command [`start`](Self::start) runs with `args` in place of its `--listen`, not
    /// yet started: for a test that expects the agent to fail.
    pub fn command_with(topology: &Topology, args: &[String]) -> Command {
        Self::command(&topology.client, &topology.cgroup.path, None, args)
    }

    /// As [`start`](Self::start), through `wrapper`, which runs the command after its `--`.
    fn start_through(topology: &Topology, wrapper: Command) -> Self {
        Self::spawn(Self::command_through(topology, wrapper))
    }

    /// The command [`start_through`](Self::start_through) runs, not yet started: for a test
    /// that expects the agent to fail.
    pub fn command_through(topology: &Topology, mut wrapper: Command) -> Command {
        let args = [format!("--listen={PROXY_LISTEN}")];
        let inner = Self::command(&topology.client, &topology.cgroup.path, None, &args);
        wrapper
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args())
            .envs(
                inner
                    .get_envs()
                    .filter_map(|(key, value)| Some((key, value?))),
            )
            .stdout(Stdio::null());
        wrapper
    }

    /// The agent in `netns`, redirecting `redirected`, started inside `join` if given.
    pub fn launch(netns: &Netns, redirected: &Path, join: Option<&Path>, args: &[String]) -> Self {
        Self::spawn(Self::command(netns, redirected, join, args))
    }

    /// As [`launch`](Self::launch), but logging at info level: for a test of many queries, whose
    /// debug lines would only cost time and the test's memory.
    pub fn launch_quiet(
        netns: &Netns,
        redirected: &Path,
        join: Option<&Path>,
        args: &[String],
    ) -> Self {
        let mut command = Self::command(netns, redirected, join, args);
        command.env("RUST_LOG", "info");
        Self::spawn(command)
    }

    /// The command [`launch`](Self::launch) runs.
    fn command(netns: &Netns, redirected: &Path, join: Option<&Path>, args: &[String]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec nsenter "$@""#)
            .arg(join.unwrap_or_else(|| netns.agent_home()));
        // nsenter, not `ip netns exec`: the latter remounts /sys, which hides the cgroup2
        // mount the agent needs. nsenter and sh exec, so the pid is the agent's.
        command
            .arg(format!("--net=/run/netns/{}", netns.name))
            .env("DNS_PROXY_STATE_DIR", netns.state_dir())
            .arg("--")
            .arg(agent_binary())
            .arg("run")
            .arg(format!("--cgroup={}", redirected.display()))
            .args(args)
            .env("RUST_LOG", "info,dns_proxy=debug")
            .stdout(Stdio::null());
        command
    }

    /// `dns-proxy exec ARGS -- COMMAND` in `netns`; the command's output goes to a pipe
    /// (stdout) and the agent's log is collected as for `run`.
    pub fn exec(netns: &Netns, args: &[&str], command: &[&str]) -> Self {
        let mut nsenter = netns.nsenter();
        nsenter
            .arg(agent_binary())
            .arg("exec")
            .args(args)
            .arg("--")
            .args(command)
            .env("RUST_LOG", "info,dns_proxy=debug")
            .stdout(Stdio::piped());
        Self::spawn(nsenter)
    }

    /// Starts `command` (an agent, directly or through exec-ing wrappers), collects its
    /// stderr as the log, and waits until it serves.
    pub fn spawn(command: Command) -> Self {
        let mut agent = Self::spawn_unready(command);
        agent.wait_until_serving();
        agent
    }

    /// As [`spawn`](Self::spawn), without waiting: for a test of what happens while it starts.
    pub fn spawn_unready(mut command: Command) -> Self {
        command.stderr(Stdio::piped());
        let mut process = Process::spawn(&mut command);
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = process.take_stderr();
        let log_ended = Arc::new(AtomicBool::new(false));
        let (sink, ended) = (Arc::clone(&log), Arc::clone(&log_ended));
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
            ended.store(true, Ordering::Release);
        });
        Self {
            process,
            log,
            log_ended,
        }
    }

    /// Waits until the agent serves (or exited after serving, as `exec` of a short command).
    pub fn wait_until_serving(&mut self) {
        // Logged once `/readyz` answers 200, after the listeners, the programs and the
        // dropping of capabilities.
        let serving = |agent: &Self| agent.log().contains("ready: redirected lookups are served");
        // About 8 s in the emulated guest of `cargo xtask kernel-vm`, and past 20 s at times
        // (two tests of ci75's guest run); half a second on the host.
        wait_for("the agent to serve", Duration::from_secs(45), || {
            if serving(self) {
                return Some(());
            }
            if let Some(status) = self.process.exit_status() {
                // It may have served and exited at once (`exec` of a short command): the
                // log reader catches up before it is called a failure.
                self.wait_for_the_end_of_the_log();
                assert!(
                    serving(self),
                    "the agent exited ({status}) before serving:\n{}",
                    self.log()
                );
                return Some(());
            }
            None
        });
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The agent's debug line for a query of `name` it answered, if there is one yet.
    pub fn query_line(&self, name: &str) -> Option<String> {
        self.query_lines(name).into_iter().next()
    }

    /// All of the agent's debug lines for answered queries of `name` (`query udp ...`,
    /// `query tcp ...`).
    pub fn query_lines(&self, name: &str) -> Vec<String> {
        let needle = format!(" name={name}. ");
        self.log()
            .lines()
            .filter(|line| {
                (line.contains("query udp client=") || line.contains("query tcp client="))
                    && line.contains(&needle)
            })
            .map(str::to_owned)
            .collect()
    }

    /// The agent's debug lines for queries of `name`, once there are at least `count` (at most
    /// 5 s). The agent writes a line just after its answer, so a client can have the answer
    /// before the line is written: on a loaded machine, a count read at once can fall short.
    pub fn query_lines_once_logged(&self, name: &str, count: usize) -> Vec<String> {
        wait_for(
            &format!("{count} query lines for {name}"),
            Duration::from_secs(5),
            || {
                let lines = self.query_lines(name);
                (lines.len() >= count).then_some(lines)
            },
        )
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Waits at most `limit` for the agent to exit, then for its log to be read to the end
    /// (the lines it wrote just before it exited: a summary, an error), and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let status = self.process.wait_exit(limit);
        self.wait_for_the_end_of_the_log();
        status
    }

    /// Waits at most `limit` for the agent to exit; returns its status and what it printed on
    /// stdout (`exec`'s command's output).
    pub fn wait_with_stdout(&mut self, limit: Duration) -> (ExitStatus, String) {
        let status = self.wait_exit(limit);
        (status, self.process.rest_of_stdout())
    }

    /// Waits for the log reader to read the end of the exited agent's stderr. At most 5 s:
    /// a process the agent started (`exec`'s command's children) may hold the pipe open
    /// longer, and what the agent itself wrote is read by then.
    fn wait_for_the_end_of_the_log(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.log_ended.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many queries the agent has logged as answered, of any name.
    pub fn answered_queries(&self) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains("query udp client=") || line.contains("query tcp client="))
            .filter(|line| line.contains(" rcode="))
            .count()
    }
}

/// The usual set-up: a topology, its DNS server, and the agent. Fields drop in order: the agent
/// first, the namespaces and the cgroup last.
pub struct Harness {
    pub agent: Agent,
    pub server: DnsServer,
    pub topology: Topology,
}

impl Harness {
    pub fn start(placement: Placement, agent_args: &[&str]) -> Self {
        let topology = Topology::new();
        let server = DnsServer::start(&topology);
        let agent = Agent::start_at(&topology, placement, agent_args);
        Self {
            agent,
            server,
            topology,
        }
    }
}
