"""Reward fidelity across precisions: answer-by-answer comparison against fp32."""

import numpy as np
import pytest

from hoe_core.evaluation import fidelity as fid
from hoe_core.evaluation.run import write_csv

OBJ = ["a", "b"]


def _rows(shift=(0.0, 0.0), text="x", prompts=4, method="hoe"):
    rows = []
    for w in (1.0, 0.5, 0.0):
        for i in range(prompts):
            rng = np.random.default_rng(i)
            r = rng.normal(size=2) + np.array(shift)
            rows.append(
                {
                    "method": method,
                    "prompt_id": f"p{i}",
                    "w_a": w,
                    "w_b": 1 - w,
                    "r_a": r[0],
                    "r_b": r[1],
                    "text": text,
                }
            )
    return rows


def test_a_shifted_precision_shows_its_shift_and_the_reference_shows_none():
    out = fid.fidelity({"fp32": _rows(), "nf4": _rows(shift=(-0.5, 0.0), text="y")}, OBJ)
    ref, q = out["precisions"]["fp32"], out["precisions"]["nf4"]
    assert ref["cells"] == q["cells"] == 12
    assert ref["identical"] == 1.0 and q["identical"] == 0.0
    assert q["shift"]["a"][0] == pytest.approx(-0.5) and q["moved"]["a"] == pytest.approx(0.5)
    assert q["shift"]["b"][0] == pytest.approx(0.0, abs=1e-12)
    assert q["hypervolume"] < ref["hypervolume"]
    table = fid.markdown(out)
    assert table.splitlines()[2].startswith("| fp32 | 12 |") and "| nf4 | 12 |" in table and "0% |" in table


def test_only_shared_cells_are_compared_and_disjoint_fronts_are_refused():
    out = fid.fidelity({"fp32": _rows(), "int8": _rows(prompts=2)}, OBJ)
    assert out["precisions"]["int8"]["cells"] == 6
    other = [dict(r, prompt_id="q" + r["prompt_id"]) for r in _rows()]
    with pytest.raises(ValueError, match="share no"):
        fid.fidelity({"fp32": _rows(), "int8": other}, OBJ)
    with pytest.raises(ValueError, match="reference precision"):
        fid.fidelity({"nf4": _rows()}, OBJ)
    with pytest.raises(ValueError, match="no rows of method 'hoe'"):
        fid.fidelity({"fp32": _rows(), "nf4": _rows(method="rs")}, OBJ)


def test_cli_writes_the_table_and_rejects_bad_front_arguments(tmp_path, capsys):
    paths = {}
    for precision, shift in (("fp32", (0, 0)), ("bf16", (0.1, 0.0))):
        paths[precision] = tmp_path / f"front-{precision}.csv"
        write_csv(_rows(shift=shift), OBJ, paths[precision])
    md = tmp_path / "fid.md"
    assert fid.main([f"--front=fp32={paths['fp32']}", f"--front=bf16={paths['bf16']}", "--md", str(md)]) == 0
    assert "| bf16 | 12 |" in md.read_text() and "+0.100" in capsys.readouterr().out
    assert "Command: `python -m hoe_core.evaluation.fidelity --front=fp32=" in md.read_text()
    for bad in ("fp32", f"fp32={tmp_path / 'missing.csv'}"):
        with pytest.raises(SystemExit):
            fid.main(["--front", bad])
    assert "PRECISION=CSV" in capsys.readouterr().err
