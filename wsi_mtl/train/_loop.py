"""The multi-task training loop: task-balanced batches, masked losses, resumable checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..devices import cpu_has_bf16
from ..errors import InputError, ModelError
from ..network import ModelConfig, MultiTaskNet, create_model, get_model_config, save_model
from ..network.config import PATCH_POOLS
from ..network.model import patch_head_inputs
from ._augment import hed_jitter, random_blur
from ._average import average_models
from ._config import TrainConfig
from ._data import SEG_HEADS, Sources, load_sources, sample_cls, sample_seg
from ._evaluate import evaluate_sources, glas_native_truth, heads_only
from ._losses import patch_loss, seg_loss

__all__ = ["Batch", "make_seg_batch", "make_cls_batch", "train_step", "train", "heads_only", "TrainResult", "score_of", "UNTRAINED_HEADS", "load_initial_weights"]

logger = logging.getLogger(__name__)

#: Heads no source supervises: they keep their initial weights and are never computed in training.
UNTRAINED_HEADS: tuple[str, ...] = ("Lumen-INST",)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


@dataclass
class Batch:
    """A training batch: images (N, 3, H, W) float 0-255, seg targets (N, H, W) uint8, patch labels (N,) long (-1 = none)."""

    kind: str
    images: torch.Tensor
    seg: dict[str, torch.Tensor]
    patch: dict[str, torch.Tensor]


def _pick(rng: np.random.Generator, mixture: Mapping[str, float], available: Mapping[str, Sequence[Any]]) -> str:
    tasks = [t for t, w in mixture.items() if w > 0 and available.get(t)]
    if not tasks:
        raise InputError(f"no training data for any task of {dict(mixture)}")
    w = np.array([mixture[t] for t in tasks], float)
    return tasks[int(rng.choice(len(tasks), p=w / w.sum()))]


def _pick_item(rng: np.random.Generator, items: Sequence[Any], sources: Mapping[str, float] | None) -> Any:
    """One of ``items``: uniformly, or a source drawn by its weight in ``sources`` first (sources
    without items are skipped)."""
    if sources:
        by: dict[str, list[Any]] = {}
        for it in items:
            by.setdefault(it.source, []).append(it)
        names = [s for s, w in sources.items() if float(w) > 0 and by.get(s)]
        if names:
            w = np.array([float(sources[s]) for s in names])
            items = by[names[int(rng.choice(len(names), p=w / w.sum()))]]
    return items[int(rng.integers(len(items)))]


def make_seg_batch(rng: np.random.Generator, data: Sources, cfg: TrainConfig, patch_heads: Sequence[str], *, task: str | None = None) -> Batch:
    """A segmentation batch of one ``task``, or (None) each sample from a task of ``cfg.seg_mixture``.

    A named task uses its ``cfg.task_crop_px`` / ``cfg.task_batch`` when set.
    """
    crop_px = int(cfg.task_crop_px.get(task, cfg.seg_crop_px)) if task is not None else cfg.seg_crop_px
    n = int(cfg.task_batch.get(task, cfg.seg_batch)) if task is not None else cfg.seg_batch
    imgs, tgts, patches = [], {h: [] for h in SEG_HEADS}, {h: [] for h in patch_heads}
    if task is not None and not data.seg.get(task):
        raise InputError(f"no training data for task {task!r}")
    fixed = task
    for _ in range(n):
        task = fixed or _pick(rng, cfg.seg_mixture, data.seg)
        item = _pick_item(rng, data.seg[task], cfg.source_mixture.get(task))
        img, t, p = sample_seg(rng, item, crop_px=crop_px, scale_range=cfg.scale_range, nuclei_erosion_px=cfg.nuclei_erosion_px, gland_erosion_px=cfg.gland_erosion_px,
                               lumen_erosion_px=cfg.lumen_erosion_px)
        imgs.append(img)
        for h in SEG_HEADS:
            tgts[h].append(t[h])
        for h in patch_heads:
            patches[h].append(p.get(h, -1))
    return Batch(
        "seg",
        torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float(),
        {h: torch.from_numpy(np.stack(v)) for h, v in tgts.items()},
        {h: torch.tensor(v, dtype=torch.long) for h, v in patches.items()},
    )


def make_cls_batch(rng: np.random.Generator, data: Sources, cfg: TrainConfig, patch_heads: Sequence[str]) -> Batch:
    """A classification batch mixing the tasks of ``cfg.cls_mixture``; each sample labels one patch head."""
    imgs, patches = [], {h: [] for h in patch_heads}
    for _ in range(cfg.cls_batch):
        task = _pick(rng, cfg.cls_mixture, data.cls)
        items = data.cls[task]
        item = items[int(rng.integers(len(items)))]
        imgs.append(sample_cls(rng, item, crop_px=cfg.cls_crop_px, scale_range=cfg.scale_range))
        for h in patch_heads:
            patches[h].append(item.label if h == item.head else -1)
    return Batch("cls", torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float(), {}, {h: torch.tensor(v, dtype=torch.long) for h, v in patches.items()})


def _autocast(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def compute_losses(model: MultiTaskNet, batch: Batch, *, dice_weight: float = 1.0, weights: Mapping[str, float] | None = None, bf16: bool = False,
                   untrained: Sequence[str] = UNTRAINED_HEADS) -> dict[str, torch.Tensor]:
    """Forward ``batch`` through the heads it has labels for (not the ``untrained`` ones); a loss per labelled head (weighted)."""
    weights = weights or {}
    cfg_heads = model.config.heads
    seg = [h for h, t in batch.seg.items() if h in cfg_heads and h not in untrained and bool((t != 255).any())]
    patch = [h for h, t in batch.patch.items() if h in cfg_heads and bool((t >= 0).any())]
    if not seg and not patch:
        return {}
    x = batch.images
    if getattr(model, "_channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    with heads_only(model, seg + patch), _autocast(bf16):
        out = model(x)
    losses = {}
    for h in seg:
        losses[h] = float(weights.get(h, 1.0)) * seg_loss(out[h], batch.seg[h], dice_weight=dice_weight)
    for h in patch:
        losses[h] = float(weights.get(h, 1.0)) * patch_loss(out[h], batch.patch[h])
    return losses


def train_step(model: MultiTaskNet, optimizer: torch.optim.Optimizer, batch: Batch, *, generator: torch.Generator | None = None, cfg: TrainConfig | None = None) -> dict[str, float]:
    """One optimisation step on ``batch`` (photometric augmentation applied here); losses as floats."""
    cfg = cfg or TrainConfig()
    model.train()
    _freeze_batchnorm(model, cfg.trainable)
    if cfg.hed_sigma > 0 or cfg.hed_bias > 0:
        batch.images = hed_jitter(batch.images, sigma=cfg.hed_sigma, bias=cfg.hed_bias, generator=generator)
    if cfg.blur_p > 0:
        batch.images = random_blur(batch.images, p=cfg.blur_p, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    losses = compute_losses(model, batch, dice_weight=cfg.dice_weight, weights=cfg.loss_weights, bf16=cfg.bf16, untrained=cfg.untrained_heads)
    if not losses:
        return {}
    total = sum(losses.values())
    if total.requires_grad:  # type: ignore[union-attr]  # False when every head of the batch is frozen (``trainable``)
        total.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 5.0)
        optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()} | {"total": float(total.detach())}  # type: ignore[union-attr]


def _lr_factor(step: int, cfg: TrainConfig, horizon: int | None = None) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` at ``horizon`` (default ``cfg.steps``)."""
    total = cfg.steps if horizon is None else horizon
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it (as recorded in config.json), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _config_of_state(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """``config`` shaped as the weights in ``state`` are: each patch head's pool (the one whose
    :func:`~wsi_mtl.network.model.patch_head_inputs` is the width of its first layer), and the
    fine branches and private shallow encoders (``ArchParams.fine_decoders`` / ``fine_channels``,
    ``private_decoders`` / ``private_stages``) the state holds."""
    heads = dict(config.heads)
    fine: dict[str, int] = {}
    private: dict[str, int] = {}
    for name, head in config.heads.items():
        if head.kind == "patch":
            w = state.get(f"decoder_head.{head.decoder}.bn1.weight")
            fits = [p for p in PATCH_POOLS if w is not None and w.ndim == 1 and int(w.shape[0]) == patch_head_inputs(config.arch_params, p)]
            if fits:
                heads[name] = replace(head, pool=fits[0])
        else:
            w = state.get(f"output_head.{head.decoder}.{head.out_key}.fine.out.weight")
            if w is not None and w.ndim == 4:
                fine[head.decoder] = int(w.shape[1])
            if f"private_encoder.{head.decoder}.conv1.weight" in state:
                private[head.decoder] = 1 + sum(f"private_encoder.{head.decoder}.layer{i}.0.conv1.weight" in state for i in (1, 2, 3))
    arch = replace(
        config.arch_params,
        fine_decoders=tuple(fine),
        fine_channels=next(iter(fine.values()), config.arch_params.fine_channels),
        private_decoders=tuple(private),
        private_stages=next(iter(private.values()), config.arch_params.private_stages),
    )
    return config.replace(heads=heads, arch_params=arch)


def _folder_config(folder: str | os.PathLike[str] | None) -> ModelConfig | None:
    """The ``ModelConfig`` of a model folder (``init_from``); None where there is none or it does not parse."""
    from ..network.io import CONFIG_FILE

    path = None if folder is None else Path(folder) / CONFIG_FILE
    if path is None or not path.is_file():
        return None
    try:
        return ModelConfig.from_json(path.read_text())
    except (OSError, ModelError):
        return None  # load_initial_weights reports what is wrong with the folder


def _initial_config(cfg: TrainConfig, start: Mapping[str, torch.Tensor] | None = None) -> ModelConfig:
    """The arch's config shaped as the weights the run starts from (patch-head pools, fine
    branches, private encoders: :func:`_config_of_state`), then the config's own ``arch_params``
    changes (e.g. a fine branch to add). ``start``: the state of the run's checkpoint when it
    resumes, else of ``init_from``; None reads ``init_from`` (if any) here."""
    if start is None and cfg.init_from is not None:
        try:
            start, _ = _read_initial(cfg.init_from)
        except InputError:
            start = None  # load_initial_weights reports what is wrong with the source
    config = get_model_config(cfg.arch)
    if start is not None:
        config = _config_of_state(config, start)
    if not cfg.arch_params:
        return config
    try:
        config = config.replace(arch_params=replace(config.arch_params, **cfg.arch_params))
    except (TypeError, ModelError) as exc:
        raise InputError(f"training config: arch_params {dict(cfg.arch_params)} do not fit arch {cfg.arch!r}: {exc}") from None
    for field in ("fine_decoders", "private_decoders"):
        stray = sorted(set(getattr(config.arch_params, field)) - set(config.seg_decoders))
        if stray:
            raise InputError(f"training config: arch_params {field} {stray} do not fit arch {cfg.arch!r}: its decoders are {config.seg_decoders}")
    return config


def _read_initial(source: str | os.PathLike[str]) -> tuple[Mapping[str, torch.Tensor], int]:
    """The weights of a model folder or a run's ``.pt`` checkpoint, and the training steps it had."""
    path = Path(source)
    if path.is_dir():
        from ..network import load_model

        src = load_model(path)
        return src.state_dict(), int(src.config.extra.get("training", {}).get("steps", 0))
    if not path.is_file():
        raise InputError(f"init_from {path}: no such model folder or checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the user's input error
        raise InputError(f"init_from {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    state = ck.get("model", ck) if isinstance(ck, Mapping) else None
    if not isinstance(state, Mapping):
        raise InputError(f"init_from {path}: no model weights in the checkpoint")
    return state, int(ck.get("step", 0))


def load_initial_weights(model: MultiTaskNet, source: str | os.PathLike[str], *, initial: tuple[Mapping[str, torch.Tensor], int] | None = None,
                         copy_modules: Mapping[str, str] | None = None) -> int:
    """Copy weights into ``model`` from a model folder or a run's ``.pt`` checkpoint (fine-tuning).

    Returns the number of training steps the source had (0 when it does not say). A missing
    source, or one whose tensors do not fit ``model``, is an :class:`~wsi_mtl.errors.InputError`.
    Parts the source lacks that this run adds start so that the network computes what the
    source did: fine branches (``ArchParams.fine_decoders``) keep their zero start, private shallow
    encoders (``private_decoders``) copy the source's shared ``backbone``. ``initial``: the
    source's ``(state, steps)`` when the caller has read them already. ``copy_modules``
    (destination -> source module): modules that start as copies of the source's other modules.
    """
    state, steps = _read_initial(source) if initial is None else initial
    path = Path(source)
    own = model.state_dict()
    new = {k: own[k] for k in own if k not in state and ".fine." in k}
    for dst, src in (copy_modules or {}).items():
        keys = [k for k in own if k.startswith(dst + ".")]
        if not keys:
            raise InputError(f"training config: copy_modules names no module of the network: {dst!r}")
        for k in keys:
            other = src + k[len(dst):]
            if other not in state or tuple(state[other].shape) != tuple(own[k].shape):
                raise InputError(f"training config: copy_modules {dst!r} <- {src!r}: {other} missing or of another shape")
            new[k] = state[other]
    for k in own:
        if k not in state and k.startswith("private_encoder."):
            shared = "backbone." + k.split(".", 2)[2]
            if shared in state:
                new[k] = state[shared]
    bad = [k for k in own if k not in new and (k not in state or tuple(state[k].shape) != tuple(own[k].shape))]
    if bad:
        raise InputError(f"init_from {path}: weights do not fit arch {model.config.arch!r} (first mismatch: {bad[0]})")
    if new:
        logger.info("init_from %s: %d tensors of new fine branches / private encoders start from zero / the shared encoder", path, len(new))
    model.load_state_dict({k: state[k] for k in own if k not in new} | new)
    return steps


def score_of(metrics: Mapping[str, Any]) -> float:
    """One number to pick the best checkpoint: mean of nuclei AJI (per source of ``nuclei_all``),
    gland F1, type macro F1 (CoNSeP's too) and the tissue accuracies that were measured."""
    vals = []
    if "nuclei" in metrics:
        vals.append(metrics["nuclei"]["aji"])
    for src in metrics.get("nuclei_all", {}).get("by_source", {}).values():
        vals.append(src["aji"])
    for typed in metrics.get("nuclei_all", {}).get("types", {}).values():
        vals.append(typed["macro_f1"])
    if "glands" in metrics:
        vals.append(metrics["glands"]["f1"])
    if "nuclei_type" in metrics:
        vals.append(metrics["nuclei_type"]["macro_f1"])
    for t in metrics.get("tissue", {}).values():
        vals.append(t["accuracy"])
    vals = [v for v in vals if isinstance(v, float) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    return {"numpy": json.dumps(rng.bit_generator.state), "torch_gen": gen.get_state(), "torch_global": torch.get_rng_state()}


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: final step, wall seconds of this call, last validation metrics, exported folder."""

    step: int
    seconds: float
    metrics: dict[str, Any]
    model_dir: Path | None


def _within(name: str, modules: Sequence[str]) -> bool:
    """Whether the parameter or module ``name`` lies inside one of the dotted module paths."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _trainable(model: MultiTaskNet, only: Sequence[str] = (), untrained: Sequence[str] = UNTRAINED_HEADS) -> list[torch.nn.Parameter]:
    """The parameters to optimise: all but the ``untrained`` heads' (and, with ``only``, those inside
    these modules); the others get ``requires_grad=False``."""
    skip = {model.config.heads[h].decoder for h in untrained if h in model.config.heads}
    names = dict(model.named_modules())
    unknown = [m for m in only if m not in names]
    if unknown:
        raise InputError(f"training config: trainable names no module of the network: {unknown[0]!r} (e.g. backbone, decoder_head.Nuclei, output_head.Nuclei)")
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        untrained = len(parts) > 1 and parts[0] in ("decoder_head", "output_head") and parts[1] in skip
        if untrained or (only and not _within(name, only)):
            p.requires_grad_(False)
            continue
        out.append(p)
    return out


def _freeze_batchnorm(model: MultiTaskNet, only: Sequence[str]) -> None:
    """Put the BatchNorm layers outside the ``only`` modules in eval mode (their statistics stay)."""
    if not only:
        return
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not _within(name, only):
            m.eval()


def train(cfg: TrainConfig, *, max_minutes: float | None = None, progress: bool = True, export: bool = True) -> TrainResult:
    """Train (or resume) the model described by ``cfg``; validate every ``steps_per_epoch`` steps.

    The run folder holds ``checkpoint.pt`` (weights, optimiser, step, RNG states; resumed when
    present), ``best.pt`` (weights of the best validation score), ``metrics.jsonl`` (one line per
    validation) and ``config.json``. At the end the final weights are saved with
    :func:`~wsi_mtl.network.save_model` into ``cfg.output_model`` (unless ``export`` is False).
    ``max_minutes`` stops early (after a checkpoint) so that a later call resumes.
    With ``cfg.time_budget_minutes`` the LR schedule ends (and training stops) at the step that the
    pace measured so far affords within that budget (capped at ``cfg.steps``), so a slow or busy
    machine still gets a complete schedule; the horizon is kept in the checkpoint.
    """
    if cfg.average_with:
        raise InputError("average_with is for re-tuning (--tune-only, or a tune_only recipe stage), not for training")
    t_start = time.monotonic()
    torch.set_num_threads(max(1, int(cfg.threads)))
    if cfg.bf16 and not cpu_has_bf16():
        logger.warning("bf16: true, but this CPU has no native bf16 (avx512_bf16 / amx): autocast emulates it, "
                       "slower than fp32 here; set bf16: false or auto for speed")
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    ckpt_path = run / CHECKPOINT
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.exists() else None
    initial = _read_initial(cfg.init_from) if ck is None and cfg.init_from is not None else None  # read once
    start = ck["model"] if ck is not None else None if initial is None else initial[0]
    model = create_model(_initial_config(cfg, start), seed=cfg.seed)
    if cfg.channels_last:
        model.set_channels_last(True)
    params = _trainable(model, cfg.trainable, cfg.untrained_heads)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    step = 0
    best = -math.inf
    train_seconds = 0.0  # wall time spent in the loop (steps + validation), summed over resumes
    horizon = cfg.steps  # the step the LR schedule ends at; shrunk to fit time_budget_minutes
    init: dict[str, Any] = {}  # where a fine-tuning run started from (kept in its checkpoints)
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        best = float(ck.get("best", -math.inf))
        train_seconds = float(ck.get("train_seconds", 0.0))
        init = dict(ck.get("init", {}))
        if cfg.time_budget_minutes is not None:
            horizon = min(cfg.steps, int(ck.get("horizon", cfg.steps)))
        rng.bit_generator.state = json.loads(ck["rng"]["numpy"])
        gen.set_state(ck["rng"]["torch_gen"])
        torch.set_rng_state(ck["rng"]["torch_global"])
        logger.info("resumed %s at step %d", ckpt_path, step)
    elif cfg.init_from is not None:
        init_steps = load_initial_weights(model, cfg.init_from, initial=initial, copy_modules=cfg.copy_modules)
        init = {"from": _shown_path(cfg.init_from), "steps": init_steps}
        logger.info("initialised from %s (%d earlier steps)", cfg.init_from, init_steps)

    from ._config import load_split

    split = load_split(cfg.splits)
    mc = model.config
    lc_classes = list(mc.heads["Patch-LC25000"].class_names) if "Patch-LC25000" in mc.heads else ["lung_aca", "lung_n", "lung_scc"]
    t0 = time.monotonic()
    tasks = _loader_tasks(cfg)
    train_data = load_sources(Path(cfg.data_root), mpp=mc.mpp, source_mpp=cfg.source_mpp, split=split, part="train", lc_classes=lc_classes, radius_px=cfg.type_radius_px, background_px=cfg.type_background_px,
                              tasks=tasks, lumen=cfg.lumen_labels)
    val_data = load_sources(Path(cfg.data_root), mpp=mc.mpp, source_mpp=cfg.source_mpp, split=split, part="val", lc_classes=lc_classes, radius_px=cfg.type_radius_px, background_px=cfg.type_background_px,
                            tasks=tasks, lumen=cfg.lumen_labels)
    for task, n in cfg.val_limit.items():
        group = val_data.seg if task in val_data.seg else val_data.cls
        if task in group and len(group[task]) > n:
            items = group[task]
            group[task] = items[:: max(1, len(items) // n)][:n]  # type: ignore[index]
    logger.info("loaded data in %.1f s: train %s, val %s", time.monotonic() - t0, train_data.summary(), val_data.summary())
    _check_disjoint(train_data, val_data)
    gland_truth = glas_native_truth(Path(cfg.data_root), [i.name for i in val_data.seg.get("gland", [])])

    patch_heads = mc.patch_heads
    last_metrics: dict[str, Any] = {}
    deadline = None if max_minutes is None else t_start + 60.0 * max_minutes
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    running: dict[str, float] = {}
    stopped_early = False
    budget_s = None if cfg.time_budget_minutes is None else 60.0 * cfg.time_budget_minutes

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best, "rng": _rng_state(rng, gen),
                "train_seconds": train_seconds, "horizon": horizon, "init": init}

    t_loop = time.monotonic()
    base_seconds = train_seconds
    while step < horizon:
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg, horizon)
        kind = cfg.schedule[step % len(cfg.schedule)]
        if kind == "cls":
            batch = make_cls_batch(rng, train_data, cfg, patch_heads)
        else:
            batch = make_seg_batch(rng, train_data, cfg, patch_heads, task=None if kind == "seg" else kind)
        losses = train_step(model, optimizer, batch, generator=gen, cfg=cfg)
        for k, v in losses.items():
            running[k] = 0.95 * running.get(k, v) + 0.05 * v
        step += 1
        train_seconds = base_seconds + time.monotonic() - t_loop
        if budget_s is not None and step % 10 == 0:
            # Fit the schedule into the time budget: project the steps still affordable at the
            # mean pace so far (validation included), keeping 5% for the final validation.
            pace = train_seconds / step
            affordable = step + int(max(0.0, 0.95 * budget_s - train_seconds) / pace)
            new = min(cfg.steps, max(step + 1, affordable))
            if train_seconds >= budget_s:
                new = step
            if new != horizon:
                horizon = new
                bar.total = horizon
        bar.update(1)
        bar.set_postfix({k.replace("Patch-", "P-").replace("-INST", ""): f"{v:.3f}" for k, v in running.items()}, refresh=False)
        is_epoch_end = step % cfg.steps_per_epoch == 0 or step >= horizon
        if is_epoch_end:
            last_metrics = evaluate_sources(model, val_data, gland_truth=gland_truth, bf16=cfg.bf16)
            score = score_of(last_metrics)
            rec = {"step": step, "epoch": step // cfg.steps_per_epoch, "horizon": horizon, "lr": optimizer.param_groups[0]["lr"], "train_s": round(base_seconds + time.monotonic() - t_loop, 1), "train_loss": dict(running), "score": score, **last_metrics}
            with open(run / METRICS, "a") as fh:
                fh.write(json.dumps(rec, default=float) + "\n")
            logger.info("step %d validation: score %.4f %s", step, score, json.dumps({k: last_metrics[k] for k in last_metrics if k != "tissue"}, default=float)[:400])
            if math.isfinite(score) and score > best:
                best = score
                _save_atomic({"model": model.state_dict(), "step": step, "score": score, "train_seconds": train_seconds, "init": init}, run / BEST)
        train_seconds = base_seconds + time.monotonic() - t_loop
        if step % cfg.checkpoint_every == 0 or is_epoch_end:
            _save_atomic(state(), ckpt_path)
        if deadline is not None and time.monotonic() > deadline and step < horizon:
            _save_atomic(state(), ckpt_path)
            logger.warning("stopping at step %d: --max-minutes %.1f reached (run the same command again to continue)", step, max_minutes)
            stopped_early = True
            break
    bar.close()
    out_dir = None
    if export and cfg.output_model is not None and not stopped_early:
        out_dir = export_model(cfg, model, which="last")
    logger.info("finished at step %d after %.1f min in the loop", step, train_seconds / 60)
    return TrainResult(step, time.monotonic() - t_start, last_metrics, out_dir)


def export_model(cfg: TrainConfig, model: MultiTaskNet | None = None, *, which: str = "best") -> Path:
    """Save the ``best`` (or ``last``) weights of the run with ``save_model`` into ``cfg.output_model``.

    With ``cfg.tune_postprocess`` the post-processing thresholds are first tuned on training
    images (:func:`~wsi_mtl.train._tune.tune_postprocess`) and stored in the model's config.
    """
    run = Path(cfg.run_dir)
    path = run / (BEST if which == "best" else CHECKPOINT)
    if not path.exists():
        path = run / CHECKPOINT
    if not path.exists():
        raise InputError(f"no checkpoint in {run} to export")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if model is None:
        model = create_model(_config_of_state(get_model_config(cfg.arch), ck["model"]), seed=cfg.seed)
    model.load_state_dict(ck["model"])
    model.set_channels_last(False)
    model.eval()
    training: dict[str, Any] = {"steps": int(ck.get("step", 0)), "config": f"{cfg.name}", "untrained_heads": list(cfg.untrained_heads)}
    if cfg.lumen_labels:
        from ._lumen import LUMEN_RULE

        training["lumen_pseudo_labels"] = {"rule": "wsi_mtl.train._lumen.lumen_labels", **LUMEN_RULE}
    if cfg.ship_rule:
        training["ship_rule"] = dict(cfg.ship_rule)
    if "train_seconds" in ck:
        training["train_seconds"] = round(float(ck["train_seconds"]), 1)
    if ck.get("init"):
        training["init_from"] = dict(ck["init"])
    folder = _folder_config(cfg.init_from)  # read once, for the records and the settings it passes on
    earlier = _earlier_training(folder, training)
    if earlier:
        training["earlier"] = earlier
    extra = dict(model.config.extra)
    inherited = _init_postprocess(folder)
    if inherited:
        extra["postprocess"] = inherited
    # The training sources are read once, for every export step that needs them.
    tasks = set(_HEAD_REFIT_TASKS if cfg.refit_patch_heads else ()) | set(_tune_tasks(cfg) if cfg.tune_postprocess else ())
    data = None
    if cfg.refit_bn_batches > 0:
        data = _training_sources(cfg, model)  # every source: the BatchNorm refit draws the whole rotation
    elif tasks:
        data = _training_sources(cfg, model, tasks=sorted(tasks))
    if cfg.refit_bn_batches > 0:
        refit_batchnorm(model, cfg, data, batches=cfg.refit_bn_batches)
        training["batchnorm_refit_batches"] = int(cfg.refit_bn_batches)
    if cfg.refit_patch_heads:
        training["patch_head_refit"] = _refit_heads(cfg, model, data)
    if cfg.tune_postprocess:
        tuned = tune_on_training_images(cfg, model, data)
        # settings of a task not tuned here (no tuning images) stay as the init_from model had them
        extra["postprocess"] = {**inherited, **tuned["postprocess"]}
        training["postprocess_tuning"] = _tuning_record(cfg, tuned)
    _give_settings(cfg, extra, training)
    model.config = model.config.replace(extra=extra | {"training": training})
    assert cfg.output_model is not None
    save_model(model, cfg.output_model, trained=True)
    logger.info("exported %s weights of step %s to %s", which, ck.get("step"), cfg.output_model)
    return Path(cfg.output_model)


def _refit_heads(cfg: TrainConfig, model: MultiTaskNet, data: Sources) -> dict[str, dict[str, Any]]:
    """Refit the config's patch heads on frozen features (``refit_heads``, ``refit_gland_cells``); the report."""
    from ._heads import refit_patch_heads, refit_summary

    report = refit_patch_heads(model, data, seed=cfg.seed, bf16=cfg.bf16, heads=list(cfg.refit_heads) or None,
                               gland_share=float(cfg.refit_gland_cells))
    return refit_summary(report)


def _give_settings(cfg: TrainConfig, extra: dict[str, Any], training: dict[str, Any]) -> None:
    """Write the config's given ``postprocess`` settings over the model's (and record them)."""
    if cfg.postprocess:
        extra["postprocess"] = {**dict(extra.get("postprocess") or {}), **cfg.postprocess}
        training["postprocess_given"] = dict(cfg.postprocess)


def _tuning_record(cfg: TrainConfig, tuned: Mapping[str, Any]) -> dict[str, Any]:
    """What ``config.json`` keeps of a post-processing tuning: scores, image counts, sources."""
    record: dict[str, Any] = {"scores": tuned["scores"], "n_images": tuned["n_images"], "images": "training images (never the validation split)"}
    if cfg.tune_sources:
        record["sources"] = {k: list(v) for k, v in cfg.tune_sources.items()}
    return record


def retune_model(cfg: TrainConfig) -> Path:
    """Re-tune the post-processing of the model saved in ``cfg.output_model`` on training images
    (``cfg.tune_images`` / ``cfg.tune_sources``; none where every count is 0) and rewrite its
    ``config.json`` (atomically), the config's ``postprocess`` settings written over the result.
    Settings of a task without tuning images are kept. The weights file is not touched, except
    with ``cfg.refit_patch_heads``: the patch heads are first refit on frozen features. With
    ``cfg.average_with``, ``cfg.output_model`` is first written as ``init_from`` averaged with it."""
    from ..atomic import atomic_path
    from ..network import load_model
    from ..network.io import CONFIG_FILE

    folder = Path(cfg.output_model) if cfg.output_model is not None else None
    if cfg.average_with and folder is not None:
        if cfg.init_from is None:
            raise InputError("average_with averages init_from with another model: set init_from")
        start, other = Path(cfg.init_from), Path(cfg.average_with["model"])
        average_models(start, other, float(cfg.average_with["weight"]), folder, shown={"start": _shown_path(start), "model": _shown_path(other)})
    if folder is None or not (folder / CONFIG_FILE).is_file():
        raise InputError(f"no model folder at {cfg.output_model} to re-tune")
    if cfg.refit_patch_heads:
        _refit_folder(cfg, folder)
    config = ModelConfig.from_json((folder / CONFIG_FILE).read_text())  # as written: not the loaded model's
    extra = dict(config.extra)
    training = dict(extra.get("training") or {})
    if any(int(n) > 0 for n in cfg.tune_images.values()):
        model = load_model(folder)  # for inference (BatchNorm folded): only its maps are used
        tuned = tune_on_training_images(cfg, model)
        extra["postprocess"] = {**dict(extra.get("postprocess") or {}), **tuned["postprocess"]}
        record = _tuning_record(cfg, tuned)
        if "postprocess_tuning" in training:
            record["previous"] = training["postprocess_tuning"]  # the tuning this one replaces
        training["postprocess_tuning"] = record
    _give_settings(cfg, extra, training)
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(config.replace(extra=extra | {"training": training}).to_json() + "\n")
    logger.info("re-tuned %s: %s", folder, extra.get("postprocess"))
    return folder


def _refit_folder(cfg: TrainConfig, folder: Path) -> None:
    """Refit the patch heads of the model saved in ``folder`` (no training) and save its weights."""
    from ..network import load_model

    model = load_model(folder).fold_bn(False).set_channels_last(False).eval()  # the weights as trained
    report = _refit_heads(cfg, model, _training_sources(cfg, model, tasks=sorted(_HEAD_REFIT_TASKS)))
    training = {**dict(model.config.extra.get("training") or {}), "patch_head_refit": report}
    model.config = model.config.replace(extra={**model.config.extra, "training": training})
    save_model(model, folder, trained=model.config.trained)


def _earlier_training(folder: ModelConfig | None, own: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The training records of the stages an ``init_from`` model folder (its config) came from,
    oldest first.

    A model fine-tuned in stages keeps every stage's record in ``extra.training.earlier`` (a
    checkpoint ``init_from`` carries none). A folder that already holds this run's own export
    (exported twice) adds nothing."""
    prev = None if folder is None else folder.extra.get("training")
    if not isinstance(prev, Mapping):
        return []
    prev = dict(prev)
    earlier = [dict(e) for e in prev.pop("earlier", []) if isinstance(e, Mapping)]
    if all(prev.get(k) == own.get(k) for k in ("config", "steps", "init_from")):
        return earlier
    return [*earlier, prev]


def _init_postprocess(folder: ModelConfig | None) -> dict[str, Any]:
    """The tuned post-processing settings of an ``init_from`` model folder's config ({} otherwise)."""
    pp = None if folder is None else folder.extra.get("postprocess")
    return dict(pp) if isinstance(pp, Mapping) else {}


#: The heads each schedule entry trains (and so the decoders whose BatchNorm it feeds).
_ENTRY_HEADS: dict[str, tuple[str, ...]] = {
    "nuclei": ("Nuclei-INST",),
    "nuclei_binary": ("Nuclei-INST",),
    "nuclei_split": ("Nuclei-INST",),
    "nuclei_all": ("Nuclei-INST", "Nuclei-TYPE"),
    "nuclei_type": ("Nuclei-TYPE",),
    "gland": ("Gland-INST", "Patch-GlaS"),
    "cls": ("Patch-Class", "Patch-LC25000"),
}


def _loader_tasks(cfg: TrainConfig) -> list[str] | None:
    """The loader tasks a run reads: all of the defaults (None), or, where the schedule or the
    segmentation mixture draws ``gland_negative``, only the tasks the schedule draws (training and
    validation alike)."""
    wants = "gland_negative" in cfg.schedule or float(cfg.seg_mixture.get("gland_negative", 0)) > 0
    wants = wants or "nuclei_all" in cfg.schedule or float(cfg.seg_mixture.get("nuclei_all", 0)) > 0  # opt-in task, as gland_negative
    if not wants:
        return None
    drawn: list[str] = []
    for entry in cfg.schedule:
        mix = cfg.seg_mixture if entry == "seg" else cfg.cls_mixture if entry == "cls" else {entry: 1.0}
        drawn += [t for t, w in mix.items() if float(w) > 0 and t not in drawn]
    return drawn


def _training_sources(cfg: TrainConfig, model: MultiTaskNet, tasks: Sequence[str] | None = None) -> Sources:
    from ._config import load_split

    mc = model.config
    lc = list(mc.heads["Patch-LC25000"].class_names) if "Patch-LC25000" in mc.heads else ["lung_aca", "lung_n", "lung_scc"]
    return load_sources(Path(cfg.data_root), mpp=mc.mpp, source_mpp=cfg.source_mpp, split=load_split(cfg.splits), part="train", lc_classes=lc, tasks=tasks,
                        lumen=cfg.lumen_labels)


@torch.no_grad()
def refit_batchnorm(model: MultiTaskNet, cfg: TrainConfig, data: Sources, *, batches: int, seed: int | None = None) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches``
    training batches drawn as in training (the schedule's rotation, no photometric jitter).

    Each step of training is one task, so the encoder's batch statistics swing between tasks and
    the exponential running averages mostly remember the last few steps; evaluation then
    normalises with statistics that match no task. Here each decoder sees only its own task's
    batches (as in training) and the encoder all of them, equally weighted over the rotation.
    Weights are unchanged; the model is left in eval mode.
    """
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and any(f".{h}." in f".{n}." for h in _untrained_decoders(model))}
    for m in bns:
        if m not in frozen.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    try:
        for i in range(batches):
            kind = cfg.schedule[i % len(cfg.schedule)]
            if kind == "cls":
                batch = make_cls_batch(rng, data, cfg, model.config.patch_heads)
                heads = list(_ENTRY_HEADS["cls"])
            else:
                batch = make_seg_batch(rng, data, cfg, model.config.patch_heads, task=None if kind == "seg" else kind)
                heads = list(_ENTRY_HEADS.get(kind, ("Nuclei-INST", "Gland-INST", "Nuclei-TYPE")))
            heads = [h for h in heads if h in model.config.heads]
            x = batch.images.contiguous(memory_format=torch.channels_last) if getattr(model, "_channels_last", False) else batch.images
            with _autocast(cfg.bf16):
                model(x, heads=heads)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def _untrained_decoders(model: MultiTaskNet) -> set[str]:
    return {model.config.heads[h].decoder for h in UNTRAINED_HEADS if h in model.config.heads}


#: Training sources the export's patch-head refit and threshold tuning read.
_HEAD_REFIT_TASKS: tuple[str, ...] = ("gland", "lc25000", "kather2016")


def _tune_tasks(cfg: TrainConfig) -> list[str]:
    """The loader tasks threshold tuning reads: the nuclei images (task ``nuclei``, or every nuclei
    source with ``tune_images: {nuclei_all: N}``) and GlaS."""
    return ["nuclei_all" if int(cfg.tune_images.get("nuclei_all", 0)) > 0 else "nuclei", "gland"]


def tune_on_training_images(cfg: TrainConfig, model: MultiTaskNet, data: Sources | None = None) -> dict[str, Any]:
    """Tune post-processing on ``cfg.tune_images`` training images per task (evenly spaced, from
    ``cfg.tune_sources`` where it names the task's sources);
    ``data``: training sources already loaded (read here otherwise)."""
    from ._tune import tune_postprocess

    nuclei = _tune_tasks(cfg)[0]
    if data is None or nuclei not in data.seg:
        data = _training_sources(cfg, model, tasks=_tune_tasks(cfg))

    def of_sources(task: str) -> list[Any]:
        items = data.seg.get(nuclei if task == "nuclei" else task, [])
        wanted = cfg.tune_sources.get(task)
        if not wanted:
            return list(items)
        chosen = [it for it in items if it.source in set(wanted)]
        if not chosen and int(cfg.tune_images.get(task, 1)) > 0:
            raise InputError(f"tune_sources: no {task} training images from {list(wanted)} (sources here: {sorted({it.source for it in items})})")
        return chosen

    def spread(items: list[Any], n: int) -> list[Any]:
        return items if len(items) <= n else [items[int(i)] for i in np.linspace(0, len(items) - 1, n)]

    with_lumen = [it for it in of_sources("gland") if it.lumen is not None]
    return tune_postprocess(
        model,
        spread(of_sources("nuclei"), int(cfg.tune_images.get(nuclei, 25))),
        spread(of_sources("gland"), int(cfg.tune_images.get("gland", 24))),
        bf16=cfg.bf16,
        lumen=spread(with_lumen, int(cfg.tune_images.get("lumen", 0))),
        setting=spread(of_sources("gland"), int(cfg.tune_images.get("gland_setting", 0))),
    )


def _check_disjoint(a: Sources, b: Sources) -> None:
    for task in set(a.seg) & set(b.seg):
        both = {(i.source, i.name) for i in a.seg[task]} & {(i.source, i.name) for i in b.seg[task]}
        if both:
            raise InputError(f"validation images also in training ({task}): {sorted(both)[:3]}")
    for task in set(a.cls) & set(b.cls):
        both = {i.name for i in a.cls[task]} & {i.name for i in b.cls[task]}
        if both:
            raise InputError(f"validation images also in training ({task}): {sorted(both)[:3]}")
