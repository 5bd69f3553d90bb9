"""The served-case store: one monitoring row per served case, appended by any number of
processes, read back as one table.

Layout: ``<directory>/day=YYYY-MM-DD/<host>-<pid>-<token>.jsonl`` -- JSON Lines, one file per
writing process per UTC day. Why this format:
- **Concurrent writers need no lock.** Each process (a `liverseg predict`, a Dagster run, each
  `mlflow models serve` worker) writes only its own file, so rows from different processes
  never meet; the token (random per process, renewed after a fork) keeps two hosts or two
  containers with the same name and pid apart.
- **A row is one `write()`** of one complete line on a descriptor opened with O_APPEND: a
  killed process leaves whole rows (a write to a regular file is not split by a signal), and
  the reader drops a line that does not parse (only a power loss mid-write can leave one, as
  the last line of a file no later process appends to), so no torn row is ever read. Rows
  are not fsynced one by one: a power loss may lose the last rows, never corrupt earlier
  ones.
- **Appending costs the same on the millionth row as on the first.** Parquet would have to
  rewrite a day's file per row (or buffer rows a crash loses); SQLite serialises writers on a
  lock and is unsafe on network file systems, which a shared monitoring folder often is.
- Days are folders, so a window of the last days reads only those days' files; a file is
  small (a row is about 1 kB), readable with `jq` or `pandas.read_json(lines=True)`.

No patient identity is written: rows come from `facts.served_row`, which keeps only hashed
study/series UIDs; `append` refuses a row carrying a raw UID or patient column.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

STORE_ENV = "LIVERSEG_MONITORING_DIR"
FORBIDDEN = ("PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id",
             "patient_birth_date", "study_uid", "series_uid", "StudyInstanceUID",
             "SeriesInstanceUID", "SOPInstanceUID")
_DAY = re.compile(r"day=(\d{4}-\d{2}-\d{2})")
_token: dict[int, str] = {}


def _process_token() -> str:
    pid = os.getpid()
    if pid not in _token:  # a forked child gets a token (and so a file) of its own
        _token.clear()
        _token[pid] = uuid.uuid4().hex[:8]
    return _token[pid]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN/inf -> None (JSON has neither)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ServedCaseStore:
    """Append monitoring rows to, and read them from, a folder (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _file(self, day: str) -> Path:
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40].lstrip(".") or "host"
        return self.directory / f"day={day}" / f"{host}-{os.getpid()}-{_process_token()}.jsonl"

    def append(self, row: dict) -> Path:
        """Write one row (a JSON object on one line) to this process's file of the row's day
        (its `time`, else today, UTC); returns the file."""
        bad = [k for k in FORBIDDEN if k in row]
        if bad:
            raise ValueError(f"a monitoring row never holds {bad}: use facts.served_row, "
                             "which keeps only hashed UIDs")
        day = str(row.get("time") or datetime.now(UTC).isoformat())[:10]
        date.fromisoformat(day)  # a malformed time never makes a folder name
        path = self._file(day)
        line = (json.dumps({k: _plain(v) for k, v in row.items()}, allow_nan=False,
                           separators=(",", ":"), default=str) + "\n").encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk: never leave half a row
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        finally:
            os.close(fd)
        return path

    def days(self) -> list[str]:
        """The days that have rows, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_DAY.fullmatch(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(m.group(1) for m in found if m)

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        rows = []
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    # a torn line: only the last line of a file whose process died in a power
                    # loss mid-write (a later process writes a file of its own)
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def read(self, since: str | None = None, last: int | None = None) -> pd.DataFrame:
        """Every row, oldest first; `since` (YYYY-MM-DD, UTC) keeps the days from then on,
        `last` the newest N rows (reading only as many days as it takes)."""
        days = self.days()
        if since:
            days = [d for d in days if d >= str(since)[:10]]
        rows: list[dict] = []
        for day in reversed(days):
            for path in sorted((self.directory / f"day={day}").glob("*.jsonl")):
                rows.extend(self._rows(path))
            if last is not None and len(rows) >= last:
                break
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        if "time" in frame:
            frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
        return frame.tail(last).reset_index(drop=True) if last is not None else frame


def default_store() -> ServedCaseStore | None:
    """The store `LIVERSEG_MONITORING_DIR` names; None (monitoring off) when it is unset."""
    directory = os.environ.get(STORE_ENV, "").strip()
    return ServedCaseStore(directory) if directory else None
