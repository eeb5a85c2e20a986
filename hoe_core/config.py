"""Typed, frozen configs shared by the library, the CLI and the app.

Every field is explained once, here. Configs load from plain dicts (YAML/JSON) with
:func:`from_dict`, which rejects unknown keys so a typo in a recipe fails loudly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Precision = Literal["fp32", "bf16", "int8", "nf4"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8", "nf4")

#: The linear layers of a Llama block that become HoE layers.
LLAMA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

#: Prompts longer than this many characters are cut (generation) or refused (prompt sets).
APP_PRECISION = "nf4"  # the app's default backbone precision; evaluate uses it too
MAX_PROMPT_CHARS = 4000
#: The app (and its API) generates at most this many tokens per request.
APP_MAX_NEW_TOKENS = 256
#: Seeds are integers in [0, SEED_MAX] (what torch.manual_seed takes).
SEED_MAX = 2**63 - 1

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a frozen dataclass from a dict, rejecting unknown keys by name."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**data)


def as_int(name: str, value: Any) -> int:
    """A widget's or client's value as an integer, or a ValueError naming the field.

    Accepts ints, integral floats (``8.0``) and integer strings; refuses ``1.5``, NaN,
    booleans and text, instead of silently rounding them."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def as_float(name: str, value: Any) -> float:
    """A widget's or client's value as a finite float, or a ValueError naming the field."""
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(number):
                return number
    raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class DecodingConfig:
    """How text is sampled. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate, 1..4096"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; else sampling"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus mass in (0, 1]"})
    repetition_penalty: float = field(
        default=1.2, metadata={"help": "HF repetition penalty; 1.2 stops SmolLM2's loops"}
    )
    seed: int = field(default=0, metadata={"help": "torch seed used when sampling"})

    MAX_NEW_TOKENS_LIMIT = 4096

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not 1 <= self.max_new_tokens <= self.MAX_NEW_TOKENS_LIMIT:
            raise ValueError(
                f"max_new_tokens must be in [1, {self.MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}"
            )
        for name, lo, hi in (("temperature", 0.0, 10.0), ("repetition_penalty", 0.5, 5.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [0, {SEED_MAX}], got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TaskSVDConfig:
    """How an objective vector tau = W_i - W_pre becomes a LoRA expert (SPEC section 1)."""

    rank: int = field(default=16, metadata={"help": "rank for modules not in `ranks`"})
    ranks: dict[str, int] = field(
        default_factory=dict, metadata={"help": "rank per module type, e.g. {'q_proj': 8}"}
    )
    energy: float | None = field(
        default=None,
        metadata={
            "help": "if set, smallest rank keeping this fraction of sum(sigma^2), capped by the rank above"
        },
    )
    density: float | None = field(
        default=None, metadata={"help": "magnitude-prune tau to this density before the SVD"}
    )
    rescale: bool = field(
        default=False, metadata={"help": "scale the rank-r factors so ||B A||_F = ||tau||_F"}
    )

    def __post_init__(self) -> None:
        for name, r in [("rank", self.rank), *self.ranks.items()]:
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"rank for {name!r} must be a positive integer, got {r!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    def rank_for(self, module_name: str) -> int:
        """The rank cap for a module, looked up by its type (last name component)."""
        return self.ranks.get(module_name.rsplit(".", 1)[-1], self.rank)
