use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SOA, opt::EdnsOption},
    },
};

use super::*;

const SERVER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 53);

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

/// Whether `cache` keeps `answer` to `query`, asked over UDP.
fn keeps(cache: &Cache, query: &[u8], answer: &[u8], at: Instant) -> bool {
    let parsed = parsed(query);
    cache.store(&parsed, parsed.head(query), answer, true, at)
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
    // Kept for its least TTL, 120 s, and no record shown longer (RFC 2181 §5.2).
    assert_eq!(ttls(&answer), [113, 113]);
    // The upstream's flags as they came (RA set, AA clear).
    let message = Message::from_vec(&answer).unwrap();
    assert!(message.recursion_available() && !message.authoritative());
}

/// A client's own cache keeps what it is shown for the TTL shown: no longer than the agent
/// keeps the answer, whatever TTL each record came with and however far into a second the
/// lookup falls.
#[test]
fn no_ttl_shown_from_the_cache_outlasts_the_kept_answer() {
    let cache = Cache::new(settings());
    let q = query(1, "mixed.example.test.");
    let start = Instant::now();
    // TTLs 100 and 4 in one RRset (helper-161 was shown 29 s of the first from an answer
    // kept 4 s), and past the cap.
    assert!(keeps(&cache, &q, &a_answer(&q, &[100, 4, 86_400]), start));
    for (millis, shown) in [(0, 4), (1, 3), (1_500, 2), (2_000, 2), (3_999, 0)] {
        let at = start + Duration::from_millis(millis);
        let answer = fresh(cache.lookup(&parsed(&q), &q, true, at));
        assert_eq!(ttls(&answer), [shown; 3], "{millis} ms in");
    }
    assert!(!matches!(
        cache.lookup(&parsed(&q), &q, true, start + Duration::from_secs(4)),
        Cached::Fresh(_)
    ));
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

    // A MINIMUM with its top bit set is a TTL of 0 (RFC 2181 §8): not kept, whatever the
    // SOA's own TTL says. Before, the SOA's 20 s stood (helper-121).
    let top = query(1, "top.example.test.");
    assert!(!keeps(
        &cache,
        &top,
        &negative_answer(&top, ResponseCode::NXDomain, Some((20, 0x8000_0000))),
        start
    ));

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
    // Its records are shown with no more than the 5 s it is kept (before: an SOA of 300 s
    // showed 29, the cap of `--cache-max-ttl`).
    let with_soa = query(1, "soafail.example.test.");
    let answer = negative_answer(&with_soa, ResponseCode::ServFail, Some((300, 300)));
    assert!(keeps(&cache, &with_soa, &answer, start));
    let hit = fresh(cache.lookup(&parsed(&with_soa), &with_soa, true, start));
    assert!(ttls(&hit).iter().all(|ttl| *ttl <= 5), "{:?}", ttls(&hit));

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
    // Fetched over TCP (a truncated client's retry): complete for any client.
    let parsed_q = parsed(&q);
    assert!(cache.store(&parsed_q, parsed_q.head(&q), &big, false, start));
    let udp = fresh(cache.lookup(&parsed(&q), &q, true, start));
    let truncated = Message::from_vec(&udp).unwrap();
    assert!(truncated.truncated() && truncated.answers().is_empty());
    assert_eq!(truncated.queries().len(), 1);
    let tcp = fresh(cache.lookup(&parsed(&q), &q, false, start));
    assert_eq!(tcp.len(), big.len());
    assert_eq!(Message::from_vec(&tcp).unwrap().answers().len(), 40);
}

