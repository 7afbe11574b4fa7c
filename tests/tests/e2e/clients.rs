//! Every kind of client through the redirect: TCP, truncated answers and their TCP retry,
//! byte-exact relay, IPv6 and dual-stack sockets, one socket asking two servers, and real
//! resolvers (glibc, musl, Go, Python, dig).
use std::net::SocketAddr;

use tests::{
    ANSWER_IP6, BIG_NAME, SERVER_IP6, UNBOUND_IP, UNBOUND_ZONE, UnboundServer, dig_at, go_resolver,
    in_cgroup_and_netns, musl_getaddrinfo,
};

use super::*;

fn start() -> Harness {
    Harness::start(Placement::Outside, &[])
}

/// Runs `command` as given and returns stdout, panicking with stderr if it fails.
fn stdout_of(command: &mut Command) -> String {
    String::from_utf8_lossy(&must(command).stdout).into_owned()
}

fn assert_forwarded_over(agent: &Agent, name: &str, protocol: &str) -> String {
    let needle = format!("query {protocol} client=");
    wait_for(
        &format!("the agent to log a {protocol} query for {name}"),
        Duration::from_secs(5),
        || {
            agent
                .query_lines(name)
                .into_iter()
                .find(|line| line.contains(&needle))
        },
    )
}

mod tcp {
    use super::*;

    #[test]
    fn dig_over_tcp_is_relayed() {
        let Harness {
            agent, topology, ..
        } = &start();
        let name = "tcp.example.test";
        assert_answered(
            dig(topology.workload("dig", &[]), name, &["+tcp"]),
            "dig +tcp",
        );
        let line = assert_forwarded_over(agent, name, "tcp");
        assert!(line.contains(&format!("server={SERVER_IP}:53")), "{line}");
    }

    #[test]
    fn a_tcp_client_sees_the_server_in_getpeername() {
        let Harness {
            agent, topology, ..
        } = &start();
        let name = "peer.tcp.example.test";
        assert_eq!(probe(topology, "tcp", name), expected_probe_line());
        assert_forwarded_over(agent, name, "tcp");
    }
}

mod truncation {
    use super::*;

    /// A TXT query for BIG_NAME with an EDNS buffer of `bufsize` bytes, as hex.
    fn big_txt_query(bufsize: u16) -> String {
        query_hex(0x7c01, BIG_NAME, 16, 0, Some((bufsize, false, &[])))
    }

    #[test]
    fn a_truncated_answer_reaches_the_client_unchanged() {
        let Harness { topology, .. } = &start();
        let query = big_txt_query(512);
        let through_proxy = probe_at(
            topology,
            "sendto",
            &format!("{SERVER_IP}:53"),
            BIG_NAME,
            &["--raw", &query],
        );
        let direct = outsider_probe(topology, "sendto", &format!("{SERVER_IP}:53"), &query);
        assert_eq!(through_proxy, direct);
        let answer = hex_field(&through_proxy);
        assert_ne!(answer[2] & 0x02, 0, "TC is not set: {through_proxy}");
    }

    #[test]
    fn the_retry_over_tcp_succeeds_through_the_proxy() {
        let Harness {
            agent, topology, ..
        } = &start();
        // dig gets TC over UDP with a 512-byte buffer, and retries over TCP by itself.
        let output = dig(
            topology.workload("dig", &[]),
            BIG_NAME,
            &["TXT", "+bufsize=512"],
        )
        .unwrap_or_else(|err| panic!("dig +bufsize=512: {err}"));
        assert!(output.contains(&"c".repeat(250)), "{output}");
        assert_forwarded_over(agent, BIG_NAME, "udp");
        assert_forwarded_over(agent, BIG_NAME, "tcp");
    }

    #[test]
    fn a_large_edns_buffer_gets_the_whole_answer_over_udp() {
        let Harness {
            agent, topology, ..
        } = &start();
        let output = dig(
            topology.workload("dig", &[]),
            BIG_NAME,
            &["TXT", "+bufsize=4096"],
        )
        .unwrap_or_else(|err| panic!("dig +bufsize=4096: {err}"));
        assert!(output.contains(&"c".repeat(250)), "{output}");
        assert!(!output.contains("Truncated"), "{output}");
        assert_forwarded_over(agent, BIG_NAME, "udp");
        assert!(
            !agent
                .query_lines(BIG_NAME)
                .iter()
                .any(|line| line.contains("query tcp")),
            "{}",
            agent.log()
        );
    }
}

mod byte_exact {
    use super::*;

    /// EDNS option codes.
    const NSID: u16 = 3;
    const CLIENT_SUBNET: u16 = 8;

