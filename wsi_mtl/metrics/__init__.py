"""Evaluation metrics as pure numpy functions: instances, GlaS objects, classification, points."""

from ._classification import accuracy, confusion_matrix, f1_per_class, macro_f1
from ._gland import GlandScores, gland_scores, hausdorff_distance, object_dice, object_f1, object_hausdorff
from ._instance import InstanceErrors, PanopticQuality, aji, dice_score, instance_errors, pair_overlaps, panoptic_quality
from ._points import PointTypeScores, match_points, point_type_scores

__all__ = [
    "accuracy",
    "confusion_matrix",
    "f1_per_class",
    "macro_f1",
    "GlandScores",
    "gland_scores",
    "hausdorff_distance",
    "object_dice",
    "object_f1",
    "object_hausdorff",
    "InstanceErrors",
    "PanopticQuality",
    "aji",
    "instance_errors",
    "dice_score",
    "pair_overlaps",
    "panoptic_quality",
    "PointTypeScores",
    "match_points",
    "point_type_scores",
]
