"""End to end: `segment` with objects on a real-tissue mosaic, as ratios and rates from one run.

Prints, for a mosaic slide of real H&E (MoNuSeg and GlaS images from ../shared/data when present,
else synthetic texture) at 0.25 um/px and one of 4x its area, each run in its own process:

  end-to-end wall / network time      the whole `segment` (maps, objects, exports) / the bare
                                      network on the same tiles and batch size, at 1x and 4x (the
                                      faster of the network timed just before and just after that
                                      `segment`, both printed: the machine's speed drifts, and
                                      whatever else runs can only slow a run down)
  after the network / network time    run.json's finalize (pyramids and the chunks not done during
                                      inference), objects and export steps / that network time
  post-processing CPU / network       CPU seconds of segment's post-processing processes / that
                                      network time, and / the CPU seconds the bare network spent
                                      (on every core); then by what the processes do: objects
                                      (chunk workers), label images, GeoJSON text, start-up (the
                                      forkserver's imports and kernel warm-up)
  nuclei/s per core                   the nuclei instance step (neck cutting and every other tuned
                                      setting of the shipped model) re-run on the slide's own
                                      network maps, per CPU second of one process with the
                                      post-processing processes' memory settings (best of 3)
  gland step s                        the gland and lumen instance steps on the same maps, CPU s
  GeoJSON features/s                  objects.geojson rewritten from the run's objects.parquet (best of 3),
                                      per wall and per CPU second, with the mean vertices per
                                      nucleus and per gland of that real output
  peak RSS 1x, 4x                     of each `segment` process (ru_maxrss), and their ratio; and
                                      of its largest post-processing process
  anonymous memory 1x, 4x             of all of `segment`'s processes together (sampled every 50 ms:
                                      RSS less file-backed and shared pages), and their ratio

    python benchmarks/bench_end_to_end.py [--size 4096] [--device cpu] [--batch-size 1] [--workers N]

CPU-second figures are those of one process; wall-clock ratios depend on what else runs on the
machine (say so when you quote them).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_pipeline import _child_network  # noqa: E402  (the bare-network timing)
from bench_pipeline import _sources as _texture_or_glas  # noqa: E402

from _child import ProcessTree, run_child

DATA = HERE.parents[1] / "shared" / "data"


def _sources(tmp: Path) -> list[Path]:
    """MoNuSeg images (dense nuclei at their own 0.25 um/px) and GlaS images (glands), else texture."""
    monuseg = DATA / "nuclei" / "monuseg" / "images"
    nuclei = sorted(monuseg.glob("*.png"))[:20] if monuseg.is_dir() else []
    glands = _texture_or_glas(tmp)
    return [p for pair in zip(nuclei, glands) for p in pair] + nuclei[len(glands):] + glands[len(nuclei):] if nuclei else glands


def _child_segment(slide: str, out: str, device: str, batch_size: int, workers: int | None) -> dict:
    """`segment` with objects; its run.json timings, object counts, this process's peak RSS and the
    peaks of its post-processing processes."""
    from wsi_mtl.cli.segment import load_pipeline
    from wsi_mtl.malloc import limit_arenas

    segment_slide = load_pipeline(objects=True)  # as `wsimtl segment` loads it (chunk server first, imports frozen)
    # segment limits its malloc arenas before it starts a thread; the sampler's thread started first
    # would keep an arena of its own, which the network's threads then share (measured: 4x peak 1.88
    # GB here against 1.20-1.29 GB for `wsimtl segment` itself, before this line)
    limit_arenas()
    memory = ProcessTree()
    t0 = time.perf_counter()
    result = segment_slide(slide, out, device=device, batch_size=batch_size, workers=workers, objects=True, progress=False)
    wall = time.perf_counter() - t0
    memory.stop()
    run = result.run
    return {
        "wall_s": wall,
        "network_s_inside": run["inference"]["network_s"],
        "timings_s": run["timings_s"],
        "objects": run["objects"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_child_rss_mb": memory.largest_child_mb,
        "children_cpu_s": memory.cpu_seconds(),
        "children_cpu_by_role_s": memory.cpu_by_role(),
        "tree_rss_mb": memory.total_mb,
        "tree_anon_mb": memory.anon_total_mb,
    }


def _child_steps(result_dir: str) -> dict:
    """Instance steps on the run's own maps (the model's tuned settings) and the GeoJSON export."""
    import numpy as np
    import pyarrow.parquet as pq
    import shapely
    import zarr

    from wsi_mtl.export import write_geojson
    from wsi_mtl.malloc import chunk_worker_pages
    from wsi_mtl.postprocess import PostprocessParams, read_meta
    from wsi_mtl.postprocess._instances import _core_instances, _nuclei_instances

    chunk_worker_pages()  # the memory settings segment's post-processing processes run the steps with

    res = Path(result_dir)
    meta = read_meta(res / "predictions.zarr")
    p = PostprocessParams.from_mapping(meta.postprocess)
    store = zarr.open_group(str(res / "predictions.zarr"), mode="r")
    nuc = store["Nuclei-INST"]["0"][:]
    settings = dict(min_area_px=p.nuclei_min_area_px, marker_threshold=p.nuclei_marker_threshold,
                    mask_threshold=p.nuclei_mask_threshold, min_marker_px=1, keep_unmarked=True,
                    split_h=p.nuclei_split_h, min_interior=p.nuclei_min_interior)
    nuclei_cpu = float("inf")
    for _ in range(3):  # best of 3: the first also loads the compiled kernels, which a worker does once
        c0 = time.process_time()
        labels, _ = _nuclei_instances(nuc, **settings)
        nuclei_cpu = min(nuclei_cpu, time.process_time() - c0)
    n_nuclei = int(labels.max())
    del nuc, labels
    gland = store["Gland-INST"]["0"][:]
    c0 = time.process_time()
    glands = _core_instances(gland, threshold=p.gland_threshold, erosion_px=int(p.gland_erosion_px),
                             min_area_px=p.gland_min_area_px, open_px=p.gland_open_px)
    if "Lumen-INST" in store:
        _core_instances(store["Lumen-INST"]["0"][:], threshold=p.lumen_threshold, erosion_px=int(p.lumen_erosion_px),
                        min_area_px=p.lumen_min_area_px)
    gland_cpu = time.process_time() - c0
    table = res / "objects.parquet"
    t = pq.read_table(table, columns=["task", "geometry"])
    geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    tasks = np.asarray(t.column("task").to_numpy(zero_copy_only=False))
    verts = shapely.get_num_coordinates(geoms)
    geo_wall = geo_cpu = float("inf")
    with tempfile.TemporaryDirectory(prefix="bench_e2e_geojson_") as tmp:
        for _ in range(3):  # best of 3: about 0.1 s each, so one cold run is mostly noise
            t0, c0 = time.perf_counter(), time.process_time()
            n = write_geojson(table, Path(tmp) / "objects.geojson")
            geo_wall, geo_cpu = min(geo_wall, time.perf_counter() - t0), min(geo_cpu, time.process_time() - c0)
    return {
        "params": {k: getattr(p, k) for k in ("nuclei_split_h", "nuclei_min_interior", "gland_open_px", "gland_erosion_px")},
        "nuclei": n_nuclei,
        "nuclei_cpu_s": nuclei_cpu,
        "glands": int(glands.max()),
        "gland_step_cpu_s": gland_cpu,
        "geojson_features": n,
        "geojson_wall_s": geo_wall,
        "geojson_cpu_s": geo_cpu,
        "vertices_per_nucleus": float(verts[tasks == "nuclei"].mean()) if (tasks == "nuclei").any() else float("nan"),
        "vertices_per_gland": float(verts[tasks == "gland"].mean()) if (tasks == "gland").any() else float("nan"),
    }


def _run_child(*args: str) -> dict:
    return run_child(__file__, *args)


def _bracketing(before: dict, after: dict) -> dict:
    """The bare network's figures of the faster of its runs before and after a `segment`, with both times."""
    faster = min(before, after, key=lambda r: r["network_s"])
    return {**faster, "before_s": before["network_s"], "after_s": after["network_s"]}


