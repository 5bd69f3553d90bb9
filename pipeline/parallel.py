"""`train_all_parallel`: every model at once, one step (and workspace) per model.

fan_out (primary) -> train_model[<model>] x N (workers, Dagster's executor) -> restore
(primary). The workspaces and DVC commands are liverseg/fanout/engine.py, the GPUs
liverseg/fanout/devices.py; Dagster only runs the steps: the multiprocess executor here, the
k8s/Docker executor in a deployment (docs/SCALING.md). `make repro-parallel WORKERS=N` runs
this job from the shell.
"""

# No `from __future__ import annotations`: Dagster inspects the `context` type hint at runtime.
import importlib
import os
import re
from pathlib import Path

import dagster as dg

from liverseg import runner
from liverseg.fanout import devices
from liverseg.fanout import engine as fanout
from liverseg.fanout.dvc_graph import load_stages
from liverseg.redact import redact
from pipeline.assets import POOL, asset_key
from pipeline.metadata import mlflow_run_url, stage_metadata
from pipeline.resources import REPO_ROOT, DvcResource, MlflowResource

# Workers claim a slot of this pool; fan_out sizes it (GPUs x LIVERSEG_TRAININGS_PER_GPU).
GPU_POOL = "gpu"
WORKERS_ENV = "LIVERSEG_WORKERS"  # the executor's max_concurrent (0: one per CPU core)
EXECUTOR_ENV = "LIVERSEG_EXECUTOR"  # multiprocess | k8s | docker


def _env(context, mlflow: MlflowResource, root: Path) -> dict[str, str]:
    env = fanout.base_env(root, mlflow.tracking_uri)
    return env | {"LIVERSEG_DAGSTER_RUN_ID": context.run.run_id}


def size_gpu_pool(instance: dg.DagsterInstance, n_models: int) -> int:
    """GPUs x LIVERSEG_TRAININGS_PER_GPU slots (the models' number on CPU). The executor
    reads pool limits when a run starts: `make repro-parallel` sizes the pool before it
    launches; fan_out sizes it again, for the next run launched from the UI."""
    slots = devices.gpu_slots(devices.gpu_ids(), n_models)
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)
    return slots


def _materializations(stages, done: dict[str, str], root: Path, mlflow: MlflowResource):
    """The asset catalogue records what this run produced (ran, or restored from the
    run-cache), with the metadata a stage asset shows."""
    for name, how in done.items():
        if name in stages and how != "unchanged":
            yield dg.AssetMaterialization(asset_key(name), metadata=stage_metadata(
                stages[name], root, mlflow.browser_url()) | {"dvc": how})


def _fail(exc: fanout.FanoutError) -> dg.Failure:
    text = redact(str(exc))  # a worker's log may quote the tracking URI's credentials
    meta = {"error": dg.MetadataValue.text(text[-4000:])}
    if isinstance(exc, fanout.WorkerFailed):
        meta |= {"log": dg.MetadataValue.text(redact(exc.tail)),
                 "log_file": dg.MetadataValue.path(str(exc.log_file))}
    return dg.Failure(description=text.splitlines()[0], metadata=meta)


@dg.op(pool=POOL, out=dg.DynamicOut(dict),
       description="Primary: run and push the shared stages, then one output per model.")
def fan_out(context: dg.OpExecutionContext, dvc: DvcResource, mlflow: MlflowResource):
    root = dvc.root
    env = _env(context, mlflow, root)
    stages = load_stages(root)
    try:
        fanout.check_remote(runner.dvc_config(root, dvc.executable, env), dvc.remote)
        the_plan = fanout.plan(stages, fanout.models(root))
        done = fanout.prepare(root, the_plan, dvc.executable, env, context.log.info)
        slots = size_gpu_pool(context.instance, len(the_plan.per_model))
    except fanout.FanoutError as exc:
        raise _fail(exc) from None
    context.log.info(f"pool {GPU_POOL}: {slots} slot(s); stages per model: "
                     f"{next(iter(the_plan.per_model.values()), ())}")
    yield from _materializations(stages, done, root, mlflow)
    for item in fanout.work_items(root, stages, the_plan):
        yield dg.DynamicOutput(item, mapping_key=re.sub(r"\W", "_", item["model"]))


