"""The data sources' parameters (`data.phantom`, `data.folder`, `data.archive`, `data.nifti`,
`data.kaggle`, `data.dicom`) and the strict base every params model shares; `liverseg.config`
assembles them into `Params`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhantomParams(Strict):
    patients: int = Field(16, ge=2)
    slices_per_patient: int = Field(10, ge=1)
    size: int = Field(128, ge=32)
    max_tumours: int = Field(4, ge=0)
    noise_hu: float = Field(12.0, ge=0)


class FolderParams(Strict):
    """Two folders of 2D slices (also what `archive` and `kaggle` are unpacked into)."""

    # Folder names, matched case-insensitively anywhere under data.path; null = the usual
    # synonyms (images/image/imgs/img/ct/frames; masks/mask/labels/label/seg/...).
    images: str | None = None
    masks: str | None = None
    image_glob: str = "*"
    mask_glob: str = "*"
    # Matched case-insensitively, so `.JPG` and `.jpg` both count.
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]
    # Mask stem = image stem + suffix (e.g. "_mask"; "" = same stem); null = automatic:
    # the same stem or a common suffix (_mask, _seg, -mask, _label, _gt, ...).
    mask_suffix: str | None = None
    # Searched in the file stem; group `patient` is required, `slice` optional.
    patient_regex: str = r"(?P<patient>[^_]+)_(?P<slice>\d+)$"
    # Label value -> class index (0/1; 0/1/2 for data.target liver_tumour); null: masks
    # are 0/1 or 0/255 (JPEG noise tolerated).
    mask_mapping: dict[int, Literal[0, 1, 2]] | None = None
    mask_threshold: int = Field(127, ge=0, le=254)
    max_ambiguous_fraction: float = Field(0.05, ge=0, le=1)
    # 16-bit input: window mapped to 0..255; null = each image's own min..max.
    high_bit_window: tuple[float, float] | None = None

    @field_validator("images", "masks")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        return _one_folder_name(value)

    @field_validator("patient_regex")
    @classmethod
    def _has_patient_group(cls, value: str) -> str:
        import re

        if "patient" not in re.compile(value).groupindex:
            raise ValueError(f"{value!r} has no (?P<patient>...) group")
        return value


def _one_folder_name(value: str | None) -> str | None:
    """A folder's name (searched for under data.path), not a path."""
    if value is not None and (not value.strip() or "/" in value or "\\" in value):
        raise ValueError(f"{value!r} is not a folder name; give one name such as 'labels' "
                         "(folders are found anywhere under data.path), or null")
    return value


class ArchiveParams(Strict):
    max_total_mb: float = Field(4096, gt=0)  # uncompressed; refuses absurd (bomb) archives
    max_members: int = Field(200_000, ge=1)


class NiftiParams(Strict):
    window: tuple[float, float] = (-200.0, 250.0)  # HU mapped to 0..255
    slices: Literal["all", "organ", "tumour"] = "organ"  # which slices become samples
    empty_fraction: float = Field(0.0, ge=0, le=1)  # of the other slices, kept (seeded)
    # Name of the folder holding the label volumes, case-insensitive, when it is none of
    # the usual ones (segmentations, labels, labelsTr, masks, target, seg, gt, ...).
    labels_dir: str | None = None

    @field_validator("labels_dir")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        return _one_folder_name(value)


class KaggleParams(Strict):
    slug: str = "robintrmbtt/data-unet"
    version: int | None = None  # null = latest; pin it for reproducible runs
    cache_dir: str = "~/.cache/liverseg/kaggle"
    connect_timeout_s: float = Field(5.0, gt=0)


ORIGINS = ("human", "corrected", "model", "unknown")  # of a DICOM label (docs/DATA.md)
LabelOrigin = Literal[ORIGINS]


class DicomParams(Strict):
    """`data.source: dicom`: CT series labelled by DICOM SEG or RTSTRUCT, from the folder
    data.path or from a DICOMweb archive (`url`; credentials only from the environment,
    LIVERSEG_DICOMWEB_USER/PASSWORD, or netrc, never here)."""

    url: str | None = None
    study_date: str | None = None  # QIDO-RS StudyDate filter: "20240101-", "20240101-20241231"
    study_description: str | None = None  # QIDO-RS StudyDescription filter ("*liver*")
    # Which label origins become training targets; a model's own output is not one.
    train_on: tuple[LabelOrigin, ...] = ("human", "corrected")
    fractional_threshold: float = Field(0.5, gt=0, le=1)  # a FRACTIONAL SEG's voxel is in at >=
    # Segment/ROI names (case-insensitive) of each class, besides the coded concepts
    # (SNOMED CT Liver, Neoplasm...) and the usual names (liver, tumour, tumor, lesion, ...).
    names: dict[Literal["liver", "tumour"], tuple[str, ...]] = {"liver": (), "tumour": ()}

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value and (urlsplit(value).username or urlsplit(value).password):
            raise ValueError("data.dicom.url holds credentials; give them in "
                             "LIVERSEG_DICOMWEB_USER / LIVERSEG_DICOMWEB_PASSWORD or netrc, "
                             "never in params.yaml (it is in git and dvc.lock)")
        return value


# The data sources (liverseg.data.sources has a module of each name); those that read
# data.path, which the data-source sensor watches; those whose slices are HU volumes.
SOURCES = ("phantom", "folder", "archive", "nifti", "kaggle", "dicom")
PATH_SOURCES = ("folder", "archive", "nifti", "dicom")
VOLUME_SOURCES = ("phantom", "nifti", "dicom")
