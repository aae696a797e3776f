"""The network's memory and time on one engine tile: the full-resolution tail whole or in strips.

``MultiTaskNet.predict`` computes its full-resolution tail (full skip, refine, fine branches,
softmax) in row strips of ``FULL_RES_STRIP_ROWS`` during inference. This prints, for the model the
engine runs (default: the shipped one) on one CPU tile of real tissue (1536 px core + 192 px margin
each side = 1920 x 1920 px, the sample slide when present, else texture), each way in its own
process:

  forward peak          the process's RSS peak during ``predict`` above its RSS before (sampled
                        every 2 ms), MB
  forward time          the best of ``--repeats`` calls after a warm-up, s

and the ratios strips / whole, with the largest absolute probability difference between the two.

    python benchmarks/bench_network_memory.py [--model wsimtl-small] [--side 1920] [--threads 2]

Times depend on what else runs on the machine; the memory figures much less.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _child import run_child  # noqa: E402

SAMPLE = HERE.parents[1] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _tile(side: int):
    """A side x side RGB tile of real tissue (the sample slide, tiled to size) or smooth texture."""
    import numpy as np

    try:
        import openslide

        with openslide.OpenSlide(str(SAMPLE)) as s:
            w, h = s.dimensions
            img = np.asarray(s.read_region((0, 0), 0, (min(w, side), min(h, side))).convert("RGB"))
        reps = (-(-side // img.shape[0]), -(-side // img.shape[1]), 1)
        return np.tile(img, reps)[:side, :side]
    except Exception:  # noqa: BLE001 - no openslide or no sample: texture
        rng = np.random.default_rng(0)
        return (rng.uniform(80, 230, (side // 16, side // 16, 3)).repeat(16, 0).repeat(16, 1)).astype(np.uint8)


def _child(model_name: str, side: int, threads: int, repeats: int, strips: bool, out: str) -> dict:
    import numpy as np
    import psutil
    import torch

    import wsi_mtl.network.model as net_model
    from wsi_mtl.network import load_model

    torch.set_num_threads(threads)
    if not strips:
        net_model.FULL_RES_STRIP_ROWS = 10**9
    model = load_model(model_name).set_channels_last(True)
    x = torch.from_numpy(_tile(side)).permute(2, 0, 1)[None].float().contiguous()
    with torch.inference_mode():
        model.predict(x[..., :256, :256])
    proc = psutil.Process()
    base, peak, stop = proc.memory_info().rss, [0], [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    with torch.inference_mode():
        probs = model.predict(x)
    stop[0] = True
    th.join()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.predict(x)
        best = min(best, time.perf_counter() - t0)
    np.savez(out, **{k: v.numpy() for k, v in probs.items()})
    return {"peak_mb": (peak[0] - base) / 2**20, "seconds": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wsimtl-small")
    ap.add_argument("--side", type=int, default=1920, help="tile side (px); the CPU default is 1536 + 2 x 192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["whole", "strips"])
    ap.add_argument("--out")
    args = ap.parse_args()
    common = ["--model", args.model, "--side", str(args.side), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    if args.child:
        print(json.dumps(_child(args.model, args.side, args.threads, args.repeats, args.child == "strips", args.out)))
        return
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench_netmem_") as tmp:
        res = {k: run_child(__file__, *common, "--child", k, "--out", f"{tmp}/{k}.npz") for k in ("whole", "strips")}
        a, b = np.load(f"{tmp}/whole.npz"), np.load(f"{tmp}/strips.npz")
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    w, s = res["whole"], res["strips"]
    print(f"{args.model} on one {args.side}^2 tile, {args.threads} threads")
    print(f"forward peak: whole {w['peak_mb']:.0f} MB, strips {s['peak_mb']:.0f} MB: ratio {s['peak_mb'] / w['peak_mb']:.2f}")
    print(f"forward time: whole {w['seconds']:.2f} s, strips {s['seconds']:.2f} s: ratio {s['seconds'] / w['seconds']:.3f}")
    print(f"largest probability difference strips vs whole: {diff:.3g}")


if __name__ == "__main__":
    main()
