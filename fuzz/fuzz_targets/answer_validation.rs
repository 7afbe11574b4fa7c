//! Answer validation: the proxy relays an upstream datagram only if it is a response with the
//! query's ID and, if it has a question, the query's question letter case aside
//! (`wire::response_id`, `wire::question` and `wire::hash_question`, compared under the
//! pending query's key). For any (query, answer) pair that passes, a DNS parser must see the
//! answer as a response with the same ID and either no question or the same name (case
//! aside), type and class. No input may panic.
#![no_main]

use dns_proxy::dns::wire;
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (query, answer) = input;
    if !wire::is_query(query) {
        return;
    }
    let key = |question: &[u8]| {
        let mut hasher = std::hash::DefaultHasher::new();
        wire::hash_question(question, &mut hasher);
        std::hash::Hasher::finish(&hasher)
    };
    let accepted = wire::response_id(answer) == wire::message_id(query)
        && match (wire::question(query), wire::question(answer)) {
            (_, Some([])) => true,
            (Some(asked), Some(answered)) => key(asked) == key(answered),
            _ => false,
        };
    if !accepted {
        return;
    }
    let (Ok(query), Ok(answer)) = (Message::from_vec(query), Message::from_vec(answer)) else {
        return; // relayed byte for byte; the client's parser decides
    };
    assert_eq!(answer.message_type(), MessageType::Response);
    assert_eq!(answer.id(), query.id());
    let (asked, answered) = (query.queries(), answer.queries());
    if answered.is_empty() {
        return; // no question: matched on ID (and, in the proxy, socket and server)
    }
    assert_eq!(asked.len(), answered.len());
    for (asked, answered) in asked.iter().zip(answered) {
        // Equal names but for letter case, equal type and class.
        assert_eq!(
            asked.name().to_ascii().to_ascii_lowercase(),
            answered.name().to_ascii().to_ascii_lowercase()
        );
        assert_eq!(asked.query_type(), answered.query_type());
        assert_eq!(asked.query_class(), answered.query_class());
    }
});
