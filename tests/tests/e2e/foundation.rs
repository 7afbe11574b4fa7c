//! The foundation: IPv4 UDP lookups redirected and answered, the agent's own traffic left
//! alone, fail-open and graceful shutdown, records that live as long as their socket, and
//! errors an operator can cause.
use super::*;

#[test]
fn dig_is_answered_through_the_proxy_by_the_server_it_asked() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);

    let name = "dig.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), name, &[]),
        "dig in the cgroup",
    );
    let line = forwarded(agent, name);
    assert!(line.contains(&format!("server={SERVER_IP}:53")), "{line}");
    assert!(line.contains(&format!("upstream={SERVER_IP}:53")), "{line}");
    assert!(line.contains("type=A rcode=NoError"), "{line}");
}

#[test]
fn glibc_getaddrinfo_is_answered_through_the_proxy() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);

    let name = "glibc.example.test";
    // getent ahosts: getaddrinfo with AF_UNSPEC, so A and AAAA, over one connected socket.
    let output = must(&mut topology.workload("getent", &["ahosts", name]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&ANSWER_IP.to_string()),
        "getent ahosts: {stdout}"
    );
    let line = forwarded(agent, name);
    assert!(line.contains(&format!("server={SERVER_IP}:53")), "{line}");
}

#[test]
fn an_unconnected_client_sees_the_server_address_and_port_in_recvfrom() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);

    // sendto + recvfrom, and the answer must come from SERVER_IP:53, as musl demands.
    let name = "sendto.example.test";
    assert_eq!(probe(topology, "sendto", name), expected_probe_line());
    forwarded(agent, name);
}

#[test]
fn a_connected_client_sees_the_server_in_getpeername_and_recvfrom() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);

    // The probe fails unless getpeername() and recvfrom() both report SERVER_IP:53.
    let name = "connect.example.test";
    assert_eq!(probe(topology, "connect", name), expected_probe_line());
    forwarded(agent, name);
}

#[test]
fn concurrent_clients_each_get_the_answer_of_the_server_they_asked() {
    let harness = Harness::start(Placement::Outside, &[]);
    let Harness {
        agent, topology, ..
    } = &harness;
    let _second = DnsServer::start_on(topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
    let servers = [(SERVER_IP, ANSWER_IP), (SECOND_SERVER_IP, SECOND_ANSWER_IP)];

    let mut probes = Vec::new();
    for i in 0..40 {
        let (server, answer) = servers[i % 2];
        let mode = if i % 4 < 2 { "sendto" } else { "connect" };
        let name = format!("c{i}.example.test");
        probes.push(ConcurrentProbe {
            command: topology.workload(PROBE, &[mode, &format!("{server}:53"), &name]),
            expected: format!("source={server}:53 answer={answer}"),
            name,
        });
    }
    run_together(probes);
    for i in 0..40 {
        let (server, name) = (servers[i % 2].0, format!("c{i}.example.test"));
        let line = forwarded(agent, &name);
        assert!(line.contains(&format!("server={server}:53")), "{line}");
    }
}

#[test]
fn the_kernel_keeps_a_record_per_server_not_per_socket_or_client() {
    let harness = Harness::start(Placement::Outside, &[]);
    let Harness { topology, .. } = &harness;
    let servers = || attached_map_entries(&topology.cgroup.path, "SERVERS");
    assert_eq!(servers(), 0);

    // Sockets that stay open after their answer, and clients that come and go: one record,
    // for the one server they all asked.
    let server = format!("{SERVER_IP}:53");
    let mut holders = Vec::new();
    for i in 0..20 {
        let mut holder = topology
            .workload(
                PROBE,
                &[
                    "sendto",
                    &server,
                    &format!("hold{i}.example.test"),
                    "--hold",
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the probe");
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the probe");
        assert_eq!(line.trim(), expected_probe_line());
        holders.push(holder);
    }
    assert_answered(
        dig(topology.workload("dig", &[]), "gone.example.test", &[]),
        "dig",
    );
    must(&mut topology.workload("getent", &["ahosts", "gone2.example.test"]));
    // One origin for the pair (server, the workload's cgroup), and the server's shared one.
    assert_eq!(servers(), 2);
    for mut holder in holders {
        drop(holder.stdin.take());
        assert!(holder.wait().expect("wait for the probe").success());
    }
    // The record outlives its sockets: a socket sent to the server's address before may
    // still send there, and it must still mean that server.
    assert_eq!(servers(), 2);
}

#[test]
fn an_agent_inside_the_redirected_cgroup_does_not_redirect_itself() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::InsideRedirectedCgroup, &[]);
    let own_cgroup = topology.cgroup.path.join("dns-proxy-agent");
    let log = agent.log();
    assert!(
        log.contains(&format!("agent runs in cgroup {} ", own_cgroup.display())),
        "{log}"
    );

    // Were the agent's upstream query redirected too, it would come back to the agent
    // instead of reaching the server, and the lookup would fail.
    let name = "self.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), name, &[]),
        "dig in the cgroup",
    );
    let line = forwarded(agent, name);
    assert!(line.contains(&format!("upstream={SERVER_IP}:53")), "{line}");
    let log = agent.log();
    assert_eq!(log.matches("query udp client=").count(), 1, "{log}");
}

