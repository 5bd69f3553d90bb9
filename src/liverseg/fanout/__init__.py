"""The fan-out engine: every model trained in a workspace of its own (git worktrees), the
results exchanged through DVC's run-cache, then one `dvc repro` in the primary restores them.

`dvc_graph` reads dvc.yaml into stages (no DVC import); `engine` plans, prepares, runs and
finishes the workers; `devices` gives each worker its GPU; `errors` names what fails. No
Dagster here: pipeline/parallel.py is the Dagster job that drives it.
"""
