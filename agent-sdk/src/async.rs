//! The frame codec over tokio streams (feature `tokio`): [`read_frame`] / [`write_frame`] for
//! `AsyncRead`/`AsyncWrite`, and [`FrameCodec`] for `tokio_util::codec::Framed*`.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{check_len, decode_body, encode_frame, FrameError, HEADER_LEN};

/// Reads one frame. `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                got,
                want: HEADER_LEN,
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    check_len(len, max)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = r.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { got, want: len });
        }
        got += n;
    }
    decode_body(&body).map(Some)
}

/// Writes one frame (checked against `max`) and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    frame: &T,
    max: usize,
) -> Result<(), FrameError> {
    let bytes = encode_frame(frame, max)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// A `tokio_util` codec decoding frames of type `In` and encoding frames of type `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing bodies larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            _types: PhantomData,
        }
    }
}

impl<In: DeserializeOwned, Out> tokio_util::codec::Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&src[..HEADER_LEN]);
        let len = u32::from_be_bytes(header) as usize;
        check_len(len, self.max)?;
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len);
        decode_body(&body).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                got: buf.len(),
                want: HEADER_LEN.max(buf.len() + 1),
            }),
        }
    }
}

impl<In, Out: Serialize> tokio_util::codec::Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let bytes = encode_frame(&item, self.max)?;
        dst.put_slice(&bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentFrame, RuntimeFrame};
    use tokio_util::codec::{Decoder, Encoder};

    #[tokio::test]
    async fn async_and_blocking_codecs_agree() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let frame = AgentFrame::Log {
            level: "info".into(),
            message: "x".repeat(300),
        };
        let f2 = frame.clone();
        let writer = tokio::spawn(async move { write_frame(&mut a, &f2, 1 << 20).await });
        let got: AgentFrame = read_frame(&mut b, 1 << 20)
            .await
            .expect("read")
            .expect("a frame");
        writer.await.expect("join").expect("write");
        assert_eq!(got, frame);

        let mut blocking = Vec::new();
        crate::codec::write_frame(&mut blocking, &frame).expect("write");
        let mut codec = FrameCodec::<AgentFrame, RuntimeFrame>::new(1 << 20);
        let mut buf = BytesMut::from(&blocking[..blocking.len() - 3]);
        assert_eq!(codec.decode(&mut buf).expect("partial"), None);
        buf.extend_from_slice(&blocking[blocking.len() - 3..]);
        assert_eq!(codec.decode(&mut buf).expect("full"), Some(frame));

        let mut out = BytesMut::new();
        codec
            .encode(RuntimeFrame::Ack { ref_id: "r".into() }, &mut out)
            .expect("encode");
        let back: Option<RuntimeFrame> =
            crate::codec::read_frame(&mut &out[..], 1024).expect("decode");
        assert_eq!(back, Some(RuntimeFrame::Ack { ref_id: "r".into() }));
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_its_body() {
        let mut src: &[u8] = &[0, 0, 0x10, 0];
        let err = read_frame::<_, AgentFrame>(&mut src, 100)
            .await
            .expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { len: 4096, .. }));
    }
}
