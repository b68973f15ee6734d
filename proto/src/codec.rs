//! Length-prefixed frames: a 4-byte big-endian payload length, then a postcard-encoded payload.
//!
//! Postcard is compact, schema-driven by serde and well kept; the length prefix makes stream
//! framing trivial and lets a reader reject an oversized frame before buffering it.

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// Largest payload either side accepts; a larger length prefix means a broken or hostile peer.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The payload is not a valid encoding of the expected message type.
    #[error("malformed frame payload: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Appends one frame carrying `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let buf = std::mem::take(out);
    let mut buf = postcard::to_extend(msg, buf)?;
    let len = buf.len() - start - 4;
    if len > MAX_FRAME_LEN {
        buf.truncate(start);
        *out = buf;
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    *out = buf;
    Ok(())
}

/// Sans-IO frame reassembler: feed it whatever the socket returned, then drain whole frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffers bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame's payload, decoded as `T`, or `None` if more bytes are needed.
    ///
    /// After an error the stream is out of sync; the caller should drop the connection.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let payload = self.buf.split_to(len);
        Ok(Some(postcard::from_bytes(&payload)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    #[test]
    fn frames_split_at_every_byte_boundary_reassemble() {
        let msgs = vec![
            Message::Request {
                id: 7,
                command: Command::CreateSession {
                    tag: "call-1".into(),
                },
            },
            Message::Event(Event::RtpTimeout {
                session: 3,
                leg: 1,
                idle_ms: 10_000,
            }),
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut wire).unwrap();
        }
        for split in 0..wire.len() {
            let mut dec = FrameDecoder::new();
            dec.push(&wire[..split]);
            let mut got = Vec::new();
            while let Some(m) = dec.next_frame::<Message>().unwrap() {
                got.push(m);
            }
            dec.push(&wire[split..]);
            while let Some(m) = dec.next_frame::<Message>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, msgs, "split at {split}");
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_buffering() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            dec.next_frame::<Message>(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_payload_is_an_error_not_a_panic() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(dec.next_frame::<Message>().is_err());
    }
}
