//! Shedding while the kernel drops: a UDP thread's listener has one receive queue for all its
//! clients, and when it is full the kernel drops datagrams, anyone's, before the agent can
//! tell whose; the per-client limits act only on what was read. So while the listener's
//! queue overflows, each client's queries beyond a quota per [`WINDOW`] are dropped as soon
//! as they are read (a read costs a fraction of a forward), and the thread reads its queue
//! faster than it fills.
//!
//! The quota shares out what the thread can forward, max-min fairly: a client that asks for
//! less than an equal share gets all it asks, and what it leaves goes to the others in equal
//! parts. What the thread can forward is learnt as TCP learns a window: half of what it
//! forwarded in a window in which its queue overflowed, a quarter more for each window in
//! which it did not, and no quota once every client fits.
//!
//! The signal is the kernel's own account of the listener's queue (`SO_MEMINFO`), read once a
//! window: datagrams it dropped since the last, or a queue more than a quarter full (the
//! thread is falling behind, and a full queue drops anyone's). A backlog of a few thousand
//! queries sheds nothing, so a closed loop is never shed; nor is a client alone
//! ([`SHARED_FOR`]).
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use foldhash::HashMap;

use crate::dns::per_client::Client;

/// How long counts run before the thread checks whether its listener overflowed.
pub(super) const WINDOW: Duration = Duration::from_millis(50);

/// The fewest queries a client may have forwarded in a window, however long the overflow:
/// 1,280 a second.
pub(super) const MIN_QUOTA: u32 = 64;

/// How long after two clients last asked in one window the thread still shares out: a
/// client alone is never shed (its queue's drops are its own, and shedding would only lower
/// what it gets), one that asks now and then keeps its share meanwhile.
pub(super) const SHARED_FOR: Duration = Duration::from_secs(1);

/// Clients counted in one window; any beyond are not shed (the table stays bounded).
const MAX_COUNTED: usize = 4096;

/// What one client asked for in a window, and what of it was forwarded.
#[derive(Default, Clone, Copy)]
struct Counts {
    asked: u32,
    forwarded: u32,
}

/// One listener's counts; only its receive loop uses them.
pub(super) struct Shedding {
    window_started: Instant,
    /// The listener's drops, as the kernel counted them at the window's start; `None` if they
    /// could not be read (shedding then stays off).
    drops_before: Option<u32>,
    /// Per client, in this window.
    counts: HashMap<Client, Counts>,
    /// What the thread is taken to forward in a window while its queue overflows; `None`: it
    /// keeps up.
    capacity: Option<u32>,
    /// At most this many forwarded per client in a window; `None`: no limit.
    quota: Option<u32>,
    /// When a window last ended with two clients or more.
    shared: Option<Instant>,
}

impl Shedding {
    pub(super) fn new(listener: BorrowedFd<'_>, now: Instant) -> Self {
        Self {
            window_started: now,
            drops_before: queue_state(listener).ok().map(|state| state.drops),
            counts: HashMap::default(),
            capacity: None,
            quota: None,
            shared: None,
        }
    }

    /// Whether a query of `client`, read at `now`, may be forwarded; counts it.
    pub(super) fn admit(&mut self, client: Client, listener: BorrowedFd<'_>, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_started) >= WINDOW {
            self.next_window(listener, now);
        }
        let counted = self.counts.len() < MAX_COUNTED || self.counts.contains_key(&client);
        if !counted {
            return true;
        }
        let counts = self.counts.entry(client).or_default();
        counts.asked = counts.asked.saturating_add(1);
        if self.quota.is_some_and(|quota| counts.forwarded >= quota) {
            return false;
        }
        counts.forwarded += 1;
        true
    }

    /// Ends a window: learns what the thread can forward from whether the listener dropped
    /// anything during it or is falling behind, and shares that out among the clients as they
    /// asked in it.
    fn next_window(&mut self, listener: BorrowedFd<'_>, now: Instant) {
        let state = queue_state(listener).ok();
        let drops = state.map(|state| state.drops);
        let overflowed = match (self.drops_before, state) {
            (Some(before), Some(state)) => {
                state.drops != before || state.queued >= state.capacity / 4
            }
            _ => false,
        };
        if self.counts.len() >= 2 {
            self.shared = Some(now);
        }
        let alone = self
            .shared
            .is_none_or(|at| now.saturating_duration_since(at) > SHARED_FOR);
        let forwarded: u32 = self.counts.values().map(|c| c.forwarded).sum();
        self.capacity = if alone {
            None
        } else if overflowed {
            Some((forwarded / 2).max(MIN_QUOTA))
        } else {
            self.capacity
                .map(|capacity| capacity.saturating_add(capacity / 4))
        };
        let mut asked: Vec<u32> = self.counts.values().map(|c| c.asked).collect();
        self.quota = self
            .capacity
            .and_then(|capacity| fair_share(&mut asked, capacity))
            .map(|quota| quota.max(MIN_QUOTA));
        if self.quota.is_none() {
            // Everyone fits: nothing to learn until the queue overflows again.
            self.capacity = None;
        }
        if overflowed {
            log::debug!(
                target: super::LOG,
                "the listener's queue overflowed: at most {:?} queries per client per {WINDOW:?}",
                self.quota
            );
        }
        self.counts.clear();
        self.drops_before = drops;
        self.window_started = now;
    }

    #[cfg(test)]
    pub(super) fn quota(&self) -> Option<u32> {
        self.quota
    }
}

