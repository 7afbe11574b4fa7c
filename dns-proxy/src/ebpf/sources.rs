//! The source address `connect4` gives the IPv4 sockets of the agent's namespace that it
//! sends to the block: the one the kernel picks here toward the server asked
//! (`SOURCE4_BY_SERVER`), for the servers the agent has seen whose route picks a source of
//! its own (a server on another link, behind a VPN, on the host itself), and otherwise the
//! one toward the Internet (`SOURCE4`). Found by the agent at start, again when routes or
//! addresses change, and for each server new to it.
//!
//! Why: a socket connected to a block address gets its source from the route to the block
//! (127.0.0.1, or on a node the block's own address). `getsockname` would show it (the
//! "which address am I" idiom connects a UDP socket to a public resolver and reads it), and a
//! later `connect` of the same socket elsewhere keeps it: host mode fails with `EINVAL`, and a
//! node's datagrams would leave with a link-local source. Bound to the source toward the
//! Internet, the socket shows and keeps what it would have had without the agent on a node
//! with one uplink; docs/architecture.md says what differs on others.
//!
//! A host firewall may drop what such a socket sends: kube-proxy's `KUBE-FIREWALL` chain
//! drops packets to 127.0.0.0/8 from any other source, and a bound socket's queries to a
//! host-mode block are such packets (helper-131: glibc and TCP lookups all failed, with no
//! word in the log). So a source is used only once a datagram from it has reached the block.
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use socket2::{Domain, SockAddr, Socket, Type};

/// Where "toward the Internet" is asked: a public resolver's address, as the idiom asks, on
/// the discard port. Connecting a UDP socket sends nothing; its local address is the source
/// the kernel picks for that route.
const PROBE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 9);

/// How long a datagram from the source to the block may take over the loopback device: it is
/// there at once unless something dropped it.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// The `SOURCE4` and `SOURCE4_BY_SERVER` maps and what was last written there.
pub struct DirectSources {
    map: Array<MapData, u32>,
    by_server: HashMap<MapData, u32, u32>,
    /// An address of the IPv4 block: a datagram from the source must reach it.
    block: Ipv4Addr,
    /// The source toward the Internet, and whether the block heard it, last written.
    written: Option<(Option<Ipv4Addr>, bool)>,
    /// What `SOURCE4_BY_SERVER` holds.
    written_by_server: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// What is said of the changes to `SOURCE4_BY_SERVER`.
    said: SaidByServer,
}

/// What [`DirectSources::find`] found: the source toward the Internet, whether a datagram
/// from it reached the block (`false`: dropped on the way), and the servers whose route picks
/// another source that the block hears, with that source.
#[derive(Debug)]
pub struct Found {
    source: Option<Ipv4Addr>,
    reaches_block: bool,
    by_server: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// Whether the block heard each source asked (kept for the servers found after).
    heard: BTreeMap<Ipv4Addr, bool>,
}

impl DirectSources {
    /// Takes the maps and writes this namespace's sources into them, toward the Internet and
    /// toward `servers`.
    pub(super) fn new(
        map: Array<MapData, u32>,
        by_server: HashMap<MapData, u32, u32>,
        block: Ipv4Addr,
        servers: &[Ipv4Addr],
    ) -> Self {
        let mut sources = Self {
            map,
            by_server,
            block,
            written: None,
            written_by_server: BTreeMap::new(),
            said: SaidByServer::new(),
        };
        sources.write(&Self::find(block, servers));
        sources
    }

    /// The address of the block a source must reach, for [`DirectSources::find`].
    pub fn block(&self) -> Ipv4Addr {
        self.block
    }

    /// The source the kernel picks now toward the Internet and toward each of `servers`,
    /// and whether the block hears each (blocking: up to [`PROBE_WAIT`] for each it does
    /// not).
    pub fn find(block: Ipv4Addr, servers: &[Ipv4Addr]) -> Found {
        let mut hears = BlockHears::new(block, BTreeMap::new());
        let source = source_toward(PROBE);
        let reaches_block = source.is_none_or(|source| hears.from(source));
        let by_server = sources_toward(servers, source, &mut hears);
        Found {
            source,
            reaches_block,
            by_server,
            heard: hears.heard,
        }
    }

