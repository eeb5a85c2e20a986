"""The whole build pipeline on the pico recipe: recipe YAML -> loadable bundle, resumable."""

import json

import numpy as np
import pytest

from hoe_core.bundle import load_bundle
from hoe_core.training.recipe import build
from hoe_core.training.recipe_config import load_recipe


def test_pico_recipe_builds_a_loadable_bundle_and_resumes(tmp_path):
    cfg = load_recipe("configs/pico.yaml")
    out = build(cfg, tmp_path / "bundle", work_dir=tmp_path / "work", command=["test"])
    loaded = load_bundle(out, device="cpu")
    m = loaded.manifest
    assert m.objectives == ["concise", "simple"]
    names = [e.name for e in m.experts]
    assert names[:2] == ["concise", "simple"] and len(names) == 3  # two vertices + one merged anchor
    merged = m.experts[2]
    assert merged.kind == "merged" and merged.info["method"] in ("ta", "pcb")
    assert [r.name for r in m.routers] == ["center"] and len(m.routers[0].experts) == 3
    report = m.recipe["report"]
    assert set(report["merge_selection_hv"]) == {"ta", "pcb"}
    evaluation, paired = report["eval_normalised_rewards"], report["eval_gain_over_base_paired"]
    assert {"base", "concise", "simple"} <= set(evaluation) and "base" not in paired
    for o in ["concise", "simple"]:  # the paired mean gain is the difference of the two means
        gain = evaluation["concise"][o]["mean"] - evaluation["base"][o]["mean"]
        assert paired["concise"][o]["mean"] == pytest.approx(gain)
    sweep = report["rank_sweep"]
    assert set(sweep["retained"]) == {"2", "4"} and set(sweep["chosen_ranks"]) == {"concise", "simple"}
    for i, o in enumerate(["concise", "simple"]):
        keeps = [int(r) for r, v in sweep["retained"].items() if v[i] is None or v[i] >= 0.9]
        assert sweep["chosen_ranks"][o] == (min(keeps) if keeps else 4)  # smallest rank that keeps 90%
        assert m.experts[i].info["task_svd"]["ranks"] == [sweep["chosen_ranks"][o]]
    assert merged.info["task_svd"]["ranks"] == [4]  # merged experts at task_svd.rank
    assert len(report["ideal_point"]) == 2
    (tcheb_path,) = (tmp_path / "work" / "routers").glob("center-tchebycheff-*.json")
    tcheb = json.loads(tcheb_path.read_text())
    np.testing.assert_allclose(tcheb["ideal"], np.array(report["ideal_point"]) + 0.1)
    assert set(m.rewards) == {"concise", "simple"} and "normalizer" in m.rewards["concise"]
    (linear,) = (tmp_path / "work" / "routers").glob("center-linear-*.json")
    curves = json.loads(linear.read_text())["curve"]
    assert len(curves) == 2 and "reward_concise" in curves[0]
    np.testing.assert_allclose(loaded.hoe.anchors[2], [0.5, 0.5])

    # a rerun reuses every step's output and writes the same experts and routers
    again = build(cfg, tmp_path / "bundle2", work_dir=tmp_path / "work", command=["test"])
    m2 = load_bundle(again, device="cpu").manifest
    for rel, digest in m.files.items():
        if rel.startswith(("experts/", "routers/")):
            assert m2.files[rel] == digest, rel


def test_recipe_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nobjectives: [a, b]\nsampling: {k: 4, typo: 1}\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_recipe(bad)
    bad.write_text("name: x\nobjectives: [a, b]\nanchors: [[0.5, 0.6]]\n")
    with pytest.raises(ValueError, match="summing to 1"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")


def test_shipped_recipe_prompt_splits():
    from hoe_core.training.recipe import _prompts

    train, val, evals, sweep = _prompts(load_recipe("configs/smollm2-hhh.yaml"))
    assert (len(train), len(val), len(evals), len(sweep)) == (434, 24, 64, 40)
    assert set(val) <= set(sweep)  # the merge selection's vertex rows come from the sweep
    assert not {p for _, p in evals} & {p for _, p in train}


def test_merge_sweeps_and_router_options(tmp_path):
    from hoe_core.training.recipe_config import MergeConfig

    merge = MergeConfig(
        methods=("ta", "ties"), params={"ta": {"scale": [1.0, 2.0]}, "ties": {"density": 0.5}}
    )
    assert merge.candidates() == [
        ("ta(scale=1.0)", "ta", {"scale": 1.0}),
        ("ta(scale=2.0)", "ta", {"scale": 2.0}),
        ("ties", "ties", {"density": 0.5}),
    ]
    cfg = tmp_path / "r.yaml"
    cfg.write_text("name: x\nobjectives: [a, b]\nrouters: [{name: r, anchor: [0.5, 0.5], ablation: false}]\n")
    (router,) = load_recipe(cfg).routers
    assert router.init == "anchor" and router.ablation is False
    cfg.write_text("name: x\nobjectives: [a, b]\nrouters: [{name: r, anchor: [0.5, 0.5], typo: 1}]\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_recipe(cfg)
    cfg.write_text("name: x\nobjectives: [a, b]\nrouters: [{name: r, anchor: [0.5, 0.5], init: zeros}]\n")
    with pytest.raises(ValueError, match="init must be 'anchor' or 'uniform'"):
        load_recipe(cfg)
