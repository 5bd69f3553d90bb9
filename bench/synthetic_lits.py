"""Synthetic LiTS-shaped CT cases for the scale benchmark (bench/scale.py), deterministic per seed.

    python bench/synthetic_lits.py bench/.work/scale-data --cases 1        # one 512x512x448 case
    python bench/synthetic_lits.py /tmp/lits --cases 3 --size 96 --slices 24  # a tiny set

Each case is `volume-<i>.nii.gz` (int16 HU) beside `segmentation-<i>.nii.gz` (uint8: 0
background, 1 liver, 2 tumour), slices along the last axis, spacing 0.7 x 0.7 x 2.5 mm in
the affine, as LiTS stores them. The picture: air (-1000 HU) around a body ellipse (soft
tissue 40 HU under a ring of fat, -100 HU, and a vertebra, 500 HU), a lobed liver blob
(60 HU) spanning about a third of the slices, one to four tumour blobs (30 HU) inside the
liver, and Gaussian noise of 15 HU on every voxel, so that gzip is not flattered by flat
regions. Geometry is in fractions of the field of view, so small sizes keep the proportions.

Case i depends only on (seed, i, size, slices): a 32-case set starts with the 8-case set's
cases. `dataset()` generates the cases it lacks (one case per process) into a pool keyed by
(size, slices, seed) and hard-links the first N into a folder keyed by (N, size, slices,
seed); generated files are never modified, so the folders can be reused between runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPACING_MM = (0.7, 0.7, 2.5)
HU = {"air": -1000, "fat": -100, "tissue": 40, "bone": 500, "liver": 60, "tumour": 30}
NOISE_HU = 15.0


@dataclass(frozen=True)
class Shape:
    size: int = 512
    slices: int = 448


@dataclass
class Blob:
    """An ellipsoid in normalised in-plane units ([-1, 1] across the field of view) and
    slices: centre (u, v, z), in-plane semi-axes (a, b), half-height h (slices)."""

    u: float
    v: float
    z: float
    a: float
    b: float
    h: float

    def scale_at(self, k: int) -> float:
        """Squared in-plane scale of the cross-section at slice k (<= 0: not in it)."""
        return 1.0 - ((k - self.z) / self.h) ** 2

    def distance2(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return ((u - self.u) / self.a) ** 2 + ((v - self.v) / self.b) ** 2


def case_names(index: int) -> tuple[str, str]:
    return f"volume-{index}.nii.gz", f"segmentation-{index}.nii.gz"


def anatomy(rng: np.random.Generator, shape: Shape) -> tuple[Blob, list[Blob]]:
    """The liver and its tumours for one case."""
    third = shape.slices / 6  # half-height of a blob spanning a third of the slices
    liver = Blob(u=-0.30 + rng.uniform(-0.05, 0.05), v=-0.05 + rng.uniform(-0.05, 0.05),
                 z=shape.slices * rng.uniform(0.45, 0.6), a=rng.uniform(0.26, 0.32),
                 b=rng.uniform(0.22, 0.28), h=third * rng.uniform(0.95, 1.05))
    tumours = []
    for _ in range(rng.integers(1, 5)):
        r, angle = rng.uniform(0, 0.5), rng.uniform(0, 2 * np.pi)
        radius = rng.uniform(0.02, 0.07)
        tumours.append(Blob(u=liver.u + r * liver.a * np.cos(angle),
                            v=liver.v + r * liver.b * np.sin(angle),
                            z=liver.z + rng.uniform(-0.5, 0.5) * liver.h,
                            a=radius, b=radius * rng.uniform(0.8, 1.2),
                            h=max(1.5, liver.h * radius / liver.a)))
    return liver, tumours


def make_case(index: int, seed: int, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume int16, labels uint8), both [x, y, z] in Fortran order (NIfTI's)."""
    rng = np.random.default_rng([seed, index])
    n, z = shape.size, shape.slices
    axis = (np.arange(n, dtype=np.float32) - n / 2 + 0.5) / (n / 2)
    u, v = np.meshgrid(axis, axis, indexing="ij")
    body_a, body_b = rng.uniform(0.78, 0.86), rng.uniform(0.56, 0.64)
    body2 = (u / body_a) ** 2 + (v / body_b) ** 2
    bone = (u ** 2 + (v - 0.7 * body_b) ** 2) < 0.06 ** 2
    liver, tumours = anatomy(rng, shape)
    lobes = (1 + 0.12 * np.sin(3 * np.arctan2(v - liver.v, u - liver.u)
                               + rng.uniform(0, 2 * np.pi))) ** 2
    liver2 = liver.distance2(u, v) / lobes
    tumour2 = [t.distance2(u, v) for t in tumours]
    volume = np.empty((n, n, z), dtype=np.int16, order="F")
    labels = np.zeros((n, n, z), dtype=np.uint8, order="F")
    for k in range(z):
        volume[:, :, k], labels[:, :, k] = one_slice(k, rng, body2, bone, liver, liver2,
                                                     tumours, tumour2, z)
    return volume, labels


