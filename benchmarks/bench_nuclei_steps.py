"""Benchmark: what the nuclei post-processing steps cost against the network, on real tiles.

Runs a model over the MoNuSeg images of the validation split (0.5 um/px), then times, in the
same run and on the same maps (uint8, as `wsimtl segment` stores them), the nuclei instance step
with the model's tuned settings and with its neck cutting (``nuclei_split_h``) and confidence
filter (``nuclei_min_interior``) switched off, and prints the ratios: tuned / without those steps,
and each against the network's time for the same tiles. Needs ``../shared/data``.

Usage::

    python benchmarks/bench_nuclei_steps.py [--model wsimtl-small] [--repeats 5]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wsimtl-small")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

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
