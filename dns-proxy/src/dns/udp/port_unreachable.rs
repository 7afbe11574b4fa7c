//! The ICMP error a client would have had from a closed server: port unreachable, about its
//! own query, from the block address it sent to. Its connected socket then reads
//! `ECONNREFUSED`, as asking the server directly, and its resolver moves on to the next
//! nameserver at once. c-ares (Node.js, which takes every answer's RCODE as final) fails a
//! lookup on the REFUSED the agent answers otherwise; an unconnected socket ignores the error,
//! as the kernel does for it, and still gets that REFUSED. It needs a raw socket
//! (`CAP_NET_RAW`): without one, clients get the REFUSED alone.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
};

use super::{LOG, mmsg};
use crate::ebpf::OwnSockets;

/// How much of the query the error carries back: enough for its header and question, as
/// the kernel's own errors carry far more than the 8 bytes RFC 792 asks.
const QUERY_QUOTED: usize = 64;
/// ICMP destination unreachable, port unreachable; ICMPv6 the same.
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;
const ICMPV6_UNREACHABLE: u8 = 1;
const ICMPV6_PORT_UNREACHABLE: u8 = 4;
const IPPROTO_UDP: u8 = 17;

/// Raw ICMP sockets of each family, where the agent may open them.
#[derive(Debug, Default)]
pub struct PortUnreachable {
    v4: Option<socket2::Socket>,
    v6: Option<socket2::Socket>,
}

impl PortUnreachable {
    /// Opens the raw sockets (marked as the agent's own); a family that cannot have one (no
    /// `CAP_NET_RAW`, no IPv6) goes without, said once in the log.
    pub fn open(own_sockets: &OwnSockets) -> Self {
        let open = |domain, protocol| {
            let socket = socket2::Socket::new(
                domain,
                socket2::Type::RAW.nonblocking().cloexec(),
                Some(protocol),
            )?;
            // Nothing is read from them: no receive buffer to fill with the namespace's ICMP.
            socket.set_recv_buffer_size(0)?;
            // The error comes from the block address the client sent to, which no interface
            // has where it is only routed (IPv6 always): without this, EINVAL.
            mmsg::send_from_any_address(socket.as_fd(), domain == socket2::Domain::IPV6)?;
            own_sockets.mark(&socket);
            Ok::<_, io::Error>(socket)
        };
        let v4 = open(socket2::Domain::IPV4, socket2::Protocol::ICMPV4);
        let v6 = open(socket2::Domain::IPV6, socket2::Protocol::ICMPV6);
        if let Err(err) = &v4 {
            log::info!(
                target: LOG,
                "no raw ICMP socket ({err}; the agent lacks CAP_NET_RAW?): a client of a \
                 server whose port is closed is answered REFUSED, and does not read \
                 ECONNREFUSED as asking it directly"
            );
        }
        Self {
            v4: v4.ok(),
            v6: v6.ok(),
        }
    }

    /// Whether a client that reached `reached` can be told (a raw socket of its family).
    pub fn can_tell(&self, reached: SocketAddr) -> bool {
        match reached.ip() {
            IpAddr::V4(_) => self.v4.is_some(),
            IpAddr::V6(_) => self.v6.is_some(),
        }
    }

    /// Tells `client` that its query `query` to `reached` (a block address on the proxy's
    /// port) met a closed port; `client_id`: the ID the client chose, where `query` went up
    /// with one of the agent's own, which the client must not see. Best effort: a failed send
    /// is logged at debug level.
    pub fn send(
        &self,
        client: SocketAddr,
        reached: SocketAddr,
        query: &[u8],
        client_id: Option<u16>,
    ) {
        let quoted = &quoted(query, client_id);
        let (socket, message) = match (client.ip(), reached.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                (&self.v4, icmp4(client, reached, query.len(), quoted))
            }
            (IpAddr::V6(_), IpAddr::V6(_)) => {
                (&self.v6, icmp6(client, reached, query.len(), quoted))
            }
            _ => return,
        };
        let Some(socket) = socket else {
            return;
        };
        mmsg::send_all(
            socket.as_fd(),
            1,
            |_| mmsg::Outgoing {
                datagram: &message,
                // A raw socket takes no port (IPv6: 0 or its protocol).
                to: Some(SocketAddr::new(client.ip(), 0)),
                from: Some(reached.ip()),
            },
            |_, err| log::debug!(target: LOG, "port unreachable to {client}: {err}"),
        );
    }
}

