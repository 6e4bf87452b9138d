//! Client commands that reach into a device: `cocoon attach` (an interactive
//! terminal, like ssh), `cocoon exec` (one command: its output and exit
//! code) and `cocoon forward` (a local port for an HTTP service of the
//! device). All use the session layer, so they start on the relay and move to
//! a data channel when one opens.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

use anyhow::{Context, bail};
use cocoon_signaling::protocol::DeviceId;
use cocoon_signaling::protocol::service::{
    AttachPty, Encoding, Execute, HeaderValues, Headers, OutputStream, ProxyHttp, Request, Response,
};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::ClientArgs;
use crate::client::Client;
use crate::config::RtcArgs;
use crate::session::client::{PtyEvent, Session};

/// Ctrl-] ends `attach` and leaves the program running on the device.
const DETACH_KEY: u8 = 0x1d;
/// Most stdin `exec` forwards (the whole request must fit a message).
const MAX_EXEC_INPUT: usize = 512 * 1024;

/// `cocoon attach` options.
#[derive(clap::Args, Debug, Clone)]
pub struct AttachArgs {
    /// How to reach the signaling server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The device: its id, a unique prefix of it, or its name.
    pub device: String,
    /// Run this instead of the login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
    /// WebRTC settings (the session moves to a data channel when it can).
    #[command(flatten)]
    pub rtc: RtcArgs,
}

/// `cocoon exec` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {
    /// How to reach the signaling server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The device: its id, a unique prefix of it, or its name.
    pub device: String,
    /// The command (after `--`): one argument is a shell command line,
    /// several are quoted and joined.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    /// Seconds the command may run (the worker's default when unset).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// WebRTC settings.
    #[command(flatten)]
    pub rtc: RtcArgs,
}

/// `cocoon forward` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ForwardArgs {
    /// How to reach the signaling server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The device: its id, a unique prefix of it, or its name.
    pub device: String,
    /// `LOCAL_PORT:SERVICE`: listen on this port, serve that service of the
    /// worker (one of its `COCOON_SERVICES`).
    #[arg(value_parser = parse_forward)]
    pub forward: (u16, String),
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// WebRTC settings.
    #[command(flatten)]
    pub rtc: RtcArgs,
}

fn parse_forward(text: &str) -> Result<(u16, String), String> {
    let (port, service) = text
        .split_once(':')
        .ok_or("expected LOCAL_PORT:SERVICE, e.g. 8080:web")?;
    let port = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    if service.is_empty() {
        return Err("the service name is empty".into());
    }
    Ok((port, service.to_owned()))
}

/// Opens a session with the device `name` names.
async fn open(client: &ClientArgs, rtc: &RtcArgs, name: &str) -> anyhow::Result<Session> {
    let client = client.resolve()?;
    let tls = crate::tls::client_config(client.ca_file.as_deref())?;
    let mut lister = Client::connect(&client.url, &client.access_token, tls.clone()).await?;
    let devices = lister.list_devices().await?;
    let exact: Vec<_> = devices
        .iter()
        .filter(|d| d.device_id.as_str() == name || d.name.as_deref() == Some(name))
        .collect();
    let found = if exact.is_empty() {
        devices
            .iter()
            .filter(|d| d.device_id.as_str().starts_with(name))
            .collect()
    } else {
        exact
    };
    let device: DeviceId = match found.as_slice() {
        [one] => one.device_id.clone(),
        [] => bail!("no device of yours is called {name:?} (see `cocoon devices`)"),
        _ => bail!("{name:?} matches several devices; give more of the id"),
    };
    drop(lister);
    Session::connect_with(
        &client.url,
        &client.access_token,
        tls,
        &device,
        rtc.config()?,
    )
    .await
}

