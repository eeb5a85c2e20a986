"""What a preference change costs HoE before any math: building its per-group kernels.

    python bench/kernel_build.py [--bundle assets/smollm2-hhh] [--precision fp32] [--rounds 40]

Every sibling group of the bundle's model (q/k/v, gate/up, o, down per block) gets its
kernel for one call (``SiblingGroup.kernel``) at batch 1, as the first forward of a
``generate`` does. Per round it times all groups for a preference not seen before (each a
step away from the last, so nothing is cached: the kernel is built) and, interleaved, for
the bench's fixed preference (cached: what every call pays for its lookups). It prints the
medians (ms) of the two and their difference, the build itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hoe_core.bench import fresh_preferences
from hoe_core.bundle import load_bundle
from hoe_core.routing.context import use_routing

LAM, LAM2 = np.array([0.4, 0.3, 0.3]), np.array([0.2, 0.3, 0.5])  # the bench's two preferences


def time_groups(hoe, groups: list, inputs: dict, preference) -> float:
    """Seconds to fetch (or build) every group's kernel for one call at ``preference``."""
    with use_routing(hoe.anchor_weights([preference])) as routing:
        start = time.perf_counter()
        for group in groups:
            group.kernel(routing, inputs[group])
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("assets/smollm2-hhh"))
    p.add_argument("--precision", default="fp32")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    hoe = load_bundle(args.bundle, precision=args.precision).hoe
    groups = list({layer.group: None for layer in hoe.layers.values()})
    inputs = {g: torch.randn(1, 1, g.members[0].in_features) for g in groups}
    time_groups(hoe, groups, inputs, LAM)  # warm up: stacks, templates, the compiled kernel's factors
    fresh, cached = [], []
    for target in fresh_preferences(LAM2, LAM, args.rounds):
        fresh.append(time_groups(hoe, groups, inputs, target))
        cached.append(time_groups(hoe, groups, inputs, LAM))
    new, old = statistics.median(fresh) * 1e3, statistics.median(cached) * 1e3
    print(
        f"{len(groups)} groups, {args.precision}, {len(fresh)} rounds, torch threads {torch.get_num_threads()}"
    )
    print(f"new preference  {new:6.2f} ms  (kernels built)")
    print(f"same preference {old:6.2f} ms  (cached kernels: the per-call lookups)")
    print(f"build itself    {new - old:6.2f} ms")


if __name__ == "__main__":
    main()