/// The first bytes of the client's query, as it sent them: with its own ID.
fn quoted(query: &[u8], client_id: Option<u16>) -> Vec<u8> {
    let mut quoted = query[..query.len().min(QUERY_QUOTED)].to_vec();
    if let (Some(id), Some(head)) = (client_id, quoted.get_mut(..2)) {
        head.copy_from_slice(&id.to_be_bytes());
    }
    quoted
}

/// The UDP header of the client's datagram: its ports, its length, no checksum.
fn udp_header(client: SocketAddr, reached: SocketAddr, query_len: usize) -> [u8; 8] {
    let mut header = [0; 8];
    header[..2].copy_from_slice(&client.port().to_be_bytes());
    header[2..4].copy_from_slice(&reached.port().to_be_bytes());
    let length = u16::try_from(8 + query_len).unwrap_or(u16::MAX);
    header[4..6].copy_from_slice(&length.to_be_bytes());
    header
}

/// ICMP port unreachable about the client's IPv4 datagram of `query_len` bytes of DNS: the
/// datagram's IP and UDP headers and its first bytes (`quoted`), checksummed.
fn icmp4(client: SocketAddr, reached: SocketAddr, query_len: usize, quoted: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(source), IpAddr::V4(destination)) = (client.ip(), reached.ip()) else {
        unreachable!("IPv4 addresses only");
    };
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    let total = u16::try_from(20 + 8 + query_len).unwrap_or(u16::MAX);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&destination.octets());
    let checksum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut message = vec![ICMP_UNREACHABLE, ICMP_PORT_UNREACHABLE, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&ip);
    message.extend_from_slice(&udp_header(client, reached, query_len));
    message.extend_from_slice(quoted);
    let checksum = internet_checksum(&message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    message
}

/// ICMPv6 port unreachable about the client's IPv6 datagram (the kernel checksums it).
fn icmp6(client: SocketAddr, reached: SocketAddr, query_len: usize, quoted: &[u8]) -> Vec<u8> {
    let (IpAddr::V6(source), IpAddr::V6(destination)) = (client.ip(), reached.ip()) else {
        unreachable!("IPv6 addresses only");
    };
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    let payload = u16::try_from(8 + query_len).unwrap_or(u16::MAX);
    ip[4..6].copy_from_slice(&payload.to_be_bytes());
    ip[6] = IPPROTO_UDP;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&source.octets());
    ip[24..40].copy_from_slice(&destination.octets());
    let mut message = vec![
        ICMPV6_UNREACHABLE,
        ICMPV6_PORT_UNREACHABLE,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    message.extend_from_slice(&ip);
    message.extend_from_slice(&udp_header(client, reached, query_len));
    message.extend_from_slice(quoted);
    message
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_quotes_the_clients_datagram_and_checks_out() {
        let client: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let reached: SocketAddr = "169.254.53.7:53".parse().unwrap();
        let query = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        let message = icmp4(client, reached, query.len(), &query);
        assert_eq!(&message[..2], [3, 3]);
        // The whole message, and the quoted IP header, sum to zero with their checksums.
        assert_eq!(internet_checksum(&message), 0);
        assert_eq!(internet_checksum(&message[8..28]), 0);
        assert_eq!(&message[8 + 12..8 + 16], [10, 0, 0, 2]);
        assert_eq!(&message[8 + 16..8 + 20], [169, 254, 53, 7]);
        // The UDP header: the client's port, the proxy's, the length.
        assert_eq!(&message[28..34], [0x9c, 0x40, 0, 53, 0, 27]);
        assert_eq!(&message[36..], query);
        let client6: SocketAddr = "[fd00::2]:40000".parse().unwrap();
        let reached6: SocketAddr = "[fd53:6e73:6470::7]:53".parse().unwrap();
        let message = icmp6(client6, reached6, 100, &query);
        assert_eq!(&message[..2], [1, 4]);
        assert_eq!(&message[8 + 4..8 + 8], [0, 108, 17, 64]);
        assert_eq!(message.len(), 8 + 40 + 8 + query.len());
    }

    /// A query that went up with an ID of the agent's own is quoted with the client's.
    #[test]
    fn the_error_quotes_the_clients_own_id() {
        let sent = [0x99, 0x2e, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(quoted(&sent, Some(0xabcd))[..4], [0xab, 0xcd, 1, 0]);
        assert_eq!(quoted(&sent, None), sent);
        assert_eq!(quoted(&[0u8; 100], None).len(), QUERY_QUOTED);
    }
}
