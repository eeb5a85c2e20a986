"""Recipe step 5: train a router expert by policy gradient, LoRA experts and backbone frozen,
with Tchebycheff scalarisation solved by online mirror descent (SPEC section 3).

    per step:  sample S answers per prompt at the router's anchor ──► rewards r (B*S, N), normalised
               OMD:  g_i = lambda_i (z*_i - mean r_i);  w <- normalise(w * exp(eta g));  w <- (1-a) w_old + a w
               R_j = sum_i w_i lambda_i r_ji        (linear ablation: R_j = sum_i lambda_i r_ji)
               RLOO advantage A_j = R_j - mean of the other samples of its prompt
               loss = -mean_j A_j * log pi(answer_j) / |answer_j|   (only gate weights get gradients)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from hoe_core.config import DecodingConfig
from hoe_core.generation import encode_chat, eos_token_ids, generate_kwargs
from hoe_core.routing.model import HoEModel
from hoe_core.training import distributed
from hoe_core.training.sampling import Scorer


@dataclass(frozen=True)
class RouterTrainingConfig:
    steps: int = 30
    prompts_per_step: int = 8
    samples_per_prompt: int = 2  # >= 2 for the leave-one-out baseline
    max_new_tokens: int = 40
    temperature: float = 0.9
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    learning_rate: float = 1e-2
    scalarization: Literal["tchebycheff", "linear"] = "tchebycheff"
    omd_eta: float = 1.0  # mirror-descent step size
    omd_alpha: float = 0.5  # smoothing of w between steps
    ideal_margin: float = 0.1  # z* = each single expert's own normalised reward + margin
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2 (leave-one-out baseline)")
        if self.scalarization not in ("tchebycheff", "linear"):
            raise ValueError(f"scalarization must be 'tchebycheff' or 'linear', got {self.scalarization!r}")


class TchebycheffOMD:
    """Online mirror descent on the weights w over objectives of max_theta min_i lambda_i (R_i - z_i*).

    The objective furthest behind its ideal point (weighted by lambda) gains weight.
    """

    def __init__(self, preference: np.ndarray, eta: float = 1.0, alpha: float = 0.5) -> None:
        self.lam = np.asarray(preference, float)
        self.w = np.full(len(self.lam), 1.0 / len(self.lam))
        self.eta, self.alpha = eta, alpha

    def update(self, mean_rewards: np.ndarray, ideal: np.ndarray) -> np.ndarray:
        """One step from this batch's mean normalised rewards (N,) and ideal point (N,)."""
        g = self.lam * (ideal - mean_rewards)
        w = self.w * np.exp(self.eta * (g - g.max()))  # shift for stability; normalised next
        w /= w.sum()
        self.w = (1 - self.alpha) * self.w + self.alpha * w
        return self.w

    def scalarize(self, rewards: np.ndarray) -> np.ndarray:
        """(B, N) normalised rewards -> (B,) sum_i w_i lambda_i r_i."""
        return rewards @ (self.w * self.lam)


