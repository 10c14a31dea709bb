#!/usr/bin/env python3
"""forge watch on a workspace of 20 NPC targets: the time from saving a lore edit to the
regenerated datasets on disk (goal: under 2 s with the offline teacher).

The workspace: examples/persona-npc's recipe and lore, 20 `model` targets (`npc00`..`npc19`),
each a dataset of 60 samples (54 train + 6 eval) drawn with its own seed from the shared lists
and written by the offline grammar teacher. `forge watch` keeps the datasets fresh; the script
then saves edits and reads what forge watch prints, timing from the save to each
`Built npcNN:dataset` line (the artifact is published when the line is printed):

1. a new tone in the shared lore (every NPC's dataset re-draws: 20 datasets);
2. a file no stage reads (a no-op build);
3. a new setting again, to repeat (1).

Usage:  python3 bench/watch.py     Results: bench/out/watch.md and bench/out/watch.json.
Builds target/release/forge if missing.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORGE = ROOT / "target" / "release" / "forge"
OUT = ROOT / "bench" / "out"
NPCS = 20


def workspace(tmp: Path):
    src = ROOT / "examples" / "persona-npc"
    shutil.copytree(src / "worlds", tmp / "worlds")
    shutil.copytree(src / "recipes", tmp / "recipes")
    targets = "".join(
        f'model "npc{i:02}" recipe="npc-persona" {{\n'
        f'    dataset samples=60 eval=6 seed={i + 1} teacher="offline" split-by="category"\n}}\n'
        for i in range(NPCS)
    )
    (tmp / "forge.kdl").write_text(
        'forge 1\ninclude "worlds/*.kdl" "recipes/npc-persona.kdl"\nteacher "offline" kind="grammar"\n' + targets
    )


def main():
    if not FORGE.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "forge"], cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="forge-watch-bench-"))
    workspace(tmp)
    env = dict(os.environ, CI="1")
    t0 = time.time()
    subprocess.run([str(FORGE), "build"], cwd=tmp, env=env, check=True, stderr=subprocess.DEVNULL)
    cold = time.time() - t0

    p = subprocess.Popen([str(FORGE), "watch"], cwd=tmp, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    cond = threading.Condition()

    def read():
        for line in p.stderr:
            with cond:
                lines.append((time.time(), line.rstrip()))
                cond.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait_done(start_index, timeout=120):
        deadline = time.time() + timeout
        with cond:
            while True:
                for t, l in lines[start_index:]:
                    if "Done in" in l:
                        return
                left = deadline - time.time()
                if left <= 0:
                    raise SystemExit("forge watch did not finish: " + "\n".join(l for _, l in lines))
                cond.wait(left)

    wait_done(0)
    rows = []
    lore = tmp / "worlds" / "wenna.kdl"
    edits = [
        ("a new tone in the shared lore", lambda: lore.write_text(lore.read_text().replace('"mischievous"', '"mischievous" "wistful"'))),
        ("a file no stage reads", lambda: (tmp / "notes.md").write_text("todo\n")),
        ("a new setting in the shared lore", lambda: lore.write_text(lore.read_text().replace('"the city wall at dusk"', '"the city wall at dusk" "the bell tower"'))),
    ]
    for what, edit in edits:
        time.sleep(1.0)
        with cond:
            start = len(lines)
        t_save = time.time()
        edit()
        wait_done(start)
        with cond:
            got = lines[start:]
        built = [(t - t_save, l) for t, l in got if re.search(r"Built npc\d+:dataset", l)]
        done = next(t for t, l in got if "Done in" in l) - t_save
        rows.append({
            "edit": what,
            "datasets_rebuilt": len(built),
            "first_dataset_s": round(built[0][0], 3) if built else None,
            "last_dataset_s": round(built[-1][0], 3) if built else None,
            "done_s": round(done, 3),
        })
        print(rows[-1], flush=True)
    p.terminate()
    p.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"npcs": NPCS, "samples_per_dataset": 60, "cold_build_s": round(cold, 2), "edits": rows}
    (OUT / "watch.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# forge watch: save to regenerated datasets", "",
          f"{NPCS} NPC targets, 60 samples each, offline grammar teacher; cold `forge build`: {cold:.2f} s.", "",
          "| edit | datasets rebuilt | first on disk | last on disk | build done |", "|---|---|---|---|---|"]
    for r in rows:
        f = lambda v: "—" if v is None else f"{v:.2f} s"
        md.append(f"| {r['edit']} | {r['datasets_rebuilt']} | {f(r['first_dataset_s'])} | {f(r['last_dataset_s'])} | {r['done_s']:.2f} s |")
    (OUT / "watch.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
