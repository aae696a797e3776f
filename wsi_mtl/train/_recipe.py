"""Training recipes: one YAML file with shared settings and a ``stages:`` list, run in order.

A recipe is a training config (every :class:`~wsi_mtl.train.TrainConfig` key) plus ``stages``,
a list of mappings, each with a ``name``, the settings it changes, and optionally
``tune_only: true`` (no training: the previous stage's model is copied, its patch heads refit
where the stage sets ``refit_patch_heads``, and its post-processing re-tuned on training images). Stage ``NAME`` trains in ``<run_dir>/NAME`` and starts from the
previous stage's model (``init_from``, unless the stage names one; the first stage starts from
the shared ``init_from`` or a seeded initialisation). Every stage but the last saves its model
into ``<run_dir>/NAME/model``; the last one writes the recipe's ``output_model`` (the shipped folder).
Top-level keys starting with ``_`` are ignored: they hold YAML anchors that stages merge (``<<: *x``).

``<run_dir>/recipe_state.json`` (rewritten atomically) records per stage its status, start and
end, minutes, steps and validation scores. A rerun skips finished stages and resumes the current
one from its checkpoint; a finished stage whose starting weights changed since is an error.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ._config import TrainConfig, _validate

__all__ = ["RECIPE_STATE", "Recipe", "Stage", "is_recipe", "load_recipe", "read_state", "run_recipe"]

logger = logging.getLogger(__name__)

RECIPE_STATE = "recipe_state.json"
_PLACED = ("run_dir", "output_model")  # set by the recipe for each stage, never by a stage
_STAGE_ONLY = ("name", "tune_only")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Stage:
    """One step of a recipe: its name, full training config, and whether it only re-tunes."""

    name: str
    config: TrainConfig
    tune_only: bool = False


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its file, run folder (state + one folder per stage), shipped folder, stages."""

    path: Path
    run_dir: Path
    output_model: Path
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        """The stage called ``name`` (InputError naming the known ones otherwise)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise InputError(f"recipe {self.path}: no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def previous(self, stage: Stage) -> Stage | None:
        """The stage run before ``stage`` (None for the first)."""
        i = [s.name for s in self.stages].index(stage.name)
        return self.stages[i - 1] if i else None


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read training config {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"training config {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from None


def is_recipe(path: str | os.PathLike[str]) -> bool:
    """Whether the config file at ``path`` is a recipe (a mapping with a ``stages`` key)."""
    data = _read(Path(path))
    return isinstance(data, Mapping) and "stages" in data


def _resolve(value: Any, base: Path) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else base / p


def _stage_entries(path: Path, stages: Any) -> list[tuple[str, bool, dict[str, Any]]]:
    """(name, tune_only, overrides) of each stage entry, checked for shape, names and keys."""
    if not isinstance(stages, list) or not stages:
        raise InputError(f"recipe {path}: stages must be a non-empty list of mappings")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(_PLACED)
    out: list[tuple[str, bool, dict[str, Any]]] = []
    for i, entry in enumerate(stages, 1):
        if not isinstance(entry, Mapping):
            raise InputError(f"recipe {path}: stage {i} must be a mapping, got {type(entry).__name__}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InputError(f"recipe {path}: stage {i} needs a name of letters, digits, '.', '_' or '-', got {name!r}")
        if name in [n for n, _, _ in out]:
            raise InputError(f"recipe {path}: two stages are called {name!r}")
        unknown = sorted(set(entry) - known - set(_STAGE_ONLY))
        if unknown:
            raise InputError(f"recipe {path}: stage {name!r} has unknown keys {unknown} (run_dir and output_model are set by the recipe)")
        tune_only = entry.get("tune_only", False)
        if not isinstance(tune_only, bool):
            raise InputError(f"recipe {path}: stage {name!r}: tune_only must be true or false")
        out.append((name, tune_only, {k: v for k, v in entry.items() if k not in _STAGE_ONLY}))
    return out


def load_recipe(path: str | os.PathLike[str], **overrides: Any) -> Recipe:
    """Read a recipe; ``overrides`` (None = keep) apply to every stage, ``run_dir`` and
    ``output_model`` to the recipe. Every stage's config is checked here, before anything runs.
    Relative paths are taken from the parent of the file's folder, as in :func:`load_config`."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, Mapping) or "stages" not in data:
        raise InputError(f"recipe {path} must be a mapping with a stages: list")
    base = path.resolve().parent.parent
    shared = {k: v for k, v in data.items() if k != "stages" and not str(k).startswith("_")}  # "_x": YAML anchors for stages
    given = {k: v for k, v in overrides.items() if v is not None}
    name = str(shared.get("name", TrainConfig.name))
    run_dir = _resolve(given.pop("run_dir", None) or shared.pop("run_dir", f"runs/{name}"), base)
    output_model = _resolve(given.pop("output_model", None) or shared.pop("output_model", f"models/{name}"), base)
    shared.pop("run_dir", None)
    shared.pop("output_model", None)
    entries = _stage_entries(path, data["stages"])
    stages: list[Stage] = []
    previous_output: Path | None = None
    for i, (stage_name, tune_only, own) in enumerate(entries):
        last = i == len(entries) - 1
        out = output_model if last else run_dir / stage_name / "model"
        settings = {**shared, **own, **given, "name": f"{name}:{stage_name}", "run_dir": str(run_dir / stage_name), "output_model": str(out)}
        if "init_from" not in own and previous_output is not None:
            settings["init_from"] = str(previous_output)
        try:
            cfg = _validate(settings, base)
        except InputError as exc:
            raise InputError(f"recipe {path}, stage {stage_name!r}: {exc}") from None
        if tune_only and cfg.init_from is None:
            raise InputError(f"recipe {path}, stage {stage_name!r}: a tune_only stage needs a model to start from (a stage before it, or init_from)")
        stages.append(Stage(stage_name, cfg, tune_only))
        previous_output = out
    return Recipe(path, run_dir, output_model, tuple(stages))


