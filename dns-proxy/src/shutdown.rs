//! Waiting for the operator's request to stop.
use std::io;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGINT or SIGTERM, with the signal's name.
pub async fn stop_requested() -> io::Result<&'static str> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    })
}