    /// Queries whose answers carry what a rebuilding proxy would lose: NSID, client-subnet,
    /// the DO bit, authority and additional sections, other rcodes and opcodes.
    fn queries() -> Vec<(&'static str, String)> {
        let a = format!("a.{UNBOUND_ZONE}");
        let missing = format!("missing.{UNBOUND_ZONE}");
        // client-subnet 198.51.100.0/24: family 1, source /24, scope 0, three octets.
        let ecs: &[u8] = &[0, 1, 24, 0, 198, 51, 100];
        vec![
            (
                "A with NSID, client-subnet and DO",
                query_hex(
                    0x1111,
                    &a,
                    1,
                    0,
                    Some((1232, true, &[(NSID, &[]), (CLIENT_SUBNET, ecs)])),
                ),
            ),
            ("TXT without EDNS", query_hex(0x2222, &a, 16, 0, None)),
            (
                "NXDOMAIN with an SOA in authority",
                query_hex(0x3333, &missing, 1, 0, Some((1232, false, &[(NSID, &[])]))),
            ),
            ("opcode STATUS (NOTIMP)", query_hex(0x4444, &a, 1, 2, None)),
        ]
    }

    fn assert_relayed_byte_for_byte(mode: &str) {
        let Harness {
            agent, topology, ..
        } = &start();
        let _unbound = UnboundServer::start(topology);
        let server = format!("{UNBOUND_IP}:53");
        let mut answers = Vec::new();
        for (what, query) in queries() {
            let through_proxy = probe_at(topology, mode, &server, "unused", &["--raw", &query]);
            let direct = outsider_probe(topology, mode, &server, &query);
            assert_eq!(through_proxy, direct, "{what} over {mode}");
            answers.push(hex_field(&through_proxy));
        }
        // The answers do carry what the comparison is meant to cover.
        let count = |answer: &[u8], at: usize| u16::from_be_bytes([answer[at], answer[at + 1]]);
        let (nsid, nxdomain, status) = (&answers[0], &answers[2], &answers[3]);
        assert!(
            nsid.windows(14).any(|w| w == b"dns-proxy-test"),
            "no NSID in {nsid:02x?}"
        );
        assert!(count(nsid, 10) >= 1, "no additional section (OPT)");
        assert_eq!(nxdomain[3] & 0x0f, 3, "rcode is not NXDOMAIN");
        assert!(count(nxdomain, 8) >= 1, "no authority section (SOA)");
        assert_eq!(status[3] & 0x0f, 4, "rcode is not NOTIMP");
        // And they did go through the proxy.
        let protocol = if mode == "tcp" { "tcp" } else { "udp" };
        let count = || {
            agent
                .log()
                .matches(&format!("query {protocol} client="))
                .count()
        };
        // Each line is written just after its answer.
        wait_for("the query lines", Duration::from_secs(5), || {
            (count() >= queries().len()).then_some(())
        });
        assert_eq!(count(), queries().len(), "{}", agent.log());
    }

    #[test]
    fn over_udp() {
        assert_relayed_byte_for_byte("sendto");
    }

    #[test]
    fn over_tcp() {
        assert_relayed_byte_for_byte("tcp");
    }

    #[test]
    fn the_nsid_answer_names_the_server() {
        let Harness { topology, .. } = &start();
        let _unbound = UnboundServer::start(topology);
        let output = dig_at(
            topology.workload("dig", &[]),
            &UNBOUND_IP.to_string(),
            &format!("a.{UNBOUND_ZONE}"),
            &["+nsid", "+dnssec"],
        )
        .unwrap_or_else(|err| panic!("dig +nsid: {err}"));
        assert!(
            output.contains("NSID: 64 6e 73 2d 70 72 6f 78 79 2d 74 65 73 74"),
            "{output}"
        );
        assert!(output.contains("flags: do;"), "{output}");
    }
}

mod ipv6 {
    use super::*;

    fn server6() -> String {
        SocketAddr::from((SERVER_IP6, 53)).to_string()
    }

    #[test]
    fn dig_over_ipv6_is_redirected() {
        let Harness {
            agent, topology, ..
        } = &start();
        let name = "six.example.test";
        assert_answered(
            dig_at(
                topology.workload("dig", &[]),
                &SERVER_IP6.to_string(),
                name,
                &["-6"],
            ),
            "dig -6",
        );
        let line = forwarded(agent, name);
        assert!(line.contains(&format!("server={}", server6())), "{line}");
        let name = "six-tcp.example.test";
        assert_answered(
            dig_at(
                topology.workload("dig", &[]),
                &SERVER_IP6.to_string(),
                name,
                &["-6", "+tcp"],
            ),
            "dig -6 +tcp",
        );
        assert_forwarded_over(agent, name, "tcp");
    }

