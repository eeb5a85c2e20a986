"""The scale-out path: the same loops, one process or many under ``accelerate launch``.

    sampling   chunks split between processes (each chunk seeded by its index: the cache
               is identical for any number of processes)
    DPO        trl's Trainer is accelerate-native (DDP); only the main process saves
    routers    each process takes its share of a step's prompts; the batch's mean rewards
               (for OMD) and the gate gradients are averaged across processes
    writes     cache files, router files and the bundle are written by the main process

On GPUs: ``accelerate launch --multi_gpu --num_processes 8 -m hoe_core build --recipe ...``.
On CPUs, the same launcher with ``--multi_gpu`` starts the processes (torchrun) and
:func:`state` picks the gloo backend because no CUDA device is present.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def state():
    """The process group of this run (a single process when not launched by accelerate)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return state().is_main_process


def barrier() -> None:
    state().wait_for_everyone()


def mean_across(values: np.ndarray) -> np.ndarray:
    """Average a float array over processes (identity for a single process). Same shape."""
    s = state()
    if s.num_processes == 1:
        return np.asarray(values, float)
    from accelerate.utils import reduce

    t = torch.as_tensor(np.asarray(values, np.float64), device=s.device)
    return reduce(t, reduction="mean").cpu().numpy()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` in place, like DDP does for a module."""
    s = state()
    if s.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= s.num_processes
