//! Zone transfers over TCP (AXFR, RFC 5936; IXFR, RFC 1995): one query, answered by as many
//! messages as the zone takes, all with the query's ID. The TCP relay follows a transfer to
//! its last message, so a client that half-closes after asking, or a drain, does not end the
//! connection in the middle of one.
//!
//! The end is where a client sees it: a transfer's first record is the zone's SOA (serial S).
//! An AXFR ends with the next SOA. An IXFR's SOAs after the first alternate between the
//! start of a set of deletions (an old serial) and of additions (a newer one), and the
//! transfer ends with S at a deletion's place; an IXFR answered with the whole zone (its
//! second record not an SOA) ends as an AXFR does, with S at that place too. An IXFR whose S
//! is no newer than the serial the client sent (its query's authority section) is answered
//! with that SOA alone: the client is up to date (RFC 1995 §2). "No newer" by RFC 1982's
//! serial arithmetic and by dig's plain comparison both: where they differ, the relay follows. A newer S alone in the first message is only the start of a transfer sent one
//! record a message. An error, or a message that cannot be read, ends it as well.
use super::wire::{self, HEADER_LEN, Reader};

const TYPE_SOA: u16 = 6;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Axfr,
    Ixfr,
}

/// How far the answer to one zone transfer query has come.
#[derive(Debug)]
pub struct Transfer {
    kind: Kind,
    /// An IXFR's: the serial of the SOA in the query's authority section, the version the
    /// client has.
    client_serial: Option<u32>,
    /// The serial of the first record, the SOA the transfer brings the client to.
    serial: Option<u32>,
    /// SOA records seen after the first.
    later_soas: u32,
    messages: u64,
}

impl Transfer {
    /// A transfer to follow, if `query` asks for one.
    pub fn for_query(query: &[u8]) -> Option<Self> {
        let question = wire::question(query)?;
        let qtype = wire::count(question, question.len().checked_sub(4)?)?;
        let kind = match qtype {
            TYPE_AXFR => Kind::Axfr,
            TYPE_IXFR => Kind::Ixfr,
            _ => return None,
        };
        let client_serial = match kind {
            Kind::Ixfr => client_serial(query),
            Kind::Axfr => None,
        };
        Some(Self {
            kind,
            client_serial,
            serial: None,
            later_soas: 0,
            messages: 0,
        })
    }

    /// Whether no message of the answer has come yet.
    pub fn not_begun(&self) -> bool {
        self.messages == 0
    }

    /// Takes the next message of the answer; returns whether it was the last.
    pub fn took(&mut self, message: &[u8]) -> bool {
        self.messages += 1;
        self.follow(message).unwrap_or(true)
    }

    /// `None` if `message` cannot be read, which ends the transfer as far as the relay can tell.
    fn follow(&mut self, message: &[u8]) -> Option<bool> {
        if wire::header_rcode(message)? != 0 {
            return Some(true);
        }
        let answers = wire::count(message, 6)?;
        // A first message with no records: no transfer comes.
        if answers == 0 && self.serial.is_none() {
            return Some(true);
        }
        let mut reader = Reader::new(message, HEADER_LEN);
        for _ in 0..wire::count(message, 4)? {
            reader.skip_name()?;
            reader.offset += 4;
        }
        for _ in 0..answers {
            let record = reader.record()?;
            let serial = match record.rtype {
                TYPE_SOA => Some(soa_serial(message, record.rdata_start)?),
                _ => None,
            };
            let Some(first) = self.serial else {
                // The first record of a transfer is the zone's SOA; anything else is a refusal.
                let Some(serial) = serial else {
                    return Some(true);
                };
                self.serial = Some(serial);
                if self.kind == Kind::Ixfr && self.up_to_date(serial, answers) {
                    return Some(true);
                }
                continue;
            };
            let Some(serial) = serial else { continue };
            self.later_soas += 1;
            let at_a_deletion = self.later_soas % 2 == 1;
            match self.kind {
                Kind::Axfr => return Some(true),
                Kind::Ixfr if at_a_deletion && serial == first => return Some(true),
                Kind::Ixfr => {}
            }
        }
        Some(false)
    }
}

impl Transfer {
    /// Whether an IXFR whose first SOA has `serial` says the client is up to date: that SOA no
    /// newer than the client's, by both readings a client may make (RFC 1982's serial
    /// arithmetic, and dig's plain comparison). Where they differ the transfer is followed:
    /// ending it early cuts what the client reads, following it longer costs nothing. A query
    /// without the client's SOA (which servers refuse) is taken as up to date when the SOA is
    /// all the first message holds.
    fn up_to_date(&self, serial: u32, answers: u16) -> bool {
        match self.client_serial {
            Some(client) => {
                serial == client || (serial < client && !serial_is_newer(serial, client))
            }
            None => answers == 1,
        }
    }
}

