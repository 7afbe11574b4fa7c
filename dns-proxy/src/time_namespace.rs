//! The offsets of this process's time namespace (`unshare --time`): it sees
//! `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` shifted by them, while the programs
//! (`bpf_ktime_get_ns`) and the other agents of the block see the kernel's own. An agent with
//! a negative monotonic offset wrote liveness times the programs took for long past (it
//! redirected nothing); one with a boottime offset judged the other agents' heartbeats wrong
//! (a takeover's new agent never became ready, or took a live agent for dead). And
//! [`read_clock`], any clock as it is read here.
use std::sync::OnceLock;

/// `clock` now, since its start, as this process sees it; `None` if it cannot be read.
pub fn read_clock(clock: libc::clockid_t) -> Option<std::time::Duration> {
    // SAFETY: `timespec` is plain integers, for which all zeros is a valid value.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is a live timespec that the call only writes.
    let status = unsafe { libc::clock_gettime(clock, &mut now) };
    let seconds = u64::try_from(now.tv_sec).ok()?;
    let nanos = u32::try_from(now.tv_nsec).ok()?;
    (status == 0).then(|| std::time::Duration::new(seconds, nanos))
}

/// Now, in nanoseconds, on the kernel's `CLOCK_MONOTONIC`: the clock the programs read
/// (`bpf_ktime_get_ns`).
pub fn kernel_monotonic_ns() -> u64 {
    kernel_clock_ns(libc::CLOCK_MONOTONIC, offsets().monotonic_ns)
}

/// Now, in nanoseconds, on the kernel's `CLOCK_BOOTTIME`: the clock every agent of the host
/// stamps its records with.
pub fn kernel_boottime_ns() -> u64 {
    kernel_clock_ns(libc::CLOCK_BOOTTIME, offsets().boottime_ns)
}

/// `clock` as this process sees it, less its time namespace's `offset`.
fn kernel_clock_ns(clock: libc::clockid_t, offset: i128) -> u64 {
    // These two clocks cannot fail on Linux.
    let seen = read_clock(clock).map_or(0, |now| now.as_nanos() as i128);
    u64::try_from((seen - offset).max(0)).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offsets {
    pub monotonic_ns: i128,
    pub boottime_ns: i128,
}

/// This process's offsets (`/proc/self/timens_offsets`; 0 without time namespaces, or if it
/// cannot be read, which is logged). Read once: a process cannot change its own time
/// namespace, only its children's.
pub fn offsets() -> Offsets {
    static OFFSETS: OnceLock<Offsets> = OnceLock::new();
    *OFFSETS.get_or_init(
        || match std::fs::read_to_string("/proc/self/timens_offsets") {
            Ok(text) => parse(&text),
            // No time namespaces in this kernel: no offsets.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Offsets::default(),
            Err(err) => {
                log::warn!(
                    "cannot read /proc/self/timens_offsets ({err}): taking this process's clocks \
                 for the kernel's, which they are unless it runs in a time namespace of its own"
                );
                Offsets::default()
            }
        },
    )
}

/// A `timens_offsets` text: a line per clock, "NAME SECONDS NANOSECONDS", by name (Linux
/// 5.8 and later) or by clock id (1 monotonic, 7 boottime).
fn parse(text: &str) -> Offsets {
    let mut offsets = Offsets::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(clock), Some(seconds), Some(nanos)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(seconds), Ok(nanos)) = (seconds.parse::<i128>(), nanos.parse::<i128>()) else {
            continue;
        };
        let offset = seconds * 1_000_000_000 + nanos;
        match clock {
            "monotonic" | "1" => offsets.monotonic_ns = offset,
            "boottime" | "7" => offsets.boottime_ns = offset,
            _ => {}
        }
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_forms_the_kernel_has_printed() {
        let named = "monotonic           -100         0\nboottime      7    250\n";
        assert_eq!(
            parse(named),
            Offsets {
                monotonic_ns: -100_000_000_000,
                boottime_ns: 7_000_000_250,
            }
        );
        assert_eq!(
            parse("7 1 0\n1 2 500\n"),
            Offsets {
                monotonic_ns: 2_000_000_500,
                boottime_ns: 1_000_000_000,
            }
        );
        assert_eq!(parse(""), Offsets::default());
        assert_eq!(parse("monotonic x 0\n"), Offsets::default());
    }
}
