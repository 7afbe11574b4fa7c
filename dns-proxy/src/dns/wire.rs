//! The little of the DNS wire format the proxy needs to look at. Messages are relayed byte for
//! byte; nothing here rebuilds one.
use std::ops::Range;

use hickory_proto::op::{Message, ResponseCode};

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

/// The type of EDNS's pseudo-record (RFC 6891).
pub(crate) const TYPE_OPT: u16 = 41;

/// edns-tcp-keepalive (RFC 7828): how long a server lets a client's TCP connection idle.
const OPTION_TCP_KEEPALIVE: u16 = 11;

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

/// DNS Stateful Operations (RFC 8490).
const OPCODE_DSO: u8 = 6;

/// DSO's Keepalive TLV (RFC 8490 §7.1): inactivity timeout, then keepalive interval, in ms.
const DSO_KEEPALIVE: u16 = 1;

fn is_dso(message: &[u8]) -> bool {
    message.len() >= HEADER_LEN && (message[2] >> 3) & 0x0f == OPCODE_DSO
}

/// A DSO message a server sends of its own accord (RFC 8490 §5.4): a request (QR clear),
/// which answers no query of the client's, and which the client may have to answer.
pub fn is_dso_request(message: &[u8]) -> bool {
    is_dso(message) && !is_response(message)
}

/// A client's response to its server's DSO request: the QR bit set, opcode DSO, no records
/// (RFC 8490 §5.4: the four counts are zero, TLVs follow the header).
pub fn is_dso_response(message: &[u8]) -> bool {
    is_dso(message) && is_response(message) && message[4..HEADER_LEN].iter().all(|&b| b == 0)
}

/// A full header with the QR bit clear: a query, though perhaps not one worth forwarding.
pub fn has_query_header(message: &[u8]) -> bool {
    message.len() >= HEADER_LEN && !is_response(message)
}

/// FORMERR to `query` (one with [`has_query_header`]): its header with QR set and RCODE 1
/// (opcode, RD and CD kept) and no records, what a server answers to a question it cannot
/// parse (RFC 1035 §4.1.1). Never larger than the query.
pub fn format_error(query: &[u8]) -> Option<Vec<u8>> {
    if !has_query_header(query) {
        return None;
    }
    let mut answer = query[..HEADER_LEN].to_vec();
    answer[2] = 0x80 | (query[2] & 0x79);
    answer[3] = (query[3] & 0x10) | 1;
    answer[4..].fill(0);
    Some(answer)
}

/// A message worth forwarding as a query: a full header with the QR bit clear, and at most one
/// question (what every resolver sends; none at all is legal, e.g. for cookie refreshes) that
/// lies within the message. Anything else is not DNS, or not something a server would answer.
pub fn is_query(message: &[u8]) -> bool {
    if message.len() < HEADER_LEN || is_response(message) {
        return false;
    }
    match u16::from_be_bytes([message[4], message[5]]) {
        0 => true,
        1 => question_end(message, HEADER_LEN).is_some(),
        _ => false,
    }
}

/// The longest name's labels, in bytes (RFC 1035 2.3.4).
const MAX_NAME_LEN: usize = 255;

/// The offset just past the question at `offset`: a name (labels of at most 63 bytes, ending
/// with the root, 255 bytes at most), then type and class.
///
/// No compression pointer: before the first question there is only the header, so a pointer
/// there names header bytes or loops, and no resolver sends one. Were it allowed, two
/// questions of equal bytes could name different things (a pointer into headers that differ),
/// and the answer check, which compares bytes, would compare nothing.
fn question_end(message: &[u8], mut offset: usize) -> Option<usize> {
    let start = offset;
    loop {
        let len = usize::from(*message.get(offset)?);
        match len {
            0 => {
                offset += 1;
                break;
            }
            1..=63 => offset += 1 + len,
            // Pointers (0xc0), and the obsolete or unassigned 0x40 and 0x80 label types.
            _ => return None,
        }
        if offset - start > MAX_NAME_LEN {
            return None;
        }
    }
    let end = offset + 4;
    (end <= message.len()).then_some(end)
}

