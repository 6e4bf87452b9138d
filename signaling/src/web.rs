//! The browser client: the built files of a web root, served read-only at
//! every path the router does not otherwise know (`/` is `index.html`).
//!
//! A request path maps onto the root one component at a time. Anything that
//! could climb out or reach a hidden file is refused before the file system
//! is touched, and symlinks are never followed: every component must be a
//! real directory and the last one a regular file. The root itself is the
//! operator's choice and may be a symlink. The checks guard against what a
//! build leaves in the tree (dotfiles, links into `node_modules`), not
//! against someone rewriting the root while it is served: whoever can do that
//! already controls the page.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use tokio::io::AsyncReadExt;

/// Larger files are not served (the client's bundle is far smaller).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// What the page may do: load its own scripts and styles, open WebSockets to
/// any server (the signaling server may live elsewhere), show proxied HTML in
/// a sandboxed `srcdoc`/blob frame. xterm.js sets inline styles.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
    style-src 'self' 'unsafe-inline'; frame-src 'self' blob: data:; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

const NO_CLIENT: &str = "This is a cocoon signaling server. Workers and clients connect to /ws.\n\
    It serves the browser client when started with --web-root DIR.\n";

/// The fallback service of the router: the files under `root`, or a short
/// note on how to get them when there is none. GET and HEAD only; other
/// methods get 405.
pub fn service(root: Option<PathBuf>) -> MethodRouter {
    match root {
        Some(root) => get(serve_file).with_state(Arc::from(root)),
        None => get(no_client),
    }
}

async fn no_client() -> Response {
    with_security_headers((StatusCode::NOT_FOUND, NO_CLIENT).into_response())
}

async fn serve_file(State(root): State<Arc<Path>>, uri: Uri) -> Response {
    let response = match map_path(uri.path()) {
        None => not_found(),
        Some(parts) => match read(&root, &parts).await {
            Ok(Some(bytes)) => {
                let name = parts.last().copied().unwrap_or_default();
                (
                    [
                        (header::CONTENT_TYPE, content_type(name)),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    Body::from(bytes),
                )
                    .into_response()
            }
            Ok(None) => not_found(),
            Err(Refused::TooLarge(size)) => {
                tracing::warn!(path = uri.path(), size, "web file too large to serve");
                let message =
                    format!("file too large to serve ({size} bytes > {MAX_FILE_BYTES})\n");
                (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
            }
            Err(Refused::Io(err)) => {
                tracing::warn!(path = uri.path(), %err, "cannot read web file");
                (StatusCode::INTERNAL_SERVER_ERROR, "cannot read file\n").into_response()
            }
        },
    };
    with_security_headers(response)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, CSP),
    ];
    for (name, value) in set {
        headers.insert::<HeaderName>(name, HeaderValue::from_static(value));
    }
    response
}

/// The components of `path` under the root, or `None` when the path is one
/// we refuse: anything with `%`, `\` or NUL, empty components (`//`, a
/// trailing `/`), and components that are `.`, `..` or start with a dot.
pub fn map_path(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(vec!["index.html"]);
    }
    if rest.contains(['%', '\\', '\0']) {
        return None;
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let hostile = |part: &&str| part.is_empty() || part.starts_with('.');
    if parts.iter().any(hostile) {
        return None;
    }
    Some(parts)
}

enum Refused {
    TooLarge(u64),
    Io(io::Error),
}

/// Reads the regular file at `parts` under `root`; `Ok(None)` when there is
/// none (missing, a directory, a symlink, a device…).
async fn read(root: &Path, parts: &[&str]) -> Result<Option<Vec<u8>>, Refused> {
    let Some((last, dirs)) = parts.split_last() else {
        return Ok(None);
    };
    let mut path = root.to_path_buf();
    for dir in dirs {
        path.push(dir);
        match lstat(&path).await? {
            Some(meta) if meta.file_type().is_dir() => {}
            _ => return Ok(None),
        }
    }
    path.push(last);
    let checked = match lstat(&path).await? {
        Some(meta) if meta.file_type().is_file() => meta,
        _ => return Ok(None),
    };
    if checked.len() > MAX_FILE_BYTES {
        return Err(Refused::TooLarge(checked.len()));
    }
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Refused::Io(err)),
    };
    // The file opened must be the one checked: a component swapped for a
    // symlink in between would give another inode.
    let opened = file.metadata().await.map_err(Refused::Io)?;
    if (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(opened.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(Refused::Io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Refused::TooLarge(bytes.len() as u64));
    }
    Ok(Some(bytes))
}

/// `symlink_metadata`, with "not there" (including a file where a directory
/// was expected) as `None`.
async fn lstat(path: &Path) -> Result<Option<std::fs::Metadata>, Refused> {
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) => Ok(Some(meta)),
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(Refused::Io(err)),
    }
}

/// The media type for a file name, by extension.
pub fn content_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map_or("", |(_, ext)| ext);
    let types = [
        ("html", "text/html; charset=utf-8"),
        ("js", "text/javascript; charset=utf-8"),
        ("mjs", "text/javascript; charset=utf-8"),
        ("css", "text/css; charset=utf-8"),
        ("map", "application/json"),
        ("json", "application/json"),
        ("svg", "image/svg+xml"),
        ("png", "image/png"),
        ("ico", "image/x-icon"),
        ("woff2", "font/woff2"),
        ("txt", "text/plain; charset=utf-8"),
    ];
    types
        .iter()
        .find(|(ext, _)| ext.eq_ignore_ascii_case(extension))
        .map_or("application/octet-stream", |(_, media)| media)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_map_component_by_component() {
        assert_eq!(map_path("/"), Some(vec!["index.html"]));
        assert_eq!(map_path("/app.js"), Some(vec!["app.js"]));
        assert_eq!(
            map_path("/assets/fonts/a-b_c.woff2"),
            Some(vec!["assets", "fonts", "a-b_c.woff2"])
        );
        assert_eq!(map_path("/index.html"), Some(vec!["index.html"]));
        assert_eq!(map_path("/app.js.map"), Some(vec!["app.js.map"]));
    }

    #[test]
    fn hostile_paths_are_refused() {
        for path in [
            "",
            "app.js",
            "/..",
            "/../Cargo.toml",
            "/a/../../x",
            "/./index.html",
            "/.",
            "/.hidden",
            "/a/.git/config",
            "/%2e%2e/x",
            "/%2Fetc",
            "/a%00",
            "/a\\..\\b",
            "/a\0b",
            "//etc/passwd",
            "/a//b",
            "/dir/",
        ] {
            assert_eq!(map_path(path), None, "{path:?}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("app.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("APP.CSS"), "text/css; charset=utf-8");
        assert_eq!(content_type("app.js.map"), "application/json");
        assert_eq!(content_type("font.woff2"), "font/woff2");
        assert_eq!(content_type("LICENSE"), "application/octet-stream");
        assert_eq!(content_type("x.exe"), "application/octet-stream");
    }
}
