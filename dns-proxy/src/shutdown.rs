//! Waiting for the operator's request to stop.
use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM, watched from creation on, so none is missed between waits; and SIGHUP,
/// which starts the dnstap file anew (log rotation), and SIGUSR1, SIGUSR2 and SIGALRM, which
/// are logged and ignored: none may stop the agent without a drain, as their default action
/// would (a log rotation's `kill -USR1` once killed it silently, lookups in flight lost).
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    user1: Signal,
    user2: Signal,
    alarm: Signal,
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

impl StopSignals {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            user1: signal(SignalKind::user_defined1())?,
            user2: signal(SignalKind::user_defined2())?,
            alarm: signal(SignalKind::alarm())?,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM. A SIGHUP meanwhile calls `reopen_logs`, which
    /// says whether there was a log file to start anew; if not, it is logged and ignored.
    pub async fn next(&mut self, reopen_logs: &dyn Fn() -> bool) -> StopSignal {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return StopSignal::Interrupt,
                _ = self.terminate.recv() => return StopSignal::Terminate,
                _ = self.hangup.recv() => if !reopen_logs() {
                    log::warn!(
                        "SIGHUP ignored: there is no log file to reopen nor configuration to \
                         reload (restart with --takeover to change flags; SIGTERM stops the \
                         agent)"
                    );
                },
                _ = self.user1.recv() => ignored("SIGUSR1"),
                _ = self.user2.recv() => ignored("SIGUSR2"),
                _ = self.alarm.recv() => ignored("SIGALRM"),
            }
        }
    }
}

fn ignored(signal: &str) {
    log::warn!(
        "{signal} ignored: the agent has no use for it (SIGHUP reopens a --dnstap file; SIGTERM stops the agent)"
    );
}
