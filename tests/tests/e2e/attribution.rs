//! Which workload asked: the kernel records the cgroup of the task that sent each socket to
//! the proxy, in the block address it chooses, and the agent names that cgroup's workload in
//! its log. No workload can choose that address itself.
use std::{os::unix::fs::MetadataExt as _, path::PathBuf, process::Stdio};

use tests::{PROXY_LISTEN, dig, in_cgroup_and_netns};

use super::*;

const CONTAINER: &str = "4f3c2b1a00112233445566778899aabbccddeeff00112233445566778899aabb";
const POD: &str = "0b5d7d3e-7c9a-4f3e-9d8b-2a1c4e5f6a7b";

#[test]
fn each_query_is_logged_with_the_workload_of_the_cgroup_that_sent_it() {
    // The server too: dropped, it would stop answering.
    let Harness {
        agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[]);
    let docker = child_cgroup(&topology, &format!("docker/{CONTAINER}"));
    let pod = child_cgroup(
        &topology,
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope",
            POD.replace('-', "_")
        ),
    );
    // A service given its subtree (`Delegate=yes`) that mimics that container below itself
    // is named as itself: before, it was named as the container (helper-124).
    let mimic = child_cgroup(&topology, &format!("evil.service/docker/{CONTAINER}"));
    for (cgroup, name, expected) in [
        (
            &docker,
            "docker.example.test",
            format!("workload=docker={}", &CONTAINER[..12]),
        ),
        (
            &pod,
            "pod.example.test",
            format!("workload=pod={POD} container={}", &CONTAINER[..12]),
        ),
        (
            &mimic,
            "mimic.example.test",
            "workload=unit=evil.service".to_owned(),
        ),
    ] {
        let _ = ask_until_named(&agent, &topology, cgroup, name, &expected);
    }
    // A TCP query carries it too.
    let command = in_cgroup_and_netns(&docker, &topology.client, "dig", &[]);
    assert_answered(dig(command, "tcp.example.test", &["+tcp", "+short"]), "tcp");
    let lines = agent.query_lines_once_logged("tcp.example.test", 1);
    assert!(
        lines[0].contains("query tcp ")
            && lines[0].contains(&format!("docker={}", &CONTAINER[..12])),
        "{lines:?}"
    );
}

/// Asks `name` from `cgroup` until the agent's line for the latest lookup names the workload
/// (`expected`, as the line shows it): the first query of a cgroup asks a walk of the cgroups
/// for its name, and the lookups after carry it. At most 5 s, on a loaded machine too. Returns
/// how many lookups it made.
fn ask_until_named(
    agent: &Agent,
    topology: &Topology,
    cgroup: &std::path::Path,
    name: &str,
    expected: &str,
) -> usize {
    let mut asked = 0;
    wait_for(
        &format!("a lookup of {name} logged with {expected}"),
        Duration::from_secs(5),
        || {
            let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
            assert_answered(dig(command, name, &["+short"]), name);
            asked += 1;
            let lines = agent.query_lines_once_logged(name, asked);
            lines[asked - 1].contains(expected).then_some(())
        },
    );
    asked
}

/// Where a new origin's search for a slot starts is a keyed hash, the key each agent's own
/// and random: a workload that knew it could pick servers whose origins take the slots a
/// victim's next server would, and send the victim's lookups direct (an adversarial round
/// did, with 128 connects on an empty table, when the hash had no key). Two agents, each
/// with a fresh table, put the same cgroup's pair and shared origin for one server at other
/// indexes.
#[test]
fn where_a_new_origin_goes_in_the_table_is_each_agents_secret() {
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let asker = child_cgroup(&topology, "asker");
    let asker_id = std::fs::metadata(&asker).expect("stat the cgroup").ino();
    let state_dir = topology.client.state_dir();
    let placements: Vec<(u32, u32)> = (0..2)
        .map(|round| {
            let mut agent = Agent::start(&topology, &[]);
            let command = in_cgroup_and_netns(&asker, &topology.client, "dig", &[]);
            assert_answered(dig(command, "asker.example.test", &["+short"]), "asker");
            let pair = tests::server_index_for(&state_dir, SERVER_IP, 53, Some(asker_id));
            let shared = tests::server_index_for(&state_dir, SERVER_IP, 53, Some(0));
            agent.process().signal(libc::SIGTERM);
            let (status, _) = agent.wait_with_stdout(Duration::from_secs(20));
            assert!(status.success(), "round {round}: {}", agent.log());
            // The next agent makes a fresh table.
            for entry in std::fs::read_dir(&state_dir).expect("read the state dir") {
                std::fs::remove_dir_all(entry.expect("an entry").path()).expect("remove the table");
            }
            (pair, shared)
        })
        .collect();
    assert_ne!(placements[0], placements[1], "{placements:?}");
}

#[test]
fn no_workload_can_address_the_proxy_itself_to_pass_for_another() {
    // The server too: dropped, it would stop answering.
    let Harness {
        agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[]);
    let victim = child_cgroup(&topology, "victim");
    let attacker = child_cgroup(&topology, "attacker");
    let command = in_cgroup_and_netns(&victim, &topology.client, "dig", &[]);
    assert_answered(dig(command, "victim.example.test", &["+short"]), "victim");
    // The address the kernel chose for the victim's cgroup and this server.
    let victim_id = std::fs::metadata(&victim).expect("stat the cgroup").ino();
    let index =
        tests::server_index_for(&topology.client.state_dir(), SERVER_IP, 53, Some(victim_id));
    let block_address =
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 53, 0, 0)) + index);
    let port = PROXY_LISTEN.rsplit_once(':').expect("a port").1;
    // The attacker asks that address directly, over UDP and TCP: refused by the kernel.
    for transport in ["+notcp", "+tcp"] {
        let command = in_cgroup_and_netns(&attacker, &topology.client, "dig", &[]);
        let output = tests::dig_at(
            command,
            &block_address.to_string(),
            "forged.example.test",
            &["-p", port, transport],
        );
        assert!(output.is_err(), "{transport}: {output:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent.query_lines("forged.example.test").is_empty(),
        "{}",
        agent.log()
    );
}

#[test]
fn a_workload_asking_a_servers_shared_address_itself_is_still_named() {
    // The server too: dropped, it would stop answering.
    let Harness {
        agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[]);
    let other = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";
    let asker = child_cgroup(&topology, &format!("docker/{CONTAINER}"));
    let hider = child_cgroup(&topology, &format!("docker/{other}"));
    // The first pair of a server also makes its shared origin (cgroup 0).
    let command = in_cgroup_and_netns(&asker, &topology.client, "dig", &[]);
    assert_answered(dig(command, "asker.example.test", &["+short"]), "asker");
    let index = tests::server_index_for(&topology.client.state_dir(), SERVER_IP, 53, Some(0));
    let shared =
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 53, 0, 0)) + index);
    let port = PROXY_LISTEN.rsplit_once(':').expect("a port").1;
    let hider_id = std::fs::metadata(&hider).expect("stat the cgroup").ino();
    // Another workload asks that address itself, over UDP and TCP: answered, and named (by
    // its cgroup id until the agent has read the cgroup's name).
    let named = |line: &str| {
        line.contains(&format!("workload=docker={}", &other[..12]))
            || line.contains(&format!("workload=cgroup-id={hider_id}"))
    };
    for (transport, name) in [
        ("+notcp", "hider.example.test"),
        ("+tcp", "hider-tcp.example.test"),
    ] {
        let command = in_cgroup_and_netns(&hider, &topology.client, "dig", &[]);
        let output = tests::dig_at(command, &shared.to_string(), name, &["-p", port, transport]);
        assert_answered(output, name);
        let lines = agent.query_lines_once_logged(name, 1);
        assert!(named(&lines[0]), "{transport}: {lines:?}\n{}", agent.log());
    }
    assert_eq!(
        tests::origins_of_cgroup(&topology.client.state_dir(), hider_id),
        1,
        "the hider's own origin of the server"
    );
}

#[test]
fn the_origins_of_a_cgroup_that_is_gone_are_forgotten_and_the_others_kept() {
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    // Checked every second; forgotten once missing from three walks and quiet for 2 s.
    let agent = Agent::start_with_env(
        &topology,
        &[&format!("--metrics={METRICS}")],
        &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")],
    );
    let stays = child_cgroup(&topology, "stays");
    let goes = child_cgroup(&topology, "goes");
    for (cgroup, name) in [(&stays, "stays.example.test"), (&goes, "goes.example.test")] {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        assert_answered(dig(command, name, &["+short"]), name);
    }
    let state_dir = topology.client.state_dir();
    let id = |cgroup: &PathBuf| std::fs::metadata(cgroup).expect("stat the cgroup").ino();
    let (stays_id, goes_id) = (id(&stays), id(&goes));
    assert_eq!(tests::origins_of_cgroup(&state_dir, goes_id), 1);
    std::fs::remove_dir(&goes).expect("remove the departing cgroup");
    wait_for(
        "the departed cgroup's origin forgotten",
        Duration::from_secs(20),
        || (tests::origins_of_cgroup(&state_dir, goes_id) == 0).then_some(()),
    );
    assert_eq!(
        tests::origins_of_cgroup(&state_dir, stays_id),
        1,
        "{}",
        agent.log()
    );
    // Logged after the walk deleted it.
    wait_for_log(&agent, "forgot 1 origins of cgroups that are gone");
    // The cgroup that stayed still resolves through its origin.
    let command = in_cgroup_and_netns(&stays, &topology.client, "dig", &[]);
    assert_answered(dig(command, "again.example.test", &["+short"]), "again");
    // The table's size is on /metrics: the pair that stayed and the server's shared origin,
    // once the forgotten index is freed (two walks after).
    wait_for(
        "the table's size on /metrics",
        Duration::from_secs(10),
        || {
            let page = scrape(&topology);
            (value(&page, "dns_proxy_server_table_entries") == 2).then_some(())
        },
    );
}

