"""Recipe step 5: OMD weights follow the Tchebycheff rule; router training changes only
the router's gates and logs a per-objective curve."""

import numpy as np
import pytest
import torch

from hoe_core.pico import random_router
from hoe_core.routing.model import HoEModel
from hoe_core.training.routers import RouterTrainingConfig, TchebycheffOMD, train_router


def test_omd_moves_weight_to_the_objective_furthest_from_its_ideal():
    omd = TchebycheffOMD(np.array([0.5, 0.5]), eta=1.0, alpha=1.0)
    w = omd.update(mean_rewards=np.array([0.0, 1.0]), ideal=np.array([1.0, 1.0]))
    assert w[0] > w[1] and abs(w.sum() - 1) < 1e-12
    equal = TchebycheffOMD(np.array([0.5, 0.5])).update(np.array([0.3, 0.3]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(equal, [0.5, 0.5])
    smooth = TchebycheffOMD(np.array([0.5, 0.5]), eta=5.0, alpha=0.5)
    first = smooth.update(np.array([0.0, 1.0]), np.array([1.0, 1.0]))
    assert 0.5 < first[0] < 0.75  # smoothing keeps half of the old weights
    np.testing.assert_allclose(smooth.scalarize(np.array([[1.0, 2.0]])), [(first * [0.5, 0.5]) @ [1.0, 2.0]])


class HashReward:
    """A reward that differs between texts (random pico text rarely has structure)."""

    def __init__(self, mod):
        self.mod = mod

    def score(self, prompts, responses):
        return np.array([sum(r.encode()) % self.mod / self.mod for r in responses])


@pytest.mark.parametrize("scalarization", ["tchebycheff", "linear"])
def test_router_training_updates_only_the_router(
    pico_model, pico_tokenizer, three_experts, tmp_path, scalarization
):
    router = random_router(pico_model, "center", np.full(3, 1 / 3), three_experts, k=3, seed=2, std=0.0)
    hoe = HoEModel(pico_model, ["a", "b", "c"], three_experts, [router])
    frozen = {n: p.detach().clone() for n, p in pico_model.named_parameters() if ".gates." not in n}
    buffers = {n: b.clone() for n, b in pico_model.named_buffers()}
    gates_before = [p.detach().clone() for p in hoe.router_parameters(0)]
    rewards = {o: HashReward(m) for o, m in zip("abc", (97, 89, 83))}
    norms = {o: (lambda x: (x - 0.5) / 0.3) for o in "abc"}
    cfg = RouterTrainingConfig(
        steps=3, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, scalarization=scalarization
    )
    summary = train_router(
        hoe, pico_tokenizer, 0, ["hello", "tell me", "why?"], rewards, norms, cfg, tmp_path, ideal=[0.5] * 3
    )
    assert len(summary["curve"]) == 3 and {"reward_a", "reward_b", "reward_c", "w"} <= set(
        summary["curve"][0]
    )
    assert (tmp_path / f"router_center_{scalarization}.json").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(gates_before, hoe.router_parameters(0)))
    for n, p in pico_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for n, b in pico_model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert not any(p.requires_grad for p in hoe.router_parameters(0))
    exported = hoe.export_router(0)
    assert set(exported.gates) == set(hoe.layers)


def test_tchebycheff_router_training_needs_a_valid_ideal_point(pico_model, pico_tokenizer, three_experts):
    router = random_router(pico_model, "center", np.full(3, 1 / 3), three_experts, k=3, seed=2)
    hoe = HoEModel(pico_model, ["a", "b", "c"], three_experts, [router])
    rewards = {o: HashReward(97) for o in "abc"}
    norms = {o: (lambda x: x) for o in "abc"}
    cfg = RouterTrainingConfig(steps=1, prompts_per_step=1, samples_per_prompt=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="ideal point"):
        train_router(hoe, pico_tokenizer, 0, ["hi"], rewards, norms, cfg)
    with pytest.raises(ValueError, match="3 finite numbers"):
        train_router(hoe, pico_tokenizer, 0, ["hi"], rewards, norms, cfg, ideal=[0.1, float("nan"), 0.2])


def test_answer_mask_keeps_the_first_end_of_sequence_and_drops_padding():
    from hoe_core.training.routers import _answer_mask

    answers = torch.tensor([[5, 7, 2, 2, 2], [5, 7, 8, 9, 4], [2, 2, 2, 2, 2]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert _answer_mask(answers, torch.tensor([2])).tolist() == expected


def test_router_prior_starts_at_the_anchor_mixture(pico_model, three_experts):
    """init: anchor -- before training, the router mixes its subset with the given
    weights (floored), on every token: the output is the fixed mixture of those experts."""
    router = random_router(pico_model, "r", np.array([0.5, 0.25, 0.25]), three_experts, k=3, seed=2)
    hoe = HoEModel(pico_model, ["a", "b", "c"], three_experts, [router])
    hoe.set_router_prior(0, [0.0, 0.5, 0.5], floor=0.1)
    ids = torch.randint(0, pico_model.config.vocab_size, (2, 7))
    k = len(hoe.anchors)
    with torch.no_grad(), hoe.routing(anchor_weights=torch.eye(k)[[k - 1, k - 1]]):
        routed = pico_model(input_ids=ids).logits
    mixture = torch.zeros(2, k)
    floored = 0.9 * torch.tensor([0.0, 0.5, 0.5]) + 0.1 / 3
    mixture[:, [hoe.expert_names.index(x) for x in router.experts]] = floored
    with torch.no_grad(), hoe.routing(anchor_weights=mixture):
        fixed = pico_model(input_ids=ids).logits
    torch.testing.assert_close(routed, fixed, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="3 non-negative weights summing to 1"):
        hoe.set_router_prior(0, [0.5, 0.5])
    with pytest.raises(ValueError, match="summing to 1"):
        hoe.set_router_prior(0, [0.5, 0.6, -0.1])