def one_slice(k: int, rng: np.random.Generator, body2: np.ndarray, bone: np.ndarray,
              liver: Blob, liver2: np.ndarray, tumours: list[Blob], tumour2: list[np.ndarray],
              slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice k: HU (noise included) and labels, vectorised over the slice."""
    girth = (0.92 + 0.08 * np.sin(np.pi * k / slices)) ** 2  # the body widens mid-volume
    body = body2 < girth
    hu = np.where(body, np.float32(HU["tissue"]), np.float32(HU["air"]))
    hu[body & (body2 >= 0.88 * girth)] = HU["fat"]
    hu[bone & body] = HU["bone"]
    label = np.zeros(body.shape, dtype=np.uint8)
    if liver.scale_at(k) > 0:
        organ = (liver2 < liver.scale_at(k)) & body & ~bone
        label[organ] = 1
        for blob, dist2 in zip(tumours, tumour2, strict=True):
            if blob.scale_at(k) > 0:
                label[organ & (dist2 < blob.scale_at(k))] = 2
        hu[label == 1] = HU["liver"]
        hu[label == 2] = HU["tumour"]
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(NOISE_HU)
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16), label


def write_case(folder: Path, index: int, seed: int, shape: Shape) -> float:
    """Both files of case `index` into `folder` (written under a temporary name, then
    renamed, so a file that exists is complete); the seconds it took."""
    import nibabel as nib

    started = time.perf_counter()
    volume, labels = make_case(index, seed, shape)
    affine = np.diag([*SPACING_MM, 1.0])
    for name, data in zip(case_names(index), (volume, labels), strict=True):
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm", "sec")
        tmp = folder / f".tmp-{os.getpid()}-{name}"
        nib.save(image, tmp)
        tmp.rename(folder / name)
    return time.perf_counter() - started


def pool_folder(root: Path, shape: Shape, seed: int) -> Path:
    return root / f"cases-s{shape.size}-z{shape.slices}-seed{seed}"


def ensure_cases(pool: Path, indices: list[int], seed: int, shape: Shape,
                 workers: int = 2) -> dict[int, float]:
    """Generate the cases of `indices` missing from `pool`; {index: seconds} of those made."""
    pool.mkdir(parents=True, exist_ok=True)
    missing = [i for i in indices if not all((pool / f).exists() for f in case_names(i))]
    if not missing:
        return {}
    with ProcessPoolExecutor(max_workers=min(workers, len(missing))) as executor:
        seconds = executor.map(write_case, [pool] * len(missing), missing,
                               [seed] * len(missing), [shape] * len(missing))
        return dict(zip(missing, seconds, strict=True))


def link_case(pool: Path, index: int, folder: Path) -> None:
    """Case `index` of `pool` into `folder` as hard links (a copy across file systems)."""
    for name in case_names(index):
        target = folder / name
        if not target.exists():
            try:
                os.link(pool / name, target)
            except OSError:
                shutil.copy2(pool / name, target)


def dataset(root: Path, cases: int, shape: Shape, seed: int, workers: int = 2) -> Path:
    """The folder of cases 0..cases-1 (generated when missing), keyed by all four knobs."""
    pool = pool_folder(root, shape, seed)
    made = ensure_cases(pool, list(range(cases)), seed, shape, workers)
    if made:
        print(f"generated {len(made)} case(s) of {shape.size}x{shape.size}x{shape.slices} in "
              f"{pool}: {sum(made.values()) / len(made):.1f} s per case in a worker")
    folder = root / f"lits-n{cases}-s{shape.size}-z{shape.slices}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        link_case(pool, index, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the cache folder (pool and dataset folders)")
    parser.add_argument("--cases", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="voxels per side of a slice")
    parser.add_argument("--slices", type=int, default=448)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes, one case each")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = dataset(args.root, args.cases, Shape(args.size, args.slices), args.seed,
                     args.workers)
    print(f"{folder}: {time.perf_counter() - started:.1f} s wall")


if __name__ == "__main__":
    main()
