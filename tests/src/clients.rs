//! The test clients: `dig`, the C and Go clients in tests/clients built on first use (musl's
//! and Go's own resolvers, as in Alpine and Go containers), and the A query the Rust clients
//! (tests/src/bin) send.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::{SERVER_IP, must};

/// Runs `dig @SERVER NAME +short` through `command` (a workload or outsider `dig` command);
/// returns stdout, or stdout and stderr as the error when dig fails.
pub fn dig(command: Command, name: &str, extra: &[&str]) -> Result<String, String> {
    dig_at(command, &SERVER_IP.to_string(), name, extra)
}

/// `dig @SERVER NAME +time=3 +tries=1 EXTRA` through `command`.
pub fn dig_at(
    mut command: Command,
    server: &str,
    name: &str,
    extra: &[&str],
) -> Result<String, String> {
    command.arg(format!("@{server}"));
    run_dig(command, name, extra)
}

/// Runs `dig NAME +time=3 +tries=1 EXTRA` through `command`, which names the server.
///
/// One try: a query lost anywhere fails the lookup, as no retry hides it. Its 3 s are for a
/// loaded machine, where an answer can take longer than a second to reach dig; a test whose
/// claim is a second passes `+time=1` in `EXTRA` (dig takes the last).
pub(crate) fn run_dig(mut command: Command, name: &str, extra: &[&str]) -> Result<String, String> {
    command.arg(name).args(["+time=3", "+tries=1"]).args(extra);
    let output = command.output().map_err(|err| err.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A standard query (RD set, one question, no EDNS) for the A record of `name`.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    message
}

/// Where the compiled test clients go.
fn clients_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-clients");
    fs::create_dir_all(&dir).expect("mkdir target/test-clients");
    dir
}

fn clients_source(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(file)
}

/// A static binary of tests/clients/getaddrinfo.c linked with musl (musl-gcc): musl's own
/// resolver, as on Alpine. Usage: `NAME inet|inet6|any`.
pub fn musl_getaddrinfo() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| musl_static("getaddrinfo.c", "musl-getaddrinfo"))
        .clone()
}

/// tests/clients/`source` built static with musl-gcc, as `binary` in the clients' directory.
fn musl_static(source: &str, binary: &str) -> PathBuf {
    let output = clients_dir().join(binary);
    must(
        Command::new("musl-gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&output)
            .arg(clients_source(source)),
    );
    output
}

/// A static binary of tests/clients/lookup-from-port.c (musl-gcc): COUNT lookups from one
/// socket bound to a fixed source port. Usage: `SERVER PORT NAME COUNT`.
pub fn lookup_from_port() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| musl_static("lookup-from-port.c", "lookup-from-port"))
        .clone()
}

/// tests/clients/resolve.go built with Go's toolchain: run it with `GODEBUG=netdns=go` for
/// Go's own resolver. Usage: `NAME`.
pub fn go_resolver() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = clients_dir();
            let output = dir.join("go-resolve");
            must(
                Command::new("go")
                    .args(["build", "-o"])
                    .arg(&output)
                    .arg(clients_source("resolve.go"))
                    // Standard library only: nothing to download, and nothing may be.
                    .env("GOPROXY", "off")
                    .env("GOFLAGS", "-mod=mod")
                    .env("GOCACHE", dir.join("go-cache"))
                    .env("GOPATH", dir.join("go-path")),
            );
            output
        })
        .clone()
}
