//! Giving up privileges once the programs are attached.
//!
//! Loading and attaching eBPF programs, binding port 53 and entering a cgroup need
//! capabilities; serving afterwards does not: map lookups go through file descriptors already
//! open, upstream sockets bind ephemeral ports, detaching closes link descriptors, and leaving
//! the agent's cgroup at the end writes files its user owns. So `run` drops every capability
//! (effective, permitted, inheritable) and sets no_new_privs, so that not even an execve can
//! bring them back, before it serves a single query. Both are per thread in Linux: every
//! thread that exists at that moment drops them itself; threads made later inherit the loss.
use std::{fs, io};

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets, in two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapabilityHeader {
    version: u32,
    /// 0: the calling thread.
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapabilityData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the calling thread, for good, and sets its no_new_privs.
pub fn drop_all_on_this_thread() -> io::Result<()> {
    let header = CapabilityHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let none = [CapabilityData::default(); 2];
    // SAFETY: capset reads one header and, for version 3, two data structs; both are live
    // locals of the kernel's layout (#[repr(C)]) for the whole call, and it writes neither.
    if unsafe { libc::syscall(libc::SYS_capset, &header, none.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the process non-dumpable: no core dump, and no other process of its user may
/// ptrace it or read its memory and `/proc` files without CAP_SYS_PTRACE. (Dropping
/// capabilities does not do this by itself for a process that keeps user id 0.)
pub fn make_undumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes integers only and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The threads of this process that still hold a capability (effective or permitted), by
/// thread id, read from `/proc/self/task`.
pub fn threads_with_capabilities() -> io::Result<Vec<u32>> {
    let mut holding = Vec::new();
    for task in fs::read_dir("/proc/self/task")? {
        let task = task?;
        // A thread that ended meanwhile has nothing to check.
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if holds_capabilities(&status) {
            holding.push(task.file_name().to_string_lossy().parse().unwrap_or(0));
        }
    }
    Ok(holding)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities loading the programs needs that this process lacks (effective set),
/// named: CAP_BPF to load them at all, and CAP_PERFMON for the verifier to accept their
/// pointer arithmetic (without it, a 1,500-line verifier log that blames the kernel;
/// helper-173). CAP_SYS_ADMIN stands in for both. Empty when `/proc/self/status` cannot be
/// read: the load then says what it says.
pub fn missing_for_loading() -> Vec<&'static str> {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective(&status))
        .map_or_else(Vec::new, missing_for_loading_in)
}

fn missing_for_loading_in(effective: u64) -> Vec<&'static str> {
    let has = |capability: u32| effective & (1 << capability) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(capability, _)| !has(capability))
        .map(|(_, name)| name)
        .collect()
}

/// The effective capability mask of a `/proc/.../status` text.
fn effective(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
}

/// Whether a `/proc/.../status` text shows any effective or permitted capability.
fn holds_capabilities(status: &str) -> bool {
    status.lines().any(|line| {
        ["CapEff:", "CapPrm:"].iter().any(|field| {
            line.strip_prefix(field)
                .is_some_and(|mask| u64::from_str_radix(mask.trim(), 16) != Ok(0))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_capability_masks_from_proc_status() {
        let none = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                    CapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\n";
        assert!(!holds_capabilities(none));
        let some = none.replace("CapPrm:\t0000000000000000", "CapPrm:\t0000000000000400");
        assert!(holds_capabilities(&some));
    }

    #[test]
    fn names_the_capabilities_loading_lacks() {
        let bpf_perfmon_net_admin = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << 12);
        assert!(missing_for_loading_in(bpf_perfmon_net_admin).is_empty());
        assert_eq!(
            missing_for_loading_in(bpf_perfmon_net_admin & !(1 << CAP_PERFMON)),
            ["CAP_PERFMON"]
        );
        assert_eq!(missing_for_loading_in(0), ["CAP_BPF", "CAP_PERFMON"]);
        assert!(missing_for_loading_in(1 << CAP_SYS_ADMIN).is_empty());
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective(status), Some(0x1ff_ffff_ffff));
    }

    /// On a thread of its own, so the test process keeps its capabilities.
    #[test]
    fn a_thread_that_drops_them_has_none_and_cannot_get_them_back() {
        std::thread::spawn(|| {
            drop_all_on_this_thread().unwrap();
            // SAFETY: gettid takes nothing, touches no memory and cannot fail.
            let tid = unsafe { libc::gettid() };
            let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            assert!(!holds_capabilities(&status), "{status}");
            // Binding a privileged port now fails, whoever we are.
            let first_unprivileged: u16 =
                fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
            assert!(first_unprivileged > 1, "this host has no privileged ports");
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            let low = std::net::SocketAddr::from(([127, 0, 0, 1], first_unprivileged - 1));
            assert_eq!(
                socket.bind(&low.into()).unwrap_err().kind(),
                io::ErrorKind::PermissionDenied
            );
        })
        .join()
        .unwrap();
    }
}
