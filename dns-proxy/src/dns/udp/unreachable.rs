//! Upstreams that cannot be reached: a server whose port is closed (ICMP port unreachable), or
//! to which there is no route. A client asking directly learns that at once (its connected
//! socket reads `ECONNREFUSED`, and glibc asks its next nameserver); through the proxy it
//! would wait out its timeout, five seconds a lookup with a dead first nameserver. So the
//! query is settled at once and its client answered REFUSED, from its server's address:
//! resolvers move on to their next server for it as they do for the error, and none takes it
//! for an answer (dnsmasq takes a SERVFAIL for the fastest server's, and then asks only the
//! dead one; musl and dnsmasq wait on for their other servers' answers after a REFUSED, as
//! they do when a dead server stays silent). Before the REFUSED, the client is sent the ICMP
//! error the server sent (`port_unreachable`, with `CAP_NET_RAW`), so that a connected
//! socket reads `ECONNREFUSED`, as asking the server directly (Node.js's c-ares takes a
//! REFUSED as final). And once a second, other question to the same workload's index is
//! refused within 2 s ([`ClosedPorts`]), the agent has the kernel refuse that index's
//! datagrams itself for 2 s, so its clients read the port unreachable as from the server.
//! With the cache on and a stale answer kept (`--serve-stale`), the client gets that
//! instead. An ICMP error can be forged as an answer can: one that settles a query after
//! errors or answers that matched nothing came for its question decides nothing beyond its
//! own client (docs/security.md, §7).
use std::{io, net::SocketAddr, os::fd::AsFd as _, sync::Arc};

use tokio::io::Interest;

use super::{
    LOG, Recipient, UdpProxy,
    cached::{Leading, MadeHere},
    mmsg::{self, QueuedError},
    pending::{Pending, PendingKey},
    pool::{PoolSocket, Stray},
};
use crate::{
    dns::{OriginalDestinations, stats::Stats, wire},
    ebpf::OwnSockets,
};

/// Whether a send that failed twice with `errno` failed because `upstream` cannot be reached
/// from here at all (no route, or a firewall's refusal), as a client's own send would have,
/// as opposed to a passing shortage (`ENOBUFS`).
///
/// A failed send says nothing sure of its datagram: an unconnected socket with `IP_RECVERR`
/// reports the last ICMP error about any earlier datagram, to any server, on its next send
/// (and ICMP errors can come in bursts, between a send and its retry). So `ECONNREFUSED`,
/// which only an ICMP error gives, never counts; `EPERM`, which none gives (a netfilter or
/// BPF drop), does; and no route (`ENETUNREACH`, `EHOSTUNREACH`, `EACCES`, or `EINVAL`,
/// which a `blackhole` route gives) counts only if a route lookup for `upstream` on a socket
/// of its own, which no ICMP error reaches, fails too.
pub(super) fn no_route(errno: i32, upstream: SocketAddr, own_sockets: &OwnSockets) -> bool {
    match errno {
        libc::EPERM => true,
        libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL => {
            route_lookup_fails(upstream, own_sockets)
        }
        _ => false,
    }
}

