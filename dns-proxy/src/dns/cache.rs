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

use crate::dns::wire::{
    self, HEADER_LEN, Reader, TYPE_OPT, count, find_opt, option, options, records,
};

/// A SERVFAIL is kept at most this long (RFC 2308 §7.1).
const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(5);
/// The TTL of a stale answer (RFC 8767 §4).
pub const STALE_TTL: u32 = 30;
/// The UDP payload a client without EDNS can take (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;
/// The largest UDP answer DNS Flag Day 2020's servers send, whatever a client takes.
const FLAG_DAY_UDP_SIZE: usize = 1232;
/// Bytes counted for an entry beyond its answer: the key, the offsets, the map's own.
const ENTRY_OVERHEAD: usize = 128;

const TYPE_SOA: u16 = 6;
/// The meta classes (RFC 6895 §3.2).
const CLASS_IN: u16 = 1;
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
    /// Where its client cookie, the first 8 bytes of its COOKIE option, lies in the query:
    /// each client has its own, so two clients' queries differ there and nowhere else.
    pub client_cookie_at: Option<usize>,
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
        // The Internet class alone. A CHAOS query (version.bind, id.server: RFC 4892) asks
        // which server instance answers, and no cache is that instance; an answer to the
        // meta classes NONE and ANY (RFC 6895 §3.2) depends on what the server holds in
        // which class, not one RRset to keep; the others are all but unused.
        if qclass != CLASS_IN {
            return None;
        }
        let question_end = reader.offset;
        let mut cookie = None;
        let mut client_cookie_at = None;
        let edns = match count(query, 10)? {
            0 => None,
            1 => {
                let owner_is_root = *query.get(reader.offset)? == 0;
                let record = reader.record()?;
                let (extended_rcode, version) = (record.ttl >> 24, (record.ttl >> 16) & 0xff);
                // EDNS flags other than DO (the compact-denial CO bit, say) may change the
                // answer, and the key holds only DO.
                let other_flags = record.ttl & 0x7fff;
                if record.rtype != TYPE_OPT
                    || !owner_is_root
                    || extended_rcode != 0
                    || version != 0
                    || other_flags != 0
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
                // One COOKIE option of a length RFC 7873 §4 allows: 8 bytes of the client's
                // own, and 8 to 32 of its server's. A server answers a malformed one with
                // FORMERR, or not at all (§5.2.2): that is no answer for anyone else.
                let mut cookies = options.iter().filter(|(code, _)| *code == OPTION_COOKIE);
                if let Some((_, at)) = cookies.next() {
                    let length = at.len() - 4;
                    if cookies.next().is_some() || !(length == 8 || (16..=40).contains(&length)) {
                        return None;
                    }
                    client_cookie_at = Some(at.start + 4);
                    if length > 8 {
                        cookie = Some(query[at.start + 4..at.end].into());
                    }
                }
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
            client_cookie_at,
        })
    }

    /// What its UDP size says of the answer the upstream gives it: below 1,232 bytes, that
    /// size (a server may trim or truncate to fit it); from 1,232 up, any (`usize::MAX`): the
    /// servers of DNS Flag Day 2020 (BIND, Unbound, Knot, PowerDNS) send no UDP answer larger
    /// than 1,232 bytes, whatever the client takes, so a larger size is asked the same.
    pub fn fetch_size(&self) -> usize {
        if self.udp_limit >= FLAG_DAY_UDP_SIZE {
            usize::MAX
        } else {
            self.udp_limit
        }
    }

    /// The client's header and question, out of its whole query: all an answer kept or
    /// shared for it needs of it.
    pub fn head<'a>(&self, query: &'a [u8]) -> &'a [u8] {
        &query[..self.question_end.min(query.len())]
    }
}