/// Something moves the running agent out of its own cgroup, into the one it redirects (a
/// service manager, an operator's `echo PID > cgroup.procs`): it moves back within a second
/// and says so. Before, it stayed: the sockets it made there were redirected to itself, and
/// a lookup of a server it had no socket for yet looped through it about a thousand times
/// and was lost (an adversary's case).
#[test]
fn an_agent_moved_into_the_cgroup_it_redirects_moves_back() {
    let Harness {
        mut agent,
        topology,
        ..
    } = Harness::start(Placement::InsideRedirectedCgroup, &[]);
    let _second = DnsServer::start_on(&topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
    let pid = agent.process().id().to_string();
    std::fs::write(topology.cgroup.path.join("cgroup.procs"), &pid).expect("move the agent");
    wait_for_log(&agent, "moved back");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroup");
    assert!(own.contains("/dns-proxy-agent"), "{own}");
    let name = "moved.example.test";
    let answer = tests::dig_at(
        topology.workload("dig", &[]),
        &SECOND_SERVER_IP.to_string(),
        name,
        &["+short"],
    );
    assert_eq!(
        answer.expect("answered").trim(),
        SECOND_ANSWER_IP.to_string()
    );
    assert_eq!(
        agent.query_lines_once_logged(name, 1).len(),
        1,
        "{}",
        agent.log()
    );
}

/// Held in the cgroup it redirects (moved there again as soon as it moves back, as a service
/// manager that insists would), the agent still never sends its own queries back to itself
/// nor has its answers refused: it marks each socket it makes as its own, and the programs go
/// by the mark, wherever the agent is. Lookups to a server it has no socket for yet, over UDP
/// and TCP, are each answered by that server and forwarded once. Before, the upstream socket
/// it made in the redirected cgroup was sent back to the agent, and its listener's answers,
/// sent from the block's addresses, were refused as another's: no lookup was answered.
#[test]
fn an_agent_held_in_the_cgroup_it_redirects_forwards_every_lookup_once() {
    let Harness {
        mut agent,
        topology,
        server: _server,
    } = Harness::start(Placement::InsideRedirectedCgroup, &[]);
    let _second = DnsServer::start_on(&topology, SECOND_SERVER_IP, SECOND_ANSWER_IP);
    let pid = agent.process().id().to_string();
    let procs = topology.cgroup.path.join("cgroup.procs");
    let in_its_own = || {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroup");
        own.contains("/dns-proxy-agent")
    };
    let holding = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while holding.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(&procs, &pid).expect("move the agent");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // Stops the mover however this ends, a failed assertion included (the scope waits
        // for it).
        struct StopHolding<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopHolding<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop_holding = StopHolding(&holding);
        wait_for(
            "the agent in the redirected cgroup",
            Duration::from_secs(5),
            || (!in_its_own()).then_some(()),
        );
        for (n, transport) in [
            "+notcp", "+notcp", "+notcp", "+notcp", "+notcp", "+tcp", "+tcp",
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("held-{n}.example.test");
            let answer = tests::dig_at(
                topology.workload("dig", &[]),
                &SECOND_SERVER_IP.to_string(),
                &name,
                // One try, so that a second forward would be a loop; a longer wait than 1 s,
                // as moving a process every 5 ms slows the whole machine down.
                &["+short", "+time=3", transport],
            );
            assert_eq!(
                answer
                    .unwrap_or_else(|err| panic!("{name} {transport}: {err}\n{}", agent.log()))
                    .trim(),
                SECOND_ANSWER_IP.to_string(),
                "{name} {transport}"
            );
            assert_eq!(
                agent.query_lines_once_logged(&name, 1).len(),
                1,
                "{}",
                agent.log()
            );
        }
        // Held, not left there: it moves back, and is moved out again at once.
        wait_for_log(&agent, "moved back");
    });
    wait_for(
        "the agent back in its own cgroup",
        Duration::from_secs(5),
        || in_its_own().then_some(()),
    );
}

/// An agent in a time namespace of its own (`unshare --time`), whose `CLOCK_MONOTONIC` is
/// 100 s behind the kernel's, still tells its programs when it last ran on their clock: they
/// redirect, and a lookup goes through it. Before, it wrote its own clock's times, which the
/// programs took for 100 s old: they redirected nothing, and every lookup went direct.
#[test]
fn an_agent_in_a_time_namespace_of_its_own_is_taken_for_running() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let agent = Agent::start_in_time_namespace(&topology, -100);
    let name = "timens.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), name, &[]),
        "dig in the cgroup",
    );
    forwarded(&agent, name);
}

/// Moved out of its own cgroup, which is then removed: the agent cannot go back (a cgroup
/// made anew there would be another, whose id no agent registered), and the sockets it makes
/// where it is may send its own lookups back to it. It stops, with an error, so that its
/// service manager starts it anew in a cgroup of its own, and lookups go direct meanwhile.
/// Before, it stayed, ready, while its lookups looped.
#[test]
fn an_agent_that_cannot_go_back_to_its_own_cgroup_stops_and_lookups_go_direct() {
    let Harness {
        mut agent,
        topology,
        server: _server,
    } = Harness::start(Placement::InsideRedirectedCgroup, &[]);
    let pid = agent.process().id().to_string();
    let own = topology.cgroup.path.join("dns-proxy-agent");
    // Out and removed between two of the agent's checks, a second apart; again if a check
    // came between (the agent back in, the removal refused).
    wait_for(
        "the agent's cgroup to be removed while it is out",
        Duration::from_secs(10),
        || {
            std::fs::write(topology.cgroup.path.join("cgroup.procs"), &pid)
                .expect("move the agent");
            std::fs::remove_dir(&own).ok()
        },
    );
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "{status}");
    let log = agent.log();
    assert_eq!(log.matches("cannot go back").count(), 1, "{log}");
    assert!(log.contains("with no way back"), "{log}");
    assert_answered(
        dig(topology.workload("dig", &[]), "after.example.test", &[]),
        "dig after the agent stopped",
    );
}

/// The agent as a container runs it: in a cgroup namespace of its own, whose root is its
/// container's cgroup (mounted read-only, as Kubernetes does, or writable), with the host's
/// hierarchy mounted elsewhere for `--cgroup` (the DaemonSet's `/host/cgroup`). It finds
/// itself in its own cgroup and stays there. Before, it looked for itself in the host's
/// hierarchy: it "moved back" every second where it could write its cgroup, and logged that
/// it could not keep to its cgroup where it could not. With no mount that shows its own
/// cgroup, it says so and starts nothing (before, it took the host's root for its cgroup).
#[test]
fn an_agent_in_a_cgroup_namespace_of_its_own_finds_its_cgroup_in_its_own_mount() {
    for mount_options in ["ro", "rw", "none"] {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let container = tests::TestCgroup::new(&format!("{}-container", topology.tag));
        let mut command = agent_in_a_container(&topology, &container.path, mount_options);
        if mount_options == "none" {
            let output = command.output().expect("run the agent");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{stderr}");
            assert!(
                stderr.contains("dns-proxy: error: no cgroup2 mount shows the agent's own cgroup"),
                "{stderr}"
            );
            continue;
        }
        let mut agent = Agent::spawn(command);
        let name = format!("container-{mount_options}.example.test");
        assert_answered(
            dig(topology.workload("dig", &[]), &name, &[]),
            "dig in the cgroup",
        );
        forwarded(&agent, &name);
        // Three rounds of the agent's check of its own cgroup.
        std::thread::sleep(Duration::from_millis(3500));
        let log = agent.log();
        assert!(!log.contains("its own cgroup"), "{mount_options}: {log}");
        let pid = agent.process().id();
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroup");
        let container_name = container.path.file_name().unwrap().to_string_lossy();
        let expected = match mount_options {
            "ro" => format!("/{container_name}\n"),
            _ => format!("/{container_name}/dns-proxy-agent\n"),
        };
        assert!(own.ends_with(&expected), "{mount_options}: {own}");
        if mount_options == "ro" {
            // Moved from the host into the cgroup it redirects, it cannot go back through its
            // read-only mount: it stops, with an error, and lookups go direct.
            std::fs::write(topology.cgroup.path.join("cgroup.procs"), pid.to_string())
                .expect("move the agent");
            let status = agent.wait_exit(Duration::from_secs(10));
            assert!(!status.success(), "{status}");
            assert!(agent.log().contains("with no way back"), "{}", agent.log());
            assert_answered(
                dig(topology.workload("dig", &[]), "after.example.test", &[]),
                "dig after the agent stopped",
            );
        }
    }
}

