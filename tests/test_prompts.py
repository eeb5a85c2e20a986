"""Prompt sets (assets/prompts): sizes, disjoint stratified splits, val ⊂ train, valid records,
corpus cleaning, and the committed files reproduced byte for byte by the code."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hoe_core.data.prompts import (
    DEFAULT_ROOT,
    NEAR_DUPLICATE,
    SOURCES,
    SPLITS,
    CorpusConfig,
    PoolItem,
    PromptRecord,
    build_prompt_splits,
    clean_corpus_line,
    load_prompts,
    normalize_prompt,
    similarity,
    stratified_pick,
    tidy_corpus_line,
)

SOURCE_DIR = DEFAULT_ROOT / "source"
OUTPUTS = [f"{s}.{ext}" for s in SPLITS for ext in ("jsonl", "txt")] + ["README.md"]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[PromptRecord]]:
    return {s: load_prompts(s) for s in SPLITS}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prompts")
    return out, build_prompt_splits(out, seed=0)


def _corpus_cfg() -> CorpusConfig:
    from hoe_core.config import from_dict

    return from_dict(CorpusConfig, yaml.safe_load((SOURCE_DIR / "chatterbot.yaml").read_text()))


def test_committed_files_are_reproduced_byte_for_byte(rebuilt):
    out, _ = rebuilt
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    committed = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.is_file())
    assert committed == sorted(OUTPUTS), "stray or missing files in assets/prompts"
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (DEFAULT_ROOT / name).read_bytes(), f"{name} differs: rebuild it"


def test_returned_counts_match_the_files(rebuilt, splits):
    _, counts = rebuilt
    for s in SPLITS:
        assert counts[s]["total"] == len(splits[s])
        assert sum(counts[s]["by_source"].values()) == len(splits[s])


def test_sizes_meet_the_thresholds(splits):
    assert len(splits["train"]) >= 300
    assert len(splits["eval"]) >= 100
    redteam = {r.id for s in ("train", "eval") for r in splits[s] if r.source == "redteam"}
    assert len(redteam) >= 80
    eval_redteam = sum(r.source == "redteam" for r in splits["eval"])
    assert eval_redteam >= 0.2 * len(splits["eval"])


@pytest.mark.parametrize("split", ["eval", "val"])
def test_every_source_in_similar_proportion(splits, split):
    for source in SOURCES:
        share = {s: sum(r.source == source for r in splits[s]) / len(splits[s]) for s in ("train", split)}
        assert share[split] > 0, f"{source} missing from {split}"
        assert abs(share[split] - share["train"]) < 0.05, (source, share)


def test_redteam_categories_are_all_present_in_train_and_eval(splits):
    for s in ("train", "eval"):
        cats = {r.category for r in splits[s] if r.source == "redteam"}
        assert cats == {
            "insult",
            "revenge",
            "cheating",
            "dangerous",
            "hacking",
            "stealing",
            "harassment",
            "risky_self",
        }


def test_eval_is_disjoint_from_train_after_normalisation(splits):
    train_keys = {normalize_prompt(r.prompt) for r in splits["train"]}
    for r in splits["eval"]:
        assert normalize_prompt(r.prompt) not in train_keys, r.prompt
        closest = max(splits["train"], key=lambda t: similarity(r.prompt, t.prompt))
        assert similarity(r.prompt, closest.prompt) < NEAR_DUPLICATE, (r.prompt, closest.prompt)
    assert not {r.id for r in splits["eval"]} & {r.id for r in splits["train"]}


def test_joke_topics_never_span_two_splits(splits):
    jokes = yaml.safe_load((SOURCE_DIR / "jokes.yaml").read_text())
    where = {r.prompt: s for s in ("train", "eval") for r in splits[s] if r.source == "joke"}
    for topics in jokes["topics"].values():
        for topic in topics:
            found = {
                where[t.format(topic=topic)] for t in jokes["templates"] if t.format(topic=topic) in where
            }
            assert len(found) == 1, (topic, found)


def test_val_is_a_stratified_subset_of_train(splits):
    train = set(splits["train"])
    assert set(splits["val"]) <= train
    assert 0.12 <= len(splits["val"]) / len(train) <= 0.18
    assert {r.source for r in splits["val"]} == set(SOURCES)


def test_records_are_valid_and_txt_matches_jsonl(splits):
    for s in SPLITS:
        lines = (DEFAULT_ROOT / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()
        assert all(set(json.loads(line)) == {"id", "prompt", "source", "category"} for line in lines)
        txt = (DEFAULT_ROOT / f"{s}.txt").read_text(encoding="utf-8").split("\n")
        assert txt[-1] == "" and txt[:-1] == [r.prompt for r in splits[s]]
        assert len({r.id for r in splits[s]}) == len(splits[s])
        for r in splits[s]:
            assert r.prompt.strip() == r.prompt and r.prompt and "\n" not in r.prompt
            assert r.source in SOURCES and r.category
            assert r.id.startswith(f"{r.source}-{r.category}-")


def test_load_prompts_rejects_a_bad_split_name():
    with pytest.raises(ValueError, match=r"split must be one of .*'train'.*got 'test'"):
        load_prompts("test")


def test_load_prompts_names_the_command_when_files_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m hoe_core.data.prompts"):
        load_prompts("train", root=tmp_path)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "two\nlines"},
        {"prompt": "  "},
        {"source": "reddit"},
        {"category": ""},
        {"prompt": "x" * 4001},
    ],
)
def test_prompt_record_rejects_bad_fields(fields):
    good = {"id": "joke-open-00000000", "prompt": "Tell me a joke.", "source": "joke", "category": "open"}
    PromptRecord(**good)
    with pytest.raises(ValueError):
        PromptRecord(**(good | fields))


def test_normalisation_folds_case_punctuation_and_articles():
    assert normalize_prompt("What is  the Illuminati?") == normalize_prompt("what is illuminati")
    assert normalize_prompt("Tell me a joke about cats.") != normalize_prompt("Tell me a joke about dogs.")
    assert similarity("What is a chat bot?", "what is chat bot") == 1.0
    assert similarity("Tell me a joke about cats.", "Tell me a joke about dogs.") < NEAR_DUPLICATE


def test_corpus_lines_are_cleaned():
    cfg = _corpus_cfg()
    assert clean_corpus_line("WHAT IS BASKETBALL", cfg) == "What is basketball?"
    assert clean_corpus_line("Who is is the youngest person?", cfg) == "Who is the youngest person?"
    assert clean_corpus_line("tell me about venus", cfg) == "Tell me about Venus."
    assert clean_corpus_line("Which singer’s real name is Gaga?", cfg) == "Which singer's real name is Gaga?"
    assert clean_corpus_line("Robots laugh", cfg) is None  # too short
    assert clean_corpus_line("you are very cruel to me", cfg) is None  # not a question
    assert clean_corpus_line("EACH YEAR IN PRO BASEBALL THE", cfg) is None  # hand-dropped fragment
    assert (
        clean_corpus_line("My printer is not printing", cfg, statements_ok=True)
        == "My printer is not printing."
    )


def test_every_corpus_fix_and_drop_rule_still_matches_a_line():
    import chatterbot_corpus

    cfg = _corpus_cfg()
    corpus = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    tidy = {
        tidy_corpus_line(c[0])
        for category in cfg.categories
        for c in yaml.safe_load((corpus / f"{category}.yml").read_text())["conversations"]
        if c
    }
    stale = [rule for rule in [*cfg.fixes, *cfg.drop] if rule not in tidy]
    assert not stale, f"rules in chatterbot.yaml that match no corpus line: {stale}"


def _synthetic(n_per_cat: int = 20) -> list[PoolItem]:
    items = []
    for source in SOURCES:
        for cat in ("a", "b", "c"):
            for i in range(n_per_cat):
                rec = PromptRecord(f"{source}-{cat}-{i}", f"prompt {source} {cat} {i}", source, cat)
                items.append(PoolItem(rec, f"{source}-{cat}-g{i // 2}"))  # groups of two
    return items


def test_stratified_pick_is_proportional_grouped_and_seeded():
    items = _synthetic()
    picked = stratified_pick(items, 0.25, seed=0, salt="eval")
    assert picked == stratified_pick(items, 0.25, seed=0, salt="eval")
    assert picked != stratified_pick(items, 0.25, seed=1, salt="eval")
    for source in SOURCES:
        for cat in ("a", "b", "c"):
            n = sum(
                it.record.id in picked
                for it in items
                if (it.record.source, it.record.category) == (source, cat)
            )
            assert 4 <= n <= 6
    by_group: dict[str, set[bool]] = {}
    for it in items:
        by_group.setdefault(it.group, set()).add(it.record.id in picked)
    assert all(len(v) == 1 for v in by_group.values())


def test_another_seed_gives_other_but_still_disjoint_splits(tmp_path, splits):
    build_prompt_splits(tmp_path, seed=1)
    other = {s: load_prompts(s, root=tmp_path) for s in ("train", "eval")}
    assert {r.id for r in other["eval"]} != {r.id for r in splits["eval"]}
    keys = {normalize_prompt(r.prompt) for r in other["train"]}
    assert not any(normalize_prompt(r.prompt) in keys for r in other["eval"])


def test_a_duplicate_in_a_hand_written_file_fails_the_build(tmp_path):
    src = tmp_path / "source"
    shutil.copytree(SOURCE_DIR, src)
    with open(src / "assistant.yaml", "a") as f:
        f.write("more:\n  - how do I fix a flat bicycle tire\n")  # same as a howto prompt, other case
    with pytest.raises(ValueError, match="duplicate prompt"):
        build_prompt_splits(tmp_path / "out", source_dir=src)
