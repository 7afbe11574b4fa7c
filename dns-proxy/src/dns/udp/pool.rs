//! The upstream sockets: per address family, a pool of up to [`POOL_SIZE`] sockets, each
//! bound to a random port, opened as queries need them and replaced by a fresh one (a new
//! random port) after [`USES_PER_SOCKET`] queries. A batch of queries leaves from one socket
//! picked at random, so an off-path attacker must hit one of these ports as well as a query's
//! ID and question. Compare ztunnel's `src/proxy/pool.rs`.
use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;

use super::{LOG, UdpProxy, mmsg};
use crate::dns::{OriginalDestinations, stats::Stats};

/// Upstream sockets per address family, opened as queries need them. A query goes out on one
/// chosen at random, so an off-path attacker must hit one of these random ports as well as the
/// query's ID and question.
pub(super) const POOL_SIZE: usize = 16;

/// Queries a pool socket carries before a fresh one, on a new random port, takes its place:
/// the ports keep changing, and the cost of a socket is shared by this many queries.
pub const USES_PER_SOCKET: u32 = 128;

/// How often a retired pool socket checks whether its last query is settled, so it can close.
pub(super) const RETIRED_CHECK: Duration = Duration::from_millis(250);

/// One upstream socket of a pool.
pub(super) struct PoolSocket {
    /// Unique among all the proxy's pool sockets, ever.
    id: u64,
    socket: UdpSocket,
    /// Queries sent from it.
    uses: AtomicU32,
    /// Queries sent from it and not yet settled.
    outstanding: AtomicUsize,
    /// Replaced in its pool: its reader ends once nothing is outstanding.
    retired: AtomicBool,
}

impl PoolSocket {
    /// A fresh socket on a random port of `any` (`0.0.0.0:0` or `[::]:0`).
    fn open(next_id: &AtomicU64, any: SocketAddr) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            id: next_id.fetch_add(1, Ordering::Relaxed),
            socket: pool_socket(any)?,
            uses: AtomicU32::new(0),
            outstanding: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        }))
    }

    /// Unique among all the proxy's pool sockets, ever.
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// A query was sent from it: one more of its share, outstanding until settled.
    pub(super) fn carries(&self) {
        self.uses.fetch_add(1, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// A query sent from it was answered, failed or timed out.
    pub(super) fn settled(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// Replaced in its pool, with nothing sent from it outstanding: its reader may end.
    pub(super) fn is_done(&self) -> bool {
        self.retired.load(Ordering::Relaxed) && self.outstanding.load(Ordering::Relaxed) == 0
    }
}

impl std::fmt::Debug for PoolSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolSocket({})", self.id)
    }
}

/// The upstream sockets of one address family; only the receive loop picks and replaces them.
pub(super) struct Pool {
    /// `0.0.0.0:0` or `[::]:0`.
    any: SocketAddr,
    /// Empty when this family has no sockets on this host.
    slots: Mutex<Vec<Arc<PoolSocket>>>,
}

impl Pool {
    /// No sockets yet, for `any` (`0.0.0.0:0` or `[::]:0`).
    pub(super) fn new(any: impl Into<SocketAddr>) -> Self {
        Self {
            any: any.into(),
            slots: Mutex::default(),
        }
    }
}

/// A UDP socket on a random port of `any` (`0.0.0.0` or `::`).
fn pool_socket(any: SocketAddr) -> io::Result<UdpSocket> {
    let domain = Domain::for_address(any);
    let socket = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None)?;
    if any.is_ipv6() {
        // IPv4 servers are asked from the IPv4 pool.
        socket.set_only_v6(true)?;
    }
    socket.bind(&any.into())?;
    // An unreachable server (its port closed, no route) is told at once, not by a timeout.
    mmsg::queue_errors(socket.as_fd(), any.is_ipv6())?;
    UdpSocket::from_std(socket.into())
}

thread_local! {
    /// A cheap per-thread random sequence for picking pool sockets (xorshift64*).
    static RANDOM: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

thread_local! {
    /// A keyed hash (SipHash, with a key of this thread's drawn from the OS) of a counter:
    /// values no one without the key can predict.
    static UNPREDICTABLE: (RandomState, Cell<u64>) = (RandomState::new(), Cell::new(0));
}

/// A message ID an off-path attacker cannot predict, for a query sent with an ID of the
/// agent's own.
pub(super) fn unpredictable_id() -> u16 {
    UNPREDICTABLE.with(|(key, counter)| {
        counter.set(counter.get().wrapping_add(1));
        key.hash_one(counter.get()) as u16
    })
}

pub(super) fn random() -> u64 {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// The pool's sockets, locked, and the index of the one `pick` chooses: while the pool is
    /// not full, another socket is opened first, and the chosen one is replaced by a fresh one
    /// if it has carried its share. `None` (counted) with no socket to use.
    pub(super) fn pick_socket<'p>(
        self: &Arc<Self>,
        pool: &'p Pool,
        upstream: SocketAddr,
        pick: u64,
    ) -> Option<(MutexGuard<'p, Vec<Arc<PoolSocket>>>, usize)> {
        let stats = &self.stats.udp;
        let mut slots = pool.slots.lock().expect("not poisoned");
        if slots.len() < POOL_SIZE {
            match PoolSocket::open(&self.next_socket_id, pool.any) {
                Ok(fresh) => {
                    self.spawn_reader(&fresh);
                    slots.push(fresh);
                }
                // No IPv6 on the host, or out of descriptors or ports.
                Err(err) if slots.is_empty() => {
                    drop(slots);
                    Stats::add(&stats.upstream_errors);
                    self.upstream_log.warn(|failed| {
                        format!("no socket for {upstream}: {err} ({failed} queries failed)")
                    });
                    return None;
                }
                Err(err) => log::debug!(target: LOG, "opening another upstream socket: {err}"),
            }
        }
        let start = (pick % slots.len() as u64) as usize;
        if slots[start].uses.load(Ordering::Relaxed) >= USES_PER_SOCKET {
            match PoolSocket::open(&self.next_socket_id, pool.any) {
                Ok(fresh) => {
                    self.spawn_reader(&fresh);
                    let old = std::mem::replace(&mut slots[start], fresh);
                    old.retired.store(true, Ordering::Relaxed);
                }
                // Out of descriptors, say: keep using the old one for now.
                Err(err) => log::debug!(target: LOG, "replacing an upstream socket: {err}"),
            }
        }
        Some((slots, start))
    }
}
