"""Task-SVD: objective vectors -> low-rank LoRA factors (SPEC section 1).

    tau (out, in)  --prune-->  tau'  --SVD-->  U S V^T  --truncate r-->  B = U_r S_r^1/2   (out, r)
                                                                         A = S_r^1/2 V_r^T (r, in)

An objective vector is either dense (``W_i - W_pre``) or already low rank
(``s * B @ A`` from a LoRA adapter); for the latter the SVD costs two thin QRs and an
r x r SVD instead of a full decomposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hoe_core.config import TaskSVDConfig


@dataclass(frozen=True)
class LowRankDelta:
    """A weight delta ``scale * B @ A`` kept factorised. B: (out, r), A: (r, in)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """The delta as a matrix, (out, in), float32."""
        return self.scale * (self.B.float() @ self.A.float())


#: One objective vector: module name -> delta, dense (out, in) or factorised.
TaskVector = dict[str, "torch.Tensor | LowRankDelta"]


@dataclass(frozen=True)
class ModuleSVDReport:
    """What truncation kept of one module's delta."""

    module: str
    rank: int
    energy_retained: float  # sum_{j<=r} sigma_j^2 / sum_j sigma_j^2, 1.0 for a zero delta
    frobenius_error: float  # ||tau' - B A||_F before rescaling (Eckart-Young: sqrt(dropped))


def as_dense(delta: torch.Tensor | LowRankDelta) -> torch.Tensor:
    """A delta as a float32 matrix (out, in)."""
    return delta.dense() if isinstance(delta, LowRankDelta) else delta.float()


def svd(delta: torch.Tensor | LowRankDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``delta = U diag(S) Vh`` in float32.

    Returns U (out, k), S (k,), Vh (k, in) with k = min(out, in) for a dense delta and
    k = r for a LowRankDelta (computed via QR of B and A^T, then an r x r SVD).
    """
    if isinstance(delta, torch.Tensor):
        return torch.linalg.svd(delta.float(), full_matrices=False)
    qb, rb = torch.linalg.qr(delta.B.float())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(delta.A.float().T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(delta.scale * rb @ ra.T)  # core (r, r)
    return qb @ u, s, vh @ qa.T


def choose_rank(sigma: torch.Tensor, cap: int, energy: float | None) -> int:
    """Smallest rank keeping ``energy`` of sum(sigma^2) (or ``cap`` if None), at most cap."""
    cap = min(cap, sigma.numel())
    if energy is None or cap == 0:
        return cap
    power = sigma.double() ** 2
    total = power.sum()
    if total == 0:
        return 1 if cap else 0
    cumulative = torch.cumsum(power, 0) / total
    needed = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12))
    return max(1, min(cap, needed + 1))


def truncate(
    delta: torch.Tensor | LowRankDelta,
    rank: int,
    energy: float | None = None,
    rescale: bool = False,
    module: str = "",
) -> tuple[LowRankDelta, ModuleSVDReport]:
    """Best rank-r approximation of one delta as LoRA factors (scale 1).

    Args:
        delta: (out, in) dense or LowRankDelta.
        rank: maximum rank r.
        energy: if set, the smallest rank keeping this fraction of sum(sigma^2), <= rank.
        rescale: multiply the factors so that ||B A||_F equals ||delta||_F.
    Returns:
        LowRankDelta with B (out, r), A (r, in), and the module's report.
    """
    u, s, vh = svd(delta)
    r = choose_rank(s, rank, energy)
    power = s.double() ** 2
    total, kept = float(power.sum()), float(power[:r].sum())
    root = s[:r].sqrt()
    b = u[:, :r] * root  # (out, r)
    a = root[:, None] * vh[:r]  # (r, in)
    if rescale and kept > 0:
        gamma = (total / kept) ** 0.5
        b, a = b * gamma**0.5, a * gamma**0.5
    report = ModuleSVDReport(
        module=module,
        rank=r,
        energy_retained=kept / total if total > 0 else 1.0,
        frobenius_error=max(total - kept, 0.0) ** 0.5,
    )
    return LowRankDelta(B=b.contiguous(), A=a.contiguous()), report


def prune(delta: torch.Tensor | LowRankDelta, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (dense result)."""
    from peft.utils.merge_utils import magnitude_based_pruning  # peft imports slowly (~8 s)

    return magnitude_based_pruning(as_dense(delta), density)


def task_svd(
    task_vector: TaskVector, config: TaskSVDConfig
) -> tuple[dict[str, LowRankDelta], list[ModuleSVDReport]]:
    """Compress every module of an objective vector into LoRA factors.

    Args:
        task_vector: module name (e.g. ``model.layers.0.self_attn.q_proj``) -> delta.
        config: ranks per module type, energy threshold, pruning density, rescale.
    Returns:
        (factors per module, one report per module in the input's order).
    """
    factors: dict[str, LowRankDelta] = {}
    reports: list[ModuleSVDReport] = []
    for name, delta in task_vector.items():
        if config.density is not None and config.density < 1.0:
            delta = prune(delta, config.density)
        factors[name], report = truncate(
            delta, config.rank_for(name), config.energy, config.rescale, module=name
        )
        reports.append(report)
    return factors, reports


def objective_vector_from_weights(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], targets: tuple[str, ...]
) -> TaskVector:
    """tau = W_tuned - W_pre for every targeted linear of two state dicts.

    Keys are ``<module>.weight``; the result is keyed by ``<module>``.
    """
    out: TaskVector = {}
    for key, w_pre in base.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets:
            continue
        if key not in tuned:
            raise KeyError(f"fine-tuned checkpoint lacks {key!r}")
        if tuned[key].shape != w_pre.shape:
            raise ValueError(f"{key}: shape {tuple(tuned[key].shape)} != {tuple(w_pre.shape)}")
        out[module] = tuned[key].float() - w_pre.float()
    if not out:
        raise ValueError(f"no targeted linear ({', '.join(targets)}) found in the checkpoint")
    return out


def energy_summary(reports: list[ModuleSVDReport]) -> dict[str, float]:
    """Mean retained energy per module type, e.g. {'q_proj': 0.93, ...}."""
    by_type: dict[str, list[float]] = {}
    for rep in reports:
        by_type.setdefault(rep.module.rsplit(".", 1)[-1], []).append(rep.energy_retained)
    return {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
