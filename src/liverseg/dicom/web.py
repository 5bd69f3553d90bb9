"""A DICOMweb archive: find CT series (QIDO-RS), fetch them (WADO-RS), store a SEG back into
its study (STOW-RS), with `dicomweb-client` (from the authors of highdicom). The PACS batch
(`liverseg.serving.dicomweb`) and the `dicom` data source both use it.

Credentials never on a command line: `LIVERSEG_DICOMWEB_USER` and
`LIVERSEG_DICOMWEB_PASSWORD`, else a netrc entry for the host (requests reads ~/.netrc);
they are redacted from every message (`liverseg.redact`). TLS certificates are verified
(requests' default; `REQUESTS_CA_BUNDLE` names a hospital's CA). A series is fetched within
the boundary's limits (`Limits.max_slices`, and each instance's Rows x Columns) before the
predict path sees it. A series that already holds a SEG from the same model (its
SeriesDescription, which `dicom.write_seg` writes as `liverseg <model> <version>`) is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from liverseg.boundary import Limits, Refused, safe_name
from liverseg.dicom.seg_writer import seg_description
from liverseg.io import atomic_path
from liverseg.redact import redact

USER_ENV, PASSWORD_ENV = "LIVERSEG_DICOMWEB_USER", "LIVERSEG_DICOMWEB_PASSWORD"
TIMEOUT_S = 20.0
# DICOM JSON tags (PS3.18 F.2)
STUDY_UID, SERIES_UID, MODALITY, SERIES_NUMBER = "0020000D", "0020000E", "00080060", "00200011"
SERIES_DESCRIPTION, STUDY_DATE = "0008103E", "00080020"


class ArchiveUnavailable(RuntimeError):
    """The archive did not answer; the message names its URL (credentials masked)."""


@dataclass(frozen=True)
class RemoteSeries:
    study_uid: str
    uid: str
    modality: str
    number: str | None
    description: str


def _value(item: dict, tag: str, default=None):
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


def connect(url: str, timeout: float = TIMEOUT_S):
    """A DICOMweb client for `url`, authenticated from the environment or netrc."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if os.environ.get(USER_ENV):
        session.auth = (os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
    client = DICOMwebClient(url=url, session=session, timeout=timeout)
    # Its default retries a refused connection five times over 31 s: a down archive must
    # fail in seconds (a busy one, 429/503, still gets two more tries).
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    return client


def _call(url: str, what: str, fn, *args, **kwargs):
    """Run one DICOMweb request; a connection failure names the archive, never a secret."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.ConnectionError as exc:
        raise ArchiveUnavailable(redact(f"DICOMweb archive {url} is unreachable ({what}): "
                                        f"{type(exc).__name__}")) from None
    except requests.exceptions.RequestException as exc:
        raise ArchiveUnavailable(redact(f"DICOMweb archive {url} refused {what}: {exc}")) from None


PAGE = 500


def _search(url: str, what: str, fn, key: str, **kwargs) -> list[dict]:
    """Every result of a QIDO-RS search, a page at a time; stops at an empty page or one
    with nothing new (some archives ignore `offset`, so get_remaining would never end)."""
    results, seen = [], set()
    while True:
        page = _call(url, what, fn, limit=PAGE, offset=len(results), **kwargs)
        new = [r for r in page if _value(r, key) not in seen]
        if not new:
            return results
        results += new
        seen |= {_value(r, key) for r in new}
        if len(page) < PAGE:
            return results


def ct_studies(client, url: str, since: str | None = None) -> list[str]:
    """StudyInstanceUIDs of the studies holding CT (from `since`, YYYYMMDD, when given)."""
    filters = {"ModalitiesInStudy": "CT"} | ({"StudyDate": f"{since}-"} if since else {})
    found = _search(url, "a study search (QIDO-RS)", client.search_for_studies, STUDY_UID,
                    search_filters=filters)
    return sorted({_value(s, STUDY_UID) for s in found if _value(s, STUDY_UID)})


def series_of(client, url: str, study_uid: str) -> list[RemoteSeries]:
    found = _search(url, f"a series search in study {study_uid} (QIDO-RS)",
                    client.search_for_series, SERIES_UID, study_instance_uid=study_uid)
    out = []
    for s in found:
        number = _value(s, SERIES_NUMBER)
        out.append(RemoteSeries(study_uid, _value(s, SERIES_UID), _value(s, MODALITY, ""),
                                None if number is None else str(number),
                                _value(s, SERIES_DESCRIPTION, "")))
    return out


def segmented(client, url: str, series: list[RemoteSeries], description: str) -> set[str]:
    """The series of a study that already hold a SEG written by this model version (its
    SeriesDescription), read from each such SEG's ReferencedSeriesSequence."""
    done = set()
    for seg in (s for s in series if s.modality == "SEG" and s.description == description):
        metadata = _call(url, f"SEG {seg.uid} metadata (WADO-RS)",
                         client.retrieve_series_metadata, study_instance_uid=seg.study_uid,
                         series_instance_uid=seg.uid)
        for instance in metadata:
            for ref in instance.get("00081115", {}).get("Value", []):
                done.add(_value(ref, SERIES_UID))
    return done


def fetch(client, url: str, series: RemoteSeries, folder: Path, limits: Limits) -> list[Path]:
    """The series' instances into `folder` (one file each), streamed and bounded: more
    instances than `max_slices` or an instance over `max_side` stops the download."""
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    try:
        for i, ds in enumerate(client.iter_series(study_instance_uid=series.study_uid,
                                                  series_instance_uid=series.uid)):
            if i >= limits.max_slices:
                raise Refused(f"series {series.uid}: more than {limits.max_slices} instances, "
                              "above the limit max_slices (raise it with "
                              f"{Limits.env_name('max_slices')})")
            side = max(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
            if side > limits.max_side:
                raise Refused(f"series {series.uid}: {side} pixels per side, above the limit "
                              f"max_side={limits.max_side}")
            path = folder / f"{i:05d}_{safe_name(ds.get('SOPInstanceUID', i))}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    except requests.exceptions.RequestException as exc:
        raise ArchiveUnavailable(redact(f"DICOMweb archive {url}: fetching series {series.uid} "
                                        f"(WADO-RS) failed: {type(exc).__name__}")) from None
    return files


def store(client, url: str, seg_path: Path) -> str:
    """STOW-RS the SEG into its study; returns its SOPInstanceUID."""
    import pydicom

    seg = pydicom.dcmread(seg_path)
    _call(url, "storing the SEG (STOW-RS)", client.store_instances, [seg],
          study_instance_uid=seg.StudyInstanceUID)
    return str(seg.SOPInstanceUID)


# ----------------------------------------------------------------------------- a mirror

MIRRORED = ("CT", "SEG", "RTSTRUCT")  # what the dicom source trains from
SOP_UID = "00080018"


def _ct_studies(client, url: str, study_date: str | None, study_description: str | None
                ) -> list[str]:
    """The dicom source's studies: CT, filtered by StudyDate and StudyDescription."""
    filters = {"ModalitiesInStudy": "CT"} | (
        {"StudyDate": study_date} if study_date else {}) | (
        {"StudyDescription": study_description} if study_description else {})
    found = _search(url, "a study search (QIDO-RS)", client.search_for_studies, STUDY_UID,
                    search_filters=filters)
    return sorted({_value(s, STUDY_UID) for s in found if _value(s, STUDY_UID)})


def archive_label_series(url: str, study_date: str | None = None,
                         study_description: str | None = None, client=None) -> dict[str, str]:
    """The SEG and RTSTRUCT series of the dicom source's studies that liverseg did not write
    (its SEGs' SeriesDescription starts "liverseg "): series UID -> study UID. Queried only
    (QIDO-RS): what the data sensor counts as labels that arrived."""
    client = client or connect(url)
    return {series.uid: study for study in _ct_studies(client, url, study_date,
                                                       study_description)
            for series in series_of(client, url, study)
            if series.modality in ("SEG", "RTSTRUCT")
            and not (series.description or "").startswith(seg_description("") + " ")}


def archive_instances(url: str, study_date: str | None = None,
                      study_description: str | None = None, limits: Limits | None = None,
                      client=None) -> dict[str, tuple[str, str, str]]:
    """What the archive holds for the dicom source, queried only (QIDO-RS, nothing
    fetched): `<study>/<series>/<sop>.dcm` (sanitised UIDs) -> (study, series, SOP
    instance UID) of every instance of the CT, SEG and RTSTRUCT series of its CT studies
    (filtered by StudyDate and StudyDescription, QIDO-RS matching)."""
    limits, client = limits or Limits(), client or connect(url)
    out = {}
    for study in _ct_studies(client, url, study_date, study_description):
        for series in series_of(client, url, study):
            if series.modality not in MIRRORED:
                continue
            instances = _search(url, f"an instance search in series {series.uid} (QIDO-RS)",
                                client.search_for_instances, SOP_UID,
                                study_instance_uid=study, series_instance_uid=series.uid)
            if len(instances) > limits.max_slices:
                raise Refused(f"series {series.uid}: {len(instances)} instances, above the "
                              f"limit max_slices (raise it with "
                              f"{Limits.env_name('max_slices')})")
            for sop in sorted(_value(i, SOP_UID) for i in instances):
                name = f"{safe_name(study)}/{safe_name(series.uid)}/{safe_name(sop)}.dcm"
                out[name] = (study, series.uid, sop)
    return out


def mirror(url: str, folder: Path, study_date: str | None = None,
           study_description: str | None = None, limits: Limits | None = None) -> dict:
    """The archive's instances (`archive_instances`) as one file each under `folder`. An
    instance already there is not fetched again (a SOP instance's content never changes
    under its UID); every other file (an instance the archive no longer holds, a temporary
    file a killed fetch left) is removed, so the folder is what the archive holds now.
    Returns counts of what it fetched, kept and removed."""
    folder = Path(folder)
    client = connect(url)
    folder.mkdir(parents=True, exist_ok=True)  # an archive with nothing matching: empty
    wanted = archive_instances(url, study_date, study_description, limits, client)
    fetched = 0
    for name, (study, series, sop) in wanted.items():
        path = folder / name
        if not path.is_file():
            _fetch_instance(client, url, study, series, sop, path)
            fetched += 1
    removed = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.relative_to(folder).as_posix() not in wanted:
            path.unlink()
            removed += 1
    for where in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        if not any(where.iterdir()):  # a deleted series' or study's folder
            where.rmdir()
    return {"instances": len(wanted), "fetched": fetched, "removed": removed}


def _fetch_instance(client, url: str, study: str, series: str, sop: str, path: Path) -> None:
    """One instance (WADO-RS), written atomically."""
    ds = _call(url, f"instance {sop} (WADO-RS)", client.retrieve_instance,
               study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
