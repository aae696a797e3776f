"""The fast paths of the instance steps give exactly what their plain definitions give.

Each plain definition below is the code the fast path replaced (one 3x3 dilation per step, one
``binary_fill_holes`` per object, ``binary_opening`` with a disk, every nucleus examined for necks);
they are compared pixel for pixel on random maps. ``benchmarks/bench_end_to_end.py`` and the checks
reported with it compare them on real network maps as well.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import disk

import wsi_mtl.postprocess._instances as inst
from wsi_mtl.postprocess import _compiled


def _expand_plain(labels: np.ndarray, distance: int) -> np.ndarray:
    """``distance`` 3x3 dilations into background, ties to the object whose first pixel is last."""
    n = int(labels.max(initial=0))
    if n == 0 or distance < 1:
        return labels
    flat = labels.ravel()
    first = np.array([np.flatnonzero(flat == i)[0] if (flat == i).any() else -1 for i in range(1, n + 1)])
    rank = np.zeros(n + 1, np.int64)
    rank[np.argsort(first, kind="stable") + 1] = np.arange(1, n + 1)
    back = np.zeros(n + 1, labels.dtype)
    back[rank[1:]] = np.arange(1, n + 1)
    r = rank[labels]
    for _ in range(distance):
        grown = ndi.maximum_filter(r, size=3, mode="constant", cval=0)
        grown[r > 0] = r[r > 0]
        r = grown
    return back[r]


def _fill_plain(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl]
        obj = crop == i
        add = ndi.binary_fill_holes(obj) & ~obj & (crop == 0)
        out[sl][add] = i
    return out


def _core_plain(prob: np.ndarray, threshold: float, erosion_px: int, min_area_px: float, open_px: int) -> np.ndarray:
    core = prob[1].astype(np.int16) - prob[2].astype(np.int16) > threshold * 255
    if open_px >= 1:
        core = ndi.binary_opening(core, structure=disk(open_px))
    labels, _ = ndi.label(core)
    labels = _fill_plain(_expand_plain(labels.astype(np.int32), erosion_px))
    sizes = np.bincount(labels.ravel())
    labels[(sizes < min_area_px)[labels]] = 0
    return inst._relabel_sequential(labels)


def _random_gland_map(rng: np.random.Generator, shape=(96, 128), scale: float = 1.0) -> np.ndarray:
    """Blobby interiors with rings (holes), thin bridges and a boundary band, as uint8 255 * p."""
    smooth = ndi.gaussian_filter(rng.random(shape), rng.uniform(1.5, 4) * scale)
    inside = smooth > np.quantile(smooth, rng.uniform(0.4, 0.75))
    ring = ndi.gaussian_filter(rng.random(shape), 3)
    inside &= ~((ring > 0.5) & (ring < 0.505 + rng.uniform(0, 0.01)))  # thin cuts: holes, necks
    prob = np.zeros((3,) + shape, np.uint8)
    prob[1][inside] = rng.integers(140, 256, int(inside.sum()))
    edge = inside ^ ndi.binary_erosion(inside)
    prob[2][edge] = rng.integers(0, 256, int(edge.sum()))
    prob[0] = 255 - np.maximum(prob[1], prob[2])
    return prob


@pytest.mark.parametrize("compiled", [False, True])
def test_open_disk_equals_binary_opening(monkeypatch, compiled):
    """Opening by a disk, by shifted rows (numpy) and by the compiled packed-row kernel (plain
    Python where numba is absent), is scipy's binary opening, also on masks thinner than the disk
    and with a disk wider than a word."""
    if compiled:
        _kernels_here(monkeypatch)
    else:
        from wsi_mtl.postprocess import _compiled

        monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
    rng = np.random.default_rng(3)
    for trial in range(40):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 70 if trial % 2 else 200)))  # one and several words a row
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3)) > rng.uniform(0.3, 0.6)
        for radius in (1, 2, 5, 8) + ((70,) if trial < 4 else ()):
            want = ndi.binary_opening(mask, structure=disk(radius))
            np.testing.assert_array_equal(inst._open_disk(mask, radius), want, err_msg=f"{trial} r={radius}")


def test_expand_and_fill_equal_their_plain_definitions():
    rng = np.random.default_rng(11)
    grown = filled = 0
    for trial in range(60):
        shape = (int(rng.integers(20, 80)), int(rng.integers(20, 90)))
        blobs = ndi.gaussian_filter(rng.random(shape), rng.uniform(1, 3)) > rng.uniform(0.5, 0.6)
        labels = ndi.label(blobs)[0].astype(np.int32)
        for d in (1, 3, 8):
            want = _expand_plain(labels, d)
            got = inst._expand_labels_square(labels, d)
            np.testing.assert_array_equal(got, want)
            # ndi.label numbers in raster order, so its numbers can serve as the ranks
            np.testing.assert_array_equal(inst._expand_labels_square(labels, d, raster_ordered=True), want)
            grown += int((want != labels).sum())
        rings = labels.copy()
        rings[ndi.binary_erosion(labels > 0, iterations=2)] = 0  # objects become rings: holes
        rings[rng.random(shape) < 0.02] = 0  # pin-holes and cut rings
        want = _fill_plain(rings)
        before = rings.copy()
        np.testing.assert_array_equal(inst._fill_holes_per_label(rings), want)
        np.testing.assert_array_equal(rings, before)  # a copy unless asked to fill in place
        np.testing.assert_array_equal(inst._fill_holes_per_label(before, in_place=True), want)
        filled += int((want != rings).sum())
    assert grown > 1000 and filled > 100  # the cases do grow and fill


def test_fill_holes_gives_a_hole_two_objects_enclose_to_the_larger_label():
    """Ring 1 encloses ring 2, which encloses background: that background is a hole of both; the
    larger label takes it, in place or not, as the plain per-object fill in label order gives."""
    labels = np.zeros((12, 12), np.int32)
    labels[1:11, 1:11] = 1
    labels[2:10, 2:10] = 0
    labels[3:9, 3:9] = 2
    labels[4:8, 4:8] = 0
    for in_place in (False, True):
        got = inst._fill_holes_per_label(labels.copy(), in_place=in_place)
        np.testing.assert_array_equal(got, _fill_plain(labels))
        assert (got[4:8, 4:8] == 2).all() and (got[2, 2:10] == 1).all()


@pytest.mark.parametrize("open_px", [0, 3, 8])
def test_gland_instances_equal_plain_definition_on_random_maps(open_px):
    rng = np.random.default_rng(100 + open_px)
    found = 0
    for _ in range(12):
        sc = 1 + open_px / 4
        prob = _random_gland_map(rng, (int(96 * sc), int(128 * sc)), scale=sc)
        for erosion, min_area in ((5, 50), (8, 400), (1, 10)):
            want = _core_plain(prob, 0.5, erosion, min_area, open_px)
            got = inst._core_instances(prob, threshold=0.5, erosion_px=erosion, min_area_px=min_area, open_px=open_px)
            np.testing.assert_array_equal(got, want)
            found += int(want.max())
    assert found > 20


def test_nuclei_skip_doomed_objects_gives_the_same_nuclei(monkeypatch):
    """Nuclei that min_area / min_interior drop whatever their pieces are not examined for necks:
    the result equals examining every nucleus."""
    rng = np.random.default_rng(5)
    cut = 0
    kw = dict(min_area_px=24, marker_threshold=0.6, mask_threshold=0.4, min_marker_px=1, keep_unmarked=True, split_h=0.75, min_interior=0.9)
    for trial in range(20):
        field = ndi.gaussian_filter(rng.random((80, 100)), 2.5)
        fg = field > np.quantile(field, 0.55)
        dist = ndi.distance_transform_edt(fg)
        prob = np.zeros((3, 80, 100), np.float32)
        prob[1] = np.clip(dist / 4, 0, 1) * rng.uniform(0.8, 1.0, (80, 100))
        prob[2] = np.where(fg, 1 - prob[1], 0) * 0.9
        prob[0] = 1 - prob[1] - prob[2]
        u8 = np.round(prob * 255).astype(np.uint8)
        fast, _ = inst._nuclei_instances(u8, **kw)
        monkeypatch.setattr(inst, "_doomed", lambda labels, *a: np.zeros(int(labels.max()) + 1, bool))
        plain, _ = inst._nuclei_instances(u8, **kw)
        monkeypatch.undo()
        np.testing.assert_array_equal(fast, plain)
        no_cut, _ = inst._nuclei_instances(u8, **{**kw, "split_h": 0})
        cut += int(fast.max() > no_cut.max())
    assert cut > 3


@pytest.mark.skipif(not _compiled.HAVE_NUMBA, reason="the compiled core mask needs numba")
def test_compiled_core_mask_equals_numpys(monkeypatch):
    """Gland and lumen cores from uint8 maps in one compiled pass: the same pixels as numpy's int16
    difference, on two- and three-channel maps, at thresholds on and between the uint8 steps."""
    rng = np.random.default_rng(5)
    for shape in [(3, 37, 53), (2, 120, 90), (3, 1, 1), (2, 0, 5)]:
        maps = rng.integers(0, 256, shape, dtype=np.uint8)
        for t in (0.0, 0.5, 127 / 255, 128 / 255, 0.9, 1.0, -0.2):
            want = maps[-2].astype(np.int16) - maps[-1].astype(np.int16) > t * 255.0
            np.testing.assert_array_equal(inst.core_mask(maps, t), want)
            with monkeypatch.context() as m:
                m.setattr(_compiled, "HAVE_NUMBA", False)
                np.testing.assert_array_equal(inst.core_mask(maps, t), want)


def test_disk_rows_are_skimages_disk():
    """The opening's footprint rows, computed without skimage's morphology, are ``disk(r)``'s."""
    for r in range(41):
        want = [(dy - r, (int(row.sum()) - 1) // 2) for dy, row in enumerate(disk(r))]
        assert inst._disk_rows(r) == want, r


@pytest.mark.skipif(not _compiled.HAVE_NUMBA, reason="without numba the plain paths use skimage's morphology")
def test_the_post_processing_server_does_not_import_skimages_morphology():
    """What a worker's server loads (the post-processing with its kernels warmed on every task)
    leaves skimage's morphology out: ~0.1-0.2 CPU s less in each process that starts."""
    import subprocess
    import sys

    code = "import sys, wsi_mtl.postprocess._warm; print('skimage.morphology' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"


def test_watershed_wrapper_equals_skimage_watershed():
    """The lean call of skimage's flooding routine gives skimage.segmentation.watershed's labels,
    ties between equal heights (uint8 surfaces) included."""
    from skimage.segmentation import watershed

    rng = np.random.default_rng(21)
    split = 0
    for trial in range(300):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        image = rng.integers(0, 6, shape).astype(np.uint8) if trial % 2 else -rng.random(shape).astype(np.float32)
        mask = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.45
        markers = ndi.label((rng.random(shape) < 0.05) & mask)[0].astype(np.int32)
        want = watershed(image, np.where(mask, markers, 0), mask=mask, connectivity=1)
        np.testing.assert_array_equal(inst._watershed(image, markers, mask), want)
        split += int(want.max() >= 2)
    assert split > 50


def test_edt32_equals_scipy_edt_as_float32():
    rng = np.random.default_rng(8)
    for trial in range(60):
        shape = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
        mask = rng.random(shape) < rng.uniform(0.05, 0.99)
        if trial % 3 == 0:
            mask = ndi.gaussian_filter(rng.random(shape), 2) > 0.45
        np.testing.assert_array_equal(inst._edt32(mask), ndi.distance_transform_edt(mask).astype(np.float32))


def _hmax_images(rng: np.random.Generator, trials: int):
    """Random float32 images >= 0: smooth hills, plateaus and ties (values rounded to halves),
    zero gaps between islands, and images with no zero at all."""
    for trial in range(trials):
        shape = (int(rng.integers(1, 36)), int(rng.integers(1, 36)))
        img = ndi.gaussian_filter(rng.random(shape), rng.uniform(0, 3)) * rng.uniform(0.1, 20)
        if trial % 3 == 0:
            img = np.round(img * rng.integers(1, 4)) / 2
        img = img.astype(np.float32)
        img[rng.random(shape) < rng.uniform(0, 0.5)] = 0
        if trial % 7 == 0:
            img = img + np.float32(0.5)
        yield img


@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_h_maxima_equals_skimage(monkeypatch, compiled):
    """h_maxima_bool is skimage's h_maxima, by the island flood (run as plain Python where numba
    is absent) and by the fallback, for plateaus, ties, zeros and h as float or np.float64."""
    from skimage.morphology import h_maxima

    from wsi_mtl.postprocess import _compiled

    monkeypatch.setattr(_compiled, "HAVE_NUMBA", compiled)
    if importlib.util.find_spec("numba") is None:  # run the kernels as plain Python
        monkeypatch.setattr(_compiled, "_ready", True)
    rng = np.random.default_rng(31)
    found = 0
    for img in _hmax_images(rng, 150):
        for h in (0.5, float(rng.uniform(0.01, 3)), np.float64(0.75)):
            want = h_maxima(img, h).astype(bool)
            np.testing.assert_array_equal(_compiled.h_maxima_bool(img, h), want)
            found += int(ndi.label(want & (img > 0))[1] >= 2)
    assert found > 50  # many images have several h-maxima
    neg = -np.arange(12, dtype=np.float32).reshape(3, 4)  # negative values: skimage's own path
    np.testing.assert_array_equal(_compiled.h_maxima_bool(neg, 0.5), h_maxima(neg, 0.5).astype(bool))


def test_compiled_edt_equals_scipy_edt_as_float32():
    """Meijster's transform (plain Python where numba is absent) gives scipy's float32 distances."""
    from wsi_mtl.postprocess import _compiled

    rng = np.random.default_rng(9)
    for trial in range(80):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = rng.random(shape) < rng.uniform(0.3, 1.0)
        if trial % 3 == 0:
            mask = ndi.gaussian_filter(rng.random(shape), 2) > 0.4
        if mask.all():
            mask[int(rng.integers(shape[0])), int(rng.integers(shape[1]))] = False
        np.testing.assert_array_equal(_compiled.edt32(mask), ndi.distance_transform_edt(mask).astype(np.float32))


def test_compiled_smoothing_and_peaks_equal_scipy():
    """The compiled Gaussian (scipy's float64 sums over kernel pairs, float32 per pass, reflected
    borders) and 3x3 local maxima give gaussian_filter's and maximum_filter's values, also on
    thin arrays and on plateaus (distances rounded to halves)."""
    from wsi_mtl.postprocess import _compiled

    rng = np.random.default_rng(12)
    tops = 0
    for trial in range(150):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        core = rng.random(shape) < rng.uniform(0.3, 1.0)
        if trial % 3 == 0:
            core = ndi.gaussian_filter(rng.random(shape), 2) > 0.45
        dist = ndi.distance_transform_edt(core).astype(np.float32)
        if trial % 4 == 0:
            dist = (np.round(dist * 2) / 2).astype(np.float32)
        want = ndi.gaussian_filter(dist, inst.NECK_SIGMA_PX, truncate=inst.NECK_REACH_PX / inst.NECK_SIGMA_PX) * core
        got, peaks = _compiled.smooth_and_peaks(dist, core, inst.NECK_SIGMA_PX, inst.NECK_REACH_PX)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(peaks, (want == ndi.maximum_filter(want, size=3)) & core)
        tops += int(peaks.sum())
    assert tops > 100


@pytest.mark.skipif(not __import__("wsi_mtl.postprocess._compiled", fromlist=["x"]).HAVE_NUMBA, reason="numba not installed or switched off (WSIMTL_NO_NUMBA=1)")
def test_nuclei_same_with_and_without_numba(monkeypatch):
    """Nuclei with neck cutting on random maps: the compiled steps change no label."""
    from wsi_mtl.postprocess import _compiled

    rng = np.random.default_rng(23)
    kw = dict(min_area_px=8, marker_threshold=0.5, mask_threshold=0.5, min_marker_px=1, keep_unmarked=True, min_interior=0.6)
    cut = 0
    for trial in range(12):
        blobs = ndi.gaussian_filter(rng.random((96, 96)), 2.0 + trial % 3)
        interior = np.clip((blobs - 0.45) * 12, 0, 1)
        u8 = np.round(255 * np.stack([1 - interior, interior, 0.3 * (interior > 0)])).astype(np.uint8)
        for h in (0.5, 0.75):
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
            fast, _ = inst._nuclei_instances(u8, split_h=h, **kw)
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
            plain, _ = inst._nuclei_instances(u8, split_h=h, **kw)
            np.testing.assert_array_equal(fast, plain)
            cut += int(fast.max() > inst._nuclei_instances(u8, split_h=0, **kw)[0].max())
    assert cut > 2


def _kernels_here(monkeypatch):
    """The compiled paths on: numba's kernels where it is installed, else the same kernels as plain
    Python (slow but the same code)."""
    from wsi_mtl.postprocess import _compiled

    monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
    if importlib.util.find_spec("numba") is None:
        monkeypatch.setattr(_compiled, "_ready", True)
    return _compiled


def test_compiled_component_floods_equal_skimage_watershed(monkeypatch):
    """flood_components gives, component by component, skimage's watershed of the box (uint8
    surfaces with many ties and float32 ones), and touches no pixel outside the components."""
    from skimage.segmentation import watershed

    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(41)
    split = 0
    for trial in range(40):
        shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        surface = rng.integers(0, 5, shape).astype(np.uint8) if trial % 2 else -rng.random(shape).astype(np.float32)
        components, n = ndi.label(ndi.gaussian_filter(rng.random(shape), 1.5) > 0.45)
        markers = ndi.label((rng.random(shape) < 0.08) & (components > 0))[0]
        which = np.flatnonzero(np.bincount(components[markers > 0], minlength=n + 1)[1:] >= 2) + 1
        got = np.full(shape, -7, np.int32)
        _compiled.flood_components(surface, markers, components, which, got, 100)
        want = np.full(shape, -7, np.int32)
        for c, sl in zip(which, [ndi.find_objects(components)[c - 1] for c in which]):
            m = components[sl] == c
            want[sl][m] = watershed(surface[sl], np.where(m, markers[sl], 0), mask=m, connectivity=1)[m] + 100
            split += 1
        np.testing.assert_array_equal(got, want)
    assert split > 30


def test_compiled_boxes_equal_find_objects(monkeypatch):
    from wsi_mtl.postprocess._instances import object_boxes

    _kernels_here(monkeypatch)
    rng = np.random.default_rng(42)
    for trial in range(20):
        labels = ndi.label(ndi.gaussian_filter(rng.random((50, 70)), 2) > 0.5)[0]
        which = np.flatnonzero(np.bincount(labels.ravel())[1:]) + 1
        which = which[rng.random(len(which)) < 0.7]
        want = [ndi.find_objects(labels)[i - 1] for i in which]
        got = [(slice(a, b), slice(c, d)) for a, b, c, d in object_boxes(labels, which).tolist()]
        assert got == want


@pytest.mark.parametrize("compiled", [False, True])
def test_enclosed_background_equals_labelled_background(monkeypatch, compiled):
    """The boxes of background components that do not reach the edge, from row runs (compiled, or
    the plain-Python kernel where numba is absent) and without numba, are those of
    ndi.label + find_objects, on label images with holes, touching objects, single rows and
    columns, all background and none."""
    from wsi_mtl.postprocess import _compiled

    if compiled:
        _kernels_here(monkeypatch)
    else:
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
    rng = np.random.default_rng(5)
    cases = [np.zeros((4, 5), np.int32), np.ones((4, 5), np.int32), np.array([[1, 0, 1]], np.int32), np.array([[1], [0], [1]], np.int32)]
    for _ in range(120):
        shape = (int(rng.integers(1, 45)), int(rng.integers(1, 55)))
        fg = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2.5)) > rng.uniform(0.35, 0.6)
        cases.append(np.where(fg, rng.integers(1, 4, shape), 0).astype(np.int32))
    for k, labels in enumerate(cases):
        back, n = ndi.label(labels == 0)
        edge = set(np.concatenate([back[0], back[-1], back[:, 0], back[:, -1]]).tolist())
        want = sorted((s[0].start, s[0].stop, s[1].start, s[1].stop) for i, s in enumerate(ndi.find_objects(back), 1) if i not in edge)
        assert sorted(map(tuple, inst._enclosed_background(labels).tolist())) == want, k


