"""Model cards: everything inference needs to know about an exported model, validated at load time.

A model is ``NAME.onnx`` with ``NAME.json`` beside it. The same fields (each JSON-encoded) are stored in
the ONNX file's ``metadata_props``, except ``sha256``, which is the hash of the ONNX file itself.

The name ``ensemble`` is reserved: ``model=ensemble`` asks the service for the average of all its models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.core.files import atomic_write
from service.core.labels import MODALITIES, REGION_NAMES
from service.core.postprocess import PostprocessingRules, RegionRule

RESERVED_NAMES: tuple[str, ...] = ("ensemble",)
"""Names no model may take: ``model=ensemble`` means the average of all loaded models (SPEC, ``POST /segment``)."""


class OutputSpec(BaseModel):
    """What the network's output channels mean."""

    model_config = ConfigDict(extra="forbid")

    activation: Literal["sigmoid"] = "sigmoid"
    channels: tuple[str, ...] = REGION_NAMES
    threshold: float = 0.5

    @field_validator("channels")
    @classmethod
    def _regions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(v) != REGION_NAMES:
            raise ValueError(f"output channels must be {list(REGION_NAMES)}, got {list(v)}")
        return tuple(v)


class NormalizationSpec(BaseModel):
    """How raw scans become network input (implemented once in ``service.core.preprocess``)."""

    model_config = ConfigDict(extra="forbid")

    crop: Literal["nonzero-bbox"] = "nonzero-bbox"
    intensity: Literal["zscore-nonzero"] = "zscore-nonzero"


class RegionRuleSpec(BaseModel):
    """One region's postprocessing rule (:class:`service.core.postprocess.RegionRule`)."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["none", "largest_component", "remove_small"] = "none"
    min_size_ml: float | None = Field(None, description="remove_small only: components below this volume go")

    @model_validator(mode="after")
    def _valid(self) -> RegionRuleSpec:
        self.rule()  # the one set of checks, in service.core.postprocess
        return self

    def rule(self) -> RegionRule:
        return RegionRule(action=self.action, min_size_ml=self.min_size_ml)


class PostprocessingSpec(BaseModel):
    """Postprocessing learned on validation cases (``python -m training learn-postprocessing``), applied by
    the engine after the labels are made (:mod:`service.core.postprocess` says what each rule does).

    Attributes:
        WT, TC, ET: each region's rule, applied in that order.
        et_to_ncr_below_ml: all ET becomes NCR/NET when its total volume is below this (ml); 0: off.
        learned_on: what the rules were learned on and what they measured there (cases, data, mean Dice per
            region before and after).
    """

    model_config = ConfigDict(extra="forbid")

    WT: RegionRuleSpec = RegionRuleSpec()
    TC: RegionRuleSpec = RegionRuleSpec()
    ET: RegionRuleSpec = RegionRuleSpec()
    et_to_ncr_below_ml: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    learned_on: dict | None = None

    def rules(self) -> PostprocessingRules:
        """The rules as :func:`service.core.postprocess.apply_postprocessing` takes them."""
        return PostprocessingRules(
            WT=self.WT.rule(), TC=self.TC.rule(), ET=self.ET.rule(), et_to_ncr_below_ml=self.et_to_ncr_below_ml
        )

    @classmethod
    def from_rules(cls, rules: PostprocessingRules, *, learned_on: dict | None = None) -> PostprocessingSpec:
        """The card field for ``rules``."""
        regions = {
            name: RegionRuleSpec(action=rule.action, min_size_ml=rule.min_size_ml)
            for name, rule in ((name, rules.region(name)) for name in REGION_NAMES)
        }
        return cls(**regions, et_to_ncr_below_ml=rules.et_to_ncr_below_ml, learned_on=learned_on)


class ModelCard(BaseModel):
    """SPEC section 3. Unknown fields are refused so that a typo does not pass silently."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    architecture: Literal["unet", "resunet"]
    spatial_dims: Literal[2, 3]
    in_channels: int = 4
    modalities: tuple[str, ...] = MODALITIES
    patch_size: tuple[int, ...]
    network: dict = Field(default_factory=dict, description="keyword arguments that rebuild the network")
    output: OutputSpec = OutputSpec()
    normalization: NormalizationSpec = NormalizationSpec()
    opset: int
    sha256: str | None = None
    parameters: int
    training: dict = Field(default_factory=dict)
    validation: dict | None = None
    postprocessing: PostprocessingSpec | None = Field(
        None, description="rules learned on validation cases, applied after the labels; none: the raw labels"
    )
    created: str

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() in RESERVED_NAMES:
            raise ValueError(
                f"the model name {v!r} is reserved: model=ensemble means the average of all loaded models; "
                "export the model under another name"
            )
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(v) != MODALITIES:
            raise ValueError(f"modalities must be {list(MODALITIES)} in that order, got {list(v)}")
        return tuple(v)

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(int(s) < 1 for s in v):
            raise ValueError(f"patch_size must be positive, got {list(v)}")
        return tuple(int(s) for s in v)

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.in_channels != len(self.modalities):
            raise ValueError(f"in_channels {self.in_channels} does not match {len(self.modalities)} modalities")
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(
                f"patch_size {list(self.patch_size)} has {len(self.patch_size)} sizes, "
                f"expected {self.spatial_dims} (spatial_dims)"
            )
        return self

    def to_metadata(self) -> dict[str, str]:
        """The card as ONNX ``metadata_props`` (each value JSON-encoded, ``sha256`` left out)."""
        data = self.model_dump(mode="json", exclude={"sha256"})
        return {key: json.dumps(value) for key, value in data.items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelCard:
        """Inverse of :meth:`to_metadata`.

        Raises:
            ValueError: a key that is not a card field (refused, like unknown fields in ``NAME.json``), a
                value that is not JSON, or a card that does not validate.
        """
        unknown = sorted(set(props) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown model card fields {unknown}; expected only {sorted(cls.model_fields)}")
        values = {}
        for key, value in props.items():
            try:
                values[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"model card field {key!r} is not valid JSON ({exc})") from None
        return cls.model_validate(values)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(onnx_path: str | Path) -> Path:
    """``models/NAME.onnx`` -> ``models/NAME.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_card(path: str | Path) -> ModelCard:
    """Read and validate ``NAME.json``; a ``ValueError`` names the file and what is wrong."""
    path = Path(path)
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path}: model card not found; every NAME.onnx needs NAME.json beside it") from None
    except ValueError as exc:
        raise ValueError(f"{path}: invalid model card: {exc}") from None


def write_card(card: ModelCard, path: str | Path) -> None:
    """Write ``card`` as indented JSON, atomically (a uniquely named temporary file renamed over the target)."""
    atomic_write(path, card.model_dump_json(indent=2) + "\n")
