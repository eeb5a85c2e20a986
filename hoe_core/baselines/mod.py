"""MOD, multi-objective decoding (Shi et al., 2024; SPEC section 6): at every step the next
token is chosen from

    score(y) = sum_i lambda_i log_softmax(logits_i)(y)

over the N single-objective models theta_i = theta_pre + B_i A_i, one forward per model
with lambda_i > 0 per token, each with its own KV cache. The models share the backbone's
weights: model i is the HoE-wrapped backbone routed one-hot to expert i.

Each model's logits go through the same processors ``generate`` uses (repetition penalty)
before the log-softmax, so with a one-hot lambda MOD is exactly that expert's decoding;
temperature and top-p then act on the combined score.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from hoe_core.baselines.soups import mixture_weights, vertex_experts
from hoe_core.config import DecodingConfig
from hoe_core.evaluation.front import Method
from hoe_core.generation import clean_prompt, encode_chat, eos_token_ids
from hoe_core.routing.context import Routing, activate
from hoe_core.routing.model import HoEModel
from hoe_core.routing.preference import normalize_preference


def mod_generate(
    hoe: HoEModel,
    tokenizer,
    prompts: Sequence[str],
    preference: Sequence[float],
    decoding: DecodingConfig = DecodingConfig(),
    experts: Sequence[int] | None = None,
) -> list[str]:
    """Decode a batch of prompts at one preference (N,) with MOD. -> B texts.

    Args:
        experts: anchor index of each objective's single-objective model (default: the
            experts at the simplex vertices).
    """
    *_, new = mod_steps(hoe, tokenizer, prompts, preference, decoding, experts)  # the last step's tokens
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


@torch.no_grad()
def mod_steps(
    hoe: HoEModel,
    tokenizer,
    prompts: Sequence[str],
    preference: Sequence[float],
    decoding: DecodingConfig = DecodingConfig(),
    experts: Sequence[int] | None = None,
    min_new_tokens: int = 0,
) -> Iterator[torch.Tensor]:
    """MOD decoding one token at a time: yields the new tokens so far, (B, t), per step.

    ``min_new_tokens`` suppresses EOS for that many steps (as ``generate`` does; the
    benchmark decodes a fixed length)."""
    lam = normalize_preference(preference, len(hoe.objectives))
    experts = list(vertex_experts(hoe) if experts is None else experts)
    active = [(i, float(lam[i])) for i in range(len(lam)) if lam[i] > 0]
    model = hoe.model
    device = next(model.parameters()).device
    enc = encode_chat(tokenizer, [clean_prompt(p) for p in prompts], device)
    ids, attention = enc["input_ids"], enc["attention_mask"]
    batch = ids.shape[0]
    position = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)
    processors = LogitsProcessorList()
    if decoding.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty))
    warpers = LogitsProcessorList()
    if not decoding.greedy:
        warpers.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_p < 1.0:
            warpers.append(TopPLogitsWarper(decoding.top_p))
    eos = torch.tensor(eos_token_ids(model, tokenizer), device=device)
    # model i alone: one routing per model for the whole loop (its layer kernels are built once)
    routings = [Routing(weights=mixture_weights(hoe, [experts[i]], np.ones(1), batch)) for i, _ in active]
    pad = tokenizer.pad_token_id
    # sampling draws from this call's own generator: concurrent calls never share an RNG
    rng = None if decoding.greedy else torch.Generator(device).manual_seed(decoding.seed)
    caches: list = [None] * len(active)
    step_ids, step_pos = ids, position
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(decoding.max_new_tokens):
        score = None
        for slot, (_, weight) in enumerate(active):  # one forward per model, own KV cache
            with activate(routings[slot]):
                out = model(
                    input_ids=step_ids,
                    attention_mask=attention,
                    position_ids=step_pos,
                    past_key_values=caches[slot],
                    use_cache=True,
                )
            caches[slot] = out.past_key_values
            logits = processors(ids, out.logits[:, -1, :].float())
            term = weight * torch.log_softmax(logits, -1)
            score = term if score is None else score + term
        if step < min_new_tokens:
            score[:, eos] = -torch.inf
        if decoding.greedy:
            token = score.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(warpers(ids, score), -1), 1, generator=rng)[:, 0]
        token = torch.where(done, torch.full_like(token, pad), token)
        new_tokens.append(token)
        yield torch.stack(new_tokens, 1)
        done |= torch.isin(token, eos)
        ids = torch.cat([ids, token[:, None]], 1)
        attention = torch.cat([attention, attention.new_ones(batch, 1)], 1)
        step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
        if bool(done.all()):
            break


def mod_method(hoe: HoEModel, tokenizer, decoding: DecodingConfig) -> Method:
    experts = vertex_experts(hoe)
    return lambda prompts, lam: mod_generate(hoe, tokenizer, prompts, lam, decoding, experts)


def mod_stream(
    hoe: HoEModel,
    tokenizer,
    prompt: str,
    preference: Sequence[float],
    decoding: DecodingConfig = DecodingConfig(),
) -> Iterator[str]:
    """One prompt's MOD answer as it grows (cumulative text), token by token."""
    for new in mod_steps(hoe, tokenizer, [prompt], preference, decoding):
        yield tokenizer.decode(new[0], skip_special_tokens=True).strip()
