"""``wsimtl train CONFIG``: multi-task training from a YAML/JSON config, or every stage of a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._options import deprecated_option, quiet_option


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the number of steps.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Validate every this many steps.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Override the run folder (checkpoints, metrics.jsonl).")
@click.option("--output-model", type=click.Path(file_okay=False, path_type=Path), default=None, help="Override where the trained model is saved.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Override the data folder (default from config / $WSIMTL_DATA).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this long (resumable) without exporting.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--no-export", is_flag=True, help="Do not save the model folder at the end.")
@click.option("--export-only", is_flag=True, help="Only export the run folder's final checkpoint (with --best: the best-scoring one).")
@click.option("--tune-only", is_flag=True, help="No training: re-tune the post-processing of the model in the config's output_model on training images (weights unchanged; with refit_patch_heads the patch heads are refit first).")
@click.option("--best", is_flag=True, help="With --export-only: export the checkpoint of the best validation score.")
@click.option("--stage", "stage", default=None, metavar="NAME", help="For a recipe (a config with stages:): run only this stage.")
@quiet_option
@deprecated_option("--progress/--no-progress", "old_progress", use="-q/--quiet", default=None)
def train(config: Path, steps: int | None, steps_per_epoch: int | None, run_dir: Path | None, output_model: Path | None, data_root: Path | None,
          max_minutes: float | None, threads: int | None, no_export: bool, export_only: bool, tune_only: bool, best: bool, stage: str | None,
          quiet: bool, old_progress: bool | None) -> None:
    """Train the model described by CONFIG (resumes from the run folder's checkpoint).

    A recipe (CONFIG with a stages: list) runs its stages in order, skipping finished ones and
    resuming the current one; its run folder's recipe_state.json records each stage.
    """
    progress = not quiet and old_progress is not False
    import json

    from ..train._recipe import is_recipe

    if is_recipe(config):
        _train_recipe(config, stage=stage, steps=steps, steps_per_epoch=steps_per_epoch, run_dir=run_dir, output_model=output_model,
                      data_root=data_root, threads=threads, max_minutes=max_minutes, progress=progress,
                      single_run={"--no-export": no_export, "--export-only": export_only, "--tune-only": tune_only, "--best": best})
        return
    if stage is not None:
        raise click.UsageError(f"--stage is for recipes (a config with a stages: list); {config} has none")

    from ..train import export_model, load_config, retune_model
    from ..train import train as run_training

    cfg = load_config(config, **_overrides(steps, steps_per_epoch, run_dir, output_model, data_root, threads))
    if tune_only:
        click.echo(f"re-tuned {retune_model(cfg)}")
        return
    if export_only:
        out = export_model(cfg, which="best" if best else "last")
        click.echo(f"exported {out}")
        return
    result = run_training(cfg, max_minutes=max_minutes, progress=progress, export=not no_export)
    click.echo(f"trained to step {result.step} in {result.seconds / 60:.1f} min; run folder {cfg.run_dir}")
    if result.model_dir:
        click.echo(f"model saved to {result.model_dir}")
    if result.metrics:
        click.echo(json.dumps(result.metrics, default=float, indent=1))


def _train_recipe(config: Path, *, stage: str | None, steps: int | None, steps_per_epoch: int | None, run_dir: Path | None, output_model: Path | None,
                  data_root: Path | None, threads: int | None, max_minutes: float | None, progress: bool, single_run: dict[str, bool]) -> None:
    """Run a recipe's stages (or the one named by ``--stage``) and print where each ended."""
    from ..train._recipe import load_recipe, run_recipe

    given = [k for k, v in single_run.items() if v]
    if given:
        raise click.UsageError(f"{', '.join(given)}: for a single run, not a recipe (each stage exports and tunes as it says)")
    recipe = load_recipe(config, **_overrides(steps, steps_per_epoch, run_dir, output_model, data_root, threads))
    state = run_recipe(recipe, stage=stage, max_minutes=max_minutes, progress=progress, echo=click.echo)
    done = [s.name for s in recipe.stages if state["stages"].get(s.name, {}).get("status") == "done"]
    click.echo(f"{len(done)} of {len(recipe.stages)} stages done, {state.get('total_minutes', 0):.1f} min in all; "
               f"records in {recipe.run_dir / 'recipe_state.json'}")
    if len(done) == len(recipe.stages):
        click.echo(f"model saved to {recipe.output_model}")


def _overrides(steps: int | None, steps_per_epoch: int | None, run_dir: Path | None, output_model: Path | None,
               data_root: Path | None, threads: int | None) -> dict[str, Any]:
    """The command line's replacements of config settings (None = keep the config's)."""
    return {
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "run_dir": str(run_dir.resolve()) if run_dir else None,
        "output_model": str(output_model.resolve()) if output_model else None,
        "data_root": str(data_root.resolve()) if data_root else None,
        "threads": threads,
    }