/// The question section of a message with at most one question (empty for none), as bytes:
/// what the answer check compares ([`hash_question`]).
pub fn question(message: &[u8]) -> Option<&[u8]> {
    if message.len() < HEADER_LEN {
        return None;
    }
    match u16::from_be_bytes([message[4], message[5]]) {
        0 => Some(&[]),
        1 => message.get(HEADER_LEN..question_end(message, HEADER_LEN)?),
        _ => None,
    }
}

/// Feeds what the answer check compares of a question to `hasher`: its name with ASCII
/// letters in lower case (names compare case-insensitively, RFC 4343; whether the case it
/// sent must come back is the client's to check, as 0x20 randomisation does), then its type
/// and class as they are. `question` is what [`question`] returns for a message with one.
pub fn hash_question(question: &[u8], hasher: &mut impl std::hash::Hasher) {
    let name_len = question.len().saturating_sub(4);
    // Label length bytes are at most 63, below every ASCII letter: only letters change.
    // Lowered into a copy and fed in one write: a write per byte costs a hasher round each.
    // `question` lets a name's labels reach 255 bytes, then the root's.
    let mut lowered = [0u8; MAX_NAME_LEN + 1];
    let Some(copy) = lowered.get_mut(..name_len) else {
        // Longer than any name `question` returns: compare it as it is.
        debug_assert!(false, "a question name of {name_len} bytes");
        hasher.write(question);
        return;
    };
    copy.copy_from_slice(&question[..name_len]);
    copy.make_ascii_lowercase();
    hasher.write(copy);
    hasher.write(&question[name_len..]);
}

/// The ID of a message that is a response (a full header with QR set).
pub fn response_id(message: &[u8]) -> Option<u16> {
    message_id(message).filter(|_| is_response(message))
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

/// The 4-bit RCODE in a message's header (the extended bits live in an OPT record).
pub fn header_rcode(message: &[u8]) -> Option<u8> {
    let header = message.get(..HEADER_LEN)?;
    Some(header[3] & 0x0f)
}

/// The response code of an answer (extended RCODE included), for logs.
pub fn describe_rcode(message: &[u8]) -> String {
    match (Message::from_vec(message), header_rcode(message)) {
        (Ok(message), _) => format!("{:?}", message.response_code()),
        // The header's RCODE still says what the server meant (a FORMERR echoing a question
        // cut short, say).
        (Err(_), Some(rcode)) => format!("{:?} (unparsable)", ResponseCode::from(0, rcode)),
        (Err(_), None) => "? (unparsable)".to_owned(),
    }
}

/// A big-endian 16-bit field at `at` in `message`.
pub(crate) fn count(message: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *message.get(at)?,
        *message.get(at + 1)?,
    ]))
}

/// A resource record's fixed fields, as found at some offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    pub(crate) rtype: u16,
    pub(crate) class: u16,
    pub(crate) ttl: u32,
    pub(crate) ttl_offset: usize,
    pub(crate) rdata_start: usize,
    pub(crate) rdata_end: usize,
}

/// Walks a message, every read bounds-checked.
pub(crate) struct Reader<'a> {
    message: &'a [u8],
    pub(crate) offset: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(message: &'a [u8], offset: usize) -> Self {
        Self { message, offset }
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let value = count(self.message, self.offset)?;
        self.offset += 2;
        Some(value)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let bytes = self.message.get(self.offset..self.offset + 4)?;
        self.offset += 4;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }

    /// A name without compression (a question's), ASCII letters in lower case.
    pub(crate) fn plain_name(&mut self) -> Option<Box<[u8]>> {
        let start = self.offset;
        loop {
            let len = usize::from(*self.message.get(self.offset)?);
            match len {
                0 => {
                    self.offset += 1;
                    break;
                }
                1..=63 => self.offset += 1 + len,
                _ => return None,
            }
            if self.offset - start > 255 {
                return None;
            }
        }
        let name = self.message.get(start..self.offset)?;
        Some(name.to_ascii_lowercase().into())
    }

    /// Steps over a name, compressed or not (a pointer ends it).
    pub(crate) fn skip_name(&mut self) -> Option<()> {
        let start = self.offset;
        loop {
            let len = *self.message.get(self.offset)?;
            match len {
                0 => {
                    self.offset += 1;
                    return Some(());
                }
                1..=63 => self.offset += 1 + usize::from(len),
                0xc0..=0xff => {
                    self.message.get(self.offset + 1)?;
                    self.offset += 2;
                    return Some(());
                }
                _ => return None,
            }
            if self.offset - start > 255 {
                return None;
            }
        }
    }

    pub(crate) fn record(&mut self) -> Option<Record> {
        self.skip_name()?;
        let rtype = self.u16()?;
        let class = self.u16()?;
        let ttl_offset = self.offset;
        let ttl = self.u32()?;
        let rdlength = usize::from(self.u16()?);
        let rdata_start = self.offset;
        let rdata_end = rdata_start + rdlength;
        if rdata_end > self.message.len() {
            return None;
        }
        self.offset = rdata_end;
        Some(Record {
            rtype,
            class,
            ttl,
            ttl_offset,
            rdata_start,
            rdata_end,
        })
    }
}

