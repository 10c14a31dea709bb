#!/usr/bin/env python3
"""llama.cpp's token ids and logits on the two real GGUF bases, for forge's parity tests.

For SmolLM2-135M-Instruct (Q4_1, llama, gpt2 BPE) and Gemma 3 270M (Q4_K_M, gemma3,
SentencePiece), this records with llama.cpp (llama-cpp-python):

- the token ids of a fixed set of texts — ASCII, accents, emoji, CJK, runs of spaces and
  newlines, tabs, digits, and the chat template's special tokens — tokenized with special tokens
  parsed and without BOS, exactly as `forge_model::Tokenizer::encode` does;
- for a few prompts (the student's chat format), the logits at every position: the argmax of
  each position, and at the last position the 64 largest logits and the logits of 256 fixed ids —
  once on the file as it is (llama.cpp multiplies its quantized blocks by activations rounded to
  8 bits), and once on the file dequantized to F32 by llama.cpp's own quantizer
  (`llama_model_quantize`, i.e. `llama-quantize --allow-requantize ... F32`) with an F32 KV cache,
  where llama.cpp computes in f32 as forge's training forward does.

It writes tests/data/bases/<name>.json; `tests/bases.rs` fetches the same files the way
`forge build` does and checks forge's tokenizer (ids equal) and forge's f32 forward of the
dequantized weights (within a stated tolerance) against them.

Usage (after `scripts/.venv/bin/pip install llama-cpp-python`):
    scripts/.venv/bin/python scripts/llama_reference.py SMOLLM2.gguf GEMMA3.gguf
(the files are what `forge build base:smollm2-135m` and `base:gemma3-270m` fetch; see
`forge artifact path`).
"""

import ctypes
import json
import random
import sys
import tempfile
from pathlib import Path

import llama_cpp

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "bases"

TEXTS = [
    "Hello, world!",
    "HEAR YE, good folk of Highmere! The Baron of Ostrand hoards grain while you starve.",
    "café naïve résumé Ærøskøbing Straße déjà vu — «quoted» ‘single’ “double”",
    "Emoji: 🐉🔥 ⚔️ 👑🏰 and a flag 🇫🇷, a family 👨‍👩‍👧",
    "中文字符 日本語のテキスト 한국어",
    "Runs of spaces:  two,   three,    four,        eight.",
    "Newlines:\nsingle\n\ndouble\n\n\ntriple\n\n\n\n\nfive",
    "Tabs\tand\t\tdouble tabs, trailing spaces   ",
    "   leading spaces and a trailing newline\n",
    "Digits 1234567890 and 3.14159, 1,000,000 coins; year 1066.",
    "Mixed: don't, won't, it's, y'all'd've, ALLCAPS, camelCase, snake_case_words",
    "Code: fn main() { println!(\"{}\", x + 1); } // done",
    "",
    " ",
    "\n",
]

# The student's prompt format, with each file's special tokens written out.
CHAT = {
    "smollm2-135m": [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nSender: Ardenfall\nTarget: the Baron of Ostrand<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWrite a poster.<|im_end|>\n<|im_start|>assistant\nHEAR YE<|im_end|>\n<|endoftext|>",
    ],
    "gemma3-270m": [
        "<bos><start_of_turn>user\nSender: Ardenfall\nTarget: the Baron of Ostrand<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>user\nWrite a poster.<end_of_turn>\n<start_of_turn>model\nHEAR YE<end_of_turn>\n<eos>",
    ],
}

PROMPTS = {
    "smollm2-135m": [
        CHAT["smollm2-135m"][0],
        "The capital of France is",
        "Once upon a time, in a kingdom far away, there lived a",
    ],
    "gemma3-270m": [
        CHAT["gemma3-270m"][0],
        "<bos>The capital of France is",
        "<bos>Once upon a time, in a kingdom far away, there lived a",
    ],
}


def dequantize(path, out):
    """The file at F32, by llama.cpp's quantizer."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 0  # LLAMA_FTYPE_ALL_F32
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed on {path}: {rc}")


def logits(llm, name, probe):
    vocab = llm.n_vocab()
    prompts = []
    for text in PROMPTS[name]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        scores = llm.scores[: len(ids)]
        last = scores[-1]
        top = sorted(range(vocab), key=lambda i: -last[i])[:64]
        prompts.append({
            "text": text,
            "ids": ids,
            "argmax": [int(row.argmax()) for row in scores],
            "top_ids": top,
            "top_logits": [float(last[i]) for i in top],
            "probe_ids": probe,
            "probe_logits": [float(last[i]) for i in probe],
        })
    return prompts


def record(name, path):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    vocab = llm.n_vocab()
    tokenized = []
    for text in TEXTS + CHAT[name]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        tokenized.append({"text": text, "ids": ids})
    rng = random.Random(7)
    probe = sorted(rng.sample(range(vocab), 256))
    quantized = logits(llm, name, probe)
    del llm
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        dequantize(path, f32)
        llm = llama_cpp.Llama(model_path=str(f32), n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                              type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
        exact = logits(llm, name, probe)
        del llm
    out = {
        "file": Path(path).name,
        "llama_cpp_python": llama_cpp.__version__,
        "vocab": vocab,
        "tokenized": tokenized,
        "prompts": quantized,
        "prompts_f32": exact,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"{name}: {len(tokenized)} texts, {len(quantized)} prompts -> {OUT / (name + '.json')}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    record("smollm2-135m", sys.argv[1])
    record("gemma3-270m", sys.argv[2])


if __name__ == "__main__":
    main()