@dg.op(pool=GPU_POOL, description="Worker: one model's stages in its own workspace.")
def train_model(context: dg.OpExecutionContext, item: dict, dvc: DvcResource,
                mlflow: MlflowResource) -> dg.Output:
    root, model = dvc.root, item["model"]
    device = devices.device_for(item["index"], devices.gpu_ids())
    context.log.info(f"{model}: CUDA_VISIBLE_DEVICES={device or '(none: CPU)'}")
    try:
        result = fanout.work(root, item, load_stages(root), dvc=dvc.executable,
                             env=_env(context, mlflow, root), device=device,
                             log=context.log.info)
    except fanout.FanoutError as exc:
        raise _fail(exc) from None
    meta = {"model": model, "device": result["device"], "commit": result["commit"],
            "log_file": dg.MetadataValue.path(result["log_file"])}
    meta |= {f"dvc {name}": how for name, how in result["stages"].items()}
    url = mlflow_run_url(result["run"], mlflow.browser_url())
    if url:
        meta |= {"mlflow_run_id": result["run"]["run_id"], "mlflow_run": dg.MetadataValue.url(url)}
    return dg.Output(result, metadata=meta)


@dg.op(pool=POOL, description="Primary: `dvc repro --pull` restores every model stage from "
                              "the run-cache and runs the rest; one dvc.lock.")
def restore(context: dg.OpExecutionContext, results: list[dict], dvc: DvcResource,
            mlflow: MlflowResource):
    root = dvc.root
    try:
        done = fanout.finish(root, dvc.executable, _env(context, mlflow, root),
                             context.log.info)
    except fanout.FanoutError as exc:
        raise _fail(exc) from None
    fanned = {n for r in results for n in r["stages"]}
    retrained = sorted(n for n in fanned if done.get(n) == "ran")
    if retrained:  # a run-cache miss: the worker's files differed from the primary's
        context.log.warning(f"the primary reran {retrained} instead of restoring them")
    yield from _materializations(load_stages(root), done, root, mlflow)
    yield dg.Output(done, metadata={"restored": sum(v == "restored" for v in done.values()),
                                    "ran": sum(v == "ran" for v in done.values()),
                                    "retrained_in_primary": ", ".join(retrained) or "none"})


def _workers() -> int:
    raw = os.environ.get(WORKERS_ENV, "0") or "0"
    if not raw.isdigit():
        raise ValueError(f"{WORKERS_ENV}={raw!r}: expected a whole number (0: one per CPU)")
    return int(raw)


def executor(name: str | None = None) -> dg.ExecutorDefinition:
    """LIVERSEG_EXECUTOR: `multiprocess` (default: one machine), `k8s` (a pod per step) or
    `docker` (a container per step); the last two need dagster-k8s / dagster-docker in the
    deployment image, not in this repository."""
    name = name or os.environ.get(EXECUTOR_ENV) or "multiprocess"
    if name == "multiprocess":
        return dg.multiprocess_executor
    modules = {"k8s": ("dagster_k8s", "k8s_job_executor"),
               "docker": ("dagster_docker", "docker_executor")}
    if name not in modules:
        raise ValueError(f"{EXECUTOR_ENV}={name!r}: expected multiprocess, k8s or docker")
    module, attr = modules[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise ValueError(f"{EXECUTOR_ENV}={name}: install {module.replace('_', '-')} in the "
                         "deployment image") from None


def _run_config() -> dict:
    config: dict = {"max_concurrent": _workers()}
    if executor().name == "multiprocess":  # steps fork from a process that loaded the code
        config["start_method"] = {"forkserver": {"preload_modules": ["pipeline.definitions"]}}
    return {"execution": {"config": config}}


@dg.job(executor_def=executor(), config=_run_config(),
        tags={"liverseg/fan_out": "true"},
        description="Every model trained at once, each in a workspace of its own; the "
                    "primary's `dvc repro` then restores them from DVC's run-cache.")
def train_all_parallel():
    restore(fan_out().map(train_model).collect())


if __name__ == "__main__":  # `make repro-parallel`: size the gpu pool before the run starts
    root = Path(os.environ.get("LIVERSEG_REPO_ROOT") or REPO_ROOT)
    slots = size_gpu_pool(dg.DagsterInstance.get(), len(fanout.models(root)))
    print(f"Dagster pool {GPU_POOL}: {slots} slot(s)")
