//! `proxy_http`: HTTP requests to the local services named in
//! `COCOON_SERVICES`, through one pooled client.
//!
//! The target is always `127.0.0.1:<port of the named service>`; the path is
//! only ever a path. Nothing in a request can change the host.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use cocoon_signaling::protocol::MAX_MESSAGE_BYTES;
use cocoon_signaling::protocol::service::{
    Encoding, HeaderValues, Headers, ProxyHttp, ProxyResult,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Services as ServiceList;

/// The methods the spec names; others get 405.
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus
/// those the proxy sets itself.
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

/// Operator settings for the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Service names and their ports on 127.0.0.1.
    pub services: ServiceList,
    /// Time allowed for the whole upstream exchange (then 504).
    pub timeout: Duration,
    /// Largest upstream response body relayed (then 502).
    pub max_response_bytes: usize,
}

impl ProxyConfig {
    /// The spec's 30 s timeout, and a body cap that fits a relay message
    /// even in base64.
    pub fn new(services: ServiceList) -> Self {
        Self {
            services,
            timeout: Duration::from_secs(30),
            max_response_bytes: (MAX_MESSAGE_BYTES - 64 * 1024) / 4 * 3,
        }
    }
}

/// The HTTP proxy.
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    ports: HashMap<String, u16>,
    config: ProxyConfig,
}

impl Proxy {
    /// A proxy with one connection pool for every service.
    pub fn new(config: ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(8)
            .build(connector);
        let ports = config.services.0.iter().cloned().collect();
        Self {
            client,
            ports,
            config,
        }
    }

    /// Serves one request; every outcome is a `proxy_result`.
    pub async fn handle(&self, request: ProxyHttp) -> ProxyResult {
        let request_id = request.request_id.clone();
        let head = request.method.eq_ignore_ascii_case("HEAD");
        let outcome = match self.build(request) {
            Ok(upstream) => self.forward(upstream, head).await,
            Err(refusal) => Err(refusal),
        };
        match outcome {
            Ok((status_code, headers, body)) => {
                let (body, body_encoding) = Encoding::encode(&body);
                ProxyResult {
                    request_id,
                    status_code,
                    headers,
                    body: Some(body),
                    body_encoding,
                }
            }
            Err((status, message)) => ProxyResult {
                request_id,
                status_code: status.as_u16(),
                headers: Headers::from([(
                    "content-type".to_owned(),
                    HeaderValues::One("text/plain; charset=utf-8".to_owned()),
                )]),
                body: Some(format!("{message}\n")),
                body_encoding: Encoding::Utf8,
            },
        }
    }

    /// Checks the request and turns it into an upstream request. Public for
    /// the fuzz targets only.
    #[doc(hidden)]
    pub fn build(&self, request: ProxyHttp) -> Result<Request<Full<Bytes>>, (StatusCode, String)> {
        let port = *self.ports.get(&request.service_name).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no service named {:?} on this worker", request.service_name),
            )
        })?;
        let method = request.method.to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {:?} is not proxied", request.method),
            ));
        }
        let path = origin_form(&request.path).map_err(|why| (StatusCode::BAD_REQUEST, why))?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(format!("127.0.0.1:{port}"))
            .path_and_query(path)
            .build()
            .map_err(|err| (StatusCode::BAD_REQUEST, format!("invalid path: {err}")))?;
        let body = match &request.body {
            Some(body) => request.body_encoding.decode(body).map_err(|err| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("body is not valid base64: {err}"),
                )
            })?,
            None => Vec::new(),
        };
        let mut builder = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).expect("a listed method"))
            .uri(uri)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"));
        let connection_listed = connection_tokens(&request.headers);
        for (name, values) in &request.headers {
            let lower = name.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&lower.as_str()) || connection_listed.contains(&lower) {
                continue;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("invalid header name {name:?}"),
                )
            })?;
            for value in values.iter() {
                let value = HeaderValue::from_str(value).map_err(|_| {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("invalid value for header {name}"),
                    )
                })?;
                builder = builder.header(&name, value);
            }
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| (StatusCode::BAD_REQUEST, format!("invalid request: {err}")))
    }

    async fn forward(
        &self,
        upstream: Request<Full<Bytes>>,
        head: bool,
    ) -> Result<(u16, Headers, Vec<u8>), (StatusCode, String)> {
        let exchange = async {
            let response = self.client.request(upstream).await.map_err(|err| {
                let what = if err.is_connect() {
                    "cannot connect to the service"
                } else {
                    "the service failed"
                };
                (StatusCode::BAD_GATEWAY, format!("{what}: {err}"))
            })?;
            let (parts, body) = response.into_parts();
            let body = if head {
                Vec::new()
            } else {
                Limited::new(body, self.config.max_response_bytes)
                    .collect()
                    .await
                    .map_err(|err| {
                        (
                            StatusCode::BAD_GATEWAY,
                            format!(
                                "the service's response could not be relayed (at most {} bytes): {err}",
                                self.config.max_response_bytes
                            ),
                        )
                    })?
                    .to_bytes()
                    .to_vec()
            };
            Ok((
                parts.status.as_u16(),
                response_headers(&parts.headers),
                body,
            ))
        };
        tokio::time::timeout(self.config.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the service did not answer within {:?}",
                        self.config.timeout
                    ),
                ))
            })
    }
}

/// Accepts only an origin-form target (`/path?query`, RFC 9112 §3.2.1).
fn origin_form(path: &str) -> Result<PathAndQuery, String> {
    let refuse = |why: &str| Err(format!("path {path:?} refused: {why}"));
    if !path.starts_with('/') {
        return refuse("it must start with '/'");
    }
    if path.starts_with("//") {
        return refuse("it must not start with '//'");
    }
    if path.contains(['#', '\\']) || path.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return refuse("fragments, backslashes, spaces and control characters are not allowed");
    }
    let parsed: PathAndQuery = path
        .parse()
        .map_err(|err| format!("path {path:?} refused: {err}"))?;
    if parsed.as_str() != path {
        return refuse("it does not survive parsing unchanged");
    }
    Ok(parsed)
}

/// Header names listed in `Connection`, which are hop-by-hop too.
fn connection_tokens(headers: &Headers) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, values)| {
            values
                .iter()
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_ascii_lowercase())
        })
        .collect()
}

/// The upstream's response headers as relayed: without hop-by-hop headers
/// and those its `Connection` lists. Public for the fuzz targets only.
#[doc(hidden)]
pub fn response_headers(headers: &hyper::HeaderMap) -> Headers {
    let listed: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    let mut out = Headers::new();
    for name in headers.keys() {
        let lower = name.as_str();
        if (HOP_BY_HOP.contains(&lower) && lower != "content-length")
            || listed.iter().any(|l| l == lower)
        {
            continue;
        }
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let value = match <[String; 1]>::try_from(values) {
            Ok([one]) => HeaderValues::One(one),
            Err(many) => HeaderValues::Many(many),
        };
        out.insert(lower.to_owned(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_origin_form_paths_pass() {
        for good in ["/", "/api/parse?path=/project", "/a%20b?x=1&y=2", "/@user"] {
            assert!(origin_form(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "@evil.example/x",
            "//evil/x",
            "http://evil/x",
            "evil.example:80/x",
            "/x#frag",
            "/a b",
            "/a\r\nHost: evil",
            "/a\\b",
            "*",
        ] {
            assert!(origin_form(bad).is_err(), "{bad:?}");
        }
    }
}
