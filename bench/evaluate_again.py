"""Evaluate's cost at several commits on the same trained models, run on demand:

    python bench/evaluate_again.py --commits 04801b8 e11909f d0d7103 \
        --workdirs bench/.work/scale-flat3-n8-w1 bench/.work/scale-flat3-n32-w1

In each work directory that `bench/scale.py` left (a clone with its data, its trained model
and its dvc.lock), for each commit in turn: the clone's `src/` is checked out at that
commit and `dvc repro --force --single-item evaluate@enhanced_pan` runs, timed and sampled
as scale.py times a stage (wall seconds; peak anonymous memory of DVC and the stage). The
model, the validation cases and the machine stay the same, so the rows compare the code
alone. The work directories are left at the last commit's `src/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import scale

from liverseg import runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", nargs="+", required=True)
    parser.add_argument("--workdirs", nargs="+", type=Path, required=True)
    parser.add_argument("--stage", default=f"evaluate@{scale.MODEL}")
    args = parser.parse_args()
    print("commit    workdir                          seconds   peak MiB")
    for commit in args.commits:
        sha = runner.git_checked("rev-parse", commit, cwd=scale.REPO).strip()
        for workdir in args.workdirs:
            workdir = workdir.resolve()
            runner.git_checked("fetch", "-q", str(scale.REPO), sha, cwd=workdir)
            runner.git_checked("checkout", "-q", sha, "--", "src", cwd=workdir)
            got = scale.run_stage(workdir, args.stage, scale.stage_env(workdir), force=True)
            print(f"{commit:<9} {workdir.name:<32} {got['s']:>7} {got['mib']:>10}", flush=True)


if __name__ == "__main__":
    main()
