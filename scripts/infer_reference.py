#!/usr/bin/env python3
"""llama.cpp's logits on forge-infer's qwen2 test files, for crates/forge-infer/tests/qwen2.rs.

Reads crates/forge-infer/tests/data/qwen2-{f32,q8_0,q4_0}.gguf (written by
`cargo test -p forge-infer --test qwen2 -- --ignored write_the_files`), evaluates a fixed token
sequence in llama.cpp (llama-cpp-python, logits_all, f16 KV cache as forge keeps), and writes
crates/forge-infer/tests/data/qwen2.json: the ids, and per level the file's sha256, the logits at
every position, and the tolerance the test holds forge to.

Usage:  scripts/.venv/bin/python scripts/infer_reference.py
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from llama_cpp import Llama

DATA = Path(__file__).resolve().parent.parent / "crates" / "forge-infer" / "tests" / "data"
IDS = [1, 17, 42, 99, 3, 64, 64, 120, 7, 200, 88, 31, 5, 101, 127, 250, 9, 77, 150, 12]
# f32: float noise (measured 6e-5: another order of summation); q8_0 and q4_0: forge computes
# what llama.cpp computes (measured 5e-7: the JSON's rounding).
TOLERANCE = {"f32": 1e-3, "q8_0": 1e-4, "q4_0": 1e-4}


def main():
    out = {"ids": IDS, "llama_cpp_python": __import__("llama_cpp").__version__, "levels": {}}
    for level, tol in TOLERANCE.items():
        path = DATA / f"qwen2-{level}.gguf"
        llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
        llm.eval(IDS)
        logits = np.array(llm.scores[: len(IDS)], dtype=np.float64)
        out["levels"][level] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "tolerance": tol,
            "logits": [[round(float(x), 6) for x in row] for row in logits],
        }
        print(f"{level}: {logits.shape}, |max| {np.abs(logits).max():.3f}")
    (DATA / "qwen2.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