#[test]
fn the_dnstap_log_has_every_query_and_answer_with_the_workload_that_asked() {
    tests::require_root();
    let (_dir, log) = dnstap_directory("dnstap");
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let agent = Agent::start(&topology, &[&format!("--dnstap=file:{}", log.display())]);
    let docker = child_cgroup(&topology, &format!("docker/{CONTAINER}"));
    let unit = child_cgroup(&topology, "system.slice/web.service");
    // The first query of a cgroup asks for its name, the log has it from then on.
    let mut asked = Vec::new();
    for (cgroup, name, workload) in [
        (
            &docker,
            "logged-docker.example.test",
            format!("workload=docker={}", &CONTAINER[..12]),
        ),
        (
            &unit,
            "logged-unit.example.test",
            "workload=unit=web.service".to_owned(),
        ),
    ] {
        asked.push((
            name,
            ask_until_named(&agent, &topology, cgroup, name, &workload),
        ));
    }
    let command = in_cgroup_and_netns(&unit, &topology.client, "dig", &[]);
    assert_answered(
        dig(command, "logged-tcp.example.test", &["+tcp", "+short"]),
        "tcp",
    );
    // Written within a second; read as the reader of any dnstap log would.
    let text = wait_for("the dnstap log", Duration::from_secs(5), || {
        let text = dnstap_text(&log);
        text.contains("logged-tcp.example.test").then_some(text)
    });
    for (name, lookups) in asked {
        let named = text.matches(&format!("{name}.")).count();
        // Each lookup three times: its query's question, its answer's question and record. (A
        // lookup named at its first ask is asked once: `>= 4` failed then, in CI.)
        assert!(
            named >= 3 * lookups,
            "{name}: {named} for {lookups} in\n{text}"
        );
    }
    assert!(text.contains("type: CLIENT_QUERY"), "{text}");
    assert!(text.contains("type: CLIENT_RESPONSE"), "{text}");
    assert!(text.contains("socket_protocol: TCP"), "{text}");
    assert!(
        text.contains(&format!("response_address: \"{SERVER_IP}\"")),
        "{text}"
    );
    assert!(text.contains("response_port: 53"), "{text}");
    // Each answer's message carries its query's own time, as its CLIENT_QUERY had it, so a
    // reader pairs them by it (one derived from the latency differed by tens of µs).
    let (queries, responses) = query_times(&text);
    assert!(!responses.is_empty(), "{text}");
    for response in &responses {
        assert!(
            queries.contains(response),
            "a CLIENT_RESPONSE's (query_port, query_time) {response:?} is no CLIENT_QUERY's: \
             {queries:?}"
        );
    }
    // The workload, in each message's `extra` (dnstap-ldns does not print it): full forms.
    let raw = std::fs::read(&log).expect("read the log");
    for workload in [format!("docker={CONTAINER}"), "unit=web.service".to_owned()] {
        assert!(
            raw.windows(workload.len())
                .any(|window| window == workload.as_bytes()),
            "{workload} not in the log; agent:\n{}",
            agent.log()
        );
    }
    drop(agent);
}

/// A dnstap file whose filesystem fills up: every lookup is still answered, and once there is
/// room again the log goes on in a new file (the full one kept aside, whole up to its last
/// frame). Before, a file that failed once got nothing more until the agent restarted.
#[test]
fn a_dnstap_file_whose_filesystem_filled_up_goes_on_in_a_new_one_once_there_is_room() {
    tests::require_root();
    let (dir, log) = dnstap_directory("dnstap-full");
    // A filesystem of the test's own, 64 KiB: a few hundred lookups fill it.
    let _mounted = Unmounted::tmpfs(&dir.0, "size=64k");
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let agent = Agent::start(&topology, &[&format!("--dnstap=file:{}", log.display())]);
    let names = dir
        .0
        .join("..")
        .join(format!("names-{}", tests::unique_tag()));
    let list: String = (0..1500)
        .map(|i| format!("filling-{i}.example.test\n"))
        .collect();
    std::fs::write(&names, list).expect("write the names");
    let output = must(&mut topology.workload(
        "dig",
        &["-f", &names.display().to_string(), "+short", "+tries=1"],
    ));
    let _ = std::fs::remove_file(&names);
    let answered = String::from_utf8_lossy(&output.stdout)
        .matches(&ANSWER_IP.to_string())
        .count();
    assert_eq!(answered, 1500, "{}", agent.log());
    wait_for_log(&agent, "No space left on device");
    // Room again, the full log left where it is.
    must(
        Command::new("mount")
            .args(["-o", "remount,size=1m"])
            .arg(&dir.0),
    );
    // The writer tries again with a backoff doubling up to 30 s: the next try may be that far.
    let text = wait_for("a new dnstap log", Duration::from_secs(40), || {
        let name = "after-room.example.test";
        assert_answered(dig(topology.workload("dig", &[]), name, &["+short"]), name);
        let text = dnstap_text(&log);
        text.contains(name).then_some(text)
    });
    assert!(text.contains("type: CLIENT_RESPONSE"), "{text}");
}

/// A dnstap file on a read-only filesystem (a systemd unit's ProtectSystem=strict) is refused
/// before the agent changes anything: no program attached to the cgroup. It was found only
/// after attaching, and a unit that restarts the agent attached and detached it over and
/// over (helper-88).
#[test]
fn a_dnstap_file_on_a_read_only_filesystem_is_refused_before_anything_is_attached() {
    tests::require_root();
    let (dir, log) = dnstap_directory("dnstap-read-only");
    let _mounted = Unmounted::tmpfs(&dir.0, "ro,size=64k");
    let topology = Topology::new();
    let output = Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.client.name))
        .arg("--")
        .arg(tests::agent_binary())
        .arg("run")
        .arg(format!("--cgroup={}", topology.cgroup.path.display()))
        .arg(format!("--listen={PROXY_LISTEN}"))
        .arg(format!("--dnstap=file:{}", log.display()))
        .env("DNS_PROXY_STATE_DIR", topology.client.state_dir())
        .env("RUST_LOG", "info,dns_proxy=debug")
        .stdout(Stdio::null())
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be written to"), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(!stderr.contains("attached"), "it attached first:\n{stderr}");
    let attached = must(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&topology.cgroup.path),
    );
    assert!(String::from_utf8_lossy(&attached.stdout).trim().is_empty());
}

/// Unmounts a test's filesystem, even when the test fails.
struct Unmounted(PathBuf);

impl Unmounted {
    /// A tmpfs of the test's own at `dir`, mounted with `options`.
    fn tmpfs(dir: &std::path::Path, options: &str) -> Self {
        must(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "tmpfs"])
                .arg(dir),
        );
        Self(dir.to_owned())
    }
}

impl Unmounted {
    /// A bpffs of the test's own mounted over `dir`, as an agent's state directory wants it
    /// (0700).
    fn bpffs(dir: &std::path::Path) -> Self {
        must(
            Command::new("mount")
                .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
                .arg(dir),
        );
        Self(dir.to_owned())
    }

    /// `source` bind-mounted over `target`.
    fn bind(source: &std::path::Path, target: &std::path::Path) -> Self {
        must(Command::new("mount").arg("--bind").arg(source).arg(target));
        Self(target.to_owned())
    }
}

impl Drop for Unmounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A directory of a test's own, removed even when the test fails.
struct RemovedOnDrop(PathBuf);

/// A directory of the test's own for dnstap logs, and the path of the log in it.
/// A dnstap log file read as any reader would (`dnstap-ldns -y`, which `cargo xtask test`
/// installs): its messages as YAML.
/// A message's `query_port` and `query_time`, as `dnstap-ldns` prints them.
type PortAndTime = (String, String);

/// The `(query_port, query_time)` of each CLIENT_QUERY and of each CLIENT_RESPONSE in
/// `dnstap-ldns -y` text.
fn query_times(text: &str) -> (Vec<PortAndTime>, Vec<PortAndTime>) {
    let mut queries = Vec::new();
    let mut responses = Vec::new();
    for message in text.split("\n---") {
        // The message's own fields, below the frame's (`type: MESSAGE` comes first).
        let field = |name: &str| {
            message
                .lines()
                .rev()
                .find_map(|line| line.trim().strip_prefix(name))
                .map(|value| value.trim().to_owned())
        };
        let (Some(kind), Some(port), Some(time)) =
            (field("type:"), field("query_port:"), field("query_time:"))
        else {
            continue;
        };
        match kind.as_str() {
            "CLIENT_QUERY" => queries.push((port, time)),
            "CLIENT_RESPONSE" => responses.push((port, time)),
            _ => {}
        }
    }
    (queries, responses)
}

