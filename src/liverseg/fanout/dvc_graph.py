"""Read dvc.yaml (and params.yaml for its `${...}` values) into the stage graph.

Plain YAML reading, no DVC import: DVC lives in its own tool environment (its hydra pin
of antlr 4.9 would break Dagster's selection syntax, which needs 4.13). `matrix` and
`foreach` stages are expanded into `name@key` items exactly as DVC names them; a stage
depends on another when one of its deps is, contains or lies inside one of the other's
outputs. tests/test_pipeline.py checks the result against `dvc dag --dot`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

VAR = re.compile(r"\$\{\s*([^}]+?)\s*\}")


@dataclass(frozen=True)
class Stage:
    name: str  # as DVC names it: "train@enhanced_pan"
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # every output path: outs, metrics and plots
    metrics: tuple[str, ...] = ()
    upstream: frozenset[str] = field(default_factory=frozenset)
    uncached: tuple[str, ...] = ()  # outputs with `cache: false` (kept in git, not the cache)

    @property
    def group(self) -> str:
        return self.name.split("@")[0]


def _lookup(context: dict, dotted: str):
    value = context
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"dvc.yaml: ${{{dotted}}} is not defined in params.yaml or the item")
        value = value[part]
    return value


def _interpolate(value, context: dict):
    if isinstance(value, str):
        whole = VAR.fullmatch(value)
        if whole:  # keep lists/dicts as they are (`matrix: {model: ${models}}`)
            return _lookup(context, whole.group(1))
        return VAR.sub(lambda m: str(_lookup(context, m.group(1))), value)
    if isinstance(value, list):
        return [_interpolate(v, context) for v in value]
    if isinstance(value, dict):  # keys too: `- reports/training/${item.model}.csv: {...}`
        return {_interpolate(k, context): _interpolate(v, context) for k, v in value.items()}
    return value


def _paths(entries) -> list[str]:
    """Paths from a DVC list whose entries are strings or {path: options} mappings."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _uncached(entries) -> list[str]:
    return [next(iter(e)) for e in entries or []
            if isinstance(e, dict) and (next(iter(e.values())) or {}).get("cache") is False]


def _expand(name: str, spec: dict, params: dict) -> list[tuple[str, dict]]:
    """One (name, spec) per item of a matrix/foreach stage, `${item...}` resolved."""
    if "matrix" in spec:
        axes = {k: _interpolate(v, params) for k, v in spec["matrix"].items()}
        items = [dict(zip(axes, combo, strict=True))
                 for combo in itertools.product(*axes.values())]
        keys = ["-".join(str(v) for v in item.values()) for item in items]
    elif "foreach" in spec:
        values = _interpolate(spec["foreach"], params)
        items = list(values.values()) if isinstance(values, dict) else list(values)
        keys = list(values) if isinstance(values, dict) else [str(v) for v in values]
        spec = spec["do"]
    else:
        return [(name, _interpolate(spec, params))]
    body = {k: v for k, v in spec.items() if k != "matrix"}
    return [(f"{name}@{key}", _interpolate(body, params | {"item": item}))
            for key, item in zip(keys, items, strict=True)]


def overlaps(a: str, b: str) -> bool:
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def load_stages(root: str | Path = ".") -> dict[str, Stage]:
    root = Path(root)
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    params_file = root / "params.yaml"
    params = (yaml.safe_load(params_file.read_text()) or {}) if params_file.is_file() else {}
    raw: dict[str, Stage] = {}
    for name, spec in dvc_yaml.get("stages", {}).items():
        for item_name, s in _expand(name, spec, params):
            metrics = _paths(s.get("metrics"))
            outs = _paths(s.get("outs")) + metrics + _paths(s.get("plots"))
            uncached = [p for key in ("outs", "metrics", "plots") for p in _uncached(s.get(key))]
            raw[item_name] = Stage(item_name, s["cmd"], tuple(_paths(s.get("deps"))),
                                   tuple(outs), tuple(metrics), uncached=tuple(uncached))
    producers = [(out, st.name) for st in raw.values() for out in st.outs]
    return {
        name: Stage(st.name, st.cmd, st.deps, st.outs, st.metrics, frozenset(
            producer for dep in st.deps for out, producer in producers
            if producer != name and overlaps(dep, out)), st.uncached)
        for name, st in raw.items()
    }
