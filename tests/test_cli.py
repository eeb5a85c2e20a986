"""The CLI contract on a pico bundle: once through a real subprocess, the rest in-process."""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from hoe_core.cli import main


def run_subprocess(*args):
    """The real ``python -m hoe_core`` in a fresh interpreter (slow: imports peft)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hoe_core", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args, check=True):
    """The same entry point in-process (fast), capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: --help and usage errors
            code = exit_.code
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(result.stderr)
    return result


def test_help_lists_subcommands():
    out = run("--help").stdout
    for cmd in ("generate", "verify", "task-svd", "pico-bundle"):
        assert cmd in out


def test_pico_bundle_round_trips_through_the_cli(tmp_path):
    bundle = tmp_path / "pico"
    run("pico-bundle", str(bundle))
    assert "OK" in run("verify", "--bundle", str(bundle)).stdout
    args = [
        "generate",
        "--bundle",
        str(bundle),
        "--prompt",
        "Tell me a joke.",
        "--preference",
        "2,5,3",
        "--max-new-tokens",
        "6",
        "--seed",
        "1",
        "--json",
    ]
    first = json.loads(run_subprocess(*args).stdout)
    assert first["objectives"] == ["helpful", "harmless", "humor"]
    assert first["preference"] == pytest.approx({"helpful": 0.2, "harmless": 0.5, "humor": 0.3})
    assert isinstance(first["text"], str) and first["new_tokens"] == 6
    assert sum(first["anchor_weights"].values()) == pytest.approx(1.0, abs=1e-6)
    assert json.loads(run(*args).stdout)["text"] == first["text"]  # greedy: deterministic


@pytest.mark.parametrize(
    "pref, match",
    [
        ("1,0", "needs 3 values"),
        ("1,-1,1", ">= 0"),
        ("0,0,0", "not all be zero"),
        ("a,b,c", "argument --preference: expected comma-separated numbers"),
        ("nan,1,1", "finite"),
    ],
)
def test_bad_preference_gets_a_specific_error(pico_bundle, pref, match):
    proc = run("generate", "--bundle", str(pico_bundle), "--prompt", "hi", "--preference", pref, check=False)
    assert proc.returncode == 2 and match in proc.stderr


def test_task_svd_command_writes_a_peft_adapter(pico_bundle, tmp_path):
    out = tmp_path / "svd"
    proc = run(
        "task-svd", "--adapter", str(pico_bundle / "experts/helpful"), "--out", str(out), "--rank", "2"
    )
    summary = json.loads(proc.stdout)
    assert summary["ranks"] == [2] and 0 < summary["mean_energy_retained"] < 1
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_merge_command_writes_a_merged_expert_with_report(pico_bundle, tmp_path):
    out = tmp_path / "merged"
    experts = ",".join(str(pico_bundle / "experts" / n) for n in ("helpful", "harmless"))
    proc = run(
        "merge", "--adapters", experts, "--anchor", "1,1", "--method", "pcb", "--out", str(out), "--rank", "8"
    )
    summary = json.loads(proc.stdout)
    assert summary["anchor"] == [0.5, 0.5] and summary["ranks"] == [8]
    report = json.loads((out / "task_svd_report.json").read_text())
    assert len(report["per_module"]) == summary["modules"] > 0
    bad = run(
        "merge",
        "--adapters",
        experts,
        "--anchor",
        "1,1",
        "--params",
        '{"nope": 1}',
        "--out",
        str(out),
        check=False,
    )
    assert bad.returncode == 2 and "--params not accepted" in bad.stderr