/// Joins arguments into one `sh -c` command line.
fn command_line(args: &[String]) -> String {
    match args {
        [one] => one.clone(),
        many => many
            .iter()
            .map(|arg| shell_quote(arg))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs `cocoon attach`; returns the remote program's exit code.
pub async fn attach(args: AttachArgs) -> anyhow::Result<i32> {
    let session = open(&args.client, &args.rtc, &args.device).await?;
    let (cols, rows) = terminal_size().unwrap_or((80, 24));
    let mut pty = session
        .attach_pty(AttachPty {
            request_id: None,
            command: (!args.command.is_empty()).then(|| command_line(&args.command)),
            cols,
            rows,
            env: None,
            cwd: None,
            flow_control: true,
            stream: None,
        })
        .await?;
    let raw = RawMode::enter()?;
    let mut keys = read_stdin();
    let mut stdout = std::io::stdout();
    let mut winch = signal(SignalKind::window_change())?;
    let mut stdin_open = true;
    let outcome = loop {
        tokio::select! {
            event = pty.next() => match event {
                Some(PtyEvent::Output(bytes)) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(PtyEvent::Snapshot { screen, .. }) => {
                    stdout.write_all(b"\x1bc")?;
                    stdout.write_all(&screen)?;
                    stdout.flush()?;
                }
                Some(PtyEvent::Skipped(_)) => {}
                Some(PtyEvent::Exited(code)) => break Ok(code),
                None => {
                    let reason = pty
                        .ended_reason()
                        .unwrap_or_else(|| "the connection to the device was lost".into());
                    break Err(anyhow::anyhow!(reason));
                }
            },
            read = keys.recv(), if stdin_open => {
                let Some(bytes) = read else {
                    stdin_open = false;
                    continue;
                };
                if let Some(at) = bytes.iter().position(|&b| b == DETACH_KEY) {
                    pty.write(&bytes[..at]).await?;
                    drop(raw);
                    eprintln!("\r\n[detached; the program keeps running on the device]");
                    return Ok(0);
                }
                pty.write(&bytes).await?;
            }
            _ = winch.recv() => {
                if let Some((cols, rows)) = terminal_size() {
                    pty.resize(cols, rows).await?;
                }
            }
        }
    };
    drop(raw);
    outcome
}

/// Runs `cocoon forward` until interrupted: every HTTP request to the local
/// port goes to the service through the worker's proxy.
pub async fn forward(args: ForwardArgs) -> anyhow::Result<i32> {
    let (port, service) = args.forward.clone();
    let session = Arc::new(open(&args.client, &args.rtc, &args.device).await?);
    let listener = tokio::net::TcpListener::bind((args.bind, port))
        .await
        .with_context(|| format!("cannot listen on {}:{port}", args.bind))?;
    eprintln!(
        "Forwarding http://{} to the service {service:?} of {} (Ctrl-C stops)",
        listener.local_addr()?,
        args.device
    );
    let service: Arc<str> = service.into();
    loop {
        let (tcp, _) = listener.accept().await?;
        let session = session.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |request| {
                proxy(session.clone(), service.clone(), request)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), handler)
                .await;
        });
    }
}

/// Most request body `forward` carries (the proxy's own limit is near).
const MAX_FORWARD_BODY: usize = 512 * 1024;

