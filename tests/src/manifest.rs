//! The agent's container as deploy/kubernetes/dns-proxy.yaml specifies it, read from the file,
//! and turned into `docker run` arguments: the container tests run exactly what the DaemonSet
//! runs, so the two cannot drift.
use std::{fs, path::Path};

use yaml_rust2::{Yaml, YamlLoader};

/// What the DaemonSet's pod template says about the agent's container.
#[derive(Debug)]
pub struct AgentContainer {
    pub image: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub host_network: bool,
    pub privileged: bool,
    pub allow_privilege_escalation: bool,
    pub read_only_root: bool,
    pub run_as_user: Option<i64>,
    pub capabilities_drop: Vec<String>,
    pub capabilities_add: Vec<String>,
    pub seccomp_unconfined: bool,
    pub memory_limit: Option<String>,
    /// (host path, mount path, read-only)
    pub mounts: Vec<(String, String, bool)>,
    /// (path, host, port) of the liveness and readiness probes.
    pub liveness: (String, String, u16),
    pub readiness: (String, String, u16),
}

/// The manifest in this repository.
pub fn path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/dns-proxy.yaml")
}

/// Reads the DaemonSet's single container from the manifest at `path`.
pub fn agent_container(path: &Path) -> Result<AgentContainer, String> {
    let text = fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let docs =
        YamlLoader::load_from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?;
    let daemonset = docs
        .iter()
        .find(|doc| doc["kind"].as_str() == Some("DaemonSet"))
        .ok_or("no DaemonSet in the manifest")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().ok_or("no containers")?;
    let [container] = containers.as_slice() else {
        return Err(format!(
            "{} containers; the agent is the only one",
            containers.len()
        ));
    };
    let text_of = |yaml: &Yaml, what: &str| -> Result<String, String> {
        yaml.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{what}: missing or not a string"))
    };
    let strings = |yaml: &Yaml| -> Vec<String> {
        yaml.as_vec()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let volumes = pod["volumes"].as_vec().cloned().unwrap_or_default();
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"]
        .as_vec()
        .cloned()
        .unwrap_or_default()
    {
        let name = text_of(&mount["name"], "volumeMounts[].name")?;
        let volume = volumes
            .iter()
            .find(|volume| volume["name"].as_str() == Some(name.as_str()))
            .ok_or_else(|| format!("volume {name} is not declared"))?;
        let host_path = text_of(&volume["hostPath"]["path"], "hostPath.path")?;
        let mount_path = text_of(&mount["mountPath"], "mountPath")?;
        let read_only = mount["readOnly"].as_bool().unwrap_or(false);
        mounts.push((host_path, mount_path, read_only));
    }
    let probe = |probe: &Yaml, what: &str| -> Result<(String, String, u16), String> {
        let get = &probe["httpGet"];
        Ok((
            text_of(&get["path"], what)?,
            get["host"].as_str().unwrap_or("127.0.0.1").to_owned(),
            get["port"]
                .as_i64()
                .and_then(|port| u16::try_from(port).ok())
                .ok_or_else(|| format!("{what}: no numeric port"))?,
        ))
    };
    let security = &container["securityContext"];
    Ok(AgentContainer {
        image: text_of(&container["image"], "image")?,
        args: strings(&container["args"]),
        env: container["env"]
            .as_vec()
            .map(|vars| {
                vars.iter()
                    .filter_map(|var| {
                        Some((
                            var["name"].as_str()?.to_owned(),
                            var["value"].as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        host_network: pod["hostNetwork"].as_bool().unwrap_or(false),
        privileged: security["privileged"].as_bool().unwrap_or(false),
        allow_privilege_escalation: security["allowPrivilegeEscalation"]
            .as_bool()
            .unwrap_or(true),
        read_only_root: security["readOnlyRootFilesystem"]
            .as_bool()
            .unwrap_or(false),
        run_as_user: security["runAsUser"].as_i64(),
        capabilities_drop: strings(&security["capabilities"]["drop"]),
        capabilities_add: strings(&security["capabilities"]["add"]),
        seccomp_unconfined: security["seccompProfile"]["type"].as_str() == Some("Unconfined"),
        memory_limit: container["resources"]["limits"]["memory"]
            .as_str()
            .map(str::to_owned),
        mounts,
        liveness: probe(&container["livenessProbe"], "livenessProbe")?,
        readiness: probe(&container["readinessProbe"], "readinessProbe")?,
    })
}

/// Every capability of Linux 6.x, for "drop ALL" (ctr drops by name only).
const ALL_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl AgentContainer {
    /// `ctr run` options (containerd, the runtime under Kubernetes' CRI) for this container.
    /// `host_path` maps each of the manifest's host paths to the path to mount on this machine
    /// (the tests' stand-ins for the node's directories); every other setting is the
    /// manifest's own. Settings ctr cannot express are refused rather than dropped.
    pub fn ctr_run_options(
        &self,
        host_path: impl Fn(&str) -> String,
    ) -> Result<Vec<String>, String> {
        let mut options = Vec::new();
        if self.host_network {
            options.push("--net-host".to_owned());
        }
        if self.privileged {
            options.push("--privileged".to_owned());
        }
        // ctr sets the OCI spec's NoNewPrivileges unless told otherwise.
        if self.allow_privilege_escalation {
            options.push("--allow-new-privs".to_owned());
        }
        // ctr applies no seccomp profile unless --seccomp: Unconfined is its default.
        if !self.seccomp_unconfined {
            return Err(
                "only seccompProfile Unconfined is rendered (ctr has no RuntimeDefault)".into(),
            );
        }
        if self.read_only_root {
            options.push("--read-only".to_owned());
        }
        // ctr runs as root (uid 0) and has no option for another user.
        if self.run_as_user.is_some_and(|uid| uid != 0) {
            return Err("runAsUser other than 0 is not rendered".into());
        }
        // Kubernetes drops, then adds; ctr applies its drops last. So "drop ALL" becomes a
        // drop of every capability that is not added back.
        for cap in &self.capabilities_drop {
            if cap == "ALL" {
                options.extend(
                    ALL_CAPABILITIES
                        .iter()
                        .filter(|c| !self.capabilities_add.iter().any(|added| added == *c))
                        .map(|c| format!("--cap-drop=CAP_{c}")),
                );
            } else {
                options.push(format!("--cap-drop=CAP_{cap}"));
            }
        }
        for cap in &self.capabilities_add {
            options.push(format!("--cap-add=CAP_{cap}"));
        }
        if let Some(limit) = &self.memory_limit {
            options.push(format!("--memory-limit={}", bytes(limit)?));
        }
        for (name, value) in &self.env {
            options.push(format!("--env={name}={value}"));
        }
        for (host, container, read_only) in &self.mounts {
            let mode = if *read_only { "ro" } else { "rw" };
            options.push(format!(
                "--mount=type=bind,src={},dst={container},options=rbind:{mode}",
                host_path(host)
            ));
        }
        Ok(options)
    }
}

/// A Kubernetes memory quantity in bytes: `256Mi` is 268435456.
fn bytes(quantity: &str) -> Result<u64, String> {
    for (suffix, unit) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(number) = quantity.strip_suffix(suffix) {
            let number: u64 = number
                .parse()
                .map_err(|_| format!("memory limit {quantity}"))?;
            return Ok(number * unit);
        }
    }
    Err(format!("memory limit {quantity}: expected Ki, Mi or Gi"))
}
