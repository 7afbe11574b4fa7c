//! The block of addresses the proxy answers on, and the server table behind it: index `i` of
//! the IPv4 block `B` is the address `B + i` (of the IPv6 block, its last 16 bits), and
//! `SERVERS` names the origin of each index (a server and the cgroup that asked it).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    cty::{c_long, c_void},
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, generated::bpf_loop},
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use dns_proxy_common::{
    Counter, Endpoint, MAX_PROBES, NO_ROOM_ENTRIES, NO_ROOM_FOR_NS, Origin, RedirectConfig,
    server_key,
};

use crate::{
    CGROUP_ADJUST, CGROUP_ORIGINS, MAX_ORIGINS_PER_CGROUP, NO_ROOM, SERVER_INDEX, SERVERS,
    TABLE_HASH_KEY, count,
};

/// Index `index`'s address in the IPv4 block, network order.
pub fn block4_address(config: &RedirectConfig, index: u32) -> u32 {
    (u32::from_be(config.block4) + index).to_be()
}

/// Index `index`'s address in the IPv6 block (its last 16 bits), network-order words.
pub fn block6_address(config: &RedirectConfig, index: u32) -> [u32; 4] {
    let [a, b, c, d] = config.block6;
    [a, b, c, (u32::from_be(d) | index).to_be()]
}

/// The index a network-order IPv4 address encodes, if it is in the block.
pub fn index_in_block4(config: &RedirectConfig, addr: u32) -> Option<u32> {
    let index = u32::from_be(addr).wrapping_sub(u32::from_be(config.block4));
    (index >= 1 && index <= config.capacity4).then_some(index)
}

/// The index a network-order IPv6 address encodes, if it is in the block.
pub fn index_in_block6(config: &RedirectConfig, addr: [u32; 4]) -> Option<u32> {
    let block = config.block6;
    if addr[..3] != block[..3] || config.capacity6 == 0 {
        return None;
    }
    let index = u32::from_be(addr[3]).wrapping_sub(u32::from_be(block[3]));
    (index >= 1 && index <= config.capacity6).then_some(index)
}

/// Whether a socket addresses the proxy directly (a block address on its port).
pub fn addresses_proxy4(config: &RedirectConfig, addr: u32, port_be: u16) -> bool {
    port_be == config.port4 && index_in_block4(config, addr).is_some()
}

/// The origin of index `index` of `family`'s block, if it has one (an index held for sockets
/// of a table that is gone, [`Origin::stale`], has none).
pub fn origin_at(family: u16, index: u32) -> Option<Origin> {
    // SAFETY: `get` is unsafe because an element may be removed or replaced while it is held;
    // `SERVERS` is `BPF_F_NO_PREALLOC`, so a removed element is freed only after the program
    // is done (RCU) and never reused meanwhile, and the value is copied out at once.
    unsafe { SERVERS.get(server_key(family, index)) }
        .copied()
        .filter(|origin| !origin.is_stale())
}

/// The server of index `index` of `family`'s block, counted as unknown if there is none.
pub fn server_at(family: u16, index: u32) -> Option<Endpoint> {
    let origin = origin_at(family, index);
    if origin.is_none() {
        count(Counter::UnknownIndex);
    }
    origin.map(|origin| origin.server)
}

/// Whether index `index` of `family`'s block names the server `addr`:`port_be` (of that
/// family), whichever cgroup asked it. Compared in place, field by field: no copy of the
/// origin and no `memcmp` call, for the `connect6` path's stack.
pub fn encodes(family: u16, index: u32, addr: &[u32; 4], port_be: u16) -> bool {
    // SAFETY: as for `origin_at`; the element is only read, in place.
    match unsafe { SERVERS.get(server_key(family, index)) } {
        Some(origin) => {
            let server = &origin.server;
            server.family == family
                && server.port == port_be
                && server.addr[0] == addr[0]
                && server.addr[1] == addr[1]
                && server.addr[2] == addr[2]
                && server.addr[3] == addr[3]
        }
        None => false,
    }
}

/// `origin`'s hash under the agent's key: where its search for a free slot starts, and its
/// entry in `NO_ROOM`. Not inlined: SipHash's spills then take a frame beside `probe_slot`'s
/// rather than under it, on the deepest path of `connect6` (docs/architecture.md: older
/// kernels count frames in 32-byte steps).
#[inline(never)]
fn keyed_hash(origin: &Origin) -> u64 {
    // SAFETY: a read of a global that the loader patched before load and nothing writes
    // since; volatile, so that the compiler cannot fold in the zeros it was compiled with.
    let key = unsafe { core::ptr::read_volatile(&TABLE_HASH_KEY) };
    origin.slot_hash(key)
}

