#!/usr/bin/env python3
"""ggml's own quantizers with an importance matrix, for forge-gguf's compatibility test.

Calls `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)` from the libggml-base
that llama-cpp-python ships (what `llama-quantize --imatrix` runs per tensor) on fixed random rows
and importance weights, and writes inputs and output bytes to
crates/forge-gguf/tests/data/imatrix.json; `crates/forge-gguf/tests/gguf.rs` quantizes the same
rows with forge and must produce the same bytes.

Usage (after `scripts/.venv/bin/pip install llama-cpp-python`):
    scripts/.venv/bin/python scripts/ggml_imatrix_reference.py
"""

import ctypes
import json
import random
from pathlib import Path

import llama_cpp

OUT = Path(__file__).resolve().parent.parent / "crates" / "forge-gguf" / "tests" / "data" / "imatrix.json"
TYPES = {"q4_0": (2, 18), "q5_0": (6, 22)}  # ggml type id, bytes per 32-weight block


def main():
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.POINTER(ctypes.c_float)]
    rng = random.Random(3)
    rows, cols = 6, 256
    # Heavy-tailed rows (as trained weights are) and importance weights spanning decades.
    x = [rng.gauss(0, 1) * (3.0 if rng.random() < 0.05 else 1.0) * 0.05 for _ in range(rows * cols)]
    w = [10 ** rng.uniform(-3, 1) for _ in range(cols)]
    src = (ctypes.c_float * len(x))(*x)
    imat = (ctypes.c_float * cols)(*w)
    out = {"rows": rows, "cols": cols, "x": x, "weights": w, "expected": {}}
    for name, (ty, block) in TYPES.items():
        size = rows * cols // 32 * block
        dst = (ctypes.c_uint8 * size)()
        n = ggml.ggml_quantize_chunk(ty, src, dst, 0, rows, cols, imat)
        assert n == size, (name, n, size)
        out["expected"][name] = bytes(dst).hex()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out) + "\n")
    print(f"{', '.join(TYPES)}: {rows} rows of {cols} -> {OUT}")


if __name__ == "__main__":
    main()
