//! dns-proxy: transparent DNS redirection with eBPF.
//!
//! The kernel side (`dns-proxy-ebpf`) rewrites a workload's DNS destination to this proxy and
//! remembers where it was headed; this library loads it ([`ebpf`]) into a cgroup
//! ([`cgroup`]) and forwards each query to that original server ([`dns`]). [`metrics`] shows
//! what it does. [`run`] is the agent, wired (in the private `app` module); [`drain`] is how
//! its listeners stop.
pub mod agents;
mod app;
mod block_binders;
pub mod cgroup;
pub mod config;
pub mod dns;
pub mod dnstap;
pub mod drain;
pub mod ebpf;
mod exec;
mod host;
pub mod journal;
mod local_names;
mod log_limit;
pub mod metrics;
mod privileges;
mod redirect_lock;
pub mod resolutions;
pub mod route_changes;
mod service_manager;
pub mod shutdown;
mod time_namespace;
mod udp_threads;
pub mod workload;

pub use app::{Outcome, RunError, run};

/// Variables the integration tests set, which no flag reads: the agent reads them, and warns
/// when one is set (`DNS_PROXY_TEST_FORGET_DEPARTED=SECONDS`: forget departed cgroups'
/// origins after that many seconds instead of 10 minutes).
pub const TEST_SETTINGS: [&str; 1] = [app::FORGET_DEPARTED_TEST_SETTING];
