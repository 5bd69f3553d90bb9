"""What `liverseg predict` was given: files, folders, NIfTI volumes and DICOM series as the
items to predict, each with a safe output name that mirrors the input's folders, and a
skipped or refused outcome row for everything else (DESIGN rule 9)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from liverseg.boundary import Limits, safe_name
from liverseg.dicom import series as dicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def outcome(path, status: str, reason: str = "", kind: str = "") -> dict:
    """One row of predictions.csv: the input, its kind, done/refused/skipped and why."""
    return {"input": str(path), "kind": kind, "status": status, "reason": reason}


@dataclass
class Item:
    """One input to predict, and the name (a relative path) its outputs get."""

    source: Path | dicom.Series
    name: str
    note: str = ""

    @property
    def label(self) -> str:
        if isinstance(self.source, dicom.Series):
            return str(self.source.files[0].parent)
        return str(self.source)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image_or_nifti(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or is_nifti(path)


def _file_stem(path: Path) -> str:
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def output_name(root: Path, item: Path | dicom.Series) -> str:
    """The outputs' relative name: the input's folders below the folder it was given in,
    then its stem (a series: `<its folder>_series-<SeriesNumber>`), every part safe."""
    path = item.files[0] if isinstance(item, dicom.Series) else item
    folders = list(path.parent.relative_to(root).parts) if root != path else []
    if isinstance(item, dicom.Series):
        folder = folders.pop() if folders else (root.name if root != path else path.parent.name)
        tag = f"series-{item.number}" if item.number is not None else f"uid-{item.uid}"
        stem = f"{safe_name(folder)}_{safe_name(tag)}"
    else:
        stem = safe_name(_file_stem(path))
    return "/".join([*map(safe_name, folders), stem])


def resolve_clashes(items: list[Item]) -> None:
    """Two inputs with one output name (compared ignoring case, as some file systems do)
    each get a short hash of their own identity appended, and a note saying so."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.name.lower(), []).append(item)
    for clashing in (g for g in groups.values() if len(g) > 1):
        for item in clashing:
            identity = (item.source.uid if isinstance(item.source, dicom.Series)
                        else str(item.source.resolve()))
            digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
            item.note = (f"output name {item.name!r} shared by {len(clashing)} inputs: "
                         f"suffixed -{digest}")
            item.name = f"{item.name}-{digest}"


def expand_inputs(inputs: list[str | Path], limits: Limits | None = None
                  ) -> tuple[list[Item], list[dict]]:
    """(the items to predict, a skipped or refused row for everything else): files as
    given, folders as their images, volumes and DICOM series (DICOM recognised by content,
    grouped by series, headers checked against `limits`)."""
    items, rows, dicom_files = [], [], []  # dicom_files: (root, file)
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file())
            images = [p for p in found if _is_image_or_nifti(p)]
            dcm = [p for p in found if not _is_image_or_nifti(p) and dicom.is_dicom(p)]
            if not images and not dcm:
                rows.append(outcome(given, "refused", "no PNG/JPG/NIfTI/DICOM files in this "
                                                    "folder (rule: a supported input)"))
            items += [Item(p, output_name(given, p)) for p in images]
            dicom_files += [(given, p) for p in dcm]
        elif given.is_file() and _is_image_or_nifti(given):
            items.append(Item(given, output_name(given, given)))
        elif given.is_file() and dicom.is_dicom(given):
            dicom_files.append((given, given))
        elif given.exists():
            rows.append(outcome(given, "refused", "unsupported input (rule: PNG, JPG, NIfTI or "
                                               "DICOM)"))
        else:
            rows.append(outcome(given, "refused", "no such file or folder"))
    if dicom_files:
        found = dicom.find_series([f for _, f in dicom_files], limits)
        root_of = {f: root for root, f in dicom_files}
        items += [Item(s, output_name(root_of[s.files[0]], s)) for s in found.series]
        rows += [outcome(f, "skipped", why, "dicom") for f, why in found.skipped]
        rows += [outcome(f, "refused", why, "dicom") for f, why in found.refused]
    resolve_clashes(items)
    return items, rows
