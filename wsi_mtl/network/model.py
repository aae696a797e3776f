"""The multi-task network: ResNet encoder, one U-Net decoder per task, output and patch heads.

Module and parameter names follow the published Cerberus checkpoint (``backbone``, ``conv_map``,
``decoder_head.<Name>.<i>.block.<j>.conv``, ``output_head.<Name>.<Out>.x.0.block.0.conv``,
``decoder_head.Patch-Class.bn1`` ...) so that its state dict loads unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchParams, HeadConfig, ModelConfig

__all__ = ["MultiTaskNet", "ResNetEncoder", "UNetDecoder", "OutputHead", "PatchHead", "build_patch_head", "patch_head_inputs", "window_stats",
           "quantize_probabilities"]

logger = logging.getLogger(__name__)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv (eval-mode statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight.detach().clone(), ((bias - bn.running_mean) * scale + bn.bias).detach().clone()


class _Foldable(nn.Module):
    """A module whose conv -> BN pairs can be folded into single convs for inference.

    ``_pairs`` names (conv, bn) submodule paths; folded tensors are non-persistent buffers
    ``fold<i>_w`` / ``fold<i>_b`` (not in the state dict), used only in eval mode.
    """

    _pairs: tuple[tuple[str, str], ...] = ()

    def _init_fold(self) -> None:
        for i in range(len(self._pairs)):
            self.register_buffer(f"fold{i}_w", None, persistent=False)
            self.register_buffer(f"fold{i}_b", None, persistent=False)

    def fold_bn(self, enabled: bool = True) -> None:
        """Compute (or, with ``enabled=False``, drop) the folded conv weights."""
        for i, (c, b) in enumerate(self._pairs):
            w, bias = _fold(self.get_submodule(c), self.get_submodule(b)) if enabled else (None, None)
            setattr(self, f"fold{i}_w", w)
            setattr(self, f"fold{i}_b", bias)

    def _conv_bn(self, x: torch.Tensor, i: int) -> torch.Tensor:
        conv_name, bn_name = self._pairs[i]
        conv = self.get_submodule(conv_name)
        w = getattr(self, f"fold{i}_w")
        if w is None or self.training:
            return self.get_submodule(bn_name)(conv(x))
        return F.conv2d(x, w, getattr(self, f"fold{i}_b"), conv.stride, conv.padding)

    def _conv_bn_relu(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``relu(_conv_bn(x, i))``; folded, in channels_last bfloat16 inference on the CPU, one
        oneDNN call with the ReLU fused (:func:`_fused_conv_relu`: the same values, one pass less
        over memory)."""
        w = getattr(self, f"fold{i}_w")
        if w is not None and not self.training:
            out = _fused_conv_relu(x, w, getattr(self, f"fold{i}_b"), self.get_submodule(self._pairs[i][0]))
            if out is not None:
                return out
        return F.relu(self._conv_bn(x, i), inplace=True)


def _mkldnn_conv_pointwise() -> Any:
    """oneDNN's convolution with a fused element-wise step (the op inductor uses), or None."""
    try:
        return torch.ops.mkldnn._convolution_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def _mkldnn_has_bf16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX); where it
    does not, its fused op refuses bfloat16 input and torch's own conv emulates it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_CONV_POINTWISE = _mkldnn_conv_pointwise()
#: Whether :func:`_fused_conv_relu` also fuses under bfloat16 autocast (see :func:`_mkldnn_has_bf16`)
_FUSE_BF16 = _mkldnn_has_bf16()

#: Whether inference on the CPU fuses each folded conv with its ReLU (:func:`_fused_conv_relu`) and
#: runs the 1x1 convs through oneDNN (:class:`PointConv`); False runs torch's conv and then the ReLU
#: (a switch for comparisons: the same values, but for the 1x1 convs' float32 sums on one thread).
FUSE_CONV_RELU = True


def _traced() -> bool:
    """Whether a tracer or exporter is recording the model (it must see plain aten ops)."""
    compiler = torch.compiler
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiler.is_compiling()
                or getattr(compiler, "is_exporting", lambda: False)())


def _fused_conv_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor | None:
    """``relu(conv2d(x, w, b))`` as one oneDNN call, or None where it does not apply.

    It applies without autograd to channels_last CPU input, in float32 or under bfloat16 autocast
    (arguments cast as autocast casts a conv's). The ReLU costs no pass of its own over memory:
    in float32 a tile's network call is ~1.1x faster (``bench_engine_tile.py``), in bfloat16 ~3-10%.
    The maps are those of the two separate steps bit for bit on the machines we measured
    (``tests/test_network.py``; ReLU commutes with the rounding to bfloat16). On a CPU whose oneDNN
    has no bfloat16 (:data:`_FUSE_BF16`), bfloat16 runs the two steps apart: the fused op would refuse it.
    """
    return _onednn_conv(x, w, b, conv, "relu")


