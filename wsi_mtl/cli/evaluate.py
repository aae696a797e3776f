"""``wsimtl evaluate``: score a model on labelled tiles (by default the held-out validation split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._options import (
    allow_untrained_option,
    check_model,
    deprecated_option,
    json_option,
    model_option,
    parse_settings,
    postprocess_option,
    precision_option,
    quiet_option,
    tta_option,
)

#: The default validation split: the repository's training config (a source checkout), else ./configs.
_CONFIG_NAME = Path("configs") / "wsimtl-small.yaml"
_REPO_CONFIG = Path(__file__).resolve().parents[2] / _CONFIG_NAME
SPLIT_TASKS = ("nuclei", "glands", "nuclei_type", "tissue", "non_gland", "glass")
TILE_TASKS = ("nuclei", "glands", "tissue")
#: Split tasks scored only when named: nuclei_all = AJI/PQ per nuclei source and CoNSeP type F1 (issue 17).
OPT_IN_TASKS = ("nuclei_all",)


@click.command("evaluate")
@model_option
@allow_untrained_option
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training config whose data_root, splits and source_mpp to use (default: configs/wsimtl-small.yaml of the "
                   "wsimtl source checkout, or of the current folder).")
@click.option("--split", "split_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Split file listing the labelled tiles per source (default: the config's).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Folder with the labelled data (layout of ../shared/data).")
@click.option("--task", "task", default=None, metavar="TASK[,TASK...]",
              help=f"What to score: on the split any of {', '.join(SPLIT_TASKS)} (default: all), or {', '.join(OPT_IN_TASKS)} (scored only when named: "
                   f"AJI/PQ per nuclei source, CoNSeP nuclear-type F1); with --tiles the one task "
                   f"the labels are for ({', '.join(TILE_TASKS)}).")
@deprecated_option("--tasks", "old_tasks", use="--task", default=None)
@click.option("--tiles", "tiles_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Score your own labelled tiles instead of the split: DIR/images + DIR/labels (nuclei, glands) or DIR/labels.csv (tissue).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None, help="With --tiles: microns per pixel of the tiles.")
@click.option("--head", default=None, help="With --tiles --task tissue: the patch head to score (e.g. Patch-Class).")
@json_option
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Also write the metrics as JSON to FILE.")
@click.option("--per-image", is_flag=True, help="Include per-image scores in the JSON.")
@precision_option
@deprecated_option("--bf16/--no-bf16", "old_bf16", use="--precision", default=None)
@tta_option
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@postprocess_option
@quiet_option
@deprecated_option("--progress/--no-progress", "old_progress", use="-q/--quiet", default=None)
def evaluate(model: str | None, allow_untrained: bool, config: Path | None, split_path: Path | None, data_root: Path | None,
             task: str | None, old_tasks: str | None, tiles_dir: Path | None, mpp: float | None, head: str | None, as_json: bool,
             metrics_path: Path | None, per_image: bool, precision: str, old_bf16: bool | None, tta: str, threads: int | None,
             postprocess: tuple[str, ...], quiet: bool, old_progress: bool | None) -> None:
    """Score a model: nuclei Dice/AJI/PQ, GlaS gland object F1/Dice/Hausdorff, nuclear type F1, tissue accuracy.

    By default on the held-out validation split of the training data (configs/wsimtl-small.yaml of a
    source checkout); with --tiles on your own labelled tiles (post-processing as `wsimtl segment`).
    """
    from ..errors import InputError
    from ..postprocess import check_overrides

    overrides = check_overrides(parse_settings(postprocess))  # before the model and data load
    tasks = _tasks(task or old_tasks, tiles=tiles_dir is not None)
    if tiles_dir is None and config is None and (split_path is None or data_root is None):
        config = _default_config()
    check_model(model, allow_untrained=allow_untrained)
    model_name, json_path = model, metrics_path
    progress = not quiet and old_progress is not False
    if old_bf16 is not None:
        precision = "bf16" if old_bf16 else "fp32"
    import torch

    from ..engine import resolve_precision
    from ..network import load_model
    from ..train import evaluate_split, load_config, load_split
    from ..postprocess import params_of

    bf16 = resolve_precision(torch.device("cpu"), precision) is not None  # evaluation runs on the CPU
    tile_task = tasks[0] if tiles_dir is not None else None
    if threads:
        torch.set_num_threads(threads)
    if tiles_dir is not None:
        result = _evaluate_tiles(model_name, tiles_dir, tile_task, mpp, head, bf16=bf16, progress=progress, per_image=per_image, tta=int(tta),
                                 overrides=overrides)
        _report(result, as_json, json_path, quiet=quiet)
        return
    cfg = load_config(config) if config is not None else None
    split_file = split_path or (cfg.splits if cfg is not None else None)
    root = data_root or (cfg.data_root if cfg is not None else None)
    if split_file is None or root is None:
        raise InputError("no split or data folder: pass --config, or --split and --data-root")
    net = load_model(model_name)
    params = params_of(net).with_overrides(overrides)
    result = evaluate_split(net, data_root=Path(root), split=load_split(split_file), source_mpp=cfg.source_mpp if cfg else None,
                            tasks=tasks, bf16=bf16, progress=progress, per_image=per_image, tta=int(tta), params=params)
    result = {"model": net.config.name, "trained": net.config.trained, "weights_sha256": net.config.weights_sha256,
              "split": str(split_file), "data_root": str(root), "tta": int(tta), **_recorded(overrides), **result}
    _report(result, as_json, json_path, quiet=quiet)


def _tasks(text: str | None, *, tiles: bool) -> list[str]:
    """``--task``: a comma-separated subset of :data:`SPLIT_TASKS`, or with ``--tiles`` exactly one of :data:`TILE_TASKS`."""
    from ..errors import InputError

    if tiles and text is None:
        raise InputError(f"--tiles needs --task ({', '.join(TILE_TASKS)})")
    tasks = [t.strip() for t in (text or ",".join(SPLIT_TASKS)).split(",") if t.strip()]
    allowed = TILE_TASKS if tiles else (*SPLIT_TASKS, *OPT_IN_TASKS)
    bad = [t for t in tasks if t not in allowed]
    if bad or not tasks or (tiles and len(tasks) != 1):
        what = "one of" if tiles else "a comma-separated list of"
        raise InputError(f"--task {text!r}: {'with --tiles ' if tiles else ''}give {what} {', '.join(allowed)}")
    return tasks


def _default_config() -> Path:
    """The training config of a source checkout (or ./configs); a one-line error saying what to pass elsewhere."""
    from ..errors import InputError

    for candidate in (_REPO_CONFIG, _CONFIG_NAME):
        if candidate.is_file():
            return candidate
    raise InputError(f"no validation split here ({_CONFIG_NAME} is part of the wsimtl source checkout): pass --config CONFIG, "
                     "--split FILE with --data-root DIR, or --tiles DIR with --task and --mpp")


def _recorded(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"postprocess_overrides": ...}`` for the JSON where the user gave any."""
    return {"postprocess_overrides": overrides} if overrides else {}


