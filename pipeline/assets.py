"""One asset per DVC stage (matrix items included); materialising it runs that stage."""

# No `from __future__ import annotations`: Dagster inspects the `context` type hint at runtime.
import json
from pathlib import Path

import dagster as dg

from pipeline.dvc_graph import Stage, load_stages
from pipeline.resources import REPO_ROOT, DvcResource, MlflowResource


def asset_key(stage_name: str) -> dg.AssetKey:
    """`train@pan` -> ["train", "pan"]: Dagster keys cannot contain '@'."""
    return dg.AssetKey(stage_name.split("@"))


def _metrics_metadata(stage: Stage, root: Path) -> dict:
    """Read (never recompute) the stage's metrics files into asset metadata."""
    metadata = {}
    for path in stage.metrics:
        file = root / path
        if file.suffix == ".json" and file.is_file():
            data = json.loads(file.read_text())
            metadata |= {k: v for k, v in data.items()
                         if isinstance(v, int | float | str | bool) and len(str(v)) < 200}
    return metadata | {"dvc_stage": stage.name, "outputs": ", ".join(stage.outs)}


def build_asset(stage: Stage) -> dg.AssetsDefinition:
    @dg.asset(
        key=asset_key(stage.name),
        deps=[asset_key(u) for u in sorted(stage.upstream)],
        group_name=stage.group,
        description=f"DVC stage `{stage.name}`: `{stage.cmd}`",
        kinds={"dvc"},
        pool="dvc_workspace",  # DVC locks the repo: stages of one workspace never overlap
    )
    def _stage(context: dg.AssetExecutionContext, dvc: DvcResource,
               mlflow: MlflowResource) -> dg.MaterializeResult:
        env = mlflow.env() | {"LIVERSEG_DAGSTER_RUN_ID": context.run.run_id}
        dvc.repro(stage.name, env, context.log)
        return dg.MaterializeResult(metadata=_metrics_metadata(stage, Path(dvc.repo_root)))

    return _stage


def build_assets(root: Path = REPO_ROOT) -> list[dg.AssetsDefinition]:
    return [build_asset(stage) for stage in load_stages(root).values()]
