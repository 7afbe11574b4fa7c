//! Operating the agent: scoping (--exclude-cgroup, `dns-proxy exec`), metrics and health,
//! restarts under a steady stream of lookups, and the capabilities the deployments grant.
use std::{fs, path::Path};

use tests::{Process, cgroup2_root, http_get, in_cgroup_and_netns};

use super::*;

const TEST_UPSTREAM: &str = env!("CARGO_BIN_EXE_test-upstream");
/// Where the slow upstream listens, in the server namespace.
const SLOW_SERVER_IP: &str = "192.0.2.5";
/// How long the slow upstream takes to answer.
const SLOW_DELAY_MS: &str = "50";
/// The probe, as a process of `cgroup` in the client namespace; its output line.
fn probe_in(cgroup: &Path, topology: &Topology, name: &str) -> String {
    let server = format!("{SERVER_IP}:53");
    let output = must(&mut in_cgroup_and_netns(
        cgroup,
        &topology.client,
        PROBE,
        &["sendto", &server, name],
    ));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn an_excluded_cgroup_tree_is_left_alone_and_the_rest_is_redirected() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let excluded = child_cgroup(&topology, "resolver");
    let below_excluded = child_cgroup(&topology, "resolver/worker");
    let plain = child_cgroup(&topology, "app");
    let agent = Agent::start(
        &topology,
        &[
            &format!("--exclude-cgroup={}", excluded.display()),
            &format!("--metrics={METRICS}"),
        ],
    );

    // Both answered (directly, for the excluded ones), each from the server it asked.
    assert_eq!(
        probe_in(&excluded, &topology, "excluded.example.test"),
        expected_probe_line()
    );
    assert_eq!(
        probe_in(&below_excluded, &topology, "below.example.test"),
        expected_probe_line()
    );
    assert_eq!(
        probe_in(&plain, &topology, "plain.example.test"),
        expected_probe_line()
    );
    forwarded(&agent, "plain.example.test");
    assert!(agent.query_line("excluded.example.test").is_none());
    assert!(agent.query_line("below.example.test").is_none());
    let page = scrape(&topology);
    assert_eq!(value(&page, "dns_proxy_kernel_skipped_excluded_total"), 2);
    assert_eq!(value(&page, "dns_proxy_kernel_redirected_total"), 1);
}

/// Asks SERVER (argv 1) for NAME (argv 2) on one connected UDP socket, prints its pid, waits
/// for a line on stdin (meanwhile the test acts), and asks again on the same socket. For each
/// ask it prints what it got: "answered SOURCE PEER" (the source recvfrom gave, the peer
/// getpeername gives), "refused" (ECONNREFUSED) or "timeout" (nothing in 2 s).
const ASK_TWICE_SCRIPT: &str = r#"
import os, socket, struct, sys
server, name = sys.argv[1], sys.argv[2].encode()
def query(qid):
    labels = b"".join(bytes([len(l)]) + l for l in name.split(b".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((server, 53))
for qid in (1, 2):
    if qid == 2:
        print(os.getpid(), flush=True)
        sys.stdin.readline()
    try:
        s.send(query(qid))
        data, source = s.recvfrom(4096)
        seen = "answered %s:%d %s:%d" % (source + s.getpeername())
    except ConnectionRefusedError:
        seen = "refused"
    except socket.timeout:
        seen = "timeout"
    print(seen, flush=True)
"#;

/// The client of [`ASK_TWICE_SCRIPT`], started, with its stdin and its lines.
struct AskTwice {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl AskTwice {
    fn start(mut command: Command, name: &str) -> Self {
        let mut child = command
            .args(["-c", ASK_TWICE_SCRIPT, &SERVER_IP.to_string(), name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the client");
        let lines = BufReader::new(child.stdout.take().expect("its stdout")).lines();
        Self { child, lines }
    }

    fn next_line(&mut self) -> String {
        self.lines.next().expect("a line").expect("its output")
    }

    /// Tells it to ask again; what the second ask got.
    fn ask_again(&mut self) -> String {
        use std::io::Write as _;
        let mut stdin = self.child.stdin.take().expect("its stdin");
        stdin.write_all(b"\n").expect("tell it to go on");
        let second = self.next_line();
        assert!(self.child.wait().expect("its exit").success());
        second
    }
}

/// An agent that is alive but does not run (SIGSTOP here; `docker pause`, a frozen cgroup or
/// a wedged UDP thread alike) keeps its programs attached and its sockets open, and reads
/// nothing. Within 3 s the programs take it for stopped: a new lookup goes direct, and one on
/// a socket already sent to the block is refused at once instead of vanishing; once it runs
/// again, lookups go through it again. Before, every lookup was lost for as long as it was
/// stopped (an adversary: every stream, fresh sockets included, for 10 s).
#[test]
fn lookups_go_direct_or_are_refused_while_the_agent_is_stopped() {
    let Harness {
        mut agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[&format!("--metrics={METRICS}")]);
    let mut client = AskTwice::start(topology.workload("python3", &[]), "stopped.example.test");
    let answered = format!("answered {SERVER_IP}:53 {SERVER_IP}:53");
    assert_eq!(client.next_line(), answered, "{}", agent.log());
    client.next_line(); // its pid
    forwarded(&agent, "stopped.example.test");

    let pid = agent.process().id().to_string();
    must(Command::new("kill").args(["-STOP", &pid]));
    // Let it run again however this ends, so that it can be stopped.
    struct Continue<'a>(&'a str);
    impl Drop for Continue<'_> {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", self.0]).status();
        }
    }
    let continue_it = Continue(&pid);
    std::thread::sleep(Duration::from_millis(3500));
    assert_answered(
        dig(topology.workload("dig", &[]), "direct.example.test", &[]),
        "dig while the agent is stopped",
    );
    assert_eq!(client.ask_again(), "refused");

    drop(continue_it);
    // Running again: it says so within half a second, and is sent lookups again.
    wait_for_a_lookup_through(&agent, &topology);
    // The lookup made while it was stopped went direct: the agent never saw it.
    assert!(
        agent.query_line("direct.example.test").is_none(),
        "{}",
        agent.log()
    );
    let page = scrape(&topology);
    assert!(
        value(&page, "dns_proxy_kernel_agent_unresponsive_total") >= 2,
        "{page}"
    );
    // Running again, the agent says what went direct meanwhile.
    wait_for_log(&agent, "because the agent had not said it runs for 3 s");
}

/// Out of open files (its limit lowered under it), the agent's heartbeat cannot look at the
/// table's pins: it says that, and not that the table is lost, which it is not
/// (helper-186: "the next agent would start with an empty one", of a table pinned all along).
/// Its limit raised again, it serves on.
#[test]
fn an_agent_out_of_open_files_says_so_and_not_that_its_table_is_lost() {
    let Harness {
        mut agent,
        topology,
        server: _server,
    } = Harness::start(Placement::Outside, &[]);
    let pid = agent.process().id().to_string();
    let limit = |limit: &str| {
        must(Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={limit}")]));
    };
    // Only the soft limit: raising a hard one needs CAP_SYS_RESOURCE, which this machine's
    // root may not have. Not one more file: the lowest free descriptor is past it.
    let hard = fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("read the agent's limits")
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(4).map(str::to_owned))
        .expect("the agent's limit of open files");
    limit("3:");
    let said = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for_log(&agent, "(the agent is out of open files: raise its limit");
    }));
    limit(&format!("{hard}:"));
    assert!(said.is_ok(), "{}", agent.log());
    let log = agent.log();
    assert!(!log.contains("would start with an empty one"), "{log}");
    assert!(
        !log.contains("cannot keep the table of servers pinned"),
        "{log}"
    );
    assert_eq!(
        probe(&topology, "sendto", "after.example.test"),
        expected_probe_line()
    );
}

/// A socket connected while its process was redirected keeps sending to the proxy after the
/// process moves into an excluded cgroup (an operator's move; a takeover that adds
/// `--exclude-cgroup`): its answers still show the server it asked, in recvfrom and
/// getpeername. Before, the programs decoded nothing for an excluded cgroup, and every answer
/// on such a socket came from a block address, which resolvers drop (an adversary: every
/// lookup on it lost until the application connected anew).
#[test]
fn a_socket_connected_before_its_process_moved_into_an_excluded_cgroup_still_sees_its_server() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let excluded = child_cgroup(&topology, "resolver");
    let app = child_cgroup(&topology, "app");
    let agent = Agent::start(
        &topology,
        &[&format!("--exclude-cgroup={}", excluded.display())],
    );
    let in_app = in_cgroup_and_netns(&app, &topology.client, "python3", &[]);
    let mut client = AskTwice::start(in_app, "moved.example.test");
    let answered = format!("answered {SERVER_IP}:53 {SERVER_IP}:53");
    assert_eq!(client.next_line(), answered);
    let pid = client.next_line();
    fs::write(excluded.join("cgroup.procs"), &pid).expect("move the client");
    assert_eq!(client.ask_again(), answered, "{}", agent.log());
    // Both went through the agent: the socket was sent to it before the move.
    assert_eq!(
        agent.query_lines_once_logged("moved.example.test", 2).len(),
        2,
        "{}",
        agent.log()
    );
}

/// `--cgroup` and `--exclude-cgroup` through `/proc/PID/root`. Into the agent's own mount
/// namespace, such a path is taken as the directory it names and kept. Into another one,
/// which shows another directory at the same path (a decoy here), it is refused with one
/// line: resolved into its own namespace, the agent had put its programs on the decoy, and
/// swapped an excluded tree for it a second after start (an adversary's case); kept as
/// given, it cannot follow it once it drops its capabilities.
#[test]
fn cgroups_named_through_proc_pid_root_are_taken_in_this_namespace_and_refused_from_another() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let through_proc = |cgroup: &Path| {
        let root = format!("/proc/{}/root", std::process::id());
        Path::new(&root).join(cgroup.strip_prefix("/").unwrap())
    };
    let app = child_cgroup(&topology, "app");
    let resolver = child_cgroup(&topology, "resolver");
    let decoy = child_cgroup(&topology, "decoy");

    for (covered, args) in [
        (
            &app,
            vec![format!("--cgroup={}", through_proc(&app).display())],
        ),
        (
            &resolver,
            vec![
                format!("--cgroup={}", topology.cgroup.path.display()),
                format!("--exclude-cgroup={}", through_proc(&resolver).display()),
            ],
        ),
    ] {
        let mut command = agent_seeing_a_decoy(&topology, &decoy, covered, &args);
        let output = command.output().expect("run the agent");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("reached through another mount namespace's tree"),
            "{stderr}"
        );
    }

    // In the agent's own namespace: redirected, and still after the agent's checks.
    let agent = Agent::launch(
        &topology.client,
        &through_proc(&app),
        None,
        &[
            format!("--listen={PROXY_LISTEN}"),
            format!("--exclude-cgroup={}", through_proc(&resolver).display()),
        ],
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        probe_in(&app, &topology, "app.example.test"),
        expected_probe_line()
    );
    forwarded(&agent, "app.example.test");
    assert!(!agent.log().contains("made anew"), "{}", agent.log());
}

/// The agent in a mount namespace of its own where `decoy` is bound over `covered`, with
/// `args` (its `--cgroup` among them); refused at once, else it would serve until killed.
fn agent_seeing_a_decoy(
    topology: &Topology,
    decoy: &Path,
    covered: &Path,
    args: &[String],
) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .arg(decoy)
        .arg(covered)
        .args(["timeout", "20", "nsenter"])
        .arg(format!("--net=/run/netns/{}", topology.client.name))
        .arg("--")
        .arg(agent_binary())
        .arg("run")
        .arg(format!("--listen={PROXY_LISTEN}"))
        .args(args)
        .env("DNS_PROXY_STATE_DIR", topology.client.state_dir())
        .env("RUST_LOG", "off")
        .stdout(Stdio::null());
    command
}

