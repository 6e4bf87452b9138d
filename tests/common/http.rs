//! A real HTTP server on loopback for the proxy tests: it echoes what it
//! got in headers and body, with a few special paths (`/slow`, `/big`,
//! `/page.html`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// A real HTTP server: echoes what it got, with a few special paths.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
}

/// What `/page.html` serves.
pub const PAGE: &str = "<!doctype html><h1>served by the worker</h1>";

pub async fn upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    respond(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Upstream { addr, requests }
}

async fn respond(
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let hop = ["x-hop", "keep-alive", "proxy-authorization", "upgrade"]
        .iter()
        .filter(|h| req.headers().contains_key(**h))
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let accept = req
        .headers()
        .get("accept")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let response_body = match path.as_str() {
        "/api/parse?path=/project" => Bytes::from(r#"{"flows": []}"#),
        "/big" => Bytes::from(vec![b'z'; 200_000]),
        "/page.html" => Bytes::from_static(PAGE.as_bytes()),
        _ => body,
    };
    let content_type = if path == "/page.html" {
        "text/html; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let response = hyper::Response::builder()
        .header("x-method", method)
        .header("x-path", path)
        .header("x-host", host)
        .header("x-hop-seen", hop)
        .header("x-accept", accept)
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .header("content-type", content_type)
        .body(Full::new(response_body))
        .unwrap();
    Ok(response)
}
