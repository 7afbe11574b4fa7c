//! The operator's view of a running agent, over HTTP on `--metrics`:
//! - `/metrics`: Prometheus (OpenMetrics text), read at scrape time from the proxy's atomic
//!   counters and the kernel side's per-CPU counters. Each metric is declared once, in
//!   [`catalog`]; [`collector`] writes the page from it, and docs/metrics.md is generated from
//!   it too;
//! - `/healthz`: the agent is alive (its runtime answers), none of its UDP threads has been
//!   wedged for [`UNHEALTHY_AFTER`], nor has its redirected cgroup been made anew as long;
//! - `/readyz`: the programs are attached, the listeners bound and every UDP thread runs; not
//!   ready while shutting down;
//! - `/v1/resolutions`: the names a workload resolved ([`resolutions`]).
//!
//! [`server`] serves them, bounded against its own clients.
mod catalog;
mod collector;
mod peer_owner;
#[cfg(test)]
mod reference;
mod server;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{Method, Response, StatusCode, header};
use prometheus_client::registry::Registry;

use self::collector::AgentCollector;
use crate::{
    dns::{cache::Cache, query_log::QueryLog, stats::Stats, workload_stats::WorkloadStats},
    ebpf::KernelCounters,
    resolutions::{self, Resolutions},
};

/// How long a UDP thread may be wedged, or the redirected cgroup made anew, before the agent
/// is unhealthy (`/healthz` 503, no watchdog keep-alive to systemd): it is then restarted,
/// the one way to serve again (a restarted agent attaches to the cgroup made anew at the
/// path). Lookups went direct meanwhile.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(30);

/// A UDP thread that has not run (taken for wedged): which, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WedgedThread {
    pub index: usize,
    pub since: Instant,
}

