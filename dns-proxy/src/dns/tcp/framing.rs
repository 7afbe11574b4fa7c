//! DNS over TCP framing (RFC 1035 4.2.2): each message behind its two-byte length.
use std::{io, ops::Deref, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{OwnedSemaphorePermit, Semaphore},
};

/// How much of a message is read without the [`MessageBudget`]: every query a stub resolver
/// sends, and most answers, fit, so they never meet its limit.
pub(super) const SMALL_MESSAGE: usize = 4096;

/// Room for the large part (past [`SMALL_MESSAGE`]) of the messages being read or relayed,
/// shared by every connection. A message's buffer grows only as its bytes arrive, and takes
/// room for each step: a flood of connections that announce 64 KiB and send part of it
/// holds no more than this (a connection that finds no room is closed), where each once
/// held 64 KiB from its length prefix on.
#[derive(Clone)]
pub struct MessageBudget(Arc<Semaphore>);

impl MessageBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes)))
    }

    fn take(&self, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
        u32::try_from(bytes)
            .ok()
            .and_then(|bytes| Arc::clone(&self.0).try_acquire_many_owned(bytes).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "no room for another large message: the room for them is taken",
                )
            })
    }

    #[cfg(test)]
    pub(super) fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// A message read whole, with the room its large part takes until it is dropped (once
/// relayed).
pub struct Message {
    bytes: Vec<u8>,
    _room: Option<OwnedSemaphorePermit>,
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
/// doubling from [`SMALL_MESSAGE`], each step past it taking room from `budget` (none
/// needed without one).
pub(super) async fn read_rest(
    first: u8,
    reader: &mut (impl AsyncRead + Unpin),
    budget: Option<&MessageBudget>,
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
            if let Some(budget) = budget {
                let room = budget.take(grown - filled)?;
                match &mut message._room {
                    Some(taken) => taken.merge(room),
                    none => *none = Some(room),
                }
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

/// Writes one length-prefixed message in a single write (partial writes are retried).
pub async fn write_message(
    writer: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| io::Error::other("DNS message over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    writer.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message announced at 64 KiB takes room only as its bytes come, and gives it back
    /// when dropped; one that finds no room is refused.
    #[tokio::test]
    async fn a_large_message_takes_room_as_it_arrives() {
        let budget = MessageBudget::new(100_000);
        let (mut writer, mut reader) = tokio::io::duplex(1 << 20);
        writer.write_all(&[0xff, 0xff]).await.unwrap();
        writer.write_all(&[7; 10_000]).await.unwrap();
        let first = read_first_byte(&mut reader).await.unwrap().unwrap();
        let reading = tokio::spawn(async move {
            let message = read_rest(first, &mut reader, Some(&budget.clone())).await;
            (message, budget)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reading.is_finished());
        writer.write_all(&[7; 65_535 - 10_000]).await.unwrap();
        let (message, budget) = reading.await.unwrap();
        let message = message.unwrap();
        assert_eq!(message.len(), 65_535);
        assert_eq!(budget.available(), 100_000 - (65_535 - SMALL_MESSAGE));
        drop(message);
        assert_eq!(budget.available(), 100_000);

        let small = MessageBudget::new(10_000);
        let (mut writer, mut reader) = tokio::io::duplex(1 << 20);
        writer.write_all(&[0xff, 0xff]).await.unwrap();
        writer.write_all(&[7; 65_535]).await.unwrap();
        let first = read_first_byte(&mut reader).await.unwrap().unwrap();
        let refused = read_rest(first, &mut reader, Some(&small)).await;
        assert_eq!(
            refused.err().map(|err| err.kind()),
            Some(io::ErrorKind::OutOfMemory)
        );
        assert_eq!(small.available(), 10_000);
    }

    /// A stub's query never needs room.
    #[tokio::test]
    async fn a_small_message_needs_no_room() {
        let none = MessageBudget::new(0);
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        write_message(&mut writer, &[1; 512]).await.unwrap();
        let first = read_first_byte(&mut reader).await.unwrap().unwrap();
        let message = read_rest(first, &mut reader, Some(&none)).await.unwrap();
        assert_eq!(&*message, &[1; 512][..]);
    }
}
