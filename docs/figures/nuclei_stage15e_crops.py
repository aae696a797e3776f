"""Before/after nuclei outlines (coloured by type) on two crops of the sample slide (issue 17, stage 15e).

    python docs/figures/nuclei_stage15e_crops.py BEFORE/objects.parquet AFTER/objects.parquet

with the objects.parquet of `wsimtl segment --sample` run with each model.
"""
import sys

import geopandas as gpd, numpy as np, openslide, shapely
from PIL import Image, ImageDraw

from wsi_mtl.sample import sample_slide_path

slide = openslide.OpenSlide(str(sample_slide_path(download=False)))
runs = {'shipped before (stage 14b)': sys.argv[1], 'shipped now (stage 15e)': sys.argv[2]}
colors = {1: (220, 40, 40), 2: (40, 160, 40), 3: (40, 80, 230), 4: (230, 180, 0)}
crops = [(700, 1500, 360), (1300, 400, 360)]  # (x, y, side) level-0 px: dermis, epidermis
tiles = []
for name, path in runs.items():
    df = gpd.read_parquet(path)
    nu = df[df.task == 'nuclei']
    row = []
    for x, y, s in crops:
        img = slide.read_region((x, y), 0, (s, s)).convert('RGB').resize((2 * s, 2 * s), Image.LANCZOS)
        d = ImageDraw.Draw(img)
        box = shapely.box(x, y, x + s, y + s)
        sel = nu[nu.intersects(box)]
        for g, c in zip(sel.geometry, sel.class_id):
            pts = [((px - x) * 2, (py - y) * 2) for px, py in np.asarray(g.exterior.coords)]
            d.line(pts, fill=colors.get(int(c), (0, 0, 0)), width=2)
        d.rectangle([0, 0, 2 * s - 1, 22], fill=(255, 255, 255))
        d.text((4, 4), f'{name}: {len(sel)} nuclei', fill=(0, 0, 0))
        row.append(img)
    tiles.append(row)
w = sum(t.width for t in tiles[0]) + 8; h = sum(r[0].height for r in tiles) + 8
out = Image.new('RGB', (w, h), (255, 255, 255))
yy = 0
for r in tiles:
    xx = 0
    for t in r:
        out.paste(t, (xx, yy)); xx += t.width + 8
    yy += r[0].height + 8
out.save('docs/figures/nuclei_stage15e_sample_crops.jpg', quality=85)
print(out.size)
