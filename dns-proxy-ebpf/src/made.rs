//! `raw_tp/cgroup_mkdir`: a cgroup made at an excluded path (a service's, made anew by systemd
//! at each start) is excluded as the kernel makes it: the tracepoint runs inside `mkdir`,
//! before the directory can be seen, so before any process can be moved in. The agent, which
//! sees the directory only afterwards (inotify), raced the service's first lookup, and lost
//! some on a loaded host.
//!
//! The kernel gives the new `struct cgroup` and its path below the hierarchy's root. The path
//! is hashed a byte at a time, looked up in `EXCLUDED_PATHS` and compared whole; the cgroup's
//! id and hierarchy are read at the offsets the agent found in the kernel's BTF
//! (`CGROUP_OFFSETS`). Only the cgroup2 hierarchy counts: on a hybrid host systemd makes the
//! same paths in its v1 hierarchy, whose ids are of another numbering.
use aya_ebpf::{helpers::generated, programs::RawTracePointContext};
use dns_proxy_common::{
    CGROUP_PATH_BYTES, CGROUP_PATH_HASH_SEED, CgroupOffsets, Counter, EXCLUDED_SUBTREE,
    cgroup_path_hash_step,
};

use crate::{CGROUP_OFFSETS, EXCLUDED_CGROUPS, EXCLUDED_PATHS, NEW_CGROUP_PATH, count};

/// The id `hierarchy_id` of the cgroup2 hierarchy's root (`0::` in `/proc/PID/cgroup`).
const CGROUP2_HIERARCHY: i32 = 0;

pub fn exclude_made_cgroup(ctx: &RawTracePointContext) {
    let cgroup: u64 = ctx.arg(0);
    let path: u64 = ctx.arg(1);
    let _ = try_exclude(cgroup as usize, path as *const u8);
}

fn try_exclude(cgroup: usize, path: *const u8) -> Option<()> {
    // SAFETY: a read of a global the loader patches before load and nothing writes after;
    // volatile, so that the compiler cannot fold in the zeros it was compiled with.
    let offsets: CgroupOffsets = unsafe { core::ptr::read_volatile(&CGROUP_OFFSETS) };
    let root: u64 = read_kernel(cgroup, offsets.cgroup_root)?;
    let hierarchy: i32 = read_kernel(root as usize, offsets.root_hierarchy_id)?;
    if hierarchy != CGROUP2_HIERARCHY {
        return None;
    }
    // SAFETY: a non-null pointer to this CPU's slot of a per-CPU array, which no other CPU
    // writes and nothing else uses: the kernel runs this tracepoint within `cgroup_mkdir`,
    // holding `cgroup_mutex` and its `trace_cgroup_path_lock`, so no other run of this program
    // can start before this one ends (nor write an entry's `made` meanwhile).
    let scratch = unsafe { &mut *NEW_CGROUP_PATH.get_ptr_mut(0)? };
    // Zeros first: the helper ends the path with a NUL and leaves the rest as an earlier
    // path left it. Volatile, so that it stays a loop (a `memset` is a call the verifier
    // refuses).
    for byte in scratch.bytes.iter_mut() {
        // SAFETY: a write to a byte of the slot's buffer, borrowed mutably here.
        unsafe { core::ptr::write_volatile(byte, 0) };
    }
    // SAFETY: the helper writes at most CGROUP_PATH_BYTES bytes into the slot's buffer, which
    // holds that many, from a kernel string it reads safely (or fails).
    let read = unsafe {
        generated::bpf_probe_read_kernel_str(
            scratch.bytes.as_mut_ptr().cast(),
            CGROUP_PATH_BYTES as u32,
            path.cast(),
        )
    };
    // With its NUL: 1 or less, the read failed or found nothing; one that fills the buffer may
    // have been cut short (no excluded path is that long).
    if read <= 1 || read >= CGROUP_PATH_BYTES as i64 {
        return None;
    }
    // Over every byte of the buffer, the path and the zeros after it (the agent pads its
    // paths with zeros too): loops of a fixed count, with no branch on the path, which the
    // verifier walks once each. Stopping at the path's end made it walk the rest of the
    // program once for each length the path could have, far past its limit.
    let mut hash = CGROUP_PATH_HASH_SEED;
    for byte in scratch.bytes.iter() {
        hash = cgroup_path_hash_step(hash, *byte);
    }
    // The agent writes the entry whole before it attaches this program, and only this
    // program writes after, under the kernel's lock (above).
    let excluded = EXCLUDED_PATHS.get_ptr_mut(hash)?;
    // SAFETY: a non-null pointer to a live map value, written by no one else meanwhile.
    let excluded = unsafe { &mut *excluded };
    // The whole path compared, not only its hash: a workload that can make cgroups cannot
    // have one excluded by a path that only hashes the same. No path holds a NUL, so equal
    // buffers are equal paths.
    let mut differ = 0;
    for (ours, theirs) in excluded.bytes.iter().zip(scratch.bytes.iter()) {
        differ |= ours ^ theirs;
    }
    if differ != 0 {
        return None;
    }
    match exclude(cgroup, &offsets, &mut excluded.made) {
        Some(()) => count(Counter::ExcludedAsMade),
        None => count(Counter::ExcludeMadeFailed),
    };
    Some(())
}

/// Puts the id of `cgroup`, made at an excluded path, in `EXCLUDED_CGROUPS`, and takes out
/// `made`, the id excluded at that path last, which it replaces.
fn exclude(cgroup: usize, offsets: &CgroupOffsets, made: &mut u64) -> Option<()> {
    let kernfs_node: u64 = read_kernel(cgroup, offsets.cgroup_kn)?;
    let id: u64 = read_kernel(kernfs_node as usize, offsets.kernfs_node_id)?;
    // The cgroup this program excluded at the path last is gone, since one is made there (the
    // kernel refuses a second at a path before this runs): one id per path, however often one
    // is made and removed there.
    if *made != 0 && *made != id {
        let _ = EXCLUDED_CGROUPS.remove(*made);
    }
    EXCLUDED_CGROUPS.insert(id, EXCLUDED_SUBTREE, 0).ok()?;
    *made = id;
    Some(())
}

/// The `T` at `offset` bytes into the kernel struct at `address`, read safely (`None` for a
/// null struct, or where nothing is mapped).
fn read_kernel<T: Copy>(address: usize, offset: u32) -> Option<T> {
    if address == 0 {
        return None;
    }
    // SAFETY: the helper reads kernel memory safely, failing where it cannot.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((address + offset as usize) as *const T) }
        .ok()
}
