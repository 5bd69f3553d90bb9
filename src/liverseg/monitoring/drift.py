"""Drift of served cases against the reference of the model that served them.

**The tests are Evidently's defaults, computed with scipy.** Evidently (0.7.23, the newest
release) resolves beside this project's pins, but does not import with the pinned pandas 3.1:
`evidently.legacy.tests.data_integrity_tests` imports `infer_dtype_from_object` from
`pandas.core.dtypes.common`, which pandas 3 removed (checked in a throwaway venv layered on
this one: `import evidently` raises ImportError). So this module reimplements, line for
line, the per-column test Evidently picks by default (`_get_default_stattest` in its
`legacy/calculations/stattests/registry.py`) and each test's default threshold and drift
condition:

- reference <= 1000 values:
  - numeric with > 5 distinct values (reference and current together): two-sample
    Kolmogorov-Smirnov, drift when p <= 0.05;
  - categorical, or numeric with <= 5 distinct values: chi-square goodness of fit
    (expected = the reference's shares x the current count), drift when p < 0.05; with
    only two distinct values the two-proportion z-test instead, drift when p < 0.05;
- reference > 1000 values:
  - numeric with > 5 distinct values: Wasserstein distance / the reference's std (at least
    0.001), drift when >= 0.1;
  - otherwise Jensen-Shannon distance (natural log; for numeric columns with > 20 reference
    values on Sturges bins over both samples), drift when >= 0.1.

`reference()` keeps at most `REFERENCE_SIZE` = 1000 rows, so a saved reference always takes
the first two rows: p-value tests, calibrated for windows of tens of served cases, where a
distance (whose value between two samples of the same distribution shrinks only as
1/sqrt(n)) would flag 30 cases drawn from the reference itself most of the time. A reference
with more values (made by hand) follows Evidently's rule above.

**Two deliberate departures, both stated in every result:**
- The p-value threshold is Bonferroni-corrected within a group (0.05 / the number of
  features tested), because a group WARNs when *any* of its features drifts: uncorrected,
  windows of 30 cases drawn from the reference distribution itself warned in 33% (header),
  22% (intensity), 15% (confidence) and 7% (output) of 200 draws; corrected, in 7%, 4%,
  4.5% and 2% (tests/test_monitoring.py, synthetic multi-vendor cases).
  `check(..., correction=None)` gives Evidently's uncorrected thresholds. Distance
  thresholds (0.1) are not corrected.
- A value the reference never had (a new manufacturer, kernel, kVp) is drift with p = 0
  (chi-square's expected count is 0 there; scipy would divide by zero).

**Group rules** (Evidently's dataset-drift rule for ERROR): a group is **WARN** when at least
one of its tested features drifts, **ERROR** when at least half of them do, **OK** when none
does, **SKIPPED** when none can be tested: a feature the reference lacks (header facts of a
model trained on PNG slices or the phantom) is skipped saying so, and so is a feature with
fewer than `MIN_CURRENT_ROWS` = 20 current values or fewer than `MIN_REFERENCE_VALUES` = 5
reference values. With fewer than 20 current rows every group is SKIPPED.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import distance

GROUPS: dict[str, tuple[str, ...]] = {
    # pixel_spacing_col and columns are in the row but not tested: they repeat
    # pixel_spacing_row and rows on almost every CT, and a fact counted twice would tilt the
    # half-of-the-features rule
    "header": ("manufacturer", "manufacturer_model_name", "kvp", "convolution_kernel",
               "slice_thickness", "pixel_spacing_row", "rows", "slices"),
    "intensity": ("grey_p1", "grey_p5", "grey_p25", "grey_p50", "grey_p75", "grey_p95",
                  "grey_p99", "grey_mean", "hu_below_window", "hu_above_window"),
    "output": ("liver_ml", "tumour_ml", "liver_pixels", "tumour_pixels", "lesion_count"),
    "confidence": ("mean_max_prob", "p5_max_prob", "mean_entropy"),
}
CATEGORICAL = frozenset({"manufacturer", "manufacturer_model_name", "convolution_kernel"})
REFERENCE_SIZE = 1000  # Evidently's boundary between p-value tests and distances
MIN_CURRENT_ROWS = 20
MIN_REFERENCE_VALUES = 5
P_THRESHOLD = 0.05  # Evidently's default for KS, chi-square, z
DISTANCE_THRESHOLD = 0.1  # Evidently's default for Wasserstein (normed) and Jensen-Shannon
SCHEMA = 1


@dataclass
class GroupResult:
    status: str  # "OK" | "WARN" | "ERROR" | "SKIPPED"
    drifted: list[str] = field(default_factory=list)
    features: dict[str, dict] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def reference(rows: pd.DataFrame, seed: int = 0) -> dict:
    """What is saved with a model version: for every feature of `GROUPS` that `rows` (the
    facts of its training and validation cases, one row per case) hold, a sample of at most
    `REFERENCE_SIZE` values (numeric) or the counts of each value over those rows
    (categorical). A feature with no value is left out: its check is skipped, saying so.
    JSON-serialisable; the same rows and seed give the same reference."""
    n_rows = len(rows)
    if n_rows > REFERENCE_SIZE:
        keep = np.sort(np.random.default_rng(seed).choice(n_rows, REFERENCE_SIZE, replace=False))
        rows = rows.iloc[keep]
    features: dict[str, dict] = {}
    for name in (f for group in GROUPS.values() for f in group):
        if name not in rows:
            continue
        col = rows[name].dropna()
        if name in CATEGORICAL:
            col = col.astype(str)
            if col.empty:
                continue
            counts = col.value_counts()
            features[name] = {"type": "categorical",
                              "counts": {str(k): int(v) for k, v in counts.items()}}
        else:
            values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if not values.size:
                continue
            features[name] = {"type": "numeric", "values": [float(v) for v in values]}
    return {"schema": SCHEMA, "rows": int(n_rows), "sampled": int(len(rows)),
            "features": features}


def _current(current: pd.DataFrame, name: str, categorical: bool) -> np.ndarray:
    """The current window's values of one feature: str (categorical) or finite floats."""
    if name not in current:
        return np.array([], dtype=object if categorical else float)
    col = current[name].to_numpy()
    if categorical:
        return np.array([str(v) for v in col if v is not None and v == v], dtype=object)
    try:
        values = np.asarray(col, dtype=float)
    except (TypeError, ValueError):
        values = pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=float)
    return values[np.isfinite(values)]


