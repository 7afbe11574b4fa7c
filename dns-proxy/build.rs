//! Builds the eBPF programs (`dns-proxy-ebpf`) for the bpf target with aya-build; `src/ebpf.rs`
//! embeds the object from OUT_DIR.
//!
//! Building `core` for bpf needs a toolchain with the standard library's sources. In order:
//! 1. `DNS_PROXY_EBPF_TOOLCHAIN`, if set (a rustup toolchain name);
//! 2. rustup's `nightly`, if it has the rust-src component (the standard aya setup);
//! 3. `dns-proxy-bpf`, the toolchain `cargo xtask setup` links from Debian's rustc-web and
//!    rust-web-src where rustup cannot download rust-src (docs/building.md);
//! 4. without rustup at all (the Dockerfile's build stage: Debian's rustc-web alone), the
//!    `rustc` on PATH, if it has the sources.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// Must match `xtask`'s `LINKED_TOOLCHAIN`.
const LINKED_TOOLCHAIN: &str = "dns-proxy-bpf";
const TOOLCHAIN_ENV: &str = "DNS_PROXY_EBPF_TOOLCHAIN";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    let toolchain = match env::var(TOOLCHAIN_ENV) {
        Ok(name) if !name.is_empty() => name,
        _ => find_toolchain()?,
    };
    // aya-build passes `-Z build-std=core` when RUSTC_BOOTSTRAP=1; the linked toolchain is a
    // stable compiler, and nightly does not mind. Only our child cargo sees it.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../dns-proxy-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("the eBPF crate's path is not UTF-8")?;
    let package = Package {
        name: "dns-proxy-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
        .with_context(|| format!("building the eBPF programs with toolchain `{toolchain}`"))
}

/// The first toolchain that has the standard library's sources.
fn find_toolchain() -> anyhow::Result<String> {
    if !has_rustup() {
        // aya-build then runs the `cargo` and `rustc` on PATH; the name is not used.
        if has_sources(Command::new("rustc")) {
            return Ok("current".to_owned());
        }
        bail!(
            "no toolchain can build the eBPF programs: there is no rustup, and the rustc on \
             PATH has no standard library sources (Debian: `apt-get install rustc-web cargo-web \
             rust-web-src`)"
        );
    }
    for candidate in ["nightly", LINKED_TOOLCHAIN] {
        if has_rust_src(candidate) {
            return Ok(candidate.to_owned());
        }
    }
    bail!(
        "no toolchain can build the eBPF programs: it needs rustup nightly with rust-src \
         (`rustup toolchain install nightly --component rust-src`) or the `{LINKED_TOOLCHAIN}` \
         toolchain; run `cargo xtask setup`, which installs what is missing"
    )
}

fn has_rustup() -> bool {
    Command::new("rustup").arg("--version").output().is_ok()
}

fn has_rust_src(toolchain: &str) -> bool {
    let mut rustc = Command::new("rustup");
    rustc.args(["run", toolchain, "rustc"]).env_remove("RUSTC");
    has_sources(rustc)
}

/// Whether the sysroot of `rustc` holds the standard library's sources.
fn has_sources(mut rustc: Command) -> bool {
    let Ok(output) = rustc.args(["--print", "sysroot"]).output() else {
        return false;
    };
    if !output.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    PathBuf::from(sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}
