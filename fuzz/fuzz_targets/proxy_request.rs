//! `proxy_http`: the services list an operator sets (`COCOON_SERVICES`), a
//! client's request checked and turned into the upstream request
//! (`Proxy::build`), and the upstream's response headers as relayed back.
//!
//! Input: the services list, a newline, then the request payload (JSON);
//! the payload's `name: value` lines also serve as an upstream's headers.
//! The point of the checks: nothing in a request reaches any host but
//! `127.0.0.1:<the named service's port>`, or smuggles hop-by-hop headers.
#![no_main]

use cocoon::config::parse_services;
use cocoon::services::proxy::{Proxy, ProxyConfig, response_headers};
use cocoon_signaling::protocol::service::{Headers, ProxyHttp, Request};
use hyper::HeaderMap;
use hyper::body::Body;
use hyper::header::{HOST, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// RFC 9110 §7.6.1's hop-by-hop headers, and those the proxy sets itself.
/// Written out again rather than taken from the proxy, as is `METHODS`: the
/// oracle states what must hold, independently of the code it checks.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

fuzz_target!(|data: &[u8]| {
    let (services, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    upstream_headers(&raw_headers(payload));
    let Some(services) = std::str::from_utf8(services).ok().and_then(services_list) else {
        return;
    };
    let Ok(value) = serde_json::from_slice(payload) else {
        return;
    };
    let Ok(Request::ProxyHttp(request)) = Request::decode(value) else {
        return;
    };
    upstream_headers(&header_map(&request.headers));
    let port = services
        .iter()
        .find(|(name, _)| *name == request.service_name)
        .map(|(_, port)| *port);
    let proxy = Proxy::new(ProxyConfig::new(cocoon::config::Services(services)));
    match proxy.build(request.clone()) {
        Ok(upstream) => built(&request, port.expect("only a named service"), &upstream),
        Err((status, _)) => {
            let method_ok = METHODS.contains(&request.method.to_ascii_uppercase().as_str());
            let want = match port {
                None => 404,
                Some(_) if !method_ok => 405,
                Some(_) => 400,
            };
            assert_eq!(status.as_u16(), want);
        }
    }
});

/// `COCOON_SERVICES`, checked: valid names, ports 1-65535, no duplicates.
fn services_list(text: &str) -> Option<Vec<(String, u16)>> {
    let services = parse_services(text).ok()?.0;
    for (i, (name, port)) in services.iter().enumerate() {
        assert!(*port > 0);
        assert!(!name.is_empty());
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        assert!(services[..i].iter().all(|(other, _)| other != name));
    }
    let again: Vec<String> = services.iter().map(|(n, p)| format!("{n}:{p}")).collect();
    assert_eq!(parse_services(&again.join(",")).unwrap().0, services);
    Some(services)
}

fn built(request: &ProxyHttp, port: u16, upstream: &hyper::Request<impl Body>) {
    let authority = format!("127.0.0.1:{port}");
    let uri = upstream.uri();
    assert_eq!(uri.scheme_str(), Some("http"));
    assert_eq!(
        uri.authority().map(|a| a.as_str()),
        Some(authority.as_str())
    );
    let path = &request.path;
    assert_eq!(
        uri.path_and_query().map(|p| p.as_str()),
        Some(path.as_str())
    );
    assert!(path.starts_with('/') && !path.starts_with("//"), "{path:?}");
    assert!(!path.contains(|c: char| c.is_whitespace() || c.is_control() || c == '#'));
    assert_eq!(
        upstream.method().as_str(),
        request.method.to_ascii_uppercase()
    );

    let hosts: Vec<&HeaderValue> = upstream.headers().get_all(HOST).iter().collect();
    assert_eq!(hosts, [authority.as_str()], "exactly the proxy's own Host");
    let listed = connection_tokens(request.headers.iter().flat_map(|(name, values)| {
        values
            .iter()
            .filter(move |_| name.eq_ignore_ascii_case("connection"))
    }));
    let forwarded = |name: &str| {
        let name = name.to_ascii_lowercase();
        !HOP_BY_HOP.contains(&name.as_str()) && !listed.contains(&name)
    };
    for name in upstream.headers().keys() {
        assert!(name == HOST || forwarded(name.as_str()), "{name} forwarded");
    }
    let values: usize = request
        .headers
        .iter()
        .filter(|(name, _)| forwarded(name))
        .map(|(_, values)| values.iter().count())
        .sum();
    assert_eq!(
        upstream.headers().len(),
        values + 1,
        "every other value kept"
    );

    let body = match &request.body {
        Some(body) => request
            .body_encoding
            .decode(body)
            .expect("a built body decodes"),
        None => Vec::new(),
    };
    assert_eq!(upstream.body().size_hint().exact(), Some(body.len() as u64));
}

/// The response headers relayed: no hop-by-hop ones (Content-Length is
/// kept: it describes the body), none the response's `Connection` lists.
fn upstream_headers(headers: &HeaderMap) {
    let relayed = response_headers(headers);
    let listed = connection_tokens(
        headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    for (name, values) in &relayed {
        assert_eq!(*name, name.to_ascii_lowercase());
        assert!(name == "content-length" || !HOP_BY_HOP.contains(&name.as_str()));
        assert!(!listed.contains(name), "{name} is listed in Connection");
        assert_eq!(
            values.iter().count(),
            headers.get_all(name.as_str()).iter().count()
        );
    }
    for name in headers.keys() {
        let name = name.as_str();
        let dropped = (HOP_BY_HOP.contains(&name) && name != "content-length")
            || listed.iter().any(|l| l == name);
        assert_eq!(relayed.contains_key(name), !dropped, "{name}");
    }
}

fn connection_tokens<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

/// The request's headers as an upstream might send them back.
fn header_map(headers: &Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, values) in headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        for value in values.iter() {
            if let Ok(value) = HeaderValue::from_str(value) {
                map.append(&name, value);
            }
        }
    }
    map
}

/// `name: value` lines as an upstream might send them, values as raw bytes
/// (not necessarily UTF-8).
fn raw_headers(bytes: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in bytes.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        }
    }
    map
}