/// An excluded cgroup that does not exist when the agent starts (a stopped service's: systemd
/// removes a stopped unit's cgroup) is excluded once it is made. Before, the agent refused to
/// start, and a restart while the service was stopped left every lookup direct (an
/// adversarial review).
#[test]
fn an_excluded_cgroup_not_made_yet_at_start_is_excluded_once_made() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let redirected = child_cgroup(&topology, "system");
    let excluded = redirected.join("resolver");
    // A second one named through a symlink: resolved at start, as an existing one is (before,
    // its depth was taken for its parent's, and it was never excluded).
    let link = std::env::temp_dir().join(format!("{}-system", topology.tag));
    std::os::unix::fs::symlink(&redirected, &link).expect("symlink the redirected cgroup");
    let linked = redirected.join("linked");
    let args = [
        format!("--listen={PROXY_LISTEN}"),
        format!("--exclude-cgroup={}", excluded.display()),
        format!("--exclude-cgroup={}", link.join("linked").display()),
    ];
    let agent = Agent::launch(&topology.client, &redirected, None, &args);
    fs::remove_file(&link).expect("rm the symlink");
    wait_for_log(
        &agent,
        "does not exist yet: it is excluded as soon as it is made",
    );
    fs::create_dir(&excluded).expect("mkdir the excluded cgroup");
    fs::create_dir(&linked).expect("mkdir the one named through a symlink");
    wait_for("the agent to exclude both", Duration::from_secs(5), || {
        (agent.log().matches("was made (id").count() == 2).then_some(())
    });
    for (cgroup, name) in [
        (&excluded, "made.example.test"),
        (&linked, "linked.example.test"),
    ] {
        assert_eq!(probe_in(cgroup, &topology, name), expected_probe_line());
        assert!(agent.query_line(name).is_none(), "{name}: {}", agent.log());
    }
    assert_eq!(
        probe_in(&redirected, &topology, "redirected.example.test"),
        expected_probe_line()
    );
    forwarded(&agent, "redirected.example.test");
    fs::remove_dir(&excluded).expect("rmdir the excluded cgroup");
    fs::remove_dir(&linked).expect("rmdir the other excluded cgroup");
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup");
}

/// A service started after the agent, in an excluded cgroup made as it starts (systemd makes a
/// service's cgroup then, anew at each start), is excluded from its first lookup, and the
/// kernel sees to it: `raw_tp/cgroup_mkdir` excludes the cgroup inside `mkdir`, before a
/// process can be moved in. The agent is frozen through each start, so it cannot look: before,
/// it excluded the cgroup once it saw it (inotify), which raced the service's first lookup
/// and lost some on a loaded machine (CI: 5 and 8 starts of 10 redirected), and all of them
/// with the agent frozen; when it looked only each second, a real systemd's services lost 4
/// starts of 5 (helper-143). Cgroups made beside it, at paths that only begin or end like it,
/// are not excluded.
#[test]
fn a_service_started_after_the_agent_in_an_excluded_cgroup_is_excluded_from_its_first_lookup() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let redirected = child_cgroup(&topology, "system");
    let excluded = redirected.join("resolver.service");
    // And one whose slice is not made yet either: made with it, levels in a row.
    let slice = redirected.join("app.slice");
    let deeper = slice.join("late.service");
    let args = [
        format!("--listen={PROXY_LISTEN}"),
        format!("--exclude-cgroup={}", excluded.display()),
        format!("--exclude-cgroup={}", deeper.display()),
        format!("--metrics={METRICS}"),
    ];
    const STARTS: u32 = 10;
    let mut agent = Agent::launch(&topology.client, &redirected, None, &args);
    wait_for("both said not made yet", Duration::from_secs(10), || {
        (agent.log().matches("does not exist yet").count() == 2).then_some(())
    });
    for (service, made_in) in [(&excluded, &redirected), (&deeper, &redirected)] {
        let mut excluded_at_once = 0;
        for start in 0..STARTS {
            let name = format!("start-{start}.example.test");
            if first_lookup_answered_while_frozen(&mut agent, service, &topology, &name) {
                excluded_at_once += 1;
            }
            // Its stop, and its slice's.
            for dir in service.ancestors().take_while(|dir| dir != made_in) {
                fs::remove_dir(dir).expect("rmdir the service's cgroup");
            }
        }
        assert_eq!(
            excluded_at_once,
            STARTS,
            "{}: {excluded_at_once} of {STARTS} first lookups excluded:\n{}",
            service.display(),
            agent.log()
        );
    }
    // Each start's cgroup, counted by the kernel side as it excluded it (its slice, not an
    // excluded path, is not).
    let page = scrape(&topology);
    assert_eq!(
        value(&page, "dns_proxy_kernel_excluded_as_made_total"),
        u64::from(2 * STARTS)
    );
    assert_eq!(
        value(&page, "dns_proxy_kernel_exclude_made_failed_total"),
        0
    );
    let names: Vec<String> = (0..STARTS)
        .map(|start| format!("start-{start}.example.test"))
        .collect();
    for name in &names {
        assert!(agent.query_line(name).is_none(), "{name}: {}", agent.log());
    }
    // Beside them, at paths that begin or end as theirs, and the rest of the tree: redirected.
    for (beside, name) in [
        (redirected.join("resolver.servic"), "shorter.example.test"),
        (redirected.join("resolver.service2"), "longer.example.test"),
        (redirected.join("app.slice"), "slice.example.test"),
        (redirected.clone(), "redirected.example.test"),
    ] {
        fs::create_dir_all(&beside).expect("mkdir a cgroup beside");
        assert_eq!(probe_in(&beside, &topology, name), expected_probe_line());
        forwarded(&agent, name);
        if beside != redirected {
            fs::remove_dir(&beside).expect("rmdir the cgroup beside");
        }
    }
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup");
}

/// A service's start with the agent frozen: `service`'s cgroup made (with the levels above it
/// that are missing), the service in it, its first lookup of `name`; whether that lookup was
/// answered while the agent was frozen, so directly: excluded. Redirected, it waits for the
/// agent, and is answered once the agent runs again. The probe is started before, in the
/// workload's namespace, and held until it is in the cgroup: the time frozen is the lookup's,
/// not a process start's (slow in the 6.1 VM). Frozen for 1.5 s at most, and let run for a
/// while after, so that the programs never take it for stopped (3 s without a word from it),
/// which would send the lookups direct.
fn first_lookup_answered_while_frozen(
    agent: &mut Agent,
    service: &Path,
    topology: &Topology,
    name: &str,
) -> bool {
    use std::io::Write as _;
    // Measured from the SIGSTOP. The programs take the agent for stopped 3 s after its last
    // word (said every 500 ms), so at 2.5 s at the earliest: a lookup answered within 2 s went
    // direct because it was excluded, not because the agent was taken for stopped. (It was
    // 1.5 s: in the emulated Linux 6.1 guest, the probe's exec alone came past it for 4 starts
    // of 10 once.)
    const FROZEN: Duration = Duration::from_millis(2000);
    let mut probe = Command::new("ip")
        .args(["netns", "exec", &topology.client.name, "sh", "-c"])
        // `ip netns exec` and `exec` keep the process: it is the probe that is moved.
        .arg(r#"read _ && exec "$0" "$@""#)
        .args([PROBE, "sendto", &format!("{SERVER_IP}:53"), name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the probe");
    agent.process().signal(libc::SIGSTOP);
    let frozen_at = std::time::Instant::now();
    fs::create_dir_all(service).expect("mkdir the service's cgroup");
    fs::write(service.join("cgroup.procs"), probe.id().to_string())
        .expect("move the probe into the service's cgroup");
    writeln!(probe.stdin.take().expect("the probe's stdin")).expect("let the probe go");
    let mut answered_while_frozen = false;
    while frozen_at.elapsed() < FROZEN {
        if probe.try_wait().expect("poll the probe").is_some() {
            answered_while_frozen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.process().signal(libc::SIGCONT);
    let output = probe.wait_with_output().expect("wait for the probe");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        expected_probe_line(),
        "{name}"
    );
    std::thread::sleep(Duration::from_millis(700));
    answered_while_frozen
}

/// A workload that may make cgroups at one excluded path (a delegated subtree's owner, say)
/// makes and removes one there 300 times in a row, in a few milliseconds: the kernel keeps one
/// id per path, so another excluded service started next is still excluded from its first
/// lookup. Before, each made cgroup's id stayed in `EXCLUDED_CGROUPS` until the agent let it
/// go a second later, the 256 entries filled, and the other service's new cgroup was not
/// excluded (helper-151: 10 starts of 10 redirected, the agent frozen).
#[test]
fn cgroups_made_and_removed_at_one_excluded_path_leave_room_for_another() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let redirected = child_cgroup(&topology, "system");
    let churned = redirected.join("churn.service");
    let service = redirected.join("resolver.service");
    let args = [
        format!("--listen={PROXY_LISTEN}"),
        format!("--exclude-cgroup={}", churned.display()),
        format!("--exclude-cgroup={}", service.display()),
    ];
    let mut agent = Agent::launch(&topology.client, &redirected, None, &args);
    wait_for("both said not made yet", Duration::from_secs(10), || {
        (agent.log().matches("does not exist yet").count() == 2).then_some(())
    });
    const STARTS: u32 = 5;
    let mut excluded_at_once = 0;
    for start in 0..STARTS {
        // The churn, with the agent frozen, so that only the kernel acts.
        agent.process().signal(libc::SIGSTOP);
        for _ in 0..300 {
            fs::create_dir(&churned).expect("mkdir at the churned path");
            fs::remove_dir(&churned).expect("rmdir at the churned path");
        }
        agent.process().signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(700));
        let name = format!("after-churn-{start}.example.test");
        if first_lookup_answered_while_frozen(&mut agent, &service, &topology, &name) {
            excluded_at_once += 1;
        }
        fs::remove_dir(&service).expect("rmdir the service's cgroup");
    }
    assert_eq!(
        excluded_at_once,
        STARTS,
        "{excluded_at_once} of {STARTS} first lookups excluded after the churn:\n{}",
        agent.log()
    );
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup");
}

/// An excluded service below a directory that the agent, without capabilities once it
/// serves, may not search (its owner's to make so: a delegated subtree) stays excluded when it
/// is made anew: the agent cannot see the new cgroup, and leaves the id the kernel excluded it
/// under alone, and says it cannot look there. Before, it took that id for a cgroup made and
/// removed before it looked and let it go a second later, and the service was redirected
/// (helper-152).
#[test]
fn an_excluded_service_below_a_directory_the_agent_may_not_search_stays_excluded() {
    use std::os::unix::fs::PermissionsExt as _;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let redirected = child_cgroup(&topology, "system");
    let owned = redirected.join("user.slice");
    fs::create_dir(&owned).expect("mkdir the owned slice");
    std::os::unix::fs::chown(&owned, Some(65534), Some(65534)).expect("chown the slice");
    let service = owned.join("app.service");
    let args = [
        format!("--listen={PROXY_LISTEN}"),
        format!("--exclude-cgroup={}", service.display()),
    ];
    let mut agent = Agent::launch(&topology.client, &redirected, None, &args);
    wait_for("the agent to serve", Duration::from_secs(10), || {
        agent.log().contains("ready: ").then_some(())
    });
    fs::set_permissions(&owned, fs::Permissions::from_mode(0o700)).expect("chmod the slice");
    for start in 0..3 {
        fs::create_dir(&service).expect("mkdir the service's cgroup");
        // Past the second after which the agent let an id it could not place go.
        std::thread::sleep(Duration::from_millis(2500));
        let name = format!("unsearchable-{start}.example.test");
        assert!(
            first_lookup_answered_while_frozen(&mut agent, &service, &topology, &name),
            "start {start}: redirected\n{}",
            agent.log()
        );
        fs::remove_dir(&service).expect("rmdir the service's cgroup");
    }
    assert!(
        agent.log().contains("cannot look at excluded cgroup tree"),
        "{}",
        agent.log()
    );
    fs::remove_dir(&owned).expect("rmdir the owned slice");
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup");
}

/// The kernel cuts a new cgroup's path at 1,023 bytes (below the hierarchy's root). An
/// excluded path of 1,022 bytes is excluded by the kernel as it is made; one of 1,023, which
/// the kernel could not tell from a longer one that begins with it, is left to the agent's
/// look (and said so), and a cgroup beside it whose name is longer is redirected. Before, the
/// 1,023-byte path was handed to the kernel, and cgroups beside it with longer names were
/// excluded until the agent let their ids go (helper-151).
#[test]
fn excluded_paths_at_the_kernels_length_limit_exclude_nothing_else() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let redirected = child_cgroup(&topology, "system");
    // `redirected` as the kernel names it, then levels of 200 bytes and a last one of what is
    // left, to `len` bytes in all.
    let below_root = redirected
        .strip_prefix(cgroup2_root())
        .expect("the redirected cgroup is below the cgroup2 root")
        .to_owned();
    let path_of = |len: usize, last: char| {
        let mut path = redirected.clone();
        let mut used = 1 + below_root.as_os_str().len();
        while len - used > 201 {
            path.push("d".repeat(200));
            used += 201;
        }
        path.push(last.to_string().repeat(len - used - 1));
        path
    };
    let fits = path_of(1022, 'f');
    let too_long = path_of(1023, 't');
    let args = [
        format!("--listen={PROXY_LISTEN}"),
        format!("--exclude-cgroup={}", fits.display()),
        format!("--exclude-cgroup={}", too_long.display()),
    ];
    let mut agent = Agent::launch(&topology.client, &redirected, None, &args);
    assert!(
        first_lookup_answered_while_frozen(&mut agent, &fits, &topology, "fits.example.test"),
        "the 1,022-byte path: redirected\n{}",
        agent.log()
    );
    // Beside the 1,023-byte one, its last name one and twenty bytes longer: the kernel reads
    // both as that path, cut short.
    for (extra, name) in [
        ("x", "longer.example.test"),
        ("-twenty-bytes-longer", "evil.example.test"),
    ] {
        let mut beside = too_long.clone().into_os_string();
        beside.push(extra);
        let beside = std::path::PathBuf::from(beside);
        assert!(
            !first_lookup_answered_while_frozen(&mut agent, &beside, &topology, name),
            "{name}: excluded\n{}",
            agent.log()
        );
        fs::remove_dir(&beside).expect("rmdir the cgroup beside");
    }
    assert_eq!(
        agent
            .log()
            .matches("longer than the kernel side can tell a new cgroup's apart")
            .count(),
        1,
        "{}",
        agent.log()
    );
    for path in [&fits, &too_long] {
        for dir in path.ancestors().take_while(|dir| *dir != redirected) {
            let _ = fs::remove_dir(dir);
        }
    }
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup");
}

/// systemd makes a service's cgroup anew at each restart, with a new id: the tree stays
/// excluded (within a second), and the agent says so. A redirected cgroup that goes is an
/// error in the log, and `/readyz` says 503.
#[test]
fn an_excluded_cgroup_made_anew_stays_excluded() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let redirected = child_cgroup(&topology, "system");
    let excluded = child_cgroup(&topology, "system/resolver");
    // The agent redirects `system`, all but `system/resolver`: a cgroup of its own, so that
    // this test can remove it at the end.
    let args = [
        format!("--listen={PROXY_LISTEN}"),
        format!("--exclude-cgroup={}", excluded.display()),
        format!("--metrics={METRICS}"),
    ];
    let agent = Agent::launch(&topology.client, &redirected, None, &args);
    assert_eq!(
        probe_in(&excluded, &topology, "before.example.test"),
        expected_probe_line()
    );
    // A restart of the service: its cgroup removed, and made again at the same path.
    fs::remove_dir(&excluded).expect("rmdir the excluded cgroup");
    fs::create_dir(&excluded).expect("mkdir it again");
    wait_for(
        "the agent to exclude the cgroup made anew",
        Duration::from_secs(5),
        || agent.log().contains("was made anew").then_some(()),
    );
    assert_eq!(
        probe_in(&excluded, &topology, "after.example.test"),
        expected_probe_line()
    );
    assert_eq!(
        probe_in(&redirected, &topology, "redirected.example.test"),
        expected_probe_line()
    );
    forwarded(&agent, "redirected.example.test");
    assert!(agent.query_line("before.example.test").is_none());
    assert!(agent.query_line("after.example.test").is_none());
    let page = scrape(&topology);
    assert_eq!(value(&page, "dns_proxy_kernel_skipped_excluded_total"), 2);

    fs::remove_dir(&excluded).expect("rmdir the excluded cgroup");
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup");
    wait_for(
        "the agent to say the redirected cgroup is gone",
        Duration::from_secs(5),
        || agent.log().contains("the redirected cgroup").then_some(()),
    );
    // And so does /readyz: the agent redirects nothing until it is restarted.
    let (status, body) = tests::http_get(&topology.client, metrics_addr(), "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the redirected cgroup is gone"), "{body}");
    // Made anew at its path (runc's `mkdir -p` of Docker's parent cgroup), it is another
    // cgroup, which this agent never attached to: after 30 s it asks to be restarted (by the
    // liveness probe, or systemd's watchdog), which attaches a new agent to it. Before, it
    // said 200 for good while redirecting nothing (helper-97).
    fs::create_dir(&redirected).expect("make the redirected cgroup anew");
    let (status, body) = tests::http_get(&topology.client, metrics_addr(), "/healthz");
    assert_eq!(status, 200, "{body}");
    let body = wait_for(
        "/healthz to ask for a restart",
        Duration::from_secs(45),
        || {
            let (status, body) = tests::http_get(&topology.client, metrics_addr(), "/healthz");
            (status == 503).then_some(body)
        },
    );
    assert!(body.contains("restart the agent"), "{body}");
    fs::remove_dir(&redirected).expect("rmdir the redirected cgroup made anew");
}

