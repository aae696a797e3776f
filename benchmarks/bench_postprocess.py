"""Benchmark: nuclei post-processing throughput and memory against slide size.

Builds synthetic predictions.zarr stores holding N and 4N nuclei (jittered grid of ellipses as
3-class Nuclei-INST maps plus a 7-class Nuclei-TYPE map, written band by band so building never
holds a whole map), then runs ``extract_objects(tasks=("nuclei",))`` on each in its own
subprocess and prints, from one run:

* nuclei/s per core (goal >= 2,000) with the shipped model's tuned settings (neck cutting,
  min_interior, min area), end to end: zarr reads, instances, types, polygons,
  measurements and ObjectBatch assembly, as nuclei per CPU-second of all processes (on a shared
  machine wall time mostly measures the neighbours; wall-clock rates are printed too);
* peak RSS of the extraction process (and of the largest pool worker, sampled with psutil) and
  the ratio 4N / N (goal <= 1.2: memory flat in slide size).

Usage::

    nice -n 10 python benchmarks/bench_postprocess.py [--nuclei 200000] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import ProcessTree  # noqa: E402

log = logging.getLogger("bench_postprocess")

SPACING_PX = 16  # grid pitch of the synthetic nuclei, model px (8 um at 0.5 um/px)
BAND_PX = 512


def _stamps(rng: np.random.Generator, n: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Small 3-class ellipse stamps (probabilities, foreground mask)."""
    from skimage.draw import ellipse

    from wsi_mtl.postprocess import label_to_3class

    out = []
    for _ in range(n):
        lab = np.zeros((15, 15), np.int32)
        a, b = rng.uniform(3.5, 6.0), rng.uniform(3.0, 5.0)
        lab[ellipse(7, 7, a, b, shape=lab.shape, rotation=rng.uniform(0, np.pi))] = 1
        prob = label_to_3class(lab, erosion_px=1)
        # soften: confident but not one-hot, as a network would give
        soft = (prob.astype(np.float32) * 0.9 + 255 * 0.1 / 3).round().astype(np.uint8)
        out.append((soft, lab > 0))
    return out