/// In a cgroup namespace of its own, an `--exclude-cgroup` under its own cgroup mount cannot be
/// placed in the host's hierarchy: refused with the reason, whether the cgroup is made yet or
/// not. Before, one not made yet was refused as "No such file or directory" (helper-143).
#[test]
fn an_exclusion_a_cgroup_namespace_hides_is_refused_with_the_reason_made_or_not() {
    let hierarchy = tests::cgroup2_root();
    for excluded in [hierarchy.clone(), hierarchy.join("not-made-yet.service")] {
        let topology = Topology::new();
        let container = tests::TestCgroup::new(&format!("{}-container", topology.tag));
        let mut command = agent_in_a_container(&topology, &container.path, "ro");
        command
            .arg(format!("--exclude-cgroup={}", excluded.display()))
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start the agent");
        let started = Instant::now();
        while child.try_wait().expect("wait for the agent").is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{}: the agent started", excluded.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let output = child.wait_with_output().expect("its output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let expected = format!(
            "dns-proxy: error: --exclude-cgroup {}: the cgroup2 hierarchy's root is not visible",
            excluded.display()
        );
        assert!(stderr.contains(&expected), "{stderr}");
    }
}

/// The agent, redirecting the topology's cgroup, started in `container` (a cgroup) with a
/// cgroup namespace and a mount namespace of its own: the host's hierarchy bound at a path of
/// its own, and cgroup2 mounted anew where it was with `mount_options` (showing the
/// container's cgroup), or not at all (`none`).
fn agent_in_a_container(
    topology: &Topology,
    container: &std::path::Path,
    mount_options: &str,
) -> Command {
    let hierarchy = tests::cgroup2_root();
    // On the namespace's bpffs, which goes with it.
    let host_view = topology.client.state_dir().with_file_name("host-cgroup");
    std::fs::create_dir(&host_view).expect("mkdir the host's view");
    let redirected = host_view.join(
        topology
            .cgroup
            .path
            .strip_prefix(&hierarchy)
            .expect("the test cgroup is in the hierarchy"),
    );
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(
            r#"echo $$ > "$1/cgroup.procs" &&
            exec unshare --cgroup --mount --propagation private sh -c "$CONTAINER" sh "$@""#,
        )
        .env(
            "CONTAINER",
            r#"mount --bind "$2" "$3" && umount "$2" &&
            { [ "$4" = none ] || mount -t cgroup2 -o "$4" cgroup2 "$2"; } &&
            shift 4 && exec "$@""#,
        )
        .arg("sh")
        .arg(container)
        .arg(&hierarchy)
        .arg(&host_view)
        .arg(mount_options);
    if mount_options == "none" {
        // Refused at once; were it not, it would serve until killed.
        command.args(["timeout", "20"]);
    }
    command
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.client.name))
        .arg("--")
        .arg(agent_binary())
        .arg("run")
        .arg(format!("--cgroup={}", redirected.display()))
        .arg(format!("--listen={PROXY_LISTEN}"))
        .env("DNS_PROXY_STATE_DIR", topology.client.state_dir())
        .env("RUST_LOG", "info,dns_proxy=debug")
        .stdout(Stdio::null());
    command
}

#[test]
fn processes_outside_the_cgroup_are_not_redirected() {
    let Harness {
        agent, topology, ..
    } = &Harness::start(Placement::Outside, &[]);

    let outside = "outside.example.test";
    assert_answered(
        dig(topology.outsider("dig", &[]), outside, &[]),
        "dig outside the cgroup",
    );
    // A redirected query after it proves the agent's log is being written.
    let inside = "inside.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), inside, &[]),
        "dig in the cgroup",
    );
    forwarded(agent, inside);
    assert_eq!(
        agent.query_line(outside),
        None,
        "the outsider went through the proxy:\n{}",
        agent.log()
    );
}

#[test]
fn after_sigkill_lookups_go_direct_within_a_second() {
    let Harness {
        agent, topology, ..
    } = &mut Harness::start(Placement::Outside, &[]);
    let before = "before.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), before, &[]),
        "dig before the kill",
    );
    forwarded(agent, before);

    agent.process().signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    // The links died with the agent's file descriptors: one try with a 1 s timeout must do.
    let started = Instant::now();
    let after = "after.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), after, &["+time=1"]),
        "dig after SIGKILL",
    );
    // dig's one try of 1 s is what shows the second; this bounds the rest (starting `ip
    // netns exec` and dig on a busy machine).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // And a strict unconnected client, whose answers nothing rewrites now, hears the server.
    assert_eq!(
        probe(topology, "sendto", "after2.example.test"),
        expected_probe_line()
    );
}

#[test]
fn sighup_is_ignored_and_sigterm_detaches_and_exits_zero() {
    let Harness {
        agent, topology, ..
    } = &mut Harness::start(Placement::Outside, &["--shutdown-timeout=3s"]);
    // An operator's reflex reload: nothing to reload, and no stop without a drain.
    agent.process().signal(libc::SIGHUP);
    wait_for(
        "the agent to log the SIGHUP",
        Duration::from_secs(5),
        || agent.log().contains("SIGHUP ignored").then_some(()),
    );
    let name = "term.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), name, &[]),
        "dig before SIGTERM",
    );
    forwarded(agent, name);

    agent.process().signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(10));
    let log = agent.log();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(log.contains("detaching all programs"), "{log}");
    assert!(
        log.contains("stopped: udp: received=1 forwarded=1 answered=1 "),
        "{log}"
    );
    tests::assert_only_sock_release_left(&topology.cgroup.path);
    let after = "afterterm.example.test";
    assert_answered(
        dig(topology.workload("dig", &[]), after, &[]),
        "dig after SIGTERM",
    );
}

