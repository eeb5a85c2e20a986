"""Fused CPU kernel for decoding: a sibling group's whole step in one compiled call (numba).

At decode a group's mixture is a few thousand multiply-adds. Eager torch spends most of its
time dispatching the ~10 small ops that compute it, and a torch -> numpy view per tensor
costs more than a small member's arithmetic. For up to :data:`MAX_ROWS` rows (B*T:
single-stream and small-batch decoding) the CPU kernels of :mod:`hoe_core.routing.kernel`
run one call per group and step instead, reading the input and writing the members' base
outputs by address::

    h[i]   = (A x_i) * (g_fixed[b] + sum_p softmax(z_p,i) M[b, p])     the group's gated h
    y_m[i] += h[i, span_m] B_m^T                                        every member m, in place

What remains is reading the factors from memory (about 45 MB per token for the shipped
bundle), so they are kept as compactly as they are exact: float32 factors that are float16
values (the shipped bundles store float16) are held as float16 and widened in the loop
(``vcvtph2ps``), halving the bytes; bfloat16 models keep bfloat16. Activations are float32
or bfloat16 (as uint16 bit patterns, widened row by row; the sums run in float32 and y is
rounded to nearest even once). Larger inputs (prefill) keep torch's GEMMs, which win
there (bfloat16 models on a CPU without bfloat16 units compute them in float32, see
:func:`hoe_core.routing.kernel.native_bfloat16`); the routers' gating between
them (softmax, maps, product: five small torch ops per group) is one compiled call,
:func:`gate_rows`, in place. The results equal the torch path up to rounding (the sums are
reassociated); ``tests/test_fused_cpu.py``. Set ``HOE_FUSED_CPU=0`` to turn the kernel
off (it is also off when numba is missing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload
except ImportError:  # optional: the torch path serves everything
    numba = None

MAX_ROWS = 4  # rows (B*T) up to which the fused kernel runs; prefill stays on torch GEMMs
DTYPES = (torch.float32, torch.bfloat16)  # tensor dtypes the kernel reads and writes
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; no finite-only assumption


def available() -> bool:
    """Whether the fused kernel can run here (numba importable, not turned off)."""
    return numba is not None and os.environ.get("HOE_FUSED_CPU", "1") != "0"


def _jit(fn):
    # nogil: the kernels touch only arrays, so request threads (routing is per thread) run
    # them side by side
    return numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(fn) if numba is not None else fn


# Storage formats, told apart by numpy dtype inside compiled code: float32 as is, bfloat16
# as uint16 bit patterns, float16 as int16 bit patterns (numba has no float16 arrays).
def widen(value):  # pragma: no cover - replaced inside compiled code
    """One stored element as float32 (exact for all three formats)."""
    raise NotImplementedError


def as_f32(row, buf):  # pragma: no cover - replaced inside compiled code
    """An activation ``row`` as float32: itself, or its bfloat16 bits widened into ``buf``."""
    raise NotImplementedError


def store_f32(values, row):  # pragma: no cover - replaced inside compiled code
    """row[:] = values (float32), rounded to bfloat16 (nearest even) when row holds bits."""
    raise NotImplementedError


if numba is not None:

    @intrinsic
    def _widen(typingctx, value):
        i32 = ir.IntType(32)

        def same(context, builder, signature, args):
            return args[0]

        def bfloat16(context, builder, signature, args):
            bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
            return builder.bitcast(bits, ir.FloatType())

        def float16(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        codegen = {types.float32: same, types.uint16: bfloat16, types.int16: float16}.get(value)
        return (types.float32(value), codegen) if codegen is not None else None

    @overload(widen, jit_options={"cache": True})
    def _widen_overload(value):
        return lambda value: _widen(value)

    @overload(as_f32, jit_options={"cache": True})
    def _as_f32(row, buf):
        if row.dtype == types.uint16:

            def widen_row(row, buf):
                for j in range(row.shape[0]):
                    buf[j] = _widen(row[j])
                return buf

            return widen_row
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

    @intrinsic
    def _address(typingctx, addr):
        """An integer address as a ``void*`` (for ``numba.carray`` views of torch tensors)."""

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(addr), codegen


@_jit
def gate_row(out, b_row, n_rank, starts, g_fixed, maps, g, h_row):  # pragma: no cover - compiled
    """One row's gated h from its logits: h_row = out[:R] * g with
    g = g_fixed[b_row] + sum_p softmax(out[R + block p]) maps[b_row, block p].

    out (R + S,) float32: A x, then the gate logits (overwritten by their softmax); b_row
    the row's batch row; starts, g_fixed, maps as in :func:`hidden_rows`; g (R,) float32
    scratch; h_row (R,) float32 out, which may be ``out[:R]`` itself (in place).
    """
    for r in range(n_rank):
        g[r] = g_fixed[b_row, r]
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
                g[r] += p * maps[b_row, s - n_rank, r]
    for r in range(n_rank):
        h_row[r] = out[r] * g[r]


@_jit
def hidden_rows(x, w, b, n_rank, starts, g_fixed, maps, seq, h):  # pragma: no cover - compiled
    """Gated low-rank activations of one group.

    x (n, in) rows of the input, float32 or bfloat16 bits; w (R + S, in) the active A rows
    then the gates, in any storage format; b (R + S,); starts (P + 1,) offsets of the gate
    blocks in S (one softmax each; [0] without routers); g_fixed (B, R) the expert anchors'
    weights per rank row; maps (B, S, R) router weight x one-hot (gate -> its expert's rank
    rows); seq = T (row i belongs to batch row i // T); h (n, R) out. b, g_fixed, maps and
    h float32.
    """
    n, n_in = x.shape
    out = np.empty(w.shape[0], np.float32)
    g = np.empty(n_rank, np.float32)
    x_buf = np.empty(n_in, np.float32)
    for i in range(n):
        x_row = as_f32(x[i], x_buf)
        for k in range(w.shape[0]):
            acc = np.float32(0.0)
            for j in range(n_in):
                acc += widen(w[k, j]) * x_row[j]
            out[k] = acc + b[k]
        gate_row(out, i // seq, n_rank, starts, g_fixed, maps, g, h[i])


@_jit
def _gating(floats, layout):  # pragma: no cover - compiled
    """Views of a group's packed arrays (:class:`FusedGroup`): the bias (R + S,), g_fixed
    (B, R) and maps (B, S, R) from ``floats``; R and the gate block offsets from ``layout``."""
    rows, n_rank, n_starts = layout[0], layout[2], layout[3]
    starts = layout[5 : 5 + n_starts]
    n_gates = rows - n_rank
    n_batch = (floats.shape[0] - rows) // (n_rank + n_gates * n_rank)
    g_end = rows + n_batch * n_rank
    g_fixed = floats[rows:g_end].reshape((n_batch, n_rank))
    maps = floats[g_end:].reshape((n_batch, n_gates, n_rank))
    return floats[:rows], n_rank, starts, g_fixed, maps


@_jit
def gate_rows(z_addr, n, width, seq, floats, layout):  # pragma: no cover - compiled
    """Prefill's gating, in place: rows (n, R + S) float32 at ``z_addr`` hold A x, then the
    gate logits plus their biases (one torch GEMM made them); each row's first R columns
    become its gated h (:func:`gate_row`). seq = T as in :func:`hidden_rows`; floats and
    layout a :class:`FusedGroup`'s packed arrays."""
    _, n_rank, starts, g_fixed, maps = _gating(floats, layout)
    z = numba.carray(_address(z_addr), (n, width), np.float32)
    g = np.empty(n_rank, np.float32)
    for i in range(n):
        gate_row(z[i], i // seq, n_rank, starts, g_fixed, maps, g, z[i, :n_rank])


@_jit
def add_low_rank(h, lo, hi, b_t, y):  # pragma: no cover - compiled
    """y[i] += h[i, lo:hi] @ b_t, in place, summed in float32. h (n, R) float32; b_t
    (hi - lo, out) in any storage format; y (n, out) float32 or bfloat16 bits."""
    n_out = y.shape[1]
    acc = np.empty(n_out, np.float32)
    y_buf = np.empty(n_out, np.float32)
    for i in range(h.shape[0]):
        acc[:] = as_f32(y[i], y_buf)
        for r in range(lo, hi):
            c = h[i, r]
            for o in range(n_out):
                acc[o] += c * widen(b_t[r - lo, o])
        store_f32(acc, y[i])


@_jit
def group_step(io, x_addr, n, seq, flat, floats, layout, y_addrs):  # pragma: no cover - compiled
    """One decode step of a sibling group in one call: h (n, R), then every member's delta.

    io: an empty array of the activations' dtype (float32, or uint16 for bfloat16);
    x_addr: address of the input rows (n, in); seq = T as in :func:`hidden_rows`; flat,
    floats, layout: a :class:`FusedGroup`'s packed arrays (the factors in storage format,
    the float32 bias and gating maps, the int64 sizes and member table: three arrays for
    the dispatcher to check instead of eight); y_addrs (M,) int64: address of member m's
    base output (n, out_m), to add its delta to in place, or 0 to leave it (the caller
    adds it).
    """
    rows, n_in, n_starts, n_members = layout[0], layout[1], layout[3], layout[4]
    members = layout[5 + n_starts : 5 + n_starts + 4 * n_members].reshape((n_members, 4))
    w = flat[: rows * n_in].reshape((rows, n_in))
    b_flat = flat[rows * n_in :]
    b, n_rank, starts, g_fixed, maps = _gating(floats, layout)
    x = numba.carray(_address(x_addr), (n, n_in), io.dtype)
    h = np.empty((n, n_rank), np.float32)
    hidden_rows(x, w, b, n_rank, starts, g_fixed, maps, seq, h)
    for m in range(n_members):
        off, lo, hi, n_out = members[m, 0], members[m, 1], members[m, 2], members[m, 3]
        if hi > lo and y_addrs[m] != 0:
            y = numba.carray(_address(y_addrs[m]), (n, n_out), io.dtype)
            add_low_rank(h, lo, hi, b_flat[off : off + (hi - lo) * n_out].reshape((hi - lo, n_out)), y)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a float32 tensor, or of a bfloat16 tensor's uint16 bit patterns."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def exact_in_half(t: torch.Tensor) -> bool:
    """Whether ``t`` is float32 holding float16 values: then :meth:`Factors.pack` keeps it
    as float16, half the bytes each decode step reads."""
    return t.dtype == torch.float32 and torch.equal(t.half().float(), t)


def _stored(t: torch.Tensor, half: bool) -> np.ndarray:
    """A CPU factor tensor in storage format: float16 bits (int16) when ``half``, else
    :func:`_bits` of it."""
    return t.half().view(torch.int16).numpy() if half else _bits(t.contiguous())


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.float().numpy())


@dataclass
class Factors:
    """A group's factors for one active set (preference-independent), packed for the
    compiled calls.

    flat: the stacked weight (R + S, in) -- the active A rows, then the gates -- then each
    member's B^T (R_m, out_m), flattened in turn, in storage format; bias (R + S,) float32:
    zeros, then the gate biases; layout int64: [R + S, in, R, P + 1, M], the gate block
    offsets in S (P + 1; [0] without routers), then per member its offset in the B^T part,
    its rank columns [lo, hi) of h and out_m (M x 4). ``weight`` and ``members`` are views
    of these.
    """

    flat: np.ndarray
    bias: np.ndarray
    layout: np.ndarray

    @classmethod
    def pack(
        cls,
        weight: torch.Tensor,
        b_ts: list,
        spans: list[tuple[int, int]],
        bias: torch.Tensor | None = None,
        sizes: Sequence[int] = (),
    ) -> Factors:
        """From a group's stacked weight (R + S, in), its members' B^T (R_m, out_m) (None:
        no active expert), their rank columns of h, and with routers the stacked bias
        (R + S,) and the gate block sizes (one softmax each)."""
        b_ts = [torch.zeros(0, dtype=weight.dtype) if t is None else t for t in b_ts]
        b_flat = torch.cat([t.flatten() for t in b_ts])
        offsets = np.cumsum([0] + [t.numel() for t in b_ts])
        members = [
            (off, lo, hi, t.shape[-1] if hi > lo else 0) for off, (lo, hi), t in zip(offsets, spans, b_ts)
        ]
        half = exact_in_half(weight) and exact_in_half(b_flat)  # float32 holding float16 values
        rows, n_in = weight.shape
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        head = [rows, n_in, rows - int(starts[-1]), len(starts), len(members)]
        return cls(
            np.concatenate([_stored(weight, half).ravel(), _stored(b_flat, half)]),
            np.zeros(rows, np.float32) if bias is None else _f32(bias),
            np.concatenate([head, starts, np.array(members, np.int64).ravel()]).astype(np.int64),
        )

    @property
    def weight(self) -> np.ndarray:  # (R + S, in)
        rows, n_in = self.layout[:2]
        return self.flat[: rows * n_in].reshape(rows, n_in)

    @property
    def members(self) -> np.ndarray:  # (M, 4)
        lo = 5 + self.layout[3]
        return self.layout[lo : lo + 4 * self.layout[4]].reshape(-1, 4)


class FusedGroup:
    """One group's compiled calls for one preference: the decode step (:meth:`step`) and
    prefill's gating (:meth:`gate`). Holds the :class:`Factors` (shared by every preference
    with the same active set) and the preference's small gating maps.

    Tensors are passed by address, so they must be contiguous and of the dtype the call
    expects; :meth:`accepts`, :meth:`step` and :meth:`gate` check that.
    """

    def __init__(
        self, factors: Factors, dtype: torch.dtype, g_fixed: np.ndarray, maps: np.ndarray | None
    ) -> None:
        """``g_fixed`` (B, R) float32: the expert anchors' weights per rank row; ``maps``
        (B, S, R) float32: router weight x one-hot (gate output -> its expert's rank rows),
        or None without routers. Packed with the factors' bias into one float32 array
        ``floats`` = [bias (R + S), g_fixed, maps] for the compiled calls."""
        self.factors, self.dtype = factors, dtype
        self.io = np.empty(0, np.uint16 if dtype == torch.bfloat16 else np.float32)
        f, n_rank = factors, g_fixed.shape[1]
        self.routed = maps is not None
        if maps is None:  # no gate rows
            maps = np.zeros((g_fixed.shape[0], 0, n_rank), np.float32)
        if f.layout[2] != n_rank or f.layout[0] != n_rank + maps.shape[1]:
            raise ValueError(
                f"gating maps for R={n_rank}, S={maps.shape[1]} do not fit factors {f.layout[:3]}"
            )
        self.floats = np.concatenate([f.bias, g_fixed.ravel(), maps.ravel()]).astype(np.float32, copy=False)
        self.n_in, self.out_sizes = int(f.layout[1]), f.members[:, 3].tolist()
        self.args = (f.flat, self.floats, f.layout)  # group_step's
        self.z_shape = (g_fixed.shape[0], n_rank + maps.shape[1])  # (B, R + S) of gate()'s input

    def accepts(self, x3: torch.Tensor) -> bool:
        """Whether input x3 (B, T, in) goes to the fused path."""
        return x3.shape[0] * x3.shape[1] <= MAX_ROWS and x3.shape[-1] == self.n_in and self._addressable(x3)

    def _addressable(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        """Whether the compiled call may read or write ``t`` by address: a dense contiguous
        CPU tensor of ``dtype`` (default: the activations') that needs no grad."""
        return (
            t.dtype == (dtype or self.dtype)
            and t.is_cpu
            and t.layout == torch.strided
            and t.is_contiguous()
            and not t.requires_grad
        )

    def gate(self, z: torch.Tensor) -> bool:
        """Prefill's gating in one compiled call: z (B, T, R + S) float32 (on the CPU the
        torch kernels gate in float32 whatever their GEMMs' dtype), a fresh GEMM's A x and gate logits,
        becomes (..., :R) = the gated h, in place (:func:`gate_rows`).
        False, z untouched, when there is nothing to gate (no routers) or z is not the
        contiguous float32 CPU tensor of this group's batch and width: torch gates it."""
        bsz, seq, width = z.shape
        if not self.routed or (bsz, width) != self.z_shape or not self._addressable(z, torch.float32):
            return False
        gate_rows(z.data_ptr(), bsz * seq, width, seq, self.floats, self.factors.layout)
        return True

    def addresses(self) -> np.ndarray:
        """A buffer for :meth:`step`'s output addresses, (M,) int64; one per caller and call
        (a kernel's per-call copy holds it), so threads sharing this group never share it."""
        return np.zeros(len(self.out_sizes), np.int64)

    def step(self, x3: torch.Tensor, ys: list, addrs: np.ndarray) -> list[int]:
        """Add every member's delta to its base output ``ys[m]`` (B, T, out_m), in place, for
        input x3 (B, T, in) accepted by :meth:`accepts`; None entries are skipped. ``addrs``:
        a buffer from :meth:`addresses`, overwritten. Returns the members whose output it
        cannot write (another size, or not :meth:`_addressable`): the caller adds theirs.
        The compiled call reads and writes by address, so nothing reaches it unchecked."""
        bsz, seq, _ = x3.shape
        skipped = []
        for m, (y, size) in enumerate(zip(ys, self.out_sizes)):
            ptr = 0
            if y is None or not size:  # no active expert in this member: nothing to add
                pass
            elif self._addressable(y) and y.numel() == bsz * seq * size:
                ptr = y.data_ptr()
            else:
                skipped.append(m)
            addrs[m] = ptr
        group_step(self.io, x3.data_ptr(), bsz * seq, seq, *self.args, addrs)
        return skipped


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load from numba's on-disk cache) the kernel for ``dtype`` activations and
    each factor format they come with now, so the first decode step of a served model does
    not pay for it. A no-op when unavailable."""
    if not available() or dtype not in DTYPES:
        return
    io = np.empty(0, np.uint16 if dtype == torch.bfloat16 else np.float32)
    x, y = torch.zeros(1, 1, 2, dtype=dtype), torch.zeros(1, 1, 2, dtype=dtype)
    g_fixed, maps = np.ones((1, 2), np.float32), np.zeros((1, 1, 2), np.float32)
    addrs = np.array([y.data_ptr()], np.int64)
    full = partial(torch.full, dtype=dtype)
    for fill in [0.5] if dtype == torch.bfloat16 else [0.1, 0.5]:  # float32 factors: as is, as float16
        f = Factors.pack(full((3, 2), fill), [full((2, 2), fill)], [(0, 2)], full((3,), 0.0), [1])
        group = FusedGroup(f, dtype, g_fixed, maps)
        group_step(io, x.data_ptr(), 1, 1, *group.args, addrs)
    z = torch.zeros(1, 3)  # prefill's gating: float32 for both (the CPU gates in float32)
    gate_rows(z.data_ptr(), 1, 3, 1, group.floats, f.layout)
