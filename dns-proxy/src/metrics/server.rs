//! The HTTP server of `--metrics`, bounded against its own clients: whoever reaches the port
//! (on a node, any pod, if it listens on the node's address) must not be able to starve the
//! kubelet's probes, nor grow the agent's memory past its pod's limit.
//! - At most [`MAX_CONNECTIONS`] are served at once. When another arrives, the oldest one not
//!   busy building a response is closed for it (idle, sending its headers, waiting for its
//!   turn to build a page, or reading one slowly): a client holding connections open, or
//!   asking for pages over and over, cannot keep a probe out, and a probe, which asks at once
//!   and is answered at once, is not the one closed. A connection lasts
//!   [`MAX_CONNECTION_AGE`] at most.
//! - The pages that can be large (`/metrics`, `/v1/resolutions`: a workload's names run to
//!   megabytes) are built one at a time, and what is built and not yet sent is bounded by
//!   [`PAGE_BUDGET`] bytes: a page waits for room (at most [`PAGE_WAIT`], then 503) before its
//!   building ends. `/healthz` and `/readyz` wait for neither.
use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Mutex as AsyncMutex, Notify, OwnedSemaphorePermit, Semaphore},
};

use super::{Metrics, peer_owner};
use crate::{drain, log_limit::RateLimited};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// A request's headers must arrive within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of large pages built and not yet sent. A page larger than this takes all of it.
const PAGE_BUDGET: usize = 16 << 20;
/// How long a page waits for room in the budget before the request is answered 503.
const PAGE_WAIT: Duration = Duration::from_secs(5);
/// How long a connection is served: one that does not read what it asked for gives its
/// page's room back then (after [`CLOSING_GRACE`] to finish the response it is on).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long a connection at its age limit may take to finish its response.
const CLOSING_GRACE: Duration = Duration::from_secs(10);

impl Metrics {
    /// Serves HTTP/1.1 on `listener` until `stop` is sent.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: drain::Signal) {
        let connections = Arc::new(Connections::default());
        let pages = Arc::new(Pages::default());
        // Failed accepts (out of open files, typically) come as fast as connections do: 464
        // lines in 25 s under a flood of DNS connections (helper-98).
        let accept_log =
            RateLimited::counting(Duration::from_secs(10), "metrics connections not accepted");
        loop {
            let accepted = tokio::select! {
                () = stop.stopped() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_log.warn(|failed| {
                        format!("accepting a metrics connection: {err} ({failed} accepts failed)")
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(held) = connections.admit() else {
                // Every one in the middle of a request: this one is closed at once.
                log::debug!("metrics connection from {peer}: refused, {MAX_CONNECTIONS} busy");
                continue;
            };
            let metrics = Arc::clone(&self);
            let pages = Arc::clone(&pages);
            let stop = stop.clone();
            let ends = stream.local_addr().ok().map(|local| (local, peer));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| {
                    let tracked = Arc::clone(&held.tracked);
                    let (metrics, pages) = (Arc::clone(&metrics), Arc::clone(&pages));
                    async move {
                        let response = metrics
                            .respond_bounded(&request, ends, &pages, &tracked)
                            .await;
                        Ok::<_, Infallible>(response.map(Full::new))
                    }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                // At its age limit, a connection finishes the response it is on (a scraper's
                // reused connection must not lose a scrape), then closes; past a grace, it
                // is dropped.
                let age = tokio::time::sleep(MAX_CONNECTION_AGE);
                tokio::pin!(age);
                let mut closing = false;
                loop {
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(err) = result {
                                log::debug!("metrics connection from {peer}: {err}");
                            }
                            break;
                        }
                        () = &mut age => {
                            if closing {
                                log::debug!("metrics connection from {peer}: too old, dropped");
                                break;
                            }
                            closing = true;
                            connection.as_mut().graceful_shutdown();
                            age.as_mut().reset(tokio::time::Instant::now() + CLOSING_GRACE);
                        }
                        () = held.evicted() => {
                            log::debug!("metrics connection from {peer}: closed for a newer one");
                            break;
                        }
                        () = stop.stopped() => break,
                    }
                }
            });
        }
    }

    /// The response to `request` on the connection `tracked` (its `ends`: this agent's
    /// address and the client's), busy (not to be closed for a newer one) only while it is
    /// built; a large page built under `pages`' bounds.
    async fn respond_bounded(
        self: Arc<Self>,
        request: &Request<Incoming>,
        ends: Option<(SocketAddr, SocketAddr)>,
        pages: &Pages,
        tracked: &Arc<Tracked>,
    ) -> Response<Bytes> {
        let (method, uri) = (request.method().clone(), request.uri().clone());
        if uri.path() == "/v1/resolutions" {
            // A netlink request to the kernel: off this runtime.
            let allowed = tokio::task::spawn_blocking(move || {
                let (local, peer) = ends.ok_or("the connection's addresses are unknown")?;
                peer_owner::may_read_names(local, peer)
            });
            match allowed.await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return names_refused(&why),
                Err(_) => return names_refused("the check did not finish"),
            }
        }
        if !is_large_page(&method, uri.path()) {
            let _busy = Busy::new(tracked);
            return self.respond_to(&method, uri.path(), uri.query());
        }
        let building = pages.building.lock().await;
        let busy = Busy::new(tracked);
        // Off this runtime, which also serves TCP lookups: a page of a workload's 65,536
        // names takes a while to build.
        let built = pages
            .build(move || self.respond_to(&method, uri.path(), uri.query()))
            .await;
        drop(busy);
        let Some(response) = built else {
            let mut response =
                Response::new(Bytes::from_static(b"the response could not be built\n"));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return response;
        };
        let (parts, body) = response.into_parts();
        let Ok(room) = tokio::time::timeout(PAGE_WAIT, pages.room_for(body.len())).await else {
            let mut response = Response::new(Bytes::from_static(
                b"busy: pages not yet read by other clients fill the budget; try again\n",
            ));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return response;
        };
        drop(building);
        // The room is given back when the last of the page's bytes is dropped: once hyper
        // has written it out, or the connection is gone.
        Response::from_parts(parts, Bytes::from_owner(Page { body, _room: room }))
    }
}

