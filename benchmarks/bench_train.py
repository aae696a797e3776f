"""Where a training step's time goes: making batches against the optimisation step, fp32 against bf16.

Usage (run it niced on a shared machine; needs the data the config names)::

    nice -n 10 python benchmarks/bench_train.py configs/wsimtl-small-stage14.yaml
    nice -n 10 python benchmarks/bench_train.py configs/wsimtl-small.yaml --task gland --steps 10

Builds the network a run of the config would build (from its ``init_from`` weights, with its
``trainable`` parts), draws ``--steps`` batches of one schedule entry, and times, in the same run,
batch making (crop, resample, flips, targets) and ``train_step`` (photometric augmentation,
forward, backward, AdamW) with bf16 autocast off and on. Prints the share of batch making and the
bf16 / fp32 step-time ratio (above 1 where the CPU emulates bf16). The first two steps of each
precision are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from wsi_mtl.devices import cpu_has_bf16
from wsi_mtl.network import create_model
from wsi_mtl.train import load_config, load_initial_weights, make_seg_batch, train_step
from wsi_mtl.train._config import _SEG_TASKS
from wsi_mtl.train._loop import _initial_config, _read_initial, _trainable, _training_sources

WARMUP = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a training config (YAML)")
    ap.add_argument("--task", default=None, help="schedule entry to draw batches of (default: the config's first segmentation entry)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per precision (default 20)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    task = args.task or next((e for e in cfg.schedule if e in _SEG_TASKS), None)
    if task not in _SEG_TASKS:
        raise SystemExit(f"--task must be a segmentation task among {list(_SEG_TASKS)}, got {task!r}")
    torch.set_num_threads(args.threads or cfg.threads or torch.get_num_threads())
    initial = _read_initial(cfg.init_from) if cfg.init_from is not None else None
    model = create_model(_initial_config(cfg, initial[0] if initial else None), seed=cfg.seed)
    if initial:
        load_initial_weights(model, cfg.init_from, initial=initial)
    model.set_channels_last(cfg.channels_last)
    data = _training_sources(cfg, model, tasks=[task])
    patch_heads = list(model.config.patch_heads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(_trainable(model, cfg.trainable), lr=1e-5)  # small: the weights barely move

    times: dict[bool, tuple[float, float]] = {}
    for bf16 in (False, True):
        step_cfg = replace(cfg, bf16=bf16)
        t_batch = t_step = 0.0
        for i in range(WARMUP + args.steps):
            t0 = time.perf_counter()
            batch = make_seg_batch(rng, data, step_cfg, patch_heads, task=task)
            t1 = time.perf_counter()
            train_step(model, optimizer, batch, generator=gen, cfg=step_cfg)
            t2 = time.perf_counter()
            if i >= WARMUP:
                t_batch += t1 - t0
                t_step += t2 - t1
        times[bf16] = (t_batch / args.steps, t_step / args.steps)
        print(f"{'bf16' if bf16 else 'fp32'}: batch making {times[bf16][0]:.3f} s, train_step {times[bf16][1]:.3f} s per step "
              f"({task}, {args.steps} steps, {torch.get_num_threads()} threads)")
    b, s = times[False]
    print(f"batch making share of a fp32 step: {b / (b + s):.1%}")
    print(f"bf16 / fp32 train_step time: {times[True][1] / s:.2f} (native bf16 on this CPU: {cpu_has_bf16()})")


if __name__ == "__main__":
    main()