/// Whether connecting a fresh UDP socket to `upstream` (a route lookup; nothing is sent)
/// fails for want of a route (`EINVAL`: a `blackhole` route, or an `ip rule ... blackhole`).
/// The socket is the agent's own: never connected to the block.
fn route_lookup_fails(upstream: SocketAddr, own_sockets: &OwnSockets) -> bool {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::DGRAM.cloexec(),
        None,
    );
    let Ok(socket) = socket else {
        return false;
    };
    own_sockets.mark(&socket);
    match socket.connect(&upstream.into()) {
        Ok(()) => false,
        Err(err) => matches!(
            err.raw_os_error(),
            Some(
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EPERM | libc::EINVAL
            )
        ),
    }
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// Takes the ICMP errors queued on pool socket `pool_socket`, each about a query sent
    /// from it, and settles the queries they name. Clears the socket's error readiness.
    pub(super) fn take_errors(self: &Arc<Self>, pool_socket: &PoolSocket) {
        let (id, socket) = (pool_socket.id(), pool_socket.socket());
        let _ = socket.try_io(Interest::ERROR, || {
            loop {
                match mmsg::receive_error(socket.as_fd()) {
                    Ok(Some(error)) => self.on_icmp_error(pool_socket, error),
                    Ok(None) => return Err::<(), _>(io::ErrorKind::WouldBlock.into()),
                    Err(err) => {
                        log::debug!(target: LOG, "upstream socket {id}: its errors: {err}");
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                }
            }
        });
    }

    pub(super) fn on_icmp_error(self: &Arc<Self>, pool_socket: &PoolSocket, error: QueuedError) {
        // A soft error (a router's host unreachable, time exceeded) is not shown to a
        // connected socket either: its client retries, as asking directly.
        if !error.hard {
            return;
        }
        let (Some(id), Some(question)) = (
            wire::message_id(&error.datagram),
            wire::question(&error.datagram).filter(|question| !question.is_empty()),
        ) else {
            // Too little of the query quoted to tell which it was about.
            self.count_stray();
            return;
        };
        let question = self.question_key(question);
        let key = PendingKey::new(pool_socket.id(), error.destination, id);
        // The query the error came back for: its socket, server, ID and question.
        let pending = {
            let mut table = self.pending.lock().expect("not poisoned");
            match table.get(&key) {
                Some(pending) if pending.question == question => table.remove(&key),
                _ => None,
            }
        };
        let Some(pending) = pending else {
            // An ICMP error can be forged as an answer can (a raw socket, the port read in
            // /proc): one that names no query in flight counts as a stray answer would, so
            // that guessing IDs with errors is seen as guessing them with answers is.
            self.count_stray();
            if error.destination == pool_socket.upstream() {
                pool_socket.stray(Stray::Question { id, key: question });
            }
            return;
        };
        self.stats.udp.settled(1);
        let trusted = pending.nothing_stray_since_sent();
        let why = io::Error::from_raw_os_error(error.errno);
        self.unreachable(pending, error.destination, &error.datagram, &why, trusted);
    }

    /// `pending`, taken out of the table, whose upstream cannot be reached (`why`): its
    /// client, and those of identical queries that waited on it, are answered REFUSED at
    /// once (or stale), from `sent`, the query as it went up, and their own queries.
    ///
    /// Unless `trusted` (an ICMP error on a socket where forgeries for its question came):
    /// then it may be forged, and it decides nothing beyond its own client, who gets it as
    /// directly. The upstream is not taken for failing, no stale answer is served, the port
    /// is not taken for closed, and the clients that waited are asked for on their own.
    pub(super) fn unreachable(
        self: &Arc<Self>,
        mut pending: Pending,
        upstream: SocketAddr,
        sent: &[u8],
        why: &io::Error,
        trusted: bool,
    ) {
        pending.socket.settled();
        Stats::add(&self.stats.udp.upstream_errors);
        self.upstream_log
            .warn(|failed| format!("{upstream}: {why} ({failed} queries failed)"));
        let to = pending.recipient(self);
        let stale = trusted
            && pending
                .cached
                .as_ref()
                .is_some_and(|cached| cached.stale_kept);
        // A client that has had the stale answer already (and its waiters, then) is told
        // nothing more: an error after it would fail its other queries on that socket.
        let served_stale = pending
            .cached
            .as_ref()
            .is_some_and(|cached| cached.served_stale);
        let mut waiters = Vec::new();
        if let Some(mut cached) = pending.cached.take() {
            if !stale {
                waiters = cached
                    .leading
                    .take()
                    .map(Leading::finish)
                    .unwrap_or_default();
            }
            if trusted {
                // Nothing kept; with a stale answer, that goes to the client and the waiters.
                // Its waiters were taken out above: none is left unanswered there.
                let _none = self.settle_cached(*cached, None, to, !stale);
            } else {
                Stats::add(&self.stats.cache_untrusted);
            }
        }
        if stale {
            return;
        }
        // A workload's own index only: a shared one (cgroup 0) is every workload's that asks
        // the server, and one workload's refused query must not refuse the others'.
        let reached = self.reached_by(to);
        if trusted
            && to.cgroup != 0
            && self.settings.closed_ports.confirm(
                reached,
                question_of(sent),
                std::time::Instant::now(),
            )
        {
            // With the cache on, the agent refuses them itself, after the cache: the kernel
            // cannot tell the names the cache holds, fresh or stale, and refused them with
            // the rest (helper-196: a workload asking a cached name every 0.1 s beside an
            // uncached one every 0.5 s, its server's port closed, was refused 40 times of
            // 50). Unless it has no raw socket to send the client the port unreachable: a
            // REFUSED alone is final to c-ares, and the kernel's refusal is then the only one
            // a connected client reads as from the server.
            if self.settings.cache.is_some() && self.settings.port_unreachable.can_tell(reached) {
                self.admission.refuse_here_for_a_while(reached);
            } else {
                self.admission.refuse_udp_for_a_while(reached);
            }
        }
        // The ICMP error first: a connected client reads it before the REFUSED, as asking
        // the server directly, and moves on; an unconnected one takes the REFUSED.
        let port_unreachable = &self.settings.port_unreachable;
        if !served_stale {
            port_unreachable.send(to.client, reached, sent, pending.client_id);
            if let Some(answer) = refused(sent, pending.client_id) {
                self.send_answer(&answer, to, MadeHere::Unreachable);
            }
        }
        for waiter in waiters {
            if !trusted {
                self.forward_alone(waiter);
                continue;
            }
            let to = waiter.recipient();
            port_unreachable.send(to.client, self.reached_by(to), &waiter.head, None);
            if let Some(answer) = refused(&waiter.head, None) {
                self.send_answer(&answer, to, MadeHere::Unreachable);
            }
        }
    }
}

