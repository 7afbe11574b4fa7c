//! Docker for the container tests: a dockerd of the tests' own, and the images they run.
//!
//! The daemon runs in a network namespace of its own ([`NETNS`]), so its bridges, veths and
//! iptables rules never touch the host's namespace, and that namespace has no route off the
//! machine: no container can reach anything beyond it. Its containers land under the cgroup
//! [`CGROUP_PARENT`] (cgroup2 root), never the host's `docker/` tree, so a test attaches the
//! agent to a subtree of its own. The daemon's own DNS default ([`DEFAULT_DNS`]) is an address
//! in that namespace, so even a container started without `--dns` asks nothing outside.
//!
//! No registry is reachable here, so every image is made from local files: the Debian base
//! with debootstrap + `docker import`, the workload image `FROM scratch` with static binaries,
//! and the agent from the repository's Dockerfile, whose downloads (Debian's archive, crates.io)
//! go through [`RegistryProxy`], which allows those hosts only.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::registry_proxy::RegistryProxy;

/// The network namespace the tests' dockerd (and the agent beside it) runs in.
pub const NETNS: &str = "dns-proxy-docker";
/// The socket of the tests' dockerd, which the tests find in `DOCKER_HOST_ENV`.
pub const SOCKET: &str = "/run/dns-proxy-docker.sock";
/// Set by `cargo xtask test` for the container tests: the tests' dockerd (`unix://...`).
pub const DOCKER_HOST_ENV: &str = "DNS_PROXY_TEST_DOCKER_HOST";
/// The cgroup (under the cgroup2 root) every container of the tests' dockerd lands in.
pub const CGROUP_PARENT: &str = "dns-proxy-docker";
/// dockerd's `--dns`: an address of the daemon's namespace where nothing answers unless a test
/// starts a server there. The embedded DNS never forwards off the machine.
pub const DEFAULT_DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 53, 1);
/// Where the registry proxy listens, inside the daemon's namespace.
const PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PROXY_PORT: u16 = 3128;
/// What the agent image's build may download from.
const REGISTRIES: &[&str] = &[
    "deb.debian.org",
    "security.debian.org",
    "index.crates.io",
    "static.crates.io",
];

/// The socket of the containerd that the tests' dockerd manages: the agent's container runs
/// on it through `ctr`, as Kubernetes runs pods on containerd.
pub const CONTAINERD_SOCKET: &str = "/run/dns-proxy-docker/containerd/containerd.sock";
/// The containerd namespace the agent's image is imported into.
pub const CONTAINERD_NAMESPACE: &str = "dns-proxy-tests";

/// `ctr` on the tests' containerd, in [`CONTAINERD_NAMESPACE`].
pub fn ctr() -> Command {
    let mut command = Command::new("ctr");
    command.args([
        "--address",
        CONTAINERD_SOCKET,
        "--namespace",
        CONTAINERD_NAMESPACE,
    ]);
    command
}

/// An image of the tests' dockerd as containerd names it after an import.
pub fn containerd_ref(image: &str) -> String {
    if image.contains('/') {
        format!("docker.io/{image}")
    } else {
        format!("docker.io/library/{image}")
    }
}

/// The workload image: busybox (sh, nslookup, wget) and the static test clients, `FROM scratch`.
pub const WORKLOAD_IMAGE: &str = "dns-proxy-test/workload";
/// The Debian base the agent's Dockerfile names, made with debootstrap.
const DEBIAN_RELEASE: &str = "bookworm";

/// The agent image's tag: the `image:` of deploy/kubernetes/dns-proxy.yaml in `repo`.
pub fn agent_image(repo: &Path) -> String {
    let manifest = repo.join("deploy/kubernetes/dns-proxy.yaml");
    crate::manifest::agent_container(&manifest)
        .unwrap_or_else(|err| panic!("{err}"))
        .image
}

/// The docker client for the tests' daemon. Debian's `docker` (the daemon's own version) when
/// installed, else whatever is on PATH.
pub fn docker(host: &str) -> Command {
    let program = if Path::new("/usr/bin/docker").is_file() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    let mut command = Command::new(program);
    command.env("DOCKER_HOST", host).env("DOCKER_BUILDKIT", "0");
    command
}

/// Adds `address` to the loopback of the daemon's namespace (a test server's, the proxy's);
/// one that is already there is fine.
pub fn add_address(address: Ipv4Addr) {
    let _ = Command::new("ip")
        .args([
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ])
        .stderr(Stdio::null())
        .status();
}

