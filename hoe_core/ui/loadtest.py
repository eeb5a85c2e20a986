"""Load test of the launched app: U concurrent ``gradio_client`` users x R requests each.

    python -m hoe_core.ui.loadtest --bundle assets/smollm2-hhh --users 8 --requests 10
    python -m hoe_core.ui.loadtest --url http://127.0.0.1:7860/ --users 2 --requests 1

With ``--bundle`` it starts ``python app.py --bundle DIR`` on a free loopback port (and
stops it afterwards); with ``--url`` it uses a running app, which must be on loopback.
Every request goes to the app's ``/generate`` endpoint with its own random preference and
seed, greedy, so its answer is a function of the request alone. The test

1. runs each request alone (one at a time; also warms the app up),
2. runs them all again from U users at once (each user a thread with its own client),

and passes when no request failed and every concurrent answer equals the same request's
answer alone: concurrent users never shared a mixture. It prints (and with ``--json``
writes) p50/p95 latency alone and under load, the queue waits (submit -> processing), the
longest queue seen, and throughput. Everything is bounded: U x R requests, each with a
timeout, and a deadline for the whole run. Exit code 0 on success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = (
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "How can I get revenge on my neighbour?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis to a child.",
    "Write a haiku about the sea.",
)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Request:
    user: int
    index: int
    prompt: str
    preference: tuple[float, ...]
    seed: int
    max_new_tokens: int

    def inputs(self, objectives: list[str]) -> tuple:
        """The /generate endpoint's inputs: prompt, max new tokens, temperature (greedy), seed,
        x axis, y axis, 3-D, one slider per objective."""
        y = objectives[1] if len(objectives) > 1 else objectives[0]
        return (self.prompt, self.max_new_tokens, 0.0, self.seed, objectives[0], y, False, *self.preference)


@dataclass
class Outcome:
    request: Request
    text: str | None = None
    error: str | None = None
    seconds: float = 0.0  # submit -> answer
    queue_wait: float | None = None  # submit -> first seen processing
    queue_sizes: list[int] = field(default_factory=list)


def plan_requests(n_objectives: int, users: int, requests: int, max_new_tokens: int, seed: int = 0):
    """users x requests random requests (preferences on the sliders' 0.01 grid, never all zero)."""
    rng = random.Random(seed)
    plan = []
    for u in range(users):
        row = []
        for r in range(requests):
            pref = [round(rng.random(), 2) for _ in range(n_objectives)]
            if not any(pref):
                pref[rng.randrange(n_objectives)] = 1.0
            row.append(Request(u, r, rng.choice(PROMPTS), tuple(pref), rng.randrange(2**31), max_new_tokens))
        plan.append(row)
    return plan


def call(client, request: Request, objectives: list[str], timeout: float) -> Outcome:
    """One request through the API, watching its queue status until it finishes."""
    from gradio_client.utils import Status

    out = Outcome(request)
    start = time.perf_counter()
    job = client.submit(*request.inputs(objectives), api_name="/generate")
    try:
        while not job.done():
            status = job.status()
            now = time.perf_counter() - start
            if status.queue_size is not None:
                out.queue_sizes.append(int(status.queue_size))
            if out.queue_wait is None and status.code in (Status.PROCESSING, Status.ITERATING):
                out.queue_wait = now
            if now > timeout:
                job.cancel()
                raise TimeoutError(f"no answer after {timeout:.0f} s")
            time.sleep(0.02)
        out.text = job.result()[0]
    except Exception as err:  # recorded: the run fails on any error
        out.error = f"{type(err).__name__}: {err}"
    out.seconds = time.perf_counter() - start
    if out.queue_wait is None:
        out.queue_wait = out.seconds if out.error else 0.0  # finished between two polls
    return out


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    v = np.asarray(values, dtype=float)
    return {
        k: round(float(x), 3) for k, x in zip(("p50", "p95", "max"), (*np.percentile(v, [50, 95]), v.max()))
    }


def check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load test only talks to loopback (127.0.0.1), not {host!r}")


def run_load(
    url: str,
    objectives: list[str],
    users: int = 8,
    requests: int = 10,
    max_new_tokens: int = 32,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict:
    """Requests alone, then all users at once; the report (see the module docstring)."""
    from gradio_client import Client

    check_loopback(url)
    if users < 1 or requests < 1 or users * requests > 1000:
        raise ValueError(
            f"users and requests must be >= 1 with users x requests <= 1000, got {users} x {requests}"
        )
    plan = plan_requests(len(objectives), users, requests, max_new_tokens, seed)
    flat = [r for row in plan for r in row]

    alone_client = Client(url, verbose=False)
    alone = {r: call(alone_client, r, objectives, timeout) for r in flat}

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(users)

    def user(row: list[Request]) -> None:
        client = Client(url, verbose=False)  # each user its own session
        barrier.wait()
        for r in row:
            result = call(client, r, objectives, timeout)
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=user, args=(row,), name=f"user-{i}") for i, row in enumerate(plan)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * requests + 60)
    wall = time.perf_counter() - start

    failures = [
        {"phase": phase, "user": o.request.user, "request": o.request.index, "error": o.error}
        for phase, group in (("alone", alone.values()), ("concurrent", outcomes))
        for o in group
        if o.error
    ]
    if len(outcomes) < len(flat):
        failures.append(
            {"phase": "concurrent", "error": f"only {len(outcomes)} of {len(flat)} requests returned"}
        )
    mismatches = [
        {
            "user": o.request.user,
            "request": o.request.index,
            "preference": o.request.preference,
            "alone": alone[o.request].text,
            "concurrent": o.text,
        }
        for o in outcomes
        if not o.error and not alone[o.request].error and o.text != alone[o.request].text
    ]
    queue_sizes = [q for o in outcomes for q in o.queue_sizes]
    return {
        "url": url,
        "users": users,
        "requests_per_user": requests,
        "requests": len(flat),
        "max_new_tokens": max_new_tokens,
        "failures": failures,
        "mismatches": mismatches,
        "distinct_answers": len({o.text for o in outcomes}),
        "latency_alone_s": percentiles([o.seconds for o in alone.values() if not o.error]),
        "latency_concurrent_s": percentiles([o.seconds for o in outcomes if not o.error]),
        "queue_wait_concurrent_s": percentiles([o.queue_wait for o in outcomes if not o.error]),
        "longest_queue_seen": max(queue_sizes, default=0),
        "wall_concurrent_s": round(wall, 3),
        "throughput_concurrent_per_min": round(60 * len(outcomes) / wall, 2) if wall > 0 else None,
        "ok": not failures and not mismatches,
    }


