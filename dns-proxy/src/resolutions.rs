//! Which names resolved to which addresses, for each workload (issue 17): the A and AAAA
//! records of the answers the agent relayed, with the name the workload asked and when each
//! expires. A connection's destination can then be tied to the name its workload looked up,
//! as FQDN policies and identity proxies need. Served as JSON at `/v1/resolutions` on the
//! metrics port.
//!
//! Bounded: at most [`MAX_ENTRIES`] (workload, address, name) entries and [`MAX_BYTES`] of
//! them; expired entries are not shown. Past the bound, the workload that holds the most bytes
//! gives up its least recently recorded entry, so a workload that floods the table pushes out
//! its own entries, not another's. Before, one least-recently-recorded list served all: a
//! workload's 1,100 lookups of 64 addresses each (0.3 s) emptied every other workload's
//! entries (helper-124).
use std::{
    cell::RefCell,
    cmp::Reverse,
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hashlink::LruCache;

use crate::{
    dns::{
        Moment,
        wire::{self, HEADER_LEN, Reader, count},
    },
    workload::WorkloadNames,
};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 65_536;
/// Bytes the entries may take at most, names included (an entry with a long name takes
/// about 400).
pub const MAX_BYTES: usize = 8 << 20;
/// Bytes counted for an entry beyond its name: the key, the expiry, the map's own.
const ENTRY_OVERHEAD: usize = 96;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// An entry of one workload's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    address: IpAddr,
    name: Box<str>,
}

/// The table, shared by every listener.
pub struct Resolutions {
    entries: Mutex<Entries>,
    workloads: Arc<WorkloadNames>,
}

#[derive(Default)]
struct Entries {
    by_cgroup: HashMap<u64, Held>,
    /// Every cgroup that holds entries, by (bytes, least recently recorded first): the one to
    /// give up an entry is the last.
    by_size: BTreeSet<(usize, Reverse<u64>, u64)>,
    entries: usize,
    bytes: usize,
    /// Counts records, to tell which cgroup recorded last.
    records: u64,
}

/// One cgroup's entries.
struct Held {
    /// Unbounded: every eviction is this table's own, so bytes are counted. Each entry's
    /// expiry is on the monotonic clock: a step of the wall clock (NTP, an operator) must not
    /// keep an entry past its TTL or hide a live one (helper-136: set back an hour, an answer
    /// with a TTL of 60 s was listed for an hour).
    map: LruCache<Key, Instant, foldhash::fast::RandomState>,
    bytes: usize,
    /// When it last recorded ([`Entries::records`]).
    last: u64,
}

impl Held {
    fn rank(&self, cgroup: u64) -> (usize, Reverse<u64>, u64) {
        (self.bytes, Reverse(self.last), cgroup)
    }
}

impl Entries {
    /// Records `key` for `cgroup`, expiring at `expires`.
    fn insert(&mut self, cgroup: u64, key: Key, expires: Instant) {
        self.records += 1;
        let held = self.by_cgroup.entry(cgroup).or_insert_with(|| Held {
            map: LruCache::with_hasher(usize::MAX, foldhash::fast::RandomState::default()),
            bytes: 0,
            last: 0,
        });
        self.by_size.remove(&held.rank(cgroup));
        match held.map.get_mut(&key) {
            // A later answer with less time left (a cache's, counted down; a server's that
            // lowered the TTL) does not take back what the workload was told before: it may
            // hold the address that long (helper-171: a cache hit 3 s after an answer of
            // 60 s moved the expiry 30 s earlier).
            Some(expiry) => *expiry = (*expiry).max(expires),
            None => {
                let size = key.bytes();
                held.map.insert(key, expires);
                held.bytes += size;
                self.bytes += size;
                self.entries += 1;
            }
        }
        held.last = self.records;
        self.by_size.insert(held.rank(cgroup));
    }

    /// Takes out the least recently recorded entry of the cgroup that holds the most bytes;
    /// whether there was one.
    fn evict_one(&mut self) -> bool {
        let Some(&(_, _, cgroup)) = self.by_size.last() else {
            return false;
        };
        let held = self
            .by_cgroup
            .get_mut(&cgroup)
            .expect("ranked cgroups hold entries");
        self.by_size.remove(&held.rank(cgroup));
        if let Some((evicted, _)) = held.map.remove_lru() {
            held.bytes -= evicted.bytes();
            self.bytes -= evicted.bytes();
            self.entries -= 1;
        }
        if held.map.is_empty() {
            self.by_cgroup.remove(&cgroup);
        } else {
            self.by_size.insert(held.rank(cgroup));
        }
        true
    }
}

impl Key {
    fn bytes(&self) -> usize {
        self.name.len() + ENTRY_OVERHEAD
    }
}

