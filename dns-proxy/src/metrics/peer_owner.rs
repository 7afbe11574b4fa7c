//! Who may read `/v1/resolutions`: the names every workload resolved are as private as the
//! lookups themselves (systemd-resolved shows its own to root alone). A client whose TCP
//! socket is in the agent's network namespace (in host mode, any local user, since the
//! metrics port listens on loopback) is served only if root or the agent's own user owns
//! that socket; the kernel says who does (`sock_diag`, as `ss -e` shows it). A client of
//! another namespace or host has no socket here: whoever chose `--metrics` chose who reaches
//! it.
use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr},
};

use crate::{
    block_binders::{NLMSG_HEADER_LEN, SOCK_DIAG_BY_FAMILY, SOCKID_LEN, diag_socket, request},
    host::reply_error,
};

/// `struct inet_diag_msg`: family, state, timer, retransmits, the id, then expires, the two
/// queues, and the owner's uid.
const UID_OFFSET: usize = 4 + SOCKID_LEN + 12;

/// Whether the client at `peer`, connected to this agent's `local`, may read the names table;
/// `Err(uid)` names the user refused.
pub(super) fn may_read_names(local: SocketAddr, peer: SocketAddr) -> Result<(), u32> {
    match owner(local, peer) {
        // SAFETY: geteuid cannot fail and touches no memory.
        Ok(Some(uid)) if uid != 0 && uid != unsafe { libc::geteuid() } => Err(uid),
        Ok(_) => Ok(()),
        Err(err) => {
            // The kernel always answers a lookup by address; refuse rather than serve blind.
            log::warn!("who asks for /v1/resolutions from {peer}: {err}; refused");
            Err(u32::MAX)
        }
    }
}

/// The uid owning the TCP socket at `peer` connected to `local`, if that socket is in this
/// network namespace.
fn owner(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let mut id = [0u8; SOCKID_LEN];
    // The client's socket: its source is `peer`, its destination `local`.
    id[..2].copy_from_slice(&peer.port().to_be_bytes());
    id[2..4].copy_from_slice(&local.port().to_be_bytes());
    let family = match (peer.ip(), local.ip()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            id[4..8].copy_from_slice(&source.octets());
            id[20..24].copy_from_slice(&destination.octets());
            libc::AF_INET
        }
        (source, destination) => {
            id[4..20].copy_from_slice(&to_v6(source).octets());
            id[20..36].copy_from_slice(&to_v6(destination).octets());
            libc::AF_INET6
        }
    };
    // No cookie: the lookup is by addresses alone.
    id[40..48].fill(0xff);
    let mut diag = diag_socket()?;
    let flags = libc::NLM_F_REQUEST as u16;
    let protocol = (family as u8, libc::IPPROTO_TCP as u8);
    diag.write_all(&request(
        SOCK_DIAG_BY_FAMILY,
        flags,
        protocol,
        u32::MAX,
        &id,
    ))?;
    let mut reply = [0u8; 512];
    let received = diag.read(&mut reply)?;
    let reply = &reply[..received];
    if reply.len() < NLMSG_HEADER_LEN {
        return Err(io::Error::other("a short sock_diag reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind == libc::NLMSG_ERROR as u16 {
        return match -reply_error(reply)? {
            libc::ENOENT => Ok(None),
            errno => Err(io::Error::from_raw_os_error(errno)),
        };
    }
    let body = &reply[NLMSG_HEADER_LEN..];
    let uid = body
        .get(UID_OFFSET..UID_OFFSET + 4)
        .ok_or_else(|| io::Error::other("a short inet_diag_msg"))?;
    Ok(Some(u32::from_ne_bytes([uid[0], uid[1], uid[2], uid[3]])))
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    use super::*;

    fn mapped_v4(addr: SocketAddr) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(to_v6(addr.ip())), addr.port())
    }

    /// The kernel names this process's user as the owner of its own connected socket, over
    /// IPv4, over IPv6 to a v4-mapped address of either kind of listener, and no one for a
    /// peer of no socket here.
    #[tokio::test]
    async fn the_owner_of_a_local_client_socket_is_its_user() {
        // SAFETY: as above.
        let me = unsafe { libc::geteuid() };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let _client = TcpStream::connect(local).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(owner(local, peer).unwrap(), Some(me));

        // An IPv6 socket of this host connected to an IPv4 listener, as the listener sees it.
        let _v6_client = TcpSocket::new_v6()
            .unwrap()
            .connect(mapped_v4(local))
            .await
            .unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert!(peer.is_ipv4(), "{peer}");
        assert_eq!(owner(local, peer).unwrap(), Some(me));

        let listener6 = TcpListener::bind("[::]:0").await.unwrap();
        let port = listener6.local_addr().unwrap().port();
        let mapped = mapped_v4(SocketAddr::from(([127, 0, 0, 1], port)));
        let _client = TcpStream::connect(mapped).await.unwrap();
        let (_accepted, peer) = listener6.accept().await.unwrap();
        assert_eq!(owner(mapped, peer).unwrap(), Some(me));

        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(owner(local, nobody).unwrap(), None);
        assert_eq!(may_read_names(local, nobody), Ok(()));
    }
}
