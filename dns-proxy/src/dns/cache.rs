//! The answer cache (`--cache-size`, off by default): what may be kept (RFC 1035, 2181, 2308,
//! 8767), for how long, and how a kept answer is shown to a client.
//!
//! A kept answer is the upstream's message as it came, with the offsets of its TTL fields. A
//! client gets a copy with its own ID and its own question bytes (letter case included, for
//! its 0x20 check), every TTL counted down, and the upstream's header flags; an answer longer
//! than the client can take over UDP is sent truncated (TC) instead, and its retry over TCP is
//! answered in full. Nothing else is rebuilt.
//!
//! Bounded by entries and by bytes (least recently used out first, counted).
use std::{
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use hashlink::LruCache;

use crate::dns::wire::HEADER_LEN;

/// A SERVFAIL is kept at most this long (RFC 2308 §7.1).
const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(5);
/// The TTL of a stale answer (RFC 8767 §4).
pub const STALE_TTL: u32 = 30;
/// The UDP payload a client without EDNS can take (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;
/// Bytes counted for an entry beyond its answer: the key, the offsets, the map's own.
const ENTRY_OVERHEAD: usize = 128;

const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
/// EDNS Client Subnet (RFC 7871).
const OPTION_ECS: u16 = 8;

const RCODE_NOERROR: u8 = 0;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;

/// The cache's limits.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub max_entries: usize,
    pub max_bytes: usize,
    /// No answer is kept longer than this, whatever its TTLs say.
    pub max_ttl: Duration,
    /// How long past expiry an answer may still be served when the upstream fails.
    pub serve_stale: Duration,
}

/// What tells one cached answer from another: the server asked, the name (compared
/// case-insensitively), type and class, and the query's EDNS state (present, DO, and CD),
/// which change what a server puts in its answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    server: SocketAddr,
    /// The question's name in wire form, ASCII letters in lower case.
    name: Box<[u8]>,
    qtype: u16,
    qclass: u16,
    edns: bool,
    dnssec_ok: bool,
    checking_disabled: bool,
}

/// What the cache needs of a client's query.
#[derive(Debug, Clone)]
pub struct CacheableQuery {
    pub key: CacheKey,
    /// The largest answer the client takes over UDP.
    pub udp_limit: usize,
    /// Where the question ends in the client's query: its header and question are what an
    /// answer shared with it takes from it.
    question_end: usize,
}

impl CacheableQuery {
    /// The query's key, if it may be answered from the cache: a standard query (opcode
    /// QUERY) with one question and no EDNS Client Subnet option (an answer scoped to one
    /// client's subnet is not another client's).
    pub fn parse(server: SocketAddr, query: &[u8]) -> Option<Self> {
        let header = query.get(..HEADER_LEN)?;
        let opcode = (header[2] >> 3) & 0x0f;
        if header[2] & 0x80 != 0 || opcode != 0 || count(query, 4)? != 1 {
            return None;
        }
        let checking_disabled = header[3] & 0x10 != 0;
        let mut reader = Reader::new(query, HEADER_LEN);
        let name = reader.plain_name()?;
        let qtype = reader.u16()?;
        let qclass = reader.u16()?;
        let question_end = reader.offset;
        // A query has no answers or authorities, but a sender may put records anywhere.
        for _ in 0..u32::from(count(query, 6)?) + u32::from(count(query, 8)?) {
            reader.skip_record()?;
        }
        let mut edns = None;
        for _ in 0..count(query, 10)? {
            let record = reader.record()?;
            if record.rtype == TYPE_OPT {
                if option(query, &record, OPTION_ECS)?.is_some() {
                    return None;
                }
                edns = Some(record);
            }
        }
        let udp_limit = edns.as_ref().map_or(CLASSIC_UDP_LIMIT, |opt| {
            usize::from(opt.class).max(CLASSIC_UDP_LIMIT)
        });
        Some(Self {
            key: CacheKey {
                server,
                name,
                qtype,
                qclass,
                edns: edns.is_some(),
                dnssec_ok: edns.is_some_and(|opt| opt.ttl & 0x8000 != 0),
                checking_disabled,
            },
            udp_limit,
            question_end,
        })
    }

