#!/usr/bin/env python3
"""Drives `forge proxy` as a game would: N calls to the `level-gen` call site.

    python3 capture.py [--proxy http://127.0.0.1:8090/v1] [--n 60] [--seed 1] [--stream]

Each call asks for a level of a theme, size and enemy count drawn at random (the call site's
template stays the same: only those values change). Prints one line per call and a summary:
answered, by whom (the upstream, or the site's promoted local model), verifier passes and
latency percentiles.
"""

import argparse
import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SYSTEM = (
    "You design levels for a top-down RPG. Answer with one JSON object and nothing else: "
    '{"name": "...", "width": W, "height": H, "spawn": [x, y], "enemies": [[x, y], ...], '
    '"exits": [[x, y]], "walls": [[x, y], ...]}. The level is a W x H grid walled all round; '
    "walls lists the walls inside it, and spawn (the player's), enemies and exits are [x, y] "
    "floor tiles inside the outer wall, x the column and y the row counted from 0 at the top "
    "left, no two on one tile. Keep enemies away from the spawn, and make every floor tile, "
    "enemy and exit reachable from the spawn."
)


def level_schema(w, h, enemies):
    """The level's shape, as the call site asks for it (llama.cpp's server turns it into a
    grammar): its size, up to 8 inner walls, the spawn, `enemies` enemies and one exit, every
    tile inside the outer wall. Where they stand — on floor, enemies away from the spawn,
    everything reachable — is the model's to get right and the verifier's to check."""
    tile = {
        "type": "array",
        "prefixItems": [{"enum": list(range(1, w - 1))}, {"enum": list(range(1, h - 1))}],
        "minItems": 2,
        "maxItems": 2,
    }
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 40},
            "width": {"enum": [w]},
            "height": {"enum": [h]},
            "spawn": tile,
            "enemies": {"type": "array", "items": tile, "minItems": enemies, "maxItems": enemies},
            "exits": {"type": "array", "items": tile, "minItems": 1, "maxItems": 1},
            "walls": {"type": "array", "items": tile, "minItems": 0, "maxItems": 8},
        },
        "required": ["name", "width", "height", "spawn", "enemies", "exits", "walls"],
    }


THEMES = ["swamp", "ice cave", "crypt", "forest clearing", "castle hall", "desert ruin", "sewer", "mine"]


def verify(answer):
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("verify_level.py"))],
        input=json.dumps({"output": answer}), capture_output=True, text=True, timeout=30,
    )
    return json.loads(out.stdout or '{"pass": false}')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default="http://127.0.0.1:8090/v1")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stream", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    latencies, passed, by = [], 0, {}
    for i in range(a.n):
        theme, w, h, enemies = rng.choice(THEMES), rng.randint(7, 12), rng.randint(6, 9), rng.randint(1, 4)
        body = {
            "model": "level-designer",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Design a {theme} level, {w} wide and {h} tall, with {enemies} enemies and one exit."},
            ],
            "temperature": 0.8,
            "response_format": {"type": "json_object", "schema": level_schema(w, h, enemies)},
            "max_tokens": 300,
            "stream": a.stream,
        }
        req = urllib.request.Request(
            a.proxy.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "x-forge-site": "level-gen"},
        )
        t0 = time.time()
        with urllib.request.urlopen(req, timeout=600) as resp:
            served = resp.headers.get("x-forge-served") or "upstream"
            raw = resp.read().decode()
        latencies.append(time.time() - t0)
        if a.stream:
            answer = "".join(
                json.loads(l[6:])["choices"][0]["delta"].get("content") or ""
                for l in raw.splitlines() if l.startswith("data: {") and json.loads(l[6:])["choices"]
            )
        else:
            answer = json.loads(raw)["choices"][0]["message"]["content"]
        v = verify(answer)
        passed += bool(v.get("pass"))
        by[served] = by.get(served, 0) + 1
        print(f"{i:3d} {served:10s} {latencies[-1]:6.2f}s {'pass' if v.get('pass') else 'fail: ' + v.get('reason', '')}")
    lat = sorted(latencies)
    print(json.dumps({
        "calls": a.n, "by": by, "verifier_passes": passed,
        "latency_p50_s": round(lat[len(lat) // 2], 3), "latency_p90_s": round(lat[int(len(lat) * 0.9)], 3),
    }))


if __name__ == "__main__":
    main()
