//! `cargo xtask kernel-vm`: integration tests against Debian 12's own kernel (Linux 6.1), in
//! a qemu guest that boots it on this machine's files (virtme-ng), since the machine itself
//! runs a newer one. The eBPF verifier of an older kernel counts a program's stack in coarser
//! steps, and its program types lack some helpers: what it refuses, an operator's Debian 12
//! node would refuse, and only a load in that kernel shows it.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{provision, shell};

/// The tests `cargo xtask test` runs in the guest: every client behaviour, the redirect's
/// promises (hijacks from other namespaces, restarts, loopback servers, the table), and the
/// kernel's exclusion of a cgroup made at an excluded path (a tracing program, which reads
/// the kernel's own structs at offsets from its BTF). Serial: qemu emulates the guest's CPUs
/// (this machine's KVM does not nest), so tests take several times as long as on the host,
/// and timing ones would race each other.
pub const DEFAULT_TESTS: &[&str] = &[
    "clients::",
    "redirect::",
    "operations::a_service_started_after_the_agent_in_an_excluded_cgroup",
    "operations::cgroups_made_and_removed_at_one_excluded_path",
];

/// Tests of the default set left out in the guest. All pass on the host, where `cargo xtask
/// test` runs them first.
/// - Two measure the emulation rather than the kernel: an agent there takes 10 to 15 s to
///   start instead of half a second, longer than the client's retries across a restart wait;
///   and a pod flooding at full speed leaves its neighbour's lookups too little emulated CPU
///   for their timeouts (3 of 150 lost, none wrong).
/// - The others test the relay, the same binary on any kernel, or a client whose use of the
///   kernel's hooks another test of the set already makes (python's getaddrinfo is glibc's;
///   musl's are in `redirect::musl_with_its_second_nameserver_down_resolves_every_name` and
///   `clients::resolvers::musl_getaddrinfo_with_two_nameservers`; IPv6 sends and receives in
///   `clients::ipv6::ipv6_clients_see_the_server_address_and_port`). Each test costs 20 s
///   to 2 min in the guest, most of it the verifier's, emulated. These took 442 s of one run's
///   2,668 s, a run of the whole set that came within 20 s of [`GUEST_TIMEOUT`].
pub const SKIPPED_BY_DEFAULT: &[&str] = &[
    "redirect::a_long_lived_connected_socket_keeps_resolving_across_restarts",
    "redirect::a_pod_cannot_hijack_another_pods_lookups_with_its_address",
    "clients::byte_exact::",
    "clients::truncation::",
    "clients::a_tcp_client_that_reads_late_gets_every_answer",
    "clients::a_tcp_connection_stays_open_as_long_as_the_server_told_the_client",
    "clients::malformed_datagrams_are_not_forwarded",
    "clients::tcp::dig_over_tcp_is_relayed",
    "clients::a_zone_transfer_reaches_a_client_that_half_closes",
    "clients::resolvers::python_socket_getaddrinfo",
    "clients::resolvers::musl_getaddrinfo_for_both_families",
    "clients::ipv6::dig_over_ipv6_is_redirected",
];

/// How long the guest may run, as `timeout(1)` reads it. The default tests took 28 to 45
/// minutes in it before the relay's were left out (the emulation's speed varies by the hour).
const GUEST_TIMEOUT: &str = "45m";

/// The status the guest leaves when the filters match no test: a renamed module must not
/// turn the check into one that passes on nothing.
const NO_TESTS: &str = "no-tests";

/// Boots Debian's current 6.1 kernel and runs the e2e tests `filters` (test name
/// substrings) but `skips` in it, with this tree's debug agent; fails unless they pass.
pub fn run(root: &Path, filters: &[String], skips: &[&str]) -> Result<()> {
    let dir = root.join("target/kernel-vm");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let venv = dir.join("venv");
    provision::kernel_vm_tools(&venv)?;
    let vmlinuz = debian_kernel(&dir)?;
    let e2e = e2e_binary(root)?;
    let status = dir.join("status");
    let _ = fs::remove_file(&status);
    let script = dir.join("guest.sh");
    fs::write(&script, guest_script(root, &e2e, &status, filters, skips))
        .with_context(|| format!("write {}", script.display()))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    eprintln!(
        "xtask: booting {} in qemu for: {}",
        vmlinuz.display(),
        filters.join(" ")
    );
    // --verbose: the guest's console (the tests' output) is only shown with it. The guest
    // sees this machine's files read-only (with a throwaway overlay), but target/, where the
    // tests build their clients and the guest leaves its status.
    // A guest that hangs is stopped (`timeout`) rather than holding CI to its own limit.
    // No terminal on stdin: `timeout` runs qemu outside the terminal's foreground group, where
    // qemu's setting up of its stdio console would stop it (SIGTTOU) until the timeout.
    let ran = run_through_pipe(
        Command::new("timeout")
            .args(["--kill-after=1m", GUEST_TIMEOUT])
            .arg(venv.join("bin/vng"))
            .arg("--run")
            .arg(&vmlinuz)
            .args([
                "--disable-kvm",
                "--cpus",
                "2",
                "--memory",
                "4G",
                "--verbose",
            ])
            .arg("--rwdir")
            .arg(root.join("target"))
            .arg("--exec")
            .arg(&script)
            // vng runs virtme-ng's other commands (virtme-run) by name.
            .env("PATH", path_with(&venv.join("bin"))?)
            .stdin(Stdio::null())
            .current_dir(root),
    );
    let code = fs::read_to_string(&status).unwrap_or_default();
    match code.trim() {
        "0" => Ok(()),
        "" => bail!(
            "the guest left no status ({}): it did not boot, or ran past {GUEST_TIMEOUT} ({ran:?})",
            status.display()
        ),
        NO_TESTS => bail!("no e2e test's name contains any of: {}", filters.join(" ")),
        code => bail!("the tests in Linux 6.1 failed (exit status {code}); their output is above"),
    }
}

