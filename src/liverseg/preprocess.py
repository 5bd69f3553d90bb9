"""The one preprocessing: a source item in, the network's input out, and the way back.

Every path that feeds a model goes through here, so what evaluate measures is what
`predict`, the MLflow pyfunc and the ONNX export deliver (DESIGN rule 8):

    source item                        grey slice (uint8, the item's own geometry)
    - 2D image file                    `read_image`: luminance; 16/32-bit -> window -> 0..255
    - one slice of a NIfTI volume      `volume_slices`: closest canonical orientation (RAS+),
                                       slice k of the last axis, transposed (rows = A axis),
                                       HU window -> 0..255 (clip, round)
    2.5D (`context_slices` k > 0)      `context_stack`: slice z and its k neighbours on each
                                       side (z-k .. z+k, edges repeat the edge) as channels
    grey [N, C, H, W] (0..255)    ->   `liverseg.served.Served`: bilinear resize to the
                                       trained size, (x / 255 - mean) / std, the network,
                                       sigmoid/softmax, bilinear resize of the
                                       probabilities back to H, W
    probabilities                 ->   classes: foreground > threshold (binary) or argmax
    slice masks                   ->   `to_input_orientation`: the volume's own axes again

Ingest writes the grey slices (so training and evaluate read exactly these bytes), the
training loader resizes with `served.resize_image`, and every parameter travels in the model's
`config.json` (`Preprocessing.from_config`), so a model is served as it was trained,
whatever params.yaml says today.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from liverseg import imageio, labels

ORIENTATION = "closest canonical RAS+, slices along the last axis, transposed"
RESIZE = "bilinear, half-pixel centres (align_corners=False), no antialias"
GREY = "luminance (PIL 'L'); 16/32-bit: high_bit_window (else own min..max) -> 0..255"
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Preprocessing:
    """Everything between a source item and the network, as recorded with the model."""

    image_size: int
    in_channels: int
    mean: float
    std: float
    context_slices: int = 0  # k: the input is slices z-k..z+k of a volume (in_channels 2k+1)
    classes: tuple[str, ...] = labels.BINARY
    threshold: float = 0.5
    hu_window: tuple[float, float] = (-200.0, 250.0)
    hu_window_from: str = "data.nifti.window"
    trained_on_volumes: bool = True  # False: 2D files, so the HU window is an assumption
    high_bit_window: tuple[float, float] | None = None
    scale: float = 255.0
    orientation: str = ORIENTATION
    resize: str = RESIZE
    grey: str = GREY
    max_pixels: int = field(default=MAX_PIXELS, compare=False)

    @classmethod
    def from_params(cls, params, mean: float, std: float,
                    classes: tuple[str, ...] | None = None) -> Preprocessing:
        """The preprocessing a training run with `params` on data with these statistics
        fixes. The HU window is the one that made the training slices: the phantom's own,
        or `data.nifti.window` (also what 2D-trained models apply to volumes: the window
        that made the 2D files is unknown, hence `hu_window_from` says which applies)."""
        from liverseg.config import VOLUME_SOURCES

        data = params.data
        window, source = (imageio.PHANTOM_WINDOW, "the phantom's window") \
            if data.source == "phantom" else (data.nifti.window, "data.nifti.window")
        volumes = data.source in VOLUME_SOURCES
        if not volumes:
            source += " (assumed: the 2D training images came windowed)"
        return cls(image_size=params.train.image_size, in_channels=params.model.in_channels,
                   mean=float(mean), std=float(std), context_slices=data.context_slices,
                   classes=tuple(classes or labels.TARGETS[data.target]),
                   threshold=params.evaluate.threshold, hu_window=tuple(window),
                   hu_window_from=source, trained_on_volumes=volumes,
                   high_bit_window=data.folder.high_bit_window,
                   max_pixels=data.max_pixels)

    @classmethod
    def from_config(cls, config: dict) -> Preprocessing:
        """From a model's `config.json`; a config written before the `preprocessing` block
        is rebuilt from the params it recorded (the same derivation)."""
        if "preprocessing" in config:
            spec = dict(config["preprocessing"])
            for key in ("classes", "hu_window", "high_bit_window"):
                if spec.get(key) is not None:
                    spec[key] = tuple(spec[key])
            return cls(**spec)
        from liverseg.config import parse_params

        norm = config["normalisation"]
        return cls.from_params(parse_params(config["params"]), norm["mean"], norm["std"],
                               tuple(config.get("classes", labels.BINARY)))

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- grey slices


def read_image(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """A 2D image file as ingest decodes it: a uint8 grey slice in its own geometry."""
    return imageio.decode_image(path, prep.max_pixels, prep.high_bit_window)[0]


def window(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Hounsfield units -> uint8 0..255 (clip to the window, round)."""
    return imageio.rescale(hu, hu_window)


