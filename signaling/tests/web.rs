//! The browser client's files at `/`: served from the web root with the
//! right types and headers, nothing outside it, and `/ws` and `/health`
//! untouched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_signaling::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);
const INDEX: &str = "<!doctype html><title>cocoon</title><script src=app.js></script>\n";

/// A server on a free loopback port; shut down and awaited on [`stop`].
struct TestServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

impl TestServer {
    async fn start(web_root: Option<PathBuf>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut config = Config::new(([127, 0, 0, 1], 0).into(), data.path().to_owned());
        config.web_root = web_root;
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
            _data: data,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }

    /// One raw HTTP/1.1 request: the path goes out exactly as written, with
    /// no client-side normalisation of `..` or percent escapes.
    async fn request(&self, method: &str, path: &str) -> Reply {
        let exchange = async {
            let mut tcp = TcpStream::connect(self.addr).await.unwrap();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                self.addr
            );
            tcp.write_all(head.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            tcp.read_to_end(&mut raw).await.unwrap();
            raw
        };
        let raw = tokio::time::timeout(DEADLINE, exchange)
            .await
            .expect("the server answers in time");
        Reply::parse(&raw)
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8]) -> Self {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete response head");
        let head = std::str::from_utf8(&raw[..split]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        Self {
            status: status.parse().unwrap(),
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `root/` holds the client; `secret.txt` and `outside/` sit next to it.
fn site(base: &Path) -> PathBuf {
    let root = base.join("root");
    std::fs::create_dir_all(root.join("assets")).unwrap();
    std::fs::write(root.join("index.html"), INDEX).unwrap();
    std::fs::write(root.join("app.js"), "console.log('hi');\n").unwrap();
    std::fs::write(root.join("assets/logo.svg"), "<svg/>").unwrap();
    std::fs::write(root.join(".hidden"), "hidden").unwrap();
    std::fs::write(base.join("secret.txt"), "outside the root").unwrap();
    std::fs::create_dir(base.join("outside")).unwrap();
    std::fs::write(base.join("outside/secret.txt"), "outside the root").unwrap();
    std::os::unix::fs::symlink(base.join("secret.txt"), root.join("link.txt")).unwrap();
    std::os::unix::fs::symlink(base.join("outside"), root.join("linked")).unwrap();
    let big = std::fs::File::create(root.join("big.bin")).unwrap();
    big.set_len(cocoon_signaling::web::MAX_FILE_BYTES + 1)
        .unwrap();
    root
}

#[tokio::test]
async fn serves_the_client_and_nothing_outside_it() {
    let base = tempfile::tempdir().unwrap();
    let server = TestServer::start(Some(site(base.path()))).await;

    let index = server.request("GET", "/").await;
    assert_eq!(index.status, 200);
    assert_eq!(index.text(), INDEX);
    assert!(
        index
            .header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let csp = index.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(index.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(index.header("x-frame-options"), Some("DENY"));
    assert_eq!(index.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(index.header("cache-control"), Some("no-cache"));
    assert_eq!(server.request("GET", "/index.html").await.text(), INDEX);

    let app = server.request("GET", "/app.js").await;
    assert_eq!(app.status, 200);
    let media = app.header("content-type").unwrap();
    assert!(
        media.starts_with("application/javascript") || media.starts_with("text/javascript"),
        "{media}"
    );
    let logo = server.request("GET", "/assets/logo.svg?v=1").await;
    assert_eq!((logo.status, logo.text().as_str()), (200, "<svg/>"));
    assert_eq!(logo.header("content-type"), Some("image/svg+xml"));

    let head = server.request("HEAD", "/").await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(INDEX.len().to_string().as_str())
    );
    assert!(head.body.is_empty());

    for path in [
        "/../Cargo.toml",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/assets/../../secret.txt",
        "/.hidden",
        "/link.txt",
        "/linked/secret.txt",
        "/assets",
        "/assets/",
        "/missing.js",
        "//index.html",
    ] {
        let reply = server.request("GET", path).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.text());
        assert!(!reply.text().contains("outside the root"), "{path}");
    }

    let big = server.request("GET", "/big.bin").await;
    assert_eq!(big.status, 500);
    assert!(big.text().contains("too large"), "{}", big.text());

    for method in ["POST", "PUT", "DELETE"] {
        let reply = server.request(method, "/index.html").await;
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(reply.header("allow"), Some("GET,HEAD"));
    }

    // The server's own endpoints are still there.
    let health = server.request("GET", "/health").await;
    assert_eq!(health.status, 200);
    assert!(
        health.text().contains("\"status\":\"ok\""),
        "{}",
        health.text()
    );
    let ws = format!("ws://{}/ws", server.addr);
    let (socket, response) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(ws))
        .await
        .expect("the upgrade answers in time")
        .expect("/ws upgrades");
    assert_eq!(response.status(), 101);
    drop(socket);

    server.stop().await;
}

#[tokio::test]
async fn without_a_web_root_the_root_says_how_to_get_the_client() {
    let server = TestServer::start(None).await;
    let reply = server.request("GET", "/").await;
    assert_eq!(reply.status, 404);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let text = reply.text();
    assert!(
        text.contains("cocoon signaling server") && text.contains("--web-root"),
        "{text}"
    );
    assert_eq!(server.request("GET", "/health").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_missing_web_root_is_a_startup_error() {
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), data.path().join("data"));
    config.web_root = Some(data.path().join("no-such-dir"));
    let Err(err) = Server::bind(config).await else {
        panic!("a missing web root must not bind");
    };
    let message = format!("{err:#}");
    assert!(
        message.contains("web root") && message.contains("no-such-dir"),
        "{message}"
    );
}
