//! Node mode: pods in network namespaces of their own, redirected to a link-local address on
//! the node, and host processes, all answered at once by one agent in the node's namespace.
use tests::{
    CLIENT_IP,
    node::{NODE_LISTEN, NodeTopology, PODS},
};

use super::*;

#[test]
fn pods_and_host_processes_resolve_at_once_even_from_the_same_port() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    // Pod 1 asks another server, with another answer: were the two pods' flows (same port)
    // confused, one of them would get the other's answer.
    node.add_server_address(SECOND_SERVER_IP);
    let _second = DnsServer::launch(
        &node.server,
        &node.node,
        SECOND_SERVER_IP,
        SECOND_ANSWER_IP,
        false,
    );
    let asks = [(SERVER_IP, ANSWER_IP), (SECOND_SERVER_IP, SECOND_ANSWER_IP)];
    let listen = format!("--listen={NODE_LISTEN}:53");
    let agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &[listen]);
    assert!(
        agent.log().contains("IPv6 lookups are left alone"),
        "{}",
        agent.log()
    );

    for round in 0..10 {
        // Both pods send from port 40000 at the same moment; the host resolves beside them.
        let mut probes = Vec::new();
        for (pod, (server, answer)) in asks.into_iter().enumerate() {
            let name = format!("r{round}.pod{pod}.example.test");
            let server = format!("{server}:53");
            probes.push(ConcurrentProbe {
                command: node.pod(pod, PROBE, &["sendto", &server, &name, "--port", "40000"]),
                expected: format!("source={server} answer={answer}"),
                name,
            });
        }
        let name = format!("r{round}.host.example.test");
        let server = format!("{SERVER_IP}:53");
        probes.push(ConcurrentProbe {
            command: node.host(PROBE, &["connect", &server, &name]),
            expected: format!("source={server} answer={ANSWER_IP}"),
            name,
        });
        run_together(probes);
    }
    // Each pod was told apart by its own address, on the same port.
    for (pod, (pod_ip, _)) in PODS.into_iter().enumerate() {
        let line = forwarded(&agent, &format!("r9.pod{pod}.example.test"));
        assert!(line.contains(&format!("client={pod_ip}:40000 ")), "{line}");
        assert!(
            line.contains(&format!("server={}:53", asks[pod].0)),
            "{line}"
        );
    }
    forwarded(&agent, "r9.host.example.test");
}

/// A pod given the agent's own listen address as its nameserver (a container's `--dns
/// 169.254.53.0`) is answered REFUSED at once, from that address, and its resolver moves on:
/// the query was dropped as a loop, and glibc waited out its 10 s timeout (helper-97).
#[test]
fn a_pod_asking_the_proxys_own_address_is_refused_at_once() {
    let node = NodeTopology::new();
    let _agent = launch_with_metrics(&node);
    let started = Instant::now();
    let answer = tests::dig_at(
        node.pod(0, "dig", &[]),
        &NODE_LISTEN.to_string(),
        "itself.example.test",
        &[],
    )
    .unwrap_or_else(|err| panic!("dig: {err}"));
    assert!(answer.contains("status: REFUSED"), "{answer}");
    assert!(
        answer.contains(&format!("SERVER: {NODE_LISTEN}#53")),
        "{answer}"
    );
    // dig's one try of 1 s shows "at once"; this bounds the rest (starting `ip netns exec`
    // and dig on a busy machine).
    assert!(started.elapsed() < Duration::from_secs(3), "{answer}");
    let page = scrape_node(&node);
    assert_eq!(
        value(
            &page,
            "dns_proxy_dropped_total{protocol=\"udp\",reason=\"loop\"}"
        ),
        1
    );
}

