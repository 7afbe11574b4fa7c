//! Running commands and processes: a command that must succeed, polling until something
//! holds, and [`Process`], a child killed and reaped on drop.
use std::{
    fs,
    io::Read as _,
    process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output},
    thread,
    time::{Duration, Instant},
};

/// Runs a command to completion and panics with its output unless it succeeds.
pub fn must(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A size field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("/proc/{pid}/status: {err}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A child process killed (and reaped) on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        Self { child }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.child.id());
    }

    /// Its exit status if it has exited, without waiting.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_for("the process to exit", limit, || self.exit_status())
    }

    /// Waits for the process to exit, at most `limit`, reading its standard error (it was
    /// spawned with a pipe) meanwhile, so that a long log cannot block it: its status and
    /// that log.
    pub fn wait_exit_with_stderr(&mut self, limit: Duration) -> (ExitStatus, String) {
        let mut stderr = self.take_stderr();
        let reader = std::thread::spawn(move || {
            let mut log = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            log
        });
        let status = self.wait_exit(limit);
        (status, reader.join().expect("the log reader"))
    }

    /// Its standard output (it was spawned with a pipe), to read while it runs.
    pub fn take_stdout(&mut self) -> ChildStdout {
        self.child
            .stdout
            .take()
            .expect("spawned with a piped stdout")
    }

    /// The first line it prints (it was spawned with a piped stdout), trimmed: for a process
    /// that says when it is ready. Its standard output is not read further.
    pub fn first_line_of_stdout(&mut self) -> String {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(self.take_stdout())
            .read_line(&mut line)
            .expect("read its first line");
        line.trim().to_owned()
    }

    /// Its standard error (it was spawned with a pipe), to read while it runs.
    pub fn take_stderr(&mut self) -> ChildStderr {
        self.child
            .stderr
            .take()
            .expect("spawned with a piped stderr")
    }

    /// What is left on its standard output (if it was spawned with a pipe), read to the end.
    pub fn rest_of_stdout(&mut self) -> String {
        let mut stdout = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        stdout
    }

    /// Closes the process's standard input (it was spawned with a pipe), then waits at most
    /// `limit` for it to exit and returns what it printed.
    pub fn finish_with_stdout(&mut self, limit: Duration) -> String {
        drop(self.child.stdin.take());
        let status = self.wait_exit(limit);
        let stdout = self.rest_of_stdout();
        assert!(status.success(), "exited with {status}; printed {stdout:?}");
        stdout
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
