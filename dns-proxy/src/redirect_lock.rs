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
//! purpose: it takes the lock once that one has let go of it. On the holder's listen address
//! it serves meanwhile (the kernel steers the address's packets to the newest agent);
//! elsewhere it serves nothing until then (it is ready all the same: a surge rollout stops
//! the old agent only once the new one is).
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
    /// The redirected cgroup's path, for messages.
    cgroup: String,
    /// One agent redirects the cgroup: the one that holds this name.
    cgroup_name: String,
    /// Held beside it: where that agent listens.
    listen_name: String,
    state: Mutex<State>,
}

enum State {
    Held {
        cgroup: Socket,
        /// `None` while another process has the name (taken again at a heartbeat).
        listen: Option<Socket>,
    },
    /// Another agent holds the lock, and this one takes over from it once it lets go.
    Waiting {
        /// Looks at the lock since the last look at who holds it.
        looks: u32,
    },
    /// Something that is not an agent holds the name: this agent serves without the lock, and
    /// takes it if it is let go.
    Unlocked,
    /// Let go for good: this agent no longer redirects.
    Released,
}

/// Tries to hold the lock, or to learn who holds it, before a start fails.
const HOLD_ATTEMPTS: usize = 5;

/// How many looks at the lock, by an agent waiting to take over, between two looks at who holds
/// it: an unprivileged process may take the name in the moment between two agents.
const LOOKS_PER_OWNER_CHECK: u32 = 20;

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
            cgroup: cgroup.to_owned(),
            listen_name: format!("{cgroup_name}/listen/{}", claim.listen),
            cgroup_name,
            state: Mutex::new(State::Released),
        };
        if claim.joined {
            lock.warn_if_joined_agent_redirects_another_cgroup(claim);
        }
        // A holder may let go between a failed hold and the look at who held it: then the
        // hold is tried again, a few times (the kernel's list may also keep skipping a name).
        for _ in 0..HOLD_ATTEMPTS {
            match local_names::hold(&lock.cgroup_name) {
                Ok(held) => {
                    *lock.state() = State::Held {
                        cgroup: held,
                        listen: local_names::hold(&lock.listen_name).ok(),
                    };
                    return Ok(lock);
                }
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                    // `None`: let go meanwhile, or skipped by the list; try again.
                    if let Some(uid) =
                        local_names::owner_of_held(&lock.cgroup_name).map_err(io_error)?
                    {
                        *lock.state() = lock.held_by_another(claim, uid)?;
                        return Ok(lock);
                    }
                }
                Err(err) => return Err(io_error(err)),
            }
        }
        Err(io_error(std::io::Error::other(format!(
            "{} is held, but the kernel's list of sockets did not say by whom; try again, and \
             see who holds it with `ss -xlp | grep dns-proxy/redirects`",
            lock.cgroup_name
        ))))
    }

    /// What this agent does when the lock is held by a process of user `uid`.
    fn held_by_another(&self, claim: &Claim<'_>, uid: u32) -> Result<State, LockError> {
        let cgroup = claim.cgroup;
        if !local_names::is_trusted(uid) {
            self.warn_of_squatter(uid);
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
        let on_this_listener = claim.joined
            && local_names::owner(&self.listen_name)
                .is_ok_and(|uid| uid.is_some_and(local_names::is_trusted));
        if on_this_listener {
            log::info!("taking over from the agent that redirects {cgroup} ({who})");
        } else {
            log::warn!(
                "another dns-proxy ({who}) redirects {cgroup}, listening elsewhere than {}: its \
                 programs see every lookup first, so this agent serves none until that one \
                 stops redirecting; then it takes over. Sockets connected to that agent's \
                 address stay so, and are refused once it has stopped",
                claim.listen
            );
        }
        Ok(State::Waiting { looks: 0 })
    }

    fn warn_of_squatter(&self, uid: u32) {
        let cgroup = &self.cgroup;
        log::warn!(
            "a process of user {uid} holds the name dns-proxy agents lock {cgroup} with ({}); \
             neither root nor this agent's user, so not an agent: going on without the lock \
             (a second agent on {cgroup} is not refused until this one holds it again)",
            self.cgroup_name
        );
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

    /// Whether another agent holds the lock, which this one takes over from once it lets go.
    pub fn replaces_another_agent(&self) -> bool {
        matches!(*self.state(), State::Waiting { .. })
    }

    /// Takes the lock if this agent does not hold it and it is free. Holding it, takes back
    /// the listen name if another process had it, and clears what looks at the holder's pid
    /// left in the listen queue.
    pub fn try_take(&self) {
        let mut state = self.state();
        match &mut *state {
            State::Held { cgroup, listen } => {
                while cgroup.accept().is_ok() {}
                if listen.is_none() {
                    *listen = local_names::hold(&self.listen_name).ok();
                }
            }
            State::Waiting { looks } => match local_names::hold(&self.cgroup_name) {
                Ok(held) => {
                    log::info!(
                        "the agent this one took over from has stopped redirecting: this one \
                         holds the redirect now"
                    );
                    *state = self.held(held);
                }
                Err(_) => {
                    *looks += 1;
                    if *looks < LOOKS_PER_OWNER_CHECK {
                        return;
                    }
                    *looks = 0;
                    if let Ok(Some(uid)) = local_names::owner_of_held(&self.cgroup_name)
                        && !local_names::is_trusted(uid)
                    {
                        self.warn_of_squatter(uid);
                        *state = State::Unlocked;
                    }
                }
            },
            State::Unlocked => {
                if let Ok(held) = local_names::hold(&self.cgroup_name) {
                    log::info!("the name of the lock was let go: this agent holds the lock now");
                    *state = self.held(held);
                }
            }
            State::Released => {}
        }
    }

    fn held(&self, cgroup: Socket) -> State {
        State::Held {
            cgroup,
            listen: local_names::hold(&self.listen_name).ok(),
        }
    }

    /// How long to wait before the next [`try_take`](Self::try_take), if this agent does not
    /// hold the lock: briefly while another agent lets go of it, at leisure while a process
    /// that is not an agent holds its name.
    pub fn next_look(&self) -> Option<std::time::Duration> {
        match *self.state() {
            State::Waiting { .. } => Some(std::time::Duration::from_millis(50)),
            State::Unlocked => Some(std::time::Duration::from_secs(1)),
            State::Held { .. } | State::Released => None,
        }
    }

    /// Lets go of the lock: this agent no longer redirects new lookups.
    pub fn release(&self) {
        *self.state() = State::Released;
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

    /// Ids no cgroup of this boot has (they count up from 1), of this test process (the lock
    /// is per name, in the host's namespace): each test has names of its own.
    fn test_id(test: u64) -> u64 {
        u64::MAX - u64::from(std::process::id()) * 16 - test
    }

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
        let first = RedirectLock::take(&claim(test_id(0), 53, false, false)).expect("the first");
        assert!(first.is_held());
        assert_eq!(
            agent_redirecting(test_id(0)),
            Some(Some(std::process::id() as i32))
        );
        // The holder is this process: its own user, so an agent's hold.
        let err = RedirectLock::take(&claim(test_id(0), 8053, false, false))
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
        assert_eq!(agent_redirecting(test_id(0)), None);
        let third = RedirectLock::take(&claim(test_id(0), 53, false, false)).expect("once let go");
        assert!(third.is_held());
    }

    #[test]
    fn a_full_listen_queue_still_refuses_a_second_agent() {
        let first = RedirectLock::take(&claim(test_id(3), 53, false, false)).expect("the first");
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
        let err = RedirectLock::take(&claim(test_id(3), 54, false, false))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("too busy to say its pid"), "{err}");
    }

    #[test]
    fn an_agent_taking_over_on_the_same_listener_serves_and_takes_the_lock_once_free() {
        let old = RedirectLock::take(&claim(test_id(1), 53, false, false)).expect("the old");
        let new = RedirectLock::take(&claim(test_id(1), 53, true, true)).expect("a takeover");
        assert!(new.next_look().is_some(), "waits");
        new.try_take();
        assert!(!new.is_held(), "taken while the old agent holds it");
        drop(old);
        new.try_take();
        assert!(new.is_held(), "not taken once free");
        assert!(new.next_look().is_none());
    }

    #[test]
    fn a_name_squatted_by_another_user_leaves_the_agent_unlocked_until_it_is_let_go() {
        // Held by this process: trusted. A squatter of another user is what the e2e tests
        // run (as nobody); here, the state's own transitions.
        let lock = RedirectLock::take(&claim(test_id(2), 53, false, false)).expect("the lock");
        let name = lock.cgroup_name.clone();
        lock.release();
        let squatter = local_names::hold(&name).expect("hold the name");
        *lock.state() = State::Unlocked;
        assert_eq!(lock.next_look(), Some(std::time::Duration::from_secs(1)));
        lock.try_take();
        assert!(!lock.is_held(), "taken while held");
        drop(squatter);
        lock.try_take();
        assert!(lock.is_held(), "not taken once let go");
    }
}
