//! Clients that behave as the adversarial tests need: a socket that asks two servers back to
//! back, a long-lived connected socket across agent restarts, a flood from someone else's
//! address, and thousands of sockets held open.
//!
//! Usage:
//! - `two-servers A B NAME`: one unconnected socket `sendto`s A then B at once, then reads
//!   both answers; prints `source=S answer=X` for each, in the order they came.
//! - `lookups MODE SERVER NAME COUNT --expect IP [--port P] [--source IP]`: COUNT lookups in a row from
//!   local port P (`connect` or `sendto`, a fresh socket each), each waiting for its answer
//!   as a strict resolver does: a datagram from elsewhere, or with another ID, is ignored.
//!   Prints `right=N wrong=N failed=N`: right is an answer from SERVER with IP, wrong one
//!   from SERVER (as the socket sees it) with anything else, failed no answer.
//! - `long-lived SERVER PREFIX COUNT INTERVAL_MS TIMEOUT_MS`: one connected UDP socket (a
//!   dual-stack one for `[::ffff:a.b.c.d]:53`), a lookup of `PREFIX-i...` every INTERVAL_MS, each retried once on the same socket after
//!   TIMEOUT_MS without an answer; prints `lookup i: answered tries=T at_ms=M` or
//!   `lookup i: failed at_ms=M` (M: when the lookup began, since the start).
//! - `flood FROM TO SECONDS [--transparent]`: sends queries from FROM (bound with
//!   IP_TRANSPARENT if asked: someone else's address) to TO for SECONDS; prints
//!   `attempts=N` (sendto calls made, whether the kernel could send them or not).
//! - `tcp-lookups SERVER NAME [PAUSE_MS]`: one TCP lookup after another, each over a fresh
//!   connection (2 s to answer), PAUSE_MS apart (default 0), until standard input closes;
//!   prints `answered=N failed=N` and, on stderr, why each failed one did.
//! - `bind ADDR [--freebind] [--tcp]`: binds a UDP socket there (a TCP one with `--tcp`; with
//!   `IP_FREEBIND` or `IPV6_FREEBIND` if asked: an address no interface has); prints `bound`
//!   or `refused: ERROR`.
//! - `spoof FROM SOURCE TO [--connected-sendto|--connected-send]`: binds a UDP socket at FROM
//!   (a dual-stack one for an IPv6 FROM; with `SO_REUSEPORT`, which lets the agent's user join
//!   the agent's hold of its port) and sends TO a datagram from SOURCE (`IP_PKTINFO` or
//!   `IPV6_PKTINFO`), as a forger of answers would; connected to TO first if asked, and then
//!   naming TO or not; prints `sent`, `refused: ERROR`, or `refused: bind FROM: ERROR`.
//! - `prebound FROM TO GO_FILE [TWINS]`: binds TWINS (default 1) UDP sockets at FROM
//!   (`SO_REUSEADDR`) and connects them to TO, in the reverse order (meant for while no agent
//!   runs, when nothing refuses a block address), prints `ready`, and once GO_FILE exists
//!   sends TO forged answers from each, one for every ID, over and over with `send` (no
//!   address: no cgroup hook runs), until standard input closes; prints `sent=N failed=N
//!   first_error=E`.
//! - `corked FROM TO GO_FILE ROUNDS`: binds ROUNDS × 20 UDP sockets at FROM (`SO_REUSEADDR`),
//!   half of them connected to TO, and on each queues the first 12 bytes (the header) of a
//!   forged answer to TO for one of the IDs 0 to 19 (`MSG_MORE`: nothing is sent yet), as
//!   while no agent runs; prints `ready`, and once GO_FILE exists sends the rest of each with
//!   a plain `send` (no cgroup hook runs on it), one round of 20 IDs every 150 ms; prints
//!   `sent=N failed=N first_error=E`.
//! - `join ADDR SECONDS`: binds a UDP socket there with SO_REUSEPORT (joining a group bound
//!   there) and counts what it receives for SECONDS; prints `received=N`.
//! - `join-tcp ADDR SECONDS`: the same with a TCP listener, answering each connection with an
//!   HTTP 500; prints `accepted=N`.
//! - `unreadable-flood TO SECONDS`: sends TO, from 32 sockets, 32 datagrams to a `sendmmsg`,
//!   as fast as it can for SECONDS, a query with two questions (which its server answers
//!   FORMERR at once), reading and dropping what comes back; prints `sent=N`.
//! - `hold SERVER COUNT [--distinct] [--source IP]`: COUNT UDP sockets connected to SERVER
//!   (IPv4 or IPv6; or, with --distinct, to COUNT different addresses from SERVER's on, port
//!   53), bound to IP if given (each local address has its own ports); prints `holding N` and
//!   keeps them until standard input closes.
//! - `connected-rounds SERVER TIMEOUT_MS`: one UDP socket connected to SERVER for its whole
//!   life; for each line `PREFIX COUNT INTERVAL_MS` on standard input, COUNT lookups of one try
//!   each, printing for each `PREFIX-N answered|refused|timed-out ms=M` (refused: the send or
//!   the read said so, as `ECONNREFUSED` or `EPERM`), then `round done`.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client; it resolves no names"
)]
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

