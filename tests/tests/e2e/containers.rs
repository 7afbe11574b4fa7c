//! Real containers: Docker as the workload runtime, with the agent on the host (node mode,
//! as on a Docker host) and as a container run exactly as deploy/kubernetes/dns-proxy.yaml
//! says. The dockerd is the tests' own, in a network namespace of its own with no route off
//! the machine (`cargo xtask test` starts it; tests::docker). Every container gets `--dns` to
//! a test server in that namespace, and the daemon's own default points there too.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Output,
    sync::{Mutex, MutexGuard},
};

use tests::{
    Process, TestCgroup, cgroup2_root, dig_at,
    docker::{self, CGROUP_PARENT, DOCKER_HOST_ENV, NETNS, WORKLOAD_IMAGE},
    http_get_in, manifest,
    node::NODE_LISTEN,
};

use super::*;

/// One container test at a time: they share the daemon's namespace, where an agent routes
/// the redirect block and binds its listeners.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The test DNS server, on the daemon namespace's loopback (containers reach it through
/// their bridge's gateway; `--network host` ones directly).
const DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 53, 10);

/// What a test made, to be removed when it ends (containers before networks).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    DockerContainer,
    ContainerdContainer,
    Network,
}

/// A container test's world: the daemon, a cgroup subtree of the daemon's for this test's
/// containers (the agent redirects only it), a bpffs of its own for the agent's pinned table,
/// and the DNS server. Containers and networks it made are removed on drop, pass or fail.
struct ContainerTest {
    host: String,
    tag: String,
    made: Mutex<Vec<(Made, String)>>,
    cgroup: TestCgroup,
    bpffs: PathBuf,
    _server: Process,
    _lock: MutexGuard<'static, ()>,
}

