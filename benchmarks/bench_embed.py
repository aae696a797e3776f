"""Throughput and memory of `wsimtl embed`, as ratios measured in one run.

Prints
  (a) patches/s of `embed` (reads, encoder, writing: its patch loop) / patches/s of the bare encoder
      forward on the same patches, already in memory, same batch size and precision   (goal >= 0.9)
  (b) peak RSS of `embed` on a slide of 4x the area / on the 1x slide                   (goal <= 1.2)

The slides are the Aperio-style SVS mosaics of real H&E that bench_pipeline.py writes (GlaS images
from ../shared/data when present, else synthetic texture) at 0.25 um/px, in a temporary folder.
(a) runs in one process, the bare encoder and `embed` in turns (bare, embed, bare, ...; --rounds
embed turns, default 5): each embed turn is compared with the bare turns just before and after it,
and the median of these ratios is printed, since other processes' load makes the machine's speed
drift within seconds. (b) runs each slide in a fresh process.

    python benchmarks/bench_embed.py [--size 8192] [--device cpu] [--batch-size 16] [--stride 224] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import _write_slides  # noqa: E402  (same slides as the segment benchmark)

from _child import run_child


def _child_embed(slide: str, out: str, device: str, batch_size: int, precision: str, stride: int) -> dict:
    """`embed` on one slide; its timings and this process's peak RSS."""
    from wsi_mtl.embed import embed_slide

    t0 = time.perf_counter()
    res = embed_slide(slide, out, device=device, batch_size=batch_size, precision=precision, stride=stride, progress=False)
    info = res.info
    return {"wall_s": time.perf_counter() - t0, "patches": info["patches"], "loop_s": info["timings_s"]["embed"],
            "network_s": info["timings_s"]["network"], "read_wait_s": info["timings_s"].get("read_wait", 0.0),
            "precision": info["precision"], "device": info["device"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _bare_setup(slide_path: str, device: str, precision: str, stride: int) -> tuple:
    """The encoder and the patches `embed` keeps, read into memory (not timed)."""
    import numpy as np
    import torch

    from wsi_mtl.devices import cpu_count, resolve_device, resolve_precision
    from wsi_mtl.embed import PatchGrid, load_encoder, patch_table
    from wsi_mtl.slide import open_slide
    from wsi_mtl.tissue import compute_tissue_mask

    dev = resolve_device(device)
    amp = resolve_precision(dev, precision)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_count())
    enc = load_encoder(None, device=dev)
    with open_slide(slide_path) as slide:
        h, w = slide.size_at(enc.mpp)
        tissue = compute_tissue_mask(slide, mask_mpp=8.0)
        table = patch_table(PatchGrid(h, w, 224, stride), downsample=enc.mpp / slide.mpp, tissue=tissue, mpp=enc.mpp, min_tissue=0.0)
        images = np.stack([slide.read(int(x), int(y), 224, 224, mpp=enc.mpp) for x, y in zip(table["gx"], table["gy"])])
    return enc, dev, amp, images


def _bare_forward(enc, dev, amp, images, batch_size: int) -> float:
    """Seconds of the bare encoder forward over ``images`` (same batches and precision as `embed`)."""
    import torch

    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else torch.autocast(dev.type, enabled=False)
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i: i + batch_size]).to(dev).permute(0, 3, 1, 2).float()
        with torch.inference_mode(), autocast:
            feats, probs = enc.encode(x)
        feats.float().cpu().numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _child_rates(slide: str, out: str, device: str, batch_size: int, precision: str, stride: int, rounds: int) -> dict:
    """Bare encoder and `embed` in turns in this one process: bare, embed, bare, ..., bare (``rounds``
    embed turns). The machine's speed drifts with other processes' load, so each embed turn is compared
    with the mean of the bare turns just before and after it."""
    import shutil

    enc, dev, amp, images = _bare_setup(slide, device, precision, stride)
    bare = [len(images) / _bare_forward(enc, dev, amp, images, batch_size)]
    embed = []
    for _ in range(max(1, rounds)):
        shutil.rmtree(out, ignore_errors=True)
        res = _child_embed(slide, out, device, batch_size, precision, stride)
        assert res["patches"] == len(images), (res["patches"], len(images))
        embed.append(res["patches"] / res["loop_s"])
        bare.append(len(images) / _bare_forward(enc, dev, amp, images, batch_size))
        last = res
    return {"bare": bare, "embed": embed, "patches": len(images), "device": last["device"], "precision": last["precision"],
            "embed_network_share": last["network_s"] / last["loop_s"],
            "embed_read_wait_share": last["read_wait_s"] / last["loop_s"]}


def _run_child(*args: str) -> dict:
    return run_child(__file__, *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="level-0 side of the 1x slide (px at 0.25 um/px)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--stride", type=int, default=224, help="patch step in px at 0.5 um/px")
    ap.add_argument("--rounds", type=int, default=5, help="embed turns for (a), each between two bare encoder turns")
    ap.add_argument("--child", choices=["embed", "rates"])
    ap.add_argument("--slide")
    ap.add_argument("--out")
    args = ap.parse_args()
    common = (args.device, args.batch_size, args.precision, args.stride)
    if args.child == "embed":
        print(json.dumps(_child_embed(args.slide, args.out, *common)))
        return
    if args.child == "rates":
        print(json.dumps(_child_rates(args.slide, args.out, *common, args.rounds)))
        return

    with tempfile.TemporaryDirectory(prefix="wsimtl-bench-embed-") as tmp_name:
        tmp = Path(tmp_name)
        small, large = _write_slides(tmp, args.size)
        flags = ["--device", args.device, "--batch-size", str(args.batch_size), "--precision", args.precision, "--stride", str(args.stride)]
        rates = _run_child("--child", "rates", "--slide", str(small), "--out", str(tmp / "o0"), "--rounds", str(args.rounds), *flags)
        emb1 = _run_child("--child", "embed", "--slide", str(small), "--out", str(tmp / "o1"), *flags)
        emb4 = _run_child("--child", "embed", "--slide", str(large), "--out", str(tmp / "o4"), *flags)
    print(f"device {rates['device']}, precision {rates['precision']}, batch {args.batch_size}, 224 px patches at stride {args.stride}, "
          f"{emb1['patches']} patches (1x) / {emb4['patches']} (4x)")
    ratios = [e / ((b0 + b1) / 2) for e, b0, b1 in zip(rates["embed"], rates["bare"], rates["bare"][1:])]
    median = statistics.median(ratios)
    rate_bare = statistics.median(rates["bare"])
    turns = ", ".join(f"{e:.1f} ({r:.2f})" for e, r in zip(rates["embed"], ratios))
    print(f"(a) embed / bare encoder patches/s, median of {len(ratios)} turns = {median:.3f}  (goal >= 0.9)")
    print(f"    bare turns: {', '.join(f'{b:.1f}' for b in rates['bare'])}; embed turns (ratio to the bare turns around it): {turns}")
    print(f"    in embed's last turn the encoder forward is {rates['embed_network_share']:.1%} of its patch loop, "
          f"waiting for reads {rates['embed_read_wait_share']:.1%}")
    print(f"    whole command incl. slide open, model load, tissue mask, parquet/zarr finalize: "
          f"{emb1['patches'] / emb1['wall_s']:.1f} patches/s = {emb1['patches'] / emb1['wall_s'] / rate_bare:.3f} x bare")
    b = emb4["peak_rss_mb"] / emb1["peak_rss_mb"]
    print(f"(b) peak RSS 4x slide / 1x slide: {emb4['peak_rss_mb']:.0f} MB / {emb1['peak_rss_mb']:.0f} MB = {b:.3f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
