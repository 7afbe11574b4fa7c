//! The kernel side's contract: the address a socket is sent to names its server, so no other
//! socket, namespace or restart can change where a lookup goes or what answer it is shown.
//! Each test plays the attacker or the awkward client the issue names.
use std::{net::Ipv4Addr, thread};

use tests::{CLIENT_IP, Netns, Process, dig_at, in_cgroup_and_netns, node::NodeTopology};

use super::*;

/// `setpriv`'s arguments that run what follows as `nobody`, with no capability.
const AS_NOBODY: [&str; 4] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// What another server answers, where a hijacked lookup would end up.
const EVIL: (Ipv4Addr, Ipv4Addr) = (SECOND_SERVER_IP, SECOND_ANSWER_IP);

fn stdout(command: &mut Command) -> String {
    String::from_utf8_lossy(&must(command).stdout)
        .trim()
        .to_owned()
}

#[test]
fn one_socket_asking_two_servers_back_to_back_hears_each_from_itself() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let _second = DnsServer::start_on(topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
    for round in 0..5 {
        let name = format!("both{round}.example.test");
        let output = stdout(&mut topology.workload(
            HOSTILE,
            &[
                "two-servers",
                &format!("{SERVER_IP}:53"),
                &format!("{SECOND_SERVER_IP}:53"),
                &name,
            ],
        ));
        let mut lines: Vec<&str> = output.lines().collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                format!("source={SERVER_IP}:53 answer={ANSWER_IP}"),
                format!("source={SECOND_SERVER_IP}:53 answer={SECOND_ANSWER_IP}"),
            ],
            "round {round}"
        );
        wait_for("both queries logged", Duration::from_secs(5), || {
            (agent.query_lines(&name).len() == 2).then_some(())
        });
    }
}

#[test]
fn musl_with_its_second_nameserver_down_resolves_every_name() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    // Nothing answers there: the address exists, no server listens.
    let down = Ipv4Addr::new(192, 0, 2, 99);
    topology.add_server_address(down);
    topology.set_nameservers(&[SERVER_IP.into(), down.into()]);
    let musl = tests::musl_getaddrinfo();
    let musl = musl.to_str().expect("UTF-8 path");
    for i in 0..20 {
        let name = format!("musl-down{i}.example.test");
        let output = stdout(&mut topology.workload(musl, &[&name, "inet"]));
        assert_eq!(output, ANSWER_IP.to_string(), "{name}");
    }
    // Its log line comes just after the answer.
    forwarded(agent, "musl-down19.example.test");
}

/// A victim's 150 lookups (`connect` or `sendto`) from local port `port`, run by `client`
/// (hostile-client as a workload); each must be answered by SERVER_IP with ANSWER_IP.
fn victim_lookups(mode: &str, port: &str, client: impl FnOnce(&[&str]) -> Command) -> String {
    let (server, answer) = (format!("{SERVER_IP}:53"), ANSWER_IP.to_string());
    let args = [
        "lookups",
        mode,
        &server,
        "victim.example.test",
        "150",
        "--expect",
        &answer,
        "--port",
        port,
    ];
    stdout(&mut client(&args))
}

/// A victim resolving from 127.0.0.1:`port` in the agent's namespace, while a process of the
/// redirected cgroup in a namespace of its own (what `unshare -rn` gives any user) binds the
/// same address and port there and floods queries to another server.
#[test]
fn a_process_of_another_namespace_cannot_hijack_a_host_lookup() {
    let _flood = super::one_flood_at_a_time();
    let Harness { topology, .. } = &Harness::start(Placement::Outside, &[]);
    let _evil = DnsServer::start_on(topology, EVIL.0, EVIL.1);
    let attacker_netns = Netns::new(format!("{}-evil", topology.tag));
    // Below the ephemeral range: the victim binds it again for each lookup, and a socket of
    // the agent's (in the same namespace) could take a port of that range meanwhile.
    let port = "20053";
    let mut attacker = Process::spawn(
        in_cgroup_and_netns(
            &topology.cgroup.path,
            &attacker_netns,
            HOSTILE,
            &[
                "flood",
                &format!("127.0.0.1:{port}"),
                &format!("{}:53", EVIL.0),
                "8",
            ],
        )
        .stdout(Stdio::piped()),
    );
    thread::sleep(Duration::from_millis(300));
    for mode in ["connect", "sendto"] {
        let summary = victim_lookups(mode, port, |args| topology.workload(HOSTILE, args));
        assert_eq!(summary, "right=150 wrong=0 failed=0", "{mode}");
    }
    let flooded = attacker.finish_with_stdout(Duration::from_secs(15));
    let attempts: u64 = flooded
        .trim()
        .strip_prefix("attempts=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{flooded}"));
    assert!(attempts > 1000, "the attacker flooded: {flooded}");
}

/// The same in node mode: a pod with CAP_NET_ADMIN binds its neighbour's address with
/// IP_TRANSPARENT, on the port its neighbour resolves from, and floods another server.
#[test]
fn a_pod_cannot_hijack_another_pods_lookups_with_its_address() {
    let _flood = super::one_flood_at_a_time();
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    node.add_server_address(EVIL.0);
    let _evil = DnsServer::launch(&node.server, &node.node, EVIL.0, EVIL.1, false);
    let args = [
        format!("--listen={}:53", tests::node::NODE_LISTEN),
        "--metrics=127.0.0.1:9253".to_owned(),
    ];
    let agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);
    let drops = || {
        let (_, page) = tests::http_get(&node.node, metrics_addr(), "/metrics");
        page.lines()
            .filter(|line| {
                line.starts_with("dns_proxy_dropped_total") || line.starts_with("dns_proxy_answers")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let victim_ip = tests::node::PODS[0].0;
    let port = "40053";
    let mut attacker = Process::spawn(
        node.pod(
            1,
            HOSTILE,
            &[
                "flood",
                &format!("{victim_ip}:{port}"),
                &format!("{}:53", EVIL.0),
                "8",
                "--transparent",
            ],
        )
        .stdout(Stdio::piped()),
    );
    thread::sleep(Duration::from_millis(300));
    for mode in ["connect", "sendto"] {
        let summary = victim_lookups(mode, port, |args| node.pod(0, HOSTILE, args));
        assert_eq!(summary, "right=150 wrong=0 failed=0", "{mode}: {}", drops());
    }
    let flooded = attacker.finish_with_stdout(Duration::from_secs(15));
    assert!(flooded.starts_with("attempts="), "{flooded}");
    // Attribution holds too: each of the victim's queries is the victim pod's, and none of
    // the attacker's flood is (the kernel names the cgroup; the address proves nothing).
    // The lines come just after the answers: wait for the last ones.
    // (`l<i>.victim.example.test`: the lookups of both modes.)
    let victims = wait_for("the victim's query lines", Duration::from_secs(5), || {
        let lines: Vec<String> = agent
            .log()
            .lines()
            .filter(|line| {
                line.contains("query udp client=") && line.contains(".victim.example.test. ")
            })
            .map(str::to_owned)
            .collect();
        (lines.len() >= 300).then_some(lines)
    });
    for line in &victims {
        assert!(
            attributed_to(line, &node.pod_cgroups[0]),
            "a victim query attributed elsewhere: {line}"
        );
    }
    let evil = format!("server={}:53", EVIL.0);
    let log = agent.log();
    let attacker_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("query udp client=") && line.contains(&evil))
        .collect();
    assert!(!attacker_lines.is_empty(), "the flood reached the agent");
    for line in attacker_lines {
        assert!(attributed_to(line, &node.pod_cgroups[1]), "{line}");
    }
}

/// One connected UDP socket that lives across a graceful restart and across SIGKILL and a
/// restart, retrying once on the same socket, as c-ares and nginx's resolver do.
#[test]
fn a_long_lived_connected_socket_keeps_resolving_across_restarts() {
    let _apart = super::one_flood_at_a_time();
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[]);
    let mut client = Process::spawn(
        topology
            .workload(
                HOSTILE,
                &[
                    "long-lived",
                    &format!("{SERVER_IP}:53"),
                    "ll",
                    "32",
                    "500",
                    // Two tries of 2.5 s: a restart on a loaded machine takes more than one
                    // second, and a lookup sent meanwhile is refused.
                    "2500",
                ],
            )
            .stdout(Stdio::piped()),
    );
    thread::sleep(Duration::from_millis(3000));
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let mut agent = Agent::start(&topology, &[]);
    thread::sleep(Duration::from_millis(4000));
    agent.process().signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let agent = Agent::start(&topology, &[]);
    let output = client.finish_with_stdout(Duration::from_secs(30));
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 32, "{output}");
    let failed: Vec<&&str> = lines.iter().filter(|l| !l.contains("answered")).collect();
    assert!(failed.is_empty(), "lookups lost:\n{output}");
    // The last agent served the old socket: its address still names the server. (32 lookups
    // half a second apart: the last comes 4 s or more after the last start on a busy machine.)
    let served_last = agent.query_lines_once_logged("ll-31.example.test", 1);
    assert_eq!(served_last.len(), 1, "{}", agent.log());
}

/// A UDP socket connected straight to its server while no agent runs (before the first starts,
/// or between a SIGKILL and the next start) keeps its server for as long as it lives: an agent
/// that starts meanwhile leaves it alone. A dual-stack socket too, whose every send to its
/// v4-mapped peer runs the kernel's `sendmsg4` hook: before, that hook sent it to the block,
/// whose answers its connection refused, and every lookup while an agent ran was lost.
#[test]
fn a_socket_connected_while_no_agent_runs_keeps_its_server() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let servers = [
        ("v4", format!("{SERVER_IP}:53")),
        ("ds", format!("[::ffff:{SERVER_IP}]:53")),
    ];
    let clients: Vec<Process> = servers
        .iter()
        .map(|(prefix, server)| {
            let args = ["long-lived", server, prefix, "16", "500", "1000"];
            Process::spawn(topology.workload(HOSTILE, &args).stdout(Stdio::piped()))
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    let mut agent = Agent::start(&topology, &[]);
    // A fresh socket is redirected meanwhile.
    assert_eq!(
        probe(&topology, "connect", "fresh.example.test"),
        expected_probe_line()
    );
    forwarded(&agent, "fresh.example.test");
    thread::sleep(Duration::from_millis(2000));
    agent.process().signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let agent = Agent::start(&topology, &[]);
    for ((prefix, _), mut client) in servers.iter().zip(clients) {
        let output = client.finish_with_stdout(Duration::from_secs(30));
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 16, "{prefix}: {output}");
        let failed: Vec<&&str> = lines
            .iter()
            .filter(|l| !l.contains("answered tries=1"))
            .collect();
        assert!(
            failed.is_empty(),
            "{prefix}: lookups lost or retried:\n{output}"
        );
        // Asked directly, as connected.
        assert_eq!(agent.query_line(&format!("{prefix}-15.example.test")), None);
    }
}

