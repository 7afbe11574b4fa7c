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
//! The lock is a name in the agent's network namespace (`local_names`: where a DaemonSet's
//! agents and a host's share one), `dns-proxy/redirects/<cgroup id>`. The kernel frees it
//! when the agent exits, however it exits. A cgroup id is never reused within a boot. A
//! second agent that finds the name taken asks the kernel who holds it: only a hold by root or
//! by the agent's own user counts, so an unprivileged process that takes the name first
//! cannot keep the agent from starting (the agent then starts without the lock, and says so).
//! Beside it the holder keeps `dns-proxy/redirects/<cgroup id>/listen/<address:port>`: an agent
//! taking over tells by it the agent it replaces, whose listeners it joined, from another.
//!
//! An agent taking over (`--takeover`) shares the cgroup with the one it replaces, on
//! purpose: it takes the lock once that one has let go of it. On the holder's port it serves
//! meanwhile (the kernel steers the port's packets to the newest agent); on another port it
//! serves nothing, and is not ready, until then.
//!
//! The names are also how an agent tells that another runs (`agents`).
use std::{net::SocketAddrV4, sync::Mutex};

use socket2::Socket;

use crate::local_names;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another dns-proxy ({who}) already redirects {cgroup}: this agent would serve nothing. \
         Stop that agent first, or, to replace it without a gap, start this one with --takeover"
    )]
    Held { cgroup: String, who: String },
    #[error("cannot take the lock on redirecting {cgroup}: {source}")]
    Io {
        cgroup: String,
        source: std::io::Error,
    },
}

/// What an agent asks of the lock.
pub struct Claim<'a> {
    /// The redirected cgroup's path (for messages) and id.
    pub cgroup: &'a str,
    pub cgroup_id: u64,
    /// Where its listeners serve.
    pub listen: SocketAddrV4,
    /// `--takeover`: another agent may redirect the cgroup now; this one replaces it.
    pub takeover: bool,
    /// Its listeners joined another agent's (a takeover on the same address and port).
    pub joined: bool,
}

/// This agent's claim on redirecting a cgroup; released on [`release`](Self::release) or drop.
pub struct RedirectLock {
    /// One agent redirects the cgroup: the one that holds this name.
    cgroup_name: String,
    /// Held beside it: where that agent listens.
    listen_name: String,
    state: Mutex<State>,
}

enum State {
    Held {
        cgroup: Socket,
        _listen: Option<Socket>,
    },
    /// Another agent holds the lock, and this one takes over from it once it lets go. On the
    /// holder's listen address this one serves meanwhile (the kernel steers the address's
    /// packets to the newest agent); elsewhere the holder's programs see every lookup first.
    Waiting { serves: bool },
    /// Something that is not an agent holds the name: this agent serves without the lock.
    Unlocked,
    /// Let go for good: this agent no longer redirects.
    Released,
}

