"""One module per DVC stage; each exposes `run(params, ...) -> summary dict`."""

from __future__ import annotations


def run_data_stages(params) -> None:
    """source -> ingest -> validate -> split in-process, in the working directory: the data
    half of `dvc repro`, for tests and benchmarks that need a split dataset and no DVC."""
    from liverseg.stages import ingest, source, split, validate

    for stage in (source, ingest, validate, split):
        stage.run(params)