fn dnstap_text(file: &std::path::Path) -> String {
    let output = std::process::Command::new("dnstap-ldns")
        .args(["-y", "-r"])
        .arg(file)
        .output()
        .expect("dnstap-ldns (cargo xtask test installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn dnstap_directory(tag: &str) -> (RemovedOnDrop, PathBuf) {
    let dir = RemovedOnDrop(
        PathBuf::from("/run/dns-proxy-tests").join(format!("{tag}-{}", tests::unique_tag())),
    );
    std::fs::create_dir_all(&dir.0).expect("mkdir the logs' directory");
    let log = dir.0.join("queries.dnstap");
    (dir, log)
}

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn each_workload_is_told_which_names_it_resolved_to_an_address() {
    use tests::{SECOND_ANSWER_IP, SECOND_SERVER_IP};
    let topology = Topology::new();
    // Servers that answer with TTL 60 (dnsmasq's local answers have TTL 0: expired at once).
    let upstream = |ip, answer| start_test_upstream(&topology, ip, 0, answer);
    let _first = upstream(SERVER_IP, ANSWER_IP);
    let _second = upstream(SECOND_SERVER_IP, SECOND_ANSWER_IP);
    let agent = Agent::start(
        &topology,
        &["--metrics", super::METRICS, "--workload-metrics=1"],
    );
    let other = "5e6f7a8b00112233445566778899aabbccddeeff00112233445566778899aabb";
    let first = child_cgroup(&topology, &format!("docker/{CONTAINER}"));
    let second = child_cgroup(&topology, &format!("docker/{other}"));
    // The same name, each workload asking its own server, which answers it differently.
    for (cgroup, server) in [(&first, SERVER_IP), (&second, SECOND_SERVER_IP)] {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        let output = tests::dig_at(
            command,
            &server.to_string(),
            "shared.example.test",
            &["+short"],
        );
        assert!(output.is_ok(), "{output:?}");
    }
    let get = |query: &str| {
        tests::http_get(
            &topology.client,
            super::metrics_addr(),
            &format!("/v1/resolutions?{query}"),
        )
    };
    // Recorded just after the answer; the workload named by a walk of the cgroups, soon after.
    let (status, body) = wait_for(
        "the first workload's resolution",
        Duration::from_secs(5),
        || {
            let (status, body) = get(&format!(
                "workload=docker%3D{CONTAINER}&address={ANSWER_IP}"
            ));
            body.contains("shared.example.test.")
                .then_some((status, body))
        },
    );
    wait_for(
        "the other workload's resolution",
        Duration::from_secs(5),
        || {
            get(&format!("workload=docker%3D{other}"))
                .1
                .contains("shared.example.test.")
                .then_some(())
        },
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"name\":\"shared.example.test.\"")
            && body.contains(&format!("\"address\":\"{ANSWER_IP}\""))
            && body.contains("\"expires\":"),
        "{body}\n{}",
        agent.log()
    );
    // Not the other workload's answer, nor the other's table.
    let (_, body) = get(&format!(
        "workload=docker%3D{CONTAINER}&address={SECOND_ANSWER_IP}"
    ));
    assert!(body.contains("\"resolutions\":[]"), "{body}");
    let (_, body) = get(&format!("workload=docker%3D{other}"));
    assert!(
        body.contains(&format!("\"address\":\"{SECOND_ANSWER_IP}\""))
            && !body.contains(&ANSWER_IP.to_string()),
        "{body}"
    );
    // The short form names it too; a bad address is refused.
    let (_, body) = get(&format!("workload=docker%3D{}", &other[..12]));
    assert!(body.contains("shared.example.test."), "{body}");
    let (status, _) = get("workload=x&address=not-an-ip");
    assert_eq!(status, 400);
    // --workload-metrics=1: the first workload counted apart, the other as `other`.
    let page = super::scrape(&topology);
    let series =
        |workload: &str| format!("dns_proxy_workload_queries_total{{workload=\"{workload}\"}}");
    assert_eq!(
        super::value(&page, &series(&format!("docker={CONTAINER}"))),
        1,
        "{page}"
    );
    assert_eq!(super::value(&page, &series("other")), 1, "{page}");
}

/// `--workload-metrics N` counts apart the first N workloads that are still there: one whose
/// cgroup is gone gives its place to the next. Before, the first N ever seen kept their
/// places for good, and every later workload was counted as `other` (an adversary's soak: 17
/// of 20 series were of pods long gone).
#[test]
fn a_gone_workloads_place_in_the_workload_metrics_goes_to_the_next() {
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let _agent = Agent::start_with_env(
        &topology,
        &["--metrics", super::METRICS, "--workload-metrics=1"],
        &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")],
    );
    let series =
        |workload: &str| format!("dns_proxy_workload_queries_total{{workload=\"{workload}\"}}");
    let ask = |cgroup: &PathBuf, name: &str| {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        assert_answered(dig(command, name, &["+short"]), name);
    };
    let first = child_cgroup(&topology, "job-first");
    ask(&first, "first.example.test");
    // Named first: a series still by its id has no "job-first" to wait on below, and the wait
    // would pass while the place is taken (a loaded CI machine did so).
    wait_for("the first job named", Duration::from_secs(5), || {
        super::scrape(&topology).contains("job-first").then_some(())
    });
    std::fs::remove_dir(&first).expect("remove the first job's cgroup");
    // Gone from three walks of the tree, a second apart: no series left but `other`.
    wait_for(
        "the first job's series gone",
        Duration::from_secs(20),
        || {
            let page = super::scrape(&topology);
            let workloads = page
                .lines()
                .filter(|line| line.starts_with("dns_proxy_workload_queries_total{"))
                .filter(|line| !line.contains("workload=\"other\""))
                .count();
            (workloads == 0).then_some(())
        },
    );
    let next = child_cgroup(&topology, "job-next");
    ask(&next, "next.example.test");
    let parent = topology.cgroup.path.file_name().expect("a name");
    let workload = format!("cgroup=/{}/job-next", parent.to_string_lossy());
    // Named as soon as the agent has looked the cgroup's name up (a series by its id before).
    let page = wait_for("the next job's series", Duration::from_secs(5), || {
        let page = super::scrape(&topology);
        page.contains(&series(&workload)).then_some(page)
    });
    assert_eq!(super::value(&page, &series(&workload)), 1, "{page}");
    assert_eq!(super::value(&page, &series("other")), 0, "{page}");
}

/// A unit restarted is one workload in a new cgroup each time: it keeps one place of
/// `--workload-metrics N`, and leaves the rest to other workloads. Before, each restart took
/// a place until its cgroup had been gone three walks of the tree (about 3 minutes), and a
/// unit restarting often counted every other workload as `other` (helper-198); and then a
/// restart that asked before the agent had named its cgroup still took a place, or was
/// counted as `other` (helper-200).
#[test]
fn a_restarted_unit_keeps_one_place_in_the_workload_metrics() {
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let _agent = Agent::start(
        &topology,
        &["--metrics", super::METRICS, "--workload-metrics=2"],
    );
    let series =
        |unit: &str| format!("dns_proxy_workload_queries_total{{workload=\"unit={unit}\"}}");
    let ask = |cgroup: &PathBuf, name: &str| {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        assert_answered(dig(command, name, &["+short"]), name);
    };
    // Another workload takes one of the two places; the restarted unit has the other.
    let other = child_cgroup(&topology, "other.service");
    ask(&other, "other.example.test");
    // Each instance asks as it starts, before the agent can have named its cgroup, and again
    // a second later.
    for restart in 1..=3 {
        let unit = child_cgroup(&topology, "restarted.service");
        ask(&unit, &format!("restart-{restart}a.example.test"));
        std::thread::sleep(Duration::from_secs(1));
        ask(&unit, &format!("restart-{restart}b.example.test"));
        std::fs::remove_dir(&unit).expect("stop the unit: remove its cgroup");
    }
    let page = wait_for("the unit's one series", Duration::from_secs(10), || {
        let page = super::scrape(&topology);
        (super::value(&page, &series("restarted.service")) == 6).then_some(page)
    });
    assert_eq!(super::value(&page, &series("other.service")), 1, "{page}");
    assert_eq!(
        super::value(&page, &series("restarted.service")),
        6,
        "{page}"
    );
    assert_eq!(
        super::value(
            &page,
            "dns_proxy_workload_queries_total{workload=\"other\"}"
        ),
        0,
        "{page}"
    );
}

