//! The connections open now, and, at twice `--max-tcp-connections`, the one that gives its
//! place to a client within its fair share: the connection quiet the longest of the client
//! furthest past its own share (by what it holds now, as shares are now); or, for a client
//! holding nothing where every share is one connection, the one quiet the longest of all.
//! Quiet, not old (helper-169: the oldest went first, so a client's long-lived connection was
//! always the one), and not idle first (helper-170: workloads that kept a query the server
//! never answers pending were never closed, and a client that asks and is answered, idle most
//! of the time, was). Workloads that each came within their share while fewer held
//! connections fill twice the limit together, and kept every newcomer's connection out for as
//! long as they held theirs (helper-168: 12 cgroups holding 2,048 connections, another's TCP
//! lookups reset, 30 of 30, and glibc's retry over TCP after a truncated answer failed). The
//! connection closed so ends as a server may end any (RFC 7766): its client asks again on a
//! new one.
use std::{
    cmp::Reverse,
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::connection::Connection;
use crate::dns::per_client::{ClientSlot, PerClientLimit, Standing};

/// Every relayed connection, with what its client holds for it.
pub(super) struct OpenConnections {
    /// `--max-tcp-connections`: the total fair shares are counted against.
    max: usize,
    per_client: Arc<PerClientLimit>,
    table: Mutex<HashMap<u64, Open>>,
    next_id: AtomicU64,
}

struct Open {
    connection: Arc<Connection>,
    /// Counts against its client's limits until the connection ends.
    slot: ClientSlot,
}

/// A connection's place in [`OpenConnections`], given up when dropped.
pub(super) struct Registered {
    open: Arc<OpenConnections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let gone = self
            .open
            .table
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
        // The slot is given back outside the table's lock.
        drop(gone);
    }
}

