//! dns-proxy: transparent DNS redirection with eBPF.
//!
//! The kernel side (`dns-proxy-ebpf`) rewrites a workload's DNS destination to this proxy and
//! remembers where it was headed; this library loads it ([`ebpf`]) into a cgroup
//! ([`cgroup`]) and forwards each query to that original server ([`dns`]).
pub mod cgroup;
pub mod config;
pub mod dns;
pub mod ebpf;
mod log_limit;
pub mod shutdown;

use std::{
    io,
    net::{SocketAddr, SocketAddrV6},
    sync::Arc,
};

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::{AgentCgroup, Cgroup, CgroupError},
    config::{Listen6, RunConfig},
    dns::{
        stats::Stats,
        tcp::{TcpProxy, TcpSettings},
        udp::{ForwardSettings, UdpProxy},
    },
    ebpf::{EbpfError, RedirectConfig, Redirector},
};

/// Why `dns-proxy run` could not start or keep running. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("cannot listen on {addr}: {source}{hint}", hint = listen_hint(source))]
    Listen {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("cannot watch for SIGINT/SIGTERM: {0}")]
    Signals(io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
}

fn listen_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::AddrInUse => {
            " (something already listens there: stop it or choose another --listen)"
        }
        io::ErrorKind::AddrNotAvailable => {
            " (no interface has this address: add it, or choose another --listen)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}

/// Runs the agent until SIGINT or SIGTERM, then stops redirecting, answers what is in flight,
/// detaches and returns. Blocks: the cgroup work happens first, then a tokio runtime of its
/// own serves.
pub fn run(config: RunConfig) -> Result<(), RunError> {
    log::info!("starting with {config:?}");
    let hierarchy = cgroup::cgroup2_root()?;
    let target = Cgroup::open(config.cgroup.as_deref().unwrap_or(&hierarchy))?;
    // Before any thread or socket exists, so that all of the agent's traffic carries its cgroup.
    let agent = AgentCgroup::enter(&hierarchy)?;
    log::info!(
        "agent runs in cgroup {} (id {}); redirecting cgroup {} (id {})",
        agent.cgroup().path.display(),
        agent.cgroup().id,
        target.path.display(),
        target.id
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let result = runtime.block_on(serve(&config, &target, agent.cgroup()));
    // Every socket closes with the runtime; then the agent may leave its cgroup.
    drop(runtime);
    drop(agent);
    result
}

/// The sockets the proxy serves on: UDP and TCP on the IPv4 address, and on the IPv6 one
/// where there is one.
struct Listeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    /// `None` when IPv6 is not redirected.
    v6: Option<SocketAddrV6>,
}

impl Listeners {
    async fn bind(config: &RunConfig) -> Result<Self, RunError> {
        let mut listeners = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
            v6: None,
        };
        listeners.bind_pair(SocketAddr::V4(config.listen)).await?;
        match config.listen6 {
            Listen6::Required(v6) => {
                listeners.bind_pair(SocketAddr::V6(v6)).await?;
                listeners.v6 = Some(v6);
            }
            Listen6::IfAvailable(v6) => match listeners.bind_pair(SocketAddr::V6(v6)).await {
                Ok(()) => listeners.v6 = Some(v6),
                Err(RunError::Listen { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::AddrNotAvailable | io::ErrorKind::Unsupported
                    ) || source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    log::warn!(
                        "no IPv6 on this host ({v6}: {source}): IPv6 lookups are left alone"
                    );
                }
                Err(err) => return Err(err),
            },
            Listen6::Off => log::info!(
                "IPv6 lookups are left alone: --listen {} is not a loopback address and no \
                 --listen6 was given",
                config.listen
            ),
        }
        Ok(listeners)
    }

    async fn bind_pair(&mut self, addr: SocketAddr) -> Result<(), RunError> {
        let failed = |source| RunError::Listen { addr, source };
        let udp = UdpSocket::bind(addr).await.map_err(failed)?;
        let tcp = TcpListener::bind(addr).await.map_err(failed)?;
        self.udp.push(udp);
        self.tcp.push(tcp);
        Ok(())
    }
}

async fn serve(config: &RunConfig, target: &Cgroup, agent: &Cgroup) -> Result<(), RunError> {
    let listeners = Listeners::bind(config).await?;
    let (mut redirector, flows) = Redirector::attach(&RedirectConfig {
        cgroup: target,
        target_v4: config.listen,
        target_v6: listeners.v6,
        excluded: &[agent],
    })?;
    let flows = Arc::new(flows);
    let stats = Arc::new(Stats::default());
    let udp_settings = ForwardSettings {
        upstream_override: config.upstream,
        upstream_timeout: config.upstream_timeout,
        max_inflight: config.max_inflight,
    };
    let tcp_settings = TcpSettings {
        upstream_override: config.upstream,
        upstream_timeout: config.upstream_timeout,
        idle_timeout: config.tcp_idle_timeout,
        max_connections: config.max_tcp_connections,
    };
    // Only a socket without an address fails here; say which listen address it was.
    let failed = |source| RunError::Listen {
        addr: SocketAddr::V4(config.listen),
        source,
    };
    let mut udp = Vec::new();
    for socket in listeners.udp {
        let proxy = UdpProxy::new(
            socket,
            Arc::clone(&flows),
            udp_settings.clone(),
            Arc::clone(&stats),
        )
        .map_err(failed)?;
        log::info!("serving redirected DNS on {}/udp", proxy.local_addr());
        udp.push(proxy);
    }
    let mut tcp = Vec::new();
    for listener in listeners.tcp {
        let proxy = TcpProxy::new(
            listener,
            Arc::clone(&flows),
            tcp_settings.clone(),
            Arc::clone(&stats),
        )
        .map_err(failed)?;
        log::info!("serving redirected DNS on {}/tcp", proxy.local_addr());
        tcp.push(proxy);
    }

    let stop = CancellationToken::new();
    let mut serving = tokio::task::JoinSet::new();
    for proxy in &udp {
        let (proxy, stop) = (Arc::clone(proxy), stop.clone());
        serving.spawn(async move { proxy.serve(stop).await });
    }
    for proxy in &tcp {
        let (proxy, stop) = (Arc::clone(proxy), stop.clone());
        serving.spawn(async move { proxy.serve(stop).await });
    }
    let signal = shutdown::stop_requested().await.map_err(RunError::Signals);
    stop.cancel();
    serving.join_all().await;
    let signal = signal?;

    log::info!("{signal}: no longer redirecting new lookups; answering those in flight");
    redirector.stop_redirecting();
    // All listeners drain at once, each until the same deadline.
    let deadline = config.shutdown_timeout;
    let mut draining = tokio::task::JoinSet::new();
    for proxy in udp {
        draining.spawn(async move { (proxy.drain(deadline).await, 0) });
    }
    for proxy in tcp {
        draining.spawn(async move { (0, proxy.drain(deadline).await) });
    }
    let (mut queries, mut connections) = (0, 0);
    for (unanswered, open) in draining.join_all().await {
        queries += unanswered;
        connections += open;
    }
    if queries + connections > 0 {
        log::warn!(
            "at the shutdown deadline, {queries} UDP queries were unanswered and {connections} TCP connections open"
        );
    }
    drop(redirector);
    log::info!("stopped: {}", stats.summary());
    Ok(())
}
