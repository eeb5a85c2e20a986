"""Recipe step 2: a single-objective fine-tune per objective, by DPO on best-vs-worst pairs
from the shared sample cache (trl's ``DPOTrainer``), as a high-rank LoRA on the frozen
backbone. Its delta tau = s B A is the objective vector that task-SVD compresses (step 3).

Why LoRA and not a full fine-tune: on this 2-core CPU one full step of 8 x 128 tokens takes
7-11 s and needs AdamW state for all 135M parameters, while the backbone's forward/backward
dominates a LoRA step whatever its rank; a rank-64 LoRA on all seven projections keeps the
objective vector rich enough for task-SVD to choose the final rank afterwards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hoe_core.config import LLAMA_TARGETS


@dataclass(frozen=True)
class ExpertTrainingConfig:
    """DPO fine-tune of one single-objective expert."""

    lora_rank: int = 64
    lora_alpha: int = 64
    targets: tuple[str, ...] = LLAMA_TARGETS
    beta: float = field(default=0.1, metadata={"help": "DPO KL strength"})
    learning_rate: float = 5e-4
    max_steps: int = 40
    batch_size: int = 8
    grad_accumulation: int = 1
    max_length: int = 128  # prompt + response tokens
    min_gap: float = field(default=0.0, metadata={"help": "skip pairs with a smaller reward gap"})
    max_pairs: int | None = field(
        default=None,
        metadata={"help": "train on the pairs with the largest reward gaps only (None: all pairs)"},
    )
    seed: int = 0


def _dataset(pairs: list[dict]):
    """Conversational DPO records: trl applies the chat template."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )


def train_dpo_expert(
    model, tokenizer, pairs: list[dict], cfg: ExpertTrainingConfig, out_dir: str | Path, key: str = ""
) -> dict:
    """Fine-tune a LoRA on ``pairs`` with DPO and save it as a peft adapter in ``out_dir``.

    Args:
        model: the fp32 backbone (frozen; a LoRA is added by trl/peft and removed after).
        pairs: {"prompt", "chosen", "rejected"} dicts (see ``sampling.preference_pairs``).
        key: a digest of the inputs, stored in ``training.json`` (the recipe's cache check).
    Returns:
        training summary: steps, pairs, final loss, reward accuracy, seconds.
    """
    import time

    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("no preference pairs to train on (all samples tied?)")
    out = Path(out_dir)
    args = DPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accumulation,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        beta=cfg.beta,
        max_length=cfg.max_length,
        logging_steps=max(1, cfg.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        bf16=False,
        gradient_checkpointing=False,  # memory is plentiful here; checkpointing only costs time
        disable_tqdm=False,
    )
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.requires_grad_(False)
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=_dataset(pairs), processing_class=tokenizer, peft_config=lora
    )
    result = trainer.train()
    seconds = time.perf_counter() - start
    main = trainer.accelerator.is_main_process
    if main:
        trainer.model.save_pretrained(str(out))
        shutil.rmtree(out / "trainer", ignore_errors=True)  # the Trainer's scratch folder
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "pairs": len(pairs),
        "steps": result.global_step,
        "seconds": round(seconds, 1),
        "final_loss": logs[-1]["loss"] if logs else None,
        "reward_accuracy": logs[-1].get("rewards/accuracies") if logs else None,
        "log": logs,
        "config": asdict(cfg),
        "key": key,
    }
    if main:
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    trainer.model.unload()  # give the caller its backbone back, without the LoRA
    return summary
