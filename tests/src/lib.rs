//! Fixtures for dns-proxy's privileged integration tests: a topology of the tests' own
//! (network namespaces joined by a veth pair, a child cgroup, a real DNS server) and the real
//! agent binary attached to it. Every fixture is a guard that removes what it made on drop,
//! so a failing test still cleans up. Nothing here touches the host's own network namespace,
//! its root cgroup's programs, or any address outside the tests' namespaces.
pub mod answer;
pub mod bench;
pub mod chaos;
pub mod docker;
pub mod manifest;
pub mod node;
pub mod race;
pub mod registry_proxy;
pub mod soak;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// The client's address on the veth inside the client namespace.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The DNS server's address inside the server namespace (TEST-NET-1, never routed).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// What the test server answers for every name under [`ZONE`] (TEST-NET-2, never contacted).
pub const ANSWER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// IPv6 addresses of the client and the server (documentation prefix, never routed).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The AAAA record the test server answers for every name under [`ZONE`].
pub const ANSWER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// A name whose TXT answer (about 800 bytes) does not fit in 512.
pub const BIG_NAME: &str = "big.example.test";
/// An unbound server, for tests that need NSID and EDNS answered; zone [`UNBOUND_ZONE`].
pub const UNBOUND_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 4);
pub const UNBOUND_ZONE: &str = "unbound.test";
/// A second server in the server namespace, with answers of its own, for tests where clients
/// ask different servers at once.
pub const SECOND_SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
pub const SECOND_ANSWER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
pub const ZONE: &str = "example.test";
/// The agent's listener inside the client namespace.
pub const PROXY_LISTEN: &str = "127.0.0.1:8053";

/// Panics unless running as root: a privileged test must never skip quietly.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these integration tests need root (eBPF, cgroups, network namespaces): run `cargo xtask test` as root"
    );
}

/// A name unique to this test run, e.g. "dp3f2a1" (short: interface names are 15 bytes max).
pub fn unique_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "dp{:x}{}",
        std::process::id() & 0xffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion and panics with its output unless it succeeds.
pub fn must(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace of the tests' own, with a bpffs of its own for the server table of
/// the agents that run in it (so restarts in one test share it and no test touches the
/// host's /sys/fs/bpf); both are removed on drop.
pub struct Netns {
    pub name: String,
    state_dir: PathBuf,
}

impl Netns {
    pub fn new(name: String) -> Self {
        must(Command::new("ip").args(["netns", "add", &name]));
        let state_dir = PathBuf::from("/run/dns-proxy-tests").join(&name);
        fs::create_dir_all(&state_dir).expect("mkdir the test bpffs");
        let netns = Self { name, state_dir };
        must(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&netns.state_dir),
        );
        must(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]));
        netns
    }

    /// The `--state-dir` of an agent in this namespace: on the namespace's own bpffs.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.join("dns-proxy")
    }

    /// `nsenter` into this namespace (not `ip netns exec`, which remounts /sys and hides the
    /// cgroup2 mount), with `DNS_PROXY_STATE_DIR` set for an agent.
    pub fn nsenter(&self) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .env("DNS_PROXY_STATE_DIR", self.state_dir())
            .arg("--");
        command
    }

    /// Adds the IPv6 `address` (with its prefix length) to `interface`, usable at once
    /// (nodad: without duplicate address detection's delay).
    pub fn add_ipv6(&self, interface: &str, address: &str) {
        must(Command::new("ip").args([
            "-n", &self.name, "-6", "addr", "add", address, "dev", interface, "nodad",
        ]));
    }

    /// `ip netns exec NAME program args...`: the program sees /etc/netns/NAME/resolv.conf.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.state_dir)
            .status();
        let _ = fs::remove_dir(&self.state_dir);
    }
}

/// A child cgroup of the cgroup2 root; its processes are killed and it is removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        Self { path }
    }

    fn pids(&self) -> Vec<String> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|pids| pids.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Kills every process in the subtree, the agent's own child cgroup included.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        remove_cgroup_tree(&self.path);
    }
}