    /// Node mode's IPv6 twin of `--listen 169.254.53.0:53`: the listeners on the IPv6 block's
    /// first address, which no interface has (the agent only routes the block `local`), and
    /// a node process's UDP and TCP lookups to an IPv6 server through them.
    #[test]
    fn node_mode_listens_on_the_ipv6_blocks_first_address() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let args = [
            "--listen=169.254.53.0:53".to_owned(),
            "--listen6=[fd53:6e73:6470::]:53".to_owned(),
        ];
        let agent = Agent::launch(&topology.client, &topology.cgroup.path, None, &args);
        for (mode, name) in [
            ("connect", "six-node.example.test"),
            ("tcp", "six-node-tcp.example.test"),
        ] {
            let line = probe_at(&topology, mode, &server6(), name, &[]);
            assert_eq!(
                line,
                format!("source={} answer={ANSWER_IP}", server6()),
                "{mode}"
            );
            let forwarded = forwarded(&agent, name);
            assert!(
                forwarded.contains(&format!("server={}", server6())),
                "{forwarded}"
            );
        }
    }

    #[test]
    fn ipv6_clients_see_the_server_address_and_port() {
        let Harness {
            agent, topology, ..
        } = &start();
        for mode in ["sendto", "connect", "tcp"] {
            let name = format!("{mode}.six.example.test");
            let line = probe_at(topology, mode, &server6(), &name, &[]);
            assert_eq!(
                line,
                format!("source={} answer={ANSWER_IP}", server6()),
                "{mode}"
            );
            forwarded(agent, &name);
        }
    }

    #[test]
    fn dual_stack_sockets_sending_to_v4_mapped_addresses() {
        let Harness {
            agent, topology, ..
        } = &start();
        let mapped = format!("[::ffff:{SERVER_IP}]:53");
        for mode in ["sendto", "connect", "tcp"] {
            let name = format!("{mode}.mapped.example.test");
            let line = probe_at(topology, mode, &mapped, &name, &[]);
            assert_eq!(
                line,
                format!("source={mapped} answer={ANSWER_IP}"),
                "{mode}"
            );
            let logged = forwarded(agent, &name);
            assert!(
                logged.contains(&format!("server={SERVER_IP}:53")),
                "{logged}"
            );
        }
    }
}

