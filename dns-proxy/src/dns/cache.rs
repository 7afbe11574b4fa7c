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
    borrow::Cow,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use hashlink::LruCache;

use crate::dns::wire::{HEADER_LEN, Reader, TYPE_OPT, count, find_opt, option, options, records};

/// A SERVFAIL is kept at most this long (RFC 2308 §7.1).
const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(5);
/// The TTL of a stale answer (RFC 8767 §4).
pub const STALE_TTL: u32 = 30;
/// The UDP payload a client without EDNS can take (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;
/// Bytes counted for an entry beyond its answer: the key, the offsets, the map's own.
const ENTRY_OVERHEAD: usize = 128;

const TYPE_SOA: u16 = 6;
/// EDNS Client Subnet (RFC 7871).
const OPTION_ECS: u16 = 8;
/// DNS Cookies (RFC 7873): one client's, and the server's answer to it.
const OPTION_COOKIE: u16 = 10;
/// EDNS padding (RFC 7830): says nothing about the answer.
const OPTION_PADDING: u16 = 12;
/// How long after an upstream failed to refresh an answer that answer is served stale at
/// once, without waiting for the upstream (RFC 8767 §5's failure recheck timer, suggested 30 s).
const FAILURE_RECHECK: Duration = Duration::from_secs(30);

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
/// case-insensitively), type and class, and the query's EDNS state and header bits (EDNS
/// present, DO, CD, AD and RD), which change what a server puts in its answer. Only queries of
/// one plain shape are cached ([`CacheableQuery::parse`]), so two queries with one key ask
/// the very same thing, their IDs, letter case, UDP sizes and cookies aside.
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
    authentic_data: bool,
    recursion_desired: bool,
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
    /// The client's COOKIE option when it holds a server cookie (RFC 7873: 8 bytes of its
    /// own, 8 to 32 of its server's): shown back in any answer the cache gives it, as its
    /// server would. A cookie-speaking resolver (BIND) takes an answer without its cookie for
    /// a forgery and retries over TCP.
    cookie: Option<Box<[u8]>>,
}

impl CacheableQuery {
    /// The query's key, if it may be answered from the cache (or wait for an identical
    /// query's answer): a query of the plain shape stub resolvers send, nothing else, so that
    /// what its key leaves out cannot change its answer:
    /// - opcode QUERY, not truncated, the Z bit and RCODE clear;
    /// - one question, no answers or authorities, at most one additional record: an OPT of
    ///   EDNS version 0, owned by the root, whose options are only a cookie or padding (an
    ///   EDNS Client Subnet makes the answer one client's; anything else, NSID say, may
    ///   change it);
    /// - nothing after it.
    pub fn parse(server: SocketAddr, query: &[u8]) -> Option<Self> {
        let header = query.get(..HEADER_LEN)?;
        let opcode = (header[2] >> 3) & 0x0f;
        let truncated = header[2] & 0x02 != 0;
        let (zero, rcode) = (header[3] & 0x40, header[3] & 0x0f);
        if header[2] & 0x80 != 0 || opcode != 0 || truncated || zero != 0 || rcode != 0 {
            return None;
        }
        if count(query, 4)? != 1 || count(query, 6)? != 0 || count(query, 8)? != 0 {
            return None;
        }
        let mut reader = Reader::new(query, HEADER_LEN);
        let name = reader.plain_name()?;
        let qtype = reader.u16()?;
        let qclass = reader.u16()?;
        // OPT, and the meta types (TKEY, TSIG, IXFR, AXFR, MAILB, MAILA, ANY: RFC 6895 §3.1):
        // transfers and transactions, not answers to keep.
        if qtype == TYPE_OPT || (128..=255).contains(&qtype) {
            return None;
        }
        let question_end = reader.offset;
        let mut cookie = None;
        let edns = match count(query, 10)? {
            0 => None,
            1 => {
                let owner_is_root = *query.get(reader.offset)? == 0;
                let record = reader.record()?;
                let (extended_rcode, version) = (record.ttl >> 24, (record.ttl >> 16) & 0xff);
                if record.rtype != TYPE_OPT || !owner_is_root || extended_rcode != 0 || version != 0
                {
                    return None;
                }
                let options = options(query, &record)?;
                if !options
                    .iter()
                    .all(|(code, _)| matches!(*code, OPTION_COOKIE | OPTION_PADDING))
                {
                    return None;
                }
                cookie = options
                    .iter()
                    .find(|(code, at)| *code == OPTION_COOKIE && (20..=44).contains(&at.len()))
                    .map(|(_, at)| query[at.start + 4..at.end].into());
                Some(record)
            }
            _ => return None,
        };
        if reader.offset != query.len() {
            return None;
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
                checking_disabled: header[3] & 0x10 != 0,
                authentic_data: header[3] & 0x20 != 0,
                recursion_desired: header[2] & 0x01 != 0,
            },
            udp_limit,
            question_end,
            cookie,
        })
    }

    /// The client's header and question, out of its whole query: all an answer kept or
    /// shared for it needs of it.
    pub fn head<'a>(&self, query: &'a [u8]) -> &'a [u8] {
        &query[..self.question_end.min(query.len())]
    }
}