/// `answer`, the upstream's answer to an identical query whose header and question are
/// `asked` and whose [`fetch_size`](CacheableQuery::fetch_size) was `asked_limit`, for another client whose query is `query`
/// with `head` ([`CacheableQuery::head`]): with that client's ID and question bytes, without
/// the first client's cookie and padding, and truncated past its UDP limit when `udp` is set.
/// `None` if it is not to be shared, because it answers the first query rather than the name:
/// - it has no question (what matched the one asked may be a forged record's owner), or
///   its question is not exactly the one asked (it would fail the first client's
///   letter-case check);
/// - it is truncated, and the other client takes more than the first (it may not be
///   truncated for it);
/// - its RCODE is not NOERROR, NXDOMAIN or SERVFAIL (FORMERR, REFUSED, an extended RCODE:
///   about the first query's EDNS or cookie, say).
pub fn shared_answer(
    answer: &[u8],
    asked: &[u8],
    asked_limit: usize,
    query: &CacheableQuery,
    head: &[u8],
    udp: bool,
) -> Option<Vec<u8>> {
    if answer.len() < HEADER_LEN || head.len() < HEADER_LEN || asked.len() < HEADER_LEN {
        return None;
    }
    let cut_short = answer[2] & 0x02 != 0 && query.fetch_size() > asked_limit;
    let rcode = answer[3] & 0x0f;
    if answer.get(HEADER_LEN..asked.len()) != asked.get(HEADER_LEN..)
        || cut_short
        // With no question, the bytes compared above may be a record's (forged to match).
        || count(answer, 4)? != 1
        || !matches!(rcode, RCODE_NOERROR | RCODE_NXDOMAIN | RCODE_SERVFAIL)
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
    let mut reader = Reader::new(answer, HEADER_LEN);
    reader.plain_name()?;
    let question_end = reader.offset + 4;
    if question_end != head.len() || question_end > answer.len() {
        return None;
    }
    shared[HEADER_LEN..question_end].copy_from_slice(&head[HEADER_LEN..]);
    if udp && shared.len() > query.udp_limit {
        shared = truncated(&shared, query.key.edns, query.udp_limit);
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
    /// The [`fetch_size`](CacheableQuery::fetch_size) of the query it answered (`usize::MAX`
    /// over TCP): a server may leave optional records out of an answer that would not fit,
    /// without truncating it (RFC 2181 §9), so a UDP client that takes more is asked for again
    /// rather than shown less.
    fetched_within: usize,
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
    /// An answer to send only if the upstream fails: expired within `--serve-stale` (shown
    /// with TTL 30, at most `--cache-max-ttl`), or live but fetched for a smaller UDP size
    /// than this client's (TTLs counted down). `upstream_failing` if the upstream failed to
    /// refresh it in the last 30 s, when it may be served at once.
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
        // Fetched for a smaller UDP size than this client's: the upstream may have left
        // records out that it would get (RFC 2181 §9 lets it leave out what is optional to
        // fit the size asked, without TC). Asked for again, and shown only if that fails. A
        // TCP client takes any size, so only an answer fetched for any size is complete for
        // it: over TCP, or for a UDP size of 1,232 or more (`fetch_size`).
        let wanted = if udp { query.fetch_size() } else { usize::MAX };
        let complete = wanted <= entry.fetched_within;
        let age = now.saturating_duration_since(entry.stored);
        let upstream_failing = entry
            .failed
            .is_some_and(|failed| now.saturating_duration_since(failed) < FAILURE_RECHECK);
        let (answer, fresh) = if age < entry.lifetime {
            (
                for_client(entry, client_query, whole_seconds_begun(age), None),
                complete,
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
            answer = truncated(&answer, query.key.edns, query.udp_limit);
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

    /// Notes that the upstream failed to refresh `key`'s answer, now stale, for a query asked
    /// at `asked`: for 30 s from the first such failure it may be served stale at once (RFC
    /// 8767 §5). Not if a fresh answer was kept since that query was asked (helper-175: a
    /// refresh lost after another client's had succeeded marked the fresh answer failing),
    /// and a failure within the 30 s does not start them again (an upstream back at 3 s was
    /// seen at 36 s, the timeout's failure at 5 s having restarted them).
    pub fn upstream_failed(&self, key: &CacheKey, asked: Instant, now: Instant) {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.peek_mut(key) else {
            return;
        };
        let failing = entry
            .failed
            .is_some_and(|failed| now.saturating_duration_since(failed) < FAILURE_RECHECK);
        if entry.stored <= asked && !failing {
            entry.failed = Some(now);
        }
    }

    /// Keeps `answer`, the upstream's answer to `query` (whose header and question are
    /// `head`, asked over UDP if `udp` is set), if the RFCs let it be kept, for as long as they
    /// say, without the options that were for its client alone. Returns whether it was kept.
    pub fn store(
        &self,
        query: &CacheableQuery,
        head: &[u8],
        answer: &[u8],
        udp: bool,
        now: Instant,
    ) -> bool {
        let Some(answer) = without_client_options(answer) else {
            return false;
        };
        let Some(mut entry) = cacheable(query, head, &answer, self.settings.max_ttl, now) else {
            return false;
        };
        if udp {
            entry.fetched_within = query.fetch_size();
        }
        let size = entry.bytes();
        if size > self.settings.max_bytes {
            return false;
        }
        let mut inner = self.lock();
        // Nor does an answer fetched for a smaller size push out a live one fetched for a
        // larger (a slower client's answer, come last): larger clients would ask again.
        if let Some(kept) = inner.entries.peek(&query.key)
            && kept.fetched_within > entry.fetched_within
            && now.saturating_duration_since(kept.stored) < kept.lifetime
        {
            return false;
        }
        // A SERVFAIL does not push out an answer still kept for serve-stale: it is the failure
        // that answer is kept for (RFC 8767).
        if entry.servfail
            && let Some(kept) = inner.entries.peek_mut(&query.key)
            && !kept.servfail
            && now.saturating_duration_since(kept.stored)
                < kept.lifetime.saturating_add(self.settings.serve_stale)
        {
            // Within 30 s of a failure, not started again (`upstream_failed`).
            if kept
                .failed
                .is_none_or(|failed| now.saturating_duration_since(failed) >= FAILURE_RECHECK)
            {
                kept.failed = Some(now);
            }
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
            // A name a client cannot read (a pointer loop) makes a malformed answer: relayed
            // as it came, never kept.
            if !wire::name_is_sound(answer, reader.offset) {
                return None;
            }
            let record = reader.record()?;
            if !rdata_names_are_sound(answer, &record) {
                return None;
            }
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
            // In a negative answer (NXDOMAIN, or NODATA: NOERROR with no record of the type
            // asked), the SOA's TTL is at most its MINIMUM (RFC 2308 §5); in any other, the
            // SOA is one more record, with its own TTL.
            let negative = rcode == RCODE_NXDOMAIN || (rcode == RCODE_NOERROR && !answers_the_type);
            if section == 1 && record.rtype == TYPE_SOA && negative {
                // SOA rdata: two names, then serial, refresh, retry, expire, minimum.
                let mut rdata = Reader::new(answer, record.rdata_start);
                rdata.skip_name()?;
                rdata.skip_name()?;
                rdata.offset += 16;
                let minimum = rdata.u32()?;
                if rdata.offset > record.rdata_end {
                    return None;
                }
                // A TTL, read as one: with its top bit set it is 0 (RFC 2181 §8). Before, a
                // MINIMUM of 2^31 let the SOA's own TTL stand (helper-121).
                let minimum = if minimum & 0x8000_0000 != 0 {
                    0
                } else {
                    minimum
                };
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
    // No TTL shown goes past how long the answer is kept: not past `--cache-max-ttl` (a
    // SERVFAIL's 5 s: before, its SOA was shown with 29 s left), and not past the least TTL
    // of the message, which sets when it is asked for again. RFC 2181 §5.2 has a cache read
    // an RRset of mixed TTLs as all of its least; before, a record of TTL 100 beside one of
    // 4 was shown 29 s from an answer kept 4 s (helper-161), and a client's own cache kept
    // it past the agent's.
    let lifetime_seconds = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    for (_, ttl) in &mut ttls {
        *ttl = (*ttl).min(lifetime_seconds);
    }
    Some(Entry {
        answer: answer.into(),
        ttls,
        question_end,
        fetched_within: usize::MAX,
        stored: now,
        lifetime,
        failed: None,
        servfail: rcode == RCODE_SERVFAIL,
    })
}

/// The seconds `age` has begun: a TTL counted down by them shows at most the time left, where
/// one counted down by whole seconds gone showed up to a second more (29 s, 1.5 s into 30).
fn whole_seconds_begun(age: Duration) -> u32 {
    let begun = age.as_secs() + u64::from(age.subsec_nanos() > 0);
    u32::try_from(begun).unwrap_or(u32::MAX)
}

/// `entry`'s answer for the client whose query is `client_query`: its ID, its question
/// bytes, and each TTL less `age` seconds (or all set to `stale_ttl`). The header flags stay
/// as the upstream sent them, AA included: the client asked that server, and stub resolvers
/// take an answer with no records and neither AA nor RA for a lame referral (glibc's
/// `res_send`, Go's `checkHeader`), so an authoritative-only server's answer with AA cleared
/// failed from the cache where it resolved fresh. `None` if the client's question is not the
/// same length as the kept one (it then asked something else).
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

/// Whether the names in `record`'s data, for the types that hold names a client decompresses,
/// can be read whole ([`wire::name_is_sound`]).
fn rdata_names_are_sound(answer: &[u8], record: &wire::Record) -> bool {
    const NS: u16 = 2;
    const CNAME: u16 = 5;
    const PTR: u16 = 12;
    const MX: u16 = 15;
    const SRV: u16 = 33;
    const DNAME: u16 = 39;
    let start = record.rdata_start;
    match record.rtype {
        NS | CNAME | PTR | DNAME => wire::name_is_sound(answer, start),
        MX => wire::name_is_sound(answer, start + 2),
        SRV => wire::name_is_sound(answer, start + 6),
        TYPE_SOA => {
            let mut rdata = Reader::new(answer, start);
            wire::name_is_sound(answer, start)
                && rdata.skip_name().is_some()
                && wire::name_is_sound(answer, rdata.offset)
        }
        _ => true,
    }
}

/// A truncated answer (TC set) with only the question, and the OPT record for an EDNS client
/// (RFC 6891 §7), within `limit` bytes: its options left out if they would not fit (an
/// upstream's long Extended DNS Error text, say). The client retries over TCP.
fn truncated(answer: &[u8], edns: bool, limit: usize) -> Vec<u8> {
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
    if edns && let Some((start, end)) = find_opt(answer) {
        let opt = &answer[start..end];
        // Its root name, type, class (the UDP size), TTL (extended RCODE and flags) and
        // RDLENGTH come first.
        const FIXED: usize = 11;
        if out.len() + opt.len() <= limit {
            out.extend_from_slice(opt);
        } else if opt.len() >= FIXED {
            out.extend_from_slice(&opt[..FIXED - 2]);
            out.extend_from_slice(&[0, 0]);
        }
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
pub(crate) mod tests;
