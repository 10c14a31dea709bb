#!/usr/bin/env python3
"""Seed 003's level filter, as a forge `command` verifier.

Reads the sample as JSON on stdin ({"input", "output", ...}); the output is a level:

    {"name": "...", "grid": ["######", "#....#", "#.##.#", "#....#", "######"],
     "spawn": [1, 1], "enemies": [[4, 3]], "exits": [[4, 1]]}

`grid` holds the walls (`#`) and floor (`.`); `spawn`, `enemies` and `exits` are [x, y] tiles
(x the column, y the row, from 0 at the top left). Prints {"pass": true} or
{"pass": false, "reason": "..."}. A level passes when:
- the grid is a rectangle of 5 to 40 columns and rows, of `#` and `.` only, walled all round;
- the spawn, 1 to 12 enemies and 1 to 4 exits stand on floor tiles, no two on one tile;
- no enemy stands next to the spawn, diagonals included (the player gets a first move);
- every floor tile, enemy and exit is reachable from the spawn (4-neighbour moves).
"""

import json
import sys
from collections import deque


def fail(reason):
    print(json.dumps({"pass": False, "reason": reason}))
    sys.exit(0)


def level_of(text):
    text = text.strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        fail("the answer holds no JSON object")
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        fail(f"not JSON: {e.msg}")


def tile(v, what):
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(c, int) and not isinstance(c, bool) for c in v)):
        fail(f"{what} is not an [x, y] tile")
    return (v[0], v[1])


def check(level):
    if not isinstance(level, dict):
        fail("the level is not a JSON object")
    grid = level.get("grid")
    if not isinstance(grid, list) or not grid or not all(isinstance(r, str) for r in grid):
        fail("`grid` is not a list of strings")
    h, w = len(grid), len(grid[0])
    if not (5 <= h <= 40 and 5 <= w <= 40):
        fail(f"a {w}x{h} grid (5 to 40 each way)")
    if any(len(r) != w for r in grid):
        fail("the rows are not all as long")
    bad = {c for r in grid for c in r} - set("#.")
    if bad:
        fail(f"unknown tiles {''.join(sorted(bad))!r} in the grid (walls # and floor . only)")
    if set(grid[0]) != {"#"} or set(grid[-1]) != {"#"} or any(r[0] != "#" or r[-1] != "#" for r in grid):
        fail("the level is not walled all round")
    enemies, exits = level.get("enemies"), level.get("exits")
    if not isinstance(enemies, list) or not 1 <= len(enemies) <= 12:
        fail("`enemies` is not a list of 1 to 12 tiles")
    if not isinstance(exits, list) or not 1 <= len(exits) <= 4:
        fail("`exits` is not a list of 1 to 4 tiles")
    spawn = tile(level.get("spawn"), "`spawn`")
    enemies = [tile(e, "an enemy") for e in enemies]
    exits = [tile(e, "an exit") for e in exits]
    things = [("the spawn", spawn)] + [("an enemy", e) for e in enemies] + [("an exit", e) for e in exits]
    taken = {}
    for what, (x, y) in things:
        if not (0 <= x < w and 0 <= y < h) or grid[y][x] != ".":
            fail(f"{what} at ({x}, {y}) is not on a floor tile")
        if (x, y) in taken:
            fail(f"{what} at ({x}, {y}) shares its tile with {taken[(x, y)]}")
        taken[(x, y)] = what
    sx, sy = spawn
    for (x, y) in enemies:
        if abs(x - sx) <= 1 and abs(y - sy) <= 1:
            fail(f"an enemy at ({x}, {y}) stands next to the spawn")
    seen = {spawn}
    queue = deque([spawn])
    while queue:
        x, y = queue.popleft()
        for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if n not in seen and 0 <= n[1] < h and 0 <= n[0] < w and grid[n[1]][n[0]] == ".":
                seen.add(n)
                queue.append(n)
    for what, p in things:
        if p not in seen:
            fail(f"{what} at {p} cannot be reached from the spawn")
    unreachable = [(x, y) for y in range(h) for x in range(w) if grid[y][x] == "." and (x, y) not in seen]
    if unreachable:
        fail(f"{len(unreachable)} floor tiles cannot be reached from the spawn, e.g. {unreachable[0]}")


def main():
    sample = json.load(sys.stdin)
    check(level_of(sample.get("output", "")))
    print(json.dumps({"pass": True}))


if __name__ == "__main__":
    main()
