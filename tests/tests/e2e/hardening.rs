//! Hardening, in the real kernel: forged answers at the proxy's upstream socket while a real
//! lookup is in flight, and the agent's privileges once it serves.
use std::{fs, process::Stdio};

use tests::Process;

use super::*;

const TEST_UPSTREAM: &str = env!("CARGO_BIN_EXE_test-upstream");
const SPOOF: &str = env!("CARGO_BIN_EXE_spoof-answers");
/// dns-probe's query ID (`QUERY_ID` there), which the proxy forwards unchanged.
const PROBE_QUERY_ID: &str = "23063";

/// The ports of the agent's upstream sockets (bound to 0.0.0.0 on a random port), from `ss`
/// in the agent's namespace.
fn upstream_ports(topology: &Topology, agent_pid: u32) -> Vec<u16> {
    let output = must(topology.client.command("ss").args(["-Hunap"]));
    let pid = format!("pid={agent_pid},");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&pid))
        .filter_map(|line| {
            let local = line.split_whitespace().nth(3)?;
            local.strip_prefix("0.0.0.0:")?.parse().ok()
        })
        .collect()
}

#[test]
fn forged_answers_are_dropped_and_the_client_gets_only_the_real_one() {
    let topology = Topology::new();
    topology.add_server_address(SECOND_SERVER_IP);
    // The real server answers after 1.5 s: the forgeries arrive first.
    let mut upstream = topology.server.command(TEST_UPSTREAM);
    upstream.args([&format!("{SERVER_IP}:53"), "1500", &ANSWER_IP.to_string()]);
    let _upstream = Process::spawn(&mut upstream);
    let mut agent = Agent::start(&topology, &[&format!("--metrics={METRICS}")]);
    let agent_pid = agent.process().id();

    let name = "spoofed-target.example.test";
    let mut client = topology.workload(PROBE, &["sendto", &format!("{SERVER_IP}:53"), name]);
    client.stdout(Stdio::piped());
    let client = client.spawn().expect("start the probe");
    // The agent opens its upstream socket when the query comes.
    let ports = wait_for(
        "the agent's upstream socket",
        Duration::from_secs(2),
        || Some(upstream_ports(&topology, agent_pid)).filter(|ports| !ports.is_empty()),
    );
    assert_eq!(ports.len(), 1, "one query, one upstream socket: {ports:?}");
    let spoofed = must(topology.server.command(SPOOF).args([
        &tests::CLIENT_IP.to_string(),
        &ports[0].to_string(),
        &SERVER_IP.to_string(),
        &SECOND_SERVER_IP.to_string(),
        PROBE_QUERY_ID,
        name,
    ]));
    assert_eq!(
        String::from_utf8_lossy(&spoofed.stdout).lines().count(),
        4,
        "{spoofed:?}"
    );

    let output = client.wait_with_output().expect("wait for the probe");
    let line = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "the probe failed: {line} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(line, expected_probe_line(), "the client took a forgery");
    forwarded(&agent, name);
    let page = scrape(&topology);
    for (series, expected) in [
        (
            "dns_proxy_dropped_total{protocol=\"udp\",reason=\"stray\"}",
            4,
        ),
        (
            "dns_proxy_answers_total{protocol=\"udp\",rcode=\"NOERROR\"}",
            1,
        ),
    ] {
        assert_eq!(value(&page, series), expected, "{series} in:\n{page}");
    }
    assert_eq!(agent.answered_queries(), 1, "{}", agent.log());
}

/// `(CapEff, CapPrm, NoNewPrivs)` of each thread of `pid`.
fn thread_privileges(pid: u32) -> Vec<(String, String, String)> {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_owned()
    };
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the agent's threads")
        .map(|task| {
            let status = fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            (
                field(&status, "CapEff:"),
                field(&status, "CapPrm:"),
                field(&status, "NoNewPrivs:"),
            )
        })
        .collect()
}

#[test]
fn once_serving_the_agent_holds_no_capability_and_still_answers_and_stops_cleanly() {
    let Harness {
        agent, topology, ..
    } = &mut Harness::start(Placement::Outside, &["--udp-threads=2"]);
    wait_for(
        "the agent to drop its capabilities",
        Duration::from_secs(5),
        || {
            agent
                .log()
                .contains("dropped all capabilities")
                .then_some(())
        },
    );
    let threads = thread_privileges(agent.process().id());
    assert!(threads.len() >= 3, "main and two UDP threads: {threads:?}");
    for (effective, permitted, no_new_privs) in &threads {
        assert_eq!(effective, "0000000000000000", "{threads:?}");
        assert_eq!(permitted, "0000000000000000", "{threads:?}");
        assert_eq!(no_new_privs, "1", "{threads:?}");
    }

    // Still serving, over UDP and TCP, with new upstream sockets as needed.
    for (i, mode) in ["sendto", "tcp", "connect"].iter().enumerate() {
        let name = format!("unprivileged{i}.example.test");
        assert_eq!(probe(topology, mode, &name), expected_probe_line());
        forwarded(agent, &name);
    }

    // And it still stops cleanly: programs detached, its cgroup left and removed.
    agent.process().signal(libc::SIGTERM);
    assert!(agent.process().wait_exit(Duration::from_secs(10)).success());
    let log = agent.log();
    assert!(log.contains("detached"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
    let attached = must(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&topology.cgroup.path),
    );
    assert_eq!(
        String::from_utf8_lossy(&attached.stdout).trim(),
        "",
        "programs still attached"
    );
}
