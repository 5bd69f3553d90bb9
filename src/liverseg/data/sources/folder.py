"""`folder`: images and masks in two folders, paired by file stem.

Every file is accounted for: a pair becomes a slice; an image without a mask, a mask
without an image, an undecodable file or a mask with values that are not allowed becomes
an index row whose facts say so (validate quarantines it, naming the source file).
"""

from __future__ import annotations

import re
from pathlib import Path

from liverseg.config import DataParams, FolderParams
from liverseg.data import imageio
from liverseg.data.layout import SliceWriter, safe_stem


class SourceError(ValueError):
    """The source as a whole is unusable (missing folder, nothing to ingest)."""


def list_files(folder: Path, glob: str, extensions: list[str]) -> tuple[dict[str, Path], list]:
    """Files by stem (extension matched case-insensitively) and the files ignored."""
    exts = {e.lower() for e in extensions}
    files, ignored = {}, []
    for path in sorted(folder.glob(glob)):
        if path.is_file() and path.suffix.lower() in exts:
            if path.stem in files:
                raise SourceError(f"{path}: same stem as {files[path.stem]}; cannot pair by stem")
            files[path.stem] = path
        elif path.is_file():
            ignored.append(path)
    return files, ignored


def patient_and_slice(stem: str, regex: re.Pattern) -> tuple[str | None, int | None]:
    match = regex.search(stem)
    if not match:
        return None, None
    found = match.groupdict()
    return found["patient"], int(found["slice"]) if found.get("slice") else None


def ingest_pair_folders(root: Path, data: DataParams, writer: SliceWriter) -> dict:
    """Ingest `root/<images>` + `root/<masks>` into `writer`; returns counts."""
    cfg: FolderParams = data.folder
    image_dir, mask_dir = root / cfg.images, root / cfg.masks
    for folder, key in ((image_dir, "images"), (mask_dir, "masks")):
        if not folder.is_dir():
            raise SourceError(f"{folder}: folder not found (see data.folder.{key})")
    images, ignored = list_files(image_dir, cfg.image_glob, cfg.extensions)
    masks, ignored_masks = list_files(mask_dir, cfg.mask_glob, cfg.extensions)
    if not images and not masks:
        raise SourceError(f"{root}: empty source, no files matching {cfg.extensions} in "
                          f"{image_dir} or {mask_dir}")
    regex = re.compile(cfg.patient_regex)
    mask_by_image = {stem: masks.get(stem + cfg.mask_suffix) for stem in images}
    paired_masks = {m for m in mask_by_image.values() if m is not None}
    for stem, image_path in images.items():
        _ingest_item(writer, stem, image_path, mask_by_image[stem], data, regex)
    for mask_path in masks.values():
        if mask_path not in paired_masks:
            stem = mask_path.stem.removesuffix(cfg.mask_suffix) if cfg.mask_suffix else \
                mask_path.stem
            _ingest_item(writer, stem, None, mask_path, data, regex)
    return {"ignored": [str(p) for p in ignored + ignored_masks]}


def _ingest_item(writer: SliceWriter, stem: str, image_path: Path | None,
                 mask_path: Path | None, data: DataParams, regex: re.Pattern) -> None:
    cfg = data.folder
    patient, index = patient_and_slice(stem, regex)
    facts = {"source_image": str(image_path or ""), "source_mask": str(mask_path or ""),
             "paired": image_path is not None and mask_path is not None}
    details = []
    if not facts["paired"]:
        details.append(f"pairing complete: no {'mask' if mask_path is None else 'image'} "
                       f"with stem {stem!r}")
    image = mask = None
    if image_path is not None:
        try:
            image, info = imageio.decode_image(image_path, data.max_pixels, cfg.high_bit_window)
            facts |= {"channels": info["channels"], "dtype": info["dtype"]}
        except imageio.DecodeError as exc:
            facts["image_decodable"] = False
            details.append(f"image decodable: {exc}")
    if mask_path is not None:
        try:
            raw = imageio.decode_mask(mask_path, data.max_pixels)
            mask, problem = imageio.mask_classes(raw, cfg.mask_mapping, cfg.mask_threshold,
                                                 cfg.max_ambiguous_fraction)
            facts["source_mask_values"] = imageio.compact_values(raw)
            if problem:
                facts["mask_values_allowed"] = False
                details.append(f"mask values allowed: {mask_path}: {problem}")
        except imageio.DecodeError as exc:
            facts["mask_decodable"] = False
            details.append(f"mask decodable: {exc}")
    writer.add(safe_stem(stem), patient, -1 if index is None else index, image, mask,
               ingest_detail=" | ".join(details), **facts)


def ingest(data: DataParams, seed: int, writer: SliceWriter) -> dict:
    root = Path(data.path).expanduser()
    if not root.is_dir():
        raise SourceError(f"{root}: data.path is not a folder (data.source=folder)")
    return ingest_pair_folders(root, data, writer)