def _onednn_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: nn.Conv2d, step: str) -> torch.Tensor | None:
    """``conv2d(x, w, b)`` followed by oneDNN's element-wise ``step`` (``"relu"`` or ``"none"``) in one
    oneDNN call, under the conditions of :func:`_fused_conv_relu`; None where they do not hold."""
    if (not FUSE_CONV_RELU or _CONV_POINTWISE is None or torch.is_grad_enabled() or x.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last) or _traced()):
        return None
    if x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or not _FUSE_BF16:
            return None
        dt = torch.bfloat16  # as autocast casts a conv's arguments
    elif x.dtype == torch.float32 and w.dtype == torch.float32:
        dt = torch.float32
    else:
        return None
    return _CONV_POINTWISE(x.to(dt), w.to(dt), None if b is None else b.to(dt), list(conv.padding), list(conv.stride),
                           list(conv.dilation), conv.groups, step, [], "")


class PointConv(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters and state-dict keys) that, in inference on channels_last
    CPU input, runs through oneDNN at any thread count (:func:`_onednn_conv`).

    torch's own conv sends a stride-1 1x1 conv of a single image to oneDNN on several threads and to
    its own GEMM on one, so the engine's tiles (some on one thread, some on two) got float32 sums
    over different widths; through oneDNN always the maps do not depend on the thread count, and
    the conv is faster on one thread (up to 2x for the heads' few output channels).
    """

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None if self.training else _onednn_conv(x, self.weight, self.bias, self, "none")
        return super().forward(x) if out is None else out


class ConvBNReLU(_Foldable):
    """``conv`` (bias) -> ``bn`` -> ReLU, same padding."""

    _pairs = (("conv", "bn"),)

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self._init_fold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_bn_relu(x, 0)


class ConvBlock(nn.Module):
    """A chain of :class:`ConvBNReLU` through ``channels`` (keys ``block.<j>``)."""

    def __init__(self, channels: Sequence[int], kernel: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*(ConvBNReLU(a, b, kernel) for a, b in zip(channels[:-1], channels[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Conv1x1(nn.Module):
    """A 1x1 conv with bias under the key ``conv``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = PointConv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class BasicBlock(_Foldable):
    """torchvision-style ResNet BasicBlock (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        self._pairs = (("conv1", "bn1"), ("conv2", "bn2"))
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            self._pairs += (("downsample.0", "downsample.1"),)
        self._init_fold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self._conv_bn(x, 2)
        out = self._conv_bn(self._conv_bn_relu(x, 0), 1)
        return F.relu(out.add_(identity), inplace=True)


class ResNetEncoder(_Foldable):
    """ResNet with BasicBlocks returning the five feature maps x0..x4.

    x0 is the stem output (after relu, before maxpool) at 1/``stem_stride``; x1..x4 are the stage
    outputs at 2, 4, 8, 16 times that stride.
    """

    def __init__(self, params: ArchParams, outputs: int = 5) -> None:
        super().__init__()
        w = params.encoder_widths
        self.conv1 = nn.Conv2d(3, w[0], 7, stride=params.stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = w[0]
        self._stages = outputs - 1
        for i, (blocks, cout) in enumerate(zip(params.encoder_layers[: self._stages], w[1:]), start=1):
            stride = 1 if i == 1 else 2
            layer = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*layer))
            cin = cout
        # Unused ImageNet classifier, kept so that the published checkpoint loads strictly.
        self.fc = nn.Linear(w[4], params.encoder_fc_classes) if params.encoder_fc_classes and outputs == 5 else None
        self._pairs = (("conv1", "bn1"),)
        self._init_fold()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x0..x4 (with ``outputs`` < 5 at construction: the first ``outputs`` of them)."""
        feats = [self._conv_bn_relu(x, 0)]
        for i in range(1, self._stages + 1):
            feats.append(getattr(self, f"layer{i}")(self.maxpool(feats[-1]) if i == 1 else feats[-1]))
        return feats


class UNetDecoder(nn.ModuleList):
    """Up-blocks ``0..3`` (plus ``4`` at full resolution for a stride-2 stem).

    Block i: bilinear 2x upsample of the previous output, add skip i, then conv-bn-relu layers.
    """

    def __init__(self, params: ArchParams) -> None:
        w = params.encoder_widths
        skips = [w[3], w[2], w[1], w[0]]
        outs = [w[2], w[1], w[0], params.decoder_out]
        blocks = [ConvBlock([s, m, o], 3) for s, m, o in zip(skips, params.decoder_mid, outs)]
        if params.stem_stride == 2 and params.full_res == "block":
            c = params.decoder_out
            blocks.append(ConvBlock([c] * (params.full_res_convs + 1), 3))
        super().__init__(blocks)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """The decoded features (a window of them: :meth:`upper`, then :meth:`last`)."""
        for block, skip in zip(self, skips):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(x.add_(skip))
        return x

    def upper(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """The blocks before the last: what the last block upsamples (``skips[:-1]`` used)."""
        for block, skip in zip(self, skips[:-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(x.add_(skip))
        return x

    def last(self, x: torch.Tensor, skip: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
        """The last block (the largest) on ``window`` (y0, y1, x0, x1 of ``skip``'s grid) only, from
        :meth:`upper`'s ``x``. Within the block's reach (2 px) of a window edge that is not the map's
        edge the values are those of a zero-padded crop: a caller widens its window by that much."""
        y0, y1, x0, x1 = window
        return self[len(self) - 1](_upsampled_window(x, skip.shape[-2:], window) + skip[..., y0:y1, x0:x1])


def _strips(start: int, stop: int, rows: int, context: int, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Rows ``start .. stop`` in strips of ``rows``: (a, b, e0, e1) per strip, its rows [a, b) and the
    rows [e0, e1) it is computed from, ``context`` more on each side within [lo, hi)."""
    bounds = [(a, min(stop, a + rows)) for a in range(start, stop, rows)]
    return [(a, b, max(lo, a - context), min(hi, b + context)) for a, b in bounds]


def _window_like(part: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty channels_last tensor like ``part`` (a strip) with ``rows`` rows, to write strips into."""
    n, c, _, w = part.shape
    return torch.empty((n, c, rows, w), dtype=part.dtype, device=part.device, memory_format=torch.channels_last)


def _upsampled_window(x: torch.Tensor, size: Sequence[int], window: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, bilinear)[..., y0:y1, x0:x1]`` from the input rows and columns
    that window needs (one more on each side: the 2x weights read the neighbour), the same values.

    A view of a new tensor. Sizes other than exactly 2x upsample the whole map.
    """
    y0, y1, x0, x1 = window
    h, w = x.shape[-2:]
    if tuple(size) != (2 * h, 2 * w):
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[..., y0:y1, x0:x1]
    r0, r1 = max(0, y0 // 2 - 1), min(h, (y1 + 1) // 2 + 1)
    c0, c1 = max(0, x0 // 2 - 1), min(w, (x1 + 1) // 2 + 1)
    up = F.interpolate(x[..., r0:r1, c0:c1], size=(2 * (r1 - r0), 2 * (c1 - c0)), mode="bilinear", align_corners=False)
    return up[..., y0 - 2 * r0 : y1 - 2 * r0, x0 - 2 * c0 : x1 - 2 * c0]


class FineBranch(nn.Module):
    """Full-resolution correction of one head's logits (``ArchParams.fine_decoders``).

    The decoder's half-resolution features are upsampled 2x bilinearly and added to the branch's
    own 3x3 conv of the input (``skip``), then pass two 3x3 conv-bn-relu layers (``body``) and a
    1x1 conv (``out``) that starts at zero, so a new branch leaves the logits as they were until
    it is trained.
    """

    def __init__(self, cin: int, channels: int, cout: int) -> None:
        super().__init__()
        self.skip = ConvBNReLU(3, channels, 3)
        self.lift = Conv1x1(cin, channels) if cin != channels else None
        self.body = ConvBlock([channels, channels, channels], 3)
        self.out = PointConv(channels, cout)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logit correction at the resolution of ``x`` (the network input, scaled to 0-1)."""
        if self.lift is not None:
            feats = self.lift(feats)
        up = F.interpolate(feats, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.body(up.add_(self.skip(x))))


class OutputHead(nn.Module):
    """1x1 conv-bn-relu to ``hidden`` then 1x1 conv to the classes (keys ``x.0.block.0``, ``x.1``).

    With ``refine_channels`` (stride-2 ``"refine"`` models) the logits are upsampled 2x
    bilinearly and a 3x3 conv (``refine``) of the shared full-resolution skip is added; with
    ``fine_channels`` the network adds the correction of a :class:`FineBranch` (``fine``), which
    needs the input and so is not part of ``forward``.
    """

    def __init__(self, cin: int, hidden: int, cout: int, *, refine_channels: int = 0, fine_channels: int = 0) -> None:
        super().__init__()
        self.x = nn.Sequential(ConvBlock([cin, hidden], 1), Conv1x1(hidden, cout))
        self.refine = nn.Conv2d(refine_channels, cout, 3, padding=1, bias=False) if refine_channels else None
        self.fine = FineBranch(cin, fine_channels, cout) if fine_channels else None

    def forward(self, x: torch.Tensor, full: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.x(x)
        if self.refine is None or full is None:
            return logits
        logits = F.interpolate(logits, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return logits.add_(self.refine(full))


class PatchHead(nn.Module):
    """Cerberus patch classifier on pooled x4: BN-ReLU-Dropout-1x1conv-BN-ReLU-1x1conv.

    Every layer is pointwise, so it applies equally to a globally pooled 1x1 map (Cerberus) and to
    a dense map of window statistics (``MultiTaskNet.predict``). ``cin`` is
    :func:`patch_head_inputs` of the head's pool.
    """

    def __init__(self, cin: int, hidden: int, cout: int, *, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tiny (one vector per cell): always float32, also under autocast
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(x.float())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.bn1(x)))
        x = F.relu(self.bn2(self.conv1(x)))
        return self.conv2(x)


def patch_head_inputs(params: ArchParams, pool: str) -> int:
    """Input channels of a patch head that classifies ``pool`` statistics of x4 (see :func:`window_stats`)."""
    return params.encoder_widths[4] * (2 if pool == "mean_std" else 1)


def build_patch_head(params: ArchParams, head: HeadConfig) -> PatchHead:
    """A freshly initialised patch head for ``head`` (its classes and pool) in an arch with ``params``."""
    return PatchHead(patch_head_inputs(params, head.pool), params.patch_hidden, head.num_classes, dropout=params.patch_dropout)


def window_stats(x4: torch.Tensor, cells: int | None, pools: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-channel statistics of the encoder cells a patch head pools, one map per pool mode.

    ``cells`` odd: dense maps of the ``cells`` x ``cells`` window centred on each cell (windows
    clipped at the border, as ``count_include_pad=False``); ``None``: one 1 x 1 map over all of
    ``x4``. ``"mean"`` gives the channel means (C channels); ``"mean_std"`` the means and then the
    standard deviations (2C channels). Always float32.
    """
    x = x4.float()

    def average(t: torch.Tensor) -> torch.Tensor:
        if cells is None:
            return t.mean(dim=(-2, -1), keepdim=True)
        return F.avg_pool2d(t, cells, stride=1, padding=cells // 2, count_include_pad=False)

    mean = average(x)
    out: dict[str, torch.Tensor] = {}
    for pool in dict.fromkeys(pools):
        if pool == "mean":
            out[pool] = mean
        elif pool == "mean_std":
            # The variance of x minus its per-image channel mean: the same value, without most of
            # the cancellation of E[x^2] - E[x]^2 when a channel's mean is large against its spread.
            shift = x.mean(dim=(-2, -1), keepdim=True).detach()
            sq = average((x - shift).square())
            std = (sq - (mean - shift).square()).clamp_min(0.0).add(1e-6).sqrt()  # eps keeps the gradient finite
            out[pool] = torch.cat([mean, std], dim=1)
        else:
            raise ValueError(f"unknown patch pool {pool!r}")
    return out


@contextmanager
def _one_thread(enabled: bool = True) -> Iterator[None]:
    """Torch ops on one thread inside (the thread count restored after): the patch heads' 1x1 convs
    in float32 sum in an order that depends on the thread count (up to ~3e-5 apart on 1 and 2)."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Scaled:
    """A uint8 input (0-255) read as float32 0-1 where it is sliced: strips of it, without a float32
    copy of the whole (the same values as slicing ``raw / 255``)."""

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw, self.shape = raw, raw.shape

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.raw[key] / 255.0


def _strip_input(x: torch.Tensor | _Scaled, e0: int, e1: int, c0: int, c1: int) -> torch.Tensor:
    """Rows ``e0:e1`` and columns ``c0:c1`` of the input, channels_last-contiguous where the input is
    a channels_last CPU tensor (a view of it is not: the tail's first convs would then run apart
    from their ReLU, :func:`_fused_conv_relu`; a copy of 3 channels costs less than those ReLUs' passes)."""
    part = x[..., e0:e1, c0:c1]
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
        return part.contiguous(memory_format=torch.channels_last)
    return part


def _beside(helper: Executor, fn: Callable[[], Any]) -> Future:
    """``fn()`` submitted to ``helper``'s thread under the caller's autocast, inference mode and torch
    thread count (thread-local settings a new thread does not inherit)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    inference, threads = torch.is_inference_mode_enabled(), torch.get_num_threads()

    def run() -> Any:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode(inference), torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return fn()

    return helper.submit(run)


#: Rows of the full-resolution tail computed at a time in inference (see ``MultiTaskNet._full_resolution``).
FULL_RES_STRIP_ROWS = 128
#: Half-resolution rows of the last decoder block and the heads' layers computed at a time in
#: inference (see ``MultiTaskNet._decode_strips``).
DECODER_STRIP_ROWS = 128
#: Context rows (and columns) on each side of a strip: even, and at least the tail's reach of 3 px
#: (a fine branch's edge row is off, by its 2x upsampling and its skip conv, and its two 3x3 convs
#: carry that 2 rows in; the full skip and refine convs reach 2). Measured: 4 gives the whole
#: tile's maps bit for bit, 2 and 3 do not (tests/test_network.py).
_STRIP_HALO = 4
#: Half-resolution px within which a window of the last decoder block differs from the whole
#: map's: its two 3x3 convs reach 2 (measured: 2 gives the whole map's values bit for bit, 0 and 1
#: do not).
_LAST_BLOCK_REACH = 2


def _tail_reads(side: int, margin: int) -> tuple[int, int]:
    """The full-resolution rows (or columns) ``[lo, hi)`` of a ``side`` px input that the tail of its
    core (the input less ``margin`` px each side) reads: the core and the strip halo, within the
    input (even where ``side`` and ``margin`` are, as the half-resolution slices need)."""
    return max(0, margin - _STRIP_HALO), min(side, side - margin + _STRIP_HALO)


def quantize_probabilities(p: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] as uint8 ``round(255 p)`` (a new tensor): 255 p + 0.5 lies in
    [0.5, 255.5), so truncation rounds."""
    return p.mul(255.0).add_(0.5).clamp_(max=255.0).to(torch.uint8)


class MultiTaskNet(nn.Module):
    """Cerberus-style multi-task network built from a :class:`ModelConfig`.

    ``model(x)`` takes N x 3 x H x W RGB in 0-255, float or uint8 (H, W multiples of ``config.stride``) and
    returns raw logits per output name; patch heads give N x C x 1 x 1 for the centre
    ``patch_cells`` window (as Cerberus). ``model.predict(x)`` returns float32 softmax probabilities
    with dense patch maps, for the engine.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        p = config.arch_params
        w = p.encoder_widths
        self.backbone = ResNetEncoder(p)
        # Private copies of the shallow stages for some decoders (ArchParams.private_decoders).
        self.private_encoder = nn.ModuleDict({d: ResNetEncoder(p, outputs=p.private_stages) for d in p.private_decoders if d in config.seg_decoders})
        self.conv_map = PointConv(w[4], w[3], bias=False)
        # Full-resolution skip for stride-2 stems (shared by all decoders / heads).
        refine = p.stem_stride == 2 and p.full_res == "refine"
        self.full_skip: ConvBNReLU | None = None
        if p.stem_stride == 2:
            self.full_skip = ConvBNReLU(3, p.full_res_channels if refine else p.decoder_out, 3)
        self._refine = refine
        self.decoder_head = nn.ModuleDict()
        self.output_head = nn.ModuleDict()
        for dec in config.seg_decoders:
            self.decoder_head[dec] = UNetDecoder(p)
            self.output_head[dec] = nn.ModuleDict()
        for head in config.heads.values():
            if head.kind == "patch":
                self.decoder_head[head.decoder] = build_patch_head(p, head)
            else:
                self.output_head[head.decoder][head.out_key] = OutputHead(
                    p.decoder_out,
                    p.head_hidden,
                    head.num_classes,
                    refine_channels=p.full_res_channels if refine else 0,
                    fine_channels=p.fine_channels if head.decoder in p.fine_decoders else 0,
                )
        self._channels_last = False
        self._folded = False

    # ---- convenience -------------------------------------------------------------------------
    @property
    def output_heads(self) -> list[str]:
        """Public output names in order."""
        return self.config.output_heads

    def fold_bn(self, enabled: bool = True) -> MultiTaskNet:
        """Fold every conv -> BN pair into one conv for eval-mode inference (about 1.5x faster on CPU).

        The state dict is unchanged (folded tensors are non-persistent buffers). Switching to train
        mode drops the folded tensors; ``load_state_dict`` recomputes them.
        """
        self._folded = enabled
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, _Foldable):
                    module.fold_bn(enabled)
        if self._channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def train(self, mode: bool = True) -> MultiTaskNet:
        """Set train/eval mode; entering train mode drops folded BN tensors (they would go stale)."""
        if mode and getattr(self, "_folded", False):
            self.fold_bn(False)
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``; refreshes folded BN tensors when folding is on."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if getattr(self, "_folded", False):
            self.fold_bn(True)
        return result

    def set_channels_last(self, enabled: bool = True) -> MultiTaskNet:
        """Convert weights (and inputs inside ``forward``) to channels_last memory format."""
        self._channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def _check_input(self, x: torch.Tensor) -> None:
        s = self.config.stride
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W input, got shape {tuple(x.shape)}")
        if x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"input height and width must be multiples of {s}, got {tuple(x.shape[-2:])}")

    # ---- forward ------------------------------------------------------------------------------
    def _select(self, heads: Sequence[str] | None) -> list[str]:
        if heads is None:
            return self.config.output_heads
        unknown = [h for h in heads if h not in self.config.heads]
        if unknown:
            raise ValueError(f"unknown heads {unknown}; this model has {self.config.output_heads}")
        return [h for h in self.config.output_heads if h in set(heads)]

    def _features(self, x: torch.Tensor, names: Sequence[str], *, probabilities: bool = False,
                  margin: int = 0, helper: Executor | None = None, quantized: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x4 and the logits (``probabilities``: float32 softmax) of the segmentation heads in
        ``names`` (only their decoders run), those less ``margin`` px on every side; ``helper`` and
        ``quantized`` as in :meth:`predict`."""
        self._check_input(x)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        raw, x = x, x / 255.0  # float32 from uint8 (the engine's input) too: the one float copy
        seg_heads = {n: self.config.heads[n] for n in names if self.config.heads[n].kind != "patch"}
        if helper is None or x.device.type != "cpu" or torch.is_grad_enabled() or not seg_heads:
            helper = None
        private = [d for d in dict.fromkeys(h.decoder for h in seg_heads.values()) if d in self.private_encoder]
        early = _beside(helper, lambda: {d: self.private_encoder[d](x) for d in private}) if helper and private else None
        feats = self.backbone(x)  # meanwhile the helper computes the private encoders
        x4 = feats[-1]
        if not seg_heads:
            return x4, {}
        window = self._tail_window(x, margin)
        if helper is not None:
            shallow = early.result() if early else {}
            if raw.dtype == torch.uint8 and window is not None:  # decoders given their private encoders' outputs read
                x = _Scaled(raw)  # no input, the tail reads strips: the whole float32 input goes now
            out, decoded = self._decode_beside(helper, feats, x, seg_heads, window, shallow=shallow)
        else:
            out, decoded = self._decode(feats, x, seg_heads, window=window)
        del feats  # the skips are not needed past the decoders
        if self._refine:
            origin = (0, 0) if window is None else (window[0], window[2])
            return x4, self._full_resolution(out, decoded, x, probabilities=probabilities, margin=margin, origin=origin,
                                             helper=helper, quantized=quantized)
        if margin:
            h, w = x.shape[-2:]
            out = {n: t[..., margin : h - margin, margin : w - margin] for n, t in out.items()}
        return x4, {n: torch.softmax(t.float(), dim=1) for n, t in out.items()} if probabilities else out

    def _tail_window(self, x: torch.Tensor, margin: int) -> tuple[int, int, int, int] | None:
        """The half-resolution window (y0, y1, x0, x1) whose decoder features the full-resolution
        tail of the input less ``margin`` reads, widened by the last decoder block's reach (so its
        values there are exact); None where the whole map is decoded (no margin, training, a tracer
        or exporter, no tail)."""
        if not margin or not self._refine or torch.is_grad_enabled() or _traced():
            return None
        window: list[int] = []
        for side in x.shape[-2:]:
            lo, hi = _tail_reads(side, margin)
            window += [max(0, lo // 2 - _LAST_BLOCK_REACH), min(side // 2, hi // 2 + _LAST_BLOCK_REACH)]
        return window[0], window[1], window[2], window[3]

    def _decode(self, feats: list[torch.Tensor], x: torch.Tensor | _Scaled, seg_heads: Mapping[str, Any],
                window: tuple[int, int, int, int] | None = None,
                shallow: Mapping[str, list[torch.Tensor]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each head's logits (half resolution for ``"refine"`` models) from the encoder's ``feats``;
        and the decoder features a fine branch still needs (the others are freed as soon as their
        last head has its logits). With ``window`` (:meth:`_tail_window`) both cover that window only.
        ``shallow``: private encoders' outputs already computed, by decoder."""
        x0, x1, x2, x3, x4 = feats
        skips = [x3, x2, x1, x0]
        full = None if self.full_skip is None or self._refine else self.full_skip(x)  # refine: in the tail
        if full is not None:
            skips.append(full)
        start = self.conv_map(x4)
        last = {h.decoder: n for n, h in seg_heads.items()}
        fine = {h.decoder for h in seg_heads.values() if self._refine and self.output_head[h.decoder][h.out_key].fine is not None}
        decoded: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, head in seg_heads.items():
            if name in out:  # its decoder ran in strips with the head before it
                continue
            if window is not None:  # inference: the last block and the heads' layers strip by strip
                theirs = {n: h for n, h in seg_heads.items() if h.decoder == head.decoder}
                logits, kept = self._decode_strips(head.decoder, start, self._own_skips(head.decoder, skips, x, shallow), window,
                                                   theirs, keep=head.decoder in fine)
                out.update(logits)
                decoded.update(kept)
                continue
            if head.decoder not in decoded:
                decoded[head.decoder] = self.decoder_head[head.decoder](start, self._own_skips(head.decoder, skips, x, shallow))
            if self._refine:
                out[name] = self.output_head[head.decoder][head.out_key].x(decoded[head.decoder])
            else:
                out[name] = self.output_head[head.decoder][head.out_key](decoded[head.decoder])
            if last[head.decoder] == name and head.decoder not in fine:
                del decoded[head.decoder]
        return out, decoded

    def _own_skips(self, decoder: str, skips: list[torch.Tensor], x: torch.Tensor,
                   shallow: Mapping[str, list[torch.Tensor]] | None) -> list[torch.Tensor]:
        """A decoder's skips: the shared encoder's, its private encoder's outputs in place of the first ones."""
        if decoder not in self.private_encoder:
            return skips
        mine = (shallow or {}).get(decoder) or self.private_encoder[decoder](x)  # x0 .. x(private_stages - 1)
        return [*skips[: 4 - len(mine)], *reversed(mine), *skips[4:]]

    def _decode_strips(self, decoder: str, start: torch.Tensor, skips: Sequence[torch.Tensor], window: tuple[int, int, int, int],
                       heads: Mapping[str, Any], *, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One decoder's part of :meth:`_decode` on ``window`` (inference of a ``"refine"`` model): its
        last block and its ``heads``' half-resolution layers (pointwise) run on strips of
        :data:`DECODER_STRIP_ROWS` rows, each with :data:`_LAST_BLOCK_REACH` rows of context inside the
        window, so those layers' wide intermediates exist for one strip at a time. The same values as
        the whole window at once (the block's reach is 2 rows; the window's own edges are zero-padded
        in both). Returns the heads' logits and, with ``keep``, the decoded features (a fine branch's)."""
        dec = self.decoder_head[decoder]
        up = dec.upper(start, skips)
        y0, y1, x0, x1 = window
        logits: dict[str, torch.Tensor] = {}
        feats: torch.Tensor | None = None
        for a, b, e0, e1 in _strips(y0, y1, DECODER_STRIP_ROWS, _LAST_BLOCK_REACH, y0, y1):
            part = dec.last(up, skips[-1], (e0, e1, x0, x1))[..., a - e0 : b - e0, :]
            if keep:
                if feats is None:
                    feats = _window_like(part, y1 - y0)
                feats[..., a - y0 : b - y0, :] = part
            for name, head in heads.items():
                t = self.output_head[decoder][head.out_key].x(part)
                if name not in logits:
                    logits[name] = _window_like(t, y1 - y0)
                logits[name][..., a - y0 : b - y0, :] = t
        return logits, ({decoder: feats} if feats is not None else {})

    def _decode_beside(self, helper: Executor, feats: list[torch.Tensor], x: torch.Tensor | _Scaled, seg_heads: Mapping[str, Any],
                       window: tuple[int, int, int, int] | None,
                       shallow: Mapping[str, list[torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`_decode` with the heads of every other decoder (the second, fourth, ...) computed on
        ``helper``'s thread meanwhile (the same values: each decoder is computed as it is alone)."""
        decoders = list(dict.fromkeys(h.decoder for h in seg_heads.values()))
        mine = {n: h for n, h in seg_heads.items() if h.decoder in decoders[0::2]}
        theirs = {n: h for n, h in seg_heads.items() if h.decoder in decoders[1::2]}
        if not theirs:
            return self._decode(feats, x, seg_heads, window=window, shallow=shallow)
        pending = _beside(helper, lambda: self._decode(feats, x, theirs, window=window, shallow=shallow))
        out, decoded = self._decode(feats, x, mine, window=window, shallow=shallow)
        more, more_decoded = pending.result()
        out.update(more)
        decoded.update(more_decoded)
        return {n: out[n] for n in seg_heads}, decoded

    def _full_resolution(self, half: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor], x: torch.Tensor | _Scaled, *,
                         probabilities: bool = False, margin: int = 0, origin: tuple[int, int] = (0, 0),
                         helper: Executor | None = None, quantized: bool = False) -> dict[str, torch.Tensor]:
        """The full-resolution tail of a ``"refine"`` model (full skip, refine, fine branches) from
        the half-resolution logits and decoder features (whose first row and column are ``origin``
        of the half-resolution grid: a window of it, :meth:`_tail_window`): logits, or float32
        softmax probabilities, for the input less ``margin`` px on every side.

        Without autograd and outside a tracer or exporter (a graph must not fix the strips to its example's
        size) a tall input goes through in strips of :data:`FULL_RES_STRIP_ROWS` rows,
        each computed with :data:`_STRIP_HALO` rows of context on both sides and cropped: every
        layer of the tail is local, so the strips give the whole tile's values while the tail's
        full-resolution intermediates (16 channels at the input's size) exist for one strip only.
        For the same reason the margin is never computed beyond that halo (the engine keeps only
        the core of each tile: about a third less of the tail, the most costly part of the network).
        """
        h, w = x.shape[-2:]
        m = margin
        if torch.is_grad_enabled() or _traced() or (not m and h <= FULL_RES_STRIP_ROWS + 2 * _STRIP_HALO):
            out = self._tail(half, decoded, x[...])
            if m:
                out = {n: t[..., m : h - m, m : w - m] for n, t in out.items()}
            return {n: torch.softmax(t.float(), dim=1) for n, t in out.items()} if probabilities else out
        c0, c1 = _tail_reads(w, m)
        oy, ox = origin
        res: dict[str, torch.Tensor] = {}
        allocating = threading.Lock()

        def strip(r0: int, r1: int, e0: int, e1: int) -> None:  # rows r0 .. r1 of the output, from e0 .. e1, written into res
            rows, cols = slice(e0 // 2 - oy, e1 // 2 - oy), slice(c0 // 2 - ox, c1 // 2 - ox)
            part = self._tail({n: t[..., rows, cols] for n, t in half.items()}, {d: t[..., rows, cols] for d, t in decoded.items()},
                              _strip_input(x, e0, e1, c0, c1))
            for name, t in part.items():
                t = t[..., r0 - e0 : r1 - e0, m - c0 : w - m - c0]
                if probabilities:  # on the rows and columns kept only (a pointwise step: the same values)
                    t = torch.softmax(t.float(), dim=1)
                if quantized:  # each strip as it comes: the tile's maps are never held as float32
                    t = quantize_probabilities(t)
                with allocating:  # the first strip done allocates; each strip writes its own rows
                    if name not in res:
                        res[name] = t.new_empty((*t.shape[:2], h - 2 * m, w - 2 * m))
                res[name][..., r0 - m : r1 - m, :] = t

        strips = _strips(m, h - m, FULL_RES_STRIP_ROWS, _STRIP_HALO, 0, h)
        pending = _beside(helper, lambda: [strip(*s) for s in strips[1::2]]) if helper is not None else None
        for bounds in strips[::2] if pending is not None else strips:
            strip(*bounds)
        if pending is not None:
            pending.result()
        return res

    def _tail(self, half: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of :meth:`_full_resolution` on one piece of the input (``half``/``decoded`` at half
        its size); the caller crops them and takes their softmax."""
        assert self.full_skip is not None
        out = self._refine_all(half, self.full_skip(x))
        for name in half:
            head = self.config.heads[name]
            fine = self.output_head[head.decoder][head.out_key].fine
            if fine is not None:
                out[name] = out[name] + fine(decoded[head.decoder], x).float()
        return out

    def _refine_all(self, half: dict[str, torch.Tensor], full: torch.Tensor) -> dict[str, torch.Tensor]:
        """``OutputHead`` refine step for all heads at once: one upsample, one 3x3 conv.

        The half-resolution logits are concatenated and zero-padded to a multiple of 16 channels
        (the fast channels_last kernels), upsampled 2x, the stacked ``refine`` convs applied to the
        full-resolution skip and added; each head gets its channels as a view (channels_last in
        memory: the strips of :meth:`_full_resolution` are copied into the NCHW output anyway).
        Identical to calling each head with ``full`` (logits are float32 even under autocast).
        """
        names = list(half)
        refines = [self.output_head[self.config.heads[n].decoder][self.config.heads[n].out_key].refine for n in names]
        sizes = [t.shape[1] for t in half.values()]
        total = sum(sizes)
        pad = (-total) % 16
        stacked = torch.cat(list(half.values()), dim=1)
        weight = torch.cat([r.weight for r in refines], dim=0)
        if pad:
            stacked = F.pad(stacked, (0, 0, 0, 0, 0, pad))
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad))
        # float32 from here on (cheap at half resolution; the fp32 channels_last kernel is fastest)
        up = F.interpolate(stacked.float(), size=full.shape[-2:], mode="bilinear", align_corners=False)
        logits = up.add_(F.conv2d(full, weight, padding=1))[:, :total]
        return dict(zip(names, torch.split(logits, sizes, dim=1)))

    def forward(self, x: torch.Tensor, *, heads: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Raw logits keyed by output name (patch heads: centre window, N x C x 1 x 1).

        Parameters
        ----------
        x
            N x 3 x H x W float RGB in 0-255; H and W multiples of ``config.stride``.
        heads
            Output names to compute (default all); decoders no requested head needs are skipped
            (e.g. ``heads=["Patch-Class"]`` runs only the encoder and that head).
        """
        names = self._select(heads)
        x4, out = self._features(x, names)
        patch = [n for n in names if self.config.heads[n].kind == "patch"]
        if patch:
            cells = self.config.arch_params.patch_cells
            h, w = x4.shape[-2:]
            if h > cells or w > cells:
                top, left = max(0, (h - cells) // 2), max(0, (w - cells) // 2)
                x4 = x4[..., top : top + min(h, cells), left : left + min(w, cells)]
            pooled = window_stats(x4, None, [self.config.heads[n].pool for n in patch])
            for name in patch:
                head = self.config.heads[name]
                out[name] = self.decoder_head[head.decoder](pooled[head.pool])
        return {n: out[n] for n in names}

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """The dense map a patch head with ``pool`` classifies in :meth:`predict`: the statistics of
        x4 over the ``patch_cells`` window centred on each cell (N x C' x H/ps x W/ps, float32;
        encoder only; see :func:`window_stats`)."""
        x4, _ = self._features(x, [])
        return window_stats(x4, self.config.arch_params.patch_cells, [pool])[pool]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, heads: Sequence[str] | None = None, margin: int = 0,
                helper: Executor | None = None, quantized: bool = False) -> dict[str, torch.Tensor]:
        """Softmax probabilities (float32) for the engine, of ``x``: N x 3 x H x W RGB in 0-255, float
        or uint8 (the engine's: scaled to float32 in one copy, where a float input is a second).

        Segmentation heads: N x C x H x W, or with ``margin`` N x C x (H - 2 margin) x (W - 2 margin):
        the maps of ``x[..., margin:H - margin, margin:W - margin]`` computed with all of ``x`` as
        context, the same values as cropping the whole maps (the full-resolution tail is never
        computed far into the margin; ``margin`` even). Patch heads: dense N x C x H/ps x W/ps maps
        (ps = ``config.patch_stride_px``, never cropped), each cell classified from the average of x4
        over the ``patch_cells`` x ``patch_cells`` window centred on it (windows clipped at the border),
        so the centre cell of a 1-patch tile equals the Cerberus centre-crop result.
        Works under ``torch.autocast``; outputs are always float32. ``heads`` as in ``forward``.
        ``helper`` (CPU): an executor with one thread that computes the private encoders while the
        calling thread runs the shared one, then every other decoder and half of the
        full-resolution strips while the calling thread computes the rest. Each op runs
        as it would without it, so the maps are the same; a core the caller leaves to other work
        (post-processing) is used by the network when that work has none.
        ``quantized``: the segmentation maps as uint8 :func:`quantize_probabilities`, made strip by
        strip where the tail runs in strips (a quarter of the float32 maps' memory).
        """
        if margin and (margin < 0 or margin % 2 or 2 * margin >= min(x.shape[-2:])):  # no shape guard for exporters at 0
            raise ValueError(f"margin must be even, >= 0 and less than half the input's side, not {margin}")
        names = self._select(heads)
        x4, seg = self._features(x, names, probabilities=True, margin=margin, helper=helper, quantized=quantized)
        pools = [self.config.heads[n].pool for n in names if self.config.heads[n].kind == "patch"]
        dense = window_stats(x4, self.config.arch_params.patch_cells, pools) if pools else {}
        out: dict[str, torch.Tensor] = {}
        with _one_thread(x.device.type == "cpu"):  # tiny; on one thread the same values at any thread count
            for name in names:
                head = self.config.heads[name]
                if head.kind == "patch":
                    out[name] = torch.softmax(self.decoder_head[head.decoder](dense[head.pool]).float(), dim=1)
                else:
                    out[name] = quantize_probabilities(seg[name]) if quantized and seg[name].is_floating_point() else seg[name]
        return out