impl ContainerTest {
    fn new() -> Self {
        tests::require_root();
        let lock = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let host = std::env::var(DOCKER_HOST_ENV).unwrap_or_else(|_| {
            panic!(
                "the container tests need the tests' dockerd ({DOCKER_HOST_ENV}): run them with \
                 `cargo xtask test`, or start it with `cargo xtask docker` and set \
                 {DOCKER_HOST_ENV}=unix://{}",
                docker::SOCKET
            )
        });
        let tag = tests::unique_tag();
        let cgroup = TestCgroup::new(&format!("{CGROUP_PARENT}/{tag}"));
        let bpffs = PathBuf::from("/run/dns-proxy-tests").join(format!("docker-{tag}"));
        fs::create_dir_all(&bpffs).expect("mkdir the test bpffs");
        must(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
        docker::add_address(DNS);
        let server = Process::spawn(
            in_docker_netns("dnsmasq")
                .args(["--keep-in-foreground", "--no-resolv", "--no-hosts"])
                .args([
                    "--bind-interfaces",
                    "--pid-file=",
                    "--user=root",
                    "--cache-size=0",
                ])
                .arg(format!("--listen-address={DNS}"))
                .arg(format!("--address=/{}/{ANSWER_IP}", tests::ZONE))
                .arg(format!("--local=/{}/", tests::ZONE))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for("dnsmasq to answer", Duration::from_secs(10), || {
            dig_at(
                in_docker_netns("dig"),
                &DNS.to_string(),
                "ready.example.test",
                &[],
            )
            .ok()
            .filter(|output| output.contains(&ANSWER_IP.to_string()))
        });
        Self {
            host,
            tag,
            made: Mutex::new(Vec::new()),
            cgroup,
            bpffs,
            _server: server,
            _lock: lock,
        }
    }

    fn docker(&self) -> Command {
        docker::docker(&self.host)
    }

    /// `docker run` of a container in this test's cgroup, asking the test server; `options`
    /// come before the image, `command` after it.
    fn run_command(&self, options: &[&str], image: &str, command: &[&str]) -> Command {
        let name = format!("{}-{}", self.tag, self.made.lock().unwrap().len());
        self.made
            .lock()
            .unwrap()
            .push((Made::DockerContainer, name.clone()));
        let mut docker = self.docker();
        docker
            .args(["run", "--name", &name])
            .arg(format!("--cgroup-parent=/{CGROUP_PARENT}/{}", self.tag))
            .arg(format!("--dns={DNS}"))
            .args(options)
            .arg(image)
            .args(command);
        docker
    }

    /// Runs a workload container to its end and returns its output.
    fn run(&self, options: &[&str], command: &[&str]) -> Output {
        must(&mut self.run_command(options, WORKLOAD_IMAGE, command))
    }

    /// The name of the container (or network) made last.
    fn last_made(&self) -> String {
        let made = self.made.lock().unwrap();
        made.last().expect("something made").1.clone()
    }

    fn network(&self, name: &str) -> String {
        let network = format!("{}-{name}", self.tag);
        must(self.docker().args(["network", "create", &network]));
        self.made
            .lock()
            .unwrap()
            .push((Made::Network, network.clone()));
        network
    }

    /// The agent binary on the Docker host (in the daemon's namespace), in node mode,
    /// redirecting this test's containers.
    fn agent_on_host(&self) -> Agent {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{NETNS}"))
            .arg("--")
            .arg(agent_binary())
            .arg("run")
            .arg(format!("--cgroup={}", self.cgroup.path.display()))
            .arg(format!("--listen={NODE_LISTEN}:53"))
            .arg(format!("--redirect-block={NODE_LISTEN}/24"))
            .arg(format!("--metrics={METRICS}"))
            .env("DNS_PROXY_STATE_DIR", self.bpffs.join("dns-proxy"))
            .env("RUST_LOG", "info,dns_proxy=debug")
            .stdout(Stdio::null());
        Agent::spawn(command)
    }

    /// The agent image run as the DaemonSet runs it, on containerd (the runtime under
    /// Kubernetes' CRI; Debian 12's Docker 20.10 does not know CAP_BPF or CAP_PERFMON), every
    /// setting read from the manifest. Only the node's directories are stood in for: the
    /// cgroup2 hierarchy for the host's /sys/fs/cgroup (this host is hybrid) and a bpffs of the
    /// test's for /sys/fs/bpf; and `--cgroup` names this test's subtree of the mounted
    /// hierarchy, never the host's root. The agent's container sits inside that subtree, as the
    /// DaemonSet's pod sits inside the node's tree. `name` names its container and cgroup.
    /// Returns the agent and its container id.
    fn agent_container(&self, spec: &manifest::AgentContainer, name: &str) -> (Agent, String) {
        let cgroup_root = cgroup2_root();
        let options = spec
            .ctr_run_options(|host_path| match host_path {
                "/sys/fs/cgroup" => cgroup_root.display().to_string(),
                "/sys/fs/bpf" => self.bpffs.display().to_string(),
                other => panic!("the manifest mounts {other}: give the test a stand-in for it"),
            })
            .expect("the manifest's container settings");
        let whole_tree = "--cgroup=/host/cgroup";
        assert!(
            spec.args.iter().any(|arg| arg == whole_tree),
            "the manifest no longer passes {whole_tree}: {:?}",
            spec.args
        );
        let subtree = format!("{whole_tree}/{CGROUP_PARENT}/{}", self.tag);
        // Kubernetes' args replace the image's CMD and keep its ENTRYPOINT.
        let entrypoint = must(self.docker().args([
            "image",
            "inspect",
            "-f",
            "{{range .Config.Entrypoint}}{{.}} {{end}}",
            &spec.image,
        ]));
        let mut process: Vec<String> = stdout(&entrypoint)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        process.extend(spec.args.iter().map(|arg| {
            if arg == whole_tree {
                subtree.clone()
            } else {
                arg.clone()
            }
        }));
        let id = format!("{}-{name}", self.tag);
        self.made
            .lock()
            .unwrap()
            .push((Made::ContainerdContainer, id.clone()));
        let mut command = docker::ctr();
        command
            .args(["run", "--rm"])
            .arg(format!("--cgroup=/{CGROUP_PARENT}/{}/{name}", self.tag))
            .args(&options)
            .arg(docker::containerd_ref(&spec.image))
            .arg(&id)
            .args(&process)
            .stdout(Stdio::null());
        (Agent::spawn(command), id)
    }
}

impl Drop for ContainerTest {
    fn drop(&mut self) {
        let made = std::mem::take(&mut *self.made.lock().unwrap());
        for (_, name) in made
            .iter()
            .filter(|(kind, _)| *kind == Made::DockerContainer)
        {
            let _ = self.docker().args(["rm", "-f", name]).output();
        }
        for (_, id) in made
            .iter()
            .filter(|(kind, _)| *kind == Made::ContainerdContainer)
        {
            let _ = docker::ctr()
                .args(["task", "kill", "--signal=SIGKILL", id])
                .output();
            let _ = docker::ctr()
                .args(["task", "delete", "--force", id])
                .output();
            let _ = docker::ctr().args(["containers", "delete", id]).output();
        }
        for (_, name) in made.iter().filter(|(kind, _)| *kind == Made::Network) {
            let _ = self.docker().args(["network", "rm", name]).output();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.bpffs).status();
        let _ = fs::remove_dir(&self.bpffs);
        // runc made this test's cgroup in the v1 hierarchies too (TestCgroup removes the v2
        // one after this, once its processes are gone).
        docker::remove_cgroup_everywhere(&PathBuf::from(CGROUP_PARENT).join(&self.tag));
    }
}

fn in_docker_netns(program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{NETNS}"))
        .args(["--", program]);
    command
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a container's lookups resolved to: each must have an answer.
fn assert_resolved(output: &Output, expected: Ipv4Addr, what: &str) {
    let text = stdout(output);
    assert!(
        text.contains(&expected.to_string()),
        "{what}: no {expected} in:\n{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The workloads every agent form must serve; returns the names that must have gone through
/// the agent (the embedded DNS's forwarding is dockerd's own and may or may not).
fn containers_resolve(test: &ContainerTest) -> Vec<String> {
    let musl = "/bin/musl-getaddrinfo";
    let mut through_agent = Vec::new();

    // The default bridge: musl's resolver (a static client) and busybox's nslookup.
    let name = "bridge.example.test";
    assert_resolved(
        &test.run(&[], &[musl, name, "inet"]),
        ANSWER_IP,
        "default bridge, musl",
    );
    through_agent.push(name.to_owned());
    let name = "busybox.example.test";
    assert_resolved(
        &test.run(&[], &["nslookup", name]),
        ANSWER_IP,
        "default bridge, nslookup",
    );
    through_agent.push(name.to_owned());

    // A user-defined network (every compose app): resolv.conf names the embedded DNS at
    // 127.0.0.11, which answers other containers' names itself and forwards the rest to the
    // container's --dns.
    let network = test.network("app");
    let net = format!("--network={network}");
    must(&mut test.run_command(
        &[&net, "--network-alias=web", "--detach"],
        WORKLOAD_IMAGE,
        &["sleep", "600"],
    ));
    let service_ip = must(test.docker().args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &test.last_made(),
    ]));
    let service_ip: Ipv4Addr = stdout(&service_ip)
        .trim()
        .parse()
        .expect("the service's IP");
    let resolv = test.run(&[&net], &["cat", "/etc/resolv.conf"]);
    assert!(
        stdout(&resolv).contains("nameserver 127.0.0.11"),
        "{}",
        stdout(&resolv)
    );
    assert_resolved(
        &test.run(&[&net], &[musl, "web", "inet"]),
        service_ip,
        "service name",
    );
    assert_resolved(
        &test.run(&[&net], &[musl, "compose.example.test", "inet"]),
        ANSWER_IP,
        "user-defined network, through the embedded DNS",
    );

    // --network host: a container in the node's (the daemon's) namespace and the redirected
    // cgroup, asking the test server directly.
    let name = "hostnet.example.test";
    assert_resolved(
        &test.run(&["--network=host"], &[musl, name, "inet"]),
        ANSWER_IP,
        "--network host",
    );
    through_agent.push(name.to_owned());

    // Two containers at once from the same source port, 20 lookups each, every answer from
    // the server asked (recvfrom's address).
    let dns = DNS.to_string();
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let name = format!("sameport{i}.example.test");
            through_agent.push(name.clone());
            test.run_command(
                &[],
                WORKLOAD_IMAGE,
                &["/bin/lookup-from-port", &dns, "40000", &name, "20"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker run")
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let output = client.wait_with_output().expect("wait for docker run");
        let text = stdout(&output);
        assert!(
            output.status.success(),
            "client {i}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            text.lines()
                .filter(|line| *line == format!("answer {ANSWER_IP}"))
                .count(),
            20,
            "client {i}:\n{text}"
        );
    }
    through_agent
}

#[test]
fn docker_containers_resolve_through_the_agent_on_the_host() {
    let test = ContainerTest::new();
    let agent = test.agent_on_host();
    let through_agent = containers_resolve(&test);
    for name in &through_agent {
        let line = forwarded(&agent, name);
        assert!(line.contains(&format!("server={DNS}:53")), "{line}");
    }
    // The two same-port clients' lookups are all the agent's, each told apart by its address:
    // each client's 20 (a lookup the client sends again after 2 s is logged twice, so at
    // least 20; the wait fails the test on fewer).
    for client in ["sameport0", "sameport1"] {
        agent.query_lines_once_logged(&format!("{client}.example.test"), 20);
    }
}

#[test]
fn the_agent_runs_as_a_container_exactly_as_the_daemonset_specifies() {
    let test = ContainerTest::new();
    let spec = manifest::agent_container(&manifest::path()).expect("read the manifest");
    assert!(spec.host_network && !spec.privileged && !spec.allow_privilege_escalation);
    assert_eq!(spec.capabilities_drop, ["ALL"]);
    assert_eq!(
        spec.capabilities_add.len(),
        6,
        "{:?}",
        spec.capabilities_add
    );
    let (mut agent, id) = test.agent_container(&spec, "agent");

    // The host's cgroup tree is mounted read-only: the agent stays in its container's cgroup
    // (inside the redirected subtree, as a pod is inside the node's tree) and excludes it.
    let own = format!(
        "agent runs in cgroup /host/cgroup/{CGROUP_PARENT}/{}/agent (id",
        test.tag
    );
    assert!(agent.log().contains(&own), "{}", agent.log());

    // The probes answer where the manifest points them.
    for (path, host, port) in [&spec.liveness, &spec.readiness] {
        let addr = SocketAddr::new(host.parse().expect("probe host"), *port);
        let (status, body) = http_get_in(NETNS, addr, path);
        assert_eq!(status, 200, "{path}: {body}");
    }
    // Exactly the manifest's capabilities, and no way to gain more.
    let task = must(docker::ctr().args(["task", "list"]));
    let pid = stdout(&task)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(id.as_str())).then(|| fields.next())?
        })
        .unwrap_or_else(|| panic!("no task {id} in:\n{}", stdout(&task)))
        .to_owned();
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    // CAP_NET_BIND_SERVICE 10, NET_ADMIN 12, NET_RAW 13, DAC_OVERRIDE 1, PERFMON 38, BPF 39.
    let expected = (1u64 << 1) | (1 << 10) | (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39);
    assert_eq!(
        u64::from_str_radix(&field("CapBnd:"), 16).expect("CapBnd"),
        expected,
        "{status}"
    );
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");

    let page = |path: &str| http_get_in(NETNS, metrics_addr(), path).1;
    let before = value(
        &page("/metrics"),
        "dns_proxy_queries_forwarded_total{protocol=\"udp\"}",
    );
    let through_agent = containers_resolve(&test);
    let after = value(
        &page("/metrics"),
        "dns_proxy_queries_forwarded_total{protocol=\"udp\"}",
    );
    // Each name the agent must have served asked at least one query (the same-port clients
    // 20 each): the metrics show them.
    let at_least = through_agent.len() as u64 - 2 + 40;
    assert!(
        after - before >= at_least,
        "forwarded {} queries, expected at least {at_least}:\n{}",
        after - before,
        agent.log()
    );

    // A graceful stop, as the kubelet does it: SIGTERM, exit 0, nothing left attached but
    // sock_release and, in node mode, the egress guard.
    must(docker::ctr().args(["task", "kill", "--signal=SIGTERM", &id]));
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "the agent's container exited {status}:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("detaching all programs"),
        "{}",
        agent.log()
    );
    tests::assert_only_pinned_programs_left(&test.cgroup.path, true);
}

