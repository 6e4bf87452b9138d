//! `COCOON_KINDS` (`cocoon::kinds::parse`) and the hive's pool sizes
//! (`parse_pool`), as an operator writes them.
//!
//! Input: the kinds text, then optionally a NUL and the pool text.
#![no_main]

use std::collections::BTreeSet;

use cocoon::hive::parse_pool;
use cocoon::kinds::{Engine, Kind, Runner, parse};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// The hive's cap on pre-warmed workers per kind.
const MAX_POOL: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (kinds, pool) = text.split_once('\0').unwrap_or((text, ""));
    let kinds = match parse(kinds) {
        Ok(kinds) => kinds,
        Err(err) => {
            assert!(!err.is_empty());
            return;
        }
    };
    let mut ids = BTreeSet::new();
    for kind in &kinds {
        valid(kind);
        assert!(ids.insert(&kind.id), "{:?} twice", kind.id);
    }
    // Written out in the JSON array form, or as `id:runner:{json}` entries,
    // the kinds read back the same.
    let array: Vec<Value> = kinds.iter().map(to_json).collect();
    let array_text = serde_json::to_string(&array).unwrap();
    assert_eq!(parse(&array_text).as_ref(), Ok(&kinds), "{array_text}");
    let entries: Vec<String> = kinds
        .iter()
        .zip(&array)
        .map(|(kind, json)| {
            format!(
                "{}:{}:{}",
                kind.id,
                kind.runner_type(),
                json["runner_config"]
            )
        })
        .collect();
    // (No entries at all would mean the defaults.)
    let entries_text = entries.join(",\n");
    if !kinds.is_empty() {
        assert_eq!(parse(&entries_text).as_ref(), Ok(&kinds), "{entries_text}");
    }

    if let Ok(pool) = parse_pool(pool, &kinds) {
        for (kind, size) in &pool {
            assert!(ids.contains(kind), "pool of unknown kind {kind:?}");
            assert!(*size <= MAX_POOL);
        }
    }
});

/// What every kind satisfies: an id of `[A-Za-z0-9._-]`, a command or an
/// image that is not blank.
fn valid(kind: &Kind) {
    assert!(!kind.id.is_empty());
    assert!(
        kind.id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "{:?}",
        kind.id
    );
    match &kind.runner {
        Runner::Script(script) => {
            assert!(!script.command.trim().is_empty(), "blank command: {kind:?}")
        }
        Runner::Container(_, container) => {
            assert!(!container.image.trim().is_empty(), "blank image: {kind:?}")
        }
    }
}

/// The kind as an entry of the JSON array form.
fn to_json(kind: &Kind) -> Value {
    let config = match &kind.runner {
        Runner::Script(script) => json!({
            "command": script.command,
            "args": script.args,
            "working_dir": script.working_dir,
        }),
        Runner::Container(engine, container) => {
            assert_eq!(
                kind.runner_type(),
                match engine {
                    Engine::Docker => "docker",
                    Engine::Podman => "podman",
                }
            );
            json!({
                "image": container.image,
                "container_name": container.container_name,
                "environment": container.environment,
                "volumes": container.volumes,
                "ports": container.ports,
            })
        }
    };
    json!({"id": kind.id, "runner_type": kind.runner_type(), "runner_config": config})
}