/// An upstream's OPT record with a long option (an Extended DNS Error's text): a client that
/// takes 512 bytes gets the truncated answer within them, its OPT without options.
#[test]
fn a_truncated_answer_fits_the_client_whatever_options_the_upstreams_opt_holds() {
    let cache = Cache::new(settings());
    let start = Instant::now();
    let asked = query_with_options(1, "ede.example.test", &[]);
    let mut message = response_to(&asked, ResponseCode::NoError);
    let name = message.queries()[0].name().clone();
    message.add_answer(Record::from_rdata(
        name,
        300,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
    ));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    // EDE 0 ("other") with 600 bytes of text.
    let mut ede = vec![0, 0];
    ede.extend_from_slice(&[b'x'; 600]);
    edns.options_mut().insert(EdnsOption::Unknown(15, ede));
    message.set_edns(edns);
    let answer = message.to_vec().unwrap();
    assert!(keeps(&cache, &asked, &answer, start));
    let mut small = Edns::new();
    small.set_max_payload(512);
    let client = query_message(2, "ede.example.test", Some(small))
        .to_vec()
        .unwrap();
    let udp = fresh(cache.lookup(&parsed(&client), &client, true, start));
    assert!(udp.len() <= 512, "{} bytes", udp.len());
    let truncated = Message::from_vec(&udp).unwrap();
    assert!(truncated.truncated() && truncated.answers().is_empty());
    assert!(truncated.extensions().is_some(), "the OPT record stays");
    // A client that takes it all gets it all.
    let tcp = fresh(cache.lookup(&parsed(&client), &client, false, start));
    assert_eq!(Message::from_vec(&tcp).unwrap().answers().len(), 1);
}

/// An answer whose names a client cannot read (a compression pointer to itself, or forward)
/// is not kept; well-compressed answers are, CNAME targets included.
#[test]
fn an_answer_with_a_compression_loop_is_never_kept() {
    let cache = Cache::new(settings());
    let start = Instant::now();
    let asked = query(1, "loop.example.test");
    let good = a_answer(&asked, &[300]);
    assert!(keeps(&cache, &asked, &good, start));
    for (what, name) in [
        ("a pointer to itself", vec![0xc0, 0]),
        ("a pointer forward", vec![0xc0, 0]),
        ("a label, then a pointer back to it", vec![1, b'a', 0xc0, 0]),
    ] {
        let asked = query(2, &format!("{}.example.test", what.len()));
        let mut answer = a_answer(&asked, &[300]);
        // An additional A record whose owner name is `name`, its pointer set below.
        let at = answer.len();
        let mut name = name;
        let pointer = name.len() - 1;
        name[pointer] = match what {
            "a pointer forward" => (at + 2) as u8,
            _ => at as u8,
        };
        answer.extend_from_slice(&name);
        answer.extend_from_slice(&[0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 9]);
        answer[11] = 1;
        assert!(at < 255, "{what}: the pointer must fit a byte");
        assert!(!keeps(&cache, &asked, &answer, start), "{what}");
    }
    // A CNAME whose target ("x" and a pointer to the question's name) the next record's
    // owner points to: kept.
    let asked = query(3, "chain.example.test");
    let mut chain = asked.clone();
    chain[2] |= 0x80;
    chain[7] = 2;
    let target = chain.len() + 12;
    chain.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 1, 44, 0, 4, 1, b'x', 0xc0, 12]);
    chain.extend_from_slice(&[
        0xc0,
        target as u8,
        0,
        1,
        0,
        1,
        0,
        0,
        1,
        44,
        0,
        4,
        192,
        0,
        2,
        9,
    ]);
    assert!(keeps(&cache, &asked, &chain, start));
}

/// An answer kept is served from the cache with the upstream's header flags, AA and RA as
/// they came: an authoritative-only server's NODATA with AA cleared (and RA clear) reads to
/// glibc and Go as a lame referral.
#[test]
fn an_answer_from_the_cache_keeps_the_upstreams_flags_aa_included() {
    let cache = Cache::new(settings());
    let start = Instant::now();
    let asked = query(1, "aa.example.test");
    let mut answer = a_answer(&asked, &[300]);
    answer[2] |= 0x04;
    answer[3] &= !0x80;
    assert!(keeps(&cache, &asked, &answer, start));
    let served = fresh(cache.lookup(&parsed(&asked), &asked, true, start));
    let served = Message::from_vec(&served).unwrap();
    assert!(served.authoritative());
    assert!(!served.recursion_available());
    let served = fresh(cache.lookup(&parsed(&asked), &asked, true, start));
    assert_eq!(served, answer);
}

