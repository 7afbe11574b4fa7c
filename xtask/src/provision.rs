//! Installing what the build and the tests need, and only what is missing.
//!
//! The eBPF programs are built with a toolchain that has the standard library's sources (to
//! build `core` for the bpf target) and linked by bpf-linker, which must use the same LLVM as
//! that compiler. Where rustup nightly has rust-src (the standard aya setup) that is used;
//! where rustup cannot download rust-src (these machines), Debian's rustc-web + rust-web-src
//! are linked as the rustup toolchain `dns-proxy-bpf`. See docs/building.md.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::shell::{self, has_program, is_root};

/// Must match `LINKED_TOOLCHAIN` in dns-proxy/build.rs.
const LINKED_TOOLCHAIN: &str = "dns-proxy-bpf";
const TOOLCHAIN_ENV: &str = "DNS_PROXY_EBPF_TOOLCHAIN";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13 can be built against (its `llvm-N` features).
const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];

/// Test tools: the program the tests run, the Debian package that has it, and why.
const TEST_TOOLS: &[(&str, &str, &str)] = &[
    (
        "dnsmasq",
        "dnsmasq-base",
        "the real DNS server the tests query",
    ),
    ("dig", "bind9-dnsutils", "a real DNS client (BIND's dig)"),
    (
        "ip",
        "iproute2",
        "network namespaces and veth pairs for the test topology",
    ),
    (
        "nsenter",
        "util-linux",
        "running the agent in a test network namespace",
    ),
    (
        "setpriv",
        "util-linux",
        "running the agent without privileges, to test its error",
    ),
    ("getent", "libc-bin", "lookups through glibc's getaddrinfo"),
    (
        "bpftool",
        "bpftool",
        "checking that no program stays attached after shutdown",
    ),
    (
        "unbound",
        "unbound",
        "a second real DNS server (NSID, EDNS) for the byte-exact relay tests",
    ),
    (
        "musl-gcc",
        "musl-tools",
        "building an Alpine-style (musl) getaddrinfo client",
    ),
    (
        "go",
        "golang-go",
        "building a client that uses Go's own resolver",
    ),
    (
        "python3",
        "python3",
        "Python's socket.getaddrinfo as a client",
    ),
    (
        "iptables",
        "iptables",
        "the classic REDIRECT design, in the race demonstration's namespace",
    ),
    (
        "conntrack",
        "conntrack",
        "counting conntrack entries in the race demonstration",
    ),
    (
        "dockerd",
        "docker.io",
        "the container tests' own Docker engine (run in a network namespace of the tests')",
    ),
    (
        "busybox",
        "busybox-static",
        "the container tests' workload image (FROM scratch, a static busybox)",
    ),
    (
        "debootstrap",
        "debootstrap",
        "the Debian base the repository's Dockerfile builds on (no registry can be pulled)",
    ),
    (
        "systemd-analyze",
        "systemd",
        "checking deploy/systemd/dns-proxy.service (systemd-analyze verify)",
    ),
    (
        "dnstap-ldns",
        "dnstap-ldns",
        "reading the agent's dnstap log in tests",
    ),
];

/// Python tools that check the deployment files, installed from PyPI into a virtualenv under
/// target/ (pinned, so the check is the same on every machine).
const DEPLOY_CHECK_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "dockerfile-parse==2.0.1"];

/// The load generator and the classic proxy `cargo xtask bench` compares against.
pub fn bench_tools() -> Result<()> {
    let mut apt = Apt::default();
    for (program, package, why) in [
        ("dnsperf", "dnsperf", "the benchmark's load generator"),
        (
            "dnsdist",
            "dnsdist",
            "the classic proxy the benchmark compares against (run only in test namespaces)",
        ),
    ] {
        if !has_program(program) {
            apt.install(&[package], why)?;
        }
    }
    Ok(())
}

