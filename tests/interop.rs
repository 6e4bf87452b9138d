//! An independent WebRTC implementation (Python's aiortc), driven by a
//! client written from docs/PROTOCOL.md alone, attaches a terminal over a
//! data channel.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use cocoon_signaling::auth::TokenKind;
use common::netns::Netns;
use common::*;

/// The Python with aiortc that `scripts/test` installs.
fn interop_python() -> PathBuf {
    let python = std::env::var_os("COCOON_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/interop-venv/bin/python"
            ))
        });
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test, which installs aiortc in a virtualenv",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aiortc_client_attaches_a_terminal_over_a_data_channel() {
    let python = interop_python();
    // The aiortc client lives in a namespace (aiortc gathers candidates on
    // every interface it sees); the worker gathers only on this side of the
    // namespace's link. Every check either sends stays on that link.
    let ns = Netns::create();
    let rig = Rig::start_facing(&ns, &[]).await;
    let token = rig.server.token(TokenKind::Access, "alice");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/aiortc_client.py"
    );
    let run = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(python)
        .arg(script)
        .arg(rig.server.url())
        .arg(token.expose())
        .arg(rig.device_id.as_str())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the aiortc client finishes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "aiortc client failed:\n{stdout}\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("OK "))
        .expect("an OK line");
    assert!(line.starts_with("OK interop-42 exit=0 via="), "{line}");
    let via = line.rsplit("via=").next().unwrap();
    let (channel, _relay) = via.split_once('/').unwrap();
    assert!(
        channel.parse::<u32>().unwrap() > 0,
        "the terminal's bytes came over the data channel: {line}"
    );
}
