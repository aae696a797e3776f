"""Benchmark: the network call of ``segment`` on engine-sized tiles of real tissue, this tree vs a git revision.

Each child process loads the shipped model from one tree (the working tree, or a ``git worktree``
of ``--compare REV``) and times the call the engine of that tree makes per tile: one input of
``core + 2 x margin`` px (1536 + 2 x 192 at 0.5 um/px, the CPU default) from the sample slide,
``predict(x, margin=192)`` where the tree has it (the core's maps only), else ``predict(x)``, in the
malloc setting ``segment`` gives its process (freed pages kept, :mod:`wsi_mtl.malloc`).
Children of the two trees alternate, ``--rounds`` times per precision, so that a machine's drift
shows in both; the figure is the median over rounds of each child's median tile time. Prints input
MP/s per tree and precision, the ratio, and whether the two trees' cores, quantised to uint8 as the
engine stores them, are identical.

Usage::

    python benchmarks/bench_engine_tile.py --compare e8880de            # bf16 and fp32, 5 rounds
    python benchmarks/bench_engine_tile.py --compare e8880de --precision bf16 --rounds 3
    python benchmarks/bench_engine_tile.py --compare HEAD --precision fp32 --helper

``--helper``: the call as ``segment`` makes it on 2 cores beside its post-processing (one torch
thread plus the branch thread of ``predict(..., helper=)``); a tree without that argument runs on
two threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
CORE, MARGIN = 1536, 192


def _child(tree: str, precision: str, repeats: int, out: str, helper: bool) -> dict:
    """Time this tree's engine call on one tile; save the uint8 cores to ``out``."""
    sys.path.insert(0, tree)
    import inspect

    import numpy as np
    import torch

    from wsi_mtl.network import load_model
    from wsi_mtl.slide import open_slide

    try:  # the malloc setting segment gives its process (trees from before wsi_mtl.malloc: none)
        from wsi_mtl.malloc import NETWORK_TOP_KEEP, keep_freed_pages
    except ImportError:
        pass
    else:  # without it every array above 32 MB is mapped afresh: a cost segment does not pay
        keep_freed_pages(NETWORK_TOP_KEEP)
    from concurrent.futures import ThreadPoolExecutor

    model = load_model(None, device="cpu")
    kw = {"margin": MARGIN} if "margin" in inspect.signature(model.predict).parameters else {}
    branches = helper and "helper" in inspect.signature(model.predict).parameters
    if branches:
        kw["helper"] = ThreadPoolExecutor(max_workers=1)
    torch.set_num_threads(1 if branches else 2)
    side = CORE + 2 * MARGIN
    slide = open_slide(SLIDE)
    img = slide.read(0, 0, side, side, mpp=float(model.config.mpp))
    x = torch.from_numpy(np.ascontiguousarray(img)[None]).permute(0, 3, 1, 2).float()  # channels_last, as the engine's
    cropped = "margin" in kw
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    with torch.inference_mode(), autocast:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            probs = model.predict(x, **kw)
            if i:
                times.append(time.perf_counter() - t0)
    cores = {}
    for name, p in probs.items():
        if name in model.config.patch_heads:
            continue
        core = p if cropped else p[..., MARGIN:-MARGIN, MARGIN:-MARGIN]
        cores[name] = core[0].mul(255.0).add_(0.5).clamp_(max=255.0).to(torch.uint8).numpy()
    np.savez(out, **cores)
    return {"ms": statistics.median(times) * 1000, "cropped": cropped, "input_mp": side * side / 1e6, "branches": branches}


def _run(tree: Path, precision: str, repeats: int, out: Path, helper: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(tree), "--precision", precision, "--repeats", str(repeats), "--out", str(out)]
    cmd += ["--helper"] if helper else []
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", metavar="REV", required=False, help="git revision to time against the working tree")
    ap.add_argument("--precision", default=None, help="comma-separated; default bf16,fp32 where the CPU has native bf16, else fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed tiles per child (after one warm-up)")
    ap.add_argument("--helper", action="store_true", help="one torch thread and the branch thread, as segment on 2 cores")
    ap.add_argument("--child")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.precision, args.repeats, args.out, args.helper)))
        return
    if not SLIDE.is_file():
        raise SystemExit(f"needs the sample slide {SLIDE}")
    if args.precision is None:
        from wsi_mtl.devices import cpu_has_bf16

        args.precision = "bf16,fp32" if cpu_has_bf16() else "fp32"
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-engine-tile-") as tmp_name:
        tmp = Path(tmp_name)
        trees = {"working tree": REPO}
        if args.compare:
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tmp / "rev"), args.compare], cwd=REPO, check=True)
            trees = {args.compare: tmp / "rev", "working tree": REPO}
        try:
            for precision in args.precision.split(","):
                ms: dict[str, list[float]] = {k: [] for k in trees}
                info: dict[str, dict] = {}
                for _ in range(args.rounds):
                    for label, tree in trees.items():
                        info[label] = _run(tree, precision, args.repeats, tmp / f"{len(ms[label])}-{label[:3]}.npz", args.helper)
                        ms[label].append(info[label]["ms"])
                for label in trees:
                    med = statistics.median(ms[label])
                    print(f"{precision} {label:>12}: {med:7.0f} ms per {CORE + 2 * MARGIN}^2 tile = {info[label]['input_mp'] / med * 1000:.2f} "
                          f"input MP/s (rounds: {', '.join(f'{v:.0f}' for v in ms[label])}; cores only: {info[label]['cropped']}; "
                          f"branch thread: {info[label]['branches']})")
                if args.compare:
                    a, b = np.load(tmp / f"0-{args.compare[:3]}.npz"), np.load(tmp / "0-wor.npz")
                    same = {k: bool(np.array_equal(a[k], b[k])) for k in a.files}
                    differ = sum(int((a[k] != b[k]).sum()) for k in a.files)
                    print(f"{precision} speed-up {statistics.median(ms[args.compare]) / statistics.median(ms['working tree']):.3f}; "
                          f"uint8 cores identical per head: {same} ({differ} values differ)", flush=True)
        finally:
            if args.compare:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "rev")], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
