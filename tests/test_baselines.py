"""Each baseline's defining property, on a pico bundle (3 objectives, vertex experts, a router)."""

import copy

import numpy as np
import pytest
import torch

from hoe_core.baselines import expand_methods, make_method, preference_free
from hoe_core.baselines.merge import MergeAtPreference, single_factors, use_deltas
from hoe_core.baselines.mod import mod_generate
from hoe_core.baselines.soups import mixture_weights, vertex_experts
from hoe_core.bundle import load_bundle
from hoe_core.config import DecodingConfig
from hoe_core.generation import encode_chat

PROMPTS = ["hi", "tell me a long story about cats", "why?"]  # different lengths: left padding
GREEDY = DecodingConfig(max_new_tokens=10, temperature=0.0, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def loaded(pico_bundle):
    return load_bundle(pico_bundle, device="cpu")


def dense_interpolation(loaded, lam):
    """A copy of the bare backbone with W += sum_i lambda_i B_i A_i written into the weights."""
    model = copy.deepcopy(loaded.hoe.model)
    factors = single_factors(loaded.hoe, loaded.experts)
    for name, layer in list(model.named_modules()):
        if hasattr(layer, "base") and hasattr(layer, "lora_A"):
            delta = sum(w * f[name].dense() for w, f in zip(lam, factors) if name in f)
            layer.base.weight.data += delta
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)  # back to a plain linear
    return model


def logits(model, loaded, **routing):
    enc = encode_chat(loaded.backbone.tokenizer, PROMPTS, "cpu")
    with torch.no_grad():
        if routing:
            with loaded.hoe.routing(**routing):
                return model(**enc).logits
        return model(**enc).logits


@pytest.mark.parametrize("lam", [[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
def test_rewarded_soups_is_weight_interpolation(loaded, lam):
    experts = vertex_experts(loaded.hoe)
    w = mixture_weights(loaded.hoe, experts, np.array(lam), len(PROMPTS))
    ours = logits(loaded.hoe.model, loaded, anchor_weights=w)
    merged = logits(dense_interpolation(loaded, lam), loaded)
    torch.testing.assert_close(ours, merged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, logits(loaded.hoe.model, loaded), atol=1e-3)  # the experts matter


def test_rewarded_soups_at_a_vertex_is_that_expert(loaded):
    rs = make_method("rs", loaded, GREEDY)
    for i, o in enumerate(loaded.objectives):
        expert = make_method(f"expert-{o}", loaded, GREEDY)
        assert rs(PROMPTS, np.eye(3)[i]) == expert(PROMPTS, np.full(3, 1 / 3))


def test_mod_with_one_hot_preference_is_that_experts_greedy_output(loaded):
    for i, o in enumerate(loaded.objectives):
        expert = make_method(f"expert-{o}", loaded, GREEDY)(PROMPTS, np.eye(3)[i])
        assert mod_generate(loaded.hoe, loaded.backbone.tokenizer, PROMPTS, np.eye(3)[i], GREEDY) == expert


def test_mod_first_token_maximises_the_weighted_log_probabilities(loaded):
    lam = np.array([0.5, 0.3, 0.2])
    tok = loaded.backbone.tokenizer
    experts = vertex_experts(loaded.hoe)
    enc = encode_chat(tok, PROMPTS, "cpu")
    score = 0
    for i, e in enumerate(experts):
        w = mixture_weights(loaded.hoe, [e], np.ones(1), len(PROMPTS))
        last = logits(loaded.hoe.model, loaded, anchor_weights=w)[:, -1]
        seen = torch.zeros_like(last, dtype=torch.bool).scatter_(1, enc["input_ids"], True)
        last = torch.where(seen, torch.where(last > 0, last / 1.2, last * 1.2), last)  # repetition penalty
        score = score + lam[i] * torch.log_softmax(last, -1)
    first = DecodingConfig(max_new_tokens=1, temperature=0.0, repetition_penalty=1.2)
    texts = mod_generate(loaded.hoe, tok, PROMPTS, lam, first)
    expected = [tok.decode([t], skip_special_tokens=True).strip() for t in score.argmax(-1).tolist()]
    assert texts == expected


def test_merge_ta_is_the_weighted_sum_of_deltas(loaded):
    lam = [0.2, 0.5, 0.3]
    merger = MergeAtPreference(single_factors(loaded.hoe, loaded.experts), "ta", "cpu")
    deltas = merger.deltas(np.array(lam))
    factors = single_factors(loaded.hoe, loaded.experts)
    for name, delta in deltas.items():
        torch.testing.assert_close(delta, sum(w * f[name].dense() for w, f in zip(lam, factors)))
    with use_deltas(loaded.hoe, deltas):
        ours = logits(loaded.hoe.model, loaded)
    torch.testing.assert_close(ours, logits(dense_interpolation(loaded, lam), loaded), atol=1e-4, rtol=1e-4)
    assert torch.equal(logits(loaded.hoe.model, loaded), logits(loaded.hoe.model, loaded))  # hook is scoped


def test_merge_ties_at_a_vertex_is_the_trimmed_expert(loaded):
    from peft.utils.merge_utils import prune

    factors = single_factors(loaded.hoe, loaded.experts)
    deltas = MergeAtPreference(factors, "ties", "cpu", density=0.5).deltas(np.array([0.0, 1.0, 0.0]))
    for name, delta in deltas.items():
        expected = prune(factors[1][name].dense().reshape(-1), 0.5, "magnitude").reshape(delta.shape)
        torch.testing.assert_close(delta, expected)


def test_every_method_answers_every_prompt_deterministically(loaded):
    names = expand_methods(
        ["hoe", "rs", "mod", "merge-ta", "merge-ties", "base", "experts"], loaded.objectives
    )
    assert names[-3:] == ["expert-helpful", "expert-harmless", "expert-humor"]
    lam = np.array([0.2, 0.5, 0.3])
    for name in names:
        method = make_method(name, loaded, GREEDY)
        texts = method(PROMPTS, lam)
        assert len(texts) == len(PROMPTS) and texts == method(PROMPTS, lam), name
    assert preference_free("base") and preference_free("expert-humor") and not preference_free("rs")


def test_unknown_methods_are_named(loaded):
    with pytest.raises(ValueError, match="unknown method 'soup'.*merge-ties"):
        expand_methods(["hoe", "soup"], loaded.objectives)
    with pytest.raises(ValueError, match="repeat"):
        expand_methods(["rs", "rs"], loaded.objectives)
    with pytest.raises(ValueError, match="expert-humor"):
        make_method("expert-funny", loaded, GREEDY)