def _write_slides(tmp: Path, size: int) -> tuple[Path, Path]:
    from wsi_mtl.synthetic import write_mosaic_slide

    sources = _sources(tmp)
    small = write_mosaic_slide(tmp / "slide_1x.svs", sources=sources, height=size, width=size, mpp=0.25, seed=1)
    large = write_mosaic_slide(tmp / "slide_4x.svs", sources=sources, height=2 * size, width=2 * size, mpp=0.25, seed=1)
    return small, large


def _result_dir(out: Path) -> str:
    found = [p.parent for p in out.glob("*/run.json")]
    if len(found) != 1:
        raise SystemExit(f"expected one result folder under {out}, found {found}")
    return str(found[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="level-0 side of the 1x slide (px at 0.25 um/px)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="post-processing workers of segment (default: its own)")
    ap.add_argument("--child", choices=["segment", "network", "steps"])
    ap.add_argument("--slide")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child == "segment":
        print(json.dumps(_child_segment(args.slide, args.out, args.device, args.batch_size, args.workers)))
        return
    if args.child == "network":
        print(json.dumps(_child_network(args.slide, args.device, args.batch_size, args.precision)))
        return
    if args.child == "steps":
        print(json.dumps(_child_steps(args.out)))
        return

    with tempfile.TemporaryDirectory(prefix="wsimtl-bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        small, large = _write_slides(tmp, args.size)
        print(f"slides written in {time.perf_counter() - t0:.1f} s: {args.size}^2 and {2 * args.size}^2 px at 0.25 um/px")
        common = ["--device", args.device, "--batch-size", str(args.batch_size)]
        if args.workers:
            common += ["--workers", str(args.workers)]
        nets, segs = {}, {}
        for key, slide in (("1x", small), ("4x", large)):
            network = ("--child", "network", "--slide", str(slide), "--precision", args.precision,
                       "--device", args.device, "--batch-size", str(args.batch_size))
            before = _run_child(*network)
            segs[key] = _run_child("--child", "segment", "--slide", str(slide), "--out", str(tmp / f"out{key}"), *common)
            nets[key] = _bracketing(before, _run_child(*network))
        steps = _run_child("--child", "steps", "--out", _result_dir(tmp / "out1x"))
    seg1, seg4 = segs["1x"], segs["4x"]

    for key, side in (("1x", args.size), ("4x", 2 * args.size)):
        net_s, seg = nets[key]["network_s"], segs[key]
        tim = seg["timings_s"]
        after = sum(float(tim.get(k, 0.0)) for k in ("finalize", "objects", "export"))
        print(f"{key} ({side}^2 px): bare network on its {nets[key]['tiles']} tiles {net_s:.2f} s (before / after segment "
              f"{nets[key]['before_s']:.2f} / {nets[key]['after_s']:.2f} s); segment {seg['wall_s']:.2f} s")
        print(f"  end-to-end wall / network time: {seg['wall_s'] / net_s:.2f}   (inference wall {tim.get('inference', float('nan')):.2f} s)")
        print(f"  after the network / network time: {after / net_s:.2f}   (finalize {tim.get('finalize', 0.0):.2f} s: pyramids and the chunks "
              f"left, objects {tim.get('objects', float('nan')):.2f} s, export {tim.get('export', float('nan')):.2f} s)")
        net_cpu = nets[key]["network_cpu_s"]
        print(f"  post-processing processes' CPU / network time: {seg['children_cpu_s'] / net_s:.2f}   ({seg['children_cpu_s']:.1f} CPU s; "
              f"/ the network's CPU time ({net_cpu:.1f} CPU s on every core): {seg['children_cpu_s'] / net_cpu:.2f})")
        roles = seg["children_cpu_by_role_s"]
        print(f"    of which objects (chunk workers) {roles.get('chunks', 0.0):.1f} CPU s = {roles.get('chunks', 0.0) / net_cpu:.2f} of the "
              f"network's CPU time; " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(roles.items()) if k != "chunks"))
    print(f"settings: {steps['params']}")
    print(f"nuclei/s per core on these maps: {steps['nuclei'] / steps['nuclei_cpu_s']:,.0f}  ({steps['nuclei']} nuclei in {steps['nuclei_cpu_s']:.2f} CPU s, best of 3)")
    print(f"gland + lumen steps: {steps['gland_step_cpu_s']:.2f} CPU s ({steps['glands']} glands)")
    print(f"GeoJSON: {steps['geojson_features'] / steps['geojson_wall_s']:,.0f} features/s wall, "
          f"{steps['geojson_features'] / steps['geojson_cpu_s']:,.0f} per CPU s ({steps['geojson_features']} features; "
          f"{steps['vertices_per_nucleus']:.1f} vertices per nucleus, {steps['vertices_per_gland']:.1f} per gland)")
    print(f"peak RSS of segment 1x {seg1['peak_rss_mb']:.0f} MB, 4x {seg4['peak_rss_mb']:.0f} MB: ratio {seg4['peak_rss_mb'] / seg1['peak_rss_mb']:.3f}; "
          f"largest post-processing process 1x {seg1['largest_child_rss_mb']:.0f} MB, 4x {seg4['largest_child_rss_mb']:.0f} MB; "
          f"all of segment's processes together 1x {seg1['tree_rss_mb']:.0f} MB, 4x {seg4['tree_rss_mb']:.0f} MB (sampled)")
    print(f"anonymous memory of all of segment's processes together (sampled; what a job's memory limit counts): "
          f"1x {seg1['tree_anon_mb']:.0f} MB, 4x {seg4['tree_anon_mb']:.0f} MB: ratio {seg4['tree_anon_mb'] / seg1['tree_anon_mb']:.3f}")
    print(f"objects 1x: {json.dumps(seg1['objects'])}")
    print("(wall-clock ratios depend on the other processes sharing the machine; CPU-second rates much less)")


if __name__ == "__main__":
    main()