#[test]
fn the_agent_image_runs_and_holds_no_toolchain() {
    let test = ContainerTest::new();
    let spec = manifest::agent_container(&manifest::path()).expect("read the manifest");
    let help = test
        .run_command(&[], &spec.image, &["--help"])
        .output()
        .expect("docker run");
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );
    assert!(
        stdout(&help).contains("Usage: dns-proxy"),
        "{}",
        stdout(&help)
    );
    // The runtime stage is the binary on Debian's slim base: no compiler, cargo, linker or
    // LLVM came along from the build stage.
    let probe = test
        .run_command(
            &["--entrypoint=/bin/sh"],
            &spec.image,
            &[
                "-c",
                "for p in cargo rustc rustup gcc cc ld clang bpf-linker llvm-config; do \
                 command -v $p && exit 1; done; \
                 for d in /usr/lib/llvm-* /usr/lib/rustlib /opt/cargo /src; do \
                 [ -e $d ] && echo $d && exit 1; done; exit 0",
            ],
        )
        .output()
        .expect("docker run");
    assert!(
        probe.status.success(),
        "toolchain in the runtime image: {}",
        stdout(&probe)
    );
    // The image carries no resolv.conf of the machine that built it (its base is a
    // debootstrap, which copies the host's in): containerd, unlike Docker, provides none.
    let id = format!("{}-resolv", test.tag);
    test.made
        .lock()
        .unwrap()
        .push((Made::ContainerdContainer, id.clone()));
    let resolv = docker::ctr()
        .args(["run", "--rm"])
        .arg(docker::containerd_ref(&spec.image))
        .arg(&id)
        .args([
            "/bin/sh",
            "-c",
            "cat /etc/resolv.conf; test ! -s /etc/resolv.conf",
        ])
        .output()
        .expect("ctr run");
    assert!(
        resolv.status.success(),
        "the image has a resolv.conf: {}",
        stdout(&resolv)
    );
}