/// With IPv6 switched off (`net.ipv6.conf.all.disable_ipv6=1`, as some hosts are set up),
/// host mode serves IPv4 and leaves IPv6 lookups alone, as it does on a host without IPv6.
#[test]
fn with_ipv6_switched_off_the_agent_serves_ipv4() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    for sysctl in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ] {
        must(topology.client.command("sysctl").args(["-q", "-w", sysctl]));
    }
    let agent = Agent::start(&topology, &[]);
    assert!(
        agent.log().contains("IPv6 is off on this host"),
        "{}",
        agent.log()
    );
    assert_eq!(
        probe(&topology, "connect", "v6off.example.test"),
        expected_probe_line()
    );
    forwarded(&agent, "v6off.example.test");
}

/// Each relayed TCP connection holds two descriptors: the agent raises its soft limit on open
/// files to the hard one, so --max-tcp-connections is not cut short at 1,024 descriptors.
#[test]
fn the_agent_raises_its_soft_limit_on_open_files_to_the_hard_one() {
    let topology = Topology::new();
    let mut agent = Agent::start_with_soft_file_limit(&topology, 1024);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.process().id()))
        .expect("the agent's limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a line for open files");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.len(), 2, "{line}");
    assert_eq!(numbers[0], numbers[1], "soft and hard: {line}");
    assert_ne!(numbers[0], "1024", "{line}");
}

/// Errors a user can cause end with one line that says what to do.
mod usage_errors {
    use super::*;
    use std::io::Read as _;
    use tests::Process;

