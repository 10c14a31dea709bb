#!/usr/bin/env python3
"""Where do forge's decoder and llama.cpp part on a quantized file? A bisection over tensors.

Takes a GGUF model with f32 (or f16/bf16) weights and writes variants of it in which only the
tensors whose names match one pattern are quantized (Q8_0 by default, with gguf-py's quantizer,
which is llama.cpp's reference one), the rest left as they are. Each variant runs in llama.cpp
(llama-cpp-python, 2 threads) and in forge (`forge-decode --top`), on the same token ids, and the
script prints the largest difference between their last-position logits over the 64 largest.
A variant whose difference stands out names the tensors whose quantized product the two compute
differently.

Usage:  scripts/.venv/bin/python scripts/infer_parity.py MODEL-F32.gguf [--type Q8_0]
                [--ids 504,3575,282,4649,314] [--groups all,attn_q,attn_k,...]
A f32 file from a quantized one: llama-cpp-python's `llama_model_quantize` with ftype 0 and
allow_requantize (what `llama-quantize --allow-requantize IN OUT F32` runs).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DECODE = ROOT / "target" / "release" / "forge-decode"

GROUPS = {
    "none": r"^$",
    "all": r"\.weight$",
    "attn_q": r"attn_q\.weight",
    "attn_k": r"attn_k\.weight",
    "attn_v": r"attn_v\.weight",
    "attn_output": r"attn_output\.weight",
    "ffn_gate": r"ffn_gate\.weight",
    "ffn_up": r"ffn_up\.weight",
    "ffn_down": r"ffn_down\.weight",
    "token_embd": r"^token_embd\.weight",
    "output": r"^output\.weight",
}

LLAMA = r"""
import json, sys, numpy as np
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["model"], n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
llm.eval(a["ids"])
l = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
print(json.dumps([float(x) for x in l]))
"""


def variant(src, dst, pattern, qtype):
    import gguf
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vt, sub_type=sub)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for t in reader.tensors:
        data = np.asarray(t.data)
        is_float = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                     gguf.GGMLQuantizationType.BF16)
        if is_float and len(data.shape) == 2 and re.search(pattern, t.name):
            values = gguf.quants.dequantize(data, t.tensor_type) if t.tensor_type != gguf.GGMLQuantizationType.F32 \
                else data.astype(np.float32)
            packed = gguf.quants.quantize(values.astype(np.float32), q)
            writer.add_tensor(t.name, packed, raw_dtype=q)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def compare(path, ids):
    ll = json.loads(subprocess.run([sys.executable, "-c", LLAMA, json.dumps({"model": str(path), "ids": ids})],
                                   capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    out = subprocess.run([DECODE, path, "--ids", ",".join(map(str, ids)), "--top", "64", "--threads", "2"],
                         capture_output=True, text=True, check=True).stdout
    top = json.loads(out)["top"]
    worst = max(abs(l - ll[i]) for i, l in top)
    return worst, top[0][0], int(np.argmax(ll))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--ids", default="504,3575,282,4649,314")
    ap.add_argument("--groups", default=",".join(GROUPS))
    a = ap.parse_args()
    ids = [int(x) for x in a.ids.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for g in a.groups.split(","):
            path = Path(tmp) / f"{g}.gguf"
            variant(a.model, str(path), GROUPS[g], a.type)
            worst, f_arg, l_arg = compare(path, ids)
            print(f"{g:12} {a.type} max |Δ logit| over forge's top 64: {worst:.5f}   argmax forge {f_arg} llama.cpp {l_arg}",
                  flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
