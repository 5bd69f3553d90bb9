"""`nifti`: CT volumes and label volumes, sliced as `liverseg.preprocess` slices them.

Volumes and label volumes are paired by case id anywhere under data.path, `.nii` and
`.nii.gz` alike. A file is a label volume when its folder is a label folder
(`segmentations/`, `labels/`, `labelsTr/`, `target/`, `masks/`, `seg/`, `gt/`, ..., any
case; or `data.nifti.labels_dir`) or its name starts with `segmentation-`, `seg-`,
`label`, `mask`...; anything else is an image. The case id is the name without those
prefixes and suffixes (`volume-`, nnU-Net's `_0000` channel, `_seg`, ...). Pairs are made
within one dataset root: the parent of a role folder (`imagesTr/`, `image/`, `volumes/`,
`ct/`, Kaggle LiTS's `volume_pt1/`, or any folder beside a label folder), else the file's
own folder. So LiTS (`volume-N` + `segmentation-N`, side by side or in sibling folders),
MSD / nnU-Net (`imagesTr/X[_0000]` + `labelsTr/X`) and Kaggle's LiTS copy
(`volume_pt3/volume-57.nii` + `segmentations/segmentation-57.nii`) all pair, and two
sub-datasets that both hold case `0` do not cross-pair.

Slices: the volume in closest canonical orientation (RAS+), slice k of the last axis,
transposed; intensities windowed in HU (`data.nifti.window`), exactly as `liverseg predict`
serves a volume. Every slice is stored (one case file per volume); `data.nifti.slices` and
`empty_fraction` choose the slices training samples (`sampled`), from the case's own seeded
stream. Labels: 0 background, 1 liver, 2 tumour. With `data.context_slices` k each
row also names its neighbours' slices (`CaseWriter.link_context`), as predict stacks them.

Nothing is dropped: a volume without a label volume, a label volume without a volume, a
case with two candidates on one side (`.nii` beside `.nii.gz`), a volume that cannot be
read, is not 3D, or whose label volume has another shape, each becomes one index row
naming the files (quarantined by validate). A tree where nothing pairs is refused, naming
the folders looked for.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverseg import imageio, preprocess
from liverseg import labels as label_schema
from liverseg.config import DataParams
from liverseg.data.layout import (
    CaseTask,
    CaseWriter,
    Plan,
    file_facts,
    problem_row,
    safe_stem,
    slice_id,
    unique,
)
from liverseg.data.sources.folder import SourceError

ORGAN_LABELS = {"organ": [1, 2], "tumour": [2]}
NII = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$", re.IGNORECASE)
LABEL_DIRS = ("segmentations", "segmentation", "labels", "label", "labelstr", "labelsts",
              "masks", "mask", "targets", "target", "seg", "segs", "gt")
IMAGE_DIRS = ("images", "image", "imagestr", "imagests", "volumes", "volume", "ct", "imgs",
              "img", "scans")
VOLUME_PART = re.compile(r"^volume_pt\d+$", re.IGNORECASE)  # Kaggle's LiTS copy
_SEP = r"(?:[-_.]|(?=\d)|$)"  # a role word ends at a separator, a digit or the name's end
LABEL_PREFIX = re.compile(rf"^(?:segmentation|seg|labels?|masks?|gt){_SEP}", re.IGNORECASE)
LABEL_SUFFIX = re.compile(r"[-_.](?:segmentation|seg|labels?|masks?|gt)$", re.IGNORECASE)
IMAGE_PREFIX = re.compile(rf"^(?:volume|vol|imaging|image|img|ct|scan){_SEP}", re.IGNORECASE)
IMAGE_SUFFIX = re.compile(r"[-_.](?:volume|vol|image|img|ct)$", re.IGNORECASE)
NNUNET_CHANNEL = re.compile(r"_0000$")  # nnU-Net's first (for CT the only) channel


@dataclass
class Case:
    """The files of one case id within one dataset root."""

    pid: str
    images: list[Path] = field(default_factory=list)
    labels: list[Path] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return len(self.images) == 1 and len(self.labels) == 1


def _is_label_dir(name: str, labels_dir: str | None) -> bool:
    return name.lower() in LABEL_DIRS or (labels_dir or "").lower() == name.lower()


def _is_image_dir(folder: Path, root: Path, labels_dir: str | None) -> bool:
    """A known image folder name, or any folder beside a label folder."""
    if folder.name.lower() in IMAGE_DIRS or VOLUME_PART.match(folder.name):
        return True
    return folder != root and any(d.is_dir() and _is_label_dir(d.name, labels_dir)
                                  for d in folder.parent.iterdir())


def role_of(path: Path, root: Path, labels_dir: str | None) -> tuple[str, Path]:
    """("image" | "label", dataset root) of one NIfTI file."""
    folder, stem = path.parent, NII.match(path.name)["stem"]
    if _is_label_dir(folder.name, labels_dir):
        return "label", folder.parent
    role = "label" if LABEL_PREFIX.match(stem) else "image"
    return role, folder.parent if _is_image_dir(folder, root, labels_dir) else folder


def case_ids(stem: str, role: str) -> tuple[str, str]:
    """(case id, fallback id): role prefixes/suffixes removed; an image's fallback also
    drops nnU-Net's `_0000`. Empty when the name is only a role word (KiTS' `imaging`)."""
    if role == "label":
        case = LABEL_SUFFIX.sub("", LABEL_PREFIX.sub("", stem, count=1))
        return case, case
    case = IMAGE_SUFFIX.sub("", IMAGE_PREFIX.sub("", stem, count=1))
    return case, NNUNET_CHANNEL.sub("", case)


def nifti_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and NII.match(p.name)
            and not p.name.startswith("._") and "__MACOSX" not in p.parts]  # macOS forks


def find_cases(root: Path, labels_dir: str | None = None) -> list[Case]:
    """Every case under `root`: its image and label volumes, paired by case id."""
    cases: dict[tuple[Path, str], Case] = {}
    images = []
    for path in nifti_files(root):
        role, base = role_of(path, root, labels_dir)
        full, fallback = case_ids(NII.match(path.name)["stem"], role)
        if role == "image":
            images.append((base, full, fallback, path))
        else:
            cases.setdefault((base, full.lower()), Case(full or base.name)).labels.append(path)
    labelled = set(cases)
    for base, full, fallback, path in images:
        key = full if (base, full.lower()) in labelled else fallback
        case = cases.setdefault((base, key.lower()), Case(key))
        case.pid = key or base.name  # the patient id as the image names it
        case.images.append(path)
    return sorted(cases.values(), key=lambda c: (c.images or c.labels)[0])


def pairing_problem(case: Case) -> str:
    """Why `case` is not a pair (for validate's "pairing complete" rule); "" if it is."""
    images, labels = (" and ".join(map(str, files)) for files in (case.images, case.labels))
    if case.paired:
        return ""
    if not case.labels:
        return f"pairing complete: {images}: no label volume for case {case.pid!r}"
    if not case.images:
        return f"pairing complete: {labels}: no image volume for case {case.pid!r}"
    return (f"pairing complete: ambiguous, case {case.pid!r} has volume(s) {images} and label "
            f"volume(s) {labels}; keep one of each (e.g. not .nii beside .nii.gz)")


def nothing_pairs_message(root: Path, cases: list[Case], labels_dir: str | None) -> str:
    files = [str(p) for c in cases for p in c.images + c.labels][:5]
    label_dirs = "/".join(LABEL_DIRS + ((labels_dir,) if labels_dir else ()))
    return (f"{root}: no volume pairs with a label volume. Label folders looked for: "
            f"{label_dirs} (any case; data.nifti.labels_dir names another); image folders: "
            f"{'/'.join(IMAGE_DIRS)}/volume_pt1..N or any folder beside a label folder; "
            "label names: segmentation-N, seg-N, label..., mask... beside volume-N. Unpaired: "
            + ", ".join(files))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the stored voxels, the affine)."""
    import nibabel as nib  # lazy: only this source needs it

    try:
        img = nib.load(path)
        return np.asanyarray(img.dataobj), img.affine
    except Exception as exc:  # nibabel raises many types for a bad file
        raise imageio.DecodeError(f"{path}: not a readable NIfTI volume: {exc}") from None


def select_slices(labels: np.ndarray, mode: str, empty_fraction: float,
                  rng: np.random.Generator) -> list[int]:
    """Indices into `labels` [Z, H, W] that training samples: all, or the slices containing
    the organ/tumour plus some of the rest."""
    n = len(labels)
    if mode == "all":
        return list(range(n))
    hit = np.isin(labels, ORGAN_LABELS[mode]).any(axis=(1, 2))
    others = np.flatnonzero(~hit)
    keep = rng.choice(others, size=round(empty_fraction * len(others)), replace=False)
    return sorted(set(np.flatnonzero(hit).tolist()) | set(keep.tolist()))


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """A case's own random stream: the same whichever worker, in whatever order, ingests it."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def _shape_problem(vol: Path, label: Path, image: np.ndarray, labels: np.ndarray) -> dict:
    """Facts of a pair that cannot be sliced, or {} when it can."""
    if image.ndim != 3:
        return {"image_decodable": False, "ingest_detail": (
            f"image decodable: {vol} has shape {image.shape}, not a volume (x, y, slices); "
            "a single slice is stored as X x Y x 1")}
    if image.shape != labels.shape:
        return {"paired": False, "ingest_detail": (
            f"image and mask sizes match: {vol} is {image.shape} but {label} is "
            f"{labels.shape}")}
    return {}