def test_compiled_components_equal_ndi_label_and_find_objects(monkeypatch):
    """Labels (4-connected, raster-ordered numbers) and boxes from row runs, compiled and as plain
    Python, are ndi.label's and find_objects'; without labels only the boxes come back."""
    from wsi_mtl.postprocess import _compiled
    from wsi_mtl.postprocess._instances import labelled_boxes

    _kernels_here(monkeypatch)
    rng = np.random.default_rng(8)
    cases = [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(5, dtype=bool), np.array([[True, False, True]])]
    for _ in range(100):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 50)))
        cases.append(ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 2.5)) > rng.uniform(0.3, 0.65))
    for k, mask in enumerate(cases):
        want, n = ndi.label(mask)
        boxes = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in ndi.find_objects(want)], np.int64).reshape(-1, 4)
        for lab, box in (labelled_boxes(mask), _compiled._components_py(mask, True)):
            np.testing.assert_array_equal(lab, want, err_msg=str(k))
            np.testing.assert_array_equal(box, boxes, err_msg=str(k))
        assert labelled_boxes(mask, labels=False)[0] is None
        np.testing.assert_array_equal(labelled_boxes(mask, labels=False)[1], boxes)


def test_compiled_neck_cuts_equal_the_plain_loop(monkeypatch):
    """split_at_necks with the compiled marker labelling and flooding (ndi.label's raster-order
    numbers, skimage's watershed) cuts the same pieces with the same new numbers as the plain loop."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(43)
    cut = 0
    for trial in range(25):
        yy, xx = np.mgrid[:70, :90]
        blobs = np.zeros((70, 90), bool)
        for _ in range(int(rng.integers(4, 12))):
            cy, cx, r = rng.uniform(5, 65), rng.uniform(5, 85), rng.uniform(2.5, 7)
            blobs |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        labels = ndi.label(blobs)[0].astype(np.int32)
        labels[rng.random(labels.shape) < 0.01] = 0
        fast = inst.split_at_necks(labels, 0.5)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
        plain = inst.split_at_necks(labels, 0.5)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
        np.testing.assert_array_equal(fast, plain)
        cut += int(plain.max() > labels.max())
    assert cut > 10


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_compiled_growth_equals_the_array_version(monkeypatch, dtype):
    """The compiled sweeps of _expand_labels_square give the numpy version's step-by-step ranks:
    equal values (uint8 ranks repeat), ranks up to the largest allowed, growth longer than one
    pair of sweeps (> 125 steps), and the single step taken pixel by pixel."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(44)
    top = 250 if dtype == np.uint8 else _compiled.GROW_MAX_RANK
    for trial in range(60):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        if trial == 0:
            shape = (3, 300)
        r = ndi.label(rng.random(shape) < rng.uniform(0.005, 0.2))[0]
        r = np.where(r > 0, top - r % 250, 0).astype(dtype)
        steps = 140 if trial < 3 else 1 if trial < 12 else 2 if trial < 20 else int(rng.integers(3, 30))
        got = _compiled.grow_ranks(r, steps)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
        want = inst._grow_ranks(r, steps)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
        np.testing.assert_array_equal(got, want)


