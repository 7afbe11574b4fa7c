//! Whether the agent's programs are still attached to its cgroup.
//!
//! Another process with the rights to (`bpftool link detach`) can detach the agent's links
//! from the cgroup while the agent holds them: lookups then go direct, unseen, and nothing
//! said so (helper-129: `/readyz` said ready for over a minute). The kernel tells a link's
//! holder which cgroup it is attached to, in `/proc/self/fdinfo`, with no capability (the
//! agent has dropped them by then): `cgroup_id` reads 0 once the link is detached.
use std::{fs, io};

/// The agent's links to one cgroup, by the file descriptors that hold them.
#[derive(Debug, Default)]
pub struct AttachedLinks {
    links: Vec<HeldLink>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeldLink {
    fd: u32,
    id: u32,
}

/// What `/proc/self/fdinfo/<fd>` says of a cgroup link.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CgroupLinkInfo {
    pub(super) id: u32,
    /// 0 once detached.
    pub(super) cgroup_id: u64,
    /// `cgroup/sock_release`'s, `connect4`'s...; `None` where fdinfo does not say.
    pub(super) attach_type: Option<u32>,
}

impl AttachedLinks {
    /// The cgroup links this process holds to cgroup `cgroup_id`: read once, after the
    /// programs are attached, while the agent holds few descriptors.
    pub fn find(cgroup_id: u64) -> io::Result<Self> {
        let mut links = Vec::new();
        for entry in fs::read_dir("/proc/self/fdinfo")? {
            let Ok(fd) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(info) = read_link_info(fd)
                && info.cgroup_id == cgroup_id
            {
                links.push(HeldLink { fd, id: info.id });
            }
        }
        Ok(Self { links })
    }

    /// How many links are watched.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The ids of the links detached from their cgroup while the agent still holds them. A
    /// descriptor that no longer holds the same link (the agent detached it itself, at a
    /// graceful stop, and the number went to another file) is not counted.
    pub fn detached(&self) -> Vec<u32> {
        self.links
            .iter()
            .filter(|link| {
                read_link_info(link.fd)
                    .is_some_and(|info| info.id == link.id && info.cgroup_id == 0)
            })
            .map(|link| link.id)
            .collect()
    }
}

/// The cgroup link descriptor `fd` holds, if it holds one.
pub(super) fn cgroup_link_of(fd: std::os::fd::RawFd) -> Option<CgroupLinkInfo> {
    read_link_info(u32::try_from(fd).ok()?)
}

/// The descriptor of this process's that holds cgroup link `link_id`, if any.
pub(super) fn fd_of_link(link_id: u32) -> io::Result<Option<std::os::fd::RawFd>> {
    for entry in fs::read_dir("/proc/self/fdinfo")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if read_link_info(fd).is_some_and(|info| info.id == link_id) {
            return Ok(std::os::fd::RawFd::try_from(fd).ok());
        }
    }
    Ok(None)
}

/// The cgroup link `fd` holds, if it holds one.
fn read_link_info(fd: u32) -> Option<CgroupLinkInfo> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    parse_cgroup_link(&text)
}

/// Reads `link_type: cgroup`, `link_id` and `cgroup_id` from a descriptor's fdinfo.
fn parse_cgroup_link(fdinfo: &str) -> Option<CgroupLinkInfo> {
    let field = |name: &str| {
        fdinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim())
        })
    };
    if field("link_type")? != "cgroup" {
        return None;
    }
    Some(CgroupLinkInfo {
        id: field("link_id")?.parse().ok()?,
        cgroup_id: field("cgroup_id")?.parse().ok()?,
        attach_type: field("attach_type").and_then(|kind| kind.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_cgroup_links_fdinfo_and_nothing_else() {
        let attached = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2065\nlink_type:\tcgroup\n\
                        link_id:\t41\nprog_tag:\t1a2b3c4d5e6f7a8b\nprog_id:\t312\n\
                        cgroup_id:\t9876\nattach_type:\t10\n";
        assert_eq!(
            parse_cgroup_link(attached),
            Some(CgroupLinkInfo {
                id: 41,
                cgroup_id: 9876,
                attach_type: Some(10),
            })
        );
        let detached = attached.replace("cgroup_id:\t9876", "cgroup_id:\t0");
        assert_eq!(
            parse_cgroup_link(&detached).map(|info| info.cgroup_id),
            Some(0)
        );
        let netns = "link_type:\tnetns\nlink_id:\t42\nprog_id:\t313\nnetns_ino:\t4026531840\n";
        assert_eq!(parse_cgroup_link(netns), None);
        assert_eq!(parse_cgroup_link("pos:\t0\nflags:\t02\n"), None);
    }

    /// This process holds no cgroup link: none found, none detached.
    #[test]
    fn a_process_without_links_watches_none() {
        let links = AttachedLinks::find(1).expect("fdinfo readable");
        assert!(links.is_empty());
        assert!(links.detached().is_empty());
    }
}
