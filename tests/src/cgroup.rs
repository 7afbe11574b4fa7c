//! cgroup2 for the tests: where it is mounted, and [`TestCgroup`], a child cgroup whose
//! processes are killed and which is removed on drop. The tests attach programs to their own
//! child cgroups only, never to the root.
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::require_root;

/// A child cgroup of the cgroup2 root; its processes are killed and it is removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        require_root();
        let path = cgroup2_root().join(name);
        fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        Self { path }
    }

    fn pids(&self) -> Vec<String> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|pids| pids.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Kills every process in the subtree, the agent's own child cgroup included.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        remove_cgroup_tree(&self.path);
    }
}

/// rmdir a cgroup and its (empty) descendants, deepest first.
pub(crate) fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        // EBUSY for a moment while killed processes are still being reaped.
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (never hard-coded: hybrid hosts mount
/// it in a subfolder).
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next() == Some("cgroup2"))
                .then(|| mount.split_whitespace().nth(4))?
        })
        .map(PathBuf::from)
        .expect("no cgroup2 filesystem mounted")
}
