//! The real DNS servers the tests' queries end at, in the server namespace: dnsmasq
//! ([`DnsServer`]) answering fixed addresses for every name under [`ZONE`], and unbound
//! ([`UnboundServer`]) for NSID, EDNS and negative answers. Each is ready when it answers, and
//! stopped on drop. (The tests' own Rust servers are binaries: test-upstream, bad-upstream,
//! scripted-authority.)
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use crate::{Netns, Process, SERVER_IP, SERVER_IP6, Topology, clients::run_dig, wait_for};

/// The zone the test servers answer every name under.
pub const ZONE: &str = "example.test";
/// What the test server answers for every name under [`ZONE`] (TEST-NET-2, never contacted).
pub const ANSWER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The AAAA record the test server answers for every name under [`ZONE`].
pub const ANSWER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// A name whose TXT answer (about 800 bytes) does not fit in 512.
pub const BIG_NAME: &str = "big.example.test";
/// A second server in the server namespace, with answers of its own, for tests where clients
/// ask different servers at once.
pub const SECOND_SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
pub const SECOND_ANSWER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
/// An unbound server, for tests that need NSID and EDNS answered; zone [`UNBOUND_ZONE`].
pub const UNBOUND_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 4);
pub const UNBOUND_ZONE: &str = "unbound.test";

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
            let output = run_dig(dig, "ready.example.test", &["+time=1"]).ok()?;
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
            let output = run_dig(dig, &format!("a.{UNBOUND_ZONE}"), &["+time=1"]).ok()?;
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
