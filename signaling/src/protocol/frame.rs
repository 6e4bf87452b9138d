//! Session frames: the binary unit of the session layer, the same on every
//! link (a WebSocket relay message or a data-channel message).
//!
//! A session carries numbered byte *streams* in each direction. Stream 0 is
//! the control stream (length-prefixed JSON requests and responses); the
//! others carry terminal bytes. Every byte has an offset in its stream, so a
//! receiver can drop duplicates and a sender can resend what was not
//! acknowledged when the link changes. All integers are big-endian.
//!
//! ```text
//! DATA  0x01 | stream u32 | offset u64 | bytes…   bytes at that offset
//! ACK   0x02 | stream u32 | offset u64            everything below offset arrived
//! FIN   0x03 | stream u32 | offset u64            the stream ends at offset
//! PING  0x04 | nonce u64                          answer with PONG
//! PONG  0x05 | nonce u64                          the PING's nonce
//! SKIP  0x06 | stream u32 | offset u64            bytes below offset will never come
//! ```
//!
//! SKIP is how a terminal stream tells a receiver that fell too far behind
//! (and stopped acknowledging) that the oldest output was dropped: the
//! receiver continues at `offset`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest encoded frame: safe on every data channel and browser.
pub const MAX_FRAME: usize = 16 * 1024;
/// Bytes of a DATA frame's header.
pub const DATA_HEADER: usize = 1 + 4 + 8;
/// Largest payload of one DATA frame.
pub const MAX_DATA: usize = MAX_FRAME - DATA_HEADER;
/// The control stream.
pub const CONTROL_STREAM: u32 = 0;

/// One session frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Stream bytes starting at `offset`.
    Data {
        /// The stream.
        stream: u32,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes (at most [`MAX_DATA`]).
        bytes: Bytes,
    },
    /// The receiver has every byte of `stream` below `offset`.
    Ack {
        /// The stream.
        stream: u32,
        /// First byte not yet received.
        offset: u64,
    },
    /// The stream ends at `offset`.
    Fin {
        /// The stream.
        stream: u32,
        /// Its final length.
        offset: u64,
    },
    /// A liveness and round-trip probe.
    Ping(u64),
    /// The answer to a [`Frame::Ping`].
    Pong(u64),
    /// Bytes of `stream` below `offset` were dropped and will never come.
    Skip {
        /// The stream.
        stream: u32,
        /// Where it continues.
        offset: u64,
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Nothing at all.
    #[error("empty frame")]
    Empty,
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds {MAX_FRAME}")]
    TooLarge(usize),
    /// The first byte names no frame kind.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// Shorter or longer than its kind requires.
    #[error("frame kind {0:#04x} has the wrong length {1}")]
    BadLength(u8, usize),
}

const DATA: u8 = 0x01;
const ACK: u8 = 0x02;
const FIN: u8 = 0x03;
const PING: u8 = 0x04;
const PONG: u8 = 0x05;
const SKIP: u8 = 0x06;

impl Frame {
    /// Encodes the frame.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        match self {
            Frame::Data {
                stream,
                offset,
                bytes,
            } => {
                out.put_u8(DATA);
                out.put_u32(*stream);
                out.put_u64(*offset);
                out.put_slice(bytes);
            }
            Frame::Ack { stream, offset }
            | Frame::Fin { stream, offset }
            | Frame::Skip { stream, offset } => {
                out.put_u8(match self {
                    Frame::Ack { .. } => ACK,
                    Frame::Fin { .. } => FIN,
                    _ => SKIP,
                });
                out.put_u32(*stream);
                out.put_u64(*offset);
            }
            Frame::Ping(nonce) | Frame::Pong(nonce) => {
                out.put_u8(if matches!(self, Frame::Ping(_)) {
                    PING
                } else {
                    PONG
                });
                out.put_u64(*nonce);
            }
        }
        out.freeze()
    }

    fn encoded_len(&self) -> usize {
        match self {
            Frame::Data { bytes, .. } => DATA_HEADER + bytes.len(),
            Frame::Ack { .. } | Frame::Fin { .. } | Frame::Skip { .. } => 13,
            Frame::Ping(_) | Frame::Pong(_) => 9,
        }
    }

    /// Decodes one frame; the payload of a DATA frame shares `bytes`.
    pub fn decode(bytes: Bytes) -> Result<Frame, FrameError> {
        let len = bytes.len();
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let Some(&kind) = bytes.first() else {
            return Err(FrameError::Empty);
        };
        let mut body = bytes.slice(1..);
        let exact = |n: usize| {
            if len == n {
                Ok(())
            } else {
                Err(FrameError::BadLength(kind, len))
            }
        };
        match kind {
            DATA => {
                if len < DATA_HEADER {
                    return Err(FrameError::BadLength(kind, len));
                }
                let stream = body.get_u32();
                let offset = body.get_u64();
                Ok(Frame::Data {
                    stream,
                    offset,
                    bytes: body,
                })
            }
            ACK | FIN | SKIP => {
                exact(13)?;
                let stream = body.get_u32();
                let offset = body.get_u64();
                Ok(match kind {
                    ACK => Frame::Ack { stream, offset },
                    FIN => Frame::Fin { stream, offset },
                    _ => Frame::Skip { stream, offset },
                })
            }
            PING | PONG => {
                exact(9)?;
                let nonce = body.get_u64();
                Ok(if kind == PING {
                    Frame::Ping(nonce)
                } else {
                    Frame::Pong(nonce)
                })
            }
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let frames = [
            Frame::Data {
                stream: 7,
                offset: u64::MAX - 3,
                bytes: Bytes::from_static(b"\xff\x00hello"),
            },
            Frame::Data {
                stream: 0,
                offset: 0,
                bytes: Bytes::new(),
            },
            Frame::Ack {
                stream: 1,
                offset: 42,
            },
            Frame::Fin {
                stream: 1,
                offset: 43,
            },
            Frame::Ping(9),
            Frame::Pong(9),
            Frame::Skip {
                stream: 2,
                offset: 1 << 40,
            },
        ];
        for frame in frames {
            assert_eq!(Frame::decode(frame.encode()), Ok(frame));
        }
        let full = Frame::Data {
            stream: 1,
            offset: 0,
            bytes: Bytes::from(vec![1; MAX_DATA]),
        };
        assert_eq!(full.encode().len(), MAX_FRAME);
    }

    #[test]
    fn rejects_malformed_bytes() {
        assert_eq!(Frame::decode(Bytes::new()), Err(FrameError::Empty));
        assert_eq!(
            Frame::decode(Bytes::from_static(&[9])),
            Err(FrameError::UnknownKind(9))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[1, 0, 0])),
            Err(FrameError::BadLength(1, 3))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[4, 0])),
            Err(FrameError::BadLength(4, 2))
        );
        let mut ack = Frame::Ack {
            stream: 1,
            offset: 1,
        }
        .encode()
        .to_vec();
        ack.push(0);
        assert_eq!(
            Frame::decode(Bytes::from(ack)),
            Err(FrameError::BadLength(2, 14))
        );
        let huge = Bytes::from(vec![1; MAX_FRAME + 1]);
        assert_eq!(
            Frame::decode(huge),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
    }
}