/// Whether the agent is the one serving redirected DNS: set once attached, cleared when it
/// starts to shut down; and not while a newer agent has taken over from it.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
    replaced: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
    /// The redirected cgroup is gone or was made anew: the programs stay on the old one.
    target_lost: AtomicBool,
    /// Since when another cgroup is at the redirected cgroup's path.
    target_made_anew: Mutex<Option<Instant>>,
    /// A block the agent serves is no longer routed to this host: the redirect is off.
    block_unrouted: AtomicBool,
    /// The agent is out of its own cgroup and cannot go back: its own lookups may loop.
    outside_own_cgroup: AtomicBool,
    /// The agent cannot tell its programs that it runs: they soon redirect nothing.
    cannot_say_running: AtomicBool,
    /// A UDP thread has not run: the agent stopped saying it runs, so the redirect is off.
    wedged_udp_thread: Mutex<Option<WedgedThread>>,
    /// The table of servers cannot be pinned in the state directory: the next agent would
    /// not decode the addresses sockets were sent to before.
    unpinned: AtomicBool,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// `replaced` says whether a newer agent has taken over; asked at each `/readyz`, so that
    /// the probe of the agent taking over never gets this one's 200.
    pub fn watch_for_replacement(&self, replaced: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.replaced.set(Box::new(replaced));
    }

    /// Whether the redirected cgroup is gone or was made anew (the agent then redirects
    /// nothing until it restarts).
    pub fn set_target_lost(&self, lost: bool) {
        self.target_lost.store(lost, Ordering::Relaxed);
    }

    /// Whether another cgroup is at the redirected cgroup's path (made anew there): an agent
    /// restarted would attach to it.
    pub fn set_target_made_anew(&self, made_anew: bool) {
        let mut since = self.target_made_anew.lock().expect("not poisoned");
        match (made_anew, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            (true, Some(_)) => {}
        }
    }

    fn target_made_anew_since(&self) -> Option<Instant> {
        *self.target_made_anew.lock().expect("not poisoned")
    }

    /// Whether a block the agent serves lost its route to this host (the redirect is off
    /// until it is back).
    pub fn set_block_unrouted(&self, unrouted: bool) {
        self.block_unrouted.store(unrouted, Ordering::Relaxed);
    }

    /// Whether the agent is out of its own cgroup and cannot go back (it was removed or made
    /// anew meanwhile): the sockets it makes may send its own lookups back to it.
    pub fn set_outside_own_cgroup(&self, outside: bool) {
        self.outside_own_cgroup.store(outside, Ordering::Relaxed);
    }

    /// Whether the agent cannot tell its programs that it runs (`ALIVE_AT`): they then
    /// redirect nothing.
    pub fn set_cannot_say_running(&self, cannot: bool) {
        self.cannot_say_running.store(cannot, Ordering::Relaxed);
    }

    /// Whether the table of servers cannot be kept pinned (its bpffs unmounted, say): this
    /// agent serves as before, but the next one would start with an empty table.
    pub fn set_unpinned(&self, unpinned: bool) {
        self.unpinned.store(unpinned, Ordering::Relaxed);
    }

    /// The UDP thread taken for wedged, if one is (`None` once every one runs again).
    pub fn set_wedged_udp_thread(&self, wedged: Option<WedgedThread>) {
        *self.wedged_udp_thread.lock().expect("not poisoned") = wedged;
    }

    fn wedged_udp_thread(&self) -> Option<WedgedThread> {
        *self.wedged_udp_thread.lock().expect("not poisoned")
    }

    /// Why the agent should be restarted (`None`: it should not): a UDP thread wedged, or
    /// the redirected cgroup made anew, for [`UNHEALTHY_AFTER`]. Before, an agent whose
    /// cgroup was made anew (runc's `mkdir -p` of Docker's parent cgroup) redirected nothing
    /// for good while `/healthz` said 200 (helper-97). A cgroup merely gone is not a reason:
    /// a restarted agent would fail at start, and systemd give up on it.
    pub fn unhealthy(&self) -> Option<String> {
        if let Some(wedged) = self.wedged_udp_thread() {
            let for_how_long = wedged.since.elapsed();
            if for_how_long >= UNHEALTHY_AFTER {
                return Some(format!(
                    "UDP thread {} has not run for {} s (lookups go direct); restart the agent",
                    wedged.index,
                    for_how_long.as_secs()
                ));
            }
        }
        let for_how_long = self.target_made_anew_since()?.elapsed();
        (for_how_long >= UNHEALTHY_AFTER).then(|| {
            format!(
                "the redirected cgroup was made anew {} s ago (nothing in it is redirected); \
                 restart the agent",
                for_how_long.as_secs()
            )
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && !self.is_replaced()
            && !self.is_target_lost()
            && !self.is_block_unrouted()
            && !self.is_outside_own_cgroup()
            && !self.is_unable_to_say_running()
            && !self.is_unpinned()
            && self.wedged_udp_thread().is_none()
    }

    fn is_unpinned(&self) -> bool {
        self.unpinned.load(Ordering::Relaxed)
    }

    fn is_unable_to_say_running(&self) -> bool {
        self.cannot_say_running.load(Ordering::Relaxed)
    }

    fn is_outside_own_cgroup(&self) -> bool {
        self.outside_own_cgroup.load(Ordering::Relaxed)
    }

    fn is_block_unrouted(&self) -> bool {
        self.block_unrouted.load(Ordering::Relaxed)
    }

    fn is_target_lost(&self) -> bool {
        self.target_lost.load(Ordering::Relaxed)
    }

    fn is_replaced(&self) -> bool {
        self.replaced.get().is_some_and(|replaced| replaced())
    }
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
}

/// `text` with `%XX` escapes and `+` (a space) decoded; `None` if an escape is malformed or
/// the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'%' => {
                let hex = [input.next()?, input.next()?];
                // Two hex digits exactly: `from_str_radix` would take `%+a` too.
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => bytes.push(b' '),
            byte => bytes.push(byte),
        }
    }
    String::from_utf8(bytes).ok()
}