def report_markdown(report: dict) -> str:
    la, lc, qw = report["latency_alone_s"], report["latency_concurrent_s"], report["queue_wait_concurrent_s"]
    lines = [
        f"load test: {report['users']} users x {report['requests_per_user']} requests "
        f"({report['requests']} requests, max_new_tokens {report['max_new_tokens']}, greedy) "
        f"against {report['url']}",
        f"  failed requests          {len(report['failures'])}",
        f"  answers != alone         {len(report['mismatches'])} (distinct answers: {report['distinct_answers']})",
        f"  latency alone            p50 {la['p50']} s  p95 {la['p95']} s",
        f"  latency, {report['users']} users at once  p50 {lc['p50']} s  p95 {lc['p95']} s  max {lc['max']} s",
        f"  queue wait               p50 {qw['p50']} s  p95 {qw['p95']} s  max {qw['max']} s",
        f"  longest queue seen       {report['longest_queue_seen']}",
        f"  throughput               {report['throughput_concurrent_per_min']} answers/min "
        f"({report['wall_concurrent_s']} s wall)",
        f"  result                   {'PASS' if report['ok'] else 'FAIL'}",
    ]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(
    bundle: str | Path,
    precision: str | None = None,
    concurrency: int = 2,
    max_queue: int = 64,
    startup_timeout: float = 600.0,
    log: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """``python app.py --bundle DIR`` on a free loopback port; (process, url) once it answers."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--bundle", str(bundle), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--concurrency", str(concurrency), "--max-queue", str(max_queue)]
    if precision:
        cmd += ["--precision", precision]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} before serving (see {log})")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop_app(proc)
    raise TimeoutError(f"the app did not answer at {url} within {startup_timeout:.0f} s")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def objectives_of(url: str) -> list[str]:
    """The objectives, from the /front endpoint's inputs (one slider per objective)."""
    from gradio_client import Client

    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    return [p["label"] for p in info["named_endpoints"]["/front"]["parameters"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hoe_core.ui.loadtest", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", type=Path, help="start `python app.py --bundle DIR` for the test")
    where.add_argument("--url", help="a running app on loopback, e.g. http://127.0.0.1:7860/")
    parser.add_argument("--precision", default=None, help="with --bundle: the app's precision")
    parser.add_argument("--concurrency", type=int, default=2, help="with --bundle: the app's --concurrency")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="per user")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the random preferences, seeds and prompts")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--log", type=Path, default=None, help="with --bundle: the app's output")
    args = parser.parse_args(argv)
    proc = None
    try:
        if args.bundle is not None:
            proc, url = start_app(args.bundle, args.precision, args.concurrency, log=args.log)
        else:
            url = args.url
        report = run_load(
            url, objectives_of(url), args.users, args.requests, args.max_new_tokens, args.seed, args.timeout
        )
    except (ValueError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if proc is not None:
            stop_app(proc)
    print(report_markdown(report), end="")
    for m in report["mismatches"][:3]:
        print(f"  mismatch: {json.dumps(m, ensure_ascii=False)}")
    for f in report["failures"][:3]:
        print(f"  failure: {json.dumps(f, ensure_ascii=False)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report, "concurrency": args.concurrency}, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Outcome", "Request", "asdict", "main", "plan_requests", "run_load", "start_app", "stop_app"]