/// Log rotation (logrotate's default: the file moved away, an empty one made, SIGHUP): the
/// agent ends the moved file and writes the next lookups to the path. Before, SIGHUP was
/// ignored and the agent kept writing to the moved file.
#[test]
fn sighup_starts_the_dnstap_file_anew_for_log_rotation() {
    tests::require_root();
    let (_dir, log) = dnstap_directory("rotate");
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[&format!("--dnstap=file:{}", log.display())]);
    let ask = |name: &str| {
        let command = topology.workload("dig", &[]);
        assert_answered(dig(command, name, &["+short"]), name);
    };
    ask("before.example.test");
    wait_for(
        "the first lookup in the log",
        Duration::from_secs(5),
        || {
            dnstap_text(&log)
                .contains("before.example.test")
                .then_some(())
        },
    );
    let rotated = log.with_extension("dnstap.1");
    std::fs::rename(&log, &rotated).expect("move the log away");
    std::fs::File::create(&log).expect("an empty log, as logrotate makes");
    agent.process().signal(libc::SIGHUP);
    wait_for_log(&agent, "dnstap: reopening");
    ask("after.example.test");
    wait_for(
        "the second lookup in the new log",
        Duration::from_secs(5),
        || {
            dnstap_text(&log)
                .contains("after.example.test")
                .then_some(())
        },
    );
    let old = dnstap_text(&rotated);
    assert!(old.contains("before.example.test"), "{old}");
    assert!(!old.contains("after.example.test"), "{old}");
    assert!(agent.process().is_running(), "{}", agent.log());
}

#[test]
fn a_workload_whose_cgroup_is_gone_is_still_found_by_name_in_its_resolutions() {
    use tests::{SECOND_ANSWER_IP, SECOND_SERVER_IP};
    let topology = Topology::new();
    let _upstream = start_test_upstream(&topology, SECOND_SERVER_IP, 0, SECOND_ANSWER_IP);
    // At info, with nothing else that names workloads (no debug log, dnstap or
    // --workload-metrics): only the table of names asks for the job's name.
    let agent = Agent::start_quiet(&topology, &["--metrics", super::METRICS]);
    let job = child_cgroup(&topology, &format!("docker/{CONTAINER}"));
    let command = in_cgroup_and_netns(&job, &topology.client, "dig", &[]);
    let output = tests::dig_at(
        command,
        &SECOND_SERVER_IP.to_string(),
        "job.example.test",
        &["+short"],
    );
    assert!(output.is_ok(), "{output:?}");
    let resolutions = || {
        tests::http_get(
            &topology.client,
            super::metrics_addr(),
            &format!("/v1/resolutions?workload=docker%3D{CONTAINER}"),
        )
    };
    // Found by name once the walk of the cgroups named it (soon after its first lookup)...
    wait_for("the job found by name", Duration::from_secs(5), || {
        resolutions().1.contains("job.example.test.").then_some(())
    });
    // ...and still once it ended, its cgroup removed with it.
    std::fs::remove_dir(&job).expect("remove the job's cgroup");
    let (status, body) = resolutions();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"name\":\"job.example.test.\"")
            && body.contains(&format!("\"address\":\"{SECOND_ANSWER_IP}\"")),
        "{body}\n{}",
        agent.log()
    );
}

/// Two servers, and an agent with a table of six indexes, one UDP thread (so one copy of what
/// was read of the table), and departed cgroups forgotten within seconds.
fn a_table_of_six_indexes() -> (Topology, [tests::DnsServer; 2], Agent) {
    use tests::{DnsServer, SECOND_ANSWER_IP, SECOND_SERVER_IP};
    let topology = Topology::new();
    let servers = [
        DnsServer::start(&topology),
        DnsServer::start_on(&topology, SECOND_SERVER_IP, SECOND_ANSWER_IP),
    ];
    let agent = Agent::start_with_env(
        &topology,
        &["--redirect-block=127.53.0.0/29", "--udp-threads=1"],
        &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")],
    );
    (topology, servers, agent)
}

#[test]
fn an_index_forgotten_and_given_to_another_origin_is_read_anew() {
    use tests::{SECOND_ANSWER_IP, SECOND_SERVER_IP};
    let (topology, _servers, agent) = a_table_of_six_indexes();
    let ask = |cgroup: &PathBuf, server: std::net::Ipv4Addr, name: &str| {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        tests::dig_at(command, &server.to_string(), name, &["+short"])
    };
    // Fill the table: each server's first pair also takes its shared origin.
    let departs = child_cgroup(&topology, "departs");
    let others: Vec<PathBuf> = ["b", "e", "f"]
        .iter()
        .map(|name| child_cgroup(&topology, name))
        .collect();
    let answer = ask(&departs, SERVER_IP, "first.example.test").expect("answered");
    assert_eq!(answer.trim(), ANSWER_IP.to_string());
    for (cgroup, server) in others
        .iter()
        .zip([SECOND_SERVER_IP, SECOND_SERVER_IP, SERVER_IP])
    {
        assert!(ask(cgroup, server, "filler.example.test").is_ok());
    }
    // The departing cgroup goes; its origin is forgotten, and, once the listeners have
    // dropped what they read of it, its index is freed: the only free one.
    std::fs::remove_dir(&departs).expect("remove the departing cgroup");
    wait_for(
        "the departed origin forgotten and its index freed",
        Duration::from_secs(20),
        || agent.log().contains("freed 1 indexes").then_some(()),
    );
    assert!(agent.log().contains("forgot 1 origins"), "{}", agent.log());
    let arrives = child_cgroup(&topology, "arrives");
    let answer = ask(&arrives, SECOND_SERVER_IP, "reused.example.test").expect("answered");
    assert_eq!(
        answer.trim(),
        SECOND_ANSWER_IP.to_string(),
        "the second server's answer, not the first's: {}",
        agent.log()
    );
    let line = agent
        .query_lines_once_logged("reused.example.test", 1)
        .remove(0);
    assert!(
        line.contains(&format!("server={SECOND_SERVER_IP}:53")) && !line.contains("departs"),
        "{line}"
    );
}

/// A socket connected from a cgroup that is then removed (its process moved on): its origin
/// is kept as long as the socket lives, so its index is never given to another pair, and its
/// queries still go to the server it asked; once it is closed, the origin is forgotten. Before,
/// the origin was forgotten while the socket lived, and its next query went to the server of
/// whichever pair got the index next.
#[test]
fn an_origin_is_not_forgotten_while_a_socket_is_connected_to_it() {
    origin_held_by_a_connected_socket(false);
}

/// The same for a socket connected straight to its own origin's block address (which a
/// workload can read in /proc/net/udp): an adversary's, before, was not noted, and once the
/// index went to another cgroup its queries were counted, and limited, as that cgroup's.
#[test]
fn an_origin_is_not_forgotten_while_a_socket_connected_to_its_address_lives() {
    origin_held_by_a_connected_socket(true);
}

/// A socket that is redirected or, if `direct`, connected to its origin's block address holds
/// that origin after its cgroup is gone.
fn origin_held_by_a_connected_socket(direct: bool) {
    use tests::{SECOND_ANSWER_IP, SECOND_SERVER_IP};
    let (topology, _servers, agent) = a_table_of_six_indexes();
    // A process with a UDP socket connected to the first server, which asks a name on "ask".
    let departs = child_cgroup(&topology, "departs");
    let departs_id = std::fs::metadata(&departs).expect("stat").ino();
    let (address, port) = if direct {
        // The pair's origin first, then its address in the /29 block.
        let command = in_cgroup_and_netns(&departs, &topology.client, "dig", &[]);
        tests::dig_at(
            command,
            &SERVER_IP.to_string(),
            "first.example.test",
            &["+short"],
        )
        .expect("answered");
        let state = topology.client.state_dir();
        let index = tests::server_index_for(&state, SERVER_IP, 53, Some(departs_id));
        let port = PROXY_LISTEN.rsplit(':').next().expect("a port").to_owned();
        (format!("127.53.0.{index}"), port)
    } else {
        (SERVER_IP.to_string(), "53".to_owned())
    };
    let mut holder = Holder::start(&topology, &departs, &address, &port);
    // Fill the rest of the table (six indexes): three more pairs and the second's shared one.
    for (cgroup, server) in [
        ("b", SECOND_SERVER_IP),
        ("e", SECOND_SERVER_IP),
        ("f", SERVER_IP),
    ] {
        let command = in_cgroup_and_netns(
            &child_cgroup(&topology, cgroup),
            &topology.client,
            "dig",
            &[],
        );
        assert!(
            tests::dig_at(
                command,
                &server.to_string(),
                "filler.example.test",
                &["+short"]
            )
            .is_ok()
        );
    }
    // The process moves on, and its cgroup goes.
    std::fs::write(topology.cgroup.path.join("cgroup.procs"), &holder.pid).expect("move it");
    std::fs::remove_dir(&departs).expect("remove the departed cgroup");
    // Forgotten within about 4 s if nothing held it.
    std::thread::sleep(Duration::from_secs(8));
    assert!(!agent.log().contains("forgot 1 origins"), "{}", agent.log());
    assert_eq!(
        tests::origins_of_cgroup(&topology.client.state_dir(), departs_id),
        1
    );
    // A new pair finds no room (and is answered directly), rather than taking the held index.
    let arrives = child_cgroup(&topology, "arrives");
    let command = in_cgroup_and_netns(&arrives, &topology.client, "dig", &[]);
    let answer = tests::dig_at(
        command,
        &SECOND_SERVER_IP.to_string(),
        "new.example.test",
        &["+short"],
    );
    assert_eq!(
        answer.expect("answered").trim(),
        SECOND_ANSWER_IP.to_string()
    );
    // The held socket's query still goes to its own server.
    let answer = holder.ask("held.example.test");
    assert_eq!(answer, ANSWER_IP.to_string(), "{}", agent.log());
    // Once it is closed, the origin goes.
    holder.close();
    wait_for(
        "the released origin forgotten",
        Duration::from_secs(20),
        || agent.log().contains("forgot 1 origins").then_some(()),
    );
}