/// A surge update, as the DaemonSet's `maxSurge: 1` makes one: a second agent container with
/// the manifest's settings (a container cgroup of its own, the cgroup tree read-only) starts
/// beside the first and takes over, and the first is stopped as the kubelet stops it. A
/// long-lived connected socket of a node process, asking every 100 ms, never needs a retry,
/// and each of its lookups is handled by one agent, once; containers resolve through the new
/// agent.
#[test]
fn a_surge_update_of_the_agent_container_loses_no_lookup() {
    const LOOKUPS: usize = 80;
    let test = ContainerTest::new();
    let mut spec = manifest::agent_container(&manifest::path()).expect("read the manifest");
    // The manifest's settings, but each query logged: which agent handled it, and how often.
    for (name, value) in &mut spec.env {
        if name == "RUST_LOG" {
            *value = "info,dns_proxy=debug".to_owned();
        }
    }
    assert!(
        spec.args.iter().any(|arg| arg == "--takeover"),
        "the manifest's agent no longer takes over: {:?}",
        spec.args
    );
    let (mut old, old_id) = test.agent_container(&spec, "agent");

    let node = test.cgroup.path.join("node");
    fs::create_dir(&node).expect("mkdir the node processes' cgroup");
    let mut long_lived = Process::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && netns="$1" && shift && exec nsenter --net="$netns" -- "$@""#)
            .arg(&node)
            .arg(format!("/run/netns/{NETNS}"))
            .arg(env!("CARGO_BIN_EXE_hostile-client"))
            .args(["long-lived", &format!("{DNS}:53"), "surge-ll"])
            // Retried after 3 s: a loaded machine's delays are not taken for a loss.
            .args([&LOOKUPS.to_string(), "100", "3000"])
            .stdout(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(1500));

    let (new, _) = test.agent_container(&spec, "agent-next");
    assert!(new.log().contains("taking over from it"), "{}", new.log());
    let (path, host, port) = &spec.readiness;
    let probe = SocketAddr::new(host.parse().expect("probe host"), *port);
    // The probes reach the newest agent only (sk_lookup): 503 until it is ready.
    wait_for(
        "the new agent ready on the probes' port",
        Duration::from_secs(10),
        || {
            (0..16)
                .all(|_| http_get_in(NETNS, probe, path).0 == 200)
                .then_some(())
        },
    );
    must(docker::ctr().args(["task", "kill", "--signal=SIGTERM", &old_id]));
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{}", old.log());

    let name = "after-surge.example.test";
    assert_resolved(
        &test.run(&[], &["/bin/musl-getaddrinfo", name, "inet"]),
        ANSWER_IP,
        "a container after the surge",
    );
    forwarded(&new, name);

    let output = long_lived.finish_with_stdout(Duration::from_secs(60));
    assert_long_lived_all_first_try(&output, "surge-ll", LOOKUPS, || vec![old.log(), new.log()]);
}
