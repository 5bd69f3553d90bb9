"""`folder`: 2D slices in an images folder beside a masks folder, paired by file stem.

Folders are found anywhere under data.path (archive and kaggle use the same search), by
name, in any case: `data.folder.images` / `masks`, or by default the usual synonyms
(`Images/` + `Mask/`, `image/` + `label/`, `imgs/` + `gt/`, ...). Masks pair by stem, or
by stem plus a common suffix (`_mask`, `_seg`, ...) unless `data.folder.mask_suffix`
fixes one.

Every file is accounted for: a pair becomes a slice; an image without a mask, a mask
without an image, files that pair ambiguously, an undecodable file or a mask with values
that are not allowed becomes an index row whose facts say so (validate quarantines it,
naming the source files).

Cases: the slices of one patient id (`data.folder.patient_regex`) within one folder pair are
one case file; slices whose names carry no patient id share one case for their folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from liverseg import imageio
from liverseg.config import DataParams, FolderParams
from liverseg.data.layout import (
    CaseTask,
    CaseWriter,
    Plan,
    file_facts,
    problem_row,
    safe_stem,
    unique,
)

IMAGE_DIRS = ("images", "image", "imgs", "img", "ct", "frames")
MASK_DIRS = ("masks", "mask", "labels", "label", "seg", "segmentation", "segmentations",
             "gt", "target", "targets")
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "_seg", "-seg", "_segmentation", "_label",
                 "-label", "_labels", "_gt", "-gt")


class SourceError(ValueError):
    """The source as a whole is unusable (missing folder, nothing to ingest)."""


# ----------------------------------------------------------------------------- folders


def folder_names(explicit: str | None, synonyms: tuple[str, ...]) -> tuple[str, ...]:
    return (explicit.lower(),) if explicit else synonyms


def _looked_for(explicit: str | None, synonyms: tuple[str, ...]) -> str:
    return "/".join(folder_names(explicit, synonyms)) + ", any case"


def _children(folder: Path, names: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() in names)


def layout_at(folder: Path, cfg: FolderParams) -> tuple[Path, Path] | None:
    """(images folder, masks folder) directly inside `folder`, or None. Two candidates for
    one role is an error: picking one silently could train on the wrong masks."""
    images = _children(folder, folder_names(cfg.images, IMAGE_DIRS))
    masks = [p for p in _children(folder, folder_names(cfg.masks, MASK_DIRS))
             if p not in images]
    if not images or not masks:
        return None
    for found, key in ((images, "images"), (masks, "masks")):
        if len(found) > 1:
            names = " and ".join(f"{p.name}/" for p in found)
            raise SourceError(f"{folder}: two candidate {key[:-1]} folders, {names}; set "
                              f"data.folder.{key} to the one to use")
    return images[0], masks[0]


def find_layouts(root: Path, cfg: FolderParams) -> list[tuple[Path, Path]]:
    """Every (images, masks) folder pair under `root`, `root` itself included."""
    candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    found = [layout_at(d, cfg) for d in candidates if "__MACOSX" not in d.parts]
    return [pair for pair in found if pair]


def no_layout_message(where: Path, cfg: FolderParams) -> str:
    return (f"{where}: no images folder (looked for {_looked_for(cfg.images, IMAGE_DIRS)}) "
            f"beside a masks folder (looked for {_looked_for(cfg.masks, MASK_DIRS)}) under "
            "it; set data.folder.images / data.folder.masks")


# ----------------------------------------------------------------------------- pairing


def list_files(folder: Path, glob: str, extensions: list[str]
               ) -> tuple[dict[str, list[Path]], list[Path]]:
    """Files by stem (extension matched case-insensitively; `a.png` beside `a.jpg` share a
    stem) and the files ignored."""
    exts = {e.lower() for e in extensions}
    files: dict[str, list[Path]] = {}
    ignored = []
    for path in sorted(folder.glob(glob)):
        if path.is_file() and path.suffix.lower() in exts:
            files.setdefault(path.stem, []).append(path)
        elif path.is_file():
            ignored.append(path)
    return files, ignored


def image_stems_for(mask_stem: str, suffixes: tuple[str, ...]) -> list[str]:
    """Image stems `mask_stem` may belong to: itself minus each suffix (any case)."""
    return [mask_stem[:len(mask_stem) - len(s)] for s in suffixes
            if len(mask_stem) > len(s) and mask_stem.lower().endswith(s.lower())]


def pair_stems(images: dict, masks: dict, mask_suffix: str | None) -> list[tuple[str, list, list]]:
    """(stem, image files, mask files) per group of files that may pair with each other.

    A group with one image and one mask is a pair; anything else (one side missing, or
    more than one file on a side) is not, and its row names every file of the group.
    """
    suffixes = (mask_suffix,) if mask_suffix is not None else ("",) + MASK_SUFFIXES
    parent = {("i", s): ("i", s) for s in images} | {("m", s): ("m", s) for s in masks}

    def find(node):
        while parent[node] != node:
            node = parent[node]
        return node

    for mask in masks:  # union each mask with every image it may belong to
        for stem in image_stems_for(mask, suffixes):
            if stem in images:
                parent[find(("i", stem))] = find(("m", mask))
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(node)
    out = []
    for nodes in groups.values():
        stems = sorted(s for kind, s in nodes if kind == "i")
        mask_stems = sorted(s for kind, s in nodes if kind == "m")
        stem = stems[0] if stems else _strip_suffix(mask_stems[0], suffixes)
        out.append((stem, [p for s in stems for p in images[s]],
                    [p for s in mask_stems for p in masks[s]]))
    return sorted(out, key=lambda g: (not g[1], g[0]))  # images first, by stem


def _strip_suffix(stem: str, suffixes: tuple[str, ...]) -> str:
    """A lone mask's stem as its image's would be (longest matching suffix removed)."""
    bases = image_stems_for(stem, suffixes)
    return min(bases, key=len) if bases else stem


def _pairing_problem(stem: str, images: list[Path], masks: list[Path], folders: tuple,
                     suffix: str | None) -> str:
    """Why a group of files is not one pair (validate's "pairing complete" rule), or ""."""
    if len(images) == 1 and len(masks) == 1:
        return ""
    files = " and ".join(map(str, images + masks))
    if len(images) + len(masks) > 1:
        return (f"pairing complete: ambiguous, {files} could pair with each other; keep one "
                "image and one mask per stem, or set data.folder.mask_suffix")
    if not masks:
        how = repr(suffix) if suffix is not None else "none or " + "/".join(MASK_SUFFIXES)
        return f"pairing complete: no mask for {files} in {folders[1]} (stem {stem!r} + " \
               f"suffix {how})"
    return f"pairing complete: no image for {files} in {folders[0]} (stem {stem!r})"


# ----------------------------------------------------------------------------- ingest


def patient_and_slice(stem: str, regex: re.Pattern) -> tuple[str | None, int | None]:
    match = regex.search(stem)
    if not match:
        return None, None
    found = match.groupdict()
    return found["patient"], int(found["slice"]) if found.get("slice") else None


@dataclass(frozen=True)
class Item:
    """One image/mask group of files as planned: its slice id, files and pairing problem."""

    sid: str
    patient: str | None
    index: int
    image: Path | None
    mask: Path | None
    problem: str = ""


def plan_pair_folders(image_dir: Path, mask_dir: Path, data: DataParams, out: Plan,
                      taken: set[str]) -> list[Item]:
    """The items of one images folder and its masks folder; ambiguous groups (nothing to
    decode) become rows of `out` naming every file."""
    cfg: FolderParams = data.folder
    images, ignored = list_files(image_dir, cfg.image_glob, cfg.extensions)
    masks, ignored_masks = list_files(mask_dir, cfg.mask_glob, cfg.extensions)
    if not images and not masks:
        raise SourceError(f"{image_dir.parent}: empty source, no files matching "
                          f"{cfg.extensions} in {image_dir} or {mask_dir}")
    regex = re.compile(cfg.patient_regex)
    items = []
    for stem, image_paths, mask_paths in pair_stems(images, masks, cfg.mask_suffix):
        problem = _pairing_problem(stem, image_paths, mask_paths, (image_dir, mask_dir),
                                   cfg.mask_suffix)
        patient, index = patient_and_slice(stem, regex)
        sid, index = unique(safe_stem(stem), taken), -1 if index is None else index
        if problem and (len(image_paths) > 1 or len(mask_paths) > 1):  # ambiguous
            out.rows.append(problem_row(
                sid, patient, index, data.source,
                source_image=str(image_paths[0] if image_paths else ""),
                source_mask=str(mask_paths[0] if mask_paths else ""), paired=False,
                ingest_detail=problem))
            continue
        out.facts["pairs"] += not problem
        items.append(Item(sid, patient, index, image_paths[0] if image_paths else None,
                          mask_paths[0] if mask_paths else None, problem))
    out.facts["ignored"] += [str(p) for p in ignored + ignored_masks]
    return items


def plan_cases(items: list[Item], folder_name: str, source: str, cases: set[str]
               ) -> list[CaseTask]:
    """One case per patient id; items without one share a case for their folder."""
    groups: dict[str | None, list[Item]] = {}
    for item in items:
        groups.setdefault(item.patient, []).append(item)
    tasks = []
    for patient, members in groups.items():
        name = safe_stem(patient) if patient is not None else f"unnamed-{folder_name}"
        files = [p for item in members for p in (item.image, item.mask) if p is not None]
        tasks.append(CaseTask(unique(name, cases), file_facts(*files), tuple(members)))
    return tasks


def plan_tree(root: Path, data: DataParams) -> Plan:
    """Every images/masks folder pair found under `root`, planned as cases."""
    layouts = find_layouts(root, data.folder)
    if not layouts:
        raise SourceError(no_layout_message(root, data.folder))
    out, taken, cases = Plan(facts={"pairs": 0, "ignored": []}), set(), set()
    for image_dir, mask_dir in layouts:
        items = plan_pair_folders(image_dir, mask_dir, data, out, taken)
        folder_name = safe_stem(image_dir.parent.relative_to(root).as_posix() or "root")
        out.tasks += plan_cases(items, folder_name, data.source, cases)
    out.facts["layouts"] = [image_dir.parent.relative_to(root).as_posix()
                            for image_dir, _ in layouts]
    return out


def ingest_case(task: CaseTask, data: DataParams, seed: int, writer: CaseWriter) -> dict:
    """Decode every item of one case into `writer`."""
    for item in task.spec:
        _ingest_item(writer, item, data)
    return {}


def _ingest_item(writer: CaseWriter, item: Item, data: DataParams) -> None:
    cfg = data.folder
    facts = {"source_image": str(item.image or ""), "source_mask": str(item.mask or ""),
             "paired": not item.problem}
    details = [item.problem] if item.problem else []
    image = mask = None
    if item.image is not None:
        try:
            image, info = imageio.decode_image(item.image, data.max_pixels, cfg.high_bit_window)
            facts |= {"channels": info["channels"], "dtype": info["dtype"]}
        except imageio.DecodeError as exc:
            facts["image_decodable"] = False
            details.append(f"image decodable: {exc}")
    if item.mask is not None:
        try:
            raw = imageio.decode_mask(item.mask, data.max_pixels)
            mask, issue = imageio.mask_classes(raw, cfg.mask_mapping, cfg.mask_threshold,
                                               cfg.max_ambiguous_fraction)
            facts["source_mask_values"] = imageio.compact_values(raw)
            if issue:
                facts["mask_values_allowed"] = False
                details.append(f"mask values allowed: {item.mask}: {issue}")
        except imageio.DecodeError as exc:
            facts["mask_decodable"] = False
            details.append(f"mask decodable: {exc}")
    writer.add(item.sid, item.patient, item.index, image, mask, ingest_detail=" | ".join(details),
               **facts)


def plan(data: DataParams, seed: int, workdir) -> Plan:
    root = Path(data.path).expanduser()
    if not root.is_dir():
        raise SourceError(f"{root}: data.path is not a folder (data.source=folder)")
    return plan_tree(root, data)
