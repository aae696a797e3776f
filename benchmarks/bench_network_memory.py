"""The network's memory and time on one engine tile: its wide layers whole or in strips.

During inference ``MultiTaskNet.predict`` computes its full-resolution tail (full skip, refine,
fine branches, softmax) in row strips of ``FULL_RES_STRIP_ROWS``, and each decoder's last block with
its heads' half-resolution layers in strips of ``DECODER_STRIP_ROWS``. This prints, for the model
the engine runs (default: the shipped one) on one CPU tile of real tissue (1536 px core + 192 px
margin each side = 1920 x 1920 px, the sample slide when present, else texture), called as the
engine calls it (``predict(x, margin=192)`` on the tile's uint8 pixels, in the malloc setting ``segment`` gives its process;
``--helper``: on one torch thread with the second branch thread, as beside the chunk workers),
three ways, each in its own process: ``whole`` (neither in strips), ``tail`` (the tail only) and
``strips`` (both: the default):

  forward peak          the process's RSS peak during ``predict`` above its RSS before (sampled
                        every 2 ms), MB
  forward time          the best of ``--repeats`` calls after a warm-up, s

and the ratios to ``whole``, with the largest absolute probability difference to it.

    python benchmarks/bench_network_memory.py [--model wsimtl-small] [--side 1920] [--threads 2] [--helper]

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


#: what each child computes in strips (the rest whole)
WAYS = {"whole": (), "tail": ("tail",), "strips": ("tail", "decoders")}
MARGIN = 192


def _child(model_name: str, side: int, threads: int, repeats: int, way: str, helper: bool, out: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import psutil
    import torch

    import wsi_mtl.network.model as net_model
    from wsi_mtl.malloc import NETWORK_TOP_KEEP, keep_freed_pages
    from wsi_mtl.network import load_model

    keep_freed_pages(NETWORK_TOP_KEEP)  # as segment's process
    torch.set_num_threads(1 if helper else threads)
    if "tail" not in WAYS[way]:
        net_model.FULL_RES_STRIP_ROWS = 10**9
    if "decoders" not in WAYS[way]:
        net_model.DECODER_STRIP_ROWS = 10**9
    model = load_model(model_name).set_channels_last(True)
    x = torch.from_numpy(_tile(side))[None].permute(0, 3, 1, 2)  # as the engine gives it: uint8, channels_last
    pool = ThreadPoolExecutor(1) if helper else None
    with torch.inference_mode():
        model.predict(x[..., :512, :512], margin=MARGIN, helper=pool)
    proc = psutil.Process()
    base, peak, stop = proc.memory_info().rss, [0], [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    with torch.inference_mode():
        probs = model.predict(x, margin=MARGIN, helper=pool)
    stop[0] = True
    th.join()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.predict(x, margin=MARGIN, helper=pool)
        best = min(best, time.perf_counter() - t0)
    np.savez(out, **{k: v.numpy() for k, v in probs.items()})
    return {"peak_mb": (peak[0] - base) / 2**20, "seconds": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wsimtl-small")
    ap.add_argument("--side", type=int, default=1920, help="tile side (px); the CPU default is 1536 + 2 x 192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--helper", action="store_true", help="one torch thread and the second branch thread (segment beside its chunk workers)")
    ap.add_argument("--child", choices=list(WAYS))
    ap.add_argument("--out")
    args = ap.parse_args()
    common = ["--model", args.model, "--side", str(args.side), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    common += ["--helper"] if args.helper else []
    if args.child:
        print(json.dumps(_child(args.model, args.side, args.threads, args.repeats, args.child, args.helper, args.out)))
        return
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench_netmem_") as tmp:
        res = {k: run_child(__file__, *common, "--child", k, "--out", f"{tmp}/{k}.npz") for k in WAYS}
        whole = np.load(f"{tmp}/whole.npz")
        diffs = {}
        for k in WAYS:
            other = np.load(f"{tmp}/{k}.npz")
            diffs[k] = max(float(np.abs(whole[h].astype(np.float64) - other[h]).max()) for h in whole.files)
    w = res["whole"]
    how = "1 torch thread + the branch thread" if args.helper else f"{args.threads} threads"
    print(f"{args.model} on one {args.side}^2 tile (margin {MARGIN}), {how}, segment's malloc setting")
    for k, r in res.items():
        print(f"  {k:6s}: forward peak {r['peak_mb']:5.0f} MB ({r['peak_mb'] / w['peak_mb']:.2f}), time {r['seconds']:.2f} s "
              f"({r['seconds'] / w['seconds']:.3f}), largest probability difference to whole {diffs[k]:.3g}")


if __name__ == "__main__":
    main()