/// A TCP connection that keeps asking holds its origin too, though the kernel notes no TCP
/// socket: every query through it counts as the index's use. Before, the agent noted a use
/// only when it accepted the connection, so ten minutes later (two seconds here) a busy
/// connection whose cgroup was gone lost its origin, and its index went to another
/// workload's server, which `getpeername` then named (helper-130).
#[test]
fn a_tcp_connection_in_use_holds_its_origin() {
    let (topology, _servers, agent) = a_table_of_six_indexes();
    let departs = child_cgroup(&topology, "departs");
    let departs_id = std::fs::metadata(&departs).expect("stat").ino();
    let mut asker = in_cgroup_and_netns(
        &departs,
        &topology.client,
        "python3",
        &["-c", TCP_ASKER, &SERVER_IP.to_string(), "12"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("start the TCP asker");
    let mut said = std::io::BufReader::new(asker.stdout.take().expect("its stdout"));
    let mut pid = String::new();
    std::io::BufRead::read_line(&mut said, &mut pid).expect("its pid");
    // The asker moves on, and its cgroup goes: forgotten within about 4 s if nothing held it.
    std::fs::write(topology.cgroup.path.join("cgroup.procs"), pid.trim()).expect("move it");
    std::fs::remove_dir(&departs).expect("remove the departed cgroup");
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut said, &mut summary).expect("its summary");
    assert!(asker.wait().expect("the asker's end").success());
    let asked = summary.trim().split(' ').collect::<Vec<_>>();
    assert_eq!(
        asked[1..],
        [&format!("peers={SERVER_IP}")[..], "failed=0"],
        "{summary}"
    );
    assert!(!agent.log().contains("forgot 1 origins"), "{}", agent.log());
    assert_eq!(
        tests::origins_of_cgroup(&topology.client.state_dir(), departs_id),
        1,
        "{}",
        agent.log()
    );
}

/// One TCP connection to `argv[1]`:53 that asks a name every 0.3 s for `argv[2]` seconds; prints
/// its pid once connected (the socket then has its cgroup, whatever the process's next), then
/// `asked=N peers=<every peer getpeername showed> failed=N`.
const TCP_ASKER: &str = r#"
import os, socket, struct, sys, time
s = socket.create_connection((sys.argv[1], 53), timeout=3)
print(os.getpid(), flush=True)
end = time.time() + float(sys.argv[2])
asked = failed = 0
peers = set()
while time.time() < end:
    asked += 1
    q = struct.pack("!HHHHHH", asked, 0x0100, 1, 0, 0, 0) + b"\x04busy\x07example\x04test\x00\x00\x01\x00\x01"
    try:
        s.sendall(struct.pack("!H", len(q)) + q)
        n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
        if s.recv(n, socket.MSG_WAITALL)[:2] != q[:2]:
            failed += 1
    except OSError:
        failed += 1
    peers.add(s.getpeername()[0])
    time.sleep(0.3)
print(f"asked={asked} peers={','.join(sorted(peers))} failed={failed}", flush=True)
"#;

/// TCP connections are not noted as holding their origin (the agent reads a connection's
/// server once, when it accepts it), so none is left noted by a connection that left the block
/// before it was closed (a disconnect), nor by an MPTCP connection, whose connect hook runs on
/// a subflow that is released without the hook. An adversary filled the table of connected
/// sockets that way, for good, unprivileged, and then took over a departed socket's index.
#[test]
fn tcp_connections_leave_no_socket_noted() {
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let _agent = Agent::start(&topology, &[]);
    let output =
        tests::must(&mut topology.workload("python3", &["-c", TCP_CHURN, &SERVER_IP.to_string()]));
    let summary = String::from_utf8_lossy(&output.stdout);
    assert_eq!(summary.trim(), "disconnected=50 mptcp=50 udp=50");
    let noted = tests::attached_map_entries(&topology.cgroup.path, "CONNECTED");
    assert_eq!(noted, 0, "sockets noted once all are closed");
}

/// 50 TCP connections to `argv[1]`:53, each disconnected (`AF_UNSPEC`) and then closed; 50
/// MPTCP connections, each closed; and 50 connected UDP sockets, each disconnected and closed.
const TCP_CHURN: &str = r#"
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
unspec = ctypes.create_string_buffer(16)
def disconnect(s):
    if libc.connect(s.fileno(), unspec, 16) != 0:
        raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
server = (sys.argv[1], 53)
counts = {}
for kind, proto, udp in [("disconnected", 0, False), ("mptcp", 262, False), ("udp", 0, True)]:
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM, proto)
        s.settimeout(3)
        s.connect(server)
        if kind != "mptcp":
            disconnect(s)
        s.close()
        counts[kind] = counts.get(kind, 0) + 1
print(" ".join(f"{k}={v}" for k, v in counts.items()))
"#;

/// A server's shared origin is forgotten too once no pair of that server is left: before,
/// every server ever asked kept one for good, and pods that came and went asking new servers
/// filled the table, so that no new pod got an index of its own (an adversary's soak).
#[test]
fn a_servers_shared_origin_is_forgotten_once_no_pair_asks_it() {
    use tests::SECOND_SERVER_IP;
    let (topology, _servers, agent) = a_table_of_six_indexes();
    let state = topology.client.state_dir();
    let goes = child_cgroup(&topology, "goes");
    let stays = child_cgroup(&topology, "stays");
    for (cgroup, server) in [(&goes, SERVER_IP), (&stays, SECOND_SERVER_IP)] {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        tests::dig_at(command, &server.to_string(), "a.example.test", &["+short"])
            .expect("answered");
    }
    // Each server's first pair took its shared origin as well.
    assert_eq!(tests::origins_of_cgroup(&state, 0), 2);
    let goes_id = std::fs::metadata(&goes).expect("stat").ino();
    std::fs::remove_dir(&goes).expect("remove the cgroup that goes");
    // The shared origin a walk after the pair (it is forgotten once two walks in a row
    // find it unused).
    wait_for(
        "the departed pair and its server's shared origin forgotten",
        Duration::from_secs(20),
        || {
            (tests::origins_of_cgroup(&state, goes_id) == 0
                && tests::origins_of_cgroup(&state, 0) == 1)
                .then_some(())
        },
    );
    // The other server is still asked by a pair: its shared origin stays.
    assert_eq!(tests::origins_of_cgroup(&state, 0), 1, "{}", agent.log());
    // And it is that server's (the lookup panics if it has none).
    tests::server_index_for(&state, SECOND_SERVER_IP, 53, Some(0));
}

/// The table's pins removed while the agent runs (by hand, or a bpffs mounted over the state
/// directory) are pinned again, so that the next agent decodes the addresses sockets were sent
/// to before as this one does. Before, the next agent made a fresh table, in which a socket
/// connected before named whichever origin took its index next (an adversary's held sockets:
/// 9 of 60 answered by another server, 47 refused). `sock_release`'s link is pinned again
/// with it, and the stop leaves it attached; before, the stop detached it, and sockets
/// released while no agent ran kept their notes until the table was removed.
#[test]
fn a_table_whose_pins_are_removed_while_the_agent_runs_is_pinned_again() {
    let (topology, _servers, mut agent) = a_table_of_six_indexes();
    let holds = child_cgroup(&topology, "holds");
    let mut holder = Holder::start(&topology, &holds, &SERVER_IP.to_string(), "53");
    assert_eq!(holder.ask("before.example.test"), ANSWER_IP.to_string());

    let state = topology.client.state_dir();
    std::fs::remove_dir_all(&state).expect("remove the state directory");
    wait_for_log(&agent, "pinned again");
    assert!(tests::origins_of_cgroup(&state, 0) > 0, "the table is back");
    assert!(
        tests::table_dir(&state).join("CGROUP_ORIGINS").exists(),
        "the workloads' shares are back with it"
    );
    // And `sock_release`'s link, so that the stop leaves it attached as ever.
    wait_for_log(&agent, "dns_proxy_sock_release's pin");
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    tests::assert_only_sock_release_left(&topology.cgroup.path);
    let agent = Agent::start_with_env(
        &topology,
        &["--redirect-block=127.53.0.0/29", "--udp-threads=1"],
        &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")],
    );
    // Other cgroups ask the second server: in a fresh table one of them would take the
    // holder's index.
    each_asks_the_second_server(&topology, &["b", "c", "d", "e", "f"]);
    let answer = holder.ask("after.example.test");
    assert_eq!(answer, ANSWER_IP.to_string(), "{}", agent.log());
    holder.close();
}

