//! DNS over TCP framing (RFC 1035 4.2.2): each message behind its two-byte length.
use std::{
    collections::HashMap,
    io::{self, IoSlice},
    net::IpAddr,
    ops::Deref,
    sync::{Arc, Mutex},
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How much of a message is read without the [`MessageBudget`]: every query a stub resolver
/// sends, and most answers, fit, so they never meet its limit.
pub(super) const SMALL_MESSAGE: usize = 4096;

/// Room for the large part (past [`SMALL_MESSAGE`]) of the messages being read or relayed,
/// shared by every connection. A message's buffer grows only as its bytes arrive, and takes
/// room for each step: a flood of connections that announce 64 KiB and send part of it
/// holds no more than this (a connection that finds no room is closed), where each once
/// held 64 KiB from its length prefix on. One client holds at most an eighth of it, so one
/// workload cannot take it all and have everyone else's large messages refused.
#[derive(Clone)]
pub struct MessageBudget(Arc<Mutex<Budget>>);

struct Budget {
    free: usize,
    per_client: usize,
    held: HashMap<RoomHolder, usize>,
}

/// Who holds room, for a connection's queries and for the answers sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoomHolder {
    /// Its workload (cgroup id), whatever address it sends from.
    Workload(u64),
    /// Its source address, where no workload was recorded.
    Address(IpAddr),
}

impl MessageBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Mutex::new(Budget {
            free: bytes,
            per_client: bytes / 8,
            held: HashMap::new(),
        })))
    }

    /// `bytes` more for `holder`, on top of `room` if it holds some already.
    fn take(&self, holder: RoomHolder, room: &mut Option<Room>, bytes: usize) -> io::Result<()> {
        let mut budget = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = budget.held.get(&holder).copied().unwrap_or(0);
        if bytes > budget.free || held + bytes > budget.per_client {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, NoRoom));
        }
        budget.free -= bytes;
        budget.held.insert(holder, held + bytes);
        match room {
            Some(room) => room.bytes += bytes,
            none => {
                *none = Some(Room {
                    budget: self.clone(),
                    holder,
                    bytes,
                })
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn available(&self) -> usize {
        self.0.lock().expect("not poisoned").free
    }
}

/// The error of a message that found no room in its [`MessageBudget`].
#[derive(Debug)]
pub(super) struct NoRoom;

impl NoRoom {
    /// Whether `err` says a message found no room (not a socket's own ENOMEM, say).
    pub(super) fn is(err: &io::Error) -> bool {
        err.get_ref().is_some_and(|inner| inner.is::<Self>())
    }
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "no room for another large message: the room for them, or this workload's share \
             of it, is taken",
        )
    }
}

impl std::error::Error for NoRoom {}

/// Room taken from a [`MessageBudget`], given back when dropped.
struct Room {
    budget: MessageBudget,
    holder: RoomHolder,
    bytes: usize,
}

impl Drop for Room {
    fn drop(&mut self) {
        let mut budget = self
            .budget
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        budget.free += self.bytes;
        if let Some(held) = budget.held.get_mut(&self.holder) {
            *held -= self.bytes;
            if *held == 0 {
                budget.held.remove(&self.holder);
            }
        }
    }
}

/// A message read whole, with the room its large part takes until it is dropped (once
/// relayed).
pub struct Message {
    bytes: Vec<u8>,
    _room: Option<Room>,
}

