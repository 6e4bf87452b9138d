//! Binary messages of a session: the frames every link carries
//! (`Frame::decode`) and the relay's address envelope around them
//! (`decode_relay`).
#![no_main]

use bytes::Bytes;
use cocoon_signaling::protocol::frame::{Frame, FrameError, MAX_DATA, MAX_FRAME};
use cocoon_signaling::protocol::{ErrorCode, MAX_RELAY_BYTES, decode_relay, encode_relay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    frame(Bytes::copy_from_slice(data));
    relay(Bytes::copy_from_slice(data));
});

fn frame(bytes: Bytes) {
    match Frame::decode(bytes.clone()) {
        Ok(frame) => {
            assert!(bytes.len() <= MAX_FRAME);
            if let Frame::Data { bytes: payload, .. } = &frame {
                assert!(payload.len() <= MAX_DATA);
            }
            // Exactly one encoding per frame: nothing is ignored on the way in.
            assert_eq!(frame.encode(), bytes, "{frame:?}");
        }
        Err(FrameError::Empty) => assert!(bytes.is_empty()),
        Err(FrameError::TooLarge(len)) => assert!(len == bytes.len() && len > MAX_FRAME),
        Err(FrameError::UnknownKind(kind)) => {
            assert!(kind == bytes[0] && !(1..=6).contains(&kind));
        }
        Err(FrameError::BadLength(kind, len)) => {
            assert!(kind == bytes[0] && len == bytes.len() && len <= MAX_FRAME);
        }
    }
}

fn relay(message: Bytes) {
    match decode_relay(message.clone()) {
        Ok((address, frame)) => {
            assert!(message.len() <= MAX_RELAY_BYTES);
            assert_eq!(encode_relay(&address, &frame), message);
        }
        Err(err) => {
            let code = if message.len() > MAX_RELAY_BYTES {
                ErrorCode::MessageTooLarge
            } else {
                ErrorCode::InvalidMessage
            };
            assert_eq!(err.code, code, "{}", err.message);
        }
    }
}