# --- state -------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_state(recipe: Recipe) -> dict[str, Any]:
    """The recipe's ``recipe_state.json`` (a fresh one where there is none)."""
    path = recipe.run_dir / RECIPE_STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {path}: {exc}; remove it to start the records again") from None
        if isinstance(state, dict) and isinstance(state.get("stages"), dict):
            return state
        raise InputError(f"{path} is not a recipe state file; remove it to start the records again")
    return {"recipe": str(recipe.path), "output_model": str(recipe.output_model), "stages": {}}


def _write_state(recipe: Recipe, state: dict[str, Any]) -> None:
    from ..atomic import atomic_path

    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    records = [state["stages"][s.name] for s in recipe.stages if s.name in state["stages"]]
    state["order"] = [s.name for s in recipe.stages]
    state["total_minutes"] = round(sum(float(r.get("minutes", 0.0)) for r in records), 2)
    with atomic_path(recipe.run_dir / RECIPE_STATE) as tmp:
        tmp.write_text(json.dumps(state, indent=1, default=float) + "\n")


def _input_sha(source: Path | None) -> str | None:
    """SHA-256 of the weights a stage starts from (a model folder's weights or a checkpoint file)."""
    from ..network.io import file_sha256

    if source is None:
        return None
    f = source / "weights.safetensors" if source.is_dir() else source
    return file_sha256(f) if f.is_file() else None


def _is_done(stage: Stage, record: Mapping[str, Any]) -> bool:
    out = stage.config.output_model
    return record.get("status") == "done" and out is not None and (Path(out) / "config.json").is_file()


def _numbers(d: Mapping[str, Any], depth: int = 3) -> dict[str, Any]:
    """The numbers of a metrics record, nested up to ``depth`` (per-image tables left out)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, bool) or k in ("images", "train_loss"):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, Mapping) and depth > 1:
            sub = _numbers(v, depth - 1)
            if sub:
                out[k] = sub
    return out


def _validation(run_dir: Path) -> dict[str, Any] | None:
    """The last validation of a run (``metrics.jsonl``): step, score and the per-task figures."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return _numbers(json.loads(lines[-1])) if lines else None
    except json.JSONDecodeError:
        return None


def _model_record(folder: Path) -> dict[str, Any]:
    """Steps, training seconds and post-processing tuning scores from a saved model's config.json."""
    try:
        training = json.loads((folder / "config.json").read_text()).get("extra", {}).get("training", {})
    except (OSError, json.JSONDecodeError):
        return {}
    out = {k: training[k] for k in ("steps", "train_seconds") if k in training}
    scores = (training.get("postprocess_tuning") or {}).get("scores")
    if scores:
        out["tuning_scores"] = scores
    return out


# --- running -----------------------------------------------------------------------------------


def _move_files_into(tmp: Path, final: Path) -> None:
    """Move the files of the finished folder ``tmp`` into ``final``, each atomically, ``config.json``
    last; files of ``final`` that ``tmp`` lacks (a model card, metrics) stay."""
    final.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        if f.is_file():
            os.replace(f, final / f.name)


