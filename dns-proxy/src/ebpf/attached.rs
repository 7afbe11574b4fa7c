//! What is attached to a cgroup already: another dns-proxy's redirect there would take every
//! lookup before this agent's programs see it (each rewrites the destination, and a query
//! already sent to a proxy's block is no longer one to port 53), so this one would serve
//! nothing while it reports ready.
use std::{io, os::fd::AsRawFd as _};

use dns_proxy_common::names;

/// `BPF_PROG_QUERY` (include/uapi/linux/bpf.h).
const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_CGROUP_INET4_CONNECT`: where `connect4` attaches.
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// Programs of one hook on one cgroup asked about at once; a cgroup has a handful.
const MAX_QUERIED: usize = 64;

/// The query part of `union bpf_attr`, up to `revision` (Linux 6.6); the kernel accepts a
/// shorter one from older userspace and ignores the fields it does not know.
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _padding: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The ids of dns-proxy `connect4` programs attached to the cgroup open as `cgroup` itself
/// (not those inherited from its ancestors: an agent of a parent cgroup sees the lookups of
/// this one only after this agent's programs have redirected them).
pub(super) fn redirecting_programs(cgroup: &std::fs::File) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; MAX_QUERIED];
    let mut query = ProgQuery {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_QUERIED as u32,
        ..ProgQuery::default()
    };
    // SAFETY: `query` is a live, initialised `bpf_attr` prefix of the size passed, and
    // `prog_ids` points at `prog_cnt` writable u32s that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut query as *mut ProgQuery,
            std::mem::size_of::<ProgQuery>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let attached = &ids[..(query.prog_cnt as usize).min(MAX_QUERIED)];
    if attached.is_empty() {
        return Ok(Vec::new());
    }
    // The kernel keeps the first 15 bytes of a program's name.
    let ours = &names::CONNECT4[..names::CONNECT4.len().min(15)];
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| attached.contains(&program.id()) && program.name_as_str() == Some(ours))
        .map(|program| program.id())
        .collect())
}
