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