/// While no agent runs nothing guards the block: an unprivileged workload binds its server's
/// block address on the proxy's port and connects to a client's port. Its plain `send` runs
/// no hook, and while it stays connected it takes what that client sends to the block (a
/// connected socket comes before `sk_lookup`). Once an agent runs, the egress guard drops
/// what it sends, and the agent aborts it at start, each of several bound to the same
/// addresses too, IPv4 or dual-stack: the client hears only its server and every one of its
/// queries reaches it (the binary before the sweep: 109,425 forged answers taken by a victim
/// in a by-hand run of the same; with three twins, the first sweep aborted one; with three
/// dual-stack twins, the sweep before this test's second case aborted none, and each of the
/// client's 20 queries was taken).
#[test]
fn a_socket_bound_to_the_block_while_no_agent_ran_cannot_forge_answers_after() {
    for dual_stack in [false, true] {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let window = RestartWindow::open(&topology, SERVER_IP);
        let (mut from, mut to) = (window.from.clone(), window.to.clone());
        if dual_stack {
            let mapped = |address: &str| {
                let (ip, port) = address.rsplit_once(':').unwrap();
                format!("[::ffff:{ip}]:{port}")
            };
            (from, to) = (mapped(&from), mapped(&to));
        }
        // Twins on the same addresses: each must be aborted, not one of them.
        let forger = window.forger(&["prebound", &from, &to, window.go(), "3"]);
        let agent = Agent::start(&topology, &[]);
        window.forger_gets_nothing_through(forger);
        let aborted = format!("aborted a socket bound to {from}");
        assert_eq!(agent.log().matches(&aborted).count(), 3, "{}", agent.log());
    }
}

/// A datagram begun while no agent ran (`MSG_MORE`: its header queued on a socket bound to the
/// block, nothing sent) and finished once one runs: the rest goes out with no cgroup hook,
/// from the block address and to the address the socket chose while nothing guarded it. An
/// adversarial review got 20 of 20 of a victim's lookups answered so, past the start sweep
/// (which does not list the unconnected sockets, and whose abort leaves a queued datagram
/// queued on the connected ones).
#[test]
fn a_datagram_begun_while_no_agent_ran_cannot_forge_an_answer_after() {
    let topology = Topology::new();
    // A server that answers 300 ms late, so that a forged answer has the time to come first.
    let server_ip = Ipv4Addr::new(192, 0, 2, 91);
    let _upstream = super::start_test_upstream(&topology, server_ip, 300, ANSWER_IP);
    let window = RestartWindow::open(&topology, server_ip);
    let (from, to, go) = (&window.from, &window.to, window.go());
    // 40 rounds of the 20 IDs, 150 ms apart: each of the victim's lookups (300 ms) meets two.
    let forger = window.forger(&["corked", from, to, go, "40"]);
    let _agent = Agent::start(&topology, &["--metrics", super::METRICS]);
    window.forger_gets_nothing_through(forger);
    let page = super::scrape(&topology);
    let refused = super::value(&page, "dns_proxy_kernel_impersonation_refused_total");
    assert!(refused >= 800, "dropped at the egress guard: {refused}");
}

/// The window between two agents, as a forger uses it: a victim asked `server_ip` once through
/// an agent (so the server has an index), and the agent has stopped.
struct RestartWindow<'a> {
    topology: &'a Topology,
    server: String,
    /// The block address of the victim's server, on the proxy's port.
    from: String,
    /// The victim's address and port.
    to: String,
    /// A file the forger waits for (it may read /tmp), removed when the test ends.
    go: std::path::PathBuf,
}

impl<'a> RestartWindow<'a> {
    const VICTIM_PORT: &'static str = "20053";

    fn open(topology: &'a Topology, server_ip: Ipv4Addr) -> Self {
        let mut agent = Agent::start(topology, &[]);
        let mut window = Self {
            topology,
            server: format!("{server_ip}:53"),
            from: String::new(),
            to: format!("127.0.0.1:{}", Self::VICTIM_PORT),
            go: std::env::temp_dir().join(format!("{}-forge-go", topology.tag)),
        };
        assert_eq!(window.lookups("1"), "right=1 wrong=0 failed=0");
        let index = tests::server_index(&topology.client.state_dir(), server_ip, 53);
        let block_address = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 53, 0, 0)) + index);
        agent.process().signal(libc::SIGTERM);
        assert!(agent.wait_exit(Duration::from_secs(10)).success());
        let port = PROXY_LISTEN.rsplit(':').next().unwrap();
        window.from = format!("{block_address}:{port}");
        window
    }

    fn go(&self) -> &str {
        self.go.to_str().unwrap()
    }

    /// Lets `forger` go, while the victim makes 20 lookups from its port: every one is
    /// answered by its server, and nothing the forger sends gets out.
    fn forger_gets_nothing_through(
        &self,
        (mut forger, mut output): (Process, std::io::BufReader<std::process::ChildStdout>),
    ) {
        std::fs::write(&self.go, "").unwrap();
        let victim = self.lookups("20");
        forger.finish_with_stdout(Duration::from_secs(30));
        let mut forged = String::new();
        std::io::Read::read_to_string(&mut output, &mut forged).unwrap();
        assert_eq!(victim, "right=20 wrong=0 failed=0", "forger: {forged}");
        assert!(forged.contains("sent=0 "), "{forged}");
    }

    /// `hostile-client ARGS` as `nobody` in the cgroup, once it has said `ready` (what it was
    /// to do while no agent runs is done), and its standard output (the forger prints what it
    /// sent once it is done, or its standard input closes).
    fn forger(&self, args: &[&str]) -> (Process, std::io::BufReader<std::process::ChildStdout>) {
        let mut forger = Process::spawn(
            self.topology
                .workload(
                    "setpriv",
                    &[AS_NOBODY.as_slice(), &[HOSTILE], args].concat(),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let mut output = std::io::BufReader::new(forger.take_stdout());
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut output, &mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "{args:?} while no agent ran");
        (forger, output)
    }

    /// `count` lookups of the victim, one after another from its port, each on a socket
    /// connected to its server: `right=N wrong=N failed=N`.
    fn lookups(&self, count: &str) -> String {
        let expect = ANSWER_IP.to_string();
        let args = [
            "lookups",
            "connect",
            &self.server,
            "victim.example.test",
            count,
            "--expect",
            &expect,
            "--port",
            Self::VICTIM_PORT,
        ];
        stdout(&mut self.topology.workload(HOSTILE, &args))
    }
}

impl Drop for RestartWindow<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.go);
    }
}

/// Host mode: a container's namespace under the redirected cgroup keeps its own stub (as
/// Docker's 127.0.0.11), and is not sent to the agent's loopback, where it cannot reach.
#[test]
fn host_mode_leaves_other_namespaces_sockets_alone() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let container = Netns::new(format!("{}-ctr", topology.tag));
    let stub = Ipv4Addr::new(127, 0, 0, 11);
    let stub_answer = Ipv4Addr::new(198, 51, 100, 11);
    let _stub = DnsServer::launch(&container, &container, stub, stub_answer, false);
    for extra in [&[][..], &["+tcp"][..]] {
        let output = dig_at(
            in_cgroup_and_netns(&topology.cgroup.path, &container, "dig", &[]),
            &stub.to_string(),
            "ctr.example.test",
            extra,
        )
        .unwrap_or_else(|err| panic!("the container's stub: {err}"));
        assert!(output.contains(&stub_answer.to_string()), "{output}");
    }
    assert!(
        agent.query_line("ctr.example.test").is_none(),
        "{}",
        agent.log()
    );
}

/// Host mode: an IPv6 socket connected to a stub on `[::1]:53` keeps `::1` as its source, as
/// without the agent, and keeps resolving when the host's global address goes away (a
/// renumbering, an expired SLAAC or privacy address). Before, it took the address the route to
/// the block gave (RFC 6724: the host's ULA or global one); once that was gone, every lookup of
/// the socket was lost, and the agent's answers left the host towards it (helper-123).
#[test]
fn an_ipv6_socket_to_a_loopback_stub_keeps_its_loopback_source() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let mut stub = topology.client.command("dnsmasq");
    stub.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=::1",
        "--address=/stub.test/198.51.100.53",
        "--pid-file=",
        "--user=root",
        "--cache-size=0",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _stub = Process::spawn(&mut stub);
    wait_for("the stub on [::1]:53", Duration::from_secs(10), || {
        let output = topology
            .outsider("dig", &["@::1", "ready.stub.test", "+short", "+time=1"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .contains("198.51.100.53")
            .then_some(())
    });
    let script = r#"
import socket, struct, subprocess
def ask(s, name):
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for label in name.encode().split(b"."):
        q += bytes([len(label)]) + label
    s.send(q + b"\0" + struct.pack(">HH", 1, 1))
    try:
        a = s.recv(512)
        return socket.inet_ntoa(a[-4:])
    except OSError as e:
        return f"lost ({e})"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("::1", 53))
print(s.getsockname()[0])
print(ask(s, "before.stub.test"))
subprocess.run(["ip", "-6", "addr", "flush", "scope", "global"], check=True)
print(ask(s, "after.stub.test"))
"#;
    let seen = stdout(&mut topology.workload("python3", &["-c", script]));
    assert_eq!(seen, "::1\n198.51.100.53\n198.51.100.53", "{}", agent.log());
    for name in ["before.stub.test", "after.stub.test"] {
        agent.query_lines_once_logged(name, 1);
    }
}

