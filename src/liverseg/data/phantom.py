"""The embedded dataset: deterministic CT-like axial slices of the upper abdomen.

Each patient is a small stack of slices through one synthetic body: air, a fat rim, soft
tissue, a spine, kidneys, a stomach with fluid, a gallbladder, and a liver with hypodense
vessels and 1..N tumours per patient that are 3D blobs (so a tumour appears in neighbouring
slices, and a slice has 0..N of them; many have none). Values are Hounsfield units with
noise, then windowed as a liver CT (level 50, width 400). The gallbladder, stomach fluid
and vessels are hypodense like the tumours, so a plain intensity threshold does not solve
the task.

Labels: 0 background, 1 liver, 2 tumour. Everything is a function of (seed, patient), so
the dataset is identical on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from liverseg import imageio

WINDOW = imageio.PHANTOM_WINDOW  # HU -> 0..255
BACKGROUND, LIVER, TUMOUR = 0, 1, 2


@dataclass(frozen=True)
class PhantomSlice:
    patient_id: str
    slice_index: int
    image: np.ndarray  # uint8, windowed CT
    labels: np.ndarray  # uint8, 0/1/2


def _blob(yy, xx, cy, cx, ry, rx, rng: np.random.Generator, wobble: float = 0.15) -> np.ndarray:
    """An ellipse whose radius wobbles with the angle: an irregular, organ-like region."""
    angle = np.arctan2(yy - cy, xx - cx)
    k = np.arange(2, 6)[:, None, None]
    amp = rng.uniform(0, wobble, size=(4, 1, 1)) / k
    phase = rng.uniform(0, 2 * np.pi, size=(4, 1, 1))
    radius = 1 + (amp * np.cos(k * angle + phase)).sum(axis=0)
    dist = np.sqrt(((yy - cy) / max(ry, 1e-3)) ** 2 + ((xx - cx) / max(rx, 1e-3)) ** 2)
    return dist <= radius


def _smooth_noise(shape, rng: np.random.Generator, scale: int) -> np.ndarray:
    """Low-frequency texture: coarse noise upsampled by repetition and box-blurred."""
    coarse = rng.standard_normal((shape[0] // scale + 2, shape[1] // scale + 2))
    fine = np.kron(coarse, np.ones((scale, scale)))[: shape[0], : shape[1]]
    kernel = np.ones(scale) / scale
    fine = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, fine)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, fine)


def _patient_anatomy(rng: np.random.Generator, slices: int, max_tumours: int) -> dict:
    tumours = [
        {
            "cy": rng.uniform(0.40, 0.62),
            "cx": rng.uniform(0.22, 0.48),
            "cz": rng.uniform(-0.5, slices - 0.5),
            "r": rng.uniform(0.03, 0.11),  # radius as a fraction of the image
            "depth": rng.uniform(1.5, 4.0),  # extent along z, in slices
            "contrast": rng.uniform(-70, -25),  # HU below the liver
        }
        for _ in range(rng.integers(max_tumours > 0, max_tumours + 1))
    ]
    return {
        "body": (rng.uniform(0.36, 0.42), rng.uniform(0.44, 0.48)),
        "liver_hu": rng.uniform(50, 70),
        "liver": (rng.uniform(0.48, 0.53), rng.uniform(0.33, 0.37), rng.uniform(0.17, 0.22)),
        "tumours": tumours,
        "gallbladder": rng.uniform() < 0.7,
    }


def _render_slice(anat: dict, z: int, slices: int, size: int, noise_hu: float, rng) -> tuple:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ry, rx = anat["body"]
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = _blob(yy, xx, 0.5, 0.5, ry, rx, rng, 0.04)
    hu[body] = -100.0  # subcutaneous fat
    inner = _blob(yy, xx, 0.5, 0.5, ry - 0.04, rx - 0.045, rng, 0.04)
    hu[inner] = 35.0 + 10 * _smooth_noise((size, size), rng, max(size // 16, 2))[inner]
    spine = _blob(yy, xx, 0.5 + ry - 0.1, 0.5, 0.055, 0.05, rng, 0.05)
    hu[spine] = 600.0
    for side in (0.33, 0.67):  # kidneys
        hu[_blob(yy, xx, 0.62, side, 0.07, 0.045, rng, 0.1) & inner] = 30.0
    stomach = _blob(yy, xx, 0.42, 0.66, 0.10, 0.09, rng, 0.2) & inner
    hu[stomach] = 15.0  # fluid-filled, as dark as a tumour
    hu[stomach & (yy < 0.40)] = -900.0  # gas cap

    # The liver shrinks towards the ends of the stack, as it does along the z axis.
    extent = np.sqrt(max(1 - ((z - (slices - 1) / 2) / (slices * 0.75 + 1)) ** 2, 0.25))
    cy, cx, r = anat["liver"]
    liver = _blob(yy, xx, cy, cx, r * 1.25 * extent, r * extent, rng, 0.25) & inner
    hu[liver] = anat["liver_hu"] + 6 * _smooth_noise((size, size), rng, max(size // 32, 2))[liver]
    for _ in range(3):  # hypodense vessels inside the liver
        vy, vx = cy + rng.uniform(-0.08, 0.08), cx + rng.uniform(-0.08, 0.08)
        hu[_blob(yy, xx, vy, vx, 0.012, 0.03, rng, 0.1) & liver] = anat["liver_hu"] - 35
    if anat["gallbladder"]:
        gb = _blob(yy, xx, cy + 0.13 * extent, cx + 0.12, 0.045, 0.03, rng, 0.1) & inner & ~liver
        hu[gb] = 10.0

    labels = np.zeros((size, size), dtype=np.uint8)
    labels[liver] = LIVER
    for t in anat["tumours"]:
        dz = (z - t["cz"]) / t["depth"]
        if abs(dz) >= 1:
            continue
        tr = t["r"] * np.sqrt(1 - dz**2)
        lesion = _blob(yy, xx, t["cy"], t["cx"], tr, tr * 1.1, rng, 0.3) & liver
        hu[lesion] = anat["liver_hu"] + t["contrast"]
        labels[lesion] = TUMOUR

    hu += rng.normal(0, noise_hu, size=hu.shape).astype(np.float32)
    return imageio.rescale(hu, WINDOW), labels  # the window serving applies: one function


def patient_id(p: int) -> str:
    return f"phantom{p:03d}"


def generate_patient(p: int, slices_per_patient: int, size: int, max_tumours: int,
                     noise_hu: float, seed: int) -> Iterator[PhantomSlice]:
    """Every slice of patient `p`, from (seed, p) alone: patients can be made in any order."""
    rng = np.random.default_rng([seed, p])
    anat = _patient_anatomy(rng, slices_per_patient, max_tumours)
    for z in range(slices_per_patient):
        image, labels = _render_slice(anat, z, slices_per_patient, size, noise_hu, rng)
        yield PhantomSlice(patient_id(p), z, image, labels)


def generate(
    patients: int,
    slices_per_patient: int,
    size: int,
    max_tumours: int,
    noise_hu: float,
    seed: int,
) -> Iterator[PhantomSlice]:
    """Yield every slice of every patient, deterministically for a given seed."""
    for p in range(patients):
        yield from generate_patient(p, slices_per_patient, size, max_tumours, noise_hu, seed)
