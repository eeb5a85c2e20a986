"""The training and sampling loops under ``accelerate launch`` with two CPU processes: the
sample cache is the same as a single process's, and both processes end with one router."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hoe_core.training.sampling import SamplingConfig, sample_responses

SCRIPT = "tests/scripts/accelerate_loops.py"


@pytest.fixture(scope="module")
def launched(pico_dir, tmp_path_factory):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    out = tmp_path_factory.mktemp("accelerate")
    with socket.socket() as sock:  # a free port: runs back to back must not collide on 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--main_process_port", str(port)]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, str(pico_dir), str(out)]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_processes_share_one_router(launched):
    r0 = load_file(str(launched / "router_rank0.safetensors"))
    r1 = load_file(str(launched / "router_rank1.safetensors"))
    assert set(r0) == set(r1)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # gradients were averaged: the same step everywhere
    weights = [k for k in r0 if k.endswith(".0")]
    assert any(r0[k].abs().sum() > 0 for k in weights)  # the router trained (it started at zero)
    assert (launched / "router_center_tchebycheff.json").is_file()


def test_two_processes_sample_what_one_process_samples(launched, pico_dir, tmp_path):
    from tests.scripts.accelerate_loops import PROMPTS

    model = AutoModelForCausalLM.from_pretrained(str(pico_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(pico_dir))
    tok.padding_side = "left"
    cfg = SamplingConfig(k=2, max_new_tokens=6, batch_size=4, temperature=1.0)
    single = sample_responses(model, tok, [(f"p{i}", p) for i, p in enumerate(PROMPTS)], cfg, tmp_path)
    files = sorted((launched / "samples").glob("chunk_*.jsonl"))
    assert [f.name for f in files] == [f.name for f in sorted(tmp_path.glob("chunk_*.jsonl"))]
    for f in files:
        assert f.read_text() == (tmp_path / f.name).read_text(), f.name
    assert len(single) == 2 * len(PROMPTS)