/// Whether the name at `offset` of `message` can be read whole: its compression pointers each
/// point before the labels that led to them (to a prior occurrence, RFC 1035 §4.1.4), so
/// following them ends, and it is at most 255 bytes long. A client that follows a pointer
/// loop fails on the answer, or never ends.
pub(crate) fn name_is_sound(message: &[u8], offset: usize) -> bool {
    let (mut at, mut segment_start, mut length) = (offset, offset, 0usize);
    loop {
        let Some(&len) = message.get(at) else {
            return false;
        };
        match len {
            0 => return length < 255,
            1..=63 => {
                at += 1 + usize::from(len);
                length += 1 + usize::from(len);
            }
            0xc0..=0xff => {
                let Some(&low) = message.get(at + 1) else {
                    return false;
                };
                let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                if target >= segment_start {
                    return false;
                }
                (at, segment_start) = (target, target);
            }
            _ => return false,
        }
        if length >= 255 {
            return false;
        }
    }
}

/// The name at `offset` of `message`, compression pointers followed, in wire form with ASCII
/// letters in lower case; `None` unless it is [sound](name_is_sound).
pub(crate) fn name_at(message: &[u8], offset: usize) -> Option<Vec<u8>> {
    if !name_is_sound(message, offset) {
        return None;
    }
    let mut name = Vec::new();
    let mut at = offset;
    loop {
        let len = *message.get(at)?;
        match len {
            0 => {
                name.push(0);
                return Some(name);
            }
            1..=63 => {
                let label = message.get(at..at + 1 + usize::from(len))?;
                name.extend(label.iter().map(u8::to_ascii_lowercase));
                at += 1 + usize::from(len);
            }
            _ => at = usize::from(len & 0x3f) << 8 | usize::from(*message.get(at + 1)?),
        }
    }
}

/// The records of `message` after its questions (its answer, authority and additional
/// sections), each with the offset it starts at; an item is `None` where a record does not
/// parse, and the walk should stop there.
pub(crate) fn records(
    message: &[u8],
) -> Option<impl Iterator<Item = Option<(usize, Record)>> + '_> {
    let mut reader = Reader::new(message, HEADER_LEN);
    for _ in 0..count(message, 4)? {
        reader.skip_name()?;
        reader.offset += 4;
    }
    let total = u32::from(count(message, 6)?)
        + u32::from(count(message, 8)?)
        + u32::from(count(message, 10)?);
    Some((0..total).map(move |_| {
        let start = reader.offset;
        Some((start, reader.record()?))
    }))
}

/// Where the answer's OPT record lies, start and end, if it has one.
pub(crate) fn find_opt(answer: &[u8]) -> Option<(usize, usize)> {
    for record in records(answer)? {
        let (start, record) = record?;
        if record.rtype == TYPE_OPT {
            return Some((start, record.rdata_end));
        }
    }
    None
}

/// The data of option `code` in an OPT record, if it has one; `None` if the record's options
/// are malformed.
pub(crate) fn option<'a>(message: &'a [u8], opt: &Record, code: u16) -> Option<Option<&'a [u8]>> {
    let found = options(message, opt)?
        .into_iter()
        .find(|(option, _)| *option == code);
    Some(found.map(|(_, at)| &message[at.start + 4..at.end]))
}

/// The options of an OPT record, in order: each one's code and where it lies (its code and
/// length included); `None` if they are malformed.
pub(crate) fn options(message: &[u8], opt: &Record) -> Option<Vec<(u16, Range<usize>)>> {
    let mut found = Vec::new();
    let mut reader = Reader::new(message, opt.rdata_start);
    while reader.offset < opt.rdata_end {
        let start = reader.offset;
        let code = reader.u16()?;
        let len = usize::from(reader.u16()?);
        reader.offset += len;
        if reader.offset > opt.rdata_end {
            return None;
        }
        found.push((code, start..reader.offset));
    }
    Some(found)
}