/// Node mode: pods keep their own loopback stubs; a node process keeps the node's stub, and
/// asking 0.0.0.0 reaches the node's loopback; no pod reaches the node's loopback services
/// through the agent, by any address or protocol.
#[test]
fn loopback_servers_are_each_namespaces_own_in_node_mode() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let (pod_stub, pod_answer) = (
        Ipv4Addr::new(127, 0, 0, 11),
        Ipv4Addr::new(198, 51, 100, 11),
    );
    let (node_stub, node_answer) = (
        Ipv4Addr::new(127, 0, 0, 53),
        Ipv4Addr::new(198, 51, 100, 53),
    );
    let _pod_stub = DnsServer::launch(&node.pods[0], &node.pods[0], pod_stub, pod_answer, false);
    let _node_stub = DnsServer::launch(&node.node, &node.node, node_stub, node_answer, false);
    // What a pod asking 0.0.0.0 would reach on the node, were it forwarded there.
    let _node_any = DnsServer::launch(
        &node.node,
        &node.node,
        Ipv4Addr::LOCALHOST,
        node_answer,
        false,
    );
    let args = vec![
        format!("--listen={}:53", tests::node::NODE_LISTEN),
        "--metrics=127.0.0.1:9253".to_owned(),
    ];
    let agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);

    // The pod's own stub answers it, over UDP and TCP; the agent never sees it.
    for extra in [&[][..], &["+tcp"][..]] {
        let output = dig_at(
            node.pod(0, "dig", &[]),
            &pod_stub.to_string(),
            "podstub.example.test",
            extra,
        )
        .unwrap_or_else(|err| panic!("the pod's stub: {err}"));
        assert!(output.contains(&pod_answer.to_string()), "{output}");
    }
    assert!(agent.query_line("podstub.example.test").is_none());

    // A node process asks the node's stub through the agent.
    for extra in [&[][..], &["+tcp"][..]] {
        let output = dig_at(
            node.host("dig", &[]),
            &node_stub.to_string(),
            "nodestub.example.test",
            extra,
        )
        .unwrap_or_else(|err| panic!("the node's stub: {err}"));
        assert!(output.contains(&node_answer.to_string()), "{output}");
    }
    let line = forwarded(&agent, "nodestub.example.test");
    assert!(line.contains(&format!("server={node_stub}:53")), "{line}");

    // A node process asking 0.0.0.0 reaches the node's own loopback, as it would directly:
    // the kernel sends to 127.0.0.1 in its place, and the answer comes from there.
    for (n, extra) in [&[][..], &["+tcp"][..]].into_iter().enumerate() {
        let name = format!("nodeany{n}.example.test");
        let output = dig_at(node.host("dig", &[]), "0.0.0.0", &name, extra)
            .unwrap_or_else(|err| panic!("0.0.0.0 from the node: {err}"));
        assert!(output.contains(&node_answer.to_string()), "{output}");
        let line = forwarded(&agent, &name);
        assert!(line.contains("upstream=127.0.0.1:53"), "{line}");
    }

    // A pod asking 0.0.0.0 or the node stub's own address in the block gets nothing of the
    // node's, over UDP or TCP.
    let index = tests::server_index(&node.node.state_dir(), node_stub, 53);
    let block_address = Ipv4Addr::from(u32::from(Ipv4Addr::new(169, 254, 53, 0)) + index);
    for server in [Ipv4Addr::UNSPECIFIED, block_address] {
        for extra in [&[][..], &["+tcp"][..]] {
            let result = dig_at(
                node.pod(1, "dig", &[]),
                &server.to_string(),
                "reach.example.test",
                extra,
            );
            if let Ok(output) = &result {
                assert!(
                    !output.contains(&node_answer.to_string()),
                    "{server}: {output}"
                );
            }
        }
    }
    assert!(
        agent.query_line("reach.example.test").is_none(),
        "{}",
        agent.log()
    );
    let (status, page) = tests::http_get(&node.node, metrics_addr(), "/metrics");
    assert_eq!(status, 200);
    let refused = value(&page, "dns_proxy_kernel_foreign_refused_total");
    assert!(
        refused >= 2,
        "UDP and TCP to the block address were refused: {refused}\n{page}"
    );
}

/// Routes `10.0.0.0/8` to the client namespace's loopback, so sockets to servers there that
/// are left alone (a full table) still connect.
fn route_servers_left_alone(topology: &Topology) {
    must(Command::new("ip").args([
        "-n",
        &topology.client.name,
        "route",
        "add",
        "10.0.0.0/8",
        "dev",
        "lo",
    ]));
}