def _memory(vol: Path) -> int:
    """Bytes a worker holds for one volume, from its header: the stored voxels, a float
    canonical copy, the label volume and its copy, the grey slices and the stored labels
    collected and stacked (about 12 bytes a voxel)."""
    import nibabel as nib

    try:
        return int(np.prod(nib.load(vol).shape)) * 12
    except Exception:  # an unreadable header: ingest_case names it; no estimate needed
        return 0


def plan(data: DataParams, seed: int, workdir) -> Plan:
    """One case per paired volume; unpaired and ambiguous cases are rows naming the files."""
    root, cfg = Path(data.path).expanduser(), data.nifti
    if not root.is_dir():
        raise SourceError(f"{root}: data.path is not a folder (data.source=nifti)")
    cases = find_cases(root, cfg.labels_dir)
    if not cases:
        raise SourceError(f"{root}: empty source, no NIfTI volumes (*.nii, *.nii.gz) under it")
    if not any(c.paired for c in cases):
        raise SourceError(nothing_pairs_message(root, cases, cfg.labels_dir))
    out, taken = Plan(), set()
    for case in cases:
        vol = case.images[0] if case.images else None
        label = case.labels[0] if case.labels else None
        problem = pairing_problem(case)
        if problem:
            out.rows.append(problem_row(slice_id(case.pid, 0), case.pid, -1, "nifti",
                                        source_image=str(vol or ""), source_mask=str(label or ""),
                                        paired=False, ingest_detail=problem))
            continue
        case_id = unique(safe_stem(case.pid), taken)
        out.tasks.append(CaseTask(case_id, file_facts(vol, label), (case.pid, str(vol), str(label)),
                                  _memory(vol)))
    out.facts = {"pairs": len(out.tasks), "volumes": 0, "refused": 0,
                 "unpaired": sum(not (c.images and c.labels) for c in cases),
                 "ambiguous": sum(bool(c.images and c.labels) and not c.paired for c in cases)}
    return out


