"""The one typed configuration: `params.yaml` parsed into pydantic models.

Unknown keys and wrong types are rejected at once with a message naming the key
(`train.epochs: Input should be a valid integer`), so a typo never silently falls back
to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """params.yaml is invalid; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhantomParams(Strict):
    patients: int = Field(16, ge=2)
    slices_per_patient: int = Field(10, ge=1)
    size: int = Field(128, ge=32)
    max_tumours: int = Field(3, ge=0)
    noise_hu: float = Field(12.0, ge=0)


class DataParams(Strict):
    source: Literal["phantom"] = "phantom"
    target: Literal["tumour", "liver"] = "tumour"
    phantom: PhantomParams = PhantomParams()


class ValidateParams(Strict):
    max_quarantine_fraction: float = Field(0.1, ge=0, le=1)


class SplitParams(Strict):
    val_fraction: float = Field(0.25, gt=0, lt=1)


class EnhancedPanParams(Strict):
    se: bool = True
    aspp: bool = True
    attention: bool = True
    residual: bool = True


class ModelParams(Strict):
    encoder: str = "tu-efficientnet_b0"
    encoder_weights: str | None = None
    in_channels: int = Field(1, ge=1)
    enhanced_pan: EnhancedPanParams = EnhancedPanParams()

    def options_for(self, name: str) -> dict:
        """Architecture-specific switches (only the Enhanced PAN has some)."""
        return self.enhanced_pan.model_dump() if name == "enhanced_pan" else {}


class TrainParams(Strict):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(8, ge=2)  # batch norm after global pooling needs >= 2
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    image_size: int = Field(128, ge=32)
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    augment: bool = True
    # The paper trains with binary cross-entropy alone ("bce"). With ~1% tumour pixels that
    # collapses to all-background in a short CPU run, so Dice is added by default.
    loss: Literal["bce", "bce_dice"] = "bce_dice"


class EvaluateParams(Strict):
    threshold: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(1000, ge=0)  # resamples for 95% CIs over images; 0 = none


class CompareParams(Strict):
    rank_by: Literal["fg_iou", "miou", "dice", "pixel_accuracy"] = "fg_iou"


class RegisterParams(Strict):
    model_name: str = "liverseg"
    alias: str = "champion"
    challenger_alias: str = "challenger"
    min_fg_iou: float = Field(0.5, ge=0, le=1)
    min_dice: float = Field(0.0, ge=0, le=1)
    # The candidate must beat the current champion by this much (same validation split).
    min_improvement: float = Field(0.0, ge=0)


class ScheduleParams(Strict):
    cron: str = "0 3 * * 1"


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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("models")
    @classmethod
    def _known_models(cls, names: list[str]) -> list[str]:
        from liverseg.models.registry import MODEL_NAMES  # lazy: torch is heavy

        unknown = [n for n in names if n not in MODEL_NAMES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {list(MODEL_NAMES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"model listed twice in {names}")
        return names

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
