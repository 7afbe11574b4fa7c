//! `sock_release`'s link, pinned in the table's directory so that it stays attached when the
//! agent stops, and pinned again if its pin goes while the agent runs.
use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use aya::programs::{
    CgroupSock,
    cgroup_sock::CgroupSockLinkId,
    links::{FdLink, PinnedLink},
};
use dns_proxy_common::names;

/// `sock_release`'s pinned link, and which file pins it: another agent's start, or the state
/// directory's removal, takes the pin away while this agent runs.
pub struct ReleasePin {
    /// The table's directory, where the link is pinned.
    dir: PathBuf,
    path: PathBuf,
    state: Mutex<PinState>,
}

struct PinState {
    /// The handle the pin was made with. It holds the link attached while the agent runs,
    /// whatever becomes of the pin.
    pinned: PinnedLink,
    /// A second handle on the same link, to pin it again with: a pin takes the handle it is
    /// made with, and a failed one closes it. `None` once a pin again failed.
    spare: Option<FdLink>,
    /// The pin's inode (bpffs numbers its inodes afresh): another pin at the path is not ours.
    inode: u64,
    /// Another agent's link took the pin (a takeover on this cgroup): not pinned again.
    replaced: bool,
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
        let (pinned, spare, inode) = pin_over(link, dir, &path)?;
        Ok(Self {
            dir: dir.to_owned(),
            path,
            state: Mutex::new(PinState {
                pinned,
                spare,
                inode,
                replaced: false,
            }),
        })
    }

    /// Where the link is pinned.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the pin is still this agent's link's.
    pub fn still_pinned(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        std::fs::metadata(&self.path).is_ok_and(|pinned| pinned.ino() == state.inode)
    }

    /// Pins the link again if its pin is gone (the state directory removed while the agent
    /// runs, its directories made again by then), so that the agent's stop still leaves it
    /// attached; whether it did. Never once another agent's link took the pin, or once
    /// `replaced` (a newer agent took over: its own link is the one to leave).
    pub fn restore(&self, replaced: bool) -> Result<bool, String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.replaced {
            return Ok(false);
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(pinned) => {
                state.replaced = pinned.ino() != state.inode;
                return Ok(false);
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(format!("reading {}: {err}", self.path.display())),
        }
        if replaced {
            state.replaced = true;
            return Ok(false);
        }
        let spare = state
            .spare
            .take()
            .ok_or("it could not be pinned again before")?;
        let (pinned, spare, inode) = pin_over(spare, &self.dir, &self.path)?;
        // The handle pinned before becomes the spare: the link has two handles again.
        let before = std::mem::replace(&mut state.pinned, pinned);
        state.spare = Some(spare.unwrap_or_else(|| FdLink::from(before)));
        state.inode = inode;
        Ok(true)
    }
}

/// Pins `link` at `path`, replacing what is there, and opens a second handle on it: the pin,
/// the second handle (`None` if the kernel gave none), and the pin's inode. It is pinned under
/// a name of its own first, then renamed over the last: never a moment without one.
fn pin_over(
    link: FdLink,
    dir: &Path,
    path: &Path,
) -> Result<(PinnedLink, Option<FdLink>, u64), String> {
    // bpffs takes no `.` in a name.
    let staged = dir.join(format!("sock_release_staged_{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let pinned = link
        .pin(&staged)
        .map_err(|err| format!("pinning it at {}: {err}", staged.display()))?;
    // From the name no other agent writes to, so that it is surely this link.
    let spare = PinnedLink::from_pin(&staged)
        .map(FdLink::from)
        .map_err(|err| log::debug!("no second handle on {}: {err}", staged.display()))
        .ok();
    if let Err(err) = std::fs::rename(&staged, path) {
        let _ = std::fs::remove_file(&staged);
        return Err(format!(
            "renaming {} to {}: {err}",
            staged.display(),
            path.display()
        ));
    }
    let inode = std::fs::metadata(path)
        .map_err(|err| format!("reading {}: {err}", path.display()))?
        .ino();
    Ok((pinned, spare, inode))
}