impl OpenConnections {
    pub(super) fn new(max: usize, per_client: Arc<PerClientLimit>) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_client,
            table: Mutex::default(),
            next_id: AtomicU64::new(0),
        })
    }

    /// Notes `connection`, whose client holds `slot` for it, until the returned place drops.
    pub(super) fn add(
        self: &Arc<Self>,
        connection: Arc<Connection>,
        slot: ClientSlot,
    ) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let open = Open { connection, slot };
        self.table.lock().expect("not poisoned").insert(id, open);
        Registered {
            open: Arc::clone(self),
            id,
        }
    }

    /// At twice the limit, for a client of `standing` (within its share): tells the
    /// connection that gives way to it to close (module doc); whether there was one.
    pub(super) fn close_one_for(&self, standing: Standing) -> bool {
        // With a share of one, a connection past no share is its client's only one.
        let any_at_its_share =
            standing == Standing::HoldingNothing && self.per_client.fair_share(self.max) == 1;
        let table = self.table.lock().expect("not poisoned");
        let giving_way = table
            .values()
            .filter(|open| !open.connection.give_way.is_stopped())
            .map(|open| {
                let past = open.slot.past_fair_share(self.max);
                let last = *open.connection.last_activity.lock().expect("not poisoned");
                (past, Reverse(last), open)
            })
            .filter(|(past, ..)| *past > 0 || any_at_its_share)
            .max_by_key(|(past, last, _)| (*past, *last))
            .map(|(.., open)| open);
        let Some(open) = giving_way else {
            return false;
        };
        open.connection.give_way.stop();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use super::*;
    use crate::dns::per_client::Client;

    /// One more slot of pod `n` (10.0.0.n), a client by its address.
    fn slot_of(per_client: &Arc<PerClientLimit>, n: u8) -> ClientSlot {
        per_client
            .try_acquire(Client::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))))
            .expect("within its limit")
    }

    /// A connection of pod `n`, its client's slot for it taken.
    fn connection_of(
        open: &Arc<OpenConnections>,
        per_client: &Arc<PerClientLimit>,
        n: u8,
    ) -> (Arc<Connection>, Registered) {
        let pod = IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
        let slot = slot_of(per_client, n);
        let server: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let connection = Arc::new(Connection::new(0, (pod, 40000).into(), server, server));
        let registered = open.add(Arc::clone(&connection), slot);
        (connection, registered)
    }

    #[test]
    fn at_twice_the_limit_the_client_furthest_past_its_share_gives_way() {
        let per_client = PerClientLimit::new(4);
        let open = OpenConnections::new(4, Arc::clone(&per_client));
        // 4 below the limit, then 2, 1 and 1 within their shares as they came: 8 in all.
        let mut held = Vec::new();
        for (pod, connections) in [(1, 4), (2, 2), (3, 1), (4, 1)] {
            for _ in 0..connections {
                held.push((pod, connection_of(&open, &per_client, pod)));
            }
        }
        let newcomer = slot_of(&per_client, 5);
        assert!(open.close_one_for(newcomer.standing(4)));
        let closing: Vec<u8> = held
            .iter()
            .filter(|(_, (connection, _))| connection.give_way.is_stopped())
            .map(|(pod, _)| *pod)
            .collect();
        // One of the first pod's four: furthest past a share of one.
        assert_eq!(closing, [1]);
    }

    #[test]
    fn with_a_share_of_one_each_a_client_holding_nothing_takes_the_place_quiet_the_longest() {
        let per_client = PerClientLimit::new(4);
        let open = OpenConnections::new(4, Arc::clone(&per_client));
        let held: Vec<_> = (1..=8)
            .map(|pod| {
                let connection = connection_of(&open, &per_client, pod);
                std::thread::sleep(std::time::Duration::from_millis(2));
                connection
            })
            .collect();
        let newcomer = slot_of(&per_client, 9);
        assert!(open.close_one_for(newcomer.standing(4)));
        let closing: Vec<bool> = held
            .iter()
            .map(|(connection, _)| connection.give_way.is_stopped())
            .collect();
        assert_eq!(
            closing,
            [true, false, false, false, false, false, false, false]
        );
        // A connection gone leaves the table.
        drop(held);
        assert!(open.table.lock().unwrap().is_empty());
    }

    /// Past its share by what it holds now: a client that held two and let one go holds its
    /// share, and its connection is not taken for one past it (helper-169: it was closed
    /// before an older, quieter one of another client).
    #[test]
    fn a_client_that_let_a_connection_go_is_judged_by_what_it_holds_now() {
        let per_client = PerClientLimit::new(4);
        let open = OpenConnections::new(4, Arc::clone(&per_client));
        let quiet_longest = connection_of(&open, &per_client, 2);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let first = connection_of(&open, &per_client, 1);
        let (second, _kept) = connection_of(&open, &per_client, 1);
        drop(first);
        let others: Vec<_> = (3..=8)
            .map(|pod| connection_of(&open, &per_client, pod))
            .collect();
        let newcomer = slot_of(&per_client, 9);
        assert!(open.close_one_for(newcomer.standing(4)));
        assert!(quiet_longest.0.give_way.is_stopped());
        assert!(!second.give_way.is_stopped());
        drop(others);
    }

    /// The connection quiet the longest gives way, with a query outstanding or not: ranking
    /// those with nothing outstanding first let workloads that keep a query the server never
    /// answers pending stay, and closed a client that asks and is answered (helper-170).
    #[test]
    fn a_query_kept_pending_does_not_keep_a_quieter_connection_open() {
        let per_client = PerClientLimit::new(4);
        let open = OpenConnections::new(4, Arc::clone(&per_client));
        let pending = connection_of(&open, &per_client, 1);
        pending.0.pending.lock().unwrap().insert(
            7,
            super::super::connection::Pending {
                cacheable: None,
                awaited: [super::super::connection::Awaited {
                    started: crate::dns::Moment::now(),
                    description: None,
                    transfer: None,
                }]
                .into(),
            },
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let rest: Vec<_> = (2..=8)
            .map(|pod| connection_of(&open, &per_client, pod))
            .collect();
        let newcomer = slot_of(&per_client, 9);
        assert!(open.close_one_for(newcomer.standing(4)));
        assert!(pending.0.give_way.is_stopped());
        assert!(
            rest.iter()
                .all(|(connection, _)| !connection.give_way.is_stopped())
        );
    }
}
