"""The streaming engine: tiled output equals one pass, interrupted runs resume to the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from wsi_mtl.engine import resolve_device, resolve_precision, run_inference
from wsi_mtl.errors import DamagedRegionError, InputError
from wsi_mtl.network import create_model
from wsi_mtl.store import PREDICTIONS, HeadLayout, PredictionStore, open_predictions
from wsi_mtl.tiling import plan_tiles


class ArraySlide:
    """A slide held in memory at the model's resolution; outside is white, like a real reader."""

    def __init__(self, image: np.ndarray, mpp: float = 0.5, damaged: set[tuple[int, int]] = frozenset()):
        self.image, self.mpp, self.damaged = image, mpp, damaged
        self.height, self.width = image.shape[:2]
        self.reads = 0

    def read(self, x, y, width, height, *, mpp):
        assert mpp == self.mpp
        self.reads += 1
        if (x, y) in self.damaged:
            raise DamagedRegionError(f"cannot decode region at {x},{y}")
        out = np.full((height, width, 3), 255, np.uint8)
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + height, self.height), min(x + width, self.width)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.image[y0:y1, x0:x1]
        return out


def he_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Pink background with purple blobs and white holes: enough structure for a seam test."""
    rng = np.random.default_rng(seed)
    base = np.empty((h, w, 3), np.float32)
    base[:] = (230, 170, 200)
    nuclei = ndimage.gaussian_filter((rng.random((h, w)) > 0.995).astype(np.float32), 3) > 0.02
    holes = ndimage.gaussian_filter(rng.random((h, w)).astype(np.float32), 25) > 0.52
    base[nuclei] = (110, 60, 150)
    base[holes] = (245, 245, 245)
    base += rng.normal(0, 8, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _make_sensitive(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """He-normal weights and random BN statistics (the Cerberus fixture recipe): unlike a default
    initialisation, whose outputs barely depend on the input, every output pixel then reacts
    strongly to its neighbourhood, so a missing context margin shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(1.0 + 0.5 * torch.rand(t.shape, generator=g))
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def model():
    return _make_sensitive(create_model("wsimtl_small", seed=0)).eval()


def _heads(model):
    cfg = model.config
    return [HeadLayout(n, len(h.class_names), cfg.patch_stride_px if h.kind == "patch" else 1) for n, h in cfg.heads.items()]


def _run(slide, model, out_dir, *, core, margin, keep=None, batch_size=2, model_wrapper=None, threads=None, branches=False):
    cfg = model.config
    grid = plan_tiles(slide.height, slide.width, core_px=core, margin_px=margin, stride=cfg.stride)
    tiles = list(grid.tiles(keep=keep))
    store = PredictionStore(out_dir, heads=_heads(model), height=grid.height, width=grid.width, core_px=core,
                            downsample=1.0, fingerprint={"core": core, "margin": margin}, attrs={})
    try:
        stats = run_inference(slide, model_wrapper or model, grid, tiles, store, mpp=slide.mpp, device=torch.device("cpu"),
                              batch_size=batch_size, precision=None, workers=2, progress=False, threads=threads,
                              branches=branches)
        store.finalize()
    finally:
        store.close()
    return stats


