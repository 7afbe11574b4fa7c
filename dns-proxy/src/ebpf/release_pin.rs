//! `sock_release`'s link, pinned in the table's directory so that it stays attached when the
//! agent stops, and pinned again if its pin goes while the agent runs.
//!
//! What sits at the pin's path is told by the link's id, read from the kernel, not by the
//! file: an inode told a pin shown again from under a bpffs mounted over it for another
//! agent's, and a directory or a map put there for one too (helper-157).
use std::{
    ffi::CString,
    io, mem,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupSock,
    cgroup_sock::CgroupSockLinkId,
    links::{FdLink, PinnedLink},
};
use dns_proxy_common::names;

use super::links;

/// `sock_release`'s pinned link.
pub struct ReleasePin {
    path: PathBuf,
    /// The handle the link was first pinned with. It holds the link attached while the agent
    /// runs, whatever becomes of the pin.
    _pinned: PinnedLink,
    /// A handle of the agent's own on the same link, to pin it again with as often as it
    /// must (aya's pin takes the handle it pins, and a failed one closes it).
    link: OwnedFd,
    /// The kernel's id of the link.
    link_id: u32,
}

/// What is at the pin's path now.
#[derive(Debug, PartialEq, Eq)]
pub enum PinnedNow {
    /// This agent's link.
    Ours,
    /// Another agent's link, on this cgroup: one that took over, or that this one took over
    /// from and that pinned its own again.
    Another,
    /// Nothing.
    Gone,
    /// Something else, or nothing that can be read: what.
    Unknown(String),
}

impl ReleasePin {
    /// Pins `sock_release`'s link in the table's directory `dir`, in place of the one an
    /// earlier agent left there, so that it stays attached when this agent stops: a UDP socket
    /// released while no agent runs (between a stop and a start, after a SIGKILL) still takes
    /// its note out of `CONNECTED`. Left there for good, the note would hold its origin, and
    /// its share of `CONNECTED`, until the table is removed (helper-154: a workload that held
    /// 65,536 sockets across one restart left the map full). The program only takes out
    /// notes: it redirects nothing, and needs no agent. An earlier agent's link, unpinned, is
    /// detached once that agent holds it no more (at once, or when it stops after a
    /// takeover); while both run, both programs see each socket released, and only one gives
    /// its charge back.
    ///
    /// On an error the link is gone (a failed pin drops it), and the caller attaches anew.
    pub fn pin(
        program: &mut CgroupSock,
        link: CgroupSockLinkId,
        dir: &Path,
        cgroup_id: u64,
    ) -> Result<Self, String> {
        let link = program.take_link(link).map_err(|err| err.to_string())?;
        let link = FdLink::try_from(link).map_err(|err| format!("not a bpf_link: {err}"))?;
        // One per cgroup: agents on other cgroups that share the table keep theirs.
        let path = dir.join(format!("{}_{cgroup_id}", names::SOCK_RELEASE_LINK));
        // Pinned under a name of its own, then renamed over the last: never a moment without
        // one. (bpffs takes no `.` in a name.)
        let staged = dir.join(format!("sock_release_staged_{}", std::process::id()));
        let _ = std::fs::remove_file(&staged);
        let pinned = link
            .pin(&staged)
            .map_err(|err| format!("pinning it at {}: {err}", staged.display()))?;
        let renamed = (|| {
            // From the name no other agent writes to, so that it is surely this link.
            let own = bpf_obj_get(&staged).map_err(|err| format!("opening its pin: {err}"))?;
            let link_id =
                links::cgroup_link_id(own.as_raw_fd()).ok_or("its pin holds no cgroup link")?;
            std::fs::rename(&staged, &path)
                .map_err(|err| format!("renaming it to {}: {err}", path.display()))?;
            Ok::<_, String>((own, link_id))
        })();
        match renamed {
            Ok((link, link_id)) => Ok(Self {
                path,
                _pinned: pinned,
                link,
                link_id,
            }),
            Err(problem) => {
                let _ = std::fs::remove_file(&staged);
                Err(format!("{}: {problem}", staged.display()))
            }
        }
    }

    /// Where the link is pinned.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is at the pin's path now.
    pub fn pinned_now(&self) -> PinnedNow {
        let held = match bpf_obj_get(&self.path) {
            Ok(held) => held,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return PinnedNow::Gone,
            Err(err) => return PinnedNow::Unknown(format!("{}: {err}", self.path.display())),
        };
        match links::cgroup_link_id(held.as_raw_fd()) {
            Some(id) if id == self.link_id => PinnedNow::Ours,
            Some(_) => PinnedNow::Another,
            None => PinnedNow::Unknown(format!("{} holds no cgroup link", self.path.display())),
        }
    }

    /// Pins the link again if nothing is at its path (the state directory removed while the
    /// agent runs, its directories made again by then), so that the agent's stop still leaves
    /// it attached; whether it did. Another agent's link there is left alone, and so is one
    /// pinned there first by another agent that saw the pin gone too: the kernel pins nothing
    /// over a file.
    pub fn restore(&self) -> Result<bool, String> {
        match self.pinned_now() {
            PinnedNow::Ours | PinnedNow::Another => Ok(false),
            PinnedNow::Unknown(what) => Err(what),
            PinnedNow::Gone => match bpf_obj_pin(self.link.as_fd(), &self.path) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(err) => Err(format!("pinning it at {}: {err}", self.path.display())),
            },
        }
    }
}

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
        bpf_fd: fd.map_or(0, |fd| fd.as_raw_fd() as u32),
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
