"""Other inference runtimes for a loaded model: OpenVINO and ONNX Runtime on the CPU.

A runner exported from a :class:`~wsi_mtl.network.MultiTaskNet` has the call contract the engine
uses: ``runner.predict(x, heads=None)`` takes an N x 3 x H x W float tensor (RGB 0-255) and returns
the model's softmax maps as float32 torch tensors keyed by head, and ``runner.config`` is the
model's config. The exported graph computes every head at once, with dynamic batch, height and
width; it is cached on disk by weights sha256, config and runtime version (:func:`cache_dir`), so
the export (tens of seconds) is paid once per model and machine.

``resolve_runtime("auto", device, model)`` picks the first runtime of :data:`AUTO_ORDER` that is
installed (CPU, trained models), else torch. Which runtimes are in :data:`AUTO_ORDER` follows the
measurements of ``benchmarks/bench_runtime.py`` (adoption rule at its top).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["RUNTIMES", "AUTO_ORDER", "available", "check_runtime", "resolve_runtime", "make_runner", "cache_dir", "model_key",
           "export_openvino", "export_onnx", "OpenVinoRunner", "OnnxRunner"]

log = logging.getLogger(__name__)

#: The values ``--runtime`` accepts.
RUNTIMES = ("auto", "torch", "openvino", "onnx")

#: Runtimes ``auto`` takes, in order, when installed (CPU, trained models; run at fp32 by the
#: pipeline). Empty: ``auto`` is torch. benchmarks/bench_runtime.py (adoption rule and figures at its
#: top): OpenVINO f32 gives the torch fp32 maps (max abs difference < 1e-4) and beat eager bf16 with 2
#: threads on a heavily loaded machine, but not per core (1 thread: 0.85x) nor in the unloaded
#: figures of issue 19 (0.80x), so it is not adopted; its bf16 (1.4x eager bf16 per core) and int8
#: graphs, like eager bf16 itself, move probabilities by more than 0.02. ``--runtime openvino`` opts in.
AUTO_ORDER: tuple[str, ...] = ()

_MODULE = {"openvino": "openvino", "onnx": "onnxruntime"}
_EXPORT_SIZE = 256  # side of the example input the graphs are traced with (dynamic afterwards)


def available(runtime: str) -> bool:
    """Whether ``runtime``'s Python package is installed (torch always is)."""
    if runtime == "torch":
        return True
    return importlib.util.find_spec(_MODULE[runtime]) is not None


def check_runtime(requested: str, device: torch.device) -> str:
    """``requested`` checked and lower-cased (``auto`` stays ``auto``; needs no model).

    An explicit runtime other than torch must be installed and the device must be the CPU
    (:class:`InputError` otherwise).
    """
    requested = (requested or "auto").lower()
    if requested not in RUNTIMES:
        raise InputError(f"unknown runtime {requested!r}; use {', '.join(RUNTIMES)}")
    if requested not in ("auto", "torch"):
        if device.type != "cpu":
            raise InputError(f"runtime {requested} runs on the CPU only, not on {device}; use --runtime torch")
        if not available(requested):
            extra = "fast" if requested == "openvino" else "onnx"
            raise InputError(f"runtime {requested} needs the {_MODULE[requested]} package: pip install 'wsimtl[{extra}]'")
    return requested


