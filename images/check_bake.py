#!/usr/bin/env python3
"""Checks docker-bake.hcl against the spec's image variants, and every
images/Dockerfile.* against the contract the images share (images/README.md).

Run by images/lint (which provides python-hcl2); exits 1 with one line per
problem. Usage: check_bake.py [BAKE_FILE]   (default: docker-bake.hcl at the
repository root).
"""

import re
import sys
from pathlib import Path

import hcl2

ROOT = Path(__file__).resolve().parent.parent

# The spec's variants and their alias tags ("Tag Aliases").
VARIANTS = ["alpine", "debian", "ubuntu", "python", "node", "full", "gpu", "custom"]
ALIASES = {
    "ubuntu": ["latest"],
    "alpine": ["minimal"],
    "debian": ["slim"],
    "python": ["py"],
    "node": ["js"],
    "full": ["all"],
    "gpu": ["cuda"],
}
BOTH = {"linux/amd64", "linux/arm64"}
PLATFORMS = {v: BOTH for v in VARIANTS if v not in ("gpu", "custom")}
PLATFORMS["gpu"] = {"linux/amd64"}
CUSTOM_ARGS = ["CUSTOM_BASE", "CUSTOM_PACKAGES", "CUSTOM_SETUP_SCRIPT"]

problems = []


def problem(message):
    if message not in problems:
        problems.append(message)