/// A table lost while no agent runs (removed by hand here; a bpffs that did not outlive the
/// agent alike): a UDP socket connected under it still sends to its old address, whose index
/// names no server in the next agent's fresh table. Its first packet has the kernel hold that
/// index for it, so no server new to the table takes it; the socket's lookups fail fast
/// (port unreachable) until it connects again, and the index is freed once it closes. Before,
/// the next server to take the index answered the socket (helper-174: 1,181 answers from
/// another server).
#[test]
fn an_index_of_a_lost_table_is_held_for_the_sockets_still_connected_to_it() {
    use std::os::unix::fs::MetadataExt as _;
    let (topology, _servers, mut agent) = a_table_of_six_indexes();
    let holds = child_cgroup(&topology, "holds");
    let holds_id = std::fs::metadata(&holds).expect("stat").ino();
    let mut holder = Holder::start(&topology, &holds, &SERVER_IP.to_string(), "53");
    assert_eq!(holder.ask("before.example.test"), ANSWER_IP.to_string());
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let state = topology.client.state_dir();
    std::fs::remove_dir_all(&state).expect("remove the state directory");
    let agent = Agent::start_with_env(
        &topology,
        &[
            "--redirect-block=127.53.0.0/29",
            "--udp-threads=1",
            &format!("--metrics={METRICS}"),
        ],
        &[("DNS_PROXY_TEST_FORGET_DEPARTED", "1")],
    );
    // Its first packet finds no server at its index: held for it, and refused at once (port
    // unreachable: the socket reads ECONNREFUSED, not a timeout; the agent's hold of its
    // port on every address took it before, helper-180).
    let first = holder.ask("unknown.example.test");
    assert_eq!(first, "failed: ConnectionRefusedError", "{}", agent.log());
    assert_eq!(
        tests::origins_of_cgroup(&state, holds_id),
        1,
        "held, charged to the holder's cgroup"
    );
    // Six other cgroups ask the second server: its shared origin and four pairs fill the five
    // indexes left (the last two go by the shared index). Were the index not held, one of
    // them would take it.
    each_asks_the_second_server(&topology, &["b", "c", "d", "e", "f", "g"]);
    // Still its own: never the second server's answer.
    for name in ["after-1.example.test", "after-2.example.test"] {
        let answer = holder.ask(name);
        assert_eq!(
            answer,
            "failed: ConnectionRefusedError",
            "{name}; {}",
            agent.log()
        );
    }
    let page = scrape(&topology);
    assert_eq!(
        value(&page, "dns_proxy_kernel_stale_index_held_total"),
        1,
        "{page}"
    );
    wait_for_log(&agent, "held for the UDP sockets still connected");
    // Closed, it lets the index go: forgotten, then freed two walks later.
    holder.close();
    wait_for(
        "the held index freed once its socket closed",
        Duration::from_secs(20),
        || (tests::origins_of_cgroup(&state, holds_id) == 0).then_some(()),
    );
}

/// A lookup of the second server from each of `cgroups` (made below the workload's cgroup),
/// each answered by it.
fn each_asks_the_second_server(topology: &Topology, cgroups: &[&str]) {
    use tests::{SECOND_ANSWER_IP, SECOND_SERVER_IP};
    for cgroup in cgroups {
        let command = in_cgroup_and_netns(
            &child_cgroup(topology, cgroup),
            &topology.client,
            "dig",
            &[],
        );
        let answer = tests::dig_at(
            command,
            &SECOND_SERVER_IP.to_string(),
            "filler.example.test",
            &["+short"],
        );
        assert_eq!(
            answer.expect("answered").trim(),
            SECOND_ANSWER_IP.to_string()
        );
    }
}

/// Something in the way of `sock_release`'s pin when the agent starts (a directory here) is
/// warned of, and the link pinned once it is gone: the stop leaves it attached. Before, a pin
/// that failed at the start was never tried again, and the stop detached every program
/// without a word (helper-158).
#[test]
fn a_link_pin_kept_out_at_the_start_is_made_once_the_way_is_clear() {
    use std::os::unix::fs::MetadataExt as _;
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let mut first = Agent::start(&topology, &[]);
    first.process().signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    let cgroup_id = std::fs::metadata(&topology.cgroup.path)
        .expect("stat")
        .ino();
    let pin = tests::table_dir(&topology.client.state_dir())
        .join(format!("sock_release_link_{cgroup_id}"));
    std::fs::remove_file(&pin).expect("remove the first agent's pin");
    std::fs::create_dir(&pin).expect("a directory in its way");
    let mut agent = Agent::start(&topology, &[]);
    wait_for_log(&agent, "cannot pin dns_proxy_sock_release yet");
    std::fs::remove_dir(&pin).expect("clear the way");
    wait_for_log(&agent, "dns_proxy_sock_release's pin");
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    tests::assert_only_sock_release_left(&topology.cgroup.path);
}

/// A `--takeover` with no agent of its state directory to take over from pins nothing. Here the
/// state directory is removed while an agent runs (frozen meanwhile, so that it does not pin
/// its table again first), and a `--takeover` started then, on its listen address or another
/// one, is refused before it loads. Before,
/// it loaded first, pinning a fresh, empty table, then was refused and left it: the running
/// agent left it alone, and every later start loaded it, so sockets sent to the block before
/// were refused for good, and every `--takeover` was refused as if no agent ran (helper-122,
/// 4 of 4 tries).
#[test]
fn a_takeover_refused_pins_no_table_of_its_own() {
    let Harness {
        mut agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[]);
    let state = topology.client.state_dir();
    agent.process().signal(libc::SIGSTOP);
    std::fs::remove_dir_all(&state).expect("remove the state directory");
    // On the agent's own listen address, and on another one (which joins no agent's port,
    // and takes over only the lock on redirecting the cgroup).
    for (listen, refusal) in [
        (PROXY_LISTEN, "no dns-proxy of the same blocks"),
        ("127.0.0.1:8054", "holds no list of running agents"),
    ] {
        let args = [format!("--listen={listen}"), "--takeover".to_owned()];
        let mut takeover = Agent::command_with(&topology, &args);
        takeover.stderr(Stdio::piped());
        // Bounded: one not refused serves on (killed when dropped).
        let mut process = tests::Process::spawn(&mut takeover);
        let (status, log) = process.wait_exit_with_stderr(Duration::from_secs(20));
        assert!(!status.success(), "{listen}: {log}");
        assert!(log.contains(refusal), "{listen}: {log}");
    }
    agent.process().signal(libc::SIGCONT);
    // The running agent pins its own table again, and a takeover then finds it.
    wait_for_log(&agent, "pinned again");
    let next = Agent::start(&topology, &["--takeover"]);
    assert_answered(
        dig(topology.workload("dig", &[]), "after.example.test", &[]),
        "dig after",
    );
    assert!(next.log().contains("taking over from"), "{}", next.log());
}

/// The edges of pinning the table again. A state directory deep in a bpffs whose top
/// directory is removed: every level is made again and pinned (before, only the last two
/// levels were, so it said it could not and never did). `AGENTS` alone gone beside the table:
/// left to the agent of another version that removed it to make its own (before, pinned
/// again within a second, it could be handed to that agent instead). The bpffs unmounted:
/// said once, nothing made on the filesystem under it (before, its directories were), and
/// `/readyz` says 503 until a bpffs is back and the table pinned on it (before, it said 200,
/// and the next agent started with an empty table: helper-136's connected socket then failed
/// 118 of 118 lookups).
#[test]
fn pinning_the_table_again_makes_every_level_leaves_agents_to_a_newer_agent_and_stays_on_bpffs() {
    let AgentOnItsOwnBpffs {
        topology,
        _server,
        bpffs,
        state,
        agent,
    } = AgentOnItsOwnBpffs::start("a/b/state");
    let readyz = || readyz_of(&topology);
    let table = tests::table_dir(&state);
    assert!(
        tests::origins_of_cgroup(&state, 0) > 0,
        "the table holds the server"
    );

    std::fs::remove_dir_all(bpffs.path.join("a")).expect("remove the top directory");
    wait_for_log(&agent, "pinned again");
    assert!(tests::origins_of_cgroup(&state, 0) > 0, "the table is back");

    std::fs::remove_file(table.join("AGENTS")).expect("remove AGENTS");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!table.join("AGENTS").exists(), "{}", agent.log());
    // The table was pinned again once (`sock_release`'s link is said apart).
    assert_eq!(
        agent.log().matches("were gone (").count(),
        1,
        "{}",
        agent.log()
    );

    bpffs.unmount();
    // Checked every 2 s (the agent's heartbeat).
    wait_for_log(&agent, "no longer on a bpf filesystem");
    let (status, body) = wait_for("not ready", Duration::from_secs(10), || {
        let (status, body) = readyz();
        (status == 503).then_some((status, body))
    });
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot be kept pinned"), "{body}");
    // Said once, and nothing made under the bpffs, a check later.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!bpffs.path.join("a").exists(), "made under the bpffs");
    let log = agent.log();
    assert_eq!(
        log.matches("no longer on a bpf filesystem").count(),
        1,
        "{log}"
    );
    // The lookups go on.
    assert_answered(
        dig(topology.workload("dig", &[]), "after.example.test", &[]),
        "dig after the unmount",
    );
    forwarded(&agent, "after.example.test");
    // A bpffs mounted there again: the table is pinned on it, and the agent is ready.
    bpffs.mount_again();
    wait_for_log(&agent, "the table of servers is pinned again");
    assert!(tests::origins_of_cgroup(&state, 0) > 0, "the table is back");
    wait_for("ready again", Duration::from_secs(5), || {
        (readyz().0 == 200).then_some(())
    });
    // Another filesystem over the state directory, with files of the pins' names: no pins
    // (helper-140 had a tmpfs of empty files pass for the table).
    let pins: Vec<_> = std::fs::read_dir(&table)
        .expect("the table's directory")
        .map(|entry| entry.expect("an entry").file_name())
        .collect();
    must(
        Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&state),
    );
    std::fs::create_dir_all(&table).expect("the table's directory on the tmpfs");
    for pin in &pins {
        std::fs::write(table.join(pin), "").expect("a file of a pin's name");
    }
    wait_for("not ready over the tmpfs", Duration::from_secs(5), || {
        (readyz().0 == 503).then_some(())
    });
    must(Command::new("umount").arg(&state));
    wait_for("ready once it is gone", Duration::from_secs(5), || {
        (readyz().0 == 200).then_some(())
    });
}

