//! The answer cache, as the UDP listener uses it: a query it holds a live answer for is answered
//! at once (with the batch's others), identical queries wait on the first one's answer
//! ([`Coalescer`]), a stale answer goes to a client whose upstream fails or is late
//! (`--serve-stale`), and the upstream's answers are kept.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
    time::Instant,
};

use super::{
    LOG, UdpProxy, count_unsent, mmsg,
    pending::{Asking, Pending},
    pool::random,
    udp_asked,
};
use crate::dns::{
    Moment, OriginalDestinations,
    cache::{self, CacheKey, CacheableQuery, Cached},
    coalesce::{Coalescer, Group, Joined, MAX_KEPT_QUERY, Waiter},
    per_client::ClientSlot,
    stats::Stats,
    wire,
};

/// What the cache did with a query.
pub(super) enum FromCache {
    /// Answered it, had it wait for an identical query's answer, or dropped it (its client
    /// at its limit).
    Handled,
    /// Holds no live answer: the query goes to the upstream, whose answer is kept.
    Forward(Box<CachedQuery>, ClientSlot),
    /// Off, or not for such a query.
    NotCached,
}

/// A query the cache could answer, on its way to the upstream.
#[derive(Debug)]
pub(super) struct CachedQuery {
    pub(super) query: CacheableQuery,
    /// The client's header and question ([`CacheableQuery::head`]), for a stale answer.
    pub(super) head: Box<[u8]>,
    /// The cache held an expired answer within --serve-stale when the query came.
    pub(super) stale_kept: bool,
    /// Its client has had that stale answer: the upstream's now only refreshes the cache.
    pub(super) served_stale: bool,
    /// Identical queries wait on this one; `None` if it went alone.
    pub(super) leading: Option<Leading>,
}

impl CachedQuery {
    /// Whether the upstream's `answer` goes to the client: not if the client has had a stale
    /// answer already, nor if the upstream failed and a stale answer is kept to go instead.
    /// A failure that may be forged (not `trusted`) decides nothing for the cache: it goes to
    /// its client as it would directly.
    pub(super) fn relays(&self, answer: &[u8], trusted: bool) -> bool {
        let stale_instead = self.stale_kept && trusted && is_failure(answer);
        !self.served_stale && !stale_instead
    }
}

/// A query that identical ones wait on ([`Coalescer`]). Finished when dropped, which leaves
/// its waiters unanswered: they retry, as after a lost datagram.
#[derive(Debug)]
pub(super) struct Leading {
    in_flight: Arc<Coalescer>,
    key: Option<CacheKey>,
    group: Group,
}

impl Leading {
    /// Its waiters, now that it is settled.
    pub(super) fn finish(mut self) -> Vec<Waiter> {
        let key = self.key.take().expect("finished once");
        self.in_flight.finish(&key, self.group)
    }

    /// Its waiters, who get a stale answer; from now on identical queries get one at once.
    pub(super) fn serve_stale(&self) -> Vec<Waiter> {
        self.key
            .as_ref()
            .map(|key| self.in_flight.serve_stale(key, self.group))
            .unwrap_or_default()
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.in_flight.finish(&key, self.group);
        }
    }
}

/// A query answered from the cache: its answer goes out with the batch's others, in one
/// `sendmmsg`.
pub(super) struct CacheHit {
    answer: Vec<u8>,
    cgroup: u64,
    client: SocketAddr,
    original: SocketAddr,
    reply_from: IpAddr,
    started: Moment,
}

/// Whom a cached, stale or shared answer goes to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Recipient<'a> {
    /// The cgroup that asked (0: not recorded), for the log.
    pub(super) cgroup: u64,
    pub(super) client: SocketAddr,
    pub(super) original: SocketAddr,
    pub(super) reply_from: IpAddr,
    /// The listener its query reached.
    pub(super) listener: BorrowedFd<'a>,
    /// When its query arrived.
    pub(super) started: Moment,
}

impl Waiter {
    /// Its client, answered through the listener its query reached.
    pub(super) fn recipient(&self) -> Recipient<'_> {
        Recipient {
            cgroup: self.cgroup,
            client: self.client,
            original: self.original,
            reply_from: self.reply_from,
            listener: self.listener.as_fd(),
            started: self.started,
        }
    }
}

/// An upstream's answer to a query the cache could answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct UpstreamAnswer<'a> {
    pub(super) datagram: &'a [u8],
    /// Whether it may be kept and shared: not if a datagram that answered nothing arrived on
    /// its socket while its query was out. Forged answers sprayed at the socket's port (which
    /// a process of the agent's namespace can read in /proc/net/udp) come with such datagrams,
    /// and one that guessed the ID must reach no client but the one that asked, as without
    /// the agent. A late answer does too, and only costs the cache an entry.
    pub(super) trusted: bool,
}

