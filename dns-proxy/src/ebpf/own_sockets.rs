//! The agent's own sockets, marked in `AGENT_SOCKETS` (socket storage, freed by the kernel with
//! the socket) as the agent makes them: its programs never redirect, refuse or decode them,
//! whichever cgroup the agent is in when it makes or uses them.
//!
//! The agent's cgroup (`AGENT_CGROUPS`) keeps the same sockets, and those of every other agent
//! of the block, out of the redirect while the agent is in it. The mark is what holds when
//! something moved the agent out (a service manager, an operator's `echo PID >
//! cgroup.procs`): in the cgroup it redirects, an upstream socket made before it moved back
//! would have sent its queries back to itself, and its listeners' answers, sent from the
//! block's addresses, would have been refused as another's.
use std::{
    os::fd::{AsFd, AsRawFd as _},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, SkStorage};

use crate::log_limit::RateLimited;

/// A socket's mark: any value; the programs only ask whether there is one.
const MARKED: u8 = 1;

/// Where the agent marks its sockets. Cheap to clone: one map for the whole agent.
#[derive(Clone, Default)]
pub struct OwnSockets {
    /// `None`: no programs loaded (the proxy on its own, as its tests run it): nothing to mark.
    marks: Option<Arc<Marks>>,
}

struct Marks {
    /// Updated under the lock: aya's update takes the map mutably. Sockets are made every
    /// 128 queries per upstream socket and once per TCP connection, so it is seldom taken.
    map: Mutex<SkStorage<MapData, u8>>,
    failed_log: RateLimited,
}

impl OwnSockets {
    pub(super) fn new(map: SkStorage<MapData, u8>) -> Self {
        Self {
            marks: Some(Arc::new(Marks {
                map: Mutex::new(map),
                failed_log: RateLimited::counting(
                    Duration::from_secs(10),
                    "sockets of the agent's not marked as its own",
                ),
            })),
        }
    }

    /// Marks `socket` as the agent's own, before it is bound or connected. A mark that cannot
    /// be made (the kernel out of memory) is logged, and the socket used anyway: while the
    /// agent is in its own cgroup, that cgroup keeps it out of the redirect all the same.
    pub fn mark(&self, socket: impl AsFd) {
        let Some(marks) = &self.marks else {
            return;
        };
        let fd = socket.as_fd();
        let marked = marks
            .map
            .lock()
            .expect("not poisoned")
            .insert(&fd, MARKED, 0);
        if let Err(err) = marked {
            marks.failed_log.warn(|failed| {
                format!(
                    "cannot mark socket {} as the agent's own ({err}; {failed} sockets): only \
                     the agent's cgroup keeps their queries from being redirected to itself",
                    fd.as_raw_fd()
                )
            });
        }
    }
}

impl std::fmt::Debug for OwnSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnSockets")
            .field("marks", &self.marks.is_some())
            .finish()
    }
}
