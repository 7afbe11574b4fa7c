//! The agent's background tasks, beside the listeners: the heartbeat that tells other agents
//! this one is alive, and the walk that forgets the origins of cgroups that are gone.
use std::{path::PathBuf, sync::Arc, time::Duration};

use super::LOG;
use crate::{agents, agents::HEARTBEAT_INTERVAL, drain, ebpf::ServerTable, workload};

/// Starts the heartbeat and the forgetting of the origins of cgroups that are gone (named from
/// `root`), until `stop`.
pub(super) fn start(
    agents: &Arc<agents::Agents>,
    servers: &Arc<ServerTable>,
    root: PathBuf,
    stop: &drain::Signal,
) {
    tokio::spawn(keep_alive(Arc::clone(agents), stop.clone()));
    tokio::spawn(forget_departed(Arc::clone(servers), root, stop.clone()));
}

/// Says this agent is alive, every [`HEARTBEAT_INTERVAL`] until `stop`, and logs once when a
/// newer agent has taken over.
async fn keep_alive(agents: Arc<agents::Agents>, stop: drain::Signal) {
    let mut replaced = false;
    loop {
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
        agents.heartbeat();
        if !replaced && agents.replaced() {
            replaced = true;
            log::info!(
                target: LOG,
                "a newer agent has taken over: new lookups go to it; this one answers what \
                 reaches it until it is stopped (/readyz now says 503)"
            );
        }
    }
}

/// How often the table of servers is checked for origins of cgroups that are gone.
const FORGET_DEPARTED_EVERY: Duration = Duration::from_secs(60);
/// Walks of the cgroup tree a cgroup must be missing from before its origins are forgotten:
/// one made while a walk passes is in the next.
const WALKS_MISSING: u8 = 3;
/// How long an origin of a cgroup that is gone must have carried no query to be forgotten.
const QUIET_BEFORE_FORGETTING: Duration = Duration::from_secs(600);

/// Forgets, every [`FORGET_DEPARTED_EVERY`] until `stop`, the origins of cgroups that are gone
/// ([`ServerTable::forget_departed`]): pods come and go, and each asks through origins of its
/// own. `DNS_PROXY_TEST_FORGET_DEPARTED=SECONDS` (for the integration tests only) checks that
/// often and forgets what was quiet for twice that.
async fn forget_departed(servers: Arc<ServerTable>, root: PathBuf, stop: drain::Signal) {
    let test_seconds = std::env::var("DNS_PROXY_TEST_FORGET_DEPARTED")
        .ok()
        .and_then(|seconds| seconds.parse::<u64>().ok());
    let (every, quiet) = match test_seconds {
        Some(seconds) => (
            Duration::from_secs(seconds),
            Duration::from_secs(2 * seconds),
        ),
        None => (FORGET_DEPARTED_EVERY, QUIET_BEFORE_FORGETTING),
    };
    let mut missing: std::collections::HashMap<u64, u8> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(every) => {}
        }
        let (servers, root) = (Arc::clone(&servers), root.clone());
        let walked = tokio::task::spawn_blocking(move || {
            let live = workload::CgroupPaths::new(root).live_ids();
            let live = match live {
                Ok(live) => live,
                Err(err) => {
                    log::debug!(target: LOG, "walking the cgroup tree: {err}");
                    return (missing, None);
                }
            };
            let named = servers.cgroups();
            missing.retain(|id, _| named.contains(id));
            for id in named {
                if live.contains(&id) {
                    missing.remove(&id);
                } else {
                    *missing.entry(id).or_default() += 1;
                }
            }
            let gone = |id| {
                missing
                    .get(&id)
                    .is_some_and(|walks| *walks >= WALKS_MISSING)
            };
            let result = servers.forget_departed(gone, quiet);
            (missing, Some(result))
        })
        .await;
        match walked {
            Ok((still_missing, result)) => {
                missing = still_missing;
                if let Some(result) = result.filter(|result| result.forgotten > 0) {
                    log::info!(
                        target: LOG,
                        "forgot {} origins of cgroups that are gone ({} in the table)",
                        result.forgotten,
                        result.kept
                    );
                }
            }
            Err(err) => {
                log::warn!(target: LOG, "forgetting the origins of cgroups that are gone: {err}");
                return;
            }
        }
    }
}
