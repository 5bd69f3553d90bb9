"""The documentation: the README is a front door to docs/, no link is broken, every number in
docs/BENCHMARKS.md's tables comes from the bench/results/ file the table names, and
`liverseg --help` lists the commands in the order of the flow. Fast: no stage runs."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from liverseg import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
BENCHMARKS = DOCS / "BENCHMARKS.md"
RESULTS = REPO / "bench" / "results"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FLOW = ["source", "ingest", "validate", "split", "train", "evaluate", "compare", "register",
        "report", "predict", "export", "lineage", "audit", "models"]


@functools.cache
def load_tables():
    """bench/tables.py, the script that writes docs/BENCHMARKS.md's tables."""
    spec = importlib.util.spec_from_file_location("bench_tables", REPO / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ markdown


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are examples)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed
    (letters, digits, `_`, `-` and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def test_slug_follows_githubs_rules():
    assert slug("Serving: what evaluate measured is what predict delivers") == (
        "serving-what-evaluate-measured-is-what-predict-delivers")
    assert slug("Rebuilding a model: `liverseg audit`") == "rebuilding-a-model-liverseg-audit"
    assert slug("Tumour, LiTS-117") == "tumour-lits-117"
    assert slug("Metrics — per image") == "metrics--per-image"
    assert slug("data_source and **bold**") == "data_source-and-bold"


# ------------------------------------------------------------------------------ README and links


def test_readme_is_a_front_door_of_at_most_160_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_keeps_the_test_command_ci_runs():
    text = README.read_text()
    section = text[text.index("\n## Tests"):]
    ci = (REPO / ".ci" / "run").read_text()
    assert "`make test-all`" in section and "\nmake test-all\n" in ci


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(README.parent / t.split("#")[0]).resolve() for t in links(README)
               if not re.match(r"[a-z]+:", t)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in targets]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_no_relative_link_is_broken():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)} -> {target}"
            if not file.exists():
                broken.append(f"{where}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{where}: no heading with that anchor")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------------ benchmark tables


def blocks() -> list[tuple[str, str]]:
    return [(m.group("name"), m.group(0)) for m in load_tables().BLOCK.finditer(
        BENCHMARKS.read_text())]


def test_benchmark_tables_are_what_bench_tables_py_makes_of_the_results():
    text = BENCHMARKS.read_text()
    assert load_tables().update(text) == text, (
        "docs/BENCHMARKS.md differs from bench/results/: run `python bench/tables.py`")


def test_every_benchmark_table_is_generated_and_names_its_results():
    text = BENCHMARKS.read_text()
    outside = load_tables().BLOCK.sub("", text)
    rows = [line for line in outside.splitlines() if line.lstrip().startswith("|")]
    assert not rows, f"a table in docs/BENCHMARKS.md not generated by bench/tables.py: {rows[0]}"
    assert len(blocks()) >= 5
    for name, block in blocks():
        cited = re.findall(r"bench/results/([\w.@-]+\.(?:csv|json))", block)
        assert cited, f"table {name} names no bench/results/ file"
        for file in cited:
            assert (RESULTS / file).is_file(), f"table {name}: bench/results/{file} missing"


def numbers_in(file: Path) -> list[float]:
    if file.suffix == ".json":
        found = []

        def walk(value):
            if isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                found.append(float(value))

        walk(json.loads(file.read_text()))
        return found
    out = []
    with file.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for value in row.values():
                try:
                    out.append(float(value))
                except (TypeError, ValueError):
                    pass
    return out


NUM = r"-?\d+(?:\.\d+)?"


def shown(number: str, pool: list[float], scale: float = 1.0) -> bool:
    """Does `number`, as printed, round any value of `pool` (divided by scale)?"""
    decimals = len(number.partition(".")[2])
    return any(f"{x / scale:.{decimals}f}" == number for x in pool)