def test_growth_in_place_gives_the_same_objects_without_a_second_array(monkeypatch):
    """grow_ranks(in_place=True) grows an int32 C-contiguous array where it is (the same object,
    the values of the copying call); other arrays are left untouched and a new one comes back.
    grow_components(in_place=True) gives the instances of the copying call, also from a crop that
    leaves the bounding box of its objects smaller than the array."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(46)
    for trial in range(20):
        shape = (int(rng.integers(2, 60)), int(rng.integers(2, 60)))
        r = ndi.label(rng.random(shape) < rng.uniform(0.01, 0.2))[0].astype(np.int32)
        steps = int(rng.integers(2, 140))
        want = _compiled.grow_ranks(r, steps)
        for other in (r.astype(np.uint16), np.asfortranarray(r)):
            before = other.copy()
            got = _compiled.grow_ranks(other, steps, in_place=True)
            assert got is not other and np.array_equal(other, before)
            np.testing.assert_array_equal(got, want)
        same = r.copy()
        assert _compiled.grow_ranks(same, steps, in_place=True) is same
        np.testing.assert_array_equal(same, want)
        labels = np.zeros((shape[0] + 30, shape[1] + 30), np.int32)
        labels[15:-15, 15:-15] = ndi.label(r > 0)[0]
        for erosion in (0, 1, 3, 9):
            copied = inst.grow_components(labels, erosion_px=erosion, min_area_px=4)
            grown = inst.grow_components(labels.copy(), erosion_px=erosion, min_area_px=4, in_place=True)
            np.testing.assert_array_equal(grown, copied)


def test_growth_in_place_in_a_crop_leaves_the_rest_untouched(monkeypatch):
    """grow_ranks(in_place=True) grows a crop of a C-ordered int32 array (rows contiguous) where
    it is, one step (pixel by pixel) or many (sweeps), to the copying call's values, and writes
    nothing outside the crop, also given as the box of the whole array; _expand_labels_square(in_place=True)
    grows the objects' box inside the labels themselves and returns them."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(47)
    for trial in range(30):
        shape = (int(rng.integers(3, 60)), int(rng.integers(3, 60)))
        big = ndi.label(rng.random(shape) < rng.uniform(0.01, 0.2))[0].astype(np.int32)
        before = big.copy()
        y0, x0 = int(rng.integers(0, shape[0] - 1)), int(rng.integers(0, shape[1] - 1))
        y1, x1 = int(rng.integers(y0 + 1, shape[0] + 1)), int(rng.integers(x0 + 1, shape[1] + 1))
        steps = 1 if trial < 10 else int(rng.integers(2, 140))
        want = _compiled.grow_ranks(big[y0:y1, x0:x1].copy(), steps)
        outside = big.copy()
        view = big[y0:y1, x0:x1]
        assert _compiled.grow_ranks(view, steps, in_place=True) is view
        np.testing.assert_array_equal(view, want)
        outside[y0:y1, x0:x1] = want
        np.testing.assert_array_equal(big, outside)
        again = outside.copy()
        again[y0:y1, x0:x1] = before[y0:y1, x0:x1]
        past = int(rng.integers(0, 3))  # a stop past the array's end is clipped, as a slice's
        box = (y0, y1 + past * (y1 == shape[0]), x0, x1 + past * (x1 == shape[1]))
        assert _compiled.grow_ranks(again, steps, in_place=True, box=box) is again  # the box of a C-ordered array
        np.testing.assert_array_equal(again, outside)
        np.testing.assert_array_equal(_compiled.grow_ranks(before, steps, box=box), want)  # not in place: the crop grown
        labels = np.zeros((shape[0] + 20, shape[1] + 20), np.int32)
        labels[10:-10, 10:-10] = ndi.label(big > 0)[0]
        for d in (1, 2, 7):
            copied = inst._expand_labels_square(labels, d, raster_ordered=True)
            mine = labels.copy()
            assert inst._expand_labels_square(mine, d, raster_ordered=True, in_place=True) is mine
            np.testing.assert_array_equal(mine, copied)


