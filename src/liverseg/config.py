"""The one typed configuration: `params.yaml` parsed into pydantic models.

Unknown keys and wrong types are rejected at once with a message naming the key
(`train.epochs: Input should be a valid integer`), so a typo never silently falls back
to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from liverseg.config_sources import (  # re-exported: one import for callers
    ORIGINS,
    PATH_SOURCES,
    SOURCES,
    VOLUME_SOURCES,
    ArchiveParams,
    DicomParams,
    FolderParams,
    KaggleParams,
    NiftiParams,
    PhantomParams,
    Strict,
)


class ConfigError(ValueError):
    """params.yaml is invalid; the message names the file and the key."""


__all__ = ["ORIGINS", "PATH_SOURCES", "SOURCES", "VOLUME_SOURCES", "ArchiveParams",
           "ConfigError", "DicomParams", "FolderParams", "KaggleParams", "NiftiParams",
           "Params", "PhantomParams", "Strict", "load_params", "parse_params"]


class DataParams(Strict):
    source: Literal[SOURCES] = "phantom"
    path: str | None = None  # folder, archive file, NIfTI or DICOM folder (not phantom/kaggle)
    # tumour | liver: binary masks; liver_tumour: three classes (background, liver, tumour)
    target: Literal["tumour", "liver", "liver_tumour"] = "tumour"
    max_pixels: int = Field(40_000_000, ge=1024)  # per image; larger is refused as a bomb
    # 2.5D: each slice's k neighbours on each side become extra input channels (volume
    # sources only; model.in_channels must be 2k + 1; edge slices repeat the edge).
    context_slices: int = Field(0, ge=0, le=8)
    phantom: PhantomParams = PhantomParams()
    folder: FolderParams = FolderParams()
    archive: ArchiveParams = ArchiveParams()
    nifti: NiftiParams = NiftiParams()
    kaggle: KaggleParams = KaggleParams()
    dicom: DicomParams = DicomParams()

    @model_validator(mode="after")
    def _fits_the_source(self):
        if self.source == "dicom" and self.dicom.url and self.path:
            raise ValueError("data.dicom.url and data.path are both set for data.source=dicom: "
                             "read a folder (data.path) or an archive (data.dicom.url), not both")
        archive = self.source == "dicom" and self.dicom.url
        if self.source in PATH_SOURCES and not self.path and not archive:
            raise ValueError(f"data.path is required for data.source={self.source}")
        folder_like = self.source in ("folder", "archive", "kaggle")
        mapped = set((self.folder.mask_mapping or {}).values())
        if folder_like and self.target == "liver_tumour" and not mapped >= {1, 2}:
            raise ValueError("data.target liver_tumour from 2D masks needs "
                             "data.folder.mask_mapping onto classes 0/1/2, e.g. {0: 0, 1: 1, 2: 2}")
        if self.context_slices and self.source not in VOLUME_SOURCES:
            raise ValueError(f"data.context_slices={self.context_slices} needs a volume source "
                             f"({', '.join(VOLUME_SOURCES)}): data.source {self.source} has 2D "
                             "slices without neighbours")
        if folder_like and self.target != "liver_tumour" and 2 in mapped:
            raise ValueError(f"data.folder.mask_mapping maps onto class 2, but data.target "
                             f"{self.target} is binary (classes 0/1)")
        return self


class ValidateParams(Strict):
    policy: Literal["fail", "quarantine"] = "quarantine"
    max_quarantine_fraction: float = Field(0.1, ge=0, le=1)  # above it `quarantine` fails too
    fg_fraction: tuple[float, float] = (0.0, 0.9)  # allowed foreground fraction per mask
    image_mean: tuple[float, float] = (2.0, 253.0)  # allowed mean grey value (0..255)
    min_image_std: float = Field(1.0, ge=0)  # below it the image is blank


class PatientModulo(Strict):
    """A fixed split by numeric patient id: ``int(id) % modulus`` in ``val`` -> val, in
    ``test`` -> test, anything else -> train (MSD's reference: val {4}, test {0})."""

    modulus: int = Field(gt=1)
    val: list[int] = Field(min_length=1)
    test: list[int] = []

    @model_validator(mode="after")
    def _residues(self):
        if set(self.val) & set(self.test):
            raise ValueError(f"patient_modulo: residues {sorted(set(self.val) & set(self.test))}"
                             " are in both val and test")
        outside = sorted(r for r in self.val + self.test if not 0 <= r < self.modulus)
        if outside:
            raise ValueError(f"patient_modulo: residues {outside} are not in 0..{self.modulus - 1}")
        return self


class SplitParams(Strict):
    val_fraction: float = Field(0.25, gt=0, lt=1)  # of the patients
    test_fraction: float = Field(0.0, ge=0, lt=1)  # 0: no test split (test.csv is empty)
    # patient: no patient in two splits. slab: for data with too few patients (one LiTS
    # volume), contiguous slice ranges per patient (train first, then val, then test).
    group_by: Literal["patient", "slab"] = "patient"
    # group_by patient only: a fixed rule instead of the seeded fractions (reference splits)
    patient_modulo: PatientModulo | None = None
    # k-fold cross-validation: validation = fold `fold` of `folds` (contiguous slabs per
    # volume with group_by slab, blocks of the seeded patient order otherwise); null = the
    # fractions above. `fold_gap` slices on each side of a validation slab are left out of
    # train (neighbours correlate), listed in stats.json.
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    fold_gap: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _leaves_train(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave patients for train")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"split.fold {self.fold} is not one of the {self.folds} folds "
                             f"(0..{self.folds - 1})")
        if self.folds is not None and (self.test_fraction or self.patient_modulo):
            raise ValueError("split.folds replaces test_fraction and patient_modulo; set "
                             "test_fraction: 0 and patient_modulo: null")
        if self.patient_modulo and self.group_by != "patient":
            raise ValueError("patient_modulo splits by patient: it needs group_by: patient")
        return self


class EnhancedPanParams(Strict):
    """Every component the paper adds to PAN is a switch, so ablations are configurations."""

    se: bool = True
    aspp: bool = True
    attention: bool = True
    residual: bool = True
    aspp_rates: list[int] = Field(default_factory=lambda: [6, 12, 18], min_length=1)
    decoder_channels: int = Field(64, ge=8)
    decoder_stride: Literal[2, 4] = 4  # 4: PAN as published; 2: one more level (small lesions)


class ModelParams(Strict):
    encoder: str = "tu-efficientnet_b0"
    # null: from scratch; imagenet: downloaded (needs the hub); else a local file, where
    # "{model}" becomes each model's name (each starts from its own earlier training)
    encoder_weights: str | None = None
    in_channels: int = Field(1, ge=1)
    # 2: binary (one sigmoid logit); 3: background/liver/tumour (softmax), which needs
    # data.target liver_tumour. Checked against the data's classes again at training.
    num_classes: Literal[2, 3] = 2
    enhanced_pan: EnhancedPanParams = EnhancedPanParams()

    def encoder_weights_for(self, name: str) -> str | None:
        """`encoder_weights` for model `name`: "{model}" in a path is replaced by it."""
        weights = self.encoder_weights
        return weights.replace("{model}", name) if weights else weights

    def options_for(self, name: str) -> dict:
        """Architecture-specific switches (only the Enhanced PAN has some)."""
        return self.enhanced_pan.model_dump() if name == "enhanced_pan" else {}


class TrainParams(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=2)  # batch norm after global pooling needs >= 2
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    image_size: int = Field(128, ge=32)
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    augment: bool = True
    # The paper trains with binary cross-entropy alone ("bce"); with ~1% tumour pixels the
    # default adds soft Dice, the usual answer to that imbalance. With model.num_classes 3
    # each is its softmax form: cross-entropy (+ multi-class soft Dice).
    loss: Literal["bce", "bce_dice"] = "bce_dice"
    # GPU path (ignored on CPU, where training stays fp32 and bitwise reproducible).
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where supported
    channels_last: bool = True
    compile: bool = False        # torch.compile the model (minutes of warm-up; pays off on GPU)
    deterministic: bool = False  # True: deterministic kernels, no cudnn.benchmark (slower)


class EvaluateParams(Strict):
    threshold: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(1000, ge=0)  # resamples for 95% CIs over images; 0 = none
    # nnU-Net's inference choices (liverseg.postprocess), made on validation: auto keeps
    # mirroring if it raises compare.rank_by, a post-processing step if it does not lower it.
    tta: Literal["auto", "none", "flip"] = "auto"
    postprocessing: Literal["auto", "none"] = "auto"


class CompareParams(Strict):
    rank_by: Literal["fg_iou", "miou", "dice", "pixel_accuracy"] = "fg_iou"


class RegisterParams(Strict):
    model_name: str = "liverseg"
    alias: str = "champion"
    challenger_alias: str = "challenger"
    min_fg_iou: float = Field(0.5, ge=0, le=1)
    min_dice: float = Field(0.0, ge=0, le=1)
    # The candidate must beat the current champion by this much on the candidate's validation
    # split (a champion validated on another split is scored anew on it).
    min_improvement: float = Field(0.0, ge=0)
    # ... and lose at most this much fg_iou against it on the frozen test split, if any.
    max_test_regression: float = Field(0.02, ge=0)
    # ... and, on the validation cases the champion never saw (new labels), score at least
    # the champion's fg_iou + this (liverseg.stages.new_cases).
    min_new_case_gain: float = Field(0.0, ge=-1, le=1)


class ScheduleParams(Strict):
    cron: str = "0 3 * * 1"


class RetrainParams(Strict):
    # The data sensor starts the pipeline once this many labelled cases are new or relabelled
    # since the run it last started (liverseg.arrivals); drift/correction ERRORs
    # start it regardless (pipeline.monitoring). Read by the sensor only: no DVC stage.
    min_new_labels: int = Field(1, ge=1)


class Params(Strict):
    seed: int = 42
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    split: SplitParams = SplitParams()
    models: list[str] = Field(default_factory=lambda: ["enhanced_pan"], min_length=1)
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    compare: CompareParams = CompareParams()
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    schedule: ScheduleParams = ScheduleParams()
    retrain: RetrainParams = RetrainParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("models")
    @classmethod
    def _known_models(cls, names: list[str]) -> list[str]:
        from liverseg.models import MODEL_NAMES  # the names only: no torch

        unknown = [n for n in names if n not in MODEL_NAMES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {list(MODEL_NAMES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"model listed twice in {names}")
        return names

    @model_validator(mode="after")
    def _classes_agree(self):
        from liverseg.labels import TARGETS

        classes = TARGETS[self.data.target]
        if self.model.num_classes != len(classes):
            raise ValueError(f"model.num_classes is {self.model.num_classes} but data.target "
                             f"{self.data.target} has {len(classes)} classes {list(classes)}; "
                             "num_classes 3 goes with data.target liver_tumour")
        return self

    @model_validator(mode="after")
    def _context_fits(self):
        k = self.data.context_slices
        if self.model.in_channels != 2 * k + 1:
            raise ValueError(f"model.in_channels is {self.model.in_channels} but "
                             f"data.context_slices={k} gives each slice 2k + 1 = {2 * k + 1} "
                             "channels (the slice and its neighbours); set them together")
        if k and self.split.folds and self.split.group_by == "slab" \
                and self.split.fold_gap < k:
            raise ValueError(f"split.fold_gap={self.split.fold_gap} is below "
                             f"data.context_slices={k}: training slices next to the "
                             "validation slab would see its slices as context")
        return self

    def dump(self) -> dict:
        """The resolved config as plain data, with the same keys as params.yaml."""
        return self.model_dump(mode="json", by_alias=True)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = [
            f"{source}: {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return parse_params(raw, str(path))

