//! The DNS side, assembled: what the listeners share (the counters, the cache, what names and
//! records workloads), their settings from the configuration, and a proxy per socket, each UDP
//! one on its thread's runtime. They serve until told to stop, then drain together.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::{
    net::{TcpListener, UdpSocket},
    runtime::Handle,
    task::JoinSet,
};

use super::{LOG, RunError};
use crate::{
    config::RunConfig,
    dns::{
        cache::Cache,
        coalesce::Coalescer,
        observers::Observers,
        per_client::PerClientLimit,
        query_log::QueryLog,
        stats::Stats,
        tcp::{TcpProxy, TcpSettings},
        udp::{ForwardSettings, PortUnreachable, UdpProxy},
        workload_stats::WorkloadStats,
    },
    drain::{self, Deadline},
    ebpf::{CachedServers, OwnSockets},
    resolutions::Resolutions,
    route_changes::RouteChanges,
    udp_threads::UdpThreads,
    workload::WorkloadNames,
};

/// What every listener, and the metrics server, shares; each `None` when off.
pub(super) struct Shared {
    pub(super) stats: Arc<Stats>,
    pub(super) cache: Option<Arc<Cache>>,
    pub(super) workloads: Arc<WorkloadNames>,
    /// Served on the metrics port: kept only when there is one.
    pub(super) resolutions: Option<Arc<Resolutions>>,
    pub(super) workload_stats: Option<Arc<WorkloadStats>>,
    /// The dnstap log, started once privileges are dropped.
    pub(super) query_log: Option<Arc<QueryLog>>,
    /// Changes to this namespace's routes and addresses, watched once serving starts.
    pub(super) route_changes: RouteChanges,
    /// Where upstream sockets are marked as the agent's own.
    own_sockets: OwnSockets,
}

impl Shared {
    /// `workload_root`: where the workloads' cgroup paths are named from; `own_sockets`: where
    /// the upstream sockets are marked as the agent's own.
    pub(super) fn new(config: &RunConfig, workload_root: PathBuf, own_sockets: OwnSockets) -> Self {
        let stats = Arc::new(Stats::default());
        let cache = config.cache.map(|settings| {
            log::info!(
                target: LOG,
                "caching answers: at most {} entries and {} bytes, each kept {:?} at most, \
                 served stale {:?} past expiry when the upstream fails",
                settings.max_entries,
                settings.max_bytes,
                settings.max_ttl,
                settings.serve_stale
            );
            Arc::new(Cache::new(settings))
        });
        let workloads = Arc::new(WorkloadNames::new(workload_root));
        let resolutions = config
            .metrics
            .is_some()
            .then(|| Arc::new(Resolutions::new(Arc::clone(&workloads))));
        let workload_stats = (config.workload_metrics > 0 && config.metrics.is_some()).then(|| {
            let names = Arc::clone(&workloads);
            let name_of = Box::new(move |cgroup| names.full(cgroup));
            Arc::new(WorkloadStats::new(config.workload_metrics, name_of))
        });
        let query_log = config
            .dnstap
            .is_some()
            .then(|| Arc::new(QueryLog::new(Arc::clone(&workloads))));
        Self {
            stats,
            cache,
            workloads,
            resolutions,
            workload_stats,
            query_log,
            route_changes: RouteChanges::default(),
            own_sockets,
        }
    }

    fn udp_settings(&self, config: &RunConfig) -> ForwardSettings {
        ForwardSettings {
            upstream_override: config.upstream,
            upstream_timeout: config.upstream_timeout,
            max_inflight: config.max_inflight,
            per_client: PerClientLimit::new(config.max_inflight_per_client),
            cache: self.cache.clone(),
            in_flight: Arc::new(Coalescer::new(config.max_inflight)),
            observers: self.observers(),
            route_changes: self.route_changes.clone(),
            closed_ports: Arc::default(),
            port_unreachable: Arc::new(PortUnreachable::open(&self.own_sockets)),
            own_sockets: self.own_sockets.clone(),
        }
    }

    /// What each listener tells of its queries and answers.
    fn observers(&self) -> Observers {
        Observers {
            workloads: Some(Arc::clone(&self.workloads)),
            query_log: self.query_log.clone(),
            resolutions: self.resolutions.clone(),
            workload_stats: self.workload_stats.clone(),
        }
    }

    fn tcp_settings(&self, config: &RunConfig) -> TcpSettings {
        TcpSettings {
            upstream_override: config.upstream,
            upstream_timeout: config.upstream_timeout,
            idle_timeout: config.tcp_idle_timeout,
            max_connections: config.max_tcp_connections,
            per_client: PerClientLimit::new(config.max_tcp_connections_per_client),
            cache: self.cache.clone(),
            observers: self.observers(),
            own_sockets: self.own_sockets.clone(),
        }
    }
}

