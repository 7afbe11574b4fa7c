//! Changes to the agent's network namespace that may change the route or the source address
//! of a datagram to an upstream: its links, addresses, routes, nexthops and routing rules, as
//! rtnetlink announces them. An upstream socket connected to a server keeps the source address
//! and the route `connect` chose; a change makes the pool connect its sockets anew
//! (`dns::udp::pool`), and the agent look again at the source the kernel picks toward the
//! Internet (`ebpf::DirectSources`) and at its blocks' routes (`app::background`). Only that anything changed counts, so no message is
//! parsed: a missed one (`ENOBUFS`, the socket's queue overran) counts as a change too.
use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};

/// How many changes the agent has seen: cheap to read on every pick of an upstream socket.
#[derive(Debug, Clone, Default)]
pub struct RouteChanges(Arc<Seen>);

#[derive(Debug, Default)]
struct Seen {
    generation: AtomicU64,
    /// Woken at each change, for the one task that waits on [`RouteChanges::next_change`].
    waiter: Notify,
}

impl RouteChanges {
    /// Changes seen so far.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Relaxed)
    }

    /// Something changed.
    pub fn changed(&self) {
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        self.0.waiter.notify_one();
    }

    /// Returns at the next change, or at once if one came since the last call returned. For
    /// one task only: two would share the wake-ups.
    pub async fn next_change(&self) {
        self.0.waiter.notified().await;
    }

    /// Subscribes to the changes of this network namespace and counts them in a task on the
    /// current tokio runtime, until the runtime ends. Needs no privilege.
    pub fn watch(&self) -> io::Result<()> {
        // SAFETY: the AsyncFd owns the socket, whose descriptor stays open and the same
        // until it is dropped.
        let socket = unsafe { AsyncFd::register_with_interest(subscribe()?, Interest::READABLE) }
            .map_err(|err| io::Error::other(err.to_string()))?;
        let changes = self.clone();
        tokio::spawn(async move {
            if let Err(err) = changes.count(&socket).await {
                log::warn!(
                    "watching for route and address changes: {err}; upstream sockets connected \
                     to a server are connected anew only when a query on one fails or times out, \
                     redirected sockets keep the source found before, and a block that loses \
                     its route is not noticed"
                );
            }
        });
        Ok(())
    }

    async fn count(&self, socket: &AsyncFd<Socket>) -> io::Result<()> {
        let mut buffer = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        loop {
            let mut ready = socket.readable().await?;
            // `WouldBlock` (an empty queue) clears the readiness and waits again.
            let Ok(received) = ready.try_io(|socket| socket.get_ref().recv(&mut buffer)) else {
                continue;
            };
            match received {
                Ok(_) => self.changed(),
                // Messages were lost: whatever they said, something changed.
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => self.changed(),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }
}

/// A non-blocking rtnetlink socket subscribed to link, address, route, nexthop and rule
/// changes, of IPv4 and IPv6.
fn subscribe() -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW.nonblocking().cloexec(),
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    let ipv6_rules = 1 << (libc::RTNLGRP_IPV6_RULE - 1);
    let groups = libc::RTMGRP_LINK
        | libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV4_RULE
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV6_ROUTE
        | ipv6_rules as libc::c_int;
    // SAFETY: `sockaddr_nl` is plain integers: all zeros is valid, the fields are set below.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    address.nl_groups = groups as u32;
    // SAFETY: the address is a live `sockaddr_nl` of the length given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    // Nexthop objects (`ip nexthop`), which routes may point at: a replaced one changes the
    // path of every route using it, and with `net.ipv4.nexthop_compat_mode=0` no route change
    // is announced for it. Group 32 is beyond `nl_groups`' bits; a kernel without it (before
    // 5.3) has no nexthop objects either.
    let joined = crate::dns::udp::mmsg::set_int_option(
        socket.as_fd(),
        libc::SOL_NETLINK,
        NETLINK_ADD_MEMBERSHIP,
        libc::RTNLGRP_NEXTHOP as libc::c_int,
    );
    if let Err(err) = joined {
        log::debug!("no nexthop announcements: {err}");
    }
    Ok(socket)
}

/// `linux/netlink.h`'s socket option to join a multicast group by its number.
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use super::*;

    /// In a network namespace of its own (`unshare`, so nothing of the host's changes), each
    /// kind of change is counted: a link set up and down, an address, routes, a rule, and a
    /// nexthop object replaced with `nexthop_compat_mode` off (no route change is announced
    /// for it then).
    #[test]
    fn changes_to_links_addresses_and_routes_are_counted() {
        if !nix_is_root() {
            panic!("this test needs root (a network namespace of its own)");
        }
        let changes = RouteChanges::default();
        let child = std::thread::spawn({
            let changes = changes.clone();
            move || {
                // This thread alone moves into a fresh namespace; the test's others stay.
                // SAFETY: unshare on this thread only, with a flag that takes no pointer.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    changes.watch().unwrap();
                    // `ip ARGS` (or another command) in this thread's namespace.
                    let run = |command: &str| {
                        let netns =
                            format!("/proc/{}/task/{}/ns/net", std::process::id(), gettid());
                        let mut words = command.split_whitespace();
                        let program = if command.starts_with("sysctl") {
                            words.next().unwrap()
                        } else {
                            "ip"
                        };
                        let status = Command::new("nsenter")
                            .arg(format!("--net={netns}"))
                            .arg(program)
                            .args(words)
                            .status()
                            .unwrap();
                        assert!(status.success(), "{command}");
                    };
                    run("sysctl -qw net.ipv4.nexthop_compat_mode=0");
                    let mut seen = changes.generation();
                    for change in [
                        "link set lo up",
                        "addr add 192.0.2.7/24 dev lo",
                        "route add 198.51.100.0/24 dev lo",
                        "-6 route add 2001:db8:1::/64 dev lo",
                        "rule add from 192.0.2.7 table 100",
                        "nexthop add id 7 dev lo",
                        "nexthop replace id 7 via 192.0.2.8 dev lo",
                        "link set lo down",
                    ] {
                        run(change);
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                        while changes.generation() == seen {
                            assert!(tokio::time::Instant::now() < deadline, "{change}: not seen");
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        // What the change set off (IPv6 on a link brought up) is counted
                        // before the next: each is seen for itself.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        seen = changes.generation();
                    }
                });
            }
        });
        child.join().unwrap();
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid takes nothing and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    fn gettid() -> libc::pid_t {
        // SAFETY: gettid takes nothing and cannot fail.
        unsafe { libc::gettid() }
    }
}
