//! Log lines for systemd's journal.
//!
//! Under systemd, stderr is a stream to the journal, which files every line as `info` unless
//! the line says otherwise. So each line starts with its syslog priority (`<3>` for an error,
//! `<4>` a warning: sd-daemon(3)), and `journalctl -p warning` shows the agent's warnings and
//! errors. The journal stamps each line itself, so the line carries no timestamp of its own.
//!
//! systemd says which stream is the journal's in `JOURNAL_STREAM` (the device and inode of
//! that stream, systemd.exec(5)). Only when stderr is that stream are lines written this way:
//! a shell started from the unit that sends the agent's stderr to a file gets the usual lines.
use std::{
    fmt::Write as _,
    io::{self, Write},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
};

/// Whether stderr is the journal's stream, as `JOURNAL_STREAM` names it.
pub fn stderr_is_the_journal() -> bool {
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(named) = named.to_str().and_then(parse_stream) else {
        return false;
    };
    stream_of_stderr().is_ok_and(|stderr| stderr == named)
}

/// `DEVICE:INODE`, both decimal, as systemd writes `JOURNAL_STREAM`.
fn parse_stream(value: &str) -> Option<(u64, u64)> {
    let (device, inode) = value.split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

/// The device and inode of stderr.
fn stream_of_stderr() -> io::Result<(u64, u64)> {
    let stderr = std::fs::File::from(io::stderr().as_fd().try_clone_to_owned()?);
    let metadata = stderr.metadata()?;
    Ok((metadata.dev(), metadata.ino()))
}

/// The syslog priority of a log level: err, warning, info, debug.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Writes one log record for the journal: `<PRIORITY>[LEVEL TARGET] MESSAGE`, the usual line
/// without its timestamp. A message of several lines (an error that carries the kernel's
/// verifier log) has each line marked, as the journal takes each line for an entry.
pub fn write_line(out: &mut impl Write, record: &log::Record<'_>) -> io::Result<()> {
    let line = format!(
        "[{:<5} {}] {}",
        record.level(),
        record.target(),
        record.args()
    );
    write_lines(out, priority(record.level()), &line)
}

/// Writes `text` with each of its lines, but empty ones, marked with `priority`, in one write.
pub fn write_lines(out: &mut impl Write, priority: u8, text: &str) -> io::Result<()> {
    let mut marked = String::with_capacity(text.len() + 8);
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let _ = writeln!(marked, "<{priority}>{line}");
    }
    out.write_all(marked.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_starts_with_its_priority_and_has_no_timestamp() {
        let line = |level| {
            let mut out = Vec::new();
            let record = log::Record::builder()
                .level(level)
                .target("dns_proxy")
                .args(format_args!("ready: redirected lookups are served"))
                .build();
            write_line(&mut out, &record).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            line(log::Level::Info),
            "<6>[INFO  dns_proxy] ready: redirected lookups are served\n"
        );
        assert!(line(log::Level::Error).starts_with("<3>[ERROR dns_proxy] "));
        assert!(line(log::Level::Warn).starts_with("<4>[WARN  dns_proxy] "));
        assert!(line(log::Level::Debug).starts_with("<7>[DEBUG dns_proxy] "));
    }

    #[test]
    fn each_line_of_a_message_of_several_is_marked() {
        let mut out = Vec::new();
        let record = log::Record::builder()
            .level(log::Level::Error)
            .target("dns_proxy")
            .args(format_args!("refused:\nline one\n\nline two"))
            .build();
        write_line(&mut out, &record).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<3>[ERROR dns_proxy] refused:\n<3>line one\n<3>line two\n"
        );
    }

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert_eq!(parse_stream("8:1234"), Some((8, 1234)));
        for bad in ["", "8", "8:", ":1", "a:1", "8:1:2", "-1:2"] {
            assert_eq!(parse_stream(bad), None, "{bad:?}");
        }
    }
}