/// Whether a request's response may be large: a page built off the runtime, one at a time.
/// A `HEAD` is built whole as a `GET` is (hyper drops the body): built on the runtime, which
/// also serves TCP lookups, pipelined `HEAD`s of a 7 MB names page held it 25-40 ms each, and
/// `/healthz` took over a second (helper-129).
fn is_large_page(method: &Method, path: &str) -> bool {
    matches!(*method, Method::GET | Method::HEAD) && matches!(path, "/metrics" | "/v1/resolutions")
}

/// The answer to a client refused the names table, and `why`.
fn names_refused(why: &str) -> Response<Bytes> {
    super::text(
        StatusCode::FORBIDDEN,
        format!("forbidden: the names table is served to root and the agent's user only ({why})\n"),
    )
}

/// The large pages: one built at a time, on one thread, and a bound on the bytes of those not
/// yet sent.
struct Pages {
    building: AsyncMutex<()>,
    budget: Arc<Semaphore>,
    /// The thread that builds them (`None` if it could not be started: tokio's blocking
    /// threads then do). One thread, because glibc gives every thread that allocates an arena
    /// of its own, and keeps what is freed there: pages built in turn on tokio's blocking
    /// threads left a page's worth of freed memory in each, and 16 readers of a 7 MB page
    /// took the agent to 294 MB, past its pod's limit (helper-129; 56 MB with one arena).
    builder: Option<std::sync::mpsc::Sender<PageJob>>,
}

type PageJob = Box<dyn FnOnce() + Send>;

