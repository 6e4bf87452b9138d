//! The stack alone: a webrtc-rs data channel between the harness and a peer
//! process of its own (`cocoon-bench --bare-peer`), set up exactly as
//! cocoon's (`RtcPeer`, loopback candidates, the same backpressure), with no
//! PTY, no session layer and no worker behind it. The peer plays a shell just
//! well enough for the measurements in `term.rs`: it answers the echo
//! preparation, echoes keystrokes, and answers the throughput command with
//! that many bytes in 16 KiB messages (cocoon's frame size). What cocoon adds
//! on top of the data channel is the difference between this row and
//! cocoon's.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cocoon::link::rtc::{ChannelSender, Events, RtcConfig, RtcEvent, RtcPeer};
use cocoon_signaling::protocol::service::IceCandidate;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::systems::{Aborting, loopback_rtc};
use crate::term::{STALL, Terminal};

/// Bytes per message when the peer streams: cocoon's largest frame.
const MESSAGE: usize = 16 * 1024;
/// How long a send may wait for the channel to drain. cocoon gives up after
/// 2 s and moves to the relay; here there is nowhere to go, so a slow
/// stretch (retransmissions on a loaded machine) is waited out.
const PATIENCE: Duration = Duration::from_secs(60);

/// Signaling between the harness and its peer, one JSON line each.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Signal {
    Offer(String),
    Answer(String),
    Candidate(IceCandidate),
}

/// A terminal on a data channel to a new peer process, and the peer's pid
/// (whose CPU is the "server side").
pub async fn terminal() -> anyhow::Result<(Terminal, u32)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--bare-peer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the bare peer")?;
    let pid = child.id().context("the bare peer runs")?;
    let mut to_peer = child.stdin.take().context("stdin is piped")?;
    let mut from_peer = BufReader::new(child.stdout.take().context("stdout is piped")?).lines();

    let (peer, mut events) = RtcPeer::new(&loopback_rtc()).await?;
    send(&mut to_peer, &Signal::Offer(peer.offer().await?)).await?;
    let channel = tokio::time::timeout(STALL, async {
        loop {
            tokio::select! {
                line = from_peer.next_line() => {
                    let line = line?.context("the bare peer ended")?;
                    match serde_json::from_str(&line)? {
                        Signal::Answer(sdp) => peer.accept_answer(sdp).await?,
                        Signal::Candidate(c) => peer.add_candidate(c).await?,
                        Signal::Offer(_) => anyhow::bail!("the bare peer offered"),
                    }
                }
                event = events.recv() => match event.context("the connection ended")? {
                    RtcEvent::Candidate(c) => send(&mut to_peer, &Signal::Candidate(c)).await?,
                    RtcEvent::Open(channel) => return anyhow::Ok(channel),
                    _ => {}
                },
            }
        }
    })
    .await
    .context("the data channel did not open")??;

    let sender = ChannelSender::with_stall(channel, PATIENCE).await;
    let (input, mut keys) = mpsc::channel::<Bytes>(256);
    let (screen, output) = mpsc::channel(256);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                key = keys.recv() => match key {
                    Some(bytes) => if sender.send(&bytes).await.is_err() { return },
                    None => return,
                },
                event = events.recv() => match event {
                    Some(RtcEvent::Message(bytes)) => {
                        if screen.send(bytes).await.is_err() { return }
                    }
                    Some(RtcEvent::Closed) | None => return,
                    Some(_) => {}
                },
            }
        }
    });
    // The pipes stay open: a late candidate must not break the peer's stdout.
    let guard = (
        child,
        to_peer,
        from_peer,
        Closing(peer),
        Aborting(vec![task]),
    );
    Ok((
        Terminal {
            input,
            output,
            guard: Box::new(guard),
        },
        pid,
    ))
}

/// Closes the connection when dropped.
struct Closing(RtcPeer);

impl Drop for Closing {
    fn drop(&mut self) {
        let pc = self.0.pc.clone();
        tokio::spawn(async move {
            let _ = pc.close().await;
        });
    }
}

async fn send(to: &mut (impl AsyncWriteExt + Unpin), signal: &Signal) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(signal)?;
    line.push(b'\n');
    to.write_all(&line).await?;
    Ok(to.flush().await?)
}

/// The peer process: answers the offer on stdin, then plays the shell until
/// the channel closes or the harness goes away.
pub async fn serve() -> anyhow::Result<()> {
    let config: RtcConfig = loopback_rtc();
    let (peer, mut events) = RtcPeer::new(&config).await?;
    let mut from_harness = BufReader::new(tokio::io::stdin()).lines();
    let mut to_harness = tokio::io::stdout();
    let channel = loop {
        tokio::select! {
            line = from_harness.next_line() => {
                let Some(line) = line? else { return Ok(()) };
                match serde_json::from_str(&line)? {
                    Signal::Offer(sdp) => {
                        let answer = peer.answer(sdp).await?;
                        send(&mut to_harness, &Signal::Answer(answer)).await?;
                    }
                    Signal::Candidate(c) => peer.add_candidate(c).await?,
                    Signal::Answer(_) => anyhow::bail!("the harness answered"),
                }
            }
            event = events.recv() => match event.context("the connection ended")? {
                RtcEvent::Candidate(c) => send(&mut to_harness, &Signal::Candidate(c)).await?,
                RtcEvent::Open(channel) => break channel,
                _ => {}
            },
        }
    };
    let sender = ChannelSender::with_stall(channel, PATIENCE).await;
    sender.send(&Bytes::from_static(b"$ ")).await?;
    play_shell(&sender, &mut events).await;
    peer.close().await;
    Ok(())
}

/// What the measurements type, answered as `bash` would answer it.
async fn play_shell(sender: &ChannelSender, events: &mut Events) {
    while let Some(event) = events.recv().await {
        let typed = match event {
            RtcEvent::Message(bytes) => bytes,
            RtcEvent::Closed => return,
            _ => continue,
        };
        let text = String::from_utf8_lossy(&typed);
        let reply = if text.contains("REA''DY") {
            Bytes::from_static(b"READY\r\n")
        } else if let Some(count) = requested_bytes(&text) {
            if stream(sender, count).await.is_err() {
                return;
            }
            Bytes::from_static(b"\r\nDONE\r\n$ ")
        } else if text.contains("exit") {
            return;
        } else if text.contains('\x03') {
            continue;
        } else {
            typed
        };
        if sender.send(&reply).await.is_err() {
            return;
        }
    }
}

/// N in `head -c N`.
fn requested_bytes(text: &str) -> Option<u64> {
    let rest = text.split("head -c ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

async fn stream(sender: &ChannelSender, mut count: u64) -> anyhow::Result<()> {
    let full = Bytes::from(vec![b'a'; MESSAGE]);
    while count > 0 {
        let n = count.min(MESSAGE as u64) as usize;
        sender.send(&full.slice(..n)).await?;
        count -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_requested_size() {
        let typed = "stty -echo; head -c 4000000 /dev/zero | tr '\\0' a; echo\r";
        assert_eq!(super::requested_bytes(typed), Some(4_000_000));
        assert_eq!(super::requested_bytes("echo a\r"), None);
    }
}
