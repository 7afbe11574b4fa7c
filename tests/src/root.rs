//! The root check every privileged fixture makes first: a test that needs root must never
//! skip quietly.

/// Panics unless running as root: a privileged test must never skip quietly.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these integration tests need root (eBPF, cgroups, network namespaces): run `cargo xtask test` as root"
    );
}
