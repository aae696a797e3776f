"""The GlaS validation images of validation-v2 set on glass (320 px of it around each, as tissue
at a slide's edge), through the shipped model and segment's gland post-processing with the tissue
mask: gland object F1 with the tissue head's own classes at the tissue's edge (tissue_window_cells
0) and with the edge classes (5, the model's window). Writes tissue_edges_glas.json beside it.

    python docs/figures/tissue_edges_glas.py   # needs ../shared/data; ~1 min on 2 cores
"""
import json
from dataclasses import replace
from pathlib import Path
import numpy as np, yaml
from wsi_mtl.export._labels import _draw_all
from wsi_mtl.network import load_model
from wsi_mtl.postprocess import params_of, objects_from_maps
from wsi_mtl.train._config import DEFAULT_SOURCE_MPP
from wsi_mtl.train._data import load_glas
from wsi_mtl.train._evaluate import predict_image
from wsi_mtl.tissue import tissue_mask_from_image
from wsi_mtl.metrics._gland import object_f1

HERE = Path(__file__).resolve().parent
root = HERE.parents[2] / 'shared' / 'data'
names = yaml.safe_load(open(HERE.parents[1] / 'configs' / 'splits' / 'validation-v2.yaml'))['glas']
model = load_model('wsimtl-small')
items = load_glas(root, mpp=0.5, source_mpp=DEFAULT_SOURCE_MPP['glas'], names=names)
PAD = 320
rng = np.random.default_rng(0)
tot = {0: [0, 0, 0], 5: [0, 0, 0]}
per_image: dict = {}
for it in items:
    h, w = it.image.shape[:2]
    H, W = -(-(h + 2 * PAD) // 16) * 16, -(-(w + 2 * PAD) // 16) * 16
    img = np.clip(rng.normal(240, 2, (H, W, 3)), 0, 255).astype(np.uint8)
    img[PAD:PAD + h, PAD:PAD + w] = it.image
    truth = np.zeros((H, W), np.int32); truth[PAD:PAD + h, PAD:PAD + w] = it.labels
    probs = predict_image(model, img, margin_px=32)
    maps = {k: np.rint(np.clip(v, 0, 1) * 255).astype(np.uint8) for k, v in probs.items() if k in ("Gland-INST", "Patch-Class")}
    ds = 16
    thumb = img[: H // ds * ds, : W // ds * ds].reshape(H // ds, ds, W // ds, ds, 3).mean(axis=(1, 3)).astype(np.uint8)
    mask = tissue_mask_from_image(thumb, mpp=0.5 * ds).mask
    names_c = model.config.heads["Patch-Class"].class_names
    row = [it.name]
    for cells in (0, 5):
        p = replace(params_of(model), tissue_window_cells=cells)
        got = objects_from_maps(maps, slide_mpp=0.5, downsample=1.0, tasks=("gland",), params=p, tissue_mask=mask, mask_downsample=ds,
                                classes={"Patch-Class": (names_c, [(0, 0, 0)] * len(names_c))})
        pred = np.zeros((H, W), np.int32)  # as the glands' NGFF label image draws them (pixel centres, holes out)
        _draw_all(pred, got.geometry, np.arange(1, len(got) + 1, dtype=np.int32), downsample=1.0, origin=(0, 0))
        f1, tp, fp, fn = object_f1(truth, pred)
        tot[cells][0] += tp; tot[cells][1] += fp; tot[cells][2] += fn
        row.append(f"w{cells}: n={len(got)} tp={tp} fp={fp} fn={fn}")
        per_image.setdefault(it.name, {})[f"tissue_window_cells={cells}"] = {"tp": tp, "fp": fp, "fn": fn}
    print(*row, flush=True)
out = {"images": per_image, "total": {}}
for c, (tp, fp, fn) in tot.items():
    out["total"][f"tissue_window_cells={c}"] = {"f1": round(2 * tp / (2 * tp + fp + fn), 4), "tp": tp, "fp": fp, "fn": fn}
    print(c, "F1", round(2 * tp / (2 * tp + fp + fn), 4), tp, fp, fn)
(HERE / "tissue_edges_glas.json").write_text(json.dumps(out, indent=1) + "\n")
