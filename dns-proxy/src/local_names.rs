//! Names agents hold in their network namespace: abstract unix sockets, which the kernel frees
//! when their process exits, however it exits. `redirect_lock` and `agents` build on them.
//!
//! Who holds a name is asked of the kernel (`sock_diag`, the netlink interface `ss -x` uses),
//! not of the holder: a connect to it would wait on, or fail at, a listen queue anyone can
//! fill, and could not tell a socket that is bound but not listening. The kernel gives each
//! socket's owner (`UNIX_DIAG_UID`, Linux 5.3) whatever its state, and only names in this
//! network namespace. Asking needs no privilege. Its list is read in pieces, though, and a
//! socket closed meanwhile can make it skip another (an adversary made it miss a name in 12 %
//! of reads): whether a name is held is therefore decided by a bind, which is exact, and the
//! list, read again on a miss, only says by whom.
use std::{
    io::{self, Read as _},
    os::fd::AsRawFd as _,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A listening abstract unix socket named `name`, held as long as the socket is.
pub(crate) fn hold(name: &str) -> io::Result<Socket> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.bind(&abstract_address(name)?)?;
    socket.listen(8)?;
    Ok(socket)
}

/// Whether `uid` may speak for an agent: root, or the user this agent runs as.
pub(crate) fn is_trusted(uid: u32) -> bool {
    uid == 0 || uid == effective_uid()
}

/// The names in this network namespace that start with `prefix`, each with its holder's uid.
pub(crate) fn held_with_prefix(prefix: &str) -> io::Result<Vec<(String, u32)>> {
    Ok(dump()?
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .collect())
}

/// The uid of the holder of `name` in this network namespace, if the kernel's list shows it
/// (one read: it may miss a name that is held).
pub(crate) fn holder_uid(name: &str) -> io::Result<Option<u32>> {
    Ok(dump()?
        .into_iter()
        .find(|(held, _)| held == name)
        .map(|(_, uid)| uid))
}

/// Reads of the list before a name that is held but not in it is an error.
const LIST_READS: usize = 5;

/// The uid of the holder of `name`, if it is held. A bind says whether it is; only a name
/// that no one else binds but its one holder may be asked so (the probe holds it for a
/// moment).
pub(crate) fn owner(name: &str) -> io::Result<Option<u32>> {
    match Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?.bind(&abstract_address(name)?) {
        Ok(()) => return Ok(None),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {}
        Err(err) => return Err(err),
    }
    if let Some(uid) = owner_of_held(name)? {
        return Ok(Some(uid));
    }
    // Not in the list: let go meanwhile, or skipped by it every time.
    match Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?.bind(&abstract_address(name)?) {
        Ok(()) => Ok(None),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => Err(io::Error::other(format!(
            "{name} is held, but the kernel's list of sockets did not show it in {LIST_READS} \
             reads"
        ))),
        Err(err) => Err(err),
    }
}

/// The uid of the holder of `name`, a name just found held: read from the kernel's list,
/// again on a miss. `None` if no read showed it: it was let go meanwhile, or the list kept
/// skipping it.
pub(crate) fn owner_of_held(name: &str) -> io::Result<Option<u32>> {
    for _ in 0..LIST_READS {
        if let Some(uid) = holder_uid(name)? {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// The pid of the process listening on `name`, for messages (best effort: `None` when its
/// listen queue is full, nothing listens, or it runs in another pid namespace, which the
/// kernel gives as pid 0).
pub(crate) fn listener_pid(name: &str) -> Option<i32> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None).ok()?;
    socket.connect(&abstract_address(name).ok()?).ok()?;
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `length` bytes into `credentials`, a live local of the
    // type SO_PEERCRED fills, and `length` is its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    (rc == 0 && credentials.pid != 0).then_some(credentials.pid)
}

fn abstract_address(name: &str) -> io::Result<SockAddr> {
    SockAddr::unix(format!("\0{name}"))
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

// include/uapi/linux/netlink.h, sock_diag.h, unix_diag.h.
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_UID: u32 = 0x40;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_UID: u16 = 7;
const NLMSG_HEADER: usize = 16;
/// `struct unix_diag_msg`, before its attributes.
const UNIX_DIAG_MSG: usize = 16;

/// Every abstract unix socket name in this network namespace, with its owner's uid.
fn dump() -> io::Result<Vec<(String, u32)>> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM.cloexec(),
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )
    .map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("cannot ask the kernel about unix sockets (sock_diag): {err}"),
        )
    })?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    socket.send(&dump_request())?;
    let mut socket = socket;
    let mut names = Vec::new();
    // Room for the largest message a dump sends (32 KiB), with margin.
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = socket.read(&mut buffer)?;
        if received == 0 {
            return Err(io::Error::other("sock_diag: the dump ended early"));
        }
        if parse_messages(&buffer[..received], &mut names)? {
            return Ok(names);
        }
    }
}

/// An `nlmsghdr` and a `unix_diag_req` asking for every unix socket, in any state, with its
/// name and owner.
fn dump_request() -> Vec<u8> {
    let mut request = Vec::with_capacity(NLMSG_HEADER + 24);
    request.extend_from_slice(&((NLMSG_HEADER + 24) as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    request.push(libc::AF_UNIX as u8); // sdiag_family
    request.push(0); // sdiag_protocol
    request.extend_from_slice(&0u16.to_ne_bytes()); // pad
    request.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    request.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    request.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_UID).to_ne_bytes());
    request.extend_from_slice(&[0xff; 8]); // udiag_cookie: none
    request
}