def _single_pass(model, image, margin):
    """One forward pass over the whole image padded with `margin` of white (and up to the stride)."""
    stride = model.config.stride
    h, w = image.shape[:2]
    H = -(-(h + 2 * margin) // stride) * stride
    W = -(-(w + 2 * margin) // stride) * stride
    canvas = np.full((H, W, 3), 255, np.uint8)
    canvas[margin : margin + h, margin : margin + w] = image
    x = torch.from_numpy(canvas).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        probs = model.predict(x)
    out = {}
    for name, p in probs.items():
        cell = model.config.patch_stride_px if model.config.heads[name].kind == "patch" else 1
        q = (p.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)[0].numpy()
        m = margin // cell
        out[name] = q[:, m : m + -(-h // cell), m : m + -(-w // cell)]
    return out


@pytest.mark.slow
def test_tiled_output_equals_one_pass(model, tmp_path):
    # These He-initialised weights react to context much further out than a trained model's do
    # (measured: margin 128 -> max diff 114/255, 192 -> 9/255, 256 -> 1/255), so they need 256 px.
    image = he_like(300, 420)
    slide = ArraySlide(image)
    margin = 256
    stats = _run(slide, model, tmp_path, core=160, margin=margin)
    assert stats.tiles_computed == stats.tiles_total == 2 * 3
    root = open_predictions(tmp_path)
    reference = _single_pass(model, image, margin)
    for name, ref in reference.items():
        tiled = root[name]["0"][:]
        assert tiled.shape == ref.shape, name
        diff = np.abs(tiled.astype(int) - ref.astype(int))
        # stated tolerance: 2/255 anywhere (uint8 rounding of float differences), 0.05/255 on average
        assert diff.max() <= 2, (name, diff.max())
        assert diff.mean() <= 0.05, (name, diff.mean())


def test_no_margin_shows_seams(model, tmp_path):
    """Control for the seam test: without context the tiles disagree with one pass."""
    image = he_like(256, 256)
    slide = ArraySlide(image)
    _run(slide, model, tmp_path, core=64, margin=0)
    root = open_predictions(tmp_path)
    ref = _single_pass(model, image, 0)
    worst = max(np.abs(root[n]["0"][:].astype(int) - ref[n].astype(int)).max() for n in ("Nuclei-INST", "Lumen-INST"))
    assert worst > 10


class _Interrupt(Exception):
    pass


class _DiesAfter:
    """Wraps a model; raises after `n` batches, like a run killed midway."""

    def __init__(self, model, n):
        self.model, self.n, self.config = model, n, model.config

    def predict(self, x, margin=0):
        if self.n == 0:
            raise _Interrupt()
        self.n -= 1
        return self.model.predict(x, margin=margin)


def test_interrupted_run_resumes_to_identical_output(model, tmp_path):
    image = he_like(320, 320, seed=3)
    slide = ArraySlide(image)
    _run(slide, model, tmp_path / "straight", core=64, margin=32)
    with pytest.raises(_Interrupt):
        _run(slide, model, tmp_path / "resumed", core=64, margin=32, model_wrapper=_DiesAfter(model, 3))
    assert not (tmp_path / "resumed" / PREDICTIONS).exists(), "an interrupted store must not look finished"
    slide.reads = 0
    stats = _run(slide, model, tmp_path / "resumed", core=64, margin=32)
    assert stats.tiles_resumed == 6 and stats.tiles_computed == 25 - 6
    assert slide.reads == 25 - 6
    a, b = open_predictions(tmp_path / "straight"), open_predictions(tmp_path / "resumed")
    for name in model.config.heads:
        np.testing.assert_array_equal(a[name]["0"][:], b[name]["0"][:])


class _PlanningSlide(ArraySlide):
    """An :class:`ArraySlide` that records the reads announced to it and those made."""

    def __init__(self, image: np.ndarray) -> None:
        super().__init__(image)
        self.planned: list[tuple[int, int, int, int]] = []
        self.made: list[tuple[int, int, int, int]] = []

    def plan_reads(self, regions, *, mpp):
        assert mpp == self.mpp
        self.planned.extend(regions)

    def read(self, x, y, width, height, *, mpp):
        self.made.append((x, y, width, height))
        return super().read(x, y, width, height, mpp=mpp)


def test_the_engine_announces_the_reads_it_will_make(model, tmp_path):
    """Before reading, ``run_inference`` announces to a slide that takes them (``plan_reads``: its
    tile cache then keeps only what neighbouring tiles share) exactly the reads it then makes;
    a resumed run announces only the tiles it still computes."""
    slide = _PlanningSlide(he_like(320, 320, seed=5))
    with pytest.raises(_Interrupt):
        _run(slide, model, tmp_path / "run", core=64, margin=32, model_wrapper=_DiesAfter(model, 3))
    assert len(slide.planned) == 25
    slide.planned.clear()
    slide.made.clear()
    stats = _run(slide, model, tmp_path / "run", core=64, margin=32)
    assert stats.tiles_computed == len(slide.planned) == 25 - stats.tiles_resumed < 25
    assert sorted(slide.planned) == sorted(slide.made)


class _Threads:
    """Wraps a model; records the torch threads and batch size of every forward pass."""

    def __init__(self, model):
        self.model, self.config, self.seen = model, model.config, []

    def predict(self, x, margin=0):
        self.seen.append((torch.get_num_threads(), x.shape[0]))
        return self.model.predict(x, margin=margin)


def test_the_network_gets_the_tiles_as_read_and_gives_the_maps_of_float_input(model, tmp_path):
    """The engine hands predict each batch as read (uint8, an NCHW view of the NHWC pixels): no float
    copy of a tile beside the network's own; the stored maps are byte for byte those of float input."""
    seen = []

    class Dtypes:
        config = model.config

        def __init__(self, to_float):
            self.to_float = to_float

        def predict(self, x, **kw):
            seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return model.predict(x.float() if self.to_float else x, **kw)

    slide = ArraySlide(he_like(200, 260, seed=6))
    _run(slide, model, tmp_path / "as_read", core=96, margin=32, model_wrapper=Dtypes(False))
    assert seen and all(s == (torch.uint8, True) for s in seen), seen
    _run(slide, model, tmp_path / "float", core=96, margin=32, model_wrapper=Dtypes(True))
    a, b = open_predictions(tmp_path / "as_read"), open_predictions(tmp_path / "float")
    for name in model.config.heads:
        assert np.array_equal(a[name]["0"][:], b[name]["0"][:]), name


def test_threads_per_tile_never_mix_in_a_batch_and_are_restored_by_the_caller(model, tmp_path):
    """Tiles of rows 0-1 on 2 threads, the rest on 1 (as the pipeline runs the network on every core
    until post-processing has work): batches split where the count changes; same maps as 1 thread."""
    image = he_like(320, 192, seed=4)  # 5 x 3 tiles of 64 px, batches of 2
    slide = ArraySlide(image)
    before = torch.get_num_threads()
    wrapped = _Threads(model)
    try:
        _run(slide, model, tmp_path / "mixed", core=64, margin=32, model_wrapper=wrapped, threads=lambda t: 2 if t.row < 2 else 1)
    finally:
        torch.set_num_threads(before)
    assert wrapped.seen == [(2, 2), (2, 2), (2, 2), (1, 2), (1, 2), (1, 2), (1, 2), (1, 1)]
    torch.set_num_threads(1)
    try:
        _run(slide, model, tmp_path / "one", core=64, margin=32)
    finally:
        torch.set_num_threads(before)
    a, b = open_predictions(tmp_path / "mixed"), open_predictions(tmp_path / "one")
    for name in model.config.heads:  # fp32 sums in another order may differ in the last bits only
        assert np.abs(a[name]["0"][:].astype(int) - b[name]["0"][:].astype(int)).max() <= 1


class _Branches(_Threads):
    """Wraps a model; records the torch threads and whether a helper thread came with each forward pass."""

    def predict(self, x, margin=0, helper=None):
        self.seen.append((torch.get_num_threads(), helper is not None))
        return self.model.predict(x, margin=margin, helper=helper)


def test_branches_run_beside_one_thread_only_and_leave_the_maps_unchanged(model, tmp_path):
    """With ``branches``, the tiles run on one torch thread get model.predict's helper (its thread
    gone when inference ends), those on two do not; the stored maps are byte for byte those of
    the same run without it."""
    import threading

    image = he_like(320, 192, seed=5)
    slide = ArraySlide(image)
    before = torch.get_num_threads()
    policy = lambda t: 2 if t.row < 2 else 1  # noqa: E731
    wrapped = _Branches(model)
    try:
        _run(slide, model, tmp_path / "branches", core=64, margin=32, model_wrapper=wrapped, threads=policy, branches=True)
        _run(slide, model, tmp_path / "plain", core=64, margin=32, threads=policy)
    finally:
        torch.set_num_threads(before)
    assert wrapped.seen == [(2, False)] * 3 + [(1, True)] * 5
    assert not [t for t in threading.enumerate() if t.name.startswith("wsimtl-branch")]
    a, b = open_predictions(tmp_path / "branches"), open_predictions(tmp_path / "plain")
    for name in model.config.heads:
        np.testing.assert_array_equal(a[name]["0"][:], b[name]["0"][:], err_msg=name)


def test_resume_with_other_settings_starts_over(model, tmp_path):
    slide = ArraySlide(he_like(128, 128))
    with pytest.raises(_Interrupt):
        _run(slide, model, tmp_path, core=64, margin=32, model_wrapper=_DiesAfter(model, 1))
    stats = _run(slide, model, tmp_path, core=64, margin=64)  # other margin: other fingerprint
    assert stats.tiles_resumed == 0 and stats.tiles_computed == 4


def test_damaged_regions_are_recorded_and_skipped(model, tmp_path):
    slide = ArraySlide(he_like(128, 128), damaged={(64 - 32, -32)})
    stats = _run(slide, model, tmp_path, core=64, margin=32)
    assert stats.tiles_computed == 4
    assert len(stats.damaged) == 1 and "cannot decode" in stats.damaged[0]["error"]
    nuclei = open_predictions(tmp_path)["Nuclei-INST"]["0"]
    assert nuclei[:, :64, 64:].max() == 0  # the damaged tile's core was left empty
    assert nuclei[:, :64, :64].max() > 0


def test_tiles_outside_tissue_stay_empty(model, tmp_path):
    slide = ArraySlide(he_like(128, 128))
    stats = _run(slide, model, tmp_path, core=64, margin=32, keep=lambda t: t.key == (1, 1))
    assert stats.tiles_total == 1 and slide.reads == 1
    nuclei = open_predictions(tmp_path)["Nuclei-INST"]["0"][:]
    assert nuclei[:, :64, :].max() == 0 and nuclei[:, 64:, 64:].max() > 0


def test_store_is_valid_ome_zarr(model, tmp_path):
    from ome_zarr_models.v05.image import Image

    slide = ArraySlide(he_like(100, 130))
    _run(slide, model, tmp_path, core=64, margin=32)
    import zarr

    for name, head in model.config.heads.items():
        group = zarr.open_group(tmp_path / PREDICTIONS / name, mode="r")
        image = Image.from_zarr(group)
        scale = image.attributes.ome.multiscales[0].datasets[0].coordinateTransformations[0].scale
        cell = model.config.patch_stride_px if head.kind == "patch" else 1
        assert list(scale) == [1.0, float(cell), float(cell)]
        assert group["0"].shape == (len(head.class_names), -(-100 // cell), -(-130 // cell))


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_precision(torch.device("cpu"), "fp32") is None
    assert resolve_precision(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(InputError, match="fp16 is not supported on the CPU"):
        resolve_precision(torch.device("cpu"), "fp16")
    with pytest.raises(InputError, match="unknown precision"):
        resolve_precision(torch.device("cpu"), "int4")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu:9x")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_it_is_emulated_and_says_so(native, monkeypatch, caplog):
    """Asked for on a CPU without native bf16, bf16 is what runs (emulated) and a warning says what it costs;
    ``auto`` takes fp32 there."""
    import wsi_mtl.devices

    monkeypatch.setattr(wsi_mtl.devices, "cpu_has_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="wsi_mtl.devices"):
        assert resolve_precision(torch.device("cpu"), "bf16") is torch.bfloat16
        assert resolve_precision(torch.device("cpu"), "auto") is (torch.bfloat16 if native else None)
    warned = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


def test_full_disk_while_writing_is_a_one_line_output_error(model, tmp_path, monkeypatch):
    import errno

    from wsi_mtl.errors import OutputError

    slide = ArraySlide(he_like(128, 128))

    import zarr

    def no_space(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", no_space)
    with pytest.raises(OutputError, match="disk full"):
        _run(slide, model, tmp_path, core=64, margin=32)
    assert not (tmp_path / PREDICTIONS).exists()


def test_cpu_count_is_capped_by_the_workers_share(monkeypatch) -> None:
    """$WSIMTL_CPUS (a local Dask worker's share of the cores) caps torch threads and post-processing."""
    from wsi_mtl.devices import CPUS_ENV, cpu_count

    monkeypatch.delenv(CPUS_ENV, raising=False)
    cores = cpu_count()
    monkeypatch.setenv(CPUS_ENV, "1")
    assert cpu_count() == 1
    monkeypatch.setenv(CPUS_ENV, str(cores + 10))
    assert cpu_count() == cores  # never more than the process may use
    for bad in ("0", "two", ""):
        monkeypatch.setenv(CPUS_ENV, bad)
        assert cpu_count() == cores


def test_the_model_computes_the_cores_only_and_a_runner_whole_tiles(model, tmp_path):
    """A model whose predict takes a margin (torch's) is asked for each tile's core maps; a runner
    of an exported graph (predict(x) only) gives whole tiles, cropped by the engine: the same maps
    either way (float32 sums of other widths: within 1/255)."""
    calls = []

    class Runner:  # the call contract of wsi_mtl.network.runtime's runners
        config = model.config

        def predict(self, x, **kw):
            calls.append(kw)
            return model.predict(x, **kw)

    image = he_like(200, 260)
    margin = 64
    cores = _run(ArraySlide(image), model, tmp_path / "cores", core=96, margin=margin, batch_size=1)
    whole = _run(ArraySlide(image), model, tmp_path / "whole", core=96, margin=margin, batch_size=1, model_wrapper=Runner())
    assert cores.tiles_computed == whole.tiles_computed == len(calls) == 3 * 3
    assert all("margin" not in kw for kw in calls)
    a, b = open_predictions(tmp_path / "cores"), open_predictions(tmp_path / "whole")
    for name in model.config.heads:
        diff = np.abs(a[name]["0"][:].astype(int) - b[name]["0"][:].astype(int))
        assert diff.max() <= 1, (name, diff.max())
    spy = []
    real = model.predict

    def predict(x, margin=0):
        spy.append(margin)
        return real(x, margin=margin)

    try:
        model.predict = predict
        _run(ArraySlide(image), model, tmp_path / "spy", core=96, margin=margin, batch_size=1)
    finally:
        del model.predict
    assert spy == [margin] * 9
