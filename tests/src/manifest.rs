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

/// The keys this reader understands at each level of the pod template. Any other key is an
/// error: a setting the container test would not run must not pass unnoticed. The ones that
/// are accepted but not rendered change nothing about the agent's container (scheduling,
/// service account, the image pull policy, resource requests, probe timing).
const POD_KEYS: &[&str] = &[
    "serviceAccountName",
    "automountServiceAccountToken",
    "hostNetwork",
    "dnsPolicy",
    "priorityClassName",
    "tolerations",
    "terminationGracePeriodSeconds",
    "containers",
    "volumes",
];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    // What the kubelet reports of a stopped container: nothing of how it runs.
    "terminationMessagePolicy",
    "args",
    "env",
    "ports",
    "livenessProbe",
    "readinessProbe",
    "resources",
    "securityContext",
    "volumeMounts",
];
const SECURITY_KEYS: &[&str] = &[
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "runAsUser",
    "capabilities",
    "seccompProfile",
];
const PROBE_KEYS: &[&str] = &[
    "httpGet",
    "periodSeconds",
    "timeoutSeconds",
    "failureThreshold",
    "initialDelaySeconds",
];

/// Fails unless `yaml` is a mapping whose keys are all in `allowed` (or absent).
fn only_keys(yaml: &Yaml, allowed: &[&str], what: &str) -> Result<(), String> {
    match yaml {
        Yaml::BadValue => Ok(()),
        Yaml::Hash(map) => {
            for key in map.keys() {
                let key = key.as_str().unwrap_or("<not a string>");
                if !allowed.contains(&key) {
                    return Err(format!(
                        "{what}.{key}: not understood by the container test (tests/src/manifest.rs); \
                         render it there or the test would run something else than the manifest"
                    ));
                }
            }
            Ok(())
        }
        _ => Err(format!("{what}: not a mapping")),
    }
}

/// A boolean field: `default` when absent, an error when it is anything but true or false
/// (YAML 1.1's `yes`, say, which this 1.2 parser reads as a string).
fn boolean(yaml: &Yaml, default: bool, what: &str) -> Result<bool, String> {
    match yaml {
        Yaml::BadValue => Ok(default),
        Yaml::Boolean(value) => Ok(*value),
        other => Err(format!("{what}: {other:?} is not true or false")),
    }
}

fn text_of(yaml: &Yaml, what: &str) -> Result<String, String> {
    yaml.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{what}: missing or not a string"))
}

/// A list of strings (absent: empty); any other item is an error.
fn strings(yaml: &Yaml, what: &str) -> Result<Vec<String>, String> {
    match yaml {
        Yaml::BadValue => Ok(Vec::new()),
        Yaml::Array(items) => items.iter().map(|item| text_of(item, what)).collect(),
        _ => Err(format!("{what}: not a list")),
    }
}