fn answers(host: &str) -> bool {
    docker(host)
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The tests' dockerd, started by [`Daemon::ensure`]; stopping it on drop removes its
/// namespace and containers (images stay in the data root, a cache for the next run).
pub struct Daemon {
    process: Option<std::process::Child>,
    host: String,
}

impl Daemon {
    /// Starts the tests' dockerd unless one already answers on [`SOCKET`] (then it is left
    /// running when this is dropped). `work_dir` keeps its data root and log.
    pub fn ensure(work_dir: &Path) -> Result<Self, String> {
        let host = format!("unix://{SOCKET}");
        if answers(&host) {
            eprintln!("docker: the tests' dockerd already answers on {SOCKET}; using it");
            return Ok(Self {
                process: None,
                host,
            });
        }
        fs::create_dir_all(work_dir)
            .map_err(|err| format!("mkdir {}: {err}", work_dir.display()))?;
        let netns_path = PathBuf::from("/run/netns").join(NETNS);
        if !netns_path.exists() {
            run(Command::new("ip").args(["netns", "add", NETNS]))?;
        }
        run(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
        for address in [PROXY_ADDR, DEFAULT_DNS] {
            add_address(address);
        }
        let parent = crate::cgroup2_root().join(CGROUP_PARENT);
        fs::create_dir_all(&parent).map_err(|err| format!("mkdir {}: {err}", parent.display()))?;
        let log_path = work_dir.join("dockerd.log");
        let log =
            fs::File::create(&log_path).map_err(|err| format!("{}: {err}", log_path.display()))?;
        let _ = fs::remove_file(SOCKET);
        // containerd's store holds nothing but the agent image, imported again every run; one
        // whose snapshots went missing (a daemon stopped mid-run) refuses that import with
        // "parent snapshot ... does not exist". Docker's own images and build cache stay.
        let containerd_root = work_dir.join("data").join("containerd");
        if let Err(err) = fs::remove_dir_all(&containerd_root)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("docker: cannot clear {}: {err}", containerd_root.display());
        }
        // nsenter, not `ip netns exec`: that remounts /sys, and dockerd must see the cgroup
        // mounts to place containers.
        let process = Command::new("nsenter")
            .arg(format!("--net={}", netns_path.display()))
            .args(["--", "dockerd"])
            .arg("--data-root")
            .arg(work_dir.join("data"))
            .args(["--exec-root", EXEC_ROOT])
            .args(["--pidfile", PIDFILE])
            .arg(format!("--host={host}"))
            .arg(format!("--dns={DEFAULT_DNS}"))
            .arg(format!("--cgroup-parent=/{CGROUP_PARENT}"))
            .args(["--log-level", "warn"])
            .stdout(log.try_clone().map_err(|err| err.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot start dockerd: {err}"))?;
        let mut daemon = Self {
            process: Some(process),
            host,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !answers(&daemon.host) {
            let exited = daemon
                .process
                .as_mut()
                .and_then(|process| process.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "dockerd did not come up ({exited:?}); its log:\n{log}"
                ));
            }
            thread::sleep(Duration::from_millis(200));
        }
        eprintln!("docker: started the tests' dockerd in netns {NETNS} ({SOCKET})");
        Ok(daemon)
    }

    /// `unix:///...`, for `DOCKER_HOST`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Makes the images the tests use, unless they are there: the Debian base (debootstrap),
    /// the workload image, and `tag` from the repository's Dockerfile at `repo`.
    pub fn build_images(
        &self,
        repo: &Path,
        work_dir: &Path,
        clients: &[PathBuf],
        tag: &str,
    ) -> Result<(), String> {
        self.debian_base(work_dir)?;
        self.workload_image(work_dir, clients)?;
        self.agent_image(repo, tag)?;
        self.import_into_containerd(tag)
    }

    /// Copies `image` into containerd's image store (`docker save | ctr images import`).
    fn import_into_containerd(&self, image: &str) -> Result<(), String> {
        let mut save = docker(&self.host)
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|err| format!("docker save: {err}"))?;
        let stdout = save.stdout.take().ok_or("docker save: no stdout")?;
        let imported = run(ctr().args(["images", "import", "-"]).stdin(stdout));
        let saved = save.wait().map_err(|err| err.to_string())?;
        imported?;
        if !saved.success() {
            return Err(format!("docker save {image}: {saved}"));
        }
        Ok(())
    }

    fn has_image(&self, image: &str) -> bool {
        docker(&self.host)
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// `debian:bookworm` and `debian:bookworm-slim`: a minbase debootstrap with the official
    /// image's sources (bookworm, -updates, -security), imported. The tarball is kept in
    /// `work_dir` for the next run.
    fn debian_base(&self, work_dir: &Path) -> Result<(), String> {
        let full = format!("debian:{DEBIAN_RELEASE}");
        let slim = format!("debian:{DEBIAN_RELEASE}-slim");
        if self.has_image(&full) && self.has_image(&slim) {
            return Ok(());
        }
        // v2: without the host's resolv.conf (a tarball of an earlier layout is not reused).
        let tarball = work_dir.join(format!("debian-{DEBIAN_RELEASE}-v2.tar"));
        if !tarball.is_file() {
            let root = work_dir.join(format!("debian-{DEBIAN_RELEASE}"));
            let _ = fs::remove_dir_all(&root);
            eprintln!(
                "docker: debootstrap {DEBIAN_RELEASE} (minbase) for the images' base (~1 min)"
            );
            run(Command::new("debootstrap")
                .args(["--variant=minbase", DEBIAN_RELEASE])
                .arg(&root)
                .arg("http://deb.debian.org/debian"))?;
            let sources = format!(
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {r} {r}-updates\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                 Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {r}-security\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                r = DEBIAN_RELEASE
            );
            let _ = fs::remove_file(root.join("etc/apt/sources.list"));
            // debootstrap copies this machine's resolv.conf (naming its off-machine server) and
            // hostname in; an image must carry neither (the runtime provides them).
            fs::write(root.join("etc/resolv.conf"), "")
                .map_err(|err| format!("empty etc/resolv.conf: {err}"))?;
            fs::write(root.join("etc/hostname"), "")
                .map_err(|err| format!("empty etc/hostname: {err}"))?;
            fs::write(root.join("etc/apt/sources.list.d/debian.sources"), sources)
                .map_err(|err| format!("write debian.sources: {err}"))?;
            let _ = fs::remove_dir_all(root.join("var/cache/apt/archives"));
            let _ = fs::remove_dir_all(root.join("var/lib/apt/lists"));
            let partial = tarball.with_extension("tar.partial");
            run(Command::new("tar")
                .arg("-C")
                .arg(&root)
                .args(["--numeric-owner", "-cf"])
                .arg(&partial)
                .arg("."))?;
            fs::rename(&partial, &tarball).map_err(|err| err.to_string())?;
            let _ = fs::remove_dir_all(&root);
        }
        run(docker(&self.host).arg("import").arg(&tarball).arg(&full))?;
        run(docker(&self.host).args(["tag", &full, &slim]))
    }

    /// [`WORKLOAD_IMAGE`]: Debian's static busybox and the given static clients in `/bin`.
    fn workload_image(&self, work_dir: &Path, clients: &[PathBuf]) -> Result<(), String> {
        let context = work_dir.join("workload-image");
        let _ = fs::remove_dir_all(&context);
        fs::create_dir_all(&context).map_err(|err| err.to_string())?;
        let mut dockerfile = String::from(
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        );
        fs::copy("/bin/busybox", context.join("busybox"))
            .map_err(|err| format!("copy /bin/busybox (Debian's busybox-static): {err}"))?;
        for client in clients {
            let name = client.file_name().ok_or("a client without a name")?;
            fs::copy(client, context.join(name))
                .map_err(|err| format!("{}: {err}", client.display()))?;
            dockerfile.push_str(&format!("COPY {0} /bin/{0}\n", name.to_string_lossy()));
        }
        fs::write(context.join("Dockerfile"), dockerfile).map_err(|err| err.to_string())?;
        // Rebuilt every run (it takes a second): the clients may have changed.
        run(docker(&self.host)
            .args(["build", "-q", "-t", WORKLOAD_IMAGE])
            .arg(&context))
    }

    /// The agent image from the repository's Dockerfile, its downloads through the registry
    /// proxy. Docker's layer cache makes a rebuild of an unchanged tree quick.
    fn agent_image(&self, repo: &Path, tag: &str) -> Result<(), String> {
        let proxy = RegistryProxy::start(
            NETNS,
            SocketAddr::from((PROXY_ADDR, PROXY_PORT)),
            REGISTRIES,
        )
        .map_err(|err| format!("the registry proxy: {err}"))?;
        eprintln!(
            "docker: building {tag} from {}/Dockerfile (cold: about 6 min on 2 cores)",
            repo.display()
        );
        let url = proxy.url();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        run(docker(&self.host)
            .args(["build", "-t", tag])
            .args(["--build-arg", &format!("http_proxy={url}")])
            .args(["--build-arg", &format!("https_proxy={url}")])
            .args([
                "--build-arg",
                &format!("EXTRA_CA_CERTS={}", local_ca_certs()),
            ])
            .arg(repo))?;
        // Each build leaves the images it replaced untagged (the builder stage: 3 GB); those
        // of earlier builds go, this build's stay as the next one's layer cache.
        run(docker(&self.host)
            .args(["image", "prune", "--force", "--filter"])
            .arg(format!("until={started}")))
    }
}

/// The CAs this machine added to its trust store (Debian's /usr/local/share/ca-certificates),
/// as PEM: where a proxy intercepts TLS (as on these machines), the build must trust it too.
fn local_ca_certs() -> String {
    let mut pem = String::new();
    let Ok(entries) = fs::read_dir("/usr/local/share/ca-certificates") else {
        return pem;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    for path in paths {
        if path.extension().is_some_and(|ext| ext == "crt")
            && let Ok(text) = fs::read_to_string(&path)
        {
            pem.push_str(text.trim());
            pem.push('\n');
        }
    }
    pem
}

impl Daemon {
    /// Leaves the daemon running after this handle is gone (`cargo xtask docker`).
    pub fn keep_running(mut self) {
        if let Some(process) = self.process.take() {
            std::mem::forget(process);
        }
    }

    /// Stops the tests' dockerd found through its pid file, however it was started: its
    /// containers, its networks, the daemon, its namespace and cgroup.
    pub fn stop_running() -> Result<(), String> {
        let pid = fs::read_to_string(PIDFILE)
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok())
            .ok_or_else(|| format!("no tests' dockerd is running (no {PIDFILE})"))?;
        shut_down(&format!("unix://{SOCKET}"), pid);
        Ok(())
    }
}

const PIDFILE: &str = "/run/dns-proxy-docker.pid";
const EXEC_ROOT: &str = "/run/dns-proxy-docker";

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        shut_down(&self.host, process.id() as i32);
        let _ = process.kill();
        let _ = process.wait();
    }
}

