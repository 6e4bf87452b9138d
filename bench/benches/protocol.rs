//! Micro-benchmarks of the wire formats every byte of a session crosses:
//! session frames (encode, decode), the relay envelope around them, and the
//! signaling server's JSON decoding of a typical small message.
//!
//! Throughput is in bytes where the work grows with them (a copy, a parse);
//! elsewhere in frames (elements) per second: decoding shares the payload
//! instead of copying it, so its cost is the same for 1 byte or 16 KiB.
//!
//! `cargo bench -p cocoon-bench --bench protocol` (BENCHMARKS.md has the
//! figures).

use std::hint::black_box;

use bytes::Bytes;
use cocoon_signaling::protocol::frame::{Frame, MAX_DATA};
use cocoon_signaling::protocol::service::{IceCandidate, Request};
use cocoon_signaling::protocol::{
    DeviceId, ToServer, decode_relay, decode_to_server, encode_relay,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A device id as the server makes them: 64 hex digits.
const DEVICE: &str = "3f1c0d6e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d";

/// The frames of a terminal: a keystroke, a full frame of output (16 KiB
/// with its header), and the acknowledgement that answers each.
fn frames() -> [(&'static str, Frame); 3] {
    [
        (
            "keystroke",
            Frame::Data {
                stream: 1,
                offset: 4_242,
                bytes: Bytes::from_static(b"a"),
            },
        ),
        (
            "data_16k",
            Frame::Data {
                stream: 1,
                offset: 1 << 30,
                bytes: Bytes::from(vec![b'a'; MAX_DATA]),
            },
        ),
        (
            "ack",
            Frame::Ack {
                stream: 1,
                offset: 1 << 30,
            },
        ),
    ]
}

/// Bytes for a payload that is copied, else one frame.
fn copied(frame: &Frame, bytes: usize) -> Throughput {
    match frame {
        Frame::Data { bytes: payload, .. } if payload.len() > 1 => Throughput::Bytes(bytes as u64),
        _ => Throughput::Elements(1),
    }
}

fn frame_codec(c: &mut Criterion) {
    let mut encode = c.benchmark_group("frame_encode");
    for (name, frame) in frames() {
        encode.throughput(copied(&frame, frame.encode().len()));
        encode.bench_function(name, |b| b.iter(|| black_box(&frame).encode()));
    }
    encode.finish();

    let mut decode = c.benchmark_group("frame_decode");
    for (name, frame) in frames() {
        // Received frames arrive as `Bytes`; a clone is a reference count.
        let bytes = frame.encode();
        decode.throughput(Throughput::Elements(1));
        decode.bench_function(name, |b| {
            b.iter(|| Frame::decode(black_box(bytes.clone())).expect("a frame"))
        });
    }
    decode.finish();
}

fn relay_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay");
    for (name, frame) in frames().into_iter().filter(|(name, _)| *name != "ack") {
        let encoded = frame.encode();
        let message = encode_relay(DEVICE, &encoded);
        group.throughput(copied(&frame, message.len()));
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| encode_relay(black_box(DEVICE), black_box(&encoded)))
        });
        // The frame is shared, only the address copied.
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| decode_relay(black_box(message.clone())).expect("a relay message"))
        });
    }
    group.finish();
}

fn signaling_json(c: &mut Criterion) {
    // A client's ICE candidate for a device, as `sync_data`.
    let candidate = Request::RtcCandidate(IceCandidate {
        candidate: "candidate:1467250027 1 udp 2122260223 192.168.1.20 46243 typ host \
                    generation 0 ufrag EsAw network-id 1"
            .into(),
        sdp_mid: Some("0".into()),
        sdp_mline_index: Some(0),
        username_fragment: Some("EsAw".into()),
    });
    let message = ToServer::SyncData {
        payload: serde_json::to_value(&candidate).expect("serializes"),
        device_id: Some(DeviceId::new(DEVICE)),
        client_id: None,
    };
    let text = serde_json::to_string(&message).expect("serializes");
    assert_eq!(decode_to_server(&text), Ok(message));

    let mut group = c.benchmark_group("signaling_json");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("decode_sync_data_candidate", |b| {
        b.iter(|| decode_to_server(black_box(&text)).expect("a message"))
    });
    group.finish();
}

criterion_group!(benches, frame_codec, relay_envelope, signaling_json);
criterion_main!(benches);
