"""What the data source holds now, listed cheaply. One owner for two readers: the `source`
stage, whose output `data/source.json` is ingest's dependency (a DVC stage that runs on
every `dvc repro`, `always_changed`, and whose output changes only when the source does,
so ingest reruns only then), and the Dagster data sensor's fingerprint.

- folder, archive, nifti: every file under data.path (or the archive file), with its size
  and SHA-256. A digest is computed once per file and kept in `.liverseg/listing-sha256.json` by
  (path, size, mtime, inode), as DVC's own state database does: a listing costs one stat
  per file, and reads only files that are new or changed (or, in a fresh clone, all once).
- dicom from a DICOMweb archive (`data.dicom.url`): the archive is mirrored first
  (`liverseg.dicom.web.mirror`: new instances fetched, gone ones removed) into
  .liverseg/dicomweb/<study>/<series>/<sop>.dcm, then listed as a folder: the listing
  names every study, series and instance UID (in the paths) and each instance's SHA-256,
  so a data version says exactly which archive objects it holds.
- phantom: nothing on disk; the params say everything (they are the stage's params).
- kaggle: the dataset's handle; pin `data.kaggle.version` for a data version that cannot
  move under you (the newest version is only known by downloading it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from liverseg.artifacts import DICOMWEB_MIRROR, Artifacts
from liverseg.config import PATH_SOURCES, Params
from liverseg.io import atomic_path, sha256_file

DIGEST_CACHE = "listing-sha256.json"  # in the ingest store's parent, .liverseg/


def _walk(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        out += [Path(dirpath) / name for name in sorted(filenames)]
    return out


def file_listing(path: Path, cache: dict) -> list[list]:
    """[relative name, size, sha256] of every file under `path` (or of `path` itself). `cache`
    maps "path|size|mtime_ns|inode" to a known digest; afterwards it holds this listing's
    files only."""
    rows, seen = [], {}
    for full in _walk(path):
        st = full.stat()
        key = f"{full}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        seen[key] = cache.get(key) or sha256_file(full)
        name = full.name if full == path else full.relative_to(path).as_posix()
        rows.append([name, st.st_size, seen[key]])
    cache.clear()
    cache.update(seen)
    return rows


def source_path(params: Params, root: str | Path = ".") -> Path | None:
    """The file or folder a path source reads: data.path, or the DICOMweb mirror."""
    data, root = params.data, Path(root)
    if data.source == "dicom" and data.dicom.url:
        return (root / DICOMWEB_MIRROR).resolve()
    if data.source in PATH_SOURCES and data.path:
        return (root / Path(data.path).expanduser()).resolve()
    return None


def list_source(params: Params, root: str | Path = ".", fetch: bool = True) -> dict:
    """The source's listing: its kind, and its files (path sources) or handle (Kaggle).
    A DICOMweb archive is mirrored first; with `fetch` False (the Dagster sensor, which
    must not move files under a running ingest) it is only queried: its instances' UIDs."""
    data, root = params.data, Path(root)
    listing: dict = {"source": data.source}
    if data.source == "kaggle":
        listing["kaggle"] = {"slug": data.kaggle.slug, "version": data.kaggle.version}
    if data.source == "dicom" and data.dicom.url:
        from liverseg.dicom.web import archive_instances, mirror
        from liverseg.redact import redact

        cfg = data.dicom
        listing["archive"] = {"url": redact(cfg.url), "study_date": cfg.study_date,
                              "study_description": cfg.study_description}
        if not fetch:
            return listing | {"instances": sorted(archive_instances(
                cfg.url, cfg.study_date, cfg.study_description))}
        mirror(cfg.url, root / DICOMWEB_MIRROR, cfg.study_date, cfg.study_description)
    path = source_path(params, root)
    if path is not None:
        if not path.exists():
            listing["files"] = f"missing: {path}"
            return listing
        cache_path = Artifacts(root).ingest_store.parent / DIGEST_CACHE
        known = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        cache = dict(known)
        listing["files"] = file_listing(path, cache)
        if cache != known:
            with atomic_path(cache_path) as tmp:
                tmp.write_text(json.dumps(cache))
    return listing


def fingerprint(params: Params, root: str | Path = ".") -> str:
    """What ingest reads, hashed: `seed`, the `data` params and the source's listing (for a
    DICOMweb archive its instance UIDs, queried, not fetched)."""
    state = {"seed": params.seed, "data": params.data.model_dump(mode="json"),
             "listing": list_source(params, root, fetch=False)}
    blob = json.dumps(state, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
