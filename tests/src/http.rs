//! The agent's HTTP endpoints (metrics, health, resolutions) as the tests read them: one GET
//! from inside a namespace, and a sample's value on a Prometheus text page.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::Duration,
};

use crate::Netns;

/// One HTTP/1.1 GET of `path` from `addr` inside `netns` (from a thread that joins the
/// namespace, so the test process stays where it is). Returns the status and the body.
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_in(&netns.name, addr, path)
}

/// [`http_get`] in the network namespace `/run/netns/<netns>`, one the tests did not make
/// with [`Netns`] (the tests' Docker namespace).
#[expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on its own thread; it resolves no names"
)]
pub fn http_get_in(netns: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    let namespace = format!("/run/netns/{netns}");
    let path = path.to_owned();
    thread::spawn(move || {
        let ns = fs::File::open(&namespace).unwrap_or_else(|err| panic!("{namespace}: {err}"));
        // SAFETY: setns changes only this thread's network namespace; the thread ends here.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {namespace}: {}",
            std::io::Error::last_os_error()
        );
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, body.to_owned())
    })
    .join()
    .expect("the HTTP client thread")
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `dns_proxy_answers_total{protocol="udp",rcode="NOERROR"}`) in a Prometheus text page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
