"""Options shared by several subcommands: each is defined once here, with one meaning and one help text.

This module and its callers import no torch: arguments and inputs are checked before the
network stack loads (see :func:`check_model`, called once the cheap checks passed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from ..errors import InputError, ModelError

F = TypeVar("F", bound=Callable[..., Any])

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTA_VIEWS = ("1", "2", "4", "8")

#: ``--model``: a model name (either spelling) or a model folder.
model_option: Callable[[F], F] = click.option(
    "--model", "model", default=None, metavar="NAME|DIR",
    help="Model name (see `wsimtl models`; wsimtl-small and wsimtl_small are the same model) or model folder "
         "(default: wsimtl-small).",
)
#: ``--allow-untrained``: run a registered model without its weights (tests and benchmarks).
allow_untrained_option: Callable[[F], F] = click.option(
    "--allow-untrained", is_flag=True,
    help="Run a model whose trained weights are missing with RANDOM weights (tests, benchmarks; outputs meaningless).",
)
device_option: Callable[[F], F] = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.",
)
precision_option: Callable[[F], F] = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="Mixed precision: auto = bf16 on CPUs with native bf16 and on CUDA, fp32 elsewhere.",
)
batch_size_option: Callable[[F], F] = click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per network batch (default: 1 on CPU, 4 on CUDA).",
)
tta_option: Callable[[F], F] = click.option(
    "--tta", type=click.Choice(TTA_VIEWS), default="1", show_default=True,
    help="Test-time augmentation: average the maps over this many flipped/rotated views of each tile "
         "(one network pass per view).",
)
tile_size_option: Callable[[F], F] = click.option(
    "--tile-size", type=click.IntRange(min=32), default=None,
    help="Output core side in model pixels; also the zarr chunk (default: 1536 on CPU, 2048 on CUDA).",
)
#: ``--workers N``: CPU parallelism of the command's own steps (never a count of machines or GPUs).
workers_option: Callable[[F], F] = click.option(
    "--workers", type=click.IntRange(min=1), default=None, metavar="N",
    help="CPU workers for this command's parallel CPU steps (segment: slide-reading threads, default min(4, CPUs); "
         "export: post-processing and GeoJSON processes, default 1).",
)
quiet_option: Callable[[F], F] = click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary lines.")
#: ``--json``: a flag everywhere; files are written by options that name them.
json_option: Callable[[F], F] = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout instead of text.",
)
geojson_gz_option: Callable[[F], F] = click.option(
    "--geojson-gz", is_flag=True, help="Also write gzipped copies of the GeoJSON files (.geojson.gz).",
)
out_option: Callable[[F], F] = click.option(
    "-o", "--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("wsimtl-results"),
    show_default=True, help="Output folder: one result folder per slide, OUT/<slide name>/ (batch: OUT/<id>/ and OUT/batch_summary.csv).",
)
#: ``--postprocess KEY=VALUE`` (repeatable): replace one of the model's tuned post-processing settings.
postprocess_option: Callable[[F], F] = click.option(
    "--postprocess", "postprocess", multiple=True, metavar="KEY=VALUE",
    help="Replace one of the model's post-processing settings (repeatable), e.g. nuclei_split_h=0 "
         "(no neck cutting: faster nuclei) or nuclei_min_area_px=40; names as PostprocessParams.",
)

#: Every shared option, by its long name (what ``tests/test_cli_options`` compares across commands).
SHARED = {"--model": model_option, "--allow-untrained": allow_untrained_option, "--device": device_option,
          "--precision": precision_option, "--batch-size": batch_size_option, "--tta": tta_option,
          "--tile-size": tile_size_option, "--workers": workers_option, "--quiet": quiet_option, "--json": json_option,
          "--geojson-gz": geojson_gz_option, "--out": out_option, "--postprocess": postprocess_option}


def deprecated_option(*decls: str, use: str, **kwargs: Any) -> Callable[[F], F]:
    """A hidden old spelling that still works and warns on stderr to use ``use`` instead."""

    def warn(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if param.name and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            click.echo(f"wsimtl: warning: {'/'.join([*param.opts, *param.secondary_opts])} is deprecated; use {use}", err=True)
        return value

    return click.option(*decls, hidden=True, callback=warn, **kwargs)


def parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}``; values are checked by the library."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--postprocess takes KEY=VALUE, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def check_model(name: str | None, *, allow_untrained: bool) -> None:
    """Refuse (exit 20) a registered model whose trained weights are missing, unless ``allow_untrained``.

    Paths are left to the loader (it names what is wrong with them); unknown names fail here, before
    any slide or output is touched.
    """
    from ..network import DEFAULT_MODEL, find_model_folder, models_dirs
    from ..network.registry import canonical_arch, model_names, public_name

    text = name or DEFAULT_MODEL
    if Path(text).expanduser().exists():
        return
    if canonical_arch(text) is None:
        raise ModelError(f"no model folder or registered model named {text!r}; known models: {', '.join(model_names())} "
                         "(or pass a model folder)")
    if find_model_folder(text) is not None or allow_untrained:
        return
    public = public_name(text)
    dirs = models_dirs()
    where = dirs[0] / public if dirs else Path("$WSIMTL_MODELS_DIR") / public
    files = "weights.tar [+ settings.yml]" if public.startswith("cerberus") else "config.json + weights.safetensors"
    raise ModelError(f"model {public} has no trained weights: put {files} in {where} (or set WSIMTL_MODELS_DIR, "
                     "or pass --model FOLDER); --allow-untrained runs it with random weights")


#: ``--runtime``: what runs the network (wsi_mtl.network.runtime; no torch import here).
RUNTIMES = ("auto", "torch", "openvino", "onnx")
runtime_option: Callable[[F], F] = click.option(
    "--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
    help="What runs the network on the CPU: torch, or a graph exported once per model and cached, run by "
         "OpenVINO (pip install 'wsimtl[fast]'; follows --precision) or ONNX Runtime ('wsimtl[onnx]', fp32). "
         "auto: torch (no other runtime has passed the adoption benchmark yet).",
)
