//! The usual test topology ([`Topology`]): a "client" namespace, where the agent and the
//! workloads live as on a host, joined by a veth pair to a "server" namespace, where the DNS
//! servers are; and a cgroup for the workloads. Its addresses are documentation ranges, never
//! routed. Node mode (pods in namespaces of their own) is in [`crate::node`].
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{Netns, NetnsResolvConf, TestCgroup, must, require_root};

/// The client's address on the veth inside the client namespace.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The DNS server's address inside the server namespace (TEST-NET-1, never routed).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// IPv6 addresses of the client and the server (documentation prefix, never routed).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// A name unique to this test run, e.g. "dp3f2a1" (short: interface names are 15 bytes max).
pub fn unique_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "dp{:x}{}",
        std::process::id() & 0xffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
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
        link_with_addresses(
            (&client, &client_if, CLIENT_IP),
            (&server, &server_if, SERVER_IP),
        );
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

    /// Another link between the client and server namespaces (`{tag}c{suffix}` and
    /// `{tag}s{suffix}`), with `client_ip`/24 and `server_ip`/24 on its ends.
    pub fn add_link(&self, suffix: &str, client_ip: Ipv4Addr, server_ip: Ipv4Addr) {
        let (client_if, server_if) = (
            format!("{}c{suffix}", self.tag),
            format!("{}s{suffix}", self.tag),
        );
        link_with_addresses(
            (&self.client, &client_if, client_ip),
            (&self.server, &server_if, server_ip),
        );
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

    /// Adds another IPv6 address to the server namespace's end of the veth.
    pub fn add_server_address6(&self, ip: Ipv6Addr) {
        self.server
            .add_ipv6(&format!("{}s", self.tag), &format!("{ip}/64"));
    }

    /// Points the client namespace's resolv.conf at these nameservers.
    pub fn set_nameservers(&self, nameservers: &[IpAddr]) {
        self._resolv_conf.write(nameservers);
    }

    /// Points the client namespace's resolv.conf at these nameservers, each waited on
    /// `seconds` (glibc's `options timeout:`; [`Self::set_nameservers`]: 2 s).
    pub fn set_nameservers_with_timeout(&self, nameservers: &[IpAddr], seconds: u32) {
        self._resolv_conf.write_with_timeout(nameservers, seconds);
    }

    /// Points the client namespace's resolv.conf at these nameservers, with no options: the C
    /// library's defaults (glibc: 5 s a try, 2 tries).
    pub fn set_nameservers_with_defaults(&self, nameservers: &[IpAddr]) {
        self._resolv_conf.write_with_defaults(nameservers);
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

/// A veth pair between two namespaces, each end named and given its address (/24), and up.
fn link_with_addresses(a: (&Netns, &str, Ipv4Addr), b: (&Netns, &str, Ipv4Addr)) {
    must(Command::new("ip").args([
        "link", "add", a.1, "netns", &a.0.name, "type", "veth", "peer", "name", b.1, "netns",
        &b.0.name,
    ]));
    for (netns, interface, ip) in [a, b] {
        let address = format!("{ip}/24");
        must(Command::new("ip").args([
            "-n",
            &netns.name,
            "addr",
            "add",
            &address,
            "dev",
            interface,
        ]));
        must(Command::new("ip").args(["-n", &netns.name, "link", "set", interface, "up"]));
    }
}