    /// The client's header and question, out of its whole query: all an answer kept or
    /// shared for it needs of it.
    pub fn head<'a>(&self, query: &'a [u8]) -> &'a [u8] {
        &query[..self.question_end.min(query.len())]
    }
}

/// `answer`, the upstream's answer to an identical query, for another client whose query
/// has `head` ([`CacheableQuery::head`]): with that client's ID and question bytes, and
/// truncated past its UDP limit when `udp` is set. `None` if the answer's question is not the
/// same length as the client's (it then answers something else).
pub fn shared_answer(
    answer: &[u8],
    query: &CacheableQuery,
    head: &[u8],
    udp: bool,
) -> Option<Vec<u8>> {
    if answer.len() < HEADER_LEN || head.len() < HEADER_LEN {
        return None;
    }
    let mut shared = answer.to_vec();
    shared[..2].copy_from_slice(&head[..2]);
    if count(answer, 4)? > 0 {
        let mut reader = Reader::new(answer, HEADER_LEN);
        reader.plain_name()?;
        let question_end = reader.offset + 4;
        if question_end != head.len() || question_end > answer.len() {
            return None;
        }
        shared[HEADER_LEN..question_end].copy_from_slice(&head[HEADER_LEN..]);
    }
    if udp && shared.len() > query.udp_limit {
        shared = truncated(&shared, query.key.edns);
    }
    Some(shared)
}

/// A kept answer.
#[derive(Debug)]
struct Entry {
    answer: Box<[u8]>,
    /// Each TTL field to count down: its offset, and the TTL it starts from.
    ttls: Vec<(usize, u32)>,
    /// Where the question ends in `answer` (the client's question replaces it).
    question_end: usize,
    stored: Instant,
    lifetime: Duration,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.answer.len() + self.ttls.len() * std::mem::size_of::<(usize, u32)>() + ENTRY_OVERHEAD
    }
}

/// What a lookup in the cache found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    /// A live answer, ready to send.
    Fresh(Vec<u8>),
    /// An expired answer within `--serve-stale`, ready to send with TTL 30, for when the
    /// upstream fails.
    Stale(Vec<u8>),
    Miss,
}

/// What the cache has done, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheCounts {
    pub entries: usize,
    pub bytes: usize,
    pub evictions: u64,
}

/// The answer cache, shared by every listener.
#[derive(Debug)]
pub struct Cache {
    settings: CacheSettings,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: LruCache<CacheKey, Entry>,
    bytes: usize,
    evictions: u64,
}

