#!/usr/bin/env python3
"""LoRA training throughput and memory: forge against PyTorch + PEFT on CPU, side by side.

Shapes (random weights, random tokens, the same on both sides):

- `smollm2-135m`: SmolLM2-135M's shape — hidden 576, 30 layers, 9 query / 3 key-value heads,
  FFN 1536, vocabulary 49,152, untied head; batch 4 x 256;
- `gemma3-270m`: Gemma 3 270M's — hidden 640, 18 layers, 4 / 1 heads of 256, FFN 2048, GeGLU,
  vocabulary 262,144, tied embeddings, sliding-window layers; batch 1 x 256;
- `tiny`: a small llama (hidden 512, 4 layers, FFN 1408, vocabulary 4096); batch 4 x 256.

LoRA rank 16, alpha 32, on all seven projections (q, k, v, o, gate, up, down); AdamW; gradient
clipping; the same thread count on both sides (RAYON/OMP/MKL_NUM_THREADS). Every position is a
training target on both sides (no prompt tokens of weight 0, which only forge could skip). Each
side runs --warmup untimed steps and --steps timed ones in a fresh process; the script reports
tokens/s (timed steps only) and the process's peak RSS (/usr/bin/time -v), --runs times,
alternating, and the median ratio forge / PyTorch.

forge runs `forge-train-bench` (its LoRA engine, frozen base in bf16 by default; `--forge-dtype
f32` for f32); PyTorch runs transformers' LlamaForCausalLM / Gemma3ForCausalLM (eager attention)
with PEFT in float32, its default, from scripts/.venv (scripts/setup.sh installs torch,
transformers, peft).

Usage:  python3 bench/train.py [--shapes smollm2-135m,gemma3-270m] [--threads 2] [--runs 3]
                               [--steps 4] [--warmup 1] [--forge-dtype bf16]
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "tiny": dict(batch=4, seq=256),
    "smollm2-135m": dict(batch=4, seq=256),
    "gemma3-270m": dict(batch=1, seq=256),
}

TORCH = r"""
import json, sys, time, torch
from peft import LoraConfig, get_peft_model
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"]); torch.manual_seed(0)
if a["shape"] == "gemma3-270m":
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM
    cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, max_position_embeddings=32768, rope_theta=1e6, rope_local_base_freq=1e4,
        tie_word_embeddings=True, attn_implementation="eager")
    model = Gemma3ForCausalLM(cfg).float()
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    if a["shape"] == "smollm2-135m":
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=2048,
            tie_word_embeddings=False, attn_implementation="eager")
    else:
        cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
            tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float()
vocab = cfg.vocab_size
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=a["targets"],
                                         task_type="CAUSAL_LM"))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(7)
tokens, secs = 0, 0.0
for step in range(a["warmup"] + a["steps"]):
    ids = torch.randint(0, vocab, (a["batch"], a["seq"]), generator=g)
    labels = torch.randint(0, vocab, (a["batch"], a["seq"]), generator=g)
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
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
    ap.add_argument("--shapes", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--forge-dtype", default="bf16", choices=["bf16", "f32"])
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not PY.exists():
        subprocess.run([ROOT / "scripts" / "setup.sh"], check=True)
    print("building forge-train-bench (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "forge-train", "--bin", "forge-train-bench"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    results, rows = {}, []
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        a = dict(s, shape=shape, threads=args.threads, steps=args.steps, warmup=args.warmup, targets=TARGETS)
        forge_cmd = [str(ROOT / "target/release/forge-train-bench"), "--shape", shape, "--batch", str(s["batch"]),
                     "--seq", str(s["seq"]), "--rank", "16", "--targets", ",".join(TARGETS), "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--base-dtype", args.forge_dtype]
        res = {"forge": [], "pytorch": []}
        for run in range(args.runs):
            f, frss = timed(forge_cmd, env)
            res["forge"].append({**f, "peak_rss_mib": frss})
            t, trss = timed([str(PY), "-c", TORCH, json.dumps(a)], env)
            res["pytorch"].append({**t, "peak_rss_mib": trss})
            print(f"{shape} run {run + 1}: forge {f['tokens_per_second']:.0f} tok/s ({frss:.0f} MiB), "
                  f"PyTorch+PEFT {t['tokens_per_second']:.0f} tok/s ({trss:.0f} MiB)", flush=True)
        med = lambda side, k: statistics.median(r[k] for r in res[side])
        ratio = med("forge", "tokens_per_second") / med("pytorch", "tokens_per_second")
        results[shape] = {"runs": res, "ratio": ratio}
        rows.append(f"| {shape}, batch {s['batch']} x {s['seq']} | {med('forge', 'tokens_per_second'):.0f} "
                    f"({med('forge', 'peak_rss_mib'):.0f} MiB) | {med('pytorch', 'tokens_per_second'):.0f} "
                    f"({med('pytorch', 'peak_rss_mib'):.0f} MiB) | {ratio:.2f}x |")
    text = "\n".join([
        f"# LoRA r16 on all seven projections, CPU, {args.threads} threads, forge base in {args.forge_dtype}",
        "",
        f"| shape | forge tokens/s (peak RSS) | PyTorch + PEFT tokens/s (peak RSS) | forge / PyTorch |",
        "|---|---|---|---|",
        *rows,
        "",
        f"median of {args.runs} alternating runs, {args.steps} timed steps each",
    ]) + "\n"
    (OUT / "train.md").write_text(text)
    (OUT / "train.json").write_text(json.dumps({"threads": args.threads, "forge_dtype": args.forge_dtype,
                                                "results": results}, indent=2) + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
