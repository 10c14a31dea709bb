#!/usr/bin/env python3
"""LoRA training throughput: forge against PyTorch + PEFT on CPU, side by side.

The same model shape (a random llama: hidden 512, 4 layers, 8 heads, FFN 1408, vocabulary 4096,
untied head), the same LoRA (rank 16, alpha 32, on q_proj and v_proj), the same batch (4 x 256
random tokens), AdamW, the same thread count. Each side runs --warmup untimed steps and --steps
timed ones in a fresh process; the script reports tokens/s (timed steps only) and the process's
peak RSS (/usr/bin/time -v), --runs times alternating, and the median ratio forge / PyTorch.

forge's side is `forge-train-bench` (crates/forge-train/src/bin/forge-train-bench.rs); PyTorch's
is the script below, run with scripts/.venv (scripts/setup.sh installs torch, transformers, peft).

Usage:  python3 bench/train.py [--threads 2] [--runs 3] [--steps 10] [--warmup 2]
Results: bench/out/train.md and bench/out/train.json.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = ROOT / "scripts" / ".venv" / "bin" / "python"

SHAPE = dict(hidden=512, layers=4, heads=8, ffn=1408, vocab=4096, batch=4, seq=256, rank=16)

TORCH = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"]); torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["ffn"],
    num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["heads"],
    max_position_embeddings=max(512, a["seq"]), tie_word_embeddings=False, attn_implementation="eager")
model = get_peft_model(LlamaForCausalLM(cfg).float(),
    LoraConfig(r=a["rank"], lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(7)
tokens, secs = 0, 0.0
for step in range(a["warmup"] + a["steps"]):
    ids = torch.randint(0, a["vocab"], (a["batch"], a["seq"]), generator=g)
    labels = torch.randint(0, a["vocab"], (a["batch"], a["seq"]), generator=g)
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a["vocab"]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step(); opt.zero_grad()
    if step >= a["warmup"]:
        secs += time.perf_counter() - t0; tokens += a["batch"] * a["seq"]
print(json.dumps({"tokens_per_second": tokens / secs, "seconds_per_step": secs / a["steps"], "loss": loss.item()}))
"""


def timed(cmd, env):
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {cmd}\n{r.stdout}\n{r.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    line = [l for l in r.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line), rss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not PY.exists():
        subprocess.run([ROOT / "scripts" / "setup.sh"], check=True)
    print("building forge-train-bench (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "forge-train", "--bin", "forge-train-bench"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    a = dict(SHAPE, threads=args.threads, steps=args.steps, warmup=args.warmup)
    forge_cmd = [str(ROOT / "target/release/forge-train-bench")] + [
        x for k, v in SHAPE.items() for x in (f"--{k}", str(v))] + ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    res = {"forge": [], "pytorch": []}
    for run in range(args.runs):
        f, frss = timed(forge_cmd, env)
        res["forge"].append({**f, "peak_rss_mib": frss})
        t, trss = timed([str(PY), "-c", TORCH, json.dumps(a)], env)
        res["pytorch"].append({**t, "peak_rss_mib": trss})
        print(f"run {run + 1}: forge {f['tokens_per_second']:.0f} tok/s ({frss:.0f} MiB), "
              f"PyTorch+PEFT {t['tokens_per_second']:.0f} tok/s ({trss:.0f} MiB)", flush=True)
    med = lambda side, k: statistics.median(r[k] for r in res[side])
    ratio = med("forge", "tokens_per_second") / med("pytorch", "tokens_per_second")
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    text = "\n".join([
        f"# LoRA training on CPU, {args.threads} threads ({shape}; q_proj, v_proj)",
        "",
        "| | tokens/s (median of %d) | peak RSS |" % args.runs,
        "|---|---|---|",
        f"| forge | {med('forge', 'tokens_per_second'):.0f} | {med('forge', 'peak_rss_mib'):.0f} MiB |",
        f"| PyTorch + PEFT | {med('pytorch', 'tokens_per_second'):.0f} | {med('pytorch', 'peak_rss_mib'):.0f} MiB |",
        "",
        f"forge / PyTorch throughput: {ratio:.2f}x",
    ]) + "\n"
    (OUT / "train.md").write_text(text)
    (OUT / "train.json").write_text(json.dumps({"shape": SHAPE, "threads": args.threads, "runs": res, "ratio": ratio}, indent=2) + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
