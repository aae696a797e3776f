"""Benchmark: what the nuclei post-processing steps cost against the network, on real tiles.

Runs a model over the MoNuSeg images of the validation split (0.5 um/px), then times, in the
same run and on the same maps (uint8, as `wsimtl segment` stores them), the nuclei instance step
with the model's tuned settings and with its neck cutting (``nuclei_split_h``) and confidence
filter (``nuclei_min_interior``) switched off, and prints the ratios: tuned / without those steps,
and each against the network's time for the same tiles. Needs ``../shared/data``.

With ``--store PATH`` it instead reads the Nuclei-INST map of a ``predictions.zarr`` (e.g. from
``wsimtl segment SLIDE -o OUT --no-objects``) and prints nuclei per CPU second of the nuclei step
with the model's tuned settings, with the compiled h-maxima (numba) and with
skimage's, checks that both give the same labels, and prints the numba load/compile time (not
counted in the rates; ``cache=True`` makes later runs load it from disk).

Usage::

    python benchmarks/bench_nuclei_steps.py [--model wsimtl-small] [--repeats 5]
    python benchmarks/bench_nuclei_steps.py --store OUT/predictions.zarr [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_cpu(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def on_store(path: Path, model: str, repeats: int) -> None:
    """Nuclei per CPU second on a stored map, compiled h-maxima against skimage's."""
    import zarr

    from wsi_mtl.network import load_model
    from wsi_mtl.postprocess import _compiled, nuclei_labels, params_of

    prob = np.asarray(zarr.open_group(str(path), mode="r")["Nuclei-INST"]["0"][:])
    tuned = params_of(load_model(model))
    have = _compiled.HAVE_NUMBA
    t0 = time.perf_counter()
    if have:
        tiny = np.ones((4, 4), bool)
        tiny[0, 0] = False
        _compiled.h_maxima_bool(_compiled.edt32(tiny), 0.5)
        _compiled.smooth_and_peaks(np.ones((4, 4), np.float32), tiny, 0.5, 2)
    t_jit = time.perf_counter() - t0
    rates = {}
    labels = {}
    for name, on in (("skimage", False), ("numba", True)):
        if on and not have:
            continue
        _compiled.HAVE_NUMBA = on
        labels[name] = nuclei_labels(prob, tuned)
        cpu = _best_cpu(lambda: nuclei_labels(prob, tuned), repeats)
        rates[name] = int(labels[name].max()) / cpu
        print(f"{name:8s}: {int(labels[name].max())} nuclei, {cpu:.3f} CPU s (best of {repeats}), {rates[name]:,.0f} nuclei/CPU s")
    _compiled.HAVE_NUMBA = have
    print(f"map {prob.shape[1]}x{prob.shape[2]}, split_h={tuned.nuclei_split_h}; numba import + load (or compile, when not cached) {t_jit:.2f} s (not in the rates)")
    if len(rates) == 2:
        same = np.array_equal(labels["skimage"], labels["numba"])
        print(f"numba / skimage: {rates['numba'] / rates['skimage']:.2f}x; same labels: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wsimtl-small")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--store", type=Path, help="time the nuclei step on this predictions.zarr instead")
    args = ap.parse_args()
    if args.store is not None:
        on_store(args.store, args.model, args.repeats)
        return

    from wsi_mtl.network import load_model
    from wsi_mtl.train._config import DEFAULT_SOURCE_MPP, load_split
    from wsi_mtl.train._data import load_monuseg
    from wsi_mtl.train._evaluate import predict_image
    from wsi_mtl.postprocess import nuclei_labels, params_of

    torch.set_num_threads(2)
    model = load_model(args.model)
    split = load_split(ROOT / "configs" / "splits" / "validation.yaml")
    items = load_monuseg(args.data_root, mpp=float(model.config.mpp), source_mpp=DEFAULT_SOURCE_MPP["monuseg"], names=split["monuseg"])
    with torch.inference_mode():
        predict_image(model, items[0].image, heads=["Nuclei-INST"], bf16=False)  # warm-up
        t0 = time.perf_counter()
        maps = [predict_image(model, it.image, heads=["Nuclei-INST"], bf16=False)["Nuclei-INST"] for it in items]
        t_net = time.perf_counter() - t0
    maps = [np.round(m * 255).astype(np.uint8) for m in maps]
    tuned = params_of(model)
    plain = replace(tuned, nuclei_split_h=0.0, nuclei_min_interior=0.0)
    t_tuned = sum(_best_of(lambda: nuclei_labels(m, tuned), args.repeats) for m in maps)
    t_plain = sum(_best_of(lambda: nuclei_labels(m, plain), args.repeats) for m in maps)
    n = sum(int(nuclei_labels(m, tuned).max()) for m in maps)
    mp = sum(m.shape[1] * m.shape[2] for m in maps) / 1e6
    print(f"{len(maps)} tiles, {mp:.2f} MP at {model.config.mpp} um/px, {n} nuclei; split_h={tuned.nuclei_split_h}, min_interior={tuned.nuclei_min_interior}")
    print(f"nuclei instances, tuned / without neck cutting and confidence filter: {t_tuned / t_plain:.2f}")
    print(f"nuclei instances / network (fp32, 2 threads), tuned: {t_tuned / t_net:.2f}; without: {t_plain / t_net:.2f}")


if __name__ == "__main__":
    main()