def unquote(value):
    """python-hcl2 8 keeps the quotes of strings and block labels."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def plain(value):
    """The parsed tree with quotes removed and the __is_block__ markers gone."""
    if isinstance(value, dict):
        return {unquote(k): plain(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return unquote(value)


def blocks(tree, kind):
    """{label: body} of the blocks of one kind (variable, group, target)."""
    found = {}
    for block in tree.get(kind, []):
        for label, body in plain(block).items():
            if label in found:
                problem(f"{kind} {label!r} is defined twice")
            found[label] = body
    return found


def interpolate(text, variables):
    """${NAME} of a bake variable -> its default; other expressions stay."""
    if not isinstance(text, str):
        return text
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
        lambda m: str(variables.get(m.group(1), m.group(0))),
        text,
    )


def resolve(name, targets, seen=()):
    """A target with what it inherits: maps merge, other attributes override."""
    if name in seen:
        problem(f"target {name!r}: inheritance loop through {' -> '.join(seen)}")
        return {}
    body = targets.get(name)
    if body is None:
        problem(f"target {seen[-1]!r} inherits from {name!r}, which does not exist")
        return {}
    merged = {}
    for parent in body.get("inherits", []):
        for key, value in resolve(parent, targets, seen + (name,)).items():
            merged[key] = value
    for key, value in body.items():
        if key == "inherits":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def check_bake(path):
    try:
        with open(path, encoding="utf-8") as f:
            tree = hcl2.load(f)
    except FileNotFoundError:
        problem(f"{path}: no such file")
        return
    except Exception as err:  # the parser's errors have no common base
        problem(f"{path}: does not parse as HCL: {err}")
        return
    base = Path(path).resolve().parent

    variables = {
        name: interpolate(body.get("default", ""), {})
        for name, body in blocks(tree, "variable").items()
    }
    if "REGISTRY" not in variables:
        problem("no variable REGISTRY")
    groups = blocks(tree, "group")
    raw_targets = blocks(tree, "target")
    targets = {name: resolve(name, raw_targets) for name in raw_targets}

    for variant in VARIANTS:
        if variant not in targets:
            problem(f"no target {variant!r} (a variant of the spec)")

    # Every buildable target's Dockerfile exists (underscore targets are
    # only inherited).
    for name, target in targets.items():
        if name.startswith("_"):
            continue
        context = base / interpolate(target.get("context", "."), variables)
        dockerfile = interpolate(target.get("dockerfile", "Dockerfile"), variables)
        if not (context / dockerfile).is_file():
            problem(f"target {name!r}: dockerfile {dockerfile!r} does not exist in {context}")

    # Tags: REGISTRY:VARIANT and the spec's aliases, each alias on its
    # variant's target only.
    registry = variables.get("REGISTRY", "")
    tags = {
        name: {interpolate(t, variables) for t in target.get("tags", [])}
        for name, target in targets.items()
    }
    for variant in VARIANTS:
        if variant not in targets:
            continue
        for tag in [variant] + ALIASES.get(variant, []):
            full = f"{registry}:{tag}"
            if full not in tags[variant]:
                problem(f"target {variant!r}: tag {full!r} missing (has {sorted(tags[variant])})")
            for other, other_tags in tags.items():
                if other != variant and full in other_tags:
                    problem(f"tag {full!r} is on target {other!r} too, not only on {variant!r}")

    for variant, want in PLATFORMS.items():
        if variant not in targets:
            continue
        have = set(targets[variant].get("platforms", []))
        if have != want:
            problem(f"target {variant!r}: platforms {sorted(have)}, want {sorted(want)}")

    # Groups.
    def members(group, seen=()):
        """The targets a group builds, through nested groups."""
        out = set()
        for item in groups[group].get("targets", []):
            if item in targets:
                out.add(item)
            elif item in groups and item not in seen:
                out |= members(item, seen + (group,))
            else:
                problem(f"group {group!r}: {item!r} is neither a target nor a group")
        return out

    for name in groups:
        members(name)
    wanted_groups = {
        "default": set(VARIANTS) - {"custom"},
        "minimal": {"alpine"},
        "all": set(VARIANTS),
    }
    for name, want in wanted_groups.items():
        if name not in groups:
            problem(f"no group {name!r}")
        elif members(name) != want:
            problem(f"group {name!r}: {sorted(members(name))}, want {sorted(want)}")
    if "dev" not in groups:
        problem("no group 'dev'")
    elif not members("dev") or not members("dev") <= set(VARIANTS):
        problem(f"group 'dev': {sorted(members('dev'))}, want some of the variants")

    if "custom" in targets:
        args = targets["custom"].get("args", {})
        for arg in CUSTOM_ARGS:
            if arg not in args:
                problem(f"target 'custom': no arg {arg}")


# The contract every image keeps (images/README.md), as the instructions
# that express it.
CONTRACT = [
    (r"^FROM\s+\$\{RUST_IMAGE\}\s+AS\s+build$", "a stage `build` from ${RUST_IMAGE}"),
    (r"^FROM\s+scratch\s+AS\s+prebuilt$", "a stage `prebuilt` from scratch"),
    (r"^FROM\s+\$\{BIN\}\s+AS\s+bin$", "FROM ${BIN} AS bin"),
    (r"^FROM\s+\$\{BASE\}$", "the final stage FROM ${BASE}"),
    (
        r"^COPY\s+--from=bin\s+/usr/local/bin/cocoon\s+/usr/local/bin/cocoon$",
        "COPY --from=bin /usr/local/bin/cocoon /usr/local/bin/cocoon",
    ),
    (r"cargo build --release --locked --bin cocoon", "cargo build --release --locked --bin cocoon"),
    (r"^RUN\s.*install-packages\.sh user", "the user made by install-packages.sh user"),
    (r"^USER\s+(1000:1000|1000|cocoon|cocoon:cocoon)$", "USER cocoon (1000:1000)"),
    (r"^WORKDIR\s+/home/cocoon$", "WORKDIR /home/cocoon"),
    (r"^VOLUME\s+(/cocoon|\[\"/cocoon\"\])$", "VOLUME /cocoon"),
    (r"^ENV\s.*\bCOCOON_DATA_DIR=/cocoon\b", "ENV COCOON_DATA_DIR=/cocoon"),
    (r"^ENV\s.*\bTERM=xterm-256color\b", "ENV TERM=xterm-256color"),
    (r"^ENV\s.*\bLANG=C\.UTF-8\b", "ENV LANG=C.UTF-8"),
    (
        r'^HEALTHCHECK\s+--interval=30s\s+--timeout=5s\s+--start-period=30s\s+--retries=3\s+'
        r'CMD\s+\["/usr/local/bin/cocoon",\s*"health"\]$',
        "the HEALTHCHECK running `cocoon health`",
    ),
    (r'^ENTRYPOINT\s+\["/usr/local/bin/cocoon"\]$', 'ENTRYPOINT ["/usr/local/bin/cocoon"]'),
    (r'^CMD\s+\["run"\]$', 'CMD ["run"]'),
    (r"^LABEL\s.*org\.opencontainers\.image\.title=", "the OCI title label"),
    (r"^LABEL\s.*org\.opencontainers\.image\.description=", "the OCI description label"),
    (r"^LABEL\s.*org\.opencontainers\.image\.source=", "the OCI source label"),
    (
        r'^LABEL\s.*org\.opencontainers\.image\.licenses="MIT OR Apache-2\.0"',
        'the OCI licenses label "MIT OR Apache-2.0"',
    ),
]


def instructions(text):
    """The Dockerfile's instructions, continuation lines joined, comments out."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        out.append(re.sub(r"\s+", " ", current).strip())
        current = ""
    if current:
        out.append(current.strip())
    return out


