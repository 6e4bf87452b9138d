//! What the session layer makes of the frames it receives: each byte of a
//! stream taken once (`InStream`), length-prefixed control messages cut out
//! of the control stream (`ControlStream`), checked against a plain model;
//! and a control stream over a lossy, repeating link that must deliver
//! every queued message once, in order.
//!
//! Input: `[u16 length][bytes]` records. As frames they go to a receiver;
//! as messages they go over the lossy link, whose losses the input's bits
//! decide.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use cocoon::session::stream::{ControlStream, InStream, MAX_MESSAGE};
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame, MAX_FRAME};
use cocoon_signaling::protocol::service::Request;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    receive(data);
    lossy_link(data);
});

fn records(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (record, tail) = tail.split_at(len);
        rest = tail;
        Some(record)
    })
}

/// A stream as the receiver should see it, written for clarity, not speed.
#[derive(Default)]
struct Model {
    /// Offset of the next byte wanted.
    next: u64,
    /// Control stream bytes not yet cut into messages.
    pending: Vec<u8>,
}

impl Model {
    /// The bytes of `bytes` (at `offset`) not seen yet, if they continue
    /// the stream without a gap. No byte lies past offset `u64::MAX`.
    fn accept(&mut self, offset: u64, bytes: &[u8]) -> Option<Vec<u8>> {
        let end = u128::from(offset) + bytes.len() as u128;
        if offset > self.next || end <= u128::from(self.next) || end > u128::from(u64::MAX) {
            return None;
        }
        let fresh = bytes[(self.next - offset) as usize..].to_vec();
        self.next = end as u64;
        Some(fresh)
    }

    /// Complete `[u32 length][message]` messages; an oversized length
    /// drops what is buffered.
    fn messages(&mut self, fresh: Option<Vec<u8>>) -> Vec<Bytes> {
        self.pending.extend(fresh.unwrap_or_default());
        let mut out = Vec::new();
        while let Some((len, rest)) = self.pending.split_first_chunk::<4>() {
            let len = u32::from_be_bytes(*len) as usize;
            if len > MAX_MESSAGE {
                self.pending.clear();
                break;
            }
            if rest.len() < len {
                break;
            }
            out.push(Bytes::copy_from_slice(&rest[..len]));
            self.pending.drain(..4 + len);
        }
        out
    }
}

/// The receiving half of a session, fed whatever frames the input holds.
fn receive(data: &[u8]) {
    let mut control = ControlStream::new(1 << 20);
    let mut control_model = Model::default();
    let mut terminals: BTreeMap<u32, (InStream, Model)> = BTreeMap::new();
    for record in records(data) {
        let Ok(frame) = Frame::decode(Bytes::copy_from_slice(record)) else {
            continue;
        };
        match frame {
            Frame::Data {
                stream: CONTROL_STREAM,
                offset,
                bytes,
            } => {
                let fresh = control_model.accept(offset, &bytes);
                let (ack, messages) = control.receive(offset, bytes);
                let want = Frame::Ack {
                    stream: CONTROL_STREAM,
                    offset: control_model.next,
                };
                assert_eq!(ack, want);
                assert_eq!(messages, control_model.messages(fresh));
                for message in messages {
                    if let Ok(value) = serde_json::from_slice::<Value>(&message) {
                        let _ = Request::decode(value);
                    }
                }
            }
            Frame::Data {
                stream,
                offset,
                bytes,
            } => {
                let (input, model) = terminals.entry(stream).or_default();
                let want = model.accept(offset, &bytes);
                let got = input.accept(offset, bytes);
                assert_eq!(got.as_deref(), want.as_deref());
                assert_eq!(input.position(), model.next);
            }
            Frame::Skip { stream, offset } => {
                let (input, model) = terminals.entry(stream).or_default();
                input.skip_to(offset);
                model.next = model.next.max(offset);
                assert_eq!(input.position(), model.next);
            }
            Frame::Ack {
                stream: CONTROL_STREAM,
                offset,
            } => control.acked(offset),
            _ => {}
        }
    }
}

/// Queues the records as messages on one control stream and carries its
/// frames to another over a link that drops, repeats and rewinds as the
/// input's bits say; then lets the link work until everything is acked.
fn lossy_link(data: &[u8]) {
    let mut bits = data
        .iter()
        .rev()
        .flat_map(|byte| (0..8).map(move |bit| byte >> bit & 1 == 1));
    let mut bit = move || bits.next().unwrap_or(false);
    let mut sender = ControlStream::new(64 * 1024);
    let mut receiver = ControlStream::new(64 * 1024);
    let (mut queued, mut delivered) = (Vec::new(), Vec::new());
    let mut carry = |sender: &mut ControlStream, lossy: bool, bit: &mut dyn FnMut() -> bool| {
        let mut frames = 0;
        while let Some(frame) = sender.next_frame() {
            frames += 1;
            let wire = frame.encode();
            assert!(wire.len() <= MAX_FRAME);
            let Ok(Frame::Data { offset, bytes, .. }) = Frame::decode(wire) else {
                panic!("the control stream sent {frame:?}");
            };
            let copies = if !lossy {
                1
            } else {
                usize::from(bit()) + usize::from(bit())
            };
            for _ in 0..copies {
                let (ack, messages) = receiver.receive(offset, bytes.clone());
                delivered.extend(messages);
                if !lossy || bit() {
                    let Frame::Ack { offset, .. } = ack else {
                        panic!("{ack:?}")
                    };
                    sender.acked(offset);
                }
            }
        }
        frames
    };
    for record in records(data) {
        if sender.queue(record) {
            queued.push(Bytes::copy_from_slice(record));
        }
        carry(&mut sender, true, &mut bit);
        if bit() {
            sender.rewind();
        }
    }
    // A working link: a rewind resends what was lost, until nothing is.
    for _ in 0..3 {
        sender.rewind();
        if carry(&mut sender, false, &mut bit) == 0 {
            break;
        }
    }
    sender.rewind();
    assert!(sender.next_frame().is_none(), "unacknowledged bytes remain");
    assert_eq!(delivered, queued);
}