/// Node mode: a pod that connects to 200 servers (one container can, unprivileged) takes its
/// share of the node's /24, 15 servers, and no more: the other pod and the node's own processes
/// still get an index of their own, and the greedy pod still resolves through the server's
/// shared index. Without a share it took the whole table in under a second (helper-109).
#[test]
fn a_pod_cannot_take_the_nodes_table_from_the_other_pods() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let agent = launch_with_metrics(&node);
    let slots = || attached_map_entries(node.redirected_cgroup(), "SERVERS");
    let resolves = |dig: Command, name: &str| {
        let answer = tests::dig_at(dig, &SERVER_IP.to_string(), name, &["+short"]);
        assert_eq!(answer.expect("answered").trim(), ANSWER_IP.to_string());
    };
    // Servers of TEST-NET-2's neighbour, reached (were they asked) by the pod's default route.
    let mut greedy = tests::Process::spawn(
        node.pod(0, HOSTILE, &["hold", "10.1.0.1:53", "200", "--distinct"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    assert_eq!(greedy.first_line_of_stdout(), "holding 200");
    let page = scrape_node(&node);
    assert_eq!(slots(), 30, "15 pairs and their shared origins: {page}");
    assert_eq!(
        value(&page, "dns_proxy_kernel_workload_limit_total"),
        200 - 15,
        "{page}"
    );
    assert_eq!(no_room_counts(&page), (0, 0), "{page}");

    let (other_pod, _) = PODS[1];
    resolves(node.pod(1, "dig", &[]), "other-pod.example.test");
    let line = forwarded(&agent, "other-pod.example.test");
    assert!(line.contains(&format!("client={other_pod}:")), "{line}");
    assert!(
        attributed_to(&line, &node.pod_cgroups[1]),
        "the other pod's own workload: {line}"
    );
    resolves(node.host("dig", &[]), "node-process.example.test");
    let line = forwarded(&agent, "node-process.example.test");
    assert!(
        attributed_to(&line, &node.host_cgroup),
        "the node process's own workload: {line}"
    );
    assert_eq!(slots(), 33, "{}", scrape_node(&node));

    // The greedy pod, at its share, still resolves: through the server's shared index.
    resolves(node.pod(0, "dig", &[]), "greedy-pod.example.test");
    let line = forwarded(&agent, "greedy-pod.example.test");
    assert!(line.ends_with(" workload=unknown"), "{line}");
    assert_eq!(slots(), 33, "{}", scrape_node(&node));
    greedy.finish_with_stdout(Duration::from_secs(30));
}

/// The agent on `node` as the DaemonSet runs it, listening on [`NODE_LISTEN`], with metrics.
fn launch_with_metrics(node: &NodeTopology) -> Agent {
    let args = [
        format!("--listen={NODE_LISTEN}:53"),
        format!("--metrics={METRICS}"),
    ];
    Agent::launch(&node.node, node.redirected_cgroup(), None, &args)
}

/// The node agent's metrics page.
fn scrape_node(node: &NodeTopology) -> String {
    let (status, page) = tests::http_get(&node.node, metrics_addr(), "/metrics");
    assert_eq!(status, 200, "{page}");
    page
}

/// A server excluded with `--exclude-server` (one that answers by its asker's address, as
/// Podman's aardvark-dns does) is asked directly by every workload, from its own address, while
/// other servers are still asked through the agent, also with every IPv6 server excluded.
/// Servers here answer with the address they were asked from.
#[test]
fn an_excluded_server_is_asked_directly_from_the_workloads_own_address() {
    use std::net::Ipv4Addr;
    // One server excluded by its address, one by a prefix that holds it.
    const IN_PREFIX: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
    let node = NodeTopology::new();
    let whoami = |ip: Ipv4Addr| {
        if ip != SERVER_IP {
            node.add_server_address(ip);
        }
        let mut command = node.server.command(env!("CARGO_BIN_EXE_test-upstream"));
        command.args([&format!("{ip}:53"), "0", "source"]);
        let process = tests::Process::spawn(&mut command);
        wait_for("the server to answer", Duration::from_secs(10), || {
            tests::dig_at(
                node.node.command("dig"),
                &ip.to_string(),
                "ready.test",
                &["+time=1"],
            )
            .ok()
        });
        process
    };
    let _servers = [SERVER_IP, SECOND_SERVER_IP, IN_PREFIX].map(whoami);
    let args = [
        format!("--listen={NODE_LISTEN}:53"),
        format!("--metrics={METRICS}"),
        format!("--exclude-server={SECOND_SERVER_IP}"),
        "--exclude-server=192.0.2.192/26".to_owned(),
        // Every IPv6 server, and none of the IPv4 ones.
        "--exclude-server=::/0".to_owned(),
    ];
    let agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);
    wait_for_log(
        &agent,
        "never redirecting lookups to 192.0.2.3/32, 192.0.2.192/26, ::/0",
    );
    wait_for_log(
        &agent,
        "--exclude-server ::/0 holds every server of its family",
    );
    let (pod_ip, _) = PODS[0];
    let ask = |mode: &str, server: &str, name: &str| {
        let output = must(&mut node.pod(0, PROBE, &[mode, server, name]));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let redirected = format!("{SERVER_IP}:53");
    // Each excluded server, and its v4-mapped address, which a dual-stack socket asks.
    let excluded = [SECOND_SERVER_IP, IN_PREFIX]
        .into_iter()
        .flat_map(|ip| [format!("{ip}:53"), format!("[::ffff:{ip}]:53")]);
    for mode in ["sendto", "connect"] {
        // Through the agent, the server sees the node's address...
        let name = format!("{mode}.redirected.test");
        let line = ask(mode, &redirected, &name);
        assert_eq!(line, format!("source={redirected} answer={CLIENT_IP}"));
        forwarded(&agent, &name);
        // ...and an excluded one the pod's own.
        for (i, server) in excluded.clone().enumerate() {
            let name = format!("{mode}.excluded{i}.test");
            let line = ask(mode, &server, &name);
            assert_eq!(line, format!("source={server} answer={pod_ip}"));
            assert_eq!(agent.query_line(&name), None, "the agent forwarded {name}");
        }
    }
    // Each of the eight lookups to them counted (a dual-stack connect more than once).
    let page = scrape_node(&node);
    let skipped = value(&page, "dns_proxy_kernel_skipped_excluded_server_total");
    assert!(skipped >= 8, "{page}");
    assert_eq!(
        value(&page, "dns_proxy_kernel_redirected_total"),
        2,
        "{page}"
    );
}

/// A pod asks a server whose port is closed: its connected socket reads ECONNREFUSED through
/// the agent as directly (the agent sends it the port unreachable from the block address, as
/// the server would have), so a resolver moves on at once; c-ares in Node.js, told REFUSED
/// instead, failed every such lookup.
#[test]
fn a_pods_connected_socket_reads_a_closed_servers_refusal_as_directly() {
    let node = NodeTopology::new();
    // The address exists; nothing listens on its port 53.
    node.add_server_address(SECOND_SERVER_IP);
    let closed = format!("{SECOND_SERVER_IP}:53");
    let outcome = |command: &mut Command| {
        let output = command.output().expect("run the probe");
        String::from_utf8_lossy(&output.stderr).trim().to_owned()
    };
    let directly = outcome(&mut node.pod(0, PROBE, &["connect", &closed, "direct.example.test"]));
    assert!(directly.contains("refused"), "{directly}");
    let agent = Agent::launch(
        &node.node,
        node.redirected_cgroup(),
        None,
        &[format!("--listen={NODE_LISTEN}:53")],
    );
    for i in 0..2 {
        let name = format!("closed{i}.example.test");
        let through = outcome(&mut node.pod(0, PROBE, &["connect", &closed, &name]));
        assert_eq!(
            through,
            directly.replace("direct", &format!("closed{i}")),
            "{}",
            agent.log()
        );
    }
}

/// A pod's connected UDP socket that lives across a graceful restart of the node's agent and
/// across SIGKILL and a restart, retrying once on the same socket, as c-ares and nginx's
/// resolver do: the pod's lookups reach the node's block from another namespace, through its
/// veth, where the kernel's refusals while no agent runs are rate-limited (unlike on `lo`).
#[test]
fn a_pods_long_lived_connected_socket_keeps_resolving_across_restarts() {
    let _apart = super::one_flood_at_a_time();
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let listen = [format!("--listen={NODE_LISTEN}:53")];
    let start = || Agent::launch(&node.node, node.redirected_cgroup(), None, &listen);
    let mut agent = start();
    let mut client = tests::Process::spawn(
        node.pod(
            0,
            env!("CARGO_BIN_EXE_hostile-client"),
            &[
                "long-lived",
                &format!("{SERVER_IP}:53"),
                "pl",
                "32",
                "500",
                // Two tries of 2.5 s: a restart on a loaded machine takes more than one
                // second, and a lookup sent meanwhile is refused.
                "2500",
            ],
        )
        .stdout(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(3000));
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let mut agent = start();
    std::thread::sleep(Duration::from_millis(4000));
    agent.process().signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let agent = start();
    let output = client.finish_with_stdout(Duration::from_secs(30));
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 32, "{output}");
    let failed: Vec<&&str> = lines.iter().filter(|l| !l.contains("answered")).collect();
    assert!(failed.is_empty(), "lookups lost:\n{output}");
    let served_last = agent.query_lines_once_logged("pl-31.example.test", 1);
    assert_eq!(served_last.len(), 1, "{}", agent.log());
}

/// A pod's client with one UDP socket, connected for its whole life, that looks up in rounds.
struct ConnectedRounds {
    client: std::process::Child,
    ask: std::process::ChildStdin,
    told: BufReader<std::process::ChildStdout>,
}

impl ConnectedRounds {
    fn start(node: &NodeTopology, timeout_ms: u32) -> Self {
        let server = format!("{SERVER_IP}:53");
        let mut client = node
            .pod(
                0,
                HOSTILE,
                &["connected-rounds", &server, &timeout_ms.to_string()],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the client");
        let ask = client.stdin.take().expect("its stdin");
        let told = BufReader::new(client.stdout.take().expect("its stdout"));
        Self { client, ask, told }
    }

    /// `count` lookups, one every `interval_ms`: a line each, `PREFIX-N OUTCOME ms=M`.
    fn round(&mut self, prefix: &str, count: u32, interval_ms: u32) -> Vec<String> {
        self.begin(prefix, count, interval_ms);
        self.outcomes()
    }

    /// Starts a round, whose lines [`outcomes`](Self::outcomes) reads.
    fn begin(&mut self, prefix: &str, count: u32, interval_ms: u32) {
        use std::io::Write as _;
        writeln!(self.ask, "{prefix} {count} {interval_ms}").expect("ask the client");
    }

    /// The lines of the round begun last, once it is done.
    fn outcomes(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = self.told.read_line(&mut line).expect("read the client");
            assert_ne!(read, 0, "the client ended: {lines:#?}");
            if line.trim() == "round done" {
                return lines;
            }
            lines.push(line.trim().to_owned());
        }
    }
}

impl Drop for ConnectedRounds {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

/// The lines of `round` that are not refused within `ms` milliseconds.
fn not_refused_within(round: &[String], ms: u128) -> Vec<&String> {
    round
        .iter()
        .filter(|line| {
            let took = line
                .rsplit_once("ms=")
                .and_then(|(_, ms)| ms.parse::<u128>().ok())
                .expect("a time");
            !line.contains(" refused (") || took > ms
        })
        .collect()
}

/// The programs attached to `cgroup`, sorted.
fn programs_on(cgroup: &std::path::Path) -> Vec<String> {
    let mut programs = tests::attached_programs(cgroup);
    programs.sort();
    programs
}

/// A pod's UDP socket connected through the node's agent is refused as it sends (`EPERM`)
/// while no agent serves, every time: after a SIGKILL and after a stop. The node's own refusal
/// (port unreachable) is rate-limited per pod address, and a busy socket's lookups waited out
/// their timeout instead (helper-201: 14 of 50; here 10 of 40). The dead agent leaves its
/// egress guard pinned for that, which the next agent replaces. A newer agent that stops or is
/// killed while the one it took over from still serves leaves that one's pods answered, and
/// its pinned links are replaced by that one's at its next heartbeat. A stop answers the
/// socket while it drains, and refuses it at once from the moment it lets go of the block;
/// the last agent to stop leaves its own guard pinned, whose refusals last 60 s from then.
#[test]
fn a_pods_connected_socket_is_refused_at_once_while_no_agent_serves() {
    let _apart = super::one_flood_at_a_time();
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let listen = format!("--listen={NODE_LISTEN}:53");
    let launch = |args: &[&str]| {
        let mut all = vec![listen.clone()];
        all.extend(args.iter().map(|arg| (*arg).to_owned()));
        Agent::launch(&node.node, node.redirected_cgroup(), None, &all)
    };
    let all_answered = |round: &[String], agent: &Agent| {
        let answered = round.iter().all(|line| line.contains(" answered "));
        assert!(answered, "{round:#?}\n{}", agent.log());
    };
    let mut agent = launch(&[]);
    let mut client = ConnectedRounds::start(&node, 2000);
    let up = client.round("up", 3, 100);
    all_answered(&up, &agent);

    agent.process().signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let cgroup = node.redirected_cgroup();
    assert_eq!(
        programs_on(cgroup),
        ["dns_proxy_egress", "dns_proxy_sock_release"]
    );
    let killed = client.round("killed", 40, 100);
    let slow = not_refused_within(&killed, 100);
    assert!(slow.is_empty(), "{slow:#?}");

    // The next agent answers the same socket, and the dead one's guard is gone.
    let older = launch(&[]);
    let back = client.round("back", 3, 100);
    all_answered(&back, &older);
    assert_eq!(
        programs_on(cgroup)
            .iter()
            .filter(|name| *name == "dns_proxy_egress")
            .count(),
        1
    );

    // A newer agent takes over and stops, gracefully, while the older one still runs (a
    // rollout rolled back); another takes over and is killed. The older agent's pods are
    // answered throughout: each agent has a slot of its own in SERVING (with one for all,
    // 12 of 40 lookups were refused after a failed takeover, helper-202).
    // The newer agent's links, pinned over the older one's, are taken back at the older
    // one's next heartbeat, so that the guard left is the one whose agent runs.
    let mut older = older;
    let linked = |program: &str| {
        let attached = programs_on(cgroup);
        attached.iter().filter(|name| *name == program).count()
    };
    for (taken_back, (round, signal)) in [
        ("rolled-back", libc::SIGTERM),
        ("killed-newer", libc::SIGKILL),
    ]
    .into_iter()
    .enumerate()
    {
        let mut newer = launch(&["--takeover"]);
        let taken = client.round(&format!("{round}-taken"), 3, 100);
        all_answered(&taken, &newer);
        forwarded(&newer, &format!("{round}-taken-2.example.test"));
        // It took the slot after the older agent's.
        assert!(
            !newer.log().contains("no slot of SERVING"),
            "{}",
            newer.log()
        );
        newer.process().signal(signal);
        newer.wait_exit(Duration::from_secs(10));
        let after = client.round(round, 30, 100);
        all_answered(&after, &older);
        wait_for(
            "the older agent's heartbeat to pin its guard again",
            Duration::from_secs(5),
            || {
                let log = older.log();
                let pinned = "pinned dns_proxy_egress in ";
                (log.matches(pinned).count() > taken_back).then_some(())
            },
        );
        for program in ["dns_proxy_egress", "dns_proxy_sock_release"] {
            assert_eq!(linked(program), 1, "{program}\n{}", older.log());
        }
    }

    // A stop: answered while it drains (4 s of its 5), then refused at once, as after it.
    client.begin("stopping", 60, 100);
    std::thread::sleep(Duration::from_millis(500));
    older.process().signal(libc::SIGTERM);
    assert!(older.wait_exit(Duration::from_secs(10)).success());
    let stopping = client.outcomes();
    let answered_first = stopping
        .iter()
        .take_while(|line| line.contains(" answered "))
        .count();
    assert!(answered_first >= 30, "{stopping:#?}");
    let slow = not_refused_within(&stopping[answered_first..], 100);
    assert!(slow.is_empty(), "{stopping:#?}\n{}", older.log());
    let stopped = client.round("stopped", 20, 100);
    let slow = not_refused_within(&stopped, 100);
    assert!(slow.is_empty(), "{slow:#?}");

    // An agent of a version before SERVING (a rollback) serves and puts nothing there: while
    // its record in AGENTS says it is alive, the guard left refuses nothing, else it refused
    // all of that agent's pods' lookups for 60 s (helper-204: 286 of 286). The tests cannot
    // run that version: its record is written as it writes it (named, telling and steering:
    // flags 7), and here no agent answers, so the node's port unreachable does. A record
    // silent for over 6 s, or one of an agent that fills SERVING (flag 8: one starting),
    // changes nothing; and once the record is gone, the guard refuses again.
    const OLDER_STAMP: u64 = 1;
    let state_dir = node.node.state_dir();
    let record = |silent_for: Duration, flags: u8| {
        let record = tests::AgentRecordBytes {
            cgroup_id: 0,
            heartbeat_ns: tests::boottime_ns() - silent_for.as_nanos() as u64,
            port: 53,
            flags,
        };
        tests::put_agent_record(&state_dir, OLDER_STAMP, &record);
    };
    let refused_at_send = |round: &[String]| {
        let eperm = round.iter().filter(|line| line.contains("(os error 1)"));
        eperm.count()
    };
    for (round, silent_for, flags, refused) in [
        ("older-silent", Duration::from_secs(7), 7, 3),
        ("newer-starting", Duration::ZERO, 7 | 8, 3),
        ("older-alive", Duration::ZERO, 7, 0),
    ] {
        record(silent_for, flags);
        let outcomes = client.round(round, 3, 100);
        assert_eq!(refused_at_send(&outcomes), refused, "{outcomes:#?}");
    }
    tests::remove_agent_record(&state_dir, OLDER_STAMP);
    let gone = client.round("older-gone", 3, 100);
    assert_eq!(refused_at_send(&gone), 3, "{gone:#?}");
}

/// An agent of the same table (the state directory shared) on another cgroup, in another
/// network namespace, serves none of this tree's pods: once the tree's own agent stops, a
/// pod's socket still connected to the block is refused at once all the same. With `SERVING`
/// keyed by port alone, the other agent's entry counted, the guard refused nothing, and the
/// socket met the node's rate-limited port unreachable (helper-205: 21 of 49 lookups timed
/// out).
#[test]
fn an_agent_of_the_table_on_another_cgroup_leaves_the_guard_refusing() {
    let _apart = super::one_flood_at_a_time();
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let listen = format!("--listen={NODE_LISTEN}:53");
    let mut agent = Agent::launch(
        &node.node,
        node.redirected_cgroup(),
        None,
        std::slice::from_ref(&listen),
    );
    let elsewhere = tests::TestCgroup::new(&format!("{}-elsewhere", node.tag));
    let shared_table = format!("--state-dir={}", node.node.state_dir().display());
    let other = Agent::launch(
        &node.pods[1],
        &elsewhere.path,
        None,
        &[listen, shared_table],
    );
    wait_for_log(&other, "ready");
    let mut client = ConnectedRounds::start(&node, 2000);
    let up = client.round("up", 3, 100);
    assert!(
        up.iter().all(|line| line.contains(" answered ")),
        "{up:#?}\n{}",
        agent.log()
    );

    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let stopped = client.round("stopped", 20, 100);
    let slow = not_refused_within(&stopped, 100);
    assert!(slow.is_empty(), "{stopped:#?}\n{}", other.log());
}

/// A second agent on the node's tree from another network namespace (here a pod's) is not
/// caught by the lock, which lives in a namespace: each agent's programs refuse (`EPERM`) the
/// addresses the other's rewrote, and every lookup of the tree fails while both say ready.
/// The refusals are said in the log, naming that cause, and once the second agent stops, the
/// lookups are answered again.
#[test]
fn a_second_agent_from_another_namespace_is_named_in_the_log_and_its_stop_mends_the_tree() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let listen = [format!("--listen={NODE_LISTEN}:53")];
    let _first = Agent::launch(&node.node, node.redirected_cgroup(), None, &listen);
    let mut second = Agent::launch(&node.pods[1], node.redirected_cgroup(), None, &listen);
    let ask = |command: Command, name: &str| {
        tests::dig_at(
            command,
            &SERVER_IP.to_string(),
            name,
            &["+tries=1", "+time=2"],
        )
    };
    let refused = ask(node.pod(0, "dig", &[]), "both.example.test")
        .expect_err("answered with two agents on the tree");
    assert!(refused.contains("permission denied"), "{refused}");
    wait_for_log(&second, "a second dns-proxy redirecting this cgroup tree");
    let line = second
        .log()
        .lines()
        .find(|line| line.contains("ForeignRefused"))
        .map(str::to_owned)
        .expect("the refusals' line");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("were refused (EPERM)"), "{line}");

    second.process().signal(libc::SIGTERM);
    assert!(
        second
            .process()
            .wait_exit(Duration::from_secs(10))
            .success()
    );
    for (who, command) in [
        ("pod", node.pod(0, "dig", &[])),
        ("host", node.host("dig", &[])),
    ] {
        assert_answered(ask(command, &format!("{who}.example.test")), who);
    }
}

/// The block's route on the node goes away while the agent runs (another program removes it,
/// or IPv6 switched off and on flushes an IPv6 one). Every lookup the programs sent there
/// would reach no agent; instead the redirect is switched off, so lookups go direct and are
/// answered, `/readyz` says why, and once the route is back the agent redirects again. Also
/// when a narrower local route is left (the block's first address on `lo`).
#[test]
fn a_block_that_loses_its_route_is_not_redirected_to_until_it_is_back() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let agent = launch_with_metrics(&node);
    let lookup = |name: &str| {
        let result = tests::dig_at(node.pod(0, "dig", &[]), &SERVER_IP.to_string(), name, &[]);
        assert_answered(result, name);
    };
    let readyz = || tests::http_get(&node.node, metrics_addr(), "/readyz");
    lookup("before.example.test");
    forwarded(&agent, "before.example.test");
    assert_eq!(readyz().0, 200);

    let block = format!("{NODE_LISTEN}/24");
    let route = |verb: &str| {
        let mut command = Command::new("ip");
        command.args([
            "-n",
            &node.node.name,
            "route",
            verb,
            "local",
            &block,
            "dev",
            "lo",
        ]);
        command.args(["table", "local"]);
        if verb == "add" {
            command.args(["src", &NODE_LISTEN.to_string()]);
        }
        must(&mut command);
    };
    route("del");
    wait_for_log(&agent, "no longer routed to this host");
    for i in 0..5 {
        lookup(&format!("unrouted{i}.example.test"));
    }
    let (status, body) = readyz();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no longer routed to this host"), "{body}");
    assert!(
        agent.query_lines("unrouted4.example.test").is_empty(),
        "went direct, not to the agent"
    );

    route("add");
    wait_for_log(&agent, "routed to this host again");
    lookup("after.example.test");
    forwarded(&agent, "after.example.test");
    assert_eq!(readyz().0, 200);

    // The block's first address on `lo` (as NodeLocal DNSCache puts its own), then the
    // block's route gone: the first address is still local, the servers' addresses are not.
    let listen = format!("{NODE_LISTEN}/32");
    must(Command::new("ip").args(["-n", &node.node.name, "addr", "add", &listen, "dev", "lo"]));
    route("del");
    wait_for(
        "the agent to see the route gone again",
        Duration::from_secs(5),
        || {
            let log = agent.log();
            (log.matches("no longer routed to this host").count() == 2).then_some(())
        },
    );
    lookup("narrowed.example.test");
    assert_eq!(readyz().0, 503);
    assert!(agent.query_lines("narrowed.example.test").is_empty());

    // The first and last server addresses local too (an adversary's case): still not the
    // block; an index between them would reach nothing.
    let prefix = NODE_LISTEN.octets();
    for last in [1, 254] {
        let address = format!("{}.{}.{}.{last}/32", prefix[0], prefix[1], prefix[2]);
        add_local_route(&node.node.name, &address);
    }
    std::thread::sleep(Duration::from_millis(500));
    lookup("ends.example.test");
    assert_eq!(readyz().0, 503, "{}", agent.log());
    assert_eq!(
        agent.log().matches("routed to this host again").count(),
        1,
        "{}",
        agent.log()
    );
}

