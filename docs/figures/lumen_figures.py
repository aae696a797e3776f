"""Check figures of the lumen pseudo-label rule (wsi_mtl/train/_lumen.py) on the GlaS training set.

    python docs/figures/lumen_figures.py [DATA_ROOT]   # default ../shared/data

Writes docs/figures/lumen_overlays_benign.png, lumen_overlays_malignant.png (6 + 6 images at
0.5 um/px: gland outlines yellow, pseudo-lumen cyan) and lumen_share.png (lumen share per gland,
benign vs malignant), and prints the counts the model card quotes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from wsi_mtl.train._config import DEFAULT_SOURCE_MPP
from wsi_mtl.train._data import load_glas
from wsi_mtl.train._lumen import lumen_labels

OUT = Path(__file__).resolve().parent


def overlay(image: np.ndarray, glands: np.ndarray, lumen: np.ndarray) -> np.ndarray:
    o = image.astype(np.float32).copy()
    m = lumen > 0
    o[m] = 0.45 * o[m] + 0.55 * np.array([0, 200, 255])
    o[find_boundaries(lumen, mode="inner")] = (0, 90, 255)
    o[find_boundaries(glands, mode="inner")] = (255, 230, 0)
    return o.astype(np.uint8)


def sheet(items: list, lumens: list, path: Path, cell: int = 360) -> None:
    tiles = []
    for it, lum in zip(items, lumens):
        im = Image.fromarray(overlay(it.image, it.labels, lum))
        im.thumbnail((cell, cell))
        canvas = Image.new("RGB", (cell, cell + 16), "white")
        canvas.paste(im, (0, 16))
        ImageDraw.Draw(canvas).text((2, 2), f"{it.name} ({['benign', 'malignant'][it.patch.get('Patch-GlaS', 0)]})", fill="black")
        tiles.append(canvas)
    cols = 3
    rows = -(-len(tiles) // cols)
    out = Image.new("RGB", (cols * cell, rows * (cell + 16)), "white")
    for i, t in enumerate(tiles):
        out.paste(t, ((i % cols) * cell, (i // cols) * (cell + 16)))
    out.save(path)


def main(root: Path) -> None:
    items = load_glas(root, mpp=0.5, source_mpp=DEFAULT_SOURCE_MPP["glas"])
    shares = {0: [], 1: []}
    outside = total = 0
    lumens = []
    for it in items:
        lum = lumen_labels(it.image, it.labels)
        lumens.append(lum)
        outside += int(((lum > 0) & (it.labels == 0)).sum())
        total += int((lum > 0).sum())
        g = it.labels
        area = np.bincount(g.ravel())
        inside = np.bincount(g.ravel(), weights=(lum > 0).ravel(), minlength=len(area))
        for gid in np.flatnonzero(area[1:]) + 1:
            shares[it.patch.get("Patch-GlaS", 0)].append(inside[gid] / area[gid])
    print(f"{len(items)} GlaS images, {total} lumen px, {outside} outside every gland")
    for k, name in ((0, "benign"), (1, "malignant")):
        s = np.array(shares[k])
        print(f"{name}: {len(s)} glands, lumen share median {np.median(s):.3f}, mean {s.mean():.3f}, with lumen {np.mean(s > 0):.2f}")
    for k, name in ((0, "benign"), (1, "malignant")):
        pick = [i for i, it in enumerate(items) if it.patch.get("Patch-GlaS", 0) == k]
        pick = [pick[int(j)] for j in np.linspace(0, len(pick) - 1, 6)]
        sheet([items[i] for i in pick], [lumens[i] for i in pick], OUT / f"lumen_overlays_{name}.png")
    histogram(shares, OUT / "lumen_share.png", title=f"GlaS, {len(items)} images: {outside} of {total} lumen px outside a gland")


def histogram(shares: dict, path: Path, *, title: str, bins: int = 24, top: float = 0.6) -> None:
    """Side-by-side bars of the lumen share per gland, benign (blue) and malignant (red), in PIL."""
    w, h, pad = 640, 330, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    edges = np.linspace(0, top, bins + 1)
    counts = {k: np.histogram(np.clip(v, 0, top - 1e-9), edges)[0] / max(1, len(v)) for k, v in shares.items()}
    peak = max(c.max() for c in counts.values())
    bw = (w - 2 * pad) / bins
    for k, colour in ((0, (40, 100, 220)), (1, (220, 50, 40))):
        for i, c in enumerate(counts[k]):
            x0 = pad + i * bw + k * bw / 2
            d.rectangle([x0, h - pad - (h - 2 * pad) * c / peak, x0 + bw / 2 - 1, h - pad], fill=colour)
    d.line([pad, h - pad, w - pad, h - pad], fill="black")
    for t in np.linspace(0, top, 7):
        x = pad + (w - 2 * pad) * t / top
        d.text((x - 8, h - pad + 4), f"{t:.1f}", fill="black")
    d.text((pad, 6), title, fill="black")
    d.text((pad, 20), f"share of glands per bin; blue benign ({len(shares[0])} glands), red malignant ({len(shares[1])})", fill="black")
    d.text((w // 2 - 90, h - 16), "pseudo-lumen share of the gland area", fill="black")
    img.save(path)

if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data"))