/// `hostile` (`hostile-client` run as some workload, without arguments) holding `count` UDP
/// sockets connected to `server` (`hold`, with `options`), once it says it holds them all;
/// they are closed when it is finished.
fn hold(mut hostile: Command, server: &str, count: u32, options: &[&str]) -> Process {
    let count = count.to_string();
    let mut args = vec!["hold", server, &count];
    args.extend_from_slice(options);
    let mut holder = Process::spawn(
        hostile
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    assert_eq!(
        holder.first_line_of_stdout(),
        format!("holding {count}"),
        "{args:?}"
    );
    holder
}

/// Seventy thousand open DNS sockets of one workload, to one server or to as many servers,
/// leave another workload's lookups alone; and, as the workload has taken only its share of
/// the kernel's notes of connected sockets, another's connected socket is still noted.
#[test]
fn seventy_thousand_sockets_of_one_workload_do_not_fail_anothers_lookups() {
    use std::os::unix::fs::MetadataExt as _;
    // No share per workload: this one fills the table, for the others to fail if they can.
    let Harness { topology, .. } = &Harness::start(
        Placement::Outside,
        &["--metrics=127.0.0.1:9253", "--max-servers-per-workload=0"],
    );
    let victim = || {
        stdout(&mut topology.workload(
            HOSTILE,
            &[
                "lookups",
                "connect",
                &format!("{SERVER_IP}:53"),
                "victim.example.test",
                "30",
                "--expect",
                &ANSWER_IP.to_string(),
            ],
        ))
    };
    assert_eq!(victim(), "right=30 wrong=0 failed=0");
    route_servers_left_alone(topology);
    // Four processes of 17,500 sockets each (this machine caps a process at 20,000
    // descriptors): to one server, then to 70,000 different ones.
    for distinct in [false, true] {
        let holders: Vec<Process> = (0..4)
            .map(|k| {
                let server = if distinct {
                    format!("10.{}.0.1:53", k + 1)
                } else {
                    format!("{SERVER_IP}:53")
                };
                // Each holder's sockets on an address of their own: one address has fewer
                // ephemeral ports than that.
                let source = format!("127.0.1.{}", k + 1);
                let mut args = vec!["--source", source.as_str()];
                if distinct {
                    args.push("--distinct");
                }
                hold(topology.workload(HOSTILE, &[]), &server, 17_500, &args)
            })
            .collect();
        assert_eq!(victim(), "right=30 wrong=0 failed=0", "distinct={distinct}");
        if !distinct {
            // 70,000 sockets connected to the block: the workload's share of the table of
            // connected sockets (4,096) is noted, and the rest are counted.
            let connected = attached_map_entries(&topology.cgroup.path, "CONNECTED");
            assert_eq!(connected, 4_096, "sockets noted");
            let page = scrape(topology);
            let not_noted = value(&page, "dns_proxy_kernel_connected_not_noted_total");
            // And the 30 sockets of the lookups just made, from the same cgroup.
            assert_eq!(
                not_noted,
                70_000 - 4_096 + 30,
                "the sockets not noted are counted"
            );
            // Another workload's connected socket is still noted (before the share, the map
            // was full and it was not): its index is kept for as long as it is connected,
            // even once its cgroup is gone.
            let other = child_cgroup(topology, "other");
            let other_id = std::fs::metadata(&other).expect("stat").ino();
            let mut noted = hold(
                in_cgroup_and_netns(&other, &topology.client, HOSTILE, &[]),
                &format!("{SERVER_IP}:53"),
                1,
                &[],
            );
            let state = topology.client.state_dir();
            assert_eq!(tests::connected_charge_of_cgroup(&state, other_id), 1);
            assert_eq!(
                attached_map_entries(&topology.cgroup.path, "CONNECTED"),
                4_097
            );
            noted.finish_with_stdout(Duration::from_secs(30));
            assert_eq!(tests::connected_charge_of_cgroup(&state, other_id), 0);
        }
        for mut holder in holders {
            holder.finish_with_stdout(Duration::from_secs(30));
        }
    }
    let servers = attached_map_entries(&topology.cgroup.path, "SERVERS");
    assert!(servers <= 65_534 + 1, "{servers} servers");
    let page = scrape(topology);
    let full = value(&page, "dns_proxy_kernel_table_full_total");
    assert!(full > 0, "a full table is counted: {full}");
    // Every socket is closed: none is still noted as connected, nor charged.
    let connected = attached_map_entries(&topology.cgroup.path, "CONNECTED");
    assert_eq!(connected, 0, "sockets noted after all closed");
    let state = topology.client.state_dir();
    assert_eq!(tests::pinned_entries(&state, "CONNECTED_CHARGE"), 0);
    let workload_id = std::fs::metadata(&topology.cgroup.path)
        .expect("stat")
        .ino();
    assert_eq!(tests::connected_charge_of_cgroup(&state, workload_id), 0);
}

/// A charge of a connected socket whose note is gone, as the `sock_release` of an agent older
/// than the charges leaves it while it runs beside a newer one (a takeover at the upgrade),
/// is given back by the walk of the cgroups, and the workload's count with it. Before, it
/// stayed for good (helper-167: 60 to 181 left to one cgroup by one upgrade under load).
#[test]
fn a_charge_whose_note_is_gone_is_given_back() {
    use std::os::unix::fs::MetadataExt as _;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let _agent = Agent::start_with_env(&topology, &[], &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")]);
    let state = topology.client.state_dir();
    let workload_id = std::fs::metadata(&topology.cgroup.path)
        .expect("stat")
        .ino();
    // A live socket's note and charge, which must stay.
    let mut holder = hold(
        topology.workload(HOSTILE, &[]),
        &format!("{SERVER_IP}:53"),
        1,
        &[],
    );
    assert_eq!(tests::connected_charge_of_cgroup(&state, workload_id), 1);
    // Two charges whose notes an older sock_release took out: cookies no socket has.
    let table = tests::table_dir(&state);
    let hex = |n: u64| n.to_ne_bytes().map(|byte| format!("{byte:02x}"));
    let update = |map: &str, key: u64, value: u64| {
        must(
            Command::new("bpftool")
                .args(["map", "update", "pinned"])
                .arg(table.join(map))
                .args(["key", "hex"])
                .args(hex(key))
                .args(["value", "hex"])
                .args(hex(value)),
        );
    };
    // The count first: the agent gives charges back every second here, and one pass between
    // the charges and a count written after them lowered the count before it was written, to
    // 0, which the test then set to 3 for good (the project CI at 242e4f4 and this machine's
    // at 29648b6, in the 6.1 guest, where each bpftool takes a second or more).
    update("CONNECTED_PER_CGROUP", workload_id, 3);
    for cookie in [u64::MAX - 1, u64::MAX - 2] {
        update("CONNECTED_CHARGE", cookie, workload_id);
    }
    // The agent removes the charges first and lowers the count after: wait for both.
    wait_for(
        "the orphaned charges given back, and the count lowered",
        Duration::from_secs(10),
        || {
            (tests::pinned_entries(&state, "CONNECTED_CHARGE") == 1
                && tests::connected_charge_of_cgroup(&state, workload_id) == 1)
                .then_some(())
        },
    );
    assert_eq!(tests::pinned_entries(&state, "CONNECTED"), 1);
    holder.finish_with_stdout(Duration::from_secs(30));
    assert_eq!(tests::connected_charge_of_cgroup(&state, workload_id), 0);
}

/// A UDP socket connected through the agent and closed while no agent runs (after a graceful
/// stop, and after a SIGKILL) lets go of its note in `CONNECTED` and of its workload's charge:
/// the agent leaves `sock_release` attached, pinned. Before, such a note stayed until the
/// table was removed, holding its origin and a place in the map (helper-154: a workload that
/// held 65,536 sockets across one restart left it full for good). Each start's link replaces
/// the last on this cgroup and table: one program is left attached, not one per start.
#[test]
fn a_socket_closed_while_no_agent_runs_lets_go_of_its_note() {
    use std::os::unix::fs::MetadataExt as _;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let state = topology.client.state_dir();
    let workload_id = std::fs::metadata(&topology.cgroup.path)
        .expect("stat")
        .ino();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut agent = Agent::start(&topology, &[]);
        let mut holder = hold(
            topology.workload(HOSTILE, &[]),
            &format!("{SERVER_IP}:53"),
            3,
            &[],
        );
        assert_eq!(tests::pinned_entries(&state, "CONNECTED"), 3);
        assert_eq!(tests::connected_charge_of_cgroup(&state, workload_id), 3);
        agent.process().signal(signal);
        agent.wait_exit(Duration::from_secs(10));
        tests::assert_only_sock_release_left(&topology.cgroup.path);
        holder.finish_with_stdout(Duration::from_secs(30));
        assert_eq!(
            tests::pinned_entries(&state, "CONNECTED"),
            0,
            "noted after the agent's {signal} and the sockets' close"
        );
        assert_eq!(tests::pinned_entries(&state, "CONNECTED_CHARGE"), 0);
        assert_eq!(tests::connected_charge_of_cgroup(&state, workload_id), 0);
    }
}

/// A cgroup deeper than the agent's walk of the cgroup tree goes (32 levels) looks gone to
/// the walk, but its share of the notes of connected sockets stays counted. The walk removed
/// the counts of cgroups that looked gone, and one cgroup 41 levels deep took a fresh share
/// at each walk until `CONNECTED` was full; a victim's unnoted socket then got another
/// server's answers (helper-155).
#[test]
fn a_cgroup_deeper_than_the_walk_keeps_its_share_of_noted_sockets() {
    use std::os::unix::fs::MetadataExt as _;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    // A walk every second.
    let _agent = Agent::start_with_env(&topology, &[], &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")]);
    let levels: Vec<String> = (0..40).map(|level| format!("d{level}")).collect();
    let deep = child_cgroup(&topology, &levels.join("/"));
    let deep_id = std::fs::metadata(&deep).expect("stat").ino();
    let state = topology.client.state_dir();
    let server = format!("{SERVER_IP}:53");
    let holder = || in_cgroup_and_netns(&deep, &topology.client, HOSTILE, &[]);
    let mut share = hold(holder(), &server, 4_096, &[]);
    // Missing from three walks and more: taken for gone, if it ever is.
    thread::sleep(Duration::from_secs(5));
    assert_eq!(tests::connected_charge_of_cgroup(&state, deep_id), 4_096);
    let mut past = hold(holder(), &server, 100, &[]);
    assert_eq!(
        tests::pinned_entries(&state, "CONNECTED"),
        4_096,
        "notes past the share"
    );
    for holder in [&mut share, &mut past] {
        holder.finish_with_stdout(Duration::from_secs(30));
    }
    assert_eq!(tests::pinned_entries(&state, "CONNECTED"), 0);
}

/// A block of 64 addresses or fewer is searched whole for a free slot, so it fills to its
/// last index before any origin goes without one. With the window of 16 slots linear probing
/// had before, a 62-index block began to turn pairs away (their workload unknown) at about
/// half full.
#[test]
fn a_small_block_fills_to_its_last_index() {
    let Harness { topology, .. } = &Harness::start(
        Placement::Outside,
        &[
            "--redirect-block=127.53.0.0/26",
            "--metrics=127.0.0.1:9253",
            "--max-servers-per-workload=0",
        ],
    );
    route_servers_left_alone(topology);
    // 62 indexes: 31 servers, each with its shared origin and this workload's pair.
    let filling = hold(
        topology.workload(HOSTILE, &[]),
        "10.1.0.1:53",
        31,
        &["--distinct"],
    );
    let page = scrape(topology);
    assert_eq!(
        attached_map_entries(&topology.cgroup.path, "SERVERS"),
        62,
        "{page}"
    );
    assert_eq!(no_room_counts(&page), (0, 0), "{page}");
    // The block is full: one more server gets no index at all, and that is counted.
    let past = hold(
        topology.workload(HOSTILE, &[]),
        "10.2.0.1:53",
        1,
        &["--distinct"],
    );
    let page = scrape(topology);
    assert_eq!(no_room_counts(&page), (0, 1), "{page}");
    for mut holder in [filling, past] {
        holder.finish_with_stdout(Duration::from_secs(30));
    }
}

/// One workload cannot take the table from the others: asking as many servers as filled a
/// block before (`a_small_block_fills_to_its_last_index`), it takes its share
/// (`--max-servers-per-workload`, 4 by default for a /26: four pairs and their servers' shared
/// origins), and what it was denied is counted; another workload asking a server new to the
/// table still gets an index of its own, seen and named by the agent. Without the share, that
/// lookup went direct, unseen.
#[test]
fn one_workload_cannot_take_the_table_from_the_others() {
    let Harness {
        topology, agent, ..
    } = &Harness::start(
        Placement::Outside,
        &["--redirect-block=127.53.0.0/26", "--metrics=127.0.0.1:9253"],
    );
    route_servers_left_alone(topology);
    let hostile = child_cgroup(topology, "hostile");
    let in_hostile = in_cgroup_and_netns(&hostile, &topology.client, HOSTILE, &[]);
    let mut filling = hold(in_hostile, "10.1.0.1:53", 31, &["--distinct"]);
    let page = assert_share_of_four_taken(topology, 31 - 4);
    assert_eq!(no_room_counts(&page), (0, 0), "{page}");

    a_new_workload_gets_a_pair_of_its_own(topology, agent, SERVER_IP.into(), "victim.example.test");
    filling.finish_with_stdout(Duration::from_secs(30));
}

/// A workload's share counts its servers of both families: one that spends it on IPv6 servers
/// gets no slot for an IPv4 one either, and other workloads' IPv6 lookups keep their own index.
#[test]
fn a_workloads_share_counts_its_ipv6_servers_too() {
    let Harness {
        topology, agent, ..
    } = &Harness::start(
        Placement::Outside,
        &[
            "--redirect-block=127.53.0.0/26",
            "--redirect-block6=fd53:6e73:6470::/122",
            "--metrics=127.0.0.1:9253",
        ],
    );
    route_servers_left_alone(topology);
    must(Command::new("ip").args([
        "-n",
        &topology.client.name,
        "-6",
        "route",
        "add",
        "2001:db8:99::/64",
        "dev",
        "lo",
    ]));
    let hostile = child_cgroup(topology, "hostile");
    let hold_in_hostile = |first: &str, count: u32| {
        let in_hostile = in_cgroup_and_netns(&hostile, &topology.client, HOSTILE, &[]);
        hold(in_hostile, first, count, &["--distinct"])
    };
    // A share of 4 on a /26: four pairs and their shared origins, the rest direct. Without a
    // share, 40 servers would take the whole IPv6 table (63 slots of a /122).
    let ipv6 = hold_in_hostile("[2001:db8:99::1]:53", 40);
    assert_share_of_four_taken(topology, 40 - 4);
    // The same share: no slot for an IPv4 server new to it.
    let ipv4 = hold_in_hostile("10.1.0.1:53", 1);
    assert_share_of_four_taken(topology, 40 - 4 + 1);

    a_new_workload_gets_a_pair_of_its_own(
        topology,
        agent,
        tests::SERVER_IP6.into(),
        "victim6.example.test",
    );
    for mut holder in [ipv6, ipv4] {
        holder.finish_with_stdout(Duration::from_secs(30));
    }
}

/// Asserts that a workload of share 4 holds 8 slots of the table (four pairs and their shared
/// origins), and that `at_share` of its connects found it at its share; returns the page.
fn assert_share_of_four_taken(topology: &Topology, at_share: u64) -> String {
    let page = scrape(topology);
    assert_eq!(
        attached_map_entries(&topology.cgroup.path, "SERVERS"),
        8,
        "{page}"
    );
    assert_eq!(
        value(&page, "dns_proxy_kernel_workload_limit_total"),
        at_share,
        "{page}"
    );
    page
}

/// With a workload at its share (8 slots), a new workload asking `server` (new to the table) is
/// answered through the agent and named: it got a pair of its own, and the server's shared
/// origin with it (10 slots).
fn a_new_workload_gets_a_pair_of_its_own(
    topology: &Topology,
    agent: &Agent,
    server: std::net::IpAddr,
    name: &str,
) {
    let victim = child_cgroup(topology, "victim");
    let answer = dig_at(
        in_cgroup_and_netns(&victim, &topology.client, "dig", &[]),
        &server.to_string(),
        name,
        &["+short"],
    )
    .expect("answered");
    assert_eq!(answer.trim(), ANSWER_IP.to_string());
    let line = forwarded(agent, name);
    assert!(
        attributed_to(&line, &victim),
        "the victim's own workload: {line}"
    );
    assert_eq!(
        attached_map_entries(&topology.cgroup.path, "SERVERS"),
        10,
        "{}",
        scrape(topology)
    );
}

/// A slot is charged to a workload once, however many of its threads race for it: with two
/// threads connecting to each new server at the same moment, a workload of share 8 holds its 8
/// servers. Before, the CPU that lost the race charged the slot too (1,997 for 1,000 pairs), and
/// a busy workload reached its share with half of it.
#[test]
fn a_slot_raced_for_by_a_workloads_threads_is_charged_once() {
    let Harness { topology, .. } = &Harness::start(
        Placement::Outside,
        &[
            "--redirect-block=127.53.0.0/26",
            "--metrics=127.0.0.1:9253",
            "--max-servers-per-workload=8",
        ],
    );
    route_servers_left_alone(topology);
    let racing = child_cgroup(topology, "racing");
    let output = stdout(&mut in_cgroup_and_netns(
        &racing,
        &topology.client,
        HOSTILE,
        &["race-connect", "2", "8", "10.1.0.1"],
    ));
    assert_eq!(output, "raced 8");
    let page = scrape(topology);
    assert_eq!(
        value(&page, "dns_proxy_kernel_workload_limit_total"),
        0,
        "{page}"
    );
    assert_eq!(
        attached_map_entries(&topology.cgroup.path, "SERVERS"),
        16,
        "eight pairs and their shared origins"
    );
}

/// A workload's share of the table is kept with the table: a restarted agent does not give it
/// a fresh one (even after SIGKILL), and pairs taken uncharged (by an agent from before shares,
/// before an upgrade or during a takeover from it) are charged at start and at each walk. And
/// it goes with the workload: once its cgroup is gone and its origins forgotten, nothing of it
/// is left in the kernel.
#[test]
fn a_workloads_share_outlives_restarts_and_goes_with_it() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    route_servers_left_alone(&topology);
    let args = ["--redirect-block=127.53.0.0/26", "--metrics=127.0.0.1:9253"];
    let env = [("DNS_PROXY_TEST_FORGET_DEPARTED", "1")];
    let mut agent = Agent::start_with_env(&topology, &args, &env);
    let workload = child_cgroup(&topology, "asks-many");
    let hold_ten = |first: &str| {
        let in_workload = in_cgroup_and_netns(&workload, &topology.client, HOSTILE, &[]);
        hold(in_workload, first, 10, &["--distinct"]).finish_with_stdout(Duration::from_secs(30));
    };
    let entries = |map: &str| attached_map_entries(&topology.cgroup.path, map);
    hold_ten("10.1.0.1:53");
    assert_eq!(entries("SERVERS"), 8, "four pairs and their shared origins");
    agent.process().signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let mut agent = Agent::start_with_env(&topology, &args, &env);
    hold_ten("10.2.0.1:53");
    assert_eq!(entries("SERVERS"), 8, "no fresh share after a restart");

    // A table whose pairs no count charges, as an agent from before shares leaves it (an
    // upgrade, or a downgrade and back): the next agent charges them before it attaches.
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let state_dir = topology.client.state_dir();
    let table_dir = tests::table_dir(&state_dir);
    std::fs::remove_file(table_dir.join("CGROUP_ORIGINS")).expect("unpin the shares");
    let agent = Agent::start_with_env(&topology, &args, &env);
    assert!(agent.log().contains("charged 1 cgroups"), "{}", agent.log());
    hold_ten("10.3.0.1:53");
    assert_eq!(entries("SERVERS"), 8, "no fresh share after an upgrade");
    let page = scrape(&topology);
    assert_eq!(
        value(&page, "dns_proxy_kernel_workload_limit_total"),
        10,
        "{page}"
    );
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(&workload).expect("the workload's cgroup"),
    );
    // Charged by the agent's correction: the programs' count is new and holds nothing.
    assert_eq!(entries("CGROUP_ADJUST"), 1);
    assert_eq!(tests::charge_of_cgroup(&state_dir, cgroup_id), Some(4));

    // Pairs taken uncharged while the agent runs, as an older agent's programs take them
    // during a takeover from it: the next walk charges them.
    let set = |map: &str, value: u64| {
        let hex = |n: u64| n.to_le_bytes().map(|b| format!("{b:02x}"));
        must(
            Command::new("bpftool")
                .args(["map", "update", "pinned"])
                .arg(table_dir.join(map))
                .arg("key")
                .arg("hex")
                .args(hex(cgroup_id))
                .arg("value")
                .arg("hex")
                .args(hex(value)),
        );
    };
    set("CGROUP_ADJUST", 0);
    wait_for(
        "the walk to charge the pairs held",
        Duration::from_secs(10),
        || (agent.log().matches("charged 1 cgroups").count() == 2).then_some(()),
    );
    hold_ten("10.4.0.1:53");
    assert_eq!(entries("SERVERS"), 8, "no fresh share while the agent runs");
    assert_eq!(tests::charge_of_cgroup(&state_dir, cgroup_id), Some(4));

    // A charge past what the cgroup can hold (its pairs, and shared origins no pair asks
    // through, which it may have made alone when its pair found no room): such a charge
    // outlived those origins, and a long-lived workload lost its share for good. The next walk
    // lowers it.
    set("CGROUP_ORIGINS", 1000);
    wait_for(
        "the walk to lower the charge",
        Duration::from_secs(10),
        || agent.log().contains("lowered 1 cgroups").then_some(()),
    );
    assert_eq!(tests::charge_of_cgroup(&state_dir, cgroup_id), Some(4));

    std::fs::remove_dir(&workload).expect("remove the workload's cgroup");
    wait_for(
        "the departed workload's share and origins to go",
        Duration::from_secs(30),
        || {
            (entries("CGROUP_ORIGINS") == 0
                && entries("CGROUP_ADJUST") == 0
                && entries("SERVERS") == 0)
                .then_some(())
        },
    );
    // The pairs at one walk, their servers' shared origins at the next; each walk logs
    // after it deleted.
    let forgotten = || -> usize {
        agent
            .log()
            .lines()
            .filter_map(|line| {
                line.split(" forgot ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum()
    };
    wait_for("the walks' lines", Duration::from_secs(5), || {
        (forgotten() >= 8).then_some(())
    });
    assert_eq!(forgotten(), 8, "{}", agent.log());
}

/// Nothing in the redirected cgroup can take a block address, on the proxy's port, from where
/// its datagrams would be shown to clients as their server's, or on another, which may have
/// been the proxy's before a change of port (sockets still connected there would take its
/// datagrams for their server's, and send it their queries).
#[test]
fn no_workload_can_bind_the_proxys_block_addresses() {
    let Harness { topology, .. } = &Harness::start(Placement::Outside, &[]);
    let port = PROXY_LISTEN.rsplit(':').next().expect("a port");
    let bind = |addr: String| stdout(&mut topology.workload(HOSTILE, &["bind", &addr]));
    // Port 0 too: the kernel picks the port later, and may pick the proxy's (an adversarial
    // review had a socket's own IP_LOCAL_PORT_RANGE make it so, and forge answers).
    for addr in [
        format!("127.53.0.1:{port}"),
        format!("127.53.200.9:{port}"),
        "127.53.0.1:0".to_owned(),
        "127.53.0.1:8054".to_owned(),
        "[::ffff:127.53.0.1]:0".to_owned(),
        "[::ffff:127.53.0.1]:8054".to_owned(),
        "[fd53:6e73:6470::1]:0".to_owned(),
        "[fd53:6e73:6470::1]:8054".to_owned(),
    ] {
        let outcome = bind(addr.clone());
        assert!(
            outcome.starts_with("refused: Operation not permitted"),
            "{addr}: {outcome}"
        );
    }
    // Other addresses are anyone's, as is the block's first address, which names no server;
    // but not on the proxy's port, which the agent holds on every address.
    assert_eq!(bind("127.0.0.2:8054".to_owned()), "bound");
    assert_eq!(bind("127.53.0.0:8054".to_owned()), "bound");
    assert!(bind(format!("127.0.0.2:{port}")).starts_with("refused: Address already in use"));
    // A TCP service of the cgroup answers its clients on a block address and a port of its
    // own: a connection to the proxy is made anew, to its port of the moment, so nothing
    // there is taken for a server's (an adversarial review had such a service's SYN-ACKs
    // dropped while TCP was guarded on every port).
    const TCP_SERVICE: &str = "import socket\n\
        l = socket.socket()\n\
        l.bind(('0.0.0.0', 8080))\n\
        l.listen()\n\
        socket.create_connection(('127.53.0.9', 8080), timeout=3)\n\
        print('connected')\n";
    let connected = stdout(&mut topology.workload("/usr/bin/python3", &["-c", TCP_SERVICE]));
    assert_eq!(connected, "connected");
    // An ICMP "ping" socket binds a block address without a bind program (ping has a bind of
    // its own), and what it sends is no DNS answer: its echo is answered (an adversarial
    // review's were dropped, as a UDP socket's would be).
    must(
        topology
            .client
            .command("sysctl")
            .args(["-qw", "net.ipv4.ping_group_range=0 0"]),
    );
    const PING_FROM_THE_BLOCK: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(2)
s.bind(("127.53.0.5", 0))
s.sendto(bytes([8, 0, 0, 0, 0, 0, 0, 1]), ("127.0.0.1", 0))
print(s.recvfrom(64)[1][0])
"#;
    let replies = stdout(&mut topology.workload("/usr/bin/python3", &["-c", PING_FROM_THE_BLOCK]));
    assert_eq!(replies, "127.0.0.1");
}

/// After a restart that changes `--listen`'s port, a socket still connected to the old port
/// sends its queries there, where an unprivileged process of the cgroup can bind the port on
/// the wildcard address and receive them. It cannot answer them as their server: a datagram
/// from a block address is refused to every socket but the agent's, on every port (an
/// adversarial review had such a process answer a victim's every query before).
#[test]
fn a_process_on_the_old_port_after_a_port_change_cannot_answer_as_a_server() {
    // Asks every 0.2 s or so until its standard input closes.
    const VICTIM: &str = "import select, socket, struct, sys, time\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.connect((sys.argv[1], 53))\n\
        s.settimeout(0.5)\n\
        i = 0\n\
        while not select.select([sys.stdin], [], [], 0)[0]:\n\
        \x20   i += 1\n\
        \x20   q = struct.pack('>HHHHHH', i, 0x100, 1, 0, 0, 0)\n\
        \x20   q += b''.join(bytes([len(l)]) + l for l in [b'v%d' % i, b'example', b'test']) + b'\\0\\0\\1\\0\\1'\n\
        \x20   try:\n\
        \x20       s.send(q)\n\
        \x20       a = s.recv(512)\n\
        \x20       print('answer', '.'.join(str(b) for b in a[-4:]), flush=True)\n\
        \x20   except OSError as e:\n\
        \x20       print('error', e.__class__.__name__, flush=True)\n\
        \x20   time.sleep(0.2)\n";
    // IP_PKTINFO is 8 (Debian 12's Python names no such constant).
    // Answers what it receives on the old port, from the address it was sent to, until it
    // has had five queries.
    const SQUATTER: &str = "import socket, struct, sys, time\n\
        IP_PKTINFO = 8\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)\n\
        s.bind(('0.0.0.0', int(sys.argv[1])))\n\
        s.settimeout(0.5)\n\
        received = sent = refused = 0\n\
        end = time.time() + 30\n\
        while time.time() < end and received < 5:\n\
        \x20   try:\n\
        \x20       q, anc, _, peer = s.recvmsg(512, 256)\n\
        \x20   except socket.timeout:\n\
        \x20       continue\n\
        \x20   received += 1\n\
        \x20   dst = [d[8:12] for (l, t, d) in anc if t == IP_PKTINFO][0]\n\
        \x20   a = q[:2] + b'\\x81\\x80' + q[4:6] + b'\\0\\1\\0\\0\\0\\0' + q[12:]\n\
        \x20   a += b'\\xc0\\x0c\\0\\1\\0\\1\\0\\0\\0\\x3c\\0\\4\\6\\6\\6\\6'\n\
        \x20   info = struct.pack('i4s4s', 0, dst, dst)\n\
        \x20   try:\n\
        \x20       s.sendmsg([a], [(socket.SOL_IP, IP_PKTINFO, info)], 0, peer)\n\
        \x20       sent += 1\n\
        \x20   except PermissionError:\n\
        \x20       refused += 1\n\
        print(f'received={received} sent={sent} refused={refused}', flush=True)\n";
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[]);
    let mut victim = Process::spawn(
        topology
            .workload("/usr/bin/python3", &["-c", VICTIM, &SERVER_IP.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    // Its socket connected through this agent (not before it ran, nor once it stopped
    // redirecting: a slow start, in emulation, did that) and answered. Its first query may
    // time out (0.5 s) in emulation on a busy host (Linux 6.1 in CI, once): it asks again on
    // the same socket.
    let mut output = std::io::BufReader::new(victim.take_stdout());
    let mut lines = Vec::new();
    while lines.len() < 10 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut output, &mut line).expect("the victim's output");
        let line = line.trim().to_owned();
        let answered = line == format!("answer {ANSWER_IP}");
        lines.push(line);
        if answered {
            break;
        }
    }
    assert!(
        lines.last() == Some(&format!("answer {ANSWER_IP}"))
            && lines[..lines.len() - 1]
                .iter()
                .all(|line| line == "error TimeoutError"),
        "the victim, through this agent: {lines:?}"
    );
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let _agent = Agent::launch(
        &topology.client,
        &topology.cgroup.path,
        None,
        &["--listen=127.0.0.1:8054".to_owned()],
    );
    let old_port = PROXY_LISTEN.rsplit(':').next().expect("a port");
    let mut args: Vec<&str> = AS_NOBODY.to_vec();
    args.extend(["/usr/bin/python3", "-c", SQUATTER, old_port]);
    let mut squatter = Process::spawn(topology.workload("setpriv", &args).stdout(Stdio::piped()));
    // Done once it has had five of the victim's queries (30 s at most).
    let squatted = squatter.finish_with_stdout(Duration::from_secs(40));
    victim.finish_with_stdout(Duration::from_secs(15));
    let mut asked = String::new();
    std::io::Read::read_to_string(&mut output, &mut asked).expect("the victim's output");
    assert!(
        !asked.contains("answer 6.6.6.6"),
        "a forged answer:\n{asked}"
    );
    let counts: Vec<u64> = squatted
        .trim()
        .split(' ')
        .map(|field| {
            field
                .split('=')
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    assert!(
        counts.len() == 3 && counts[0] > 0 && counts[1] == 0 && counts[2] == counts[0],
        "every answer refused: {squatted}\nvictim:\n{asked}"
    );
}

/// A DNS server inside the redirected cgroup answers a client on port 53 (another server, or
/// a forwarder asking from port 53): its answer, sent to port 53 from port 53, is not a
/// lookup and is not redirected.
#[test]
fn a_dns_server_inside_the_cgroup_keeps_answering_clients_on_port_53() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let (server, answer) = (
        Ipv4Addr::new(127, 0, 0, 77),
        Ipv4Addr::new(198, 51, 100, 77),
    );
    let _server = Process::spawn(
        topology
            .workload(
                "dnsmasq",
                &[
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    &format!("--listen-address={server}"),
                    &format!("--address=/example.test/{answer}"),
                    "--pid-file=",
                    "--user=root",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for("the server in the cgroup", Duration::from_secs(10), || {
        dig_at(
            topology.outsider("dig", &[]),
            &server.to_string(),
            "ready.example.test",
            &[],
        )
        .ok()
        .filter(|output| output.contains(&answer.to_string()))
    });
    let summary = stdout(&mut topology.outsider(
        HOSTILE,
        &[
            "lookups",
            "connect",
            &format!("{server}:53"),
            "server53.example.test",
            "10",
            "--expect",
            &answer.to_string(),
            "--port",
            "53",
            "--source",
            "127.0.0.88",
        ],
    ));
    assert_eq!(summary, "right=10 wrong=0 failed=0");
    let log = agent.log();
    assert!(!log.contains("server53"), "{log}");
}

/// A link-local IPv6 server's zone is not in what the programs see, so it is left alone and
/// asked directly: the lookup works as it does without the agent.
#[test]
fn a_link_local_ipv6_server_is_asked_directly_with_its_zone() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let (client_if, server_if) = (format!("{}c", topology.tag), format!("{}s", topology.tag));
    for (netns, interface, address) in [
        (&topology.client, &client_if, "fe80::5301/64"),
        (&topology.server, &server_if, "fe80::5302/64"),
    ] {
        netns.add_ipv6(interface, address);
    }
    let index = stdout(
        topology
            .server
            .command("cat")
            .arg(format!("/sys/class/net/{server_if}/ifindex")),
    );
    let upstream = env!("CARGO_BIN_EXE_test-upstream");
    let _server = Process::spawn(
        topology
            .server
            .command(upstream)
            .args([
                &format!("[fe80::5302%{index}]:53"),
                "0",
                &ANSWER_IP.to_string(),
            ])
            .stdout(Stdio::null()),
    );
    let server = format!("fe80::5302%{client_if}");
    let output = wait_for("the link-local server", Duration::from_secs(10), || {
        dig_at(
            topology.workload("dig", &[]),
            &server,
            "zone.example.test",
            &[],
        )
        .ok()
    });
    assert!(output.contains(&ANSWER_IP.to_string()), "{output}");
    assert!(
        agent.query_line("zone.example.test").is_none(),
        "{}",
        agent.log()
    );
}

/// A workload, even an unprivileged one, cannot send from a block address with `IP_PKTINFO`:
/// its datagram would be shown as its server's answer to a victim. Not from an IPv4 or a
/// dual-stack socket, and not from one connected to the victim first, naming it or not (a
/// send to a socket's own peer is otherwise left alone). Not on the proxy's port, nor on
/// another: after a change of `--listen`'s port, sockets still connected to the old one take
/// what comes from there for their server's answer (an adversarial review bound the old port
/// as nobody and answered a victim's every query).
#[test]
fn no_workload_can_send_from_the_proxys_block_addresses() {
    let Harness { topology, .. } = &Harness::start(Placement::Outside, &[]);
    let port = PROXY_LISTEN.rsplit(':').next().expect("a port");
    for port in [port, "8054"] {
        // Without the agent's guard, this is what a forger does: any address on the port
        // (127.0.0.2 is nobody's), and the source it wants from IP_PKTINFO.
        let ipv4 = (
            format!("127.0.0.2:{port}"),
            "127.53.0.1",
            "127.0.0.1:40999".to_owned(),
        );
        let dual_stack = (
            format!("[::ffff:127.0.0.2]:{port}"),
            "::ffff:127.53.0.1",
            "[::ffff:127.0.0.1]:40999".to_owned(),
        );
        for (from, source, victim) in [&ipv4, &dual_stack] {
            for how in [None, Some("--connected-sendto"), Some("--connected-send")] {
                for user in [&[][..], &AS_NOBODY[..]] {
                    let mut args: Vec<&str> = user.to_vec();
                    args.extend([HOSTILE, "spoof", from, source, victim]);
                    args.extend(how);
                    let outcome = stdout(&mut topology.workload("setpriv", &args));
                    // Only the agent's user may join its hold of its port (and bind there).
                    let refusal = if port != "8054" && !user.is_empty() {
                        format!("refused: bind {from}: Address already in use")
                    } else {
                        "refused: Operation not permitted".to_owned()
                    };
                    assert!(
                        outcome.starts_with(&refusal),
                        "{from} {how:?} {user:?}: {outcome}"
                    );
                }
            }
        }
    }
    // From an address outside the block it is just a datagram from there: not refused.
    let outcome = stdout(&mut topology.workload(
        HOSTILE,
        &["spoof", "127.0.0.2:40998", "127.0.0.3", "127.0.0.1:40999"],
    ));
    assert_eq!(outcome, "sent");
}

/// Host mode, outside the redirected cgroup, where no program guards a socket: no process of
/// another user can bind a block address on the proxy's port (IPv4, v4-mapped, or IPv6 with
/// `IPV6_FREEBIND`; UDP, or TCP, whose connections from there `getpeername` would show as
/// from a server), nor an address of its own there to send from a block address with
/// `IP_PKTINFO`: the agent holds its port on every address. Before, a process of user nobody
/// outside `--cgroup` bound the block address a connected IPv6 client was sent to and answered
/// its lookups (helper-166: 3 of 3). On a port no agent serves, no socket takes a datagram
/// from a block address for an answer, and nothing stops it.
#[test]
fn no_user_outside_the_cgroup_can_send_from_a_block_address_on_the_proxys_port() {
    let Harness { topology, .. } = &Harness::start(Placement::Outside, &[]);
    let port = PROXY_LISTEN.rsplit(':').next().expect("a port");
    let as_nobody = |args: &[&str]| {
        let mut command: Vec<&str> = AS_NOBODY.to_vec();
        command.push(HOSTILE);
        command.extend(args);
        stdout(&mut topology.outsider("setpriv", &command))
    };
    for (addr, how) in [
        (format!("127.53.0.9:{port}"), None),
        (format!("[::ffff:127.53.0.9]:{port}"), None),
        (format!("[fd53:6e73:6470::9]:{port}"), Some("--freebind")),
    ] {
        for tcp in [None, Some("--tcp")] {
            let mut args = vec!["bind", addr.as_str()];
            args.extend(how.into_iter().chain(tcp));
            let outcome = as_nobody(&args);
            assert!(
                outcome.starts_with("refused: Address already in use"),
                "{args:?}: {outcome}"
            );
        }
    }
    let forge_from = |port: &str| {
        let from = format!("127.0.0.2:{port}");
        as_nobody(&["spoof", &from, "127.53.0.1", "127.0.0.1:40999"])
    };
    let outcome = forge_from(port);
    assert!(
        outcome.starts_with(&format!(
            "refused: bind 127.0.0.2:{port}: Address already in use"
        )),
        "{outcome}"
    );
    assert_eq!(forge_from("8054"), "sent");
}

/// A socket of another user on the proxy's port when the agent starts (one bound while no
/// agent ran, outside the cgroup) does not keep the agent from serving, and once that socket
/// is gone the agent holds the port (at once, or at its next try): no other user binds a
/// block address there. Whether the socket keeps the hold off at first is the kernel's bind
/// check, which may miss it (Linux 6.1 let the wildcard through beside it, in its VM): when
/// the agent says it could not hold the port, the gauge counts it until it can.
#[test]
fn a_socket_on_the_proxys_port_at_the_start_delays_the_ports_hold_and_not_the_agent() {
    let topology = Topology::new();
    let port = PROXY_LISTEN.rsplit(':').next().expect("a port");
    let as_nobody = |args: &[&str]| {
        let mut command: Vec<&str> = AS_NOBODY.to_vec();
        command.push(HOSTILE);
        command.extend(args);
        topology.outsider("setpriv", &command)
    };
    let there_first = format!("127.0.0.2:{port}");
    let metrics = format!("--metrics={}", super::METRICS);
    const BIND_FOR_3_S: &str = "import socket, sys, time\n\
        host, port = sys.argv[1].rsplit(':', 1)\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.bind((host, int(port)))\n\
        print('bound', flush=True)\n\
        time.sleep(3)\n\
        print('done')";
    let mut blocker: Vec<&str> = AS_NOBODY.to_vec();
    blocker.extend(["/usr/bin/python3", "-c", BIND_FOR_3_S, &there_first]);
    let mut early = Process::spawn(
        topology
            .outsider("setpriv", &blocker)
            .stdout(Stdio::piped()),
    );
    let mut output = std::io::BufReader::new(early.take_stdout());
    let mut bound = String::new();
    std::io::BufRead::read_line(&mut output, &mut bound).expect("its first line");
    assert_eq!(bound.trim(), "bound");
    let agent = Agent::start(&topology, &[&metrics]);
    let missing = || value(&scrape(&topology), "dns_proxy_port_holds_missing");
    let wildcard = format!("0.0.0.0:{port}/udp");
    let kept_off = agent.log().contains(&format!(
        "cannot hold port {port} on every address ({wildcard})"
    ));
    assert_eq!(missing(), u64::from(kept_off), "{}", agent.log());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut output, &mut rest).expect("the rest of its output");
    assert_eq!(rest.trim(), "done");
    early.wait_exit(Duration::from_secs(10));
    // Tried again every 10 s.
    if kept_off {
        let held = format!("now holding port {port} on every address ({wildcard})");
        wait_for("the port's hold", Duration::from_secs(15), || {
            agent.log().contains(&held).then_some(())
        });
    }
    assert_eq!(missing(), 0);
    let bind = format!("127.53.0.9:{port}");
    let outcome = stdout(&mut as_nobody(&["bind", &bind]));
    assert!(
        outcome.starts_with("refused: Address already in use"),
        "{outcome}"
    );
}

/// Host mode: the blocks are the agent's namespace's alone. A neighbour on the network that
/// routes the IPv6 block to this host reaches nothing through it, over UDP or TCP.
#[test]
fn host_mode_blocks_are_out_of_reach_from_the_network() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &["--metrics=127.0.0.1:9253"]);
    // A workload's lookup gives the IPv6 server an index (and shows IPv6 works here).
    assert_answered(
        dig_at(
            topology.workload("dig", &[]),
            &tests::SERVER_IP6.to_string(),
            "v6.example.test",
            &[],
        ),
        "dig -6",
    );
    let index = tests::server_index(&topology.client.state_dir(), tests::SERVER_IP6, 53);
    let block_address = format!("fd53:6e73:6470::{index:x}");
    must(Command::new("ip").args([
        "-n",
        &topology.server.name,
        "-6",
        "route",
        "add",
        "fd53:6e73:6470::/112",
        "via",
        &tests::CLIENT_IP6.to_string(),
    ]));
    for extra in [&["-p", "8053"][..], &["-p", "8053", "+tcp"][..]] {
        let result = dig_at(
            topology.server.command("dig"),
            &block_address,
            "lan.example.test",
            extra,
        );
        assert!(
            result.is_err(),
            "{extra:?}: answered from the network: {result:?}"
        );
    }
    assert!(
        agent.query_line("lan.example.test").is_none(),
        "{}",
        agent.log()
    );
    let refused = value(&scrape(topology), "dns_proxy_kernel_foreign_refused_total");
    assert!(refused >= 2, "{refused}");
}

/// `SERVER_INDEX` (server to index) is only a shortcut into the pinned `SERVERS` (index to
/// server), and the kernel checks the two agree: a stale or forged reverse entry, here one
/// that names the first server's index for the second server, sends no socket to the wrong
/// server's address. The next socket finds the second server's own index and repairs the entry.
#[test]
fn a_forged_reverse_index_sends_no_socket_to_another_server() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let _second = DnsServer::start_on(topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
    let first = format!("{SERVER_IP}:53");
    let second = format!("{SECOND_SERVER_IP}:53");
    assert_eq!(
        probe_at(topology, "connect", &first, "first.example.test", &[]),
        format!("source={first} answer={ANSWER_IP}")
    );
    assert_eq!(
        probe_at(topology, "connect", &second, "second.example.test", &[]),
        format!("source={second} answer={SECOND_ANSWER_IP}")
    );
    let state_dir = topology.client.state_dir();
    // The origins of the test cgroup's own pairs (not the servers' shared ones).
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(&topology.cgroup.path).expect("stat the test cgroup"),
    );
    let first_index = tests::server_index_for(&state_dir, SERVER_IP, 53, Some(cgroup_id));
    let second_index = tests::server_index_for(&state_dir, SECOND_SERVER_IP, 53, Some(cgroup_id));
    assert_ne!(first_index, second_index);

    // The key is an Origin: the server as an Endpoint (four address words, IPv4 in the
    // first, network order; the port, network order; the family, AF_INET, native order), 4
    // bytes of padding and the asking cgroup's id (native order); the value the index.
    let table = std::fs::read_dir(&state_dir)
        .expect("the state dir")
        .map(|entry| entry.expect("an entry").path())
        .find(|dir| dir.join("SERVER_INDEX").exists())
        .expect("a pinned SERVER_INDEX");
    let mut key: Vec<u8> = SECOND_SERVER_IP.octets().to_vec();
    key.extend([0; 12]);
    key.extend(53u16.to_be_bytes());
    key.extend((libc::AF_INET as u16).to_ne_bytes());
    key.extend([0; 4]);
    key.extend(cgroup_id.to_ne_bytes());
    let hex = |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("{b:#04x}")).collect() };
    let reverse_index = || -> u32 {
        let output = must(
            Command::new("bpftool")
                .args(["--json", "map", "lookup", "pinned"])
                .arg(table.join("SERVER_INDEX"))
                .arg("key")
                .args(hex(&key)),
        );
        let entry: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        let value: Vec<u8> = entry["value"]
            .as_array()
            .expect("value bytes")
            .iter()
            .map(|byte| {
                let text = byte.as_str().expect("a hex byte");
                u8::from_str_radix(text.trim_start_matches("0x"), 16).expect("hex")
            })
            .collect();
        u32::from_ne_bytes(value.try_into().expect("4 bytes"))
    };
    // The key as encoded here is the kernel's: it finds the second server's entry.
    assert_eq!(reverse_index(), second_index);
    must(
        Command::new("bpftool")
            .args(["map", "update", "pinned"])
            .arg(table.join("SERVER_INDEX"))
            .arg("key")
            .args(hex(&key))
            .arg("value")
            .args(hex(&first_index.to_ne_bytes())),
    );
    assert_eq!(reverse_index(), first_index, "the forged entry is in place");

    for round in 0..3 {
        let name = format!("forged{round}.example.test");
        assert_eq!(
            probe_at(topology, "connect", &second, &name, &[]),
            format!("source={second} answer={SECOND_ANSWER_IP}"),
            "round {round}"
        );
        let line = forwarded(agent, &name);
        assert!(line.contains(&format!("server={second}")), "{line}");
    }
    assert_eq!(
        tests::server_index_for(&state_dir, SECOND_SERVER_IP, 53, Some(cgroup_id)),
        second_index,
        "the second server kept its index"
    );
    assert_eq!(
        reverse_index(),
        second_index,
        "the reverse entry is repaired"
    );
}