/// Another agent's table mounted over this agent's (a bind mount of another bpffs's table
/// directory, by a root who mixed up two state directories): its pins carry the table's names
/// on a bpffs, but name other maps, which the next agent would take, and by whose indexes the
/// sockets sent to the block before would name other servers. The agent says so and `/readyz`
/// says 503 until its own table is pinned there again. Before, the names alone passed for the
/// table, and it stayed ready (helper-141).
#[test]
fn another_agents_table_mounted_over_this_ones_makes_it_unready_until_it_is_gone() {
    let AgentOnItsOwnBpffs {
        topology,
        _server,
        bpffs: _bpffs,
        state,
        agent,
    } = AgentOnItsOwnBpffs::start("state");
    let readyz = || readyz_of(&topology);
    // The other agent's table: made by an agent of another namespace, which stopped since,
    // leaving it pinned for the next.
    let other_topology = Topology::new();
    let other_bpffs = BpffsAt::mount(&format!("{}-bpffs", other_topology.tag));
    let other_state = other_bpffs.path.join("state");
    let mut other = Agent::start(
        &other_topology,
        &[&format!("--state-dir={}", other_state.display())],
    );
    other.process().signal(libc::SIGTERM);
    assert!(other.wait_exit(Duration::from_secs(10)).success());
    let mounted = Unmounted::bind(&tests::table_dir(&other_state), &tests::table_dir(&state));
    // Checked every 2 s (the agent's heartbeat).
    let body = wait_for(
        "not ready over the other table",
        Duration::from_secs(10),
        || {
            let (status, body) = readyz();
            (status == 503).then_some(body)
        },
    );
    assert!(body.contains("cannot be kept pinned"), "{body}");
    wait_for_log(&agent, "names another map");
    // The lookups go on.
    assert_answered(
        dig(topology.workload("dig", &[]), "over.example.test", &[]),
        "dig over the other table",
    );
    drop(mounted);
    wait_for("ready once it is gone", Duration::from_secs(10), || {
        (readyz().0 == 200).then_some(())
    });
    wait_for_log(&agent, "the table of servers is pinned again");
}

/// A bpffs mounted over the state directory while the agent runs has the agent pin its
/// table and `sock_release`'s link on it; once it is unmounted, the agent's own pins show
/// again, and the state directory removed then is pinned again, link too, and the stop leaves
/// `sock_release` attached. Before, the link's pin shown again from under the mount was taken
/// for another agent's (by its inode), and never pinned again: the stop detached every
/// program, and the cgroup's sockets released while no agent ran stayed noted (helper-157).
#[test]
fn a_link_pin_shown_again_from_under_a_mount_is_still_the_agents_own() {
    let AgentOnItsOwnBpffs {
        topology,
        _server,
        bpffs: _bpffs,
        state,
        mut agent,
    } = AgentOnItsOwnBpffs::start("state");
    let pinned_again = |agent: &Agent| agent.log().matches("dns_proxy_sock_release's pin").count();
    let over = Unmounted::bpffs(&state);
    wait_for(
        "the link pinned on the mount",
        Duration::from_secs(10),
        || (pinned_again(&agent) >= 1).then_some(()),
    );
    drop(over);
    // A heartbeat (every 2 s) looks at the agent's own pin, shown again.
    std::thread::sleep(Duration::from_millis(2500));
    std::fs::remove_dir_all(&state).expect("remove the state directory");
    wait_for("the link pinned again", Duration::from_secs(10), || {
        (pinned_again(&agent) >= 2).then_some(())
    });
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    assert!(
        agent
            .log()
            .contains("but dns_proxy_sock_release (pinned at"),
        "{}",
        agent.log()
    );
    tests::assert_only_sock_release_left(&topology.cgroup.path);
}

/// An agent whose state directory is `state` (a relative path) below a bpffs of the test's
/// own, serving `/metrics`, once a lookup went through it. Bound in this order, the agent
/// drops first and the topology last.
struct AgentOnItsOwnBpffs {
    topology: Topology,
    _server: tests::DnsServer,
    bpffs: BpffsAt,
    state: PathBuf,
    agent: Agent,
}

impl AgentOnItsOwnBpffs {
    fn start(state: &str) -> Self {
        let topology = Topology::new();
        let server = tests::DnsServer::start(&topology);
        let bpffs = BpffsAt::mount(&format!("{}-bpffs", topology.tag));
        let state = bpffs.path.join(state);
        let agent = Agent::start(
            &topology,
            &[
                &format!("--state-dir={}", state.display()),
                &format!("--metrics={}", super::METRICS),
            ],
        );
        assert_answered(
            dig(topology.workload("dig", &[]), "before.example.test", &[]),
            "dig before",
        );
        Self {
            topology,
            _server: server,
            bpffs,
            state,
            agent,
        }
    }
}

/// What the agent of `topology`, serving `/metrics`, says on `/readyz`.
fn readyz_of(topology: &Topology) -> (u16, String) {
    tests::http_get(&topology.client, super::METRICS.parse().unwrap(), "/readyz")
}

/// A bpffs of a test's own on a directory of `/run/dns-proxy-tests`; unmounted and removed on
/// drop.
struct BpffsAt {
    path: PathBuf,
}

impl BpffsAt {
    fn mount(name: &str) -> Self {
        let path = PathBuf::from("/run/dns-proxy-tests").join(name);
        std::fs::create_dir_all(&path).expect("mkdir the bpffs's directory");
        let bpffs = Self { path };
        must(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&bpffs.path),
        );
        bpffs
    }

    fn unmount(&self) {
        must(Command::new("umount").arg("-l").arg(&self.path));
    }

    fn mount_again(&self) {
        must(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&self.path),
        );
    }
}

