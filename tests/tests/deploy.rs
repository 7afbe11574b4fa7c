//! The deployment files, checked by the tools their platforms use: the DaemonSet against the
//! Kubernetes schemas, the systemd unit by systemd itself, the Dockerfile's structure. The
//! checkers come from `cargo xtask test` (a virtualenv in DNS_PROXY_DEPLOY_TOOLS); without it
//! these tests fail and say so, rather than pass unchecked.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use tests::agent_binary;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

fn deploy_tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("DNS_PROXY_DEPLOY_TOOLS").unwrap_or_else(|| {
        tests::stop_the_run(
            "the deployment checks need the checkers `cargo xtask test` installs \
             (DNS_PROXY_DEPLOY_TOOLS is not set): run `cargo xtask test` as root \
             (see tests/README.md)",
        )
    });
    let tool = Path::new(&venv).join("bin").join(name);
    assert!(tool.is_file(), "{} is missing", tool.display());
    tool
}

/// Runs a checker; panics with everything it said unless it succeeded and printed nothing on
/// stderr (where both checkers put their warnings).
fn check(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{command:?}: {}\n{stdout}{stderr}",
        output.status
    );
    stdout
}

#[test]
fn the_daemonset_validates_against_the_kubernetes_schemas() {
    let manifest = repository().join("deploy/kubernetes/dns-proxy.yaml");
    let stdout = check(
        Command::new(deploy_tool("kubernetes-validate"))
            .arg("--strict")
            .arg(&manifest),
    );
    for resource in ["serviceaccount/dns-proxy", "daemonset/dns-proxy"] {
        assert!(
            stdout.contains(&format!("passed for resource {resource}")),
            "{stdout}"
        );
    }
}

#[test]
fn the_kubernetes_check_rejects_a_field_that_does_not_exist() {
    // The check above means something only if a wrong manifest fails it.
    let manifest = fs::read_to_string(repository().join("deploy/kubernetes/dns-proxy.yaml"))
        .expect("read the manifest");
    let wrong = manifest.replacen("hostNetwork: true", "hostNetworking: true", 1);
    assert_ne!(wrong, manifest);
    let dir = tempdir("k8s");
    let path = dir.join("wrong.yaml");
    fs::write(&path, wrong).expect("write");
    let output = Command::new(deploy_tool("kubernetes-validate"))
        .arg("--strict")
        .arg(&path)
        .output()
        .expect("run kubernetes-validate");
    assert!(!output.status.success());
    let _ = fs::remove_dir_all(dir);
}

/// A fresh directory under the system's temporary one.
fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dns-proxy-{what}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn the_systemd_unit_verifies() {
    // systemd-analyze verify checks the unit as installed: against a root holding systemd's own
    // units, the unit in /etc/systemd/system and the real binary at its ExecStart path.
    let root = tempdir("systemd-root");
    let copy = |from: &Path, to: &Path| {
        fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
        fs::copy(from, to).unwrap_or_else(|err| panic!("copy {}: {err}", from.display()));
    };
    let units = Path::new("/lib/systemd/system");
    for entry in fs::read_dir(units).expect("systemd's units").flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_file()) {
            copy(
                &entry.path(),
                &root.join("usr/lib/systemd/system").join(entry.file_name()),
            );
        }
    }
    let unit = root.join("etc/systemd/system/dns-proxy.service");
    copy(
        &repository().join("deploy/systemd/dns-proxy.service"),
        &unit,
    );
    copy(&agent_binary(), &root.join("usr/local/bin/dns-proxy"));
    check(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(&unit),
    );
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn the_dockerfile_builds_in_two_stages_and_provisions_as_xtask_setup_does() {
    // The image is built and run by the container tests (e2e `containers`); this checks its
    // structure with the parser container tools use, and that its build stage provisions the
    // same toolchain as `cargo xtask setup` (xtask/src/provision.rs), so the two cannot drift.
    let script = r#"
import json, sys
from dockerfile_parse import DockerfileParser
parser = DockerfileParser(path=sys.argv[1])
print(json.dumps({"stages": [i["value"] for i in parser.structure if i["instruction"] == "FROM"],
                  "runs": [i["value"] for i in parser.structure if i["instruction"] == "RUN"],
                  "copies": [i["value"] for i in parser.structure if i["instruction"] == "COPY"],
                  "entrypoint": [i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT"],
                  "args": [i["value"] for i in parser.structure if i["instruction"] == "ARG"]}))
"#;
    let stdout = check(
        Command::new(deploy_tool("python"))
            .arg("-c")
            .arg(script)
            .arg(repository().join("Dockerfile")),
    );
    let parsed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let strings = |key: &str| -> Vec<String> {
        parsed[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|v| v.as_str().expect("a string").to_owned())
            .collect()
    };
    let stages = strings("stages");
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].ends_with(" AS build"), "{stages:?}");
    let provision = fs::read_to_string(repository().join("xtask/src/provision.rs"))
        .expect("read xtask/src/provision.rs");
    let linker_version = provision
        .lines()
        .find_map(|line| line.strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("BPF_LINKER_VERSION in provision.rs");
    let args = strings("args");
    assert!(
        args.contains(&format!("BPF_LINKER_VERSION={linker_version}")),
        "the Dockerfile's bpf-linker is not xtask's {linker_version}: {args:?}"
    );
    // xtask links Debian's rustc-web when rustup has no rust-src; the Dockerfile installs the
    // same packages, and builds bpf-linker for that compiler's LLVM.
    let runs = strings("runs");
    for package in ["rustc-web", "cargo-web", "rust-web-src"] {
        assert!(
            provision.contains(&format!("\"{package}\"")),
            "{package} not in provision.rs"
        );
        assert!(
            runs.iter().any(|run| run.contains(package)),
            "{package}: {stdout}"
        );
    }
    let rustc = check(Command::new("/usr/bin/rustc").arg("-vV"));
    let llvm = rustc
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .expect("rustc-web's LLVM version");
    assert!(
        args.contains(&format!("LLVM_MAJOR={llvm}")),
        "rustc-web uses LLVM {llvm}; the Dockerfile builds bpf-linker for {args:?}"
    );
    assert!(
        runs.iter()
            .any(|run| run.starts_with("cargo build --release --locked")),
        "{stdout}"
    );
    assert!(
        strings("copies")
            .iter()
            .any(|copy| copy.starts_with("--from=build ") && copy.contains("release/dns-proxy")),
        "{stdout}"
    );
    assert_eq!(
        strings("entrypoint"),
        ["[\"/usr/local/bin/dns-proxy\"]"],
        "{stdout}"
    );
}