/// What a client sees of its own address, run as a workload: `SERVER_IP FAR_IP [SERVER_IP6]`.
/// Prints one line per socket: `far=` the source of a UDP socket connected to FAR_IP:53 (nothing sent:
/// the "which address am I" idiom); `udp=` the source of a socket connected to the server,
/// once its lookup is answered, then `reconnected=` its source once connected to another port
/// of the server (no DNS); `tcp=` a TCP connection's; with `SERVER_IP6`, `v6only=` whether a
/// dual-stack socket that asked it became IPv6-only (binding an IPv6 address would do that),
/// and `mixed=` what a dual-stack socket connected with an IPv4 address (`AF_INET`, which runs
/// `connect4`), asked, disconnected and connected to the IPv6 server got there: bound to a
/// v4-mapped source, it could not connect at all (`EAFNOSUPPORT`).
const OWN_ADDRESS_SCRIPT: &str = r#"
import ctypes, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def connect_with(s, sockaddr):
    if libc.connect(s.fileno(), sockaddr, len(sockaddr)) != 0:
        raise OSError(ctypes.get_errno(), "connect")
server, far = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((far, 53))
print("far=" + s.getsockname()[0])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((server, 53))
s.send(struct.pack("!HHHHHH", 0x5d5d, 0x0100, 1, 0, 0, 0) + b"\x03own\x07example\x04test\x00\x00\x01\x00\x01")
assert s.recv(512)[:2] == b"\x5d\x5d"
print("udp=" + s.getsockname()[0])
s.connect((server, 9))
print("reconnected=" + s.getsockname()[0])
t = socket.create_connection((server, 53), timeout=2)
print("tcp=" + t.getsockname()[0])
if len(sys.argv) > 3:
    d = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    d.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    d.settimeout(2)
    d.connect((sys.argv[3], 53))
    d.send(struct.pack("!HHHHHH", 0x5d5e, 0x0100, 1, 0, 0, 0) + b"\x03own\x07example\x04test\x00\x00\x01\x00\x01")
    assert d.recv(512)[:2] == b"\x5d\x5e"
    print("v6only=%d" % d.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    m = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    m.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    m.settimeout(2)
    connect_with(m, struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_aton(server) + bytes(8))
    m.send(struct.pack("!HHHHHH", 0x5d5f, 0x0100, 1, 0, 0, 0) + b"\x03own\x07example\x04test\x00\x00\x01\x00\x01")
    assert m.recv(512)[:2] == b"\x5d\x5f"
    connect_with(m, struct.pack("=H", socket.AF_UNSPEC) + bytes(26))
    try:
        m.connect((sys.argv[3], 53))
        m.send(struct.pack("!HHHHHH", 0x5d60, 0x0100, 1, 0, 0, 0) + b"\x03own\x07example\x04test\x00\x00\x01\x00\x01")
        print("mixed=" + ("answered" if m.recv(512)[:2] == b"\x5d\x60" else "wrong answer"))
    except OSError as err:
        print("mixed=%s" % err)
"#;

/// An address only a default route reaches (TEST-NET-2): nothing is ever sent there.
const FAR_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);