def test_every_number_in_the_benchmark_tables_is_in_the_results_the_table_names():
    checked = 0
    for name, block in blocks():
        cited = re.findall(r"bench/results/([\w.@-]+\.(?:csv|json))", block)
        pool = [x for file in cited for x in numbers_in(RESULTS / file)]
        table = [line for line in block.splitlines() if line.startswith("|")][2:]
        for line in table:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            run: list[float] = []  # the plain numbers since the last mean ± sd cell
            for cell in cells[1:]:
                where = f"table {name}, row {cells[0]!r}, cell {cell!r}"
                if m := re.fullmatch(rf"({NUM}) ± ({NUM})", cell):
                    assert len(run) > 1, where
                    assert abs(float(m[1]) - statistics.mean(run)) <= 1.05e-3, where
                    assert abs(float(m[2]) - statistics.stdev(run)) <= 1.25e-3, where
                    run, checked = [], checked + 1
                elif m := re.fullmatch(rf"({NUM}) M", cell):
                    assert shown(m[1], pool, 1e6), f"{where}: not in {cited}"
                    checked += 1
                elif m := re.fullmatch(rf"({NUM})(?: \[({NUM}), ({NUM})\])?", cell):
                    for number in filter(None, m.groups()):
                        assert shown(number, pool), f"{where}: {number} not in {cited}"
                        checked += 1
                    run.append(float(m[1]))
    assert checked > 100


# ------------------------------------------------------------------------------ liverseg --help


def listed(app: typer.Typer, names) -> list[str]:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    first = [re.match(r"[│|]\s(\S+)\s{2,}", line.strip()) for line in result.output.splitlines()]
    return [m[1] for m in first if m and m[1] in names]


def test_help_lists_the_commands_in_the_order_of_the_flow():
    names = list(typer.main.get_command(cli.app).commands)
    shown_names = listed(cli.app, names)
    assert sorted(shown_names) == sorted(names), "every command is listed, once"
    assert [n for n in shown_names if n in FLOW] == [n for n in FLOW if n in names]
    assert set(FLOW) <= set(names)
    last_flow = max(shown_names.index(n) for n in FLOW)
    assert all(shown_names.index(n) > last_flow for n in names if n not in FLOW), (
        "a command outside the flow is listed after the flow's")


def test_a_command_added_later_is_still_listed_at_the_end():
    app = typer.Typer(cls=cli.FlowOrder)
    for name in ("newcomer", "train", "ingest"):
        app.command(name)(lambda: None)
    assert listed(app, {"newcomer", "train", "ingest"}) == ["ingest", "train", "newcomer"]


@pytest.mark.parametrize("name", list(typer.main.get_command(cli.app).commands))
def test_every_command_has_a_one_line_summary_and_an_example(name):
    command = typer.main.get_command(cli.app).commands[name]
    summary = (command.help or "").strip().split("\n\n")[0]
    assert "\n" not in summary and len(summary) <= 66, (
        f"`liverseg {name}`: the first paragraph of its help is its line in `liverseg --help`;"
        f" keep it one line of at most 66 characters (an 80-column terminal): {summary!r}")
    result = CliRunner().invoke(cli.app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(rf"Example: liverseg {name}\b", result.output), result.output


def test_every_test_a_promise_names_exists():
    """RELIABILITY.md and SERVING.md name, for each promise, the test that proves it: each
    named test function (`test_...`, optionally with its file) is defined in that file, or
    somewhere in tests/ when no file is given."""
    sources = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    named = 0
    missing = []
    for page in (DOCS / "RELIABILITY.md", DOCS / "SERVING.md"):
        for match in re.finditer(r"(?:(test_\w+\.py)::)?\b(test_\w+)(?!\.py)\b",
                                 page.read_text()):
            file, name = match.groups()
            named += 1
            where = [sources.get(file, "")] if file else sources.values()
            if not any(re.search(rf"^def {name}\(", text, re.M) for text in where):
                missing.append(f"{page.name}: {match.group(0)}")
    assert named >= 30 and not missing, missing
