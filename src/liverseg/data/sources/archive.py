"""`archive`: a zip or tar of a `folder` source, extracted safely, then ingested as one
(every images/masks folder pair inside, found as `folder` finds them).

Extraction refuses, naming the member: absolute paths and `..` (zip-slip), links and
device files, and archives whose declared uncompressed size or member count is absurd.
Checked before a byte is written; the archive itself is only read.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from liverseg.config import ArchiveParams, DataParams
from liverseg.data.layout import CaseTask, CaseWriter, Plan, file_facts
from liverseg.data.sources import folder
from liverseg.data.sources.folder import SourceError


class UnsafeArchiveError(SourceError):
    """The archive tries to escape the target, holds links, or is absurdly large."""


def _check_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refused")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the target (zip-slip); "
                                 "refused")


def _check_totals(archive: Path, sizes: list[int], cfg: ArchiveParams) -> None:
    if len(sizes) > cfg.max_members:
        raise UnsafeArchiveError(f"{archive}: {len(sizes)} members, above "
                                 f"data.archive.max_members={cfg.max_members}; refused")
    total_mb = sum(sizes) / 2**20
    if total_mb > cfg.max_total_mb:
        raise UnsafeArchiveError(f"{archive}: {total_mb:.0f} MB uncompressed, above "
                                 f"data.archive.max_total_mb={cfg.max_total_mb}; refused")


def _extract_zip(archive: Path, target: Path, cfg: ArchiveParams) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            _check_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic "
                                         "link; refused")
        _check_totals(archive, [i.file_size for i in members], cfg)
        zf.extractall(target)  # names checked above; zipfile never creates links


def _extract_tar(archive: Path, target: Path, cfg: ArchiveParams) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for info in members:
            _check_name(archive, info.name)
            if not (info.isfile() or info.isdir()):
                kind = "link" if info.issym() or info.islnk() else "special file"
                raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a {kind}; refused")
        _check_totals(archive, [i.size for i in members], cfg)
        tf.extractall(target, members=members, filter="data")  # the stdlib's own guard too


def extract(archive: Path, target: Path, cfg: ArchiveParams) -> Path:
    """Extract `archive` into `target` after checking every member."""
    if not archive.is_file():
        raise SourceError(f"{archive}: archive not found (data.path)")
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target, cfg)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target, cfg)
    else:
        raise SourceError(f"{archive}: neither a zip nor a tar archive")
    return target


def _renamed(text: str, root: Path, archive: Path) -> str:
    """Name files as `<archive>!/<member>`: the extraction folder is gone after ingest."""
    return str(text or "").replace(str(root), f"{archive}!")


def plan(data: DataParams, seed: int, workdir: Path) -> Plan:
    """Extract into the stage's work folder, then plan the tree as `folder` does. A case's
    fingerprint is the archive's own (size, mtime) and its members' names and sizes:
    extracted files have fresh mtimes."""
    archive = Path(data.path).expanduser()
    root = extract(archive, Path(workdir) / "archive", data.archive)
    try:
        out = folder.plan_tree(root, data)
    except SourceError as exc:  # name the archive, not the temporary folder
        raise SourceError(_renamed(str(exc), root, archive)) from None
    whole = file_facts(archive)
    out.tasks = [CaseTask(t.case_id, whole + tuple((_renamed(name, root, archive), size, 0)
                                                   for name, size, _ in t.files),
                          (str(root), str(archive), t.spec)) for t in out.tasks]
    for row in out.rows:
        for key in ("source_image", "source_mask", "ingest_detail"):
            row[key] = _renamed(row.get(key), root, archive)
    out.facts["ignored"] = [_renamed(p, root, archive) for p in out.facts["ignored"]]
    return out


def ingest_case(task: CaseTask, data: DataParams, seed: int, writer: CaseWriter) -> dict:
    root, archive, items = task.spec
    facts = folder.ingest_case(CaseTask(task.case_id, (), items), data, seed, writer)
    for row in writer.rows:
        for key in ("source_image", "source_mask", "ingest_detail"):
            row[key] = _renamed(row.get(key), Path(root), Path(archive))
    return facts