/// rmdir a cgroup and its (empty) descendants, deepest first.
pub(crate) fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        // EBUSY for a moment while killed processes are still being reaped.
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (never hard-coded: hybrid hosts mount
/// it in a subfolder).
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next() == Some("cgroup2"))
                .then(|| mount.split_whitespace().nth(4))?
        })
        .map(PathBuf::from)
        .expect("no cgroup2 filesystem mounted")
}

/// The topology of a host running workloads and the agent, and a DNS server elsewhere:
/// a "client" namespace (where the agent and the workloads live, like a host) joined by a veth
/// pair to a "server" namespace, and a cgroup for the workloads.
pub struct Topology {
    pub tag: String,
    // Field order is drop order: processes in the cgroup die before the namespaces go.
    pub cgroup: TestCgroup,
    _resolv_conf: NetnsResolvConf,
    pub client: Netns,
    pub server: Netns,
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` shows as `/etc/resolv.conf`;
/// removed on drop.
pub(crate) struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    pub(crate) fn new(netns: &Netns, nameservers: &[IpAddr]) -> Self {
        let guard = Self {
            dir: PathBuf::from("/etc/netns").join(&netns.name),
        };
        fs::create_dir_all(&guard.dir).expect("mkdir /etc/netns/NAME");
        guard.write(nameservers);
        guard
    }

    fn write(&self, nameservers: &[IpAddr]) {
        let mut text = String::new();
        for nameserver in nameservers {
            text.push_str(&format!("nameserver {nameserver}\n"));
        }
        text.push_str("options timeout:2 attempts:1\n");
        fs::write(self.dir.join("resolv.conf"), text).expect("write resolv.conf");
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Topology {
    #[expect(
        clippy::new_without_default,
        reason = "building one creates namespaces and cgroups; a Default would hide that"
    )]
    pub fn new() -> Self {
        require_root();
        let tag = unique_tag();
        let client = Netns::new(format!("{tag}-client"));
        let server = Netns::new(format!("{tag}-server"));
        let (client_if, server_if) = (format!("{tag}c"), format!("{tag}s"));
        must(Command::new("ip").args([
            "link",
            "add",
            &client_if,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            &server_if,
            "netns",
            &server.name,
        ]));
        for (netns, interface, ip) in [
            (&client, &client_if, CLIENT_IP),
            (&server, &server_if, SERVER_IP),
        ] {
            must(Command::new("ip").args([
                "-n",
                &netns.name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                interface,
            ]));
            must(Command::new("ip").args(["-n", &netns.name, "link", "set", interface, "up"]));
        }
        for (netns, interface, ip) in [
            (&client, &client_if, CLIENT_IP6),
            (&server, &server_if, SERVER_IP6),
        ] {
            netns.add_ipv6(interface, &format!("{ip}/64"));
        }
        // glibc, musl and Go in the client namespace read this resolv.conf (ip netns exec).
        let resolv_conf = NetnsResolvConf::new(&client, &[SERVER_IP.into()]);
        let cgroup = TestCgroup::new(&format!("{tag}-workload"));
        Self {
            tag,
            cgroup,
            _resolv_conf: resolv_conf,
            client,
            server,
        }
    }

    /// A command run as a workload: in the test cgroup (joined before exec, so everything it
    /// starts is in it) and in the client namespace.
    pub fn workload(&self, program: &str, args: &[&str]) -> Command {
        in_cgroup_and_netns(&self.cgroup.path, &self.client, program, args)
    }

    /// Adds another address to the server namespace's end of the veth.
    pub fn add_server_address(&self, ip: Ipv4Addr) {
        let address = format!("{ip}/24");
        let interface = format!("{}s", self.tag);
        let netns = &self.server.name;
        must(Command::new("ip").args(["-n", netns, "addr", "add", &address, "dev", &interface]));
    }

    /// Points the client namespace's resolv.conf at these nameservers.
    pub fn set_nameservers(&self, nameservers: &[IpAddr]) {
        self._resolv_conf.write(nameservers);
    }

    /// A command run in the client namespace but outside the test cgroup.
    pub fn outsider(&self, program: &str, args: &[&str]) -> Command {
        let mut command = self.client.command(program);
        command.args(args);
        command
    }
}

/// A command run in `cgroup` (joined before exec, so everything it starts is in it) and in
/// `netns`, where it sees /etc/netns/NAME/resolv.conf.
pub fn in_cgroup_and_netns(cgroup: &Path, netns: &Netns, program: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        // $0 is the cgroup; "$@" is the namespace, the program and its arguments.
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec ip netns exec "$@""#)
        .arg(cgroup)
        .arg(&netns.name)
        .arg(program)
        .args(args);
    command
}

/// A size field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("/proc/{pid}/status: {err}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A child process killed (and reaped) on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        Self { child }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.child.id());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_for("the process to exit", limit, || {
            self.child.try_wait().expect("try_wait")
        })
    }
}

impl Process {
    /// Its standard output (it was spawned with a pipe), to read while it runs.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child
            .stdout
            .take()
            .expect("spawned with a piped stdout")
    }

    /// Closes the process's standard input (it was spawned with a pipe), then waits at most
    /// `limit` for it to exit and returns what it printed.
    pub fn finish_with_stdout(&mut self, limit: Duration) -> String {
        use std::io::Read as _;
        drop(self.child.stdin.take());
        let status = self.wait_exit(limit);
        let mut stdout = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        assert!(status.success(), "exited with {status}; printed {stdout:?}");
        stdout
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dnsmasq in the server namespace, answering one address for every name under [`ZONE`].
pub struct DnsServer {
    _process: Process,
}

impl DnsServer {
    /// The usual server: [`SERVER_IP`] and [`SERVER_IP6`], answering [`ANSWER_IP`] and
    /// [`ANSWER_IP6`], and a large TXT record for [`BIG_NAME`].
    pub fn start(topology: &Topology) -> Self {
        Self::start_on(topology, SERVER_IP, ANSWER_IP)
    }

    /// A server on `server_ip` (added to the server namespace's veth if need be), answering
    /// `answer` for every name under [`ZONE`]. The usual server also listens on
    /// [`SERVER_IP6`] and answers AAAA queries with [`ANSWER_IP6`].
    pub fn start_on(topology: &Topology, server_ip: Ipv4Addr, answer: Ipv4Addr) -> Self {
        let primary = server_ip == SERVER_IP;
        if !primary {
            topology.add_server_address(server_ip);
        }
        Self::launch(
            &topology.server,
            &topology.client,
            server_ip,
            answer,
            primary,
        )
    }

    /// dnsmasq in `server`, ready once a query from `ask_from` (outside any test cgroup) is
    /// answered.
    pub fn launch(
        server: &Netns,
        ask_from: &Netns,
        server_ip: Ipv4Addr,
        answer: Ipv4Addr,
        primary: bool,
    ) -> Self {
        let mut command = server.command("dnsmasq");
        command
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={server_ip}"))
            .arg(format!("--address=/{ZONE}/{answer}"))
            .arg(format!("--txt-record={BIG_NAME},{}", big_txt_strings()))
            // Without it, other types (AAAA) get REFUSED, which resolvers treat as failure.
            .arg(format!("--local=/{ZONE}/"))
            .args(["--pid-file=", "--user=root", "--cache-size=0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if primary {
            command
                .arg(format!("--listen-address={SERVER_IP6}"))
                .arg(format!("--address=/{ZONE}/{ANSWER_IP6}"));
        }
        let dns_server = Self {
            _process: Process::spawn(&mut command),
        };
        wait_for("dnsmasq to answer", Duration::from_secs(10), || {
            let mut dig = ask_from.command("dig");
            dig.arg(format!("@{server_ip}"));
            let output = run_dig(dig, "ready.example.test", &[]).ok()?;
            output.contains(&answer.to_string()).then_some(())
        });
        dns_server
    }
}

/// Three 250-byte strings: a TXT answer of about 800 bytes, which needs TCP or a large EDNS
/// buffer.
fn big_txt_strings() -> String {
    ["a", "b", "c"].map(|c| c.repeat(250)).join(",")
}

/// unbound in the server namespace on [`UNBOUND_IP`], authoritative for [`UNBOUND_ZONE`]
/// (a.unbound.test is 198.51.100.20; other names NXDOMAIN with the zone's SOA in the authority
/// section), answering NSID queries.
pub struct UnboundServer {
    _process: Process,
    dir: PathBuf,
}

impl UnboundServer {
    pub fn start(topology: &Topology) -> Self {
        topology.add_server_address(UNBOUND_IP);
        let dir = std::env::temp_dir().join(format!("{}-unbound", topology.tag));
        fs::create_dir_all(&dir).expect("mkdir unbound dir");
        let config = format!(
            "server:
  interface: {UNBOUND_IP}
  port: 53
  do-daemonize: no
  username: \"\"
  chroot: \"\"
  directory: \"{dir}\"
  pidfile: \"\"
  use-syslog: no
  logfile: \"\"
  access-control: 0.0.0.0/0 allow
  do-not-query-localhost: yes
  module-config: \"iterator\"
  nsid: \"ascii_dns-proxy-test\"
  local-zone: \"{UNBOUND_ZONE}.\" static
  local-data: \"{UNBOUND_ZONE}. 300 IN SOA ns.{UNBOUND_ZONE}. hostmaster.{UNBOUND_ZONE}. 1 3600 600 86400 300\"
  local-data: \"{UNBOUND_ZONE}. 300 IN NS ns.{UNBOUND_ZONE}.\"
  local-data: \"ns.{UNBOUND_ZONE}. 300 IN A 198.51.100.21\"
  local-data: \"a.{UNBOUND_ZONE}. 300 IN A 198.51.100.20\"
  local-data: \"a.{UNBOUND_ZONE}. 300 IN TXT \\\"dns-proxy test record\\\"\"
",
            dir = dir.display()
        );
        let config_path = dir.join("unbound.conf");
        fs::write(&config_path, config).expect("write unbound.conf");
        let mut command = topology.server.command("unbound");
        command
            .arg("-d")
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = Self {
            _process: Process::spawn(&mut command),
            dir,
        };
        wait_for("unbound to answer", Duration::from_secs(10), || {
            let mut dig = topology.outsider("dig", &[]);
            dig.arg(format!("@{UNBOUND_IP}"));
            let output = run_dig(dig, &format!("a.{UNBOUND_ZONE}"), &[]).ok()?;
            output.contains("198.51.100.20").then_some(())
        });
        server
    }
}

impl Drop for UnboundServer {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `dig @SERVER NAME +short` through `command` (a workload or outsider `dig` command);
/// returns stdout, or stdout and stderr as the error when dig fails.
pub fn dig(command: Command, name: &str, extra: &[&str]) -> Result<String, String> {
    dig_at(command, &SERVER_IP.to_string(), name, extra)
}

/// `dig @SERVER NAME +time=1 +tries=1 EXTRA` through `command`.
pub fn dig_at(
    mut command: Command,
    server: &str,
    name: &str,
    extra: &[&str],
) -> Result<String, String> {
    command.arg(format!("@{server}"));
    run_dig(command, name, extra)
}

/// Runs `dig NAME +time=1 +tries=1 EXTRA` through `command`, which names the server.
fn run_dig(mut command: Command, name: &str, extra: &[&str]) -> Result<String, String> {
    command.arg(name).args(["+time=1", "+tries=1"]).args(extra);
    let output = command.output().map_err(|err| err.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

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
}

/// Where the agent process starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the test process's cgroup, outside the redirected one.
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

    /// The agent in `netns`, redirecting `redirected`, started inside `join` if given.
    pub fn launch(netns: &Netns, redirected: &Path, join: Option<&Path>, args: &[String]) -> Self {
        Self::spawn(Self::command(netns, redirected, join, args))
    }

    /// The command [`launch`](Self::launch) runs.
    fn command(netns: &Netns, redirected: &Path, join: Option<&Path>, args: &[String]) -> Command {
        let mut command = match join {
            None => Command::new("nsenter"),
            Some(cgroup) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec nsenter "$@""#)
                    .arg(cgroup);
                sh
            }
        };
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
    pub fn spawn(mut command: Command) -> Self {
        command.stderr(Stdio::piped());
        let mut process = Process::spawn(&mut command);
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = process.child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut agent = Self { process, log };
        let serving = |agent: &Self| agent.log().contains("serving redirected DNS");
        wait_for("the agent to serve", Duration::from_secs(20), || {
            if serving(&agent) {
                return Some(());
            }
            if let Some(status) = agent.process.child.try_wait().expect("try_wait") {
                // It may have served and exited at once (`exec` of a short command): give
                // the log reader a moment to catch up before calling it a failure.
                thread::sleep(Duration::from_millis(500));
                assert!(
                    serving(&agent),
                    "the agent exited ({status}) before serving:\n{}",
                    agent.log()
                );
                return Some(());
            }
            None
        });
        agent
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

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Waits at most `limit` for the agent to exit; returns its status and what it printed on
    /// stdout (`exec`'s command's output).
    pub fn wait_with_stdout(&mut self, limit: Duration) -> (ExitStatus, String) {
        use std::io::Read as _;
        let status = self.process.wait_exit(limit);
        let mut stdout = String::new();
        if let Some(mut pipe) = self.process.child.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        (status, stdout)
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

/// A standard query (RD set, one question, no EDNS) for the A record of `name`.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    message
}

/// One HTTP/1.1 GET of `path` from `addr` inside `netns` (from a thread that joins the
/// namespace, so the test process stays where it is). Returns the status and the body.
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_in(&netns.name, addr, path)
}

/// [`http_get`] in the network namespace `/run/netns/<netns>`, one the tests did not make
/// with [`Netns`] (the tests' Docker namespace).
#[expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on its own thread; it resolves no names"
)]
pub fn http_get_in(netns: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    use std::{
        io::{Read as _, Write as _},
        os::fd::AsRawFd as _,
    };
    let namespace = format!("/run/netns/{netns}");
    let path = path.to_owned();
    thread::spawn(move || {
        let ns = fs::File::open(&namespace).unwrap_or_else(|err| panic!("{namespace}: {err}"));
        // SAFETY: setns changes only this thread's network namespace; the thread ends here.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {namespace}: {}",
            std::io::Error::last_os_error()
        );
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, body.to_owned())
    })
    .join()
    .expect("the HTTP client thread")
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `dns_proxy_answers_total{protocol="udp",rcode="NOERROR"}`) in a Prometheus text page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
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

/// The index the agents' server table (pinned below `state_dir`) gives `server_ip:port` (for
/// any cgroup), read with bpftool: the kernel's own record, not the agent's view of it.
pub fn server_index(state_dir: &Path, server_ip: impl Into<IpAddr>, port: u16) -> u32 {
    server_index_for(state_dir, server_ip, port, None)
}

/// The index the agents' server table gives `server_ip:port` asked by the cgroup whose id is
/// `cgroup_id` (any cgroup if `None`).
pub fn server_index_for(
    state_dir: &Path,
    server_ip: impl Into<IpAddr>,
    port: u16,
    cgroup_id: Option<u64>,
) -> u32 {
    let server_ip: IpAddr = server_ip.into();
    let octets: Vec<u8> = match server_ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let (pinned, entries) = server_table(state_dir);
    let found = entries.iter().find_map(|(key, value)| {
        // Origin: the server (four address words and the port, network order; the family),
        // 4 bytes of padding, then the cgroup id (host order).
        let cgroup = u64::from_ne_bytes(value[24..32].try_into().expect("8 bytes"));
        let matches = value[..octets.len()] == octets[..]
            && value[16..18] == port.to_be_bytes()
            && cgroup_id.is_none_or(|id| id == cgroup);
        // The key is the index, with bit 16 set for the IPv6 block's.
        matches.then(|| u32::from_ne_bytes([key[0], key[1], key[2], key[3]]) & 0xffff)
    });
    found.unwrap_or_else(|| panic!("{server_ip}:{port} has no index in {}", pinned.display()))
}

/// How many origins (indexes) of the agents' server table name the cgroup `cgroup_id`.
pub fn origins_of_cgroup(state_dir: &Path, cgroup_id: u64) -> usize {
    let (_, entries) = server_table(state_dir);
    entries
        .iter()
        .filter(|(_, value)| {
            u64::from_ne_bytes(value[24..32].try_into().expect("8 bytes")) == cgroup_id
        })
        .count()
}

/// An entry of a BPF map as bpftool dumps it: key and value bytes.
type MapEntry = (Vec<u8>, Vec<u8>);

/// The entries of the agents' server table pinned below `state_dir`, read with bpftool, and
/// where it is pinned.
fn server_table(state_dir: &Path) -> (PathBuf, Vec<MapEntry>) {
    // One table per pair of blocks, each in a directory of its own: the agents here use one.
    let tables: Vec<PathBuf> = fs::read_dir(state_dir)
        .unwrap_or_else(|err| panic!("{}: {err}", state_dir.display()))
        .map(|entry| entry.expect("a directory entry").path().join("SERVERS"))
        .filter(|pinned| pinned.exists())
        .collect();
    let [pinned] = tables.as_slice() else {
        panic!(
            "not one table of servers in {}: {tables:?}",
            state_dir.display()
        );
    };
    let output = must(
        Command::new("bpftool")
            .arg("--json")
            .args(["map", "dump", "pinned"])
            .arg(pinned),
    );
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bpftool JSON");
    let bytes = |value: &serde_json::Value| -> Vec<u8> {
        value
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| {
                u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16)
                    .expect("hex")
            })
            .collect()
    };
    let entries = entries
        .as_array()
        .expect("bpftool dumps an array")
        .iter()
        .map(|entry| (bytes(&entry["key"]), bytes(&entry["value"])))
        .collect();
    (pinned.clone(), entries)
}

/// How many entries the map called `map_name` holds, among the maps of the programs attached
/// to `cgroup` (read with bpftool, so the agent's own view plays no part).
pub fn attached_map_entries(cgroup: &Path, map_name: &str) -> usize {
    let json = |args: &[&str]| -> serde_json::Value {
        let output = must(Command::new("bpftool").arg("--json").args(args));
        serde_json::from_slice(&output.stdout).expect("bpftool JSON")
    };
    let cgroup = cgroup.to_str().expect("UTF-8 path");
    let mut map_ids: Vec<u64> = Vec::new();
    for program in json(&["cgroup", "show", cgroup]).as_array().expect("array") {
        let id = program["id"].as_u64().expect("program id").to_string();
        let maps = json(&["prog", "show", "id", &id]);
        for map_id in maps["map_ids"].as_array().into_iter().flatten() {
            map_ids.push(map_id.as_u64().expect("map id"));
        }
    }
    map_ids.sort_unstable();
    map_ids.dedup();
    let matching: Vec<u64> = map_ids
        .into_iter()
        .filter(|id| json(&["map", "show", "id", &id.to_string()])["name"] == map_name)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one {map_name} map attached to {cgroup}: {matching:?}"
    );
    let entries = json(&["map", "dump", "id", &matching[0].to_string()]);
    entries.as_array().expect("array").len()
}

/// Where the compiled test clients go.
fn clients_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-clients");
    fs::create_dir_all(&dir).expect("mkdir target/test-clients");
    dir
}

fn clients_source(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(file)
}

/// A static binary of tests/clients/getaddrinfo.c linked with musl (musl-gcc): musl's own
/// resolver, as on Alpine. Usage: `NAME inet|inet6|any`.
pub fn musl_getaddrinfo() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| musl_static("getaddrinfo.c", "musl-getaddrinfo"))
        .clone()
}

/// tests/clients/`source` built static with musl-gcc, as `binary` in the clients' directory.
fn musl_static(source: &str, binary: &str) -> PathBuf {
    let output = clients_dir().join(binary);
    must(
        Command::new("musl-gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&output)
            .arg(clients_source(source)),
    );
    output
}

/// A static binary of tests/clients/lookup-from-port.c (musl-gcc): COUNT lookups from one
/// socket bound to a fixed source port. Usage: `SERVER PORT NAME COUNT`.
pub fn lookup_from_port() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| musl_static("lookup-from-port.c", "lookup-from-port"))
        .clone()
}

/// tests/clients/resolve.go built with Go's toolchain: run it with `GODEBUG=netdns=go` for
/// Go's own resolver. Usage: `NAME`.
pub fn go_resolver() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = clients_dir();
            let output = dir.join("go-resolve");
            must(
                Command::new("go")
                    .args(["build", "-o"])
                    .arg(&output)
                    .arg(clients_source("resolve.go"))
                    // Standard library only: nothing to download, and nothing may be.
                    .env("GOPROXY", "off")
                    .env("GOFLAGS", "-mod=mod")
                    .env("GOCACHE", dir.join("go-cache"))
                    .env("GOPATH", dir.join("go-path")),
            );
            output
        })
        .clone()
}
