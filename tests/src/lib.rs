//! Fixtures for dns-proxy's privileged integration tests: a topology of the tests' own
//! (network namespaces joined by a veth pair, a child cgroup, a real DNS server) and the real
//! agent binary attached to it. Every fixture is a guard that removes what it made on drop,
//! so a failing test still cleans up. Nothing here touches the host's own network namespace,
//! its root cgroup's programs, or any address outside the tests' namespaces.
//!
//! One module per topic, each readable on its own; the names most tests use are re-exported
//! here. What each test suite covers and how to run one: tests/README.md. The measuring tools
//! (`cargo xtask bench|race|soak`) are not tests: they live in tools/ (dns-proxy-tools) and
//! build on these fixtures.

// The pieces of a test topology.
mod cgroup;
mod netns;
pub mod node;
mod root;
mod topology;

// What runs in it.
mod agent;
mod clients;
mod process;
mod servers;

// Reading what the agent and the kernel say.
mod bpftool;
mod http;

// The wire format of the tests' own servers and clients (tests/src/bin).
pub mod answer;

// The container tests: their dockerd, the images, and the manifest they run.
pub mod docker;
pub mod manifest;
pub mod registry_proxy;

pub use agent::{Agent, Harness, PROXY_LISTEN, Placement, agent_binary};
pub use bpftool::{
    AgentRecordBytes, assert_only_pinned_programs_left, assert_only_sock_release_left,
    attached_map_entries, attached_programs, boottime_ns, charge_of_cgroup,
    connected_charge_of_cgroup, origins_of_cgroup, pinned_entries, put_agent_record,
    remove_agent_record, server_index, server_index_for, table_dir,
};
pub(crate) use cgroup::remove_cgroup_tree;
pub use cgroup::{TestCgroup, cgroup2_root};
pub use clients::{a_query, dig, dig_at, go_resolver, lookup_from_port, musl_getaddrinfo};
pub use http::{http_get, http_get_in, metric};
pub use netns::Netns;
pub(crate) use netns::NetnsResolvConf;
pub use process::{Process, must, status_kib, wait_for};
pub use root::{require_root, stop_the_run};
pub use servers::{
    ANSWER_IP, ANSWER_IP6, BIG_NAME, DnsServer, SECOND_ANSWER_IP, SECOND_SERVER_IP, UNBOUND_IP,
    UNBOUND_ZONE, UnboundServer, ZONE,
};
pub use topology::{
    CLIENT_IP, CLIENT_IP6, SERVER_IP, SERVER_IP6, Topology, in_cgroup_and_netns, unique_tag,
};
