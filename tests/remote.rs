//! The CLI's client commands against a live worker: `cocoon exec` (exit
//! codes, stdin, stdout/stderr), `cocoon attach` driven through a real
//! terminal (tmux): prompt, a command, a resize, detach and exit codes, and
//! `cocoon forward` serving a real HTTP service on a local port.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use cocoon_signaling::auth::TokenKind;
use common::{LOOPBACK_RTC_ENV, Rig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::Command;

/// `cocoon SUBCOMMAND` aimed at the rig's server, on loopback only.
fn cocoon(rig: &Rig, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cocoon"));
    command
        .args(args)
        .env("SIGNALING_SERVER_URL", rig.server.url())
        .env(
            "COCOON_ACCESS_TOKEN",
            rig.server.token(TokenKind::Access, "alice").expose(),
        )
        .envs(LOOPBACK_RTC_ENV.iter().copied())
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    command
}

async fn exec(rig: &Rig, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut command = cocoon(
        rig,
        &[&["exec", rig.device_id.as_str(), "--"], args].concat(),
    );
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
    }
    let output = tokio::time::timeout(common::DEADLINE, child.wait_with_output())
        .await
        .expect("exec finishes")
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn exec_propagates_exit_codes_output_and_stdin() {
    let rig = Rig::start(LOOPBACK_RTC_ENV).await;
    assert_eq!(exec(&rig, &["exit 7"], None).await.0, 7);
    let (code, out, err) = exec(&rig, &["echo out; echo err >&2"], None).await;
    assert_eq!((code, out.as_str(), err.as_str()), (0, "out\n", "err\n"));
    // Several arguments are quoted, not re-split by the remote shell.
    let (_, out, _) = exec(&rig, &["printf", "[%s]", "a b", "it's"], None).await;
    assert_eq!(out, "[a b][it's]");
    // Piped stdin reaches the command.
    let (code, out, _) = exec(&rig, &["tr", "a-z", "A-Z"], Some("hello\n")).await;
    assert_eq!((code, out.as_str()), (0, "HELLO\n"));
    // A device that is not there is a clear error.
    let output = cocoon(&rig, &["exec", "no-such-device", "--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no device of yours"));
}

#[tokio::test]
async fn exec_streams_output_while_the_command_runs() {
    let rig = Rig::start(LOOPBACK_RTC_ENV).await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // The command waits for a file the test creates only after reading the
    // first line: the line must arrive while the command still runs.
    let script = format!(
        "echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second >&2; \
         head -c 300000 /dev/zero | tr '\\0' x; exit 4",
        go = go.display()
    );
    let mut child = cocoon(&rig, &["exec", rig.device_id.as_str(), "--", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(common::DEADLINE, stdout.read_line(&mut first))
        .await
        .expect("the first line arrives while the command runs")
        .unwrap();
    assert_eq!(first, "first\n");
    std::fs::write(&go, "").unwrap();
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut rest)
        .await
        .unwrap();
    let output = tokio::time::timeout(common::DEADLINE, child.wait_with_output())
        .await
        .expect("exec finishes")
        .unwrap();
    assert_eq!(output.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&output.stderr), "second\n");
    // Streamed output is not capped like a result's (256 KiB).
    assert_eq!(rest.len(), 300_000);
    assert!(rest.iter().all(|&b| b == b'x'));
}

/// A tmux server of its own, killed when dropped.
struct Tmux {
    socket: tempfile::TempDir,
}

impl Tmux {
    fn path(&self) -> String {
        self.socket.path().join("tmux").display().to_string()
    }

    async fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .arg("-S")
            .arg(self.path())
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "tmux {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"]).await
    }

    /// Waits until a line of the screen satisfies `wanted`.
    async fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + common::DEADLINE;
        loop {
            let screen = self.screen().await;
            if screen.lines().any(|line| wanted(line.trim_end())) {
                return;
            }
            assert!(Instant::now() < deadline, "no {what} on:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .arg("-S")
            .arg(self.path())
            .arg("kill-server")
            .output();
    }
}

#[tokio::test]
async fn attach_is_a_terminal_with_resize_detach_and_exit_codes() {
    let rig = Rig::start(LOOPBACK_RTC_ENV).await;
    let tmux = Tmux {
        socket: tempfile::tempdir().unwrap(),
    };
    // The environment of the attach command, as a shell prefix for tmux.
    let env = cocoon(&rig, &[]);
    let vars: Vec<String> = env
        .as_std()
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}='{}'", k.to_str()?, v?.to_str()?)))
        .collect();
    let attach = |command: &str| {
        format!(
            "env {} {} attach {} -- {command}; echo EXIT=$?; sleep 60",
            vars.join(" "),
            env!("CARGO_BIN_EXE_cocoon"),
            rig.device_id
        )
    };

    let shell = attach("'PS1=\"READY\\$ \" exec bash --norc --noprofile'");
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &shell,
    ])
    .await;
    tmux.wait_for("prompt", |line| line.starts_with("READY$"))
        .await;
    tmux.run(&["send-keys", "-t", "t", "echo $((6*7))", "Enter"])
        .await;
    tmux.wait_for("answer", |line| line == "42").await;
    tmux.run(&["send-keys", "-t", "t", "tput cols", "Enter"])
        .await;
    tmux.wait_for("100 columns", |line| line == "100").await;
    tmux.run(&["resize-window", "-t", "t", "-x", "72", "-y", "20"])
        .await;
    // The new size travels to the remote terminal on its own schedule: ask
    // again until the program sees it.
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        tmux.run(&["send-keys", "-t", "t", "clear; tput cols", "Enter"])
            .await;
        tmux.wait_for("prompt", |line| line.starts_with("READY$"))
            .await;
        let screen = tmux.screen().await;
        if screen.lines().any(|line| line.trim_end() == "72") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never arrived:\n{screen}"
        );
    }
    // Ctrl-] detaches: attach exits 0, the shell lives on.
    tmux.run(&["send-keys", "-t", "t", "C-]"]).await;
    tmux.wait_for("detach", |line| line == "EXIT=0").await;
    tmux.run(&["kill-session", "-t", "t"]).await;

    // The remote program's exit code comes back.
    let exits = attach("sh -c 'exit 5'");
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "80",
        "-y",
        "24",
        &exits,
    ])
    .await;
    tmux.wait_for("exit code", |line| line == "EXIT=5").await;
}

/// One HTTP/1.1 request on a fresh connection; the whole response.
async fn http(addr: &str, request: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(common::DEADLINE, tcp.read_to_end(&mut response))
        .await
        .expect("a response")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn forward_serves_a_service_of_the_worker_on_a_local_port() {
    let upstream = common::http::upstream().await;
    let services = format!("web:{}", upstream.addr.port());
    let env: Vec<(&str, &str)> = LOOPBACK_RTC_ENV
        .iter()
        .copied()
        .chain([("COCOON_SERVICES", services.as_str())])
        .collect();
    let rig = Rig::start(&env).await;
    let mut child = cocoon(&rig, &["forward", rig.device_id.as_str(), "0:web"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(common::DEADLINE, lines.next_line())
        .await
        .expect("forward starts")
        .unwrap()
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();

    let page = http(
        &addr,
        "GET /page.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains(common::http::PAGE), "{page}");
    let echoed = http(
        &addr,
        "POST /echo?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(echoed.contains("x-method: POST"), "{echoed}");
    assert!(echoed.contains("x-path: /echo?x=1"), "{echoed}");
    assert!(echoed.ends_with("hello"), "{echoed}");
    child.kill().await.unwrap();
}
