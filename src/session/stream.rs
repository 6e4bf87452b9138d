//! Reliable byte streams over links that may change: what a sender keeps
//! until it is acknowledged, and how a receiver takes each byte exactly once.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame, MAX_DATA};
use tokio::time::Instant;

/// An outgoing stream whose bytes are kept until acknowledged, so they can
/// be sent again on another link.
#[derive(Debug)]
pub struct OutStream {
    id: u32,
    /// Bytes from `acked` on: sent but unacknowledged, then not yet sent.
    buf: VecDeque<u8>,
    acked: u64,
    sent: u64,
    capacity: usize,
    /// When acknowledgements last made progress (or sending started).
    last_progress: Instant,
}

impl OutStream {
    /// An empty stream holding at most `capacity` unacknowledged bytes.
    pub fn new(id: u32, capacity: usize) -> Self {
        Self {
            id,
            buf: VecDeque::new(),
            acked: 0,
            sent: 0,
            capacity,
            last_progress: Instant::now(),
        }
    }

    /// The stream's number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Offset up to which the peer has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Empties the stream of everything not acknowledged yet, sent or not,
    /// and returns it (to carry over to another stream).
    pub fn take_unacknowledged(&mut self) -> Vec<u8> {
        self.sent = self.acked;
        self.buf.drain(..).collect()
    }

    /// Bytes that can still be queued.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.buf.len())
    }

    /// Queues bytes; the caller checks [`OutStream::room`] first.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.in_flight() {
            self.last_progress = Instant::now();
        }
        self.buf.extend(bytes);
    }

    /// The next DATA frame to send, if any bytes are unsent.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let start = (self.sent - self.acked) as usize;
        if start >= self.buf.len() {
            return None;
        }
        let end = (start + MAX_DATA).min(self.buf.len());
        let mut bytes = BytesMut::with_capacity(end - start);
        bytes.extend(self.buf.range(start..end).copied());
        let frame = Frame::Data {
            stream: self.id,
            offset: self.sent,
            bytes: bytes.freeze(),
        };
        self.sent += (end - start) as u64;
        Some(frame)
    }

    /// The peer has everything below `offset`.
    pub fn ack(&mut self, offset: u64) -> bool {
        let offset = offset.min(self.sent);
        if offset <= self.acked {
            return false;
        }
        self.buf.drain(..(offset - self.acked) as usize);
        self.acked = offset;
        self.last_progress = Instant::now();
        true
    }

    /// Sends everything unacknowledged again (after a link change or a
    /// retransmission timeout).
    pub fn rewind(&mut self) {
        self.sent = self.acked;
        self.last_progress = Instant::now();
    }

    /// Rewinds when bytes are in flight and no acknowledgement has come for
    /// `after`; returns whether it did.
    pub fn resend_if_stalled(&mut self, after: Duration) -> bool {
        let stalled = self.in_flight() && self.last_progress.elapsed() >= after;
        if stalled {
            self.rewind();
        }
        stalled
    }

    /// Whether sent bytes await acknowledgement.
    pub fn in_flight(&self) -> bool {
        self.sent > self.acked
    }
}

/// An incoming stream: every byte is delivered once, in order.
#[derive(Debug, Default)]
pub struct InStream {
    next: u64,
}

impl InStream {
    /// The new bytes of a DATA frame: none for a duplicate or for a frame
    /// beyond a gap (the sender will resend the gap), the unseen tail of
    /// one that overlaps.
    pub fn accept(&mut self, offset: u64, bytes: Bytes) -> Option<Bytes> {
        // A peer's offset can be anything; no stream reaches past u64::MAX.
        let end = offset.checked_add(bytes.len() as u64)?;
        if offset > self.next || end <= self.next {
            return None;
        }
        let fresh = bytes.slice((self.next - offset) as usize..);
        self.next = end;
        Some(fresh)
    }

    /// The offset just past the last byte taken.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Continues at `offset`: the sender dropped what came before it.
    pub fn skip_to(&mut self, offset: u64) {
        self.next = self.next.max(offset);
    }

    /// Gives back bytes from `offset` on (they could not be used); the
    /// sender resends them.
    pub fn unaccept(&mut self, offset: u64) {
        self.next = self.next.min(offset);
    }

    /// An ACK of everything taken so far. Sent for every DATA frame, new or
    /// duplicate: a duplicate means the sender missed an earlier ACK.
    pub fn ack(&self, stream: u32) -> Frame {
        Frame::Ack {
            stream,
            offset: self.next,
        }
    }
}

/// Length-prefixed messages on a byte stream: `[u32 length][bytes]`.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: BytesMut,
}

/// Largest control message.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Frames one message for a byte stream.
pub fn frame_message(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + message.len());
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

impl MessageReader {
    /// Adds stream bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message; an error when a length is over the limit
    /// (the stream is then unusable).
    pub fn next_message(&mut self) -> Result<Option<Bytes>, usize> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("four bytes")) as usize;
        if len > MAX_MESSAGE {
            return Err(len);
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let mut message = self.buf.split_to(4 + len);
        Ok(Some(message.split_off(4).freeze()))
    }
}

/// One side of a session's control stream: messages out, kept until
/// acknowledged, and messages in, each byte taken once.
#[derive(Debug)]
pub struct ControlStream {
    out: OutStream,
    input: InStream,
    reader: MessageReader,
}

