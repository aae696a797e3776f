"""Benchmark: the gland and lumen step of a real result at several gland chunk sides.

Reads a ``predictions.zarr`` written by ``wsimtl segment`` (e.g. on the mosaic of
``bench_end_to_end.py``) and, for each ``--sides`` value, extracts its glands and lumen in a fresh
process (``PostprocessParams.gland_chunk_px``; the store's own settings otherwise), printing CPU
seconds, wall seconds, that process's peak RSS and a hash of the objects' geometries (the same hash:
the same objects; a truncated object's cut may differ with the chunk, as documented). Run the sides
interleaved (``--sides 2048,4096,2048,4096``) so that a machine's drift shows.

Usage::

    python benchmarks/bench_gland_chunks.py OUT/<slide>/predictions.zarr [--sides 2048,4096] [--set gland_downsample=2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace


def _child(store: str, side: int, overrides: dict[str, str]) -> dict:
    """One extraction in this process: CPU s, wall s, peak RSS MB, object count and geometry hash."""
    import shapely

    from wsi_mtl.postprocess import PostprocessParams, extract_objects
    from wsi_mtl.postprocess._extract import read_meta

    params = PostprocessParams.from_mapping(read_meta(store).postprocess).with_overrides(overrides)
    params = replace(params, gland_chunk_px=side)
    cpu, wall = time.process_time(), time.perf_counter()
    geoms: list[bytes] = []
    for batch in extract_objects(store, tasks=("gland", "lumen"), workers=1, params=params):
        geoms.extend(shapely.to_wkb(batch.geometry))
    return {"side": side, "objects": len(geoms), "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "geometry_sha256": hashlib.sha256(b"".join(sorted(geoms))).hexdigest()[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="a predictions.zarr written by wsimtl segment")
    ap.add_argument("--sides", default="2048,4096,2048,4096", help="gland chunk sides in model px, comma-separated, run in this order")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another post-processing setting (repeatable)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    overrides = dict(s.split("=", 1) for s in args.set)
    if args.child is not None:
        print(json.dumps(_child(args.store, args.child, overrides)))
        return
    for side in (int(s) for s in args.sides.split(",")):
        cmd = [sys.executable, __file__, args.store, "--child", str(side), *(f"--set={s}" for s in args.set)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"gland chunk {r['side']:>5} px: {r['objects']} glands and lumen, {r['cpu_s']:.2f} CPU s, {r['wall_s']:.2f} wall s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, geometry {r['geometry_sha256']}", flush=True)


if __name__ == "__main__":
    main()