#[test]
fn an_answer_shared_with_an_identical_query_carries_that_clients_id_and_case() {
    let leader = query(1, "shared.example.test");
    let answer = a_answer(&leader, &[60; 34]);
    let waiter = query(77, "SHARED.Example.TEST");
    let parsed = parsed(&waiter);
    let asked = parsed_head(&leader);
    let shared = shared_answer(&answer, &asked, 512, &parsed, parsed.head(&waiter), false).unwrap();
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
    let over_udp =
        shared_answer(&answer, &asked, 512, &parsed, parsed.head(&waiter), true).unwrap();
    assert_ne!(over_udp[2] & 0x02, 0, "TC");
    assert_eq!(over_udp[..2], 77u16.to_be_bytes());
    // Nor an answer whose question is not, letter for letter, the one asked: it would
    // fail the first client's 0x20 check.
    let asked_otherwise = parsed_head(&query(1, "Shared.example.test"));
    assert!(
        shared_answer(
            &answer,
            &asked_otherwise,
            512,
            &parsed,
            parsed.head(&waiter),
            false
        )
        .is_none()
    );
}

/// A query for `name` with EDNS and these options.
pub(crate) fn query_with_options(id: u16, name: &str, options: &[(u16, &[u8])]) -> Vec<u8> {
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
        1232,
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
    cache.upstream_failed(&parsed(&asked).key, later, later);
    // Another failure within the 30 s (the same refresh's timeout) does not start them again.
    cache.upstream_failed(&parsed(&asked).key, later, later + Duration::from_secs(3));
    assert!(stale(later + Duration::from_secs(29)));
    assert!(!stale(later + Duration::from_secs(31)));
}

