//! Admission: whether a redirected client's query (UDP) or connection (TCP) is taken, and where
//! it goes. One path for both transports, as hickory-dns's `handle_udp` and `handle_tcp` both
//! end in `ServerContext::handle_request`; the transports only move bytes.
//!
//! The proxy address a client reached names the server it asked for and its cgroup
//! ([`OriginalDestinations`]); [`upstream_for`] picks the upstream or refuses (a loop, a
//! loopback server asked from another namespace); then the client must be within its share
//! (`--max-inflight-per-client` for UDP queries, `--max-tcp-connections-per-client` for TCP
//! connections). What is turned away is counted and logged here (the warnings rate-limited),
//! under the transport's own counters and log target.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use super::{
    OriginalDestinations,
    per_client::{Client, ClientSlot, LOCAL_CLIENT, PerClientLimit},
    stats::{ProtocolStats, Stats},
};
use crate::{log_limit::RateLimited, workload::WorkloadNames};

/// Why a redirected client's query is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its upstream would be this proxy.
    Loop,
    /// It asked a loopback or unspecified server from another network namespace (a pod asking
    /// its own 127.0.0.1:53): forwarding it would reach the agent's loopback, not the pod's.
    ForeignLoopback,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Loop => "its upstream is this proxy",
            Refusal::ForeignLoopback => {
                "a loopback server asked from another network namespace (not forwarded: it \
                 would reach this host's loopback, not the client's)"
            }
        })
    }
}

/// Whether the server is one that means "this network namespace" to whoever asks it.
fn is_local_only(server: SocketAddr) -> bool {
    let ip = server.ip().to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

/// Where a redirected query to `original` goes: the operator's `upstream_override` if given,
/// else `original`, unless that would loop or let a client of another namespace into this
/// one's loopback services. `from_this_namespace`: the query came from the agent's own
/// network namespace (over the loopback device).
pub fn upstream_for(
    original: SocketAddr,
    from_this_namespace: bool,
    upstream_override: Option<SocketAddr>,
    destinations: &impl OriginalDestinations,
) -> Result<SocketAddr, Refusal> {
    let upstream = this_host(upstream_override.unwrap_or(original));
    if destinations.is_proxy(upstream) {
        return Err(Refusal::Loop);
    }
    if upstream_override.is_none() && is_local_only(original) && !from_this_namespace {
        return Err(Refusal::ForeignLoopback);
    }
    Ok(upstream)
}

/// `server`, with an unspecified address replaced by the loopback address the kernel sends
/// to in its place (`0.0.0.0` → `127.0.0.1`, `::` → `::1`, and v4-mapped alike). A client
/// asking `0.0.0.0` takes the answer from `127.0.0.1`, and so must the agent: an answer is
/// relayed only if it comes from the address the query went to.
fn this_host(server: SocketAddr) -> SocketAddr {
    let ip = match server.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.to_ipv4_mapped() == Some(Ipv4Addr::UNSPECIFIED) => {
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())
        }
        ip => ip,
    };
    SocketAddr::new(ip, server.port())
}

/// The transport a listener serves: whose counters and words its refusals take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn stats(self, stats: &Stats) -> &ProtocolStats {
        match self {
            Self::Udp => &stats.udp,
            Self::Tcp => &stats.tcp,
        }
    }

    /// What turning a client away is called in the log.
    fn turning_away(self) -> &'static str {
        match self {
            Self::Udp => "dropping query",
            Self::Tcp => "closing TCP connection",
        }
    }

    /// The listener's log target, which its debug lines keep (the rate-limited warnings are
    /// [`RateLimited`]'s).
    fn log_target(self) -> &'static str {
        match self {
            Self::Udp => "dns_proxy::dns::udp",
            Self::Tcp => "dns_proxy::dns::tcp",
        }
    }
}

/// Where an admitted query or connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The server its client asked.
    pub original: SocketAddr,
    /// The cgroup of the task that sent it (0: not recorded).
    pub cgroup: u64,
    pub upstream: SocketAddr,
    /// The proxy address it reached: its answers leave from there.
    pub reached: SocketAddr,
}

