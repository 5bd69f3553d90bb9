"""`archive`: a zip or tar of a `folder` source, extracted safely, then ingested as one
(every images/masks folder pair inside, found as `folder` finds them).

Extraction refuses, naming the member: absolute paths and `..` (zip-slip), links and
device files, and archives whose declared uncompressed size or member count is absurd.
Checked before a byte is written; the archive itself is only read.
"""

from __future__ import annotations

import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from liverseg.config import ArchiveParams, DataParams
from liverseg.data.layout import SliceWriter
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


def ingest_tree(root: Path, data: DataParams, writer: SliceWriter, origin: Path) -> dict:
    """Ingest every images/masks folder pair found under an extracted tree."""
    start = len(writer.rows)
    try:
        facts = folder.ingest_tree(root, data, writer)
    except SourceError as exc:  # name the archive, not the temporary folder
        raise SourceError(str(exc).replace(str(root), f"{origin}!")) from None
    # Name files as `<archive>!/<member>`: the extraction folder is gone after ingest.
    for row in writer.rows[start:]:
        for key in ("source_image", "source_mask", "ingest_detail"):
            row[key] = str(row.get(key) or "").replace(str(root), f"{origin}!")
    return facts | {"ignored": [p.replace(str(root), f"{origin}!") for p in facts["ignored"]]}


def ingest(data: DataParams, seed: int, writer: SliceWriter) -> dict:
    archive = Path(data.path).expanduser()
    with tempfile.TemporaryDirectory(prefix="liverseg-archive-") as tmp:
        extract(archive, Path(tmp), data.archive)
        return ingest_tree(Path(tmp), data, writer, archive)
