//! The links an agent leaves attached when it stops, pinned in the table's directory, and
//! pinned again whenever a pin is gone while the agent runs: `sock_release`'s, so that a socket
//! released while no agent runs still takes its note out of `CONNECTED`, and in node mode the
//! egress guard's, so that a pod's socket still connected to the block while no agent serves
//! is refused as it sends.
//!
//! What sits at the pin's path is told by the link's id, cgroup and attach type, read from the
//! kernel, never by the file: an inode told a pin shown again from under a bpffs mounted over it for
//! another agent's, and a directory or a map put there for one too (helper-157).
use std::{
    ffi::CString,
    io, mem,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::programs::links::FdLink;
use dns_proxy_common::names;

use super::links;

/// Which link a pin holds, and what its pins are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinKind {
    /// The program, as the logs name it.
    pub program: &'static str,
    /// The pin's name, followed by `_` and the redirected cgroup's id.
    link: &'static str,
    /// The prefix of the name a start pins its link under before it renames it over the last.
    staged: &'static str,
    /// What the pin keeps while no agent runs.
    pub keeps: &'static str,
    /// What is lost while no agent runs if the link is not pinned.
    pub without: &'static str,
}

/// `sock_release`'s link.
pub const RELEASE: PinKind = PinKind {
    program: names::SOCK_RELEASE,
    link: names::SOCK_RELEASE_LINK,
    staged: "sock_release_staged_",
    keeps: "sockets released while no agent runs still let go of their notes",
    without: "this cgroup's UDP sockets released while no agent runs stay noted in CONNECTED \
              until the table is removed",
};

/// The egress guard's link (node mode), whichever of its two programs this kernel takes.
pub const EGRESS: PinKind = PinKind {
    program: names::EGRESS,
    link: names::EGRESS_LINK,
    staged: "egress_staged_",
    keeps: "a pod's socket still connected to the block is refused at once while no agent \
            serves",
    without: "a pod's socket still connected to the block while no agent serves is refused \
              by the node's port unreachable, which the kernel rate-limits: some of its \
              lookups wait out their timeout",
};

/// A link held by the agent, and where it is pinned.
pub struct LinkPin {
    kind: PinKind,
    /// The table's directory.
    dir: PathBuf,
    path: PathBuf,
    cgroup_id: u64,
    /// Holds the link attached while the agent runs, whatever becomes of the pin.
    _held: FdLink,
    /// A descriptor of the agent's own on the same link, to pin it with as often as it must
    /// (aya's pin takes the handle it pins, and a failed one closes it: one failure, at the
    /// start or later, ended the pinning for good; helper-157, helper-158).
    link: OwnedFd,
    /// The kernel's id of the link.
    link_id: u32,
    /// Its attach type, as fdinfo says it: another agent's link of this kind has the same.
    attach_type: Option<u32>,
    /// Unpinned for good ([`unpin_for_good`](LinkPin::unpin_for_good)): neither the heartbeat
    /// nor the stop pins it again.
    given_up: AtomicBool,
}

/// What is at the pin's path now.
#[derive(Debug, PartialEq, Eq)]
pub enum PinnedNow {
    /// This agent's link.
    Ours,
    /// Another agent's link to this cgroup: one that took over, or that this one took over
    /// from and that pinned its own again.
    Another,
    /// Nothing.
    Gone,
    /// Something else (a directory, a map, another program's link): what. This agent's link
    /// is pinned nowhere, and goes with it.
    Blocked(String),
    /// What is there cannot be read (another filesystem mounted over the directory): why.
    Unknown(String),
}

impl LinkPin {
    /// Holds `held`, a link of `kind` the agent took from its program, to be pinned in the
    /// table's directory `dir` ([`pin_at_start`](Self::pin_at_start)). On an error the link
    /// is gone, and the caller attaches anew.
    pub fn hold(kind: PinKind, held: FdLink, dir: &Path, cgroup_id: u64) -> Result<Self, String> {
        let link_id = held
            .info()
            .map_err(|err| format!("reading the link's id: {err}"))?
            .id();
        let fd = links::fd_of_link(link_id)
            .map_err(|err| format!("reading /proc/self/fdinfo: {err}"))?
            .ok_or_else(|| format!("no descriptor of this process holds link {link_id}"))?;
        // SAFETY: `fd` is the descriptor `held` owns, open while `held` lives, which is past
        // this call.
        let link = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map_err(|err| format!("duplicating the link's descriptor: {err}"))?;
        let attach_type = links::cgroup_link_of(link.as_raw_fd()).and_then(|info| info.attach_type);
        Ok(Self {
            kind,
            dir: dir.to_owned(),
            // One per cgroup: agents on other cgroups that share the table keep theirs.
            path: dir.join(format!("{}_{cgroup_id}", kind.link)),
            cgroup_id,
            _held: held,
            link,
            link_id,
            attach_type,
            given_up: AtomicBool::new(false),
        })
    }

