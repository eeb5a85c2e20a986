"""Fused CPU kernels for decoding: a group's whole mixture in one compiled call (numba).

At decode a group's mixture is a few thousand multiply-adds, and eager torch spends most of
its time dispatching the ~10 small ops that compute it (on the 2-core CI machine about
100 us per attention group in situ, against about 45 us fused, most of it reading the
factors from memory; the whole-model effect is in ``bench/interleaved.md``). For up to
:data:`MAX_ROWS` rows (B*T: single-stream and small-batch decoding) the CPU kernels of
:mod:`hoe_core.routing.kernel` run these instead::

    gated_hidden:  h[i] = (A x_i) * (g_fixed[b] + sum_p softmax(z_p,i) M[b, p])   one call per group
    add_low_rank:  y[i] += h[i, span] B^T                                        one call per member

float32 and bfloat16 tensors are served (bfloat16 as its uint16 bit patterns, widened to
float32 row by row; the sums run in float32 and y is rounded to nearest even once).
Larger inputs (prefill) stay on torch, whose GEMMs win there. The results equal the torch
path up to rounding (the sums are reassociated); ``tests/test_fused_cpu.py``. Set
``HOE_FUSED_CPU=0`` to turn them off (they are also off when numba is missing).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
    from numba import types
    from numba.extending import overload
except ImportError:  # optional: the torch path serves everything
    numba = None

MAX_ROWS = 4  # rows (B*T) up to which the fused kernels run; prefill stays on torch GEMMs
DTYPES = (torch.float32, torch.bfloat16)  # tensor dtypes the kernels read and write
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; no finite-only assumption


def available() -> bool:
    """Whether the fused kernels can run here (numba importable, not turned off)."""
    return numba is not None and os.environ.get("HOE_FUSED_CPU", "1") != "0"


def _jit(fn):
    return numba.njit(cache=True, fastmath=_FASTMATH)(fn) if numba is not None else fn


# Row access, chosen by dtype when a kernel is compiled: float32 rows are read in place,
# bfloat16 rows (uint16 bit patterns) are widened into a float32 buffer.
def as_f32(row, buf):  # pragma: no cover - replaced inside compiled code
    """``row`` as float32: itself, or its bfloat16 bits widened into ``buf``."""
    raise NotImplementedError


def store_f32(values, row):  # pragma: no cover - replaced inside compiled code
    """row[:] = values (float32), rounded to bfloat16 (nearest even) when row holds bits."""
    raise NotImplementedError


if numba is not None:

    @overload(as_f32, jit_options={"cache": True})
    def _as_f32(row, buf):
        if row.dtype == types.uint16:

            def widen(row, buf):
                bits = buf.view(np.uint32)
                for j in range(row.shape[0]):
                    bits[j] = np.uint32(row[j]) << np.uint32(16)
                return buf

            return widen
        return lambda row, buf: row

    @overload(store_f32, jit_options={"cache": True})
    def _store_f32(values, row):
        if row.dtype == types.uint16:

            def narrow(values, row):
                bits = values.view(np.uint32)
                for j in range(row.shape[0]):
                    u = bits[j]
                    row[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16)

            return narrow

        def copy(values, row):
            row[:] = values

        return copy


@_jit
def _project(x_row, w, w_buf, out):  # pragma: no cover - compiled
    """out[k] = w[k] . x_row for every row k of w. x_row (in,) float32; w (K, in) float32 or
    bfloat16 bits (widened row by row into w_buf (in,)); out (K,) float32."""
    for k in range(w.shape[0]):
        wk = as_f32(w[k], w_buf)
        acc = np.float32(0.0)
        for j in range(x_row.shape[0]):
            acc += wk[j] * x_row[j]
        out[k] = acc


@_jit
def gated_hidden(x, w, b, n_rank, starts, g_fixed, maps, seq, h):  # pragma: no cover - compiled
    """Gated low-rank activations of one group, routers live.

    x (n, in) rows of the input; w (R + S, in) the active A rows then the gates; b (R + S,);
    starts (P + 1,) offsets of the gate blocks in S (one softmax each); g_fixed (B, R) the
    expert anchors' weights per rank row; maps (B, S, R) router weight x one-hot (gate ->
    its expert's rank rows); seq = T (row i belongs to batch row i // T); h (n, R) out.
    x and w float32 or bfloat16 bits; the rest float32.
    """
    n, n_in = x.shape
    out = np.empty(w.shape[0], np.float32)
    x_buf = np.empty(n_in, np.float32)
    w_buf = np.empty(n_in, np.float32)
    for i in range(n):
        row = i // seq
        _project(as_f32(x[i], x_buf), w, w_buf, out)
        for k in range(w.shape[0]):
            out[k] += b[k]
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
    x (n, in), w (R, in) float32 or bfloat16 bits; g (B, R), h (n, R) out float32."""
    n, n_in = x.shape
    x_buf = np.empty(n_in, np.float32)
    w_buf = np.empty(n_in, np.float32)
    for i in range(n):
        _project(as_f32(x[i], x_buf), w, w_buf, h[i])
        for k in range(w.shape[0]):
            h[i, k] *= g[i // seq, k]


@_jit
def add_low_rank(h, lo, hi, b_t, y):  # pragma: no cover - compiled
    """y[i] += h[i, lo:hi] @ b_t, in place, summed in float32. h (n, R) float32; b_t
    (hi - lo, out) and y (n, out) float32 or bfloat16 bits."""
    n_out = y.shape[1]
    acc = np.empty(n_out, np.float32)
    y_buf = np.empty(n_out, np.float32)
    b_buf = np.empty(n_out, np.float32)
    for i in range(h.shape[0]):
        acc[:] = as_f32(y[i], y_buf)
        for r in range(lo, hi):
            c = h[i, r]
            b_r = as_f32(b_t[r - lo], b_buf)
            for o in range(n_out):
                acc[o] += c * b_r[o]
        store_f32(acc, y[i])


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a float32 tensor, or of a bfloat16 tensor's uint16 bit patterns."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.float().numpy())


class FusedGroup:
    """A kernel's factors as numpy views (shared memory, no copy) and the fused calls.

    Built from a :class:`~hoe_core.routing.kernel.Kernel` whose tensors are float32 or
    bfloat16 on the CPU (the kernel keeps them alive); the small per-preference maps are
    held as float32 copies.
    """

    def __init__(self, kernel) -> None:
        self.weight = _bits(kernel.weight)  # (R [+ S], in)
        self.n_rank = kernel.n_rank or self.weight.shape[0]
        self.b_ts = [None if t is None else _bits(t) for t in kernel.b_ts]  # (R_m, out_m)
        self.b_ts_torch = kernel.b_ts  # for outputs the kernels do not write
        self.spans = kernel.spans
        if kernel.maps is not None:
            self.bias = _f32(kernel.bias)
            self.starts = np.concatenate([[0], np.cumsum(kernel.sizes)]).astype(np.int64)
            self.g_fixed = _f32(kernel.g_fixed[:, 0])  # (B, R)
            self.maps = _f32(kernel.maps)  # (B, S, R)
        else:
            g = kernel.g_fixed[:, 0] if kernel.g_fixed is not None else torch.ones(1, self.n_rank)
            self.g_fixed = _f32(g)  # (B, R); ones when the weights are folded into A
            self.maps = None

    @staticmethod
    def accepts(x3: torch.Tensor) -> bool:
        """Whether input x3 (B, T, in) goes to the fused path."""
        return (
            x3.shape[0] * x3.shape[1] <= MAX_ROWS
            and x3.dtype in DTYPES
            and not x3.requires_grad
            and x3.device.type == "cpu"
            and x3.is_contiguous()
        )

    def hidden(self, x3: torch.Tensor) -> np.ndarray:
        """h (B*T, R) float32 for x3 (B, T, in) accepted by :meth:`accepts`."""
        bsz, seq, n_in = x3.shape
        x = _bits(x3).reshape(bsz * seq, n_in)
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
        if y.dtype in DTYPES and not y.requires_grad and y.is_contiguous() and y.device.type == "cpu":
            add_low_rank(h, lo, hi, b_t, _bits(y).reshape(h.shape[0], -1))
            return y
        delta = torch.from_numpy(np.ascontiguousarray(h[:, lo:hi])) @ self.b_ts_torch[slot].float()
        return y + delta.view(y.shape).to(y.dtype)  # (B*T, out) -> y's shape and dtype


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load from numba's on-disk cache) the kernels for ``dtype`` tensors now, so
    the first decode step of a served model does not pay for it. A no-op when unavailable."""
    if not available() or dtype not in DTYPES:
        return
    t = torch.zeros(2, 2, dtype=dtype)
    x, w, y = _bits(t), _bits(t), _bits(t.clone())
    h = np.zeros((2, 2), np.float32)
    gate_w, bias = _bits(torch.zeros(3, 2, dtype=dtype)), np.zeros(3, np.float32)
    starts, maps = np.array([0, 1], np.int64), np.zeros((1, 1, 2), np.float32)
    gated_hidden(x, gate_w, bias, 2, starts, h[:1].copy(), maps, 2, h)
    static_hidden(x, w, h, 2, h)
    add_low_rank(h, 0, 2, w, y)