/// Why a query was not routed ([`Admission::route_or_loop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedAway {
    /// Its server is this proxy: the server its client asked, the cgroup that asked, and the
    /// proxy address it reached, from which an answer to it leaves.
    Looped {
        original: SocketAddr,
        cgroup: u64,
        reached: SocketAddr,
    },
    /// Not redirected, or refused for another reason.
    Other,
}

/// One listener's admission: its destinations, limits and rate-limited warnings.
pub struct Admission<D> {
    transport: Transport,
    destinations: D,
    /// Forward everything here instead of to each query's original destination.
    upstream_override: Option<SocketAddr>,
    /// Shared by every listener of the transport.
    per_client: Arc<PerClientLimit>,
    stats: Arc<Stats>,
    client_limit_log: RateLimited,
    /// Refused queries (a loop, a loopback server asked from elsewhere): a client may send
    /// them as fast as it likes, the log gets a line now and then.
    refusal_log: RateLimited,
    /// Names the workloads its lines name (`None`: by cgroup id).
    workloads: Option<Arc<WorkloadNames>>,
}

impl<D: OriginalDestinations> Admission<D> {
    pub fn new(
        transport: Transport,
        destinations: D,
        upstream_override: Option<SocketAddr>,
        per_client: &Arc<PerClientLimit>,
        stats: &Arc<Stats>,
    ) -> Self {
        Self {
            transport,
            destinations,
            upstream_override,
            per_client: Arc::clone(per_client),
            stats: Arc::clone(stats),
            client_limit_log: RateLimited::counting(
                Duration::from_secs(10),
                match transport {
                    Transport::Udp => "UDP queries of clients at --max-inflight-per-client dropped",
                    Transport::Tcp => {
                        "TCP connections of clients at --max-tcp-connections-per-client refused"
                    }
                },
            ),
            refusal_log: RateLimited::counting(
                Duration::from_secs(10),
                "lookups refused (a loop, or another namespace's loopback server)",
            ),
            workloads: None,
        }
    }

    /// Its lines name workloads by `workloads` (helper-186: "the workload of cgroup id 51306"
    /// told an operator little).
    pub fn naming(mut self, workloads: Option<Arc<WorkloadNames>>) -> Self {
        self.workloads = workloads;
        self
    }

    /// `client` as its lines name it.
    fn describe(&self, client: Client) -> String {
        match client {
            Client::Workload { cgroup, source } => format!(
                "workload {} from {source}",
                WorkloadNames::name_in(self.workloads.as_deref(), cgroup)
            ),
            Client::Address(address) => address.to_string(),
        }
    }

    /// What tells where clients were headed.
    #[cfg(test)]
    pub fn destinations(&self) -> &D {
        &self.destinations
    }

    /// Notes that a connection accepted at `reached` carried a query now
    /// ([`OriginalDestinations::still_in_use`]).
    pub fn still_in_use(&self, reached: SocketAddr) {
        self.destinations.still_in_use(reached);
    }

    /// Has the kernel refuse UDP datagrams to `reached` for a while
    /// ([`OriginalDestinations::refuse_udp_for_a_while`]): the server it names has its port
    /// closed. Not with `--upstream`, where the server found closed is not the one the
    /// client's address names.
    pub fn refuse_udp_for_a_while(&self, reached: SocketAddr) {
        if self.upstream_override.is_none() {
            self.destinations.refuse_udp_for_a_while(reached);
        }
    }

    /// Has the agent itself refuse the queries to `reached` the cache cannot answer, for a
    /// while ([`OriginalDestinations::refuse_here_for_a_while`]); not with `--upstream`
    /// either.
    pub fn refuse_here_for_a_while(&self, reached: SocketAddr) {
        if self.upstream_override.is_none() {
            self.destinations.refuse_here_for_a_while(reached);
        }
    }

    /// Whether the agent refuses queries to `reached` now.
    pub fn refused_here(&self, reached: SocketAddr) -> bool {
        self.destinations.refused_here(reached)
    }

    /// Where the query or connection of `client`, which reached the proxy address `reached`
    /// (`None`: unknown), goes; `None` (counted and logged) if its client was not redirected
    /// or it is refused. `from_this_namespace`: its client is of the agent's own network
    /// namespace, and so may ask a loopback server.
    pub fn route(
        &self,
        client: SocketAddr,
        reached: Option<SocketAddr>,
        from_this_namespace: bool,
    ) -> Option<Route> {
        self.route_or_loop(client, reached, from_this_namespace)
            .ok()
    }

