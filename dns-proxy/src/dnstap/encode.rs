//! The dnstap protobuf (github.com/dnstap/dnstap.pb, dnstap.proto), encoded by hand: we write
//! a dozen fields of two messages, which takes less code than a protobuf toolchain in the
//! build (prost would need protoc or a vendored generated file).
use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{Event, Workload};

// Wire types.
const VARINT: u32 = 0;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `Dnstap.Type.MESSAGE`.
const DNSTAP_MESSAGE: u64 = 1;
/// `SocketFamily`.
const INET: u64 = 1;
const INET6: u64 = 2;

/// Appends the `Dnstap` message for `event` to `out`; `scratch` holds the inner `Message`
/// while its length is not yet known (reused between events to save allocations).
pub(super) fn dnstap(
    event: &Event<'_>,
    identity: &[u8],
    version: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    scratch.clear();
    message(event, scratch);
    if !identity.is_empty() {
        bytes_field(out, 1, identity);
    }
    bytes_field(out, 2, version);
    match event.workload {
        Workload::Unknown => {}
        Workload::Named(name) => bytes_field(out, 3, name.as_bytes()),
        Workload::Cgroup(id) => bytes_field(out, 3, format!("cgroup-id={id}").as_bytes()),
    }
    bytes_field(out, 14, scratch);
    varint_field(out, 15, DNSTAP_MESSAGE);
}

/// `Message`: query_address/port is the client, response_address/port the server the client
/// asked; an IPv4 address beside an IPv6 one is written IPv4-mapped, as INET6 needs.
fn message(event: &Event<'_>, out: &mut Vec<u8>) {
    varint_field(out, 1, event.kind as u64);
    let client = event.client.ip().to_canonical();
    let server = event.server.ip().to_canonical();
    let (client, server) = (v6_octets(client), v6_octets(server));
    // Both IPv4 (mapped here): INET with 4 bytes each; otherwise INET6 with 16.
    let (family, at) = match (
        event.client.ip().to_canonical(),
        event.server.ip().to_canonical(),
    ) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (INET, 12),
        _ => (INET6, 0),
    };
    varint_field(out, 2, family);
    varint_field(out, 3, event.transport as u64);
    bytes_field(out, 4, &client[at..]);
    bytes_field(out, 5, &server[at..]);
    varint_field(out, 6, u64::from(event.client.port()));
    varint_field(out, 7, u64::from(event.server.port()));
    let (sec, nsec) = since_epoch(event.query_time);
    varint_field(out, 8, sec);
    fixed32_field(out, 9, nsec);
    if let Some(query) = event.query {
        bytes_field(out, 10, query);
    }
    if let Some(time) = event.response_time {
        let (sec, nsec) = since_epoch(time);
        varint_field(out, 12, sec);
        fixed32_field(out, 13, nsec);
    }
    if let Some(response) = event.response {
        bytes_field(out, 14, response);
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

/// A clock before 1970 is written as the epoch.
fn since_epoch(time: SystemTime) -> (u64, u32) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_secs(), since.subsec_nanos())
}

fn key(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    varint(out, u64::from(field << 3 | wire_type));
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, VARINT);
    varint(out, value);
}

fn fixed32_field(out: &mut Vec<u8>, field: u32, value: u32) {
    key(out, field, FIXED32);
    out.extend_from_slice(&value.to_le_bytes());
}