impl Cache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                // Unbounded: every eviction is this cache's own, so bytes and evictions are counted.
                entries: LruCache::new_unbounded(),
                bytes: 0,
                evictions: 0,
            }),
        }
    }

    /// The answer for `query` (the client's own message), if one is kept: fresh, or stale
    /// within `--serve-stale`. The client's UDP limit applies when `udp` is set.
    pub fn lookup(
        &self,
        query: &CacheableQuery,
        client_query: &[u8],
        udp: bool,
        now: Instant,
    ) -> Cached {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get(&query.key) else {
            return Cached::Miss;
        };
        let age = now.saturating_duration_since(entry.stored);
        let (answer, fresh) = if age < entry.lifetime {
            (
                for_client(entry, client_query, age.as_secs() as u32, None),
                true,
            )
        } else if age < entry.lifetime + self.settings.serve_stale {
            (for_client(entry, client_query, 0, Some(STALE_TTL)), false)
        } else {
            let expired = inner.entries.remove(&query.key);
            inner.bytes -= expired.map_or(0, |entry| entry.bytes());
            return Cached::Miss;
        };
        drop(inner);
        let Some(mut answer) = answer else {
            return Cached::Miss;
        };
        if udp && answer.len() > query.udp_limit {
            answer = truncated(&answer, query.key.edns);
        }
        if fresh {
            Cached::Fresh(answer)
        } else {
            Cached::Stale(answer)
        }
    }

    /// Keeps `answer`, the upstream's answer to `query`, if the RFCs let it be kept, for as
    /// long as they say. Returns whether it was kept.
    pub fn store(&self, query: &CacheableQuery, answer: &[u8], now: Instant) -> bool {
        let Some(entry) = cacheable(query, answer, self.settings.max_ttl, now) else {
            return false;
        };
        let size = entry.bytes();
        if size > self.settings.max_bytes {
            return false;
        }
        let mut inner = self.lock();
        if let Some(replaced) = inner.entries.insert(query.key.clone(), entry) {
            inner.bytes -= replaced.bytes();
        }
        inner.bytes += size;
        while inner.bytes > self.settings.max_bytes
            || inner.entries.len() > self.settings.max_entries
        {
            let Some((_, evicted)) = inner.entries.remove_lru() else {
                break;
            };
            inner.bytes -= evicted.bytes();
            inner.evictions += 1;
        }
        true
    }

    pub fn counts(&self) -> CacheCounts {
        let inner = self.lock();
        CacheCounts {
            entries: inner.entries.len(),
            bytes: inner.bytes,
            evictions: inner.evictions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The entry for `answer`, if it may be kept: a response to a standard query, not truncated,
/// with the query's question, and one of
/// - NOERROR with answers: for the least TTL of its records (OPT aside);
/// - NXDOMAIN, or NOERROR without answers (NODATA), with an SOA in the authority section: for
///   the least of that SOA's TTL and its MINIMUM, which the SOA then shows (RFC 2308 §5);
/// - SERVFAIL: for 5 s at most (RFC 2308 §7.1);
///
/// each capped by `max_ttl`, and none with an EDNS Client Subnet scope. A record with TTL 0
/// means "do not keep".
fn cacheable(
    query: &CacheableQuery,
    answer: &[u8],
    max_ttl: Duration,
    now: Instant,
) -> Option<Entry> {
    let header = answer.get(..HEADER_LEN)?;
    let opcode = (header[2] >> 3) & 0x0f;
    let truncated = header[2] & 0x02 != 0;
    if header[2] & 0x80 == 0 || opcode != 0 || truncated || count(answer, 4)? != 1 {
        return None;
    }
    let rcode = header[3] & 0x0f;
    let mut reader = Reader::new(answer, HEADER_LEN);
    if reader.plain_name()? != query.key.name {
        return None;
    }
    if reader.u16()? != query.key.qtype || reader.u16()? != query.key.qclass {
        return None;
    }
    let question_end = reader.offset;
    let (answers, authorities, additionals) =
        (count(answer, 6)?, count(answer, 8)?, count(answer, 10)?);
    let mut ttls = Vec::new();
    let mut least: Option<u32> = None;
    let mut negative_ttl: Option<u32> = None;
    for section in 0..3 {
        let records = [answers, authorities, additionals][section];
        for _ in 0..records {
            let record = reader.record()?;
            if record.rtype == TYPE_OPT {
                // family (2), source prefix (1), scope prefix (1): a scope of 0 covers every
                // client, and may be shared.
                if let Some(ecs) = option(answer, &record, OPTION_ECS)?
                    && ecs.get(3).is_none_or(|scope| *scope != 0)
                {
                    return None;
                }
                continue;
            }
            let mut ttl = record.ttl;
            if section == 1 && record.rtype == TYPE_SOA && answers == 0 {
                // SOA rdata: two names, then serial, refresh, retry, expire, minimum.
                let mut rdata = Reader::new(answer, record.rdata_start);
                rdata.skip_name()?;
                rdata.skip_name()?;
                rdata.offset += 16;
                let minimum = rdata.u32()?;
                if rdata.offset > record.rdata_end {
                    return None;
                }
                ttl = ttl.min(minimum);
                negative_ttl = Some(negative_ttl.map_or(ttl, |n| n.min(ttl)));
            }
            least = Some(least.map_or(ttl, |l| l.min(ttl)));
            ttls.push((record.ttl_offset, ttl));
        }
    }
    if reader.offset != answer.len() {
        return None; // trailing bytes: malformed
    }
    let seconds = match rcode {
        RCODE_NOERROR if answers > 0 => least?,
        RCODE_NOERROR | RCODE_NXDOMAIN => negative_ttl?,
        RCODE_SERVFAIL => least
            .unwrap_or(u32::MAX)
            .min(MAX_SERVFAIL_TTL.as_secs() as u32),
        _ => return None,
    };
    let lifetime = Duration::from_secs(u64::from(seconds)).min(if rcode == RCODE_SERVFAIL {
        max_ttl.min(MAX_SERVFAIL_TTL)
    } else {
        max_ttl
    });
    if lifetime.is_zero() {
        return None;
    }
    Some(Entry {
        answer: answer.into(),
        ttls,
        question_end,
        stored: now,
        lifetime,
    })
}

/// `entry`'s answer for the client whose query is `client_query`: its ID, its question
/// bytes, each TTL less `age` seconds (or all set to `stale_ttl`). `None` if the client's
/// question is not the same length as the kept one (it then asked something else).
fn for_client(
    entry: &Entry,
    client_query: &[u8],
    age: u32,
    stale_ttl: Option<u32>,
) -> Option<Vec<u8>> {
    let question = client_query.get(HEADER_LEN..)?;
    let question = question.get(..entry.question_end - HEADER_LEN)?;
    let mut answer = entry.answer.to_vec();
    answer[..2].copy_from_slice(&client_query[..2]);
    answer[HEADER_LEN..entry.question_end].copy_from_slice(question);
    for &(offset, ttl) in &entry.ttls {
        let shown = stale_ttl.unwrap_or_else(|| ttl.saturating_sub(age));
        answer[offset..offset + 4].copy_from_slice(&shown.to_be_bytes());
    }
    Some(answer)
}

/// A truncated answer (TC set) with only the question, and the OPT record for an EDNS client
/// (RFC 6891 §7): the client retries over TCP.
fn truncated(answer: &[u8], edns: bool) -> Vec<u8> {
    let mut reader = Reader::new(answer, HEADER_LEN);
    let question_end = reader.plain_name().and_then(|_| {
        reader.offset += 4;
        (reader.offset <= answer.len()).then_some(reader.offset)
    });
    let Some(question_end) = question_end else {
        return answer[..HEADER_LEN.min(answer.len())].to_vec();
    };
    let mut out = answer[..question_end].to_vec();
    out[2] |= 0x02;
    out[6..12].fill(0);
    if edns && let Some(opt) = find_opt(answer) {
        out.extend_from_slice(&answer[opt.0..opt.1]);
        out[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    out
}

/// Where the answer's OPT record lies, start and end, if it has one.
fn find_opt(answer: &[u8]) -> Option<(usize, usize)> {
    let mut reader = Reader::new(answer, HEADER_LEN);
    reader.skip_name()?;
    reader.offset += 4;
    let records =
        u32::from(count(answer, 6)?) + u32::from(count(answer, 8)?) + u32::from(count(answer, 10)?);
    for _ in 0..records {
        let start = reader.offset;
        let record = reader.record()?;
        if record.rtype == TYPE_OPT {
            return Some((start, record.rdata_end));
        }
    }
    None
}

/// The data of option `code` in an OPT record, if it has one; `None` if the record's options
/// are malformed.
fn option<'a>(message: &'a [u8], opt: &Record, code: u16) -> Option<Option<&'a [u8]>> {
    let mut reader = Reader::new(message, opt.rdata_start);
    while reader.offset < opt.rdata_end {
        let option = reader.u16()?;
        let len = usize::from(reader.u16()?);
        let data = message.get(reader.offset..reader.offset + len)?;
        reader.offset += len;
        if option == code {
            return Some(Some(data));
        }
    }
    (reader.offset == opt.rdata_end).then_some(None)
}

fn count(message: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *message.get(at)?,
        *message.get(at + 1)?,
    ]))
}

