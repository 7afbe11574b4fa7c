//! Node mode: the agent in a node's network namespace, pods in namespaces of their own joined
//! to the node by veth pairs (as a CNI plugin would), each pod's processes in a cgroup of its
//! own under the redirected one, and the DNS server behind the node.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    CLIENT_IP, CLIENT_IP6, Netns, NetnsResolvConf, SERVER_IP, SERVER_IP6, TestCgroup,
    in_cgroup_and_netns, must, require_root, unique_tag,
};

/// Where the node's agent listens, as the DaemonSet has it: the first address of its block
/// (169.254.53.0/24), which the agent routes to the node itself. Nothing else is set up.
pub const NODE_LISTEN: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 0);

/// The first two pods' addresses and their node-side gateways (TEST-NET-3, never routed).
pub const PODS: [(Ipv4Addr, Ipv4Addr); 2] = [pod_addresses(0), pod_addresses(1)];

/// Pod `i`'s address and its node-side gateway: a /28 each in 203.0.113.0/24 (16 pods).
pub const fn pod_addresses(i: u8) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::new(203, 0, 113, 16 * i + 2),
        Ipv4Addr::new(203, 0, 113, 16 * i + 1),
    )
}

pub struct NodeTopology {
    pub tag: String,
    // Field order is drop order: the processes in the cgroups die first.
    /// The cgroup the agent redirects: every workload of the node.
    pub cgroup: TestCgroup,
    /// Host processes, in the node's own namespace.
    pub host_cgroup: PathBuf,
    pub pod_cgroups: Vec<PathBuf>,
    _resolv_confs: Vec<NetnsResolvConf>,
    pub node: Netns,
    pub pods: Vec<Netns>,
    pub server: Netns,
}

fn ip(netns: &Netns, args: &[&str]) {
    must(Command::new("ip").arg("-n").arg(&netns.name).args(args));
}

impl NodeTopology {
    #[expect(
        clippy::new_without_default,
        reason = "building one creates namespaces and cgroups; a Default would hide that"
    )]
    pub fn new() -> Self {
        Self::with_pods(2)
    }

    /// A node with `pods` pods (at most 16).
    pub fn with_pods(pod_count: u8) -> Self {
        assert!(pod_count <= 16, "a /28 each in one /24");
        require_root();
        let tag = unique_tag();
        let node = Netns::new(format!("{tag}-node"));
        let server = Netns::new(format!("{tag}-server"));
        link(&node, &format!("{tag}n"), &server, &format!("{tag}s"));
        ip(
            &node,
            &[
                "addr",
                "add",
                &format!("{CLIENT_IP}/24"),
                "dev",
                &format!("{tag}n"),
            ],
        );
        ip(
            &server,
            &[
                "addr",
                "add",
                &format!("{SERVER_IP}/24"),
                "dev",
                &format!("{tag}s"),
            ],
        );
        for (netns, interface, address) in [(&node, "n", CLIENT_IP6), (&server, "s", SERVER_IP6)] {
            let interface = format!("{tag}{interface}");
            ip(
                netns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{address}/64"),
                    "dev",
                    &interface,
                    "nodad",
                ],
            );
        }
        // The node routes between its pods and the server; the server knows the way back.
        must(Command::new("ip").args([
            "netns",
            "exec",
            &node.name,
            "sysctl",
            "-q",
            "net.ipv4.ip_forward=1",
        ]));
        ip(
            &server,
            &[
                "route",
                "add",
                "203.0.113.0/24",
                "via",
                &CLIENT_IP.to_string(),
            ],
        );

        let mut pods = Vec::new();
        for (i, (pod_ip, gateway)) in (0..pod_count).map(pod_addresses).enumerate() {
            let pod = Netns::new(format!("{tag}-pod{i}"));
            let (node_if, pod_if) = (format!("{tag}p{i}"), format!("{tag}q{i}"));
            link(&node, &node_if, &pod, &pod_if);
            ip(
                &node,
                &["addr", "add", &format!("{gateway}/28"), "dev", &node_if],
            );
            ip(
                &pod,
                &["addr", "add", &format!("{pod_ip}/28"), "dev", &pod_if],
            );
            ip(
                &pod,
                &["route", "add", "default", "via", &gateway.to_string()],
            );
            pods.push(pod);
        }
        let resolv_confs = std::iter::once(&node)
            .chain(&pods)
            .map(|netns| NetnsResolvConf::new(netns, &[SERVER_IP.into()]))
            .collect();

        let cgroup = TestCgroup::new(&format!("{tag}-node"));
        let child = |name: &str| {
            let path = cgroup.path.join(name);
            fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
            path
        };
        let host_cgroup = child("host");
        let pod_cgroups = (0..pods.len()).map(|i| child(&format!("pod{i}"))).collect();
        Self {
            tag,
            cgroup,
            host_cgroup,
            pod_cgroups,
            _resolv_confs: resolv_confs,
            node,
            pods,
            server,
        }
    }

    /// A command run in pod `i`: its namespace and its cgroup.
    pub fn pod(&self, i: usize, program: &str, args: &[&str]) -> Command {
        in_cgroup_and_netns(&self.pod_cgroups[i], &self.pods[i], program, args)
    }

    /// A command run as a host process: the node's namespace, the host cgroup.
    pub fn host(&self, program: &str, args: &[&str]) -> Command {
        in_cgroup_and_netns(&self.host_cgroup, &self.node, program, args)
    }

    /// Adds another address to the server's end of the node-server veth.
    pub fn add_server_address(&self, address: Ipv4Addr) {
        let interface = format!("{}s", self.tag);
        ip(
            &self.server,
            &["addr", "add", &format!("{address}/24"), "dev", &interface],
        );
    }

    pub fn redirected_cgroup(&self) -> &Path {
        &self.cgroup.path
    }
}

/// A veth pair with one end in each namespace, both up.
fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    must(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]));
    ip(a, &["link", "set", a_if, "up"]);
    ip(b, &["link", "set", b_if, "up"]);
}