/// The index of `server`, asked by the calling task's cgroup, in its family's table (1 to
/// `capacity`): the pair's own, so the proxy knows which workload asked; or, if the table has
/// no room for the pair, or the cgroup has taken its share of it, the index every cgroup
/// shares for that server (cgroup 0), so the lookup is still redirected. `None` (counted) if
/// neither can be had.
pub fn index_for(ctx: &SockAddrContext, server: Endpoint, capacity: u32) -> Option<u32> {
    // SAFETY: a helper without arguments, which reads the calling task's cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let shared = Origin::new(server, 0);
    let own = Origin::new(server, cgroup_id);
    let mut taken = Taken::new(Taking::ChargedTo(cgroup_id));
    let index = match index_of(&own, capacity, &mut taken) {
        Some(index) => {
            // A server's first pair also takes its shared origin, while there is room: when
            // the table is full, cgroups that ask it later still reach the proxy through it.
            // Charged to no one: a cgroup's pairs bound the shared origins they made.
            if taken.created {
                let _ = index_of(&shared, capacity, &mut Taken::new(Taking::Uncharged));
            }
            Some(index)
        }
        None => {
            // A cgroup at its share makes no slot at all, a shared one neither (else it would
            // fill the table with those): it may only use one its server has.
            taken.taking = if taken.at_limit {
                Taking::Never
            } else {
                Taking::ChargedTo(cgroup_id)
            };
            let index = index_of(&shared, capacity, &mut taken);
            if taken.at_limit {
                workload_limit(ctx, cgroup_id);
            } else if index.is_some() {
                shared_index(ctx);
            }
            index
        }
    };
    if index.is_none() && !taken.at_limit {
        table_full(ctx);
    }
    index
}

/// Whom a slot newly taken for an origin is charged to.
#[derive(Clone, Copy)]
enum Taking {
    /// This cgroup: it may take no more than its share (`MAX_ORIGINS_PER_CGROUP`).
    ChargedTo(u64),
    /// No one: a server's shared origin taken with a cgroup's first pair of that server.
    Uncharged,
    /// No slot is taken: only an index the origin already has is found.
    Never,
}

/// How [`index_of`] may take a slot, and what it did beside the index it returns: in and out
/// parameters in one (an `Option` of a tuple with a `bool` makes BTF the kernel refuses, and
/// the bpf target passes five arguments at most).
struct Taken {
    taking: Taking,
    /// A slot was taken for the origin, by this search.
    created: bool,
    /// No slot was taken because the cgroup charged has taken its share.
    at_limit: bool,
}

impl Taken {
    fn new(taking: Taking) -> Self {
        Self {
            taking,
            created: false,
            at_limit: false,
        }
    }
}

