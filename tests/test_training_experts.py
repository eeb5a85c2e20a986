"""Recipe step 2 on a pico model: DPO moves the policy towards the chosen answers, and the
saved LoRA is an objective vector that task-SVD can compress."""

import torch

from hoe_core.config import TaskSVDConfig
from hoe_core.experts.adapters import load_lora_adapter
from hoe_core.experts.task_svd import task_svd
from hoe_core.training.experts import ExpertTrainingConfig, train_dpo_expert


def _logprob(model, tok, prompt, answer):
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
    )
    prefix = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    n = len(tok(prefix, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    return float(logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum())


def test_dpo_expert_prefers_chosen_and_yields_an_objective_vector(pico_model, pico_tokenizer, tmp_path):
    pairs = [
        {"prompt": f"question {i}", "chosen": "yes, happy to help", "rejected": "no."} for i in range(16)
    ]

    def margin():
        return _logprob(pico_model, pico_tokenizer, "question 99", "yes, happy to help") - _logprob(
            pico_model, pico_tokenizer, "question 99", "no."
        )

    before = margin()
    cfg = ExpertTrainingConfig(lora_rank=8, lora_alpha=8, max_steps=12, batch_size=8, learning_rate=5e-3)
    summary = train_dpo_expert(pico_model, pico_tokenizer, pairs, cfg, tmp_path / "dpo")
    assert summary["steps"] == 12 and summary["final_loss"] < 0.69
    assert type(pico_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # LoRA removed again

    tau = load_lora_adapter(tmp_path / "dpo")
    assert len(tau) == 2 * 7 and all(d.dense().abs().sum() > 0 for d in tau.values())
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(pico_model, str(tmp_path / "dpo"))
    assert margin() - before > 0.5  # held-out prompt: the chosen answer gained log-probability
    tuned.unload()
    factors, reports = task_svd(tau, TaskSVDConfig(rank=4))
    assert all(r.rank == 4 for r in reports) and 0 < reports[0].energy_retained <= 1