/// Adds a default route to `netns` (via the server, on the veth) and waits until `agent` says
/// its redirected sockets send from the client's address: it looks again when routes change.
fn add_default_route(netns: &Netns, agent: &Agent) {
    route_default_via_server(netns);
    wait_for_log(
        agent,
        &format!("redirected IPv4 sockets of this namespace send from {CLIENT_IP},"),
    );
}

fn route_default_via_server(netns: &Netns) {
    must(Command::new("ip").args([
        "-n",
        &netns.name,
        "route",
        "add",
        "default",
        "via",
        &SERVER_IP.to_string(),
    ]));
}

fn own_address_lines(ip: Ipv4Addr) -> String {
    format!("far={ip}\nudp={ip}\nreconnected={ip}\ntcp={ip}")
}

/// An IPv4 socket the agent's namespace sends to the block shows the source it would have had
/// without the agent (the one toward the Internet), not the loopback address the route to the
/// block gives: `getsockname` reads the host's address (the "which address am I" idiom), and
/// the same socket can be connected elsewhere afterwards (with a loopback source it could not:
/// `EINVAL`). The default route is added while the agent runs, which looks again.
#[test]
fn a_socket_sent_to_the_agent_shows_and_keeps_the_source_it_would_have_had() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    add_default_route(&topology.client, agent);
    // An IPv6 one too: were IPv6 sockets bound to its source, a dual-stack one would turn
    // IPv6-only (found by an adversary of the first design, which did).
    let server6 = tests::SERVER_IP6.to_string();
    let client = &topology.client.name;
    must(Command::new("ip").args([
        "-n", client, "-6", "route", "add", "default", "via", &server6,
    ]));
    let (server, far) = (SERVER_IP.to_string(), FAR_IP.to_string());
    let script = ["-c", OWN_ADDRESS_SCRIPT, &server, &far, &server6];
    let seen = stdout(&mut topology.workload("python3", &script));
    // IPv6 sockets are not bound: a dual-stack one stays dual-stack, and one connected with an
    // IPv4 address can go to an IPv6 server once disconnected.
    assert_eq!(
        seen,
        format!("{}\nv6only=0\nmixed=answered", own_address_lines(CLIENT_IP))
    );
    // The lookups went through the agent.
    wait_for("every lookup logged", Duration::from_secs(5), || {
        (agent.query_lines("own.example.test").len() == 4).then_some(())
    });
}

