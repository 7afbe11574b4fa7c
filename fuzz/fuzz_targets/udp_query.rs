//! The query path (UDP and TCP alike): what the proxy reads of a client's message before it
//! forwards it. No input may panic, and a message the proxy takes for a query must have what
//! forwarding uses (an ID, a question within the message), and be what a DNS parser reads as
//! a query of at most one question.
#![no_main]

use dns_proxy::dns::wire;
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|message: &[u8]| {
    let is_query = wire::is_query(message);
    let id = wire::message_id(message);
    let question = wire::question(message);
    let _ = wire::header_rcode(message);
    let _ = wire::describe_query(message);
    let _ = wire::describe_rcode(message);
    assert!(!(is_query && wire::response_id(message).is_some()));
    if !is_query {
        return;
    }
    assert!(id.is_some(), "a query without an ID");
    let question = question.expect("a query whose question cannot be read");
    assert!(
        question.len() <= 255 + 4 + 1,
        "a question longer than a name can be"
    );
    assert!(message.len() >= wire::HEADER_LEN + question.len());
    assert_eq!(&message[wire::HEADER_LEN..][..question.len()], question);
    // Where a DNS parser reads the whole message, it must agree that it is a query.
    if let Ok(parsed) = Message::from_vec(message) {
        assert_eq!(parsed.message_type(), MessageType::Query);
        assert!(parsed.queries().len() <= 1);
        assert_eq!(parsed.id(), id.unwrap());
    }
});