/// The block's route gone and not back for 30 s, `lo` up: the agent, which dropped the
/// capability to route it again, stops with an error, to be started anew (as systemd and
/// Kubernetes do), and the next agent routes it and redirects again. Lookups go direct in
/// between. Before, it waited for someone to route the block by hand, `/healthz` saying 200.
#[test]
fn an_agent_whose_block_stays_unrouted_stops_to_be_started_anew() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let args = [format!("--listen={NODE_LISTEN}:53")];
    let mut agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);
    let lookup = |name: &str| {
        let result = tests::dig_at(node.pod(0, "dig", &[]), &SERVER_IP.to_string(), name, &[]);
        assert_answered(result, name);
    };
    lookup("before.example.test");
    forwarded(&agent, "before.example.test");
    let block = format!("{NODE_LISTEN}/24");
    must(Command::new("ip").args([
        "-n",
        &node.node.name,
        "route",
        "del",
        "local",
        &block,
        "dev",
        "lo",
        "table",
        "local",
    ]));
    wait_for_log(&agent, "no longer routed to this host");
    lookup("unrouted.example.test");
    let status = agent.wait_exit(Duration::from_secs(40));
    assert!(!status.success(), "{status}\n{}", agent.log());
    assert!(
        agent
            .log()
            .contains("a block this agent routed has been unrouted for 30s"),
        "{}",
        agent.log()
    );
    lookup("between.example.test");
    let next = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);
    lookup("after.example.test");
    forwarded(&next, "after.example.test");
}