/// How far apart two refused questions to one index may be to confirm its server's port is
/// closed for every question: as long as the kernel then refuses it.
const CONFIRM_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Queries a listener refuses itself a second, for servers whose port it found closed, before
/// the kernel refuses them instead: a client that asks that often is flooding.
pub(super) const REFUSED_HERE_PER_SECOND: u32 = 1000;

/// Indexes with one refused question kept at most; past it, those older than
/// [`CONFIRM_WITHIN`] go.
const UNCONFIRMED_KEPT: usize = 1024;

/// The indexes (block addresses) whose server answered one question port unreachable, waiting
/// for a second, other question to be refused too before the kernel is told to refuse them
/// all: a firewall may refuse some questions only (and an adversary once had one refused
/// query cost its workload every lookup to that server for 2 s).
#[derive(Debug, Default)]
pub struct ClosedPorts(
    std::sync::Mutex<std::collections::HashMap<SocketAddr, (std::time::Instant, u64)>>,
);

impl ClosedPorts {
    /// Whether `question` refused at `reached` confirms an earlier, other question refused
    /// there within [`CONFIRM_WITHIN`]; notes it otherwise.
    fn confirm(&self, reached: SocketAddr, question: u64, now: std::time::Instant) -> bool {
        let mut unconfirmed = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&(at, earlier)) = unconfirmed.get(&reached)
            && earlier != question
            && now.duration_since(at) <= CONFIRM_WITHIN
        {
            unconfirmed.remove(&reached);
            return true;
        }
        if unconfirmed.len() >= UNCONFIRMED_KEPT {
            unconfirmed.retain(|_, (at, _)| now.duration_since(*at) <= CONFIRM_WITHIN);
        }
        if unconfirmed.len() < UNCONFIRMED_KEPT {
            unconfirmed.insert(reached, (now, question));
        }
        false
    }
}

/// A hash of the question of `sent` (a query as it went up), the same in every listener; 0
/// without a whole one. Not keyed: a collision only takes two questions for one.
fn question_of(sent: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    let question = wire::question(sent).unwrap_or_default();
    foldhash::fast::FixedState::with_seed(0).hash_one(question)
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// The block address on the proxy's port that `to`'s query reached, which names its
    /// server.
    fn reached_by(&self, to: Recipient<'_>) -> SocketAddr {
        SocketAddr::new(to.reply_from, self.local_addr.port())
    }

    /// Whether the agent refuses queries to the server `to` asked, whose port it found closed
    /// a moment ago ([`OriginalDestinations::refused_here`]).
    pub(super) fn refuses_closed_port(&self, to: Recipient<'_>) -> bool {
        self.admission.refused_here(self.reached_by(to))
    }

    /// Refuses a query to the server `to` asked, whose port the agent found closed a moment
    /// ago ([`refuses_closed_port`](Self::refuses_closed_port)), without asking it: the port
    /// unreachable about it and REFUSED, as a query it asked would have had.
    pub(super) fn refuse_closed_port(&self, datagram: &[u8], to: Recipient<'_>) {
        Stats::add(&self.stats.udp.upstream_errors);
        self.upstream_log.warn(|failed| {
            format!(
                "{}: refused here, its port found closed a moment ago ({failed} queries failed)",
                to.original
            )
        });
        let reached = self.reached_by(to);
        if self.refused_here_past_the_rate() {
            // A workload flooding its closed server: the kernel refuses the rest, for
            // nothing, its cached names with them (helper-200: the agent spent 5 to 7 s of
            // CPU in 7 s on such a flood, 0.7 s when the kernel refused it).
            self.admission.refuse_udp_for_a_while(reached);
        }
        self.settings
            .port_unreachable
            .send(to.client, reached, datagram, None);
        if let Some(answer) = refused(datagram, None) {
            self.send_answer(&answer, to, MadeHere::Unreachable);
        }
    }

    /// Counts one refusal of this listener's own; whether the kernel is to take over: at the
    /// first past [`REFUSED_HERE_PER_SECOND`] in a second, and every 256th after (each a
    /// `bpf()` call, while the datagrams already queued for the listener come in).
    fn refused_here_past_the_rate(&self) -> bool {
        let now = std::time::Instant::now();
        let mut this_second = self
            .refused_here
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (since, count) = &mut *this_second;
        if now.duration_since(*since) >= std::time::Duration::from_secs(1) {
            (*since, *count) = (now, 0);
        }
        *count = count.saturating_add(1);
        *count > REFUSED_HERE_PER_SECOND && (*count - REFUSED_HERE_PER_SECOND) % 256 == 1
    }

    /// Answers REFUSED to a query whose server is this proxy itself, to `to`, from the
    /// address it reached: its resolver moves on to its next nameserver at once, as from a
    /// server that will not answer, instead of waiting out its timeout. No larger than the
    /// query (its question alone), so a forged source gains nothing.
    pub(super) fn refuse_loop(&self, datagram: &[u8], to: Recipient<'_>) {
        if let Some(answer) = refused(datagram, None) {
            self.send_answer(&answer, to, MadeHere::Loop);
        }
    }
}

