#!/usr/bin/env python3
"""A CI rebuild after one NPC's lore changed, with a warm remote cache, against a cold build.

The workspace: 20 NPCs (`npc00`..`npc19`), each with its own persona list
(`worlds/npcNN.kdl`) and recipe (examples/persona-npc's, reading that list), sharing the other
lore lists; each a dataset of 60 samples by the offline grammar teacher. The remote cache is a
real nginx with WebDAV on 127.0.0.1 (Debian's nginx-light), as in tests/remote.rs.

1. machine A (an empty cache) builds everything and uploads it: the cold build;
2. npc07's persona is edited; machine B (another empty cache, the same remote) runs
   `forge build --ci`: it should fetch 19 datasets and build npc07's alone;
3. machine C builds the edited workspace cold, without the remote.

Reported: wall times (one run each, side by side) and what B built and fetched. With the
offline teacher a dataset costs ~20 ms to build, so fetching saves little here; with a real
teacher each dataset is minutes of calls, and B's time stays that of one NPC.

Usage:  python3 bench/ci.py     Results: bench/out/ci.md and bench/out/ci.json.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORGE = ROOT / "target" / "release" / "forge"
OUT = ROOT / "bench" / "out"
NPCS = 20


def workspace(dir: Path):
    src = ROOT / "examples" / "persona-npc"
    (dir / "worlds").mkdir(parents=True)
    (dir / "recipes").mkdir()
    shared = (src / "worlds" / "wenna.kdl").read_text()
    npc_list_end = shared.index("list \"categories\"")
    persona, lists = shared[:npc_list_end], shared[npc_list_end:]
    (dir / "worlds" / "shared.kdl").write_text(lists)
    recipe = (src / "recipes" / "npc-persona.kdl").read_text()
    targets = ""
    for i in range(NPCS):
        name = f"npc{i:02}"
        (dir / "worlds" / f"{name}.kdl").write_text(
            persona.replace('list "npc"', f'list "{name}"').replace("Sister Wenna Larkspur", f"Sister Wenna the {i}th"))
        (dir / "recipes" / f"{name}.kdl").write_text(
            recipe.replace('recipe "npc-persona"', f'recipe "{name}"').replace('from="npc"', f'from="{name}"'))
        targets += f'model "{name}" recipe="{name}" {{\n    dataset samples=60 eval=6 seed={i + 1} teacher="offline" split-by="category"\n}}\n'
    (dir / "forge.kdl").write_text('forge 1\ninclude "worlds/*.kdl" "recipes/*.kdl"\nteacher "offline" kind="grammar"\n' + targets)


def nginx(tmp: Path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    p = port.getsockname()[1]
    port.close()
    store = tmp / "store"
    store.mkdir(parents=True)
    (tmp / "body").mkdir()
    for d in [tmp, store, tmp / "body"]:
        os.chmod(d, 0o777)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n  server {{\n    listen 127.0.0.1:{p};\n"
        f"    root {store};\n    client_max_body_size 0;\n    location / {{\n      dav_methods PUT DELETE;\n"
        f"      create_full_put_path on;\n      dav_access user:rw group:r all:r;\n    }}\n  }}\n}}\n")
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(conf), "-e", f"{tmp}/error.log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{p}/forge"


def build(dir: Path, *args):
    t0 = time.time()
    r = subprocess.run([str(FORGE), "build", *args], cwd=dir, env=dict(os.environ, CI="1"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or "warning" in r.stderr:
        raise SystemExit(f"forge build {args} failed or warned:\n{r.stderr}")
    return time.time() - t0


def main():
    if not FORGE.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "forge"], cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="forge-ci-bench-"))
    os.chmod(tmp, 0o755)  # nginx's workers (nobody) reach the store through it
    server, url = nginx(tmp / "nginx")
    try:
        a, b, c = tmp / "a", tmp / "b", tmp / "c"
        workspace(a)
        cold_a = build(a, "--remote-cache", url)
        for d in [b, c]:
            workspace(d)
            f = d / "worlds" / "npc07.kdl"
            f.write_text(f.read_text().replace("Never drinks before sundown.", "Never drinks before sundown, nor after."))
        summary = tmp / "b.json"
        warm = build(b, "--ci", "--remote-cache", url, "--summary", str(summary))
        cold_c = build(c)
        s = json.loads(summary.read_text())
        outcome = {}
        for art, o in s["artifacts"].items():
            outcome.setdefault(o["outcome"], []).append(art)
        result = {"npcs": NPCS, "cold_build_with_upload_s": round(cold_a, 3), "ci_rebuild_warm_remote_s": round(warm, 3),
                  "cold_build_s": round(cold_c, 3), "built": outcome.get("built", []),
                  "fetched": len(outcome.get("fetched", []))}
        print(result)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "ci.json").write_text(json.dumps(result, indent=2) + "\n")
        md = ["# CI rebuild after one NPC's lore changed", "",
              f"{NPCS} NPC datasets (60 samples, offline teacher); remote cache: nginx WebDAV on 127.0.0.1.", "",
              "| build | wall |", "|---|---|",
              f"| machine A, cold, uploading | {cold_a:.2f} s |",
              f"| machine B, `--ci`, warm remote cache: built {', '.join(result['built'])}, fetched {result['fetched']} | {warm:.2f} s |",
              f"| machine C, cold, no remote | {cold_c:.2f} s |"]
        (OUT / "ci.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
