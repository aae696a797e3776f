"""Training configuration: a YAML/JSON file read into a frozen dataclass, and the validation split."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ._average import check_average_with

__all__ = ["TrainConfig", "load_config", "load_split", "SOURCES", "DEFAULT_SOURCE_MPP"]

#: Data sources the trainer knows, keyed as in the config and the split file.
SOURCES: tuple[str, ...] = ("monuseg", "cpm15", "crchistophenotypes", "glas", "lc25000", "kather2016", "glioma", "consep")

#: Microns per pixel of each source as stored in ../shared/data (see MODEL_CARD.md for reasons).
DEFAULT_SOURCE_MPP: dict[str, float] = {
    "monuseg": 0.25,  # 40x
    "cpm15_20x": 0.5,
    "cpm15_40x": 0.25,
    "crchistophenotypes": 0.5,  # 20x
    "glas": 0.62,  # 20x Zeiss MIRAX MIDI, 0.6203 um/px
    "kather2016": 0.495 * 150 / 224,  # 150 px tiles at 0.495 um/px upscaled to 224 px
    "lc25000": 1.0,  # assumption: 768 px originals downscaled to 224 px, judged from red cell size
    "glioma": 0.25,  # not stated by the source; estimated from nucleus size (SOURCES.md)
    "consep": 0.25,  # 40x
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; see ``configs/wsimtl-small.yaml`` for a commented example.

    Paths (``data_root``, ``splits``, ``run_dir``, ``output_model``) are resolved relative to the
    config file's folder's parent (the repository root for files in ``configs/``) unless absolute;
    ``$WSIMTL_DATA`` overrides ``data_root``.
    """

    name: str = "wsimtl-small"
    arch: str = "wsimtl_small"
    data_root: Path = Path("../shared/data")
    splits: Path = Path("configs/splits/validation.yaml")
    run_dir: Path = Path("runs/wsimtl-small")
    output_model: Path | None = Path("models/wsimtl-small")
    seed: int = 0
    threads: int = 2
    steps: int = 6000
    steps_per_epoch: int = 500
    checkpoint_every: int = 100
    seg_batch: int = 8
    seg_crop_px: int = 256
    #: Per-task overrides of ``seg_crop_px`` / ``seg_batch`` for schedule entries naming one task
    #: (glands need more context than nuclei: larger, fewer crops at about the same cost).
    task_crop_px: Mapping[str, int] = field(default_factory=dict)
    task_batch: Mapping[str, int] = field(default_factory=dict)
    cls_batch: int = 16
    cls_crop_px: int = 160
    schedule: tuple[str, ...] = ("seg", "seg", "cls")
    seg_mixture: Mapping[str, float] = field(default_factory=lambda: {"nuclei": 0.35, "nuclei_binary": 0.1, "nuclei_type": 0.25, "gland": 0.3})
    cls_mixture: Mapping[str, float] = field(default_factory=lambda: {"lc25000": 0.5, "kather2016": 0.5})
    #: Per segmentation task, the share of its samples drawn from each source (``SegItem.source``,
    #: e.g. ``{nuclei_all: {monuseg: 0.3, consep: 0.4, cpm15: 0.15, glioma: 0.15}}``); images of a
    #: source are drawn uniformly. A task not named draws its images uniformly.
    source_mixture: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    dice_weight: float = 1.0
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    scale_range: tuple[float, float] = (0.87, 1.15)
    hed_sigma: float = 0.05
    hed_bias: float = 0.02
    blur_p: float = 0.2
    nuclei_erosion_px: int = 3
    gland_erosion_px: int = 11
    type_radius_px: float = 4.0
    type_background_px: float = 10.0
    #: bf16 autocast in training steps; ``"auto"`` in a config file means: where the CPU has native
    #: bf16 (avx512_bf16 / AMX), since emulated bf16 is slower than fp32 (resolved when it is read).
    bf16: bool = True
    channels_last: bool = True
    source_mpp: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCE_MPP))
    val_limit: Mapping[str, int] = field(default_factory=dict)
    time_budget_minutes: float | None = None
    #: Training batches (the schedule's rotation) over which BatchNorm statistics are re-estimated
    #: at export (0: keep the running averages of the last steps).
    refit_bn_batches: int = 0
    #: Tune the post-processing thresholds on training images at export (see ``wsi_mtl.train._tune``).
    tune_postprocess: bool = False
    #: Training images used for tuning, per task (``nuclei``, ``gland``, ``gland_setting``: GlaS images
    #: for ``gland_max_nonglandular``, ``lumen``: GlaS images with lumen pseudo-labels, needs
    #: ``lumen_labels``; spread evenly over the set; 0 or absent = keep).
    #: ``nuclei_all`` instead of ``nuclei`` tunes the nuclei settings on that task's images (every
    #: nuclei source; ``tune_sources: {nuclei: [...]}`` still chooses among them).
    tune_images: Mapping[str, int] = field(default_factory=lambda: {"nuclei": 25, "gland": 24})
    #: Sources the tuning images of a task come from (``SegItem.source``, e.g. ``{nuclei: [monuseg]}``
    #: to tune on the source most like the slides the model will see); a task not named uses all.
    tune_sources: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: At export, refit the patch heads on the frozen inference features of their training tiles,
    #: kept per head only where it classifies held-out training tiles better (``wsi_mtl.train._heads``).
    refit_patch_heads: bool = False
    #: Patch heads that ``refit_patch_heads`` refits (empty: every patch head with training tiles).
    refit_heads: tuple[str, ...] = ()
    #: Above 0, the refit tissue head (Patch-Class) also learns from the GlaS training images' cells
    #: that are at least this share gland: benign as "mucosa", malignant as "tumor" (``wsi_mtl.train._heads``).
    refit_gland_cells: float = 0.0
    #: Post-processing settings written into the model as given, after any tuning (a value chosen
    #: by an earlier stage's tuning, e.g. ``{gland_max_nonglandular: 0.8}``). Empty: none.
    postprocess: Mapping[str, float] = field(default_factory=dict)
    #: Start a new run from these weights instead of a seeded initialisation: a model folder
    #: (``config.json`` + ``weights.safetensors``) or a run's ``checkpoint.pt`` / ``best.pt``
    #: (a fine-tuning stage). Ignored when the run folder already holds a checkpoint (resume).
    init_from: Path | None = None
    #: ``{model: PATH, weight: W}``, for re-tuning only (``--tune-only``, a ``tune_only`` stage):
    #: the model re-tuned is ``init_from`` with every weight averaged with PATH's,
    #: ``(1 - W) * init_from + W * PATH`` (``wsi_mtl.train._average``). Empty: no averaging.
    average_with: Mapping[str, Any] = field(default_factory=dict)
    #: Train only the parameters inside these modules (dotted module paths of the network, e.g.
    #: ``decoder_head.Nuclei``); everything else is frozen and its BatchNorm statistics are kept.
    #: Empty: train everything.
    trainable: tuple[str, ...] = ()
    #: Changes to the arch's ``ArchParams`` for the network this run builds, applied after the
    #: shape of the weights it starts from (e.g. ``{fine_decoders: [Nuclei]}`` adds a fine branch
    #: to a trained model). Empty: the arch as registered, shaped as its starting weights.
    arch_params: Mapping[str, Any] = field(default_factory=dict)
    #: Heads no source supervises in this run: never computed, their decoders frozen.
    untrained_heads: tuple[str, ...] = ("Lumen-INST",)
    #: GlaS items carry lumen pseudo-labels (``wsi_mtl.train._lumen``) for ``Lumen-INST``.
    lumen_labels: bool = False
    #: Odd side of the square that erodes lumen instances into their interior (as nuclei).
    lumen_erosion_px: int = 3
    #: At ``init_from``: modules that start as copies of others (destination -> source module,
    #: e.g. ``{decoder_head.Lumen: decoder_head.Gland}``), tensors of equal shape.
    copy_modules: Mapping[str, str] = field(default_factory=dict)
    #: The rule that decides whether this run's model ships, written before the run (recorded
    #: with the export; applied by whoever ships it, e.g. from `wsimtl evaluate` numbers).
    ship_rule: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
        return out


