//! Frame Streams (farsightsecurity.github.io/fstrm), the framing dnstap travels in.
//!
//! A data frame is a 32-bit big-endian length and that many bytes. A control frame starts
//! with a zero length (the escape), then its own length, its type, and fields; the only field
//! is the content type. Writers to a file send START, data, STOP; writers to a socket first
//! send READY and wait for ACCEPT, and after STOP wait for FINISH.
use std::io::{self, Read, Write};

pub const ACCEPT: u32 = 0x01;
pub const START: u32 = 0x02;
pub const STOP: u32 = 0x03;
pub const READY: u32 = 0x04;
pub const FINISH: u32 = 0x05;

const FIELD_CONTENT_TYPE: u32 = 0x01;
/// The longest control frame the fstrm library accepts.
const MAX_CONTROL: u32 = 512;

/// What a reader gets: a data frame's payload, or a control frame's type and content types.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data(Vec<u8>),
    Control {
        kind: u32,
        content_types: Vec<Vec<u8>>,
    },
}

/// A control frame of `kind`, with `content_type` as its field when given.
pub fn write_control(
    out: &mut impl Write,
    kind: u32,
    content_type: Option<&[u8]>,
) -> io::Result<()> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&0u32.to_be_bytes());
    frame.extend_from_slice(&0u32.to_be_bytes()); // the length, filled in below
    frame.extend_from_slice(&kind.to_be_bytes());
    if let Some(content_type) = content_type {
        frame.extend_from_slice(&FIELD_CONTENT_TYPE.to_be_bytes());
        frame.extend_from_slice(&(content_type.len() as u32).to_be_bytes());
        frame.extend_from_slice(content_type);
    }
    let length = (frame.len() - 8) as u32;
    frame[4..8].copy_from_slice(&length.to_be_bytes());
    out.write_all(&frame)
}

/// A data frame around `payload` (never empty: an empty one would read as the escape).
pub fn write_data(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    debug_assert!(!payload.is_empty());
    out.write_all(&(payload.len() as u32).to_be_bytes())?;
    out.write_all(payload)
}

/// The next frame; a data frame longer than `max_data` is an error (a corrupt stream
/// must not make us allocate gigabytes).
pub fn read_frame(input: &mut impl Read, max_data: u32) -> io::Result<Frame> {
    let length = read_u32(input)?;
    if length != 0 {
        if length > max_data {
            return Err(invalid(format!("data frame of {length} bytes")));
        }
        let mut payload = vec![0; length as usize];
        input.read_exact(&mut payload)?;
        return Ok(Frame::Data(payload));
    }
    let length = read_u32(input)?;
    if !(4..=MAX_CONTROL).contains(&length) {
        return Err(invalid(format!("control frame of {length} bytes")));
    }
    let mut control = vec![0; length as usize];
    input.read_exact(&mut control)?;
    let kind = u32::from_be_bytes(control[..4].try_into().unwrap_or_default());
    let mut fields = &control[4..];
    let mut content_types = Vec::new();
    while !fields.is_empty() {
        let (field, len) = match fields {
            [f0, f1, f2, f3, l0, l1, l2, l3, ..] => (
                u32::from_be_bytes([*f0, *f1, *f2, *f3]),
                u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize,
            ),
            _ => return Err(invalid("truncated control field".into())),
        };
        let Some(value) = fields.get(8..8 + len) else {
            return Err(invalid("control field past the frame's end".into()));
        };
        if field == FIELD_CONTENT_TYPE {
            content_types.push(value.to_vec());
        }
        fields = &fields[8 + len..];
    }
    Ok(Frame::Control {
        kind,
        content_types,
    })
}

fn read_u32(input: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0; 4];
    input.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("Frame Streams: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT_TYPE: &[u8] = b"protobuf:dnstap.Dnstap";

    #[test]
    fn a_start_frame_is_the_escape_its_length_type_and_content_type() {
        let mut out = Vec::new();
        write_control(&mut out, START, Some(CONTENT_TYPE)).unwrap();
        let mut expected = vec![0, 0, 0, 0, 0, 0, 0, 34, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 22];
        expected.extend_from_slice(CONTENT_TYPE);
        assert_eq!(out, expected);
        out.clear();
        write_control(&mut out, FINISH, None).unwrap();
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 5]);
    }

    #[test]
    fn frames_read_back_as_written() {
        let mut stream = Vec::new();
        write_control(&mut stream, READY, Some(CONTENT_TYPE)).unwrap();
        write_data(&mut stream, b"payload").unwrap();
        write_control(&mut stream, STOP, None).unwrap();
        let mut input = &stream[..];
        assert_eq!(
            read_frame(&mut input, 100).unwrap(),
            Frame::Control {
                kind: READY,
                content_types: vec![CONTENT_TYPE.to_vec()]
            }
        );
        assert_eq!(
            read_frame(&mut input, 100).unwrap(),
            Frame::Data(b"payload".to_vec())
        );
        assert_eq!(
            read_frame(&mut input, 100).unwrap(),
            Frame::Control {
                kind: STOP,
                content_types: vec![]
            }
        );
        assert_eq!(
            read_frame(&mut input, 100).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn corrupt_lengths_are_errors_not_allocations() {
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..], 1 << 20).is_err());
        let long_control = [0, 0, 0, 0, 0, 0, 0x10, 0];
        assert!(read_frame(&mut &long_control[..], 1 << 20).is_err());
        let field_past_end = [0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9];
        assert!(read_frame(&mut &field_past_end[..], 1 << 20).is_err());
    }
}
