"""Operations on params as plain data (a parsed params.yaml, `Params.dump()`, a recorded
`params` tag): how presets and tests override some keys, how MLflow names them flat, and
what changed between two of them. Reading and validating params.yaml is config's.
"""

from __future__ import annotations


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update` laid over it, section by section (raw params.yaml data): how a
    preset or a test overrides some keys of a section and keeps the rest."""
    out = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = deep_merge(base[key], value) if both_dicts else value
    return out


def set_key(params: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into raw params, like `dvc exp run -S` (the
    benchmarks' `--set`); a section params.yaml lacks is a clear error."""
    import yaml

    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"--set {assignment}: params.yaml has no section {key!r}")
        node = node[part]
    node[leaf] = yaml.safe_load(value)


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested params as flat `a.b.c` keys (MLflow's param names; what lineage compares)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


ABSENT = "<absent>"


def param_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every flat key whose value differs, sorted. A key on
    one side only shows ABSENT on the other; absent and null count as equal."""
    a, b = flatten(old), flatten(new)
    return [(key, a.get(key, ABSENT), b.get(key, ABSENT))
            for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]
