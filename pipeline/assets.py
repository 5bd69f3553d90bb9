"""One asset per DVC stage (matrix items included); materialising it runs that stage."""

# No `from __future__ import annotations`: Dagster inspects the `context` type hint at runtime.
from pathlib import Path

import dagster as dg

from liverseg.fanout.dvc_graph import Stage, load_stages
from liverseg.stages.register import TRIGGER_ENV
from pipeline.metadata import stage_metadata
from pipeline.resources import REPO_ROOT, DvcResource, MlflowResource

# Every stage asset claims a slot of this pool; $DAGSTER_HOME/dagster.yaml gives each pool one
# slot, so stages of one workspace never overlap, within a run or across runs (DVC's repo lock).
POOL = "dvc_workspace"


# One group: the UI then draws every stage of the one DAG (several groups start collapsed).
GROUP = "liverseg"


def asset_key(stage_name: str) -> dg.AssetKey:
    """`train@pan` -> `train_pan`: keys cannot contain '@', and the graph labels a node with
    the last part of its key only, so a nested `train/pan` would read just `pan`."""
    return dg.AssetKey(stage_name.replace("@", "_"))


def trigger(tags: dict) -> str:
    """What started the run (a sensor's tags, the schedule, or a person), for register to
    record with the version."""
    if tags.get("liverseg/trigger"):
        evidence = tags.get("liverseg/evidence")
        return tags["liverseg/trigger"] + (f": {evidence}" if evidence else "")
    if tags.get("dagster/schedule_name"):
        return f"schedule {tags['dagster/schedule_name']}"
    return "manual"


def build_asset(stage: Stage) -> dg.AssetsDefinition:
    @dg.asset(
        key=asset_key(stage.name),
        deps=[asset_key(u) for u in sorted(stage.upstream)],
        group_name=GROUP,
        tags={"stage": stage.group},
        description=f"DVC stage `{stage.name}`: `{stage.cmd}`",
        kinds={"dvc"},
        pool=POOL,
    )
    def _stage(context: dg.AssetExecutionContext, dvc: DvcResource,
               mlflow: MlflowResource) -> dg.MaterializeResult:
        env = mlflow.env() | {"LIVERSEG_DAGSTER_RUN_ID": context.run.run_id,
                              TRIGGER_ENV: trigger(context.run.tags)}
        dvc.repro(stage.name, env, context.log)
        # Read back what the stage wrote (and dvc.lock recorded); nothing is recomputed.
        return dg.MaterializeResult(
            metadata=stage_metadata(stage, Path(dvc.repo_root), mlflow.browser_url()))

    return _stage


def build_assets(root: Path = REPO_ROOT) -> list[dg.AssetsDefinition]:
    stages = load_stages(root)
    keys = {asset_key(name) for name in stages}
    if len(keys) != len(stages):  # `train@x` and a stage named `train_x` would collide
        raise ValueError(f"dvc.yaml: stage names collide as Dagster asset keys: {sorted(stages)}")
    return [build_asset(stage) for stage in stages.values()]
