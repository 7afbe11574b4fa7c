//! The root check every privileged fixture makes first. A test that needs root must never
//! skip quietly, and `cargo test` run by hand as a normal user should not answer with a panic
//! in every test either: the first test that gets here without root prints one line saying
//! what to run instead, and the whole test binary exits with a failure.
use std::{io::Write as _, process, sync::Once};

/// Returns if running as root; otherwise ends the test binary, saying what to run instead.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        stop_the_run(
            "the e2e tests need root (eBPF, cgroups, network namespaces): run `cargo xtask test` \
             as root (see tests/README.md)",
        );
    }
}

/// Ends the whole test binary with `line` on stderr and exit status 1: for a precondition that
/// no test in it can do without, so that it is said once, not in a panic per test. Only the
/// first caller prints; any other waits for the exit. It fails the run, so nothing is skipped
/// quietly.
pub fn stop_the_run(line: &str) -> ! {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Straight to stderr: libtest captures a test's eprintln! and shows it only with the
        // test's result, which an exit never reaches.
        let _ = writeln!(std::io::stderr(), "{line}");
        process::exit(1);
    });
    unreachable!("the first caller exits the process")
}