/// `sh -c` that runs its arguments with `JOURNAL_STREAM` naming its stderr, as systemd does
/// for a unit whose stderr is the journal.
fn with_stderr_as_the_journal() -> std::process::Command {
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg(r#"JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@""#);
    sh
}

/// Under systemd, whose journal files each line of a service's stderr as `info` unless the
/// line says otherwise, each line starts with its priority and carries no timestamp of its
/// own: `journalctl -p warning` shows the agent's warnings and errors. Before, every line was
/// `info` to the journal, the fatal error included (helper-143). Where stderr is not the
/// stream `JOURNAL_STREAM` names, lines are as ever.
#[test]
fn under_systemd_each_log_line_says_its_priority_to_the_journal() {
    let topology = Topology::new();
    let mut agent = Agent::spawn(Agent::command_through(
        &topology,
        with_stderr_as_the_journal(),
    ));
    // Ignored, with a warning: a log rotation's signal (`shutdown`).
    agent.process().signal(libc::SIGUSR1);
    wait_for_log(&agent, "SIGUSR1");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|line| line.starts_with("<6>[INFO  dns_proxy] ready: ")),
        "{log}"
    );
    let warning = log
        .lines()
        .find(|line| line.contains("SIGUSR1"))
        .expect("the warning");
    assert!(warning.starts_with("<4>[WARN  "), "{warning}");
    for line in log.lines() {
        assert!(
            ["<3>[", "<4>[", "<6>[", "<7>["]
                .iter()
                .any(|priority| line.starts_with(priority)),
            "a line without its priority, or with a timestamp: {line}\n{log}"
        );
    }

    // The one line of a failed start, too: exit 1, where the agent runs.
    let (code, stderr) = failing_start(&["JOURNAL_STREAM=journal"], &["--cgroup=/proc"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("<3>dns-proxy: error: --cgroup /proc")),
        "{stderr}"
    );
    // And a usage error (a bad value in the unit's environment file, as DNS_PROXY_LISTEN):
    // each of its lines. Before, these were info to the journal even after the fix above
    // (helper-144).
    let (code, stderr) =
        failing_start(&["JOURNAL_STREAM=journal", "DNS_PROXY_LISTEN=garbage"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("<3>error: invalid value 'garbage' for '--listen"),
        "{stderr}"
    );
    assert!(
        stderr.lines().all(|line| line.starts_with("<3>")),
        "{stderr}"
    );
    // Flags that parse but do not fit: a usage error as well (exit 2, which the unit does
    // not restart after), said as an error.
    let (code, stderr) = failing_start(&["JOURNAL_STREAM=journal"], &["--listen=0.0.0.0:53"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("<3>dns-proxy: error: --listen 0.0.0.0:53: "),
        "{stderr}"
    );
    // Its stderr not the journal's stream: lines as ever.
    let (_, stderr) = failing_start(&["JOURNAL_STREAM=1:1"], &["--cgroup=/proc"]);
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("dns-proxy: error: --cgroup /proc")),
        "{stderr}"
    );
}

