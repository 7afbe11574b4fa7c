//! The node-local cache (`--cache-size`), through the redirect, against upstreams that answer
//! every A query with TTL 60 (`test-upstream`): what a client sees of a cached answer, and
//! how often the upstream is asked.
use std::net::Ipv4Addr;

use tests::{Process, dig_at};

use super::*;

const TEST_UPSTREAM: &str = env!("CARGO_BIN_EXE_test-upstream");

/// A `test-upstream` on `ip` in the server namespace, answering `answer` with TTL 60.
fn upstream(topology: &Topology, ip: Ipv4Addr, answer: Ipv4Addr) -> Process {
    topology.add_server_address(ip);
    let mut command = topology.server.command(TEST_UPSTREAM);
    command.args([&format!("{ip}:53"), "0", &answer.to_string()]);
    let process = Process::spawn(&mut command);
    wait_for("the upstream to answer", Duration::from_secs(10), || {
        let outsider = topology.outsider("dig", &[]);
        dig_at(outsider, &ip.to_string(), "ready.example.test", &[]).ok()
    });
    process
}

/// `dig @server name` as a workload: the answer section's lines.
fn answer_lines(topology: &Topology, server: Ipv4Addr, name: &str) -> Vec<String> {
    let output = dig_at(
        topology.workload("dig", &[]),
        &server.to_string(),
        name,
        &["+noall", "+answer"],
    )
    .unwrap_or_else(|err| panic!("{name}: {err}"));
    output.lines().map(str::to_owned).collect()
}

/// (owner name as shown, TTL, address) of a one-record answer.
fn record(lines: &[String]) -> (String, u32, String) {
    let [line] = lines else {
        panic!("not one record: {lines:?}");
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    (
        fields[0].to_owned(),
        fields[1].parse().expect("a TTL"),
        fields[4].to_owned(),
    )
}

/// Checks how the agent handled the queries of `name` (its debug lines, written just after
/// the answers): (forwarded to an upstream, answered from the cache).
fn assert_handled(agent: &Agent, name: &str, expected: (usize, usize)) {
    std::thread::sleep(Duration::from_millis(200));
    let lines = agent.query_lines(name);
    let hits = lines
        .iter()
        .filter(|line| line.contains(" cache=hit "))
        .count();
    assert_eq!((lines.len() - hits, hits), expected, "{}", agent.log());
}

#[test]
fn a_cached_answer_counts_its_ttl_down_keeps_the_clients_case_and_asks_the_upstream_once() {
    let topology = Topology::new();
    let server = Ipv4Addr::new(192, 0, 2, 60);
    let _upstream = upstream(&topology, server, ANSWER_IP);
    let agent = Agent::start(&topology, &["--cache-size=1000"]);

    let spellings = [
        "ttl.example.test.",
        "TTL.example.test.",
        "tTl.ExAmPle.test.",
        "ttl.EXAMPLE.TEST.",
    ];
    let mut ttls = Vec::new();
    for (i, name) in spellings.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1100));
        }
        let (owner, ttl, address) = record(&answer_lines(&topology, server, name));
        assert_eq!(owner, *name, "the client's own letter case comes back");
        assert_eq!(address, ANSWER_IP.to_string());
        ttls.push(ttl);
    }
    assert_eq!(ttls[0], 60, "{ttls:?}");
    assert!(
        ttls.windows(2).all(|w| w[1] < w[0]),
        "counting down: {ttls:?}"
    );
    assert!(ttls[3] <= 57, "{ttls:?}");
    assert_handled(&agent, "ttl.example.test", (1, 0));
    let total: usize = spellings
        .iter()
        .map(|name| agent.query_lines(name.trim_end_matches('.')).len())
        .sum();
    assert_eq!(total, 4, "{}", agent.log());
    let hits = agent.log().matches(" cache=hit ").count();
    assert_eq!(hits, 3, "one upstream query, three answers from the cache");
}

#[test]
fn each_server_keeps_its_own_answers() {
    let topology = Topology::new();
    let (first, second) = (Ipv4Addr::new(192, 0, 2, 61), Ipv4Addr::new(192, 0, 2, 62));
    let (first_answer, second_answer) = (
        Ipv4Addr::new(198, 51, 100, 61),
        Ipv4Addr::new(198, 51, 100, 62),
    );
    let _first = upstream(&topology, first, first_answer);
    let _second = upstream(&topology, second, second_answer);
    let _agent = Agent::start(&topology, &["--cache-size=1000"]);
    for _ in 0..3 {
        let (_, _, address) = record(&answer_lines(&topology, first, "same.example.test"));
        assert_eq!(address, first_answer.to_string());
        let (_, _, address) = record(&answer_lines(&topology, second, "same.example.test"));
        assert_eq!(address, second_answer.to_string());
    }
}

#[test]
fn without_cache_size_every_query_goes_upstream() {
    let topology = Topology::new();
    let server = Ipv4Addr::new(192, 0, 2, 63);
    let _upstream = upstream(&topology, server, ANSWER_IP);
    let agent = Agent::start(&topology, &[]);
    for _ in 0..3 {
        let (_, ttl, _) = record(&answer_lines(&topology, server, "uncached.example.test"));
        assert_eq!(ttl, 60);
    }
    assert_handled(&agent, "uncached.example.test", (3, 0));
}