async fn proxy(
    session: Arc<Session>,
    service: Arc<str>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: u16, text: String| {
        let mut response = hyper::Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
        Ok(response)
    };
    let (parts, body) = request.into_parts();
    let Ok(body) = Limited::new(body, MAX_FORWARD_BODY).collect().await else {
        return reply(413, format!("request body over {MAX_FORWARD_BODY} bytes\n"));
    };
    let body = body.to_bytes();
    let mut headers = Headers::new();
    for (name, value) in &parts.headers {
        let Ok(value) = value.to_str() else { continue };
        match headers.entry(name.as_str().to_owned()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(HeaderValues::One(value.to_owned()));
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let values = slot.get_mut();
                let mut all: Vec<String> = values.iter().map(str::to_owned).collect();
                all.push(value.to_owned());
                *values = HeaderValues::Many(all);
            }
        }
    }
    let (body, body_encoding) = match body.is_empty() {
        true => (None, Encoding::Utf8),
        false => {
            let (text, encoding) = Encoding::encode(&body);
            (Some(text), encoding)
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let answer = session
        .request(Request::ProxyHttp(ProxyHttp {
            request_id: uuid::Uuid::new_v4().to_string(),
            service_name: service.to_string(),
            method: parts.method.as_str().to_owned(),
            path,
            headers,
            body,
            body_encoding,
        }))
        .await;
    let result = match answer {
        Ok(Response::ProxyResult(result)) => result,
        Ok(Response::Error { message, .. }) => return reply(502, format!("{message}\n")),
        Ok(other) => return reply(502, format!("unexpected reply {other:?}\n")),
        Err(err) => return reply(502, format!("the device did not answer: {err:#}\n")),
    };
    let body = match result
        .body
        .as_deref()
        .map(|b| result.body_encoding.decode(b))
    {
        None => Vec::new(),
        Some(Ok(bytes)) => bytes,
        Some(Err(_)) => return reply(502, "the device sent an undecodable body\n".into()),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(result.status_code).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    for (name, values) in &result.headers {
        // The body is whole: its length is set anew, hop-by-hop headers stay out.
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            continue;
        }
        for value in values.iter() {
            if let (Ok(name), Ok(value)) = (
                hyper::header::HeaderName::from_bytes(name.as_bytes()),
                hyper::header::HeaderValue::from_str(value),
            ) {
                response.headers_mut().append(name, value);
            }
        }
    }
    Ok(response)
}

/// Keystrokes from stdin, read on a thread of their own: a read blocked on
/// a terminal must not hold the process open once the remote program ends
/// (tokio's stdin would, at runtime shutdown).
fn read_stdin() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Runs `cocoon exec`; returns the command's exit code.
pub async fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let input = if std::io::stdin().is_terminal() {
        None
    } else {
        // Read to the end, so no read is left pending at exit.
        let mut bytes = Vec::new();
        tokio::io::stdin()
            .take(MAX_EXEC_INPUT as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .context("cannot read stdin")?;
        anyhow::ensure!(
            bytes.len() <= MAX_EXEC_INPUT,
            "stdin is over {MAX_EXEC_INPUT} bytes; copy large inputs another way"
        );
        Some(String::from_utf8(bytes).context("exec forwards text on stdin, not binary data")?)
    };
    let session = open(&args.client, &args.rtc, &args.device).await?;
    let mut run = session
        .execute_streaming(Execute {
            request_id: None,
            command: command_line(&args.command),
            input,
            timeout_secs: args.timeout,
            env: None,
            cwd: None,
            stream: true,
        })
        .await?;
    // Output as it comes, each piece to where the command wrote it.
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    while let Some(piece) = run.next().await {
        let bytes = piece.encoding.decode(&piece.data)?;
        match piece.stream {
            OutputStream::Stdout => {
                stdout.write_all(&bytes).await?;
                stdout.flush().await?;
            }
            OutputStream::Stderr => {
                stderr.write_all(&bytes).await?;
                stderr.flush().await?;
            }
        }
    }
    let result = match run.result().await? {
        Response::ExecuteResult(result) => result,
        Response::Error { code, message, .. } => bail!("{message} ({code:?})"),
        other => bail!("unexpected reply {other:?}"),
    };
    let data = result.data;
    if data.truncated {
        eprintln!("cocoon: the output was truncated");
    }
    Ok(match (data.exit_code, data.error.as_deref()) {
        (Some(code), _) => code,
        (None, Some("timeout")) => 124,
        (None, Some("spawn_failed")) => 127,
        (None, _) => 1,
    })
}

/// The size of the terminal on stdout (or stdin), when there is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    for fd in [1, 0] {
        // SAFETY: TIOCGWINSZ fills a winsize we own; a bad fd only fails.
        let ok = unsafe { nix::libc::ioctl(fd, nix::libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_col > 0 && size.ws_row > 0 {
            return Some((size.ws_col.min(1000), size.ws_row.min(1000)));
        }
    }
    None
}

/// The local terminal in raw mode (keys go to the remote program as they
/// are, Ctrl-C included) until dropped. Not a terminal: nothing to do.
struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(Self { saved: None });
        }
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd).context("cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).context("cannot set raw mode")?;
        Ok(Self { saved: Some(saved) })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: fd 0 stays open for the life of the process.
            let fd = unsafe { BorrowedFd::borrow_raw(std::io::stdin().as_raw_fd()) };
            let _ = termios::tcsetattr(fd, SetArg::TCSANOW, saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_become_one_quoted_command_line() {
        assert_eq!(command_line(&["ls -la | wc -l".into()]), "ls -la | wc -l");
        assert_eq!(
            command_line(&["printf".into(), "%s\n".into(), "it's".into(), "a b".into()]),
            r"printf '%s
' 'it'\''s' 'a b'"
        );
        assert_eq!(command_line(&["echo".into(), "".into()]), "echo ''");
    }
}
