//! Length-prefixed framing: a 4-byte big-endian body length, then that many bytes of JSON.
//!
//! [`write_frame`] / [`read_frame`] work on blocking `std::io` streams (what an agent program
//! uses); with the `tokio` feature, [`r#async`](crate::r#async) offers the same over tokio's
//! `AsyncRead`/`AsyncWrite` and a `tokio_util` codec.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Default largest frame body: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Errors reading or writing frames.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("frame I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame announced a body larger than allowed (nothing of it was read).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A frame announced an empty body.
    #[error("empty frame")]
    Empty,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The body is not a valid frame of the expected direction.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `frame` as one length-prefixed frame (prefix included).
pub fn encode_frame<T: Serialize>(frame: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut out, frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > max || len > u32::MAX as usize {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes a frame body (without the prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Checks an announced body length against `max`.
pub fn check_len(len: usize, max: usize) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(())
}

/// Writes one frame and flushes.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, frame: &T) -> Result<(), FrameError> {
    let bytes = encode_frame(frame, DEFAULT_MAX_FRAME)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame<R: Read, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got,
                    want: HEADER_LEN,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    check_len(len, max)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut body[got..]) {
            Ok(0) => return Err(FrameError::Truncated { got, want: len }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    decode_body(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AgentFrame;

    #[test]
    fn frames_round_trip_through_a_byte_stream() {
        let frames = vec![
            AgentFrame::Heartbeat {},
            AgentFrame::Log {
                level: "info".into(),
                message: "hello".into(),
            },
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write_frame(&mut buf, f).expect("write");
        }
        assert_eq!(
            &buf[..4],
            &(r#"{"type":"heartbeat"}"#.len() as u32).to_be_bytes()
        );
        let mut r = &buf[..];
        let mut back = Vec::new();
        while let Some(f) = read_frame::<_, AgentFrame>(&mut r, 1024).expect("read") {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    #[test]
    fn oversized_truncated_and_empty_frames_are_errors() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &AgentFrame::Heartbeat {}).expect("write");
        assert!(matches!(
            read_frame::<_, AgentFrame>(&mut &buf[..], 4),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            read_frame::<_, AgentFrame>(&mut &buf[..buf.len() - 1], 1024),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            read_frame::<_, AgentFrame>(&mut &[0u8, 0, 0, 0][..], 1024),
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_frame::<_, AgentFrame>(&mut &[0u8, 0][..], 1024),
            Err(FrameError::Truncated { .. })
        ));
        let mut bad = (3u32).to_be_bytes().to_vec();
        bad.extend_from_slice(b"{x}");
        assert!(matches!(
            read_frame::<_, AgentFrame>(&mut &bad[..], 1024),
            Err(FrameError::Malformed(_))
        ));
    }
}
