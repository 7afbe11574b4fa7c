//! Network namespaces of the tests' own ([`Netns`]), each with a bpffs for the agents run in
//! it, and the resolv.conf that programs run in one see. Both are removed on drop; nothing
//! here touches the host's own namespace.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::{cgroup::TestCgroup, must, require_root};

/// A network namespace of the tests' own, with a bpffs of its own for the server table of
/// the agents that run in it (so restarts in one test share it and no test touches the
/// host's /sys/fs/bpf); both are removed on drop.
pub struct Netns {
    pub name: String,
    state_dir: PathBuf,
    /// Where agents started outside the cgroups they redirect start (see [`Netns::agent_home`]).
    agent_home: OnceLock<TestCgroup>,
}

impl Netns {
    pub fn new(name: String) -> Self {
        require_root();
        must(Command::new("ip").args(["netns", "add", &name]));
        let state_dir = PathBuf::from("/run/dns-proxy-tests").join(&name);
        fs::create_dir_all(&state_dir).expect("mkdir the test bpffs");
        let netns = Self {
            name,
            state_dir,
            agent_home: OnceLock::new(),
        };
        must(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&netns.state_dir),
        );
        must(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]));
        netns
    }

    /// The `--state-dir` of an agent in this namespace: on the namespace's own bpffs.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.join("dns-proxy")
    }

    /// The cgroup an agent of this namespace that is not placed elsewhere starts in (made on
    /// first use; its processes killed and it removed with the namespace). An agent makes its
    /// own cgroup below the one it starts in, and one started in the hierarchy's root, where
    /// the tests run, would leave that there.
    pub fn agent_home(&self) -> &Path {
        &self
            .agent_home
            .get_or_init(|| TestCgroup::new(&format!("{}-agent", self.name)))
            .path
    }

    /// `nsenter` into this namespace (not `ip netns exec`, which remounts /sys and hides the
    /// cgroup2 mount), in [`Netns::agent_home`], with `DNS_PROXY_STATE_DIR` set for an agent.
    pub fn nsenter(&self) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            // $0 is the cgroup; "$@" nsenter's arguments.
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec nsenter "$@""#)
            .arg(self.agent_home())
            .arg(format!("--net=/run/netns/{}", self.name))
            .env("DNS_PROXY_STATE_DIR", self.state_dir())
            .arg("--");
        command
    }

    /// Adds the IPv6 `address` (with its prefix length) to `interface`, usable at once
    /// (nodad: without duplicate address detection's delay).
    pub fn add_ipv6(&self, interface: &str, address: &str) {
        must(Command::new("ip").args([
            "-n", &self.name, "-6", "addr", "add", address, "dev", interface, "nodad",
        ]));
    }

    /// `ip netns exec NAME program args...`: the program sees /etc/netns/NAME/resolv.conf.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.state_dir)
            .status();
        let _ = fs::remove_dir(&self.state_dir);
    }
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` shows as `/etc/resolv.conf`;
/// removed on drop.
pub(crate) struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    pub(crate) fn new(netns: &Netns, nameservers: &[IpAddr]) -> Self {
        let guard = Self {
            dir: PathBuf::from("/etc/netns").join(&netns.name),
        };
        fs::create_dir_all(&guard.dir).expect("mkdir /etc/netns/NAME");
        guard.write(nameservers);
        guard
    }

    pub(crate) fn write(&self, nameservers: &[IpAddr]) {
        self.write_with_timeout(nameservers, 2);
    }

    /// `nameservers` with no options: glibc's defaults (5 s a try, 2 tries).
    pub(crate) fn write_with_defaults(&self, nameservers: &[IpAddr]) {
        let text: String = nameservers
            .iter()
            .map(|nameserver| format!("nameserver {nameserver}\n"))
            .collect();
        fs::write(self.dir.join("resolv.conf"), text).expect("write resolv.conf");
    }

    /// `nameservers`, each waited on `seconds` (glibc's `options timeout:`), one attempt.
    pub(crate) fn write_with_timeout(&self, nameservers: &[IpAddr], seconds: u32) {
        let mut text = String::new();
        for nameserver in nameservers {
            text.push_str(&format!("nameserver {nameserver}\n"));
        }
        text.push_str(&format!("options timeout:{seconds} attempts:1\n"));
        fs::write(self.dir.join("resolv.conf"), text).expect("write resolv.conf");
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
