"""segment_slide checks every option before it opens the slide, loads the model or writes anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from test_malloc import _huge_pages_asked
from wsi_mtl.errors import InputError
from wsi_mtl.pipeline import segment_slide


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"tta": 3}, "tta must be one of"),
        ({"batch_size": 0}, "batch size"),
        ({"workers": 0}, "workers"),
        ({"tile_size": -5}, "tile size"),
        ({"margin": -1}, "margin"),
        ({"batch_size": 2.5}, "batch size"),
        ({"postprocess": {"nuclei_min_area_px": -1}}, "nuclei_min_area_px"),
        ({"postprocess": {"no_such_setting": 1}}, "unknown post-processing setting"),
        ({"precision": "fp8"}, "unknown precision"),
        ({"device": "tpu"}, "device"),
        ({"postprocess_workers": 0}, "postprocess workers"),
        ({"postprocess_workers": True}, "postprocess workers"),
    ],
)
def test_bad_option_fails_before_slide_and_model(tmp_path: Path, options: dict[str, Any], fragment: str) -> None:
    """A missing slide and an unknown model would fail later: the option's own error must come first."""
    with pytest.raises(InputError, match=fragment):
        segment_slide(tmp_path / "no-such-slide.svs", tmp_path / "out", model="no-such-model", **options)
    assert not (tmp_path / "out").exists()


def test_what_a_run_says_it_did() -> None:
    """A fresh run says how many tiles it computed; a resumed one, how many it reused."""
    from wsi_mtl.pipeline import _tiles_done

    assert _tiles_done({"tiles": {"computed": 4, "resumed": 0}}) == "maps: 4 tiles computed"
    assert _tiles_done({"tiles": {"computed": 1, "resumed": 3}}) == "resumed an interrupted run: 3 tiles reused, 1 computed"


@pytest.mark.slow
def test_rerun_with_another_tta_recomputes_the_maps(he_image, tmp_path) -> None:
    """A complete result rerun with another --tta does what it asks (recomputes), not 'nothing to do'."""
    from wsi_mtl import synthetic

    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[256:768, 512:1024], mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    common = {"tile_size": 256, "batch_size": 1, "objects": False, "progress": False, "precision": "fp32"}
    first = segment_slide(slide, tmp_path / "out", **common)
    assert segment_slide(slide, tmp_path / "out", **common).action == "reused"
    second = segment_slide(slide, tmp_path / "out", tta=2, **common)
    assert second.action == "computed" and "tta" in second.summary
    assert second.run["fingerprint"]["tta"] == 2 and second.run["tiles"]["computed"] == first.run["tiles"]["computed"] > 0
    assert segment_slide(slide, tmp_path / "out", tta=2, **common).action == "reused"


def test_the_network_gives_its_kept_pages_back_before_the_objects(he_image, tmp_path, monkeypatch) -> None:
    """The pages the network's heap keeps from tile to tile go back once inference is done, before
    the maps are finalised and the objects derived (not only after the slide)."""
    from wsi_mtl import engine, pipeline, synthetic
    from wsi_mtl.store import PredictionStore

    events: list[str] = []
    monkeypatch.setattr(pipeline, "release_freed_pages", lambda: events.append("release"))
    run = engine.run_inference
    monkeypatch.setattr(pipeline, "run_inference", lambda *a, **k: (events.append("inference"), run(*a, **k))[1])
    finalize = PredictionStore.finalize
    monkeypatch.setattr(PredictionStore, "finalize", lambda self, *a, **k: (events.append("finalize"), finalize(self, *a, **k))[1])
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[256:512, 512:768], mpp=0.5, compression="jpeg", tile=256, levels=(1,))
    segment_slide(slide, tmp_path / "out", tile_size=128, batch_size=1, objects=False, progress=False, precision="fp32")
    assert events[:3] == ["inference", "release", "finalize"]


def test_segment_takes_numpys_arrays_in_small_pages(he_image, tmp_path, monkeypatch) -> None:
    """segment turns numpy's 2 MB pages off in its process (wsi_mtl.malloc.small_numpy_pages)."""
    from wsi_mtl import malloc, pipeline, synthetic

    turned: list[bool] = []
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    monkeypatch.setattr(pipeline, "small_numpy_pages", lambda: turned.append(True) or malloc.small_numpy_pages())
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[256:512, 512:768], mpp=0.5, compression="jpeg", tile=256, levels=(1,))
    segment_slide(slide, tmp_path / "out", tile_size=128, batch_size=1, objects=False, progress=False, precision="fp32")
    assert turned == [True] and _huge_pages_asked() is False
