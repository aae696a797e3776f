"""Inference runtimes: choosing one, falling back to torch, and exported graphs that match torch."""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pytest
import torch

from wsi_mtl.errors import InputError
from wsi_mtl.network import runtime as rt

TOLERANCE = 0.02  # max abs probability difference an exported graph may have from torch fp32

has_openvino = importlib.util.find_spec("openvino") is not None
has_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))


def test_unknown_runtime_is_an_input_error():
    with pytest.raises(InputError, match="unknown runtime 'tensorrt'"):
        rt.check_runtime("tensorrt", torch.device("cpu"))


class _Net:
    def __init__(self, trained: bool) -> None:
        self.config = type("Config", (), {"trained": trained})()


def test_auto_takes_the_first_installed_adopted_runtime_on_the_cpu_for_trained_models(monkeypatch):
    monkeypatch.setattr(rt, "AUTO_ORDER", ("openvino", "onnx"))
    monkeypatch.setattr(rt, "available", lambda name: name in ("torch", "onnx"))
    cpu = torch.device("cpu")
    assert rt.check_runtime("AUTO", cpu) == "auto"
    assert rt.resolve_runtime("auto", cpu, _Net(True)) == "onnx"
    assert rt.resolve_runtime("auto", torch.device("cuda"), _Net(True)) == "torch"
    assert rt.resolve_runtime("auto", cpu, _Net(False)) == "torch"  # export costs more than it saves
    assert rt.resolve_runtime("auto", cpu) == "torch"
    monkeypatch.setattr(rt, "available", lambda name: name == "torch")
    assert rt.resolve_runtime("auto", cpu, _Net(True)) == "torch"
    assert rt.resolve_runtime("torch", cpu, _Net(True)) == "torch"


def test_an_explicit_runtime_must_be_installed_and_on_the_cpu(monkeypatch):
    monkeypatch.setattr(rt, "available", lambda name: name == "torch")
    with pytest.raises(InputError, match=r"needs the openvino package.*wsimtl\[fast\]"):
        rt.check_runtime("openvino", torch.device("cpu"))
    monkeypatch.setattr(rt, "available", lambda name: True)
    with pytest.raises(InputError, match="CPU only"):
        rt.resolve_runtime("onnx", torch.device("cuda"), _Net(True))
    assert rt.resolve_runtime("OpenVINO", torch.device("cpu"), _Net(False)) == "openvino"


def test_segment_slide_refuses_an_absent_runtime_before_opening_anything(monkeypatch, tmp_path):
    from wsi_mtl.pipeline import segment_slide

    monkeypatch.setattr(rt, "available", lambda name: name == "torch")
    with pytest.raises(InputError, match="needs the onnxruntime package"):
        segment_slide(tmp_path / "missing.svs", tmp_path / "out", runtime="onnx", device="cpu")
    assert not (tmp_path / "out").exists()