impl std::fmt::Debug for Resolutions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolutions").finish_non_exhaustive()
    }
}

/// One row of `/v1/resolutions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub name: String,
    pub address: IpAddr,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

impl Resolutions {
    pub fn new(workloads: Arc<WorkloadNames>) -> Self {
        Self {
            entries: Mutex::default(),
            workloads,
        }
    }

    /// Records the A and AAAA records of `answer`, relayed to a client of cgroup `cgroup`
    /// (0: not recorded, skipped), under the name its question asked.
    pub fn record(&self, cgroup: u64, answer: &[u8], now: Moment) {
        if cgroup == 0 {
            return;
        }
        let Some((name, addresses)) = unless_recorded_lately(cgroup, answer, now.instant, || {
            let (name, addresses) = addresses(answer)?;
            let least_ttl = addresses.iter().map(|&(_, ttl)| ttl).min()?;
            Some(((name, addresses), least_ttl))
        }) else {
            return;
        };
        // Named now, while the workload's cgroup still exists: a short-lived one (a job) is
        // otherwise gone before anything asks its name, and cannot be looked up by it.
        let _ = self.workloads.full(cgroup);
        let now = now.instant;
        let name: Box<str> = name.into();
        let mut entries = self.lock();
        // A record with TTL 0 is never shown (expired at once): it takes no room.
        for (address, ttl) in addresses.into_iter().filter(|&(_, ttl)| ttl > 0) {
            let key = Key {
                address,
                name: name.clone(),
            };
            entries.insert(cgroup, key, now + Duration::from_secs(u64::from(ttl)));
        }
        while (entries.entries > MAX_ENTRIES || entries.bytes > MAX_BYTES) && entries.evict_one() {}
    }

    /// What workload `workload` (its full form, its short form, or `cgroup-id=N`) resolved
    /// that has not expired, to `address` only if given.
    pub fn lookup(&self, workload: &str, address: Option<IpAddr>) -> Vec<Resolution> {
        self.lookup_at(workload, address, Instant::now(), SystemTime::now())
    }