/// `dns-proxy run ARGS` with the variables `env` (`JOURNAL_STREAM=journal`: naming its
/// stderr, as systemd does), expected to fail at once: its exit code and stderr.
fn failing_start(env: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg(
            r#"[ "$JOURNAL_STREAM" = journal ] && export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); exec "$@""#,
        )
        .arg("sh")
        .arg("env")
        .args(env.iter().filter(|setting| **setting != "JOURNAL_STREAM=journal"))
        .arg(agent_binary())
        .arg("run")
        .args(args);
    if env.contains(&"JOURNAL_STREAM=journal") {
        sh.env("JOURNAL_STREAM", "journal");
    }
    let output = sh.output().expect("run the agent");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_exclusion_that_is_not_a_cgroup_is_a_one_line_error() {
    let topology = Topology::new();
    let mut command = topology.client.nsenter();
    command
        .arg(agent_binary())
        .args(["run", "--listen", PROXY_LISTEN])
        .arg(format!("--cgroup={}", topology.cgroup.path.display()))
        .arg("--exclude-cgroup=/proc");
    let output = command.output().expect("run the agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<_> = stderr
        .lines()
        .filter(|line| line.starts_with("dns-proxy: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("--exclude-cgroup /proc: not a cgroup v2 directory"),
        "{stderr}"
    );
}

#[test]
fn metrics_count_what_was_sent_and_health_endpoints_answer() {
    let Harness {
        agent, topology, ..
    } = &mut Harness::start(Placement::Outside, &[&format!("--metrics={METRICS}")]);
    assert_eq!(
        http_get(&topology.client, metrics_addr(), "/healthz"),
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        http_get(&topology.client, metrics_addr(), "/readyz"),
        (200, "ready\n".to_owned())
    );
    assert_eq!(http_get(&topology.client, metrics_addr(), "/other").0, 404);

    let server = format!("{SERVER_IP}:53");
    let (udp, tcp) = (5, 3);
    for i in 0..udp {
        assert_eq!(
            probe(topology, "sendto", &format!("m{i}.example.test")),
            expected_probe_line()
        );
    }
    for i in 0..tcp {
        assert_eq!(
            probe(topology, "tcp", &format!("t{i}.example.test")),
            expected_probe_line()
        );
    }
    // dnsmasq refuses names outside its zone: an answer, relayed, with another RCODE.
    let refused = topology
        .workload(PROBE, &["sendto", &server, "elsewhere.invalid"])
        .output()
        .expect("run the probe");
    assert!(!refused.status.success(), "no A record expected");
    // Two datagrams that are not DNS queries.
    for garbage in ["68656c6c6f", "abcd8180000100000000000000"] {
        let sent = topology
            .workload(PROBE, &["sendto", &server, "unused", "--raw", garbage])
            .output()
            .expect("run the probe");
        assert!(!sent.status.success(), "garbage got an answer");
    }
    wait_for("every answer to be logged", Duration::from_secs(5), || {
        (agent.answered_queries() == udp + tcp + 1).then_some(())
    });

    let page = scrape(topology);
    let udp_answers = (udp + 1) as u64;
    for (series, expected) in [
        (
            "dns_proxy_queries_received_total{protocol=\"udp\"}",
            udp_answers + 2,
        ),
        (
            "dns_proxy_queries_forwarded_total{protocol=\"udp\"}",
            udp_answers,
        ),
        (
            "dns_proxy_queries_received_total{protocol=\"tcp\"}",
            tcp as u64,
        ),
        (
            "dns_proxy_queries_forwarded_total{protocol=\"tcp\"}",
            tcp as u64,
        ),
        (
            "dns_proxy_answers_total{protocol=\"udp\",rcode=\"NOERROR\"}",
            udp as u64,
        ),
        (
            "dns_proxy_answers_total{protocol=\"udp\",rcode=\"REFUSED\"}",
            1,
        ),
        (
            "dns_proxy_answers_total{protocol=\"tcp\",rcode=\"NOERROR\"}",
            tcp as u64,
        ),
        ("dns_proxy_tcp_connections_total", tcp as u64),
        (
            "dns_proxy_dropped_total{protocol=\"udp\",reason=\"malformed\"}",
            2,
        ),
        (
            "dns_proxy_dropped_total{protocol=\"udp\",reason=\"not_redirected\"}",
            0,
        ),
        ("dns_proxy_upstream_timeouts_total{protocol=\"udp\"}", 0),
        ("dns_proxy_upstream_errors_total{protocol=\"udp\"}", 0),
        ("dns_proxy_inflight_queries{protocol=\"udp\"}", 0),
        ("dns_proxy_inflight_queries{protocol=\"tcp\"}", 0),
        (
            "dns_proxy_query_duration_seconds_count{protocol=\"udp\"}",
            udp_answers,
        ),
        (
            "dns_proxy_query_duration_seconds_bucket{le=\"+Inf\",protocol=\"udp\"}",
            udp_answers,
        ),
        (
            "dns_proxy_query_duration_seconds_count{protocol=\"tcp\"}",
            tcp as u64,
        ),
        // Kernel side: each UDP probe is one sendto (redirected) and one recvfrom (shown as
        // from the server); each TCP probe one connect and one getpeername. The garbage was
        // redirected and never answered.
        (
            "dns_proxy_kernel_redirected_total",
            udp_answers + 2 + tcp as u64,
        ),
        (
            "dns_proxy_kernel_reverse_translated_total",
            udp_answers + tcp as u64,
        ),
        ("dns_proxy_kernel_skipped_excluded_total", 0),
        ("dns_proxy_kernel_skipped_foreign_namespace_total", 0),
        ("dns_proxy_kernel_unknown_index_total", 0),
        ("dns_proxy_kernel_table_full_total", 0),
        ("dns_proxy_kernel_foreign_refused_total", 0),
        ("dns_proxy_kernel_impersonation_refused_total", 0),
    ] {
        assert_eq!(value(&page, series), expected, "{series} in:\n{page}");
    }

    // A clean stop after scraping (readiness during the drain is unit-tested in metrics.rs).
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

/// Whoever reaches the metrics port (on a node, any pod, if it listens on the node's address)
/// cannot keep the kubelet's probes out by holding connections open: at the limit, the
/// oldest connection that is not in the middle of a request is closed for a new one.
#[test]
fn connections_held_open_on_the_metrics_port_do_not_starve_the_probes() {
    // 64 idle connections, each reopened as soon as it is closed, and a probe a second with
    // the kubelet's default timeout (1 s), for 8 s.
    let script = r#"
import selectors, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
address = (host, int(port))
sel = selectors.DefaultSelector()
def hold():
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(address)
    except BlockingIOError:
        pass
    sel.register(s, selectors.EVENT_READ)
for _ in range(64):
    hold()
start = time.time()
next_probe = start + 0.5
answered = probes = 0
while time.time() - start < 8:
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            data = s.recv(100)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s)
            s.close()
            hold()
    if time.time() >= next_probe:
        next_probe += 1
        probes += 1
        answered += probe(address)
print(f"{answered}/{probes}")
"#;
    let (answered, probes) = probes_answered_meanwhile(script);
    // Eight probes, or seven if the script fell half a second behind on a busy machine.
    assert!((7..=8).contains(&probes), "{answered}/{probes}");
    assert_probes_kept_in(answered, probes, "while connections were held");
}

/// The kubelet restarts a container after 3 probes in a row fail (its default
/// `failureThreshold`). A starved port fails them all; one probe of eight may miss its 1 s on
/// a loaded 2-vCPU machine, where the Python threads loading the port take it from the agent.
fn assert_probes_kept_in(answered: u32, probes: u32, meanwhile: &str) {
    assert!(answered + 1 >= probes, "{answered}/{probes} {meanwhile}");
}

/// Runs the Python `script`, which loads an agent's metrics port (its first argument) while
/// it probes `/healthz` and prints `ANSWERED/PROBES`; returns those two.
fn probes_answered_meanwhile(script: &str) -> (u32, u32) {
    // What the scripts share: one /healthz probe, with the kubelet's default timeout.
    const PROBE: &str = r#"
import socket
def probe(address):
    try:
        p = socket.create_connection(address, timeout=1)
        p.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        answered = p.recv(100).startswith(b"HTTP/1.1 200")
        p.close()
        return int(answered)
    except OSError:
        return 0
"#;
    let script = format!("{PROBE}{script}");
    let topology = Topology::new();
    let _agent = Agent::start(&topology, &[&format!("--metrics={METRICS}")]);
    let output = must(
        topology
            .client
            .command("python3")
            .args(["-c", &script, METRICS]),
    );
    let line = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let parsed = line
        .split_once('/')
        .and_then(|(answered, probes)| Some((answered.parse().ok()?, probes.parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("not ANSWERED/PROBES: {line}"))
}

/// Nor by asking for pages over and over: a connection is busy (not to be closed for a new
/// one) only while its response is built, not while it waits its turn to build a page.
#[test]
fn scrapers_asking_without_pause_do_not_starve_the_probes() {
    // 16 keep-alive connections asking /metrics again as soon as each page is read (a new
    // connection when one is closed), and a probe a second with a 1 s timeout, for 8 s.
    let script = r#"
import socket, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
address = (host, int(port))
stop = time.time() + 8
def scrape():
    while time.time() < stop:
        try:
            s = socket.create_connection(address, timeout=2)
            f = s.makefile("rb")
            while time.time() < stop:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
                length = 0
                while True:
                    line = f.readline()
                    if not line:
                        raise OSError("closed")
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    if line in (b"\r\n", b"\n"):
                        break
                f.read(length)
        except OSError:
            pass
for _ in range(16):
    threading.Thread(target=scrape, daemon=True).start()
time.sleep(0.5)
answered = probes = 0
while time.time() < stop - 0.5:
    probes += 1
    answered += probe(address)
    time.sleep(1)
print(f"{answered}/{probes}")
"#;
    let (answered, probes) = probes_answered_meanwhile(script);
    assert!(probes >= 6, "{answered}/{probes}");
    assert_probes_kept_in(answered, probes, "while scrapers asked without pause");
}

/// The cgroup `dns-proxy exec` made for its command, from its log.
fn exec_cgroup_of(agent: &Agent) -> std::path::PathBuf {
    let log = agent.log();
    let line = log
        .lines()
        .find(|line| line.contains("started [") && line.contains(" in "))
        .unwrap_or_else(|| panic!("no `started` line in:\n{log}"));
    let path = line.rsplit(" in ").next().expect("a path").trim();
    std::path::PathBuf::from(path)
}

#[test]
fn exec_redirects_its_command_only_and_exits_with_its_status() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let server = format!("{SERVER_IP}:53");
    // The command asks, then waits for a mark file so the test can ask from outside meanwhile.
    let mark = std::env::temp_dir().join(format!("{}-exec-mark", topology.tag));
    let script = format!(
        "{PROBE} sendto {server} inside.example.test && \
         while [ ! -e {mark} ]; do sleep 0.05; done; exit 7",
        mark = mark.display()
    );
    let mut agent = Agent::exec(&topology.client, &[], &["sh", "-c", &script]);
    forwarded(&agent, "inside.example.test");
    let cgroup = exec_cgroup_of(&agent);
    assert!(cgroup.is_dir(), "{}", cgroup.display());
    assert!(
        cgroup.starts_with(cgroup2_root()),
        "{} is not a cgroup",
        cgroup.display()
    );

    // A process of the same namespace, outside the command's cgroup: not redirected.
    let outside = must(&mut topology.outsider(PROBE, &["sendto", &server, "outside.example.test"]));
    assert_eq!(
        String::from_utf8_lossy(&outside.stdout).trim(),
        expected_probe_line()
    );
    fs::write(&mark, "").expect("write the mark");
    let (status, stdout) = agent.wait_with_stdout(Duration::from_secs(15));
    let _ = fs::remove_file(&mark);
    assert_eq!(status.code(), Some(7), "{}", agent.log());
    assert_eq!(stdout.trim(), expected_probe_line());
    assert!(agent.query_line("outside.example.test").is_none());
    assert_eq!(agent.answered_queries(), 1, "{}", agent.log());
    assert!(!cgroup.exists(), "{} was left behind", cgroup.display());
    // Its own port: a running agent on the usual port is not in the way.
    assert!(!agent.log().contains(PROXY_LISTEN), "{}", agent.log());
}

/// `exec`'s agent moved into its command's cgroup while its own is removed: it cannot go
/// back, and its command's lookups through it may loop. It stops the command (SIGTERM) and
/// exits with an error. Before, it went on until the command exited, and an adversary's
/// command lost 30 lookups of 30 to loops.
#[test]
fn an_exec_agent_that_cannot_go_back_to_its_cgroup_stops_its_command_and_fails() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    // Started from a cgroup of this test's, so that its own cgroup is this test's to remove.
    let start = child_cgroup(&topology, "start");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(&start)
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.client.name))
        .arg("--")
        .arg(agent_binary())
        .args(["exec", "--", "sleep", "30"])
        .env("DNS_PROXY_STATE_DIR", topology.client.state_dir())
        .env("RUST_LOG", "info,dns_proxy=debug")
        .stdout(Stdio::null());
    let mut agent = Agent::spawn(command);
    wait_for_log(&agent, "started [");
    let command_cgroup = exec_cgroup_of(&agent);
    let own = start.join("dns-proxy-agent");
    let pid = agent.process().id().to_string();
    wait_for(
        "the agent's cgroup to be removed while it is out",
        Duration::from_secs(10),
        || {
            fs::write(command_cgroup.join("cgroup.procs"), &pid).expect("move the agent");
            fs::remove_dir(&own).ok()
        },
    );
    // Well before the command's 30 s.
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "{status}: {}", agent.log());
    assert!(
        agent.log().contains("stopping the command"),
        "{}",
        agent.log()
    );
}

/// `exec` passes SIGHUP and the other signals it has no use for on to its command, as a
/// wrapper should: a `kill -HUP` meant to reload the command reaches it. Before, SIGHUP was
/// logged and dropped, and SIGUSR1 was dropped too.
#[test]
fn exec_passes_the_signals_it_has_no_use_for_on_to_its_command() {
    let topology = Topology::new();
    // The command ends on its own after 30 s, should its agent die and leave it behind.
    let mark = std::env::temp_dir().join(format!("{}-exec-traps", topology.tag));
    let script = format!(
        "trap 'echo hup' HUP; trap 'echo usr1; exit 3' USR1; touch {mark}; \
         i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done",
        mark = mark.display()
    );
    let mut agent = Agent::exec(&topology.client, &[], &["sh", "-c", &script]);
    wait_for("the command's traps", Duration::from_secs(15), || {
        mark.exists().then_some(())
    });
    let _ = fs::remove_file(&mark);
    agent.process().signal(libc::SIGHUP);
    wait_for_log(&agent, "SIGHUP: passing it on to the command");
    agent.process().signal(libc::SIGUSR1);
    let (status, stdout) = agent.wait_with_stdout(Duration::from_secs(15));
    assert_eq!(status.code(), Some(3), "{}", agent.log());
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["hup", "usr1"]);
}

#[test]
fn exec_reports_a_missing_command_like_env_does() {
    let topology = Topology::new();
    let mut agent = Agent::exec(&topology.client, &[], &["/nonexistent/command"]);
    let (status, _) = agent.wait_with_stdout(Duration::from_secs(15));
    assert_eq!(status.code(), Some(127), "{}", agent.log());
    assert!(
        agent
            .log()
            .contains("dns-proxy: error: cannot run \"/nonexistent/command\""),
        "{}",
        agent.log()
    );
}

/// A burst of refusals is said whole in the log: the rate-limited line says its first, and
/// what it held back is said once that line is 10 s old, or at stop. Before, the rest of a
/// burst that ended went unsaid (the metrics alone kept it).
#[test]
fn a_burst_of_refusals_is_said_whole_in_the_log() {
    let Harness {
        topology, agent, ..
    } = &mut Harness::start(Placement::Outside, &["--max-tcp-connections-per-client=1"]);
    // One connection held, then 20 more tried: each is refused (closed at once).
    let script = "import socket, sys\n\
                  held = socket.create_connection((sys.argv[1], 53))\n\
                  refused = 0\n\
                  for _ in range(20):\n    \
                      s = socket.create_connection((sys.argv[1], 53))\n    \
                      s.settimeout(5)\n    \
                      try:\n        \
                          refused += s.recv(1) == b''\n    \
                      except ConnectionResetError:\n        \
                          refused += 1\n\
                  print('refused', refused)";
    let output = must(&mut topology.workload("python3", &["-c", script, &SERVER_IP.to_string()]));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "refused 20");
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let log = agent.log();
    let first = "connections of clients at their limits (this one and any other) refused";
    assert!(
        log.contains(&format!("its next one refused; 1 {first}")),
        "{log}"
    );
    assert!(
        log.contains(
            "19 more TCP connections of clients at --max-tcp-connections-per-client refused \
             since the last such lines"
        ),
        "{log}"
    );
}

/// A second SIGTERM or SIGINT during the drain (an operator's second Ctrl-C) stops the agent
/// at once, where it waited out --shutdown-timeout for a lookup its server never answers
/// (helper-88); the programs are detached all the same.
#[test]
fn a_second_stop_signal_cuts_the_drain_short() {
    let topology = Topology::new();
    let (mut agent, _held) = agent_with_a_lookup_held(&topology);
    stop_to_drain(&mut agent);
    let started = Instant::now();
    agent.process().signal(libc::SIGINT);
    let status = agent.wait_exit(Duration::from_secs(10));
    let log = agent.log();
    // Not the drain: the lookup would have held it 20 s (its upstream timeout).
    assert!(started.elapsed() < Duration::from_millis(4500), "{log}");
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(log.contains("SIGINT again: stopping at once"), "{log}");
    assert!(log.contains("detaching all programs"), "{log}");
}