def test_runtimes_option_lists_the_same_names():
    from wsi_mtl.cli._options import RUNTIMES

    assert RUNTIMES == rt.RUNTIMES


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WSIMTL_CACHE", str(tmp_path / "c"))
    assert rt.cache_dir() == tmp_path / "c" / "runtimes"
    monkeypatch.delenv("WSIMTL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert rt.cache_dir() == tmp_path / "x" / "wsimtl" / "runtimes"


def test_something_that_is_not_a_network_runs_in_torch(caplog):
    other = object()
    with caplog.at_level(logging.WARNING):
        runner, used = rt.make_runner(other, "openvino")
    assert runner is other and used == "torch"
    assert "needs a wsimtl network" in caplog.text


def test_a_failing_export_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    from wsi_mtl.network import create_model

    net = create_model("wsimtl_small", seed=0).eval()

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("conversion failed for aten::something")

    monkeypatch.setattr(rt, "OpenVinoRunner", Broken)
    with caplog.at_level(logging.WARNING):
        runner, used = rt.make_runner(net, "openvino")
    assert runner is net and used == "torch"
    assert "conversion failed" in caplog.text and "running in torch" in caplog.text


def test_the_cache_key_changes_with_the_weights():
    from wsi_mtl.network import create_model

    a = create_model("wsimtl_small", seed=0)
    b = create_model("wsimtl_small", seed=1)
    assert rt.model_key(a, "torch") == rt.model_key(a, "torch")
    assert rt.model_key(a, "torch") != rt.model_key(b, "torch")


# ---- exported graphs against torch (need the runtimes; the export takes tens of seconds) ----------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped default model, and a private export cache for this module."""
    from wsi_mtl.network import load_model

    old = os.environ.get("WSIMTL_CACHE")
    os.environ["WSIMTL_CACHE"] = str(tmp_path_factory.mktemp("runtime-cache"))
    try:
        yield load_model()
    finally:
        if old is None:
            os.environ.pop("WSIMTL_CACHE", None)
        else:
            os.environ["WSIMTL_CACHE"] = old


def _tissue(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """An H&E-coloured 1 x 3 x h x w input with nuclei-like blobs."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (225, 160, 195)
    blobs = ndimage.gaussian_filter((rng.random((h, w)) > 0.996).astype(np.float32), 3) > 0.02
    img[blobs] = (105, 55, 145)
    img += rng.normal(0, 6, img.shape)
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.float32)).permute(2, 0, 1)[None]


def _max_diffs(runner, model, x):
    with torch.inference_mode():
        ref = model.predict(x)
    got = runner.predict(x)
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].dtype == torch.float32 and got[name].shape == ref[name].shape, name
    return {name: float((got[name] - ref[name]).abs().max()) for name in ref}


@pytest.mark.slow
@pytest.mark.skipif(not has_openvino, reason="openvino is not installed (pip install 'wsimtl[fast]')")
def test_openvino_maps_match_torch_on_two_shapes_and_the_export_is_cached(trained):
    runner = rt.OpenVinoRunner(trained, threads=2)
    for shape in ((96, 128), (64, 64)):  # one graph, dynamic height and width
        diffs = _max_diffs(runner, trained, _tissue(*shape))
        assert max(diffs.values()) <= TOLERANCE, diffs
    xml = rt.export_openvino(trained)
    stamp = xml.stat().st_mtime_ns
    assert rt.export_openvino(trained) == xml and xml.stat().st_mtime_ns == stamp
    only = runner.predict(_tissue(64, 64), heads=["Gland-INST"])
    assert list(only) == ["Gland-INST"]
    with pytest.raises(ValueError, match="multiples of 32"):
        runner.predict(torch.zeros(1, 3, 40, 64))


@pytest.mark.slow
@pytest.mark.skipif(not has_openvino, reason="openvino is not installed (pip install 'wsimtl[fast]')")
def test_openvino_bf16_is_as_close_to_fp32_as_torch_bf16(trained):
    # bf16 alone moves some probabilities by more than 0.02 on this input, in torch as well
    x = _tissue(128, 128, seed=1)
    runner = rt.OpenVinoRunner(trained, precision=torch.bfloat16, threads=2)
    diffs = _max_diffs(runner, trained, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = trained.predict(x)
    with torch.inference_mode():
        ref = trained.predict(x)
    for name, d in diffs.items():
        assert d <= max(TOLERANCE, 1.5 * float((eager[name] - ref[name]).abs().max())), (name, d)


@pytest.mark.slow
@pytest.mark.skipif(not has_onnx, reason="onnxruntime, onnx and onnxscript are not all installed")
def test_onnxruntime_maps_match_torch(trained):
    runner = rt.OnnxRunner(trained, threads=2)
    diffs = _max_diffs(runner, trained, _tissue(96, 64, seed=2))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.slow
@pytest.mark.skipif(not has_openvino, reason="openvino is not installed (pip install 'wsimtl[fast]')")
def test_engine_runs_the_openvino_runner_and_says_so(trained, tmp_path):
    from wsi_mtl.engine import run_inference
    from wsi_mtl.store import HeadLayout, PredictionStore, open_predictions
    from wsi_mtl.tiling import plan_tiles

    image = _tissue(200, 260, seed=3)[0].permute(1, 2, 0).numpy().astype(np.uint8)

    class Slide:
        mpp = 0.5

        def read(self, x, y, width, height, *, mpp):
            out = np.full((height, width, 3), 255, np.uint8)
            y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, 200), min(x + width, 260)
            if y1 > y0 and x1 > x0:
                out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
            return out

    cfg = trained.config
    heads = [HeadLayout(n, len(h.class_names), cfg.patch_stride_px if h.kind == "patch" else 1) for n, h in cfg.heads.items()]
    grid = plan_tiles(200, 260, core_px=128, margin_px=64, stride=cfg.stride)
    maps = {}
    for runtime in ("torch", "openvino"):
        out = tmp_path / runtime
        store = PredictionStore(out, heads=heads, height=grid.height, width=grid.width, core_px=128, downsample=1.0,
                                fingerprint={"r": runtime}, attrs={})
        try:
            stats = run_inference(Slide(), trained, grid, list(grid.tiles()), store, mpp=0.5, device=torch.device("cpu"),
                                  batch_size=2, precision=None, workers=1, progress=False, runtime=runtime)
            store.finalize()
        finally:
            store.close()
        assert stats.runtime == runtime
        root = open_predictions(out)
        maps[runtime] = {h.name: root[h.name]["0"][:].astype(int) for h in heads}
    for name, ref in maps["torch"].items():
        # stored as round(255 p): 0.02 in probability is 5.1 levels, plus one for rounding
        assert np.abs(maps["openvino"][name] - ref).max() <= 6, name


@pytest.mark.slow
@pytest.mark.skipif(not has_openvino, reason="openvino is not installed (pip install 'wsimtl[fast]')")
def test_run_json_records_the_runtime_that_ran(trained, he_image, tmp_path):
    from wsi_mtl import synthetic
    from wsi_mtl.pipeline import segment_slide
    from wsi_mtl.store import open_predictions

    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[256:768, 512:1024], mpp=0.25, compression="jpeg", tile=256, levels=(1, 4))
    common = {"model": trained, "tile_size": 256, "batch_size": 1, "objects": False, "progress": False, "precision": "fp32"}
    runs = {r: segment_slide(slide, tmp_path / r, runtime=r, **common) for r in ("torch", "openvino")}
    for r, res in runs.items():
        assert res.run["parameters"]["runtime"] == r
    a, b = (open_predictions(res.result_dir) for res in runs.values())
    assert np.abs(a["Nuclei-INST"]["0"][:].astype(int) - b["Nuclei-INST"]["0"][:].astype(int)).max() <= 6