def orientation(affine: np.ndarray) -> np.ndarray:
    """The voxel axes' orientation (nibabel `ornt`) relative to RAS+, from the affine."""
    import nibabel as nib

    return nib.orientations.io_orientation(affine)


def to_canonical(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A volume's voxels in closest canonical RAS+ axes (a label volume: the image's ornt)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(data, ornt)


def canonical(img) -> tuple[np.ndarray, np.ndarray]:
    """(the volume's data in closest canonical RAS+ axes, the input's orientation) of a
    nibabel image; a 2D image is one slice."""
    data = np.asanyarray(img.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"{img.get_filename()}: expected a 3D volume, got shape {data.shape}")
    ornt = orientation(img.affine)
    return to_canonical(data, ornt), ornt


def slice_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm of `to_slices(to_canonical(volume, orientation(affine)))`:
    (between slices, between rows, between columns)."""
    import nibabel as nib

    zooms, ornt = nib.affines.voxel_sizes(affine), orientation(affine)
    canonical = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        canonical[int(target)] = float(zooms[axis])
    return canonical[2], canonical[1], canonical[0]


def to_slices(canonical_volume: np.ndarray) -> np.ndarray:
    """[X, Y, Z] canonical -> [Z, Y, X]: slice k is `volume[:, :, k].T`."""
    return np.ascontiguousarray(np.transpose(canonical_volume, (2, 1, 0)))


def volume_slices(img, prep: Preprocessing, screen=None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 grey slices [Z, H, W] in canonical order, the input's orientation).
    `screen(hu) -> hu` sees the voxels before the window (serving's intensity checks)."""
    data, ornt = canonical(img)
    if screen is not None:
        data = screen(data)
    return window(to_slices(data), prep.hu_window), ornt


def context_stack(slices: np.ndarray, k: int, indices=None) -> np.ndarray:
    """[Z, H, W] slices -> [len(indices), 2k + 1, H, W]: each slice (all by default) with
    its k neighbours on each side, in slice order; beyond the volume the edge repeats."""
    indices = np.arange(len(slices)) if indices is None else np.asarray(indices)
    return slices[context_indices(indices, len(slices), k)]


def context_indices(indices, n: int, k: int) -> np.ndarray:
    """[len(indices), 2k + 1] slice numbers z-k .. z+k, clamped to 0 .. n-1."""
    return np.clip(np.asarray(indices)[:, None] + np.arange(-k, k + 1), 0, n - 1)


def to_input_orientation(slices: np.ndarray, ornt: np.ndarray, shape: tuple) -> np.ndarray:
    """Slice masks [Z, H, W] (canonical) -> an array in the input volume's own axes."""
    import nibabel as nib

    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    back = to_canonical(np.transpose(slices, (2, 1, 0)), nib.orientations.ornt_transform(ras, ornt))
    return back.reshape(shape)


MOVED_TO_SERVED = ("Served", "resize", "resize_image", "normalise")


def __getattr__(name: str):
    """The network half moved to `liverseg.served`; a model registered before that carries
    pyfunc code that imports `Served` from here, and it must still load (torch is imported
    only when one of these names is asked for)."""
    if name in MOVED_TO_SERVED:
        from liverseg import served

        return getattr(served, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