#[test]
fn one_unconnected_socket_asking_two_servers_hears_from_one_of_them() {
    let Harness {
        agent, topology, ..
    } = &start();
    let _second = DnsServer::start_on(topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
    let name = "two.example.test";
    let servers = format!("{SERVER_IP}:53,{SECOND_SERVER_IP}:53");
    // The probe accepts only an answer whose source is one of the two servers it asked, as
    // musl does. Which server's answer comes first is a race, and the source shown is the
    // server the socket addressed last (docs/architecture.md): both are fine for musl.
    let line = probe_at(topology, "sendto", &servers, name, &[]);
    let sources = [
        format!("source={SERVER_IP}:53 "),
        format!("source={SECOND_SERVER_IP}:53 "),
    ];
    let answers = [
        format!("answer={ANSWER_IP}"),
        format!("answer={SECOND_ANSWER_IP}"),
    ];
    assert!(
        sources.iter().any(|s| line.starts_with(s.as_str())),
        "{line}"
    );
    assert!(answers.iter().any(|a| line.ends_with(a.as_str())), "{line}");
    forwarded(agent, name);
}

/// A connected UDP socket whose process moves to another cgroup (as one passed on to another
/// workload's process would be used) may still name its server with `sendto`: the send goes
/// where its `connect` sent it, as its `send` does. Redirected anew, it took the other cgroup's
/// index, whose answers the connected socket refused (an adversary's case: every such `sendto`
/// timed out). IPv4, IPv6, and a dual-stack socket asking an IPv4 server; moved to another
/// workload's cgroup, or to an excluded one.
#[test]
fn a_connected_socket_that_moves_to_another_cgroup_may_still_name_its_server() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let topology = &Topology::new();
    let _server = DnsServer::start(topology);
    let connects = child_cgroup(topology, "connects");
    let excluded = child_cgroup(topology, "excluded");
    let agent = &Agent::start(
        topology,
        &[&format!("--exclude-cgroup={}", excluded.display())],
    );
    let servers = [
        SERVER_IP.to_string(),
        SERVER_IP6.to_string(),
        format!("::ffff:{SERVER_IP}"),
    ];
    // Another workload's cgroup, and an excluded one (whose `sendto` went direct).
    let moves = [child_cgroup(topology, "moved-to"), excluded.clone()];
    for (server, moved_to) in servers
        .iter()
        .flat_map(|s| moves.iter().map(move |m| (s, m)))
    {
        let moved_to = moved_to.join("cgroup.procs");
        let mut mover = in_cgroup_and_netns(
            &connects,
            &topology.client,
            "python3",
            &["-c", CONNECTED_MOVER, server],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the client");
        let mut said = BufReader::new(mover.stdout.take().expect("its stdout"));
        let mut hear = || {
            let mut line = String::new();
            said.read_line(&mut line).expect("a line from the client");
            line.trim().to_owned()
        };
        let mut heard = vec![hear()];
        // Moved by the test: `ip netns exec` leaves the client no view of the cgroup tree.
        std::fs::write(&moved_to, hear()).expect("move the client");
        let mut tell = mover.stdin.take().expect("its stdin");
        writeln!(tell, "moved").expect("tell the client");
        heard.extend([hear(), hear()]);
        assert!(mover.wait().expect("the client's end").success());
        let expected: Vec<String> = ["send", "moved send", "moved sendto"]
            .iter()
            .map(|how| format!("{how}: {ANSWER_IP} from {server}"))
            .collect();
        // An excluded process's receives are not decoded: its answers show the block address.
        let from_excluded = moved_to.starts_with(&excluded);
        let answer_only = |line: &String| line.split(" from ").next().unwrap_or("").to_owned();
        if from_excluded {
            assert_eq!(heard[0], expected[0], "{server}");
            let heard: Vec<String> = heard.iter().map(answer_only).collect();
            let expected: Vec<String> = expected.iter().map(answer_only).collect();
            assert_eq!(heard, expected, "{server} from the excluded cgroup");
        } else {
            assert_eq!(heard, expected, "{server}");
        }
    }
    agent.query_lines_once_logged("moved.example.test", 18);
}

/// [`a_connected_socket_that_moves_to_another_cgroup_may_still_name_its_server`]'s client:
/// connects a UDP socket to `argv[1]`:53 and asks with `send`; prints its pid and waits to be
/// moved to another cgroup; asks with `send` and then with `sendto` naming the server. Prints
/// each answer's A record and source, or the error.
const CONNECTED_MOVER: &str = r#"
import os, socket, struct, sys
server = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(3)
query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\5moved\7example\4test\0\0\1\0\1"
def ask(how, send):
    try:
        send()
        answer, source = s.recvfrom(512)
        print(f"{how}: {socket.inet_ntoa(answer[-4:])} from {source[0]}", flush=True)
    except OSError as err:
        print(f"{how}: {err}", flush=True)
ask("send", lambda: s.send(query))
print(os.getpid(), flush=True)
sys.stdin.readline()
ask("moved send", lambda: s.send(query))
ask("moved sendto", lambda: s.sendto(query, (server, 53)))
"#;

/// A socket bound to a device (dnsmasq's `server=IP@eth0`), or sending through one
/// (`IP_UNICAST_IF`, as systemd-resolved does for a link's own servers, or the sticky
/// `IPV6_PKTINFO`, which an adversary's client lost every IPv6 lookup with), cannot reach the
/// proxy's addresses on `lo`: it is left alone, goes direct, and is counted, over UDP and TCP.
#[test]
fn a_socket_bound_to_a_device_sending_through_one_or_marked_goes_direct() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let agent = Agent::start(&topology, &[&format!("--metrics={METRICS}")]);
    let device = format!("{}c", topology.tag);
    let server = format!("{SERVER_IP}:53");
    let server6 = format!("[{SERVER_IP6}]:53");
    for how in ["--device", "--unicast-if", "--sticky-pktinfo"] {
        for (server, source) in [(&server, &server), (&server6, &server6)] {
            // The sticky IPV6_PKTINFO is an IPv6 option (IPv4's IP_PKTINFO only asks for
            // the control message on receipt).
            if how == "--sticky-pktinfo" && !server.starts_with('[') {
                continue;
            }
            for mode in ["sendto", "connect", "tcp"] {
                let family = if server.starts_with('[') { "6" } else { "4" };
                let name = format!("bound-{mode}{family}{how}.example.test");
                let line = probe_at(&topology, mode, server, &name, &[how, &device]);
                assert_eq!(
                    line,
                    format!("source={source} answer={ANSWER_IP}"),
                    "{how} {mode} {server}"
                );
                // TCP heeds no sticky IPV6_PKTINFO: redirected as any connection.
                if how == "--sticky-pktinfo" && mode == "tcp" {
                    forwarded(&agent, &name);
                    continue;
                }
                assert!(
                    agent.query_line(&name).is_none(),
                    "{how} {mode} {server} went through the proxy"
                );
            }
        }
    }
    // Nor does a dual-stack socket's IPv4 datagram (to a v4-mapped server).
    let mapped = format!("[::ffff:{SERVER_IP}]:53");
    let name = "sticky-mapped.example.test";
    let line = probe_at(
        &topology,
        "connect",
        &mapped,
        name,
        &["--sticky-pktinfo", &device],
    );
    assert_eq!(line, format!("source={mapped} answer={ANSWER_IP}"));
    forwarded(&agent, name);
    // The same sockets tied to loopback are redirected as any other.
    for how in ["--device", "--unicast-if"] {
        let name = format!("bound-lo{how}.example.test");
        let line = probe_at(&topology, "connect", &server, &name, &[how, "lo"]);
        assert_eq!(line, expected_probe_line(), "{how} lo");
        forwarded(&agent, &name);
    }
    // A marked socket (`SO_MARK`, routed by the node's rules for its mark) likewise.
    for (server, source) in [(&server, &server), (&server6, &server6)] {
        for mode in ["sendto", "connect", "tcp"] {
            let family = if server.starts_with('[') { "6" } else { "4" };
            let name = format!("marked-{mode}{family}.example.test");
            let line = probe_at(&topology, mode, server, &name, &["--mark", "7"]);
            assert_eq!(
                line,
                format!("source={source} answer={ANSWER_IP}"),
                "{mode}"
            );
            assert!(
                agent.query_line(&name).is_none(),
                "marked {mode} {server} went through the proxy"
            );
        }
    }
    let page = scrape(&topology);
    assert_eq!(
        value(&page, "dns_proxy_kernel_skipped_bound_device_total"),
        20
    );
    assert_eq!(value(&page, "dns_proxy_kernel_redirected_total"), 4);
}

/// A UDP-Lite server's, answering each datagram with its own bytes, on `argv[1]` port 53.
const UDP_LITE_ECHO: &str = r#"
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM, 136)  # IPPROTO_UDPLITE
s.bind((sys.argv[1], 53))
while True:
    data, peer = s.recvfrom(512)
    s.sendto(data, peer)
"#;