    /// [`Self::lookup`] at monotonic time `now`, when the wall clock says `wall`.
    fn lookup_at(
        &self,
        workload: &str,
        address: Option<IpAddr>,
        now: Instant,
        wall: SystemTime,
    ) -> Vec<Resolution> {
        let cgroups: Vec<u64> = self.lock().by_cgroup.keys().copied().collect();
        // Named outside the lock: naming may walk the cgroup tree.
        let cgroups: Vec<u64> = cgroups
            .into_iter()
            .filter(|cgroup| self.is_workload(*cgroup, workload))
            .collect();
        let entries: Vec<(Key, Instant)> = {
            let held = self.lock();
            cgroups
                .iter()
                .filter_map(|cgroup| held.by_cgroup.get(cgroup))
                .flat_map(|held| held.map.iter())
                .filter(|(key, expires)| {
                    // A v4-mapped address asked for is its IPv4 address too (a dual-stack
                    // socket's peer, as `ss` shows it; helper-198).
                    **expires > now
                        && address.is_none_or(|address| {
                            key.address == address || key.address == address.to_canonical()
                        })
                })
                .map(|(key, expires)| (key.clone(), *expires))
                .collect()
        };
        let mut found: Vec<Resolution> = entries
            .into_iter()
            .map(|(key, expires)| Resolution {
                name: key.name.into(),
                address: key.address,
                // Shown on the wall clock of now: the time left, from the current time.
                expires: (wall + expires.saturating_duration_since(now))
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs()),
            })
            .collect();
        found.sort_by(|a, b| (&a.name, a.address).cmp(&(&b.name, b.address)));
        found
    }

    fn is_workload(&self, cgroup: u64, workload: &str) -> bool {
        workload == format!("cgroup-id={cgroup}")
            || self
                .workloads
                .full(cgroup)
                .is_some_and(|full| *full == *workload)
            || *self.workloads.name(cgroup) == *workload
    }

    /// (entries, bytes) kept now.
    pub fn size(&self) -> (usize, usize) {
        let entries = self.lock();
        (entries.entries, entries.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How long an answer recorded for a cgroup is not recorded again: a tenth of its least TTL,
/// at least [`RECORDED_LATELY_MIN`] and at most [`RECORDED_LATELY_MAX`]. The same answer (its
/// ID aside) comes back over and over; recording it anew only moves its expiry on, so what
/// `/v1/resolutions` shows is earlier than the last answer's by that window at most. With a
/// TTL of 2 s or more (longer than the window), an entry does not expire while its workload
/// keeps getting the answer, unless a full table pushed it out (it is back within the window).
const RECORDED_LATELY_MIN: Duration = Duration::from_secs(1);
const RECORDED_LATELY_MAX: Duration = Duration::from_secs(10);
/// Answers each thread remembers having recorded (a power of two): the slots of a two-way
/// table, one answer each, 256 KiB a thread.
const REMEMBERED: usize = 16_384;

/// One thread's answers recorded lately: in each slot, the hash of a (cgroup, answer), when
/// it was recorded and for how long it is not recorded again (milliseconds). Each answer has
/// a pair of slots; a new one pushes out the older, so looking up and noting cost one hash
/// and two slots, however many names go by.
struct RecentAnswers {
    keys: foldhash::fast::RandomState,
    started: Instant,
    slots: Box<[RecentSlot]>,
}

#[derive(Debug, Clone, Copy, Default)]
struct RecentSlot {
    hash: u64,
    at: u32,
    window: u32,
}

thread_local! {
    static RECENT: RefCell<Option<RecentAnswers>> = const { RefCell::new(None) };
}

/// `parse(answer)`'s result, unless this thread recorded this answer (its ID aside) for
/// `cgroup` within its window; notes it then. `parse` gives what to record and the answer's
/// least TTL, or `None` when there is nothing to record (the answer is then not looked at
/// again for a second).
fn unless_recorded_lately<T>(
    cgroup: u64,
    answer: &[u8],
    now: Instant,
    parse: impl FnOnce() -> Option<(T, u32)>,
) -> Option<T> {
    let body = answer.get(2..)?;
    RECENT.with_borrow_mut(|recent| {
        let recent = recent.get_or_insert_with(|| RecentAnswers {
            keys: foldhash::fast::RandomState::default(),
            started: now,
            slots: vec![RecentSlot::default(); REMEMBERED].into_boxed_slice(),
        });
        let hash = std::hash::BuildHasher::hash_one(&recent.keys, (cgroup, body));
        // Milliseconds, wrapping every 49 days: a slot then looks fresh for its window at most.
        let now = now.saturating_duration_since(recent.started).as_millis() as u32;
        // Two slots per answer (a pair): the newest goes first and the one it displaces
        // second, so two answers that share a pair do not push each other out.
        let pair = hash as usize & (REMEMBERED - 2);
        // A slot up to a second in the future is fresh too: a batch's answers share the
        // moment it was read, and the cache's waiters answered among them may have read a
        // later one.
        let ahead = RECORDED_LATELY_MIN.as_millis() as u32;
        let fresh = |slot: &RecentSlot| {
            let age = now.wrapping_sub(slot.at);
            age < slot.window || age > u32::MAX - ahead
        };
        let slots = &mut recent.slots[pair..pair + 2];
        if slots.iter().any(|slot| slot.hash == hash && fresh(slot)) {
            return None;
        }
        let parsed = parse();
        let window = parsed
            .as_ref()
            .map_or(RECORDED_LATELY_MIN, |(_, least_ttl)| {
                (Duration::from_secs(u64::from(*least_ttl)) / 10)
                    .clamp(RECORDED_LATELY_MIN, RECORDED_LATELY_MAX)
            });
        // The answer's own stale note is replaced, not kept beside it.
        if slots[0].hash != hash {
            slots[1] = slots[0];
        }
        slots[0] = RecentSlot {
            hash,
            at: now,
            window: window.as_millis() as u32,
        };
        parsed.map(|(recorded, _)| recorded)
    })
}

/// `/v1/resolutions`' JSON for `workload`'s `rows`.
pub fn to_json(workload: &str, rows: &[Resolution]) -> String {
    let mut json = format!("{{\"workload\":{},\"resolutions\":[", quoted(workload));
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let _ = write!(
            json,
            "{{\"name\":{},\"address\":\"{}\",\"expires\":{}}}",
            quoted(&row.name),
            row.address,
            row.expires
        );
    }
    json.push_str("]}\n");
    json
}

/// A JSON string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The question's name (dotted, lower case) and the addresses it resolved to, with their
/// TTLs: the records of the type asked (A or AAAA; both for ANY) in the answer section, owned
/// by that name or by a name its CNAME chain there leads to. Only for a standard query (opcode
/// QUERY) of class IN and type A, AAAA or ANY: a zone transfer's records, or an answer's
/// other records, are no resolution of the name asked (helper-133: an IXFR carrying a
/// record's deletion was tabled as the zone apex resolving to the deleted address). Only a
/// whole NOERROR answer: a resolver throws away the records of a truncated one (it asks again
/// over TCP) and of a failure (helper-198: NXDOMAIN, SERVFAIL and REFUSED answers carrying A
/// records, a truncated one, and an AAAA record answering an A query were all tabled as
/// resolutions glibc never made). `None` if `answer` does not parse.
fn addresses(answer: &[u8]) -> Option<(String, Vec<(IpAddr, u32)>)> {
    const OPCODE_QUERY: u8 = 0;
    const CLASS_IN: u16 = 1;
    const TYPE_CNAME: u16 = 5;
    const TYPE_ANY: u16 = 255;
    const TRUNCATED: u8 = 0x02;
    if count(answer, 4)? != 1 || (answer.get(2)? >> 3) & 0xf != OPCODE_QUERY {
        return None;
    }
    if answer.get(2)? & TRUNCATED != 0 || wire::header_rcode(answer)? != 0 {
        return None;
    }
    let mut reader = Reader::new(answer, HEADER_LEN);
    let asked = reader.plain_name()?;
    let (qtype, qclass) = (reader.u16()?, reader.u16()?);
    if ![TYPE_A, TYPE_AAAA, TYPE_ANY].contains(&qtype) || qclass != CLASS_IN {
        return None;
    }
    // Each record's owner, type, TTL and data.
    let mut records = Vec::new();
    for _ in 0..count(answer, 6)? {
        let start = reader.offset;
        let record = reader.record()?;
        // A record whose owner cannot be read is no one's: the others still count (a
        // server's one unsound name hid the answer's every address; helper-140).
        if record.class == CLASS_IN
            && let Some(owner) = wire::name_at(answer, start)
        {
            records.push((owner, record));
        }
    }
    // The names the answer says the asked one stands for: itself, and its CNAME chain in any
    // order, as long as a resolver would follow one (each link a pass over the records: an
    // answer of thousands of CNAMEs must not cost their square).
    const LONGEST_CHAIN: usize = 16;
    let mut names = vec![asked.to_vec()];
    while names.len() <= LONGEST_CHAIN
        && let Some(target) = records.iter().find_map(|(owner, record)| {
            let target = (record.rtype == TYPE_CNAME && names.contains(owner))
                .then(|| wire::name_at(answer, record.rdata_start))??;
            (!names.contains(&target)).then_some(target)
        })
    {
        names.push(target);
    }
    let mut found = Vec::new();
    for (owner, record) in &records {
        if !names.contains(owner) {
            continue;
        }
        let rdata = &answer[record.rdata_start..record.rdata_end];
        let ttl = if record.ttl & 0x8000_0000 != 0 {
            0
        } else {
            record.ttl
        };
        if record.rtype != qtype && qtype != TYPE_ANY {
            continue;
        }
        let address = match (record.rtype, rdata.len()) {
            (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(rdata).ok()?)),
            (TYPE_AAAA, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).ok()?)),
            _ => continue,
        };
        found.push((address, ttl));
    }
    Some((dotted(&asked), found))
}

