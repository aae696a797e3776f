"""Network throughput and agreement of the inference runtimes, on the same tiles of real tissue.

ADOPTION RULE (written before measuring): a runtime becomes the ``--runtime auto`` choice
(``wsi_mtl.network.runtime.AUTO_ORDER``) only if, on the same tiles, its max absolute probability
difference from torch fp32 is <= 0.02 for every head AND its median throughput is above eager bf16's
(today's CPU default) in the same run. An int8 graph additionally needs validation metrics within
0.005 of the float model's (``--validate``); without that validation it is not adopted.
Added 2026-12-07, before measuring on a CPU without native bf16 (AMD EPYC without AVX512, where
``--precision auto`` is fp32 and eager bf16 is emulated, several times slower): there the baseline is
eager fp32 (``default_runner``), and a runtime that passes against it is adopted for such CPUs only
if, besides, ``segment``'s network time on the 16,384^2 px mosaic of ``bench_end_to_end.py`` is lower
with it in 2 alternating pairs (the engine's torch call computes tile cores only; these runners
compute whole tiles).
RESULT on that CPU (2026-12-07, 2 threads, idle, 4 rounds): whole 1024^2 tiles torch fp32 1.85 MP/s,
OpenVINO f32 1.92 (1.04x wall, 1.07x per CPU s; maps equal within 1e-4), OpenVINO "bf16" 2.19 (the hint
falls back to f32 there: the same maps); but ``segment --no-objects --runtime openvino`` of the
16,384^2 mosaic, alternating with torch: network 48.8 / 47.3 s against 41.6 / 41.8 s (0.86x). Not
adopted: ``auto`` stays torch on such CPUs too.

RESULTS (2026-12-04, default model wsimtl-small, 2-core AMD EPYC with avx512_bf16, heavily loaded by
other work: load average 8-18, so absolute MP/s are 5-13x below an idle machine's). Max abs
probability difference vs torch fp32 over the 3 tiles (worst head): torch bf16 0.151 (Gland-INST),
ONNX Runtime fp32 < 1e-4, OpenVINO f32 < 1e-4, OpenVINO bf16 0.141, OpenVINO int8 (NNCF, 12
training tiles, heads/stem float) 0.999 (Patch-GlaS; Nuclei-INST 0.92). Median MP/s over rounds
(ratio to eager bf16 wall / per CPU-s):

  2 threads, 7 rounds: torch fp32 0.13 (0.69/0.80), torch bf16 0.19 (1/1), ORT fp32 0.26 (1.35/1.47),
  OpenVINO f32 0.43 (2.27/2.61), bf16 0.73 (3.83/4.38), int8 0.75 (3.94), int8+bf16 0.94 (4.92)
  1 thread, 5 rounds: torch fp32 0.20 (0.51/0.54), torch bf16 0.40 (1/1), OpenVINO f32 0.34
  (0.85/0.83), bf16 0.54 (1.36/1.41)

Validation (held-out split, tasks nuclei + glands; seconds for the split in brackets):
  torch fp32 (= OpenVINO f32 maps): nuclei Dice 0.7964 AJI 0.5389 PQ 0.5395, gland F1 0.8056 [61 s]
  torch bf16 (today's CPU default):  nuclei Dice 0.7970 AJI 0.5432 PQ 0.5420, gland F1 0.8056 [52 s]
  OpenVINO bf16:                     nuclei Dice 0.7968 AJI 0.5436 PQ 0.5431, gland F1 0.8056 [33 s]
  OpenVINO int8:                     nuclei Dice 0.7963 AJI 0.5366 PQ 0.5398, gland F1 0.7973 [42 s]
int8 misses 0.005 (gland F1 -0.0083 vs fp32) besides its maps; OpenVINO bf16 stays within 0.0011 of
eager bf16 on every metric, but its maps differ from eager bf16's by up to 0.059 (Patch-LC25000).

torch.compile (inductor, torch 2.13, the engine's channels_last input, one 1024^2 tile of the sample
slide, 2 threads, idle machine, 2026-12-05): fp32 2.1-2.3 MP/s vs eager fp32 2.0-2.4 (maps within
1e-6), bf16 1.7-1.9 vs eager bf16 2.9-3.0 (0.62x; maps within 0.021 of eager bf16), after a 75-79 s
first call: no gain on this CPU, so it is not offered.

Under load torch's two threads wait on each other far more than OpenVINO's; per core (1 thread)
and in issue 19's idle figures (0.80x) OpenVINO f32 is slower than eager bf16, so nothing was
adopted for ``auto`` (wsi_mtl.network.runtime.AUTO_ORDER); int8 fails the maps outright.

Usage (2 threads everywhere; other work on the machine disturbs absolute figures, so the runtimes
are interleaved over rounds and the ratios are taken within one run)::

    nice -n 5 python benchmarks/bench_runtime.py                       # all runtimes, 5 rounds
    nice -n 5 python benchmarks/bench_runtime.py --rounds 3 --skip onnx
    nice -n 5 python benchmarks/bench_runtime.py --int8 --validate nuclei,glands   # + NNCF int8 (pip install nncf), scored on the val split

Tiles: 1024 x 1024 crops of CMU-1-Small-Region.svs read at the model's 0.5 um/px (throughput is
timed on the first) and a MoNuSeg validation image at 0.5 um/px (agreement only). int8 is calibrated
on MoNuSeg and GlaS *training* images (never the validation split). Prints per runtime: median
MP/s with min-max over rounds, the ratio to eager bf16, and the max abs probability difference per
head against torch fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mtl.devices import cpu_has_bf16
from wsi_mtl.network import load_model
from wsi_mtl.network.runtime import OnnxRunner, OpenVinoRunner, available, export_openvino

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SLIDE = DATA / "wsi" / "CMU-1-Small-Region.svs"
TOLERANCE = 0.02


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from skimage.transform import rescale

    out = rescale(image, scale, channel_axis=-1, order=1, anti_aliasing=scale < 1, preserve_range=True)
    return out.astype(np.uint8)


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """Centre crop, then reflect-pad, ``image`` to side x side."""
    h, w = image.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    image = image[top : top + side, left : left + side]
    ph, pw = side - image.shape[0], side - image.shape[1]
    return np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def slide_tiles(mpp: float, side: int = 1024) -> list[np.ndarray]:
    """Two side x side crops of the sample slide at ``mpp``: the centre and the upper left quarter."""
    from wsi_mtl.slide import open_slide

    with open_slide(SLIDE) as slide:
        w = int(slide.width * slide.mpp / mpp)
        h = int(slide.height * slide.mpp / mpp)
        spots = [((w - side) // 2, (h - side) // 2), (max(0, w // 4 - side // 2), max(0, h // 4 - side // 2))]
        return [slide.read(x, y, side, side, mpp=mpp) for x, y in spots]


def monuseg(names: list[str], side: int, mpp: float) -> list[np.ndarray]:
    """MoNuSeg images (0.25 um/px) at ``mpp``, fitted to side x side."""
    return [_fit(_resize(_png(DATA / "nuclei/monuseg/images" / f"{n}.png"), 0.25 / mpp), side) for n in names]


def training_tiles(mpp: float, side: int = 512, count: int = 12) -> list[np.ndarray]:
    """Calibration tiles from the training part only: MoNuSeg and GlaS images not in the validation split."""
    import csv

    import yaml

    val = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/splits/validation.yaml").read_text())
    with open(DATA / "nuclei/monuseg/manifest.csv") as f:
        mono = [r["name"] for r in csv.DictReader(f) if r["split"] == "train" and r["name"] not in set(val["monuseg"])]
    glas = sorted(p for p in (DATA / "glands/glas/images").glob("train_*.png") if p.stem not in set(val["glas"]))
    tiles = monuseg(mono[: count // 2], side, mpp)
    tiles += [_fit(_resize(_png(p), 0.62 / mpp), side) for p in glas[: count - len(tiles)]]
    return tiles


def to_input(image: np.ndarray) -> torch.Tensor:
    """The engine's input: NHWC uint8 -> NCHW float that is channels_last in memory."""
    return torch.from_numpy(np.ascontiguousarray(image))[None].permute(0, 3, 1, 2).float()


