#!/usr/bin/env python3
"""Do OpenAI's client and llama.cpp's server work with what forge serves and exports?

1. Builds and exports the tiny test workspace (`tests/workspaces/tiny-model`) with forge, starts
   `forge serve` on it, and talks to it with the official `openai` Python package: the model
   list, a chat completion, the same request streamed (the chunks must add up to the same
   text), a bad request (the client must raise its `BadRequestError` with forge's message), and
   an unknown model (`NotFoundError`).
2. Starts llama-cpp-python's server with `forge export`'s `llama-server.json` (every exported
   model: each level, and the adapter on its base) and asks every model alias for an answer
   through the same client.

Usage:  scripts/setup.sh && scripts/.venv/bin/python scripts/serve_openai_check.py
(installs `openai` and `llama-cpp-python[server]` into the venv if missing). Exits 1 on failure.
"""

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = ROOT / "scripts" / ".venv" / "bin" / "python"
FORGE = ROOT / "target" / "release" / "forge"


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url, proc, seconds=120):
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.3)
    sys.exit(f"{url} did not come up")


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        sys.exit(1)


def main():
    try:
        import openai  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError:
        sh([PY, "-m", "pip", "install", "-q", "openai", "llama-cpp-python[server]"])
        sys.exit(subprocess.call([PY, __file__]))  # again, with the packages importable
    import openai

    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    tmp = Path(tempfile.mkdtemp(prefix="forge-openai-"))
    ws = tmp / "ws"
    shutil.copytree(ROOT / "tests" / "workspaces" / "tiny-model", ws)
    sh([FORGE, "-C", ws, "build", "-q"])
    export = tmp / "export"
    sh([FORGE, "-C", ws, "export", "tiny", "--to", export])

    p = port()
    server = subprocess.Popen([FORGE, "-C", ws, "serve", "tiny", "--level", "q8_0", "--addr", f"127.0.0.1:{p}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(f"http://127.0.0.1:{p}/health", server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="unused")
        ids = [m.id for m in client.models.list().data]
        check(ids == ["tiny"], f"forge serve: models.list() = {ids}")
        msgs = [{"role": "user", "content": "Target: Maud. Intel: fears geese."}]
        r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24)
        text = r.choices[0].message.content
        check(r.object == "chat.completion" and isinstance(text, str) and r.usage.completion_tokens > 0,
              f"forge serve: chat.completions.create -> {text!r} ({r.usage.completion_tokens} tokens)")
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24,
                                                     stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(streamed == text and chunks[-1].choices[0].finish_reason in ("stop", "length"),
              f"forge serve: streamed {len(chunks)} chunks adding up to the same text")
        try:
            client.chat.completions.create(model="tiny", messages=msgs, temperature=-1)
            check(False, "a negative temperature is refused")
        except openai.BadRequestError as e:
            check("temperature" in str(e), f"forge serve: BadRequestError: {e.message[:80]}")
        try:
            client.chat.completions.create(model="nobody", messages=msgs)
            check(False, "an unknown model is refused")
        except openai.NotFoundError as e:
            check("nobody" in str(e), f"forge serve: NotFoundError: {e.message[:80]}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=20)

    cfg = json.loads((export / "llama-server.json").read_text())
    p = port()
    cfg["port"] = p
    (export / "llama-server.json").write_text(json.dumps(cfg))
    llama = subprocess.Popen([PY, "-m", "llama_cpp.server", "--config_file", "llama-server.json"], cwd=export,
                             stdout=subprocess.DEVNULL, stderr=open(tmp / "llama.log", "w"))
    try:
        wait(f"http://127.0.0.1:{p}/v1/models", llama)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="unused")
        ids = sorted(m.id for m in client.models.list().data)
        want = sorted(m["model_alias"] for m in cfg["models"])
        check(ids == want, f"llama.cpp server with forge export's config: models {ids}")
        for alias in want:
            r = client.chat.completions.create(model=alias, messages=msgs, temperature=0, max_tokens=16)
            check(isinstance(r.choices[0].message.content, str),
                  f"llama.cpp server: {alias} -> {r.choices[0].message.content!r}")
    finally:
        llama.send_signal(signal.SIGINT)
        try:
            llama.wait(timeout=20)
        except subprocess.TimeoutExpired:
            llama.kill()
    shutil.rmtree(tmp, ignore_errors=True)
    print("all checks passed")


if __name__ == "__main__":
    main()