/// The idle timeout an answer's edns-tcp-keepalive option (RFC 7828) gives, in units of
/// 100 ms, if it has one.
pub fn tcp_keepalive(answer: &[u8]) -> Option<u16> {
    let timeout = edns_option(answer, OPTION_TCP_KEEPALIVE)?;
    Some(u16::from_be_bytes(timeout.try_into().ok()?))
}

/// Whether a query asks for edns-tcp-keepalive (RFC 7828), or starts a DSO session (RFC 8490,
/// whose every message may carry a Keepalive TLV): only then may its server's answer give an
/// idle timeout.
pub fn asks_tcp_keepalive(query: &[u8]) -> bool {
    is_dso(query) || edns_option(query, OPTION_TCP_KEEPALIVE).is_some()
}

/// The idle timeout a DSO message's Keepalive TLV gives, in units of 100 ms (rounded up, at
/// most `u16::MAX`), if it has one.
pub fn dso_keepalive(message: &[u8]) -> Option<u16> {
    if !is_dso(message) {
        return None;
    }
    let mut reader = Reader::new(message, HEADER_LEN);
    loop {
        let kind = reader.u16()?;
        let length = usize::from(reader.u16()?);
        let data = message.get(reader.offset..reader.offset + length)?;
        reader.offset += length;
        if kind == DSO_KEEPALIVE {
            let inactivity = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
            return Some(u16::try_from(inactivity.div_ceil(100)).unwrap_or(u16::MAX));
        }
    }
}

