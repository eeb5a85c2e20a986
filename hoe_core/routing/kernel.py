"""The inference kernel of the HoE layers: one call's mixture, every weight resolved up front.

Sibling layers that read the same input -- q/k/v of an attention block, gate/up of an MLP
-- form a :class:`SiblingGroup`, and one kernel computes the low-rank deltas of all of them
at once (at batch 1 the cost is the number of small ops, not their FLOPs)::

    x (B, T, in) ─► [A_q; A_k; A_v; W_rho,q; ...] x + b  ─► h (B, T, R) | z (B, T, S)
                                                                          │ softmax per router
    g = g_fixed + softmax(z) M   (B, T, R)  ◄─────────────────────────────┘
    y_q = base_q(x) + (h * g)[:, R_q] B_q^T   (one in-place addmm_ per member; likewise k, v)

The first member called computes the group's gated h and keeps it with the input it came
from; the others reuse it while they are called with that same tensor (HF calls q, k and v
on one ``hidden_states``). Without live routers and with one batch row, off the compiled
CPU path, the weights fold into A: per group one matmul, then one addmm per member. The delta is accumulated into
the base's fresh output in place (no copy of y; a bfloat16 y on a CPU without bfloat16 units
gets its float32 delta added in place, see :meth:`_Stacked.compute_factors`).

On the CPU, decode steps (at most ``fused_cpu.MAX_ROWS`` rows) of float32 and bfloat16
kernels run :mod:`hoe_core.routing.fused_cpu` instead, with the same math: the first
member called computes every member's base output, then one compiled call adds all their
deltas; the siblings' outputs wait for their calls. Prefill keeps the torch GEMMs (for
bfloat16 models on a CPU without bfloat16 units, in float32), with the routers' gating in
between compiled (in float32).

Kernels live in the call's :class:`~hoe_core.routing.context.Routing` (per thread, per
request). Everything but the gating is made once per group and active set (a template
kernel: stacked weights, the compiled kernel's factors), so a preference change only
computes its small (B, R) and (B, S, R) gating maps, by two numpy gathers.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cache
from itertools import accumulate
from operator import attrgetter

import numpy as np
import torch

from hoe_core.routing import fused_cpu

_CACHE_SIZE = 8  # stacked weights kept per group (one per recent active set)
_VERSION = attrgetter("_version")  # a tensor's in-place update count
_TRAINS = attrgetter("requires_grad")
#: kernel dtypes whose torch gating runs in float32 on the CPU (16-bit ones widened for it)
_GATED_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def _evict(cache: dict, keep: int) -> None:
    """Drop the oldest entries of ``cache`` (insertion order) until ``keep`` are left (the
    caller holds its group's lock)."""
    while len(cache) > keep:
        cache.pop(next(iter(cache)))


class SiblingGroup:
    """HoE layers sharing one input; ``members[i].slot == i``. A layer alone is a group of one."""

    def __init__(self, members: list) -> None:
        self.members = members
        self.stacks: dict = {}  # (plan key, device) -> _Stacked, for the gates as in _state
        self._state: tuple | None = None  # the gates and factors dtype the caches were made for
        self._params: list = []  # the gate tensors of _state, kept alive
        self.kernels: dict = {}  # (weights, plan key, device) -> Kernel, recent preferences
        # bumped when the gates may have changed in a way the kernels would not notice (a
        # trainable forward, which an optimiser step may follow; HoELinear.gates_changed):
        # every routing block's kernel of this group built before it is rebuilt on next use
        self.epoch = 0
        # request threads share the group: a cache is cleared and filled under this lock, and
        # only with what was made for the gates as they are (_state)
        self._lock = threading.Lock()
        for slot, m in enumerate(members):
            m.group, m.slot = self, slot

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` of a model (Rewarded Soups copies one): the members, without
        the caches (made from the original's tensors) or the lock."""
        return {**self.__dict__, "stacks": {}, "kernels": {}, "_state": None, "_params": [], "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def kernel(self, routing, x: torch.Tensor) -> Kernel:
        """The group's mixture for this call and batch ``x.shape[0]`` (x: (B, T, in)); the
        kernels of the last ``_CACHE_SIZE`` preferences used are kept and reused (a fresh
        copy: the sibling state is per call). Called once per group and routing block, so
        for every request: the checks below are C-level passes over flat tuples."""
        lead = self.members[0]
        plan = routing.plan(x.shape[0], lead.n_experts, lead.subsets, x.device)
        # every gate's identity, in-place update count and whether it trains, and the
        # factors' dtype: a gate replaced, updated or unfrozen, or the model cast, drops every
        # cached stack and kernel (they were made from the old weights)
        params = self._gate_params()
        try:
            versions = tuple(map(_VERSION, params))
        except RuntimeError:  # gates made under torch.inference_mode keep no version count
            versions = tuple(map(_version, params))
        state = (lead._buffers["lora_A"].dtype, tuple(map(id, params)), versions, tuple(map(_TRAINS, params)))
        if state != self._state:
            with self._lock:
                self.stacks.clear()
                self.kernels.clear()
                self._state, self._params = state, params  # the tensors held: their ids stay unique
        state = self._state  # what this call's cache entries are made for (compared by identity)
        stacked = self._stacked(plan, state)
        key = (plan.weights_key, plan.key, plan.device)
        kernel = self.kernels.pop(key, None)  # re-inserted last: the least recently used goes first
        if kernel is None:
            kernel = self._build(plan, stacked)
        self._keep(self.kernels, key, kernel, state)
        fresh = kernel.fresh()
        fresh.epoch = self.epoch  # the state above checked the gates as they are now
        return fresh

    def _gate_params(self) -> list[torch.Tensor]:
        """Every member's gate weights and biases, looked up afresh on every call (through
        the modules' own dicts: ``ModuleList`` indexing and ``Module.__getattr__`` cost
        about as much as building the rest of the kernel)."""
        out = []
        for m in self.members:
            for gate in m._modules["gates"]._modules.values():
                params = gate._parameters
                out += (params["weight"], params["bias"])
        return out

    def _build(self, plan, stacked: _Stacked) -> Kernel:
        """The kernel for one preference: the active set's template (everything but the
        gating, made once per active set) with this preference's (B, R) and (B, S, R) maps,
        from two numpy gathers (a slider move rebuilds all groups' kernels, so this is part
        of the time to the first new token). The torch kernels read the same arrays, or a
        copy in their dtype and device."""
        kernel = stacked.template().fresh()
        if kernel.weight is None:
            return kernel
        g_np, maps_np = stacked.gating(plan.weights)
        g_fixed = torch.from_numpy(g_np)[:, None]  # (B, 1, R)
        maps = None if maps_np is None else torch.from_numpy(maps_np)  # (B, S, R)
        dtype, device = kernel.weight.dtype, kernel.weight.device
        if device.type != "cpu" or dtype not in _GATED_IN_FLOAT32:  # the torch gating's dtype
            g_fixed = g_fixed.to(device, dtype)
            maps = None if maps is None else maps.to(device, dtype)
        kernel.g_fixed, kernel.maps = g_fixed, maps
        w = stacked.weight  # as stored: the compiled kernel reads float32 or bfloat16
        if device.type == "cpu" and w.dtype in fused_cpu.DTYPES and fused_cpu.available():
            if stacked.factors is None:  # once per active set: the factors in storage format
                stacked.factors = fused_cpu.Factors.pack(
                    w, stacked.b_ts, stacked.spans, stacked.bias, [n for _, n in stacked.segments]
                )
            kernel.fused = fused_cpu.FusedGroup(stacked.factors, w.dtype, g_np, maps_np)
        elif maps is None and g_fixed.shape[0] == 1:  # static, one row: fold into A
            kernel.weight, kernel.g_fixed = (kernel.weight * g_fixed[0, 0, :, None]).to(dtype), None
        return kernel

    def _stacked(self, plan, state: tuple) -> _Stacked:
        """[A_active ...; W_rho ...] for the plan's active experts and routers, cached per
        active set (a few recent ones: users at different preferences) until the gates
        change (:meth:`kernel` clears the cache then)."""
        key = (plan.key, plan.device)
        stacked = self.stacks.get(key)
        if stacked is None:
            stacked = self._stack(plan, [p for p, _ in plan.routers])
            self._keep(self.stacks, key, stacked, state)
        return stacked

    def _keep(self, cache: dict, key, value, state: tuple) -> None:
        """``cache[key] = value`` (the oldest entries evicted to ``_CACHE_SIZE``), unless the
        gates changed since ``value`` was made for ``state``: another request thread cleared
        the caches meanwhile, and a late insert would outlive the change."""
        with self._lock:
            if self._state is state:
                cache[key] = value
                _evict(cache, _CACHE_SIZE)

    def _stack(self, plan, routers: list[int]) -> _Stacked:
        acts = [m._active(plan) for m in self.members]
        dev = plan.device
        dtype = acts[0].a.dtype
        ranks = [act.a.shape[0] for act in acts]
        starts = [end - r for r, end in zip(ranks, accumulate(ranks))]
        n_rank = sum(ranks)
        gate_w, gate_b, segments, blocks, params = [], [], [], [], []
        for m, act, start in zip(self.members, acts, starts):
            if not act.a.shape[0]:
                continue  # no active expert here: its routers have nothing to gate
            for p in routers:
                gate = m.gates[p]
                gate_w.append(gate.weight.detach().to(dev, dtype))
                gate_b.append(gate.bias.detach().to(dev, dtype))
                params += [gate.weight, gate.bias]
                segments.append((p, gate.weight.shape[0]))
                block = act.a.new_zeros(gate.weight.shape[0], n_rank)  # (|S_p|, R)
                block[:, start : start + act.a.shape[0]] = act.maps[p]
                blocks.append(block)
        return _Stacked(
            weight=torch.cat([act.a for act in acts] + gate_w).contiguous(),
            bias=torch.cat([acts[0].a.new_zeros(n_rank), *gate_b]) if gate_w else None,
            b_ts=[act.b_t if act.a.shape[0] else None for act in acts],
            spans=[(start, start + r) for start, r in zip(starts, ranks)],
            owner=torch.cat([act.owner for act in acts]),
            maps=torch.cat(blocks) if blocks else None,
            segments=segments,
            gate_params=params,
            members=self.members,
        )


@dataclass
class _Stacked:
    """A group's weights for one active set (preference-independent)."""

    weight: torch.Tensor  # (R + S, in): the active A rows of every member, then the gates
    bias: torch.Tensor | None  # (R + S,): zeros, then the gate biases
    b_ts: list[torch.Tensor | None]  # per member its B^T (R_m, out_m), None without active experts
    spans: list[tuple[int, int]]  # per member its rank columns [start, end) of R
    owner: torch.Tensor  # (R,) expert of each rank row
    maps: torch.Tensor | None  # (S, R) one-hot: gate output -> the rank rows of its expert
    segments: list[tuple[int, int]]  # (router, |S_p|) per gate block, in row order
    gate_params: list[torch.Tensor]  # the gate tensors stacked in (to notice in-place updates)
    members: list  # the group's layers, in slot order
    factors: fused_cpu.Factors | None = None  # the fused CPU kernel's copy, made on first use
    widened: tuple | None = None  # float32 copies for bfloat16 on the CPU, made on first use
    _template: Kernel | None = None  # every kernel of this active set, without its gating
    _columns: tuple | None = None  # numpy: (R,) and (S,) columns of the anchor weights, (S, R) one-hot

    def template(self) -> Kernel:
        """The preference-independent part of this active set's kernels (made once):
        :meth:`SiblingGroup._build` copies it and adds one preference's gating."""
        if self._template is None:
            weight, bias, b_ts = self.compute_factors()
            sizes = [n for _, n in self.segments]
            self._template = Kernel(
                weight if weight.shape[0] else None,
                bias if sizes else None,
                None,
                None,
                self.owner.shape[0],
                sizes,
                b_ts,
                self.spans,
                # trainable gates are watched for in-place updates (an optimiser step inside one
                # routing block); frozen ones (served models) cost no per-call check
                tuple((t, t._version) for t in self.gate_params)
                if any(t.requires_grad for t in self.gate_params)
                else (),
                len(self.members) > 1,
                members=self.members,
            )
        return self._template

    def gating(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One preference's gating maps from the anchor weights (B, K) float32 (K = E
        experts, then the routers): g_fixed (B, R), each rank row's expert weight, and with
        routers maps (B, S, R), router p's weight times the one-hot from its gate outputs to
        its experts' rank rows (else None). Two numpy gathers (microseconds), C-contiguous
        (``take``; fancy indexing would give a column-major (B, R) for B > 1), as the torch
        kernels read them; the compiled kernel gets them packed (``FusedGroup.floats``)."""
        if self._columns is None:
            n_experts = self.members[0].n_experts  # the anchor weights' first E columns
            rows = [n_experts + p for p, n in self.segments for _ in range(n)]  # gate row -> column
            onehot = None if self.maps is None else self.maps.float().cpu().numpy()  # (S, R)
            self._columns = (self.owner.cpu().numpy(), np.array(rows, np.int64), onehot)
        owner, rows, onehot = self._columns
        g_fixed = weights.take(owner, 1)  # (B, R)
        if not rows.size:
            return g_fixed, None
        return g_fixed, weights.take(rows, 1)[:, :, None] * onehot  # (B, S, R)

    def compute_factors(self) -> tuple:
        """(weight, bias, b_ts) in the dtype the torch kernels compute in: as stored,
        except bfloat16 on a CPU without bfloat16 units (:func:`native_bfloat16`), which
        computes in float32 (exact copies, kept once per active set). Such CPUs run float32
        GEMMs about 3x faster (the backbone's prefill: 0.19 s at fp32, 0.56 s at bf16), with
        fewer roundings; y stays bfloat16. CPUs with them run bfloat16 GEMMs 1.4-2.1x faster
        than float32 ones: there bfloat16 GEMMs, gated in float32, bring the first token 8 ms
        sooner (``bench/ab_prefill-bf16*.md``)."""
        if self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu" or native_bfloat16():
            return self.weight, self.bias, self.b_ts
        if self.widened is None:
            wide = lambda t: None if t is None else t.float()  # noqa: E731
            self.widened = (wide(self.weight), wide(self.bias), [wide(t) for t in self.b_ts])
        return self.widened


@dataclass(eq=False)
class Kernel:
    """One group's mixture for one call and batch size (inference only).

    h = (x A^T) * g with g = g_fixed + softmax(z) M, where [A; W_rho] x = [h; z] is one
    matmul (without routers, with one batch row and off the compiled CPU path g is folded
    into A); member m then adds
    h[..., span_m] B_m^T to its base output.
    """

    weight: torch.Tensor | None  # (R [+ S], in), or None: no active expert in the group
    bias: torch.Tensor | None  # (R + S,) with routers
    g_fixed: torch.Tensor | None  # (B, 1, R), or None when folded into A
    maps: torch.Tensor | None  # (B, S, R) with the router weights folded in, or None (static)
    n_rank: int  # R
    sizes: list[int] | tuple  # gate block sizes (one softmax each)
    b_ts: list[torch.Tensor | None]  # per member (R_m, out_m)
    spans: list[tuple[int, int]]  # per member its columns of h
    versions: tuple  # (gate tensor, its version when stacked) of trainable gates, else ()
    shared: bool  # several members: keep the last h (or fused outputs) for the siblings
    fused: fused_cpu.FusedGroup | None = None  # CPU float32 / bfloat16: the compiled decode step and gating
    members: list = field(default_factory=list)  # the group's HoE layers, in slot order
    _last: tuple = field(default=(None, -1, None), init=False, repr=False)  # (input, its version, h)
    _outs: tuple = field(default=(None, -1, None), init=False, repr=False)  # (input, version, outputs)
    _addrs: np.ndarray | None = field(default=None, init=False, repr=False)  # the fused step's, per call
    epoch: int = field(default=0, init=False, repr=False)  # the group's epoch when handed out

    def __post_init__(self) -> None:
        sizes = list(self.sizes)
        self.split = [self.n_rank, sum(sizes)]
        self.block = (len(sizes), sizes[0]) if sizes and len(set(sizes)) == 1 else None
        self._gates, self._gate_versions = (
            tuple(t for t, _ in self.versions),
            tuple(v for _, v in self.versions),
        )

    def fresh(self) -> Kernel:
        """A copy for one call: the same weights, no sibling state (``dataclasses.replace``
        without re-running ``__init__``, once per group and call)."""
        kernel = object.__new__(Kernel)
        kernel.__dict__.update(self.__dict__)
        kernel._last = kernel._outs = (None, -1, None)
        kernel._addrs = None
        return kernel

    def current(self) -> bool:
        """False once a trainable gate changed in place (an optimiser step) since this kernel
        was built (frozen gates are not watched: ``versions`` is empty)."""
        return tuple(map(_VERSION, self._gates)) == self._gate_versions

    def __call__(self, layer, x: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """Member ``layer``'s output for input ``x`` (x3 = x as (B, T, in)): its base output
        plus its delta.

        A fused decode step, called by the group's first member, computes the base outputs
        of all members and their deltas in one compiled call, and keeps the siblings' for
        their own calls with that same tensor (each handed out once).
        """
        slot, version = layer.slot, _version(x)
        last_x, last_version, outs = self._outs
        if last_x is x and version is not None and last_version == version and outs[slot] is not None:
            y, outs[slot] = outs[slot], None
            return y
        if self.fused is not None and self.fused.accepts(x3):
            share = slot == 0 and self.shared and version is not None
            if share:
                ys = [m._base_call(x) for m in self.members]
            else:  # alone: called out of order, or an inference tensor (no version to key on)
                ys = [None] * len(self.members)
                ys[slot] = layer._base_call(x)
            if self._addrs is None:
                self._addrs = self.fused.addresses()
            for m in self.fused.step(x3, ys, self._addrs):  # outputs it cannot write: torch adds theirs
                ys[m] = self.add_delta(m, self.hidden(x, x3), ys[m])
            y, ys[slot] = ys[slot], None
            if share:
                self._outs = (x, version, ys)
            return y
        h = self.hidden(x, x3)
        y = layer._base_call(x)
        return y if h is None else self.add_delta(slot, h, y)

    def hidden(self, x: torch.Tensor, x3: torch.Tensor) -> torch.Tensor | None:
        """The group's gated low-rank activations h * g as (B*T, R) for input ``x`` (x3 = x
        as (B, T, in)), with torch ops; None when no expert is active."""
        version = _version(x)
        last_x, last_version, last = self._last
        if last_x is x and version is not None and last_version == version:
            return last
        if self.weight is None:
            return None
        h = self._hidden_torch(x3)
        if self.shared and version is not None:
            self._last = (x, version, h)
        return h

    def _hidden_torch(self, x3: torch.Tensor) -> torch.Tensor:
        """h (B*T, R) for x3 (B, T, in) with torch ops (prefill, other devices and dtypes).
        On the CPU the gating after the GEMM runs in float32 (the routers' in one compiled
        call); with 16-bit factors (bfloat16 computing natively, see
        :meth:`_Stacked.compute_factors`) the GEMM's output is widened for it and the gated
        h rounded back to their dtype."""
        dtype = self.weight.dtype
        xa = x3 if x3.dtype == dtype else x3.to(dtype)
        h = torch.nn.functional.linear(xa, self.weight, self.bias)  # (B, T, R [+ S])
        narrow = h.is_cpu and dtype in _GATED_IN_FLOAT32 and dtype != torch.float32
        if narrow:
            h = h.float()
        if self.fused is not None and self.fused.gate(h):  # gated in place, one compiled call
            h = h.view(-1, h.shape[-1])[:, : self.n_rank]  # (B*T, R), rows R + S apart
        else:
            if self.maps is not None:
                h, z = h.split(self.split, -1)  # (B, T, R), (B, T, S) gate logits
                if self.block:  # gate blocks of one size: one softmax over a view
                    bsz, seq = z.shape[0], z.shape[1]
                    probs = torch.softmax(z.view(bsz, seq, *self.block), -1).view(bsz, seq, -1)
                else:
                    probs = torch.cat([torch.softmax(s, -1) for s in z.split(self.sizes, -1)], -1)
                h = h * torch.baddbmm(self.g_fixed, probs, self.maps)  # (B, T, R)
            elif self.g_fixed is not None:
                h = h * self.g_fixed
            h = h.view(-1, h.shape[-1])  # (B*T, R): every torch path above leaves h contiguous
        return h.to(dtype) if narrow else h

    def add_delta(self, slot: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + h[:, span] B^T for member ``slot``; h (B*T, R) from :meth:`hidden`, y (..., out)
        its base output, accumulated in place when it is a fresh contiguous tensor."""
        b_t = self.b_ts[slot]
        if b_t is None:
            return y
        if self.shared:
            lo, hi = self.spans[slot]
            h = h[:, lo:hi]  # (B*T, R_m)
        if y.dtype != b_t.dtype:  # bfloat16 y from float32 factors (CPU), or a base of its own dtype
            delta = (h @ b_t).view(y.shape)
            if y.requires_grad or not y.is_contiguous():
                return y + delta.to(y.dtype)
            return y.add_(delta)  # summed in the wider dtype, rounded once
        if y.requires_grad or not y.is_contiguous():
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, b_t).view(y.shape)
        y.view(-1, y.shape[-1]).addmm_(h, b_t)  # no copy of y: the base just made it
        return y


@cache
def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX512-BF16 or AMX), so bfloat16
    GEMMs outrun float32 ones: then bfloat16 models compute their prefill mixtures in
    bfloat16 (:meth:`_Stacked.compute_factors`). Set ``HOE_NATIVE_BF16=0`` or ``1`` to
    decide instead (read once)."""
    forced = os.environ.get("HOE_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up softly
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _version(x: torch.Tensor) -> int | None:
    """x's in-place update count, or None for an inference tensor (``torch.inference_mode``
    keeps none: its siblings then get no shared results)."""
    try:
        return x._version
    except RuntimeError:
        return None


def group_siblings(layers: dict) -> None:
    """Group HoE layers (name -> layer) that read the same input: q/k/v and gate/up under one
    parent. Layers without experts stay alone (they skip the mixture)."""
    kinds = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
    groups: dict[tuple[str, str], list] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        if child in kinds and layer.lora_A.shape[0]:
            groups.setdefault((parent, kinds[child]), []).append(layer)
    for members in groups.values():
        if len(members) > 1:
            SiblingGroup(members)
