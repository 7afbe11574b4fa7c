//! What the agent sets up on its host before it attaches: the blocks' `local` routes, so the
//! kernel delivers their addresses here, and the bpffs directory where the server table is
//! pinned. Both are left in place at exit on purpose: a socket that was sent to a block address
//! keeps a local destination (its lookups fail fast, never into a black hole, while no agent
//! runs), and the next agent decodes the same addresses.
use std::{
    ffi::CString,
    fs, io, mem,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use dns_proxy_common::AddressBlock;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "cannot route {block} to this host (`ip route replace local {block} dev lo`): \
         {source}{hint}",
        hint = if source.kind() == io::ErrorKind::PermissionDenied {
            " (the agent needs CAP_NET_ADMIN)"
        } else {
            ""
        }
    )]
    Route {
        block: AddressBlock,
        source: io::Error,
    },
    #[error(
        "--state-dir {path}: {problem}; mount bpffs (`mount -t bpf bpf /sys/fs/bpf`) or give \
         a directory on one"
    )]
    StateDir { path: PathBuf, problem: String },
}

/// Makes every address of `block` local to this network namespace, as
/// `ip route replace local BLOCK dev lo` does (AnyIP). 127/8 is local already.
pub fn route_block_here(block: AddressBlock) -> Result<(), HostError> {
    if block.first().to_canonical().is_loopback() {
        return Ok(());
    }
    add_local_route(block).map_err(|source| HostError::Route { block, source })?;
    log::info!("routed {block} to this host (local, dev lo)");
    Ok(())
}

/// `BPF_FS_MAGIC` from the kernel's magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes `path` a directory on a bpffs, mounting one at `/sys/fs/bpf` first if the path is
/// below it and nothing is mounted there (as systemd does at boot).
pub fn prepare_state_dir(path: &Path) -> Result<(), HostError> {
    let problem = |problem: String| HostError::StateDir {
        path: path.to_owned(),
        problem,
    };
    let default_mount = Path::new("/sys/fs/bpf");
    if path.starts_with(default_mount) && !is_bpffs(default_mount) {
        fs::create_dir_all(default_mount)
            .map_err(|err| problem(format!("cannot create {}: {err}", default_mount.display())))?;
        mount_bpffs(default_mount).map_err(|err| {
            problem(format!(
                "nothing is mounted at /sys/fs/bpf and mounting bpffs there failed: {err}"
            ))
        })?;
        log::info!("mounted bpffs at /sys/fs/bpf");
    }
    fs::create_dir_all(path).map_err(|err| problem(format!("cannot create it: {err}")))?;
    if !is_bpffs(path) {
        return Err(problem("not on a bpf filesystem".to_owned()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes one struct statfs into `stat`.
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: a valid C string and a pointer to a live struct.
    let result = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    result == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let kind = c"bpf";
    // SAFETY: valid C strings; no data.
    let result = unsafe {
        libc::mount(
            kind.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One rtnetlink request: `RTM_NEWROUTE` of type local for `block` on the loopback device in
/// the local table, created or replaced, and its acknowledgement.
fn add_local_route(block: AddressBlock) -> io::Result<()> {
    let (family, address) = match block.first() {
        std::net::IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        std::net::IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let loopback = 1u32.to_ne_bytes(); // the loopback device's index, in every namespace
    let mut message = Vec::with_capacity(64);
    // struct nlmsghdr, its length filled in at the end.
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
    message.extend_from_slice(&(flags as u16).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // struct rtmsg
    message.extend_from_slice(&[
        family,
        block.prefix_len(),
        0, // src_len
        0, // tos
        libc::RT_TABLE_LOCAL,
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ]);
    message.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    push_attribute(&mut message, libc::RTA_DST, &address);
    push_attribute(&mut message, libc::RTA_OIF, &loopback);
    let len = message.len() as u32;
    message[..4].copy_from_slice(&len.to_ne_bytes());

    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the buffer and the address are live and of the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&raw const kernel).cast(),
            mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: the kernel writes at most the buffer's length.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    // An NLMSG_ERROR message: its header, then the error code (0 is the acknowledgement).
    let header_len = mem::size_of::<libc::nlmsghdr>();
    if (received as usize) < header_len + 4 {
        return Err(io::Error::other("a short rtnetlink reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other(format!(
            "an rtnetlink reply of type {kind}"
        )));
    }
    let mut code = [0u8; 4];
    code.copy_from_slice(&reply[header_len..header_len + 4]);
    let code = i32::from_ne_bytes(code);
    if code != 0 {
        return Err(io::Error::from_raw_os_error(-code));
    }
    Ok(())
}

/// Appends one `rtattr` with its payload, padded to 4 bytes.
fn push_attribute(message: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    message.extend_from_slice(&(len as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(payload);
    message.resize(message.len().next_multiple_of(4), 0);
}