def resolve_runtime(requested: str, device: torch.device, model: Any = None) -> str:
    """The runtime to use: ``torch``, ``openvino`` or ``onnx`` (checked as :func:`check_runtime`).

    ``auto`` takes the first installed runtime of :data:`AUTO_ORDER` on the CPU for a trained
    model (an untrained one, or none given, runs in torch: its export would cost more than it
    saves), else torch.
    """
    requested = check_runtime(requested, device)
    if requested != "auto":
        return requested
    if device.type != "cpu" or model is None or not getattr(getattr(model, "config", None), "trained", False):
        return "torch"
    return next((r for r in AUTO_ORDER if available(r)), "torch")


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$WSIMTL_CACHE``, else ``$XDG_CACHE_HOME/wsimtl``, else ``~/.cache/wsimtl``."""
    root = os.environ.get("WSIMTL_CACHE")
    if root:
        return Path(root) / "runtimes"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsimtl" / "runtimes"


def _weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the weights in memory (not of a file: a model changed since loading gets its own key)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_key(model: torch.nn.Module, runtime: str) -> str:
    """Cache key of ``model`` exported for ``runtime``: weights sha256, config and package versions."""
    from importlib.metadata import version

    config = model.config.to_dict() if hasattr(model.config, "to_dict") else repr(model.config)
    parts = {"weights": _weights_sha256(model), "config": config, "torch": torch.__version__,
             "runtime": version(_MODULE[runtime] if runtime in _MODULE else runtime), "format": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _AllHeads(torch.nn.Module):
    """``model.predict`` as a module returning every head's map, in ``config.output_heads`` order."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        # plain NCHW: the channels_last fast paths write into views, which the exporters reject
        self.model = copy.deepcopy(model).cpu().float().eval().set_channels_last(False)
        self.names = list(model.config.output_heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs = self.model.predict(x)
        return tuple(probs[n] for n in self.names)


def _example(model: torch.nn.Module) -> torch.Tensor:
    side = max(_EXPORT_SIZE, int(model.config.stride) * 4)
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 255


def export_openvino(model: torch.nn.Module, folder: Path | None = None) -> Path:
    """The OpenVINO IR (``model.xml`` + ``.bin``, float32 weights, dynamic N, H, W) of ``model``, cached."""
    import openvino as ov

    target = (folder or cache_dir()) / f"openvino-{model_key(model, 'openvino')}" / "model.xml"
    if target.exists():
        return target
    log.info("exporting %s to OpenVINO (once per model): %s", model.config.name, target.parent)
    module = _AllHeads(model)
    with torch.no_grad():
        ov_model = ov.convert_model(module, example_input=_example(model), input=[ov.PartialShape([-1, 3, -1, -1])])
    for output, name in zip(ov_model.outputs, module.names):
        output.get_tensor().set_names({name})
    _atomic_folder(target.parent, lambda tmp: ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False))
    return target


def export_onnx(model: torch.nn.Module, folder: Path | None = None) -> Path:
    """The ONNX graph (``model.onnx``, dynamic N, H, W) of ``model``, cached. Needs onnx and onnxscript."""
    target = (folder or cache_dir()) / f"onnx-{model_key(model, 'onnx')}" / "model.onnx"
    if target.exists():
        return target
    log.info("exporting %s to ONNX (once per model): %s", model.config.name, target.parent)
    module = _AllHeads(model)
    dims = {0: torch.export.Dim("n", min=1, max=64), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}

    def write(tmp: Path) -> None:
        # the legacy (TorchScript) exporter fails on the fine branch; dynamo's does not
        with torch.no_grad():
            torch.onnx.export(module, (_example(model),), str(tmp / "model.onnx"), dynamo=True, input_names=["x"],
                              output_names=module.names, dynamic_shapes={"x": dims}, external_data=False)

    _atomic_folder(target.parent, write)
    return target


