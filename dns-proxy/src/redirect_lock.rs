//! One agent redirects a cgroup: a lock, named by the cgroup's id, that a second agent finds
//! taken.
//!
//! Two agents attached to one cgroup do not share its lookups: the programs attached first
//! rewrite every query to their agent's block, so the second agent's programs never see one,
//! and it would serve nothing while it reports ready. Its port, block or state dir may all
//! differ from the first one's, so no lock of theirs catches it (those keep out an agent of
//! the same block and port), and the kernel tells whose programs are attached only to
//! CAP_SYS_ADMIN, which the agent does not have in production.
//!
//! The lock is an abstract unix socket in the agent's network namespace (where a DaemonSet's
//! agents and a host's share one), listening, named `dns-proxy/redirects/<cgroup id>`. The
//! kernel frees it when the agent exits, however it exits. A cgroup id is never reused
//! within a boot. A second agent that finds the name taken asks the holder's credentials
//! (`SO_PEERCRED`): only a hold by root or by the agent's own user counts, so an unprivileged
//! process that takes the name first cannot keep the agent from starting.
//!
//! An agent taking over (`--takeover`) shares the cgroup with the one it replaces, on
//! purpose: it takes the lock once that one has let go of it. On the holder's port it serves
//! meanwhile (the kernel steers the port's packets to the newest agent); on another port it
//! serves nothing, and is not ready, until then.
//!
//! The names are also how an agent tells that another runs (`agents`).
use std::{io, mem, os::fd::AsRawFd as _, sync::Mutex};

use socket2::{Domain, SockAddr, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another dns-proxy ({who}) already redirects {cgroup}: this agent would serve nothing. Stop that agent first, or, to replace it without a gap, start this one with \
         --takeover"
    )]
    Held { cgroup: String, who: String },
    #[error("cannot take the lock on redirecting {cgroup}: {source}")]
    Io { cgroup: String, source: io::Error },
}

/// What an agent asks of the lock.
pub struct Claim<'a> {
    /// The redirected cgroup's path (for messages) and id.
    pub cgroup: &'a str,
    pub cgroup_id: u64,
    /// The port its listeners serve.
    pub port: u16,
    /// `--takeover`: another agent may redirect the cgroup now; this one replaces it.
    pub takeover: bool,
    /// Its listeners joined another agent's (a takeover on the same port and block).
    pub joined: bool,
}

/// This agent's claim on redirecting a cgroup; released on [`release`](Self::release) or drop.
pub struct RedirectLock {
    /// One agent redirects the cgroup: the one listening here.
    cgroup_name: SockAddr,
    /// The port that agent serves, held beside it, so that an agent taking over can tell the
    /// one it replaces (same port: it joined its listeners) from another.
    port_name: SockAddr,
    state: Mutex<State>,
    /// Whether this agent serves the cgroup's lookups while it does not hold the lock: it took
    /// over on the holder's port (the kernel steers the port's packets to the newest agent),
    /// or the name is held by something that is not an agent.
    serves_unheld: bool,
}

enum State {
    Held {
        _cgroup: Socket,
        _port: Option<Socket>,
    },
    /// Not held: the agent this one takes over from holds it, or something that is not an
    /// agent does.
    Waiting,
    /// Let go for good: this agent no longer redirects.
    Released,
}

impl RedirectLock {
    /// Takes the lock on redirecting the claimed cgroup. Held by another agent, that is an
    /// error, unless this one takes over: then it is taken later
    /// ([`try_take`](Self::try_take)), once that agent has let go of it.
    pub fn take(claim: &Claim<'_>) -> Result<Self, LockError> {
        let io_error = |source| LockError::Io {
            cgroup: claim.cgroup.to_owned(),
            source,
        };
        let id = claim.cgroup_id;
        let mut lock = Self {
            cgroup_name: abstract_name(&format!("dns-proxy/redirects/{id}")).map_err(io_error)?,
            port_name: abstract_name(&format!("dns-proxy/redirects/{id}/port/{}", claim.port))
                .map_err(io_error)?,
            state: Mutex::new(State::Waiting),
            serves_unheld: true,
        };
        let cgroup = claim.cgroup;
        match bind(&lock.cgroup_name) {
            Ok(socket) => {
                *lock.state() = State::Held {
                    _cgroup: socket,
                    _port: bind(&lock.port_name).ok(),
                };
                return Ok(lock);
            }
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => {}
            Err(err) => return Err(io_error(err)),
        }
        let holder = match holder(&lock.cgroup_name) {
            Ok(holder) if is_trusted(&holder) => holder,
            Ok(holder) => {
                log::warn!(
                    "a process of user {} (pid {}) holds the name dns-proxy agents lock {cgroup} \
                     with; neither root nor this agent's user, so not an agent: going on \
                     without the lock",
                    holder.uid,
                    holder.pid
                );
                return Ok(lock);
            }
            Err(err) => {
                log::warn!(
                    "something holds the name dns-proxy agents lock {cgroup} with, and does not \
                     say who ({err}): going on without the lock"
                );
                return Ok(lock);
            }
        };
        let who = describe(holder.pid);
        if !claim.takeover {
            return Err(LockError::Held {
                cgroup: cgroup.to_owned(),
                who,
            });
        }
        let on_this_port =
            claim.joined && holder_of(&lock.port_name).is_some_and(|port| port.pid == holder.pid);
        if !on_this_port {
            lock.serves_unheld = false;
            log::warn!(
                "another dns-proxy ({who}) redirects {cgroup} on another port: its programs see \
                 every lookup first, so this agent serves none and is not ready until that one \
                 stops redirecting; then it takes over"
            );
        }
        Ok(lock)
    }