fn shut_down(host: &str, pid: i32) {
    // Containers first (a test that failed may have left some), then the daemon.
    if let Ok(output) = docker(host).args(["ps", "-aq"]).output() {
        let ids = String::from_utf8_lossy(&output.stdout);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = docker(host).args(["rm", "-f"]).args(&ids).output();
        }
    }
    let _ = docker(host).args(["network", "prune", "-f"]).output();
    // SAFETY: kill takes and returns integers only; no memory of ours is involved. The pid is
    // the tests' dockerd, read from its pid file.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    // SAFETY: kill takes and returns integers only; signal 0 only checks that the process
    // exists.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        // Reap it if it is our child (a zombie still answers signal 0).
        // SAFETY: a null status pointer is allowed (waitpid then stores no status), so no memory
        // of ours is written; WNOHANG returns at once.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        thread::sleep(Duration::from_millis(100));
    }
    // dockerd bind-mounts the namespace of `--network host` containers under its exec-root;
    // unmounted, the namespace goes with `ip netns del`.
    if let Ok(entries) = fs::read_dir(format!("{EXEC_ROOT}/netns")) {
        for entry in entries.flatten() {
            let _ = Command::new("umount").arg(entry.path()).status();
        }
    }
    let _ = fs::remove_dir_all(EXEC_ROOT);
    let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    remove_cgroup_everywhere(Path::new(CGROUP_PARENT));
    // containerd makes a cgroup for its namespace of `ctr` runs, beside the containers'.
    remove_cgroup_everywhere(Path::new(CONTAINERD_NAMESPACE));
    eprintln!("docker: stopped the tests' dockerd");
}

/// Removes the cgroup `relative` (and its empty descendants) from the cgroup2 hierarchy and,
/// on a hybrid host, from every v1 hierarchy, where runc makes it too.
pub fn remove_cgroup_everywhere(relative: &Path) {
    let mut roots = vec![crate::cgroup2_root()];
    if let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") {
        for line in mountinfo.lines() {
            let Some((mount, fs_type)) = line.split_once(" - ") else {
                continue;
            };
            if fs_type.split_whitespace().next() == Some("cgroup")
                && let Some(point) = mount.split_whitespace().nth(4)
            {
                roots.push(PathBuf::from(point));
            }
        }
    }
    for root in roots {
        crate::remove_cgroup_tree(&root.join(relative));
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