/// REFUSED to `sent` (a query, or its start as an ICMP error carried it back): its header
/// with QR set and RCODE 5 (opcode, RD and CD kept), its question if it is whole, none
/// otherwise, and the client's own ID if the query went up with the agent's.
fn refused(sent: &[u8], client_id: Option<u16>) -> Option<Vec<u8>> {
    let header = sent.get(..wire::HEADER_LEN)?;
    let question = wire::question(sent).unwrap_or_default();
    let mut answer = Vec::with_capacity(wire::HEADER_LEN + question.len());
    answer.extend_from_slice(&client_id.map_or([header[0], header[1]], u16::to_be_bytes));
    answer.push(0x80 | (header[2] & 0x79));
    answer.push((header[3] & 0x10) | 5);
    answer.extend_from_slice(&u16::from(!question.is_empty()).to_be_bytes());
    answer.extend_from_slice(&[0; 6]);
    answer.extend_from_slice(question);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed send is taken for a missing route only if nothing but a missing route
    /// explains it: an ICMP error about another datagram does not count, whatever it says.
    #[test]
    fn only_a_missing_route_confirmed_by_a_lookup_counts() {
        let reachable: SocketAddr = "127.0.0.1:53".parse().unwrap();
        // Only an ICMP error gives it: about an earlier datagram, perhaps to another server.
        assert!(!no_route(
            libc::ECONNREFUSED,
            reachable,
            &OwnSockets::default()
        ));
        // A burst of ICMP host unreachable overwrote the socket's error: the route is there.
        assert!(!no_route(
            libc::EHOSTUNREACH,
            reachable,
            &OwnSockets::default()
        ));
        assert!(!no_route(
            libc::ENETUNREACH,
            reachable,
            &OwnSockets::default()
        ));
        assert!(!no_route(libc::EINVAL, reachable, &OwnSockets::default()));
        // No ICMP error gives it: a firewall dropped the send.
        assert!(no_route(libc::EPERM, reachable, &OwnSockets::default()));
        assert!(!no_route(libc::ENOBUFS, reachable, &OwnSockets::default()));
    }

    #[test]
    fn only_a_second_other_question_refused_soon_after_confirms_a_closed_port() {
        let ports = ClosedPorts::default();
        let reached: SocketAddr = "127.53.0.7:8053".parse().unwrap();
        let other: SocketAddr = "127.53.0.8:8053".parse().unwrap();
        let start = std::time::Instant::now();
        let at = |ms| start + std::time::Duration::from_millis(ms);
        assert!(!ports.confirm(reached, 1, at(0)));
        // The same question again (a client's retry), or another index: not yet.
        assert!(!ports.confirm(reached, 1, at(100)));
        assert!(!ports.confirm(other, 2, at(150)));
        // Another question at the same index, soon after: confirmed, and noted no more.
        assert!(ports.confirm(reached, 2, at(200)));
        assert!(!ports.confirm(reached, 3, at(5000)));
        // Too late after the first: it starts again.
        assert!(!ports.confirm(reached, 4, at(7100)));
    }

    #[test]
    fn a_refusal_keeps_the_question_id_and_flags_a_client_checks() {
        // ID 0x1234, RD and CD set, one question, and an OPT record after it.
        let mut query = vec![0x12, 0x34, 0x01, 0x10, 0, 1, 0, 0, 0, 0, 0, 1];
        query.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
        let question = query[12..].to_vec();
        query.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        let answer = refused(&query, None).unwrap();
        assert_eq!(&answer[..4], [0x12, 0x34, 0x81, 0x15]);
        assert_eq!(&answer[4..12], [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&answer[12..], &question[..]);
        assert_eq!(wire::response_id(&answer), Some(0x1234));
        // The client's own ID, when the query went up with the agent's.
        assert_eq!(&refused(&query, Some(7)).unwrap()[..2], [0, 7]);
        // Cut inside its question (an ICMP error carries back what it can): no question.
        let cut = refused(&query[..20], None).unwrap();
        assert_eq!(cut.len(), 12);
        assert_eq!(&cut[4..6], [0, 0]);
        assert!(refused(&query[..8], None).is_none());
    }
}