/// Sends, from sockets of protocols the proxy does not take, to port 53 of each server in
/// `argv[1:]`: a UDP-Lite datagram (`sendto`), and an ICMP echo request from a "ping" socket
/// connected to the server's port 53. Prints who answered each, or `timeout`. Then one query
/// over MPTCP to the first.
const ODD_PROTOCOLS_TO_PORT_53: &str = r#"
import socket, sys
def reply(s):
    try:
        data, peer = s.recvfrom(512)
        return peer[0]
    except socket.timeout:
        return "timeout"
for server in sys.argv[1:]:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        lite = socket.socket(family, socket.SOCK_DGRAM, 136)  # IPPROTO_UDPLITE
        lite.settimeout(2)
        lite.sendto(b"not dns", (server, 53))
    except OSError:  # a kernel without UDP-Lite (removed in Linux 7.1)
        lite = None
    ping = socket.socket(family, socket.SOCK_DGRAM,
                         socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP)
    ping.settimeout(2)
    ping.connect((server, 53))
    # An echo request; the kernel fills in the identifier and the checksum.
    ping.send(bytes([128 if family == socket.AF_INET6 else 8, 0, 0, 0, 0, 0, 0, 1]) + b"ping")
    print(f"udplite={reply(lite) if lite else 'unsupported'} ping={reply(ping)}", flush=True)
# MPTCP, which carries TCP, is redirected as TCP is: one query over it.
query = bytes.fromhex("abcd01000001000000000000") + b"\x05mptcp\x07example\x04test\x00\x00\x01\x00\x01"
mptcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)  # IPPROTO_MPTCP
mptcp.settimeout(5)
mptcp.connect((sys.argv[1], 53))
mptcp.sendall(len(query).to_bytes(2, "big") + query)
length = int.from_bytes(mptcp.recv(2, socket.MSG_WAITALL), "big")
answer = mptcp.recv(length, socket.MSG_WAITALL)
print(f"mptcp id={answer[:2].hex()} peer={mptcp.getpeername()[0]}", flush=True)
"#;

/// Sockets of other protocols of the same types (UDP-Lite datagrams; ICMP "ping" sockets,
/// which are `SOCK_DGRAM` too) are left alone: a UDP-Lite datagram sent to the block found no
/// socket there (`sk_lookup` runs for UDP only) and was lost, and a ping socket connected to a
/// server's port 53 was answered by this host, from the block (helper-98). MPTCP, which carries
/// TCP, is still redirected.
#[test]
fn udp_lite_and_ping_sockets_to_port_53_go_where_they_were_sent() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let agent = Agent::start(&topology, &[&format!("--metrics={METRICS}")]);
    let (server, server6) = (SERVER_IP.to_string(), SERVER_IP6.to_string());
    // Linux 7.1 removed UDP-Lite: there, only ping sockets and MPTCP are left to check.
    let udp_lite = std::path::Path::new("/proc/net/udplite").exists();
    let _echoes: Vec<tests::Process> = [&server, &server6]
        .into_iter()
        .filter(|_| udp_lite)
        .map(|address| {
            tests::Process::spawn(topology.server.command("python3").args([
                "-c",
                UDP_LITE_ECHO,
                address,
            ]))
        })
        .collect();
    // Ping sockets for every group, root's included, in the client namespace only.
    must(&mut topology.outsider("sysctl", &["-qw", "net.ipv4.ping_group_range=0 2147483647"]));
    // The echo servers bind as they start: port 53 (0035) in the kernel's UDP-Lite tables.
    wait_for("the UDP-Lite servers", Duration::from_secs(10), || {
        let bound =
            |table: &str| stdout_of(topology.server.command("cat").arg(table)).contains(":0035 ");
        (!udp_lite || (bound("/proc/net/udplite") && bound("/proc/net/udplite6"))).then_some(())
    });
    let (lite, lite6) = if udp_lite {
        (server.as_str(), server6.as_str())
    } else {
        ("unsupported", "unsupported")
    };
    let output = stdout_of(&mut topology.workload(
        "python3",
        &["-c", ODD_PROTOCOLS_TO_PORT_53, &server, &server6],
    ));
    assert_eq!(
        output.trim(),
        format!(
            "udplite={lite} ping={server}\nudplite={lite6} ping={server6}\n\
             mptcp id=abcd peer={server}"
        )
    );
    assert_forwarded_over(&agent, "mptcp.example.test", "tcp");
    let page = scrape(&topology);
    assert_eq!(value(&page, "dns_proxy_kernel_redirected_total"), 1);
    drop(agent);
}