def _evaluate_tiles(model_name: str | None, tiles_dir: Path, task: str | None, mpp: float | None, head: str | None, *,
                    bf16: bool, progress: bool, per_image: bool, tta: int = 1, overrides: dict[str, Any] | None = None) -> dict:
    from ..errors import InputError
    from ..network import load_model
    from ..train import evaluate_sources
    from ..postprocess import params_of
    from ..train import load_tiles

    if task is None:
        raise InputError("--tiles needs --task (nuclei, glands or tissue)")
    if mpp is None:
        raise InputError("--tiles needs --mpp: the microns per pixel of the tiles")
    model = load_model(model_name)
    heads = model.config.heads
    if task == "tissue" and (head is None or head not in heads or heads[head].kind != "patch"):
        patch = [n for n, h in heads.items() if h.kind == "patch"]
        raise InputError(f"--task tissue needs --head, one of {patch}")
    names = list(heads[head].class_names) if task == "tissue" and head else []
    data, truth = load_tiles(tiles_dir, task=task, mpp=mpp, model_mpp=float(model.config.mpp), head=head, class_names=names)
    params = params_of(model).with_overrides(overrides)
    result = evaluate_sources(model, data, gland_truth=truth or None, bf16=bf16, progress=progress, per_image=per_image, tta=tta, params=params)
    return {"model": model.config.name, "trained": model.config.trained, "weights_sha256": model.config.weights_sha256,
            "tiles": str(tiles_dir), "mpp": mpp, "tta": tta, **_recorded(overrides or {}), **result}


def _report(result: dict, as_json: bool, json_path: Path | None, *, quiet: bool = False) -> None:
    """The table (or with ``as_json`` the JSON) on stdout; the JSON also to ``json_path``."""
    import json

    from ..train import format_table

    text = json.dumps(result, indent=1, default=float)
    click.echo(text if as_json else format_table(result))
    if json_path is not None:
        json_path.write_text(text + "\n")
        if not (quiet or as_json):
            click.echo(f"metrics written to {json_path}")