/// The address of the answer's one A record, if it is a NOERROR answer with one.
fn single_a_record(answer: &[u8]) -> Option<Ipv4Addr> {
    let noerror = answer.get(3)? & 0x0f == 0;
    if noerror {
        tests::answer::single_a_record(answer)
    } else {
        None
    }
}

fn parse<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
    text.parse().map_err(|_| format!("{text}: not {what}"))
}

fn two_servers(a: SocketAddr, b: SocketAddr, name: &str) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    for (id, server) in [(1u16, a), (2, b)] {
        socket
            .send_to(&tests::a_query(id, name), server)
            .map_err(|e| format!("sendto {server}: {e}"))?;
    }
    let mut buf = [0u8; 4096];
    for _ in 0..2 {
        let (len, source) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer: {e}"))?;
        let answer = single_a_record(&buf[..len]).ok_or("not a single A record")?;
        println!("source={source} answer={answer}");
    }
    Ok(())
}

fn lookups(args: &[String]) -> Result<(), String> {
    let [mode, server, name, count, options @ ..] = args else {
        return Err("lookups MODE SERVER NAME COUNT --expect IP [--port P]".to_owned());
    };
    let server: SocketAddr = parse(server, "IP:PORT")?;
    let count: u32 = parse(count, "a count")?;
    let (mut expect, mut port) = (None, 0u16);
    let mut source: IpAddr = Ipv4Addr::UNSPECIFIED.into();
    let mut options = options.iter();
    while let Some(option) = options.next() {
        let value = options.next().ok_or(format!("{option} needs a value"))?;
        match option.as_str() {
            "--expect" => expect = Some(parse::<Ipv4Addr>(value, "an IPv4 address")?),
            "--port" => port = parse(value, "a port")?,
            "--source" => source = parse(value, "an IP")?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    let expect = expect.ok_or("--expect is needed")?;
    let (mut right, mut wrong, mut failed) = (0, 0, 0);
    let mut buf = [0u8; 4096];
    for i in 0..count {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).map_err(|e| e.to_string())?;
        // The port may still be held by the socket before: wait for it.
        socket.set_reuse_address(true).map_err(|e| e.to_string())?;
        let local = SocketAddr::new(source, port);
        socket
            .bind(&local.into())
            .map_err(|e| format!("bind {local}: {e}"))?;
        let socket = UdpSocket::from(socket);
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .map_err(|e| e.to_string())?;
        let query = tests::a_query(i as u16, &format!("l{i}.{name}"));
        let sent = if mode == "connect" {
            socket.connect(server).and_then(|()| socket.send(&query))
        } else {
            socket.send_to(&query, server)
        };
        if sent.is_err() {
            failed += 1;
            continue;
        }
        loop {
            match socket.recv_from(&mut buf) {
                // What a resolver takes: its server's address and port, its query's ID.
                Ok((len, source)) if source == server && buf[..2] == query[..2] => {
                    if single_a_record(&buf[..len]) == Some(expect) {
                        right += 1;
                    } else {
                        wrong += 1;
                    }
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
    }
    println!("right={right} wrong={wrong} failed={failed}");
    Ok(())
}

fn long_lived(args: &[String]) -> Result<(), String> {
    let [server, prefix, count, interval, timeout] = args else {
        return Err("long-lived SERVER PREFIX COUNT INTERVAL_MS TIMEOUT_MS".to_owned());
    };
    let server: SocketAddr = parse(server, "IP:PORT")?;
    let count: u32 = parse(count, "a count")?;
    let interval = Duration::from_millis(parse(interval, "milliseconds")?);
    let timeout = Duration::from_millis(parse(timeout, "milliseconds")?);
    // An IPv6 server (`[::ffff:a.b.c.d]:53` included: a dual-stack socket) gets an IPv6 socket.
    let any = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    socket
        .connect(server)
        .map_err(|e| format!("connect: {e}"))?;
    let mut buf = [0u8; 4096];
    let first_started = Instant::now();
    for i in 0..count {
        let started = Instant::now();
        let at_ms = started.duration_since(first_started).as_millis();
        let query = tests::a_query(i as u16, &format!("{prefix}-{i}.example.test"));
        let mut outcome = None;
        for try_number in 1..=2 {
            let sent_at = Instant::now();
            if let Err(err) = socket.send(&query) {
                // A refusal reported by an earlier datagram: the next send goes through.
                eprintln!("lookup {i} try {try_number}: send: {err}");
            }
            while outcome.is_none() {
                let Some(left) = timeout
                    .checked_sub(sent_at.elapsed())
                    .filter(|d| !d.is_zero())
                else {
                    break;
                };
                socket
                    .set_read_timeout(Some(left))
                    .map_err(|e| e.to_string())?;
                match socket.recv(&mut buf) {
                    Ok(len) if buf[..2] == query[..2] && single_a_record(&buf[..len]).is_some() => {
                        outcome = Some(try_number)
                    }
                    Ok(_) => {} // a late answer to an earlier query
                    Err(err)
                        if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                    {
                        break;
                    }
                    Err(err) => {
                        // ECONNREFUSED while nothing serves the address: fail fast, and
                        // retry when the timeout is up, as a resolver would.
                        eprintln!("lookup {i} try {try_number}: {err}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            if outcome.is_some() {
                break;
            }
        }
        match outcome {
            Some(tries) => println!("lookup {i}: answered tries={tries} at_ms={at_ms}"),
            None => println!("lookup {i}: failed at_ms={at_ms}"),
        }
        let _ = std::io::stdout().flush();
        if let Some(rest) = interval.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

fn connected_rounds(server: SocketAddr, timeout: Duration) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket
        .connect(server)
        .map_err(|e| format!("connect: {e}"))?;
    let mut buf = [0u8; 4096];
    let mut id = 0u16;
    for line in std::io::stdin().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let [prefix, count, interval] = line.split_whitespace().collect::<Vec<_>>()[..] else {
            return Err(format!("{line}: not PREFIX COUNT INTERVAL_MS"));
        };
        let count: u32 = parse(count, "a count")?;
        let interval = Duration::from_millis(parse(interval, "milliseconds")?);
        for i in 0..count {
            let started = Instant::now();
            id = id.wrapping_add(1);
            let query = tests::a_query(id, &format!("{prefix}-{i}.example.test"));
            let outcome = match socket.send(&query) {
                Err(err) => format!("refused ({err})"),
                Ok(_) => loop {
                    let Some(left) = timeout.checked_sub(started.elapsed()) else {
                        break "timed-out".to_owned();
                    };
                    socket
                        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                        .map_err(|e| e.to_string())?;
                    match socket.recv(&mut buf) {
                        Ok(len)
                            if buf[..2] == query[..2] && single_a_record(&buf[..len]).is_some() =>
                        {
                            break "answered".to_owned();
                        }
                        Ok(_) => {} // a late answer to an earlier query
                        Err(err)
                            if matches!(
                                err.kind(),
                                ErrorKind::WouldBlock | ErrorKind::TimedOut
                            ) =>
                        {
                            break "timed-out".to_owned();
                        }
                        Err(err) => break format!("refused ({err})"),
                    }
                },
            };
            println!(
                "{prefix}-{i} {outcome} ms={}",
                started.elapsed().as_millis()
            );
            if let Some(rest) = interval.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        println!("round done");
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

fn flood(args: &[String]) -> Result<(), String> {
    let [from, to, seconds, options @ ..] = args else {
        return Err("flood FROM TO SECONDS [--transparent]".to_owned());
    };
    let from: SocketAddr = parse(from, "IP:PORT")?;
    let to: SocketAddr = parse(to, "IP:PORT")?;
    let seconds: u64 = parse(seconds, "seconds")?;
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).map_err(|e| e.to_string())?;
    if options.iter().any(|o| o == "--transparent") {
        let on: libc::c_int = 1;
        // SAFETY: the fd is the socket's, open for the call; the kernel reads `size_of::<c_int>`
        // bytes from `on`, a live c_int.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_TRANSPARENT,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(format!(
                "IP_TRANSPARENT: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    socket.set_reuse_address(true).map_err(|e| e.to_string())?;
    socket
        .bind(&from.into())
        .map_err(|e| format!("bind {from}: {e}"))?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let socket = UdpSocket::from(socket);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut attempts = 0u64;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        // Every ID in turn, so some match the victim's.
        let query = tests::a_query(attempts as u16, "evil.example.test");
        let _ = socket.send_to(&query, to);
        attempts += 1;
        while socket.recv_from(&mut buf).is_ok() {}
        // About 8,000 a second: a flood that leaves a 2-CPU machine room to answer.
        if attempts.is_multiple_of(8) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!("attempts={attempts}");
    Ok(())
}

fn unreadable_flood(to: SocketAddr, seconds: u64) -> Result<(), String> {
    const SOCKETS: usize = 32;
    const BATCH: usize = 32;
    let mut query = tests::a_query(0x5151, "unreadable.example.test");
    // Two questions, the second the first again.
    query[5] = 2;
    let question = query[12..].to_vec();
    query.extend_from_slice(&question);
    let sockets = (0..SOCKETS)
        .map(|_| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let to = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: query.as_mut_ptr().cast(),
        iov_len: query.len(),
    };
    let mut messages: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: `mmsghdr` is plain integers and pointers, for which all zeros is valid.
            let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
            message.msg_hdr.msg_name = to.as_ptr().cast_mut().cast();
            message.msg_hdr.msg_namelen = to.len();
            message.msg_hdr.msg_iov = &raw mut iov;
            message.msg_hdr.msg_iovlen = 1;
            message
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut sent, mut buf) = (0u64, [0u8; 512]);
    while Instant::now() < deadline {
        for socket in &sockets {
            // SAFETY: every message points at `to`, `iov` and `query`, alive for the call,
            // and the kernel reads no more than their lengths.
            let count = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    messages.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    0,
                )
            };
            sent += u64::try_from(count).unwrap_or(0);
            while socket.recv_from(&mut buf).is_ok() {}
        }
    }
    println!("sent={sent}");
    Ok(())
}

fn hold(args: &[String]) -> Result<(), String> {
    let [server, count, options @ ..] = args else {
        return Err("hold SERVER COUNT [--distinct]".to_owned());
    };
    let server: SocketAddr = parse(server, "IP:PORT")?;
    let count: u32 = parse(count, "a count")?;
    let distinct = options.iter().any(|o| o == "--distinct");
    let source: IpAddr = match options.iter().position(|o| o == "--source") {
        Some(at) => parse(options.get(at + 1).ok_or("--source needs an IP")?, "an IP")?,
        None if server.is_ipv6() => Ipv6Addr::UNSPECIFIED.into(),
        None => Ipv4Addr::UNSPECIFIED.into(),
    };
    allow_open_files(u64::from(count))?;
    let mut sockets = Vec::with_capacity(count as usize);
    for i in 0..count {
        let to = match server.ip() {
            IpAddr::V4(first) if distinct => {
                SocketAddr::from((Ipv4Addr::from(u32::from(first) + i), 53))
            }
            IpAddr::V6(first) if distinct => {
                SocketAddr::from((Ipv6Addr::from(u128::from(first) + u128::from(i)), 53))
            }
            _ => server,
        };
        let socket =
            UdpSocket::bind(SocketAddr::new(source, 0)).map_err(|e| format!("socket {i}: {e}"))?;
        socket
            .connect(to)
            .map_err(|e| format!("connect {to}: {e}"))?;
        sockets.push(socket);
    }
    println!("holding {}", sockets.len());
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// `THREADS` threads connect a UDP socket each to the same new server at the same moment (a
/// spin barrier per round), for `COUNT` servers from `FIRST` on (port 53), and close them: the
/// kernel side's race for a new server's slot, as many threads' first lookups make it.
fn race_connect(args: &[String]) -> Result<(), String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    let [threads, count, first] = args else {
        return Err("race-connect THREADS COUNT FIRST_SERVER_IP".to_owned());
    };
    let threads: u32 = parse(threads, "a thread count")?;
    let count: u32 = parse(count, "a count")?;
    let first: Ipv4Addr = parse(first, "an IPv4 address")?;
    let arrived = std::sync::Arc::new(AtomicU32::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let arrived = std::sync::Arc::clone(&arrived);
            std::thread::spawn(move || -> Result<(), String> {
                for round in 0..count {
                    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                        .map_err(|e| format!("socket: {e}"))?;
                    arrived.fetch_add(1, Ordering::AcqRel);
                    while arrived.load(Ordering::Acquire) < threads * (round + 1) {
                        std::hint::spin_loop();
                    }
                    let to = SocketAddr::from((Ipv4Addr::from(u32::from(first) + round), 53));
                    socket
                        .connect(to)
                        .map_err(|e| format!("connect {to}: {e}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "a thread panicked")??;
    }
    println!("raced {count}");
    Ok(())
}

/// A socket of `kind` bound to `addr` with SO_REUSEPORT, joining any group there.
fn joined(addr: SocketAddr, kind: Type) -> Result<Socket, String> {
    let socket = Socket::new(Domain::for_address(addr), kind, None).map_err(|e| e.to_string())?;
    socket.set_reuse_port(true).map_err(|e| e.to_string())?;
    socket
        .bind(&addr.into())
        .map_err(|e| format!("bind {addr}: {e}"))?;
    println!("joined");
    let _ = std::io::stdout().flush();
    Ok(socket)
}

fn join(addr: SocketAddr, seconds: u64) -> Result<(), String> {
    let socket = UdpSocket::from(joined(addr, Type::DGRAM)?);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut received = 0u64;
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        if socket.recv_from(&mut buf).is_ok() {
            received += 1;
        }
    }
    println!("received={received}");
    Ok(())
}

/// Joins a TCP listener's group at `addr` and accepts (answering each connection with an
/// HTTP 500, as a saboteur of health probes would) for `seconds`.
fn join_tcp(addr: SocketAddr, seconds: u64) -> Result<(), String> {
    let socket = joined(addr, Type::STREAM)?;
    socket.listen(16).map_err(|e| e.to_string())?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = std::net::TcpListener::from(socket);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut accepted = 0u64;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                accepted += 1;
                let _ = stream.write_all(b"HTTP/1.1 500 Sabotaged\r\ncontent-length: 0\r\n\r\n");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    println!("accepted={accepted}");
    Ok(())
}

fn tcp_lookups(server: SocketAddr, name: &str, pause: Duration) -> Result<(), String> {
    use std::{
        net::TcpStream,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };
    let done = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&done);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stop.store(true, Ordering::Relaxed);
    });
    let (mut answered, mut failed) = (0u64, 0u64);
    let mut i = 0u16;
    while !done.load(Ordering::Relaxed) {
        i = i.wrapping_add(1);
        let query = tests::a_query(i, &format!("t{i}.{name}"));
        let lookup = || -> std::io::Result<Vec<u8>> {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut frame = (query.len() as u16).to_be_bytes().to_vec();
            frame.extend_from_slice(&query);
            stream.write_all(&frame)?;
            let mut length = [0u8; 2];
            stream.read_exact(&mut length)?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
            stream.read_exact(&mut answer)?;
            Ok(answer)
        };
        match lookup() {
            Ok(answer) if answer[..2] == query[..2] && single_a_record(&answer).is_some() => {
                answered += 1
            }
            Ok(_) => {
                failed += 1;
                eprintln!("lookup {i}: a wrong answer");
            }
            Err(err) => {
                failed += 1;
                eprintln!("lookup {i}: {err}");
            }
        }
        std::thread::sleep(pause);
    }
    println!("answered={answered} failed={failed}");
    Ok(())
}

/// Binds a socket of `kind` at `addr` (and lets it go).
fn bind_only(addr: SocketAddr, kind: Type, freebind: bool) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), kind, None)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(freebind)?,
        SocketAddr::V6(_) => socket.set_freebind_v6(freebind)?,
    }
    socket.bind(&addr.into())
}

fn spoof(from: &str, source: &str, to: &str, how: &[String]) -> Result<(), String> {
    let from: SocketAddr = parse(from, "IP:PORT")?;
    let source: IpAddr = parse(source, "an IP address")?;
    let to: SocketAddr = parse(to, "IP:PORT")?;
    let (connect, name) = match how {
        [] => (false, true),
        [how] if how == "--connected-sendto" => (true, true),
        [how] if how == "--connected-send" => (true, false),
        _ => return Err("spoof FROM SOURCE TO [--connected-sendto|--connected-send]".to_owned()),
    };
    let domain = if from.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, None).map_err(|e| format!("socket: {e}"))?;
    if from.is_ipv6() {
        // Dual-stack, so a v4-mapped FROM and TO take the IPv4 path, as such clients do.
        socket
            .set_only_v6(false)
            .map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
    }
    socket
        .set_reuse_port(true)
        .map_err(|e| format!("SO_REUSEPORT: {e}"))?;
    if let Err(err) = socket.bind(&from.into()) {
        println!("refused: bind {from}: {err}");
        return Ok(());
    }
    if connect {
        socket
            .connect(&to.into())
            .map_err(|e| format!("connect {to}: {e}"))?;
    }
    let name_of_to = socket2::SockAddr::from(to);
    let payload = tests::a_query(0x6666, "forged.example.test");
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is integers and raw pointers, for which all zeroes is a valid value (null
    // pointers, zero lengths); the pointers are set to live buffers below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    if name {
        header.msg_name = name_of_to.as_ptr().cast_mut().cast();
        header.msg_namelen = name_of_to.len();
    }
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    let sent = match (domain, source) {
        (Domain::IPV4, IpAddr::V4(source)) => {
            // SAFETY: CMSG_SPACE only computes a length.
            header.msg_controllen =
                unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) }
                    as usize;
            let pktinfo = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(source.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            // SAFETY: as in `send_with_pktinfo`.
            unsafe {
                send_with_pktinfo(
                    &socket,
                    &header,
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    pktinfo,
                )
            }
        }
        (_, source) => {
            let source = match source {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            // SAFETY: CMSG_SPACE only computes a length.
            header.msg_controllen =
                unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) }
                    as usize;
            let pktinfo = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: source.octets(),
                },
                ipi6_ifindex: 0,
            };
            // SAFETY: as in `send_with_pktinfo`.
            unsafe {
                send_with_pktinfo(
                    &socket,
                    &header,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    pktinfo,
                )
            }
        }
    };
    if sent < 0 {
        println!("refused: {}", std::io::Error::last_os_error());
    } else {
        println!("sent");
    }
    Ok(())
}