_SEG_TASKS = ("nuclei", "nuclei_binary", "nuclei_split", "nuclei_type", "gland", "gland_negative", "nuclei_all")
_CLS_TASKS = ("lc25000", "kather2016")


def _bf16_setting(value: Any) -> bool:
    """``bf16`` of a config file: true, false, or ``"auto"`` (native bf16 on this CPU)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        from ..devices import cpu_has_bf16

        return cpu_has_bf16()
    raise InputError(f"training config: bf16 must be true, false or auto, got {value!r}")


def _check_postprocess(value: Any) -> dict[str, float | int]:
    """``postprocess:`` of a config: post-processing setting -> value, checked as a user's overrides."""
    from ..postprocess import check_overrides

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"training config: postprocess maps post-processing settings to values, got {value!r}")
    try:
        return check_overrides(value)
    except InputError as exc:
        raise InputError(f"training config: postprocess: {exc}") from None


def _validate(data: Mapping[str, Any], base: Path) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"training config: unknown keys {unknown}; known: {sorted(fields)}")
    kw: dict[str, Any] = {}
    for k, v in data.items():
        if k in ("data_root", "splits", "run_dir", "output_model", "init_from"):
            if v is None:
                kw[k] = None
                continue
            p = Path(os.path.expanduser(str(v)))
            kw[k] = p if p.is_absolute() else (base / p)
        elif k in ("schedule", "scale_range", "trainable", "untrained_heads", "refit_heads"):
            kw[k] = tuple(v)
        elif k == "source_mpp":
            kw[k] = {**DEFAULT_SOURCE_MPP, **{str(a): float(b) for a, b in v.items()}}
        elif k == "bf16":
            kw[k] = _bf16_setting(v)
        elif k == "average_with":
            kw[k] = check_average_with(v, base) if v else {}
        elif k == "postprocess":
            kw[k] = _check_postprocess(v)
        else:
            kw[k] = v
    for k in ("data_root", "splits", "run_dir", "output_model"):
        if k not in kw and fields[k].default is not None:
            kw[k] = base / fields[k].default  # type: ignore[operator]
    env = os.environ.get("WSIMTL_DATA")
    if env:
        kw["data_root"] = Path(env)
    try:
        cfg = TrainConfig(**kw)
    except TypeError as exc:
        raise InputError(f"training config: {exc}") from None
    kinds = ("seg", "cls", *_SEG_TASKS)
    bad = [s for s in cfg.schedule if s not in kinds]
    if bad or not cfg.schedule:
        raise InputError(f"training config: schedule entries must be among {list(kinds)}, got {list(cfg.schedule)}")
    for name, mix, known in (("seg_mixture", cfg.seg_mixture, _SEG_TASKS), ("cls_mixture", cfg.cls_mixture, _CLS_TASKS)):
        extra = sorted(set(mix) - set(known))
        if extra:
            raise InputError(f"training config: {name} has unknown tasks {extra}; known: {list(known)}")
        if any(float(w) < 0 for w in mix.values()) or sum(float(w) for w in mix.values()) <= 0:
            raise InputError(f"training config: {name} weights must be >= 0 with a positive sum, got {dict(mix)}")
    if cfg.steps < 1 or cfg.steps_per_epoch < 1 or cfg.checkpoint_every < 1:
        raise InputError("training config: steps, steps_per_epoch and checkpoint_every must be >= 1")
    if cfg.seg_crop_px % 32 or cfg.cls_crop_px % 32:
        raise InputError(f"training config: crop sizes must be multiples of 32, got {cfg.seg_crop_px} and {cfg.cls_crop_px}")
    for name, per_task in (("task_crop_px", cfg.task_crop_px), ("task_batch", cfg.task_batch)):
        extra = sorted(set(per_task) - set(_SEG_TASKS))
        if extra:
            raise InputError(f"training config: {name} has unknown tasks {extra}; known: {list(_SEG_TASKS)}")
        if any(int(v) < 1 for v in per_task.values()):
            raise InputError(f"training config: {name} values must be >= 1, got {dict(per_task)}")
    if any(int(v) % 32 for v in cfg.task_crop_px.values()):
        raise InputError(f"training config: task_crop_px values must be multiples of 32, got {dict(cfg.task_crop_px)}")
    bad_limits = sorted(set(cfg.val_limit) - set(_SEG_TASKS) - set(_CLS_TASKS))
    if bad_limits:
        raise InputError(f"training config: val_limit has unknown tasks {bad_limits}")
    for task, mix in cfg.source_mixture.items():
        if task not in _SEG_TASKS or not isinstance(mix, Mapping) or any(float(w) < 0 for w in mix.values()) or sum(float(w) for w in mix.values()) <= 0:
            raise InputError(f"training config: source_mixture maps segmentation tasks to source weights >= 0 with a positive sum, got {task}: {mix}")
    bad_images = sorted(set(cfg.tune_images) - {"nuclei", "nuclei_all", "gland", "gland_setting", "lumen"})
    if bad_images or ("nuclei" in cfg.tune_images and int(cfg.tune_images.get("nuclei_all", 0)) > 0 and int(cfg.tune_images["nuclei"]) > 0):
        raise InputError(f"training config: tune_images counts images of nuclei or nuclei_all (one of them), gland, gland_setting and lumen, got {dict(cfg.tune_images)}")
    bad_tune = sorted(set(cfg.tune_sources) - {"nuclei", "gland"})
    if bad_tune or any(isinstance(v, str) or not isinstance(v, Sequence) for v in cfg.tune_sources.values()):
        raise InputError(f"training config: tune_sources maps nuclei / gland to lists of sources, got {dict(cfg.tune_sources)}")
    if cfg.time_budget_minutes is not None and cfg.time_budget_minutes <= 0:
        raise InputError(f"training config: time_budget_minutes must be positive, got {cfg.time_budget_minutes}")
    if cfg.lumen_erosion_px < 1 or cfg.lumen_erosion_px % 2 == 0:
        raise InputError(f"training config: lumen_erosion_px must be a positive odd integer, got {cfg.lumen_erosion_px}")
    if cfg.lumen_labels and "Lumen-INST" in cfg.untrained_heads:
        raise InputError("training config: lumen_labels trains Lumen-INST; remove it from untrained_heads")
    if not 0.0 <= float(cfg.refit_gland_cells) <= 1.0:
        raise InputError(f"training config: refit_gland_cells is a share of a cell (0 = off ... 1), got {cfg.refit_gland_cells}")
    lo, hi = cfg.scale_range
    if not 0 < lo <= hi:
        raise InputError(f"training config: scale_range must be 0 < low <= high, got {cfg.scale_range}")
    return cfg


def load_config(path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
    """Read a training config (``.yaml``/``.yml``/``.json``) and apply ``overrides`` (None = keep).

    Relative paths inside the file are taken relative to the parent of the file's folder (the
    repository root for ``configs/*.yaml``).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read training config {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"training config {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"training config {path} must hold a mapping, got {type(data).__name__}")
    if "stages" in data:  # a recipe (wsi_mtl.train._recipe): its shared settings; the stages run with run_recipe
        data = {k: v for k, v in data.items() if k != "stages" and not str(k).startswith("_")}
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return _validate(data, path.resolve().parent.parent)


def load_split(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a validation split file: source name -> list of image names or file paths."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read split file {path}: {exc}") from None
    if not isinstance(data, Mapping):
        raise InputError(f"split file {path} must hold a mapping of source -> list of names")
    unknown = sorted(set(data) - set(SOURCES))
    if unknown:
        raise InputError(f"split file {path}: unknown sources {unknown}; known: {list(SOURCES)}")
    out = {s: [str(x) for x in (data.get(s) or [])] for s in SOURCES}
    for s, names in out.items():
        if len(set(names)) != len(names):
            raise InputError(f"split file {path}: duplicate names under {s}")
    return out