/// The setsockopt program reads the options it looks for and changes no call: a rule set
/// written with one large setsockopt (iptables-legacy's table, far more than the page of it
/// the kernel shows a program) is set whole, in the redirected cgroup.
#[test]
fn setsockopt_calls_in_the_cgroup_are_made_as_asked() {
    let topology = Topology::new();
    let _agent = Agent::start(&topology, &[]);
    let mut rules = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n");
    rules.push_str(":OUTPUT ACCEPT [0:0]\n");
    for i in 0..400 {
        rules.push_str(&format!(
            "-A OUTPUT -d 198.51.{}.{}/32 -j DROP\n",
            i / 200,
            i % 200
        ));
    }
    rules.push_str("COMMIT\n");
    let mut restore = topology
        .workload("iptables-legacy-restore", &[])
        .stdin(Stdio::piped())
        .spawn()
        .expect("start iptables-legacy-restore");
    let mut input = restore.stdin.take().expect("a piped stdin");
    std::io::Write::write_all(&mut input, rules.as_bytes()).expect("write the rules");
    drop(input);
    let status = restore.wait().expect("wait for iptables-legacy-restore");
    assert!(status.success(), "iptables-legacy-restore: {status}");
    let listed = stdout_of(&mut topology.workload("iptables-legacy", &["-S", "OUTPUT"]));
    assert_eq!(listed.lines().count(), 401, "{listed}");
    assert!(
        listed.contains("-A OUTPUT -d 198.51.1.199/32 -j DROP"),
        "{listed}"
    );
}

/// A `cgroup/setsockopt` program of a cgroup below the redirected one runs first and may
/// decide a call itself: the agent's program leaves its decision be. An adversary's program
/// that answers `SO_RCVBUF` itself (`optlen = -1`, the kernel bypassed) had its decision undone
/// by the agent's, which told the kernel to take the caller's value on every call.
#[test]
fn a_setsockopt_program_of_a_cgroup_below_keeps_the_last_word() {
    let topology = Topology::new();
    let _agent = Agent::start(&topology, &[]);
    // Removed with the topology's cgroup tree, which detaches the program.
    let below = topology.cgroup.path.join("policy");
    std::fs::create_dir(&below).expect("make the cgroup below");
    let output = tests::must(std::process::Command::new("python3").args([
        "-c",
        SOCKOPT_POLICY,
        below.to_str().expect("a UTF-8 path"),
    ]));
    let line = String::from_utf8_lossy(&output.stdout);
    let values: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(values.len(), 2, "{line}");
    assert_eq!(values[0], values[1], "the size was changed: {line}");
}

/// Loads a `cgroup/setsockopt` program that decides `SO_RCVBUF` itself (sets `optlen` to -1,
/// so the kernel does nothing), attaches it to `argv[1]`, and prints a socket's `SO_RCVBUF`
/// there before and after `setsockopt(SO_RCVBUF, 100000)`.
const SOCKOPT_POLICY: &str = r#"
import ctypes, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(321, cmd, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "bpf")
    return fd
def op(code, dst, src, off, imm):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
code = b"".join([
    op(0x61, 2, 1, 28, 0),   # r2 = ctx->optname
    op(0x55, 2, 0, 2, 8),    # if r2 != SO_RCVBUF: skip two
    op(0xb7, 3, 0, 0, -1),   # r3 = -1
    op(0x63, 1, 3, 32, 0),   # ctx->optlen = r3
    op(0xb7, 0, 0, 0, 1),    # r0 = 1
    op(0x95, 0, 0, 0, 0),    # exit
])
insns, license = ctypes.create_string_buffer(code), ctypes.create_string_buffer(b"GPL")
load = struct.pack("<IIQQIIQII16sII", 25, len(code) // 8, ctypes.addressof(insns),
                   ctypes.addressof(license), 0, 0, 0, 0, 0, b"test_policy", 0, 22)
prog = bpf(5, load)
cgroup = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
bpf(8, struct.pack("<IIII", cgroup, prog, 22, 2))
pid = os.fork()
if pid == 0:
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    before = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 100000)
    print(before, s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"#;

/// A zone transfer (AXFR) is one query answered by many messages. A client that half-closes
/// once it has asked gets every message, as it does directly, and so does one whose transfer
/// is under way when the agent is stopped gracefully.
#[test]
fn a_zone_transfer_reaches_a_client_that_half_closes_whole_even_across_a_graceful_stop() {
    let topology = Topology::new();
    let server = std::net::Ipv4Addr::new(192, 0, 2, 68);
    let _authority = super::cache::Authority::start(&topology, server);
    let mut agent = Agent::start(&topology, &[]);
    let server = format!("{server}:53");
    // 6 messages, 150 ms apart.
    let whole = format!("source={server} messages=6");
    let direct = must(&mut topology.outsider(PROBE, &["axfr", &server, "example.test"]));
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), whole);
    assert_eq!(
        probe_at(&topology, "axfr", &server, "example.test", &[]),
        whole
    );
    // Through the agent, not around it.
    forwarded(&agent, "example.test");
    // SIGTERM 300 ms into a transfer of 750 ms: the drain waits for its last message.
    let mut probe = topology.workload(PROBE, &["axfr", &server, "example.test"]);
    let transfer = probe
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the probe");
    std::thread::sleep(Duration::from_millis(300));
    agent.process().signal(libc::SIGTERM);
    let output = transfer.wait_with_output().expect("the probe ends");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), whole);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