/// A server on another link than the default route's (a management network, a VPN's split
/// tunnel): a socket sent to the agent shows, and keeps, the source toward that server, as
/// directly, not the one toward the Internet. Before, it showed the default route's address
/// and kept it when connected to the server again after the agent stopped, so its lookups
/// left that link from an address the server could not answer (helper-162: 3 of 3 lost). The
/// agent learns a server from its first lookup, and a restarted one from the table of
/// servers; a workload asking hundreds of other servers on that link first does not push it
/// out (helper-164: with 300, a first version kept 256 by address and lost it).
#[test]
fn a_server_on_another_link_is_asked_from_that_links_address() {
    let Harness {
        mut agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[]);
    add_default_route(&topology.client, &agent);
    // A second link between the namespaces, with a server at its far end, and a network
    // behind it.
    let (link_ip, link_server) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 1));
    topology.add_link("2", link_ip, link_server);
    let behind = [
        "route",
        "add",
        "10.60.0.0/16",
        "via",
        &link_server.to_string(),
    ];
    must(topology.client.command("ip").args(behind));
    let _link_dns = DnsServer::launch(
        &topology.server,
        &topology.client,
        link_server,
        ANSWER_IP,
        false,
    );
    // 300 servers behind the link asked first, from the workload (unanswered).
    let many = r#"