/// The data of option `code` in `message`'s OPT record, if it has both.
fn edns_option(message: &[u8], code: u16) -> Option<&[u8]> {
    let (opt_start, _) = find_opt(message)?;
    let opt = Reader::new(message, opt_start).record()?;
    option(message, &opt, code)?
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
        assert_eq!(response_id(&q), None);

        let a = answer(0xbeef, ResponseCode::NXDomain);
        assert!(!is_query(&a));
        assert_eq!(response_id(&a), Some(0xbeef));
    }

    #[test]
    fn a_format_error_answers_the_query_header_a_client_checks_and_nothing_else() {
        let mut two_questions = query(0xbeef);
        two_questions[5] = 2;
        two_questions[2] |= 0x10 | 0x01; // opcode 2 (STATUS), RD
        two_questions[3] |= 0x10; // CD
        let formerr = format_error(&two_questions).expect("a header to answer");
        assert_eq!(formerr.len(), HEADER_LEN);
        let parsed = Message::from_vec(&formerr).expect("a message a client can read");
        assert_eq!(parsed.id(), 0xbeef);
        assert_eq!(parsed.message_type(), MessageType::Response);
        assert_eq!(parsed.response_code(), ResponseCode::FormErr);
        assert_eq!(u8::from(parsed.op_code()), 2);
        assert!(parsed.recursion_desired() && parsed.checking_disabled());
        assert!(!parsed.authoritative() && !parsed.truncated());
        assert!(parsed.queries().is_empty() && parsed.answers().is_empty());
        // An answer, or less than a header, gets none: no server answers those.
        assert_eq!(format_error(&answer(1, ResponseCode::NoError)), None);
        assert_eq!(format_error(&two_questions[..HEADER_LEN - 1]), None);
    }

    #[test]
    fn the_question_check_ignores_case_up_to_the_longest_name() {
        // The longest name `question` takes: 255 bytes of labels with their lengths (three
        // of 63 letters, one of 62), then the root.
        let message = |letter: u8| {
            let mut message = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            for len in [63, 63, 63, 62] {
                message.push(len);
                message.extend(std::iter::repeat_n(letter, usize::from(len)));
            }
            message.extend_from_slice(&[0, 0, 1, 0, 1]);
            message
        };
        let hash = |message: &[u8]| {
            let question = question(message).expect("a question");
            let mut hasher = std::hash::DefaultHasher::new();
            hash_question(question, &mut hasher);
            std::hash::Hasher::finish(&hasher)
        };
        let (lower, upper) = (message(b'a'), message(b'A'));
        assert_eq!(question(&lower).unwrap().len(), 256 + 4);
        assert_eq!(hash(&lower), hash(&upper));
        assert_ne!(hash(&lower), hash(&message(b'b')));
    }

    #[test]
    fn a_query_must_have_one_well_formed_question_at_most() {
        let good = query(7);
        // Type and class cut off; a label that runs past the end.
        assert!(!is_query(&good[..good.len() - 1]));
        assert!(!is_query(&good[..HEADER_LEN + 3]));
        // Two questions claimed.
        let mut two = good.clone();
        two[5] = 2;
        assert!(!is_query(&two));
        // A label longer than 63 bytes.
        let mut long = good[..HEADER_LEN].to_vec();
        long.push(64);
        long.extend_from_slice(&[b'a'; 64]);
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(!is_query(&long));
        // A name longer than 255 bytes, in legal labels.
        let mut huge = good[..HEADER_LEN].to_vec();
        for _ in 0..5 {
            huge.push(63);
            huge.extend_from_slice(&[b'a'; 63]);
        }
        huge.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(!is_query(&huge));
        // A compression pointer: it could only name header bytes, or loop.
        let mut pointer = good[..HEADER_LEN].to_vec();
        pointer.extend_from_slice(&[0xc0, 2, 0, 1, 0, 1]);
        assert!(!is_query(&pointer));
        assert_eq!(question(&pointer), None);
        // No question at all (a cookie refresh, say) is legal.
        let mut none = good[..HEADER_LEN].to_vec();
        none[5] = 0;
        assert!(is_query(&none));
    }

    #[test]
    fn the_question_section_is_the_bytes_after_the_header() {
        let q = query(9);
        assert_eq!(question(&q), Some(&q[HEADER_LEN..]));
        let a = answer(9, ResponseCode::NoError);
        assert_eq!(question(&a), question(&q));
        let mut none = q[..HEADER_LEN].to_vec();
        none[5] = 0;
        assert_eq!(question(&none), Some(&[][..]));
        assert_eq!(question(&q[..q.len() - 1]), None);
        assert_eq!(question(&q[..5]), None);
    }

    #[test]
    fn short_datagrams_are_neither() {
        for len in 0..HEADER_LEN {
            let bytes = vec![0u8; len];
            assert!(!is_query(&bytes));
            assert_eq!(response_id(&bytes), None);
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
        // A FORMERR that echoes a question cut short: its header still says FORMERR.
        let mut formerr = query(1);
        formerr[2] |= 0x80;
        formerr[3] = 1;
        formerr.truncate(formerr.len() - 1);
        assert_eq!(describe_rcode(&formerr), "FormErr (unparsable)");
        assert_eq!(describe_rcode(&formerr[..5]), "? (unparsable)");
    }

    #[test]
    fn a_dso_keepalive_is_read_after_other_tlvs_and_never_past_the_end() {
        let header = |flags: u8| [0, 9, flags, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let request = header(6 << 3);
        let mut message = request.to_vec();
        // An unknown TLV, then a Keepalive of 1,234 ms (rounded up to 13 x 100 ms).
        message.extend_from_slice(&[0x12, 0x34, 0, 2, 0xaa, 0xbb, 0, 1, 0, 8]);
        message.extend_from_slice(&1234u32.to_be_bytes());
        message.extend_from_slice(&0u32.to_be_bytes());
        assert!(is_dso_request(&message) && !is_dso_response(&message));
        assert!(asks_tcp_keepalive(&message));
        assert_eq!(dso_keepalive(&message), Some(13));
        for cut in 0..message.len() - 4 {
            assert_eq!(dso_keepalive(&message[..cut]), None, "cut at {cut}");
        }
        // Forever (0xffffffff) saturates.
        let mut forever = request.to_vec();
        forever.extend_from_slice(&[0, 1, 0, 8, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(dso_keepalive(&forever), Some(u16::MAX));
        // A response with records is not DSO's; neither is a plain query.
        let mut response = header(0x80 | 6 << 3).to_vec();
        assert!(is_dso_response(&response));
        response[5] = 1;
        assert!(!is_dso_response(&response));
        assert!(!is_dso_request(&query(1)) && dso_keepalive(&query(1)).is_none());
    }
}