/// The `/metrics` page of a registry holding the agent's collector.
pub struct Metrics {
    registry: Registry,
    readiness: Arc<Readiness>,
    /// Served at `/v1/resolutions`.
    resolutions: Option<Arc<Resolutions>>,
}

impl Metrics {
    pub fn new(
        stats: Arc<Stats>,
        kernel: Arc<KernelCounters>,
        readiness: Arc<Readiness>,
        cache: Option<Arc<Cache>>,
        query_log: Option<Arc<QueryLog>>,
        resolutions: Option<Arc<Resolutions>>,
        workloads: Option<Arc<WorkloadStats>>,
    ) -> Self {
        let mut registry = Registry::with_prefix(catalog::PREFIX);
        registry.register_collector(Box::new(AgentCollector {
            stats,
            kernel,
            cache,
            query_log,
            workloads,
        }));
        Self {
            registry,
            readiness,
            resolutions,
        }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a collector.
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            log::error!("encoding metrics: {err}");
        }
        text
    }

    /// `/v1/resolutions?workload=W[&address=A]`: what W resolved (to A), as JSON.
    fn resolutions(&self, query: Option<&str>) -> Response<Bytes> {
        let reply = |status: StatusCode, body: String, json: bool| {
            let mut response = Response::new(Bytes::from(body));
            *response.status_mut() = status;
            if json {
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
            }
            response
        };
        let Some(table) = &self.resolutions else {
            return reply(StatusCode::NOT_FOUND, "not kept\n".to_owned(), false);
        };
        let mut workload = None;
        let mut address = None;
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(value) = percent_decode(value) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    format!("{key}: bad percent-encoding\n"),
                    false,
                );
            };
            match key {
                "workload" => workload = Some(value),
                "address" => match value.parse::<std::net::IpAddr>() {
                    Ok(ip) => address = Some(ip),
                    Err(_) => {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            format!("address={value}: not an IP address\n"),
                            false,
                        );
                    }
                },
                _ => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!("{key}: unknown parameter (workload, address)\n"),
                        false,
                    );
                }
            }
        }
        let Some(workload) = workload else {
            return reply(
                StatusCode::BAD_REQUEST,
                "workload=W is required (as the debug log or dnstap names it, or cgroup-id=N)\n"
                    .to_owned(),
                false,
            );
        };
        let rows = table.lookup(&workload, address);
        reply(StatusCode::OK, resolutions::to_json(&workload, &rows), true)
    }

    #[cfg(test)]
    fn respond(&self, method: &Method, path: &str) -> Response<Bytes> {
        self.respond_to(method, path, None)
    }

    fn respond_to(&self, method: &Method, path: &str, query: Option<&str>) -> Response<Bytes> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match path {
            "/metrics" => {
                let mut response = Response::new(Bytes::from(self.render()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/healthz" => match self.readiness.unhealthy() {
                None => text(StatusCode::OK, "ok\n"),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("unhealthy: {why}\n"),
                ),
            },
            "/v1/resolutions" => self.resolutions(query),
            "/readyz" if self.readiness.is_ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" if self.readiness.is_replaced() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: a newer agent has taken over\n",
            ),
            "/readyz" if self.readiness.is_target_lost() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the redirected cgroup is gone or was made anew; restart the agent\n",
            ),
            "/readyz" if self.readiness.is_block_unrouted() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the redirect block is no longer routed to this host (lookups go \
                 direct); restart the agent to route it again\n",
            ),
            "/readyz" if self.readiness.is_outside_own_cgroup() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the agent is out of its own cgroup and cannot go back (its own \
                 lookups may loop); restart the agent\n",
            ),
            "/readyz" if self.readiness.is_unable_to_say_running() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the agent cannot tell its programs that it runs, so they redirect \
                 nothing (lookups go direct); see its log\n",
            ),
            "/readyz" if self.readiness.is_unpinned() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the table of servers cannot be kept pinned in --state-dir, so a \
                 restarted agent would not decode the addresses sockets were sent to before; \
                 see its log\n",
            ),
            "/readyz" => match self.readiness.wedged_udp_thread() {
                Some(wedged) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: UDP thread {} has not run for {} ms, so the redirect is off \
                         (lookups go direct) until it runs again\n",
                        wedged.index,
                        wedged.since.elapsed().as_millis()
                    ),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting or shutting down\n",
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz or /v1/resolutions\n",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(ready: bool) -> Metrics {
        // No kernel map in a unit test: the page without the collector is enough for routing.
        let readiness = Arc::new(Readiness::default());
        readiness.set(ready);
        Metrics {
            registry: Registry::with_prefix(catalog::PREFIX),
            readiness,
            resolutions: None,
        }
    }

    #[test]
    fn query_strings_are_percent_decoded_and_bad_ones_refused() {
        assert_eq!(
            percent_decode("pod%3Dabc+container%3D123").as_deref(),
            Some("pod=abc container=123")
        );
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%+a"), None, "two hex digits exactly");
        assert_eq!(percent_decode("a%2Bb").as_deref(), Some("a+b"));
        let metrics = metrics(true);
        let status = |query| {
            metrics
                .respond_to(&Method::GET, "/v1/resolutions", query)
                .status()
        };
        // Not kept (no table): 404. (With one, a bad address is a 400: e2e/attribution.rs.)
        assert_eq!(status(Some("workload=x")), StatusCode::NOT_FOUND);
    }

    #[test]
    fn readiness_follows_the_flag_and_other_requests_are_refused() {
        let status = |m: &Metrics, method: Method, path: &str| m.respond(&method, path).status();
        let ready = metrics(true);
        assert_eq!(status(&ready, Method::GET, "/readyz"), StatusCode::OK);
        assert_eq!(status(&ready, Method::GET, "/healthz"), StatusCode::OK);
        assert_eq!(status(&ready, Method::GET, "/metrics"), StatusCode::OK);
        assert_eq!(status(&ready, Method::GET, "/"), StatusCode::NOT_FOUND);
        assert_eq!(
            status(&ready, Method::POST, "/metrics"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let stopping = metrics(false);
        assert_eq!(
            status(&stopping, Method::GET, "/readyz"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Alive while not ready.
        assert_eq!(status(&stopping, Method::GET, "/healthz"), StatusCode::OK);
    }

    #[test]
    fn a_replaced_agent_is_not_ready_and_says_why() {
        let replaced = Arc::new(AtomicBool::new(false));
        let agent = metrics(true);
        agent.readiness.watch_for_replacement({
            let replaced = Arc::clone(&replaced);
            move || replaced.load(Ordering::Relaxed)
        });
        assert_eq!(
            agent.respond(&Method::GET, "/readyz").status(),
            StatusCode::OK
        );
        replaced.store(true, Ordering::Relaxed);
        let response = agent.respond(&Method::GET, "/readyz");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = format!("{:?}", response.body());
        assert!(body.contains("a newer agent has taken over"), "{body}");
        // Still alive: it answers what reaches it until it is stopped.
        assert_eq!(
            agent.respond(&Method::GET, "/healthz").status(),
            StatusCode::OK
        );
    }

    /// A wedged UDP thread makes the agent not ready at once (its redirect is off), and
    /// unhealthy, to be restarted, once it has been wedged for [`UNHEALTHY_AFTER`].
    #[test]
    fn a_wedged_udp_thread_is_not_ready_then_unhealthy() {
        let agent = metrics(true);
        let body = |path| format!("{:?}", agent.respond(&Method::GET, path).body());
        let status = |path| agent.respond(&Method::GET, path).status();
        // A clock that has run less than 30 s (a VM just booted) cannot say it: skipped then.
        let Some(long_ago) = Instant::now().checked_sub(UNHEALTHY_AFTER) else {
            return;
        };
        let recently = long_ago + UNHEALTHY_AFTER - Duration::from_secs(2);
        agent.readiness.set_wedged_udp_thread(Some(WedgedThread {
            index: 1,
            since: recently,
        }));
        assert_eq!(status("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body("/readyz").contains("UDP thread 1 has not run for 2"),
            "{}",
            body("/readyz")
        );
        assert_eq!(status("/healthz"), StatusCode::OK);
        agent.readiness.set_wedged_udp_thread(Some(WedgedThread {
            index: 1,
            since: long_ago,
        }));
        assert_eq!(status("/healthz"), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body("/healthz").contains("restart the agent"),
            "{}",
            body("/healthz")
        );
        agent.readiness.set_wedged_udp_thread(None);
        assert_eq!(status("/readyz"), StatusCode::OK);
        assert_eq!(status("/healthz"), StatusCode::OK);
    }

    /// A redirected cgroup made anew makes the agent not ready at once, and unhealthy, to be
    /// restarted onto the cgroup at its path, after [`UNHEALTHY_AFTER`]; one merely gone only
    /// not ready.
    #[test]
    fn a_redirected_cgroup_made_anew_is_not_ready_then_unhealthy() {
        let agent = metrics(true);
        let body = |path| format!("{:?}", agent.respond(&Method::GET, path).body());
        let status = |path| agent.respond(&Method::GET, path).status();
        // A clock that has run less than 30 s (a VM just booted) cannot say it: skipped then.
        let Some(long_ago) = Instant::now().checked_sub(UNHEALTHY_AFTER) else {
            return;
        };
        agent.readiness.set_target_lost(true);
        agent.readiness.set_target_made_anew(true);
        assert_eq!(status("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status("/healthz"), StatusCode::OK);
        // Still made anew at the next look: it has been since the first.
        *agent
            .readiness
            .target_made_anew
            .lock()
            .expect("not poisoned") = Some(long_ago);
        agent.readiness.set_target_made_anew(true);
        assert_eq!(status("/healthz"), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body("/healthz").contains("made anew 30 s ago"),
            "{}",
            body("/healthz")
        );
        // Gone, with nothing at its path: a restart would fail at start.
        agent.readiness.set_target_made_anew(false);
        assert_eq!(status("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status("/healthz"), StatusCode::OK);
        agent.readiness.set_target_lost(false);
        assert_eq!(status("/readyz"), StatusCode::OK);
        assert_eq!(status("/healthz"), StatusCode::OK);
    }

    /// Each state the agent cannot leave by itself (it redirects nothing, or not as asked,
    /// until it restarts) fails `/readyz` and says why, and only while it lasts.
    #[test]
    fn an_agent_that_cannot_redirect_as_asked_is_not_ready_and_says_why() {
        let agent = metrics(true);
        type Setter = fn(&Readiness, bool);
        let states: [(Setter, &str); 5] = [
            (Readiness::set_target_lost, "the redirected cgroup is gone"),
            (
                Readiness::set_block_unrouted,
                "no longer routed to this host",
            ),
            (
                Readiness::set_outside_own_cgroup,
                "out of its own cgroup and cannot go back",
            ),
            (
                Readiness::set_cannot_say_running,
                "cannot tell its programs that it runs",
            ),
            (Readiness::set_unpinned, "cannot be kept pinned"),
        ];
        for (set, why) in states {
            set(&agent.readiness, true);
            let response = agent.respond(&Method::GET, "/readyz");
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body = format!("{:?}", response.body());
            assert!(body.contains(why), "{body}");
            set(&agent.readiness, false);
            assert_eq!(
                agent.respond(&Method::GET, "/readyz").status(),
                StatusCode::OK
            );
        }
    }
}