fn prebound(from: &str, to: &str, go: &str, twins: &[String]) -> Result<(), String> {
    let from: SocketAddr = parse(from, "IP:PORT")?;
    let to: SocketAddr = parse(to, "IP:PORT")?;
    let twins: usize = match twins {
        [] => 1,
        [count] => parse(count, "a count")?,
        _ => return Err("prebound FROM TO GO_FILE [TWINS]".to_owned()),
    };
    // Bound in order, connected in the reverse: the kernel finds the one connected last
    // first, and a sweep that aborts what it listed must not take that for the rest.
    let mut sockets = Vec::new();
    for _ in 0..twins {
        sockets.push(UdpSocket::from(twin_at(from)?));
    }
    for socket in sockets.iter().rev() {
        socket
            .connect(to)
            .map_err(|e| format!("connect {to}: {e}"))?;
    }
    ready_until(go);
    let mut stdin = std::io::stdin();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stdin, &mut std::io::sink());
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let (mut sent, mut failed, mut first_error) = (0u64, 0u64, None);
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        for id in 0..=u16::MAX {
            let answer = forged_answer(id);
            for socket in &sockets {
                match socket.send(&answer) {
                    Ok(_) => sent += 1,
                    Err(err) => {
                        failed += 1;
                        first_error.get_or_insert(err.to_string());
                    }
                }
            }
        }
    }
    let _ = reader.join();
    println!(
        "sent={sent} failed={failed} first_error={}",
        first_error.unwrap_or_default()
    );
    Ok(())
}

