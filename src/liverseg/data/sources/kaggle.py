"""`kaggle`: a Kaggle dataset (default `robintrmbtt/data-unet`, the paper's data).

Downloaded with the official client (kagglehub) into a cache keyed by slug and version.
A download lands in a staging folder and is renamed into place with a `.complete` marker
(listing every file and its size) only once extracted and verified, so an interrupted
download is never taken for a complete one. Missing credentials or network fail within
seconds with a message saying what to do. The tree is then ingested like a `folder`:
every images/masks folder pair found inside (the dataset's `Images/` + `Mask/` included).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from liverseg.config import DataParams, KaggleParams
from liverseg.data.layout import Plan
from liverseg.data.sources import archive, folder
from liverseg.data.sources.folder import SourceError

MARKER = ".complete"
HOST = "www.kaggle.com"
ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")  # not .nii.gz


class KaggleError(SourceError):
    """No credentials, no network, or a download that failed or does not verify."""


def has_credentials() -> bool:
    env = os.environ
    if (env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")) or env.get("KAGGLE_API_TOKEN"):
        return True
    home = Path(env.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (home / "kaggle.json").is_file() or (home / "access_token").is_file()


def check_reachable(timeout: float) -> None:
    try:
        socket.create_connection((HOST, 443), timeout=timeout).close()
    except OSError as exc:
        raise KaggleError(f"cannot reach {HOST}:443 within {timeout:.0f} s ({exc}); "
                          "kaggle needs the network (or use data.source=archive on a "
                          "downloaded copy)") from None


def handle(cfg: KaggleParams) -> str:
    return cfg.slug + (f"/versions/{cfg.version}" if cfg.version is not None else "")


def download(cfg: KaggleParams, dest: Path) -> None:
    """The network boundary (the only call tests fake): the dataset's files into `dest`."""
    if not has_credentials():
        raise KaggleError("no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY (or "
                          "KAGGLE_API_TOKEN), or put kaggle.json in ~/.kaggle")
    check_reachable(cfg.connect_timeout_s)
    import kagglehub

    try:
        kagglehub.dataset_download(handle(cfg), output_dir=str(dest), force_download=True)
    except Exception as exc:  # the client's errors are many; name the dataset in ours
        raise KaggleError(f"download of {handle(cfg)} failed: {exc}") from None


def _inventory(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MARKER}


def is_complete(cache: Path) -> bool:
    """The marker exists and every file it lists is there with its size."""
    marker = cache / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["files"] == _inventory(cache)
    except (ValueError, KeyError):
        return False


def fetch(cfg: KaggleParams, data: DataParams) -> Path:
    """The cached, verified, extracted dataset; downloaded when not complete."""
    cache = Path(cfg.cache_dir).expanduser() / cfg.slug / str(cfg.version or "latest")
    if is_complete(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache.parent))
    try:
        download(cfg, staging)
        # Kaggle serves zips; the client may or may not unpack them: unpack safely here.
        for zipped in [p for p in staging.rglob("*") if p.name.lower().endswith(ARCHIVES)]:
            archive.extract(zipped, zipped.parent, data.archive)
            zipped.unlink()
        files = _inventory(staging)
        if not files:
            raise KaggleError(f"download of {handle(cfg)} produced no files")
        (staging / MARKER).write_text(json.dumps({"handle": handle(cfg), "files": files}))
        if cache.exists():  # a partial or stale copy: never reused
            shutil.rmtree(cache)
        staging.rename(cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def plan(data: DataParams, seed: int, workdir) -> Plan:
    root = fetch(data.kaggle, data)
    # The cache stays: rows name its real files (an archive's are named `<archive>!/...`).
    out = folder.plan_tree(root, data)
    out.facts |= {"kaggle": handle(data.kaggle), "cache": str(root)}
    return out


ingest_case = folder.ingest_case
