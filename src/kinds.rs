//! `COCOON_KINDS`: which kinds of worker a hive can spawn, and how.
//!
//! Four forms are accepted (see the hive spec), mixed freely in one list:
//!
//! 1. `id:image` — a Docker kind (the original form);
//! 2. `id:runner:config` — `runner` is `docker`, `podman` or `script`, and
//!    `config` a plain string: the image, or the command for `script`;
//! 3. `id:runner:{json}` — the runner's configuration as a JSON object;
//! 4. a JSON array of `{"id", "runner_type", "runner_config"}`.
//!
//! Entries are separated by commas (and any whitespace or newlines around
//! them). Commas inside JSON objects or strings do not separate entries,
//! and colons after the id belong to the configuration, so registry ports
//! (`registry:5000/cocoon:ubuntu`) and JSON with commas parse as meant. An
//! entry whose second part is `docker`, `podman` or `script` is the second
//! form. Anything malformed is an error that names the entry.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// How a kind's workers are started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// A process on the hive's host.
    Script(ScriptConfig),
    /// A container, with Docker or Podman.
    Container(Engine, ContainerConfig),
}

/// The container engine of a [`Runner::Container`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `docker`.
    Docker,
    /// `podman` (same configuration).
    Podman,
}

/// A `script` runner's configuration. `{kind}`, `{service_name}` and
/// `{request_id}` in `args` and `working_dir` are filled in at spawn time.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptConfig {
    /// The executable.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Where it runs.
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// A `docker`/`podman` runner's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerConfig {
    /// The image.
    pub image: String,
    /// The container's name; the hive picks one when unset.
    #[serde(default)]
    pub container_name: Option<String>,
    /// Extra environment; the hive adds its own variables to it.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// `-v` arguments, e.g. `data:/data`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// `-p` arguments, e.g. `8080:8080`.
    #[serde(default)]
    pub ports: Vec<String>,
}

impl ContainerConfig {
    fn image(image: &str) -> Self {
        Self {
            image: image.to_owned(),
            container_name: None,
            environment: BTreeMap::new(),
            volumes: Vec::new(),
            ports: Vec::new(),
        }
    }
}

/// One kind of worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    /// Its id, e.g. `ubuntu` or `native`.
    pub id: String,
    /// How its workers are started.
    pub runner: Runner,
}

impl Kind {
    /// `docker`, `podman` or `script`.
    pub fn runner_type(&self) -> &'static str {
        match self.runner {
            Runner::Script(_) => "script",
            Runner::Container(Engine::Docker, _) => "docker",
            Runner::Container(Engine::Podman, _) => "podman",
        }
    }
}

/// The registry of the spec's default images.
const DEFAULT_REGISTRY: &str = "git.the-ihor.com/adi/cocoon";

/// The kinds a hive offers when `COCOON_KINDS` is unset or empty.
pub fn defaults() -> Vec<Kind> {
    [
        ("alpine", "alpine"),
        ("debian", "debian"),
        ("ubuntu", "ubuntu"),
        ("linux", "ubuntu"),
        ("python", "python"),
        ("node", "node"),
        ("full", "full"),
        ("gpu", "gpu"),
        ("cuda", "gpu"),
    ]
    .into_iter()
    .map(|(id, tag)| Kind {
        id: id.into(),
        runner: Runner::Container(
            Engine::Docker,
            ContainerConfig::image(&format!("{DEFAULT_REGISTRY}:{tag}")),
        ),
    })
    .collect()
}

/// Parses `COCOON_KINDS`; empty (or only whitespace) means the defaults.
pub fn parse(text: &str) -> Result<Vec<Kind>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(defaults());
    }
    let kinds = if text.starts_with('[') {
        parse_array(text)?
    } else {
        split_entries(text)?
            .into_iter()
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut seen = std::collections::BTreeSet::new();
    for kind in &kinds {
        if !seen.insert(kind.id.as_str()) {
            return Err(format!("kind {:?} is defined twice", kind.id));
        }
    }
    Ok(kinds)
}

/// The fourth form: a JSON array.
fn parse_array(text: &str) -> Result<Vec<Kind>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        id: String,
        runner_type: String,
        #[serde(default)]
        runner_config: Value,
        /// The deprecated field of the spec's struct: an image.
        #[serde(default)]
        image: Option<String>,
    }
    let entries: Vec<Entry> = serde_json::from_str(text)
        .map_err(|err| format!("COCOON_KINDS is not valid JSON: {err}"))?;
    entries
        .into_iter()
        .map(|entry| {
            let config = match (entry.runner_config, entry.image) {
                (Value::Null, Some(image)) => Value::String(image),
                (config, _) => config,
            };
            kind(&entry.id, &entry.runner_type, config)
                .map_err(|err| format!("kind {:?}: {err}", entry.id))
        })
        .collect()
}