/// The most each client may have of `capacity` so that one that asked for less than an
/// equal share gets all it asked for (max-min fairness: water-filling over `asked`, which it
/// sorts); `None` if all of them fit.
fn fair_share(asked: &mut [u32], capacity: u32) -> Option<u32> {
    asked.sort_unstable();
    let mut left = u64::from(capacity);
    for (served, &wants) in asked.iter().enumerate() {
        let share = left / (asked.len() - served) as u64;
        if u64::from(wants) > share {
            return Some(u32::try_from(share).unwrap_or(u32::MAX));
        }
        left -= u64::from(wants);
    }
    None
}

/// A socket's receive queue, as the kernel accounts for it.
#[derive(Clone, Copy)]
struct QueueState {
    /// Bytes queued.
    queued: u32,
    /// Bytes it may hold.
    capacity: u32,
    /// Datagrams dropped since the socket was made (its queue full, most often).
    drops: u32,
}

/// `socket`'s receive queue: `SK_MEMINFO_RMEM_ALLOC`, `SK_MEMINFO_RCVBUF` and
/// `SK_MEMINFO_DROPS` of `SO_MEMINFO`.
fn queue_state(socket: BorrowedFd<'_>) -> io::Result<QueueState> {
    /// `SK_MEMINFO_VARS` and the indices of linux/sock_diag.h.
    const VARS: usize = 9;
    const RMEM_ALLOC: usize = 0;
    const RCVBUF: usize = 1;
    const DROPS: usize = 8;
    let mut meminfo = [0u32; VARS];
    let mut len = std::mem::size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `meminfo`, a live local of that size,
    // and the new length into `len`; `socket` is an open descriptor for the call.
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(QueueState {
        queued: meminfo[RMEM_ALLOC],
        capacity: meminfo[RCVBUF],
        drops: meminfo[DROPS],
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn the_fair_share_gives_small_askers_all_and_splits_the_rest() {
        assert_eq!(fair_share(&mut [600, 7500], 3000), Some(2400));
        assert_eq!(fair_share(&mut [7500, 7500, 10], 3010), Some(1500));
        assert_eq!(fair_share(&mut [100, 200], 300), None);
        assert_eq!(fair_share(&mut [], 300), None);
    }

    /// A listener whose queue overflows: the thread is taken to forward half of what it did,
    /// shared out max-min fairly, so a client that asks little is never shed while one that
    /// floods is; once the overflow ends, the capacity grows a quarter a window, and the
    /// quota goes once everyone fits.
    #[tokio::test]
    async fn while_the_listener_overflows_a_flooding_client_is_shed_and_a_modest_one_is_not() {
        let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // The smallest queue the kernel allows: a few datagrams fill it.
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(1)
            .unwrap();
        let to = listener.local_addr().unwrap();
        let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let overflow = || {
            for _ in 0..64 {
                let _ = socket2::SockRef::from(&sender).send_to(&[0; 512], &to.into());
            }
        };
        // The thread catching up: its queue read empty.
        let catch_up = || {
            let mut buf = [std::mem::MaybeUninit::uninit(); 512];
            while socket2::SockRef::from(&listener).recv(&mut buf).is_ok() {}
        };
        let (flooder, modest) = (Client::Workload(1), Client::Workload(2));
        let fd = listener.as_fd();
        let start = Instant::now();
        let window = |n: u32| start + WINDOW * n;
        // One window: the flooder asks `flood`, the modest one 300; what each got.
        let run = |shedding: &mut Shedding, n: u32, flood: usize| {
            let mut got = (0, 0);
            for i in 0..flood.max(300) {
                if i < flood && shedding.admit(flooder, fd, window(n)) {
                    got.0 += 1;
                }
                if i < 300 && shedding.admit(modest, fd, window(n)) {
                    got.1 += 1;
                }
            }
            got
        };
        let mut shedding = Shedding::new(fd, start);
        // Window 0: nothing overflowed before it, nothing shed.
        assert_eq!(run(&mut shedding, 0, 5000), (5000, 300));
        overflow();
        assert!(
            queue_state(fd).unwrap().drops > 0,
            "the kernel dropped some"
        );
        // Window 1: 5,300 forwarded in an overflowing window: 2,650 to share, 300 to the
        // modest one and 2,350 to the flooder.
        assert_eq!(run(&mut shedding, 1, 5000), (2350, 300));
        overflow();
        // Window 2: half of 2,650.
        assert_eq!(run(&mut shedding, 2, 5000), (1025, 300));
        catch_up();
        // Window 3 (no overflow in 2, the queue read): a quarter more, 1,656.
        assert_eq!(run(&mut shedding, 3, 5000), (1356, 300));
        // The flood ends: everyone fits, no quota.
        assert_eq!(run(&mut shedding, 4, 10), (10, 300));
        assert_eq!(run(&mut shedding, 5, 5000), (5000, 300));
        assert_eq!(shedding.quota(), None);
        // A client alone is never shed, however it overflows the queue.
        let mut alone = Shedding::new(fd, start);
        for n in 0..5 {
            let forwarded = (0..5000)
                .filter(|_| alone.admit(flooder, fd, window(n)))
                .count();
            assert_eq!(forwarded, 5000, "window {n}");
            overflow();
        }
        // However long the overflow, a client may forward the floor.
        let mut shedding = Shedding::new(fd, start);
        for n in 0..30 {
            run(&mut shedding, n, 5000);
            overflow();
        }
        let (flooded, modest_got) = run(&mut shedding, 30, 5000);
        assert!(flooded >= MIN_QUOTA as usize, "{flooded}");
        assert_eq!(modest_got, 300.min(flooded.max(MIN_QUOTA as usize)));
    }
}
