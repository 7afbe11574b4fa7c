//! What the kernel holds, read with bpftool rather than through the agent: the indexes the
//! agents' pinned server table gives servers, its origins per cgroup, how many entries a map
//! of the programs attached to a cgroup has, and which programs are attached.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::must;

/// The index the agents' server table (pinned below `state_dir`) gives `server_ip:port` (for
/// any cgroup), read with bpftool: the kernel's own record, not the agent's view of it.
pub fn server_index(state_dir: &Path, server_ip: impl Into<IpAddr>, port: u16) -> u32 {
    server_index_for(state_dir, server_ip, port, None)
}

/// The index the agents' server table gives `server_ip:port` asked by the cgroup whose id is
/// `cgroup_id` (any cgroup if `None`).
pub fn server_index_for(
    state_dir: &Path,
    server_ip: impl Into<IpAddr>,
    port: u16,
    cgroup_id: Option<u64>,
) -> u32 {
    let server_ip: IpAddr = server_ip.into();
    let octets: Vec<u8> = match server_ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let (pinned, entries) = table_map(state_dir, "SERVERS");
    let found = entries.iter().find_map(|(key, value)| {
        // Origin: the server (four address words and the port, network order; the family),
        // 4 bytes of padding, then the cgroup id (host order).
        let cgroup = u64::from_ne_bytes(value[24..32].try_into().expect("8 bytes"));
        let matches = value[..octets.len()] == octets[..]
            && value[16..18] == port.to_be_bytes()
            && cgroup_id.is_none_or(|id| id == cgroup);
        // The key is the index, with bit 16 set for the IPv6 block's.
        matches.then(|| u32::from_ne_bytes([key[0], key[1], key[2], key[3]]) & 0xffff)
    });
    found.unwrap_or_else(|| panic!("{server_ip}:{port} has no index in {}", pinned.display()))
}

/// How many origins (indexes) of the agents' server table name the cgroup `cgroup_id`.
pub fn origins_of_cgroup(state_dir: &Path, cgroup_id: u64) -> usize {
    let (_, entries) = table_map(state_dir, "SERVERS");
    entries
        .iter()
        .filter(|(_, value)| {
            u64::from_ne_bytes(value[24..32].try_into().expect("8 bytes")) == cgroup_id
        })
        .count()
}

/// How many slots of the table of servers cgroup `cgroup_id` is charged, as the programs see
/// it: its count in the `CGROUP_ORIGINS` pinned beside the table, with the agent's correction
/// in `CGROUP_ADJUST`; `None` if it has neither.
pub fn charge_of_cgroup(state_dir: &Path, cgroup_id: u64) -> Option<i64> {
    let of_cgroup = |name: &str| {
        let (_, entries) = table_map(state_dir, name);
        entries.iter().find_map(|(key, value)| {
            (u64::from_ne_bytes(key[..8].try_into().expect("8 bytes")) == cgroup_id)
                .then(|| i64::from_ne_bytes(value[..8].try_into().expect("8 bytes")))
        })
    };
    match (of_cgroup("CGROUP_ORIGINS"), of_cgroup("CGROUP_ADJUST")) {
        (None, None) => None,
        (count, correction) => Some(count.unwrap_or(0) + correction.unwrap_or(0)),
    }
}

/// How many entries map `name`, pinned beside the agents' table of servers below
/// `state_dir`, holds: read through its pin, so whether an agent runs plays no part.
pub fn pinned_entries(state_dir: &Path, name: &str) -> usize {
    table_map(state_dir, name).1.len()
}

/// How many notes of `CONNECTED` (connected sockets) cgroup `cgroup_id` is charged with, in
/// `CONNECTED_PER_CGROUP`: 0 if it has no entry, as the agent's walk of the cgroups removes
/// the counts at 0 (a slow machine's walk ran between a close and the look: ci69).
pub fn connected_charge_of_cgroup(state_dir: &Path, cgroup_id: u64) -> i64 {
    let (_, entries) = table_map(state_dir, "CONNECTED_PER_CGROUP");
    entries
        .iter()
        .find_map(|(key, value)| {
            (u64::from_ne_bytes(key[..8].try_into().expect("8 bytes")) == cgroup_id)
                .then(|| i64::from_ne_bytes(value[..8].try_into().expect("8 bytes")))
        })
        .unwrap_or(0)
}

/// An agent's record in `AGENTS`, as an agent writes it (`AgentRecord`).
pub struct AgentRecordBytes {
    /// The cgroup the agent runs in.
    pub cgroup_id: u64,
    /// Its last heartbeat (`CLOCK_BOOTTIME`, [`boottime_ns`]).
    pub heartbeat_ns: u64,
    /// Its IPv4 block's port.
    pub port: u16,
    /// `AGENT_NAMED` 1, `AGENT_TELLS_STEERING` 2, `AGENT_STEERING` 4, `AGENT_FILLS_SERVING` 8.
    pub flags: u8,
}

/// Writes `record` under key `stamp` in the `AGENTS` map of the table pinned below
/// `state_dir`, with bpftool: what an agent the tests cannot run (of another version, dead
/// in a crash loop) would leave in the kernel.
pub fn put_agent_record(state_dir: &Path, stamp: u64, record: &AgentRecordBytes) {
    let mut value = Vec::with_capacity(24);
    value.extend_from_slice(&record.cgroup_id.to_ne_bytes());
    value.extend_from_slice(&record.heartbeat_ns.to_ne_bytes());
    value.extend_from_slice(&record.port.to_ne_bytes());
    value.push(record.flags);
    value.extend_from_slice(&[0; 5]);
    must(
        agents_map(state_dir, "update", stamp)
            .arg("value")
            .args(hex_bytes(&value)),
    );
}

