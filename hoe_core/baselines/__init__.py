"""HoE and its baselines behind one interface (SPEC section 6):

    method = make_method(name, loaded_bundle, decoding)
    method(prompts, preference (N,)) -> texts          (one batched call per preference)

All of them run on the same backbone and the same single-objective models (the bundle's
experts at the simplex vertices, theta_i = theta_pre + B_i A_i).

| name         | what                                                         | forwards / token |
|--------------|--------------------------------------------------------------|------------------|
| `hoe`        | the bundle through preference routing (experts + routers)    | 1                |
| `rs`         | Rewarded Soups: theta_pre + sum_i lambda_i B_i A_i            | 1                |
| `mod`        | MOD: sum_i lambda_i log_softmax(logits_i), own KV caches     | #{lambda_i > 0}  |
| `merge-ta`   | task arithmetic of the tau_i at lambda (dense delta)         | 1 (+ dense)      |
| `merge-ties` | TIES of the tau_i at lambda (dense delta)                    | 1 (+ dense)      |
| `base`       | the backbone alone (lambda ignored)                          | 1                |
| `expert-<o>` | objective o's single expert alone (lambda ignored)           | 1                |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hoe_core.config import DecodingConfig
from hoe_core.evaluation.front import Method, hoe_method

METHOD_NAMES: tuple[str, ...] = ("hoe", "rs", "mod", "merge-ta", "merge-ties", "base", "experts")
#: default parameters of the merge baselines (TIES density as in the recipe's anchors)
MERGE_DEFAULTS: dict[str, dict[str, Any]] = {"ta": {}, "ties": {"density": 0.5}}


def expand_methods(names: Sequence[str], objectives: Sequence[str]) -> list[str]:
    """Validate method names; ``experts`` expands to ``expert-<objective>`` for each objective."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if name == "experts":
            out += [f"expert-{o}" for o in objectives]
        elif name in METHOD_NAMES or (name.startswith("expert-") and name[7:] in objectives):
            out.append(name)
        else:
            known = ", ".join([*METHOD_NAMES, *(f"expert-{o}" for o in objectives)])
            raise ValueError(f"unknown method {name!r}; known methods: {known}")
    if len(set(out)) != len(out):
        raise ValueError(f"methods repeat: {out}")
    return out


def recipe_merge_params(manifest, kind: str) -> dict:
    """The recipe's scalar parameters of merge method ``kind`` (the parameters its anchors
    were merged with; a swept list is a recipe search, not a setting of the baseline)."""
    recipe = ((manifest.recipe or {}).get("config") or {}).get("merge") or {}
    params = dict((recipe.get("params") or {}).get(kind, {}))
    return {k: v for k, v in params.items() if not isinstance(v, (list, tuple))}


def preference_free(name: str) -> bool:
    """Methods whose answer does not depend on the preference (evaluated once per prompt)."""
    return name == "base" or name.startswith("expert-")


def make_method(
    name: str,
    loaded,
    decoding: DecodingConfig,
    merge_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Method:
    """The generate function of method ``name`` over a :class:`~hoe_core.bundle.LoadedBundle`."""
    from hoe_core.baselines import merge, mod, soups

    if name == "experts":
        raise ValueError("'experts' names several methods: expand it with expand_methods first")
    expand_methods([name], loaded.objectives)  # raises with the list of known names
    hoe, tok = loaded.hoe, loaded.backbone.tokenizer
    if name == "hoe":
        return hoe_method(hoe, tok, decoding)
    if name == "rs":
        return soups.rewarded_soups(hoe, tok, decoding)
    if name == "mod":
        return mod.mod_method(hoe, tok, decoding)
    if name == "base":
        return soups.base_model(hoe, tok, decoding)
    if name.startswith("expert-"):
        return soups.single_expert(hoe, tok, decoding, name[len("expert-") :])
    if name.startswith("merge-"):
        kind = name[len("merge-") :]
        params = {
            **MERGE_DEFAULTS.get(kind, {}),
            **recipe_merge_params(loaded.manifest, kind),  # as the recipe merged its anchors
            **dict((merge_params or {}).get(kind, {})),
        }
        return merge.merge_method(
            hoe, tok, decoding, merge.single_factors(hoe, loaded.experts), kind, **params
        )
    raise AssertionError(f"method {name!r} is listed but not built")