/// A resource record's fixed fields, as found at some offset.
#[derive(Debug, Clone, Copy)]
struct Record {
    rtype: u16,
    class: u16,
    ttl: u32,
    ttl_offset: usize,
    rdata_start: usize,
    rdata_end: usize,
}

/// Walks a message, every read bounds-checked.
struct Reader<'a> {
    message: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(message: &'a [u8], offset: usize) -> Self {
        Self { message, offset }
    }

    fn u16(&mut self) -> Option<u16> {
        let value = count(self.message, self.offset)?;
        self.offset += 2;
        Some(value)
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.message.get(self.offset..self.offset + 4)?;
        self.offset += 4;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }

    /// A name without compression (a question's), ASCII letters in lower case.
    fn plain_name(&mut self) -> Option<Box<[u8]>> {
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
    fn skip_name(&mut self) -> Option<()> {
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

    fn record(&mut self) -> Option<Record> {
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

    fn skip_record(&mut self) -> Option<()> {
        self.record().map(|_| ())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::{
        op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, SOA, TXT},
        },
    };

    use super::*;

    const SERVER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 53);

    fn settings() -> CacheSettings {
        CacheSettings {
            max_entries: 100,
            max_bytes: 1 << 20,
            max_ttl: Duration::from_secs(3600),
            serve_stale: Duration::ZERO,
        }
    }

    fn query_message(id: u16, name: &str, edns: Option<Edns>) -> Message {
        let mut message = Message::new();
        message
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(edns) = edns {
            message.set_edns(edns);
        }
        message
    }

    pub(crate) fn query(id: u16, name: &str) -> Vec<u8> {
        query_message(id, name, None).to_vec().unwrap()
    }

    fn response_to(query: &[u8], rcode: ResponseCode) -> Message {
        let query = Message::from_vec(query).unwrap();
        let mut message = Message::new();
        message
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .set_response_code(rcode)
            .add_queries(query.queries().to_vec());
        if let Some(edns) = query.extensions() {
            message.set_edns(edns.clone());
        }
        message
    }

    fn a_answer(query: &[u8], ttls: &[u32]) -> Vec<u8> {
        let mut message = response_to(query, ResponseCode::NoError);
        let name = message.queries()[0].name().clone();
        for (i, ttl) in ttls.iter().enumerate() {
            let ip = Ipv4Addr::new(198, 51, 100, i as u8 + 1);
            message.add_answer(Record::from_rdata(name.clone(), *ttl, RData::A(A(ip))));
        }
        message.to_vec().unwrap()
    }

    fn negative_answer(query: &[u8], rcode: ResponseCode, soa: Option<(u32, u32)>) -> Vec<u8> {
        let mut message = response_to(query, rcode);
        if let Some((ttl, minimum)) = soa {
            let zone = Name::from_ascii("example.test.").unwrap();
            let rdata = SOA::new(
                Name::from_ascii("ns.example.test.").unwrap(),
                Name::from_ascii("admin.example.test.").unwrap(),
                1,
                3600,
                600,
                86400,
                minimum,
            );
            message.add_name_server(Record::from_rdata(zone, ttl, RData::SOA(rdata)));
        }
        message.to_vec().unwrap()
    }

    /// Whether `cache` keeps `answer` to `query`.
    fn keeps(cache: &Cache, query: &[u8], answer: &[u8], at: Instant) -> bool {
        cache.store(&parsed(query), answer, at)
    }

    /// `message` (with no additional records) and an OPT record carrying an EDNS Client Subnet
    /// option (code 8: family 1, source /24, `scope`, 192.0.2.0).
    fn with_client_subnet(mut message: Vec<u8>, scope: u8) -> Vec<u8> {
        message.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 11]);
        message.extend_from_slice(&[0, 8, 0, 7, 0, 1, 24, scope, 192, 0, 2]);
        message[11] = 1;
        message
    }

    fn parsed(query: &[u8]) -> CacheableQuery {
        CacheableQuery::parse(SERVER, query).expect("a cacheable query")
    }

    fn ttls(answer: &[u8]) -> Vec<u32> {
        let message = Message::from_vec(answer).unwrap();
        message
            .answers()
            .iter()
            .chain(message.name_servers())
            .map(Record::ttl)
            .collect()
    }

    fn fresh(cached: Cached) -> Vec<u8> {
        match cached {
            Cached::Fresh(answer) => answer,
            other => panic!("not a fresh answer: {other:?}"),
        }
    }

    #[test]
    fn a_kept_answer_counts_its_ttls_down_and_carries_the_clients_id_and_question() {
        let cache = Cache::new(settings());
        let first = query(1, "www.example.test.");
        let start = Instant::now();
        assert!(keeps(&cache, &first, &a_answer(&first, &[300, 120]), start));

        // Another client, another ID, the name in other letter case.
        let second = query(2, "WwW.ExAmple.TEST.");
        let answer = fresh(cache.lookup(
            &parsed(&second),
            &second,
            true,
            start + Duration::from_secs(7),
        ));
        assert_eq!(&answer[..2], &2u16.to_be_bytes());
        assert_eq!(wire_question(&answer), wire_question(&second));
        assert_eq!(ttls(&answer), [293, 113]);
        // The upstream's flags as they came (RA set, AA clear).
        let message = Message::from_vec(&answer).unwrap();
        assert!(message.recursion_available() && !message.authoritative());
    }

    fn wire_question(message: &[u8]) -> Vec<u8> {
        crate::dns::wire::question(message).unwrap().to_vec()
    }

    #[test]
    fn an_answer_lives_for_its_least_ttl_capped_and_then_only_as_stale() {
        let cache = Cache::new(CacheSettings {
            max_ttl: Duration::from_secs(60),
            serve_stale: Duration::from_secs(100),
            ..settings()
        });
        let q = query(1, "capped.example.test.");
        let start = Instant::now();
        assert!(keeps(&cache, &q, &a_answer(&q, &[300, 3600]), start));
        let at = |secs| start + Duration::from_secs(secs);
        assert!(matches!(
            cache.lookup(&parsed(&q), &q, true, at(59)),
            Cached::Fresh(_)
        ));
        match cache.lookup(&parsed(&q), &q, true, at(61)) {
            Cached::Stale(answer) => assert_eq!(ttls(&answer), [STALE_TTL, STALE_TTL]),
            other => panic!("{other:?}"),
        }
        assert_eq!(cache.lookup(&parsed(&q), &q, true, at(161)), Cached::Miss);
        assert_eq!(cache.counts().entries, 0);
    }

    #[test]
    fn keys_tell_servers_edns_and_its_bits_apart_and_ignore_letter_case() {
        let plain = parsed(&query(1, "k.example.test."));
        assert_eq!(plain.key, parsed(&query(9, "K.EXAMPLE.test.")).key);
        assert_eq!(plain.udp_limit, 512);
        let other_server = CacheableQuery::parse(
            "192.0.2.3:53".parse().unwrap(),
            &query(1, "k.example.test."),
        );
        assert_ne!(plain.key, other_server.unwrap().key);

        let with_edns = |dnssec_ok: bool| {
            let mut edns = Edns::new();
            edns.set_max_payload(1232).set_dnssec_ok(dnssec_ok);
            parsed(
                &query_message(1, "k.example.test.", Some(edns))
                    .to_vec()
                    .unwrap(),
            )
        };
        let (edns, dnssec_ok) = (with_edns(false), with_edns(true));
        assert_eq!(edns.udp_limit, 1232);
        assert_ne!(plain.key, edns.key);
        assert_ne!(edns.key, dnssec_ok.key);

        let mut cd = query(1, "k.example.test.");
        cd[3] |= 0x10;
        assert_ne!(plain.key, parsed(&cd).key);
    }

    #[test]
    fn only_standard_queries_without_a_client_subnet_are_answered_from_the_cache() {
        let mut notify = query(1, "k.example.test.");
        notify[2] |= 4 << 3; // opcode NOTIFY
        assert!(CacheableQuery::parse(SERVER, &notify).is_none());
        // An EDNS Client Subnet option (code 8: family 1, /24, scope 0, 192.0.2.0).
        let ecs = with_client_subnet(query(1, "k.example.test."), 0);
        assert!(Message::from_vec(&ecs).is_ok());
        assert!(CacheableQuery::parse(SERVER, &ecs).is_none());
    }

    #[test]
    fn negative_answers_are_kept_for_the_soa_they_carry_and_show_it_counting_down() {
        let cache = Cache::new(settings());
        let start = Instant::now();
        let nx = query(1, "nx.example.test.");
        // SOA TTL 300, MINIMUM 60: kept 60 s, the SOA shown from 60 down.
        assert!(keeps(
            &cache,
            &nx,
            &negative_answer(&nx, ResponseCode::NXDomain, Some((300, 60))),
            start
        ));
        let answer = fresh(cache.lookup(&parsed(&nx), &nx, true, start + Duration::from_secs(10)));
        assert_eq!(
            Message::from_vec(&answer).unwrap().response_code(),
            ResponseCode::NXDomain
        );
        assert_eq!(ttls(&answer), [50]);
        assert_eq!(
            cache.lookup(&parsed(&nx), &nx, true, start + Duration::from_secs(60)),
            Cached::Miss
        );

        let nodata = query(1, "nodata.example.test.");
        assert!(keeps(
            &cache,
            &nodata,
            &negative_answer(&nodata, ResponseCode::NoError, Some((30, 600))),
            start
        ));
        let answer = fresh(cache.lookup(
            &parsed(&nodata),
            &nodata,
            true,
            start + Duration::from_secs(29),
        ));
        assert_eq!(ttls(&answer), [1]);

        // Without an SOA, nothing says how long: not kept.
        let bare = query(1, "bare.example.test.");
        assert!(!keeps(
            &cache,
            &bare,
            &negative_answer(&bare, ResponseCode::NXDomain, None),
            start
        ));
    }

    #[test]
    fn servfail_is_kept_five_seconds_at_most_and_refused_truncated_or_malformed_never() {
        let cache = Cache::new(settings());
        let start = Instant::now();
        let q = query(1, "fail.example.test.");
        assert!(keeps(
            &cache,
            &q,
            &negative_answer(&q, ResponseCode::ServFail, None),
            start
        ));
        assert!(matches!(
            cache.lookup(&parsed(&q), &q, true, start + Duration::from_secs(4)),
            Cached::Fresh(_)
        ));
        assert_eq!(
            cache.lookup(&parsed(&q), &q, true, start + Duration::from_secs(5)),
            Cached::Miss
        );

        let refused = negative_answer(&q, ResponseCode::Refused, Some((300, 300)));
        assert!(!keeps(&cache, &q, &refused, start));
        let mut truncated = a_answer(&q, &[300]);
        truncated[2] |= 0x02;
        assert!(!keeps(&cache, &q, &truncated, start));
        let mut trailing = a_answer(&q, &[300]);
        trailing.push(0);
        assert!(!keeps(&cache, &q, &trailing, start));
        let mut cut = a_answer(&q, &[300]);
        cut.truncate(cut.len() - 2);
        assert!(!keeps(&cache, &q, &cut, start));
        let other = a_answer(&query(1, "other.example.test."), &[300]);
        assert!(!keeps(&cache, &q, &other, start));
        assert!(
            !keeps(&cache, &q, &a_answer(&q, &[300, 0]), start),
            "TTL 0: do not keep"
        );
    }

    #[test]
    fn an_answer_too_long_for_the_client_is_truncated_over_udp_and_whole_over_tcp() {
        let cache = Cache::new(settings());
        let start = Instant::now();
        let q = query(1, "big.example.test.");
        let mut message = response_to(&q, ResponseCode::NoError);
        let name = message.queries()[0].name().clone();
        for i in 0..6 {
            let text = format!("{i}{}", "x".repeat(150));
            message.add_answer(Record::from_rdata(
                name.clone(),
                300,
                RData::TXT(TXT::new(vec![text])),
            ));
        }
        let big = message.to_vec().unwrap();
        assert!(big.len() > 512);
        assert!(keeps(&cache, &q, &big, start));
        let udp = fresh(cache.lookup(&parsed(&q), &q, true, start));
        let truncated = Message::from_vec(&udp).unwrap();
        assert!(truncated.truncated() && truncated.answers().is_empty());
        assert_eq!(truncated.queries().len(), 1);
        let tcp = fresh(cache.lookup(&parsed(&q), &q, false, start));
        assert_eq!(tcp.len(), big.len());
        assert_eq!(Message::from_vec(&tcp).unwrap().answers().len(), 6);
    }

    #[test]
    fn an_answer_shared_with_an_identical_query_carries_that_clients_id_and_case() {
        let leader = query(1, "shared.example.test");
        let answer = a_answer(&leader, &[60; 34]);
        let waiter = query(77, "SHARED.Example.TEST");
        let parsed = parsed(&waiter);
        let shared = shared_answer(&answer, &parsed, parsed.head(&waiter), false).unwrap();
        assert_eq!(shared[..2], 77u16.to_be_bytes());
        assert_eq!(wire_question(&shared), wire_question(&waiter));
        assert_eq!(
            shared[2..HEADER_LEN],
            answer[2..HEADER_LEN],
            "the upstream's flags"
        );
        assert_eq!(
            shared[wire_question(&answer).len() + HEADER_LEN..],
            answer[wire_question(&answer).len() + HEADER_LEN..]
        );
        // 34 records do not fit in 512 bytes: over UDP the client gets TC and retries.
        assert!(answer.len() > CLASSIC_UDP_LIMIT);
        let over_udp = shared_answer(&answer, &parsed, parsed.head(&waiter), true).unwrap();
        assert_ne!(over_udp[2] & 0x02, 0, "TC");
        assert_eq!(over_udp[..2], 77u16.to_be_bytes());
        // An answer to another question is not shared.
        let other = query(5, "other.example.test");
        let other = parsed_head(&other);
        assert!(shared_answer(&answer, &parsed, &other, false).is_none());
    }

    fn parsed_head(message: &[u8]) -> Vec<u8> {
        parsed(message).head(message).to_vec()
    }

    #[test]
    fn an_answer_scoped_to_a_client_subnet_is_not_kept() {
        let cache = Cache::new(settings());
        let q = query(1, "ecs.example.test.");
        let with_scope = |scope| with_client_subnet(a_answer(&q, &[300]), scope);
        assert!(!keeps(&cache, &q, &with_scope(24), Instant::now()));
        assert!(keeps(&cache, &q, &with_scope(0), Instant::now()));
    }

    #[test]
    fn entries_and_bytes_are_bounded_least_recently_used_out_first() {
        let cache = Cache::new(CacheSettings {
            max_entries: 3,
            ..settings()
        });
        let start = Instant::now();
        let names: Vec<String> = (0..5).map(|i| format!("n{i}.example.test.")).collect();
        for (i, name) in names.iter().enumerate() {
            let q = query(1, name);
            assert!(keeps(&cache, &q, &a_answer(&q, &[300]), start));
            if i == 2 {
                // n0 used again: n1 is the least recently used.
                let first = query(1, &names[0]);
                assert!(matches!(
                    cache.lookup(&parsed(&first), &first, true, start),
                    Cached::Fresh(_)
                ));
            }
        }
        let counts = cache.counts();
        assert_eq!((counts.entries, counts.evictions), (3, 2));
        let kept = |name: &str| {
            let q = query(1, name);
            matches!(cache.lookup(&parsed(&q), &q, true, start), Cached::Fresh(_))
        };
        assert!(kept(&names[0]) && !kept(&names[1]) && !kept(&names[2]));

        let small = Cache::new(CacheSettings {
            max_bytes: 3 * (ENTRY_OVERHEAD + 100),
            ..settings()
        });
        for i in 0..100 {
            let q = query(1, &format!("b{i}.example.test."));
            keeps(&small, &q, &a_answer(&q, &[300]), start);
        }
        let counts = small.counts();
        assert!(counts.bytes <= 3 * (ENTRY_OVERHEAD + 100), "{counts:?}");
        assert!(counts.evictions >= 97, "{counts:?}");
    }
}