def test_kept_components_equal_the_cropped_relabelled_label_image(monkeypatch):
    """kept_components (painted from the row runs mask_components found, no label image of the whole
    mask) equals labelling the whole mask, keeping the chosen components renumbered in order and
    cropping, for crops that cut components and crops that hold them whole, with and without the
    compiled kernels; mask_components gives labelled_boxes's boxes."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(48)
    for trial in range(40):
        shape = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        mask = rng.random(shape) < rng.uniform(0.05, 0.6)
        comps, n = ndi.label(mask)
        keep = rng.random(n) < 0.5
        y0, x0 = int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))
        rect = (y0, int(rng.integers(y0, shape[0] + 1)), x0, int(rng.integers(x0, shape[1] + 1)))
        lut = np.zeros(n + 1, np.int32)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
        want = lut[comps[rect[0] : rect[1], rect[2] : rect[3]]]
        for numba_on in (True, False):
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", numba_on)
            comps = inst.mask_components(mask)
            assert (comps.runs is None) != numba_on and (comps.mask is None) == numba_on
            np.testing.assert_array_equal(comps.box, inst.labelled_boxes(mask, labels=False)[1])
            got = inst.kept_components(comps, keep, rect)
            assert got.dtype == np.int32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_relabeled_equals_the_gather(monkeypatch):
    """relabeled(labels, lut) is lut[labels] (values and dtype) for label crops that are not
    contiguous, of other integer types, with and without the compiled kernel; the input is untouched."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(45)
    for trial in range(20):
        labels = ndi.label(rng.random((60, 70)) < 0.3)[0].astype([np.int32, np.int64, np.uint16][trial % 3])
        lut = rng.integers(0, 1000, int(labels.max()) + 1).astype(np.int32)
        crop = labels[5:50:2, 3:61]
        before = crop.copy()
        for numba_on in (True, False):
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", numba_on)
            got = inst.relabeled(crop, lut)
            assert got.dtype == np.int32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, lut[crop])
            np.testing.assert_array_equal(crop, before)


