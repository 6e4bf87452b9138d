//! Failures a fleet meets every day, with nothing lost: the signaling
//! server restarting under live terminals, a worker that dies, a full disk
//! under the data dir.

mod common;

use std::time::Duration;

use cocoon::session::client::{PtyEvent, Session, SessionOptions};
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::protocol::service::Request;
use cocoon_signaling::protocol::{DeviceId, FromServer, ToServer};
use common::*;

async fn session(server: &TestServer, device: &DeviceId, options: SessionOptions) -> Session {
    Session::connect_opts(
        &server.url(),
        &server.token(TokenKind::Access, "alice"),
        plain_tls(),
        device,
        options,
    )
    .await
    .expect("session connects")
}

/// Output until a line equal to `line` has arrived.
async fn read_until_line(pty: &mut cocoon::session::client::Pty, out: &mut Vec<u8>, line: &str) {
    let needle = format!("\n{line}\r\n");
    while !String::from_utf8_lossy(out).contains(&needle) {
        match tokio::time::timeout(DEADLINE, pty.next()).await {
            Ok(Some(PtyEvent::Output(bytes))) => out.extend_from_slice(&bytes),
            other => panic!("waiting for {line:?}: {other:?}"),
        }
    }
}

/// The server announces its restart and closes with 1012; the worker comes
/// back by itself, the session reconnects and takes its terminal back:
/// every output line arrives once, in order, and every line typed — before,
/// during and after the outage — reaches the program exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_no_terminal_byte() {
    let server_dir = tempfile::tempdir().unwrap();
    let worker_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_restartable(server_dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");
    let mut worker = WorkerProcess::spawn(
        &server.url(),
        worker_dir.path(),
        &[("COCOON_SETUP_TOKEN", setup.expose())],
    );
    let device = device_id_in(&worker.expect_line("🆔 Device ID: ").await);
    let options = SessionOptions {
        rejoin_within: Duration::from_secs(30),
        offline_grace: Duration::from_secs(30),
        ..SessionOptions::default()
    };
    let session = session(&server, &device, options).await;
    // Counts to 20,000 in bursts while echoing every input line, then ends
    // once told to and the count is done.
    let program = "stty -echo; \
        (for n in $(seq 1 20000); do echo n$n; [ $((n % 1000)) = 0 ] && sleep 0.2; done; echo COUNTED) & \
        while read -r l; do [ \"$l\" = quit ] && break; echo \"in:$l\"; done; wait";
    let mut pty = session
        .attach_pty(attach_request(Some(program)))
        .await
        .unwrap();
    let mut out = Vec::new();
    read_until_line(&mut pty, &mut out, "n1500").await;
    for n in 1..=5 {
        pty.write(format!("a{n}\n").as_bytes()).await.unwrap();
    }
    read_until_line(&mut pty, &mut out, "in:a5").await;

    // A peer of the server's own sees the notice, then close code 1012.
    let mut watcher = RawPeer::connect(&server.url()).await;
    watcher
        .send(&ToServer::Authenticate {
            access_token: server.token(TokenKind::Access, "bob"),
        })
        .await;
    assert!(matches!(
        watcher.recv().await,
        Some(FromServer::Authenticated { .. })
    ));
    let (halted, (messages, code)) = tokio::join!(server.halt(), watcher.until_closed());
    assert!(
        messages.contains(&FromServer::ServerRestarting {}),
        "{messages:?}"
    );
    assert_eq!(code, Some(1012));

    // Typed while the server is down: held, then delivered once.
    for n in 1..=5 {
        pty.write(format!("b{n}\n").as_bytes()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = halted.start().await;
    worker.expect_line("✅ Registration confirmed").await;
    for n in 1..=5 {
        pty.write(format!("c{n}\n").as_bytes()).await.unwrap();
    }
    read_until_line(&mut pty, &mut out, "COUNTED").await;
    pty.write(b"quit\n").await.unwrap();
    let (rest, code) = drain_pty(&mut pty).await;
    out.extend_from_slice(&rest);
    assert_eq!(code, 0);

    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let counted: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with('n'))
        .collect();
    let want: Vec<String> = (1..=20000).map(|n| format!("n{n}")).collect();
    assert!(
        counted == want,
        "every output line once, in order ({} lines)",
        counted.len()
    );
    let typed: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("in:"))
        .collect();
    let want: Vec<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|p| (1..=5).map(move |n| format!("in:{p}{n}")))
        .collect();
    assert_eq!(typed, want, "every typed line once, in order");
    assert_eq!(session.ended_reason(), None);
    drop(server);
}

