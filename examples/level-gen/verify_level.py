#!/usr/bin/env python3
"""Seed 003's level filter, as a forge `command` verifier.

Reads the sample as JSON on stdin ({"input", "output", ...}); the output is a level:

    {"name": "...", "grid": ["#####", "#P.E#", "#..X#", "#####"]}

with `#` wall, `.` floor, `P` the player's spawn, `E` an enemy, `X` an exit. Prints
{"pass": true} or {"pass": false, "reason": "..."}. A level passes when:
- the grid is a rectangle of 5 to 40 columns and rows, of those five characters only,
  walled all round;
- it has exactly one spawn, 1 to 12 enemies and at least one exit;
- no enemy stands on or next to the spawn (the player gets a first move);
- every floor tile, enemy and exit is reachable from the spawn (4-neighbour moves).
"""

import json
import sys
from collections import deque

TILES = set("#.PEX")


def fail(reason):
    print(json.dumps({"pass": False, "reason": reason}))
    sys.exit(0)


def level_of(text):
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text[text.find("{"):]
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        fail("the answer holds no JSON object")
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        fail(f"not JSON: {e.msg}")


def check(level):
    grid = level.get("grid") if isinstance(level, dict) else None
    if not isinstance(grid, list) or not grid or not all(isinstance(r, str) for r in grid):
        fail("`grid` is not a list of strings")
    h, w = len(grid), len(grid[0])
    if not (5 <= h <= 40 and 5 <= w <= 40):
        fail(f"a {w}x{h} grid (5 to 40 each way)")
    if any(len(r) != w for r in grid):
        fail("the rows are not all as long")
    bad = {c for r in grid for c in r} - TILES
    if bad:
        fail(f"unknown tiles {''.join(sorted(bad))!r}")
    if set(grid[0]) != {"#"} or set(grid[-1]) != {"#"} or any(r[0] != "#" or r[-1] != "#" for r in grid):
        fail("the level is not walled all round")
    cells = {(y, x): c for y, r in enumerate(grid) for x, c in enumerate(r)}
    spawns = [p for p, c in cells.items() if c == "P"]
    enemies = [p for p, c in cells.items() if c == "E"]
    exits = [p for p, c in cells.items() if c == "X"]
    if len(spawns) != 1:
        fail(f"{len(spawns)} spawns (one is needed)")
    if not 1 <= len(enemies) <= 12:
        fail(f"{len(enemies)} enemies (1 to 12)")
    if not exits:
        fail("no exit")
    (sy, sx) = spawns[0]
    for (y, x) in enemies:
        if abs(y - sy) <= 1 and abs(x - sx) <= 1:
            fail(f"an enemy at ({x}, {y}) stands next to the spawn")
    seen = {(sy, sx)}
    queue = deque([(sy, sx)])
    while queue:
        y, x = queue.popleft()
        for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if n not in seen and cells.get(n, "#") != "#":
                seen.add(n)
                queue.append(n)
    unreachable = [p for p, c in cells.items() if c != "#" and p not in seen]
    if unreachable:
        y, x = unreachable[0]
        fail(f"{len(unreachable)} open tiles cannot be reached from the spawn, e.g. ({x}, {y}) {cells[(y, x)]!r}")


def main():
    sample = json.load(sys.stdin)
    check(level_of(sample.get("output", "")))
    print(json.dumps({"pass": True}))


if __name__ == "__main__":
    main()
