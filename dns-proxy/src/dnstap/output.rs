//! Where the log goes: a file, created safely (never through a symlink or into a FIFO, an
//! old log kept aside, never overwritten), or a socket reader after the Frame Streams
//! handshake.
use std::{
    fs::File,
    io::{self, BufWriter, Write},
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::Path,
    time::SystemTime,
};

use super::{CONTENT_TYPE, DnstapError, DnstapTarget, IO_TIMEOUT, WRITE_BUFFER, fstrm};

pub(super) fn open_file(path: &Path) -> Result<Output, DnstapError> {
    let create = |source| DnstapError::CreateFile {
        path: path.to_owned(),
        source,
    };
    let file = create_log_file(path).map_err(create)?;
    let mut writer: BufWriter<Box<dyn Write + Send>> =
        BufWriter::with_capacity(WRITE_BUFFER, Box::new(file));
    // START reaches the file at once: a file with nothing in it is no agent's log yet.
    if let Err(err) = fstrm::write_control(&mut writer, fstrm::START, Some(CONTENT_TYPE))
        .and_then(|()| writer.flush())
    {
        // Not left for the next try to keep aside (a full disk would collect them).
        let _ = std::fs::remove_file(path);
        return Err(create(err));
    }
    Ok(Output {
        writer,
        reader: None,
    })
}

/// Checks, before the agent changes anything, that `target` can be a log: a file's directory
/// exists and can be written to, and nothing but a regular file is at its path.
pub fn check_target(target: &DnstapTarget) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt as _;
    let DnstapTarget::File(path) = target else {
        return Ok(());
    };
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    if let Some(parent) = parent
        && !parent.is_dir()
    {
        return Err(format!("{}: no such directory", parent.display()));
    }
    // A read-only filesystem (a systemd unit's ProtectSystem=strict without ReadWritePaths=
    // or LogsDirectory=) was found only after attaching, and a unit that restarts the agent
    // then attached and detached it over and over.
    let dir = parent.unwrap_or(Path::new("."));
    if let Err(err) = writable(dir) {
        return Err(format!(
            "{}: cannot be written to ({err}); give a path on a writable filesystem (a \
             systemd unit: ReadWritePaths= or LogsDirectory=)",
            dir.display()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(existing) if !existing.file_type().is_file() => {
            let kind = existing.file_type();
            let what = if kind.is_symlink() {
                "a symlink"
            } else if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            Err(format!(
                "{}: {what}; give the path of a regular file to create",
                path.display()
            ))
        }
        _ => Ok(()),
    }
}

/// Whether the process may create files in `dir`, as far as the kernel says now (its
/// filesystem is not read-only, and its permissions allow it).
fn writable(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `dir` is a NUL-terminated string that lives across the call.
    if unsafe { libc::access(dir.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates the log file at `path`, a regular file and nothing else: not through a symlink
/// (someone who may write to the directory could point it at any file the agent may write),
/// and never waiting (a FIFO without a reader would block the agent). A log already there is
/// kept, renamed `PATH.<unix seconds>`: a restarted agent's, or, during a takeover, the one
/// the other agent is still writing to (through its own descriptor).
pub fn create_log_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        let kind = existing.file_type();
        if kind.is_symlink() || kind.is_fifo() || kind.is_socket() || kind.is_dir() {
            return Err(io::Error::other(format!(
                "not a regular file ({kind:?}): give the path of a file to create"
            )));
        }
        // Kept whatever its size: an agent that has logged nothing yet may still write to it
        // (an agent taken over from), and two agents must never share one file.
        keep_aside(path)?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // Appending: a file truncated under the agent (logrotate's `copytruncate`, which
        // this log does not support: see `DnstapSink::reopen`) is not filled with gigabytes
        // of zeros up to where the agent was.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_APPEND)
        .mode(0o640)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Moves the file at `path` to `PATH.<unix seconds>` (`PATH.<seconds>.<n>` if that is taken:
/// two takeovers in one second), never over another file.
fn keep_aside(path: &Path) -> io::Result<()> {
    let seconds = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    for n in 0..1000 {
        let mut kept = path.as_os_str().to_owned();
        kept.push(format!(".{seconds}"));
        if n > 0 {
            kept.push(format!(".{n}"));
        }
        // A hard link never replaces a file (a rename would): then the old name goes.
        match std::fs::hard_link(path, &kept) {
            Ok(()) => {
                log::info!(
                    "dnstap: the log already at {} is kept as {}",
                    path.display(),
                    Path::new(&kept).display()
                );
                return std::fs::remove_file(path);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::other("no free name to keep the old log under"))
}

/// A connected output: the buffered writer, and for a socket the stream FINISH comes on.
pub(super) struct Output {
    pub(super) writer: BufWriter<Box<dyn Write + Send>>,
    pub(super) reader: Option<UnixStream>,
}

/// Connects to a socket reader and does the handshake: READY, ACCEPT, START.
pub(super) fn connect(path: &Path) -> io::Result<Output> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // Non-blocking underneath: a reader whose backlog is full is an error, not a wait.
    socket.connect_timeout(&socket2::SockAddr::unix(path)?, IO_TIMEOUT)?;
    let stream = UnixStream::from(OwnedFd::from(socket));
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    fstrm::write_control(&mut &stream, fstrm::READY, Some(CONTENT_TYPE))?;
    match fstrm::read_frame(&mut &stream, 0)? {
        fstrm::Frame::Control {
            kind: fstrm::ACCEPT,
            content_types,
        } if content_types.is_empty() || content_types.iter().any(|t| t == CONTENT_TYPE) => {}
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected ACCEPT of protobuf:dnstap.Dnstap, got {other:?}"),
            ));
        }
    }
    let mut writer: BufWriter<Box<dyn Write + Send>> =
        BufWriter::with_capacity(WRITE_BUFFER, Box::new(stream.try_clone()?));
    fstrm::write_control(&mut writer, fstrm::START, Some(CONTENT_TYPE))?;
    writer.flush()?;
    Ok(Output {
        writer,
        reader: Some(stream),
    })
}