/// The index of `origin` in its family's table (1 to `capacity`), given one if it has none
/// and `taken.taking` allows; `None` if it can get none. Slots are taken with `BPF_NOEXIST`,
/// so two CPUs that race for one agree on whose it is, and a slot, once taken, never changes
/// while it is in use.
fn index_of(origin: &Origin, capacity: u32, taken: &mut Taken) -> Option<u32> {
    let family = origin.server.family;
    // SAFETY: as in `origin_at` (`SERVER_INDEX` is `BPF_F_NO_PREALLOC` too); the value is
    // copied out at once.
    if let Some(index) = unsafe { SERVER_INDEX.get(origin) }.copied() {
        // The reverse entry is only a shortcut: the table itself must agree (a lost or
        // replaced pin must not send a socket to another server's address).
        // SAFETY: as in `origin_at`; the value is only compared.
        let agrees = unsafe { SERVERS.get(server_key(family, index)) } == Some(origin);
        if agrees && index <= capacity {
            return Some(index);
        }
        if agrees {
            // An index from a larger block than this agent's: it cannot be encoded here.
            return None;
        }
    }
    // No block of that family: no index (and no division by zero for the verifier to refuse).
    if capacity == 0 {
        return None;
    }
    let charged_to = match taken.taking {
        Taking::Never => return None,
        Taking::Uncharged => None,
        Taking::ChargedTo(cgroup_id) => {
            if !share_left(cgroup_id) {
                taken.at_limit = true;
                return None;
            }
            Some(cgroup_id)
        }
    };
    let hash = keyed_hash(origin);
    let remembered = (hash >> 32) as u32 % NO_ROOM_ENTRIES;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Entries are written by any CPU without a lock, so a read can mix two writes: at worst
    // it names a third origin of the same entry, which then skips its search for a second.
    // A skip only ever means no index (the shared one, or direct), never a wrong one.
    if let Some(entry) = NO_ROOM.get(remembered)
        && entry.origin == *origin
        && now.saturating_sub(entry.failed_at_ns) < NO_ROOM_FOR_NS
    {
        return None;
    }
    let mut probe = Probe {
        origin,
        first: (hash % u64::from(capacity)) as u32,
        capacity,
        found: 0,
        inserted: 0,
    };
    // `bpf_loop` (Linux 5.17), not a `for` loop: the verifier checks its callback a few times
    // (until its states repeat), where it walks every turn of a bounded loop (64 turns, twice
    // in each connect and sendmsg program, added about 1.5 s to the agent's start).
    // SAFETY: `probe_slot` has the callback's signature, and `probe` outlives the call.
    unsafe {
        bpf_loop(
            MAX_PROBES.min(capacity),
            probe_slot as *mut c_void,
            (&raw mut probe).cast(),
            0,
        )
    };
    if probe.found == 0 {
        if let Some(entry) = NO_ROOM.get_ptr_mut(remembered) {
            // SAFETY: a pointer into the array's value, valid while the program runs.
            unsafe {
                (*entry).origin = *origin;
                (*entry).failed_at_ns = now;
            }
        }
        return None;
    }
    // A lost reverse entry costs this agent's next socket a search that finds the slot again;
    // an agent with another key (a takeover) may take a second slot for the origin, which is
    // freed with the first when the origin is forgotten.
    let _ = SERVER_INDEX.insert(origin, probe.found, 0);
    // Only the CPU whose insert took the slot charges it, and takes the server's shared
    // origin: two threads of a cgroup racing to one new server were charged twice
    // (helper-112: 1,997 for 1,000 pairs).
    if probe.inserted != 0 {
        taken.created = true;
        if let Some(cgroup_id) = charged_to {
            charge(cgroup_id);
        }
    }
    Some(probe.found)
}

/// Whether cgroup `cgroup_id` may take another slot of the table: it holds fewer than
/// `MAX_ORIGINS_PER_CGROUP` (the programs' count, `CGROUP_ORIGINS`, with the agent's
/// correction, `CGROUP_ADJUST`), or there is no limit. Two CPUs of one cgroup may both
/// pass at its last slot: a share is exceeded by about a slot per CPU. Not inlined, as
/// `keyed_hash`.
#[inline(never)]
pub(crate) fn share_left(cgroup_id: u64) -> bool {
    // SAFETY: a read of a global that the loader patched before load; volatile, as in
    // `keyed_hash`.
    let limit = unsafe { core::ptr::read_volatile(&MAX_ORIGINS_PER_CGROUP) };
    if limit == 0 {
        return true;
    }
    // SAFETY: as in `origin_at` (both maps are `BPF_F_NO_PREALLOC`); copied out at once.
    let taken = unsafe { CGROUP_ORIGINS.get(cgroup_id) }
        .copied()
        .unwrap_or(0);
    // SAFETY: as above.
    let correction = unsafe { CGROUP_ADJUST.get(cgroup_id) }
        .copied()
        .unwrap_or(0);
    (taken as i64).saturating_add(correction) < i64::from(limit)
}

/// Charges a slot just taken to cgroup `cgroup_id` (`CGROUP_ORIGINS`), with no limit too: a
/// limit set at a later start then counts what the cgroup took before. An atomic add, as the
/// cgroup's sockets may take slots on several CPUs at once.
#[inline(never)]
pub(crate) fn charge(cgroup_id: u64) {
    if CGROUP_ORIGINS.get_ptr_mut(cgroup_id).is_none() {
        // Room for it: the map has an entry per slot of the table at most, and the agent
        // removes those of departed cgroups as it forgets their slots.
        let _ = CGROUP_ORIGINS.insert(cgroup_id, 0, u64::from(BPF_NOEXIST));
    }
    if let Some(count) = CGROUP_ORIGINS.get_ptr_mut(cgroup_id) {
        // SAFETY: a pointer into the map's value, aligned and valid while the program runs;
        // every other writer (another CPU) adds to it atomically too.
        unsafe { atomic_add(count, 1) };
    }
}