/// An empty or blank `DNS_PROXY_*` variable, as a line `DNS_PROXY_EXCLUDE_CGROUPS=` left in
/// /etc/default/dns-proxy gives, is the flag not given: the agent starts and serves. Before,
/// each was a usage error (exit 2), a restart loop under `Restart=always`; a blank one (a
/// space, a tab) still was after empty ones were fixed.
#[test]
fn empty_settings_in_the_environment_are_the_defaults() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let empty = [
        ("DNS_PROXY_EXCLUDE_CGROUPS", ""),
        ("DNS_PROXY_EXCLUDE_SERVERS", ""),
        ("DNS_PROXY_TAKEOVER", ""),
        ("DNS_PROXY_UPSTREAM", " "),
        ("DNS_PROXY_CACHE_SIZE", "\t"),
        ("DNS_PROXY_METRICS", "  "),
        ("DNS_PROXY_MAX_INFLIGHT", "\u{b}"),
        ("DNS_PROXY_SHUTDOWN_TIMEOUT", "\"\""),
    ];
    let _agent = Agent::start_with_env(&topology, &[], &empty);
    assert_eq!(
        probe(&topology, "sendto", "empty-settings.example.test"),
        expected_probe_line()
    );
}

/// A list in the environment is read as a person writes it: spaces around its items and an
/// empty item (a trailing comma) are not usage errors (each was exit 2, a restart loop under
/// `Restart=always`; helper-139). The items are all taken.
#[test]
fn lists_in_the_environment_take_spaces_and_a_trailing_comma() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let excluded = topology.cgroup.path.join("excluded");
    let excluded = excluded.display();
    // Spaces on either side of a comma, and the newline a YAML block scalar leaves.
    let cgroups = format!(" {excluded} , {excluded}-too,\n");
    let servers = format!("{SECOND_SERVER_IP}, 198.51.100.0/24 ,");
    let env = [
        ("DNS_PROXY_EXCLUDE_CGROUPS", cgroups.as_str()),
        ("DNS_PROXY_EXCLUDE_SERVERS", servers.as_str()),
    ];
    let agent = Agent::start_with_env(&topology, &[], &env);
    let log = agent.log();
    assert!(
        log.contains(&format!("\"{excluded}\", \"{excluded}-too\"")),
        "{log}"
    );
    assert!(log.contains(&SECOND_SERVER_IP.to_string()), "{log}");
    assert!(log.contains("198.51.100.0/24"), "{log}");
    assert_eq!(
        probe(&topology, "sendto", "listed-settings.example.test"),
        expected_probe_line()
    );
}

/// An agent whose background tasks fail stops with an error, to be started anew, rather than
/// serving on without its heartbeat, its watch on the cgroups and its forgetting while it says
/// it is well. Here it starts at its task limit (`pids.max` 3), so the threads their blocking
/// work runs on cannot start. Before, it ran on with them dead, `/readyz` and `/healthz` 200;
/// once another agent took it for gone, its own answers were dropped (helper-122).
#[test]
fn an_agent_whose_background_tasks_fail_stops_with_an_error() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let limited = V1Cgroup::new("pids", &format!("{}-pids", topology.tag), "pids.max", 3);
    let mut command = Agent::command_through(&topology, limited.enter_and_exec());
    command.env("RUST_LOG", "info").stderr(Stdio::piped());
    let mut agent = Process::spawn(&mut command);
    let (status, log) = agent.wait_exit_with_stderr(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("stopping the agent, to be started anew"),
        "{log}"
    );
}

/// Another root process detaches one of the agent's programs from its cgroup (`bpftool link
/// detach`): lookups would go direct, unseen. The agent sees it within a second or two, says
/// so, and stops with an error, for its service manager to start it anew, which attaches
/// again. Before, it said ready for over a minute, and nothing was logged (helper-129).
#[test]
fn an_agent_whose_programs_another_process_detaches_stops_with_an_error() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[]);
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(
        &fs::metadata(&topology.cgroup.path).expect("the redirected cgroup"),
    );
    // The agent's links to the cgroup, from its descriptors.
    let fdinfo = format!("/proc/{}/fdinfo", agent.process().id());
    let links: Vec<String> = fs::read_dir(&fdinfo)
        .expect("the agent's fdinfo")
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| {
            info.contains("link_type:\tcgroup")
                && info.contains(&format!("cgroup_id:\t{cgroup_id}\n"))
        })
        .filter_map(|info| {
            let line = info.lines().find(|line| line.starts_with("link_id:"))?;
            Some(line.split_once(':')?.1.trim().to_owned())
        })
        .collect();
    assert!(links.len() >= 4, "the agent's cgroup links: {links:?}");
    must(Command::new("bpftool").args(["link", "detach", "id", &links[0]]));
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(
        agent.log().contains("by another process (links ["),
        "{}",
        agent.log()
    );
}

/// While the agent loads its programs, the kernel's verifier works in memory charged to the
/// agent's memory cgroup, so a memory limit sized from a running agent (about 16 MiB) must also
/// let it start. Here a fresh host-mode agent starts under 56 MiB and answers. Before, the
/// verifier walked `connect6` three times over (167k instructions, 45 MB): the agent was
/// killed loading it under 56 and 60 MiB and started under 64.
#[test]
fn an_agent_starts_and_answers_under_a_56_mib_memory_limit() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let limited = V1Cgroup::new(
        "memory",
        &format!("{}-memory", topology.tag),
        "memory.limit_in_bytes",
        56 << 20,
    );
    let _agent = Agent::spawn(Agent::command_through(&topology, limited.enter_and_exec()));
    assert_eq!(
        probe(&topology, "sendto", "within-a-memory-limit.example.test"),
        expected_probe_line()
    );
}

/// A cgroup of a v1 controller (this machine's hybrid layout binds the controllers there) with
/// one limit set; its processes killed and it removed when dropped.
struct V1Cgroup(std::path::PathBuf);

impl V1Cgroup {
    fn new(controller: &str, name: &str, limit: &str, value: u64) -> Self {
        let root = Path::new("/sys/fs/cgroup").join(controller);
        assert!(
            root.is_dir(),
            "this test needs the cgroup v1 {controller} controller at {}",
            root.display()
        );
        let path = root.join(name);
        fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        let cgroup = Self(path);
        fs::write(cgroup.0.join(limit), value.to_string())
            .unwrap_or_else(|err| panic!("set {limit}: {err}"));
        cgroup
    }

    /// A wrapper for [`Agent::command_through`] that moves itself into this cgroup and execs
    /// what follows its `--`.
    fn enter_and_exec(&self) -> Command {
        let mut wrapper = Command::new("sh");
        wrapper
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && shift && exec "$@""#)
            .arg(&self.0);
        wrapper
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        let procs = fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|line| line.trim().parse::<i32>().ok())
        {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Not wait_for, which panics: a test failing already would abort.
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Signals an operator's tools send to daemons (a log rotation's `kill -USR1`) neither stop
/// the agent nor lose a lookup: each is logged and ignored, as SIGHUP is without a dnstap file.
/// Before, each killed it at once, without a drain or a word.
#[test]
fn signals_the_agent_has_no_use_for_are_ignored_not_fatal() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[]);
    let last_real_time = format!("SIGRTMIN+{}", libc::SIGRTMAX() - libc::SIGRTMIN());
    for (signal, name) in [
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGRTMIN(), "SIGRTMIN"),
        (libc::SIGRTMAX(), last_real_time.as_str()),
    ] {
        agent.process().signal(signal);
        wait_for_log(&agent, &format!("{name} ignored"));
        let lookup = format!(
            "after-{}.example.test",
            name.to_ascii_lowercase().replace('+', "-")
        );
        assert_eq!(probe(&topology, "sendto", &lookup), expected_probe_line());
    }
    agent.process().signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
}

/// A server in the server namespace that answers after [`SLOW_DELAY_MS`], so lookups are in
/// flight at every moment, whenever an agent stops.
fn slow_upstream(topology: &Topology) -> Process {
    topology.add_server_address(SLOW_SERVER_IP.parse().unwrap());
    let listen = format!("{SLOW_SERVER_IP}:53");
    let mut command = topology.server.command(TEST_UPSTREAM);
    command.args([&listen, SLOW_DELAY_MS, &ANSWER_IP.to_string()]);
    Process::spawn(&mut command)
}

/// steady-lookups as a workload against the slow upstream: four streams, each a lookup every
/// 2 ms, `try_ms` per try and three tries, until its standard input closes.
fn steady_lookups(topology: &Topology, try_ms: u32) -> Process {
    let server = format!("{SLOW_SERVER_IP}:53");
    let try_ms = try_ms.to_string();
    let mut command = topology.workload(STEADY, &[&server, &try_ms, "3", "2", "4"]);
    command.stdin(Stdio::piped()).stdout(Stdio::piped());
    Process::spawn(&mut command)
}

/// Waits until the agent has answered at least `count` queries.
fn wait_answered(agent: &Agent, count: usize) {
    wait_for(
        &format!("the agent to answer {count} lookups"),
        Duration::from_secs(10),
        || (agent.answered_queries() >= count).then_some(()),
    );
}

/// What happened to a steady stream of lookups while its agent was stopped and another started.
struct Restart {
    lookups: u64,
    retried: u64,
    failed: u64,
    answered_by_first: usize,
    answered_by_second: usize,
}

/// Runs the slow upstream, an agent and a steady stream of lookups; stops the agent with
/// `signal`, waits `gap` (the lookups go on, straight to the server), starts a new agent the
/// same way, with no clean-up in between, and counts every lookup's outcome.
fn restart_under_load(signal: i32, gap: Duration, try_ms: u32) -> Restart {
    let topology = Topology::new();
    let _server = slow_upstream(&topology);
    let mut first = Agent::start(&topology, &[]);
    let mut load = steady_lookups(&topology, try_ms);
    wait_answered(&first, 100);

    first.process().signal(signal);
    let status = first.wait_exit(Duration::from_secs(15));
    if signal == libc::SIGTERM {
        assert!(status.success(), "{status}:\n{}", first.log());
    }
    std::thread::sleep(gap);
    let second = Agent::start(&topology, &[]);
    wait_answered(&second, 100);

    let line = load.finish_with_stdout(Duration::from_secs(10));
    eprintln!("across a restart (signal {signal}): {}", line.trim());
    let [lookups, _first_try, retried, failed] = steady_outcome(&line);
    assert!(lookups >= 100, "only {lookups} lookups");
    Restart {
        lookups,
        retried,
        failed,
        answered_by_first: first.answered_queries(),
        answered_by_second: second.answered_queries(),
    }
}

#[test]
fn a_graceful_restart_under_steady_lookups_loses_none() {
    // Tries of 3 s: a lost datagram is never answered, and a loaded machine's delays are not
    // taken for one.
    let restart = restart_under_load(libc::SIGTERM, Duration::from_millis(500), 3000);
    // Not even a first try: what was in flight was answered before the agent let go.
    assert_eq!((restart.failed, restart.retried), (0, 0));
    // Some went direct in the gap: fewer answered through the agents than were made.
    assert!(((restart.answered_by_first + restart.answered_by_second) as u64) < restart.lookups);
}

#[test]
fn after_sigkill_lookups_go_direct_and_a_restarted_agent_takes_over() {
    // Tries of 1 s: the retries of the lookups in flight at the kill come within the gap.
    let restart = restart_under_load(libc::SIGKILL, Duration::from_millis(1500), 1000);
    // A lookup in flight at the kill loses its first try (its answer had nowhere to go); the
    // retry, from a new socket, goes direct. Nothing fails.
    assert_eq!(restart.failed, 0);
    assert!(
        restart.retried <= 4,
        "{} lookups needed a retry (4 streams)",
        restart.retried
    );
    // Fail-open: lookups were answered while no agent ran.
    assert!(((restart.answered_by_first + restart.answered_by_second) as u64) < restart.lookups);
}

/// A connected socket asking as fast as it is answered, across a SIGKILL and a start: every
/// datagram sent after the kill is answered or refused, none is left unanswered. Before, the
/// starting agent held its port on every address before its `sk_lookup` steered the block,
/// and what reached the block meanwhile (about 40 ms) met the hold, which takes nothing
/// (helper-181: one lookup lost by each of 20 sockets). The port, 8053, is one the agent
/// holds.
#[test]
fn a_starting_agent_refuses_what_reaches_the_block_before_it_steers_it_and_loses_none() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut first = Agent::start(&topology, &[]);
    let client = Process::spawn(
        topology
            .workload(
                "/usr/bin/python3",
                &["-c", ASKS_AND_TELLS, &SERVER_IP.to_string(), "7"],
            )
            .stdout(Stdio::piped()),
    );
    wait_answered(&first, 20);
    first.process().signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(5));
    // What the killed agent had is lost with it: only what is sent from here on counts. The
    // lookup it had is given up 2 s on; the client is refused from then on.
    client.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(2500));
    let second = Agent::start(&topology, &[]);
    let [answered, refused, lost] = asked_and_told(client);
    assert_eq!(lost, 0, "{}", second.log());
    assert!(refused > 0, "no refusal between the agents");
    assert!(
        answered > 0 && second.answered_queries() > 0,
        "{}",
        second.log()
    );
}