    /// The sources toward `servers` (servers new since `found` was found), added to `found`;
    /// each source the block was heard from or not then is taken as it was (a firewall's
    /// change is seen at the next [`find`](Self::find), within 30 s).
    pub fn find_more(
        block: Ipv4Addr,
        found: &mut Found,
        servers: &[Ipv4Addr],
    ) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
        let mut hears = BlockHears::new(block, std::mem::take(&mut found.heard));
        let more = sources_toward(servers, found.source, &mut hears);
        found.heard = hears.heard;
        found.by_server.extend(&more);
        more
    }

    /// Writes the sources toward servers new since the last [`write`](Self::write), as
    /// [`find_more`](Self::find_more) found them.
    pub fn write_more(&mut self, more: &BTreeMap<Ipv4Addr, Ipv4Addr>) {
        self.write_by_server(more, false);
    }

    /// Writes what [`DirectSources::find`] found, if it changed: the source, or none (sockets
    /// then keep the source the block's route gives) without a route toward the Internet or
    /// when the block does not hear that source.
    pub fn write(&mut self, found: &Found) {
        self.write_by_server(&found.by_server, true);
        let toward_the_internet = (found.source, found.reaches_block);
        if self.written == Some(toward_the_internet) {
            return;
        }
        let now = found.source.filter(|_| found.reaches_block);
        let value = now.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        if let Err(err) = self.map.set(0, value, 0) {
            log::warn!("cannot write the source of redirected sockets: {err}");
            return;
        }
        match (found.source, now) {
            (_, Some(ip)) => log::info!(
                "redirected IPv4 sockets of this namespace send from {ip}, as toward the Internet"
            ),
            (Some(ip), None) => log::warn!(
                "redirected IPv4 sockets of this namespace send from the block route's source, \
                 not from {ip} as toward the Internet: a datagram from {ip} to the block ({}) \
                 was dropped on the way, by a firewall rule such as kube-proxy's \
                 KUBE-FIREWALL, which drops packets to 127.0.0.0/8 from other sources. \
                 `getsockname` shows the block route's source, and such a socket cannot be \
                 connected elsewhere off this host again",
                self.block
            ),
            (None, None) => log::info!(
                "redirected IPv4 sockets of this namespace send from the block route's source: \
                 no route toward the Internet"
            ),
        }
        self.written = Some(toward_the_internet);
    }

    /// Makes `SOURCE4_BY_SERVER` hold `wanted` (`whole`: and nothing else), and says what
    /// changed.
    fn write_by_server(&mut self, wanted: &BTreeMap<Ipv4Addr, Ipv4Addr>, whole: bool) {
        let key = |ip: &Ipv4Addr| u32::from_ne_bytes(ip.octets());
        let gone: Vec<Ipv4Addr> = self
            .written_by_server
            .iter()
            .filter(|(server, source)| wanted.get(server).map_or(whole, |wanted| wanted != *source))
            .map(|(server, _)| *server)
            .collect();
        for server in gone {
            match self.by_server.remove(&key(&server)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                    self.written_by_server.remove(&server);
                    self.said.taken_out(server);
                }
                Err(err) => log::warn!("cannot take the source toward {server} out: {err}"),
            }
        }
        for (server, source) in wanted {
            if self.written_by_server.get(server) == Some(source) {
                continue;
            }
            match self.by_server.insert(key(server), key(source), 0) {
                Ok(()) => {
                    self.written_by_server.insert(*server, *source);
                    self.said.written(*server, *source);
                }
                Err(err) => log::warn!("cannot write the source toward {server}: {err}"),
            }
        }
        self.said.roll(self.written_by_server.len());
    }
}

/// What is said of the sources by server: [`SAID_BY_SERVER`] changes one by one a minute, and
/// the rest counted and said together once that minute is over (at the next change), so that
/// a workload asking thousands of servers on another link makes a line a minute.
struct SaidByServer {
    since: Instant,
    one_by_one: usize,
    unsaid_written: usize,
    unsaid_taken_out: usize,
}

/// How many servers' sources are said one by one in a minute.
const SAID_BY_SERVER: usize = 8;