impl Drop for BpffsAt {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A process of a cgroup of its own that runs [`HOLDER`]: a UDP socket connected to an
/// address, which asks names when told to.
struct Holder {
    process: std::process::Child,
    said: std::io::BufReader<std::process::ChildStdout>,
    tell: Option<std::process::ChildStdin>,
    pid: String,
}

impl Holder {
    /// Starts it in `cgroup` and the client namespace, connected to `address`:`port`.
    fn start(topology: &Topology, cgroup: &std::path::Path, address: &str, port: &str) -> Self {
        let mut process = in_cgroup_and_netns(
            cgroup,
            &topology.client,
            "python3",
            &["-c", HOLDER, address, port],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the socket's holder");
        let said = std::io::BufReader::new(process.stdout.take().expect("its stdout"));
        let tell = process.stdin.take();
        let mut holder = Self {
            process,
            said,
            tell,
            pid: String::new(),
        };
        holder.pid = holder.hear();
        holder
    }

    fn hear(&mut self) -> String {
        use std::io::BufRead as _;
        let mut line = String::new();
        self.said
            .read_line(&mut line)
            .expect("a line from the holder");
        line.trim().to_owned()
    }

    fn tell(&mut self, line: &str) {
        use std::io::Write as _;
        let tell = self.tell.as_mut().expect("the holder's stdin");
        writeln!(tell, "{line}").expect("tell the holder");
    }

    /// The A record its socket's query for `name` got (empty if it got none).
    fn ask(&mut self, name: &str) -> String {
        self.tell(&format!("ask {name}"));
        self.hear()
    }

    /// Closes its socket, and ends it.
    fn close(mut self) {
        self.tell("close");
        assert_eq!(self.hear(), "closed");
        drop(self.tell.take());
        assert!(self.process.wait().expect("the holder's end").success());
    }
}

/// The holder of [`origin_held_by_a_connected_socket`]: prints its pid, connects a UDP socket
/// to `argv[1]`:`argv[2]`, then on "ask NAME" prints the A record its query for NAME got, and
/// on "close" closes the socket.
const HOLDER: &str = r#"
import os, socket, struct, sys
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(3)
for line in sys.stdin:
    word = line.split()
    if word[0] == "ask":
        name = b"".join(bytes([len(l)]) + l.encode() for l in word[1].split(".")) + b"\0"
        s.send(struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1")
        try:
            answer = s.recv(512)
            print(socket.inet_ntoa(answer[-4:]), flush=True)
        except OSError as err:
            print(f"failed: {err.__class__.__name__}", flush=True)
    elif word[0] == "close":
        s.close()
        print("closed", flush=True)
"#;

/// Found by an adversarial review: an agent that had logged nothing left an empty file
/// (START still in its buffer), which the agent taking over opened again instead of keeping
/// aside, so both wrote into one file and the older one's STOP corrupted the newer one's log.
#[test]
fn a_takeover_of_an_agent_that_has_logged_nothing_keeps_both_logs_readable() {
    tests::require_root();
    let (dir, log) = dnstap_directory("takeover-dnstap");
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let dnstap = format!("--dnstap=file:{}", log.display());
    let started = |agent: &Agent| {
        wait_for("the dnstap log started", Duration::from_secs(10), || {
            agent.log().contains("writing a dnstap log").then_some(())
        });
    };
    let mut older = Agent::start(&topology, &["--takeover", &dnstap]);
    started(&older);
    // The older agent serves, but nobody has looked anything up yet. Then it is replaced.
    let mut newer = Agent::start(&topology, &["--takeover", &dnstap]);
    assert!(
        newer.log().contains("taking over from it"),
        "{}",
        newer.log()
    );
    started(&newer);
    let name = "after-the-takeover.example.test";
    assert_answered(dig(topology.workload("dig", &[]), name, &["+short"]), name);
    std::thread::sleep(Duration::from_millis(1500));
    for agent in [&mut older, &mut newer] {
        agent.process().signal(libc::SIGTERM);
        let status = agent.wait_exit(Duration::from_secs(15));
        assert!(status.success(), "{status}:\n{}", agent.log());
    }
    // Every log the agents left, read as any dnstap reader would.
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir.0).expect("list the logs") {
        let path = entry.expect("a log").path();
        let output = std::process::Command::new("dnstap-ldns")
            .arg("-q")
            .arg("-r")
            .arg(&path)
            .output()
            .expect("dnstap-ldns");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let size = std::fs::metadata(&path).map_or(0, |meta| meta.len());
        seen.push(format!("{} ({size} bytes): {:?}", path.display(), text));
        if text.contains(name) {
            return;
        }
    }
    panic!(
        "{name} was answered and logged, but no dnstap log has it:\n{}\nolder:\n{}\nnewer:\n{}",
        seen.join("\n"),
        older.log(),
        newer.log()
    );
}

/// With no room in the table for a workload's own index, its lookups go through the server's
/// shared one: still answered, but whose they are is unknown, and that is counted (it was
/// silent: `kernel_table_full` counts only sockets that got no index at all).
#[test]
fn a_workload_with_no_room_for_an_index_of_its_own_is_answered_and_counted() {
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    // Six indexes: the server's shared one, and five workloads' own.
    let agent = Agent::start(
        &topology,
        &[
            "--redirect-block=127.53.0.0/29",
            &format!("--metrics={}", super::METRICS),
        ],
    );
    let ask = |cgroup: &PathBuf, name: &str| {
        let command = in_cgroup_and_netns(cgroup, &topology.client, "dig", &[]);
        tests::dig_at(command, &SERVER_IP.to_string(), name, &["+short"])
    };
    for i in 0..5 {
        let cgroup = child_cgroup(&topology, &format!("own{i}"));
        let answer = ask(&cgroup, &format!("own{i}.example.test")).expect("answered");
        assert_eq!(answer.trim(), ANSWER_IP.to_string());
    }
    let late = child_cgroup(&topology, "late");
    let answer = ask(&late, "late.example.test").expect("answered through the shared index");
    assert_eq!(answer.trim(), ANSWER_IP.to_string());
    let page = super::scrape(&topology);
    assert_eq!(no_room_counts(&page), (1, 0), "{page}");
    let line = forwarded(&agent, "late.example.test");
    assert!(line.ends_with("workload=unknown"), "{line}");
}

/// `METHOD TARGET` asked of the metrics port over a raw socket by `user` in the agent's
/// namespace (`4`: IPv4 to the metrics address; `4lo`: the same from a socket bound to `lo`;
/// `6`: an IPv6 socket to its v4-mapped form; `nat`: to 192.0.2.99:81, which a NAT rule must
/// send there): the whole response.
fn ask_metrics_port_as(
    topology: &Topology,
    user: &str,
    family: &str,
    method: &str,
    target: &str,
) -> String {
    const SCRIPT: &str = r#"
import socket, sys
family, method, target = sys.argv[1:4]
port = 9253
if family.startswith("4"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if family == "4lo":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    s.connect(("127.0.0.1", port))
elif family == "nat":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("192.0.2.99", 81))
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.connect(("::ffff:127.0.0.1", port))
s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
"#;
    assert_eq!(super::METRICS, "127.0.0.1:9253", "the script's address");
    let output = topology
        .client
        .nsenter()
        .args([
            "setpriv",
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
        ])
        .args(["--clear-groups", "/usr/bin/python3", "-c", SCRIPT])
        .args([family, method, target])
        .output()
        .expect("run the script");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The names each workload resolved are as private as its lookups: a client in the agent's
/// network namespace (in host mode, any local user: the metrics port is on loopback) is
/// served them only if root or the agent's user owns its socket. Another user is refused,
/// over IPv4, from a socket bound to `lo` (which any user may bind to, and which the kernel's
/// lookup of one socket did not find), over an IPv6 socket to the v4-mapped address, and
/// through a port redirect, for GET and HEAD alike (helper-118: a user enumerating cgroup ids
/// read another workload's names; helper-120: the bound socket and the redirect).
#[test]
fn only_root_reads_the_names_table_from_the_agents_namespace() {
    let topology = Topology::new();
    // TTL 60: kept in the table (dnsmasq's local answers have TTL 0).
    let server = std::net::Ipv4Addr::new(192, 0, 2, 80);
    let _server = super::start_test_upstream(&topology, server, 0, ANSWER_IP);
    let agent = Agent::start(&topology, &["--metrics", super::METRICS]);
    let cgroup = child_cgroup(&topology, "private-job");
    let command = in_cgroup_and_netns(&cgroup, &topology.client, "dig", &[]);
    let name = "private.example.test";
    let answer = tests::dig_at(command, &server.to_string(), name, &["+short"]);
    assert_answered(answer, name);
    let parent = topology.cgroup.path.file_name().expect("a name");
    let target = format!(
        "/v1/resolutions?workload=cgroup%3D/{}/private-job",
        parent.to_string_lossy()
    );
    // Found by name once the walk of the cgroups named it, soon after its first lookup.
    let root = wait_for(
        "root's answer naming the job",
        Duration::from_secs(5),
        || {
            let root = ask_metrics_port_as(&topology, "0", "4", "GET", &target);
            root.contains(&format!("\"name\":\"{name}.\""))
                .then_some(root)
        },
    );
    assert!(root.starts_with("HTTP/1.1 200"), "{root}\n{}", agent.log());
    assert!(root.contains(&format!("\"name\":\"{name}.\"")), "{root}");
    // A port redirect in front of the metrics port (as a hostPort or NodePort would make): the
    // client's socket is connected to another address than the agent's end.
    for command in [
        vec!["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
        vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "192.0.2.99",
            "--dport",
            "81",
            "-j",
            "DNAT",
            "--to-destination",
            super::METRICS,
        ],
    ] {
        tests::must(topology.client.nsenter().args(&command));
    }
    let kinds = [
        ("4", "GET"),
        ("4lo", "GET"),
        ("6", "GET"),
        ("nat", "GET"),
        ("4", "HEAD"),
    ];
    for (family, method) in kinds {
        let nobody = ask_metrics_port_as(&topology, "65534", family, method, &target);
        assert!(
            nobody.starts_with("HTTP/1.1 403"),
            "{family} {method}: {nobody}"
        );
        assert!(!nobody.contains(name), "{nobody}");
    }
    // The rest of the port stays open to every user: scrapers and probes.
    for target in ["/metrics", "/healthz", "/readyz"] {
        let page = ask_metrics_port_as(&topology, "65534", "4", "GET", target);
        assert!(page.starts_with("HTTP/1.1 200"), "{target}: {page}");
    }
}

/// An agent stopped, its cgroup removed (a service's or a pod's, made anew under another id
/// later): its `sock_release` link went with the cgroup, and the next start removes the pin
/// that alone held it, its program and maps. Before, one such pin piled up at each
/// (helper-163).
#[test]
fn the_link_pin_of_a_removed_cgroup_goes_at_the_next_start() {
    use std::os::unix::fs::MetadataExt as _;
    let topology = Topology::new();
    let _server = tests::DnsServer::start(&topology);
    let gone = topology.cgroup.path.join("gone");
    std::fs::create_dir(&gone).expect("mkdir");
    let gone_id = std::fs::metadata(&gone).expect("stat").ino();
    let mut first = Agent::launch(&topology.client, &gone, None, &[]);
    first.process().signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    let pin =
        tests::table_dir(&topology.client.state_dir()).join(format!("sock_release_link_{gone_id}"));
    assert!(pin.exists(), "{} pinned", pin.display());
    std::fs::remove_dir(&gone).expect("rmdir the first agent's cgroup");
    let agent = Agent::start(&topology, &[]);
    wait_for_log(&agent, "its cgroup is gone, and its link with it");
    assert!(!pin.exists(), "{} left", pin.display());
    let own_id = std::fs::metadata(&topology.cgroup.path)
        .expect("stat")
        .ino();
    let own =
        tests::table_dir(&topology.client.state_dir()).join(format!("sock_release_link_{own_id}"));
    assert!(own.exists(), "{} pinned", own.display());
}