/// dnsmasq answers 100 queries of a TCP connection, then closes it. A client that pipelined
/// 150 and reads half a second later gets the 100 answers, then the end, through the agent as
/// directly. Before, the agent closed the client's connection with its later queries unread,
/// which sends a reset and throws away the answers the kernel had not sent yet (helper-187:
/// 34 of 100, in 10 runs of 10).
#[test]
fn a_tcp_client_that_reads_late_gets_every_answer_a_server_sent_before_it_closed() {
    let Harness { topology, .. } = &start();
    let script = r#"
import socket, struct, sys, time
def query(i):
    q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    for label in b"late.example.test".split(b"."):
        q += bytes([len(label)]) + label
    q += b"\0" + struct.pack(">HH", 1, 1)
    return struct.pack(">H", len(q)) + q
s = socket.create_connection((sys.argv[1], 53), timeout=5)
s.sendall(b"".join(query(i) for i in range(150)))
time.sleep(0.5)
answers, end = set(), "eof"
buffer = b""
try:
    while True:
        data = s.recv(65536)
        if not data:
            break
        buffer += data
        while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack(">H", buffer[:2])[0]:
            n = struct.unpack(">H", buffer[:2])[0]
            answers.add(struct.unpack(">H", buffer[2:4])[0])
            buffer = buffer[2 + n:]
except ConnectionResetError:
    end = "reset"
print(f"answers={len(answers)} end={end}")
"#;
    let server = SERVER_IP.to_string();
    for round in 0..3 {
        let direct = stdout_of(&mut topology.outsider("python3", &["-c", script, &server]));
        let through = stdout_of(&mut topology.workload("python3", &["-c", script, &server]));
        assert_eq!(
            direct.trim(),
            "answers=100 end=eof",
            "round {round}, directly"
        );
        assert_eq!(
            through.trim(),
            direct.trim(),
            "round {round}, through the agent"
        );
    }
}

/// A server's edns-tcp-keepalive (RFC 7828) tells a client that asked for it how long it may
/// leave its connection idle; it reaches the client unaltered, and the agent keeps the
/// connection that long too, past its own `--tcp-idle-timeout`.
#[test]
fn a_tcp_connection_stays_open_as_long_as_the_server_told_the_client() {
    let topology = Topology::new();
    let server = std::net::Ipv4Addr::new(192, 0, 2, 69);
    let _authority = super::cache::Authority::start(&topology, server);
    let agent = Agent::start(&topology, &["--tcp-idle-timeout=1s"]);
    // Two queries with EDNS on one connection, 2.5 s apart: the server said 5 s.
    let script = r#"
import socket, struct, sys, time
def query(i):
    q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 1)
    for label in b"keepalive.example.test".split(b"."):
        q += bytes([len(label)]) + label
    # An OPT asking for edns-tcp-keepalive (option 11, empty in a query).
    opt = struct.pack(">HHIH", 41, 1232, 0, 4) + struct.pack(">HH", 11, 0)
    q += b"\0" + struct.pack(">HH", 1, 1) + b"\0" + opt
    return struct.pack(">H", len(q)) + q
def answer(s):
    n = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
    return s.recv(n, socket.MSG_WAITALL)
s = socket.create_connection((sys.argv[1], 53), timeout=5)
for i in (1, 2):
    s.sendall(query(i))
    a = answer(s)
    assert a[:2] == struct.pack(">H", i), a
    keepalive = bytes.fromhex("000b00020032") in a
    print(f"answer={i} keepalive={keepalive} peer={s.getpeername()[0]}", flush=True)
    if i == 1:
        time.sleep(2.5)
"#;
    let output = stdout_of(&mut topology.workload("python3", &["-c", script, &server.to_string()]));
    assert_eq!(
        output.trim(),
        format!("answer=1 keepalive=True peer={server}\nanswer=2 keepalive=True peer={server}")
    );
    let lines = agent.query_lines_once_logged("keepalive.example.test", 2);
    assert_eq!(
        lines
            .iter()
            .filter(|line| line.contains("query tcp "))
            .count(),
        2,
        "{lines:?}"
    );
}

#[test]
fn malformed_datagrams_are_not_forwarded_unreadable_questions_are_answered_formerr() {
    let Harness {
        agent, topology, ..
    } = &mut start();
    let server = format!("{SERVER_IP}:53");
    let send = |mode: &str, hex: &str| {
        topology
            .workload(PROBE, &[mode, &server, "unused", "--raw", hex])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the probe")
    };
    // Not DNS; a header with the response bit set: no server answers either.
    let unanswered = [
        send("sendto", "68656c6c6f"),
        send("sendto", "abcd8180000100000000000000"),
    ];
    // A question that runs off the end; two questions (RFC 9619: a query has one at most).
    // Answered FORMERR, as by a server, from the server (the connected socket takes it):
    // the client fails at once rather than waiting out its timeout. Over TCP too.
    let two_questions = "abcd010000020000000000000374776f0000010001036f6e650000010001";
    let formerr = [
        send("sendto", "abcd0100000100000000000007657861"),
        send("connect", two_questions),
        send("tcp", two_questions),
    ];
    for sender in unanswered {
        let output = sender.wait_with_output().expect("wait for the probe");
        assert!(!output.status.success(), "a malformed query got an answer");
    }
    for sender in formerr {
        let output = sender.wait_with_output().expect("wait for the probe");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("source={server} hex=abcd81010000000000000000")
        );
    }
    // The proxy still answers.
    let name = "after-garbage.example.test";
    assert_eq!(probe(topology, "sendto", name), expected_probe_line());
    forwarded(agent, name);

    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let log = agent.log();
    assert!(
        log.contains("udp: received=5 forwarded=1 answered=3 "),
        "{log}"
    );
    assert!(log.contains("dropped_malformed=4 "), "{log}");
}

