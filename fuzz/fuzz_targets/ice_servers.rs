//! ICE settings an operator writes: `WEBRTC_ICE_SERVERS` with the TURN
//! username and credential (`parse_ice_servers`), the addresses and
//! networks candidates may use (`parse_network`, `in_network`), and the
//! STUN/TURN URLs `cocoon doctor` probes (`parse_ice_url`).
//!
//! Input: the servers text, then optionally a NUL, the username, a NUL and
//! the credential.
#![no_main]

use std::net::IpAddr;

use cocoon::doctor::parse_ice_url;
use cocoon::link::rtc::{IceServer, in_network, parse_ice_servers, parse_network};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\0');
    let servers = parts.next().unwrap_or("");
    let (username, credential) = (parts.next(), parts.next());
    if let Ok(list) = parse_ice_servers(servers, username, credential) {
        ice_servers(servers, &list, username, credential);
    }
    for piece in text.split([',', '\0', ' ']) {
        network(piece);
        ice_url(piece);
    }
});

fn ice_servers(text: &str, list: &[IceServer], username: Option<&str>, credential: Option<&str>) {
    if text.trim_start().starts_with('[') {
        // The JSON form: written out again, it reads back the same.
        let json: Vec<_> = list
            .iter()
            .map(|s| json!({"urls": s.urls, "username": s.username, "credential": s.credential}))
            .collect();
        let again = serde_json::to_string(&json).unwrap();
        assert_eq!(parse_ice_servers(&again, None, None).unwrap(), list);
        return;
    }
    // The comma form: one URL per server, a known scheme, credentials on
    // TURN servers only.
    for server in list {
        let [url] = server.urls.as_slice() else {
            panic!("{server:?}")
        };
        assert!(!url.is_empty() && url.trim() == url && !url.contains(','));
        let scheme = url.split(':').next().unwrap();
        assert!(
            matches!(scheme, "stun" | "stuns" | "turn" | "turns"),
            "{url}"
        );
        let turn = scheme.starts_with("turn");
        assert_eq!(server.username.as_deref(), username.filter(|_| turn));
        assert_eq!(server.credential.as_deref(), credential.filter(|_| turn));
    }
    let urls: Vec<&str> = list.iter().map(|s| s.urls[0].as_str()).collect();
    let again = parse_ice_servers(&urls.join(","), username, credential).unwrap();
    assert_eq!(again, list);
}

fn network(text: &str) {
    let Ok((net, prefix)) = parse_network(text) else {
        return;
    };
    let max = if net.is_ipv4() { 32 } else { 128 };
    assert!(prefix <= max);
    assert_eq!(parse_network(&format!("{net}/{prefix}")), Ok((net, prefix)));
    assert!(
        in_network(net, (net, prefix)),
        "a network holds its address"
    );
    let any: IpAddr = if net.is_ipv4() {
        [255, 1, 2, 3].into()
    } else {
        [0xffff, 1, 2, 3, 4, 5, 6, 7].into()
    };
    assert!(in_network(any, (net, 0)), "prefix 0 holds every address");
    let other: IpAddr = if net.is_ipv4() {
        "::1".parse().unwrap()
    } else {
        "127.0.0.1".parse().unwrap()
    };
    assert!(!in_network(other, (net, prefix)), "families never mix");
}

fn ice_url(text: &str) {
    let Ok(url) = parse_ice_url(text) else {
        return;
    };
    assert!(!url.host.is_empty() && url.port > 0);
    let scheme = text.split(':').next().unwrap();
    assert_eq!(url.turn, scheme.starts_with("turn"));
    if scheme.ends_with('s') {
        assert!(url.unusable, "TLS schemes are not usable");
    }
    // Nothing after a bracketed address but its port.
    let hostport = text[scheme.len() + 1..].split('?').next().unwrap();
    if let Some(v6) = hostport.strip_prefix('[') {
        let after = &v6[url.host.len() + 1..];
        assert!(
            after.is_empty() || after.starts_with(':'),
            "{after:?} ignored"
        );
    }
    // Host and port written out again read back the same.
    let host = if url.host.starts_with('[') || url.host.contains(':') && !url.host.contains(']') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let again = parse_ice_url(&format!("{scheme}:{host}:{}", url.port)).unwrap();
    assert_eq!(
        (again.host, again.port, again.turn),
        (url.host, url.port, url.turn)
    );
}
