"""``wsimtl evaluate``: score a model on labelled tiles (by default the held-out validation split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._options import parse_settings, postprocess_option

_REPO_CONFIG = Path("configs") / "wsimtl-small.yaml"


@click.command("evaluate")
@click.option("--model", "model_name", default=None, help="Model name or folder (default: wsimtl-small).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training config whose data_root, splits and source_mpp to use (default: configs/wsimtl-small.yaml when present).")
@click.option("--split", "split_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Split file listing the labelled tiles per source (default: the config's).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Folder with the labelled data (layout of ../shared/data).")
@click.option("--tasks", default="nuclei,glands,nuclei_type,tissue", show_default=True, help="Comma-separated tasks to score.")
@click.option("--tiles", "tiles_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Score your own labelled tiles instead of the split: DIR/images + DIR/labels (nuclei, glands) or DIR/labels.csv (tissue).")
@click.option("--task", "tile_task", type=click.Choice(["nuclei", "glands", "tissue"]), default=None, help="With --tiles: what the labels are.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None, help="With --tiles: microns per pixel of the tiles.")
@click.option("--head", default=None, help="With --tiles --task tissue: the patch head to score (e.g. Patch-Class).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the metrics as JSON here ('-' for stdout only).")
@click.option("--per-image", is_flag=True, help="Include per-image scores in the JSON.")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bfloat16 autocast on CPU.")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True, help="Test-time augmentation views, as `wsimtl segment --tta`.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@postprocess_option
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def evaluate(model_name: str | None, config: Path | None, split_path: Path | None, data_root: Path | None, tasks: str,
             tiles_dir: Path | None, tile_task: str | None, mpp: float | None, head: str | None,
             json_path: Path | None, per_image: bool, bf16: bool, tta: str, threads: int | None, postprocess: tuple[str, ...],
             progress: bool) -> None:
    """Score a model: nuclei Dice/AJI/PQ, GlaS gland object F1/Dice/Hausdorff, nuclear type F1, tissue accuracy.

    By default on the held-out validation split of the training data; with --tiles on your own
    labelled tiles (post-processing as `wsimtl segment`).
    """
    import torch

    from ..errors import InputError
    from ..network import load_model
    from ..postprocess import check_overrides
    from ..train import evaluate_split, load_config, load_split
    from ..train._postprocess import params_of

    overrides = check_overrides(parse_settings(postprocess))  # before the model and data load
    if threads:
        torch.set_num_threads(threads)
    if tiles_dir is not None:
        result = _evaluate_tiles(model_name, tiles_dir, tile_task, mpp, head, bf16=bf16, progress=progress, per_image=per_image, tta=int(tta),
                                 overrides=overrides)
        _report(result, json_path)
        return
    if config is None and _REPO_CONFIG.exists():
        config = _REPO_CONFIG
    cfg = load_config(config) if config is not None else None
    split_file = split_path or (cfg.splits if cfg is not None else None)
    root = data_root or (cfg.data_root if cfg is not None else None)
    if split_file is None or root is None:
        raise InputError("no split or data folder: pass --config, or --split and --data-root")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    model = load_model(model_name)
    params = params_of(model).with_overrides(overrides)
    result = evaluate_split(model, data_root=Path(root), split=load_split(split_file), source_mpp=cfg.source_mpp if cfg else None,
                            tasks=task_list, bf16=bf16, progress=progress, per_image=per_image, tta=int(tta), params=params)
    result = {"model": model.config.name, "trained": model.config.trained, "weights_sha256": model.config.weights_sha256,
              "split": str(split_file), "data_root": str(root), "tta": int(tta), **_recorded(overrides), **result}
    _report(result, json_path)


def _recorded(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"postprocess_overrides": ...}`` for the JSON where the user gave any."""
    return {"postprocess_overrides": overrides} if overrides else {}


def _evaluate_tiles(model_name: str | None, tiles_dir: Path, task: str | None, mpp: float | None, head: str | None, *,
                    bf16: bool, progress: bool, per_image: bool, tta: int = 1, overrides: dict[str, Any] | None = None) -> dict:
    from ..errors import InputError
    from ..network import load_model
    from ..train import evaluate_sources
    from ..train._postprocess import params_of
    from ..train._tiles import load_tiles

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


def _report(result: dict, json_path: Path | None) -> None:
    import json

    from ..train import format_table

    click.echo(format_table(result))
    text = json.dumps(result, indent=1, default=float)
    if json_path is not None:
        if str(json_path) == "-":
            click.echo(text)
        else:
            json_path.write_text(text + "\n")
            click.echo(f"metrics written to {json_path}")