    /// Pins the link in place of the one an earlier agent left, so that it stays attached
    /// when this agent stops. `sock_release`'s: a UDP socket released while no agent runs
    /// (between a stop and a start, after a SIGKILL) still takes its note out of `CONNECTED`.
    /// Left there for good, the note would hold its origin, and its share of `CONNECTED`,
    /// until the table is removed (helper-154: a workload that held 65,536 sockets across one
    /// restart left the map full). The program only takes out notes: it redirects nothing, and
    /// needs no agent. The egress guard's: see `egress::unserved` in the programs. An earlier
    /// agent's link, unpinned, is detached once that agent holds it no more (at once, or when
    /// it stops after a takeover); while both run, both programs see each socket released (and
    /// only one gives its charge back), and each packet.
    ///
    /// Pinned under a name of its own first, then renamed over the last: never a moment
    /// without one. On an error the link stays held (attached while the agent runs), and the
    /// heartbeat pins it once nothing is in the way.
    pub fn pin_at_start(&self) -> Result<(), String> {
        remove_stale_staged_pins(&self.dir, self.kind);
        remove_pins_of_removed_cgroups(&self.dir, self.kind);
        // The link's id too: agents in PID namespaces of their own may share a pid.
        let staged = format!(
            "{}{}_{}",
            self.kind.staged,
            std::process::id(),
            self.link_id
        );
        let staged = self.dir.join(staged);
        let _ = std::fs::remove_file(&staged);
        bpf_obj_pin(self.link.as_fd(), &staged)
            .map_err(|err| format!("pinning it at {}: {err}", staged.display()))?;
        std::fs::rename(&staged, &self.path).map_err(|err| {
            let _ = std::fs::remove_file(&staged);
            format!(
                "renaming {} to {}: {err}",
                staged.display(),
                self.path.display()
            )
        })
    }

    /// Which link this is.
    pub fn kind(&self) -> PinKind {
        self.kind
    }

    /// Pins the link in place of another agent's link on this cgroup, if that is what is
    /// pinned (one that took over and stopped, or died): for an agent that serves alone, so
    /// that the guard left attached is the one whose agent ran last. `None` if another's is
    /// not there.
    pub fn take_back(&self) -> Option<Result<(), String>> {
        (!self.given_up() && self.pinned_now() == PinnedNow::Another).then(|| self.pin_at_start())
    }

    /// Unpins the link if its pin is this agent's, and pins it nowhere again: it is detached
    /// when the agent stops. Whether it was unpinned (an error if it could not be).
    pub fn unpin_for_good(&self) -> Result<bool, String> {
        self.given_up.store(true, Ordering::Relaxed);
        if self.pinned_now() != PinnedNow::Ours {
            return Ok(false);
        }
        std::fs::remove_file(&self.path)
            .map(|()| true)
            .map_err(|err| format!("cannot unpin {}: {err}", self.path.display()))
    }

    /// Whether it was unpinned for good.
    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Relaxed)
    }

    /// Where the link is pinned.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table's directory, where the link is pinned.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What is at the pin's path now.
    pub fn pinned_now(&self) -> PinnedNow {
        // The directory, or what is left of its path (a tmpfs mounted over the state
        // directory hides the table's directory and the pin, which still holds).
        let nearest = self.dir.ancestors().find(|dir| dir.exists());
        if nearest.is_some_and(|dir| !crate::host::is_bpffs(dir)) {
            return PinnedNow::Unknown(format!(
                "{} is on no bpf filesystem now (another mounted over it?)",
                self.dir.display()
            ));
        }
        let held = match bpf_obj_get(&self.path) {
            Ok(held) => held,
            // A directory (EACCES), a dangling symbolic link (ENOENT): looked at as files.
            Err(err) => {
                return match std::fs::symlink_metadata(&self.path) {
                    Ok(what) if what.is_dir() || what.file_type().is_symlink() => {
                        PinnedNow::Blocked(format!(
                            "{} is no pin but a {}",
                            self.path.display(),
                            if what.is_dir() {
                                "directory"
                            } else {
                                "symbolic link"
                            }
                        ))
                    }
                    Err(_) if err.kind() == io::ErrorKind::NotFound => PinnedNow::Gone,
                    _ => PinnedNow::Unknown(format!("{}: {err}", self.path.display())),
                };
            }
        };
        let Some(info) = links::cgroup_link_of(held.as_raw_fd()) else {
            return PinnedNow::Blocked(format!("{} holds no cgroup link", self.path.display()));
        };
        if info.id == self.link_id {
            PinnedNow::Ours
        } else if info.cgroup_id != self.cgroup_id {
            PinnedNow::Blocked(format!(
                "{} holds link {}, of cgroup {}, not this one's",
                self.path.display(),
                info.id,
                info.cgroup_id
            ))
        } else if info.attach_type != self.attach_type {
            PinnedNow::Blocked(format!(
                "{} holds link {} of this cgroup, not a {} link",
                self.path.display(),
                info.id,
                self.kind.program
            ))
        } else {
            PinnedNow::Another
        }
    }

    /// Pins the link again if nothing is at its path (the state directory removed while the
    /// agent runs, its directories made again by then), so that the agent's stop still leaves
    /// it attached; whether it did. Another agent's link to this cgroup there is left alone,
    /// and so is one pinned there first by another agent that saw the pin gone too: the
    /// kernel pins nothing over a file.
    pub fn restore(&self) -> Result<bool, String> {
        // A dead start's staged pin goes within a heartbeat of its age, not at the next start.
        remove_stale_staged_pins(&self.dir, self.kind);
        if self.given_up() {
            return Ok(false);
        }
        match self.pinned_now() {
            PinnedNow::Ours | PinnedNow::Another => Ok(false),
            PinnedNow::Blocked(what) | PinnedNow::Unknown(what) => Err(what),
            PinnedNow::Gone => match bpf_obj_pin(self.link.as_fd(), &self.path) {
                Ok(()) => Ok(true),
                // Whatever came there since, it is looked at again.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => match self.pinned_now() {
                    PinnedNow::Blocked(what) | PinnedNow::Unknown(what) => Err(what),
                    _ => Ok(false),
                },
                Err(err) => Err(format!("pinning it at {}: {err}", self.path.display())),
            },
        }
    }
}