impl<'a> UpstreamAnswer<'a> {
    /// `datagram`, the answer to `pending`, trusted if nothing stray that could pass for it
    /// came on its socket between its query's sending and its matching.
    pub(super) fn checked(datagram: &'a [u8], pending: &Pending) -> Self {
        Self {
            datagram,
            trusted: pending.answer_trusted,
        }
    }
}

/// Whether `answer` says the upstream failed (SERVFAIL or REFUSED): a stale answer, if the
/// cache holds one, serves the client better (RFC 8767 §4).
fn is_failure(answer: &[u8]) -> bool {
    const SERVFAIL: u8 = 2;
    const REFUSED: u8 = 5;
    matches!(wire::header_rcode(answer), Some(SERVFAIL | REFUSED))
}

/// What an answer made here (not the upstream's, relayed) is, for the metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MadeHere {
    /// A live answer from the cache.
    Hit,
    /// A stale one (`--serve-stale`).
    Stale,
    /// An identical query's answer, shared.
    Coalesced,
    /// REFUSED for an upstream that cannot be reached (`unreachable`).
    Unreachable,
    /// REFUSED for a query whose server is this proxy (`refuse_loop`).
    Loop,
    /// FORMERR for a query whose question the proxy cannot read (`answer_malformed`).
    Malformed,
}

