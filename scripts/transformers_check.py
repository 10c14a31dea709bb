#!/usr/bin/env python3
"""forge's forward pass against transformers on the same weights (float32).

For each model folder given (default: fresh random tiny Llama — GQA, Llama 3 rope scaling — and
Qwen2 checkpoints written by transformers into a temporary directory), runs the same token
sequences through transformers and through forge (`forge-logits`) and prints the max abs
difference of the logits; fails above 1e-4. Point it at a real checkpoint folder to check it:
    scripts/.venv/bin/python scripts/transformers_check.py ~/models/SmolLM2-135M

Usage:  scripts/setup.sh && scripts/.venv/bin/python scripts/transformers_check.py [MODEL_DIR ...]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def random_models(tmp: Path):
    torch.manual_seed(0)
    out = []
    for name, model in [
        ("llama-gqa-llama3-rope", LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}))),
        ("qwen2-bias", Qwen2ForCausalLM(Qwen2Config(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))),
    ]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(1.5 * torch.randn_like(p) / p.shape[-1] ** 0.5)
        d = tmp / name
        model.save_pretrained(d)
        out.append(d)
    return out


def main():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "forge-stages", "--bin", "forge-logits"], cwd=ROOT, check=True)
    dirs = [Path(a) for a in sys.argv[1:]] or random_models(Path(tempfile.mkdtemp(prefix="forge-tf-")))
    worst = 0.0
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (48,), generator=g).tolist()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        r = subprocess.run([ROOT / "target/release/forge-logits", d, "--ids", ",".join(map(str, ids))],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"forge-logits failed on {d}: {r.stderr}")
        ours = torch.tensor(json.loads(r.stdout)["logits"])
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        print(f"{d.name}: {len(ids)} tokens, logits up to {ref.abs().max():.2f}, max |forge - transformers| = {diff:.2e}")
    print("OK" if worst <= 1e-4 else "MISMATCH")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
