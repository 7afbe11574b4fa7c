//! Upstream to client, in batches: each pool socket has a reader that takes what arrived with
//! one `recvmmsg`, matches each datagram against the pending table, and sends the answers back
//! to their clients with one `sendmmsg` on the listener, each from the address its query
//! reached.
use std::{cell::RefCell, io, net::SocketAddr, os::fd::AsFd, sync::Arc};

use tokio::io::Interest;

use super::{
    LOG, UdpProxy,
    cached::UpstreamAnswer,
    count_unsent,
    mmsg::{self, ReceivedBatch},
    pending::Pending,
    pool::PoolSocket,
    receive_batch,
    turn::Turn,
    udp_asked,
};
use crate::dns::{Moment, OriginalDestinations, wire};

/// The answers a pool reader found in one batch, before they go back to their clients.
#[derive(Default)]
struct Answers {
    received: ReceivedBatch,
    /// (index in `received`, the upstream it came from, the query it answers).
    matched: Vec<(usize, SocketAddr, Pending)>,
}

thread_local! {
    /// Where pool readers receive answers, one per worker thread: no buffer per socket or query.
    static ANSWERS: RefCell<Answers> = RefCell::default();
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// Starts relaying the answers that arrive on `socket`.
    pub(super) fn spawn_reader(self: &Arc<Self>, socket: &Arc<PoolSocket>) {
        let (proxy, reader) = (Arc::clone(self), Arc::clone(socket));
        tokio::spawn(async move { proxy.relay_answers(&reader).await });
    }

    /// Relays the answers that arrive on a pool socket to their clients, until the proxy stops
    /// or, once the socket is retired, until nothing sent from it is outstanding.
    async fn relay_answers(self: &Arc<Self>, pool_socket: &PoolSocket) {
        let (id, socket) = (pool_socket.id(), pool_socket.socket());
        let turn = Turn::new();
        loop {
            if pool_socket.is_done() {
                return;
            }
            tokio::select! {
                () = self.workers.stopped() => return,
                // It may be retired, or its last query settled, while it waits here.
                () = pool_socket.until_done() => continue,
                // An ICMP error queued for a query sent from it, too.
                ready = turn.ready(socket, Interest::READABLE | Interest::ERROR) => match ready {
                    Ok(ready) if ready.is_error() => self.take_errors(pool_socket),
                    Ok(_) => {}
                    Err(err) => {
                        log::warn!(target: LOG, "upstream socket {id}: {err}");
                        return;
                    }
                },
            }
            ANSWERS.with_borrow_mut(|answers| {
                match receive_batch(socket, &mut answers.received, pool_socket.peer()) {
                    Ok(_) => self.relay_batch(pool_socket, answers),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    // The socket's pending error, an ICMP error's, which is in its queue.
                    Err(_) => self.take_errors(pool_socket),
                }
            });
        }
    }

    /// Relays the datagrams of `answers.received`, which arrived on `socket`, that answer
    /// pending queries: all of them with as few `sendmmsg` as the kernel takes. An upstream
    /// that answered on a socket of one query's own may get sockets connected to it.
    fn relay_batch(self: &Arc<Self>, socket: &PoolSocket, answers: &mut Answers) {
        let Answers { received, matched } = answers;
        matched.clear();
        // Answers that refresh the cache, or that a stale answer replaces: not relayed.
        let mut not_relayed = Vec::new();
        let mut connected = None;
        let mut heard = false;
        for (index, datagram, from) in received.iter() {
            let pending = match self.match_answer(socket.id(), datagram, from) {
                Ok(pending) => pending,
                // Only its upstream's can pass for an answer there (a socket of one query's
                // own hears anyone).
                Err(stray) => {
                    if from == socket.upstream() {
                        socket.stray(stray);
                    }
                    continue;
                }
            };
            heard = true;
            if socket.peer().is_none() && connected != Some(from) {
                self.connect_upstream(from, pending.started.instant);
                connected = Some(from);
            }
            if pending
                .cached
                .as_ref()
                .is_none_or(|cached| cached.relays(datagram, pending.answer_trusted))
            {
                matched.push((index, from, pending));
            } else {
                not_relayed.push((index, pending));
            }
        }
        for (index, mut pending) in not_relayed {
            if let Some(cached) = pending.cached.take() {
                let answer = UpstreamAnswer::checked(received.datagram(index), &pending);
                let _answered =
                    self.settle_cached(*cached, Some(answer), pending.recipient(self), false);
            }
        }
        // Queries that went up with an ID of the agent's own: their clients' IDs back.
        for (index, _, pending) in matched.iter() {
            if let Some(id) = pending.client_id {
                received.set_message_id(*index, id);
            }
        }
        let stats = &self.stats.udp;
        let now = Moment::now();
        if heard {
            socket.answered(now.instant);
        }
        let mut refused = Vec::new();
        mmsg::send_all(
            self.socket.as_fd(),
            matched.len(),
            |i| mmsg::Outgoing {
                datagram: received.datagram(matched[i].0),
                to: Some(matched[i].2.client),
                from: Some(matched[i].2.reply_from),
            },
            |i, err| {
                count_unsent(stats, &err);
                log::debug!(target: LOG, "relaying to {}: {err}", matched[i].2.client);
                refused.push(i);
            },
        );
        for (i, (index, from, mut pending)) in matched.drain(..).enumerate() {
            let datagram = received.datagram(index);
            let relayed = !refused.contains(&i);
            if let Some(cached) = pending.cached.take() {
                let answer = UpstreamAnswer::checked(datagram, &pending);
                let _answered =
                    self.settle_cached(*cached, Some(answer), pending.recipient(self), relayed);
            }
            if !relayed {
                continue;
            }
            let latency = now
                .instant
                .saturating_duration_since(pending.started.instant);
            stats.answered(datagram, Some(latency));
            let asked = udp_asked(pending.client, pending.original, pending.cgroup);
            self.settings
                .observers
                .answered(asked, Some(pending.started), datagram, now);
            if let Some(description) = pending.description {
                log::debug!(
                    target: LOG,
                    "query udp client={} server={} upstream={from} {description} rcode={} latency={latency:?} workload={}",
                    pending.client,
                    pending.original,
                    wire::describe_rcode(datagram),
                    self.workload_name(pending.cgroup),
                );
            }
        }
    }
}