/// A refresh that failed after a fresh answer was kept (another client's refresh, asked
/// later, succeeded) does not mark that answer failing: it was, for a moment, and then every
/// TCP client was served it stale for 30 s without the upstream being asked (helper-175).
#[test]
fn a_failure_of_a_query_asked_before_the_answer_kept_marks_nothing() {
    let cache = Cache::new(CacheSettings {
        serve_stale: Duration::from_secs(600),
        ..settings()
    });
    let asked = query(1, "refreshed.example.test");
    let start = Instant::now();
    let failed_query_asked = start;
    // Another client's query, asked after, got the answer, kept for 10 s.
    let kept_at = start + Duration::from_millis(500);
    assert!(keeps(&cache, &asked, &a_answer(&asked, &[10]), kept_at));
    // The first query's upstream never answered: its failure comes after.
    cache.upstream_failed(
        &parsed(&asked).key,
        failed_query_asked,
        start + Duration::from_secs(5),
    );
    match cache.lookup(
        &parsed(&asked),
        &asked,
        true,
        start + Duration::from_secs(12),
    ) {
        Cached::Stale {
            upstream_failing, ..
        } => assert!(!upstream_failing),
        other => panic!("not stale: {other:?}"),
    }
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

/// A query for `name` with EDNS, a UDP size of `size` and these EDNS flags (DO is 0x8000).
pub(crate) fn query_with_size_and_flags(id: u16, name: &str, size: u16, flags: u16) -> Vec<u8> {
    let mut message = query_with_options(id, name, &[]);
    let opt = find_opt(&message).unwrap().0;
    // The OPT record: root name (1), type (2), then the UDP size as its class, then the TTL:
    // extended RCODE, version, flags.
    message[opt + 3..opt + 5].copy_from_slice(&size.to_be_bytes());
    message[opt + 7..opt + 9].copy_from_slice(&flags.to_be_bytes());
    message
}

#[test]
fn edns_flags_other_than_do_malformed_cookies_and_meta_classes_are_not_cached() {
    let plain = query_with_size_and_flags(1, "flags.example.test", 1232, 0);
    let dnssec_ok = query_with_size_and_flags(1, "flags.example.test", 1232, 0x8000);
    assert_ne!(parsed(&plain).key, parsed(&dnssec_ok).key);
    // The compact-denial CO bit, or any flag not yet assigned, may change the answer.
    for flags in [0x4000, 0x0001, 0xc000] {
        let odd = query_with_size_and_flags(1, "flags.example.test", 1232, flags);
        assert!(CacheableQuery::parse(SERVER, &odd).is_none(), "{flags:#x}");
    }
    // RFC 7873: a client cookie of 8 bytes, with a server cookie of 8 to 32.
    for length in [8, 16, 40] {
        let cookie = query_with_options(1, "cookie.example.test", &[(10, &vec![7; length])]);
        assert!(CacheableQuery::parse(SERVER, &cookie).is_some(), "{length}");
    }
    for length in [0, 5, 12, 15, 41] {
        let malformed = query_with_options(1, "cookie.example.test", &[(10, &vec![7; length])]);
        assert!(
            CacheableQuery::parse(SERVER, &malformed).is_none(),
            "{length}"
        );
    }
    let two = query_with_options(1, "cookie.example.test", &[(10, &[1; 8]), (10, &[2; 8])]);
    assert!(CacheableQuery::parse(SERVER, &two).is_none());
    // Class ANY, NONE and the reserved ones ask no one RRset; CHAOS asks which server
    // instance answers (RFC 4892); the Internet class alone is cached.
    for class in [0u16, 3, 4, 254, 255, 0xffff] {
        let mut meta = query(1, "class.example.test");
        let end = meta.len();
        meta[end - 2..].copy_from_slice(&class.to_be_bytes());
        assert!(CacheableQuery::parse(SERVER, &meta).is_none(), "{class}");
    }
}

#[test]
fn an_answer_fetched_for_a_smaller_udp_size_is_asked_for_again_by_a_larger_one() {
    let cache = Cache::new(settings());
    let now = Instant::now();
    let small = query_with_size_and_flags(1, "glue.example.test", 512, 0);
    let large = query_with_size_and_flags(2, "glue.example.test", 4096, 0);
    assert_eq!(parsed(&small).key, parsed(&large).key);
    let answer = a_answer(&small, &[300]);
    assert!(keeps(&cache, &small, &answer, now));
    // The upstream may have left records out for 512 bytes: the larger client is asked for
    // again, and shown this only if that fails.
    assert!(matches!(
        cache.lookup(&parsed(&large), &large, true, now),
        Cached::Stale { .. }
    ));
    // Not so for a client that takes no more. A TCP client takes any size: asked for again
    // too (a server that fills the additional section to the size asked, without TC, had a
    // TCP client shown 27 records of its 60; helper-93).
    fresh(cache.lookup(&parsed(&small), &small, true, now));
    assert!(matches!(
        cache.lookup(&parsed(&large), &large, false, now),
        Cached::Stale { .. }
    ));
    // The larger client's answer replaces it, and then serves both; a smaller one's, come
    // later, does not push it out.
    let larger = a_answer(&large, &[300]);
    assert!(keeps(&cache, &large, &larger, now));
    assert!(!keeps(&cache, &small, &answer, now));
    fresh(cache.lookup(&parsed(&large), &large, true, now));
    fresh(cache.lookup(&parsed(&small), &small, true, now));
    // An answer fetched over TCP was cut for no one.
    let parsed_small = parsed(&small);
    assert!(cache.store(
        &parsed_small,
        parsed_small.head(&small),
        &answer,
        false,
        now
    ));
    fresh(cache.lookup(&parsed(&large), &large, true, now));
    // From 1,232 bytes up every size is asked the same: one fetched for 1,232 serves 4,096.
    let flag_day = Cache::new(settings());
    let at_1232 = query_with_size_and_flags(3, "glue.example.test", 1232, 0);
    assert!(keeps(&flag_day, &at_1232, &a_answer(&at_1232, &[300]), now));
    fresh(flag_day.lookup(&parsed(&large), &large, true, now));
    fresh(flag_day.lookup(&parsed(&large), &large, false, now));
}

/// RFC 2308 §5 caps the SOA's TTL at its MINIMUM in a negative answer only: in an answer of
/// the type asked, the SOA is one more record, shown and kept for its own TTL (an answer
/// with A 100 and SOA 100 / MINIMUM 3 was kept 3 s and showed SOA 2; helper-93).
#[test]
fn an_soa_in_a_positive_answer_keeps_its_own_ttl() {
    let cache = Cache::new(settings());
    let now = Instant::now();
    let asked = query(1, "soa.example.test");
    let mut answer = Message::from_vec(&a_answer(&asked, &[100])).unwrap();
    let soa = Message::from_vec(&negative_answer(
        &asked,
        ResponseCode::NoError,
        Some((100, 3)),
    ))
    .unwrap();
    for record in soa.name_servers() {
        answer.add_name_server(record.clone());
    }
    assert!(keeps(&cache, &asked, &answer.to_vec().unwrap(), now));
    let later = now + Duration::from_secs(10);
    assert_eq!(
        ttls(&fresh(cache.lookup(&parsed(&asked), &asked, true, later))),
        [90, 90]
    );
}

#[test]
fn an_answer_about_the_first_query_rather_than_the_name_is_not_shared() {
    let leader = query(1, "fate.example.test");
    let waiter = query(77, "fate.example.test");
    let parsed = parsed(&waiter);
    let asked = parsed_head(&leader);
    let share =
        |answer: &[u8]| shared_answer(answer, &asked, 512, &parsed, parsed.head(&waiter), true);
    for rcode in [ResponseCode::NXDomain, ResponseCode::ServFail] {
        let answer = negative_answer(&leader, rcode, Some((60, 60)));
        assert!(share(&answer).is_some(), "{rcode:?}");
    }
    // No question, and a record whose owner, type and class are the question's bytes (a
    // forgery shaped to pass the comparison of what follows the header).
    let mut no_question = a_answer(&leader, &[60])[..HEADER_LEN].to_vec();
    no_question[4..HEADER_LEN].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    no_question.extend_from_slice(&asked[HEADER_LEN..]);
    no_question.extend_from_slice(&[0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
    assert!(share(&no_question).is_none());
    // FORMERR to a malformed cookie, REFUSED, NOTIMP: the first query's, not the name's.
    for rcode in [
        ResponseCode::FormErr,
        ResponseCode::Refused,
        ResponseCode::NotImp,
    ] {
        let answer = negative_answer(&leader, rcode, None);
        assert!(share(&answer).is_none(), "{rcode:?}");
    }
    // Truncated for the first client's UDP size: so it would be for a client that takes no
    // more, not for one that takes more.
    let mut truncated = a_answer(&leader, &[60]);
    truncated[2] |= 0x02;
    assert!(share(&truncated).is_some());
    let larger = query_with_size_and_flags(78, "fate.example.test", 1232, 0);
    let larger_parsed = CacheableQuery::parse(SERVER, &larger).unwrap();
    let leader_edns = query_with_size_and_flags(1, "fate.example.test", 600, 0);
    let mut truncated = a_answer(&leader_edns, &[60]);
    truncated[2] |= 0x02;
    let asked_edns = parsed_head(&leader_edns);
    let to_larger = |asked_limit| {
        shared_answer(
            &truncated,
            &asked_edns,
            asked_limit,
            &larger_parsed,
            larger_parsed.head(&larger),
            true,
        )
    };
    assert!(to_larger(600).is_none());
    assert!(to_larger(usize::MAX).is_some());
}
