"""Pipeline overhead and memory of `wsimtl segment`, as ratios measured in one run.

Prints
  (a) pipeline wall time / pure network time on the same tiles and batch size  (goal <= 1.10 on CPU)
  (b) peak RSS on a slide of 4x the area / on the 1x slide                     (goal <= 1.2)
  (c) output pixels kept per input pixel computed, vs the 448-in/144-out scheme (0.103)

The slides are Aperio-style SVS mosaics of real H&E (GlaS images from ../shared/data when present,
else synthetic texture) at 0.25 um/px, written once into a temporary folder.

    python benchmarks/bench_pipeline.py [--size 8192] [--device cpu] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from _child import run_child

REPO = Path(__file__).resolve().parents[1]


def _sources(tmp: Path) -> list[Path]:
    glas = REPO.parent / "shared" / "data" / "glands" / "glas" / "images"
    if glas.is_dir():
        files = sorted(p for p in glas.iterdir() if p.suffix.lower() in {".png", ".bmp", ".jpg", ".tif", ".tiff"})
        if files:
            return files[:40]
    from PIL import Image

    from wsi_mtl.synthetic import make_he_texture

    out = []
    for i in range(4):
        p = tmp / f"texture{i}.png"
        Image.fromarray(make_he_texture(1024, 1024, seed=i, tissue_fraction=0.95)).save(p)
        out.append(p)
    return out


def _write_slides(tmp: Path, size: int) -> tuple[Path, Path]:
    from wsi_mtl.synthetic import write_mosaic_slide

    sources = _sources(tmp)
    small = write_mosaic_slide(tmp / "slide_1x.svs", sources=sources, height=size, width=size, mpp=0.25, seed=1)
    large = write_mosaic_slide(tmp / "slide_4x.svs", sources=sources, height=2 * size, width=2 * size, mpp=0.25, seed=1)
    return small, large


def _child_pipeline(slide: str, out: str, device: str, batch_size: int) -> dict:
    """Run the pipeline only (maps, no objects); report its timings and this process's peak RSS."""
    from wsi_mtl.cli.segment import load_pipeline

    segment_slide = load_pipeline(objects=False)  # as `wsimtl segment --no-objects` loads it
    t0 = time.perf_counter()
    result = segment_slide(slide, out, device=device, batch_size=batch_size, objects=False, progress=False)
    wall = time.perf_counter() - t0
    run = result.run
    return {
        "wall_s": wall,
        "inference_wall_s": run["inference"]["wall_s"],
        "network_s_inside": run["inference"]["network_s"],
        "tiles": run["tiles"],
        "parameters": run["parameters"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child_network(slide_path: str, device: str, batch_size: int, precision: str) -> dict:
    """Time the bare network on exactly the tiles the pipeline computes, read into memory first,
    with the malloc setting ``segment`` gives its process (:mod:`wsi_mtl.malloc`)."""
    import math

    import numpy as np
    import torch

    from wsi_mtl.engine import cpu_count, resolve_device, resolve_precision
    from wsi_mtl.network import load_model
    from wsi_mtl.pipeline import _DEFAULT_CORE_PX, _MASK_MPP, _tissue_keep
    from wsi_mtl.slide import open_slide
    from wsi_mtl.tiling import plan_tiles
    from wsi_mtl.tissue import compute_tissue_mask

    from wsi_mtl.malloc import NETWORK_TOP_KEEP, keep_freed_pages

    keep_freed_pages(NETWORK_TOP_KEEP)
    dev = resolve_device(device)
    amp = resolve_precision(dev, precision)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_count())
    model = load_model(None, device=str(dev))
    cfg = model.config
    slide = open_slide(slide_path)
    ds = cfg.mpp / slide.mpp
    grid = plan_tiles(math.ceil(slide.height / ds), math.ceil(slide.width / ds), core_px=_DEFAULT_CORE_PX[dev.type],
                      margin_px=int(math.ceil(cfg.context_px / cfg.stride)) * cfg.stride, stride=cfg.stride)
    tissue = compute_tissue_mask(slide, mask_mpp=max(_MASK_MPP, cfg.mpp))
    tiles = list(grid.tiles(keep=_tissue_keep(tissue.mask, tissue.mpp / cfg.mpp)))
    m = grid.margin_px
    images = [slide.read(t.x0 - m, t.y0 - m, grid.input_px, grid.input_px, mpp=cfg.mpp) for t in tiles]
    batches = [torch.from_numpy(np.stack(images[i : i + batch_size])).to(dev).permute(0, 3, 1, 2).float()
               for i in range(0, len(images), batch_size)]
    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else torch.autocast(dev.type, enabled=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast:
        for x in batches:
            model.predict(x, margin=m)  # as the engine calls it: the maps of the cores only
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return {"network_s": time.perf_counter() - t0, "network_cpu_s": time.process_time() - c0, "tiles": len(tiles), "input_px": grid.input_px}


def _run_child(*args: str) -> dict:
    return run_child(__file__, *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="level-0 side of the 1x slide (px at 0.25 um/px)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--child", choices=["pipeline", "network"])
    ap.add_argument("--slide")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child == "pipeline":
        print(json.dumps(_child_pipeline(args.slide, args.out, args.device, args.batch_size)))
        return
    if args.child == "network":
        print(json.dumps(_child_network(args.slide, args.device, args.batch_size, args.precision)))
        return

    with tempfile.TemporaryDirectory(prefix="wsimtl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        small, large = _write_slides(tmp, args.size)
        print(f"slides written in {time.perf_counter() - t0:.1f} s: {small.name} {args.size}^2, {large.name} {2 * args.size}^2 px at 0.25 um/px")
        common = ["--device", args.device, "--batch-size", str(args.batch_size)]
        # the bare network first, then the pipeline on the same slide, each in a fresh process
        net = _run_child("--child", "network", "--slide", str(small), "--precision", args.precision, *common)
        pipe1 = _run_child("--child", "pipeline", "--slide", str(small), "--out", str(tmp / "out1"), *common)
        pipe4 = _run_child("--child", "pipeline", "--slide", str(large), "--out", str(tmp / "out4"), *common)

    tiles = pipe1["tiles"]
    print(f"device {pipe1['parameters']['device']}, precision {pipe1['parameters']['precision']}, "
          f"batch {args.batch_size}, tile {pipe1['parameters']['tile_core_px']} core + {pipe1['parameters']['tile_margin_px']} margin, "
          f"{tiles['with_tissue']} of {tiles['total']} tiles with tissue")
    a = pipe1["inference_wall_s"] / net["network_s"]
    a_total = pipe1["wall_s"] / net["network_s"]
    print(f"(a) pipeline / pure network, same {net['tiles']} tiles: {pipe1['inference_wall_s']:.2f} s / {net['network_s']:.2f} s = {a:.3f}  (goal <= 1.10)")
    print(f"    whole command incl. slide open, model load, tissue mask, zarr finalize: {pipe1['wall_s']:.2f} s = {a_total:.3f} x network")
    b = pipe4["peak_rss_mb"] / pipe1["peak_rss_mb"]
    print(f"(b) peak RSS 4x slide / 1x slide: {pipe4['peak_rss_mb']:.0f} MB / {pipe1['peak_rss_mb']:.0f} MB = {b:.3f}  (goal <= 1.2)")
    print(f"    tiles computed: 1x {pipe1['tiles']['computed']}, 4x {pipe4['tiles']['computed']}")
    c = tiles["kept_fraction"]
    print(f"(c) output px kept per input px computed: {c:.3f}  (448-in/144-out scheme: {(144 / 448) ** 2:.3f}; {c / (144 / 448) ** 2:.1f}x less wasted compute)")


if __name__ == "__main__":
    main()