/// Adds the abstract names (with their owners) of the netlink messages in `datagram` to
/// `names`; whether the dump is done.
fn parse_messages(datagram: &[u8], names: &mut Vec<(String, u32)>) -> io::Result<bool> {
    let malformed = || io::Error::other("sock_diag: a malformed reply");
    let mut rest = datagram;
    while rest.len() >= NLMSG_HEADER {
        let length = u32_at(rest, 0) as usize;
        let kind = u16_at(rest, 4);
        if length < NLMSG_HEADER || length > rest.len() {
            return Err(malformed());
        }
        let payload = &rest[NLMSG_HEADER..length];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = payload.get(..4).map_or(0, |code| -i32_at(code, 0));
                if errno == 0 {
                    // An acknowledgement, not an error.
                } else if errno == libc::ENOENT || errno == libc::EOPNOTSUPP {
                    return Err(io::Error::other(
                        "the kernel has no diagnostics of unix sockets (module unix_diag, \
                         CONFIG_UNIX_DIAG): `modprobe unix_diag`, or allow it to load",
                    ));
                } else {
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(named) = parse_socket(payload) {
                    names.push(named);
                }
            }
            _ => {}
        }
        rest = &rest[align4(length).min(rest.len())..];
    }
    Ok(false)
}

/// A socket's abstract name and owner, from a `unix_diag_msg` and its attributes; `None` for
/// a socket with no abstract name (unnamed, or a path in the filesystem) or no owner given.
fn parse_socket(message: &[u8]) -> Option<(String, u32)> {
    let mut attributes = message.get(UNIX_DIAG_MSG..)?;
    let (mut name, mut uid) = (None, None);
    while attributes.len() >= 4 {
        let length = u16_at(attributes, 0) as usize;
        let kind = u16_at(attributes, 2);
        if length < 4 || length > attributes.len() {
            return None;
        }
        let value = &attributes[4..length];
        match kind {
            UNIX_DIAG_NAME => name = value.strip_prefix(b"\0"),
            UNIX_DIAG_UID if value.len() >= 4 => uid = Some(u32_at(value, 0)),
            _ => {}
        }
        attributes = &attributes[align4(length).min(attributes.len())..];
    }
    Some((String::from_utf8(name?.to_vec()).ok()?, uid?))
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn i32_at(bytes: &[u8], at: usize) -> i32 {
    u32_at(bytes, at) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_a_held_name_and_its_owner_until_it_is_let_go() {
        let name = format!("dns-proxy/test/local-names/{}", std::process::id());
        assert_eq!(holder_uid(&name).expect("a dump"), None);
        assert_eq!(owner(&name).expect("a look"), None);
        let held = hold(&name).expect("hold the name");
        assert_eq!(owner(&name).expect("a look"), Some(effective_uid()));
        assert_eq!(holder_uid(&name).expect("a dump"), Some(effective_uid()));
        assert!(is_trusted(effective_uid()));
        assert_eq!(listener_pid(&name), Some(std::process::id() as i32));
        let prefix = "dns-proxy/test/local-names/";
        assert!(
            held_with_prefix(prefix)
                .expect("a dump")
                .contains(&(name.clone(), effective_uid()))
        );
        drop(held);
        assert_eq!(holder_uid(&name).expect("a dump"), None);
        assert_eq!(owner(&name).expect("a look"), None);
    }

    #[test]
    fn a_bound_socket_that_does_not_listen_is_found_too() {
        let name = format!("dns-proxy/test/bound-only/{}", std::process::id());
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.bind(&abstract_address(&name).unwrap()).unwrap();
        assert_eq!(holder_uid(&name).expect("a dump"), Some(effective_uid()));
        assert_eq!(listener_pid(&name), None, "nothing listens");
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let mut names = Vec::new();
        // A header that claims more than there is.
        let mut message = vec![0u8; 16];
        message[..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse_messages(&message, &mut names).is_err());
        // An attribute that claims more than there is.
        let mut socket = vec![0u8; UNIX_DIAG_MSG];
        socket.extend_from_slice(&200u16.to_ne_bytes());
        socket.extend_from_slice(&UNIX_DIAG_NAME.to_ne_bytes());
        assert_eq!(parse_socket(&socket), None);
        // Too short for a header: not done, nothing added.
        assert!(!parse_messages(&[1, 2, 3], &mut names).unwrap());
        assert!(names.is_empty());
    }

    #[test]
    fn a_socket_message_gives_its_abstract_name_and_owner() {
        let mut socket = vec![0u8; UNIX_DIAG_MSG];
        let name = b"\0dns-proxy/redirects/7";
        socket.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
        socket.extend_from_slice(&UNIX_DIAG_NAME.to_ne_bytes());
        socket.extend_from_slice(name);
        socket.resize(align4(socket.len()), 0);
        socket.extend_from_slice(&8u16.to_ne_bytes());
        socket.extend_from_slice(&UNIX_DIAG_UID.to_ne_bytes());
        socket.extend_from_slice(&65534u32.to_ne_bytes());
        assert_eq!(
            parse_socket(&socket),
            Some(("dns-proxy/redirects/7".to_owned(), 65534))
        );
    }
}
