//! The harness still works: a smoke run over cocoon's own systems with the
//! debug binaries the workspace build made, the browser terminal in Chromium
//! and the NATS fleet included (as root, with the browser client built and
//! Debian's nats-server installed: `./scripts/test` does all that). It
//! checks that every figure was produced, not how good it is (speed lives
//! in BENCHMARKS.md, not in tests).

use std::process::Command;

#[test]
fn a_smoke_run_produces_every_figure() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO_BIN_EXE_cocoon-bench"))
        .current_dir(root)
        .args([
            "--smoke",
            "--bin",
            "target/debug",
            "--systems",
            "raw,webrtc,dc,relay,hop,ws,fleet,chromium",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| raw PTY, no network (the limit) |",
        "| webrtc-rs data channel alone, no PTY |",
        "| cocoon, data channel (Rust client) |",
        "| cocoon, WebSocket relay (Rust client) |",
        "| signaling server's relay hop alone (frames, no PTY) |",
        "| one direct loopback WebSocket (the hop's baseline) |",
        "relay hop: ",
        "| relay hop across two instances on NATS (frames, no PTY) |",
        "fleet hop: ",
        "| cocoon in Chromium (xterm.js, data channel; ≤ 50 MB runs) |",
        "relay → P2P: median ",
        "worker RSS: idle ",
        "signaling server RSS: ",
    ] {
        assert!(stdout.contains(row), "no {row:?} in\n{stdout}");
    }
    assert!(!stdout.contains("NaN"), "{stdout}");
}