def _counts(ref: dict, cur: np.ndarray, ref_values: np.ndarray | None) -> tuple[list, np.ndarray,
                                                                              np.ndarray]:
    """Aligned counts of every value over reference and current."""
    if ref_values is None:
        ref_counts = dict(ref["counts"])
    else:
        vals, n = np.unique(ref_values, return_counts=True)
        ref_counts = dict(zip(vals.tolist(), n.tolist(), strict=True))
    vals, n = np.unique(cur, return_counts=True)
    cur_counts = dict(zip(vals.tolist(), n.tolist(), strict=True))
    keys = sorted(set(ref_counts) | set(cur_counts), key=str)
    return (keys, np.array([ref_counts.get(k, 0) for k in keys], float),
            np.array([cur_counts.get(k, 0) for k in keys], float))


def _chi_square(f_ref: np.ndarray, f_cur: np.ndarray) -> tuple[float | None, float]:
    expected = f_ref * f_cur.sum() / f_ref.sum()
    if np.any((expected == 0) & (f_cur > 0)):
        return None, 0.0  # a value the reference never had
    keep = expected > 0
    if keep.sum() < 2:
        return 0.0, 1.0
    obs, exp = f_cur[keep], expected[keep]  # scipy.stats.chisquare, without its wrapper
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, float(stats.chi2.sf(stat, keep.sum() - 1))


