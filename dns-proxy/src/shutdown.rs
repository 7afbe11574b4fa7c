//! Waiting for the operator's request to stop.
use std::{io, task::Poll};

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM, watched from creation on, so none is missed between waits; SIGHUP,
/// which starts the dnstap file anew (log rotation); and every other signal whose default
/// action would end the agent at once, which is logged and ignored: none may stop the agent
/// without a drain (a log rotation's `kill -USR1` once killed it silently, lookups in flight
/// lost).
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    ignored: Vec<(String, libc::c_int, Signal)>,
}

/// A stop request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        })
    }
}

/// The signals that end a process by default and that nobody sends the agent to stop it.
/// SIGXFSZ is among them: past a file-size limit the dnstap file's write fails (`EFBIG`)
/// and is counted, rather than the agent dying. Left at their default: SIGQUIT (a stop with
/// a core dump, on purpose), SIGXCPU (a CPU limit the operator set), and the faults (SIGSEGV,
/// SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP); SIGPIPE is ignored by Rust already.
const IGNORED: &[(&str, libc::c_int)] = &[
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGALRM", libc::SIGALRM),
    ("SIGVTALRM", libc::SIGVTALRM),
    ("SIGPROF", libc::SIGPROF),
    ("SIGIO", libc::SIGIO),
    ("SIGPWR", libc::SIGPWR),
    ("SIGSTKFLT", libc::SIGSTKFLT),
    ("SIGXFSZ", libc::SIGXFSZ),
];

impl StopSignals {
    pub fn new() -> io::Result<Self> {
        let mut ignored = Vec::new();
        for &(name, number) in IGNORED {
            ignored.push((
                name.to_owned(),
                number,
                signal(SignalKind::from_raw(number))?,
            ));
        }
        // The real-time signals, SIGRTMIN to SIGRTMAX as the C library numbers them (it keeps
        // the first two or three for its threads).
        for number in libc::SIGRTMIN()..=libc::SIGRTMAX() {
            let name = match number - libc::SIGRTMIN() {
                0 => "SIGRTMIN".to_owned(),
                offset => format!("SIGRTMIN+{offset}"),
            };
            ignored.push((name, number, signal(SignalKind::from_raw(number))?));
        }
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            ignored,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM. A SIGHUP meanwhile calls `reopen_logs`, which
    /// says whether there was a log file to start anew; if not, it is logged and ignored, as
    /// every other signal is.
    pub async fn next(&mut self, reopen_logs: &dyn Fn() -> bool) -> StopSignal {
        loop {
            match self.recv().await {
                Received::Stop(signal) => return signal,
                Received::Hangup => {
                    if !reopen_logs() {
                        log::warn!(
                            "SIGHUP ignored: there is no log file to reopen nor configuration \
                             to reload (restart with --takeover to change flags; SIGTERM stops \
                             the agent)"
                        );
                    }
                }
                Received::Other { name, .. } => log::warn!(
                    "{name} ignored: the agent has no use for it (SIGHUP reopens a --dnstap \
                     file; SIGTERM stops the agent)"
                ),
            }
        }
    }

    /// The next signal of those watched.
    pub async fn recv(&mut self) -> Received {
        let other = std::future::poll_fn(|context| {
            if self.hangup.poll_recv(context).is_ready() {
                return Poll::Ready(Received::Hangup);
            }
            for (name, number, signal) in &mut self.ignored {
                if signal.poll_recv(context).is_ready() {
                    return Poll::Ready(Received::Other {
                        name: name.clone(),
                        number: *number,
                    });
                }
            }
            Poll::Pending
        });
        tokio::select! {
            _ = self.interrupt.recv() => Received::Stop(StopSignal::Interrupt),
            _ = self.terminate.recv() => Received::Stop(StopSignal::Terminate),
            received = other => received,
        }
    }
}

/// A signal, as [`StopSignals::recv`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Stop(StopSignal),
    Hangup,
    /// One of the signals that would end the agent by default and stop nothing.
    Other {
        name: String,
        number: libc::c_int,
    },
}

impl Received {
    /// The signal's number, to pass it on.
    pub fn number(&self) -> libc::c_int {
        match self {
            Self::Stop(StopSignal::Interrupt) => libc::SIGINT,
            Self::Stop(StopSignal::Terminate) => libc::SIGTERM,
            Self::Hangup => libc::SIGHUP,
            Self::Other { number, .. } => *number,
        }
    }
}

impl std::fmt::Display for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stop(signal) => signal.fmt(f),
            Self::Hangup => f.write_str("SIGHUP"),
            Self::Other { name, .. } => f.write_str(name),
        }
    }
}
