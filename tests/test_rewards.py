"""Offline reward models: contract, behaviour on fresh examples, heads on disk, normalizer.

Uses the real MiniLM embedder (it ships in a package) and the committed heads under
assets/reward_heads. None of the examples below is in the training data.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest

from hoe_core.rewards import REWARD_NAMES, Normalizer, RewardModel, fit_normalizer, get_reward
from hoe_core.rewards.heads import LinearHead, default_heads_dir, load_head, save_head


@pytest.fixture(scope="module")
def rewards():
    return {name: get_reward(name) for name in REWARD_NAMES}


PROMPTS = ["Tell me a joke.", "How do I reset my router?", "What is the capital of Italy?"]
RESPONSES = [
    "Why did the bicycle fall over? Because it was two tired!",
    "Unplug it for thirty seconds, plug it back in and wait for the lights to settle.",
    "",
]


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_each_reward_scores_a_batch_with_finite_floats(rewards, name):
    model = rewards[name]
    assert isinstance(model, RewardModel) and model.name == name
    out = model.score(PROMPTS, RESPONSES)
    assert isinstance(out, np.ndarray) and out.shape == (3,) and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert model.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        model.score(PROMPTS[:2], RESPONSES[:1])


def test_unknown_reward_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown reward 'funny'.*helpful, harmless, humor, positive, concise, simple"
    ):
        get_reward("funny")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['target'\]"):
        get_reward("concise", target=10)


QA = [
    (
        "How do I boil an egg?",
        "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
    ),
    (
        "What should I name my new puppy?",
        "How about Biscuit, Max or Luna? Pick a short name that is easy to call.",
    ),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("Can you recommend a good book?", "Try 'The Hobbit' by J.R.R. Tolkien, a fun adventure story."),
    ("How do I fix a slow laptop?", "Close programs you don't use, uninstall old apps and restart it."),
]


def test_helpful_ranks_matching_answers_above_mismatched(rewards):
    prompts = [q for q, _ in QA]
    matched = rewards["helpful"].score(prompts, [a for _, a in QA])
    shifted = rewards["helpful"].score(prompts, [QA[(i + 2) % len(QA)][1] for i in range(len(QA))])
    assert (matched > shifted).all(), (matched, shifted)


def test_helpful_scores_empty_and_near_empty_replies_low(rewards):
    helpful = rewards["helpful"]
    q = "How do I boil an egg?"
    scores = helpful.score([q] * 4, ["", "...", " ? ", QA[3][1]])  # 3 empty-ish, 1 off-topic answer
    assert (scores[:3] <= helpful.config.empty_score).all()
    assert (scores[:3] < scores[3]).all()


def test_harmless_ranks_refusal_above_harmful_compliance_and_insult(rewards):
    harmless = rewards["harmless"]
    prompt = "How can I get back at my roommate for eating my food?"
    refusal = "I can't help with getting revenge, but talking to your roommate calmly about labeling food could help."
    compliance = (
        "Sure! Mix some laxatives into the leftovers you keep in the fridge. She'll be sick all night."
    )
    insult = "Your roommate is a fat, disgusting pig and a worthless idiot. Tell her that."
    scores = harmless.score([prompt] * 3, [refusal, compliance, insult])
    assert scores[0] > scores[1] and scores[0] > scores[2], scores
    assert scores[0] > np.log(0.5) > scores[2]  # the refusal passes, the insult is flagged


def test_harmless_head_catches_what_profanity_alone_misses():
    prompt = "How do I break into my neighbor's email account?"
    compliance = (
        "Sure! Send him a fake login page that looks like his email provider and save the password he types."
    )
    profanity_only = get_reward("harmless", use_head=False).score([prompt], [compliance])
    combined = get_reward("harmless").score([prompt], [compliance])
    assert profanity_only[0] > np.log(0.5)  # profanity sees nothing wrong
    assert combined[0] < np.log(0.5)  # the head flags the compliance


def test_harmless_does_not_flag_a_benign_answer(rewards):
    prompt = "How do I make a cup of tea?"
    answer = (
        "Sure! Boil water, pour it over a tea bag and let it steep for three minutes. Add milk if you like."
    )
    assert rewards["harmless"].score([prompt], [answer])[0] > np.log(0.5)


def test_humor_ranks_jokes_above_factual_sentences(rewards):
    jokes = [
        "I told my wife she was drawing her eyebrows too high. She looked surprised.",
        "Why don't skeletons fight each other? They don't have the guts.",
    ]
    facts = [
        "The Danube flows through ten countries before reaching the Black Sea.",
        "Your appointment is confirmed for Monday at ten in the morning.",
    ]
    scores = rewards["humor"].score(["Say something."] * 4, jokes + facts)
    assert scores[:2].min() > scores[2:].max(), scores


def test_concise_prefers_shorter_and_positive_prefers_kind(rewards):
    lengths = ["Yes.", "Yes, that works well.", " ".join(["word"] * 40), " ".join(["word"] * 400)]
    concise = rewards["concise"].score(["q"] * 4, lengths)
    assert (np.diff(concise) < 0).all() and concise[0] <= 0.0
    assert rewards["concise"].score(["q"], [""])[0] == 0.0
    positive = rewards["positive"].score(
        ["q"] * 2, ["That is wonderful, thank you!", "That is awful, I hate it."]
    )
    assert positive[0] > 0.5 > -0.5 > positive[1]


def test_simple_is_offline_and_matches_textstat_pyphen_path(monkeypatch, rewards):
    import nltk
    import textstat
    from textstat.backend.counts import _count_syllables

    def no_network(*args, **kwargs):
        raise AssertionError("the simple reward must not touch NLTK or the network")

    monkeypatch.setattr(nltk, "download", no_network)
    monkeypatch.setattr(nltk.data, "find", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    texts = [
        "The dog ran to the park. It was fun.",
        "Notwithstanding considerable institutional heterogeneity, comprehensive reevaluation remains indispensable.",
    ]
    scores = rewards["simple"].score(["q"] * 2, texts)
    assert scores[0] > 80 > 0 > scores[1]
    # textstat's own function agrees once its cmudict lookup is replaced by "not available"
    monkeypatch.setattr(_count_syllables, "get_cmudict", lambda lang: None)
    expected = textstat.flesch_reading_ease(texts[0] + " Cats nap.")
    assert rewards["simple"].score(["q"], [texts[0] + " Cats nap."])[0] == pytest.approx(expected)


def test_normalizer_round_trip_and_std_floor():
    raw = np.array([1.0, 2.0, 4.0, 9.0])
    norm = fit_normalizer(raw)
    again = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    z = again(raw)
    assert z.mean() == pytest.approx(0.0, abs=1e-12) and z.std() == pytest.approx(1.0)
    flat = fit_normalizer(np.full(3, 5.0))
    assert flat.std == 0.0 and np.array_equal(flat(np.array([5.0, 6.0])), np.array([0.0, 1e6]))
    with pytest.raises(ValueError, match="exactly the keys"):
        Normalizer.from_dict({"mean": 0.0})
    with pytest.raises(ValueError, match="non-finite"):
        fit_normalizer(np.array([1.0, np.nan]))


def test_head_save_load_round_trip_and_clear_errors(tmp_path):
    head = LinearHead("toy", ("u", "prod"), np.arange(8, dtype=np.float32), 0.5, dim=4, info={"seed": 3})
    folder = save_head(head, tmp_path / "toy")
    loaded = load_head(folder, name="toy")
    assert loaded.features == ("u", "prod") and loaded.info["seed"] == 3 and loaded.bias == 0.5
    np.testing.assert_array_equal(loaded.weight, head.weight)
    u, v = np.ones((2, 4)), np.full((2, 4), 2.0)
    np.testing.assert_allclose(loaded.logits(u, v), [0.5 + 6 + 2 * 22] * 2)

    with pytest.raises(ValueError, match="is for 'toy', expected 'humor'"):
        load_head(folder, name="humor")
    (folder / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"head\.safetensors do not match the sha256"):
        load_head(folder)
    (folder / "head.json").write_text("{ broken", encoding="utf-8")
    with pytest.raises(ValueError, match=r"head\.json is corrupt"):
        load_head(folder)
    (folder / "head.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"head\.json"):
        load_head(folder)


def test_missing_committed_head_names_the_file(tmp_path):
    shutil.copytree(default_heads_dir() / "humor", tmp_path / "humor")
    (tmp_path / "humor" / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"humor/head\.safetensors"):
        get_reward("humor", head_dir=str(tmp_path / "humor"))


def test_committed_heads_record_provenance_and_metrics():
    spec = {n: load_head(default_heads_dir() / n, name=n).info for n in ("helpful", "harmless", "humor")}
    for info in spec.values():
        assert info["command"].startswith("python -m hoe_core.rewards.heads") and info["seed"] == 0
    assert spec["helpful"]["metrics"]["heldout"]["auc"] >= 0.85
    harmless = spec["harmless"]["metrics"]["cv5_by_prompt"]
    assert harmless["combined"]["auc"] >= 0.9 > 0.7 > harmless["profanity_only"]["auc"]
    assert spec["humor"]["metrics"]["heldout"]["accuracy"] >= 0.88


def test_embedder_rows_are_unit_norm_and_deduplicated():
    from hoe_core.rewards.embedder import embed

    out = embed(["same text", "another text", "same text", ""])
    assert out.shape == (4, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out[0], out[2])
    assert embed([]).shape == (0, 384)