/// `answer`, the upstream's answer to an identical query whose header and question are
/// `asked`, for another client whose query is `query` with `head`
/// ([`CacheableQuery::head`]): with that client's ID and question bytes, without the first
/// client's cookie and padding, and truncated past its UDP limit when `udp` is set. `None`
/// if it is not to be shared: its question is not exactly the one asked (it would fail the
/// first client's letter-case check), or it has an extended RCODE (about the first query's
/// EDNS, a cookie say).
pub fn shared_answer(
    answer: &[u8],
    asked: &[u8],
    query: &CacheableQuery,
    head: &[u8],
    udp: bool,
) -> Option<Vec<u8>> {
    if answer.len() < HEADER_LEN || head.len() < HEADER_LEN || asked.len() < HEADER_LEN {
        return None;
    }
    if answer.get(HEADER_LEN..asked.len()) != asked.get(HEADER_LEN..)
        || extended_rcode(answer)? != 0
        || opt_count(answer)? > 1
    {
        return None;
    }
    let mut shared = without_client_options(answer)?.into_owned();
    if let Some(cookie) = &query.cookie {
        shared = with_cookie(shared, cookie);
    }
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
    /// When the upstream last failed to refresh it, while it was stale.
    failed: Option<Instant>,
    /// A SERVFAIL: kept a few seconds, never served stale.
    servfail: bool,
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
    /// An expired answer within `--serve-stale`, ready to send with TTL 30 (at most
    /// `--cache-max-ttl`), for when the
    /// upstream fails; `upstream_failing` if it failed to refresh it in the last 30 s, when
    /// it may be served at once.
    Stale {
        answer: Vec<u8>,
        upstream_failing: bool,
    },
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
        let upstream_failing = entry
            .failed
            .is_some_and(|failed| now.saturating_duration_since(failed) < FAILURE_RECHECK);
        let (answer, fresh) = if age < entry.lifetime {
            (
                for_client(entry, client_query, age.as_secs() as u32, None),
                true,
            )
        } else if !entry.servfail && age < entry.lifetime.saturating_add(self.settings.serve_stale)
        {
            (
                for_client(entry, client_query, 0, Some(self.stale_ttl())),
                false,
            )
        } else {
            let expired = inner.entries.remove(&query.key);
            inner.bytes -= expired.map_or(0, |entry| entry.bytes());
            return Cached::Miss;
        };
        drop(inner);
        let Some(mut answer) = answer else {
            return Cached::Miss;
        };
        if let Some(cookie) = &query.cookie {
            answer = with_cookie(answer, cookie);
        }
        if udp && answer.len() > query.udp_limit {
            answer = truncated(&answer, query.key.edns);
        }
        if fresh {
            Cached::Fresh(answer)
        } else {
            Cached::Stale {
                answer,
                upstream_failing,
            }
        }
    }

    /// The TTL a stale answer shows: 30 s (RFC 8767 §4), or `--cache-max-ttl` if less.
    fn stale_ttl(&self) -> u32 {
        u32::try_from(self.settings.max_ttl.as_secs()).map_or(STALE_TTL, |cap| cap.min(STALE_TTL))
    }

    /// Notes that the upstream failed to refresh `key`'s answer, now stale: for the next 30 s
    /// it may be served stale at once (RFC 8767 §5).
    pub fn upstream_failed(&self, key: &CacheKey, now: Instant) {
        if let Some(entry) = self.lock().entries.peek_mut(key) {
            entry.failed = Some(now);
        }
    }

    /// Keeps `answer`, the upstream's answer to `query` (whose header and question are
    /// `head`), if the RFCs let it be kept, for as long as they say, without the options that
    /// were for its client alone. Returns whether it was kept.
    pub fn store(&self, query: &CacheableQuery, head: &[u8], answer: &[u8], now: Instant) -> bool {
        let Some(answer) = without_client_options(answer) else {
            return false;
        };
        let Some(entry) = cacheable(query, head, &answer, self.settings.max_ttl, now) else {
            return false;
        };
        let size = entry.bytes();
        if size > self.settings.max_bytes {
            return false;
        }
        let mut inner = self.lock();
        // A SERVFAIL does not push out an answer still kept for serve-stale: it is the failure
        // that answer is kept for (RFC 8767).
        if entry.servfail
            && let Some(kept) = inner.entries.peek_mut(&query.key)
            && !kept.servfail
            && now.saturating_duration_since(kept.stored)
                < kept.lifetime.saturating_add(self.settings.serve_stale)
        {
            kept.failed = Some(now);
            return false;
        }
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
/// with the query's question exactly as asked (`head`'s: an answer that would fail its
/// client's letter-case check is not shown to anyone else), the bits the key holds copied
/// back as the RFCs say (RD, CD; an OPT only to an EDNS query, with its DO bit), no
/// extended RCODE, and one of
/// - NOERROR with answers: for the least TTL of its records (OPT aside);
/// - NXDOMAIN, or NOERROR without answers (NODATA), with an SOA in the authority section: for
///   the least of that SOA's TTL and its MINIMUM, which the SOA then shows (RFC 2308 §5);
/// - SERVFAIL: for 5 s at most (RFC 2308 §7.1);
///
/// each capped by `max_ttl`, and none with an EDNS Client Subnet scope. A record with TTL 0
/// (or with its top bit set, which RFC 2181 §8 says to read as 0) means "do not keep".
fn cacheable(
    query: &CacheableQuery,
    head: &[u8],
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
    // RD (RFC 1035 §4.1.1) and CD (RFC 4035 §3.2.2) are copied from the query: an answer with
    // others answers another query (a TCP client reusing an ID in flight, say), which must
    // not be kept under this one's key.
    let (recursion_desired, checking_disabled) = (header[2] & 0x01 != 0, header[3] & 0x10 != 0);
    if recursion_desired != query.key.recursion_desired
        || checking_disabled != query.key.checking_disabled
    {
        return None;
    }
    let mut reader = Reader::new(answer, HEADER_LEN);
    if reader.plain_name()? != query.key.name {
        return None;
    }
    if reader.u16()? != query.key.qtype || reader.u16()? != query.key.qclass {
        return None;
    }
    let question_end = reader.offset;
    if answer.get(HEADER_LEN..question_end) != head.get(HEADER_LEN..) {
        return None;
    }
    let max_ttl_seconds = u32::try_from(max_ttl.as_secs()).unwrap_or(u32::MAX);
    let (answers, authorities, additionals) =
        (count(answer, 6)?, count(answer, 8)?, count(answer, 10)?);
    let mut ttls = Vec::new();
    let mut least: Option<u32> = None;
    let mut negative_ttl: Option<u32> = None;
    // An answer of the type asked: without one, a NOERROR (a CNAME chain, say) is NODATA.
    let mut answers_the_type = false;
    let mut opts = 0;
    for section in 0..3 {
        let records = [answers, authorities, additionals][section];
        for _ in 0..records {
            let record = reader.record()?;
            if section == 0 && record.rtype == query.key.qtype {
                answers_the_type = true;
            }
            if record.rtype == TYPE_OPT {
                opts += 1;
                // BADVERS, BADCOOKIE...: about the query's EDNS, not the name. Two OPTs:
                // malformed (RFC 6891 §6.1.1).
                if record.ttl >> 24 != 0 || opts > 1 {
                    return None;
                }
                // An OPT answers only an EDNS query (RFC 6891 §7), and carries its DO bit
                // back (RFC 3225 §3).
                if !query.key.edns || (record.ttl & 0x8000 != 0) != query.key.dnssec_ok {
                    return None;
                }
                // family (2), source prefix (1), scope prefix (1): a scope of 0 covers every
                // client, and may be shared.
                if let Some(ecs) = option(answer, &record, OPTION_ECS)?
                    && ecs.get(3).is_none_or(|scope| *scope != 0)
                {
                    return None;
                }
                continue;
            }
            let mut ttl = if record.ttl & 0x8000_0000 != 0 {
                0
            } else {
                record.ttl
            };
            if section == 1 && record.rtype == TYPE_SOA {
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
            // No TTL shown goes past the cap: a client's own cache keeps a record no longer
            // than `--cache-max-ttl` either.
            ttls.push((record.ttl_offset, ttl.min(max_ttl_seconds)));
        }
    }
    if reader.offset != answer.len() {
        return None; // trailing bytes: malformed
    }
    let seconds = match rcode {
        RCODE_NOERROR if answers_the_type => least?,
        // NXDOMAIN and NODATA, a CNAME chain to them included (RFC 2308 §5).
        RCODE_NOERROR | RCODE_NXDOMAIN => negative_ttl?.min(least.unwrap_or(u32::MAX)),
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
        failed: None,
        servfail: rcode == RCODE_SERVFAIL,
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

/// `answer` (kept or shared, so without anyone's cookie) with `cookie`, a client's own COOKIE
/// option, added to its OPT record. Unchanged if its OPT is not the last record: bytes after
/// it would move, and names compressed to point at them would break.
fn with_cookie(mut answer: Vec<u8>, cookie: &[u8]) -> Vec<u8> {
    let Some((opt_start, opt_end)) = find_opt(&answer) else {
        return answer;
    };
    let Some(opt) = Reader::new(&answer, opt_start).record() else {
        return answer;
    };
    let grown = opt.rdata_end - opt.rdata_start + 4 + cookie.len();
    let (Ok(rdlength), Ok(cookie_len)) = (u16::try_from(grown), u16::try_from(cookie.len())) else {
        return answer;
    };
    // Nor past the largest message (over TCP, 65,535 bytes).
    if opt_end != answer.len()
        || answer.len() + 4 + cookie.len() > crate::dns::wire::MAX_UDP_MESSAGE
    {
        return answer;
    }
    // The OPT's RDLENGTH is the two bytes before its data.
    answer[opt.rdata_start - 2..opt.rdata_start].copy_from_slice(&rdlength.to_be_bytes());
    answer.extend_from_slice(&OPTION_COOKIE.to_be_bytes());
    answer.extend_from_slice(&cookie_len.to_be_bytes());
    answer.extend_from_slice(cookie);
    answer
}

/// `answer` without the options that belong to the client it was sent to, its cookie (RFC
/// 7873) and padding, which another client must not be shown; `None` if its OPT record is
/// malformed.
fn without_client_options(answer: &[u8]) -> Option<Cow<'_, [u8]>> {
    let Some((opt_start, _)) = find_opt(answer) else {
        return Some(Cow::Borrowed(answer));
    };
    let opt = Reader::new(answer, opt_start).record()?;
    let options = options(answer, &opt)?;
    if options
        .iter()
        .all(|(code, _)| !matches!(*code, OPTION_COOKIE | OPTION_PADDING))
    {
        return Some(Cow::Borrowed(answer));
    }
    // Bytes after the OPT would move, and names compressed to point at them would break.
    if opt.rdata_end != answer.len() {
        return None;
    }
    // The OPT's RDLENGTH is the two bytes before its data.
    let mut stripped = answer[..opt.rdata_start - 2].to_vec();
    let kept: Vec<u8> = options
        .iter()
        .filter(|(code, _)| !matches!(*code, OPTION_COOKIE | OPTION_PADDING))
        .flat_map(|(_, at)| answer[at.clone()].iter().copied())
        .collect();
    stripped.extend_from_slice(&u16::try_from(kept.len()).ok()?.to_be_bytes());
    stripped.extend_from_slice(&kept);
    stripped.extend_from_slice(&answer[opt.rdata_end..]);
    Some(Cow::Owned(stripped))
}

/// How many OPT records `answer` has (more than one: malformed); `None` if it does not parse.
fn opt_count(answer: &[u8]) -> Option<usize> {
    let mut opts = 0;
    for record in records(answer)? {
        if record?.1.rtype == TYPE_OPT {
            opts += 1;
        }
    }
    Some(opts)
}

/// The extended RCODE bits of `answer`'s OPT record (BADVERS, BADCOOKIE...), 0 without one.
fn extended_rcode(answer: &[u8]) -> Option<u32> {
    match find_opt(answer) {
        Some((start, _)) => Some(Reader::new(answer, start).record()?.ttl >> 24),
        None => Some(0),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::{
        op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, SOA, opt::EdnsOption},
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
        let parsed = parsed(query);
        cache.store(&parsed, parsed.head(query), answer, at)
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
            Cached::Stale { answer, .. } => assert_eq!(ttls(&answer), [STALE_TTL, STALE_TTL]),
            other => panic!("{other:?}"),
        }
        assert_eq!(cache.lookup(&parsed(&q), &q, true, at(161)), Cached::Miss);
        assert_eq!(cache.counts().entries, 0);
    }

    #[test]
    fn a_stale_answer_shows_no_ttl_beyond_the_cap_and_a_week_of_serve_stale_does_not_overflow() {
        let cache = Cache::new(CacheSettings {
            max_ttl: Duration::from_secs(2),
            serve_stale: Duration::from_secs(7 * 24 * 3600),
            ..settings()
        });
        let q = query(1, "short.example.test.");
        let start = Instant::now();
        assert!(keeps(&cache, &q, &a_answer(&q, &[300]), start));
        match cache.lookup(&parsed(&q), &q, true, start + Duration::from_secs(3)) {
            Cached::Stale { answer, .. } => assert_eq!(ttls(&answer), [2]),
            other => panic!("{other:?}"),
        }
        let huge = Cache::new(CacheSettings {
            serve_stale: Duration::MAX,
            ..settings()
        });
        assert!(keeps(&huge, &q, &a_answer(&q, &[1]), start));
        let later = start + Duration::from_secs(5);
        assert!(matches!(
            huge.lookup(&parsed(&q), &q, true, later),
            Cached::Stale { .. }
        ));
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
        for i in 0..40 {
            let ip = Ipv4Addr::new(198, 51, 100, i);
            message.add_answer(Record::from_rdata(name.clone(), 300, RData::A(A(ip))));
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
        assert_eq!(Message::from_vec(&tcp).unwrap().answers().len(), 40);
    }

    #[test]
    fn an_answer_shared_with_an_identical_query_carries_that_clients_id_and_case() {
        let leader = query(1, "shared.example.test");
        let answer = a_answer(&leader, &[60; 34]);
        let waiter = query(77, "SHARED.Example.TEST");
        let parsed = parsed(&waiter);
        let asked = parsed_head(&leader);
        let shared = shared_answer(&answer, &asked, &parsed, parsed.head(&waiter), false).unwrap();
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
        let over_udp = shared_answer(&answer, &asked, &parsed, parsed.head(&waiter), true).unwrap();
        assert_ne!(over_udp[2] & 0x02, 0, "TC");
        assert_eq!(over_udp[..2], 77u16.to_be_bytes());
        // Nor an answer whose question is not, letter for letter, the one asked: it would
        // fail the first client's 0x20 check.
        let asked_otherwise = parsed_head(&query(1, "Shared.example.test"));
        assert!(
            shared_answer(
                &answer,
                &asked_otherwise,
                &parsed,
                parsed.head(&waiter),
                false
            )
            .is_none()
        );
    }

    /// A query for `name` with EDNS and these options.
    fn query_with_options(id: u16, name: &str, options: &[(u16, &[u8])]) -> Vec<u8> {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        for (code, data) in options {
            edns.options_mut()
                .insert(EdnsOption::Unknown(*code, data.to_vec()));
        }
        query_message(id, name, Some(edns)).to_vec().unwrap()
    }

    #[test]
    fn only_queries_of_the_plain_shape_are_cached_and_their_header_bits_are_in_the_key() {
        let plain = query_with_options(1, "shape.example.test", &[]);
        assert!(CacheableQuery::parse(SERVER, &plain).is_some());
        // A cookie or padding says nothing about the answer.
        let cookie = query_with_options(1, "shape.example.test", &[(10, &[1; 8]), (12, &[0; 4])]);
        assert_eq!(parsed(&cookie).key, parsed(&plain).key);
        // NSID, or anything else the cache does not know, may change it.
        let nsid = query_with_options(1, "shape.example.test", &[(3, &[])]);
        assert!(CacheableQuery::parse(SERVER, &nsid).is_none());
        // EDNS version 1 (BADVERS), trailing bytes, two OPTs, a record in another section,
        // the Z bit: not the shape of a stub's query.
        let mut version1 = plain.clone();
        let opt = find_opt(&version1).unwrap().0;
        version1[opt + 6] = 1; // the OPT's TTL: extended RCODE, then version
        let mut trailing = plain.clone();
        trailing.push(0);
        let mut two_opts = plain.clone();
        two_opts.extend_from_slice(&plain[opt..]);
        two_opts[11] = 2;
        let mut answer_section = plain.clone();
        answer_section[7] = 1;
        let mut z = plain.clone();
        z[3] |= 0x40;
        for odd in [&version1, &trailing, &two_opts, &answer_section, &z] {
            assert!(CacheableQuery::parse(SERVER, odd).is_none(), "{odd:?}");
        }
        // AD and RD change what a server answers: they are in the key.
        let mut ad = plain.clone();
        ad[3] |= 0x20;
        let mut no_rd = plain.clone();
        no_rd[2] &= !0x01;
        assert_ne!(parsed(&ad).key, parsed(&plain).key);
        assert_ne!(parsed(&no_rd).key, parsed(&plain).key);
    }

    #[test]
    fn answers_that_fail_the_case_check_or_carry_an_extended_rcode_or_a_top_bit_ttl_are_not_kept() {
        let cache = Cache::new(settings());
        let now = Instant::now();
        // The upstream answered in another letter case than the client asked.
        let asked = query(1, "CaSe.example.test");
        let mut answer = a_answer(&asked, &[60]);
        answer[HEADER_LEN + 1..HEADER_LEN + 5].copy_from_slice(b"CASE");
        assert!(!keeps(&cache, &asked, &answer, now));
        // BADCOOKIE (extended RCODE 1, header RCODE 7): about the client's cookie.
        let with_cookie = query_with_options(1, "cookie.example.test", &[(10, &[1; 8])]);
        let mut bad_cookie = a_answer(&with_cookie, &[60]);
        let opt = find_opt(&bad_cookie).unwrap().0;
        bad_cookie[opt + 5] = 1;
        assert!(!keeps(&cache, &with_cookie, &bad_cookie, now));
        // A TTL with its top bit set reads as 0 (RFC 2181 §8).
        let top_bit = query(1, "topbit.example.test");
        assert!(!keeps(
            &cache,
            &top_bit,
            &a_answer(&top_bit, &[0x8000_0000]),
            now
        ));
    }

    /// The answer to another query with the same ID (a TCP client may reuse one in flight)
    /// must not be kept under this one's key: RD, CD, the OPT and its DO bit must be this
    /// query's.
    #[test]
    fn answers_that_do_not_carry_back_the_querys_bits_are_not_kept() {
        let cache = Cache::new(settings());
        let now = Instant::now();
        let asked = query(1, "bits.example.test");
        let answer = a_answer(&asked, &[60]);
        let mut checking_disabled = answer.clone();
        checking_disabled[3] |= 0x10;
        assert!(!keeps(&cache, &asked, &checking_disabled, now), "CD set");
        let mut no_recursion = answer.clone();
        no_recursion[2] &= !0x01;
        assert!(!keeps(&cache, &asked, &no_recursion, now), "RD clear");
        let mut cd_query = asked.clone();
        cd_query[3] |= 0x10;
        assert!(!keeps(&cache, &cd_query, &answer, now), "CD not copied");
        // An OPT in the answer to a query without EDNS.
        let edns_query = query_with_options(1, "bits.example.test", &[]);
        let with_opt = a_answer(&edns_query, &[60]);
        assert!(
            !keeps(&cache, &asked, &with_opt, now),
            "OPT to a plain query"
        );
        // DO set in the answer, not in the query.
        let mut dnssec_ok = with_opt.clone();
        let opt = find_opt(&dnssec_ok).unwrap().0;
        dnssec_ok[opt + 7] |= 0x80;
        assert!(!keeps(&cache, &edns_query, &dnssec_ok, now), "DO not asked");
        assert!(keeps(&cache, &edns_query, &with_opt, now));
        assert!(keeps(&cache, &asked, &answer, now));
        assert!(keeps(&cache, &cd_query, &checking_disabled, now));
    }

    #[test]
    fn a_kept_answer_loses_its_clients_cookie_and_shows_no_ttl_beyond_the_cap() {
        let cache = Cache::new(settings());
        let now = Instant::now();
        let asked = query_with_options(1, "cookie.example.test", &[(10, &[7; 8])]);
        let mut answer = response_to(&asked, ResponseCode::NoError);
        let name = answer.queries()[0].name().clone();
        answer.add_answer(Record::from_rdata(
            name,
            7200,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 9))),
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.options_mut()
            .insert(EdnsOption::Unknown(10, [[7; 8], [9; 8]].concat()));
        answer.set_edns(edns);
        let answer = answer.to_vec().unwrap();
        assert!(keeps(&cache, &asked, &answer, now));
        let other = query_with_options(2, "cookie.example.test", &[(10, &[8; 8])]);
        let shown = fresh(cache.lookup(&parsed(&other), &other, true, now));
        let message = Message::from_vec(&shown).unwrap();
        let options = message
            .extensions()
            .as_ref()
            .unwrap()
            .options()
            .as_ref()
            .len();
        assert_eq!(options, 0, "no cookie of another client's");
        // Kept an hour at most (the settings' cap): shown so, not two.
        assert_eq!(ttls(&shown), [settings().max_ttl.as_secs() as u32]);
        // A client that holds a server cookie is shown its own cookie back, as its server
        // would (a resolver that checks it would take the answer for a forgery otherwise),
        // and still no one else's, whether the answer is kept or shared.
        let own = [[8; 8], [5; 8]].concat();
        let holder = query_with_options(3, "cookie.example.test", &[(10, &own)]);
        let holder_query = parsed(&holder);
        let shown = fresh(cache.lookup(&holder_query, &holder, true, now));
        let shared = shared_answer(
            &answer,
            holder_query.head(&asked),
            &holder_query,
            holder_query.head(&holder),
            true,
        )
        .unwrap();
        for shown in [shown, shared] {
            let message = Message::from_vec(&shown).unwrap();
            let edns = message.extensions().as_ref().unwrap();
            let cookies: Vec<_> = edns.options().as_ref().iter().map(|(_, o)| o).collect();
            assert_eq!(cookies, [&EdnsOption::Unknown(10, own.clone())]);
            assert_eq!(message.answers().len(), 1);
        }
    }

    #[test]
    fn transfers_are_never_cached_nor_answers_with_two_opts_or_an_opt_before_other_records() {
        let mut axfr = query(1, "zone.example.test");
        let at = axfr.len() - 4;
        axfr[at..at + 2].copy_from_slice(&252u16.to_be_bytes());
        assert!(CacheableQuery::parse(SERVER, &axfr).is_none());
        let cache = Cache::new(settings());
        let now = Instant::now();
        // Two OPTs in an answer: malformed.
        let asked = query_with_options(1, "two.example.test", &[]);
        let answer = a_answer(&asked, &[60]);
        let opt = find_opt(&answer).unwrap();
        let mut two_opts = answer.clone();
        two_opts.extend_from_slice(&answer[opt.0..opt.1]);
        two_opts[11] = 2;
        assert!(!keeps(&cache, &asked, &two_opts, now));
        // A cookie in an OPT followed by another record: removing it would move names that
        // later records point at.
        let asked = query_with_options(1, "mid.example.test", &[(10, &[1; 8])]);
        let mut answer = response_to(&asked, ResponseCode::NoError);
        let name = answer.queries()[0].name().clone();
        answer.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Unknown(10, vec![1; 16]));
        answer.set_edns(edns);
        let mut bytes = answer.to_vec().unwrap();
        // Append a record after the OPT (an A for the question's name, by pointer).
        bytes.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 2]);
        bytes[11] = 2;
        assert!(!keeps(&cache, &asked, &bytes, now));
    }

    #[test]
    fn a_servfail_never_replaces_an_answer_kept_for_serve_stale_and_is_never_stale_itself() {
        let cache = Cache::new(CacheSettings {
            serve_stale: Duration::from_secs(600),
            ..settings()
        });
        let asked = query(1, "kept.example.test");
        let now = Instant::now();
        assert!(keeps(&cache, &asked, &a_answer(&asked, &[10]), now));
        let later = now + Duration::from_secs(20);
        let servfail = response_to(&asked, ResponseCode::ServFail)
            .to_vec()
            .unwrap();
        assert!(!keeps(&cache, &asked, &servfail, later));
        match cache.lookup(&parsed(&asked), &asked, true, later) {
            Cached::Stale {
                answer,
                upstream_failing,
            } => {
                assert_eq!(ttls(&answer), [STALE_TTL]);
                assert!(upstream_failing);
            }
            other => panic!("the kept answer, stale: {other:?}"),
        }
        // A SERVFAIL kept on its own is gone after its 5 s, not served stale.
        let alone = query(1, "alone.example.test");
        let servfail = response_to(&alone, ResponseCode::ServFail)
            .to_vec()
            .unwrap();
        assert!(keeps(&cache, &alone, &servfail, now));
        let after = now + Duration::from_secs(6);
        assert_eq!(
            cache.lookup(&parsed(&alone), &alone, true, after),
            Cached::Miss
        );
    }

    #[test]
    fn a_cname_chain_to_nodata_is_kept_for_the_soa_minimum() {
        let cache = Cache::new(settings());
        let asked = query(1, "alias.example.test");
        let mut answer = response_to(&asked, ResponseCode::NoError);
        let name = answer.queries()[0].name().clone();
        let target = Name::from_ascii("target.example.test.").unwrap();
        answer.add_answer(Record::from_rdata(
            name,
            300,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(target)),
        ));
        let zone = Name::from_ascii("example.test.").unwrap();
        let soa = SOA::new(
            Name::from_ascii("ns.example.test.").unwrap(),
            Name::from_ascii("admin.example.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            2,
        );
        answer.add_name_server(Record::from_rdata(zone, 300, RData::SOA(soa)));
        let now = Instant::now();
        assert!(keeps(&cache, &asked, &answer.to_vec().unwrap(), now));
        assert!(matches!(
            cache.lookup(&parsed(&asked), &asked, true, now + Duration::from_secs(1)),
            Cached::Fresh(_)
        ));
        assert_eq!(
            cache.lookup(&parsed(&asked), &asked, true, now + Duration::from_secs(3)),
            Cached::Miss,
            "kept for the SOA's MINIMUM, 2 s, not the CNAME's 300"
        );
    }

    #[test]
    fn an_answer_the_upstream_failed_to_refresh_is_served_stale_at_once_for_30_s() {
        let cache = Cache::new(CacheSettings {
            serve_stale: Duration::from_secs(600),
            ..settings()
        });
        let asked = query(1, "failing.example.test");
        let now = Instant::now();
        assert!(keeps(&cache, &asked, &a_answer(&asked, &[10]), now));
        let later = now + Duration::from_secs(11);
        let stale = |at| match cache.lookup(&parsed(&asked), &asked, true, at) {
            Cached::Stale {
                upstream_failing, ..
            } => upstream_failing,
            other => panic!("not stale: {other:?}"),
        };
        assert!(!stale(later));
        cache.upstream_failed(&parsed(&asked).key, later);
        assert!(stale(later + Duration::from_secs(29)));
        assert!(!stale(later + Duration::from_secs(31)));
    }

    fn parsed_head(message: &[u8]) -> Vec<u8> {
        parsed(message).head(message).to_vec()
    }

    #[test]
    fn an_answer_scoped_to_a_client_subnet_is_not_kept() {
        let cache = Cache::new(settings());
        // An EDNS query, without a subnet of its own (one would make it uncacheable).
        let q = query_with_options(1, "ecs.example.test.", &[]);
        let plain = query(1, "ecs.example.test.");
        let with_scope = |scope| with_client_subnet(a_answer(&plain, &[300]), scope);
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
