"""Shared fixtures: small synthetic slides (tissue + background, 0.25 um/px at level 0) and helpers.

Every synthetic slide holds the same image (``he_image``, 1024 x 1536 px) with pyramid levels
1, 4 and 16, so tests can compare reads against ``he_image`` downsampled with
``wsi_mtl.synthetic.downsample_image``. Nothing here needs ``../shared``.

The shared folder (data, reference fixtures) is found one way: ``$WSIMTL_SHARED``, else ``shared``
beside the repository root (:func:`shared_path`; fixtures ``shared_dir``, ``shared_data``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from wsi_mtl import synthetic

SLIDE_MPP = 0.25
SLIDE_LEVELS = (1, 4, 16)
_REPO = Path(__file__).resolve().parents[1]


SHARED_ENV = "WSIMTL_SHARED"


def shared_path(*parts: str) -> Path:
    """``$WSIMTL_SHARED/parts`` or ``<repo>/../shared/parts`` (it may not exist: callers skip then)."""
    root = os.environ.get(SHARED_ENV)
    return (Path(root).expanduser() if root else _REPO.parent / "shared").joinpath(*parts)


@pytest.fixture(scope="session")
def he_image() -> np.ndarray:
    """(1024, 1536, 3) uint8 H&E-like image with white background around and inside the tissue."""
    return synthetic.make_he_texture(1024, 1536, seed=7)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def svs_jpeg(slide_dir: Path, he_image: np.ndarray) -> Path:
    """Aperio SVS, JPEG tiles 256 px, levels 1/4/16, MPP 0.25, AppMag 40, label + macro + thumbnail."""
    return synthetic.write_svs(slide_dir / "jpeg.svs", he_image, mpp=SLIDE_MPP, compression="jpeg",
                               levels=SLIDE_LEVELS, objective_power=40)


@pytest.fixture(scope="session")
def svs_j2k(slide_dir: Path, he_image: np.ndarray) -> Path:
    """Aperio SVS with JPEG 2000 tiles (compression 33005), otherwise like ``svs_jpeg``."""
    return synthetic.write_svs(slide_dir / "j2k.svs", he_image, mpp=SLIDE_MPP, compression="jpeg2000",
                               levels=SLIDE_LEVELS, objective_power=40)


@pytest.fixture(scope="session")
def ome_tiff(slide_dir: Path, he_image: np.ndarray) -> Path:
    """Pyramidal OME-TIFF (SubIFDs), JPEG tiles, PhysicalSizeX 0.25 um (read by the tifffile backend)."""
    return synthetic.write_ome_tiff(slide_dir / "slide.ome.tif", he_image, mpp=SLIDE_MPP, levels=SLIDE_LEVELS)


@pytest.fixture(scope="session")
def generic_tiff(slide_dir: Path, he_image: np.ndarray) -> Path:
    """Tiled pyramidal TIFF with XResolution in px/cm (OpenSlide "generic-tiff")."""
    return synthetic.write_generic_tiff(slide_dir / "generic.tif", he_image, mpp=SLIDE_MPP, levels=SLIDE_LEVELS)


@pytest.fixture(scope="session")
def png_image(slide_dir: Path, he_image: np.ndarray) -> Path:
    """Lossless PNG of ``he_image`` with its pHYs set to 0.25 um/px (4,000,000 px/m)."""
    from PIL import Image

    path = slide_dir / "image.png"
    Image.fromarray(he_image).save(path, dpi=(25400 / SLIDE_MPP, 25400 / SLIDE_MPP))
    return path


@pytest.fixture(scope="session")
def truncate_slide() -> Callable[..., Path]:
    """``truncate_slide(src, dst, *, fraction=0.5) -> dst``: copy only the first part of a file."""
    return synthetic.truncate_file


@pytest.fixture(scope="session")
def damage_slide() -> Callable[..., tuple[int, int, int, int]]:
    """``damage_slide(src, dst, *, level=0, tile_index=1) -> (x, y, w, h)`` level-0 box of the zeroed tile."""
    return synthetic.damage_tile


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (``$WSIMTL_SHARED`` or ``../shared``); skips where it is absent."""
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared folder {path} not present (set ${SHARED_ENV})")
    return path


@pytest.fixture(scope="session")
def shared_data(shared_dir: Path) -> Path:
    """``<shared>/data``; skips where it is absent."""
    path = shared_dir / "data"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def cmu_small(shared_data: Path) -> Path:
    """The real CMU-1-Small-Region.svs from shared data; skips where it is absent."""
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def sample_segmented(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``wsimtl segment SAMPLE -o OUT`` with every option at its default, run once per test session:
    (result folder, stdout). Tests must not change the folder (copy it first)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("sample-segmented")
    proc = subprocess.run([sys.executable, "-m", "wsi_mtl", "segment", str(cmu_small), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / cmu_small.stem, proc.stdout


@pytest.fixture(autouse=True)
def _collector_unfrozen():  # noqa: ANN202
    """`segment` run in this process (CliRunner) freezes its objects out of the garbage collector;
    each test starts with none frozen, as a fresh process would."""
    import gc

    gc.unfreeze()
    yield
