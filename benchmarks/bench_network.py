"""Network throughput (megapixels per second) and the context margin a model needs.

Usage (run it niced on a shared machine)::

    nice -n 10 python benchmarks/bench_network.py                 # throughput of wsimtl_small
    nice -n 10 python benchmarks/bench_network.py --arch cerberus_r34 --repeats 1
    nice -n 10 python benchmarks/bench_network.py --context       # tiled-vs-whole difference curve
    nice -n 10 python benchmarks/bench_network.py --model wsimtl-small --without-own-parts

Throughput: ``model.predict`` in eval mode, channels_last, fp32 and bf16 autocast, for a batch of
4 x 512 x 512 and 1 x 1024 x 1024; the best of ``--repeats`` timed runs after one warm-up.

``--without-own-parts`` also times the same weights with every decoder's own parts removed
(``fine_decoders`` and ``private_decoders`` emptied: the network the model had before them) and
prints the time ratio of the two, measured in the same run.

Context: ``predict`` on a 1024 x 1024 image (a crop of CMU-1-Small-Region.svs when openslide and
the file are available, else a smooth random image) against the same image computed in 256 x 256
output cores, each given a margin of ``m`` pixels of real image each side (zero padding outside the
image, as the engine does with white-filled reads). Prints the max absolute probability difference
per margin over the interior of the image (where a full margin exists).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from wsi_mtl.devices import cpu_has_bf16
from wsi_mtl.network import create_model, get_model_config
from wsi_mtl.network.model import MultiTaskNet, window_stats

logger = logging.getLogger("bench_network")

SLIDE = Path("/work/shared/data/wsi/CMU-1-Small-Region.svs")


def build(arch: str, overrides: dict) -> MultiTaskNet:
    """Randomly initialised model in eval mode, channels_last, with BN statistics made realistic."""
    config = get_model_config(arch)
    if overrides:
        params = config.arch_params.__class__(**{**config.arch_params.__dict__, **overrides})
        config = config.replace(arch_params=params)
    model = create_model(config, seed=0)
    # Calibrate BN running statistics on a few random batches so activations stay in range
    # (untrained BN with mean 0 / var 1 would blow activations up and make the context curve
    # meaningless).
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        img = torch.from_numpy(test_image(512).copy()).permute(2, 0, 1)[None].float()
        seg = [n for n in model.output_heads if n not in model.config.patch_heads]
        x4, _ = model._features(img, seg)
        # patch heads: statistics over the dense window averages (as predict uses them), not over
        # a batch of one pooled vector
        heads = [model.config.heads[n] for n in model.config.patch_heads]
        dense = window_stats(x4, model.config.arch_params.patch_cells, [h.pool for h in heads])
        for head in heads:
            model.decoder_head[head.decoder](dense[head.pool])
    model.eval().fold_bn(True).set_channels_last(True)
    return model


def throughput(model: MultiTaskNet, *, repeats: int) -> dict[str, tuple[float, float]]:
    """(wall MP/s, MP per CPU-second) per precision and shape; best of ``repeats`` runs.

    On a shared, oversubscribed machine the wall figure drops with the load; MP per CPU-second
    (process time, all threads) is much less sensitive to it: with 1 thread it is the throughput an
    idle core would give.
    """
    out = {}
    for label, shape in (("4x512", (4, 3, 512, 512)), ("1x1024", (1, 3, 1024, 1024))):
        x = torch.rand(shape) * 255
        mp = shape[0] * shape[2] * shape[3] / 1e6
        for prec in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):  # bf16 emulated elsewhere: not a figure
            walls, cpus = [], []
            for i in range(repeats + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    model.predict(x)
                if i:
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
            out[f"{prec} {label}"] = (mp / min(walls), mp / min(cpus))
    return out


def test_image(size: int) -> np.ndarray:
    """A size x size RGB uint8 image: a slide crop when possible, else smooth noise."""
    try:
        import openslide

        if SLIDE.is_file():
            with openslide.OpenSlide(str(SLIDE)) as s:
                w, h = s.dimensions
                x0, y0 = max(0, (w - size) // 2), max(0, (h - size) // 2)
                img = np.asarray(s.read_region((x0, y0), 0, (size, size)).convert("RGB"))
                if img.shape[:2] == (size, size):
                    return img
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.random((1, 3, size // 8, size // 8), dtype=np.float32))
    img = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear")[0].permute(1, 2, 0)
    return (img.numpy() * 255).astype(np.uint8)


def context_curve(model: MultiTaskNet, margins: list[int], *, size: int = 1024, core: int = 256) -> dict[int, dict[str, float]]:
    """Max abs probability difference of tiled vs whole-image predict, per margin and head kind."""
    img = torch.from_numpy(test_image(size).copy()).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        whole = model.predict(img)
    result = {}
    for m in margins:
        padded = torch.nn.functional.pad(img, (m, m, m, m))
        worst = {"seg": 0.0, "patch": 0.0}
        for y in range(0, size, core):
            for x in range(0, size, core):
                tile = padded[..., y : y + core + 2 * m, x : x + core + 2 * m]
                with torch.inference_mode():
                    pred = model.predict(tile)
                for k, head in model.config.heads.items():
                    f = model.config.patch_stride_px if head.kind == "patch" else 1
                    mm, cc, yy, xx, ss = m // f, core // f, y // f, x // f, size // f
                    a = pred[k][..., mm : mm + cc, mm : mm + cc]
                    b = whole[k][..., yy : yy + cc, xx : xx + cc]
                    # only compare where the whole-image pass itself had a full margin
                    y0, x0 = max(0, mm - yy), max(0, mm - xx)
                    y1, x1 = min(cc, ss - mm - yy), min(cc, ss - mm - xx)
                    if y1 > y0 and x1 > x0:
                        kind = "patch" if head.kind == "patch" else "seg"
                        worst[kind] = max(worst[kind], float((a - b)[..., y0:y1, x0:x1].abs().max()))
        result[m] = worst
        logger.info("margin %d: max abs prob diff seg %.4f patch %.4f", m, worst["seg"], worst["patch"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wsimtl_small")
    parser.add_argument("--override", default="{}", help="JSON of ArchParams overrides, e.g. '{\"decoder_out\": 8}'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", action="store_true", help="measure the context curve instead of throughput")
    parser.add_argument("--margins", default="0,32,64,96,128,160,192")
    parser.add_argument("--model", default=None, help="measure a saved model (name or folder) instead of a calibrated random one")
    parser.add_argument("--without-own-parts", action="store_true", help="also time the model without its fine branches and private encoders; print the ratio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.model:
        from wsi_mtl.network import load_model

        model = load_model(args.model)
    else:
        model = build(args.arch, json.loads(args.override))
    n = sum(p.numel() for p in model.parameters())
    logger.info("arch %s %s: %.2fM parameters, stride %d", args.arch, args.override, n / 1e6, model.config.stride)
    if args.context:
        curve = context_curve(model, [int(v) for v in args.margins.split(",")])
        ok = [m for m, d in curve.items() if max(d.values()) <= 0.02]
        logger.info("curve %s; smallest margin with diff <= 0.02: %s", curve, min(ok) if ok else None)
    else:
        full = throughput(model, repeats=args.repeats)
        for key, (wall, cpu) in full.items():
            logger.info("%-12s %6.2f MP/s wall  %6.2f MP per CPU-second", key, wall, cpu)
        if args.without_own_parts:
            plain = without_own_parts(model)
            for key, (wall, cpu) in throughput(plain, repeats=args.repeats).items():
                logger.info("%-12s %6.2f MP/s wall without own parts: the model takes %.2fx its time (CPU time %.2fx)",
                            key, wall, wall / full[key][0], cpu / full[key][1])


def without_own_parts(model: MultiTaskNet) -> MultiTaskNet:
    """``model`` without fine branches and private encoders (its other weights, same inference setup)."""
    import dataclasses

    config = model.config.replace(arch_params=dataclasses.replace(model.config.arch_params, fine_decoders=(), private_decoders=()))
    plain = create_model(config, seed=0)
    own = plain.state_dict()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})
    return plain.eval().fold_bn(True).set_channels_last(True)


if __name__ == "__main__":
    main()
