//! Hooks for the fuzz targets (`fuzz/fuzz_targets/udp_state.rs`): the listener's state
//! machine (admission, the pending table, answer matching) driven without a client socket or
//! the kernel. Built only with the `fuzzing` feature.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use super::{
    UdpProxy,
    mmsg::{Arrival, LOOPBACK_IFINDEX},
};
use crate::dns::{Moment, OriginalDestinations};

impl<D: OriginalDestinations> UdpProxy<D> {
    /// For the fuzz targets: what the receive loop does with a client's datagram, but for the
    /// send: `Some((pool socket, upstream))` if it is now a query in flight.
    pub fn fuzz_register(
        self: &Arc<Self>,
        datagram: &[u8],
        client: SocketAddr,
        pick: u64,
    ) -> Option<(u64, SocketAddr)> {
        // As a pod's query arrives: over its own interface, each client a client of its own.
        let arrival = Some(Arrival {
            destination: self.local_addr.ip(),
            ifindex: LOOPBACK_IFINDEX + 1,
        });
        let mut hits = Vec::new();
        let registered =
            self.register_query(datagram, client, arrival, Moment::now(), pick, &mut hits);
        self.send_hits(&mut hits);
        registered.map(|(key, socket)| (socket.id(), key.upstream))
    }

    /// For the fuzz targets: what a pool reader does with a datagram from `from` on pool
    /// socket `socket`: the client it is relayed to, if it answers a query in flight.
    pub fn fuzz_match(&self, socket: u64, datagram: &[u8], from: SocketAddr) -> Option<SocketAddr> {
        self.match_answer(socket, datagram, from)
            .ok()
            .map(|pending| pending.client)
    }

    /// For the fuzz targets: queries in flight, by the table and by the shared gauge.
    pub fn fuzz_inflight(&self) -> (usize, u64) {
        (
            self.inflight(),
            self.stats.udp.inflight.load(Ordering::Relaxed),
        )
    }

    /// For the fuzz targets: ends the pool readers and the sweeper (they end when next polled).
    pub fn fuzz_stop(&self) {
        self.workers.stop();
    }
}
