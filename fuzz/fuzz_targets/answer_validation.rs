//! Answer validation: the proxy relays an upstream datagram only if it is a response with the
//! query's ID and the very bytes of the query's question (`wire::response_id` and
//! `wire::question`, compared under the pending query's key). For any (query, answer) pair
//! that passes, a DNS parser must see the answer as a response to the same question: the same
//! name (case included), type and class. No input may panic.
#![no_main]

use dns_proxy::dns::wire;
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (query, answer) = input;
    if !wire::is_query(query) {
        return;
    }
    let accepted = wire::response_id(answer) == wire::message_id(query)
        && wire::question(answer).is_some()
        && wire::question(answer) == wire::question(query);
    if !accepted {
        return;
    }
    let (Ok(query), Ok(answer)) = (Message::from_vec(query), Message::from_vec(answer)) else {
        return; // relayed byte for byte; the client's parser decides
    };
    assert_eq!(answer.message_type(), MessageType::Response);
    assert_eq!(answer.id(), query.id());
    let (asked, answered) = (query.queries(), answer.queries());
    assert_eq!(asked.len(), answered.len());
    for (asked, answered) in asked.iter().zip(answered) {
        // Byte-equal questions: equal names, case included, and equal type and class.
        assert_eq!(asked.name().to_ascii(), answered.name().to_ascii());
        assert_eq!(asked.query_type(), answered.query_type());
        assert_eq!(asked.query_class(), answered.query_class());
    }
});