/// Serial number arithmetic (RFC 1982): whether `serial` is newer than `than`, across the wrap
/// (exactly 2^31 apart, which the RFC leaves undefined: not newer).
fn serial_is_newer(serial: u32, than: u32) -> bool {
    serial != than && serial.wrapping_sub(than) < 1 << 31
}

/// The serial of the first SOA after an IXFR query's question: the client's version of the
/// zone (RFC 1995 §3, in the authority section).
fn client_serial(query: &[u8]) -> Option<u32> {
    wire::records(query)?
        .map_while(|record| record)
        .find(|(_, record)| record.rtype == TYPE_SOA)
        .and_then(|(_, record)| soa_serial(query, record.rdata_start))
}

/// The serial of the SOA whose data starts at `rdata`: after two names (MNAME, RNAME).
fn soa_serial(message: &[u8], rdata: usize) -> Option<u32> {
    let mut reader = Reader::new(message, rdata);
    reader.skip_name()?;
    reader.skip_name()?;
    reader.u32()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{net::Ipv4Addr, str::FromStr as _};

    use hickory_proto::{
        op::{Message, MessageType, Query, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, SOA},
        },
    };

    use super::*;

    fn zone() -> Name {
        Name::from_str("zone.example.test.").unwrap()
    }

    /// A query for zone.example.test, ID 7.
    pub(crate) fn query(kind: RecordType) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(7).add_query(Query::query(zone(), kind));
        message.to_vec().unwrap()
    }

    pub(crate) fn soa(serial: u32) -> Record {
        let name = |text: &str| Name::from_str(text).unwrap();
        let data = SOA::new(
            name("ns.zone.example.test."),
            name("admin.zone.example.test."),
            serial,
            3600,
            600,
            86400,
            60,
        );
        Record::from_rdata(zone(), 60, RData::SOA(data))
    }

    pub(crate) fn a(last: u8) -> Record {
        let name = Name::from_str(&format!("h{last}.zone.example.test.")).unwrap();
        Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::new(192, 0, 2, last))))
    }

    /// An answer message with `records`, the question in the first one only.
    pub(crate) fn message(kind: RecordType, first: bool, records: Vec<Record>) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(7).set_message_type(MessageType::Response);
        if first {
            message.add_query(Query::query(zone(), kind));
        }
        message.add_answers(records);
        message.to_vec().unwrap()
    }

    /// An IXFR query from a client that has the zone at `serial`.
    fn ixfr_from(serial: u32) -> Vec<u8> {
        let mut message = Message::new();
        message
            .set_id(7)
            .add_query(Query::query(zone(), RecordType::IXFR))
            .add_name_server(soa(serial));
        message.to_vec().unwrap()
    }

    /// Feeds `messages` in turn; returns after how many the transfer was over.
    fn ends_after(kind: RecordType, messages: &[Vec<Record>]) -> Option<usize> {
        ends_after_query(&query(kind), kind, messages)
    }

    fn ends_after_query(query: &[u8], kind: RecordType, messages: &[Vec<Record>]) -> Option<usize> {
        let mut transfer = Transfer::for_query(query)?;
        messages
            .iter()
            .enumerate()
            .position(|(at, records)| transfer.took(&message(kind, at == 0, records.clone())))
            .map(|at| at + 1)
    }

    #[test]
    fn only_zone_transfer_queries_are_followed() {
        assert!(Transfer::for_query(&query(RecordType::AXFR)).is_some());
        assert!(Transfer::for_query(&query(RecordType::IXFR)).is_some());
        assert!(Transfer::for_query(&query(RecordType::SOA)).is_none());
        assert!(Transfer::for_query(&query(RecordType::A)).is_none());
        assert!(Transfer::for_query(b"not dns").is_none());
    }

    #[test]
    fn an_axfr_ends_with_its_second_soa_whatever_the_messages_hold() {
        let axfr = RecordType::AXFR;
        assert_eq!(
            ends_after(axfr, &[vec![soa(5), a(1)], vec![a(2)], vec![a(3), soa(5)]]),
            Some(3)
        );
        assert_eq!(ends_after(axfr, &[vec![soa(5), a(1), soa(5)]]), Some(1));
        // An empty zone: the SOA twice.
        assert_eq!(ends_after(axfr, &[vec![soa(5)], vec![soa(5)]]), Some(2));
        assert_eq!(ends_after(axfr, &[vec![soa(5), a(1)], vec![a(2)]]), None);
    }

    #[test]
    fn an_ixfr_ends_where_its_first_serial_comes_back_at_a_deletions_place() {
        let ixfr = RecordType::IXFR;
        // 5 to 7 in two steps: new SOA, (old 5, deleted, new 6, added), (old 6, ..., new 7,
        // added), then the new SOA again. The 7 at an addition's place is not the end.
        let steps = [
            vec![soa(7), soa(5), a(1), soa(6), a(2)],
            vec![soa(6), a(2), soa(7), a(3)],
            vec![soa(7)],
        ];
        assert_eq!(ends_after(ixfr, &steps), Some(3));
        assert_eq!(ends_after(ixfr, &steps[..2]), None);
        // Up to date: the SOA alone.
        assert_eq!(ends_after(ixfr, &[vec![soa(7)]]), Some(1));
        // Answered with the whole zone, as an AXFR.
        assert_eq!(
            ends_after(ixfr, &[vec![soa(7), a(1)], vec![a(2), soa(7)]]),
            Some(2)
        );
    }

    #[test]
    fn an_ixfr_sent_one_record_a_message_is_followed_past_its_first_soa() {
        let ixfr = RecordType::IXFR;
        let one_a_message = |records: Vec<Record>| -> Vec<Vec<Record>> {
            records.into_iter().map(|record| vec![record]).collect()
        };
        // 5 to 7 in one step, as a server sending one record a message does (helper-128: the
        // relay took the first message for "up to date", and a half-closing client got 1 of 10).
        let steps = one_a_message(vec![soa(7), soa(5), a(1), soa(7), a(2), soa(7)]);
        assert_eq!(ends_after_query(&ixfr_from(5), ixfr, &steps), Some(6));
        assert_eq!(ends_after_query(&ixfr_from(5), ixfr, &steps[..5]), None);
        // Answered with the whole zone, one record a message.
        let zone = one_a_message(vec![soa(7), a(1), a(2), soa(7)]);
        assert_eq!(ends_after_query(&ixfr_from(5), ixfr, &zone), Some(4));
        // Up to date, or ahead of the server: the SOA alone is the whole answer.
        assert_eq!(
            ends_after_query(&ixfr_from(7), ixfr, &[vec![soa(7)]]),
            Some(1)
        );
        assert_eq!(
            ends_after_query(&ixfr_from(8), ixfr, &[vec![soa(7)]]),
            Some(1)
        );
        // Serials wrap (RFC 1982): 5 is newer than 0xffff_fff0. dig compares them plainly,
        // and takes 0xffff_fff0 for newer than 5: where the two readings differ, the transfer
        // is followed.
        let wrapped = ixfr_from(0xffff_fff0);
        assert_eq!(ends_after_query(&wrapped, ixfr, &[vec![soa(5)]]), None);
        assert_eq!(
            ends_after_query(&ixfr_from(5), ixfr, &[vec![soa(0xffff_fff0)]]),
            None
        );
        // Exactly 2^31 ahead, which RFC 1982 leaves undefined and dig takes for newer
        // (helper-132: the relay ended it, and a half-closing client got 1 of 6).
        let far = 5 + (1 << 31);
        assert_eq!(
            ends_after_query(&ixfr_from(5), ixfr, &[vec![soa(far)]]),
            None
        );
        assert_eq!(
            ends_after_query(&ixfr_from(6), ixfr, &[vec![soa(5)]]),
            Some(1)
        );
    }

    #[test]
    fn an_error_or_a_refusal_ends_a_transfer() {
        let mut transfer = Transfer::for_query(&query(RecordType::AXFR)).unwrap();
        let mut refused = Message::new();
        refused
            .set_id(7)
            .set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::Refused)
            .add_query(Query::query(zone(), RecordType::AXFR));
        assert!(transfer.took(&refused.to_vec().unwrap()));
        // A first record that is not the zone's SOA.
        assert_eq!(ends_after(RecordType::AXFR, &[vec![a(1)]]), Some(1));
        // Bytes that do not parse.
        let mut transfer = Transfer::for_query(&query(RecordType::AXFR)).unwrap();
        assert!(transfer.not_begun());
        let mut cut = message(RecordType::AXFR, true, vec![soa(5), a(1)]);
        cut.truncate(cut.len() - 3);
        assert!(transfer.took(&cut));
        assert!(!transfer.not_begun());
    }
}
