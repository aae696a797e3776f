"""Model configuration: one frozen dataclass that describes a network and its outputs.

A :class:`ModelConfig` holds everything the rest of wsimtl needs to know about a model without
loading it: the architecture (registry key plus :class:`ArchParams`), the resolution it works at,
its output heads (kind, class names, colours), the tile geometry it needs (``context_px``,
``stride``, ``patch_stride_px``) and the provenance of its weights. It round-trips through JSON
(``config.json`` beside ``weights.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError

__all__ = ["ArchParams", "HeadConfig", "ModelConfig", "HEAD_KINDS", "INST_CLASSES", "PATCH_POOLS"]

logger = logging.getLogger(__name__)

#: Head kinds: 3-class instance maps, per-pixel type maps, and patch classification.
HEAD_KINDS: tuple[str, ...] = ("inst", "type", "patch")

#: Classes of every INST map (Cerberus): background, eroded object interior, boundary band.
INST_CLASSES: tuple[str, ...] = ("background", "interior", "boundary")

#: How a patch head summarises the encoder cells of its window: their mean (Cerberus), or their
#: mean and standard deviation per channel (first- and second-order statistics, twice the input).
PATCH_POOLS: tuple[str, ...] = ("mean", "mean_std")

#: Name of the output module under ``output_head.<decoder>`` for each segmentation kind.
_OUT_KEY = {"inst": "INST", "type": "TYPE"}


@dataclass(frozen=True)
class ArchParams:
    """Architecture hyper-parameters of a :class:`~wsi_mtl.network.model.MultiTaskNet`.

    Parameters
    ----------
    encoder_layers
        BasicBlocks per ResNet stage (4 stages), e.g. ``(3, 4, 6, 3)`` for ResNet-34.
    encoder_widths
        Channels of the stem and of the four stages (5 values).
    stem_stride
        Stride of the 7x7 stem conv: 1 (Cerberus, output stride 16) or 2 (output stride 32, plus a
        full-resolution skip and a final up-block in every decoder).
    encoder_fc_classes
        Outputs of the unused ImageNet classifier ``backbone.fc`` (1000 for Cerberus, 0 for none).
    decoder_mid
        Middle channels of the two-conv up-blocks (4 values, deepest first).
    decoder_out
        Channels the decoders hand to the output heads (and of the full-resolution skip).
    full_res
        How a stride-2 model reaches full resolution: ``"refine"`` (heads run at 1/2 resolution,
        their logits are upsampled 2x bilinearly and corrected by a 3x3 conv of a shared
        full-resolution skip, ``full_res_channels`` wide; cheap) or ``"block"`` (every decoder gets a
        fifth up-block at full resolution adding a ``decoder_out``-wide skip of the input, and the
        heads run at full resolution; about 2x the cost).
    full_res_channels
        Channels of the shared full-resolution skip in ``"refine"`` mode.
    full_res_convs
        3x3 conv-bn-relu layers in the full-resolution block (``"block"`` mode).
    fine_decoders
        Decoders whose heads also get a full-resolution branch of their own (``"refine"`` mode
        only): the decoder's features upsampled 2x, plus the branch's own 3x3 conv of the input,
        through two 3x3 conv-bn-relu layers and a zero-initialised 1x1 conv whose output is added
        to the refined logits. For objects too small for a half-resolution decoder (nuclei are
        10-16 px across at 0.5 um/px, their boundary band 1-2 px); costs only those decoders.
    fine_channels
        Channels of each fine branch.
    private_decoders
        Decoders that read the shallow encoder stages from a private copy of them instead of the
        shared encoder (the deep stages and ``x4`` stay shared): low-level features a task can
        fine-tune without changing the others. A new copy starts as the shared weights.
    private_stages
        How many encoder outputs the private copies compute: 1 = the stem (``x0``), 2 = stem and
        ``layer1`` (``x0``, ``x1``), 3 = also ``layer2`` (``x2``), 4 = also ``layer3`` (``x3``).
        ``x4`` (and the decoder's start from it) always stays shared.
    head_hidden
        Hidden channels of the 1x1 output heads (Cerberus: 96).
    patch_hidden
        Hidden channels of the patch classification heads (Cerberus: 256).
    patch_cells
        Side, in encoder cells, of the window a patch head pools (odd; Cerberus: 9).
    patch_dropout
        Dropout of the patch heads during training.
    """

    encoder_layers: tuple[int, ...] = (3, 4, 6, 3)
    encoder_widths: tuple[int, ...] = (64, 64, 128, 256, 512)
    stem_stride: int = 1
    encoder_fc_classes: int = 1000
    decoder_mid: tuple[int, ...] = (256, 128, 64, 64)
    decoder_out: int = 64
    full_res: str = "refine"
    full_res_channels: int = 8
    full_res_convs: int = 1
    fine_decoders: tuple[str, ...] = ()
    fine_channels: int = 16
    private_decoders: tuple[str, ...] = ()
    private_stages: int = 2
    head_hidden: int = 96
    patch_hidden: int = 256
    patch_cells: int = 9
    patch_dropout: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_layers", tuple(int(v) for v in self.encoder_layers))
        object.__setattr__(self, "encoder_widths", tuple(int(v) for v in self.encoder_widths))
        object.__setattr__(self, "decoder_mid", tuple(int(v) for v in self.decoder_mid))
        object.__setattr__(self, "fine_decoders", tuple(str(v) for v in self.fine_decoders))
        object.__setattr__(self, "private_decoders", tuple(str(v) for v in self.private_decoders))
        if len(self.encoder_layers) != 4 or min(self.encoder_layers) < 1:
            raise ModelError(f"encoder_layers must be 4 positive integers, got {self.encoder_layers}")
        if len(self.encoder_widths) != 5 or min(self.encoder_widths) < 1:
            raise ModelError(f"encoder_widths must be 5 positive integers, got {self.encoder_widths}")
        if self.stem_stride not in (1, 2):
            raise ModelError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if len(self.decoder_mid) != 4 or min(self.decoder_mid) < 1:
            raise ModelError(f"decoder_mid must be 4 positive integers, got {self.decoder_mid}")
        if self.patch_cells < 1 or self.patch_cells % 2 == 0:
            raise ModelError(f"patch_cells must be a positive odd integer, got {self.patch_cells}")
        if self.full_res not in ("refine", "block"):
            raise ModelError(f"full_res must be 'refine' or 'block', got {self.full_res!r}")
        if self.full_res_convs < 1 or self.full_res_channels < 1:
            raise ModelError("full_res_convs and full_res_channels must be >= 1")
        if self.fine_decoders and (self.stem_stride != 2 or self.full_res != "refine"):
            raise ModelError("fine_decoders need stem_stride 2 and full_res 'refine'")
        if self.fine_channels < 1:
            raise ModelError(f"fine_channels must be >= 1, got {self.fine_channels}")
        if not 1 <= self.private_stages <= 4:
            raise ModelError(f"private_stages must be 1, 2, 3 or 4, got {self.private_stages}")

    @property
    def output_stride(self) -> int:
        """Input pixels per cell of the deepest feature map (x4)."""
        return 16 * self.stem_stride


@dataclass(frozen=True)
class HeadConfig:
    """One output of the network.

    Parameters
    ----------
    kind
        ``"inst"`` (3-class instance map), ``"type"`` (per-pixel class map) or ``"patch"``
        (patch classification; dense map in ``predict``).
    decoder
        Module name under ``decoder_head`` (e.g. ``Nuclei``, ``Nuclei#TYPE``, ``Patch-Class``).
    class_names
        One name per output channel.
    colors
        One RGB triple (0-255) per class, for QuPath and previews.
    pool
        Patch heads only: the window statistics the head classifies, one of :data:`PATCH_POOLS`.
    """

    kind: str
    decoder: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    pool: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "colors", tuple(tuple(int(v) for v in c) for c in self.colors))
        if self.kind not in HEAD_KINDS:
            raise ModelError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if "." in self.decoder or not self.decoder:
            raise ModelError(f"decoder name must be non-empty and contain no '.', got {self.decoder!r}")
        if len(self.class_names) < 2:
            raise ModelError(f"head {self.decoder!r} needs at least 2 classes, got {len(self.class_names)}")
        if len(self.colors) != len(self.class_names):
            raise ModelError(
                f"head {self.decoder!r}: {len(self.class_names)} classes but {len(self.colors)} colours"
            )
        for c in self.colors:
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise ModelError(f"head {self.decoder!r}: colour {c} is not an RGB triple in 0-255")
        if self.pool not in PATCH_POOLS:
            raise ModelError(f"head {self.decoder!r}: pool must be one of {PATCH_POOLS}, got {self.pool!r}")
        if self.pool != "mean" and self.kind != "patch":
            raise ModelError(f"head {self.decoder!r}: pool applies to patch heads only, not {self.kind!r} heads")

    @property
    def num_classes(self) -> int:
        """Number of output channels."""
        return len(self.class_names)

    @property
    def out_key(self) -> str:
        """Module name under ``output_head.<decoder>`` (``INST``/``TYPE``); empty for patch heads."""
        return _OUT_KEY.get(self.kind, "")


@dataclass(frozen=True)
class ModelConfig:
    """Everything known about a model without loading its weights.

    Parameters
    ----------
    name
        Model id (e.g. ``wsimtl-small``), recorded in run.json.
    arch
        Registry key of the architecture builder (e.g. ``wsimtl_small``, ``cerberus_r34``).
    arch_params
        Architecture hyper-parameters.
    heads
        Ordered mapping of public output name (``Nuclei-INST``, ``Patch-Class``, ...) to head.
    mpp
        Microns per pixel the model works at.
    context_px
        Context margin, in model pixels, the engine must give each side of a tile's core.
    stride
        Input height and width must be multiples of this.
    patch_stride_px
        Input pixels per cell of the dense patch maps returned by ``predict``.
    trained
        False for randomly initialised weights.
    weights_sha256
        SHA-256 of the weights file the model was loaded from (None if none).
    license, source, description
        Provenance, free text.
    """

    name: str
    arch: str
    arch_params: ArchParams
    heads: Mapping[str, HeadConfig]
    mpp: float = 0.5
    context_px: int = 0
    stride: int = 16
    patch_stride_px: int = 16
    trained: bool = False
    weights_sha256: str | None = None
    license: str = ""
    source: str = ""
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", dict(self.heads))
        object.__setattr__(self, "extra", dict(self.extra))
        if not self.heads:
            raise ModelError(f"model {self.name!r} has no heads")
        if self.mpp <= 0:
            raise ModelError(f"model {self.name!r}: mpp must be positive, got {self.mpp}")
        out_stride = self.arch_params.output_stride
        if self.stride % out_stride:
            raise ModelError(f"model {self.name!r}: stride {self.stride} is not a multiple of {out_stride}")
        if self.patch_stride_px != out_stride:
            raise ModelError(
                f"model {self.name!r}: patch_stride_px {self.patch_stride_px} must equal the encoder "
                f"output stride {out_stride}"
            )
        if self.context_px < 0 or self.context_px % self.stride:
            raise ModelError(
                f"model {self.name!r}: context_px {self.context_px} must be a non-negative multiple of "
                f"stride {self.stride}"
            )
        seen: dict[tuple[str, str], str] = {}
        for head_name, head in self.heads.items():
            if not isinstance(head, HeadConfig):
                raise ModelError(f"head {head_name!r} is not a HeadConfig")
            slot = (head.decoder, head.out_key)
            if slot in seen:
                raise ModelError(f"heads {seen[slot]!r} and {head_name!r} share module {head.decoder}.{head.out_key}")
            seen[slot] = head_name
        decoders = {h.decoder for h in self.heads.values() if h.kind != "patch"}
        patches = {h.decoder for h in self.heads.values() if h.kind == "patch"}
        if decoders & patches:
            raise ModelError(f"names used both as decoder and patch head: {sorted(decoders & patches)}")

    # ---- convenience -------------------------------------------------------------------------
    @property
    def output_heads(self) -> list[str]:
        """Public output names in order."""
        return list(self.heads)

    @property
    def seg_decoders(self) -> list[str]:
        """U-Net decoder names in first-use order."""
        return list(dict.fromkeys(h.decoder for h in self.heads.values() if h.kind != "patch"))

    @property
    def patch_heads(self) -> list[str]:
        """Public names of the patch classification heads."""
        return [n for n, h in self.heads.items() if h.kind == "patch"]

    @property
    def postprocess_settings(self) -> dict[str, Any]:
        """The post-processing settings this model's runs use and record: its tuned
        ``extra["postprocess"]``, with the window its tissue head classifies each cell from
        (``tissue_window_cells``: ``arch_params.patch_cells`` for a ``Patch-Class`` head) unless
        those set it."""
        settings = dict(self.extra.get("postprocess") or {})
        head = self.heads.get("Patch-Class")
        if head is not None and head.kind == "patch":
            settings.setdefault("tissue_window_cells", int(self.arch_params.patch_cells))
        return settings

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples, heads in order)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "arch_params":
                value = {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
            elif f.name == "heads":
                value = {
                    n: {"kind": h.kind, "decoder": h.decoder, "class_names": list(h.class_names),
                        "colors": [list(c) for c in h.colors], **({"pool": h.pool} if h.pool != "mean" else {})}
                    for n, h in value.items()
                }
            else:
                value = _jsonable(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown top-level keys are ignored with a warning."""
        if not isinstance(data, Mapping):
            raise ModelError(f"model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("model config: ignoring unknown keys %s", unknown)
        kwargs = {k: v for k, v in data.items() if k in names}
        for required in ("name", "arch", "arch_params", "heads"):
            if required not in kwargs:
                raise ModelError(f"model config lacks the required key {required!r}")
        try:
            ap_names = {f.name for f in dataclasses.fields(ArchParams)}
            bad = sorted(set(kwargs["arch_params"]) - ap_names)
            if bad:
                raise ModelError(f"model config: unknown arch_params {bad}")
            kwargs["arch_params"] = ArchParams(**kwargs["arch_params"])
            kwargs["heads"] = {str(n): HeadConfig(**h) for n, h in kwargs["heads"].items()}
        except (TypeError, AttributeError, ValueError) as exc:
            raise ModelError(f"model config is malformed: {exc}") from None
        return cls(**kwargs)

    def to_json(self, *, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"model config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
