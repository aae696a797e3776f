"""``wsimtl evaluate``: score a model on labelled tiles (by default the held-out validation split)."""

from __future__ import annotations

from pathlib import Path

import click

_REPO_CONFIG = Path("configs") / "wsimtl-small.yaml"


@click.command("evaluate")
@click.option("--model", "model_name", default=None, help="Model name or folder (default: wsimtl-small).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training config whose data_root, splits and source_mpp to use (default: configs/wsimtl-small.yaml when present).")
@click.option("--split", "split_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Split file listing the labelled tiles per source (default: the config's).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Folder with the labelled data (layout of ../shared/data).")
@click.option("--tasks", default="nuclei,glands,nuclei_type,tissue", show_default=True, help="Comma-separated tasks to score.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the metrics as JSON here ('-' for stdout only).")
@click.option("--per-image", is_flag=True, help="Include per-image scores in the JSON.")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bfloat16 autocast on CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def evaluate(model_name: str | None, config: Path | None, split_path: Path | None, data_root: Path | None, tasks: str,
             json_path: Path | None, per_image: bool, bf16: bool, threads: int | None, progress: bool) -> None:
    """Score a model: nuclei Dice/AJI/PQ, GlaS gland object F1/Dice/Hausdorff, nuclear type F1, tissue accuracy."""
    import json

    import torch

    from ..errors import InputError
    from ..network import load_model
    from ..train import evaluate_split, format_table, load_config, load_split

    if threads:
        torch.set_num_threads(threads)
    if config is None and _REPO_CONFIG.exists():
        config = _REPO_CONFIG
    cfg = load_config(config) if config is not None else None
    split_file = split_path or (cfg.splits if cfg is not None else None)
    root = data_root or (cfg.data_root if cfg is not None else None)
    if split_file is None or root is None:
        raise InputError("no split or data folder: pass --config, or --split and --data-root")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    model = load_model(model_name)
    result = evaluate_split(model, data_root=Path(root), split=load_split(split_file), source_mpp=cfg.source_mpp if cfg else None,
                            tasks=task_list, bf16=bf16, progress=progress, per_image=per_image)
    result = {"model": model.config.name, "trained": model.config.trained, "weights_sha256": model.config.weights_sha256,
              "split": str(split_file), "data_root": str(root), **result}
    click.echo(format_table(result))
    text = json.dumps(result, indent=1, default=float)
    if json_path is not None:
        if str(json_path) == "-":
            click.echo(text)
        else:
            json_path.write_text(text + "\n")
            click.echo(f"metrics written to {json_path}")