/// Counts a socket given its server's shared index, and says so in the log at the 1st, 2nd,
/// 4th, 8th... time on each CPU.
fn shared_index(ctx: &SockAddrContext) {
    let times = count(Counter::SharedIndex);
    if times.is_power_of_two() {
        warn!(
            ctx,
            "dns-proxy: no room in the table for a workload's own index ({} times on this \
             CPU): its lookups go through the server's shared one, their workload unknown; \
             give a larger --redirect-block",
            times
        );
    }
}

/// The state of one search for a free slot (`index_of`), shared with its callback.
#[repr(C)]
struct Probe<'a> {
    origin: &'a Origin,
    /// The slot the origin's hash picks, from 0.
    first: u32,
    capacity: u32,
    /// The index taken (or found already the origin's), 0 while none is.
    found: u32,
    /// 1 if this search took the slot (its insert made it), 0 if another CPU took it for the
    /// same origin meanwhile, or it was the origin's already.
    inserted: u32,
}

/// `bpf_loop`'s callback: tries the `turn`th slot from the first, and stops the loop (1) once
/// one is the origin's.
extern "C" fn probe_slot(turn: u64, probe: *mut c_void) -> c_long {
    // SAFETY: `index_of` passes a `Probe` of its stack, alive for the whole loop.
    let probe = unsafe { &mut *probe.cast::<Probe>() };
    // `index_of` never loops with no capacity, but without this check the `%` below would
    // keep a panic path, which the verifier refuses.
    if probe.capacity == 0 {
        return 1;
    }
    let index = (probe.first + turn as u32) % probe.capacity + 1;
    let key = server_key(probe.origin.server.family, index);
    // Read before writing: a slot taken by another origin, the usual case in a filling table,
    // then costs a lookup instead of a failed insert under the bucket's lock.
    // SAFETY: as in `origin_at`; the value is only compared.
    let ours = match unsafe { SERVERS.get(key) } {
        Some(held) => held == probe.origin,
        None => match SERVERS.insert(key, probe.origin, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                probe.inserted = 1;
                true
            }
            // Another CPU took it meanwhile: ours only if for the same origin.
            // SAFETY: as above.
            Err(_) => (unsafe { SERVERS.get(key) }) == Some(probe.origin),
        },
    };
    if ours {
        probe.found = index;
        1
    } else {
        0
    }
}

/// Adds `n` to the `u64` at `target` atomically. `core::sync::atomic` has no read-modify-write
/// for the bpf target: there, the intrinsic, its result unused, is the one instruction
/// `lock *(u64 *)(target + 0) += n`.
///
/// # Safety
/// `target` must be valid and aligned for a `u64`, and written only atomically meanwhile.
#[inline(always)]
pub(crate) unsafe fn atomic_add(target: *mut u64, n: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: as the caller promises.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            target, n,
        )
    };
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as the caller promises.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(target) }
        .fetch_add(n, core::sync::atomic::Ordering::Relaxed);
}

/// Counts a connect or send of a cgroup at its share of the table to a server it has no index
/// of its own for, and says so in the log at the 1st, 2nd, 4th, 8th... time on each CPU.
fn workload_limit(ctx: &SockAddrContext, cgroup_id: u64) {
    let times = count(Counter::WorkloadLimit);
    if times.is_power_of_two() {
        warn!(
            ctx,
            "dns-proxy: the workload of cgroup id {} took its share of the table \
             (--max-servers-per-workload; {} times on this CPU, any workload): its lookups to \
             servers new to it go by the server's shared index (workload unknown) or direct",
            cgroup_id,
            times
        );
    }
}

/// Counts a connect or send whose server got no index, and says so in the log at the 1st,
/// 2nd, 4th, 8th... time on each CPU: a workload that fills the table cannot flood the log.
fn table_full(ctx: &SockAddrContext) {
    let times = count(Counter::TableFull);
    if times.is_power_of_two() {
        warn!(
            ctx,
            "dns-proxy: a socket's server got no index (the table is full, {} times on this \
             CPU): it goes direct",
            times
        );
    }
}