/// A name in wire form (labels, each after its length) as dotted text, in the presentation
/// format of RFC 1035 §5.1, as dig writes it: a dot, backslash, `"`, `(`, `)`, `;`, `@` or `$`
/// inside a label after a backslash, other bytes than printable ASCII as `\DDD` (decimal),
/// the root as `.`. So no two names read alike
/// (helper-198: the one label `a.b` was shown, and tabled, as the two labels `a` and `b`, and
/// bytes that are not UTF-8 all as U+FFFD).
fn dotted(wire: &[u8]) -> String {
    let mut name = String::new();
    let mut at = 0;
    while let Some(&len) = wire.get(at).filter(|len| **len != 0) {
        let label = wire
            .get(at + 1..at + 1 + usize::from(len))
            .unwrap_or_default();
        for &byte in label {
            match byte {
                // RFC 1035's special characters, escaped as dig writes them.
                b'.' | b'\\' | b'"' | b'(' | b')' | b';' | b'@' | b'$' => {
                    name.push('\\');
                    name.push(char::from(byte));
                }
                b'!'..=b'~' => name.push(char::from(byte)),
                _ => {
                    let _ = write!(name, "\\{byte:03}");
                }
            }
        }
        name.push('.');
        at += 1 + usize::from(len);
    }
    if name.is_empty() {
        name.push('.');
    }
    name
}