impl Default for Pages {
    fn default() -> Self {
        let (jobs, received) = std::sync::mpsc::channel::<PageJob>();
        let started = std::thread::Builder::new()
            .name("metrics-pages".into())
            .spawn(move || {
                // Ends when the server, and with it the sender, is gone.
                while let Ok(job) = received.recv() {
                    // A page that panics is answered 500 (its sender is dropped), and the
                    // thread goes on to the next.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            });
        if let Err(err) = &started {
            log::warn!(
                "cannot start the metrics pages' thread ({err}): pages are built on any blocking thread"
            );
        }
        Self {
            building: AsyncMutex::new(()),
            budget: Arc::new(Semaphore::new(PAGE_BUDGET)),
            builder: started.ok().map(|_| jobs),
        }
    }
}

impl Pages {
    /// Runs `build` on the pages' thread; `None` if it did not finish (it panicked).
    async fn build<F>(&self, build: F) -> Option<Response<Bytes>>
    where
        F: FnOnce() -> Response<Bytes> + Send + 'static,
    {
        let (built, response) = tokio::sync::oneshot::channel();
        let job: PageJob = Box::new(move || {
            let _ = built.send(build());
        });
        match &self.builder {
            Some(builder) => builder.send(job).ok()?,
            None => drop(tokio::task::spawn_blocking(job)),
        }
        response.await.ok()
    }

    async fn room_for(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let permits = u32::try_from(len.clamp(1, PAGE_BUDGET)).unwrap_or(u32::MAX);
        Arc::clone(&self.budget)
            .acquire_many_owned(permits)
            .await
            .ok()
    }
}

/// A page's bytes, holding its room in the budget while they live.
struct Page {
    body: Bytes,
    _room: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Page {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Connections {
    open: Mutex<VecDeque<Arc<Tracked>>>,
    next_id: AtomicU64,
}

struct Tracked {
    id: u64,
    /// Requests being answered on it.
    busy: AtomicUsize,
    evict: Notify,
}

impl Connections {
    /// A place for a new connection: at the limit, the oldest one not in the middle of a
    /// request is closed for it; `None` if every one is.
    fn admit(self: &Arc<Self>) -> Option<Held> {
        let mut open = self.open.lock().expect("not poisoned");
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .position(|tracked| tracked.busy.load(Ordering::Relaxed) == 0)?;
            if let Some(evicted) = open.remove(idle) {
                evicted.evict.notify_one();
            }
        }
        let tracked = Arc::new(Tracked {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            evict: Notify::new(),
        });
        open.push_back(Arc::clone(&tracked));
        Some(Held {
            connections: Arc::clone(self),
            tracked,
        })
    }
}

/// A connection's place among those served, given up when it ends.
struct Held {
    connections: Arc<Connections>,
    tracked: Arc<Tracked>,
}

impl Held {
    /// Resolves when the connection is to close for a newer one.
    async fn evicted(&self) {
        self.tracked.evict.notified().await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().expect("not poisoned");
        open.retain(|tracked| tracked.id != self.tracked.id);
    }
}

/// Marks a connection busy (not to be closed for a newer one) while it lives.
struct Busy(Arc<Tracked>);

impl Busy {
    fn new(tracked: &Arc<Tracked>) -> Self {
        tracked.busy.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(tracked))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_limit_the_oldest_idle_connection_makes_room_and_busy_ones_stay() {
        let connections = Arc::new(Connections::default());
        let open = |connections: &Connections| -> Vec<u64> {
            let open = connections.open.lock().expect("not poisoned");
            open.iter().map(|tracked| tracked.id).collect()
        };
        let held: Vec<Held> = (0..MAX_CONNECTIONS)
            .map(|_| connections.admit().expect("room"))
            .collect();
        // The oldest is answering a request: the next oldest is closed instead, and told so.
        let busy = Busy::new(&held[0].tracked);
        let newer = connections.admit().expect("room made");
        assert!(!open(&connections).contains(&1), "the oldest idle one went");
        assert!(open(&connections).contains(&0), "the busy one stayed");
        assert_eq!(open(&connections).len(), MAX_CONNECTIONS);
        let told = tokio::time::timeout(Duration::from_millis(10), held[1].evicted()).await;
        assert!(told.is_ok());
        // All busy: no room.
        let all_busy: Vec<Busy> = held[2..].iter().map(|h| Busy::new(&h.tracked)).collect();
        let newer_busy = Busy::new(&newer.tracked);
        assert!(connections.admit().is_none());
        drop((busy, all_busy, newer_busy));
        let again = connections.admit().expect("room again");
        // Those that end give their places back.
        drop(held);
        assert_eq!(open(&connections).len(), 2);
        drop((newer, again));
        assert!(open(&connections).is_empty());
    }

    #[test]
    fn heads_of_large_pages_are_built_as_their_gets_are() {
        for path in ["/metrics", "/v1/resolutions"] {
            assert!(is_large_page(&Method::GET, path));
            assert!(is_large_page(&Method::HEAD, path), "{path}");
            assert!(!is_large_page(&Method::POST, path));
        }
        assert!(!is_large_page(&Method::HEAD, "/healthz"));
        assert!(!is_large_page(&Method::GET, "/readyz"));
    }

    #[tokio::test]
    async fn pages_are_built_on_one_thread_which_outlives_a_panic() {
        let pages = Pages::default();
        let thread_name = || {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            Response::new(Bytes::from(name))
        };
        let built = pages.build(thread_name).await.expect("built");
        assert_eq!(built.body(), "metrics-pages");
        assert!(pages.build(|| panic!("a page that panics")).await.is_none());
        let again = pages.build(thread_name).await.expect("built after a panic");
        assert_eq!(again.body(), "metrics-pages");
    }

    #[tokio::test]
    async fn pages_not_yet_sent_are_bounded() {
        let pages = Pages::default();
        let page = Bytes::from_owner(Page {
            body: Bytes::from(vec![7u8; PAGE_BUDGET]),
            _room: pages.room_for(PAGE_BUDGET).await,
        });
        assert_eq!(pages.budget.available_permits(), 0);
        let waiting = tokio::time::timeout(Duration::from_millis(50), pages.room_for(1)).await;
        assert!(waiting.is_err(), "no room while the page is held");
        let sent = page.slice(..10);
        drop(page);
        assert_eq!(
            pages.budget.available_permits(),
            0,
            "a slice still holds it"
        );
        drop(sent);
        assert_eq!(pages.budget.available_permits(), PAGE_BUDGET);
    }
}
