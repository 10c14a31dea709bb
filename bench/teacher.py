#!/usr/bin/env python3
"""Teacher throughput benchmark: N chat requests against a loopback server with 200 ms latency.

At max-parallel P and latency L the ceiling is P / L requests per second (32 / 0.2 s = 160/s).
This script measures, side by side against the same server process:

  forge   `forge build` of a dataset of N samples, one teacher call each, from a cold cache
          (a fresh --cache-dir per run), max-parallel=P;
  python  the OpenAI Python SDK's AsyncOpenAI with an asyncio.Semaphore(P) making the same N
          requests: what a user would otherwise write.

and reports the achieved requests per second of each as a fraction of the ceiling (goal >= 90%),
median of --runs runs. The server is `forge-fake-teacher --latency-ms 200` (a real axum HTTP
server on 127.0.0.1, built from this repository).

Usage:
    bench/teacher.py [--requests 1600] [--parallel 32] [--latency-ms 200] [--runs 3] [--skip-python]

Needs: a Rust toolchain; for the Python side a virtual environment this script creates in
bench/.venv (`pip install openai`). Results go to bench/out/teacher.md and bench/out/teacher.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VENV = ROOT / "bench" / ".venv"

PY_CLIENT = r"""
import asyncio, sys, time
from openai import AsyncOpenAI

async def main(base_url, n, parallel):
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=8, timeout=60)
    sem = asyncio.Semaphore(parallel)
    async def one(i):
        async with sem:
            r = await client.chat.completions.create(
                model="fake-4o", seed=i, temperature=0.7,
                messages=[{"role": "user", "content": f"Write poster number {i}."}])
            return r.choices[0].message.content
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(one(i) for i in range(n)))
    dt = time.perf_counter() - t0
    assert len(answers) == n and all(answers)
    print(dt)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {cmd}\n{r.stdout}\n{r.stderr}")
    return r


def workspace(dir: Path, base_url: str, n: int, parallel: int):
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "forge.kdl").write_text(
        f"""forge 1
list "topics" {{ items "geese" "turnips" "taxes" "the king" "the harvest" "the tides" }}
teacher "fake" kind="openai" model="fake-4o" base-url="{base_url}" max-parallel={parallel} timeout=60
recipe "bench" {{
    choice "topic" from="topics"
    input "{{{{ topic }}}} {{{{ sample_index }}}}"
    prompt "Write poster number {{{{ sample_index }}}} about {{{{ topic }}}}."
}}
model "bench" recipe="bench" {{
    dataset samples={n} eval=1 seed=1 teacher="fake"
}}
"""
    )


def ensure_openai():
    py = VENV / "bin" / "python"
    if not py.exists():
        print("creating bench/.venv ...", flush=True)
        sh([sys.executable, "-m", "venv", str(VENV)])
    if subprocess.run([str(py), "-c", "import openai"], capture_output=True).returncode != 0:
        print("installing openai into bench/.venv ...", flush=True)
        sh([str(py), "-m", "pip", "install", "-q", "openai"])
    return py


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1600)
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--latency-ms", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-python", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ceiling = args.parallel / (args.latency_ms / 1000)

    print("building forge and forge-fake-teacher (release) ...", flush=True)
    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-q", "-p", "forge-fake-teacher"], cwd=ROOT)
    forge = ROOT / "target" / "release" / "forge"
    fake = ROOT / "target" / "release" / "forge-fake-teacher"
    py = None if args.skip_python else ensure_openai()

    server = subprocess.Popen([str(fake), "--latency-ms", str(args.latency_ms)], stdout=subprocess.PIPE, text=True)
    base_url = server.stdout.readline().strip()
    results = {"forge": [], "python": []}
    tmp = Path(tempfile.mkdtemp(prefix="forge-teacher-bench-"))
    try:
        ws = tmp / "ws"
        workspace(ws, base_url, args.requests, args.parallel)
        for run in range(args.runs):
            # forge: a cold cache every run, so every sample is a real request.
            cache = tmp / f"cache-{run}"
            t0 = time.perf_counter()
            sh([str(forge), "-q", "-C", str(ws), "--cache-dir", str(cache), "build"])
            dt = time.perf_counter() - t0
            results["forge"].append(dt)
            shutil.rmtree(cache)
            print(f"forge   run {run + 1}: {args.requests / dt:7.1f} req/s ({dt:.2f} s)", flush=True)
            if py:
                r = sh([str(py), "-c", PY_CLIENT, base_url, str(args.requests), str(args.parallel)])
                dt = float(r.stdout.strip())
                results["python"].append(dt)
                print(f"python  run {run + 1}: {args.requests / dt:7.1f} req/s ({dt:.2f} s)", flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    report = {"requests": args.requests, "parallel": args.parallel, "latency_ms": args.latency_ms,
              "ceiling_rps": ceiling, "runs": args.runs}
    lines = [
        f"# Teacher throughput: {args.requests} requests, max-parallel {args.parallel}, "
        f"{args.latency_ms} ms latency (ceiling {ceiling:.0f} req/s)",
        "",
        "| client | median wall | requests/s | of ceiling |",
        "|---|---|---|---|",
    ]
    for name, times in results.items():
        if not times:
            continue
        med = statistics.median(times)
        rps = args.requests / med
        report[name] = {"median_s": med, "times_s": times, "rps": rps, "of_ceiling": rps / ceiling}
        label = "forge build (dataset stage)" if name == "forge" else "Python AsyncOpenAI + Semaphore"
        lines.append(f"| {label} | {med:.2f} s | {rps:.1f} | {100 * rps / ceiling:.1f}% |")
    if results["python"]:
        ratio = report["forge"]["rps"] / report["python"]["rps"]
        report["forge_vs_python"] = ratio
        lines += ["", f"forge / Python throughput: {ratio:.2f}x"]
    text = "\n".join(lines) + "\n"
    (OUT / "teacher.md").write_text(text)
    (OUT / "teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
