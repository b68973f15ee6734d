//! The wire between the Session Storage and the simulated Telegram cloud (`tgsim`).
//!
//! Requests and answers are the same TL bodies MTProto carries inside its encryption
//! (`phone.requestCall`, `auth.signIn`, … serialized by grammers-tl-types), so the gateway code
//! above the transport cannot tell the two apart. Only the envelope is simpler: frames of a
//! 4-byte little-endian length, a tag byte and the fields below. The first exchange stands in for
//! MTProto's auth-key creation: the client presents the key it has stored, or none, and the
//! cloud answers with the key this connection is bound to.

use std::io;

/// Largest frame either side accepts (Telegram's own limit on a request is 1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// One frame of the sim wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimFrame {
    /// Client → cloud, first frame: the stored auth key, if any.
    Hello { auth_key: Option<[u8; 32]> },
    /// Cloud → client: the auth key this connection uses (new if the Hello's was unknown).
    Welcome { auth_key: [u8; 32] },
    /// Client → cloud: a serialized TL function.
    Invoke { id: u64, body: Vec<u8> },
    /// Cloud → client: the serialized TL result of request `id`.
    Result { id: u64, body: Vec<u8> },
    /// Cloud → client: request `id` failed with Telegram's RPC error.
    RpcError { id: u64, code: i32, message: String },
    /// Cloud → client: a serialized `Updates`.
    Updates { body: Vec<u8> },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("sim wire: frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("sim wire: malformed frame ({0})")]
    Malformed(&'static str),
    #[error("sim wire: {0}")]
    Io(#[from] io::Error),
}

impl SimFrame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            SimFrame::Hello { auth_key } => {
                body.push(1);
                if let Some(k) = auth_key {
                    body.extend_from_slice(k);
                }
            }
            SimFrame::Welcome { auth_key } => {
                body.push(2);
                body.extend_from_slice(auth_key);
            }
            SimFrame::Invoke { id, body: b } => {
                body.push(3);
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(b);
            }
            SimFrame::Result { id, body: b } => {
                body.push(4);
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(b);
            }
            SimFrame::RpcError { id, code, message } => {
                body.push(5);
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&code.to_le_bytes());
                body.extend_from_slice(message.as_bytes());
            }
            SimFrame::Updates { body: b } => {
                body.push(6);
                body.extend_from_slice(b);
            }
        }
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses one frame's payload (without the length prefix).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let (&tag, rest) = payload.split_first().ok_or(WireError::Malformed("empty"))?;
        let id_of = |r: &[u8]| -> Result<(u64, Vec<u8>), WireError> {
            if r.len() < 8 {
                return Err(WireError::Malformed("short id"));
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&r[..8]);
            Ok((u64::from_le_bytes(id), r[8..].to_vec()))
        };
        Ok(match tag {
            1 => match rest.len() {
                0 => SimFrame::Hello { auth_key: None },
                32 => {
                    let mut k = [0u8; 32];
                    k.copy_from_slice(rest);
                    SimFrame::Hello { auth_key: Some(k) }
                }
                _ => return Err(WireError::Malformed("hello key length")),
            },
            2 => {
                let k: [u8; 32] = rest
                    .try_into()
                    .map_err(|_| WireError::Malformed("welcome key length"))?;
                SimFrame::Welcome { auth_key: k }
            }
            3 => {
                let (id, body) = id_of(rest)?;
                SimFrame::Invoke { id, body }
            }
            4 => {
                let (id, body) = id_of(rest)?;
                SimFrame::Result { id, body }
            }
            5 => {
                let (id, tail) = id_of(rest)?;
                if tail.len() < 4 {
                    return Err(WireError::Malformed("short error"));
                }
                let code = i32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
                let message = String::from_utf8(tail[4..].to_vec())
                    .map_err(|_| WireError::Malformed("error text not UTF-8"))?;
                SimFrame::RpcError { id, code, message }
            }
            6 => SimFrame::Updates {
                body: rest.to_vec(),
            },
            _ => return Err(WireError::Malformed("unknown tag")),
        })
    }
}

/// Reads one frame from an async stream; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SimFrame>, WireError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    SimFrame::decode(&buf).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_junk_is_an_error() {
        let frames = [
            SimFrame::Hello { auth_key: None },
            SimFrame::Hello {
                auth_key: Some([9; 32]),
            },
            SimFrame::Welcome { auth_key: [1; 32] },
            SimFrame::Invoke {
                id: 7,
                body: vec![1, 2, 3],
            },
            SimFrame::Result {
                id: 7,
                body: vec![],
            },
            SimFrame::RpcError {
                id: 8,
                code: 420,
                message: "FLOOD_WAIT_3".into(),
            },
            SimFrame::Updates { body: vec![5; 10] },
        ];
        for f in frames {
            let enc = f.encode();
            assert_eq!(SimFrame::decode(&enc[4..]).unwrap(), f);
        }
        for junk in [
            &[][..],
            &[9],
            &[1, 2],
            &[3, 1, 2],
            &[5, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ] {
            assert!(SimFrame::decode(junk).is_err(), "{junk:?}");
        }
    }
}