impl ControlStream {
    /// A control stream keeping at most `capacity` unacknowledged bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            out: OutStream::new(CONTROL_STREAM, capacity),
            input: InStream::default(),
            reader: MessageReader::default(),
        }
    }

    /// Queues one message; `false` when the backlog has no room for it.
    pub fn queue(&mut self, message: &[u8]) -> bool {
        let framed = frame_message(message);
        let fits = framed.len() <= self.out.room();
        if fits {
            self.out.push(&framed);
        }
        fits
    }

    /// Takes a DATA frame of the control stream: the ACK to send back, and
    /// the messages it completed. A message over [`MAX_MESSAGE`] cannot be
    /// read: the stream's reader starts over (the peer is broken anyway).
    pub fn receive(&mut self, offset: u64, bytes: Bytes) -> (Frame, Vec<Bytes>) {
        let mut messages = Vec::new();
        if let Some(fresh) = self.input.accept(offset, bytes) {
            self.reader.push(&fresh);
            loop {
                match self.reader.next_message() {
                    Ok(Some(message)) => messages.push(message),
                    Ok(None) => break,
                    Err(len) => {
                        tracing::warn!(len, "control message too large; the stream starts over");
                        self.reader = MessageReader::default();
                        break;
                    }
                }
            }
        }
        (self.input.ack(CONTROL_STREAM), messages)
    }

    /// The peer acknowledged everything below `offset`.
    pub fn acked(&mut self, offset: u64) {
        self.out.ack(offset);
    }

    /// The next frame to send, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.out.next_frame()
    }

    /// Sends everything unacknowledged again (the link changed).
    pub fn rewind(&mut self) {
        self.out.rewind();
    }

    /// See [`OutStream::resend_if_stalled`].
    pub fn resend_if_stalled(&mut self, after: Duration) -> bool {
        self.out.resend_if_stalled(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(frame: Frame) -> (u64, Bytes) {
        match frame {
            Frame::Data { offset, bytes, .. } => (offset, bytes),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resends_exactly_the_unacknowledged_bytes() {
        let mut out = OutStream::new(3, 1 << 20);
        out.push(&vec![7; MAX_DATA + 10]);
        let (o1, b1) = data(out.next_frame().unwrap());
        let (o2, b2) = data(out.next_frame().unwrap());
        assert_eq!(
            (o1, b1.len(), o2, b2.len()),
            (0, MAX_DATA, MAX_DATA as u64, 10)
        );
        assert!(out.next_frame().is_none());
        assert!(out.ack(100));
        assert!(!out.ack(50), "old acks change nothing");
        out.rewind();
        let (offset, bytes) = data(out.next_frame().unwrap());
        assert_eq!((offset, bytes.len()), (100, MAX_DATA + 10 - 100));
        assert!(out.ack(u64::MAX), "acks beyond what was sent are clamped");
        assert!(!out.in_flight());
    }

    #[test]
    fn takes_each_byte_once() {
        let mut input = InStream::default();
        assert_eq!(
            input.accept(0, Bytes::from_static(b"abc")).as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(
            input.accept(0, Bytes::from_static(b"abc")),
            None,
            "duplicate"
        );
        assert_eq!(input.accept(5, Bytes::from_static(b"xy")), None, "gap");
        assert_eq!(
            input.accept(1, Bytes::from_static(b"bcde")).as_deref(),
            Some(&b"de"[..])
        );
        assert_eq!(input.position(), 5);
        assert_eq!(
            input.ack(2),
            Frame::Ack {
                stream: 2,
                offset: 5
            }
        );
        input.skip_to(9);
        assert_eq!(
            input.accept(9, Bytes::from_static(b"z")).as_deref(),
            Some(&b"z"[..])
        );
        input.unaccept(7);
        assert_eq!(
            input.position(),
            7,
            "given-back bytes are taken again when resent"
        );
    }

    /// Found by fuzzing (control_stream): a DATA or SKIP offset near
    /// u64::MAX overflowed the end offset, a panic in debug builds.
    #[test]
    fn offsets_near_the_end_of_the_range_are_dropped() {
        let mut input = InStream::default();
        assert_eq!(input.accept(u64::MAX, Bytes::from_static(b"x")), None);
        input.skip_to(u64::MAX - 1);
        assert_eq!(input.accept(u64::MAX - 1, Bytes::from_static(b"ab")), None);
        assert_eq!(
            input
                .accept(u64::MAX - 1, Bytes::from_static(b"a"))
                .as_deref(),
            Some(&b"a"[..])
        );
        assert_eq!(input.position(), u64::MAX);
        let mut control = ControlStream::new(1024);
        let (ack, messages) = control.receive(u64::MAX - 2, Bytes::from_static(b"\0\0\0\0"));
        assert_eq!(
            ack,
            Frame::Ack {
                stream: CONTROL_STREAM,
                offset: 0
            }
        );
        assert!(messages.is_empty());
    }

    #[test]
    fn messages_split_anywhere() {
        let mut stream = frame_message(b"{\"a\":1}");
        stream.extend(frame_message(b"[]"));
        let mut reader = MessageReader::default();
        let mut got = Vec::new();
        for byte in stream {
            reader.push(&[byte]);
            while let Some(message) = reader.next_message().unwrap() {
                got.push(message);
            }
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"[]")]
        );
        let mut reader = MessageReader::default();
        reader.push(&u32::MAX.to_be_bytes());
        assert!(reader.next_message().is_err());
    }
}