    /// Runs the agent (behind `wrapper`, e.g. nsenter) and returns (succeeded, stderr).
    fn run_agent(args: &[&str], wrapper: &[&str]) -> (bool, String) {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(agent_binary());
                command
            }
            None => Command::new(agent_binary()),
        };
        command
            .arg("run")
            .args(args)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // An agent that should have refused may serve instead: fail, and kill it, on time.
        let mut agent = Process::spawn(&mut command);
        let status = agent.wait_exit(Duration::from_secs(30));
        let mut stderr = String::new();
        agent
            .take_stderr()
            .read_to_string(&mut stderr)
            .expect("read the agent's stderr");
        (status.success(), stderr)
    }

    fn assert_one_line_error(args: &[&str], wrapper: &[&str], expected: &str) {
        let (success, stderr) = run_agent(args, wrapper);
        assert!(!success, "{args:?} succeeded");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line:\n{stderr}"
        );
        assert!(stderr.starts_with("dns-proxy: error: "), "{stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: no {expected:?} in:\n{stderr}"
        );
    }

    /// The agent, started in the topology's namespace with its state dir, ends with one line
    /// that says `expected`.
    fn assert_agent_refuses(topology: &Topology, expected: &str) {
        assert_agent_refuses_through(topology, &[], expected);
    }

    /// As [`assert_agent_refuses`], started through `wrapper` first.
    fn assert_agent_refuses_through(topology: &Topology, wrapper: &[&str], expected: &str) {
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let state = format!(
            "DNS_PROXY_STATE_DIR={}",
            topology.client.state_dir().display()
        );
        let mut wrapper = wrapper.to_vec();
        wrapper.extend(["env", &state, "nsenter", &netns, "--"]);
        assert_one_line_error(&[&cgroup], &wrapper, expected);
    }

    /// A limit of open files that leaves too few to serve with is refused at start: such an
    /// agent said it was ready, then failed every TCP lookup and probe of its health
    /// (helper-186: a hard limit of 100, 113 files in use at idle). With room, the same
    /// topology is then served: nothing of the refused start stands in the way.
    #[test]
    fn too_few_open_files_to_serve_with_are_refused_at_start() {
        let topology = Topology::new();
        assert_agent_refuses_through(
            &topology,
            &["prlimit", "--nofile=150:150", "--"],
            "are left for upstream sockets, TCP connections and the metrics server",
        );
        let agent = Agent::start(&topology, &[]);
        assert!(agent.log().contains("ready: "), "{}", agent.log());
    }

    /// Without CAP_PERFMON the verifier refuses the programs' pointer arithmetic, and the
    /// agent printed its 1,500-line log and blamed the kernel (helper-173, the image run
    /// without PERFMON). The capabilities are checked before anything is loaded.
    #[test]
    fn a_missing_capability_for_loading_is_named_in_one_line() {
        let topology = Topology::new();
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let state = format!(
            "DNS_PROXY_STATE_DIR={}",
            topology.client.state_dir().display()
        );
        for (bounding_set, expected) in [
            (
                "-all,+bpf,+net_admin,+net_bind_service,+net_raw,+dac_override",
                "without CAP_PERFMON: grant it",
            ),
            (
                "-all,+net_admin,+net_bind_service,+net_raw,+dac_override",
                "without CAP_BPF and CAP_PERFMON: grant them",
            ),
        ] {
            let bounding_set = format!("--bounding-set={bounding_set}");
            assert_one_line_error(
                &[&cgroup],
                &[
                    "env",
                    &state,
                    "nsenter",
                    &netns,
                    "--",
                    "setpriv",
                    "--inh-caps=-all",
                    &bounding_set,
                ],
                expected,
            );
        }
    }

    /// An agent alone in its mount namespace (a container's, given CAP_SYS_ADMIN and no
    /// bpffs) mounted a bpffs of its own at /sys/fs/bpf, which went with it: its table of
    /// servers was lost at every restart, and sockets connected through it failed after
    /// (helper-173: 54 lookups of 100). It refuses, and says to mount the host's.
    #[test]
    fn an_agent_alone_in_its_mount_namespace_mounts_no_bpffs_of_its_own() {
        let topology = Topology::new();
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        // A namespace of its own, where /sys/fs/bpf is surely no bpffs (a tmpfs over it). The
        // agent alone in it (`exec`); beside the shell that started it; and in a PID namespace
        // of its own under an init (`tini` passed a check for another process in the
        // namespace: helper-175). The host's mounts are not touched.
        let mount = "mount -t tmpfs none /sys/fs/bpf";
        let alone = format!("{mount} && exec nsenter {netns} -- \"$0\" \"$@\"");
        let beside = format!("{mount} && nsenter {netns} -- \"$0\" \"$@\"; exit $?");
        let private_mounts = ["--mount", "--propagation=private"];
        let own_pids = ["--pid", "--fork", "--mount-proc"];
        for (script, namespaces) in [
            (&alone, private_mounts.to_vec()),
            (&beside, private_mounts.to_vec()),
            (&beside, [&private_mounts[..], &own_pids[..]].concat()),
        ] {
            let mut wrapper = vec!["env", "-u", "DNS_PROXY_STATE_DIR", "unshare"];
            wrapper.extend_from_slice(&namespaces);
            wrapper.extend_from_slice(&["sh", "-c", script]);
            assert_one_line_error(&[&cgroup], &wrapper, "would be its alone");
        }
    }

    #[test]
    fn bad_cgroup_path() {
        tests::require_root();
        assert_one_line_error(&["--cgroup=/nonexistent/x"], &[], "--cgroup /nonexistent/x");
        // Where the hierarchy is, for a path that is not in it (a hybrid host's
        // /sys/fs/cgroup/docker, where cgroup2 is /sys/fs/cgroup/unified).
        assert_one_line_error(
            &["--cgroup=/nonexistent/x"],
            &[],
            "/ is not in the cgroup2 hierarchy, which is mounted at /",
        );
        assert_one_line_error(&["--cgroup=/proc"], &[], "not a cgroup v2 directory");
        // A relative path: from where it was taken, and that the whole path is wanted.
        assert_one_line_error(
            &["--cgroup=unified/no-such-cgroup"],
            &[],
            "a relative path is taken from the current directory",
        );
    }

    #[test]
    fn an_exclusion_that_holds_the_cgroup_under_another_path_is_refused() {
        let topology = Topology::new();
        let path = &topology.cgroup.path;
        let name = path.file_name().expect("a name").to_string_lossy();
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let state = format!(
            "DNS_PROXY_STATE_DIR={}",
            topology.client.state_dir().display()
        );
        let cgroup = format!("--cgroup={}", path.display());
        // The cgroup itself through `..`, and its parent: no path is a prefix of the other.
        for excluded in [
            format!("{}/../{name}", path.display()),
            format!("{}/..", path.display()),
        ] {
            assert_one_line_error(
                &[&cgroup, &format!("--exclude-cgroup={excluded}")],
                &["env", &state, "nsenter", &netns, "--"],
                "is the --cgroup",
            );
        }
    }

    #[test]
    fn port_in_use() {
        let topology = Topology::new();
        let _first = Agent::start(&topology, &[]);
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let listen = format!("--listen={PROXY_LISTEN}");
        assert_one_line_error(
            &[&cgroup, &listen],
            &["nsenter", &netns, "--"],
            "choose another --listen",
        );
    }

    #[test]
    fn a_second_agent_on_the_same_block_and_port_is_refused() {
        let topology = Topology::new();
        let _first = Agent::start(&topology, &[]);
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        // Another listen address, the same default block and port: it would take the first
        // one's lookups. (Another IPv6 port, so that IPv4 is what collides.) The first holds
        // its port on every address, which refuses it first.
        assert_one_line_error(
            &[&cgroup, "--listen=127.0.0.2:8053", "--listen6=[::1]:8054"],
            &["nsenter", &netns, "--"],
            "cannot listen on 127.0.0.2:8053: Address already in use",
        );
    }

    /// A second agent elsewhere (its own cgroup, listen address, block and state) given the
    /// first one's `--metrics` is refused: it would have taken the first one's scrapes and
    /// probes (a liveness probe then fails a healthy agent while the second is frozen). Only an
    /// agent that takes over from one on its listen address joins the port.
    #[test]
    fn a_second_agent_on_the_metrics_port_is_refused_unless_it_takes_over() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let metrics = format!("--metrics={METRICS}");
        let _first = Agent::start(&topology, &[&metrics]);
        assert_eq!(
            probe(&topology, "sendto", "first.example.test"),
            expected_probe_line()
        );
        let other = tests::TestCgroup::new(&format!("{}-metrics-twin", topology.tag));
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", other.path.display());
        let state = topology
            .client
            .state_dir()
            .with_file_name("metrics-twin-state");
        let state = format!("DNS_PROXY_STATE_DIR={}", state.display());
        // With --takeover too, as both deployments pass it: there is no agent on this listen
        // address to take over from, so nothing to join.
        for takeover in [&[][..], &["--takeover"][..]] {
            let mut args = vec![
                cgroup.as_str(),
                "--listen=127.0.0.1:8055",
                "--redirect-block=127.54.0.0/16",
                "--listen6=[::1]:8055",
                "--redirect-block6=fd54::/112",
                &metrics,
            ];
            args.extend_from_slice(takeover);
            assert_one_line_error(
                &args,
                &["env", &state, "nsenter", &netns, "--"],
                &format!("cannot serve metrics on {METRICS}: "),
            );
        }
        for _ in 0..5 {
            let page = scrape(&topology);
            let received = value(&page, "dns_proxy_queries_received_total{protocol=\"udp\"}");
            assert_eq!(received, 1, "the first agent's page");
        }
    }

    #[test]
    fn a_block_over_an_address_in_use_is_refused() {
        let topology = Topology::new();
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        assert_one_line_error(
            &[
                &cgroup,
                "--listen=192.0.2.0:8053",
                "--redirect-block=192.0.2.0/24",
            ],
            &["nsenter", &netns, "--"],
            "holds 192.0.2.1, an address in use on this host",
        );
        assert_one_line_error(
            &[
                &cgroup,
                "--listen=127.1.0.1:8053",
                "--redirect-block=127.0.0.0/16",
            ],
            &["nsenter", &netns, "--"],
            "holds 127.0.0.1",
        );
    }

    #[test]
    fn a_table_that_lost_half_of_its_pins_is_refused() {
        let topology = Topology::new();
        let mut first = Agent::start(&topology, &[]);
        first.process().signal(libc::SIGTERM);
        assert!(first.wait_exit(Duration::from_secs(10)).success());
        let state_dir = topology.client.state_dir();
        let tables: Vec<_> = std::fs::read_dir(&state_dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(tables.len(), 1, "{tables:?}");
        std::fs::remove_file(tables[0].join("SERVERS")).expect("remove one pin");
        assert_agent_refuses(&topology, "its other half, SERVERS, is gone");
    }

    /// The pinned table decides where every redirected lookup goes: a state directory another
    /// user owns, or others may write to, could have it replaced, and is refused.
    #[test]
    fn a_state_dir_others_could_write_to_is_refused() {
        use std::os::unix::fs::{PermissionsExt as _, chown};
        let topology = Topology::new();
        let state_dir = topology.client.state_dir();
        std::fs::create_dir_all(&state_dir).expect("mkdir the state dir");
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o777))
            .expect("chmod 0777");
        assert_agent_refuses(&topology, "others may write to it (mode 777)");

        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700");
        chown(&state_dir, Some(65534), None).expect("chown nobody");
        assert_agent_refuses(&topology, "owned by user 65534");

        // Made right again, the same directory is taken.
        chown(&state_dir, Some(0), None).expect("chown root");
        let agent = Agent::start(&topology, &[]);
        assert!(
            agent.log().contains("serving redirected DNS"),
            "{}",
            agent.log()
        );
    }

    /// A state dir the agent makes is its own alone (0700), and it makes nothing where it
    /// would refuse to keep its table: off a bpffs, not one directory is left behind.
    #[test]
    fn the_agent_makes_its_state_dir_0700_and_nothing_off_a_bpffs() {
        use std::os::unix::fs::PermissionsExt as _;
        let topology = Topology::new();
        let base = std::env::temp_dir().join(format!("{}-not-bpffs", topology.tag));
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let state_dir = format!("--state-dir={}", base.join("sub/dir").display());
        assert_one_line_error(
            &[&cgroup, &state_dir],
            &["nsenter", &netns, "--"],
            "not on a bpf filesystem",
        );
        let made = base.exists();
        let _ = std::fs::remove_dir_all(&base);
        assert!(!made, "{} was made", base.display());

        let state_dir = topology.client.state_dir();
        assert!(!state_dir.exists());
        let _agent = Agent::start(&topology, &[]);
        let mode = std::fs::metadata(&state_dir)
            .expect("the state dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{}", state_dir.display());
    }

    /// A start that fails after routing its blocks takes back the routes it made, and only
    /// those: nothing of a failed start stays in the namespace, and a route that was there
    /// (an earlier agent's) stays. (A start that succeeds leaves its routes, by design.)
    #[test]
    fn a_failed_start_takes_back_the_routes_it_made() {
        let topology = Topology::new();
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let not_bpffs = std::env::temp_dir().join(format!("{}-state", topology.tag));
        let routes = || {
            let mut found = Vec::new();
            for family in ["-4", "-6"] {
                let name = &topology.client.name;
                let args = [family, "-n", name, "route", "show", "table", "local"];
                let output = must(Command::new("ip").args(args));
                found.extend(
                    String::from_utf8_lossy(&output.stdout)
                        .lines()
                        .filter(|line| line.contains("169.254.53.0/24") || line.contains("fd53:"))
                        .map(str::to_owned),
                );
            }
            found
        };
        // The IPv4 block routed already, as an earlier agent leaves it: not this start's.
        must(Command::new("ip").args([
            "-n",
            &topology.client.name,
            "route",
            "add",
            "local",
            "169.254.53.0/24",
            "dev",
            "lo",
            "table",
            "local",
        ]));
        assert_one_line_error(
            &[
                &cgroup,
                "--listen=169.254.53.0:53",
                "--listen6=[fd53:6e73:6470::]:53",
                &format!("--state-dir={}", not_bpffs.display()),
            ],
            &["nsenter", &netns, "--"],
            "not on a bpf filesystem",
        );
        let left = routes();
        let _ = std::fs::remove_dir_all(&not_bpffs);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].contains("169.254.53.0/24"), "{left:?}");
    }

    #[test]
    fn a_pin_of_another_layout_is_refused() {
        let topology = Topology::new();
        let state_dir = topology.client.state_dir();
        // Where the default blocks' table lives, with a SERVERS of the wrong value size.
        let table = state_dir.join("127_53_0_0-16+fd53_6e73_6470__-112");
        std::fs::create_dir_all(&table).expect("mkdir the table's directory");
        for (name, key, value, entries) in [
            ("SERVERS", "4", "16", "131072"),
            ("SERVER_INDEX", "20", "4", "131072"),
        ] {
            must(
                Command::new("bpftool")
                    .args(["map", "create"])
                    .arg(table.join(name))
                    .args([
                        "type", "hash", "key", key, "value", value, "entries", entries,
                    ])
                    .args(["name", name, "flags", "1"]),
            );
        }
        assert_agent_refuses(&topology, "SERVERS: a map of another layout");
    }

    /// The agents' cgroups, which the programs read, of another layout: refused, but what to
    /// remove is that pin alone (the whole table's directory, as the message said before,
    /// would have thrown away the servers' indexes that long-lived sockets still use), and
    /// once it is removed the agent starts on the same table.
    #[test]
    fn an_agents_cgroup_map_of_another_layout_names_the_one_pin_to_remove() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let first = Agent::start(&topology, &[]);
        assert_eq!(
            probe(&topology, "sendto", "first.example.test"),
            expected_probe_line()
        );
        drop(first);
        let state_dir = topology.client.state_dir();
        let index = tests::server_index(&state_dir, SERVER_IP, 53);
        let pin = state_dir
            .join("127_53_0_0-16+fd53_6e73_6470__-112")
            .join("AGENT_CGROUPS");
        std::fs::remove_file(&pin).expect("rm the pin");
        must(
            Command::new("bpftool")
                .args(["map", "create"])
                .arg(&pin)
                .args(["type", "hash", "key", "8", "value", "16", "entries", "64"])
                .args(["name", "AGENT_CGROUPS", "flags", "1"]),
        );
        assert_agent_refuses(
            &topology,
            &format!("remove this pin alone (`rm {}`)", pin.display()),
        );
        std::fs::remove_file(&pin).expect("rm the pin");
        let _second = Agent::start(&topology, &[]);
        assert_eq!(
            probe(&topology, "sendto", "second.example.test"),
            expected_probe_line()
        );
        assert_eq!(tests::server_index(&state_dir, SERVER_IP, 53), index);
    }

    /// The agents' own records are only theirs to read: one of another layout (an agent of
    /// another version's) is replaced, with a warning, and the agent serves.
    #[test]
    fn an_agents_record_map_of_another_layout_is_replaced() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let table = topology
            .client
            .state_dir()
            .join("127_53_0_0-16+fd53_6e73_6470__-112");
        std::fs::create_dir_all(&table).expect("mkdir the table's directory");
        must(
            Command::new("bpftool")
                .args(["map", "create"])
                .arg(table.join("AGENTS"))
                .args(["type", "hash", "key", "8", "value", "16", "entries", "64"])
                .args(["name", "AGENTS", "flags", "1"]),
        );
        let agent = Agent::start(&topology, &[]);
        assert!(
            agent.log().contains("AGENTS: a map of another layout")
                && agent.log().contains("replacing it"),
            "{}",
            agent.log()
        );
        assert_eq!(
            probe(&topology, "sendto", "replaced.example.test"),
            expected_probe_line()
        );
    }

    /// `--takeover` beside an agent of another state directory would serve with a table of
    /// its own, where the running agent's clients' addresses mean nothing: refused.
    #[test]
    fn a_takeover_from_an_agent_of_another_state_dir_is_refused() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let _agent = Agent::start(&topology, &[]);
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let other = topology.client.state_dir().with_file_name("other-state");
        let state = format!("DNS_PROXY_STATE_DIR={}", other.display());
        assert_one_line_error(
            &[&cgroup, &format!("--listen={PROXY_LISTEN}"), "--takeover"],
            &["env", &state, "nsenter", &netns, "--"],
            "no dns-proxy of the same blocks and port runs with --state-dir",
        );
        assert_eq!(
            probe(&topology, "sendto", "unmoved.example.test"),
            expected_probe_line()
        );
    }

    /// Agents killed in a tight loop (a crash loop) leave their records in `AGENTS` (64 at
    /// most) until they have been silent for 30 s: an adversarial review's 65th start within
    /// 15 s failed (`AGENTS: bpf_map_update_elem failed`). A record whose agent's name is
    /// free and that has been silent for 6 s is gone: here 64 such records, 10 s silent, and
    /// the next agent starts.
    #[test]
    fn a_table_of_agents_filled_by_a_crash_loop_keeps_no_agent_out() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let mut first = Agent::start(&topology, &[]);
        first.process().signal(libc::SIGTERM);
        assert!(first.wait_exit(Duration::from_secs(10)).success());
        let now_ns = tests::boottime_ns();
        for i in 0..64u64 {
            // A start stamp no agent holds a name for, 10 s silent, named, on port 8053, in a
            // cgroup that never was.
            let record = tests::AgentRecordBytes {
                cgroup_id: 1_000_000 + i,
                heartbeat_ns: now_ns - 10_000_000_000,
                port: 8053,
                flags: 1,
            };
            let stamp = now_ns - 20_000_000_000 + i;
            tests::put_agent_record(&topology.client.state_dir(), stamp, &record);
        }
        let _second = Agent::start(&topology, &[]);
        assert_eq!(
            probe(&topology, "sendto", "after-the-loop.example.test"),
            expected_probe_line()
        );
    }

    /// A block inside a network the host routes elsewhere takes that network's hosts there
    /// away from every process, DNS servers among them (an adversarial review's site server
    /// behind a gateway: ready, and every lookup refused), and the route stays after the agent
    /// exits: said at start, naming the network.
    #[test]
    fn a_block_inside_a_routed_network_is_warned_of() {
        let topology = Topology::new();
        must(Command::new("ip").args([
            "-n",
            &topology.client.name,
            "route",
            "add",
            "10.20.0.0/16",
            "via",
            &SERVER_IP.to_string(),
        ]));
        let agent = Agent::launch(
            &topology.client,
            &topology.cgroup.path,
            None,
            &[
                "--listen=10.20.0.0:53".to_owned(),
                "--redirect-block=10.20.0.0/24".to_owned(),
            ],
        );
        let log = agent.log();
        let warning = log
            .lines()
            .find(|line| line.contains("this host routes 10.20.0.0/16 through a network"))
            .unwrap_or_else(|| panic!("no warning of the routed network:\n{log}"));
        assert!(warning.contains("WARN"), "{warning}");
        assert!(
            warning.contains("--redirect-block 10.20.0.0/24"),
            "{warning}"
        );
    }

    /// A second agent on the cgroup another agent redirects, on another port or block, would
    /// attach beside it and serve nothing (the first one's programs rewrite every query
    /// before its own see it) while it reports ready: refused, with the same state dir or
    /// another, with the deployments' capabilities too. Once the first is gone, it starts.
    #[test]
    fn a_second_agent_on_a_redirected_cgroup_is_refused_whatever_its_port_or_block() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let mut first = Agent::start(&topology, &[]);
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        let same_state = format!(
            "DNS_PROXY_STATE_DIR={}",
            topology.client.state_dir().display()
        );
        let other = topology.client.state_dir().with_file_name("other-state");
        let other_state = format!("DNS_PROXY_STATE_DIR={}", other.display());
        let refused = format!(
            "another dns-proxy (pid {}, dns-proxy) already redirects",
            first.process().id()
        );
        // The capabilities of the systemd unit and the DaemonSet: no CAP_SYS_ADMIN, which the
        // kernel asks before it says whose programs are attached.
        let production_caps = [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all,+bpf,+perfmon,+net_admin,+net_bind_service,+net_raw,+dac_override",
        ];
        for (state, caps, args) in [
            (&same_state, &[][..], &["--listen=127.0.0.1:8054"][..]),
            (
                &same_state,
                &production_caps[..],
                &["--listen=127.0.0.1:8054"],
            ),
            (
                &other_state,
                &production_caps,
                &["--listen=127.0.0.1:8055", "--redirect-block=127.54.0.0/16"],
            ),
        ] {
            let mut all = vec![cgroup.as_str()];
            all.extend_from_slice(args);
            let mut wrapper = vec!["env", state, "nsenter", &netns, "--"];
            wrapper.extend_from_slice(caps);
            assert_one_line_error(&all, &wrapper, &refused);
            assert_eq!(
                probe(&topology, "sendto", "still-served.example.test"),
                expected_probe_line(),
                "{args:?}"
            );
        }

        first.process().signal(libc::SIGTERM);
        assert!(first.wait_exit(Duration::from_secs(10)).success());
        let second = Agent::launch(
            &topology.client,
            &topology.cgroup.path,
            None,
            &["--listen=127.0.0.1:8054".to_owned()],
        );
        assert_eq!(
            probe(&topology, "sendto", "second.example.test"),
            expected_probe_line()
        );
        drop(second);
    }

    /// A process of an unprivileged user in the agent's network namespace, as nobody:
    /// `script` (Python) with `name`, an abstract unix socket name, as its argument, started
    /// once it has printed its first line.
    fn unprivileged(topology: &Topology, script: &str, name: &str) -> Process {
        let mut command = topology.client.nsenter();
        command
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .args(["/usr/bin/python3", "-c", script, name])
            .stdout(Stdio::piped());
        let mut process = Process::spawn(&mut command);
        let mut line = String::new();
        BufReader::new(process.take_stdout())
            .read_line(&mut line)
            .expect("read the script's first line");
        assert!(!line.is_empty(), "the script ended without a word");
        process
    }

    /// The lock's name is in reach of any process of the agent's network namespace. Filling
    /// the running agent's listen queue, one cannot let a second agent in (the kernel says who
    /// holds the name, not the holder); taking the name of a cgroup first, one cannot keep its
    /// agent out (a hold of neither root nor the agent's user is not an agent's; while it
    /// lasts, a second agent is not refused either: documented).
    #[test]
    fn a_full_lock_queue_lets_no_second_agent_in_and_a_squatter_keeps_no_agent_out() {
        use std::os::unix::fs::MetadataExt as _;
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let _first = Agent::start(&topology, &[]);
        let lock_of = |cgroup: &std::path::Path| {
            let id = std::fs::metadata(cgroup).expect("the cgroup").ino();
            format!("dns-proxy/redirects/{id}")
        };
        const FILL: &str = "import socket, sys, time\n\
            held = []\n\
            print('filling', flush=True)\n\
            while True:\n\
            \x20   c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
            \x20   c.setblocking(False)\n\
            \x20   try:\n\
            \x20       c.connect(b'\\0' + sys.argv[1].encode())\n\
            \x20       held = (held + [c])[-500:]\n\
            \x20   except OSError:\n\
            \x20       c.close()\n\
            \x20       time.sleep(0.001)\n";
        let _filler = unprivileged(&topology, FILL, &lock_of(&topology.cgroup.path));
        let netns = format!("--net=/run/netns/{}", topology.client.name);
        let cgroup = format!("--cgroup={}", topology.cgroup.path.display());
        assert_one_line_error(
            &[&cgroup, "--listen=127.0.0.1:8054"],
            &["nsenter", &netns, "--"],
            "already redirects",
        );

        const SQUAT: &str = "import socket, sys, time\n\
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
            s.bind(b'\\0' + sys.argv[1].encode())\n\
            print('held', flush=True)\n\
            time.sleep(600)\n";
        let other = topology.cgroup.path.join("squatted");
        std::fs::create_dir(&other).expect("mkdir a cgroup");
        let _squatter = unprivileged(&topology, SQUAT, &lock_of(&other));
        let agent = Agent::launch(
            &topology.client,
            &other,
            None,
            &["--listen=127.0.0.1:8055".to_owned()],
        );
        assert!(
            agent
                .log()
                .contains("a process of user 65534 holds the name"),
            "{}",
            agent.log()
        );
    }

    /// `--takeover` on another port (a rollout that changes the port): the new agent starts
    /// beside the old one, joining its `--metrics` port (a DaemonSet keeps it), and is ready
    /// (a surge rollout waits for that before it stops the old one), while the old one's
    /// programs take every lookup; once the old one stops, the new one serves. Before, the
    /// new agent stopped at once, its metrics port in use (helper-167), and the rollout
    /// would have stalled.
    #[test]
    fn a_takeover_on_another_port_serves_once_the_old_agent_stops() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let new_metrics: std::net::SocketAddr = "127.0.0.1:9254".parse().unwrap();
        let mut old = Agent::start(&topology, &[&format!("--metrics={new_metrics}")]);
        let new = Agent::launch(
            &topology.client,
            &topology.cgroup.path,
            None,
            &[
                "--listen=127.0.0.1:8054".to_owned(),
                "--takeover".to_owned(),
                format!("--metrics={new_metrics}"),
            ],
        );
        assert!(
            new.log()
                .contains("serves none until that one stops redirecting"),
            "{}",
            new.log()
        );
        assert_eq!(
            tests::http_get(&topology.client, new_metrics, "/readyz"),
            (200, "ready\n".to_owned())
        );
        assert_eq!(
            probe(&topology, "sendto", "before.example.test"),
            expected_probe_line()
        );
        forwarded(&old, "before.example.test");

        old.process().signal(libc::SIGTERM);
        assert!(old.wait_exit(Duration::from_secs(10)).success());
        assert_eq!(
            probe(&topology, "sendto", "after.example.test"),
            expected_probe_line()
        );
        forwarded(&new, "after.example.test");
        wait_for(
            "the new agent to hold the lock",
            Duration::from_secs(5),
            || {
                new.log()
                    .contains("this one holds the redirect now")
                    .then_some(())
            },
        );
    }

    /// Agents on nested cgroups are not a second agent on one cgroup: a child cgroup's
    /// programs run before its parent's, so the child's agent serves the child's lookups and
    /// the parent's agent the rest.
    #[test]
    fn agents_on_nested_cgroups_each_serve_their_own() {
        let topology = Topology::new();
        let _server = DnsServer::start(&topology);
        let parent = Agent::start(&topology, &[]);
        let child = topology.cgroup.path.join("nested");
        std::fs::create_dir(&child).expect("mkdir the child cgroup");
        let nested = Agent::launch(
            &topology.client,
            &child,
            None,
            &[
                "--listen=127.0.0.1:8054".to_owned(),
                "--redirect-block=127.54.0.0/16".to_owned(),
            ],
        );
        let mut in_child = tests::in_cgroup_and_netns(
            &child,
            &topology.client,
            PROBE,
            &["sendto", &format!("{SERVER_IP}:53"), "child.example.test"],
        );
        let output = must(&mut in_child);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            expected_probe_line()
        );
        assert_eq!(
            probe(&topology, "sendto", "parent.example.test"),
            expected_probe_line()
        );
        forwarded(&nested, "child.example.test");
        forwarded(&parent, "parent.example.test");
        assert!(!parent.log().contains("child.example.test"));
        assert!(!nested.log().contains("parent.example.test"));
    }

    #[test]
    fn not_root() {
        tests::require_root();
        let nobody = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ];
        assert_one_line_error(&[], &nobody, "run dns-proxy as root");
    }

    #[test]
    fn no_cgroup2_filesystem() {
        tests::require_root();
        // In a private mount namespace of its own, where cgroup2 is unmounted.
        let root = tests::cgroup2_root();
        let root = root.to_str().expect("UTF-8 path");
        let unmounted = [
            "unshare",
            "--mount",
            "--propagation=private",
            "sh",
            "-c",
            r#"umount -l "$0" && exec "$@""#,
            root,
        ];
        assert_one_line_error(&[], &unmounted, "no cgroup2 filesystem is mounted");
    }

    #[test]
    fn bad_listen_address() {
        assert_one_line_error(&["--listen=0.0.0.0:8053"], &[], "not a wildcard");
    }
}
