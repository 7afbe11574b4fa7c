//! What the fuzz targets share: the reference decoder of DNS-over-TCP framing.

/// The whole 2-byte-length-prefixed frames at the start of `bytes`, and whether nothing
/// follows them (the stream ends cleanly between frames).
pub fn frames(mut bytes: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut frames = Vec::new();
    while let Some((length, rest)) = bytes.split_first_chunk::<2>() {
        let length = usize::from(u16::from_be_bytes(*length));
        if rest.len() < length {
            break;
        }
        frames.push(&rest[..length]);
        bytes = &rest[length..];
    }
    (frames, bytes.is_empty())
}

/// `frames` framed again, as the proxy writes them.
pub fn framed<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for frame in frames {
        bytes.extend_from_slice(&(frame.len() as u16).to_be_bytes());
        bytes.extend_from_slice(frame);
    }
    bytes
}