def _z_test(f_ref: np.ndarray, f_cur: np.ndarray) -> tuple[float | None, float]:
    """Evidently's two-proportion z-test on the share of the first value (sorted)."""
    n1, n2 = f_ref.sum(), f_cur.sum()
    if len(f_ref) < 2 or (np.count_nonzero(f_ref) == 1 and np.count_nonzero(f_cur) == 1
                          and np.argmax(f_ref) == np.argmax(f_cur)):
        return 0.0, 1.0  # one value on both sides
    p1, p2 = 1 - f_ref[0] / n1, 1 - f_cur[0] / n2
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return float(z), float(2 * (1 - stats.norm.cdf(abs(z))))


def _jensen_shannon(ref_values: np.ndarray | None, cur: np.ndarray, f_ref: np.ndarray,
                    f_cur: np.ndarray) -> float:
    if ref_values is not None and len(np.unique(ref_values)) > 20:
        both = np.concatenate([ref_values, cur])
        bins = np.histogram_bin_edges(both, bins="sturges")
        f_ref = np.histogram(ref_values, bins)[0].astype(float)
        f_cur = np.histogram(cur, bins)[0].astype(float)
    return float(distance.jensenshannon(f_ref / f_ref.sum(), f_cur / f_cur.sum()))


def compare_feature(ref: dict, cur: np.ndarray, p_threshold: float = P_THRESHOLD,
                 distance_threshold: float = DISTANCE_THRESHOLD) -> dict:
    """Evidently's default test for one feature (see the module docstring)."""
    categorical = ref["type"] == "categorical"
    ref_values = None if categorical else np.asarray(ref["values"], float)
    n_ref = int(sum(ref["counts"].values())) if categorical else int(ref_values.size)
    few_values = categorical or len(np.unique(np.concatenate([ref_values, cur]))) <= 5
    if few_values:
        keys, f_ref, f_cur = _counts(ref, cur, ref_values)
        n_unique = len(keys)
    out: dict[str, Any] = {"n_ref": n_ref, "n_cur": int(len(cur))}
    if n_ref <= REFERENCE_SIZE:
        if not few_values:
            stat, p = stats.ks_2samp(ref_values, cur)
            out.update(test="ks", statistic=float(stat), p_value=float(p),
                       drifted=bool(p <= p_threshold))
        else:
            test = "chisquare" if n_unique > 2 else "z"
            stat, p = (_chi_square if test == "chisquare" else _z_test)(f_ref, f_cur)
            out.update(test=test, statistic=stat, p_value=p, drifted=bool(p < p_threshold))
        out["threshold"] = p_threshold
    else:
        if not few_values:
            norm = max(float(np.std(ref_values)), 0.001)
            stat = stats.wasserstein_distance(ref_values, cur) / norm
            test = "wasserstein_norm"
        else:
            stat, test = _jensen_shannon(ref_values, cur, f_ref, f_cur), "jensenshannon"
        out.update(test=test, statistic=_finite(stat), p_value=None,
                   drifted=bool(stat >= distance_threshold), threshold=distance_threshold)
    if out["statistic"] is not None:
        out["statistic"] = _finite(out["statistic"])
    return out