impl MadeHere {
    /// How the query's log line says it.
    fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "cache=hit",
            Self::Stale => "cache=stale",
            Self::Coalesced => "cache=coalesced",
            Self::Unreachable => "upstream=unreachable",
            Self::Loop => "upstream=this-proxy",
            Self::Malformed => "query=malformed",
        }
    }
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// Answers `datagram` from the cache if it holds a live answer, or has it wait for an
    /// identical query's answer; otherwise says what its own answer is to do in the cache.
    pub(super) fn consult_cache(
        &self,
        datagram: &[u8],
        to: Recipient<'_>,
        local: bool,
        hits: &mut Vec<CacheHit>,
    ) -> FromCache {
        let Some(cache) = &self.settings.cache else {
            return FromCache::NotCached;
        };
        let server = self.settings.upstream_override.unwrap_or(to.original);
        let Some(query) = CacheableQuery::parse(server, datagram) else {
            return FromCache::NotCached;
        };
        let stale_kept = match cache.lookup(&query, datagram, true, to.started.instant) {
            Cached::Fresh(answer) => {
                hits.push(CacheHit {
                    answer,
                    cgroup: to.cgroup,
                    client: to.client,
                    original: to.original,
                    reply_from: to.reply_from,
                    started: to.started,
                });
                return FromCache::Handled;
            }
            // Not served at once while the upstream is known to fail (RFC 8767's failure
            // recheck, as TCP does): any workload can send a query the upstream drops (one
            // padded past 1,232 bytes) that shares the answer's key, and one such query had
            // every workload served stale for 30 s while the upstream answered (helper-175).
            // Except while its server's port is found closed, for this workload's index
            // alone: the upstream is known to fail, and no other workload's answer changes.
            Cached::Stale { answer, .. } if self.refuses_closed_port(to) => {
                self.send_answer(&answer, to, MadeHere::Stale);
                return FromCache::Handled;
            }
            Cached::Stale { .. } => true,
            // Its server's port was found closed a moment ago: refused without asking it.
            Cached::Miss if self.refuses_closed_port(to) => {
                self.refuse_closed_port(datagram, to);
                return FromCache::Handled;
            }
            Cached::Miss => false,
        };
        let Some(client_slot) = self.admission.client_slot(to.client, to.cgroup, local) else {
            return FromCache::Handled;
        };
        let waiter = Waiter {
            cgroup: to.cgroup,
            client: to.client,
            original: to.original,
            reply_from: to.reply_from,
            listener: Arc::clone(&self.shared_listener),
            head: query.head(datagram).into(),
            message: (datagram.len() <= MAX_KEPT_QUERY).then(|| datagram.into()),
            query,
            started: to.started,
            _client_slot: client_slot,
        };
        let in_flight = &self.settings.in_flight;
        let (waiter, leading) = match in_flight.join(waiter, to.started.instant) {
            Joined::Waits => return FromCache::Handled,
            Joined::ServeStale(waiter) => {
                self.answer_stale(&waiter.query, &waiter.head, waiter.recipient());
                return FromCache::Handled;
            }
            Joined::Leads(waiter, group) => {
                let key = Some(waiter.query.key.clone());
                let leading = Leading {
                    in_flight: Arc::clone(in_flight),
                    key,
                    group,
                };
                (waiter, Some(leading))
            }
            Joined::Alone(waiter) => (waiter, None),
        };
        Stats::add(&self.stats.cache_misses);
        let Waiter {
            query,
            head,
            _client_slot,
            ..
        } = *waiter;
        let cached = CachedQuery {
            query,
            head,
            stale_kept,
            served_stale: false,
            leading,
        };
        FromCache::Forward(Box::new(cached), _client_slot)
    }

    /// Sends `to` the stale answer the cache holds for its query, if it still does.
    pub(super) fn answer_stale(&self, query: &CacheableQuery, head: &[u8], to: Recipient<'_>) {
        let Some(cache) = &self.settings.cache else {
            return;
        };
        match cache.lookup(query, head, true, Instant::now()) {
            // A fresh answer came meanwhile, through another thread.
            Cached::Fresh(answer) => self.send_answer(&answer, to, MadeHere::Hit),
            Cached::Stale { answer, .. } => self.send_answer(&answer, to, MadeHere::Stale),
            // Evicted since: the client retries, as after a loss.
            Cached::Miss => {}
        }
    }

    /// Sends the answers the cache gave a batch's queries, with as few `sendmmsg` as the
    /// kernel takes, and empties `hits`.
    pub(super) fn send_hits(&self, hits: &mut Vec<CacheHit>) {
        let mut refused = Vec::new();
        mmsg::send_all(
            self.socket.as_fd(),
            hits.len(),
            |i| mmsg::Outgoing {
                datagram: &hits[i].answer,
                to: Some(hits[i].client),
                from: Some(hits[i].reply_from),
            },
            |i, err| {
                count_unsent(&self.stats.udp, &err);
                log::debug!(target: LOG, "answering {} from the cache: {err}", hits[i].client);
                refused.push(i);
            },
        );
        let now = Moment::now();
        for (i, hit) in hits.drain(..).enumerate() {
            if refused.contains(&i) {
                continue;
            }
            let to = Recipient {
                cgroup: hit.cgroup,
                client: hit.client,
                original: hit.original,
                reply_from: hit.reply_from,
                listener: self.socket.as_fd(),
                started: hit.started,
            };
            self.answered_here(&hit.answer, to, MadeHere::Hit, now);
        }
    }

    /// Sends an answer made here to its client, from the address its query reached, and
    /// counts and logs it.
    pub(super) fn send_answer(&self, answer: &[u8], to: Recipient<'_>, source: MadeHere) {
        let mut sent = true;
        mmsg::send_all(
            to.listener,
            1,
            |_| mmsg::Outgoing {
                datagram: answer,
                to: Some(to.client),
                from: Some(to.reply_from),
            },
            |_, err| {
                count_unsent(&self.stats.udp, &err);
                log::debug!(target: LOG, "answering {} ({}): {err}", to.client, source.as_str());
                sent = false;
            },
        );
        if sent {
            self.answered_here(answer, to, source, Moment::now());
        }
    }

    /// Counts and logs an answer made here that went out at `now`.
    fn answered_here(&self, answer: &[u8], to: Recipient<'_>, source: MadeHere, now: Moment) {
        let stats = &self.stats.udp;
        let latency = now.instant.saturating_duration_since(to.started.instant);
        let asked = udp_asked(to.client, to.original, to.cgroup);
        self.settings
            .observers
            .answered(asked, Some(to.started), answer, now);
        match source {
            MadeHere::Hit => Stats::add(&self.stats.cache_hits),
            MadeHere::Stale => Stats::add(&self.stats.cache_stale),
            MadeHere::Coalesced => Stats::add(&self.stats.cache_coalesced),
            // Counted as an upstream error where it is made.
            MadeHere::Unreachable => {}
            // Counted as refused (`reason="loop"`) where it is made.
            MadeHere::Loop => {}
            // Counted as dropped (`reason="malformed"`) where it is made.
            MadeHere::Malformed => {}
        }
        stats.answered(answer, Some(latency));
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                target: LOG,
                "query udp client={} server={} {} {} rcode={} latency={latency:?} workload={}",
                to.client,
                to.original,
                source.as_str(),
                wire::describe_query(answer),
                wire::describe_rcode(answer),
                self.workload_name(to.cgroup),
            );
        }
    }

    /// The end of a query the cache could answer, whose `answer` (or none: it failed or timed
    /// out) came, and whose own client, `to`, had it relayed unless `relayed` is unset: keeps
    /// the answer and shares it with the clients that waited on it. If the upstream failed and
    /// the cache holds a stale answer, that goes to them all instead, and is kept. Returns how
    /// many waiters are left with no answer (it failed, and nothing stale was kept), counted
    /// as coalesced here: the caller counts them with the failure, as it does the query
    /// they waited on (helper-129: ten clients' queries for a server that never answered
    /// counted one timeout, and no coalesced query).
    #[must_use = "the waiters left unanswered are to be counted with the failure"]
    pub(super) fn settle_cached(
        self: &Arc<Self>,
        cached: CachedQuery,
        answer: Option<UpstreamAnswer<'_>>,
        to: Recipient<'_>,
        relayed: bool,
    ) -> u64 {
        let trusted = answer.is_none_or(|answer| answer.trusted);
        let answer = answer.map(|answer| answer.datagram);
        if !trusted {
            Stats::add(&self.stats.cache_untrusted);
        }
        let CachedQuery {
            query,
            head,
            stale_kept,
            served_stale,
            leading,
        } = cached;
        // A failure that may be forged neither marks the upstream failing nor gives the
        // waiters the stale answer: a spoofer could keep every workload on it.
        let stale_instead = stale_kept && answer.is_none_or(|answer| trusted && is_failure(answer));
        if let Some(cache) = &self.settings.cache {
            match answer {
                _ if stale_instead => {
                    cache.upstream_failed(&query.key, to.started.instant, Instant::now())
                }
                Some(answer) if trusted => {
                    _ = cache.store(&query, &head, answer, true, Instant::now());
                }
                Some(_) => {}
                None => {}
            }
        }
        if stale_instead && !served_stale && !relayed {
            self.answer_stale(&query, &head, to);
        }
        let mut unanswered = 0;
        for waiter in leading.map(Leading::finish).unwrap_or_default() {
            let recipient = waiter.recipient();
            if stale_instead {
                self.answer_stale(&waiter.query, &waiter.head, recipient);
            } else if !trusted {
                self.forward_alone(waiter);
            } else if let Some(answer) = answer {
                let shared = cache::shared_answer(
                    answer,
                    &head,
                    query.fetch_size(),
                    &waiter.query,
                    &waiter.head,
                    true,
                );
                match shared {
                    Some(shared) => self.send_answer(&shared, recipient, MadeHere::Coalesced),
                    // Not to be shown as its own (the question came back in another letter
                    // case, or it is about the first query's EDNS): its own query goes up.
                    None => self.forward_alone(waiter),
                }
            } else {
                // As after a loss: the client asks again.
                Stats::add(&self.stats.cache_coalesced);
                unanswered += 1;
            }
        }
        unanswered
    }

    /// Sends `waiter`'s query upstream on its own, as if it had not waited: its answer is
    /// relayed to it as it comes, and not kept. Dropped (counted) if it cannot be registered,
    /// as a query at the in-flight limit is; left unanswered, as after a loss, if it kept no
    /// query ([`MAX_KEPT_QUERY`]) or its listener is of the other address family (its answer
    /// would leave through this proxy's listener: with `--upstream`, IPv4 and IPv6 clients
    /// share keys).
    pub(super) fn forward_alone(self: &Arc<Self>, waiter: Waiter) {
        let Waiter {
            cgroup,
            client,
            original,
            reply_from,
            message: Some(message),
            started: asked_at,
            _client_slot: client_slot,
            ..
        } = waiter
        else {
            return;
        };
        let (Some(id), Some(question)) = (wire::message_id(&message), wire::question(&message))
        else {
            return;
        };
        if client.is_ipv4() != self.local_addr.is_ipv4() {
            return;
        }
        let upstream = self.settings.upstream_override.unwrap_or(original);
        let question = self.question_key(question);
        let asking = Asking::of(&client_slot, self.settings.max_inflight);
        let description =
            log::log_enabled!(log::Level::Debug).then(|| wire::describe_query(&message));
        // Now: its own query has the whole upstream timeout, whenever it first came (the log
        // keeps when it came).
        let started = Moment {
            instant: Instant::now(),
            wall: asked_at.wall,
        };
        let pending = |socket| Pending {
            socket,
            cgroup,
            client,
            client_id: None,
            original,
            reply_from,
            question,
            started,
            description,
            cached: None,
            _client_slot: client_slot,
            strays_at_send: 0,
            answer_trusted: false,
        };
        let pick = random();
        let Some((key, socket)) =
            self.register(upstream, id, pending, pick, asking, started.instant)
        else {
            return;
        };
        mmsg::send_all(
            socket.socket().as_fd(),
            1,
            |_| mmsg::Outgoing {
                datagram: &message,
                to: socket.address_for(upstream),
                from: None,
            },
            |_, err| self.forward_failed(key, &message, &err),
        );
    }
}