def test_compiled_rings_equal_the_numpy_tracing(monkeypatch):
    """trace_rings compiled gives the numpy version's rings exactly: labels, vertices in the same
    order from the same start, ring order and areas (holes, touching objects, labels left out)."""
    from wsi_mtl.postprocess._contours import trace_rings

    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(46)
    traced = 0
    for trial in range(80):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        labels = ndi.label(ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > rng.uniform(0.4, 0.6))[0]
        labels[rng.random(shape) < 0.05] = int(rng.integers(0, 5))  # salt: touching objects and holes
        want = rng.random(int(labels.max()) + 1) < 0.8
        got = trace_rings(labels.astype([np.int32, np.int64][trial % 2]), want)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
        expect = trace_rings(labels, want)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
        for g, e in zip(got, expect):
            np.testing.assert_array_equal(g, e)
        traced += len(expect[0])
    assert traced > 200


def test_compiled_label_sizes_equal_bincount(monkeypatch):
    """_sizes compiled counts every label as bincount over the object pixels does, and a length
    shorter than the labels need falls back to bincount (which grows to hold them)."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(47)
    for trial in range(20):
        labels = ndi.label(rng.random((50, 60)) < 0.3)[0].astype([np.int32, np.int64][trial % 2])
        top = int(labels.max())
        length = top + 1 + int(rng.integers(0, 3)) if trial % 4 else max(1, top // 2)
        want = np.bincount(labels[labels > 0], minlength=length)
        np.testing.assert_array_equal(inst._sizes(labels, length), want)
    assert _compiled.label_counts(np.array([[0, 3]]), 3) is None


def test_label4_and_owners_equal_ndi_label_and_the_index_assignment(monkeypatch):
    """label4 numbers components as ndi.label does (compiled and not), and owners gives each label
    the value numpy's assignment through the label image gives it, e.g. the component holding each
    marker; a label outside the length is refused by the kernel (the caller then takes numpy)."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(53)
    for trial in range(30):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 70)))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2.5)) > rng.uniform(0.3, 0.6)
        want, n = ndi.label(mask)
        got, k = inst.label4(mask)
        assert k == n and got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        markers, m = ndi.label(mask & (rng.random(shape) < 0.4))
        expect = np.zeros(m + 1 + trial % 3, np.int64)
        expect[markers[markers > 0]] = want[markers > 0]
        np.testing.assert_array_equal(inst.owners(markers, want, m + 1 + trial % 3), expect)
        monkeypatch.setattr(_compiled, "available", lambda: False)
        np.testing.assert_array_equal(inst.label4(mask)[0], want)
        np.testing.assert_array_equal(inst.owners(markers, want, m + 1 + trial % 3), expect)
        monkeypatch.undo()
        _kernels_here(monkeypatch)
    assert _compiled.label_owners(np.array([[0, 3]]), np.array([[1, 2]]), 3) is None
    np.testing.assert_array_equal(_compiled.label_owners(np.array([[2, 0, 2]]), np.array([[5, 6, 7]]), 3), [0, 0, 7])


