#!/usr/bin/env python3
"""Does Hugging Face PEFT load forge's LoRA adapters, and compute what forge computes?

Builds a workspace's adapter and merged artifacts with forge (default: a copy of
tests/workspaces/tiny-model, a LoRA on a scratch base; `--workspace . --target defame` for the
root demo's adapter on SmolLM2-135M, `--workspace examples/gemma-defame --target defame` for
Gemma 3 — their GGUF base loaded by transformers' GGUF support, dequantized), then with
transformers + PEFT:
  1. loads the adapter with PeftModel.from_pretrained on its base and compares the logits with
     forge's (the same adapter, unmerged) on the dataset's eval inputs;
  2. merges it with merge_and_unload() and compares with forge's merged artifact loaded by
     transformers (AutoModelForCausalLM) — weights and logits.
Prints the max abs differences; fails above 2e-5 relative to the largest logit (float32, summed
in another order; 1e-4 absolute for the merged model).

Usage:  scripts/setup.sh && scripts/.venv/bin/python scripts/peft_check.py [--workspace DIR --target NAME]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--target", default="tiny")
    args = ap.parse_args()
    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-q", "-p", "forge-stages", "--bin", "forge-logits"], cwd=ROOT)
    forge, logits_bin = ROOT / "target/release/forge", ROOT / "target/release/forge-logits"
    ws = args.workspace
    if ws is None:
        ws = Path(tempfile.mkdtemp(prefix="forge-peft-")) / "ws"
        shutil.copytree(ROOT / "tests/workspaces/tiny-model", ws)
    t = args.target
    sh([forge, "-C", ws, "build", f"{t}:merged"])
    adapter = Path(sh([forge, "-C", ws, "artifact", "path", f"{t}:adapter"]).strip())
    merged = Path(sh([forge, "-C", ws, "artifact", "path", f"{t}:merged"]).strip())
    dataset = Path(sh([forge, "-C", ws, "artifact", "path", f"{t}:dataset"]).strip())

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base_info = adapter / "forge-base.json"
    extra = []
    if base_info.exists():
        # A GGUF base: the fetched artifact base:NAME (or the workspace file).
        info = json.loads(base_info.read_text())
        gguf = (ws / info["file"]) if info.get("file") else \
            Path(sh([forge, "-C", ws, "artifact", "path", f"base:{info['base']}"]).strip()) / "model.gguf"
        base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        extra = ["--base", str(gguf)]
    else:
        base_dir = adapter / "base" if cfg["base_model_name_or_path"] == "base" else ws / cfg["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    print(f"PEFT loaded {adapter.name}: r={cfg['r']} alpha={cfg['lora_alpha']} targets={cfg['target_modules']}")

    samples = [json.loads(l) for l in (dataset / "eval.jsonl").read_text().splitlines()[:4]]
    worst, scale = 0.0, 0.0
    for s in samples:
        prompt = tok.apply_chat_template([{"role": "user", "content": s["input"]}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt + s["output"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = peft_model(torch.tensor([ids])).logits[0]
        ours = json.loads(sh([logits_bin, adapter, "--workspace", ws, *extra, "--ids", ",".join(map(str, ids))]))
        diff = (torch.tensor(ours["logits"]) - ref).abs().max().item()
        worst = max(worst, diff)
        scale = max(scale, ref.abs().max().item())
    print(f"adapter: PEFT vs forge logits on {len(samples)} eval samples: max |diff| = {worst:.2e} "
          f"(logits up to {scale:.1f}: {worst / scale:.1e} relative)")

    merged_peft = peft_model.merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    wdiff = max((a - b).abs().max().item() for a, b in zip(merged_peft.state_dict().values(), ours.state_dict().values()))
    with torch.no_grad():
        x = torch.tensor([ids])
        ldiff = (merged_peft(x).logits - ours(x).logits).abs().max().item()
    print(f"merged: PEFT merge_and_unload vs forge's merged artifact: max |weight diff| = {wdiff:.2e}, max |logit diff| = {ldiff:.2e}")
    # f32 sums in another order, compounding over the layers: relative to the logits' size.
    ok = worst <= 2e-5 * max(scale, 5.0) and ldiff <= 1e-4
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
