//! The `sync_data` payloads between clients and workers: requests as the
//! worker decodes them (`Request::decode`), responses as clients decode
//! them, and the byte encodings inside both.
#![no_main]

use cocoon_signaling::protocol::service::{
    Encoding, ProxyHttp, Request, Response, ServiceErrorCode,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    encodings(data);
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        request(value);
    }
    if let Ok(response) = serde_json::from_slice::<Response>(data) {
        let text = serde_json::to_string(&response).unwrap();
        assert_eq!(
            serde_json::from_str::<Response>(&text).unwrap(),
            response,
            "{text}"
        );
    }
});

fn request(value: Value) {
    let plain = serde_json::from_value::<Request>(value.clone());
    match Request::decode(value.clone()) {
        Ok(request) => {
            assert!(value.is_object(), "accepted a request that is no object");
            assert_eq!(plain.as_ref().ok(), Some(&request));
            let text = serde_json::to_string(&request).unwrap();
            let again = serde_json::from_str::<Value>(&text).unwrap();
            assert_eq!(Request::decode(again).as_ref(), Ok(&request), "{text}");
            payload_bytes(&request);
        }
        Err((code, _)) => {
            assert!(
                matches!(
                    code,
                    ServiceErrorCode::InvalidJson
                        | ServiceErrorCode::UnknownType
                        | ServiceErrorCode::InvalidRequest
                ),
                "{code:?}"
            );
            // Serde alone may take more (a JSON array for a struct), never
            // less: an object it accepts is a request.
            assert!(
                !value.is_object() || plain.is_err(),
                "refused a valid request"
            );
        }
    }
}

/// The bytes a request carries decode (or fail to) without panicking, and
/// encode back to the same string.
fn payload_bytes(request: &Request) {
    let (text, encoding) = match request {
        Request::PtyInput { data, encoding, .. } => (data, *encoding),
        Request::ProxyHttp(ProxyHttp {
            body: Some(body),
            body_encoding,
            ..
        }) => (body, *body_encoding),
        _ => return,
    };
    if let Ok(bytes) = encoding.decode(text) {
        let (again, _) = match encoding {
            Encoding::Utf8 => Encoding::encode(&bytes),
            Encoding::Base64 => Encoding::encode_binary(&bytes),
        };
        assert_eq!(&again, text, "bytes have one encoding");
    }
}

/// Any bytes survive both encodings.
fn encodings(data: &[u8]) {
    for (text, encoding) in [Encoding::encode(data), Encoding::encode_binary(data)] {
        assert_eq!(encoding.decode(&text).unwrap(), data);
    }
}
