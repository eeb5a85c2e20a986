"""Pico models and bundles: a tiny random Llama with a byte tokenizer, built offline.

Used by the tests (instant, no hub) and by ``python -m hoe_core pico-bundle`` to develop
the app against a bundle that loads in a second. The experts are random LoRA factors
and the routers random gates: the model talks nonsense, but every code path is real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hoe_core.backbone import fingerprint
from hoe_core.experts.task_svd import LowRankDelta
from hoe_core.routing.model import LoraExpert
from hoe_core.routing.router import RouterExpert, nearest_experts

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pico_llama(
    seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 259, intermediate: int | None = None
):
    """A random Llama with SmolLM2's layout at toy size (GQA, tied embeddings); the MLP is
    ``intermediate`` wide (default 2 hidden + 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_pico_backbone(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a pico Llama + byte tokenizer as an HF folder."""
    folder = Path(folder)
    pico_llama(seed, **kwargs).save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return folder


def random_experts(
    model,
    anchors: np.ndarray,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.3,
    targets: tuple[str, ...] | None = None,
) -> list[LoraExpert]:
    """Random LoRA experts (one per anchor row) on every targeted linear of ``model``."""
    from hoe_core.config import LLAMA_TARGETS

    targets = targets or LLAMA_TARGETS
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for e, anchor in enumerate(np.asarray(anchors, float)):
        factors = {}
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(mod, torch.nn.Linear):
                b = torch.randn(mod.out_features, rank, generator=gen) * std
                a = torch.randn(rank, mod.in_features, generator=gen) * std
                factors[name] = LowRankDelta(B=b, A=a)
        experts.append(LoraExpert(name=f"expert{e}", anchor=anchor, factors=factors))
    return experts


def random_router(
    model, name: str, anchor, experts: list[LoraExpert], k: int, seed: int = 0, std: float = 0.5
) -> RouterExpert:
    """A router over the k experts nearest ``anchor`` with random gates per module."""
    from hoe_core.config import LLAMA_TARGETS

    subset = nearest_experts(anchor, np.stack([e.anchor for e in experts]), k)
    gen = torch.Generator().manual_seed(seed)
    gates = {}
    for mod_name, mod in model.named_modules():
        if mod_name.rsplit(".", 1)[-1] in LLAMA_TARGETS and isinstance(mod, torch.nn.Linear):
            gates[mod_name] = (
                torch.randn(k, mod.in_features, generator=gen) * std,
                torch.randn(k, generator=gen) * std,
            )
    return RouterExpert(
        name=name, anchor=np.asarray(anchor, float), experts=[experts[i].name for i in subset], gates=gates
    )


def build_pico_bundle(
    out_dir: str | Path,
    objectives: tuple[str, ...] = ("helpful", "harmless", "humor"),
    seed: int = 0,
    router_size: int | None = None,
    last_expert_targets: tuple[str, ...] | None = None,
) -> Path:
    """A complete, loadable bundle on a pico backbone shipped inside it.

    Experts sit at the simplex vertices; one router sits at the centre over the
    ``router_size`` experts nearest it (default all). ``last_expert_targets`` limits the last
    expert to those module kinds (default: every targeted linear, like the others).
    """
    from hoe_core.bundle import write_bundle

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}-backbone"
    save_pico_backbone(tmp, seed)
    model = pico_llama(seed)
    n = len(objectives)
    experts = random_experts(model, np.eye(n), seed=seed)
    if last_expert_targets is not None:
        experts[-1] = random_experts(model, np.eye(n)[-1:], seed=seed + 2, targets=last_expert_targets)[0]
    for e, obj in zip(experts, objectives):
        e.name = obj
    router = random_router(model, "center", np.full(n, 1 / n), experts, k=router_size or n, seed=seed + 1)
    write_bundle(
        out,
        name="pico",
        backbone_spec="backbone",
        fingerprint=fingerprint(tmp),
        objectives=objectives,
        experts=experts,
        routers=[router],
        backbone_dir=tmp,
        recipe={"kind": "pico", "seed": seed, "note": "random experts and router, for tests"},
    )
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return out