def test_ring_successors_found_by_hashing_equal_those_found_by_sorting(monkeypatch):
    """Each segment's successor (the segment starting where it ends) from the hash table is the one
    a sorted search finds, also for keys crowded into the same slots (multiples of the table size)."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(61)
    for trial in range(12):
        n = int(rng.integers(1, 3000))
        if trial % 3 == 0:  # keys that share their low bits, and their folded bits in a small table
            ks = np.arange(1, n + 1, dtype=np.int64) << int(rng.integers(8, 24))
        else:
            ks = rng.choice(1 << 40, size=n, replace=False).astype(np.int64)
        ke = ks[rng.permutation(n)]
        order = np.argsort(ks)
        want = order[np.searchsorted(ks[order], ke)]
        np.testing.assert_array_equal(_compiled._successors(ks, ke), want)


def test_compiled_label_means_equal_the_numpy_sums(monkeypatch):
    """_mean_in_labels compiled (integer values: one pass, int64 sums) gives the float64 bincount's
    means bit for bit, for labels given in ``ids`` or absent (mean 0), a length longer than the
    labels need, and falls back to bincount where a label is not below it; float values keep the
    numpy path."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(48)
    for trial in range(24):
        labels = ndi.label(rng.random((40, 70)) < 0.4)[0].astype([np.int32, np.int64][trial % 2])
        values = rng.integers(0, 511, labels.shape).astype([np.uint16, np.int32, np.uint8][trial % 3])
        top = int(labels.max())
        length = top + 1 + int(rng.integers(0, 3)) if trial % 4 else max(1, top // 2)
        ids = np.unique(rng.integers(0, top + 3, 12))
        got = inst._mean_in_labels(labels, values, ids[ids < max(length, top + 1)], 255.0, length=length)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
        want = inst._mean_in_labels(labels, values, ids[ids < max(length, top + 1)], 255.0, length=length)
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
        np.testing.assert_array_equal(got, want)
    counts, sums = _compiled.label_sums(np.array([[0, 2, 2, 1]]), np.array([[9, 3, 4, 250]], np.uint8), 4)
    assert counts.tolist() == [0, 1, 2, 0] and sums.tolist() == [0, 250, 7, 0]  # no uint8 wrap-around
    assert _compiled.label_sums(np.array([[0, 3]]), np.array([[1, 1]]), 3) is None


def test_compiled_instance_type_equals_the_numpy_votes(monkeypatch):
    """instance_type compiled (uint8 maps) gives the numpy version's classes and float32
    probabilities bit for bit: ties (first class wins), never_class, ignore_class, pixels whose
    other classes are all 0, labels absent from the map (NaN)."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(53)
    checked = 0
    for trial in range(30):
        shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        labels = ndi.label(rng.random(shape) < 0.5)[0].astype([np.int32, np.int64][trial % 2])
        if trial % 3 == 0:
            labels[labels == 2] = 0  # an absent label
        c = int(rng.integers(2, 6))
        prob = rng.integers(0, 4, (c, *shape)).astype(np.uint8) * np.uint8(60)  # many ties and zeros
        for ignore, never in ((0, None), (None, 0), (0, 0), (None, None), (1, c - 1)):
            got = inst.instance_type(labels, prob, ignore_class=ignore, never_class=never)
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", False)
            expect = inst.instance_type(labels, prob, ignore_class=ignore, never_class=never)
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", True)
            np.testing.assert_array_equal(got[0], expect[0])
            np.testing.assert_array_equal(got[1], expect[1])  # NaN where absent, on both
            assert got[0].dtype == expect[0].dtype and got[1].dtype == expect[1].dtype
            checked += len(expect[0])
    assert checked > 1000


def test_reconstruction_queue_grows_without_changing_the_result(monkeypatch):
    """The scan-and-queue reconstruction gives the same values when its queue starts at one item
    (so it doubles many times) as with the default, on images whose values must travel against
    both scan directions (winding corridors) and on random islands."""
    _compiled = _kernels_here(monkeypatch)
    _compiled._kernels()
    rng = np.random.default_rng(59)
    corridor = np.zeros((41, 41), np.float32)  # a serpentine path of positive pixels
    corridor[1:-1:4, 1:-1] = 1
    for k, r in enumerate(range(1, 37, 4)):
        corridor[r : r + 4, 39 if k % 2 == 0 else 1] = 1
    images = [corridor * np.float32(5) + rng.random(corridor.shape, np.float32) * corridor]
    for _ in range(20):
        img = ndi.gaussian_filter(rng.random((60, 70)), 2).astype(np.float32) * 10
        img[rng.random(img.shape) < 0.2] = 0
        images.append(img)
    grew = 0
    for img in images:
        seed = np.where(img > 0, img - np.float32(rng.uniform(0.5, 3)), 0).astype(np.float32)
        seed.flat[int(np.flatnonzero(img)[-1])] = img.flat[int(np.flatnonzero(img)[-1])]  # the last pixel high: it must travel back
        full = _compiled._reconstruct(img, seed)
        np.testing.assert_array_equal(_compiled._reconstruct(img, seed, 1), full)
        grew += int((full > seed).sum() > 1)
    assert grew > 10
    # the corridor: the value of its last pixel reaches its first, along every bend
    seed = np.zeros(corridor.shape, np.float32)
    last = np.argwhere(corridor > 0)[-1]
    seed[tuple(last)] = 4
    rec = _compiled._reconstruct(corridor * np.float32(5), seed, 1)
    assert rec[1, 1] == 4 and (rec[corridor > 0] == 4).all()
    # the doubling keeps a wrapped-around queue's items in order
    wrapped = np.array([5, 6, 7, 1, 2, 3, 4], np.int64)
    grown = _compiled._grown_queue(wrapped, 3, 7)
    assert grown.size == 14 and grown[:7].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_box_table_gives_find_objects_boxes_with_and_without_numba(monkeypatch):
    """box_table: find_objects' extents as an array (row k = label k + 1), missing labels empty."""
    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(7)
    labels = (rng.random((40, 57)) < 0.08) * rng.integers(1, 30, (40, 57))
    labels[labels == 13] = 0  # a missing label
    want = ndi.find_objects(labels)
    for numba_on in (True, False):
        monkeypatch.setattr(_compiled, "HAVE_NUMBA", numba_on)
        box = inst.box_table(labels.astype(np.int32))
        assert box.shape == (len(want), 4)
        for k, sl in enumerate(want):
            if sl is None:
                assert box[k, 1] <= box[k, 0], k
            else:
                assert tuple(box[k]) == (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop), k
    assert inst.box_table(np.zeros((3, 3), np.int32)).shape == (0, 4)


def test_owned_and_open_edges_from_box_tables_match_their_definitions():
    from wsi_mtl.postprocess import _extract as ex
    from wsi_mtl.postprocess._chunks import plan_chunks

    rng = np.random.default_rng(3)
    labels = ndi.label(rng.random((300, 300)) < 0.3)[0].astype(np.int32)
    labels[labels == 5] = 0
    slices = ndi.find_objects(labels)
    box = inst.box_table(labels)
    for chunk in plan_chunks((900, 900), chunk_px=200, halo_px=50)[:6]:
        oy, ox = chunk.read[0], chunk.read[2]
        y0, y1, x0, x1 = chunk.own
        owned = [i for i, sl in enumerate(slices, start=1)  # box start (map coordinates) in the own region
                 if sl is not None and y0 <= sl[0].start + oy < y1 and x0 <= sl[1].start + ox < x1]
        np.testing.assert_array_equal(ex._owned_boxes(box, chunk), owned)
        for margin in (1, 3):
            near = ex._near_open_edge(box, labels.shape, chunk, margin)
            top, bottom, left, right = chunk.open_edges
            for k, sl in enumerate(slices):
                if sl is not None:  # within margin px of a read edge that lies inside the map
                    want = ((top and sl[0].start < margin) or (bottom and sl[0].stop > 300 - margin)
                            or (left and sl[1].start < margin) or (right and sl[1].stop > 300 - margin))
                    assert near[k] == want and ex._touches_open_edge(sl, labels.shape, chunk, margin) == want


@pytest.mark.parametrize("clip", [False, True])
def test_compiled_tissue_counts_equal_the_array_version(monkeypatch, clip):
    """_in_tissue with the one-pass compiled counts keeps the same objects and clips the same
    pixels as the upsampled mask with bincounts, for regions reaching past the mask's end."""
    from types import SimpleNamespace

    from wsi_mtl.postprocess import _extract as ex

    _compiled = _kernels_here(monkeypatch)
    rng = np.random.default_rng(11)
    mask = rng.random((9, 12)) < 0.6
    reader = SimpleNamespace(mask=lambda: mask)
    meta = SimpleNamespace(mask_downsample=16.0)
    params = ex.PostprocessParams(min_in_tissue=0.5)
    for region in [(0, 50, 0, 60), (30, 90, 40, 110)]:  # the second runs past the mask
        labels = ndi.label(rng.random((region[1] - region[0], region[3] - region[2])) < 0.5)[0].astype(np.int32)
        ids = np.arange(1, labels.max() + 1)
        got = {}
        for numba_on in (True, False):
            monkeypatch.setattr(_compiled, "HAVE_NUMBA", numba_on)
            lab = labels.copy()
            got[numba_on] = (ex._in_tissue(reader, meta, params, lab, ids, region, 4.0, clip=clip), lab)
        np.testing.assert_array_equal(got[True][0], got[False][0])
        np.testing.assert_array_equal(got[True][1], got[False][1])
        assert 0 < len(got[True][0]) < len(ids)
        assert clip == (not np.array_equal(got[True][1], labels))


def test_cores_and_mean_probabilities_taken_a_few_rows_at_a_time_equal_the_whole_map() -> None:
    """core_mask and _mean_foreground work in steps of _MASK_ROWS rows (no full-size temporaries):
    on a map of many steps, the same mask and the same means as the whole-map expressions; and the
    same means from the map given in pieces cut anywhere (mean_foreground_of_pieces)."""
    rng = np.random.default_rng(3)
    h, w = 3 * inst._MASK_ROWS + 17, 90
    prob = rng.integers(0, 256, (3, h, w)).astype(np.uint8)
    labels = rng.integers(0, 40, (h, w)).astype(np.int32)
    whole = prob[1].astype(np.int16) - prob[2].astype(np.int16) > 0.3 * 255
    assert np.array_equal(inst.core_mask(prob, 0.3), whole)
    ids = np.arange(1, 40)
    fg = prob[1].astype(np.float64) + prob[2]
    want = np.array([fg[labels == i].mean() for i in ids]) / 255
    assert np.array_equal(inst._mean_foreground(labels, prob, ids), want)
    assert np.array_equal(inst._mean_foreground(labels, prob[1:], ids, length=60), want)
    for rows, cols in (([0, h], [0, w]), ([0, 1, h], [0, 89, w]), ([0, 100, 101, 2 * inst._MASK_ROWS + 5, h], [0, 30, 60, w]),
                       (sorted({0, h, *rng.integers(1, h, 6).tolist()}), sorted({0, w, *rng.integers(1, w, 3).tolist()}))):
        pieces = [((a, c), prob[1:, a:b, c:d]) for a, b in zip(rows[:-1], rows[1:]) for c, d in zip(cols[:-1], cols[1:])]
        assert np.array_equal(inst.mean_foreground_of_pieces(labels, pieces, ids, length=40), want)
    as_float = prob.astype(np.float32) / 255
    assert np.allclose(inst._mean_foreground(labels, as_float, ids), want)



def test_boxes_meeting_any_of_others_in_bounded_blocks_equal_the_pairwise_test() -> None:
    """_meeting_any (a gland chunk's early check of the glands that may hold an owned lumen) compares
    a bounded number of box pairs at a time: the same answer for every block size."""
    from wsi_mtl.postprocess._extract import _meeting_any

    rng = np.random.default_rng(0)

    def boxes(n: int) -> np.ndarray:
        y, x = rng.integers(0, 1000, n), rng.integers(0, 1000, n)
        return np.stack([y, y + rng.integers(1, 30, n), x, x + rng.integers(1, 30, n)], axis=1)

    box, others = boxes(300), boxes(500)
    want = np.array([((b[0] - 3 < others[:, 1]) & (b[1] + 3 > others[:, 0])
                      & (b[2] - 3 < others[:, 3]) & (b[3] + 3 > others[:, 2])).any() for b in box])
    assert 0 < want.sum() < len(box)
    for pairs in (1, 299, 1000, 1 << 22):
        assert np.array_equal(_meeting_any(box, others, 3, pairs=pairs), want)
    assert not _meeting_any(box, others[:0], 3).any()


def _hull_test_polygons(rng: np.random.Generator) -> list:
    """Random valid polygons on and off a half-pixel grid, with holes, collinear and repeated
    vertices, ties in y and x, slivers, and one multipolygon."""
    import shapely

    polys = []
    for k in range(600):
        scale = 0.5 if k % 2 else 1.97863  # on the half-pixel grid, and off it (a 0.2527 um/px slide)
        n = int(rng.integers(3, 40))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(2, 30, n) * (1 if k % 3 else rng.uniform(0.2, 1.0, n))  # some concave
        cx, cy = rng.integers(0, 4000, 2)
        pts = np.round(np.c_[cx + r * np.cos(ang), cy + r * np.sin(ang)] * 2) / 2 * scale
        poly = shapely.make_valid(shapely.Polygon(pts))
        if k % 5 == 0:
            poly = shapely.box(cx, cy, cx + 10, cy + 6).difference(shapely.box(cx + 2, cy + 2, cx + 4, cy + 4))  # a hole
        if k % 7 == 0:  # collinear and repeated vertices along the edges, ties in y and in x
            poly = shapely.Polygon([(cx, cy), (cx + 3, cy), (cx + 6, cy), (cx + 6, cy), (cx + 6, cy + 4), (cx, cy + 4), (cx, cy + 2)])
        polys.extend(shapely.get_parts(poly) if poly.geom_type != "Polygon" else [poly])
    polys.append(shapely.Polygon([(0, 0), (10, 0), (10, 1e-9), (0, 0)]))  # a sliver
    polys.append(shapely.Polygon())
    polys.append(shapely.MultiPolygon([shapely.box(0, 0, 2, 2), shapely.box(5, 5, 6, 9)]))
    return [p for p in polys if p.geom_type in ("Polygon", "MultiPolygon")]


def test_compiled_hull_areas_are_geos_hull_areas_bit_for_bit(monkeypatch):
    """Solidity's convex-hull areas from the compiled hull equal ``shapely.area(shapely.convex_hull(p))``
    exactly (the same float sums), and every measurement is the same with and without it."""
    import shapely

    from wsi_mtl.postprocess import _polygons

    if not _compiled.available():
        pytest.skip("numba not installed or switched off (WSIMTL_NO_NUMBA=1): shapely computes the hulls")
    polys = np.array(_hull_test_polygons(np.random.default_rng(7)), dtype=object)
    xy, idx = shapely.get_coordinates(shapely.get_exterior_ring(polys), return_index=True)
    got = _polygons._hull_areas(polys, xy, idx)
    want = shapely.area(shapely.convex_hull(polys))
    assert np.array_equal(got, want) and (want > 0).sum() > 500 and (want == 0).any()
    fast = _polygons.polygon_measurements(polys, mpp=0.25, shape_features=True)
    monkeypatch.setattr(_compiled, "available", lambda: False)
    plain = _polygons.polygon_measurements(polys, mpp=0.25, shape_features=True)
    for name in fast:
        np.testing.assert_array_equal(fast[name], plain[name], err_msg=name)
    assert np.isfinite(fast["solidity"]).sum() > 500
