//! Client to upstream, in batches: the queries of one `recvmmsg` on the listener are
//! registered as pending, those the cache answers are answered together, and the queries
//! that share a pool socket leave with one `sendmmsg`.
use std::{io, os::fd::AsFd, sync::Arc};

use super::{
    UdpProxy,
    cached::CacheHit,
    mmsg::{self, ReceivedBatch},
    pending::PendingKey,
    pool::{PoolSocket, random},
};
use crate::dns::{Moment, OriginalDestinations, wire};

/// What forwarding a batch of queries gathers, kept from one batch to the next.
#[derive(Default)]
pub(super) struct Forwarding {
    /// The queries going upstream.
    outgoing: Vec<Outgoing>,
    /// The queries answered from the cache.
    hits: Vec<CacheHit>,
}

/// A query of the batch being forwarded, registered as pending on `socket`.
struct Outgoing {
    /// Its index in the received batch.
    index: usize,
    socket: Arc<PoolSocket>,
    key: PendingKey,
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// Sends the queries of redirected clients in `batch` to their upstreams: registers each,
    /// then sends the queries that share a pool socket with one `sendmmsg`. Those the
    /// cache answers are answered first, all with one `sendmmsg`.
    pub(super) fn forward_batch(
        self: &Arc<Self>,
        batch: &mut ReceivedBatch,
        forwarding: &mut Forwarding,
    ) {
        // One random pool socket for the batch (another where its ID is taken).
        let pick = random();
        let now = Moment::now();
        let Forwarding { outgoing, hits } = forwarding;
        outgoing.clear();
        for (index, datagram, client) in batch.iter() {
            let arrival = batch.arrival(index);
            if let Some((key, socket)) =
                self.register_query(datagram, client, arrival, now, pick, hits)
            {
                outgoing.push(Outgoing { index, socket, key });
            }
        }
        self.send_hits(hits);
        // The queries that go up with an ID of the agent's own (`register_query`).
        for query in outgoing.iter() {
            if wire::message_id(batch.datagram(query.index)) != Some(query.key.id) {
                batch.set_message_id(query.index, query.key.id);
            }
        }
        // Queries to different upstreams may leave from different sockets (those connected to
        // each): one run, and one `sendmmsg`, per socket. The order between sockets is
        // nobody's; within one it is kept.
        outgoing.sort_by_key(|query| query.socket.id());
        let mut run_start = 0;
        while run_start < outgoing.len() {
            let socket = &outgoing[run_start].socket;
            let run_len = outgoing[run_start..]
                .iter()
                .take_while(|query| query.socket.id() == socket.id())
                .count();
            let run = &outgoing[run_start..run_start + run_len];
            mmsg::send_all(
                socket.socket().as_fd(),
                run.len(),
                |i| mmsg::Outgoing {
                    datagram: batch.datagram(run[i].index),
                    to: socket.address_for(run[i].key.upstream),
                    from: None,
                },
                |i, err| self.forward_failed(run[i].key, batch.datagram(run[i].index), &err),
            );
            run_start += run_len;
        }
        // Kept for its capacity only: a socket of one query's own closes once its query is
        // settled, not when the next batch comes.
        outgoing.clear();
    }

    /// A query the kernel would not send (`sent`, as it was to go up). It is sent once more
    /// at once: the failure may have been an ICMP error about an earlier datagram, which a
    /// socket reports on its next send ([`super::unreachable::no_route`]). If that fails too
    /// for want of a route, its client is told at once ([`UdpProxy::unreachable`]), as its
    /// own send would have failed; otherwise the client retries, as after a lost datagram.
    ///
    /// A socket connected to the upstream may have failed for want of its source address,
    /// which it keeps from `connect` (the host's may have changed): the upstream goes back to
    /// a socket per query, which chooses one as it sends, until it answers again, and the
    /// query is sent again from a socket of its own.
    pub(super) fn forward_failed(self: &Arc<Self>, key: PendingKey, sent: &[u8], err: &io::Error) {
        let stats = &self.stats.udp;
        let socket = {
            let table = self.pending.lock().expect("not poisoned");
            table.get(&key).map(|pending| Arc::clone(&pending.socket))
        };
        let (key, socket) = match socket {
            Some(connected) if connected.peer().is_some() => {
                self.disconnect_upstream(key.upstream, connected.id());
                match self.move_to_one_off(key) {
                    Some((moved, own)) => (moved, Some(own)),
                    None => (key, Some(connected)),
                }
            }
            socket => (key, socket),
        };
        let again = socket.map(|socket| {
            socket2::SockRef::from(socket.socket()).send_to(sent, &key.upstream.into())
        });
        let err = match again {
            Some(Ok(_)) => return,
            Some(Err(again)) => again,
            None => err.raw_os_error().map_or_else(
                || io::Error::other(err.to_string()),
                io::Error::from_raw_os_error,
            ),
        };
        // Settled elsewhere meanwhile (not expected): nothing left to count.
        let Some(mut pending) = self.pending.lock().expect("not poisoned").remove(&key) else {
            return;
        };
        stats.settled(1);
        let no_route = err.raw_os_error().is_some_and(|errno| {
            super::unreachable::no_route(errno, key.upstream, &self.settings.own_sockets)
        });
        if no_route {
            // The kernel's own word: nobody could have forged it.
            self.unreachable(pending, key.upstream, sent, &err, true);
            return;
        }
        pending.socket.settled();
        let mut failed = 1;
        if let Some(cached) = pending.cached.take() {
            failed += self.settle_cached(*cached, None, pending.recipient(self), false);
        }
        stats
            .upstream_errors
            .fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
        let upstream = key.upstream;
        self.upstream_log
            .warn(|failed| format!("sending to {upstream}: {err} ({failed} queries failed)"));
    }
}
