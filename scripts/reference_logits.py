#!/usr/bin/env python3
"""Reference logits from Hugging Face transformers, for forge-model's parity tests.

Creates two tiny random checkpoints with transformers — a Llama (grouped-query attention,
Llama 3 rope scaling, untied head) and a Qwen2 (q/k/v biases, tied embeddings) — with weights
drawn large enough that every part of the network matters, saves each as a Hugging Face folder
(config.json + model.safetensors) under crates/forge-model/tests/data/<name>/, and records the
float32 logits transformers computes for a fixed token sequence in logits.json. The Rust test
(crates/forge-model/tests/parity.rs) loads the same files and must match within 1e-4.

Usage:  scripts/setup.sh && scripts/.venv/bin/python scripts/reference_logits.py
"""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = Path(__file__).resolve().parent.parent / "crates" / "forge-model" / "tests" / "data"
IDS = [1, 17, 42, 99, 3, 64, 64, 120, 7, 0, 88, 31, 5, 101, 127, 2]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 1.5)


def export(name, model):
    model.eval()
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0]
    (d / "logits.json").write_text(json.dumps({"ids": IDS, "logits": logits.tolist()}) + "\n")
    for extra in ["generation_config.json"]:
        (d / extra).unlink(missing_ok=True)
    print(f"{name}: logits {tuple(logits.shape)}, |max| {logits.abs().max():.3f} -> {d}")


def main():
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    m = LlamaForCausalLM(llama).float()
    randomize(m, 1)
    export("llama", m)

    qwen = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    m = Qwen2ForCausalLM(qwen).float()
    randomize(m, 2)
    export("qwen2", m)


if __name__ == "__main__":
    main()
