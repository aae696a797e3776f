"""Objects overlapped with inference: `segment` with overlap on and off vs the bare network, in one run.

On one real-tissue mosaic (MoNuSeg + GlaS images from ../shared/data when present, else texture)
at 0.25 um/px, each step in its own process:

  bare network          the network alone on the slide's tiles (bench_pipeline), wall s and CPU s
  segment, overlap off  maps, then objects and exports (segment_slide(overlap=False))
  segment, overlap on   objects of finished chunks extracted while the network runs (the default),
                        once per core policy ($WSIMTL_OVERLAP_CORES): split (post-processing on its
                        own cores, the network on the rest) and share (the network on every core,
                        post-processing at the lowest priority)

and prints end-to-end wall / network time for both, each run's peak RSS (ru_maxrss of the segment
process), how many chunks were done during inference, and whether both wrote the same maps and objects.

    python benchmarks/bench_overlap.py [--size 12288] [--batch-size 1]

Wall-clock ratios depend on what else runs on the machine: say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from _child import run_child

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _child_segment(slide: str, out: str, batch_size: int, overlap: bool, cores: str) -> dict:
    import os

    os.environ["WSIMTL_OVERLAP_CORES"] = cores
    from wsi_mtl.cli.segment import load_pipeline

    segment_slide = load_pipeline(objects=True)  # as `wsimtl segment` loads it
    t0 = time.perf_counter()
    result = segment_slide(slide, out, device="cpu", batch_size=batch_size, objects=True, progress=False, overlap=overlap)
    run = result.run
    return {"wall_s": time.perf_counter() - t0, "network_s": run["inference"]["network_s"], "inference_wall_s": run["inference"]["wall_s"],
            "timings_s": run["timings_s"], "objects": run["objects"], "overlap": run["parameters"].get("overlap"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "result_dir": str(result.result_dir)}


def _run_child(*args: str) -> dict:
    return run_child(__file__, *args)


def _compare(a: str, b: str) -> str:
    """Whether two results hold the same maps (share of Nuclei-INST values that differ) and the same objects."""
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    def key(d: str) -> set:
        t = pq.read_table(Path(d) / "objects.parquet").drop_columns(["id"]).to_pydict()
        return set(zip(*(map(repr, v) for v in t.values())))

    ma, mb = (zarr.open_group(str(Path(d) / "predictions.zarr"), mode="r")["Nuclei-INST"]["0"][:] for d in (a, b))
    diff = float(np.mean(ma != mb))
    ka, kb = key(a), key(b)
    return (f"Nuclei-INST values that differ: {diff:.2e} (the network's float sums depend on its thread count); "
            f"objects in only one of the two tables: {len(ka ^ kb)} of {len(ka | kb)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=12288, help="level-0 side of the slide (px at 0.25 um/px)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--child", choices=["segment", "network"])
    ap.add_argument("--overlap", type=int, default=1)
    ap.add_argument("--cores", default="split", help="child: $WSIMTL_OVERLAP_CORES of the overlap run")
    ap.add_argument("--slide")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child == "segment":
        print(json.dumps(_child_segment(args.slide, args.out, args.batch_size, bool(args.overlap), args.cores)))
        return
    if args.child == "network":
        from bench_pipeline import _child_network

        print(json.dumps(_child_network(args.slide, "cpu", args.batch_size, "auto")))
        return

    from bench_end_to_end import _sources

    from wsi_mtl.synthetic import write_mosaic_slide

    with tempfile.TemporaryDirectory(prefix="wsimtl-bench-overlap-") as tmp_name:
        tmp = Path(tmp_name)
        slide = write_mosaic_slide(tmp / "slide.svs", sources=_sources(tmp), height=args.size, width=args.size, mpp=0.25, seed=1)
        net = _run_child("--child", "network", "--slide", str(slide), "--batch-size", str(args.batch_size))
        runs = {}
        for key, flag, cores in (("off", 0, "split"), ("split", 1, "split"), ("share", 1, "share")):
            runs[key] = _run_child("--child", "segment", "--slide", str(slide), "--out", str(tmp / f"out-{key}"),
                                   "--batch-size", str(args.batch_size), "--overlap", str(flag), "--cores", cores)
        same = {k: _compare(runs["off"]["result_dir"], runs[k]["result_dir"]) for k in ("split", "share")}

    n = net["network_s"]
    print(f"slide {args.size}^2 px at 0.25 um/px: {net['tiles']} tiles; bare network {n:.1f} s wall")
    for key, label in (("off", "overlap off        "), ("split", "overlap on, split  "), ("share", "overlap on, share  ")):
        r = runs[key]
        print(f"{label}: end-to-end {r['wall_s']:.1f} s = {r['wall_s'] / n:.2f} x network; inference wall {r['inference_wall_s']:.1f} s; "
              f"objects step after inference {r['timings_s'].get('objects', float('nan')):.1f} s, export {r['timings_s'].get('export', float('nan')):.1f} s; "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    for key in ("split", "share"):
        print(f"overlap record ({key}): {json.dumps(runs[key]['overlap'])}")
        print(f"overlap {key} vs off: {same[key]}")
    print(f"objects {json.dumps(runs['split']['objects'])}")
    print("(wall-clock ratios depend on the other processes sharing the machine)")


if __name__ == "__main__":
    main()
