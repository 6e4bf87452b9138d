//! Text frames of the signaling WebSocket, both ways: what the server reads
//! from workers, clients and hives (`decode_to_server`), and what they read
//! from the server (`FromServer`).
#![no_main]

use cocoon_signaling::protocol::{
    ErrorCode, FromServer, MAX_MESSAGE_BYTES, ToServer, decode_to_server,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8; the WebSocket layer refuses the rest.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    to_server(text);
    from_server(text);
});

fn to_server(text: &str) {
    let plain = serde_json::from_str::<ToServer>(text);
    match decode_to_server(text) {
        Ok(message) => {
            // What the server accepts is the documented shape: an object
            // whose `type` names the message.
            let value: Value = serde_json::from_str(text).expect("accepted text is JSON");
            let kind = serde_json::to_value(&message).unwrap()["type"].clone();
            assert_eq!(
                value.get("type"),
                Some(&kind),
                "not an object with this type"
            );
            // The classifier accepts nothing serde alone would refuse...
            assert_eq!(plain.as_ref().ok(), Some(&message));
            // ...and what it accepts encodes back to the same message.
            let again = serde_json::to_string(&message).unwrap();
            assert_eq!(decode_to_server(&again).as_ref(), Ok(&message), "{again}");
        }
        Err(err) => {
            let too_large = text.len() > MAX_MESSAGE_BYTES;
            assert_eq!(err.code == ErrorCode::MessageTooLarge, too_large);
            assert!(
                matches!(
                    err.code,
                    ErrorCode::InvalidJson
                        | ErrorCode::UnknownType
                        | ErrorCode::InvalidMessage
                        | ErrorCode::MessageTooLarge
                ),
                "{:?}",
                err.code
            );
            assert!(
                !err.code.is_fatal(),
                "a bad frame never ends the connection"
            );
            // Refused only what serde refuses too, what is too large, and
            // what serde would take but is no object (an array).
            let object = serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object());
            assert!(
                too_large || plain.is_err() || !object,
                "refused a valid message: {err:?}"
            );
        }
    }
}

fn from_server(text: &str) {
    let Ok(message) = serde_json::from_str::<FromServer>(text) else {
        return;
    };
    let again = serde_json::to_string(&message).unwrap();
    assert_eq!(
        serde_json::from_str::<FromServer>(&again).unwrap(),
        message,
        "{again}"
    );
}