def _answer_mask(answers: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """(B, T_new) 1 up to and including the first end-of-sequence token, 0 after it."""
    is_eos = torch.isin(answers, eos_ids).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def _response_logprobs(
    model, sequences: torch.Tensor, attention: torch.Tensor, prompt_len: int, eos_ids: torch.Tensor
):
    """Mean log-probability per sequence of its generated tokens, up to and including the
    first end-of-sequence token (padding after it, often the same id, is left out). -> (B,)"""
    logits = model(input_ids=sequences, attention_mask=attention).logits[
        :, prompt_len - 1 : -1
    ]  # (B, T_new, V)
    targets = sequences[:, prompt_len:]  # (B, T_new)
    mask = _answer_mask(targets, eos_ids).float()
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    return (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def train_router(
    hoe: HoEModel,
    tokenizer,
    router: int,
    prompts: Sequence[str],
    rewards: Mapping[str, Scorer],
    normalizers: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    cfg: RouterTrainingConfig,
    out_dir: str | Path | None = None,
    ideal: np.ndarray | Sequence[float] | None = None,
) -> dict:
    """Train router ``router`` of ``hoe`` in place; returns (and saves) its training curve.

    Args:
        prompts: training prompts (cycled in order, shuffled with cfg.seed).
        rewards / normalizers: per objective in ``hoe.objectives`` order.
        ideal: (N,) the ideal point before the margin, in normalised units: each single
            expert's mean reward on its own objective (SPEC section 3). Required for
            Tchebycheff scalarisation.
    Returns:
        {"curve": [{"step", "reward_<obj>"..., "w"...}], "config", "seconds"}.
    """
    objectives = hoe.objectives
    missing = [o for o in objectives if o not in rewards or o not in normalizers]
    if missing:
        raise ValueError(f"no reward model or normaliser for objectives {missing}")
    lam = hoe.routers[router].anchor
    if cfg.scalarization == "tchebycheff":
        if ideal is None:
            raise ValueError("Tchebycheff scalarisation needs the ideal point z* (the experts' own rewards)")
        ideal = np.asarray(ideal, float)
        if ideal.shape != (len(objectives),) or not np.isfinite(ideal).all():
            raise ValueError(f"ideal must be {len(objectives)} finite numbers, got {ideal.tolist()}")
        z_star = ideal + cfg.ideal_margin
    omd = TchebycheffOMD(lam, cfg.omd_eta, cfg.omd_alpha)
    params = hoe.router_parameters(router)
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.Adam(params, lr=cfg.learning_rate)
    anchor_w = torch.zeros(1, len(hoe.anchors))
    anchor_w[0, hoe.n_experts + router] = 1.0  # the router alone, at its own anchor
    decoding = DecodingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        seed=cfg.seed,
    )
    order = np.random.default_rng(cfg.seed).permutation(len(prompts))
    procs = distributed.state()
    if cfg.prompts_per_step < procs.num_processes:
        raise ValueError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be at least the number of processes "
            f"({procs.num_processes}); ideally a multiple of it"
        )
    device = next(hoe.model.parameters()).device
    eos_ids = torch.tensor(eos_token_ids(hoe.model, tokenizer), device=device)
    curve, start = [], time.perf_counter()
    name = hoe.routers[router].name
    for step in tqdm(
        range(cfg.steps), desc=f"router {name} ({cfg.scalarization})", disable=not procs.is_local_main_process
    ):
        step_idx = [
            order[(step * cfg.prompts_per_step + j) % len(order)] for j in range(cfg.prompts_per_step)
        ]
        with procs.split_between_processes(step_idx) as idx:  # this process's share of the prompts
            batch = [prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]  # (B*S,)
        enc = encode_chat(tokenizer, batch, device)
        torch.manual_seed(cfg.seed * 100_003 + step)
        with torch.no_grad(), hoe.routing(anchor_weights=anchor_w.expand(len(batch), -1)):
            seqs = hoe.model.generate(**enc, **generate_kwargs(decoding, tokenizer))
        plen = enc["input_ids"].shape[1]
        texts = [tokenizer.decode(s[plen:], skip_special_tokens=True).strip() for s in seqs]
        raw = np.stack([np.asarray(rewards[o].score(batch, texts), float) for o in objectives], 1)
        r = np.stack([normalizers[o](raw[:, i]) for i, o in enumerate(objectives)], 1)  # (B*S, N)
        mean_r = distributed.mean_across(r.mean(0))  # (N,), the whole step's batch
        if cfg.scalarization == "tchebycheff":
            omd.update(mean_r, z_star)
            scalar = omd.scalarize(r)
        else:
            scalar = r @ lam
        grouped = scalar.reshape(len(idx), cfg.samples_per_prompt)
        s = cfg.samples_per_prompt
        advantage = (grouped - (grouped.sum(1, keepdims=True) - grouped) / (s - 1)).reshape(-1)  # RLOO
        attention = torch.cat([enc["attention_mask"], _answer_mask(seqs[:, plen:], eos_ids)], 1)
        with hoe.routing(anchor_weights=anchor_w.expand(len(batch), -1)):
            logp = _response_logprobs(hoe.model, seqs, attention, plen, eos_ids)
        loss = -(torch.as_tensor(advantage, dtype=logp.dtype) * logp).mean()
        optim.zero_grad()
        loss.backward()
        distributed.average_gradients(params)  # every process takes the same step
        optim.step()
        curve.append(
            {
                "step": step,
                "loss": float(loss.detach()),
                **{f"reward_{o}": float(mean_r[i]) for i, o in enumerate(objectives)},
                "w": omd.w.tolist(),
                "scalar": float(scalar.mean()),
            }
        )
    for p in params:
        p.requires_grad_(False)
    summary = {
        "router": hoe.routers[router].name,
        "ideal": None if ideal is None else (np.asarray(ideal, float) + cfg.ideal_margin).tolist(),
        "curve": curve,
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if out_dir is not None and procs.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"router_{hoe.routers[router].name}_{cfg.scalarization}.json").write_text(
            json.dumps(summary, indent=2) + "\n"
        )
    return summary