def _atomic_folder(final: Path, write: Any) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``final``."""
    import shutil
    import tempfile

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep theirs
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Runner:
    """What the runners share: the model's config and the ``predict`` contract."""

    name = ""
    training = False

    def __init__(self, model: torch.nn.Module, precision: torch.dtype | None, threads: int) -> None:
        self.config = model.config
        self.names = list(model.config.output_heads)
        self.precision = precision
        self.threads = threads

    def _run(self, x: np.ndarray) -> Sequence[np.ndarray]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor, *, heads: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Softmax maps (float32, on the CPU) of ``x`` (N x 3 x H x W float, RGB 0-255) keyed by head."""
        s = self.config.stride
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"expected N x 3 x H x W input with H, W multiples of {s}, got {tuple(x.shape)}")
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        outs = dict(zip(self.names, self._run(arr)))
        wanted = set(self.config.heads) if heads is None else set(heads)  # config: as narrowed by evaluation code
        chosen = [n for n in self.names if n in wanted]
        return {n: torch.from_numpy(np.asarray(outs[n], dtype=np.float32)) for n in chosen}

    # evaluation code switches models between train and eval mode; a runner is always in eval
    def eval(self) -> _Runner:
        return self

    def train(self, mode: bool = True) -> _Runner:
        return self


class OpenVinoRunner(_Runner):
    """An OpenVINO CPU runner; bf16 ``precision`` sets OpenVINO's bf16 inference hint, else f32.

    ``ov_model`` (an ``openvino.Model``, e.g. an int8 one) replaces the exported float graph.
    """

    name = "openvino"

    def __init__(self, model: torch.nn.Module, *, precision: torch.dtype | None = None, threads: int | None = None,
                 ov_model: Any = None) -> None:
        import openvino as ov

        super().__init__(model, precision, threads or torch.get_num_threads())
        self._core = ov.Core()
        self._model = ov_model if ov_model is not None else self._core.read_model(str(export_openvino(model)))
        self._compiled: dict[tuple[int, ...], Any] = {}

    @property
    def hint(self) -> str:
        return "bf16" if self.precision == torch.bfloat16 else "f32"

    def _compile(self, shape: tuple[int, ...]) -> Any:
        """A request compiled for one static input shape (faster than a dynamic one on the CPU)."""
        if shape not in self._compiled:
            if len(self._compiled) >= 4:
                self._compiled.pop(next(iter(self._compiled)))
            model = self._model.clone()
            model.reshape(list(shape))
            config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": self.hint,
                      "PERFORMANCE_HINT": "LATENCY"}
            self._compiled[shape] = self._core.compile_model(model, "CPU", config).create_infer_request()
        return self._compiled[shape]

    def _run(self, x: np.ndarray) -> Sequence[np.ndarray]:
        request = self._compile(tuple(x.shape))
        request.infer([x], share_inputs=True)
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.names))]


class OnnxRunner(_Runner):
    """An ONNX Runtime CPU runner (float32 whatever ``precision`` asks; bf16 has no CPU kernels there)."""

    name = "onnx"

    def __init__(self, model: torch.nn.Module, *, precision: torch.dtype | None = None, threads: int | None = None,
                 path: Path | None = None) -> None:
        import onnxruntime as ort

        super().__init__(model, precision, threads or torch.get_num_threads())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path or export_onnx(model)), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> Sequence[np.ndarray]:
        return self._session.run(self.names, {self._input: x})


def make_runner(model: Any, runtime: str, *, precision: torch.dtype | None = None, threads: int | None = None) -> tuple[Any, str]:
    """``(runner, runtime used)``: ``model`` itself for torch, else an exported runner.

    A model that is not a :class:`~wsi_mtl.network.MultiTaskNet`, or whose export or compilation
    fails, runs in torch (with a warning), so asking for a runtime never stops a run.
    """
    if runtime == "torch" or isinstance(model, _Runner):
        return model, getattr(model, "name", "torch") if isinstance(model, _Runner) else "torch"
    from .model import MultiTaskNet

    if not isinstance(model, MultiTaskNet):
        log.warning("runtime %s needs a wsimtl network; running %s in torch", runtime, type(model).__name__)
        return model, "torch"
    cls = {"openvino": OpenVinoRunner, "onnx": OnnxRunner}[runtime]
    try:
        return cls(model, precision=precision, threads=threads), runtime
    except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure: torch still works
        log.warning("runtime %s failed for %s (%s: %s); running in torch", runtime, model.config.name,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return model, "torch"
