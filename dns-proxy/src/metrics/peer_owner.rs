//! Who may read `/v1/resolutions`: the names every workload resolved are as private as the
//! lookups themselves (systemd-resolved shows its own to root alone). A client whose TCP
//! socket is in the agent's network namespace (in host mode, any local user, since the
//! metrics port listens on loopback) is served only if root or the agent's own user owns
//! that socket; the kernel says who does (`sock_diag`, as `ss -e` shows it). A client from an
//! address of this namespace whose socket is not found (it connected to another address that
//! NAT sent here, a port redirect or a hostPort) is refused too. A client of another
//! namespace or host has no socket here: whoever chose `--metrics` chose who reaches it.
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use crate::block_binders::{SOCKID_LEN, diag_socket, dump};

/// `struct inet_diag_msg`: family, state, timer, retransmits, the id, then expires, the two
/// queues, and the owner's uid.
const UID_OFFSET: usize = 4 + SOCKID_LEN + 12;
/// `linux/inet_diag.h`: the conditions on a socket's local and remote address and port.
const INET_DIAG_BC_S_COND: u8 = 7;
const INET_DIAG_BC_D_COND: u8 = 8;
/// Every TCP state but those of no client socket: listening, `TIME_WAIT` (no owner) and a
/// server's half-open connection.
const CLIENT_STATES: u32 = !((1 << 6) | (1 << 10) | (1 << 12));

/// Whether the client at `peer`, connected to this agent's `local`, may read the names table;
/// `Err` says why not.
pub(super) fn may_read_names(local: SocketAddr, peer: SocketAddr) -> Result<(), String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let agent = unsafe { libc::geteuid() };
    match owners(local, peer) {
        Ok(owners) if owners.is_empty() && is_local(peer) => Err(format!(
            "this client's address, {}, is this host's, and its socket is not connected to \
             this port (a NAT in between?)",
            peer.ip()
        )),
        Ok(owners) => match owners.into_iter().find(|&uid| uid != 0 && uid != agent) {
            Some(uid) => Err(format!("this client's socket is uid {uid}'s")),
            None => Ok(()),
        },
        Err(err) => {
            // The kernel always answers a dump; refuse rather than serve blind.
            log::warn!("who asks for /v1/resolutions from {peer}: {err}; refused");
            Err(format!("who asks could not be told: {err}"))
        }
    }
}

/// Whether `peer`'s address is one of this network namespace's own: loopback, or an
/// interface's. Not "a socket could bind it", which `ip_nonlocal_bind` (set on many load
/// balancers) makes true of any address, and would refuse every remote client.
fn is_local(peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    ip.is_loopback() || crate::host::interface_addresses().contains(&ip)
}

/// The uids owning the TCP sockets of this network namespace whose local end is `peer` and
/// whose remote end is `local`: the client's socket, if it is here (none if the client is in
/// another namespace or host). A dump filtered by those addresses, not the kernel's lookup of
/// one socket, which wants the interface of a socket bound to one (`SO_BINDTODEVICE`, which
/// any user may set) and found none for a client bound to `lo`.
fn owners(local: SocketAddr, peer: SocketAddr) -> io::Result<Vec<u32>> {
    let (local, peer) = (canonical(local), canonical(peer));
    // An IPv4 connection may be an IPv6 socket's, on v4-mapped addresses: both families.
    let families: &[libc::c_int] = match peer.ip() {
        IpAddr::V4(_) => &[libc::AF_INET, libc::AF_INET6],
        IpAddr::V6(_) => &[libc::AF_INET6],
    };
    let mut filter = condition(INET_DIAG_BC_S_COND, peer, 0);
    let rest = filter.len();
    filter.extend(condition(INET_DIAG_BC_D_COND, local, rest));
    let mut owners = Vec::new();
    for &family in families {
        let protocol = (family as u8, libc::IPPROTO_TCP as u8);
        let any = [0; SOCKID_LEN];
        dump(
            &mut diag_socket()?,
            protocol,
            CLIENT_STATES,
            &any,
            &filter,
            |message| {
                let uid = message.get(UID_OFFSET..UID_OFFSET + 4);
                owners.push(uid.map(|uid| u32::from_ne_bytes([uid[0], uid[1], uid[2], uid[3]])));
            },
        )?;
    }
    owners
        .into_iter()
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| io::Error::other("a short inet_diag_msg"))
}

/// One `inet_diag_bc_op` and its `inet_diag_hostcond`: `code` (the socket's local or remote
/// end) is `addr`, address and port. Its "yes" goes on to what follows; its "no" jumps past
/// the end of a filter of two such conditions, `before` bytes of which precede it.
fn condition(code: u8, addr: SocketAddr, before: usize) -> Vec<u8> {
    let (family, address) = match addr.ip() {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let length = 4 + 8 + address.len();
    // Past both conditions: their whole length (twice this one's, same family), less what
    // precedes this one, plus 4.
    let reject = 2 * length - before + 4;
    let mut op = vec![code, length as u8];
    op.extend_from_slice(&(reject as u16).to_ne_bytes());
    op.extend_from_slice(&[family, (address.len() * 8) as u8, 0, 0]);
    op.extend_from_slice(&i32::from(addr.port()).to_ne_bytes());
    op.extend_from_slice(&address);
    op
}

/// `addr` with a v4-mapped IPv6 address as the IPv4 one it maps.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    use super::*;

    fn mapped_v4(addr: SocketAddr) -> SocketAddr {
        let IpAddr::V4(v4) = addr.ip() else {
            return addr;
        };
        SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port())
    }

    /// The kernel names this process's user as the owner of its own connected socket: over
    /// IPv4, bound to `lo` (which the kernel's lookup of one socket missed), over IPv6 to a
    /// v4-mapped address of either kind of listener; and no one for a peer of no socket here,
    /// refused if its address is this host's.
    #[tokio::test]
    async fn the_owner_of_a_local_client_socket_is_its_user() {
        // SAFETY: as above.
        let me = unsafe { libc::geteuid() };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let _client = TcpStream::connect(local).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(owners(local, peer).unwrap(), [me]);

        let bound = TcpSocket::new_v4().unwrap();
        socket2::SockRef::from(&bound)
            .bind_device(Some(b"lo"))
            .unwrap();
        let _bound = bound.connect(local).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(owners(local, peer).unwrap(), [me]);

        // An IPv6 socket of this host connected to an IPv4 listener, as the listener sees it.
        let _v6_client = TcpSocket::new_v6()
            .unwrap()
            .connect(mapped_v4(local))
            .await
            .unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert!(peer.is_ipv4(), "{peer}");
        assert_eq!(owners(local, peer).unwrap(), [me]);

        let listener6 = TcpListener::bind("[::]:0").await.unwrap();
        let port = listener6.local_addr().unwrap().port();
        let mapped = mapped_v4(SocketAddr::from(([127, 0, 0, 1], port)));
        let _client = TcpStream::connect(mapped).await.unwrap();
        let (_accepted, peer) = listener6.accept().await.unwrap();
        assert_eq!(owners(mapped, peer).unwrap(), [me]);

        // No socket here: from this host's own address, a NAT in between, refused; from
        // another host's, allowed.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(owners(local, nobody).unwrap(), []);
        assert!(may_read_names(local, nobody).is_err());
        let remote: SocketAddr = "198.51.100.1:1".parse().unwrap();
        assert_eq!(may_read_names(local, remote), Ok(()));
    }
}
