"""Where HoE's decode time goes beyond the backbone's: a sampled CPU profile of each.

Two child processes decode the same prompt, one with the bare backbone and one with the
HoE model (all experts and routers live). ``perf record`` (the Linux profiler, software
``cpu-clock`` event: no hardware counters needed, so it works in VMs) samples each while
it decodes. The report gives per token, per shared library and thread, the CPU time of
each process, and the symbols whose time grew most from backbone to HoE:
``libpython`` is the interpreter running Python code, ``[JIT]`` / ``perf-<pid>.map`` the
numba-compiled kernel, ``libtorch_cpu`` torch's C++ ops, ``libgomp`` OpenMP's worker
threads (mostly spinning between ops).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/decode_profile.py [--precision nf4] \
        [--out bench/decode_profile.md]

Needs ``perf`` on the PATH and ``kernel.perf_event_paranoid`` <= 2 (profiling one's own
processes). Samples include the prompt's prefill, amortised over the tokens; loading, warm-up and teardown are not sampled.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HZ = 1999  # samples per second and thread
BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


def worker(arm: str, precision: str, tokens: int, runs: int, tmp: Path) -> None:
    """Load one arm, warm it up, signal ``<arm>.ready``; once the profiler is attached
    (``<arm>.go``) decode ``runs`` times and write ``<arm>.json``, then wait for
    ``<arm>.done`` before exiting, so the profile holds the timed runs only."""
    from contextlib import nullcontext
    from functools import partial

    from hoe_core.backbone import load_backbone
    from hoe_core.bench import BENCH_PROMPTS, _generate_timed
    from hoe_core.bundle import load_bundle
    from hoe_core.generation import encode_chat

    loaded = load_bundle(BUNDLE, precision=precision)
    tok = loaded.backbone.tokenizer
    if arm == "backbone":
        model = load_backbone(loaded.manifest.backbone["spec"], precision, "cpu", base_dir=loaded.root).model
        loaded = None  # only the backbone stays in this process
        ctx = nullcontext
    else:
        hoe = loaded.hoe
        model = hoe.model
        ctx = partial(hoe.routing, anchor_weights=hoe.anchor_weights([PREFERENCE]))
    enc = encode_chat(tok, [BENCH_PROMPTS[0]], "cpu")
    _generate_timed(model, enc, 16, ctx)  # warm-up (kernels compiled, caches built)
    (tmp / f"{arm}.ready").write_text("1")
    _wait_for(tmp / f"{arm}.go")
    ms = [_generate_timed(model, enc, tokens, ctx).decode_s / (tokens - 1) * 1e3 for _ in range(runs)]
    (tmp / f"{arm}.json").write_text(json.dumps({"ms_per_token": ms}))
    _wait_for(tmp / f"{arm}.done")


def _wait_for(path: Path, child: subprocess.Popen | None = None) -> None:
    while not path.exists():
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"worker exited with {child.returncode} before writing {path.name}")
        time.sleep(0.05)


def profile(arm: str, args, tmp: Path) -> tuple[Path, float]:
    """Run one arm's worker under ``perf record``; returns the data file and median ms/token."""
    out, data = tmp / f"{arm}.json", tmp / f"{arm}.data"
    child = subprocess.Popen(
        [sys.executable, __file__, "--worker", arm, "--precision", args.precision,
         "--tokens", str(args.tokens), "--runs", str(args.runs), "--tmp", str(tmp)]
    )  # fmt: skip
    _wait_for(tmp / f"{arm}.ready", child)
    perf = subprocess.Popen(
        ["perf", "record", "-F", str(HZ), "-e", "cpu-clock", "-p", str(child.pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # perf attaches to every thread
    if perf.poll() is not None:
        raise RuntimeError(f"perf record exited with {perf.returncode} (kernel.perf_event_paranoid?)")
    (tmp / f"{arm}.go").write_text("1")
    _wait_for(out, child)
    perf.send_signal(signal.SIGINT)  # stop sampling before the worker tears down
    perf.wait()
    (tmp / f"{arm}.done").write_text("1")
    if child.wait() != 0:
        raise RuntimeError(f"{arm} worker failed ({child.returncode})")
    return data, statistics.median(json.loads(out.read_text())["ms_per_token"])


def by_dso(data: Path, tokens: int) -> dict[tuple[str, str], float]:
    """(library, 'main' | 'other' thread) -> ms per token."""
    text = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "pid,tid,ip,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = collections.Counter()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        pid_tid, dso = parts[0], parts[-1].strip("()").rsplit("/", 1)[-1]
        pid, _, tid = pid_tid.partition("/")
        dso = "numba JIT" if dso.startswith("perf-") and dso.endswith(".map") else dso
        thread = "main" if tid == pid else "other"  # the main thread runs Python
        out[(dso, thread)] += 1 / HZ / tokens * 1e3
    return out


def by_symbol(data: Path, tokens: int) -> dict[str, float]:
    """'library: symbol' -> ms per token (all threads)."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym", "-F", "sample,dso,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit():
            dso = parts[1].rsplit("/", 1)[-1]
            key = "numba JIT (all)" if dso == "[JIT]" else f"{dso}: {parts[2].strip().removeprefix('[.] ')}"
            out[key] = out.get(key, 0.0) + int(parts[0]) / HZ / tokens * 1e3
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="nf4", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--runs", type=int, default=6, help="profiled decode runs per arm")
    ap.add_argument("--out", default="bench/decode_profile.md")
    ap.add_argument("--worker", choices=["backbone", "hoe"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.precision, args.tokens, args.runs, Path(args.tmp))
        return
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: linux-perf); this measurement needs it")
    tokens = args.tokens * args.runs
    with tempfile.TemporaryDirectory() as tmp:
        runs = {arm: profile(arm, args, Path(tmp)) for arm in ("backbone", "hoe")}
        dsos = {arm: by_dso(data, tokens) for arm, (data, _) in runs.items()}
        syms = {arm: by_symbol(data, tokens) for arm, (data, _) in runs.items()}
    ms = {arm: t for arm, (_, t) in runs.items()}
    lines = [
        "# Decode profile: HoE against its backbone",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {_cpu()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Precision {args.precision}, preference {PREFERENCE}, "
        f"{args.runs} runs x {args.tokens} tokens per arm, sampled at {HZ} Hz per thread (`perf record -e "
        "cpu-clock`). Decode time of the profiled runs (ms per token, median): "
        f"backbone {ms['backbone']:.1f}, HoE {ms['hoe']:.1f}.",
        "",
        "## CPU time per token by library and thread (ms)",
        "",
        "The main thread runs Python; the other is OpenMP's worker (torch's second thread).",
        "",
        "| library | thread | backbone | HoE | HoE - backbone |",
        "|---|---|---|---|---|",
    ]
    keys = sorted(set(dsos["backbone"]) | set(dsos["hoe"]), key=lambda k: -dsos["hoe"].get(k, 0))
    for key in keys:
        a, b = dsos["backbone"].get(key, 0.0), dsos["hoe"].get(key, 0.0)
        if max(a, b) >= 0.05:
            lines.append(f"| {key[0]} | {key[1]} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    total = {arm: sum(v for (_, t), v in d.items() if t == "main") for arm, d in dsos.items()}
    lines += [
        f"| all | main | {total['backbone']:.2f} | {total['hoe']:.2f} | {total['hoe'] - total['backbone']:+.2f} |",
        "",
        "## Symbols whose time grew most (ms per token, all threads)",
        "",
        "| symbol | backbone | HoE | HoE - backbone |",
        "|---|---|---|---|",
    ]
    grew = sorted(set(syms["backbone"]) | set(syms["hoe"]),
                  key=lambda k: syms["backbone"].get(k, 0.0) - syms["hoe"].get(k, 0.0))  # fmt: skip
    for key in grew[:20]:
        a, b = syms["backbone"].get(key, 0.0), syms["hoe"].get(key, 0.0)
        lines.append(f"| `{key[:100]}` | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
