"""``python -m hoe_core evaluate`` on a pico bundle: the CSV contract, determinism, resume,
the summary's metrics, and clear errors for bad input."""

import csv
import json
import shutil

import numpy as np
import pytest

from hoe_core.cli import main
from hoe_core.evaluation.run import read_csv
from hoe_core.evaluation.summary import summarize, win_rate


@pytest.fixture(scope="module")
def evaluated(pico_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    prompts = folder / "prompts.txt"
    prompts.write_text("hello there\n\nwhy is the sky blue?\ntell me a joke\n")
    out = folder / "front.csv"
    args = ["evaluate", "--bundle", str(pico_bundle), "--methods", "hoe,rs,mod,merge-ties,base,experts"]
    args += ["--prompts", str(prompts), "--grid", "3", "--max-new-tokens", "6", "--batch-size", "2"]
    args += ["--precision", "fp32", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    return args, out


def test_csv_has_one_row_per_method_preference_and_prompt(evaluated):
    _, out = evaluated
    with out.open() as f:
        header = next(csv.reader(f))
    objectives = ["helpful", "harmless", "humor"]
    assert header == ["method", "prompt_id"] + [f"w_{o}" for o in objectives] + [
        f"r_{o}" for o in objectives
    ] + ["text"]
    rows, _ = read_csv(out)
    methods = ["hoe", "rs", "mod", "merge-ties", "base", "expert-helpful", "expert-harmless", "expert-humor"]
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods
    assert len(rows) == len(methods) * 6 * 3  # 6 preferences on the 3-objective simplex with G=3
    for r in rows:
        assert abs(sum(r[f"w_{o}"] for o in objectives) - 1) < 1e-9
        assert all(np.isfinite(r[f"r_{o}"]) for o in objectives)
    base = [r["text"] for r in rows if r["method"] == "base"]
    assert base[:3] * 6 == base  # a preference-free method gives the same answers at every lambda


def test_two_runs_give_identical_files_and_a_rerun_resumes(evaluated, tmp_path):
    args, out = evaluated
    first = out.read_bytes()
    parts = out.with_name(out.name + ".parts")
    stamp = {p: p.stat().st_mtime_ns for p in parts.rglob("*.json")}
    assert main(args) == 0  # resumed: no part is recomputed
    assert {p: p.stat().st_mtime_ns for p in parts.rglob("*.json")} == stamp
    assert out.read_bytes() == first
    fresh = tmp_path / "again.csv"
    again = [a if a != str(out) else str(fresh) for a in args]
    assert main(again) == 0  # from scratch: greedy decoding is deterministic
    assert fresh.read_bytes() == first


def test_summary_reports_hypervolume_steerability_and_win_rates(evaluated):
    _, out = evaluated
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["reference_point"] == [-1.0, -1.0, -1.0] and summary["normalised"] is False
    hoe = summary["methods"]["hoe"]
    assert len(hoe["points"]) == 6 and set(hoe["steerability"]) == {"helpful", "harmless", "humor"}
    assert summary["methods"]["base"]["steerability"] is None
    assert set(summary["win_rate"]) == set(summary["methods"]) - {"hoe"}
    assert all(0 <= v <= 1 for v in summary["win_rate"].values())
    assert summary["timing"]["mod"]["generations"] == 6 * 3 and summary["timing"]["base"]["generations"] == 3
    assert "| `hoe` |" in out.with_suffix(".summary.md").read_text()


def test_metrics_on_hand_made_rows():
    def row(m, w, r, pid="p0"):
        return {"method": m, "prompt_id": pid, "w_a": w[0], "w_b": w[1], "r_a": r[0], "r_b": r[1]}

    rows = [
        row("hoe", (1, 0), (2, 0)),
        row("hoe", (0, 1), (0, 2)),
        row("rs", (1, 0), (1, 0)),
        row("rs", (0, 1), (0, 3)),
    ]
    s = summarize(rows, ["a", "b"], reference=[-1, -1])
    # hoe: points (2,0),(0,2) vs ref (-1,-1): 3*1 + 1*3 - 1*1 = 5
    assert s["methods"]["hoe"]["hypervolume"] == pytest.approx(5.0)
    assert s["methods"]["hoe"]["steerability"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert win_rate(rows, ["a", "b"], "hoe", "rs") == pytest.approx(0.5)  # wins at (1,0), loses at (0,1)


def test_hv_gap_is_a_paired_bootstrap_over_prompts():
    def row(m, w, r, pid):
        return {"method": m, "prompt_id": pid, "w_a": w[0], "w_b": w[1], "r_a": r[0], "r_b": r[1]}

    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        hard = rng.normal(0, 1)  # prompt difficulty, shared by both methods: it cancels
        for w in [(1, 0), (0.5, 0.5), (0, 1)]:
            rows.append(row("hoe", w, (hard + 1.0 + w[0], hard + 1.0 + w[1]), f"p{k}"))
            rows.append(row("rs", w, (hard + 0.9 + w[0], hard + 0.9 + w[1]), f"p{k}"))
    s = summarize(rows, ["a", "b"], reference=[-5, -5])
    gap = s["hv_gap"]["rs"]
    hv = {m: s["methods"][m]["hypervolume"] for m in ("hoe", "rs")}
    assert gap["gap"] == pytest.approx(hv["hoe"] - hv["rs"]) and gap["gap"] > 0
    assert 0 < gap["low"] <= gap["high"] and gap["p_a_below"] == 0.0  # better on every prompt
    hoe_rows = [r for r in rows if r["method"] == "hoe"]
    same = summarize(hoe_rows + [{**r, "method": "x"} for r in hoe_rows], ["a", "b"], [-5, -5])
    assert same["hv_gap"]["x"] == {"gap": 0.0, "low": 0.0, "high": 0.0, "p_a_below": 0.0}


def test_method_inputs_follow_what_each_method_reads(pico_bundle):
    """A rebuild that only changes routers keeps the baselines' cached answers valid."""
    from dataclasses import replace

    from hoe_core.bundle import read_manifest
    from hoe_core.evaluation.run import method_inputs

    manifest = read_manifest(pico_bundle)
    names = ["hoe", "rs", "mod", "merge-ties", "base", "expert-helpful"]
    before = {n: method_inputs(manifest, n) for n in names}
    assert before["rs"] == before["mod"] == before["expert-helpful"]  # all read the single experts
    assert len({before["hoe"], before["rs"], before["base"]}) == 3
    routed = replace(
        manifest,
        routers=[replace(r, anchor=[0.5, 0.25, 0.25]) for r in manifest.routers],
        files={**manifest.files, **{r.path: "0" * 64 for r in manifest.routers}},
    )
    after = {n: method_inputs(routed, n) for n in names}
    assert after["hoe"] != before["hoe"]
    assert {n: after[n] for n in names[1:]} == {n: before[n] for n in names[1:]}
    single = manifest.experts[0]
    touched = replace(
        manifest, files={**manifest.files, f"{single.path}/adapter_model.safetensors": "1" * 64}
    )
    assert method_inputs(touched, "rs") != before["rs"] and method_inputs(touched, "base") == before["base"]


def test_bad_input_fails_before_loading_with_a_clear_message(pico_bundle, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    base = [
        "evaluate",
        "--bundle",
        str(pico_bundle),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o.csv"),
    ]
    assert main(base + ["--methods", "hoe,soups", "--grid", "3"]) == 2
    assert "unknown method 'soups'" in capsys.readouterr().err
    assert main(base + ["--methods", "hoe", "--grid", "1"]) == 2
    assert "--grid must be an integer >= 2" in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path / "missing.txt"), *base[5:], "--methods", "hoe", "--grid", "3"]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
    shutil.rmtree(tmp_path)


def test_fronts_readme_says_when_the_prompts_do_not_separate_hoe_from_a_baseline():
    from hoe_core.evaluation.fronts import readme

    def method(hv, steer=None):
        return {
            "points": [{}] * 3,
            "hypervolume": hv,
            "steerability": steer,
            "preference_free": steer is None,
        }

    summary = {
        "objectives": ["a", "b"],
        "reference_point": [-1.0, -1.0],
        "normalised": True,
        "methods": {
            "hoe": method(2.0, {"a": 0.9, "b": 0.7}),
            "rs": method(1.9, {"a": 1, "b": 1}),
            "mod": method(1.0, {}),
        },
        "hv_gap": {
            "rs": {"gap": 0.1, "low": -0.3, "high": 0.4, "p_a_below": 0.3},
            "mod": {"gap": 1.0, "low": 0.2, "high": 1.5, "p_a_below": 0.0},
        },
        "win_rate": {"rs": 0.5, "mod": 0.7},
        "timing": {},
    }
    text = readme("b", {"nf4": summary}, "cmd", 8, 3)
    assert "HoE's hypervolume is the highest; its steerability is under 0.8 for b." in text
    assert "includes 0 against `rs`: more prompts" in text and "`mod`:" not in text
    assert "+0.100 [-0.300, +0.400]" in text
    alone = {**summary, "methods": {"hoe": summary["methods"]["hoe"]}, "hv_gap": {}, "win_rate": {}}
    text = readme("b", {"int8": alone}, "cmd", 8, 3)
    assert "the highest" not in text and "HoE's hypervolume is 2.000 (no other method in this run)" in text