/// Removes the record of key `stamp` from the `AGENTS` map of the table below `state_dir`.
pub fn remove_agent_record(state_dir: &Path, stamp: u64) {
    must(&mut agents_map(state_dir, "delete", stamp));
}

/// `bpftool map VERB pinned <table>/AGENTS key <stamp>`.
fn agents_map(state_dir: &Path, verb: &str, stamp: u64) -> Command {
    let mut command = Command::new("bpftool");
    command
        .args(["map", verb, "pinned"])
        .arg(table_dir(state_dir).join("AGENTS"))
        .arg("key")
        .args(hex_bytes(&stamp.to_ne_bytes()));
    command
}

/// `CLOCK_BOOTTIME` now, in ns: the clock of the agents' heartbeats in `AGENTS`.
pub fn boottime_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, a live local.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    assert_eq!(read, 0, "clock_gettime");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Bytes as bpftool takes them on its command line.
fn hex_bytes(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|byte| format!("0x{byte:02x}")).collect()
}

/// An entry of a BPF map as bpftool dumps it: key and value bytes.
type MapEntry = (Vec<u8>, Vec<u8>);

/// The directory of the agents' table of servers below `state_dir`, where `SERVERS` and the
/// maps beside it are pinned.
pub fn table_dir(state_dir: &Path) -> PathBuf {
    // One table per pair of blocks, each in a directory of its own: the agents here use one.
    let tables: Vec<PathBuf> = fs::read_dir(state_dir)
        .unwrap_or_else(|err| panic!("{}: {err}", state_dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|dir| dir.join("SERVERS").exists())
        .collect();
    let [table] = tables.as_slice() else {
        panic!(
            "not one table of servers in {}: {tables:?}",
            state_dir.display()
        );
    };
    table.clone()
}

/// The entries of map `name` of the agents' server table pinned below `state_dir` (`SERVERS`,
/// or a map pinned beside it), read with bpftool, and where it is pinned.
fn table_map(state_dir: &Path, name: &str) -> (PathBuf, Vec<MapEntry>) {
    let pinned = table_dir(state_dir).join(name);
    let output = must(
        Command::new("bpftool")
            .arg("--json")
            .args(["map", "dump", "pinned"])
            .arg(&pinned),
    );
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bpftool JSON");
    let bytes = |value: &serde_json::Value| -> Vec<u8> {
        value
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| {
                u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16)
                    .expect("hex")
            })
            .collect()
    };
    let entries = entries
        .as_array()
        .expect("bpftool dumps an array")
        .iter()
        .map(|entry| (bytes(&entry["key"]), bytes(&entry["value"])))
        .collect();
    (pinned, entries)
}

/// How many entries the map called `map_name` holds, among the maps of the programs attached
/// to `cgroup` (read with bpftool, so the agent's own view plays no part).
pub fn attached_map_entries(cgroup: &Path, map_name: &str) -> usize {
    let json = |args: &[&str]| -> serde_json::Value {
        let output = must(Command::new("bpftool").arg("--json").args(args));
        serde_json::from_slice(&output.stdout).expect("bpftool JSON")
    };
    let cgroup = cgroup.to_str().expect("UTF-8 path");
    let mut map_ids: Vec<u64> = Vec::new();
    for program in json(&["cgroup", "show", cgroup]).as_array().expect("array") {
        let id = program["id"].as_u64().expect("program id").to_string();
        let maps = json(&["prog", "show", "id", &id]);
        for map_id in maps["map_ids"].as_array().into_iter().flatten() {
            map_ids.push(map_id.as_u64().expect("map id"));
        }
    }
    map_ids.sort_unstable();
    map_ids.dedup();
    let matching: Vec<u64> = map_ids
        .into_iter()
        .filter(|id| json(&["map", "show", "id", &id.to_string()])["name"] == map_name)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one {map_name} map attached to {cgroup}: {matching:?}"
    );
    let entries = json(&["map", "dump", "id", &matching[0].to_string()]);
    entries.as_array().expect("array").len()
}

/// The names of the programs attached to `cgroup`, read with bpftool.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let output = must(
        Command::new("bpftool")
            .arg("--json")
            .args(["cgroup", "show"])
            .arg(cgroup),
    );
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let programs: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bpftool JSON");
    programs
        .as_array()
        .expect("bpftool shows an array")
        .iter()
        .map(|program| program["name"].as_str().expect("a name").to_owned())
        .collect()
}

/// Asserts that an agent that stopped left only `sock_release` attached to `cgroup`: the one
/// program it leaves (pinned) in host mode, so that sockets released while no agent runs let
/// go of their notes. It redirects nothing.
pub fn assert_only_sock_release_left(cgroup: &Path) {
    assert_only_pinned_programs_left(cgroup, false);
}

/// Asserts that an agent that stopped left only its pinned programs attached to `cgroup`:
/// `sock_release`, and in node mode the egress guard, which refuses a pod's socket still
/// connected to the block while no agent serves. Neither redirects anything.
pub fn assert_only_pinned_programs_left(cgroup: &Path, node_mode: bool) {
    let mut left = attached_programs(cgroup);
    left.sort();
    let expected: &[&str] = if node_mode {
        &["dns_proxy_egress", "dns_proxy_sock_release"]
    } else {
        &["dns_proxy_sock_release"]
    };
    assert_eq!(
        left,
        expected,
        "programs left attached to {}",
        cgroup.display()
    );
}