impl SaidByServer {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            one_by_one: 0,
            unsaid_written: 0,
            unsaid_taken_out: 0,
        }
    }

    fn say_one(&mut self) -> bool {
        self.one_by_one += 1;
        self.one_by_one <= SAID_BY_SERVER
    }

    fn written(&mut self, server: Ipv4Addr, source: Ipv4Addr) {
        if self.say_one() {
            log::info!(
                "redirected IPv4 sockets of this namespace asking {server} send from {source}, \
                 as toward it"
            );
        } else {
            self.unsaid_written += 1;
        }
    }

    fn taken_out(&mut self, server: Ipv4Addr) {
        if self.say_one() {
            log::info!(
                "redirected IPv4 sockets of this namespace asking {server} send as toward the \
                 Internet again (the server gone from the table, or routed so now)"
            );
        } else {
            self.unsaid_taken_out += 1;
        }
    }

    /// Once a minute is over: says what was counted, and starts the next.
    fn roll(&mut self, held: usize) {
        if self.since.elapsed() < Duration::from_secs(60) {
            return;
        }
        if self.unsaid_written > 0 || self.unsaid_taken_out > 0 {
            log::info!(
                "redirected IPv4 sockets of this namespace: {} more servers got a source of \
                 their own, {} lost theirs; {held} servers have one",
                self.unsaid_written,
                self.unsaid_taken_out
            );
        }
        *self = Self::new();
    }
}

/// The servers among `servers` whose route picks another source than `default` (the one
/// toward the Internet) that the block hears, with that source.
fn sources_toward(
    servers: &[Ipv4Addr],
    default: Option<Ipv4Addr>,
    hears: &mut BlockHears,
) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
    servers
        .iter()
        .filter(|server| !server.is_loopback() && !server.is_unspecified())
        .filter_map(|&server| {
            let own = source_toward(SocketAddr::from((server, 53)))?;
            (Some(own) != default && hears.from(own)).then_some((server, own))
        })
        .collect()
}

/// Whether the block hears each source, each asked once ([`reaches`]).
struct BlockHears {
    block: Ipv4Addr,
    heard: BTreeMap<Ipv4Addr, bool>,
}

impl BlockHears {
    fn new(block: Ipv4Addr, heard: BTreeMap<Ipv4Addr, bool>) -> Self {
        Self { block, heard }
    }

    fn from(&mut self, source: Ipv4Addr) -> bool {
        let block = self.block;
        *self
            .heard
            .entry(source)
            .or_insert_with(|| match reaches(source, block) {
                Ok(reached) => reached,
                Err(err) => {
                    // Not known to be dropped: used, as before the check.
                    log::debug!("cannot check that {source} reaches the block at {block}: {err}");
                    true
                }
            })
    }
}

/// The local address of a UDP socket connected to `destination`; `None` without a route there
/// (or with a loopback one).
fn source_toward(destination: SocketAddr) -> Option<Ipv4Addr> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None).ok()?;
    socket.connect(&SockAddr::from(destination)).ok()?;
    match socket.local_addr().ok()?.as_socket()?.ip() {
        IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// Whether a datagram sent from `source` reaches `block`, on a port of its own (not the
/// proxy's: nothing steers it). A firewall's `DROP` in `OUTPUT` fails the send (`EPERM`), one
/// in `INPUT` leaves the receiver waiting.
fn reaches(source: Ipv4Addr, block: Ipv4Addr) -> io::Result<bool> {
    let udp = || Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None);
    let receiver = udp()?;
    receiver.bind(&SockAddr::from(SocketAddr::from((block, 0))))?;
    let sender = udp()?;
    sender.bind(&SockAddr::from(SocketAddr::from((source, 0))))?;
    let from = sender.local_addr()?.as_socket();
    let probe = b"dns-proxy: does the block hear this source?";
    match sender.send_to(probe, &receiver.local_addr()?) {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => return Ok(false),
        Err(err) => return Err(err),
    }
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    let deadline = Instant::now() + PROBE_WAIT;
    loop {
        // Anything else that comes (another process of the namespace found the port) does
        // not make the wait longer.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        receiver.set_read_timeout(Some(left))?;
        match receiver.recv_from(&mut buf) {
            Ok((_, sender)) if sender.as_socket() == from => return Ok(true),
            Ok(_) => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(err) => return Err(err),
        }
    }
}
