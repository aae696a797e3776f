"""Cross-fitted choice of ``gland_max_nonglandular`` for a tissue head that learnt GlaS gland cells.

Stage 16b refit the tissue head on the gland cells of all 70 GlaS training images and kept stage
16's threshold (0.8, tuned with the old head) rather than tune it on images whose glands the new
head had learnt. Here each half of the GlaS training images (alternate images in name order) is
scored with a head refit, as in stage 16b, on the Kather training tiles and the *other* half's
gland cells, so every score comes from glands that head never saw. Per threshold of
``SETTING_GRID`` the two halves' gland F1 + object Dice are summed; the best sum wins (strictest on a
tie). Training images only; the validation split is never read.

    python docs/figures/gland_setting_crossfit.py runs/wsimtl-small-stage15e/model [--out FILE]

(the stage-15e model: the shipped network before its tissue head was refit).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    from wsi_mtl.network import load_model
    from wsi_mtl.postprocess import params_of
    from wsi_mtl.train import Sources
    from wsi_mtl.train._config import load_config
    from wsi_mtl.train._heads import refit_patch_heads
    from wsi_mtl.train._loop import _HEAD_REFIT_TASKS, _training_sources
    from wsi_mtl.train._tune import SETTING_GRID, choose_setting_params, setting_inputs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="the model before the tissue-head refit (stage 15e)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "wsimtl-small-stage16b.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "gland_setting_crossfit.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    data = _training_sources(cfg, load_model(args.model), tasks=sorted(_HEAD_REFIT_TASKS))
    glas = sorted(data.seg["gland"], key=lambda it: it.name)
    grid = SETTING_GRID["gland_max_nonglandular"]
    totals = {t: 0.0 for t in grid}
    folds = []
    for half in (0, 1):
        taught, scored = glas[1 - half :: 2], glas[half::2]
        model = load_model(args.model).fold_bn(False).set_channels_last(False).eval()
        refit = refit_patch_heads(model, Sources({"gland": taught}, data.cls), seed=cfg.seed, bf16=cfg.bf16,
                                  heads=list(cfg.refit_heads), gland_share=cfg.refit_gland_cells)["Patch-Class"]
        model.fold_bn(True)
        glands, tissue = setting_inputs(model, scored, params_of(model), bf16=cfg.bf16)
        scores = {t: choose_setting_params(scored, glands, tissue, {"gland_max_nonglandular": (t,)})[1] for t in grid}
        for t, s in scores.items():
            totals[t] += s
        folds.append({"taught": [it.name for it in taught], "scored": [it.name for it in scored], "refit_kept": refit.kept,
                      "refit_held_out_accuracy": [refit.accuracy_before, refit.accuracy_after], "f1_plus_dice": scores})
        print(f"half {half}: refit on {len(taught)} images (kept {refit.kept}), scored on {len(scored)}: "
              + ", ".join(f"{t}: {s:.4f}" for t, s in scores.items()))
    best = max(grid, key=lambda t: (round(totals[t], 9), -t))  # strictest on a tie
    print("summed: " + ", ".join(f"{t}: {s:.4f}" for t, s in totals.items()) + f" -> {best}")
    args.out.write_text(json.dumps({"grid": list(grid), "summed_f1_plus_dice": totals, "chosen": best, "folds": folds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