/// Reads the single DaemonSet's single container from the manifest at `path`.
pub fn agent_container(path: &Path) -> Result<AgentContainer, String> {
    let text = fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let docs =
        YamlLoader::load_from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?;
    let daemonsets: Vec<&Yaml> = docs
        .iter()
        .filter(|doc| doc["kind"].as_str() == Some("DaemonSet"))
        .collect();
    let [daemonset] = daemonsets.as_slice() else {
        return Err(format!(
            "{} DaemonSets in the manifest; one is expected",
            daemonsets.len()
        ));
    };
    let pod = &daemonset["spec"]["template"]["spec"];
    only_keys(pod, POD_KEYS, "spec.template.spec")?;
    let containers = pod["containers"].as_vec().ok_or("no containers")?;
    let [container] = containers.as_slice() else {
        return Err(format!(
            "{} containers; the agent is the only one",
            containers.len()
        ));
    };
    only_keys(container, CONTAINER_KEYS, "the container")?;
    let volumes = pod["volumes"].as_vec().cloned().unwrap_or_default();
    for volume in &volumes {
        only_keys(volume, &["name", "hostPath"], "volumes[]")?;
        only_keys(&volume["hostPath"], &["path", "type"], "volumes[].hostPath")?;
    }
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"]
        .as_vec()
        .cloned()
        .unwrap_or_default()
    {
        only_keys(&mount, &["name", "mountPath", "readOnly"], "volumeMounts[]")?;
        let name = text_of(&mount["name"], "volumeMounts[].name")?;
        let volume = volumes
            .iter()
            .find(|volume| volume["name"].as_str() == Some(name.as_str()))
            .ok_or_else(|| format!("volume {name} is not declared"))?;
        let host_path = text_of(&volume["hostPath"]["path"], "hostPath.path")?;
        let mount_path = text_of(&mount["mountPath"], "mountPath")?;
        let read_only = boolean(&mount["readOnly"], false, "volumeMounts[].readOnly")?;
        mounts.push((host_path, mount_path, read_only));
    }
    let probe = |probe: &Yaml, what: &str| -> Result<(String, String, u16), String> {
        only_keys(probe, PROBE_KEYS, what)?;
        let get = &probe["httpGet"];
        only_keys(get, &["host", "port", "path"], what)?;
        Ok((
            text_of(&get["path"], what)?,
            get["host"].as_str().unwrap_or("127.0.0.1").to_owned(),
            get["port"]
                .as_i64()
                .and_then(|port| u16::try_from(port).ok())
                .ok_or_else(|| format!("{what}: no numeric port"))?,
        ))
    };
    let mut env = Vec::new();
    for var in container["env"].as_vec().cloned().unwrap_or_default() {
        only_keys(&var, &["name", "value"], "env[]")?;
        env.push((
            text_of(&var["name"], "env[].name")?,
            text_of(&var["value"], "env[].value")?,
        ));
    }
    let resources = &container["resources"];
    only_keys(resources, &["requests", "limits"], "resources")?;
    only_keys(&resources["limits"], &["memory"], "resources.limits")?;
    let security = &container["securityContext"];
    only_keys(security, SECURITY_KEYS, "securityContext")?;
    only_keys(
        &security["capabilities"],
        &["drop", "add"],
        "securityContext.capabilities",
    )?;
    only_keys(
        &security["seccompProfile"],
        &["type"],
        "securityContext.seccompProfile",
    )?;
    Ok(AgentContainer {
        image: text_of(&container["image"], "image")?,
        args: strings(&container["args"], "args")?,
        env,
        host_network: boolean(&pod["hostNetwork"], false, "hostNetwork")?,
        privileged: boolean(&security["privileged"], false, "privileged")?,
        allow_privilege_escalation: boolean(
            &security["allowPrivilegeEscalation"],
            true,
            "allowPrivilegeEscalation",
        )?,
        read_only_root: boolean(
            &security["readOnlyRootFilesystem"],
            false,
            "readOnlyRootFilesystem",
        )?,
        run_as_user: security["runAsUser"].as_i64(),
        capabilities_drop: strings(&security["capabilities"]["drop"], "capabilities.drop")?,
        capabilities_add: strings(&security["capabilities"]["add"], "capabilities.add")?,
        seccomp_unconfined: security["seccompProfile"]["type"].as_str() == Some("Unconfined"),
        memory_limit: resources["limits"]["memory"].as_str().map(str::to_owned),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(manifest: &str) -> Result<AgentContainer, String> {
        let dir = std::env::temp_dir().join(format!("manifest-test-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
        let path = dir.join(format!(
            "{:x}.yaml",
            manifest.len() * 31 + manifest.bytes().map(usize::from).sum::<usize>()
        ));
        fs::write(&path, manifest).map_err(|err| err.to_string())?;
        let result = agent_container(&path);
        let _ = fs::remove_file(&path);
        result
    }

    /// The repository's manifest with `from` replaced by `to` (which must occur).
    fn edited(from: &str, to: &str) -> String {
        let manifest = fs::read_to_string(path()).unwrap();
        assert!(manifest.contains(from), "the manifest has no {from:?}");
        manifest.replacen(from, to, 1)
    }

    #[test]
    fn reads_the_repositorys_manifest() {
        let spec = agent_container(&path()).unwrap();
        assert!(spec.host_network);
        assert!(
            spec.mounts
                .iter()
                .any(|(_, to, ro)| to == "/host/cgroup" && *ro)
        );
    }

    #[test]
    fn refuses_what_it_would_not_run() {
        let cases = [
            ("privileged: false", "privileged: yes"),
            (
                "          args:\n",
                "          command: [\"/bin/sh\"]\n          args:\n",
            ),
            (
                "      containers:\n",
                "      initContainers: []\n      containers:\n",
            ),
            (
                "      hostNetwork: true\n",
                "      hostNetwork: true\n      hostPID: true\n",
            ),
            (
                "              memory: 256Mi\n",
                "              memory: 256Mi\n              cpu: 1\n",
            ),
            (
                "              value: info\n",
                "              valueFrom: {}\n",
            ),
            (
                "              readOnly: true\n",
                "              readOnly: true\n              subPath: x\n",
            ),
        ];
        for (from, to) in cases {
            let result = read(&edited(from, to));
            assert!(result.is_err(), "{to:?} was accepted: {result:?}");
        }
        let manifest = fs::read_to_string(path()).unwrap();
        let daemonset = &manifest[manifest.find("apiVersion: apps/v1").unwrap()..];
        assert!(
            read(&format!("{manifest}\n---\n{daemonset}")).is_err(),
            "two DaemonSets"
        );
    }
}
