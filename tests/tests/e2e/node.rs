//! Node mode: pods in network namespaces of their own, redirected to a link-local address on
//! the node, and host processes, all answered at once by one agent in the node's namespace.
use tests::node::{NODE_LISTEN, NodeTopology, PODS};

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