def torch_predict(model: Any, bf16: bool) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), ctx:
            return model.predict(x)

    return run


def int8_model(model: Any, calib: list[np.ndarray]) -> Any:
    """NNCF post-training int8 quantisation of the exported OpenVINO graph, calibrated on ``calib``."""
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(export_openvino(model)))
    data = nncf.Dataset([np.ascontiguousarray(to_input(t).numpy()) for t in calib])
    # the layers nearest the maps stay float: patch heads, output heads, fine branches, full-res skip, stem
    keep = nncf.IgnoredScope(patterns=[r".*Patch-.*", r".*output_head.*", r".*full_skip.*", r"__module\.model\.backbone/aten::_convolution/Convolution"],
                             validate=False)
    return nncf.quantize(ov_model, data, subset_size=len(calib), preset=nncf.QuantizationPreset.MIXED, ignored_scope=keep)


def default_runner() -> str:
    """The runner of ``--precision auto``, the baseline: eager bf16 where the CPU has native bf16, else fp32."""
    return "torch bf16" if cpu_has_bf16() else "torch fp32"


def build_runners(model: Any, skip: set[str], int8: bool, threads: int) -> dict[str, Callable]:
    runners: dict[str, Callable] = {"torch fp32": torch_predict(model, False)}
    if cpu_has_bf16():  # emulated elsewhere: several times slower than fp32, never a baseline
        runners["torch bf16"] = torch_predict(model, True)
    if "onnx" not in skip and available("onnx"):
        runners["onnxruntime fp32"] = OnnxRunner(model, threads=threads).predict
    if "openvino" not in skip and available("openvino"):
        runners["openvino f32"] = OpenVinoRunner(model, threads=threads).predict
        runners["openvino bf16"] = OpenVinoRunner(model, precision=torch.bfloat16, threads=threads).predict
        if int8:
            t0 = time.perf_counter()
            q = int8_model(model, training_tiles(float(model.config.mpp)))
            print(f"int8 calibration: {time.perf_counter() - t0:.0f} s")
            runners["openvino int8"] = OpenVinoRunner(model, threads=threads, ov_model=q).predict
            runners["openvino int8+bf16"] = OpenVinoRunner(model, precision=torch.bfloat16, threads=threads, ov_model=q).predict
    return runners