def check_dockerfile(path, variant):
    name = path.name
    lines = instructions(path.read_text(encoding="utf-8"))
    first_from = next((i for i, l in enumerate(lines) if l.upper().startswith("FROM ")), None)
    if first_from is None:
        problem(f"{name}: no FROM")
        return
    globals_ = lines[:first_from]
    if not any(re.match(r"^ARG\s+BASE=\S", l) for l in globals_):
        problem(f"{name}: no `ARG BASE=<image>` before the first FROM")
    if not any(re.match(r"^ARG\s+BIN=build$", l) for l in globals_):
        problem(f"{name}: no `ARG BIN=build` before the first FROM")
    if not any(re.match(r"^ARG\s+RUST_IMAGE=\S", l) for l in globals_):
        problem(f"{name}: no `ARG RUST_IMAGE=<image>` before the first FROM")
    for pattern, what in CONTRACT:
        if not any(re.search(pattern, l) for l in lines):
            problem(f"{name}: missing {what}")
    # The last FROM is the final stage, and its last USER is not root.
    if not re.match(r"^FROM\s+\$\{BASE\}$", [l for l in lines if l.startswith("FROM ")][-1]):
        problem(f"{name}: the last stage is not FROM ${{BASE}}")
    users = [l.split(None, 1)[1] for l in lines if l.startswith("USER ")]
    if users and users[-1].split(":")[0] in ("root", "0"):
        problem(f"{name}: the last USER is root")
    if variant == "custom":
        for arg in CUSTOM_ARGS:
            if not any(re.match(rf"^ARG\s+{arg}(=|$)", l) for l in lines):
                problem(f"{name}: no ARG {arg}")
    for ref in re.findall(r"images/[\w./-]*\w", path.read_text(encoding="utf-8")):
        if ref.startswith("images/Dockerfile."):
            continue
        if not (ROOT / ref).exists():
            problem(f"{name}: refers to {ref}, which does not exist")


def main():
    bake = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docker-bake.hcl"
    check_bake(bake)
    for variant in VARIANTS:
        path = ROOT / "images" / f"Dockerfile.{variant}"
        if path.is_file():
            check_dockerfile(path, variant)
        else:
            problem(f"images/Dockerfile.{variant}: no such file (a variant of the spec)")
    if problems:
        for p in problems:
            print(f"check_bake: {p}", file=sys.stderr)
        print(f"check_bake: {len(problems)} problem(s) in {bake} or images/Dockerfile.*", file=sys.stderr)
        return 1
    print(f"check_bake: {bake.name} and {len(VARIANTS)} Dockerfiles are consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