#[cfg(test)]
pub(crate) mod tests {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    /// An answer for `name` (asked with type ANY): a CNAME to edge.example.net., which has
    /// 192.0.2.80 (TTL 60) and 2001:db8::80 (TTL 30).
    pub(crate) fn answer(name: &str) -> Vec<u8> {
        let name = Name::from_ascii(name).unwrap();
        let target = Name::from_ascii("edge.example.net.").unwrap();
        let mut message = Message::new();
        message
            .set_id(1)
            .set_message_type(MessageType::Response)
            .add_query(Query::query(name.clone(), RecordType::ANY));
        message.add_answer(Record::from_rdata(
            name,
            300,
            RData::CNAME(CNAME(target.clone())),
        ));
        message.add_answer(Record::from_rdata(
            target.clone(),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 80))),
        ));
        message.add_answer(Record::from_rdata(
            target,
            30,
            RData::AAAA(AAAA("2001:db8::80".parse().unwrap())),
        ));
        message.to_vec().unwrap()
    }

    #[test]
    fn the_addresses_of_an_answer_are_read_under_the_name_asked() {
        let (name, found) = addresses(&answer("WWW.Example.test.")).unwrap();
        assert_eq!(name, "www.example.test.");
        assert_eq!(
            found,
            [
                (IpAddr::from([192, 0, 2, 80]), 60),
                ("2001:db8::80".parse().unwrap(), 30)
            ]
        );
        assert_eq!(addresses(&[0; 5]), None);
    }

    /// An answer to `qtype` for a.example.test.: an unrelated A record, then the chain's end
    /// (b.example.test. has 192.0.2.2), then its CNAMEs (a.example.test. to c.example.test.
    /// to b.example.test.), out of order.
    fn answer_of(qtype: RecordType) -> Vec<u8> {
        let name = |text: &str| Name::from_ascii(text).unwrap();
        let mut message = Message::new();
        message
            .set_id(1)
            .set_message_type(MessageType::Response)
            .add_query(Query::query(name("a.example.test."), qtype));
        for (owner, rdata) in [
            (
                "other.example.test.",
                RData::A(A(Ipv4Addr::new(192, 0, 2, 99))),
            ),
            ("b.example.test.", RData::A(A(Ipv4Addr::new(192, 0, 2, 2)))),
            (
                "c.example.test.",
                RData::CNAME(CNAME(name("b.example.test."))),
            ),
            (
                "A.example.test.",
                RData::CNAME(CNAME(name("C.example.test."))),
            ),
        ] {
            message.add_answer(Record::from_rdata(name(owner), 60, rdata));
        }
        message.to_vec().unwrap()
    }

    /// Only the name asked and its CNAME chain resolve, and only for the address types (and
    /// ANY): helper-133 had an IXFR's deleted record, and an AXFR's hosts, tabled as the
    /// zone's apex resolving to their addresses.
    #[test]
    fn only_the_name_asked_and_its_chain_resolve_and_only_in_answers_to_addresses() {
        for qtype in [RecordType::A, RecordType::ANY] {
            let (name, found) = addresses(&answer_of(qtype)).unwrap();
            assert_eq!(name, "a.example.test.");
            assert_eq!(found, [(IpAddr::from([192, 0, 2, 2]), 60)], "{qtype}");
        }
        for qtype in [RecordType::AXFR, RecordType::IXFR, RecordType::MX] {
            assert_eq!(addresses(&answer_of(qtype)), None, "{qtype}");
        }
        // A chain longer than a resolver follows ends nowhere: 20 links, in reverse order, and
        // the address at their end.
        let name = |i: usize| Name::from_ascii(format!("n{i}.example.test.")).unwrap();
        let mut long = Message::new();
        long.set_message_type(MessageType::Response)
            .add_query(Query::query(name(0), RecordType::A));
        long.add_answer(Record::from_rdata(
            name(20),
            60,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ));
        for i in (0..20).rev() {
            long.add_answer(Record::from_rdata(
                name(i),
                60,
                RData::CNAME(CNAME(name(i + 1))),
            ));
        }
        let (_, found) = addresses(&long.to_vec().unwrap()).unwrap();
        assert!(found.is_empty(), "{found:?}");
        // A record whose owner name points forward (unsound) is skipped, not the answer.
        let mut unsound = answer_of(RecordType::A);
        let pointer = 1
            + unsound
                .windows(7)
                .position(|window| window == b"\x05other\xc0")
                .unwrap()
            + 6;
        let forward = u8::try_from(unsound.len() - 2).unwrap();
        unsound[pointer] = forward;
        let (_, found) = addresses(&unsound).unwrap();
        assert_eq!(found, [(IpAddr::from([192, 0, 2, 2]), 60)]);
        // The same answer under another opcode (NOTIFY).
        let mut notify = answer_of(RecordType::A);
        notify[2] |= 4 << 3;
        assert_eq!(addresses(&notify), None);
    }

    /// What a resolver throws away resolves nothing: a failure's records, a truncated
    /// answer's, and records of a type not asked (helper-198).
    #[test]
    fn only_a_whole_noerror_answer_and_the_type_asked_resolve() {
        // RCODE NXDOMAIN, SERVFAIL, REFUSED.
        for rcode in [3, 2, 5] {
            let mut failed = answer_of(RecordType::A);
            failed[3] |= rcode;
            assert_eq!(addresses(&failed), None, "rcode {rcode}");
        }
        let mut truncated = answer_of(RecordType::A);
        truncated[2] |= 0x02;
        assert_eq!(addresses(&truncated), None);
        // The fixture's answer, to ANY, has an A and an AAAA record: asked for one type, only
        // that one resolves.
        let mut asked = answer("www.example.test.");
        let qtype = HEADER_LEN + b"\x03www\x07example\x04test\x00".len();
        assert_eq!(asked[qtype..qtype + 2], [0, 255]);
        asked[qtype + 1] = 1;
        let (_, found) = addresses(&asked).unwrap();
        assert_eq!(found, [(IpAddr::from([192, 0, 2, 80]), 60)]);
        asked[qtype + 1] = 28;
        let (_, found) = addresses(&asked).unwrap();
        assert_eq!(found, [("2001:db8::80".parse().unwrap(), 30)]);
    }

    /// A name is shown in presentation format, so that no two read alike: a dot or backslash
    /// in a label escaped, bytes other than printable ASCII as `\DDD` (helper-198).
    #[test]
    fn names_are_shown_in_presentation_format() {
        assert_eq!(dotted(b"\x03a.b\x04test\x00"), "a\\.b.test.");
        assert_eq!(dotted(b"\x01a\x01b\x04test\x00"), "a.b.test.");
        assert_eq!(dotted(b"\x03a\\b\x00"), "a\\\\b.");
        assert_eq!(dotted(b"\x03\xff \x22\x00"), "\\255\\032\\\".");
        assert_eq!(dotted(b"\x04;(@$\x00"), "\\;\\(\\@\\$.");
        assert_eq!(dotted(b"\x00"), ".");
    }

    /// An entry expires by the monotonic clock, and is shown on the wall clock of the moment it
    /// is asked for: a step of the wall clock changes neither when it goes nor the time it
    /// has left (helper-136: an hour back, an answer with a TTL of 60 s was listed for an hour,
    /// its expiry an hour ahead).
    #[test]
    fn entries_expire_by_their_ttl_whatever_the_wall_clock_does() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        let (start, true_time) = (Instant::now(), SystemTime::now());
        let an_hour = Duration::from_secs(3600);
        // Recorded while the wall clock was an hour ahead; asked once it was set right.
        let recorded = Moment {
            instant: start,
            wall: true_time + an_hour,
        };
        table.record(7, &answer("www.example.test."), recorded);
        let at = |seconds: u64| {
            let elapsed = Duration::from_secs(seconds);
            table.lookup_at("cgroup-id=7", None, start + elapsed, true_time + elapsed)
        };
        let rows = at(20);
        assert_eq!(rows.len(), 2);
        let expected = secs(true_time) + 60;
        let ipv4 = rows.iter().find(|row| row.address.is_ipv4()).unwrap();
        assert!(ipv4.expires.abs_diff(expected) <= 1, "{ipv4:?}");
        // The AAAA record's TTL is 30 s, the A record's 60 s.
        assert_eq!(at(45).len(), 1);
        assert!(at(61).is_empty());
    }

    /// A record with TTL 0 expires as it is recorded: never shown, so never kept (each took
    /// room the workload's other entries then had to give up).
    #[test]
    fn records_with_ttl_0_take_no_room() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        let mut message = Message::from_vec(&answer("www.example.test.")).unwrap();
        let mut records = message.take_answers();
        records[1].set_ttl(0); // the A record
        message.add_answers(records);
        table.record(7, &message.to_vec().unwrap(), Moment::now());
        assert_eq!(table.lock().entries, 1);
        let rows = table.lookup("cgroup-id=7", None);
        assert_eq!(rows.len(), 1);
        assert!(rows[0].address.is_ipv6());
    }

    #[test]
    fn each_workload_sees_its_own_resolutions_and_json_escapes_what_it_must() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        let now = Moment::now();
        table.record(7, &answer("www.example.test."), now);
        table.record(8, &answer("api.example.test."), now);
        table.record(0, &answer("nobody.example.test."), now);
        let rows = table.lookup("cgroup-id=7", Some([192, 0, 2, 80].into()));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "www.example.test.");
        // Asked for by its v4-mapped form.
        let mapped = "::ffff:192.0.2.80".parse().unwrap();
        assert_eq!(table.lookup("cgroup-id=7", Some(mapped)), rows);
        assert_eq!(table.lookup("cgroup-id=7", None).len(), 2);
        assert!(table.lookup("cgroup-id=9", None).is_empty());
        assert_eq!(
            to_json("a\"b", &rows[..0]),
            "{\"workload\":\"a\\\"b\",\"resolutions\":[]}\n"
        );
    }

    #[test]
    fn entries_are_bounded_by_count_and_by_bytes() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        for cgroup in 1..=(MAX_ENTRIES as u64 / 2 + 10) {
            table.record(cgroup, &answer("www.example.test."), Moment::now());
        }
        let (entries, bytes) = table.size();
        assert!(entries <= MAX_ENTRIES, "{entries}");
        assert!(bytes <= MAX_BYTES, "{bytes}");
        // Of workloads that hold as much, the least recently recorded gives up an entry first.
        assert_eq!(table.lookup("cgroup-id=1", None).len(), 1);
        assert_eq!(
            table
                .lookup(&format!("cgroup-id={}", MAX_ENTRIES / 2 + 10), None)
                .len(),
            2
        );
    }

    /// A workload that floods the table pushes out its own entries, not another's: the one
    /// that holds the most gives up its oldest. Before, one list served all, and a flood of
    /// 1,100 answers of 64 addresses each emptied every other workload's (helper-124).
    #[test]
    fn a_workload_that_floods_the_table_pushes_out_its_own_entries_not_anothers() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        for i in 0..20 {
            table.record(
                7,
                &answer(&format!("victim{i}.example.test.")),
                Moment::now(),
            );
        }
        for i in 0..(MAX_ENTRIES / 2 + 1000) {
            table.record(
                9,
                &answer(&format!("flood{i}.example.test.")),
                Moment::now(),
            );
        }
        assert_eq!(table.lookup("cgroup-id=7", None).len(), 40);
        let (entries, bytes) = table.size();
        assert!(
            entries <= MAX_ENTRIES && bytes <= MAX_BYTES,
            "{entries} {bytes}"
        );
        // The flooder keeps its newest.
        let flooded = table.lookup("cgroup-id=9", None);
        assert_eq!(flooded.len(), entries - 40);
        let last = format!("flood{}.example.test.", MAX_ENTRIES / 2 + 999);
        assert!(flooded.iter().any(|row| row.name == last));
        // Bytes too: a flood of long names takes no more of the victim's.
        let long = "x".repeat(60);
        for i in 0..40_000 {
            let name = format!("{long}.{long}.{long}.{i}.example.test.");
            table.record(11, &answer(&name), Moment::now());
        }
        assert_eq!(table.lookup("cgroup-id=7", None).len(), 40);
        let (entries, bytes) = table.size();
        assert!(
            entries <= MAX_ENTRIES && bytes <= MAX_BYTES,
            "{entries} {bytes}"
        );
    }

    /// Whether this thread recorded `answer` for `cgroup` lately; notes it if not, as an
    /// answer whose least TTL is 0 (noted for a second).
    fn recorded_lately(cgroup: u64, answer: &[u8], now: Instant) -> bool {
        recorded_lately_ttl(cgroup, answer, now, 0)
    }

    fn recorded_lately_ttl(cgroup: u64, answer: &[u8], now: Instant, ttl: u32) -> bool {
        unless_recorded_lately(cgroup, answer, now, || Some(((), ttl))).is_none()
    }

    fn numbered_answer(i: u32) -> Vec<u8> {
        let mut answer = vec![0xab, 0xcd];
        answer.extend_from_slice(&i.to_be_bytes());
        answer
    }

    #[test]
    fn an_answer_is_recorded_once_a_second_per_cgroup_however_many_others_go_by() {
        let answer = numbered_answer;
        let now = Instant::now();
        assert!(!recorded_lately(7, &answer(0), now));
        assert!(
            recorded_lately(7, &answer(0), now),
            "the same answer, at once"
        );
        let mut other_id = answer(0);
        other_id[..2].copy_from_slice(&[0x12, 0x34]);
        assert!(recorded_lately(7, &other_id, now), "its ID aside");
        assert!(!recorded_lately(8, &answer(0), now), "another cgroup's");
        let a_second_later = now + RECORDED_LATELY_MIN;
        assert!(
            !recorded_lately(8, &answer(0), a_second_later),
            "a second later"
        );
        assert!(recorded_lately(8, &answer(0), a_second_later));
        // A batch's moment may be older than one a cache waiter read and noted meanwhile.
        let later = now + Duration::from_millis(100);
        assert!(!recorded_lately(9, &answer(0), later));
        let earlier = later - Duration::from_millis(5);
        assert!(
            recorded_lately(9, &answer(0), earlier),
            "a moment older than the note"
        );
        // Half as many other answers as the table has slots: about 90 % keep their place (a
        // pair holds two), and checking one that was pushed out notes it again, pushing out
        // another: about 74 % read back as remembered.
        let others = REMEMBERED as u32 / 2;
        for i in 1..=others {
            recorded_lately(7, &answer(i), now);
        }
        let remembered = (1..=others)
            .filter(|&i| recorded_lately(7, &answer(i), now))
            .count();
        assert!(
            remembered > others as usize * 7 / 10,
            "{remembered} of {others} remembered"
        );
    }

    #[test]
    fn an_answer_is_recorded_again_after_a_tenth_of_its_least_ttl_within_bounds() {
        let now = Instant::now();
        let after = |seconds: f64| now + Duration::from_secs_f64(seconds);
        // TTL 60: for 6 s.
        assert!(!recorded_lately_ttl(7, &numbered_answer(1), now, 60));
        assert!(recorded_lately_ttl(7, &numbered_answer(1), after(5.9), 60));
        assert!(!recorded_lately_ttl(7, &numbered_answer(1), after(6.0), 60));
        // TTL 3600: for 10 s, not 360.
        assert!(!recorded_lately_ttl(7, &numbered_answer(2), now, 3600));
        assert!(recorded_lately_ttl(
            7,
            &numbered_answer(2),
            after(9.9),
            3600
        ));
        assert!(!recorded_lately_ttl(
            7,
            &numbered_answer(2),
            after(10.0),
            3600
        ));
        // TTL 5: for a second, not half of one.
        assert!(!recorded_lately_ttl(7, &numbered_answer(3), now, 5));
        assert!(recorded_lately_ttl(7, &numbered_answer(3), after(0.9), 5));
        assert!(!recorded_lately_ttl(7, &numbered_answer(3), after(1.0), 5));
        // Nothing to record: not looked at again for a second.
        let nothing =
            |now| unless_recorded_lately(7, &numbered_answer(4), now, || None::<((), u32)>);
        assert!(nothing(now).is_none());
        let mut parsed = false;
        let again = unless_recorded_lately(7, &numbered_answer(4), after(0.5), || {
            parsed = true;
            Some(((), 60))
        });
        assert!(again.is_none() && !parsed, "parsed again within the second");
        assert!(
            unless_recorded_lately(7, &numbered_answer(4), after(1.0), || Some(((), 60))).is_some()
        );
    }

    #[test]
    fn a_workload_that_keeps_asking_keeps_its_entry_with_an_expiry_close_to_the_last_answer() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        let start = Moment::now();
        let at = |seconds: u64| Moment {
            instant: start.instant + Duration::from_secs(seconds),
            wall: start.wall + Duration::from_secs(seconds),
        };
        let answer = answer("www.example.test.");
        let v4 = Some(IpAddr::from([192, 0, 2, 80]));
        // The least TTL is 30 (the AAAA): recorded again 3 s after.
        for second in 0..=200 {
            table.record(7, &answer, at(second));
            let rows = table.lookup("cgroup-id=7", v4);
            assert_eq!(rows.len(), 1, "at {second} s");
            let last_answer_expiry = secs(at(second).wall) + 60;
            assert!(
                rows[0].expires + 3 >= last_answer_expiry && rows[0].expires <= last_answer_expiry,
                "at {second} s: expires {} against {last_answer_expiry}",
                rows[0].expires
            );
        }
    }

    /// The same name answered with a shorter TTL later (a cache's answer, counted down)
    /// keeps the expiry of the answer that said the most: the workload may still use the
    /// address until then.
    #[test]
    fn a_later_answer_with_less_time_left_does_not_make_an_entry_expire_sooner() {
        let table = Resolutions::new(Arc::new(WorkloadNames::new("/nonexistent".into())));
        let (start, wall) = (Instant::now(), SystemTime::now());
        let at = |seconds: u64| Moment {
            instant: start + Duration::from_secs(seconds),
            wall: wall + Duration::from_secs(seconds),
        };
        let with_ttl = |ttl: u32| {
            let name = Name::from_ascii("www.example.test.").unwrap();
            let mut message = Message::new();
            message
                .set_message_type(MessageType::Response)
                .add_query(Query::query(name.clone(), RecordType::A));
            message.add_answer(Record::from_rdata(
                name,
                ttl,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 80))),
            ));
            message.to_vec().unwrap()
        };
        table.record(7, &with_ttl(60), at(0));
        table.record(7, &with_ttl(27), at(3));
        let rows = table.lookup_at("cgroup-id=7", None, at(40).instant, at(40).wall);
        assert_eq!(rows.len(), 1, "still listed 40 s after an answer of 60 s");
        assert_eq!(rows[0].expires, secs(wall) + 60);
        // A longer one still moves it on.
        table.record(7, &with_ttl(60), at(30));
        let rows = table.lookup_at("cgroup-id=7", None, at(80).instant, at(80).wall);
        assert_eq!(rows[0].expires, secs(wall) + 90);
    }

    fn secs(time: SystemTime) -> u64 {
        time.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }
}