/// The DNS listeners: a UDP proxy per socket, each on its thread's runtime (its sockets, its
/// readers and its sweeper live there), and a TCP proxy per address.
pub(super) struct Dns {
    udp: Vec<(Arc<UdpProxy<CachedServers>>, Handle)>,
    tcp: Vec<Arc<TcpProxy<CachedServers>>>,
}

impl Dns {
    /// A proxy for each socket: `udp` holds, per address, one for each UDP thread. Each asks
    /// a copy of its own, from `destinations`, where its clients were headed. A socket without
    /// an address (the only failure here) is reported as `listen`'s.
    pub(super) fn start(
        config: &RunConfig,
        shared: &Shared,
        (udp, tcp): (Vec<Vec<std::net::UdpSocket>>, Vec<TcpListener>),
        udp_threads: &UdpThreads,
        destinations: impl Fn() -> CachedServers,
        listen: SocketAddr,
    ) -> Result<Self, RunError> {
        let failed = |source| RunError::Listen {
            addr: listen,
            source,
        };
        let (udp_settings, tcp_settings) =
            (shared.udp_settings(config), shared.tcp_settings(config));
        if let Err(err) = shared.route_changes.watch() {
            log::warn!(
                target: LOG,
                "cannot watch for route and address changes ({err}): upstream sockets connected \
                 to a server are connected anew only when a query on one fails or times out, \
                 redirected sockets keep the source found at start, and a block that loses its \
                 route is not noticed"
            );
        }
        let stats = || Arc::clone(&shared.stats);
        let mut dns = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for group in udp {
            let mut local_addr = None;
            for (socket, runtime) in group.into_iter().zip(udp_threads.runtimes()) {
                let _on_its_thread = runtime.enter();
                let socket = UdpSocket::from_std(socket).map_err(failed)?;
                let proxy = UdpProxy::new(socket, destinations(), udp_settings.clone(), stats())
                    .map_err(failed)?;
                local_addr = Some(proxy.local_addr());
                dns.udp.push((proxy, runtime.clone()));
            }
            if let Some(addr) = local_addr {
                log::info!(
                    target: LOG,
                    "serving redirected DNS on {addr}/udp ({} threads)",
                    udp_threads.count()
                );
            }
        }
        for listener in tcp {
            let proxy = TcpProxy::new(listener, destinations(), tcp_settings.clone(), stats())
                .map_err(failed)?;
            log::info!(target: LOG, "serving redirected DNS on {}/tcp", proxy.local_addr());
            dns.tcp.push(proxy);
        }
        Ok(dns)
    }

    /// Serves on every listener until `stop` is sent; the set is empty once all have stopped.
    pub(super) fn serve(&self, stop: &drain::Signal) -> JoinSet<()> {
        let mut serving = JoinSet::new();
        for (proxy, runtime) in &self.udp {
            let (proxy, stop) = (Arc::clone(proxy), stop.clone());
            serving.spawn_on(async move { proxy.serve(stop).await }, runtime);
        }
        for proxy in &self.tcp {
            let (proxy, stop) = (Arc::clone(proxy), stop.clone());
            serving.spawn(async move { proxy.serve(stop).await });
        }
        serving
    }

    /// Drains every listener at once, each until `deadline`. The UDP listeners answer what
    /// arrives until all are quiet or `steered_until` comes; then `let_go` runs (it lets go of
    /// the block: from then on what is sent there is refused), and each answers what had
    /// queued on it before, with what is in flight, until `deadline`. Returns the UDP queries
    /// still unanswered and the TCP connections still open then.
    pub(super) async fn drain(
        self,
        steered_until: Deadline,
        deadline: Deadline,
        let_go: impl std::future::Future<Output = ()>,
    ) -> (usize, usize) {
        let mut draining = JoinSet::new();
        let steering_off = drain::Signal::new();
        let (quiet, mut quiet_ones) = tokio::sync::mpsc::unbounded_channel::<()>();
        let udp_listeners = self.udp.len();
        for (proxy, runtime) in self.udp {
            let (quiet, steering_off) = (quiet.clone(), steering_off.clone());
            let draining_one = async move {
                let say_quiet = move || {
                    let _ = quiet.send(());
                };
                proxy.drain(steered_until, say_quiet, &steering_off).await;
                (proxy.finish(deadline).await, 0)
            };
            draining.spawn_on(draining_one, &runtime);
        }
        drop(quiet);
        for proxy in self.tcp {
            draining.spawn(async move { (0, proxy.drain(deadline).await) });
        }
        let all_quiet = async {
            for _ in 0..udp_listeners {
                if quiet_ones.recv().await.is_none() {
                    return;
                }
            }
        };
        steered_until.within(all_quiet).await;
        let_go.await;
        steering_off.stop();
        let (mut queries, mut connections) = (0, 0);
        for (unanswered, open) in draining.join_all().await {
            queries += unanswered;
            connections += open;
        }
        (queries, connections)
    }
}
