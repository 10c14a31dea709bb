#!/usr/bin/env python3
"""Do llama.cpp and forge compute the same thing from forge's GGUF files?

Builds a small pipeline with forge (a copy of tests/workspaces/tiny-model with a base wide enough
for the k-quants, trained a few epochs, quantized to every level forge writes), then with
llama-cpp-python (llama.cpp itself, built from PyPI's source package) and the `gguf` package:
  1. every level's model.gguf loads in llama.cpp and `gguf`'s reader;
  2. greedy-decodes 32 tokens after each of a few eval prompts, and compares them with forge's
     decoding of the same file
     (`forge-decode`: forge's quantized decoder on the same file); they must be identical at
     F16 and Q8_0;
  3. loads the LoRA adapter GGUF on its base GGUF in llama.cpp and compares its greedy tokens
     with the merged model's (forge, and llama.cpp's own F32 file);
  4. quantizes forge's F32 file with llama.cpp's own quantizer (`llama_model_quantize`, what
     `llama-quantize` runs) to every quantized level and compares each tensor's bytes and type
     with forge's file at that level.
Prints a table; exits 1 if a required match fails.

Usage:  scripts/setup.sh && scripts/.venv/bin/pip install llama-cpp-python gguf
        scripts/.venv/bin/python scripts/gguf_check.py [--prompts 8] [--tokens 32]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEVELS = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def workspace(dir: Path):
    shutil.copytree(ROOT / "tests/workspaces/tiny-model", dir)
    kdl = (dir / "forge.kdl").read_text()
    kdl = kdl.replace('layers=2 hidden=64 heads=4 kv-heads=2 ffn=128 vocab=320 context=128',
                      'layers=2 hidden=256 heads=4 kv-heads=2 ffn=512 vocab=320 context=128')
    kdl = kdl.replace("epochs=3", "epochs=8")
    kdl = re.sub(r'    quantize [^\n]*\n', "    quantize " + " ".join(f'"{l}"' for l in LEVELS) + "\n", kdl)
    (dir / "forge.kdl").write_text(kdl)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-q", "-p", "forge-infer", "--bin", "forge-decode"], cwd=ROOT)
    forge, decode = ROOT / "target/release/forge", ROOT / "target/release/forge-decode"
    ws = Path(tempfile.mkdtemp(prefix="forge-gguf-")) / "ws"
    workspace(ws)
    print("building the pipeline with forge ...", flush=True)
    sh([forge, "-C", ws, "build"])
    path = lambda a: Path(sh([forge, "-C", ws, "artifact", "path", a]).strip())
    merged, dataset, adapter = path("tiny:merged"), path("tiny:dataset"), path("tiny:gguf-adapter")
    tok = AutoTokenizer.from_pretrained(merged)
    inputs = [json.loads(l)["input"] for l in (dataset / "eval.jsonl").read_text().splitlines()[: args.prompts]]
    texts = [tok.apply_chat_template([{"role": "user", "content": i}], add_generation_prompt=True, tokenize=False) for i in inputs]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def llama_cpp_greedy(model, ids, lora=None):
        llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2,
                    verbose=False, seed=0)
        out = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            out.append(t)
            if len(out) == args.tokens:
                break
        return out

    def forge_greedy(model, ids):
        return json.loads(sh([decode, model, "--ids", ",".join(map(str, ids)), "--greedy", args.tokens]))["tokens"]

    def logit_gap(model, prompts):
        """The largest |llama.cpp - forge| logit after any of the prompts."""
        import numpy as np
        llm = Llama(model_path=str(model), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
        gap = 0.0
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[len(ids) - 1])
            top = json.loads(sh([decode, model, "--ids", ",".join(map(str, ids)), "--top", len(theirs)]))["top"]
            ours = np.zeros_like(theirs)
            for t, v in top:
                ours[t] = v
            gap = max(gap, float(np.abs(theirs - ours).max()))
        return gap

    merged_tokens = [forge_greedy(merged, p) for p in prompts]
    rows, ok = [], True
    for level in LEVELS:
        f = path(f"tiny:gguf:{level}") / "model.gguf"
        reader = gguf.GGUFReader(str(f))
        types = sorted({t.tensor_type.name for t in reader.tensors})
        same, agree, total = 0, 0, 0
        for p in prompts:
            a, b = llama_cpp_greedy(f, p), forge_greedy(f, p)
            same += a == b
            agree += sum(x == y for x, y in zip(a, b))
            total += len(a)
        if level in ("f16", "q8_0") and same != len(prompts):
            ok = False
        rows.append((level, f.stat().st_size, ",".join(types), same, agree, total, logit_gap(f, prompts)))
    print()
    print("| level | size | tensor types | prompts identical (llama.cpp vs forge) | tokens agreeing "
          "| max abs logit difference after the prompt |")
    print("|---|---|---|---|---|---|")
    for level, size, types, same, agree, total, gap in rows:
        print(f"| {level} | {size / 1024:.0f} KiB | {types} | {same}/{len(prompts)} | {agree}/{total} | {gap:.1e} |")

    base, lora = adapter / "base.gguf", adapter / "adapter.gguf"
    f32 = path("tiny:gguf:f32") / "model.gguf"
    same_merged = same_f32 = 0
    for p, m in zip(prompts, merged_tokens):
        t = llama_cpp_greedy(base, p, lora)
        same_merged += t == m
        same_f32 += t == llama_cpp_greedy(f32, p)
    print()
    print(f"LoRA adapter GGUF on its base GGUF in llama.cpp: {same_merged}/{len(prompts)} prompts identical to the merged "
          f"model decoded by forge, {same_f32}/{len(prompts)} to llama.cpp on the merged F32 GGUF")
    ok = ok and same_merged == len(prompts)

    import ctypes
    import llama_cpp
    ftypes = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
    print()
    print("| level | tensors byte-identical to llama-quantize's | same types |")
    print("|---|---|---|")
    for level, ftype in ftypes.items():
        out = ws / f"llama-quantize-{level}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            sys.exit(f"llama_model_quantize failed for {level}: {rc}")
        theirs = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        ours = {t.name: t for t in gguf.GGUFReader(str(path(f"tiny:gguf:{level}") / "model.gguf")).tensors}
        same_bytes = sum(theirs[n].data.tobytes() == t.data.tobytes() for n, t in ours.items() if n in theirs)
        same_types = sum(theirs[n].tensor_type == t.tensor_type for n, t in ours.items() if n in theirs)
        print(f"| {level} | {same_bytes}/{len(ours)} | {same_types}/{len(ours)} |")
        ok = ok and same_bytes == len(ours) == len(theirs)
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
