//! The little of the DNS wire format the proxy needs to look at. Messages are relayed byte for
//! byte; nothing here rebuilds one.
use hickory_proto::op::Message;

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

/// The largest UDP payload (and so the largest DNS message over UDP).
pub const MAX_UDP_MESSAGE: usize = 65_535;

/// The message ID, if `message` is long enough to have a header.
pub fn message_id(message: &[u8]) -> Option<u16> {
    let header = message.get(..HEADER_LEN)?;
    Some(u16::from_be_bytes([header[0], header[1]]))
}

fn is_response(header: &[u8]) -> bool {
    header[2] & 0x80 != 0
}

/// A datagram worth forwarding: a full header with the QR bit clear (a query).
pub fn is_query(message: &[u8]) -> bool {
    message.len() >= HEADER_LEN && !is_response(message)
}

/// A datagram that can be the answer to the query with ID `id`.
pub fn is_response_to(message: &[u8], id: u16) -> bool {
    message.len() >= HEADER_LEN && is_response(message) && message_id(message) == Some(id)
}

/// "name type" of a query's first question, for logs. Parses the message, so call it only when
/// the line will be written.
pub fn describe_query(message: &[u8]) -> String {
    match Message::from_vec(message) {
        Ok(message) => match message.queries().first() {
            Some(query) => format!("name={} type={}", query.name(), query.query_type()),
            None => "name=- type=-".to_owned(),
        },
        Err(_) => "name=? type=? (unparsable)".to_owned(),
    }
}

/// The response code of an answer (extended RCODE included), for logs.
pub fn describe_rcode(message: &[u8]) -> String {
    match Message::from_vec(message) {
        Ok(message) => format!("{:?}", message.response_code()),
        Err(_) => "? (unparsable)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Message, MessageType, Query, ResponseCode},
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(id: u16) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(id).add_query(Query::query(
            Name::from_ascii("example.test.").unwrap(),
            RecordType::AAAA,
        ));
        message.to_vec().unwrap()
    }

    fn answer(id: u16, rcode: ResponseCode) -> Vec<u8> {
        let mut message = Message::new();
        message
            .set_id(id)
            .set_message_type(MessageType::Response)
            .set_response_code(rcode)
            .add_query(Query::query(
                Name::from_ascii("example.test.").unwrap(),
                RecordType::AAAA,
            ));
        message.to_vec().unwrap()
    }

    #[test]
    fn recognises_queries_and_their_answers() {
        let q = query(0xbeef);
        assert!(is_query(&q));
        assert_eq!(message_id(&q), Some(0xbeef));
        assert!(!is_response_to(&q, 0xbeef));

        let a = answer(0xbeef, ResponseCode::NXDomain);
        assert!(!is_query(&a));
        assert!(is_response_to(&a, 0xbeef));
        assert!(!is_response_to(&a, 0xbeee));
    }

    #[test]
    fn short_datagrams_are_neither() {
        for len in 0..HEADER_LEN {
            let bytes = vec![0u8; len];
            assert!(!is_query(&bytes));
            assert!(!is_response_to(&bytes, 0));
            assert_eq!(message_id(&bytes), None);
        }
        // A bare header is a (degenerate) query: forwarded, and the server decides.
        assert!(is_query(&[0u8; HEADER_LEN]));
    }

    #[test]
    fn descriptions_for_logs() {
        assert_eq!(describe_query(&query(1)), "name=example.test. type=AAAA");
        assert_eq!(
            describe_rcode(&answer(1, ResponseCode::NXDomain)),
            "NXDomain"
        );
        assert!(describe_query(b"\x00\x01\x00\x00\x00\x01").contains("unparsable"));
    }
}