/// A narrower local route left inside the block (by an agent of a smaller block that was
/// SIGKILLed, say: the log's own advice is a larger `--redirect-block`, from the same first
/// address) keeps the block routed here: the addresses it holds are local too. Before, the
/// agent took the block for unrouted, switched the redirect off for good and said to restart,
/// which changed nothing (an adversary's soak).
#[test]
fn a_narrower_local_route_left_inside_the_block_keeps_it_routed() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let (listen, block) = ("169.254.52.0", "169.254.52.0/23");
    add_local_route(&node.node.name, "169.254.52.0/24");
    let args = [
        format!("--listen={listen}:53"),
        format!("--redirect-block={block}"),
        format!("--metrics={METRICS}"),
    ];
    let agent = Agent::launch(&node.node, node.redirected_cgroup(), None, &args);
    for name in ["first.example.test", "second.example.test"] {
        let result = tests::dig_at(node.pod(0, "dig", &[]), &SERVER_IP.to_string(), name, &[]);
        assert_answered(result, name);
        forwarded(&agent, name);
    }
    let (status, body) = tests::http_get(&node.node, metrics_addr(), "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(!agent.log().contains("no longer routed"), "{}", agent.log());
}

/// A port-53 DNAT to the node's own addresses, the rule the CNI portmap plugin makes for a pod
/// with `hostPort: 53`, matches the block too: the lookups redirected there go to the DNAT's
/// server, unseen by the agent, and read as their own server's answers (a pod's, and a host
/// process's connected or TCP ones, which are sent from the node's address toward the server)
/// or are lost (a host process's unconnected UDP, sent from the block's address). The raw
/// table's NOTRACK for the block, as NodeLocal DNSCache sets for its address, keeps them the
/// agent's (operations.md gives both; an adversarial review found the first).
#[test]
fn a_port_53_dnat_to_the_nodes_addresses_takes_redirected_lookups_unless_the_block_is_untracked() {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    node.add_server_address(SECOND_SERVER_IP);
    let _hostport = DnsServer::launch(
        &node.server,
        &node.node,
        SECOND_SERVER_IP,
        SECOND_ANSWER_IP,
        false,
    );
    let agent = Agent::launch(
        &node.node,
        node.redirected_cgroup(),
        None,
        &[format!("--listen={NODE_LISTEN}:53")],
    );
    let asked = format!("{SERVER_IP}:53");
    // What a pod's and a host process's probe print, over UDP and over TCP.
    let answers = |round: &str| -> Vec<String> {
        let mut answers = Vec::new();
        for mode in ["sendto", "tcp"] {
            let name = format!("{round}.{mode}.example.test");
            for mut command in [
                node.pod(0, PROBE, &[mode, &asked, &name]),
                node.host(PROBE, &[mode, &asked, &name]),
            ] {
                let output = command.output().expect("run the probe");
                let printed = [output.stdout, output.stderr].concat();
                answers.push(String::from_utf8_lossy(&printed).trim().to_owned());
            }
        }
        answers
    };
    let from_the_server_asked = vec![format!("source={asked} answer={ANSWER_IP}"); 4];
    assert_eq!(answers("before"), from_the_server_asked, "{}", agent.log());
    // The node has no default route: a host process's socket is sent from the node's address
    // toward the server once the agent has seen it.
    let toward_the_server = format!("asking {SERVER_IP} send from ");
    wait_for(
        "the source toward the server",
        Duration::from_secs(10),
        || agent.log().contains(&toward_the_server).then_some(()),
    );

    // Rules in the node's namespace, gone with it.
    let iptables = |rule: &str| must(node.node.command("iptables").args(rule.split_whitespace()));
    iptables("-t nat -N HOSTPORT");
    for protocol in ["udp", "tcp"] {
        iptables(&format!(
            "-t nat -A HOSTPORT -p {protocol} --dport 53 -j DNAT --to-destination \
             {SECOND_SERVER_IP}:53"
        ));
    }
    for chain in ["PREROUTING", "OUTPUT"] {
        iptables(&format!(
            "-t nat -I {chain} -m addrtype --dst-type LOCAL -j HOSTPORT"
        ));
    }
    // A pod's lookups are answered by the DNAT's server, as the one asked, and so is a host
    // process's TCP lookup. Its unconnected UDP one is lost: sent from the block's address,
    // which no `sendmsg4` can change, its answer comes back from a local address over the
    // veth, a martian.
    let taken = answers("taken");
    let by_the_dnat = format!("source={asked} answer={SECOND_ANSWER_IP}");
    for (i, printed) in taken.iter().enumerate() {
        if i == 1 {
            assert!(!printed.contains("answer="), "host, sendto: {taken:?}");
        } else {
            assert_eq!(printed, &by_the_dnat, "{taken:?}");
        }
    }
    assert!(
        agent.query_lines("taken.sendto.example.test").is_empty(),
        "{}",
        agent.log()
    );

    for chain in ["PREROUTING", "OUTPUT"] {
        for protocol in ["udp", "tcp"] {
            iptables(&format!(
                "-t raw -I {chain} -d {NODE_LISTEN}/24 -p {protocol} --dport 53 -j NOTRACK"
            ));
        }
    }
    assert_eq!(
        answers("untracked"),
        from_the_server_asked,
        "{}",
        agent.log()
    );
    for mode in ["sendto", "tcp"] {
        agent.query_lines_once_logged(&format!("untracked.{mode}.example.test"), 2);
    }
}

/// Routes `prefix` to namespace `netns` itself (`local`, on `lo`, in the local table).
fn add_local_route(netns: &str, prefix: &str) {
    must(Command::new("ip").args([
        "-n", netns, "route", "add", "local", prefix, "dev", "lo", "table", "local",
    ]));
}
