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
//! purpose: it takes the lock once that one has let go of it.
use std::{io, mem, os::fd::AsRawFd as _, sync::Mutex};

use socket2::{Domain, SockAddr, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another dns-proxy (pid {pid}{name}) already redirects {cgroup}: this agent would serve \
         nothing. Stop that agent first, or, to replace it without a gap, start this one with \
         --takeover and the same --listen port and --state-dir"
    )]
    Held {
        cgroup: String,
        pid: i32,
        name: String,
    },
    #[error("cannot take the lock on redirecting {cgroup}: {source}")]
    Io { cgroup: String, source: io::Error },
}

/// This agent's claim on redirecting a cgroup; released on [`release`](Self::release) or drop.
pub struct RedirectLock {
    address: SockAddr,
    state: Mutex<State>,
}

enum State {
    Held(Socket),
    /// Not held: another agent holds it (this one takes over from it), or something that is
    /// not an agent does.
    Waiting,
    /// Let go for good: this agent no longer redirects.
    Released,
}

impl RedirectLock {
    /// Takes the lock on redirecting `cgroup` (its path, for messages, and id), unless
    /// `taking_over`: then it is taken later ([`try_take`](Self::try_take)), once the agent
    /// replaced has let go of it.
    pub fn take(cgroup: &str, cgroup_id: u64, taking_over: bool) -> Result<Self, LockError> {
        let io_error = |source| LockError::Io {
            cgroup: cgroup.to_owned(),
            source,
        };
        let lock = Self {
            address: SockAddr::unix(format!("\0dns-proxy/redirects/{cgroup_id}"))
                .map_err(io_error)?,
            state: Mutex::new(State::Waiting),
        };
        if taking_over {
            return Ok(lock);
        }
        match lock.bind() {
            Ok(socket) => *lock.state() = State::Held(socket),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => match lock.holder() {
                Ok(holder) if holder.uid == 0 || holder.uid == effective_uid() => {
                    return Err(LockError::Held {
                        cgroup: cgroup.to_owned(),
                        pid: holder.pid,
                        name: process_name(holder.pid)
                            .map(|name| format!(", {name}"))
                            .unwrap_or_default(),
                    });
                }
                Ok(holder) => log::warn!(
                    "a process of user {} (pid {}) holds the name dns-proxy agents lock {cgroup} \
                     with; neither root nor this agent's user, so not an agent: going on \
                     without the lock",
                    holder.uid,
                    holder.pid
                ),
                Err(err) => log::warn!(
                    "something holds the name dns-proxy agents lock {cgroup} with, and does not \
                     say who ({err}): going on without the lock"
                ),
            },
            Err(err) => return Err(io_error(err)),
        }
        Ok(lock)
    }

    /// Takes the lock if this agent does not hold it and it is free: an agent that took over
    /// calls it until the one it replaced is gone. Also clears what probing agents left in
    /// the listen queue.
    pub fn try_take(&self) {
        let mut state = self.state();
        match &*state {
            State::Held(socket) => while socket.accept().is_ok() {},
            State::Waiting => {
                if let Ok(socket) = self.bind() {
                    log::debug!("holding the lock on the redirected cgroup now");
                    *state = State::Held(socket);
                }
            }
            State::Released => {}
        }
    }

    /// Lets go of the lock: this agent no longer redirects new lookups.
    pub fn release(&self) {
        *self.state() = State::Released;
    }

    /// Whether this agent holds the lock.
    #[cfg(test)]
    fn is_held(&self) -> bool {
        matches!(*self.state(), State::Held(_))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bind(&self) -> io::Result<Socket> {
        let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
        socket.bind(&self.address)?;
        socket.listen(8)?;
        Ok(socket)
    }

    /// Who listens on the lock's name (non-blocking: a full listen queue is an error, not a
    /// wait).
    fn holder(&self) -> io::Result<libc::ucred> {
        let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
        socket.connect(&self.address)?;
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
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A process's command name (`/proc/PID/comm`), for messages.
fn process_name(pid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids no cgroup of this boot has (they count up from 1): the lock is per name, so the
    /// tests use names of their own.
    const TEST_ID: u64 = u64::MAX - 7;

    #[test]
    fn a_second_claim_is_refused_until_the_first_lets_go() {
        let first = RedirectLock::take("test", TEST_ID, false).expect("the first claim");
        // The holder is this process: its own user, so an agent's hold.
        let err = RedirectLock::take("test", TEST_ID, false)
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
        let third = RedirectLock::take("test", TEST_ID, false).expect("taken once let go");
        assert!(third.is_held());
    }

    #[test]
    fn an_agent_taking_over_takes_the_lock_once_it_is_free() {
        let old = RedirectLock::take("test", TEST_ID - 1, false).expect("the old agent's");
        let new = RedirectLock::take("test", TEST_ID - 1, true).expect("a takeover");
        new.try_take();
        assert!(!new.is_held(), "taken while the old agent holds it");
        drop(old);
        new.try_take();
        assert!(new.is_held(), "not taken once free");
    }
}