/// The cargo-fuzz release `cargo xtask fuzz` installs (pinned: the same on every machine).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What `cargo fuzz` needs: rustup's nightly (sanitizers; it cannot be downloaded on these
/// machines, so it must be there), cargo-fuzz, and a C++ compiler for libFuzzer.
pub fn fuzz_tools() -> Result<()> {
    let nightly = shell::output(Command::new("rustup").args(["run", "nightly", "rustc", "-V"]));
    if nightly.is_none() {
        bail!(
            "fuzzing needs rustup's nightly toolchain (for -Zsanitizer): \
             `rustup toolchain install nightly`"
        );
    }
    if !has_program("c++") {
        Apt::default().install(&["g++"], "libfuzzer-sys builds libFuzzer from C++ sources")?;
    }
    let installed = shell::output(Command::new("cargo-fuzz").arg("--version"))
        .is_some_and(|version| version.contains(CARGO_FUZZ_VERSION));
    if !installed {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (fuzzing)");
        shell::run(Command::new("cargo").args([
            "install",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
            "cargo-fuzz",
        ]))?;
    }
    Ok(())
}

/// Makes (or reuses) the virtualenv `venv` holding [`DEPLOY_CHECK_TOOLS`].
pub fn deploy_check_tools(venv: &Path) -> Result<()> {
    python_tools(venv, DEPLOY_CHECK_TOOLS, "checks deploy/")
}

/// virtme-ng, which boots a kernel in qemu on this machine's own files (`cargo xtask
/// kernel-vm`); pinned, as the other Python tools are.
const KERNEL_VM_TOOLS: &[&str] = &["virtme-ng==1.42"];

/// What `cargo xtask kernel-vm` needs: qemu, depmod (for the kernel's modules) and, in the
/// virtualenv `venv`, [`KERNEL_VM_TOOLS`].
pub fn kernel_vm_tools(venv: &Path) -> Result<()> {
    let had_qemu_img = has_program("qemu-img");
    let mut apt = Apt::default();
    apt.install(
        &["qemu-system-x86", "kmod", "busybox-static"],
        "booting Debian's own kernel in qemu for the tests on Linux 6.1",
    )?;
    if had_qemu_img && !has_program("qemu-img") {
        // A newer qemu-utils (from backports) cannot stay beside Debian 12's qemu-system-x86,
        // and apt removes it: put Debian's own back, so that the machine keeps its qemu-img.
        apt.install(
            &["qemu-utils"],
            "qemu-img and qemu-nbd, whose newer package apt removed for qemu-system-x86",
        )?;
    }
    python_tools(venv, KERNEL_VM_TOOLS, "boots other kernels")
}

/// Makes (or reuses) the virtualenv `venv` holding the pinned PyPI packages `tools`.
fn python_tools(venv: &Path, tools: &[&str], why: &str) -> Result<()> {
    let pip = venv.join("bin/pip");
    let ready = |pip: &Path| {
        shell::output(Command::new(pip).args(["freeze"])).is_some_and(|installed| {
            tools.iter().all(|tool| {
                installed
                    .lines()
                    .any(|line| line.eq_ignore_ascii_case(tool))
            })
        })
    };
    if ready(&pip) {
        return Ok(());
    }
    if !has_program("python3") {
        Apt::default().install(&["python3"], "Python tools of the tests")?;
    }
    let make_venv = || shell::run(Command::new("python3").arg("-m").arg("venv").arg(venv));
    if make_venv().is_err() {
        // Debian's python3 keeps venv in a package of its own.
        Apt::default().install(
            &["python3-venv"],
            "a virtualenv for the tests' Python tools",
        )?;
        make_venv()?;
    }
    eprintln!(
        "xtask: installing {} into {} ({why})",
        tools.join(" "),
        venv.display()
    );
    shell::run(
        Command::new(&pip)
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(tools),
    )
}

pub fn setup(tests: bool) -> Result<()> {
    let mut apt = Apt::default();
    let toolchain = ebpf_toolchain(&mut apt)?;
    let llvm = llvm_major(&toolchain)?;
    bpf_linker(&mut apt, llvm)?;
    if tests {
        for (program, package, why) in TEST_TOOLS {
            if !has_program(program) {
                apt.install(&[package], why)?;
            }
        }
    }
    eprintln!("xtask: ready: eBPF toolchain `{toolchain}` (LLVM {llvm}), bpf-linker");
    Ok(())
}