/// Splits the list at the commas that are not inside JSON.
fn split_entries(text: &str) -> Result<Vec<&str>, String> {
    let mut entries = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut start = 0;
    for (at, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' if depth > 0 => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1).ok_or_else(|| {
                    format!(
                        "unbalanced {c:?} in COCOON_KINDS entry {:?}",
                        text[start..].trim()
                    )
                })?
            }
            ',' if depth == 0 => {
                entries.push(text[start..at].trim());
                start = at + 1;
            }
            _ => {}
        }
    }
    if depth > 0 || in_string {
        return Err(format!(
            "unterminated JSON in COCOON_KINDS entry {:?}",
            text[start..].trim()
        ));
    }
    entries.push(text[start..].trim());
    Ok(entries.into_iter().filter(|e| !e.is_empty()).collect())
}

/// Forms 1 to 3: `id:image`, `id:runner:config`, `id:runner:{json}`.
fn parse_entry(entry: &str) -> Result<Kind, String> {
    let named = |err: String| format!("COCOON_KINDS entry {entry:?}: {err}");
    let (id, rest) = entry
        .split_once(':')
        .ok_or_else(|| named("expected id:image or id:runner:config".into()))?;
    let (runner, config) = match rest.split_once(':') {
        Some((runner @ ("docker" | "podman" | "script"), config)) => (runner, config),
        _ => ("docker", rest),
    };
    let config = config.trim();
    let config = if config.starts_with(['{', '[']) {
        serde_json::from_str(config).map_err(|err| named(format!("invalid JSON: {err}")))?
    } else {
        Value::String(config.to_owned())
    };
    kind(id.trim(), runner, config).map_err(named)
}