/// Removes the staged pins of starts that died between their pin and their rename (a
/// SIGKILL): left, each would keep its agent's program attached until the table is
/// removed. A start renames its staged pin within milliseconds, so one older than
/// [`STAGED_FOR`] is a dead start's. Run at each start and each heartbeat. (Not by its pid:
/// agents in PID namespaces of their own are all pid 1 or so, and `/proc` shows another
/// namespace's pids as gone; helper-159.)
fn remove_stale_staged_pins(dir: &Path, kind: PinKind) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(kind.staged) {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|made| made.modified())
            .ok()
            .and_then(|made| made.elapsed().ok());
        if age.is_some_and(|age| age > STAGED_FOR) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes the pins of links of `kind` whose cgroup is gone: the kernel detached each
/// when its cgroup was removed (fdinfo says cgroup 0), and the pin alone held it, its program
/// and maps. An agent started on a cgroup made anew (a service's, a pod's) pins a link of its
/// own, under the new cgroup's id, so one such pin piled up at each (helper-163). Run at each
/// start.
fn remove_pins_of_removed_cgroups(dir: &Path, kind: PinKind) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{}_", kind.link);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_link_pin = name
            .to_string_lossy()
            .strip_prefix(&prefix)
            .is_some_and(|id| id.parse::<u64>().is_ok());
        if !is_link_pin {
            continue;
        }
        let Ok(held) = bpf_obj_get(&entry.path()) else {
            continue;
        };
        if links::cgroup_link_of(held.as_raw_fd()).is_some_and(|info| info.cgroup_id == 0) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => log::info!(
                    "removed {}: its cgroup is gone, and its link with it",
                    entry.path().display()
                ),
                Err(err) => log::debug!("cannot remove {}: {err}", entry.path().display()),
            }
        }
    }
}

/// How long a start's staged pin may live before it is taken for a dead start's.
const STAGED_FOR: std::time::Duration = std::time::Duration::from_secs(10);

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;

/// `union bpf_attr` as `BPF_OBJ_PIN` and `BPF_OBJ_GET` read it (the fields after are zero).
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf(cmd, attr)` for the two path commands; the syscall's return value.
fn bpf_obj(cmd: libc::c_long, path: &Path, fd: Option<BorrowedFd<'_>>) -> io::Result<i64> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.map_or(0, |fd| fd.as_raw_fd().cast_unsigned()),
        ..ObjAttr::default()
    };
    // SAFETY: `attr` is a live `union bpf_attr` prefix of the size passed, whose pathname
    // points to `path`, NUL-terminated and alive for the call; the kernel only reads them.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            mem::size_of::<ObjAttr>() as libc::c_uint,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}

/// Opens the BPF object pinned at `path` (close-on-exec, as the kernel makes every BPF fd).
fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    let fd = bpf_obj(BPF_OBJ_GET, path, None)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the BPF object `fd` holds at `path`; fails with `AlreadyExists` if anything is there.
fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    bpf_obj(BPF_OBJ_PIN, path, Some(fd)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staged pin older than a start takes is a dead start's, whatever its pid; a fresh one
    /// (a start of another agent under way) and every other name are left.
    #[test]
    fn only_staged_pins_older_than_a_start_are_removed() {
        let dir = std::env::temp_dir().join(format!("link-pin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let made = |name: &str, age: std::time::Duration| {
            let file = std::fs::File::create(dir.join(name)).expect("a file");
            file.set_modified(std::time::SystemTime::now() - age)
                .expect("set its time");
        };
        made("sock_release_staged_1_40", STAGED_FOR * 2);
        made("sock_release_staged_1_41", std::time::Duration::ZERO);
        made("sock_release_link_9", STAGED_FOR * 2);
        made("egress_staged_1_42", STAGED_FOR * 2);
        remove_stale_staged_pins(&dir, RELEASE);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("read it")
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert_eq!(
            left,
            [
                "egress_staged_1_42",
                "sock_release_link_9",
                "sock_release_staged_1_41"
            ]
        );
    }
}