    /// [`route`](Self::route), which says, of a query turned away, whether its server is this
    /// proxy (counted and logged as refused), for a UDP listener to answer it REFUSED: a
    /// workload given the proxy's own address as its nameserver (a container's `--dns
    /// 169.254.53.0`) otherwise waited out its resolver's timeout, 10 s for glibc, on every
    /// lookup (helper-97).
    pub fn route_or_loop(
        &self,
        client: SocketAddr,
        reached: Option<SocketAddr>,
        from_this_namespace: bool,
    ) -> Result<Route, TurnedAway> {
        let stats = self.transport.stats(&self.stats);
        let turning_away = self.transport.turning_away();
        // The address it was sent to names its server; a listener address names none.
        let routed = reached.and_then(|at| Some((at, self.destinations.origin(at)?)));
        let Some((reached, (original, cgroup))) = routed else {
            // Only clients the kernel redirected have a server to go to.
            Stats::add(&stats.dropped_not_redirected);
            log::debug!(
                target: self.transport.log_target(),
                "{turning_away} from {client}: not a redirected client"
            );
            return Err(TurnedAway::Other);
        };
        match upstream_for(
            original,
            from_this_namespace,
            self.upstream_override,
            &self.destinations,
        ) {
            Ok(upstream) => Ok(Route {
                original,
                cgroup,
                upstream,
                reached,
            }),
            Err(refusal) => {
                stats.refused(refusal);
                self.refusal_log.warn(|refused| {
                    format!(
                        "{turning_away} from {client} to {original}: {refusal} ({refused} refused)"
                    )
                });
                Err(match refusal {
                    Refusal::Loop => TurnedAway::Looped {
                        original,
                        cgroup,
                        reached,
                    },
                    Refusal::ForeignLoopback => TurnedAway::Other,
                })
            }
        }
    }

    /// One of the client's share, held until dropped; `None` (counted and logged) if it holds
    /// them all. The client is the workload of `cgroup`, as the kernel recorded it for the
    /// address the query reached, from its source address; with none recorded (0), its source
    /// address alone. The agent's own namespace is one source, `local`, whatever local address
    /// it sends from.
    pub fn client_slot(&self, client: SocketAddr, cgroup: u64, local: bool) -> Option<ClientSlot> {
        let source = if local { LOCAL_CLIENT } else { client.ip() };
        let key = match cgroup {
            0 => Client::Address(source),
            id => Client::Workload { cgroup: id, source },
        };
        let slot = self.per_client.try_acquire(key);
        if slot.is_none() {
            Stats::add(&self.transport.stats(&self.stats).dropped_client_limit);
            let limit = self.per_client.limit();
            let transport = self.transport;
            self.client_limit_log.warn(|dropped| {
                // Named only for a line written: a flood of drops pays nothing for it.
                let key = self.describe(key);
                match transport {
                    // The count is of every client at its limit since the last such line, not
                    // of this one alone: the line names the client that wrote it.
                    Transport::Udp => format!(
                        "{key} has {limit} queries in flight (--max-inflight-per-client), its next \
                     query dropped; {dropped} queries of clients at their limits (this one \
                     and any other) dropped since the last such line \
                     (dns_proxy_dropped_total{{reason=\"client_limit\"}})"
                    ),
                    Transport::Tcp => format!(
                        "{key} has {limit} TCP connections open \
                     (--max-tcp-connections-per-client), its next one refused; {dropped} \
                     connections of clients at their limits (this one and any other) refused \
                     since the last such line"
                    ),
                }
            });
        }
        slot
    }

