"""HoE decode speed of two versions of ``hoe_core`` in one process, interleaved.

On a shared, noisy machine two processes measured minutes apart differ by more than most
code changes do. This loads an older commit's ``hoe_core`` beside the working tree's (a
renamed copy, ``hoe_core_<commit>``, exported with ``git archive``), builds both HoE
models and the bare backbone on the same bundle, and decodes with each in shuffled order,
round after round. Reported: median ms per token of each arm and the median of the
per-round differences (new - old), which cancels the machine's slow phases.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/ab_commits.py OLD_COMMIT \
        [--precision nf4] [--rounds 20] [--out bench/ab_commits.md]
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from contextlib import nullcontext
from io import BytesIO
from pathlib import Path

BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


def export_renamed(commit: str, dest: Path) -> str:
    """``hoe_core`` at ``commit`` as package ``hoe_core_<commit>`` under ``dest``; returns its name."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", f"{commit}^{{commit}}"], capture_output=True, text=True
    )
    if sha.returncode:
        raise SystemExit(f"not a commit of this repository: {commit!r} ({sha.stderr.strip()})")
    name = f"hoe_core_{sha.stdout.strip()}"
    tar = subprocess.run(["git", "archive", commit, "hoe_core"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(dest / "src", filter="data")
    # only the imports: string literals (the weight cache's folder name, command lines) stay
    pattern = re.compile(r"^(\s*(?:from|import)\s+)hoe_core\b", re.MULTILINE)
    for path in (dest / "src" / "hoe_core").rglob("*"):
        target = dest / name / path.relative_to(dest / "src" / "hoe_core")
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            target.write_text(pattern.sub(rf"\g<1>{name}", path.read_text()))
        else:
            target.write_bytes(path.read_bytes())
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the commit to compare the working tree against")
    ap.add_argument("--precision", default="nf4", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # kept to the end: numba caches compiled code in it
        old_name = export_renamed(args.old, Path(tmp))
        (Path(tmp) / "assets").symlink_to(Path("assets").resolve())  # its data files' root
        sys.path.insert(0, tmp)
        text = compare(args, old_name)
    from hoe_core.bench import write_report

    write_report(text, args.out)


def compare(args, old_name: str) -> str:
    """Both versions' HoE models and the backbone, decoded in shuffled order; the report."""
    from hoe_core.bench import invocation, load_models, routed_at, shuffled_rounds

    old = importlib.import_module(f"{old_name}.bundle").load_bundle(BUNDLE, precision=args.precision)
    new, bare, enc = load_models(BUNDLE, args.precision)
    arms = {"backbone": (bare, nullcontext)}
    for label, loaded in (("new", new), ("old", old)):
        arms[label] = (loaded.hoe.model, routed_at(loaded.hoe, PREFERENCE))
    res, first = shuffled_rounds(arms, enc, args.rounds, args.tokens, args.seed)  # ms per token, ms
    med = {k: statistics.median(v) for k, v in res.items()}
    med_first = {k: statistics.median(v) for k, v in first.items()}
    diff = statistics.median([a - b for a, b in zip(res["new"], res["old"])])
    diff_first = statistics.median([a - b for a, b in zip(first["new"], first["old"])])
    lines = [
        f"# Decode and first token, working tree against {args.old} ({old_name}), one process",
        "",
        f"{invocation()}. Precision "
        f"{args.precision}, preference {PREFERENCE}, {args.rounds} rounds x {args.tokens} tokens, arms "
        "shuffled per round.",
        "",
        "| arm | decode ms per token (median) | tokens/s | backbone / arm (tok/s ratio) "
        "| first token ms (median, cached preference) | arm / backbone |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {v:.2f} | {1e3 / v:.1f} | {med['backbone'] / v:.3f} | {med_first[k]:.1f} "
            f"| {med_first[k] / med_first['backbone']:.3f} |"
            for k, v in med.items()
        ),
        "",
        f"Per-round difference new - old, median: decode **{diff:+.2f} ms per token**, first token "
        f"**{diff_first:+.1f} ms**.",
    ]
    text = "\n".join(lines) + "\n"
    return text


if __name__ == "__main__":
    main()
