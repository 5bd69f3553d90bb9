"""The fan-out's errors, apart so that engine and devices both raise them."""

from __future__ import annotations

from pathlib import Path


class FanoutError(RuntimeError):
    """The fan-out cannot start or a command failed; the message says which and why."""


class WorkerFailed(FanoutError):
    """One model's worker failed; its log's tail goes into the Dagster step's metadata."""

    def __init__(self, model: str, message: str, log_file: Path, tail: str):
        super().__init__(f"{model}: {message} (full log: {log_file})")
        self.model, self.log_file, self.tail = model, log_file, tail
