"""Fused CPU kernels for decoding: a group's whole mixture in one compiled call (numba).

At decode a group's mixture is a few thousand multiply-adds, and eager torch spends most of
its time dispatching the ~10 small ops that compute it (on the 2-core CI machine about
100 us per group against about 12 us for the fused call; ``bench/fused_cpu.md``). For up
to :data:`MAX_ROWS` rows (B*T: single-stream and small-batch decoding) the float32 CPU
kernels of :mod:`hoe_core.routing.kernel` run these instead::

    gated_hidden:  h[i] = (A x_i) * (g_fixed[b] + sum_p softmax(z_p,i) M[b, p])   one call per group
    add_low_rank:  y[i] += h[i, span] B^T                                        one call per member

Larger inputs (prefill) stay on torch, whose GEMMs win there. The results equal the torch
path up to float32 rounding (the sums are reassociated); ``tests/test_fused_cpu.py``.
Set ``HOE_FUSED_CPU=0`` to turn them off (they are also off when numba is missing).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # optional: the torch path serves everything
    numba = None

MAX_ROWS = 4  # rows (B*T) up to which the fused kernels run; prefill stays on torch GEMMs
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; no finite-only assumption


def available() -> bool:
    """Whether the fused kernels can run here (numba importable, not turned off)."""
    return numba is not None and os.environ.get("HOE_FUSED_CPU", "1") != "0"


def _jit(fn):
    return numba.njit(cache=True, fastmath=_FASTMATH)(fn) if numba is not None else fn


@_jit
def gated_hidden(x, w, b, n_rank, starts, g_fixed, maps, seq, h):  # pragma: no cover - compiled
    """Gated low-rank activations of one group, routers live.

    x (n, in) rows of the input; w (R + S, in) the active A rows then the gates; b (R + S,);
    starts (P + 1,) offsets of the gate blocks in S (one softmax each); g_fixed (B, R) the
    expert anchors' weights per rank row; maps (B, S, R) router weight x one-hot (gate ->
    its expert's rank rows); seq = T (row i belongs to batch row i // T); h (n, R) out.
    """
    n, n_in = x.shape
    out = np.empty(w.shape[0], np.float32)
    for i in range(n):
        row = i // seq
        for k in range(w.shape[0]):
            acc = np.float32(0.0)
            for j in range(n_in):
                acc += w[k, j] * x[i, j]
            out[k] = acc + b[k]
        for r in range(n_rank):
            h[i, r] = g_fixed[row, r]
        for blk in range(starts.shape[0] - 1):
            lo = n_rank + starts[blk]
            hi = n_rank + starts[blk + 1]
            top = out[lo]
            for s in range(lo + 1, hi):
                top = max(top, out[s])
            total = np.float32(0.0)
            for s in range(lo, hi):
                out[s] = np.exp(out[s] - top)
                total += out[s]
            for s in range(lo, hi):
                p = out[s] / total
                for r in range(n_rank):
                    h[i, r] += p * maps[row, s - n_rank, r]
        for r in range(n_rank):
            h[i, r] *= out[r]


@_jit
def static_hidden(x, w, g, seq, h):  # pragma: no cover - compiled
    """h[i] = (A x_i) * g[i // seq]: no routers (g = ones when the weights are folded into A).
    x (n, in), w (R, in), g (B, R), h (n, R) out."""
    n, n_in = x.shape
    for i in range(n):
        row = i // seq
        for k in range(w.shape[0]):
            acc = np.float32(0.0)
            for j in range(n_in):
                acc += w[k, j] * x[i, j]
            h[i, k] = acc * g[row, k]


@_jit
def add_low_rank(h, lo, hi, b_t, y):  # pragma: no cover - compiled
    """y[i] += h[i, lo:hi] @ b_t, in place. h (n, R), b_t (hi - lo, out), y (n, out)."""
    for i in range(h.shape[0]):
        for r in range(lo, hi):
            c = h[i, r]
            for o in range(y.shape[1]):
                y[i, o] += c * b_t[r - lo, o]


class FusedGroup:
    """A kernel's weights as numpy views (shared memory, no copy) and the fused calls.

    Built from a :class:`~hoe_core.routing.kernel.Kernel` whose tensors are float32 on the
    CPU; the kernel keeps the tensors alive.
    """

    def __init__(self, kernel) -> None:
        self.weight = kernel.weight.numpy()  # (R [+ S], in)
        self.n_rank = kernel.n_rank or self.weight.shape[0]
        self.b_ts = [None if t is None else t.numpy() for t in kernel.b_ts]  # (R_m, out_m)
        self.spans = kernel.spans
        if kernel.maps is not None:
            self.bias = kernel.bias.numpy()
            self.starts = np.concatenate([[0], np.cumsum(kernel.sizes)]).astype(np.int64)
            self.g_fixed = np.ascontiguousarray(kernel.g_fixed[:, 0].numpy())  # (B, R)
            self.maps = np.ascontiguousarray(kernel.maps.numpy())  # (B, S, R)
        else:
            g = kernel.g_fixed[:, 0] if kernel.g_fixed is not None else torch.ones(1, self.n_rank)
            self.g_fixed = np.ascontiguousarray(g.numpy())  # (B, R); ones when folded into A
            self.maps = None

    @staticmethod
    def accepts(x3: torch.Tensor) -> bool:
        """Whether input x3 (B, T, in) goes to the fused path."""
        return (
            x3.shape[0] * x3.shape[1] <= MAX_ROWS
            and x3.dtype == torch.float32
            and not x3.requires_grad
            and x3.device.type == "cpu"
            and x3.is_contiguous()
        )

    def hidden(self, x3: torch.Tensor) -> np.ndarray:
        """h (B*T, R) for x3 (B, T, in) accepted by :meth:`accepts`."""
        bsz, seq, n_in = x3.shape
        x = x3.numpy().reshape(bsz * seq, n_in)
        h = np.empty((bsz * seq, self.n_rank), np.float32)
        if self.maps is None:
            static_hidden(x, self.weight, self.g_fixed, seq, h)
        else:
            gated_hidden(x, self.weight, self.bias, self.n_rank, self.starts, self.g_fixed, self.maps, seq, h)
        return h

    def add_delta(self, slot: int, h: np.ndarray, y: torch.Tensor) -> torch.Tensor:
        """y + h[:, span] B^T for member ``slot``, in place when y (..., out) allows it."""
        b_t = self.b_ts[slot]
        if b_t is None:
            return y
        lo, hi = self.spans[slot]
        if y.dtype == torch.float32 and not y.requires_grad and y.is_contiguous():
            add_low_rank(h, lo, hi, b_t, y.numpy().reshape(h.shape[0], -1))
            return y
        delta = torch.from_numpy(h[:, lo:hi] @ b_t)  # (B*T, out)
        return y + delta.view(y.shape).to(y.dtype)