import socket
for i in range(300):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("10.60.%d.%d" % (i // 200, i % 200 + 1), 53))
    s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x01\x00\x01")
    s.close()
"#;
    must(&mut topology.workload("python3", &["-c", many]));
    let server = link_server.to_string();
    // The first lookup tells the agent of the server; sockets connected after show the link's
    // address.
    let first = dig_at(
        topology.workload("dig", &[]),
        &server,
        "link.example.test",
        &[],
    );
    assert!(first.is_ok_and(|output| output.contains(&ANSWER_IP.to_string())));
    let source_shown = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 53))
print(s.getsockname()[0])
"#;
    let shown = |topology: &Topology| {
        stdout(&mut topology.workload("python3", &["-c", source_shown, &server]))
    };
    wait_for("the link's address shown", Duration::from_secs(10), || {
        (shown(&topology) == link_ip.to_string()).then_some(())
    });
    // The 300 were learned too (a few said one by one, the rest counted).
    assert!(agent.log().contains("asking 10.60."), "{}", agent.log());
    let far = FAR_IP.to_string();
    let script = ["-c", OWN_ADDRESS_SCRIPT, &server, &far];
    let directly = stdout(&mut topology.outsider("python3", &script));
    let expected = format!("far={CLIENT_IP}\nudp={link_ip}\nreconnected={link_ip}\ntcp={link_ip}");
    assert_eq!(directly, expected, "directly");
    assert_eq!(
        stdout(&mut topology.workload("python3", &script)),
        expected,
        "through the agent\n{}",
        agent.log()
    );
    // The script's lookup went through the agent.
    wait_for("the lookup logged", Duration::from_secs(5), || {
        (agent.query_lines("own.example.test").len() == 1).then_some(())
    });
    // A restarted agent knows the server from the table before it redirects anything.
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let restarted = Agent::start(&topology, &[]);
    assert_eq!(shown(&topology), link_ip.to_string(), "{}", restarted.log());
}

/// Host mode on a host whose firewall drops packets to 127.0.0.0/8 from other sources, as
/// kube-proxy's `KUBE-FIREWALL` chain does: a socket bound to the host's address and sent to
/// the block would lose every query (helper-131: glibc's lookups and TCP's all failed, `send`
/// said `EPERM`, and the agent logged nothing). The agent finds that the block does not hear
/// that source, binds nothing, and says why; connected and TCP lookups are answered.
#[test]
fn a_firewall_that_drops_the_hosts_address_to_loopback_keeps_sockets_unbound() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    let client = &topology.client;
    must(client.command("iptables").args(["-N", "KUBE-FIREWALL"]));
    must(client.command("iptables").args([
        "-A",
        "KUBE-FIREWALL",
        "!",
        "-s",
        "127.0.0.0/8",
        "-d",
        "127.0.0.0/8",
        "-m",
        "conntrack",
        "!",
        "--ctstate",
        "RELATED,ESTABLISHED,DNAT",
        "-j",
        "DROP",
    ]));
    for chain in ["INPUT", "OUTPUT"] {
        must(
            client
                .command("iptables")
                .args(["-A", chain, "-j", "KUBE-FIREWALL"]),
        );
    }
    // The agent looks again when the routes change: the source toward the Internet appears.
    route_default_via_server(client);
    wait_for_log(
        agent,
        &format!("send from the block route's source, not from {CLIENT_IP} as toward the Internet"),
    );
    let server = format!("{SERVER_IP}:53");
    for (at, mode) in ["connect", "tcp", "sendto"].into_iter().enumerate() {
        let name = format!("kubefw{at}.example.test");
        assert_eq!(
            probe_at(topology, mode, &server, &name, &[]),
            format!("source={server} answer={ANSWER_IP}"),
            "{mode}"
        );
        forwarded(agent, &name);
    }
}

/// The same on a node: a host process shows the node's own address, not the block's
/// (169.254.53.0, which a later `connect` elsewhere would keep and send from, link-local,
/// where no answer comes back), and a pod its own.
#[test]
fn on_a_node_sockets_show_their_own_namespaces_source() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let args = [format!("--listen={}:53", tests::node::NODE_LISTEN)];
    let agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);
    add_default_route(&node.node, &agent);
    let (server, far) = (SERVER_IP.to_string(), FAR_IP.to_string());
    let script = ["-c", OWN_ADDRESS_SCRIPT, &server, &far];
    let host = stdout(&mut node.host("python3", &script));
    assert_eq!(host, own_address_lines(CLIENT_IP), "a host process");
    let pod = stdout(&mut node.pod(0, "python3", &script));
    assert_eq!(pod, own_address_lines(tests::node::PODS[0].0), "a pod");
    wait_for("both lookups logged", Duration::from_secs(5), || {
        (agent.query_lines("own.example.test").len() == 2).then_some(())
    });
}

/// Host mode: the IPv4 block in 127/8 loses its route while the agent runs (another program
/// deletes loopback's `local 127.0.0.0/8`, leaving 127.0.0.1's own; `lo` down or its address
/// gone take it too). IPv4 lookups then go direct and are answered, and `/readyz` says why,
/// instead of every redirected one being lost while the agent said it was ready (an
/// adversary's case: 20 of 20); once the route is back they are redirected again.
#[test]
fn a_loopback_block_that_loses_its_route_is_not_redirected_to_until_it_is_back() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[&format!("--metrics={METRICS}")]);
    let route = |verb: &str| {
        must(Command::new("ip").args([
            "-n",
            &topology.client.name,
            "route",
            verb,
            "local",
            "127.0.0.0/8",
            "dev",
            "lo",
            "table",
            "local",
            "src",
            "127.0.0.1",
        ]));
    };
    let readyz = || tests::http_get(&topology.client, metrics_addr(), "/readyz");
    let dig = |name: &str| {
        assert_answered(
            dig_at(
                topology.workload("dig", &[]),
                &SERVER_IP.to_string(),
                name,
                &[],
            ),
            name,
        );
    };
    dig("before.example.test");
    forwarded(agent, "before.example.test");
    route("del");
    wait_for_log(agent, "no longer routed to this host");
    for i in 0..5 {
        dig(&format!("unrouted{i}.example.test"));
    }
    assert!(
        agent.query_lines("unrouted4.example.test").is_empty(),
        "went direct, not to the agent"
    );
    let (status, body) = readyz();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no longer routed to this host"), "{body}");
    route("add");
    wait_for_log(agent, "routed to this host again");
    dig("after.example.test");
    forwarded(agent, "after.example.test");
    assert_eq!(readyz().0, 200);

    // `lo` down: the kernel keeps loopback's route, and delivers nothing there (an adversary's
    // case: every lookup lost while the agent saw the block routed).
    let lo = |state: &str| {
        must(Command::new("ip").args(["-n", &topology.client.name, "link", "set", "lo", state]));
    };
    let unrouted = |times: usize| {
        wait_for(
            "the agent to see the block unrouted",
            Duration::from_secs(5),
            || {
                (agent.log().matches("no longer routed to this host").count() >= times)
                    .then_some(())
            },
        );
    };
    lo("down");
    unrouted(2);
    for i in 0..3 {
        dig(&format!("lo-down{i}.example.test"));
    }
    assert!(agent.query_lines("lo-down2.example.test").is_empty());
    // Back up, IPv4 is redirected again (the IPv6 block's own route went with `lo`, and only
    // an agent with CAP_NET_ADMIN routes it again: it says so once more).
    lo("up");
    unrouted(3);
    dig("lo-up.example.test");
    forwarded(agent, "lo-up.example.test");
}

/// Host mode: the IPv6 block loses its route while the agent runs (IPv6 switched off and on
/// on `lo` flushes it). IPv6 lookups then go direct and are answered, instead of following
/// the default route to nowhere; IPv4 ones are still redirected.
#[test]
fn an_ipv6_block_that_loses_its_route_leaves_ipv4_redirected() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);
    must(Command::new("ip").args([
        "-n",
        &topology.client.name,
        "-6",
        "route",
        "del",
        "local",
        "fd53:6e73:6470::/112",
        "dev",
        "lo",
        "table",
        "local",
    ]));
    wait_for_log(agent, "no longer routed to this host");
    let dig = |server: String, name: &str| {
        assert_answered(
            dig_at(topology.workload("dig", &[]), &server, name, &[]),
            name,
        );
    };
    dig(tests::SERVER_IP6.to_string(), "v6-unrouted.example.test");
    dig(SERVER_IP.to_string(), "v4-still.example.test");
    forwarded(agent, "v4-still.example.test");
    assert!(
        agent.query_lines("v6-unrouted.example.test").is_empty(),
        "the IPv6 lookup went direct"
    );
}
