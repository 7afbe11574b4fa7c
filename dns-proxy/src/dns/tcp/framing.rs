//! DNS over TCP framing (RFC 1035 4.2.2): each message behind its two-byte length.
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Reads one length-prefixed DNS message; `None` on a clean end of stream between messages.
/// (Public for the fuzz targets, which feed it arbitrary streams.)
pub async fn read_message(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    match read_first_byte(reader).await? {
        Some(first) => read_rest(first, reader).await.map(Some),
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

/// The rest of a message whose first byte was `first`.
pub(super) async fn read_rest(
    first: u8,
    reader: &mut (impl AsyncRead + Unpin),
) -> io::Result<Vec<u8>> {
    let mut second = [0u8; 1];
    reader.read_exact(&mut second).await?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes([first, second[0]]))];
    reader.read_exact(&mut message).await?;
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