/// Connected sockets, one asking as fast as it is answered and six every 0.8 s, while the agent
/// stops with no other to take over: the first keeps the drain busy to its end, and every
/// lookup each sends is answered (by the draining agent) or refused (once it has let go of
/// the block), none left unanswered. Before, a UDP thread whose clients had been quiet for
/// 300 ms ended its drain while `sk_lookup` still steered them to its listener, which read
/// nothing more; and the listeners stopped reading at the shutdown deadline, when what was
/// queued or in flight was lost too (helper-181: 1 to 5 of 20 sockets lost a lookup in about
/// 3 stops of 9).
#[test]
fn a_stop_with_no_agent_to_take_over_answers_or_refuses_every_lookup() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[]);
    let server = SERVER_IP.to_string();
    let clients: Vec<Process> = ["0.002", "0.8", "0.8", "0.8", "0.8", "0.8", "0.8"]
        .into_iter()
        .map(|pause| {
            let args = ["-c", ASKS_AND_TELLS, &server, "10", pause];
            Process::spawn(
                topology
                    .workload("/usr/bin/python3", &args)
                    .stdout(Stdio::piped()),
            )
        })
        .collect();
    wait_answered(&agent, 20);
    for client in &clients {
        client.signal(libc::SIGUSR1);
    }
    agent.process().signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let counts: Vec<[u64; 3]> = clients.into_iter().map(asked_and_told).collect();
    let lost: u64 = counts.iter().map(|[_, _, lost]| lost).sum();
    assert_eq!(lost, 0, "{counts:?}\n{}", agent.log());
    let [answered, refused] = [0, 1].map(|i| counts.iter().map(|count| count[i]).sum::<u64>());
    assert!(answered > 0 && refused > 0, "{counts:?}\n{}", agent.log());
    assert!(
        agent
            .log()
            .contains("what is sent to the block is refused from now on"),
        "{}",
        agent.log()
    );
}

/// Two sockets ask a server that answers in 0.5 s, and read their answers 1.3 s on, while the
/// agent stops 0.1 s after they asked, with no other to take over: each answer still comes
/// from the server (`recvfrom`, and the connected one's `getpeername`). The agent drains until
/// its listeners have been quiet for 300 ms with nothing in flight, then used to detach every
/// program at once, and an answer read after that showed the block's address, which a strict
/// resolver drops (helper-192: 139 of 139 answers so in node mode, 150 of 150 in host mode; a
/// stopped musl client took 3.0 s against 1.6 s without the agent).
#[test]
fn an_answer_read_late_after_a_stop_comes_from_its_server() {
    let topology = Topology::new();
    topology.add_server_address(SLOW_SERVER_IP.parse().unwrap());
    let listen = format!("{SLOW_SERVER_IP}:53");
    let answer = ANSWER_IP.to_string();
    let _server = Process::spawn(
        topology
            .server
            .command(TEST_UPSTREAM)
            .args([&listen, "500", &answer]),
    );
    let mut agent = Agent::start(&topology, &[]);
    let mut client = Process::spawn(
        topology
            .workload(
                "/usr/bin/python3",
                &["-c", READS_LATE, SLOW_SERVER_IP, "1.3"],
            )
            .stdout(Stdio::piped()),
    );
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(client.take_stdout()));
    let mut next_line = || lines.next().expect("a line").expect("its output");
    assert_eq!(next_line(), "sent");
    std::thread::sleep(Duration::from_millis(100));
    agent.process().signal(libc::SIGTERM);
    let server = format!("{SLOW_SERVER_IP}:53");
    for what in [
        "unconnected recvfrom",
        "connected recvfrom",
        "connected getpeername",
    ] {
        assert_eq!(next_line(), format!("{what} {server}"), "{}", agent.log());
    }
    assert!(client.wait_exit(Duration::from_secs(5)).success());
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    assert!(
        agent.log().contains("answers' servers are shown for"),
        "{}",
        agent.log()
    );
}

/// Sends a query to `argv[1]`:53 from an unconnected and from a connected UDP socket, says
/// `sent`, sleeps `argv[2]` seconds, then prints where each answer came from.
const READS_LATE: &str = r#"
import socket, struct, sys, time
name = b"\x04late\x07example\x04test\x00"
query = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"
unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
unconnected.sendto(query, (sys.argv[1], 53))
connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
connected.connect((sys.argv[1], 53))
connected.send(query)
print("sent", flush=True)
time.sleep(float(sys.argv[2]))
for what, s in [("unconnected", unconnected), ("connected", connected)]:
    s.settimeout(3)
    _, source = s.recvfrom(512)
    print(f"{what} recvfrom {source[0]}:{source[1]}", flush=True)
peer = connected.getpeername()
print(f"connected getpeername {peer[0]}:{peer[1]}", flush=True)
"#;

/// Waits for [`ASKS_AND_TELLS`] to end; its counts: answered, refused, lost.
fn asked_and_told(mut client: Process) -> [u64; 3] {
    let output = client.finish_with_stdout(Duration::from_secs(30));
    eprintln!("{output}");
    let last = output.lines().last().unwrap_or_default();
    ["answered", "refused", "lost"].map(|word| {
        last.split_whitespace()
            .find_map(|field| field.strip_prefix(word)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {word} in {output}"))
    })
}

/// A UDP socket connected to `argv[1]`:53 that asks a name for `argv[2]` seconds, one after
/// another, `argv[3]` seconds apart (2 ms if not given), each until answered, refused
/// (`ECONNREFUSED`) or 2 s have passed (lost). Counts the lookups sent after its SIGUSR1, and
/// prints each loss and then `answered=N refused=N lost=N`.
const ASKS_AND_TELLS: &str = r#"
import signal, socket, struct, sys, time
counting = False
def count_from_now(*_):
    global counting
    counting = True
signal.signal(signal.SIGUSR1, count_from_now)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 53))
s.settimeout(2)
name = b"\x04fast\x07example\x04test\x00"
start = time.monotonic()
answered = refused = lost = i = 0
while time.monotonic() - start < float(sys.argv[2]):
    i += 1
    counted = counting
    query = struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"
    try:
        s.send(query)
        while s.recv(512)[:2] != query[:2]:
            pass
        answered += counted
    except ConnectionRefusedError:
        refused += counted
    except socket.timeout:
        lost += counted
        print(f"lost {i} at {time.monotonic() - start:.3f} s (counted: {counted})", flush=True)
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0.002)
print(f"answered={answered} refused={refused} lost={lost}", flush=True)
"#;