/// Builds a kind from its parts, checking each.
fn kind(id: &str, runner: &str, config: Value) -> Result<Kind, String> {
    let valid_id = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid_id {
        return Err(format!(
            "the id {id:?} must be letters, digits, '-', '_' or '.'"
        ));
    }
    let runner = match (runner, config) {
        (_, Value::String(s)) if s.trim().is_empty() => {
            return Err("the configuration is empty".into());
        }
        ("script", Value::String(command)) => Runner::Script(ScriptConfig {
            command,
            args: Vec::new(),
            working_dir: None,
        }),
        ("script", config @ Value::Object(_)) => {
            let script: ScriptConfig =
                serde_json::from_value(config).map_err(|err| format!("script config: {err}"))?;
            if script.command.trim().is_empty() {
                return Err("the command is empty".into());
            }
            Runner::Script(script)
        }
        (engine @ ("docker" | "podman"), config) => {
            let engine = if engine == "docker" {
                Engine::Docker
            } else {
                Engine::Podman
            };
            let config = match config {
                Value::String(image) => ContainerConfig::image(&image),
                config @ Value::Object(_) => serde_json::from_value(config)
                    .map_err(|err| format!("{} config: {err}", runner))?,
                other => return Err(format!("expected an image or an object, got {other}")),
            };
            if config.image.trim().is_empty() {
                return Err("the image is empty".into());
            }
            Runner::Container(engine, config)
        }
        ("script", other) => return Err(format!("expected a command or an object, got {other}")),
        (other, _) => {
            return Err(format!(
                "unknown runner {other:?} (docker, podman or script)"
            ));
        }
    };
    Ok(Kind {
        id: id.to_owned(),
        runner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker(id: &str, image: &str) -> Kind {
        Kind {
            id: id.into(),
            runner: Runner::Container(Engine::Docker, ContainerConfig::image(image)),
        }
    }

    fn script(id: &str, command: &str, args: &[&str], dir: Option<&str>) -> Kind {
        Kind {
            id: id.into(),
            runner: Runner::Script(ScriptConfig {
                command: command.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                working_dir: dir.map(str::to_owned),
            }),
        }
    }

    #[test]
    fn every_form_of_the_spec_parses_as_meant() {
        let podman = Kind {
            id: "ubuntu".into(),
            runner: Runner::Container(
                Engine::Podman,
                ContainerConfig::image("git.the-ihor.com/adi/cocoon:ubuntu"),
            ),
        };
        let cases: Vec<(&str, Vec<Kind>)> = vec![
            // 1. id:image, with a registry port in the image.
            (
                "ubuntu:git.the-ihor.com/adi/cocoon:ubuntu,python:registry.local:5000/cocoon:python",
                vec![
                    docker("ubuntu", "git.the-ihor.com/adi/cocoon:ubuntu"),
                    docker("python", "registry.local:5000/cocoon:python"),
                ],
            ),
            // 2. id:runner:config.
            (
                "native:script:cocoon-worker,ubuntu:docker:git.the-ihor.com/adi/cocoon:ubuntu",
                vec![
                    script("native", "cocoon-worker", &[], None),
                    docker("ubuntu", "git.the-ihor.com/adi/cocoon:ubuntu"),
                ],
            ),
            // 3. id:runner:{json}, commas inside the JSON.
            (
                r#"native:script:{"command":"cocoon-worker","args":["--kind","{kind}"],"working_dir":"/tmp/cocoons/{service_name}"}"#,
                vec![script(
                    "native",
                    "cocoon-worker",
                    &["--kind", "{kind}"],
                    Some("/tmp/cocoons/{service_name}"),
                )],
            ),
            (
                r#"ubuntu:podman:{"image":"git.the-ihor.com/adi/cocoon:ubuntu"}"#,
                vec![podman.clone()],
            ),
            // The spec's multi-line examples, trailing comma and all.
            (
                "\n  native-small:script:{\"command\":\"cocoon-worker\",\"args\":[\"--memory\",\"512m\"]},\n  docker-ubuntu:docker:git.the-ihor.com/adi/cocoon:ubuntu,\n",
                vec![
                    script("native-small", "cocoon-worker", &["--memory", "512m"], None),
                    docker("docker-ubuntu", "git.the-ihor.com/adi/cocoon:ubuntu"),
                ],
            ),
            // 4. a JSON array.
            (
                r#"[{"id": "native", "runner_type": "script", "runner_config": {"command": "/usr/local/bin/cocoon-worker", "args": ["--kind", "native"], "working_dir": "/tmp/cocoons/{service_name}"}},
                   {"id": "ubuntu", "runner_type": "podman", "runner_config": {"image": "git.the-ihor.com/adi/cocoon:ubuntu"}}]"#,
                vec![
                    script(
                        "native",
                        "/usr/local/bin/cocoon-worker",
                        &["--kind", "native"],
                        Some("/tmp/cocoons/{service_name}"),
                    ),
                    podman,
                ],
            ),
            // A JSON string with a brace and an escaped quote in it.
            (
                r#"odd:script:{"command":"sh","args":["-c","echo \"}, not an entry\""]}"#,
                vec![script(
                    "odd",
                    "sh",
                    &["-c", "echo \"}, not an entry\""],
                    None,
                )],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
    }

    /// Found by the `kinds` fuzz target's check that every kind has a
    /// command or an image: a blank command was refused as a string but
    /// accepted inside a JSON configuration.
    #[test]
    fn blank_script_commands_are_refused() {
        for text in [
            r#"x:script:{"command":""}"#,
            r#"x:script:{"command":"  ","args":["a"]}"#,
            r#"[{"id":"x","runner_type":"script","runner_config":{"command":""}}]"#,
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains("the command is empty"), "{text}: {err}");
        }
    }

    #[test]
    fn unset_means_the_specs_defaults() {
        let kinds = parse("  ").unwrap();
        let table: Vec<(&str, &str, &str)> = kinds
            .iter()
            .map(|k| match &k.runner {
                Runner::Container(Engine::Docker, c) => {
                    (k.id.as_str(), k.runner_type(), c.image.as_str())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        let registry = "git.the-ihor.com/adi/cocoon";
        let want: Vec<(String, &str, String)> = [
            ("alpine", "alpine"),
            ("debian", "debian"),
            ("ubuntu", "ubuntu"),
            ("linux", "ubuntu"),
            ("python", "python"),
            ("node", "node"),
            ("full", "full"),
            ("gpu", "gpu"),
            ("cuda", "gpu"),
        ]
        .iter()
        .map(|(id, tag)| (id.to_string(), "docker", format!("{registry}:{tag}")))
        .collect();
        let got: Vec<(String, &str, String)> = table
            .into_iter()
            .map(|(id, runner, image)| (id.to_owned(), runner, image.to_owned()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn malformed_entries_are_named_in_the_error() {
        let cases = [
            ("ubuntu", "\"ubuntu\""),
            ("good:img,:img", "\":img\""),
            ("bad id:img", "\"bad id:img\""),
            ("x:script:", "\"x:script:\""),
            (r#"x:script:{"command":"a","bogus":1}"#, "bogus"),
            (r#"x:docker:{"image":"a""#, "unterminated JSON"),
            (r#"x:docker:{"image":}"#, "invalid JSON"),
            (r#"x:script:["a"]"#, "expected a command or an object"),
            ("a:img,a:img2", "defined twice"),
            (
                r#"[{"id":"x","runner_type":"lxc","runner_config":"img"}]"#,
                "unknown runner \"lxc\"",
            ),
            (r#"[{"id":"x"}]"#, "runner_type"),
            ("[not json", "not valid JSON"),
            ("x:docker:img}", "unbalanced"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