/// The resolvers people run, each in the test cgroup against the real server.
mod resolvers {
    use super::*;

    fn assert_resolves(agent: &Agent, name: &str, output: &str, expected: &[String]) {
        for address in expected {
            assert!(
                output.contains(address.as_str()),
                "{name}: no {address} in:\n{output}"
            );
        }
        forwarded(agent, name);
    }

    #[test]
    fn glibc_getent_ahosts_ahostsv4_ahostsv6() {
        let Harness {
            agent, topology, ..
        } = &start();
        let (v4, v6) = (ANSWER_IP.to_string(), ANSWER_IP6.to_string());
        for (database, expected) in [
            ("ahosts", vec![v4.clone(), v6.clone()]),
            ("ahostsv4", vec![v4.clone()]),
            ("ahostsv6", vec![v6.clone()]),
        ] {
            let name = format!("{database}.glibc.example.test");
            let output = stdout_of(&mut topology.workload("getent", &[database, &name]));
            assert_resolves(agent, &name, &output, &expected);
        }
    }

    #[test]
    fn musl_getaddrinfo_with_two_nameservers() {
        let Harness {
            agent, topology, ..
        } = &start();
        let _second = DnsServer::start_on(topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
        topology.set_nameservers(&[SERVER_IP.into(), SECOND_SERVER_IP.into()]);
        let musl = musl_getaddrinfo();
        let musl = musl.to_str().expect("UTF-8 path");
        // musl asks both at once from one socket and takes the first answer from either.
        let name = "musl.example.test";
        let output = stdout_of(&mut topology.workload(musl, &[name, "inet"]));
        let answers = [ANSWER_IP.to_string(), SECOND_ANSWER_IP.to_string()];
        assert!(answers.iter().any(|a| output.trim() == a), "{output}");
        forwarded(agent, name);
    }

    #[test]
    fn musl_getaddrinfo_for_both_families() {
        let Harness {
            agent, topology, ..
        } = &start();
        let musl = musl_getaddrinfo();
        let musl = musl.to_str().expect("UTF-8 path");
        let name = "musl-any.example.test";
        let output = stdout_of(&mut topology.workload(musl, &[name, "any"]));
        assert_resolves(
            agent,
            name,
            &output,
            &[ANSWER_IP.to_string(), ANSWER_IP6.to_string()],
        );
    }

    #[test]
    fn go_resolver() {
        let Harness {
            agent, topology, ..
        } = &start();
        let go = super::go_resolver();
        let go = go.to_str().expect("UTF-8 path");
        let name = "go.example.test";
        let output = stdout_of(topology.workload(go, &[name]).env("GODEBUG", "netdns=go"));
        assert_resolves(
            agent,
            name,
            &output,
            &[ANSWER_IP.to_string(), ANSWER_IP6.to_string()],
        );
    }

    #[test]
    fn python_socket_getaddrinfo() {
        let Harness {
            agent, topology, ..
        } = &start();
        let name = "python.example.test";
        let script =
            "import socket, sys; print({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 53)})";
        let output = stdout_of(&mut topology.workload("python3", &["-c", script, name]));
        assert_resolves(
            agent,
            name,
            &output,
            &[ANSWER_IP.to_string(), ANSWER_IP6.to_string()],
        );
    }
}

/// Runs the probe outside the test cgroup (straight to the server) with a raw query.
fn outsider_probe(topology: &Topology, mode: &str, server: &str, query: &str) -> String {
    let output = must(&mut topology.outsider(PROBE, &[mode, server, "unused", "--raw", query]));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The bytes of a probe's `hex=` field.
fn hex_field(line: &str) -> Vec<u8> {
    let hex = line
        .split("hex=")
        .nth(1)
        .unwrap_or_else(|| panic!("no hex in {line}"));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// An OPT record: UDP buffer size, the DO bit, and options as (code, data).
type Edns<'a> = (u16, bool, &'a [(u16, &'a [u8])]);

/// A query as hex: `id`, opcode, one question (`name`, `qtype`, class IN), and optionally an
/// OPT record: (UDP buffer size, DO bit, options as (code, data)).
fn query_hex(id: u16, name: &str, qtype: u16, opcode: u8, edns: Option<Edns<'_>>) -> String {
    let mut message = id.to_be_bytes().to_vec();
    message.push((opcode << 3) | 0x01); // RD
    message.push(0);
    message.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&qtype.to_be_bytes());
    message.extend_from_slice(&1u16.to_be_bytes());
    if let Some((bufsize, dnssec_ok, options)) = edns {
        message.push(0); // root
        message.extend_from_slice(&41u16.to_be_bytes()); // OPT
        message.extend_from_slice(&bufsize.to_be_bytes());
        message.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
        let mut rdata = Vec::new();
        for (code, data) in options {
            rdata.extend_from_slice(&code.to_be_bytes());
            rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
            rdata.extend_from_slice(data);
        }
        message.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        message.extend_from_slice(&rdata);
    }
    message.iter().map(|b| format!("{b:02x}")).collect()
}
