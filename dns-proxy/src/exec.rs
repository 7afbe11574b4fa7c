//! `dns-proxy exec`: the command, started inside its own cgroup, so its DNS is redirected from
//! its first packet.
use std::{
    ffi::{CString, OsString},
    io,
    os::unix::ffi::OsStrExt as _,
    process::ExitStatus,
};

use crate::{
    RunError,
    cgroup::Cgroup,
    drain,
    shutdown::{Received, StopSignal, StopSignals},
};

/// Runs `argv` in `cgroup` and waits for it to exit. SIGTERM, SIGHUP and the other signals
/// the agent watches but SIGINT are passed on to it, as a wrapper should (a `kill -HUP` meant
/// to reload the command reaches it); SIGINT is not, since a terminal's Ctrl-C reaches the
/// command on its own and would arrive twice. When the agent is `stranded` out of its own
/// cgroup, the command is sent SIGTERM too: its lookups through the agent may loop.
pub async fn run_command(
    argv: &[OsString],
    cgroup: &Cgroup,
    signals: &mut StopSignals,
    stranded: &drain::Signal,
) -> Result<ExitStatus, RunError> {
    let (program, args) = argv.split_first().expect("clap requires a command");
    let spawn_failed = |source| RunError::Spawn {
        command: program.clone(),
        source,
    };
    let procs = CString::new(cgroup.path.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|_| spawn_failed(io::Error::other("cgroup path contains a NUL byte")))?;
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    // The agent tells the service manager when it serves, not the command.
    command.env_remove("NOTIFY_SOCKET");
    // SAFETY: `pre_exec` runs the closure in the forked child, where only async-signal-safe
    // calls are sound: it makes only open, write and close, and allocates nothing (`procs`
    // was made before the fork and moves into the closure).
    unsafe {
        command.pre_exec(move || enter_cgroup(&procs));
    }
    let mut child = command.spawn().map_err(spawn_failed)?;
    log::info!(
        "started {:?} (pid {}) in {}",
        argv,
        child.id().unwrap_or_default(),
        cgroup.path.display()
    );
    let send = |pid: u32, signal: libc::c_int| {
        // SAFETY: kill has no memory effects; the child is not yet reaped, so the pid is
        // still its own.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    };
    let mut told = false;
    loop {
        tokio::select! {
            status = child.wait() => return status.map_err(RunError::Wait),
            () = stranded.stopped(), if !told => {
                told = true;
                if let Some(pid) = child.id() {
                    log::error!("stopping the command (pid {pid}): SIGTERM");
                    send(pid, libc::SIGTERM);
                }
            }
            signal = signals.recv() => {
                if signal == Received::Stop(StopSignal::Interrupt) {
                    log::info!("{signal}: waiting for the command to exit");
                } else if let Some(pid) = child.id() {
                    log::info!("{signal}: passing it on to the command (pid {pid})");
                    send(pid, signal.number());
                }
            }
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` ("0" means the
/// writer itself). Runs in the forked child before exec.
fn enter_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: `procs` is NUL-terminated and lives for the call.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked above); the buffer is a static byte, and write reads only
    // the one byte given.
    let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let result = if written == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    // SAFETY: `fd` is ours, opened above, and closed once.
    unsafe { libc::close(fd) };
    result
}