def build(path: Path, n_nuclei: int, *, seed: int = 0) -> dict:
    """Write a predictions.zarr with about ``n_nuclei`` nuclei; returns its description."""
    from wsi_mtl.store import HeadLayout, PredictionStore

    rng = np.random.default_rng(seed)
    grid = math.ceil(math.sqrt(n_nuclei))
    side = grid * SPACING_PX
    stamps = _stamps(rng)
    heads = [HeadLayout("Nuclei-INST", 3), HeadLayout("Nuclei-TYPE", 7)]
    types = ["nolabel", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"]
    attrs = {
        "heads": {
            "Nuclei-INST": {"kind": "inst", "classes": ["background", "interior", "boundary"],
                            "colors": [[0, 0, 0], [0, 120, 255], [255, 200, 0]], "cell_px": 1},
            "Nuclei-TYPE": {"kind": "type", "classes": types, "colors": [[i * 30, 100, 200 - i * 20] for i in range(7)],
                            "cell_px": 1},
        },
        "slide": {"mpp": 0.25}, "model_mpp": 0.5, "downsample": 2.0,
    }
    store = PredictionStore(path, heads=heads, height=side, width=side, core_px=BAND_PX, downsample=2.0,
                            fingerprint={"bench": n_nuclei}, attrs=attrs)
    planted = 0
    per_band = BAND_PX // SPACING_PX
    for b0 in range(0, grid, per_band):
        rows = range(b0, min(grid, b0 + per_band))
        y_base = b0 * SPACING_PX
        inst = np.zeros((3, BAND_PX, side), np.uint8)
        inst[0] = 255
        typ = np.zeros((7, BAND_PX, side), np.uint8)
        typ[0] = 255
        for r in rows:
            for c in range(grid):
                if planted >= n_nuclei:
                    break
                prob, fg = stamps[rng.integers(len(stamps))]
                y = (r - b0) * SPACING_PX + rng.integers(0, 2)
                x = c * SPACING_PX + rng.integers(0, 2)
                sl = (slice(y, y + 15), slice(x, x + 15))
                inst[:, sl[0], sl[1]][:, fg] = prob[:, fg]
                t = np.zeros(7, np.uint8)
                t[rng.integers(1, 7)] = 200
                t[0] = 55
                typ[:, sl[0], sl[1]][:, fg] = t[:, None]
                planted += 1
        h = min(BAND_PX, side - y_base)
        store.root["Nuclei-INST"]["0"][:, y_base : y_base + h, :] = inst[:, :h]
        store.root["Nuclei-TYPE"]["0"][:, y_base : y_base + h, :] = typ[:, :h]
    final = store.finalize()
    return {"path": str(final), "planted": planted, "side_px": side}


def shipped_params():
    """The shipped model's tuned post-processing settings (neck cutting, min_interior, ...)."""
    from wsi_mtl.postprocess import PostprocessParams

    config = json.loads((Path(__file__).resolve().parents[1] / "models" / "wsimtl-small" / "config.json").read_text())
    return PostprocessParams.from_mapping(config.get("extra", {}).get("postprocess"))


def extract(path: Path, *, workers: int, chunk_px: int) -> dict:
    """Run nuclei extraction with the shipped model's settings, consuming batches as a streaming
    exporter would."""
    from wsi_mtl.postprocess import extract_objects

    sampler = ProcessTree(every_s=0.2) if workers > 1 else None
    me = resource.getrusage(resource.RUSAGE_SELF)
    t0, c0 = time.perf_counter(), me.ru_utime + me.ru_stime
    n = 0
    for batch in extract_objects(path, tasks=("nuclei",), workers=workers, chunk_px=chunk_px, params=shipped_params()):
        n += len(batch)
    dt = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF)
    dc = me.ru_utime + me.ru_stime - c0
    child_mb = 0.0
    if sampler is not None:
        sampler.stop()
        dc += sampler.cpu_seconds()
        child_mb = sampler.largest_child_mb
    return {"nuclei": n, "seconds": dt, "cpu_seconds": dc, "rss_self_mb": me.ru_maxrss / 1024,
            "rss_children_mb": child_mb}


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuclei", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--chunk-px", type=int, default=2048)
    ap.add_argument("--scale", type=int, default=4, help="size of the large run relative to the base run")
    ap.add_argument("--child", choices=["build", "extract"])
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child == "build":
        print(json.dumps(build(Path(args.path), args.nuclei)))
        return
    if args.child == "extract":
        print(json.dumps(extract(Path(args.path), workers=args.workers, chunk_px=args.chunk_px)))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_pp_") as tmp:
        for scale in (1, args.scale):
            n = args.nuclei * scale
            t0 = time.perf_counter()
            built = _run_child("--child", "build", "--nuclei", str(n), "--path", str(Path(tmp) / f"x{scale}"))
            log.info("built %d nuclei on %d x %d px in %.0f s", built["planted"], built["side_px"], built["side_px"],
                     time.perf_counter() - t0)
            res = _run_child("--child", "extract", "--path", built["path"], "--workers", str(args.workers),
                             "--chunk-px", str(args.chunk_px))
            res["planted"] = built["planted"]
            results[scale] = res
            rss = max(res["rss_self_mb"], res["rss_children_mb"])
            log.info("x%d: %d nuclei (planted %d) in %.1f s wall, %.1f s CPU = %.0f nuclei per CPU-second; "
                     "peak RSS %.0f MB", scale, res["nuclei"], res["planted"], res["seconds"], res["cpu_seconds"],
                     res["nuclei"] / res["cpu_seconds"], rss)
            import shutil

            shutil.rmtree(Path(tmp) / f"x{scale}", ignore_errors=True)
    base, big = results[1], results[args.scale]
    peak = lambda r: max(r["rss_self_mb"], r["rss_children_mb"])  # noqa: E731
    # per core = per CPU-second of all processes: wall time on a shared machine measures the neighbours
    log.info("nuclei/s per core (CPU time): %.0f (x1), %.0f (x%d); wall-clock per worker: %.0f, %.0f  [goal >= 2000]",
             base["nuclei"] / base["cpu_seconds"], big["nuclei"] / big["cpu_seconds"], args.scale,
             base["nuclei"] / base["seconds"] / args.workers, big["nuclei"] / big["seconds"] / args.workers)
    log.info("peak RSS x%d / x1: %.0f / %.0f MB = %.2f  [goal <= 1.2]", args.scale, peak(big), peak(base),
             peak(big) / peak(base))
    if base["nuclei"] != base["planted"] or big["nuclei"] != big["planted"]:
        log.warning("found %d / %d nuclei, planted %d / %d", base["nuclei"], big["nuclei"], base["planted"], big["planted"])


if __name__ == "__main__":
    main()