/// A worker that dies: requests fail at once with "device … is offline",
/// and its terminal ends after the grace period with the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_reported_offline() {
    let rig = Rig::start(&[]).await;
    let options = SessionOptions {
        offline_grace: Duration::from_secs(2),
        ..SessionOptions::default()
    };
    let session = session(&rig.server, &rig.device_id, options).await;
    let mut pty = session
        .attach_pty(attach_request(Some("cat")))
        .await
        .unwrap();
    pty.write(b"hello\n").await.unwrap();
    let mut out = Vec::new();
    read_until_line(&mut pty, &mut out, "hello").await;

    let Rig { worker, server, .. } = rig;
    worker.kill().await;
    let offline = format!("device {} is offline", rig.device_id);
    // The server tells the owner's clients; requests then fail at once.
    let failed = tokio::time::timeout(DEADLINE, async {
        loop {
            match session
                .request(Request::Execute(execute_request("true")))
                .await
            {
                Err(err) if err.to_string().contains(&offline) => return err,
                Err(err) => panic!("{err:#}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the device is reported offline in time");
    assert!(failed.to_string().contains("is offline"), "{failed:#}");

    let end = tokio::time::timeout(DEADLINE, pty.next())
        .await
        .expect("the terminal ends after the grace period");
    assert_eq!(end, None);
    assert_eq!(pty.ended_reason().as_deref(), Some(offline.as_str()));
    assert_eq!(session.ended_reason().as_deref(), Some(offline.as_str()));
    drop(server);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes zeros until the disk is full (bounded by its size).
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = [0u8; 4096];
        for _ in 0..100_000 {
            if file
                .write_all(&chunk)
                .and_then(|()| file.sync_all())
                .is_err()
            {
                return;
            }
        }
        panic!("the disk never filled up");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk under the data dir: the worker says so plainly, and the
/// secret, the device id and the task database are never torn.
#[tokio::test]
async fn a_full_data_disk_gets_a_clear_error_and_corrupts_nothing() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(server_dir.path()).await;
    let disk = SmallDisk::mount("2m");
    let data = disk.path().join("worker");
    let fresh = disk.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let setup = server.token(TokenKind::Setup, "alice");
    let mut worker = WorkerProcess::spawn(
        &server.url(),
        &data,
        &[("COCOON_SETUP_TOKEN", setup.expose())],
    );
    worker.expect_line("💾 Saved device ID to").await;
    worker.kill().await;
    let secret = std::fs::read(data.join(".secret")).unwrap();
    let device_id = std::fs::read(data.join(".device_id")).unwrap();

    disk.fill();

    // A worker that must save a new secret cannot, and says why.
    let worker = WorkerProcess::spawn(
        &server.url(),
        &fresh,
        &[("COCOON_SETUP_TOKEN", setup.expose())],
    );
    let (status, output) = worker.wait_exit().await;
    assert!(!status.success(), "{output}");
    assert!(output.contains("No space left on device"), "{output}");
    assert!(!fresh.join(".secret").exists(), "{output}");

    // The registered worker still starts from what it saved.
    let mut worker = WorkerProcess::spawn(&server.url(), &data, &[]);
    worker.expect_line("✅ Registration confirmed").await;
    // (Stopped, not killed: a kill mid-write leaves a temporary file, which
    // the next start removes.)
    worker.terminate().await;

    assert_eq!(std::fs::read(data.join(".secret")).unwrap(), secret);
    assert_eq!(std::fs::read(data.join(".device_id")).unwrap(), device_id);
    for dir in [&data, &fresh] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(
                !name.to_string_lossy().contains(".tmp"),
                "a temporary file was left behind: {name:?}"
            );
        }
    }
    let db = std::fs::read_dir(&data)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "db"))
        .expect("the task database");
    let check: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
