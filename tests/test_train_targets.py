"""Targets and masked losses on tiny hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_mtl.train import (
    FOREGROUND,
    IGNORE,
    binary_targets,
    inst_targets,
    masked_cross_entropy,
    masked_dice_loss,
    patch_loss,
    seg_loss,
    split_touching,
    type_targets_from_points,
)


# ---- targets -----------------------------------------------------------------------------------
def test_inst_targets_square_erosion_3x3():
    lab = np.zeros((6, 6), np.int32)
    lab[1:5, 1:5] = 3  # a 4x4 object: 3x3 erosion leaves its central 2x2
    t = inst_targets(lab, erosion_px=3)
    expected = np.zeros((6, 6), np.uint8)
    expected[1:5, 1:5] = 2
    expected[2:4, 2:4] = 1
    np.testing.assert_array_equal(t, expected)


def test_touching_objects_are_separated_by_boundary():
    lab = np.zeros((5, 8), np.int32)
    lab[:, :4] = 1
    lab[:, 4:] = 2  # two objects sharing the edge between columns 3 and 4, touching the array edge
    t = inst_targets(lab, erosion_px=3)
    # Columns 3 and 4 (the contact) are boundary; the array edges do not erode the objects.
    assert (t[:, 3] == 2).all() and (t[:, 4] == 2).all()
    assert (t[:, :3] == 1).all() and (t[:, 5:] == 1).all()


def test_gland_erosion_11x11():
    lab = np.zeros((15, 15), np.int32)
    lab[1:14, 1:14] = 1  # 13x13 object: an 11x11 window fits only around the central 3x3
    t = inst_targets(lab, erosion_px=11)
    assert (t == 1).sum() == 9 and (t[6:9, 6:9] == 1).all()
    assert (t == 2).sum() == 13 * 13 - 9
    assert (t[0] == 0).all()


def test_inst_targets_errors():
    with pytest.raises(ValueError, match="odd"):
        inst_targets(np.zeros((3, 3), int), erosion_px=4)
    with pytest.raises(TypeError, match="integer"):
        inst_targets(np.zeros((3, 3), float))
    with pytest.raises(ValueError, match="2-D"):
        inst_targets(np.zeros((3, 3, 1), int))


def test_binary_targets():
    m = np.array([[0, 1], [1, 0]])
    np.testing.assert_array_equal(binary_targets(m), [[0, FOREGROUND], [FOREGROUND, 0]])


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return [(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 for cy, cx in centres]


def test_split_touching_cuts_overlapping_discs_at_their_neck():
    a, b, c = _discs((20, 48), [(10, 9), (10, 19), (10, 38)], 6)  # a and b overlap; c stands alone
    lab = split_touching(a | b | c)
    assert lab.dtype == np.int32 and set(np.unique(lab)) == {0, 1, 2, 3}
    # every pixel of the union is labelled, nothing outside it
    np.testing.assert_array_equal(lab > 0, a | b | c)
    # each disc centre is its own object, and the cut lies at the neck (column 14)
    assert len({lab[10, 9], lab[10, 19], lab[10, 38]}) == 3
    assert lab[10, 11] == lab[10, 9] and lab[10, 17] == lab[10, 19]
    # the split separates them by a boundary band in the 3-class target
    t = inst_targets(lab, erosion_px=3)
    assert (t[10, 13:16] == 2).any() and t[10, 9] == 1 and t[10, 19] == 1


def test_split_touching_keeps_thin_and_small_blobs_whole():
    m = np.zeros((12, 30), bool)
    m[5, 2:20] = True  # a one-pixel line: no distance maximum stands h above its neighbours
    m[8:10, 24:26] = True  # a 2x2 blob
    lab = split_touching(m, h=0.5)
    np.testing.assert_array_equal(lab > 0, m)
    assert lab.max() == 2 and len(np.unique(lab[5, 2:20])) == 1


def test_split_touching_larger_h_merges_a_shallow_bump():
    (a,) = _discs((20, 40), [(10, 12)], 7)
    (b,) = _discs((20, 40), [(10, 22)], 4)  # the small disc's distance peak rises ~1 px above the neck
    assert split_touching(a | b, h=0.5).max() == 2
    assert split_touching(a | b, h=2.0).max() == 1


def test_split_touching_errors():
    with pytest.raises(ValueError, match="2-D"):
        split_touching(np.zeros((3, 3, 1), bool))
    with pytest.raises(ValueError, match="h must be"):
        split_touching(np.zeros((3, 3), bool), h=0)
    assert split_touching(np.zeros((4, 4), bool)).max() == 0


def test_type_targets_from_points_disks_ignore_and_background():
    pts = np.array([[5.0, 5.0], [5.0, 30.0]])
    t = type_targets_from_points((11, 40), pts, np.array([3, 0]), radius_px=2, background_px=6)
    assert t[5, 5] == 3 and t[5, 7] == 3 and t[7, 5] == 3  # within 2 px
    assert t[5, 8] == IGNORE  # 3 px: neither disk nor background
    assert t[5, 30] == IGNORE  # point without class: ignored disk
    assert t[5, 18] == 0  # 13 px from both points: background
    assert type_targets_from_points((3, 3), np.zeros((0, 2)), np.zeros(0, int)).max() == 0
    with pytest.raises(ValueError, match="classes"):
        type_targets_from_points((3, 3), pts, np.array([1]))


# ---- losses ------------------------------------------------------------------------------------
def _logits_for(target: np.ndarray, c: int, scale: float = 30.0) -> torch.Tensor:
    t = torch.from_numpy(np.where(target < c, target, 0).astype(np.int64))
    return (torch.nn.functional.one_hot(t, c).permute(0, 3, 1, 2).float() * scale).requires_grad_(True)


def test_losses_zero_where_everything_is_masked():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE, dtype=torch.uint8)
    for fn in (masked_cross_entropy, masked_dice_loss, seg_loss):
        loss = fn(logits, target)
        assert float(loss.detach()) == 0.0
        loss.backward()  # a graph exists, gradients are zero
        assert float(logits.grad.abs().sum()) == 0.0
        logits.grad = None
    assert float(patch_loss(torch.randn(3, 4, 1, 1), torch.tensor([-1, -1, -1]))) == 0.0


def test_perfect_prediction_gives_near_zero_loss():
    target = np.random.default_rng(0).integers(0, 3, size=(2, 8, 8)).astype(np.uint8)
    target[0, :2] = IGNORE
    logits = _logits_for(target, 3)
    t = torch.from_numpy(target)
    assert float(masked_cross_entropy(logits, t).detach()) < 1e-6
    assert float(masked_dice_loss(logits, t).detach()) < 1e-3
    wrong = _logits_for((target + 1) % 3, 3)
    assert float(masked_dice_loss(wrong, t).detach()) > 0.9


def test_ignored_pixels_do_not_change_the_loss():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, size=(1, 6, 6)).astype(np.uint8)
    target[0, :3] = IGNORE
    t = torch.from_numpy(target)
    a = torch.randn(1, 3, 6, 6)
    b = a.clone()
    b[..., :3, :] = torch.randn(1, 3, 3, 6) * 10  # change only ignored pixels
    assert float(seg_loss(a, t)) == pytest.approx(float(seg_loss(b, t)), rel=1e-6)


def test_foreground_label_accepts_interior_or_boundary():
    target = torch.full((1, 2, 2), FOREGROUND, dtype=torch.uint8)
    target[0, 0, 0] = 0
    as_interior = _logits_for(np.array([[[0, 1], [1, 1]]]), 3)
    as_boundary = _logits_for(np.array([[[0, 2], [2, 2]]]), 3)
    as_background = _logits_for(np.array([[[0, 0], [0, 0]]]), 3)
    for good in (as_interior, as_boundary):
        assert float(masked_cross_entropy(good, target).detach()) < 1e-6
        assert float(masked_dice_loss(good, target).detach()) < 1e-3
    assert float(masked_cross_entropy(as_background, target).detach()) > 10


def test_patch_loss_uses_labelled_samples_only():
    logits = torch.tensor([[5.0, -5.0], [0.0, 0.0]]).view(2, 2, 1, 1)
    assert float(patch_loss(logits, torch.tensor([0, -1]))) < 1e-3
    assert float(patch_loss(logits, torch.tensor([0, 1]))) == pytest.approx((float(torch.log1p(torch.exp(torch.tensor(-10.0)))) + np.log(2)) / 2, rel=1e-4)
