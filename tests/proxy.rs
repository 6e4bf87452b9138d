//! `proxy_http` against a real HTTP server that the test runs on loopback.

mod common;

use std::sync::atomic::Ordering;

use cocoon_signaling::protocol::service::{
    Encoding, HeaderValues, Headers, ProxyHttp, ProxyResult, Request, Response,
};
use common::http::{Upstream, upstream};
use common::*;
use serde_json::json;

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
