//! The answers the tests' own DNS servers (test-upstream, bad-upstream) write, and what the
//! test clients read of them.
use std::net::Ipv4Addr;

/// What to answer a query with.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// One A record (TTL 60) for the name asked.
    A(Ipv4Addr),
    /// RCODE SERVFAIL, no records.
    ServFail,
}

/// The offset just past the first question, if the message has a well-formed one.
fn question_end(message: &[u8]) -> Option<usize> {
    let mut offset = 12;
    loop {
        let len = usize::from(*message.get(offset)?);
        offset += 1;
        match len {
            0 => break,
            1..=63 => offset += len,
            _ => return None,
        }
    }
    let end = offset + 4;
    (end <= message.len()).then_some(end)
}

/// The answer to `query`, written into `out` (cleared first); false if it is not a query with
/// one question.
pub fn write_answer(query: &[u8], reply: Reply, out: &mut Vec<u8>) -> bool {
    out.clear();
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return false;
    }
    let Some(end) = question_end(query) else {
        return false;
    };
    out.extend_from_slice(&query[..2]);
    // QR, opcode QUERY, RD copied; RA and the RCODE; one question, and the answer count.
    let (rcode, answers) = match reply {
        Reply::A(_) => (0, 1),
        Reply::ServFail => (2, 0),
    };
    out.extend_from_slice(&[0x80 | (query[2] & 0x01), 0x80 | rcode, 0, 1, 0, answers]);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    if let Reply::A(address) = reply {
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&address.octets());
    }
    true
}

/// The address of an answer's one A record: without EDNS the test servers' answers end with
/// that record's RDATA. `None` unless it has exactly one answer record.
pub fn single_a_record(answer: &[u8]) -> Option<Ipv4Addr> {
    let ancount = u16::from_be_bytes([*answer.get(6)?, *answer.get(7)?]);
    let tail: [u8; 4] = answer
        .get(answer.len().checked_sub(4)?..)?
        .try_into()
        .ok()?;
    (ancount == 1).then(|| Ipv4Addr::from(tail))
}

/// Reads one length-prefixed DNS message from a TCP stream (RFC 1035 §4.2.2); `None` at its
/// end, or on an error.
pub fn read_tcp_message(stream: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).ok()?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut message).ok()?;
    Some(message)
}