/// The capabilities a deployment file grants, from `CapabilityBoundingSet=` (systemd) or the
/// container's `capabilities.add` (Kubernetes), as lower-case names without `cap_`.
fn granted_capabilities(file: &str) -> Vec<String> {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file))
        .unwrap_or_else(|err| panic!("{file}: {err}"));
    let list = text
        .lines()
        .find_map(|line| {
            let line = line.trim();
            line.strip_prefix("CapabilityBoundingSet=")
                .map(|caps| {
                    caps.split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .or_else(|| {
                    let caps = line.strip_prefix("add: [")?.strip_suffix(']')?;
                    caps.split(',')
                        .map(|cap| cap.trim().trim_matches('"').to_owned())
                        .collect::<Vec<_>>()
                        .into()
                })
                // The init container's single NET_ADMIN is not the agent's list.
                .filter(|caps| caps.len() > 1)
        })
        .unwrap_or_else(|| panic!("no capability list in {file}"));
    let mut caps: Vec<String> = list
        .iter()
        .map(|cap| cap.to_lowercase().trim_start_matches("cap_").to_owned())
        .collect();
    caps.sort();
    caps
}

#[test]
fn the_agent_works_with_only_the_capabilities_the_deployments_grant() {
    let systemd = granted_capabilities("deploy/systemd/dns-proxy.service");
    let kubernetes = granted_capabilities("deploy/kubernetes/dns-proxy.yaml");
    assert_eq!(
        systemd, kubernetes,
        "the two deployments grant different sets"
    );

    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let bounding: Vec<String> = systemd.iter().map(|cap| format!("+{cap}")).collect();
    let mut command = topology.client.nsenter();
    command
        .arg("setpriv")
        .arg("--no-new-privs")
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg("--inh-caps=-all")
        .arg(agent_binary())
        .arg("run")
        .arg(format!("--cgroup={}", topology.cgroup.path.display()))
        // Port 53, as on a node.
        .arg("--listen=127.0.0.1:53")
        // A service not started yet, whose cgroup the kernel excludes as it is made: a
        // tracing program, which needs PERFMON too.
        .arg(format!(
            "--exclude-cgroup={}",
            topology.cgroup.path.join("resolver.service").display()
        ))
        .env("RUST_LOG", "info,dns_proxy=debug")
        .stdout(Stdio::null());
    let agent = Agent::spawn(command);
    let name = "capabilities.example.test";
    assert_eq!(probe(&topology, "sendto", name), expected_probe_line());
    forwarded(&agent, name);
    assert!(
        agent.log().contains("attached dns_proxy_exclude_made"),
        "{}",
        agent.log()
    );
}

/// TCP lookups over fresh connections, one after another, across 20 graceful restarts: every
/// one is answered (by the agent, by the draining one, or directly while none runs).
#[test]
fn tcp_lookups_across_twenty_graceful_restarts_are_all_answered() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut agent = Agent::start(&topology, &[]);
    let hostile = env!("CARGO_BIN_EXE_hostile-client");
    let mut client = tests::Process::spawn(
        topology
            .workload(
                hostile,
                &[
                    "tcp-lookups",
                    &format!("{SERVER_IP}:53"),
                    "restarts.example.test",
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut served = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        agent.process().signal(libc::SIGTERM);
        assert!(agent.wait_exit(Duration::from_secs(10)).success());
        served += agent.answered_queries();
        agent = Agent::start(&topology, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let outcome = client.finish_with_stdout(Duration::from_secs(10));
    served += agent.answered_queries();
    let fields: Vec<u64> = outcome
        .split_whitespace()
        .filter_map(|field| field.split_once('=')?.1.parse().ok())
        .collect();
    let [answered, failed] = fields[..] else {
        panic!("{outcome}");
    };
    assert_eq!(failed, 0, "{outcome}");
    assert!(answered > 100, "{outcome}");
    assert!(served > 50, "the agents served {served} of {answered}");
}

/// Restarts `agent` `count` times by takeover, as a DaemonSet with `maxSurge: 1` does: a
/// new agent with `--takeover` beside the old one; once the new one serves, and `/readyz`
/// shows both (the new one ready, the old one replaced), SIGTERM to the old one, which must
/// exit 0. Returns the stopped agents' logs, and the last agent, still serving.
fn restart_by_takeover(
    mut agent: Agent,
    count: usize,
    start: impl Fn() -> Agent,
    readyz: impl Fn() -> (u16, String),
) -> (Vec<String>, Agent) {
    let mut logs = Vec::new();
    std::thread::sleep(Duration::from_millis(1000));
    for _ in 0..count {
        assert_eq!(readyz(), (200, "ready\n".to_owned()), "{}", agent.log());
        let next = start();
        assert!(next.log().contains("taking over from it"), "{}", next.log());
        // Both listen on the metrics port now, and sk_lookup hands its connections to the
        // newest: every probe is the new agent's, 503 until it is ready.
        wait_for("the new agent ready", Duration::from_secs(10), || {
            (0..16)
                .all(|_| readyz() == (200, "ready\n".to_owned()))
                .then_some(())
        });
        agent.process().signal(libc::SIGTERM);
        let status = agent.wait_exit(Duration::from_secs(15));
        assert!(status.success(), "{status}:\n{}", agent.log());
        logs.push(agent.log());
        agent = next;
        std::thread::sleep(Duration::from_millis(1000));
    }
    // The last one serves alone, and says it is ready.
    wait_for("the last agent alone", Duration::from_secs(5), || {
        (0..8)
            .all(|_| readyz() == (200, "ready\n".to_owned()))
            .then_some(())
    });
    (logs, agent)
}

/// A long-lived connected socket's lookups (`hostile-client long-lived`): one every 100 ms,
/// retried once after 3 s on the same socket (a lost datagram is never answered: a loaded
/// machine's delays are not taken for one).
fn long_lived_args(prefix: &str, count: usize) -> Vec<String> {
    [
        "long-lived",
        &format!("{SERVER_IP}:53"),
        prefix,
        &count.to_string(),
        "100",
        "3000",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What the clients of a takeover test must show: every long-lived lookup answered on its
/// first try, every TCP lookup answered, and each long-lived lookup handled by exactly one
/// agent, once (an agent's upstream query sent round through another agent would be logged
/// twice).
fn assert_takeovers_lost_nothing(
    long_lived: Vec<(&str, Process)>,
    mut tcp: Process,
    count: usize,
    (logs, last): (Vec<String>, Agent),
) {
    let outputs: Vec<(&str, String)> = long_lived
        .into_iter()
        .map(|(prefix, mut client)| (prefix, client.finish_with_stdout(Duration::from_secs(60))))
        .collect();
    let all_logs = || {
        let mut all = logs.clone();
        all.push(last.log());
        all
    };
    for (prefix, output) in outputs {
        assert_long_lived_all_first_try(&output, prefix, count, all_logs);
    }
    let outcome = tcp.finish_with_stdout(Duration::from_secs(10));
    assert!(outcome.contains(" failed=0"), "{outcome}");
}

/// Host mode, agents inside the cgroup they redirect (so only the shared agent exclusion keeps
/// their own queries direct; both share the `dns-proxy-agent` cgroup): five restarts by
/// takeover, and no client notices.
#[test]
fn restarts_by_takeover_need_no_retry_in_host_mode() {
    const RESTARTS: usize = 5;
    const LOOKUPS: usize = 200;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let hostile = env!("CARGO_BIN_EXE_hostile-client");
    let start = || {
        Agent::start_at(
            &topology,
            Placement::InsideRedirectedCgroup,
            &["--takeover", &format!("--metrics={METRICS}")],
        )
    };
    let readyz = || http_get(&topology.client, METRICS.parse().unwrap(), "/readyz");
    let spawn = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Process::spawn(
            topology
                .workload(hostile, &args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )
    };
    // The first agent serves before the clients start: their sockets are sent to it.
    let first = start();
    let clients = vec![("host-ll", spawn(long_lived_args("host-ll", LOOKUPS)))];
    let tcp = spawn(
        // 5 ms apart: a fresh connection each, and ports in TIME_WAIT for a minute.
        [
            "tcp-lookups",
            &format!("{SERVER_IP}:53"),
            "takeover.example.test",
            "5",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    // Fresh UDP sockets as fast as they go, to a stub on this namespace's loopback (as
    // systemd-resolved's): each takeover meets datagrams on their way, and one read without
    // its arrival would be refused as another namespace's.
    let stub = std::net::Ipv4Addr::new(127, 0, 0, 53);
    let _stub = DnsServer::launch(&topology.client, &topology.client, stub, ANSWER_IP, false);
    let mut steady = Process::spawn(
        topology
            .workload(STEADY, &[&format!("{stub}:53"), "3000", "3", "0", "4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let agents = restart_by_takeover(first, RESTARTS, start, readyz);
    let line = steady.finish_with_stdout(Duration::from_secs(10));
    let [lookups, _, retried, failed] = steady_outcome(&line);
    assert!(lookups > 1000, "{line}");
    assert_eq!((retried, failed), (0, 0), "{line}");
    assert_takeovers_lost_nothing(clients, tcp, LOOKUPS, agents);
}

/// A connected socket's lookups of `prefix` (`hostile-client long-lived`), one every 20 ms:
/// a refusal costs it a 3 s retry.
fn connected_socket_asking_often(topology: &Topology, prefix: &str, count: usize) -> Process {
    let hostile = env!("CARGO_BIN_EXE_hostile-client");
    let args = [
        "long-lived",
        &format!("{SERVER_IP}:53"),
        prefix,
        &count.to_string(),
        "20",
        "3000",
    ];
    Process::spawn(
        topology
            .workload(hostile, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    )
}

/// An agent taking over, started and left to load: returned once its record is written,
/// before its programs are loaded.
fn agent_taking_over_still_starting(topology: &Topology) -> Agent {
    let args = [format!("--listen={PROXY_LISTEN}"), "--takeover".to_owned()];
    let mut agent = Agent::spawn_unready(Agent::command_with(topology, &args));
    wait_for("the new agent's record", Duration::from_secs(10), || {
        agent
            .log()
            .contains("nor any other agent's of this block")
            .then_some(())
    });
    // Held there, before it loads its programs, until [`stop_while_the_successor_starts`]:
    // left to run, it could steer the block before the older agent's stop looks (about
    // 300 ms, less on a loaded machine).
    agent.process().signal(libc::SIGSTOP);
    agent
}

/// Stops `older` while `newer` ([`agent_taking_over_still_starting`]) is held before it
/// steers: `older` says it waits for it; then lets `newer` go on, and waits for it to serve.
fn stop_while_the_successor_starts(older: &mut Agent, newer: &mut Agent) {
    older.process().signal(libc::SIGTERM);
    wait_for_log(older, WAITS_FOR_ITS_SUCCESSOR);
    newer.process().signal(libc::SIGCONT);
    newer.wait_until_serving();
}

/// Said by an agent stopped while one taking over from it is still starting.
const WAITS_FOR_ITS_SUCCESSOR: &str = "an agent taking over from this one does not steer the \
     block yet (still starting): serving until it does";

/// The agent being replaced is stopped while the one taking over still loads its programs (a
/// script that does not wait for readiness, a node drain): it serves on until the new one
/// steers the block. Before, it let go at once and a connected socket's lookups were refused
/// until the new one had loaded, about 300 ms (an adversarial review).
#[test]
fn an_agent_stopped_while_the_one_taking_over_starts_serves_until_that_one_steers() {
    const LOOKUPS: usize = 150;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let mut older = Agent::start(&topology, &[]);
    let mut client = connected_socket_asking_often(&topology, "handover", LOOKUPS);
    wait_answered(&older, 10);
    let mut newer = agent_taking_over_still_starting(&topology);
    stop_while_the_successor_starts(&mut older, &mut newer);
    assert!(older.wait_exit(Duration::from_secs(10)).success());
    let output = client.finish_with_stdout(Duration::from_secs(60));
    assert_long_lived_all_first_try(&output, "handover", LOOKUPS, || {
        vec![older.log(), newer.log()]
    });
    // It was stopped in the window: the new agent did not steer yet.
    assert!(
        older.log().contains(WAITS_FOR_ITS_SUCCESSOR),
        "{}",
        older.log()
    );
    let done = "the agent taking over steers the block: stopping";
    assert!(older.log().contains(done), "{}", older.log());
}

/// An agent with a lookup its upstream holds for a minute: stopped, it drains it for as long
/// as its upstream timeout (20 s), its record alive. With the upstream and the lookup, to be
/// held as long as the agent.
fn agent_with_a_lookup_held(topology: &Topology) -> (Agent, [Process; 2]) {
    let silent_ip = "192.0.2.6";
    topology.add_server_address(silent_ip.parse().unwrap());
    let mut command = topology.server.command(TEST_UPSTREAM);
    command.args([&format!("{silent_ip}:53"), "60000", &ANSWER_IP.to_string()]);
    let silent = Process::spawn(&mut command);
    let agent = Agent::start(
        topology,
        &[
            "--shutdown-timeout=30s",
            "--upstream-timeout=20s",
            &format!("--metrics={METRICS}"),
        ],
    );
    let mut lookup = topology.workload("dig", &[&format!("@{silent_ip}"), "held.example.test"]);
    let lookup = Process::spawn(&mut lookup);
    wait_for("the lookup in flight", Duration::from_secs(10), || {
        let page = scrape(topology);
        (value(&page, "dns_proxy_inflight_queries{protocol=\"udp\"}") >= 1).then_some(())
    });
    (agent, [silent, lookup])
}

/// Stops `agent` and returns once it drains.
fn stop_to_drain(agent: &mut Agent) {
    agent.process().signal(libc::SIGTERM);
    wait_for_log(agent, "answering those in flight");
}

/// Three agents: the first stopped alone and still draining (past the 3 s after which its
/// programs take it for stopped), the second taking over from it and serving, a third taking
/// over from the second while the second is stopped. The first, which serves no new lookup, is
/// not taken for one that steers the block: the second waits for the third. Before, it let go
/// at once and a connected socket's lookups were refused for 361 ms (an adversarial review).
#[test]
fn an_agent_that_only_drains_is_not_taken_for_one_that_steers_the_block() {
    const LOOKUPS: usize = 300;
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let (mut first, _held) = agent_with_a_lookup_held(&topology);
    stop_to_drain(&mut first);
    let draining = Instant::now();
    let mut second = Agent::start(&topology, &["--takeover"]);
    // Three sockets, whose ports the listeners' UDP threads share among them: a thread of the
    // first agent that holds no lookup has ended its drain, and answers nothing more.
    let clients: Vec<(String, Process)> = (0..3)
        .map(|i| {
            let prefix = format!("three{i}");
            let client = connected_socket_asking_often(&topology, &prefix, LOOKUPS);
            (prefix, client)
        })
        .collect();
    wait_answered(&second, 10);
    if let Some(rest) = Duration::from_millis(3500).checked_sub(draining.elapsed()) {
        std::thread::sleep(rest);
    }
    let mut third = agent_taking_over_still_starting(&topology);
    stop_while_the_successor_starts(&mut second, &mut third);
    assert!(second.wait_exit(Duration::from_secs(10)).success());
    let outputs: Vec<(String, String)> = clients
        .into_iter()
        .map(|(prefix, mut client)| (prefix, client.finish_with_stdout(Duration::from_secs(60))))
        .collect();
    let logs = || vec![first.log(), second.log(), third.log()];
    for (prefix, output) in outputs {
        assert_long_lived_all_first_try(&output, &prefix, LOOKUPS, logs);
    }
    assert!(first.process().exit_status().is_none(), "{}", first.log());
    assert!(
        second.log().contains(WAITS_FOR_ITS_SUCCESSOR),
        "{}",
        second.log()
    );
}

/// The agent that took over, stopped while the one it replaced still drains: that older one
/// is no agent taking over, and it stops at once. Before, it waited for it until its shutdown
/// deadline, and drained nothing then (an adversarial review).
#[test]
fn an_agent_stopped_while_the_one_it_replaced_drains_does_not_wait_for_it() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let (mut first, _held) = agent_with_a_lookup_held(&topology);
    let mut second = Agent::start(&topology, &["--takeover"]);
    stop_to_drain(&mut first);
    // It has let the second have the block.
    wait_for_log(&first, "the other agent gets what reaches the block");
    std::thread::sleep(Duration::from_millis(200));
    let stopping = Instant::now();
    second.process().signal(libc::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(10)).success());
    let took = stopping.elapsed();
    assert!(first.process().exit_status().is_none(), "{}", first.log());
    assert!(
        took < Duration::from_millis(4500),
        "{took:?}:\n{}",
        second.log()
    );
    assert!(
        !second.log().contains(WAITS_FOR_ITS_SUCCESSOR),
        "{}",
        second.log()
    );
}

/// Stopping the newer of two agents first (a surge pod rolled back): it lets the older one
/// have every new packet, answers what it has, and stops at once, not at its deadline; no
/// client notices, though every lookup is in flight for 50 ms.
#[test]
fn stopping_the_agent_that_took_over_hands_back_without_a_loss() {
    let topology = Topology::new();
    let _server = slow_upstream(&topology);
    let start = || Agent::start(&topology, &["--takeover"]);
    let older = start();
    // Tries of 3 s: a lost datagram is never answered, and a loaded machine's delays are not
    // taken for one.
    let mut load = steady_lookups(&topology, 3000);
    wait_answered(&older, 50);
    let mut newer = start();
    wait_answered(&newer, 50);
    let stopping = std::time::Instant::now();
    newer.process().signal(libc::SIGTERM);
    assert!(newer.wait_exit(Duration::from_secs(10)).success());
    let took = stopping.elapsed();
    // Not at the 5 s deadline (the log says so too).
    assert!(
        took < Duration::from_millis(4500),
        "stopped after {took:?}:\n{}",
        newer.log()
    );
    assert!(
        !newer.log().contains("at the shutdown deadline"),
        "{}",
        newer.log()
    );
    let served = older.answered_queries();
    wait_answered(&older, served + 50);
    let line = load.finish_with_stdout(Duration::from_secs(10));
    let [lookups, _, retried, failed] = steady_outcome(&line);
    assert!(lookups > 100, "{line}");
    assert_eq!((retried, failed), (0, 0), "{line}");
}

/// Node mode as the DaemonSet runs it with `maxSurge: 1`: each agent in a cgroup of its own
/// (a pod's), inside the tree it redirects, so only `AGENT_CGROUPS` keeps each agent's
/// upstream queries from being sent round through the other. Long-lived sockets in a pod and
/// on the node, and fresh TCP lookups from a pod, across five takeovers.
#[test]
fn restarts_by_takeover_need_no_retry_in_node_mode() {
    const RESTARTS: usize = 5;
    const LOOKUPS: usize = 200;
    let node = tests::node::NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    let hostile = env!("CARGO_BIN_EXE_hostile-client");
    let started = std::cell::Cell::new(0);
    let start = || {
        started.set(started.get() + 1);
        let pod = node
            .host_cgroup
            .join(format!("agent-pod-{}", started.get()));
        fs::create_dir(&pod).unwrap_or_else(|err| panic!("mkdir {}: {err}", pod.display()));
        let args = [
            format!("--listen={}:53", tests::node::NODE_LISTEN),
            "--takeover".to_owned(),
            format!("--metrics={METRICS}"),
        ];
        Agent::launch(&node.node, node.redirected_cgroup(), Some(&pod), &args)
    };
    let readyz = || http_get(&node.node, METRICS.parse().unwrap(), "/readyz");
    let spawn =
        |mut command: Command| Process::spawn(command.stdin(Stdio::piped()).stdout(Stdio::piped()));
    let first = start();
    fn as_strs(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    let (pod_args, node_args) = (
        long_lived_args("pod-ll", LOOKUPS),
        long_lived_args("node-ll", LOOKUPS),
    );
    let clients = vec![
        ("pod-ll", spawn(node.pod(0, hostile, &as_strs(&pod_args)))),
        ("node-ll", spawn(node.host(hostile, &as_strs(&node_args)))),
    ];
    let server = format!("{SERVER_IP}:53");
    let tcp = spawn(node.pod(
        1,
        hostile,
        &["tcp-lookups", &server, "takeover.example.test", "5"],
    ));
    let agents = restart_by_takeover(first, RESTARTS, start, readyz);
    assert_takeovers_lost_nothing(clients, tcp, LOOKUPS, agents);
}

/// `dns-proxy exec` shares the running agent's blocks and pinned maps, on a port of its own:
/// it takes nothing over. The running agent stays ready while it runs (and resolves for its
/// cgroup), and the exec agent's own queries are nobody's to redirect.
#[test]
fn an_exec_agent_beside_a_running_one_replaces_nothing() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let _agent = Agent::start(&topology, &[&format!("--metrics={METRICS}")]);
    let readyz = || http_get(&topology.client, METRICS.parse().unwrap(), "/readyz");
    assert_eq!(readyz(), (200, "ready\n".to_owned()));
    let server = format!("{SERVER_IP}:53");
    let script = format!("{PROBE} sendto {server} beside.example.test && sleep 5");
    let mut exec = Agent::exec(&topology.client, &[], &["sh", "-c", &script]);
    forwarded(&exec, "beside.example.test");
    // Past two heartbeats of both: the running agent would have seen a newer one by now.
    std::thread::sleep(Duration::from_millis(4500));
    for _ in 0..8 {
        assert_eq!(readyz(), (200, "ready\n".to_owned()), "{}", exec.log());
    }
    let (status, stdout) = exec.wait_with_stdout(Duration::from_secs(15));
    assert!(status.success(), "{status}: {}", exec.log());
    assert_eq!(stdout.trim(), expected_probe_line());
}

/// Host-mode agents in two network namespaces, of one block and port and sharing a state
/// dir (the default /sys/fs/bpf/dns-proxy, say), replace no one: `sk_lookup` steers within
/// one namespace. The one started first stays ready (it said "a newer agent has taken over"
/// while the other ran, from the other's heartbeat in the shared `AGENTS`), and both serve.
#[test]
fn agents_in_two_namespaces_sharing_a_state_dir_are_both_ready() {
    let first = Topology::new();
    let second = Topology::new();
    let _servers = (DnsServer::start(&first), DnsServer::start(&second));
    let _first_agent = Agent::start(&first, &[&format!("--metrics={METRICS}")]);
    let shared_state = format!("--state-dir={}", first.client.state_dir().display());
    let _second_agent = Agent::start(&second, &[&format!("--metrics={METRICS}"), &shared_state]);
    for topology in [&first, &second] {
        assert_eq!(
            http_get(&topology.client, metrics_addr(), "/readyz"),
            (200, "ready\n".to_owned()),
            "{}",
            topology.client.name
        );
        assert_eq!(
            probe(topology, "sendto", "both.example.test"),
            expected_probe_line()
        );
    }
}

/// The agent that took over is SIGKILLed (OOM, say): the one it replaced serves again at once
/// and says so on `/readyz` within a heartbeat, not once the killed one's record is stale
/// (30 s).
#[test]
fn when_the_agent_that_took_over_is_killed_the_one_before_is_ready_again_at_once() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let metrics = format!("--metrics={METRICS}");
    let _old = Agent::start(&topology, &[&metrics]);
    let mut new = Agent::start(&topology, &[&metrics, "--takeover"]);
    assert_eq!(
        http_get(&topology.client, metrics_addr(), "/readyz").0,
        200,
        "the new agent"
    );
    new.process().signal(libc::SIGKILL);
    new.wait_exit(Duration::from_secs(5));
    // Within a heartbeat or so (2 s, on a loaded machine more): well before the killed
    // one's record is stale (30 s).
    wait_for(
        "the old agent to be ready again",
        Duration::from_secs(10),
        || {
            (http_get(&topology.client, metrics_addr(), "/readyz") == (200, "ready\n".to_owned()))
                .then_some(())
        },
    );
    assert_eq!(
        probe(&topology, "sendto", "again.example.test"),
        expected_probe_line()
    );
}

/// Under systemd (`Type=notify`), the agent says READY=1 only once it serves redirected
/// lookups: a lookup made the moment the word arrives goes through the agent. It says
/// STOPPING=1 on SIGTERM, and a command run with `exec` is not given the manager's socket.
#[test]
fn the_service_manager_is_told_ready_once_lookups_are_redirected() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let notify = ManagerSocket::bind(&topology);
    let manager = notify.socket.try_clone().unwrap();
    // Waits for READY=1, then looks up a name at once: the lookup the first unit ordered
    // after the agent would make.
    let lookup = topology.workload("dig", &[]);
    let at_ready = std::thread::spawn(move || {
        let mut buffer = [0; 512];
        let length = manager.recv(&mut buffer).expect("READY=1 within 30 s");
        let first = String::from_utf8_lossy(&buffer[..length]).into_owned();
        let answer = dig(lookup, "at-ready.example.test", &[]);
        (manager, first, answer)
    });
    let notify = notify.path.to_str().unwrap();
    let mut agent = Agent::start_with_env(&topology, &[], &[("NOTIFY_SOCKET", notify)]);
    let (manager, first, answer) = at_ready.join().unwrap();
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert_answered(answer, "dig at READY=1");
    // Through the agent, not direct: it was attached when it said ready.
    forwarded(&agent, "at-ready.example.test");

    agent.process().signal(libc::SIGTERM);
    let mut buffer = [0; 512];
    let length = manager.recv(&mut buffer).expect("STOPPING=1 within 30 s");
    let stopping = String::from_utf8_lossy(&buffer[..length]).into_owned();
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    let status = agent.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}:\n{}", agent.log());

    let mut command = topology.client.nsenter();
    command
        .arg(agent_binary())
        .args([
            "exec",
            "--",
            "sh",
            "-c",
            "echo \"command sees ${NOTIFY_SOCKET:-no socket}\"",
        ])
        .env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped());
    let mut exec = Agent::spawn(command);
    let (status, stdout) = exec.wait_with_stdout(Duration::from_secs(15));
    assert!(status.success(), "{status}:\n{}", exec.log());
    assert_eq!(stdout.trim(), "command sees no socket", "{}", exec.log());
    // The exec agent told the manager too.
    let length = manager.recv(&mut buffer).expect("READY=1 from exec");
    assert!(buffer[..length].starts_with(b"READY=1\n"));
}

/// A UDP thread that stops running (held here by ptrace, as a bug that blocked it would hold
/// it) turns the redirect off, so lookups go direct, and `/readyz` 503 at once; after 30 s
/// `/healthz` turns 503 and systemd's watchdog is no longer fed, so that Kubernetes or systemd
/// restart the agent. Once the thread runs again, all comes back.
#[test]
fn a_wedged_udp_thread_fails_open_and_has_the_agent_restarted() {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let notify = ManagerSocket::bind(&topology);
    let path = notify.path.to_str().unwrap();
    let mut agent = Agent::start_with_env(
        &topology,
        &[&format!("--metrics={METRICS}"), "--udp-threads=2"],
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "2000000")],
    );
    let fed = |messages: &[String]| messages.iter().any(|m| m.starts_with("WATCHDOG=1"));
    // Fed every second (half of WATCHDOG_USEC) while all is well.
    assert!(fed(&notify.messages_for(Duration::from_millis(2500))));
    let probe = |path| tests::http_get(&topology.client, metrics_addr(), path);

    let held = HeldThread::seize(agent.process().id(), "dns-proxy-udp-0");
    wait_for(
        "/readyz to say the thread is wedged",
        Duration::from_secs(5),
        || {
            let (status, body) = probe("/readyz");
            (status == 503 && body.contains("UDP thread 0 has not run")).then_some(())
        },
    );
    // Within 3 s more the programs take the agent for stopped: lookups go direct.
    std::thread::sleep(Duration::from_secs(4));
    for n in 0..8 {
        let name = format!("direct-{n}.example.test");
        assert_answered(dig(topology.workload("dig", &[]), &name, &[]), &name);
        assert!(agent.query_line(&name).is_none(), "{}", agent.log());
    }
    assert_eq!(probe("/healthz").0, 200, "alive for 30 s");
    wait_for("/healthz to say restart", Duration::from_secs(40), || {
        let (status, body) = probe("/healthz");
        (status == 503 && body.contains("restart the agent")).then_some(())
    });
    // The watchdog is starved (one STATUS line says why).
    let _ = notify.messages_for(Duration::from_millis(100));
    let starved = notify.messages_for(Duration::from_millis(3000));
    assert!(!fed(&starved), "{starved:?}");

    drop(held);
    wait_for("/readyz 200 again", Duration::from_secs(5), || {
        (probe("/readyz").0 == 200).then_some(())
    });
    assert_eq!(probe("/healthz").0, 200);
    assert!(fed(&notify.messages_for(Duration::from_millis(2500))));
    wait_for_a_lookup_through(&agent, &topology);
    assert!(
        agent.log().contains("every UDP thread runs again"),
        "{}",
        agent.log()
    );
}

/// Waits up to 5 s for a workload's lookup to go through `agent` again (after it was
/// taken for stopped).
fn wait_for_a_lookup_through(agent: &Agent, topology: &Topology) {
    wait_for(
        "a lookup through the agent again",
        Duration::from_secs(5),
        || {
            let name = "again.example.test";
            let _ = dig(topology.workload("dig", &[]), name, &[]);
            agent.query_line(name)
        },
    );
}

/// A thread of another process stopped with ptrace (the rest of the process runs on), until
/// dropped. Held and released from the thread that made it, as ptrace requires.
struct HeldThread {
    tid: libc::pid_t,
}

impl HeldThread {
    /// Stops the thread of `pid` named `name`.
    fn seize(pid: u32, name: &str) -> Self {
        let tasks = format!("/proc/{pid}/task");
        let tid: libc::pid_t = fs::read_dir(&tasks)
            .unwrap_or_else(|err| panic!("{tasks}: {err}"))
            .flatten()
            .find(|task| {
                fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
            })
            .unwrap_or_else(|| panic!("no thread {name} in {tasks}"))
            .file_name()
            .to_string_lossy()
            .parse()
            .expect("a thread id");
        // SAFETY: ptrace and waitpid on a thread id; no memory is shared with it.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, null, null),
                0,
                "PTRACE_SEIZE {tid}"
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
            assert!(libc::WIFSTOPPED(status), "{status:#x}");
        }
        Self { tid }
    }
}

impl Drop for HeldThread {
    fn drop(&mut self) {
        // SAFETY: as in seize; detaching resumes the thread.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            libc::ptrace(libc::PTRACE_DETACH, self.tid, null, null);
        }
    }
}

/// A service manager's notification socket, like systemd's /run/systemd/notify; removed on
/// drop.
struct ManagerSocket {
    path: std::path::PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl ManagerSocket {
    fn bind(topology: &Topology) -> Self {
        let path = std::env::temp_dir().join(format!("{}-notify", topology.tag));
        let _ = fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self { path, socket }
    }

    /// The messages received within `duration` from now.
    fn messages_for(&self, duration: Duration) -> Vec<String> {
        let until = Instant::now() + duration;
        let mut messages = Vec::new();
        let mut buffer = [0; 512];
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            if let Ok(length) = self.socket.recv(&mut buffer) {
                messages.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
            }
        }
        self.socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        messages
    }
}

impl Drop for ManagerSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
