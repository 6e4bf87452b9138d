//! `proxy_http` against a real HTTP server that the test runs on loopback.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cocoon_signaling::protocol::service::{
    Encoding, HeaderValues, Headers, ProxyHttp, ProxyResult, Request, Response,
};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

/// A real HTTP server: echoes what it got, with a few special paths.
struct Upstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

async fn upstream() -> Upstream {
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
        _ => body,
    };
    let response = hyper::Response::builder()
        .header("x-method", method)
        .header("x-path", path)
        .header("x-host", host)
        .header("x-hop-seen", hop)
        .header("x-accept", accept)
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .header("content-type", "application/octet-stream")
        .body(Full::new(response_body))
        .unwrap();
    Ok(response)
}

fn request(service: &str, method: &str, path: &str) -> ProxyHttp {
    ProxyHttp {
        request_id: format!("{method} {path}"),
        service_name: service.into(),
        method: method.into(),
        path: path.into(),
        headers: Headers::new(),
        body: None,
        body_encoding: Encoding::Utf8,
    }
}

async fn proxy(rig: &mut Rig, request: ProxyHttp) -> ProxyResult {
    let id = request.request_id.clone();
    rig.send(&Request::ProxyHttp(request)).await;
    match rig.recv().await {
        Response::ProxyResult(result) => {
            assert_eq!(result.request_id, id);
            result
        }
        other => panic!("expected proxy_result, got {other:?}"),
    }
}

fn header<'a>(result: &'a ProxyResult, name: &str) -> &'a str {
    match result.headers.get(name) {
        Some(HeaderValues::One(value)) => value,
        other => panic!("header {name}: {other:?} in {:?}", result.headers),
    }
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

async fn rig_with(upstream: &Upstream) -> Rig {
    let services = format!(
        "web:{},flowmap-api:{},dead:{}",
        upstream.addr.port(),
        upstream.addr.port(),
        closed_port().await
    );
    Rig::start(&[
        ("COCOON_SERVICES", &services),
        ("COCOON_PROXY_TIMEOUT", "1s"),
    ])
    .await
}

#[tokio::test]
async fn every_method_and_multi_valued_headers() {
    let upstream = upstream().await;
    let mut rig = rig_with(&upstream).await;
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
        let result = proxy(&mut rig, request("web", method, "/echo?x=1")).await;
        assert_eq!(result.status_code, 200, "{method}");
        assert_eq!(header(&result, "x-method"), method);
        assert_eq!(header(&result, "x-path"), "/echo?x=1");
        assert_eq!(
            header(&result, "x-host"),
            format!("127.0.0.1:{}", upstream.addr.port())
        );
        assert_eq!(
            result.headers.get("set-cookie"),
            Some(&HeaderValues::Many(vec!["a=1".into(), "b=2".into()]))
        );
        if method == "HEAD" {
            assert_eq!(result.body.as_deref(), Some(""));
        }
    }
    let mut lower = request("web", "get", "/echo");
    lower.request_id = "lower".into();
    assert_eq!(proxy(&mut rig, lower).await.status_code, 200);
    assert_eq!(
        proxy(&mut rig, request("web", "TRACE", "/echo"))
            .await
            .status_code,
        405
    );
}

#[tokio::test]
async fn binary_bodies_both_ways_and_hop_by_hop_headers_dropped() {
    let upstream = upstream().await;
    let mut rig = rig_with(&upstream).await;
    let bytes: Vec<u8> = (0..=255).collect();
    let mut post = request("web", "POST", "/echo");
    let (body, encoding) = Encoding::encode(&bytes);
    post.body = Some(body);
    post.body_encoding = encoding;
    post.headers = Headers::from([
        ("Connection".into(), HeaderValues::One("x-hop".into())),
        ("X-Hop".into(), HeaderValues::One("1".into())),
        ("Keep-Alive".into(), HeaderValues::One("timeout=5".into())),
        (
            "Proxy-Authorization".into(),
            HeaderValues::One("Basic eA==".into()),
        ),
        ("Host".into(), HeaderValues::One("evil.example".into())),
        (
            "X-Multi".into(),
            HeaderValues::Many(vec!["1".into(), "2".into()]),
        ),
    ]);
    let result = proxy(&mut rig, post).await;
    assert_eq!(result.status_code, 200);
    assert_eq!(result.body_encoding, Encoding::Base64);
    assert_eq!(
        Encoding::Base64
            .decode(result.body.as_deref().unwrap())
            .unwrap(),
        bytes
    );
    assert_eq!(header(&result, "x-hop-seen"), "");
    assert_eq!(
        header(&result, "x-host"),
        format!("127.0.0.1:{}", upstream.addr.port())
    );
}

#[tokio::test]
async fn the_spec_example_works_as_shown() {
    let upstream = upstream().await;
    let mut rig = rig_with(&upstream).await;
    rig.send_json(json!({
        "type": "proxy_http",
        "request_id": "req-123",
        "service_name": "flowmap-api",
        "method": "GET",
        "path": "/api/parse?path=/project",
        "headers": {"Accept": "application/json"},
        "body": null
    }))
    .await;
    let Response::ProxyResult(result) = rig.recv().await else {
        panic!("proxy_result")
    };
    assert_eq!(result.request_id, "req-123");
    assert_eq!(result.status_code, 200);
    assert_eq!(result.body.as_deref(), Some(r#"{"flows": []}"#));
    assert_eq!(header(&result, "x-accept"), "application/json");
}

#[tokio::test]
async fn failures_map_to_404_502_504_and_hostile_paths_to_400() {
    let upstream = upstream().await;
    let mut rig = rig_with(&upstream).await;
    assert_eq!(
        proxy(&mut rig, request("nope", "GET", "/"))
            .await
            .status_code,
        404
    );
    assert_eq!(
        proxy(&mut rig, request("dead", "GET", "/"))
            .await
            .status_code,
        502
    );
    let slow = proxy(&mut rig, request("web", "GET", "/slow")).await;
    assert_eq!(slow.status_code, 504);

    let seen_before = upstream.requests.load(Ordering::SeqCst);
    for path in [
        "@evil.example/x",
        "//evil/x",
        "http://evil/x",
        "https://127.0.0.1:1/",
        "evil:80/x",
        "/x\r\nHost: evil",
        "/a b",
        "",
    ] {
        let result = proxy(&mut rig, request("web", "GET", path)).await;
        assert_eq!(result.status_code, 400, "{path:?}");
    }
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        seen_before,
        "no refused request reached the upstream"
    );

    let mut bad_body = request("web", "POST", "/echo");
    bad_body.body = Some("%%%".into());
    bad_body.body_encoding = Encoding::Base64;
    assert_eq!(proxy(&mut rig, bad_body).await.status_code, 400);
}