impl RedirectLock {
    /// Takes the lock on redirecting the claimed cgroup. Held by another agent, that is an
    /// error, unless this one takes over: then it is taken later
    /// ([`try_take`](Self::try_take)), once that agent has let go of it.
    pub fn take(claim: &Claim<'_>) -> Result<Self, LockError> {
        let cgroup = claim.cgroup;
        let io_error = |source| LockError::Io {
            cgroup: cgroup.to_owned(),
            source,
        };
        let cgroup_name = format!("dns-proxy/redirects/{}", claim.cgroup_id);
        let lock = Self {
            listen_name: format!("{cgroup_name}/listen/{}", claim.listen),
            cgroup_name,
            state: Mutex::new(State::Released),
        };
        if claim.joined {
            lock.warn_if_joined_agent_redirects_another_cgroup(claim);
        }
        // Twice: a holder may let go between the hold and the look at who held it.
        for _ in 0..2 {
            let held = match local_names::hold(&lock.cgroup_name) {
                Ok(held) => held,
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                    let Some(uid) = local_names::holder_uid(&lock.cgroup_name).map_err(io_error)?
                    else {
                        continue;
                    };
                    *lock.state() = lock.held_by_another(claim, uid)?;
                    return Ok(lock);
                }
                Err(err) => return Err(io_error(err)),
            };
            *lock.state() = State::Held {
                cgroup: held,
                _listen: local_names::hold(&lock.listen_name).ok(),
            };
            return Ok(lock);
        }
        Err(io_error(std::io::Error::other(
            "its name was taken and let go twice in a row",
        )))
    }

    /// What this agent does when the lock is held by a process of user `uid`.
    fn held_by_another(&self, claim: &Claim<'_>, uid: u32) -> Result<State, LockError> {
        let cgroup = claim.cgroup;
        if !local_names::is_trusted(uid) {
            log::warn!(
                "a process of user {uid} holds the name dns-proxy agents lock {cgroup} with \
                 ({}); neither root nor this agent's user, so not an agent: going on without \
                 the lock (a second agent on {cgroup} is not refused while it holds the name)",
                self.cgroup_name
            );
            return Ok(State::Unlocked);
        }
        let who = match local_names::listener_pid(&self.cgroup_name) {
            Some(pid) => describe(pid),
            None => "in another pid namespace, or too busy to say its pid".to_owned(),
        };
        if !claim.takeover {
            return Err(LockError::Held {
                cgroup: cgroup.to_owned(),
                who,
            });
        }
        // Anyone's hold of the listen name counts: one that is not an agent's can only be
        // there to confuse, and the listeners were joined, so an agent does listen there.
        let on_this_listener = claim.joined
            && local_names::holder_uid(&self.listen_name).is_ok_and(|uid| uid.is_some());
        if !on_this_listener {
            log::warn!(
                "another dns-proxy ({who}) redirects {cgroup}, listening elsewhere than {}: its \
                 programs see every lookup first, so this agent serves none and is not ready \
                 until that one stops redirecting; then it takes over. Sockets connected to \
                 that agent's address stay so, and are refused once it has stopped",
                claim.listen
            );
        }
        Ok(State::Waiting {
            serves: on_this_listener,
        })
    }

    /// A takeover replaces the agent whose listeners it joined: if that one redirects another
    /// cgroup, nothing redirects that one once it stops.
    fn warn_if_joined_agent_redirects_another_cgroup(&self, claim: &Claim<'_>) {
        let suffix = format!("/listen/{}", claim.listen);
        let Ok(held) = local_names::held_with_prefix("dns-proxy/redirects/") else {
            return;
        };
        for (name, uid) in held {
            let Some(id) = name
                .strip_prefix("dns-proxy/redirects/")
                .and_then(|rest| rest.strip_suffix(&suffix))
            else {
                continue;
            };
            if local_names::is_trusted(uid) && id != claim.cgroup_id.to_string() {
                log::warn!(
                    "the agent this one takes over from (on {}) redirects the cgroup of id {id}, \
                     not {}: once it stops, nothing redirects that one",
                    claim.listen,
                    claim.cgroup
                );
            }
        }
    }

    /// Takes the lock if this agent waits for it and it is free. Also clears what looks at
    /// the holder's pid left in the listen queue.
    pub fn try_take(&self) {
        let mut state = self.state();
        match &*state {
            State::Held { cgroup, .. } => while cgroup.accept().is_ok() {},
            State::Waiting { .. } => {
                if let Ok(held) = local_names::hold(&self.cgroup_name) {
                    log::info!(
                        "the agent this one took over from has stopped redirecting: this one \
                         holds the redirect now"
                    );
                    *state = State::Held {
                        cgroup: held,
                        _listen: local_names::hold(&self.listen_name).ok(),
                    };
                }
            }
            State::Unlocked | State::Released => {}
        }
    }

    /// Whether this agent waits for another to let go of the lock.
    pub fn is_waiting(&self) -> bool {
        matches!(*self.state(), State::Waiting { .. })
    }

    /// Lets go of the lock: this agent no longer redirects new lookups.
    pub fn release(&self) {
        *self.state() = State::Released;
    }

    /// Whether this agent serves the cgroup's lookups.
    pub fn serves(&self) -> bool {
        match *self.state() {
            State::Held { .. } | State::Unlocked => true,
            State::Waiting { serves } => serves,
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

/// The pid of the agent that redirects cgroup `cgroup_id` from this network namespace, if an
/// agent does (`Some(None)`: one does, of a pid it does not say).
pub fn agent_redirecting(cgroup_id: u64) -> Option<Option<i32>> {
    let name = format!("dns-proxy/redirects/{cgroup_id}");
    let uid = local_names::holder_uid(&name).ok()??;
    local_names::is_trusted(uid).then(|| local_names::listener_pid(&name))
}

/// A lock holder, for messages: its pid and command name (`/proc/PID/comm`).
fn describe(pid: i32) -> String {
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
            listen: SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port),
            takeover,
            joined,
        }
    }

    #[test]
    fn a_second_claim_is_refused_until_the_first_lets_go() {
        let first = RedirectLock::take(&claim(TEST_ID, 53, false, false)).expect("the first");
        assert!(first.serves());
        assert_eq!(
            agent_redirecting(TEST_ID),
            Some(Some(std::process::id() as i32))
        );
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
    fn a_full_listen_queue_still_refuses_a_second_agent() {
        let first = RedirectLock::take(&claim(TEST_ID - 3, 53, false, false)).expect("the first");
        // Connections nobody accepts, past the queue's length.
        let name = socket2::SockAddr::unix(format!("\0{}", first.cgroup_name)).unwrap();
        let mut queued = Vec::new();
        for _ in 0..64 {
            let socket = Socket::new(
                socket2::Domain::UNIX,
                socket2::Type::STREAM.nonblocking(),
                None,
            )
            .unwrap();
            if socket.connect(&name).is_ok() {
                queued.push(socket);
            }
        }
        let err = RedirectLock::take(&claim(TEST_ID - 3, 54, false, false))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("too busy to say its pid"), "{err}");
    }

    #[test]
    fn an_agent_taking_over_on_the_same_listener_serves_and_takes_the_lock_once_free() {
        let old = RedirectLock::take(&claim(TEST_ID - 1, 53, false, false)).expect("the old");
        let new = RedirectLock::take(&claim(TEST_ID - 1, 53, true, true)).expect("a takeover");
        assert!(new.serves(), "the newest agent on the listener serves");
        assert!(new.is_waiting());
        new.try_take();
        assert!(!new.is_held(), "taken while the old agent holds it");
        drop(old);
        new.try_take();
        assert!(new.is_held(), "not taken once free");
        assert!(!new.is_waiting());
    }

    #[test]
    fn an_agent_taking_over_on_another_listener_serves_once_the_other_has_stopped() {
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
