//! One terminal of any system, as the measurements see it: bytes in, bytes
//! out. Every system's client is adapted to this (a task per direction, the
//! same hop for all), so the figures compare the systems and not the glue.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::mpsc;

/// A live terminal session of one system.
pub struct Terminal {
    /// Keystrokes to the remote terminal.
    pub input: mpsc::Sender<Bytes>,
    /// What the remote terminal prints.
    pub output: mpsc::Receiver<Bytes>,
    /// Keeps the session (and whatever serves it) alive; dropped to end it.
    #[allow(dead_code)] // held for its `Drop`, never read
    pub guard: Box<dyn std::any::Any + Send>,
}

/// How long to wait for anything before calling a run failed.
pub const STALL: Duration = Duration::from_secs(30);

impl Terminal {
    /// Sends bytes as typed.
    pub async fn type_bytes(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.input
            .send(Bytes::copy_from_slice(bytes))
            .await
            .context("the terminal's input is closed")
    }

    /// Reads until `needle` has been seen in the output; returns everything
    /// read.
    pub async fn read_until(&mut self, needle: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut seen = Vec::new();
        loop {
            let chunk = tokio::time::timeout(STALL, self.output.recv())
                .await
                .with_context(|| {
                    format!(
                        "no {:?} within {STALL:?}; last output {:?}",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(&seen[seen.len().saturating_sub(200)..])
                    )
                })?
                .context("the terminal's output ended")?;
            seen.extend_from_slice(&chunk);
            if seen.windows(needle.len()).any(|w| w == needle) {
                return Ok(seen);
            }
        }
    }

    /// Brings the shell to a known state: a marker echoed back proves it
    /// reads input, then `cat` holds the terminal in canonical mode, so each
    /// typed byte is echoed by the kernel's line discipline alone.
    pub async fn prepare_echo(&mut self) -> anyhow::Result<()> {
        self.type_bytes(b"stty -echo; echo REA''DY; stty echo; exec cat\r")
            .await?;
        self.read_until(b"READY").await?;
        // Let `cat` start and drain what the shell printed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while self.output.try_recv().is_ok() {}
        Ok(())
    }

    /// Ends the session the way a user would: interrupt what runs, leave
    /// the shell, and wait (a little) for the output to end. A session left
    /// running would go on costing the server CPU in later measurements.
    pub async fn close(mut self) {
        let _ = self.type_bytes(b"\x03").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.type_bytes(b"\x03exit\r").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.output.recv().await.is_some() {}
        })
        .await;
    }

    /// `count` round trips of one byte typed and its echo awaited.
    pub async fn echo(&mut self, count: usize) -> anyhow::Result<Vec<Duration>> {
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            self.type_bytes(b"a").await?;
            let mut got = 0;
            while got == 0 {
                let chunk = tokio::time::timeout(STALL, self.output.recv())
                    .await
                    .context("an echo never came")?
                    .context("the terminal's output ended")?;
                got += chunk.iter().filter(|&&b| b == b'a').count();
            }
            times.push(start.elapsed());
        }
        Ok(times)
    }

    /// Has the shell print `bytes` bytes and reads them all; returns how
    /// long that took. The shell must be at a prompt.
    pub async fn throughput(&mut self, bytes: u64) -> anyhow::Result<Duration> {
        let command =
            format!("stty -echo; head -c {bytes} /dev/zero | tr '\\0' a; echo; echo DO''NE\r");
        self.type_bytes(command.as_bytes()).await?;
        let start = Instant::now();
        let mut counted = 0u64;
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::time::timeout(STALL, self.output.recv())
                .await
                .context("the output stalled")?
                .context("the terminal's output ended")?;
            counted += chunk.iter().filter(|&&b| b == b'a').count() as u64;
            tail.extend_from_slice(&chunk);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
            if counted >= bytes && tail.windows(4).any(|w| w == b"DONE") {
                return Ok(start.elapsed());
            }
        }
    }
}
