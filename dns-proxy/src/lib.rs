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

use std::{io, net::IpAddr, sync::Arc};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::{AgentCgroup, Cgroup, CgroupError},
    config::RunConfig,
    dns::{
        stats::Stats,
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
    #[error("cannot listen on {addr} (UDP): {source}{hint}", hint = listen_hint(source))]
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

async fn serve(config: &RunConfig, target: &Cgroup, agent: &Cgroup) -> Result<(), RunError> {
    let listen = config.listen;
    let socket = UdpSocket::bind(listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: listen,
            source,
        })?;
    let IpAddr::V4(target_ip) = listen.ip() else {
        unreachable!("RunConfig only admits IPv4 listen addresses");
    };
    let (mut redirector, flows) = Redirector::attach(&RedirectConfig {
        cgroup: target,
        target_ip,
        target_port: listen.port(),
        excluded: &[agent],
    })?;
    let settings = ForwardSettings {
        upstream_override: config.upstream,
        upstream_timeout: config.upstream_timeout,
        max_inflight: config.max_inflight,
    };
    let stats = Arc::new(Stats::default());
    let proxy = UdpProxy::new(socket, flows, settings, Arc::clone(&stats)).map_err(|source| {
        RunError::Listen {
            addr: listen,
            source,
        }
    })?;
    log::info!("serving redirected DNS on {listen}/udp");

    let stop = CancellationToken::new();
    let serving = {
        let proxy = Arc::clone(&proxy);
        let stop = stop.clone();
        tokio::spawn(async move { proxy.serve(stop).await })
    };
    let signal = shutdown::stop_requested().await.map_err(RunError::Signals);
    stop.cancel();
    let _ = serving.await;
    let signal = signal?;

    log::info!("{signal}: no longer redirecting new lookups; answering those in flight");
    redirector.stop_redirecting();
    let abandoned = proxy.drain(config.shutdown_timeout).await;
    if abandoned > 0 {
        log::warn!("{abandoned} queries still unanswered at the shutdown deadline");
    }
    drop(redirector);
    log::info!("stopped: {}", stats.summary());
    Ok(())
}
