"""Recipe step 1: the sample cache is complete, seeded per chunk, and resumes."""

import numpy as np
import pytest

from hoe_core.training.sampling import (
    Sample,
    SamplingConfig,
    preference_pairs,
    sample_and_score,
    sample_responses,
)


class LengthReward:
    def score(self, prompts, responses):
        return np.array([len(r) for r in responses], float)


PROMPTS = [(f"p{i}", f"question number {i}?") for i in range(5)]


def test_sampling_caches_scores_and_resumes_identically(pico_model, pico_tokenizer, tmp_path):
    cfg = SamplingConfig(k=2, max_new_tokens=6, batch_size=4, temperature=1.0)
    rewards = {"long": LengthReward()}
    first = sample_and_score(pico_model, pico_tokenizer, PROMPTS, rewards, cfg, tmp_path / "c")
    assert len(first) == len(PROMPTS) * cfg.k
    assert [s.prompt_id for s in first] == [pid for pid, _ in PROMPTS for _ in range(2)]
    assert all(s.rewards["long"] == len(s.response) for s in first)
    chunks = sorted((tmp_path / "c" / "responses").glob("chunk_*.jsonl"))
    assert len(chunks) == 3  # 2 prompts x 2 samples per chunk of 4 rows
    kept = chunks[0].stat().st_mtime_ns
    chunks[1].unlink()  # an interrupted run lost this chunk
    again = sample_and_score(pico_model, pico_tokenizer, PROMPTS, rewards, cfg, tmp_path / "c")
    assert again == first
    assert chunks[0].stat().st_mtime_ns == kept  # done chunks are not resampled
    scores = tmp_path / "c" / "scores" / "long.json"
    stamp = scores.stat().st_mtime_ns
    sample_and_score(pico_model, pico_tokenizer, PROMPTS, rewards, cfg, tmp_path / "c")
    assert scores.stat().st_mtime_ns == stamp  # same responses: scores reused
    chunks[2].write_text(chunks[2].read_text().replace('"response": "', '"response": "x'))
    rescored = sample_and_score(pico_model, pico_tokenizer, PROMPTS, rewards, cfg, tmp_path / "c")
    assert scores.stat().st_mtime_ns != stamp and rescored[-1].response.startswith("x")


def test_bad_cache_lines_are_reported_with_file_and_line(pico_model, pico_tokenizer, tmp_path):
    cfg = SamplingConfig(k=2, max_new_tokens=4, batch_size=4)
    cache = tmp_path / "r"
    cache.mkdir()
    (cache / "chunk_00000.jsonl").write_text('{"prompt_id": "a"}\n')
    with pytest.raises(ValueError, match="chunk_00000.jsonl:1: bad sample record"):
        sample_responses(pico_model, pico_tokenizer, PROMPTS[:2], cfg, cache)


def test_preference_pairs_take_best_and_worst_per_prompt():
    samples = [
        Sample("a", "qa", "x", {"h": 0.1}),
        Sample("a", "qa", "y", {"h": 0.9}),
        Sample("a", "qa", "z", {"h": 0.5}),
        Sample("b", "qb", "u", {"h": 0.3}),
        Sample("b", "qb", "v", {"h": 0.3}),  # no gap: no pair
    ]
    pairs = preference_pairs(samples, "h")
    assert pairs == [{"prompt": "qa", "chosen": "y", "rejected": "x", "gap": pytest.approx(0.8)}]


def test_preference_pairs_keep_the_largest_gaps_in_prompt_order():
    samples = [
        Sample(pid, f"q{pid}", resp, {"h": r})
        for pid, lo, hi in [("a", 0.0, 0.2), ("b", 0.0, 0.9), ("c", 0.1, 0.4), ("d", 0.0, 0.7)]
        for resp, r in [("lo", lo), ("hi", hi)]
    ]
    pairs = preference_pairs(samples, "h", max_pairs=2)
    assert [p["prompt"] for p in pairs] == ["qb", "qd"]
    assert len(preference_pairs(samples, "h", max_pairs=10)) == 4