impl Deref for Message {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads one length-prefixed DNS message; `None` on a clean end of stream between messages.
/// (Public for the fuzz targets, which feed it arbitrary streams.)
pub async fn read_message(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    match read_first_byte(reader).await? {
        Some(first) => read_rest(first, reader, None).await.map(|m| Some(m.bytes)),
        None => Ok(None),
    }
}

/// The first byte of a message; `None` on a clean end of stream. Only an end before it is
/// clean: one inside the length prefix is a stream cut mid-message, as one inside the message
/// is (found by the tcp_framing fuzz target).
pub(super) async fn read_first_byte(
    reader: &mut (impl AsyncRead + Unpin),
) -> io::Result<Option<u8>> {
    let mut first = [0u8; 1];
    if reader.read(&mut first).await? == 0 {
        return Ok(None);
    }
    Ok(Some(first[0]))
}

/// The rest of a message whose first byte was `first`. Its buffer grows as its bytes come,
/// doubling from [`SMALL_MESSAGE`], each step past it taking room from `budget` for its
/// holder (none needed without one).
pub(super) async fn read_rest(
    first: u8,
    reader: &mut (impl AsyncRead + Unpin),
    budget: Option<(&MessageBudget, RoomHolder)>,
) -> io::Result<Message> {
    let mut second = [0u8; 1];
    reader.read_exact(&mut second).await?;
    let length = usize::from(u16::from_be_bytes([first, second[0]]));
    let mut message = Message {
        bytes: vec![0; length.min(SMALL_MESSAGE)],
        _room: None,
    };
    let mut filled = 0;
    while filled < length {
        if filled == message.bytes.len() {
            let grown = length.min(filled * 2);
            if let Some((budget, holder)) = budget {
                budget.take(holder, &mut message._room, grown - filled)?;
            }
            message.bytes.resize(grown, 0);
        }
        match reader.read(&mut message.bytes[filled..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            read => filled += read,
        }
    }
    Ok(message)
}

/// Writes one length-prefixed message in a single write (partial writes are retried), as
/// RFC 7766 §8 asks. A small message is copied behind its length; a large one is written
/// with its length in one vectored write, so that no copy of it is held while a slow reader
/// takes it (a writer that takes no vectored writes gets the length first).
pub async fn write_message(
    writer: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| io::Error::other("DNS message over 65535 bytes"))?
        .to_be_bytes();
    if message.len() <= SMALL_MESSAGE {
        let mut frame = Vec::with_capacity(2 + message.len());
        frame.extend_from_slice(&length);
        frame.extend_from_slice(message);
        return writer.write_all(&frame).await;
    }
    let mut written = 0;
    while written < 2 {
        let slices = [IoSlice::new(&length[written..]), IoSlice::new(message)];
        match writer.write_vectored(&slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => written += n,
        }
    }
    writer.write_all(&message[written - 2..]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLDER: RoomHolder = RoomHolder::Workload(7);

    /// A message announced at 64 KiB takes room only as its bytes come (12 KiB for its first
    /// 10,000 bytes, not 60), and gives it back when dropped.
    #[tokio::test]
    async fn a_large_message_takes_room_as_it_arrives() {
        let budget = MessageBudget::new(800_000);
        let (mut writer, mut reader) = tokio::io::duplex(1 << 20);
        writer.write_all(&[0xff, 0xff]).await.unwrap();
        writer.write_all(&[7; 10_000]).await.unwrap();
        let first = read_first_byte(&mut reader).await.unwrap().unwrap();
        let reading = tokio::spawn({
            let budget = budget.clone();
            async move { read_rest(first, &mut reader, Some((&budget, HOLDER))).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reading.is_finished());
        // 4 KiB free of room, then 4 KiB and 8 KiB more as the buffer doubled.
        assert_eq!(budget.available(), 800_000 - 12_288);
        writer.write_all(&[7; 65_535 - 10_000]).await.unwrap();
        let message = reading.await.unwrap().unwrap();
        assert_eq!(message.len(), 65_535);
        assert_eq!(budget.available(), 800_000 - (65_535 - SMALL_MESSAGE));
        drop(message);
        assert_eq!(budget.available(), 800_000);
    }

    /// One client holds at most an eighth of the room: its message past that is refused
    /// while other clients' are taken (helper-95: one workload's stalled halves took it all,
    /// and another's 20 kB answer was closed on).
    #[tokio::test]
    async fn one_client_holds_at_most_an_eighth_of_the_room() {
        let budget = MessageBudget::new(600_000);
        let read = |holder: RoomHolder| {
            let budget = budget.clone();
            async move {
                let (mut writer, mut reader) = tokio::io::duplex(1 << 20);
                write_message(&mut writer, &[7; 65_535]).await.unwrap();
                let first = read_first_byte(&mut reader).await.unwrap().unwrap();
                read_rest(first, &mut reader, Some((&budget, holder))).await
            }
        };
        let client = RoomHolder::Workload;
        let first = read(client(1)).await.unwrap();
        // 61,439 held of its 75,000: a second message of its own finds no room.
        let refused = read(client(1)).await;
        assert!(refused.is_err_and(|err| NoRoom::is(&err)));
        assert_eq!(budget.available(), 600_000 - 61_439);
        let others: Vec<_> = (2..=9).map(|cgroup| read(client(cgroup))).collect();
        let mut held = vec![first];
        for other in others {
            held.push(other.await.unwrap());
        }
        // 552,951 held: a tenth client's message finds no room left.
        assert!(read(client(10)).await.is_err());
        drop(held);
        assert_eq!(budget.available(), 600_000);
    }

    /// A large message is framed whole, also for a writer that takes no vectored writes.
    #[tokio::test]
    async fn a_large_message_is_framed_whole() {
        let message: Vec<u8> = (0..60_000u32).map(|n| n as u8).collect();
        let (mut writer, mut reader) = tokio::io::duplex(1 << 17);
        write_message(&mut writer, &message).await.unwrap();
        write_message(&mut writer, &[9; 100]).await.unwrap();
        assert_eq!(read_message(&mut reader).await.unwrap(), Some(message));
        assert_eq!(read_message(&mut reader).await.unwrap(), Some(vec![9; 100]));
    }

    /// A stub's query never needs room.
    #[tokio::test]
    async fn a_small_message_needs_no_room() {
        let none = MessageBudget::new(0);
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        write_message(&mut writer, &[1; 512]).await.unwrap();
        let first = read_first_byte(&mut reader).await.unwrap().unwrap();
        let message = read_rest(first, &mut reader, Some((&none, HOLDER)))
            .await
            .unwrap();
        assert_eq!(&*message, &[1; 512][..]);
    }
}
