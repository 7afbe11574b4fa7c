//! The UDP listener: each redirected query is forwarded, unaltered, to the server its client
//! asked for, from a fresh socket on a random port, and the answer is relayed back unaltered.
use std::{
    cell::RefCell,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use dns_proxy_common::IPPROTO_UDP;
use socket2::{Domain, Socket, Type};
use tokio::{net::UdpSocket, sync::Semaphore, time::timeout};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{DRAIN_QUIET, OriginalDestinations, stats::Stats, wire};
use crate::log_limit::RateLimited;

#[derive(Debug, Clone)]
pub struct ForwardSettings {
    /// Forward everything here instead of to each query's original destination.
    pub upstream_override: Option<SocketAddr>,
    pub upstream_timeout: Duration,
    pub max_inflight: usize,
}

/// The UDP side of the proxy. Cheap to share: everything lives behind one `Arc`.
pub struct UdpProxy<D> {
    socket: UdpSocket,
    local_addr: SocketAddr,
    destinations: D,
    settings: ForwardSettings,
    inflight: Arc<Semaphore>,
    tasks: TaskTracker,
    stats: Arc<Stats>,
    overload_log: RateLimited,
}

impl<D: OriginalDestinations> UdpProxy<D> {
    pub fn new(
        socket: UdpSocket,
        destinations: D,
        settings: ForwardSettings,
        stats: Arc<Stats>,
    ) -> io::Result<Arc<Self>> {
        let local_addr = socket.local_addr()?;
        Ok(Arc::new(Self {
            socket,
            local_addr,
            destinations,
            inflight: Arc::new(Semaphore::new(settings.max_inflight)),
            settings,
            tasks: TaskTracker::new(),
            stats,
            overload_log: RateLimited::new(Duration::from_secs(10)),
        }))
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self: &Arc<Self>, stop: CancellationToken) {
        let mut buf = vec![0u8; wire::MAX_UDP_MESSAGE];
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = self.socket.recv_from(&mut buf) => self.on_received(received, &buf),
            }
        }
    }

    /// Graceful end: keeps answering clients that were redirected before the redirect was
    /// switched off, until nothing has arrived for a moment and nothing is in flight, or until
    /// `deadline`. Returns how many forwarded queries were still unanswered then.
    pub async fn drain(self: &Arc<Self>, deadline: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + deadline;
        let mut buf = vec![0u8; wire::MAX_UDP_MESSAGE];
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                received = timeout(DRAIN_QUIET, self.socket.recv_from(&mut buf)) => match received {
                    Ok(received) => self.on_received(received, &buf),
                    Err(_quiet) if self.tasks.is_empty() => break,
                    Err(_quiet) => {}
                },
            }
        }
        self.tasks.close();
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
        self.tasks.len()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn on_received(self: &Arc<Self>, received: io::Result<(usize, SocketAddr)>, buf: &[u8]) {
        match received {
            Ok((len, client)) => self.handle(&buf[..len], client),
            // Nothing a datagram can do makes recv fail for long; keep serving.
            Err(err) => log::warn!("receiving on {}: {err}", self.local_addr),
        }
    }

    /// What the receive loop does with a datagram: only the cheap checks, so that it gets back
    /// to receiving at once; the rest happens in the query's own task, on any worker.
    fn handle(self: &Arc<Self>, datagram: &[u8], client: SocketAddr) {
        Stats::add(&self.stats.udp.received);
        if !wire::is_query(datagram) {
            Stats::add(&self.stats.udp.dropped_malformed);
            log::debug!(
                "dropping {} bytes from {client}: not a DNS query",
                datagram.len()
            );
            return;
        }
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            Stats::add(&self.stats.udp.dropped_overload);
            self.overload_log.warn(|dropped| {
                format!(
                    "{} queries in flight (--max-inflight): dropped {dropped} queries",
                    self.settings.max_inflight
                )
            });
            return;
        };
        let query = Bytes::copy_from_slice(datagram);
        let proxy = Arc::clone(self);
        let started = Instant::now();
        self.tasks.spawn(async move {
            if let Some((original, upstream)) = proxy.route(client) {
                proxy
                    .forward(query, client, original, upstream, started)
                    .await;
            }
            drop(permit);
        });
    }

    /// Where the query of `client` goes: (the server it asked, the upstream to send it to);
    /// `None` if it must be dropped.
    fn route(&self, client: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
        let Some(original) = self.destinations.original_destination(client, IPPROTO_UDP) else {
            // Only clients the kernel redirected have a server to go to.
            Stats::add(&self.stats.udp.dropped_not_redirected);
            log::debug!("dropping query from {client}: not a redirected client");
            return None;
        };
        let upstream = self.settings.upstream_override.unwrap_or(original);
        if upstream == self.local_addr {
            Stats::add(&self.stats.udp.dropped_loop);
            log::warn!("dropping query from {client}: its upstream {upstream} is this proxy");
            return None;
        }
        Some((original, upstream))
    }

    async fn forward(
        &self,
        query: Bytes,
        client: SocketAddr,
        original: SocketAddr,
        upstream: SocketAddr,
        started: Instant,
    ) {
        let stats = &self.stats.udp;
        stats.forwarding();
        let outcome = timeout(self.settings.upstream_timeout, async {
            let answer = exchange(&query, upstream).await?;
            self.socket.send_to(&answer, client).await?;
            stats.answered(&answer, Some(started.elapsed()));
            let rcode = log::log_enabled!(log::Level::Debug).then(|| wire::describe_rcode(&answer));
            io::Result::Ok(rcode)
        })
        .await;
        stats.settled(1);
        let latency = started.elapsed();
        let describe = || wire::describe_query(&query);
        match outcome {
            Ok(Ok(rcode)) => {
                if let Some(rcode) = rcode {
                    log::debug!(
                        "query udp client={client} server={original} upstream={upstream} {} rcode={rcode} latency={latency:?}",
                        describe()
                    );
                }
            }
            Ok(Err(err)) => {
                Stats::add(&stats.upstream_errors);
                log::debug!(
                    "query udp client={client} server={original} upstream={upstream} {} failed: {err}",
                    describe()
                );
            }
            Err(_elapsed) => {
                Stats::add(&stats.upstream_timeouts);
                log::debug!(
                    "query udp client={client} server={original} upstream={upstream} {} timed out after {latency:?}",
                    describe()
                );
            }
        }
    }
}