    /// Takes the lock if this agent does not hold it and it is free: an agent that took over
    /// calls it until the one it replaced is gone. Also clears what probing agents left in
    /// the listen queue.
    pub fn try_take(&self) {
        let mut state = self.state();
        match &*state {
            State::Held {
                _cgroup: socket, ..
            } => while socket.accept().is_ok() {},
            State::Waiting => {
                if let Ok(socket) = bind(&self.cgroup_name) {
                    log::info!(
                        "the agent this one took over from has stopped redirecting: this one \
                         holds the redirect now"
                    );
                    *state = State::Held {
                        _cgroup: socket,
                        _port: bind(&self.port_name).ok(),
                    };
                }
            }
            State::Released => {}
        }
    }

    /// Lets go of the lock: this agent no longer redirects new lookups.
    pub fn release(&self) {
        *self.state() = State::Released;
    }

    /// Whether this agent serves the cgroup's lookups: it holds the lock, or it took over on
    /// the port of the agent that holds it (or no agent holds it).
    pub fn serves(&self) -> bool {
        match *self.state() {
            State::Held { .. } => true,
            State::Waiting => self.serves_unheld,
            State::Released => false,
        }
    }

    /// Whether this agent holds the lock.
    #[cfg(test)]
    fn is_held(&self) -> bool {
        matches!(*self.state(), State::Held { .. })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The pid of the agent that redirects cgroup `cgroup_id` from this network namespace, if one
/// does.
pub fn agent_redirecting(cgroup_id: u64) -> Option<i32> {
    let name = abstract_name(&format!("dns-proxy/redirects/{cgroup_id}")).ok()?;
    holder_of(&name).map(|holder| holder.pid)
}

/// Who holds `name`, if that is root or this agent's user.
fn holder_of(name: &SockAddr) -> Option<libc::ucred> {
    holder(name).ok().filter(is_trusted)
}

fn is_trusted(holder: &libc::ucred) -> bool {
    holder.uid == 0 || holder.uid == effective_uid()
}

/// A listening abstract unix socket named `name` in this network namespace, held by whoever
/// keeps the socket.
pub(crate) fn listen_on_name(name: &str) -> io::Result<Socket> {
    bind(&abstract_name(name)?)
}

/// Whether anything listens on the abstract name `name` in this network namespace.
pub(crate) fn name_is_held(name: &str) -> bool {
    let Ok(name) = abstract_name(name) else {
        return false;
    };
    let connected = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)
        .and_then(|socket| socket.connect(&name));
    // A full listen queue is a listener too.
    match connected {
        Ok(()) => true,
        Err(err) => err.kind() == io::ErrorKind::WouldBlock,
    }
}

fn abstract_name(name: &str) -> io::Result<SockAddr> {
    SockAddr::unix(format!("\0{name}"))
}

fn bind(name: &SockAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.bind(name)?;
    socket.listen(8)?;
    Ok(socket)
}

/// Who listens on `name` (non-blocking: a full listen queue is an error, not a wait).
fn holder(name: &SockAddr) -> io::Result<libc::ucred> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.connect(name)?;
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `length` bytes into `credentials`, a live local
    // of the type SO_PEERCRED fills, and `length` is its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A lock holder, for messages: its pid and command name (`/proc/PID/comm`). The kernel says
/// pid 0 for a process outside this one's pid namespace (an agent on the host, seen from a
/// container).
fn describe(pid: i32) -> String {
    if pid == 0 {
        return "in another pid namespace".to_owned();
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("pid {pid}, {}", comm.trim_end()),
        Err(_) => format!("pid {pid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids no cgroup of this boot has (they count up from 1): the lock is per name, so each
    /// test has names of its own.
    const TEST_ID: u64 = u64::MAX - 7;

    fn claim(cgroup_id: u64, port: u16, takeover: bool, joined: bool) -> Claim<'static> {
        Claim {
            cgroup: "test",
            cgroup_id,
            port,
            takeover,
            joined,
        }
    }

    #[test]
    fn a_second_claim_is_refused_until_the_first_lets_go() {
        let first = RedirectLock::take(&claim(TEST_ID, 53, false, false)).expect("the first");
        assert!(first.serves());
        assert_eq!(agent_redirecting(TEST_ID), Some(std::process::id() as i32));
        // The holder is this process: its own user, so an agent's hold.
        let err = RedirectLock::take(&claim(TEST_ID, 8053, false, false))
            .err()
            .expect("the second claim is refused");
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        first.release();
        first.try_take();
        assert!(!first.is_held(), "taken again once released");
        assert!(!first.serves());
        assert_eq!(agent_redirecting(TEST_ID), None);
        let third = RedirectLock::take(&claim(TEST_ID, 53, false, false)).expect("once let go");
        assert!(third.is_held());
    }

    #[test]
    fn an_agent_taking_over_on_the_same_port_serves_and_takes_the_lock_once_free() {
        let old = RedirectLock::take(&claim(TEST_ID - 1, 53, false, false)).expect("the old");
        let new = RedirectLock::take(&claim(TEST_ID - 1, 53, true, true)).expect("a takeover");
        assert!(new.serves(), "the newest agent on the port serves");
        new.try_take();
        assert!(!new.is_held(), "taken while the old agent holds it");
        drop(old);
        new.try_take();
        assert!(new.is_held(), "not taken once free");
    }

    #[test]
    fn an_agent_taking_over_on_another_port_serves_once_the_other_has_stopped() {
        let old = RedirectLock::take(&claim(TEST_ID - 2, 53, false, false)).expect("the old");
        // Its listeners joined another agent's, on port 54, not the holder's.
        let new = RedirectLock::take(&claim(TEST_ID - 2, 54, true, true)).expect("a takeover");
        assert!(
            !new.serves(),
            "the holder's programs see every lookup first"
        );
        old.release();
        new.try_take();
        assert!(new.serves());
    }
}