/// Raises this process's open-file limit to hold `count` sockets and some (past the hard
/// limit only with `CAP_SYS_RESOURCE`).
fn allow_open_files(count: u64) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the kernel writes one struct rlimit into `limit`, a live local of that type.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let wanted = count + 1024;
    limit.rlim_cur = wanted.max(limit.rlim_cur);
    limit.rlim_max = wanted.max(limit.rlim_max);
    // SAFETY: the kernel reads one struct rlimit from `limit`, a live local of that type.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(format!(
            "RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A UDP socket bound at `from` beside others (`SO_REUSEADDR`).
fn twin_at(from: SocketAddr) -> Result<Socket, String> {
    let socket =
        Socket::new(Domain::for_address(from), Type::DGRAM, None).map_err(|e| e.to_string())?;
    socket.set_reuse_address(true).map_err(|e| e.to_string())?;
    socket
        .bind(&from.into())
        .map_err(|e| format!("bind {from}: {e}"))?;
    Ok(socket)
}

/// An answer a forger sends for ID `id`: a response to a query of its own.
fn forged_answer(id: u16) -> Vec<u8> {
    let mut answer = tests::a_query(id, "forged.example.test");
    answer[2] |= 0x80; // QR: a response
    answer
}

/// Says `ready`, then waits until the file `go` exists.
fn ready_until(go: &str) {
    println!("ready");
    while !std::path::Path::new(go).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// IDs the corked answers cover, one socket each per round: a victim's first lookups.
const CORKED_IDS: u16 = 20;

/// `corked`: see the module's help.
fn corked(from: &str, to: &str, go: &str, rounds: &str) -> Result<(), String> {
    let from: SocketAddr = parse(from, "IP:PORT")?;
    let to: SocketAddr = parse(to, "IP:PORT")?;
    let rounds: u16 = parse(rounds, "a count")?;
    allow_open_files(u64::from(rounds) * u64::from(CORKED_IDS))?;
    let mut sockets = Vec::new();
    for n in 0..rounds * CORKED_IDS {
        let socket = twin_at(from)?;
        // Half connected (which a sweep lists), half not.
        let connected = n % 2 == 1;
        if connected {
            socket
                .connect(&to.into())
                .map_err(|e| format!("connect {to}: {e}"))?;
        }
        let header = &forged_answer(n % CORKED_IDS)[..12];
        let queued = if connected {
            socket.send_with_flags(header, libc::MSG_MORE)
        } else {
            socket.send_to_with_flags(header, &to.into(), libc::MSG_MORE)
        };
        queued.map_err(|e| format!("sendto {to} with MSG_MORE: {e}"))?;
        sockets.push(socket);
    }
    ready_until(go);
    let (mut sent, mut failed, mut first_error) = (0u64, 0u64, None);
    for round in sockets.chunks(usize::from(CORKED_IDS)) {
        for (id, socket) in (0..).zip(round) {
            // The rest of the answer, with no address: no cgroup hook runs on it.
            match socket.send(&forged_answer(id)[12..]) {
                Ok(_) => sent += 1,
                Err(err) => {
                    failed += 1;
                    first_error.get_or_insert(err.to_string());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    println!(
        "sent={sent} failed={failed} first_error={}",
        first_error.unwrap_or_default()
    );
    Ok(())
}

/// Writes one control message of `level`/`kind` holding `data` into `header`'s control buffer
/// and sends with it; what `sendmsg` returned.
///
/// # Safety
/// `header.msg_control` points at a u64-aligned buffer of at least
/// `header.msg_controllen` = `CMSG_SPACE(size_of::<T>())` bytes, and every pointer in `header`
/// (name, iov and what it points at) is live for the call.
unsafe fn send_with_pktinfo<T>(
    socket: &Socket,
    header: &libc::msghdr,
    level: libc::c_int,
    kind: libc::c_int,
    data: T,
) -> isize {
    // SAFETY: the caller's promise: the buffer holds one message of T, so CMSG_FIRSTHDR is
    // non-null and the header and data written through it stay inside it (the data with
    // write_unaligned, so its alignment does not matter).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(header);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<T>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), data);
        libc::sendmsg(socket.as_raw_fd(), header, 0)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("two-servers") => match &args[1..] {
            [a, b, name] => parse(a, "IP:PORT")
                .and_then(|a| Ok((a, parse(b, "IP:PORT")?)))
                .and_then(|(a, b)| two_servers(a, b, name)),
            _ => Err("two-servers A B NAME".to_owned()),
        },
        Some("lookups") => lookups(&args[1..]),
        Some("long-lived") => long_lived(&args[1..]),
        Some("connected-rounds") => match &args[1..] {
            [server, timeout] => parse::<SocketAddr>(server, "IP:PORT")
                .and_then(|server| Ok((server, parse::<u64>(timeout, "milliseconds")?)))
                .and_then(|(server, timeout)| {
                    connected_rounds(server, Duration::from_millis(timeout))
                }),
            _ => Err("connected-rounds SERVER TIMEOUT_MS".to_owned()),
        },
        Some("flood") => flood(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("unreadable-flood") => match &args[1..] {
            [to, seconds] => parse::<SocketAddr>(to, "IP:PORT")
                .and_then(|to| Ok((to, parse::<u64>(seconds, "seconds")?)))
                .and_then(|(to, seconds)| unreadable_flood(to, seconds)),
            _ => Err("unreadable-flood TO SECONDS".to_owned()),
        },
        Some("race-connect") => race_connect(&args[1..]),
        Some("join") => match &args[1..] {
            [addr, seconds] => parse::<SocketAddr>(addr, "IP:PORT")
                .and_then(|addr| Ok((addr, parse::<u64>(seconds, "seconds")?)))
                .and_then(|(addr, seconds)| join(addr, seconds)),
            _ => Err("join ADDR SECONDS".to_owned()),
        },
        Some("join-tcp") => match &args[1..] {
            [addr, seconds] => parse::<SocketAddr>(addr, "IP:PORT")
                .and_then(|addr| Ok((addr, parse::<u64>(seconds, "seconds")?)))
                .and_then(|(addr, seconds)| join_tcp(addr, seconds)),
            _ => Err("join-tcp ADDR SECONDS".to_owned()),
        },
        Some("tcp-lookups") => match &args[1..] {
            [server, name, pause @ ..] if pause.len() <= 1 => {
                let pause = match pause.first() {
                    Some(ms) => parse(ms, "milliseconds").map(Duration::from_millis),
                    None => Ok(Duration::ZERO),
                };
                pause.and_then(|pause| {
                    parse::<SocketAddr>(server, "IP:PORT")
                        .and_then(|server| tcp_lookups(server, name, pause))
                })
            }
            _ => Err("tcp-lookups SERVER NAME [PAUSE_MS]".to_owned()),
        },
        Some("spoof") => match &args[1..] {
            [from, source, to, how @ ..] => spoof(from, source, to, how),
            _ => Err("spoof FROM SOURCE TO [--connected-sendto|--connected-send]".to_owned()),
        },
        Some("corked") => match &args[1..] {
            [from, to, go, rounds] => corked(from, to, go, rounds),
            _ => Err("corked FROM TO GO_FILE ROUNDS".to_owned()),
        },
        Some("prebound") => match &args[1..] {
            [from, to, go, twins @ ..] => prebound(from, to, go, twins),
            _ => Err("prebound FROM TO GO_FILE [TWINS]".to_owned()),
        },
        Some("bind") => match &args[1..] {
            [addr, how @ ..]
                if how
                    .iter()
                    .all(|flag| ["--freebind", "--tcp"].contains(&flag.as_str())) =>
            {
                let flag = |name: &str| how.iter().any(|flag| flag == name);
                let kind = if flag("--tcp") {
                    Type::STREAM
                } else {
                    Type::DGRAM
                };
                parse::<SocketAddr>(addr, "IP:PORT").map(|addr| {
                    match bind_only(addr, kind, flag("--freebind")) {
                        Ok(()) => println!("bound"),
                        Err(err) => println!("refused: {err}"),
                    }
                })
            }
            _ => Err("bind ADDR [--freebind] [--tcp]".to_owned()),
        },
        _ => Err("usage: hostile-client two-servers|lookups|long-lived|flood|hold ...".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