def ingest_case(task: CaseTask, data: DataParams, seed: int, writer: CaseWriter) -> dict:
    """Every slice of one volume (`sampled`: the ones training uses); facts: `volumes`, or
    `refused` when it is unreadable, not 3D, or its label volume has another shape."""
    cfg, (pid, vol, label) = data.nifti, task.spec
    vol, label = Path(vol), Path(label)
    first = slice_id(task.case_id, 0)
    try:
        (image, affine), (labels, _) = _load(vol), _load(label)
    except imageio.DecodeError as exc:
        writer.add(first, pid, -1, None, None, source_image=str(vol), source_mask=str(label),
                   image_decodable=False, ingest_detail=f"image decodable: {exc}")
        return {"refused": 1}
    refused = _shape_problem(vol, label, image, labels)
    if refused:
        writer.add(first, pid, -1, None, None, source_image=str(vol), source_mask=str(label),
                   **refused)
        return {"refused": 1}
    # The serving orientation (liverseg.preprocess): canonical axes, slice k of the last
    # one; the label volume's voxels follow the image's (same grid, by the shape check).
    ornt = preprocess.orientation(affine)
    image, labels = (preprocess.to_slices(preprocess.to_canonical(a, ornt))
                     for a in (image, labels))
    sampled = set(select_slices(labels, cfg.slices, cfg.empty_fraction,
                                case_rng(seed, task.case_id)))
    spacing = ",".join(f"{s:g}" for s in preprocess.slice_spacing(affine))
    for k in range(len(image)):  # slice by slice: a float copy of one slice at a time
        writer.add(slice_id(task.case_id, k), pid, k, preprocess.window(image[k], cfg.window),
                   label_schema.from_volume_labels(labels[k], data.target), sampled=k in sampled,
                   source_image=f"{vol}#{k}", source_mask=f"{label}#{k}", channels=1,
                   dtype=str(image.dtype), source_mask_values=imageio.compact_values(labels[k]),
                   spacing=spacing)
    if data.context_slices:
        writer.link_context(data.context_slices)
    return {"volumes": 1}
