"""One module per DVC stage; each exposes `run(params, ...) -> summary dict`."""

from __future__ import annotations


def run_data_stages(params) -> None:
    """ingest -> validate -> split in-process, in the working directory: the data half of
    `dvc repro`, for tests and benchmarks that need a split dataset and no DVC."""
    from liverseg.stages import ingest, split, validate

    for stage in (ingest, validate, split):
        stage.run(params)