thread_local! {
    /// Where answers are received, one per worker thread: no waiting query holds a buffer,
    /// and no answer costs a 64 KiB allocation, only a copy of its own size.
    static RECEIVE_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; wire::MAX_UDP_MESSAGE]);
}

/// Sends `query` to `upstream` from a fresh connected socket (a random source port, and the
/// kernel drops datagrams from anyone but `upstream`) and returns the first datagram that
/// answers it.
async fn exchange(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let domain = Domain::for_address(upstream);
    let socket = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None)?;
    // connect binds it to a random port: no separate bind.
    socket.connect(&upstream.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.send(query).await?;
    let id = wire::message_id(query).unwrap_or_default();
    loop {
        socket.readable().await?;
        let received = RECEIVE_BUFFER.with_borrow_mut(|buffer| {
            let len = socket.try_recv(buffer)?;
            let datagram = &buffer[..len];
            Ok::<_, io::Error>(wire::is_response_to(datagram, id).then(|| datagram.to_vec()))
        });
        match received {
            Ok(Some(answer)) => return Ok(answer),
            Ok(None) => {
                log::debug!("ignoring a datagram from {upstream}: not the answer to query {id}")
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    use crate::dns::FixedDestination as Fixed;

    const QUERY: &[u8] =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x04test\x00\x00\x01\x00\x01";

    fn answer_to(query: &[u8]) -> Vec<u8> {
        let mut answer = query.to_vec();
        answer[2] |= 0x80;
        answer.extend_from_slice(b"opaque trailing bytes the proxy must not touch");
        answer
    }

    /// A real UDP server on loopback: first a stray datagram with the wrong ID, then the answer.
    async fn upstream(silent: bool) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.unwrap();
                if silent {
                    continue;
                }
                let mut stray = answer_to(&buf[..len]);
                stray[0] ^= 0xff;
                socket.send_to(&stray, from).await.unwrap();
                socket.send_to(&answer_to(&buf[..len]), from).await.unwrap();
            }
        });
        addr
    }

    async fn proxy(original: Option<SocketAddr>, max_inflight: usize) -> Arc<UdpProxy<Fixed>> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let settings = ForwardSettings {
            upstream_override: None,
            upstream_timeout: Duration::from_millis(300),
            max_inflight,
        };
        let proxy = UdpProxy::new(socket, Fixed(original), settings, Arc::default()).unwrap();
        let serving = Arc::clone(&proxy);
        tokio::spawn(async move { serving.serve(CancellationToken::new()).await });
        proxy
    }

    async fn ask(proxy: &UdpProxy<Fixed>, query: &[u8]) -> Option<Vec<u8>> {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(query, proxy.local_addr).await.unwrap();
        let mut buf = [0u8; 1024];
        let (len, from) = timeout(Duration::from_millis(600), client.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        assert_eq!(from, proxy.local_addr);
        Some(buf[..len].to_vec())
    }

    #[tokio::test]
    async fn relays_the_matching_answer_byte_for_byte() {
        let proxy = proxy(Some(upstream(false).await), 8).await;
        assert_eq!(ask(&proxy, QUERY).await, Some(answer_to(QUERY)));
        assert_eq!(proxy.stats.udp.answered.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn drops_clients_that_were_not_redirected_and_non_queries() {
        let proxy = proxy(None, 8).await;
        assert_eq!(ask(&proxy, QUERY).await, None);
        assert_eq!(
            proxy
                .stats
                .udp
                .dropped_not_redirected
                .load(Ordering::Relaxed),
            1
        );

        let proxy = self::proxy(Some(upstream(false).await), 8).await;
        assert_eq!(ask(&proxy, &answer_to(QUERY)).await, None);
        assert_eq!(ask(&proxy, b"hello").await, None);
        assert_eq!(proxy.stats.udp.dropped_malformed.load(Ordering::Relaxed), 2);
        assert_eq!(proxy.stats.udp.forwarded.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out_and_frees_its_slot() {
        let proxy = proxy(Some(upstream(true).await), 1).await;
        assert_eq!(ask(&proxy, QUERY).await, None);
        assert_eq!(proxy.stats.udp.upstream_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(proxy.inflight.available_permits(), 1);
        assert!(proxy.tasks.is_empty());
    }

    #[tokio::test]
    async fn sheds_queries_beyond_max_inflight() {
        let proxy = proxy(Some(upstream(true).await), 1).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..3 {
            client.send_to(QUERY, proxy.local_addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(proxy.stats.udp.forwarded.load(Ordering::Relaxed), 1);
        assert_eq!(proxy.stats.udp.dropped_overload.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn refuses_to_forward_to_itself() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let itself = socket.local_addr().unwrap();
        let settings = ForwardSettings {
            upstream_override: None,
            upstream_timeout: Duration::from_millis(300),
            max_inflight: 8,
        };
        let proxy = UdpProxy::new(socket, Fixed(Some(itself)), settings, Arc::default()).unwrap();
        let serving = Arc::clone(&proxy);
        tokio::spawn(async move { serving.serve(CancellationToken::new()).await });
        assert_eq!(ask(&proxy, QUERY).await, None);
        assert_eq!(proxy.stats.udp.dropped_loop.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn drain_answers_what_is_in_flight_then_returns() {
        let proxy = proxy(Some(upstream(false).await), 8).await;
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(ask(&proxy, QUERY).await, Some(answer_to(QUERY)));
        let started = Instant::now();
        assert_eq!(proxy.drain(Duration::from_secs(5)).await, 0);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