def agreement(runners: dict[str, Callable], tiles: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Max abs probability difference per head against torch fp32, over all ``tiles``."""
    refs = [runners["torch fp32"](x) for x in tiles]
    out = {}
    for name, run in runners.items():
        diffs: dict[str, float] = {}
        for x, ref in zip(tiles, refs):
            for head, p in run(x).items():
                diffs[head] = max(diffs.get(head, 0.0), float((p.float() - ref[head]).abs().max()))
        out[name] = diffs
    return out


def throughput(runners: dict[str, Callable], x: torch.Tensor, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall MP/s and MP per CPU-second of each runner on ``x``, interleaved: every round runs all of
    them, in a rotated order. CPU seconds (this process, all threads) are less disturbed by other
    work on the machine than wall seconds."""
    names = list(runners)
    for name in names:  # warm-up (and compilation for the exported graphs)
        runners[name](x)
    mp = x.shape[0] * x.shape[-2] * x.shape[-1] / 1e6
    speeds: dict[str, list[float]] = {n: [] for n in names}
    per_cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name](x)
            speeds[name].append(mp / (time.perf_counter() - t0))
            per_cpu[name].append(mp / (time.process_time() - c0))
    return speeds, per_cpu


def validate(model: Any, runners: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Validation metrics of the torch model (bf16 and fp32) and each runner on the held-out split."""
    from wsi_mtl.train import evaluate_split, load_split

    split = load_split(Path(__file__).resolve().parents[1] / "configs/splits/validation.yaml")
    out = {}
    for name, runner in runners.items():
        t0 = time.perf_counter()
        res = evaluate_split(runner, data_root=DATA, split=split, tasks=tasks, bf16=name == "torch bf16")
        flat = {f"{task}.{k}": float(v) for task, d in res.items() if isinstance(d, dict)
                for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[name] = flat
        print(f"validated {name} in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated: onnx, openvino")
    ap.add_argument("--int8", action="store_true", help="also NNCF int8 (calibrated on training tiles)")
    ap.add_argument("--validate", default="", help="comma-separated evaluation tasks to score torch and int8 on, e.g. nuclei,glands")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    mpp = float(model.config.mpp)
    images = slide_tiles(mpp) + monuseg(["TCGA-A7-A13E-01Z-00-DX1"], 1024, mpp)
    tiles = [to_input(im) for im in images]
    runners = build_runners(model, set(filter(None, args.skip.split(","))), args.int8, args.threads)
    diffs = agreement(runners, tiles)
    speeds, per_cpu = throughput(runners, tiles[0], args.rounds)
    ref = default_runner()
    cpu_base = statistics.median(per_cpu[ref])
    base = statistics.median(speeds[ref])
    print(f"{len(tiles)} tiles 1024 px at {mpp} um/px, {args.threads} threads, {args.rounds} interleaved rounds; ratios to {ref} "
          f"(--precision auto on this CPU)")
    print(f"{'runtime':20s} {'MP/s median':>11s} {'min-max':>11s} {'/auto':>6s} {'MP/CPU-s':>8s} {'/auto':>6s}  max|dp| vs fp32 (worst head)  pass")
    report = {}
    for name, s in speeds.items():
        med = statistics.median(s)
        worst = max(diffs[name].items(), key=lambda kv: kv[1])
        ok = worst[1] <= TOLERANCE and med > base
        cpu = statistics.median(per_cpu[name])
        print(f"{name:20s} {med:11.2f} {min(s):5.2f}-{max(s):<5.2f} {med / base:6.2f} {cpu:8.2f} {cpu / cpu_base:6.2f}  "
              f"{worst[1]:.4f} ({worst[0]})  {'yes' if ok else 'no'}")
        report[name] = {"mp_s": s, "median": med, "ratio_bf16": med / base, "mp_per_cpu_s": per_cpu[name],
                        "ratio_bf16_cpu": cpu / cpu_base, "max_abs_diff": diffs[name]}
    if args.validate:
        chosen = {k: v.__self__ if hasattr(v, "__self__") else model for k, v in runners.items() if k in ("torch fp32", "torch bf16") or "int8" in k}
        chosen.update({k: model for k in ("torch fp32", "torch bf16") if k in runners})
        metrics = validate(model, chosen, args.validate.split(","))
        for name, m in metrics.items():
            delta = {k: round(v - metrics["torch fp32"][k], 4) for k, v in m.items() if k in metrics["torch fp32"]}
            print(name, json.dumps({k: round(v, 4) for k, v in m.items()}), "delta vs fp32:", json.dumps(delta))
        report["validation"] = metrics
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