def _check_group(features: tuple[str, ...], ref: dict, current: pd.DataFrame, min_rows: int,
                 correction: str | None) -> GroupResult:
    results: dict[str, dict] = {}
    testable: dict[str, np.ndarray] = {}
    for name in features:
        ref_f = ref.get(name)
        cur = _current(current, name, name in CATEGORICAL)
        if ref_f is None:
            results[name] = {"test": None, "drifted": False, "n_ref": 0, "n_cur": len(cur),
                             "skipped": "no reference: the model's training data has no "
                                        f"{name}"}
            continue
        n_ref = (sum(ref_f["counts"].values()) if ref_f["type"] == "categorical"
                 else len(ref_f["values"]))
        if n_ref < MIN_REFERENCE_VALUES:
            why = f"only {n_ref} reference values (< {MIN_REFERENCE_VALUES})"
        elif len(cur) < min_rows:
            why = f"only {len(cur)} current values (< {min_rows})"
        else:
            testable[name] = cur
            continue
        results[name] = {"test": None, "drifted": False, "n_ref": int(n_ref),
                         "n_cur": len(cur), "skipped": why}
    if not testable:
        reasons = "; ".join(f"{k}: {v['skipped']}" for k, v in results.items())
        return GroupResult("SKIPPED", [], results, f"no feature could be tested ({reasons})")
    m = len(testable)
    p_threshold = P_THRESHOLD / m if correction == "bonferroni" else P_THRESHOLD
    for name, cur in testable.items():
        results[name] = compare_feature(ref[name], cur, p_threshold)
    drifted = [name for name in features if results[name]["drifted"]]
    rule = (f"{m} features tested, p-value threshold {P_THRESHOLD}"
            + (f"/{m} (Bonferroni)" if correction == "bonferroni" and m > 1 else "")
            + f", distance threshold {DISTANCE_THRESHOLD}")
    skipped = [k for k, v in results.items() if v.get("skipped")]
    note = f"; not tested: {', '.join(skipped)}" if skipped else ""
    if not drifted:
        return GroupResult("OK", [], results, f"no feature drifted ({rule}){note}")
    status = "ERROR" if len(drifted) >= m / 2 else "WARN"
    share = "at least half" if status == "ERROR" else "fewer than half"
    return GroupResult(status, drifted, results,
                       f"{len(drifted)} of {m} features drifted ({share}): "
                       f"{', '.join(drifted)} ({rule}){note}")


def check(reference: dict, current: pd.DataFrame, *, min_rows: int = MIN_CURRENT_ROWS,
          correction: str | None = "bonferroni",
          groups: dict[str, tuple[str, ...]] | None = None) -> dict[str, GroupResult]:
    """Each group of `GROUPS` (or `groups`) tested on the `current` rows (the monitoring
    window) against `reference` (from `reference()`): {group: GroupResult}."""
    groups = GROUPS if groups is None else groups
    ref = reference.get("features", {})
    if len(current) < min_rows:
        why = (f"{len(current)} served cases in the window, fewer than the {min_rows} a test "
               "needs")
        return {g: GroupResult("SKIPPED", [], {}, why) for g in groups}
    return {g: _check_group(features, ref, current, min_rows, correction)
            for g, features in groups.items()}


def figure(reference: dict, current: pd.DataFrame, feature: str, path: Path) -> Path:
    """A small PNG of one feature: the reference's distribution against the current window's
    (histograms as densities on shared bins; bars of shares for categories)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref = reference.get("features", {}).get(feature)
    categorical = feature in CATEGORICAL or (ref is not None and ref["type"] == "categorical")
    cur = _current(current, feature, categorical)
    fig = Figure(figsize=(4.0, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if categorical:
        ref_counts = dict(ref["counts"]) if ref else {}
        vals, n = np.unique(cur, return_counts=True)
        cur_counts = dict(zip(vals.tolist(), n.tolist(), strict=True))
        keys = sorted(set(ref_counts) | set(cur_counts), key=str)
        x = np.arange(len(keys))
        n_ref, n_cur = max(sum(ref_counts.values()), 1), max(len(cur), 1)
        ax.bar(x - 0.2, [ref_counts.get(k, 0) / n_ref for k in keys], 0.4, label="reference")
        ax.bar(x + 0.2, [cur_counts.get(k, 0) / n_cur for k in keys], 0.4, label="current")
        ax.set_xticks(x, [str(k)[:14] for k in keys], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("share")
    else:
        ref_values = np.asarray(ref["values"], float) if ref else np.array([])
        cur_values = cur
        both = np.concatenate([ref_values, cur_values])
        bins = np.histogram_bin_edges(both, bins=20) if both.size else 10
        if ref_values.size:
            ax.hist(ref_values, bins, density=True, alpha=0.5, label="reference")
        if cur_values.size:
            ax.hist(cur_values, bins, density=True, alpha=0.5, label="current")
        ax.set_ylabel("density")
    ax.set_title(feature, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
