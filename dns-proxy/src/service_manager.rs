//! Tells the service manager (systemd, `Type=notify`) when the agent serves and when it stops,
//! with the datagrams of sd_notify(3) sent to the socket named in `NOTIFY_SOCKET`, and keeps
//! its watchdog (`WatchdogSec=`) fed while the agent is healthy. Without that variable,
//! nothing is sent.
//!
//! So `systemctl start dns-proxy` returns, and units ordered after `nss-lookup.target` start,
//! only once redirected lookups are served, not when the binary was merely started; and an
//! agent wedged past [`crate::metrics::UNHEALTHY_AFTER`] is restarted.
use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram},
        },
    },
    sync::Arc,
    time::Duration,
};

use crate::{drain, metrics::Readiness};

/// The variable systemd sets for a service of `Type=notify`.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The service manager's notification socket, if the agent runs under one.
#[derive(Clone)]
pub struct ServiceManager {
    notify: Option<Arc<Notify>>,
    /// How often to feed the watchdog, if the manager keeps one.
    watchdog_every: Option<Duration>,
}

struct Notify {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// As given, for the log.
    name: String,
}

impl ServiceManager {
    /// The manager named by `NOTIFY_SOCKET`. A value that names no socket this agent can send
    /// to is logged and ignored: the agent serves all the same, and systemd, waiting in
    /// vain, says so when the start times out.
    pub fn from_environment() -> Self {
        let notify = std::env::var_os(NOTIFY_SOCKET).and_then(|value| match Notify::open(&value) {
            Ok(notify) => Some(Arc::new(notify)),
            Err(error) => {
                log::warn!(
                    "{NOTIFY_SOCKET}={}: cannot tell the service manager that the agent is \
                     ready: {error}",
                    value.to_string_lossy()
                );
                None
            }
        });
        let watchdog_every = notify.as_ref().and_then(|_| watchdog_every());
        Self {
            notify,
            watchdog_every,
        }
    }

    /// Feeds the watchdog (`WATCHDOG=1`) at half its timeout while the agent is healthy (as
    /// `/healthz` says), until `stop`. Unhealthy, it stops feeding it, and the manager
    /// restarts the agent; so it does if the runtime that runs this stops.
    pub async fn feed_watchdog(self, readiness: Arc<Readiness>, stop: drain::Signal) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        let mut ticks = tokio::time::interval(every);
        let mut starved = false;
        loop {
            tokio::select! {
                () = stop.stopped() => return,
                _ = ticks.tick() => {}
            }
            match readiness.unhealthy() {
                None if starved => {
                    starved = false;
                    log::info!("healthy again: telling the service manager's watchdog so again");
                    self.send("WATCHDOG=1\nSTATUS=serving redirected lookups\n");
                }
                None => self.send("WATCHDOG=1\n"),
                Some(why) if !starved => {
                    starved = true;
                    log::error!(
                        "no longer telling the service manager's watchdog that the agent is \
                         alive, so that it restarts the agent: {why}"
                    );
                    self.send(&format!("STATUS=unhealthy: {why}\n"));
                }
                Some(_) => {}
            }
        }
    }

    /// Redirected lookups are served from now on.
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=serving redirected lookups\n");
    }

    /// The agent stops: it no longer redirects, and answers what is in flight.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: answering the lookups in flight\n");
    }

    fn send(&self, state: &str) {
        let Some(notify) = &self.notify else {
            return;
        };
        // The socket does not block: a manager too busy to take one datagram gets none,
        // rather than holding up the runtime thread that sends it.
        if let Err(error) = notify.socket.send_to_addr(state.as_bytes(), &notify.addr) {
            log::warn!(
                "cannot tell the service manager ({NOTIFY_SOCKET}={}) {:?}: {error}",
                notify.name,
                state.lines().next().unwrap_or_default()
            );
        }
    }
}

impl Notify {
    fn open(value: &OsStr) -> io::Result<Self> {
        let addr = notify_address(value.as_bytes())?;
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            addr,
            name: value.to_string_lossy().into_owned(),
        })
    }
}

/// Half the watchdog timeout the manager set for this process (`WATCHDOG_USEC`, and
/// `WATCHDOG_PID` if set), as sd_watchdog_enabled(3) reads them; `None` without one.
fn watchdog_every() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    match usec.parse::<u64>() {
        Ok(usec) if usec > 0 => Some(Duration::from_micros(usec) / 2),
        _ => {
            log::warn!("WATCHDOG_USEC={usec}: not a number of microseconds; no watchdog kept");
            None
        }
    }
}

/// The socket address of a `NOTIFY_SOCKET` value: a path, or `@` and an abstract name.
fn notify_address(value: &[u8]) -> io::Result<SocketAddr> {
    match value {
        [b'/', ..] => SocketAddr::from_pathname(OsStr::from_bytes(value)),
        [b'@', name @ ..] if !name.is_empty() => SocketAddr::from_abstract_name(name),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor @ and an abstract socket name",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_path_and_an_abstract_name_are_addresses() {
        let path = notify_address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let name = notify_address(b"@/org/freedesktop/systemd1/notify").unwrap();
        assert_eq!(
            name.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify"[..])
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for value in [&b""[..], b"@", b"run/notify", b"vsock:2:1234"] {
            assert!(notify_address(value).is_err(), "{value:?}");
        }
    }

    #[test]
    fn ready_and_stopping_reach_the_socket() {
        let name = format!("dns-proxy-notify-test-{}", std::process::id());
        let manager_addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&manager_addr).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let agent = ServiceManager {
            notify: Some(Arc::new(
                Notify::open(OsStr::new(&format!("@{name}"))).unwrap(),
            )),
            watchdog_every: None,
        };
        let mut buffer = [0; 256];
        agent.ready();
        let length = manager.recv(&mut buffer).unwrap();
        assert!(buffer[..length].starts_with(b"READY=1\n"));
        agent.stopping();
        let length = manager.recv(&mut buffer).unwrap();
        assert!(buffer[..length].starts_with(b"STOPPING=1\n"));
    }
}
