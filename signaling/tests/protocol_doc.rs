//! Every JSON example in docs/PROTOCOL.md decodes into the real protocol
//! types and encodes back to the same JSON.

use cocoon_signaling::protocol::service::{Request, Response};
use cocoon_signaling::protocol::{FromServer, ToServer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn json_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```json") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Decodes as `T` and checks that encoding gives the same JSON back.
fn round_trips<T: DeserializeOwned + Serialize>(value: &Value) -> Option<T> {
    let typed: T = serde_json::from_value(value.clone()).ok()?;
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, value, "does not round-trip exactly");
    Some(typed)
}

fn check_payload(payload: &Value) -> bool {
    round_trips::<Request>(payload).is_some() || round_trips::<Response>(payload).is_some()
}

#[test]
fn every_example_round_trips_through_the_real_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let blocks = json_blocks(&doc);
    assert!(blocks.len() > 30, "found only {} examples", blocks.len());
    for block in blocks {
        let value: Value = serde_json::from_str(&block).unwrap_or_else(|e| panic!("{e}: {block}"));
        let matched = if let Some(message) = round_trips::<ToServer>(&value) {
            if let ToServer::SyncData { payload, .. } = message {
                assert!(check_payload(&payload), "{block}")
            }
            true
        } else if let Some(message) = round_trips::<FromServer>(&value) {
            if let FromServer::SyncData { payload, .. } = message {
                assert!(check_payload(&payload), "{block}");
            }
            true
        } else {
            check_payload(&value)
        };
        assert!(matched, "no protocol type accepts this example:\n{block}");
    }
}