/// The rustup toolchain that will build the eBPF programs (dns-proxy/build.rs makes the same
/// choice, in the same order).
fn ebpf_toolchain(apt: &mut Apt) -> Result<String> {
    if let Ok(name) = env::var(TOOLCHAIN_ENV)
        && !name.is_empty()
    {
        if !has_rust_src(&name) {
            bail!("{TOOLCHAIN_ENV}={name}: that toolchain has no rust-src component");
        }
        return Ok(name);
    }
    if has_rust_src("nightly") {
        return Ok("nightly".to_owned());
    }
    if has_rust_src(LINKED_TOOLCHAIN) {
        return Ok(LINKED_TOOLCHAIN.to_owned());
    }
    eprintln!(
        "xtask: rustup nightly has no rust-src here; using Debian's rustc-web with its sources"
    );
    apt.install(
        &["rustc-web", "cargo-web", "rust-web-src"],
        "a Rust compiler with the standard library's sources, to build `core` for the bpf target",
    )?;
    shell::run(Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]))?;
    if !has_rust_src(LINKED_TOOLCHAIN) {
        bail!("the linked toolchain `{LINKED_TOOLCHAIN}` (/usr) still has no rust-src");
    }
    Ok(LINKED_TOOLCHAIN.to_owned())
}

fn has_rust_src(toolchain: &str) -> bool {
    shell::output(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))
        .is_some_and(|sysroot| {
            PathBuf::from(sysroot.trim())
                .join("lib/rustlib/src/rust/library/core/Cargo.toml")
                .exists()
        })
}

/// The major version of the LLVM inside `toolchain`'s rustc.
fn llvm_major(toolchain: &str) -> Result<u32> {
    let version = shell::output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))
        .with_context(|| format!("cannot run rustc of toolchain `{toolchain}`"))?;
    version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .with_context(|| format!("`rustc -vV` of `{toolchain}` names no LLVM version"))
}

fn bpf_linker(apt: &mut Apt, llvm: u32) -> Result<()> {
    if has_program("bpf-linker") {
        return Ok(());
    }
    if !BPF_LINKER_LLVM.contains(&llvm) {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} cannot be built for LLVM {llvm}; install a bpf-linker for LLVM {llvm} by hand"
        );
    }
    let llvm_dev = format!("llvm-{llvm}-dev");
    apt.install(
        &[&llvm_dev, "libzstd-dev", "zlib1g-dev"],
        "bpf-linker links the eBPF object with the compiler's own LLVM version",
    )?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
    );
    shell::run(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            // Without it, llvm-sys looks in /usr and the link fails (`-lLLVM` not found).
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")),
    )
}

/// Debian packages, installed once each, with one `apt-get update` first.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str], why: &str) -> Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| !is_installed(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let list = missing.join(" ");
        if !has_program("apt-get") {
            bail!("needed: {list} ({why}); this is not a Debian system, install them by hand");
        }
        if !is_root() {
            bail!("needed: {list} ({why}); run as root, or `sudo apt-get install {list}` first");
        }
        eprintln!("xtask: installing {list}: {why}");
        // Packages with services (docker.io) must not start them: a dockerd in the host's
        // namespace would add bridges and iptables rules there. Debian's policy-rc.d says no.
        let _no_service_starts = NoServiceStarts::install()?;
        if !self.updated {
            shell::run(Command::new("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        shell::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }
}

/// `/usr/sbin/policy-rc.d` answering 101 ("action forbidden") while it lives, unless the
/// machine already has a policy of its own, which is left alone.
struct NoServiceStarts {
    made: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn install() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { made: false });
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask: no service starts while installing\nexit 101\n",
        )
        .with_context(|| format!("write {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { made: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

fn is_installed(package: &str) -> bool {
    shell::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]))
        .is_some_and(|status| status.starts_with("ii"))
}