def _run_tune_only(stage: Stage) -> None:
    """Copy the stage's starting model into its output and re-tune the copy's post-processing."""
    from ._loop import retune_model

    cfg = stage.config
    src, dst = Path(cfg.init_from), Path(cfg.output_model)  # type: ignore[arg-type]
    if src.resolve() == dst.resolve():
        retune_model(cfg)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        retune_model(dataclasses.replace(cfg, output_model=tmp))
        _move_files_into(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_input(recipe: Recipe, stage: Stage, record: Mapping[str, Any]) -> str | None:
    """The sha256 of the stage's starting weights, after checking they exist and are the ones a
    finished or started run of this stage used."""
    src = stage.config.init_from
    if src is None:
        return None
    if not Path(src).exists():
        prev = recipe.previous(stage)
        hint = f": run stage {prev.name!r} first" if prev is not None and Path(src) == prev.config.output_model else ""
        raise InputError(f"recipe {recipe.path}, stage {stage.name!r}: it starts from {src}, which does not exist{hint}")
    sha = _input_sha(Path(src))
    had = record.get("input_sha256")
    if had and sha and had != sha:
        raise InputError(f"recipe {recipe.path}, stage {stage.name!r}: it ran from other weights than {src} holds now; "
                         f"remove {stage.config.run_dir} to train it again")
    return sha


def _run_stage(recipe: Recipe, stage: Stage, state: dict[str, Any], sha: str | None, *, max_minutes: float | None, progress: bool) -> bool:
    """Run (or resume) one stage whose starting weights have ``sha``, recording it in ``state``;
    False where it stopped early."""
    from ._loop import train

    record = state["stages"].setdefault(stage.name, {})
    record.update({"status": "running", "tune_only": stage.tune_only, "init_from": None if stage.config.init_from is None else str(stage.config.init_from),
                   "output": str(stage.config.output_model), "input_sha256": sha, "run_dir": str(stage.config.run_dir)})
    record.setdefault("started", _now())
    record["attempts"] = int(record.get("attempts", 0)) + 1
    record.pop("error", None)
    _write_state(recipe, state)
    t0 = time.monotonic()
    finished = True
    try:
        if stage.tune_only:
            _run_tune_only(stage)
        else:
            result = train(stage.config, max_minutes=max_minutes, progress=progress, export=True)
            finished = result.model_dir is not None
    except BaseException as exc:
        record.update({"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
        raise
    finally:
        record["minutes"] = round(float(record.get("minutes", 0.0)) + (time.monotonic() - t0) / 60.0, 2)
        if record["status"] == "running":
            record["status"] = "done" if finished else "interrupted"
        if record["status"] == "done":
            record["ended"] = _now()
            record.update(_model_record(Path(stage.config.output_model)))  # type: ignore[arg-type]
            val = None if stage.tune_only else _validation(Path(stage.config.run_dir))
            if val is not None:
                record["validation"] = val
        _write_state(recipe, state)
    return finished


def run_recipe(recipe: Recipe, *, stage: str | None = None, max_minutes: float | None = None, progress: bool = True,
               echo: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Run the recipe's stages in order (only ``stage`` where given), skipping finished ones.

    ``max_minutes`` bounds this call: the stage running when it runs out stops at a checkpoint and
    is marked ``interrupted``; the same call again resumes it. Returns the recipe state.
    """
    todo = [recipe.stage(stage)] if stage is not None else list(recipe.stages)
    state = read_state(recipe)
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    ran = False  # the first stage to run always starts, so that every call makes progress
    for s in todo:
        record = state["stages"].get(s.name, {})
        if _is_done(s, record):
            _check_input(recipe, s, record)
            echo(f"stage {s.name}: done ({record.get('minutes', 0):.1f} min), skipped")
            continue
        left = None if deadline is None else (deadline - time.monotonic()) / 60.0
        if left is not None and left <= 0 and ran:
            echo(f"stage {s.name}: not started, --max-minutes reached (run the same command again to continue)")
            break
        left = None if left is None else max(left, 1e-6)
        ran = True
        sha = _check_input(recipe, s, record)
        echo(f"stage {s.name}: {'re-tuning' if s.tune_only else 'training'} in {s.config.run_dir}")
        if not _run_stage(recipe, s, state, sha, max_minutes=left, progress=progress):
            echo(f"stage {s.name}: stopped at a checkpoint (run the same command again to continue)")
            break
        rec = state["stages"][s.name]
        score = (rec.get("validation") or {}).get("score")
        echo(f"stage {s.name}: done in {rec['minutes']:.1f} min" + (f", validation score {score:.4f}" if isinstance(score, float) else "")
             + f"; model in {rec['output']}")
    return state