    /// Whether a TCP client's source says it is of the agent's own network namespace
    /// ([`OriginalDestinations::is_local_client`]).
    pub fn is_local_client(&self, client: IpAddr) -> bool {
        self.destinations.is_local_client(client)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::dns::FixedDestination;

    #[test]
    fn what_is_turned_away_is_counted_under_its_transport() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let itself = at("169.254.20.10:53");
        let destinations = FixedDestination {
            original: Some(itself),
            proxy: Some(itself),
            ..FixedDestination::new(None)
        };
        let (stats, per_client) = (Arc::new(Stats::default()), PerClientLimit::new(1));
        let tcp = Admission::new(Transport::Tcp, destinations, None, &per_client, &stats);
        let client = at("10.0.0.1:40000");
        assert_eq!(tcp.route(client, None, true), None, "not redirected");
        assert_eq!(tcp.route(client, Some(itself), true), None, "a loop");
        let held = tcp.client_slot(client, 0, false);
        assert!(held.is_some());
        assert!(tcp.client_slot(client, 0, false).is_none(), "at its limit");
        assert!(
            tcp.client_slot(client, 0, true).is_some(),
            "this namespace: another client"
        );
        // A workload recorded by the kernel, from its source, is a client of its own: apart
        // from that source alone, and from the same workload from another source (a raw
        // datagram from another pod, which passes no cgroup hook).
        let workload = tcp.client_slot(client, 42, false);
        assert!(workload.is_some());
        assert!(
            tcp.client_slot(([10, 0, 0, 1], 2).into(), 42, false)
                .is_none()
        );
        let other_source = tcp.client_slot(([192, 0, 2, 9], 1).into(), 42, false);
        assert!(other_source.is_some());
        let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        assert_eq!(count(&stats.tcp.dropped_not_redirected), 1);
        assert_eq!(count(&stats.tcp.dropped_loop), 1);
        assert_eq!(count(&stats.tcp.dropped_client_limit), 2);
        assert_eq!(count(&stats.udp.dropped_client_limit), 0);
    }

    #[test]
    fn loopback_servers_are_only_for_clients_of_this_namespace() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let proxy = FixedDestination {
            original: None,
            proxy: Some(at("169.254.20.10:53")),
            ..FixedDestination::new(None)
        };
        let loopback_server = at("127.0.0.53:53");
        let cluster_dns = at("10.96.0.10:53");
        assert_eq!(
            upstream_for(cluster_dns, false, None, &proxy),
            Ok(cluster_dns)
        );
        assert_eq!(
            upstream_for(loopback_server, true, None, &proxy),
            Ok(loopback_server)
        );
        assert_eq!(
            upstream_for(loopback_server, false, None, &proxy),
            Err(Refusal::ForeignLoopback)
        );
        for local_only in ["[::1]:53", "0.0.0.0:53", "[::]:53", "[::ffff:127.0.0.1]:53"] {
            assert_eq!(
                upstream_for(at(local_only), false, None, &proxy),
                Err(Refusal::ForeignLoopback),
                "{local_only}"
            );
        }
        // The operator's upstream is theirs to choose.
        assert_eq!(
            upstream_for(loopback_server, false, Some(at("127.0.0.1:5353")), &proxy),
            Ok(at("127.0.0.1:5353"))
        );
        assert_eq!(
            upstream_for(at("169.254.20.10:53"), true, None, &proxy),
            Err(Refusal::Loop)
        );
    }

    /// A client of this namespace asking an unspecified address is answered by this host's
    /// loopback: that is where its query goes, and where the answer must come from.
    #[test]
    fn an_unspecified_server_is_this_hosts_loopback() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let proxy = FixedDestination {
            original: None,
            proxy: Some(at("127.0.0.1:5300")),
            ..FixedDestination::new(None)
        };
        for (asked, upstream) in [
            ("0.0.0.0:53", "127.0.0.1:53"),
            ("[::]:53", "[::1]:53"),
            ("[::ffff:0.0.0.0]:53", "[::ffff:127.0.0.1]:53"),
            ("127.0.0.53:53", "127.0.0.53:53"),
            ("192.0.2.2:53", "192.0.2.2:53"),
        ] {
            assert_eq!(
                upstream_for(at(asked), true, None, &proxy),
                Ok(at(upstream)),
                "{asked}"
            );
        }
        // Asked as 0.0.0.0, the proxy's own address is still a loop.
        assert_eq!(
            upstream_for(at("0.0.0.0:5300"), true, None, &proxy),
            Err(Refusal::Loop)
        );
    }
}
