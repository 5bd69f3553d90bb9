"""dvc.yaml passes no paths to the stages, so it must name the ones `liverseg.artifacts`
gives them: every stage's data deps and outs, per model for the matrix stages."""

from liverseg.artifacts import Artifacts, stage_io
from liverseg.fanout.dvc_graph import load_stages
from tests.helpers import REPO


def test_dvc_yaml_deps_and_outs_are_the_artifacts_paths():
    stages = load_stages(REPO)
    assert {s.group for s in stages.values()} == {
        "source", "ingest", "validate", "split", "train", "evaluate", "compare", "register",
        "report"}
    for name, stage in stages.items():
        model = name.partition("@")[2]
        deps, outs = stage_io(stage.group, model)
        data_deps = {d for d in stage.deps if not d.startswith("src/")}
        assert data_deps == deps, f"{name}: dvc.yaml data deps differ from artifacts"
        assert set(stage.outs) == outs, f"{name}: dvc.yaml outs differ from artifacts"


def test_paths_are_rooted_where_asked(tmp_path):
    art = Artifacts(tmp_path)
    assert art.metrics("pan") == tmp_path / "reports/metrics/pan.json"
    assert art.model_config("pan") == tmp_path / "models/pan/config.json"
    assert Artifacts().curve("pan").as_posix() == "reports/training/pan.csv"


# Imported by ingest's code without deciding a case file's bytes: params (their values are
# in each case's key), paths, atomic writes, and the network half that preprocess hands to
# the pyfunc code of older models (ingest never asks for it).
NO_BYTES = {"config.py", "config_sources.py", "artifacts.py", "io.py", "__init__.py",
            "data/__init__.py", "dicom/__init__.py", "served.py"}


def _liverseg_imports(path, package):
    """The liverseg modules a file imports, at any depth of its code (lazy imports too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            if name.startswith("liverseg."):
                rel = name.removeprefix("liverseg.").replace(".", "/")
                found |= {p for p in (package / f"{rel}.py", package / rel / "__init__.py")
                          if p.is_file()}
    return found


def test_ingest_reruns_for_the_code_that_makes_case_files_and_no_other():
    """dvc.yaml's code deps of ingest are `ingest.CODE` (the store's key), and CODE holds
    every module its files import, save those that make no byte of a case file."""
    from liverseg.stages import ingest

    package = REPO / "src/liverseg"
    code_deps = {d for d in load_stages(REPO)["ingest"].deps if d.startswith("src/")}
    assert code_deps == {f"src/liverseg/{c}" for c in ingest.CODE} | {
        "src/liverseg/stages/ingest.py"}
    covered = {p for c in ingest.CODE for p in (
        [package / c] if c.endswith(".py") else (package / c).rglob("*.py"))}
    imported = set().union(*(_liverseg_imports(p, package) for p in covered))
    outside = {p.relative_to(package).as_posix() for p in imported - covered} - NO_BYTES
    assert not outside, f"ingest's code imports {sorted(outside)}: add to ingest.CODE"