fn bytes_field(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    key(out, field, LEN);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// A protobuf reader just big enough for the tests to read back what we wrote.
#[cfg(test)]
pub(super) mod decode {
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Value {
        Varint(u64),
        Fixed32(u32),
        Bytes(Vec<u8>),
    }

    /// The fields of a message in order, or a panic naming what is malformed.
    pub fn fields(mut bytes: &[u8]) -> Vec<(u32, Value)> {
        let mut fields = Vec::new();
        while !bytes.is_empty() {
            let key = varint(&mut bytes);
            let field = u32::try_from(key >> 3).unwrap();
            let value = match key & 7 {
                0 => Value::Varint(varint(&mut bytes)),
                5 => {
                    let (value, rest) = bytes.split_at(4);
                    bytes = rest;
                    Value::Fixed32(u32::from_le_bytes(value.try_into().unwrap()))
                }
                2 => {
                    let len = usize::try_from(varint(&mut bytes)).unwrap();
                    assert!(
                        len <= bytes.len(),
                        "field {field}: {len} bytes past the end"
                    );
                    let (value, rest) = bytes.split_at(len);
                    bytes = rest;
                    Value::Bytes(value.to_vec())
                }
                other => panic!("field {field}: unexpected wire type {other}"),
            };
            fields.push((field, value));
        }
        fields
    }

    /// The one value of `field`; panics if it is missing or repeated.
    pub fn one(fields: &[(u32, Value)], field: u32) -> Value {
        let mut matching = fields.iter().filter(|(number, _)| *number == field);
        let value = matching
            .next()
            .unwrap_or_else(|| panic!("no field {field} in {fields:?}"));
        assert!(matching.next().is_none(), "field {field} repeated");
        value.1.clone()
    }

    pub fn bytes(fields: &[(u32, Value)], field: u32) -> Vec<u8> {
        match one(fields, field) {
            Value::Bytes(bytes) => bytes,
            other => panic!("field {field} is {other:?}, not bytes"),
        }
    }

    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first().expect("varint past the end");
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
        }
        panic!("varint longer than 10 bytes")
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::{
        decode::{Value, bytes, fields, one},
        *,
    };
    use crate::dnstap::{MessageType, Transport};

    fn event() -> Event<'static> {
        Event {
            kind: MessageType::ClientResponse,
            transport: Transport::Udp,
            client: "10.1.2.3:40000".parse().unwrap(),
            server: "192.0.2.53:53".parse().unwrap(),
            query_time: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            query: Some(b"query"),
            response_time: Some(UNIX_EPOCH + Duration::new(1_700_000_001, 5)),
            response: Some(b"response"),
            workload: Workload::Named("unit=x.service"),
        }
    }

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        for (value, expected) in [
            (0, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            varint(&mut out, value);
            assert_eq!(out, expected, "{value}");
        }
    }

    #[test]
    fn a_small_event_encodes_to_known_bytes() {
        let event = Event {
            kind: MessageType::ClientQuery,
            transport: Transport::Tcp,
            client: "1.2.3.4:5".parse().unwrap(),
            server: "6.7.8.9:53".parse().unwrap(),
            query_time: UNIX_EPOCH + Duration::new(300, 1),
            query: None,
            response_time: None,
            response: None,
            workload: Workload::Unknown,
        };
        let mut out = Vec::new();
        dnstap(&event, b"", b"v", &mut Vec::new(), &mut out);
        #[rustfmt::skip]
        let message = [
            0x08, 5,                          // type CLIENT_QUERY
            0x10, 1,                          // socket_family INET
            0x18, 2,                          // socket_protocol TCP
            0x22, 4, 1, 2, 3, 4,              // query_address
            0x2a, 4, 6, 7, 8, 9,              // response_address
            0x30, 5,                          // query_port
            0x38, 53,                         // response_port
            0x40, 0xac, 0x02,                 // query_time_sec 300
            0x4d, 1, 0, 0, 0,                 // query_time_nsec 1 (fixed32)
        ];
        let mut expected = vec![0x12, 1, b'v', 0x72, message.len() as u8];
        expected.extend_from_slice(&message);
        expected.extend_from_slice(&[0x78, 1]); // type MESSAGE
        assert_eq!(out, expected);
    }

    #[test]
    fn every_field_we_fill_reads_back() {
        let mut out = Vec::new();
        dnstap(
            &event(),
            b"node-1",
            b"dns-proxy 0.1.0",
            &mut Vec::new(),
            &mut out,
        );
        let top = fields(&out);
        assert_eq!(bytes(&top, 1), b"node-1");
        assert_eq!(bytes(&top, 2), b"dns-proxy 0.1.0");
        assert_eq!(bytes(&top, 3), b"unit=x.service");
        assert_eq!(one(&top, 15), Value::Varint(1));
        let message = fields(&bytes(&top, 14));
        assert_eq!(one(&message, 1), Value::Varint(6));
        assert_eq!(one(&message, 2), Value::Varint(INET));
        assert_eq!(one(&message, 3), Value::Varint(1));
        assert_eq!(bytes(&message, 4), [10, 1, 2, 3]);
        assert_eq!(bytes(&message, 5), [192, 0, 2, 53]);
        assert_eq!(one(&message, 6), Value::Varint(40000));
        assert_eq!(one(&message, 7), Value::Varint(53));
        assert_eq!(one(&message, 8), Value::Varint(1_700_000_000));
        assert_eq!(one(&message, 9), Value::Fixed32(123_456_789));
        assert_eq!(bytes(&message, 10), b"query");
        assert_eq!(one(&message, 12), Value::Varint(1_700_000_001));
        assert_eq!(one(&message, 13), Value::Fixed32(5));
        assert_eq!(bytes(&message, 14), b"response");
        assert_eq!(message.len(), 13);
    }

    #[test]
    fn mixed_families_are_written_as_inet6_with_ipv4_mapped() {
        let mut event = event();
        event.client = "[2001:db8::1]:4000".parse().unwrap();
        let mut out = Vec::new();
        dnstap(&event, b"", b"v", &mut Vec::new(), &mut out);
        let message = fields(&bytes(&fields(&out), 14));
        assert_eq!(one(&message, 2), Value::Varint(INET6));
        assert_eq!(bytes(&message, 4).len(), 16);
        let server: SocketAddr = "[::ffff:192.0.2.53]:53".parse().unwrap();
        let IpAddr::V6(mapped) = server.ip() else {
            unreachable!()
        };
        assert_eq!(bytes(&message, 5), mapped.octets());

        // An IPv4-mapped client beside an IPv4 server is plain INET.
        event.client = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        out.clear();
        dnstap(&event, b"", b"v", &mut Vec::new(), &mut out);
        let message = fields(&bytes(&fields(&out), 14));
        assert_eq!(one(&message, 2), Value::Varint(INET));
        assert_eq!(bytes(&message, 4), [10, 1, 2, 3]);
    }
}
