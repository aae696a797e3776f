"""Multi-task training (Cerberus-style partial labels) and evaluation on labelled tiles.

``run_recipe(load_recipe("configs/wsimtl-small.yaml"))`` rebuilds the shipped model stage by stage
(``wsimtl train`` on a recipe); ``train(load_config(path))`` runs one training config and exports a
model; ``evaluate_sources(model, data)`` computes the validation metrics.
"""

from ._config import DEFAULT_SOURCE_MPP, SOURCES, TrainConfig, load_config, load_split
from ._data import ClsItem, SegItem, Sources, load_sources, sample_cls, sample_seg
from ._evaluate import REFERENCE_IMAGES, reference_metrics, EVAL_TASKS, evaluate_split, glas_native_truth, heads_only, classify_image, evaluate_sources, format_table, instance_types, predict_image
from ._losses import masked_cross_entropy, masked_dice_loss, patch_loss, seg_loss
from ._loop import UNTRAINED_HEADS, Batch, TrainResult, compute_losses, export_model, load_initial_weights, retune_model, make_cls_batch, make_seg_batch, train, train_step
from ._tiles import load_tiles
from ._targets import FOREGROUND, IGNORE, binary_targets, inst_targets, split_touching, type_targets_from_points

__all__ = [
    "DEFAULT_SOURCE_MPP",
    "SOURCES",
    "TrainConfig",
    "load_tiles",
    "load_config",
    "load_split",
    "ClsItem",
    "SegItem",
    "Sources",
    "load_sources",
    "sample_cls",
    "sample_seg",
    "REFERENCE_IMAGES",
    "reference_metrics",
    "EVAL_TASKS",
    "evaluate_split",
    "glas_native_truth",
    "heads_only",
    "classify_image",
    "evaluate_sources",
    "format_table",
    "instance_types",
    "predict_image",
    "masked_cross_entropy",
    "masked_dice_loss",
    "patch_loss",
    "seg_loss",
    "UNTRAINED_HEADS",
    "Batch",
    "TrainResult",
    "compute_losses",
    "export_model",
    "retune_model",
    "load_initial_weights",
    "make_cls_batch",
    "make_seg_batch",
    "train",
    "train_step",
    "FOREGROUND",
    "IGNORE",
    "binary_targets",
    "inst_targets",
    "split_touching",
    "type_targets_from_points",
]
