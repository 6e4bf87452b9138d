//! Micro-benchmarks of the session layer's stream codec: the control
//! stream's message framing and reassembly (`ControlStream`), and the byte
//! streams a terminal's output and input take (`OutStream`, `InStream`).
//!
//! `cargo bench -p cocoon-bench --bench session` (BENCHMARKS.md has the
//! figures).

use std::hint::black_box;

use bytes::Bytes;
use cocoon::session::stream::{ControlStream, InStream, OutStream};
use cocoon_signaling::protocol::frame::{Frame, MAX_DATA};
use cocoon_signaling::protocol::service::{AttachPty, Request};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// What a session keeps unacknowledged on its control stream (8 MiB, as
/// `session::peer`).
const CONTROL_BUFFER: usize = 8 * 1024 * 1024;

/// A typical small control message: opening a terminal.
fn attach_pty() -> Vec<u8> {
    serde_json::to_vec(&Request::AttachPty(AttachPty {
        request_id: Some("r-1".into()),
        command: None,
        cols: 120,
        rows: 40,
        env: Some([("TERM".to_owned(), "xterm-256color".to_owned())].into()),
        cwd: None,
        flow_control: true,
        stream: Some(3),
    }))
    .expect("serializes")
}

/// A large control message (a query's answer, an HTTP body): 64 KiB, five
/// DATA frames.
fn large() -> Vec<u8> {
    vec![b'x'; 64 * 1024]
}

/// The DATA frames a sender makes of one message: (offset, bytes).
fn split(message: &[u8]) -> Vec<(u64, Bytes)> {
    let mut sender = ControlStream::new(CONTROL_BUFFER);
    assert!(sender.queue(message));
    std::iter::from_fn(|| sender.next_frame())
        .map(|frame| match frame {
            Frame::Data { offset, bytes, .. } => (offset, bytes),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn control_stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("control_stream");
    for (name, message) in [("small", attach_pty()), ("64k", large())] {
        group.throughput(Throughput::Bytes(message.len() as u64));

        // Out: length prefix, kept until acknowledged, cut into frames.
        let mut sender = ControlStream::new(CONTROL_BUFFER);
        let mut sent = 0u64;
        group.bench_function(format!("send_{name}"), |b| {
            b.iter(|| {
                assert!(sender.queue(black_box(&message)));
                while let Some(frame) = sender.next_frame() {
                    black_box(frame);
                }
                sent += 4 + message.len() as u64;
                sender.acked(sent);
            })
        });

        // In: every frame taken once, the message put back together.
        let frames = split(&message);
        let span = 4 + message.len() as u64;
        let mut receiver = ControlStream::new(CONTROL_BUFFER);
        let mut base = 0u64;
        group.bench_function(format!("receive_{name}"), |b| {
            b.iter(|| {
                let mut complete = Vec::new();
                for (offset, bytes) in &frames {
                    let (ack, messages) = receiver.receive(base + offset, bytes.clone());
                    black_box(ack);
                    complete.extend(messages);
                }
                assert_eq!(complete.len(), 1);
                base += span;
                complete
            })
        });
    }
    group.finish();
}

fn terminal_stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("terminal_stream");
    group.throughput(Throughput::Bytes(MAX_DATA as u64));
    let output = vec![b'a'; MAX_DATA];

    // The worker's side of a terminal's output: queued, framed, acknowledged.
    let mut out = OutStream::new(3, 1 << 20);
    let mut sent = 0u64;
    group.bench_function("send_16k", |b| {
        b.iter(|| {
            out.push(black_box(&output));
            let frame = out.next_frame().expect("a frame");
            sent += MAX_DATA as u64;
            out.ack(sent);
            frame
        })
    });

    // The client's side: each byte taken once, shared, not copied.
    group.throughput(Throughput::Elements(1));
    let bytes = Bytes::from(output);
    let mut input = InStream::default();
    let mut offset = 0u64;
    group.bench_function("receive_16k", |b| {
        b.iter(|| {
            let fresh = input.accept(offset, black_box(bytes.clone()));
            offset += MAX_DATA as u64;
            fresh.expect("new bytes")
        })
    });
    group.finish();
}

criterion_group!(benches, control_stream, terminal_stream);
criterion_main!(benches);