/// This process's `PATH` with `dir` first.
fn path_with(dir: &Path) -> Result<std::ffi::OsString> {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(dir.to_owned()).chain(std::env::split_paths(&rest)))
        .with_context(|| format!("{} cannot go on PATH", dir.display()))
}

/// Runs `command` with its stdout and stderr through a pipe that this process copies to its
/// own stdout. Handed a file directly, qemu opens it anew, truncated: a CI log written to a
/// file lost everything before the guest booted.
fn run_through_pipe(command: &mut Command) -> Result<()> {
    eprintln!("xtask: {command:?}");
    let (mut reader, writer) = std::io::pipe().context("pipe")?;
    let mut child = command
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    // The command still holds this process's ends of the pipe: drop them, so that the copy
    // ends when the guest's last process closes its own.
    command.stdout(Stdio::null()).stderr(Stdio::null());
    std::io::copy(&mut reader, &mut std::io::stdout().lock()).context("copy the guest's output")?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Downloads (once) and unpacks the kernel Debian 12's `linux-image-amd64` depends on, with
/// its modules' index (virtme-ng loads virtio and 9p from them): the kernel's path.
fn debian_kernel(dir: &Path) -> Result<PathBuf> {
    let current_image = || {
        let depends =
            shell::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
        depends
            .lines()
            .find_map(|line| line.trim().strip_prefix("Depends: "))
            .filter(|package| package.starts_with("linux-image-6.1."))
            .map(str::to_owned)
    };
    let package = match current_image() {
        Some(package) => package,
        None => {
            // A machine whose package lists were never fetched knows no kernel yet.
            shell::run(Command::new("apt-get").args(["update", "-qq"]))?;
            current_image()
                .context("no Linux 6.1 image (linux-image-amd64) among Debian's packages")?
        }
    };
    let version = package
        .strip_prefix("linux-image-")
        .expect("checked above")
        .to_owned();
    let unpacked = dir.join(&package);
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{version}"));
    if vmlinuz.exists() {
        return Ok(vmlinuz);
    }
    let downloads = dir.join("debs");
    fs::create_dir_all(&downloads)?;
    eprintln!("xtask: downloading {package} (Debian 12's kernel)");
    let download = || {
        shell::run(
            Command::new("apt-get")
                .args(["download", "-qq", &package])
                .current_dir(&downloads),
        )
    };
    if download().is_err() {
        // Stale package lists name a version the mirror no longer has.
        shell::run(Command::new("apt-get").args(["update", "-qq"]))?;
        download()?;
    }
    let deb = fs::read_dir(&downloads)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
    let partial = dir.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    shell::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    shell::run(Command::new("depmod").arg("-b").arg(&partial).arg(&version))?;
    let _ = fs::remove_dir_all(&unpacked);
    fs::rename(&partial, &unpacked)?;
    Ok(vmlinuz)
}

/// The e2e test binary of this tree, built if needed.
fn e2e_binary(root: &Path) -> Result<PathBuf> {
    let output = crate::cargo()
        .args(["test", "--package", "tests", "--test", "e2e", "--no-run"])
        .current_dir(root)
        .output()
        .context("cargo test --no-run")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("building the e2e tests failed:\n{stderr}");
    }
    // "  Executable tests/e2e/main.rs (target/debug/deps/e2e-0123abcd)"
    stderr
        .lines()
        .filter(|line| line.contains("Executable tests/e2e/"))
        .find_map(|line| line.rsplit_once('(')?.1.strip_suffix(')'))
        .map(|path| root.join(path))
        .with_context(|| format!("no e2e executable in cargo's output:\n{stderr}"))
}

/// What the guest runs: the mounts the tests expect (virtme-ng mounts neither cgroup2 nor a
/// bpffs), then the tests, whose exit status it leaves in `status`. The kernel's messages are
/// kept off the console, which carries the tests' output.
fn guest_script(
    root: &Path,
    e2e: &Path,
    status: &Path,
    filters: &[String],
    skips: &[&str],
) -> String {
    let quote = |text: &str| format!("'{}'", text.replace('\'', r"'\''"));
    let filters: Vec<String> = filters
        .iter()
        .map(|filter| quote(filter))
        .chain(skips.iter().map(|test| format!("--skip {}", quote(test))))
        .collect();
    format!(
        "#!/bin/sh\n\
         dmesg -n 1\n\
         mount | grep -q ' type cgroup2 ' || mount -t cgroup2 none /sys/fs/cgroup\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         mkdir -p /run/netns\n\
         ip link set lo up\n\
         echo \"xtask: guest kernel $(uname -r)\"\n\
         cd {root}\n\
         if ! {e2e} --list {filters} | grep -q ': test$'; then echo {NO_TESTS} > {status}; exit; fi\n\
         DNS_PROXY_BIN={agent} {e2e} --test-threads=1 --color never {filters}\n\
         echo $? > {status}\n",
        root = quote(&root.display().to_string()),
        agent = quote(&root.join("target/debug/dns-proxy").display().to_string()),
        e2e = quote(&e2e.display().to_string()),
        filters = filters.join(" "),
        status = quote(&status.display().to_string()),
    )
}
