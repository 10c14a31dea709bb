#!/usr/bin/env python3
"""Seed 003's level filter, as a forge `command` verifier.

Reads the sample as JSON on stdin ({"input", "output", ...}); the output is a level:

    {"name": "Sunken Crypt", "width": 7, "height": 6, "walls": [[3, 2], [3, 3]],
     "spawn": [1, 1], "enemies": [[5, 4]], "exits": [[5, 1]]}

on a `width` x `height` grid walled all round; `walls` are the walls inside it, and `spawn`,
`enemies` and `exits` are [x, y] tiles (x the column, y the row, from 0 at the top left).
Prints {"pass": true} or {"pass": false, "reason": "..."}. A level passes when:
- it is 5 to 40 tiles each way, and every tile it names lies inside the outer wall;
- the spawn, 1 to 12 enemies and 1 to 4 exits stand on floor (not a wall), no two on one tile;
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
    w, h = level.get("width"), level.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 5 <= v <= 40 for v in (w, h)):
        fail("`width` and `height` are not whole numbers from 5 to 40")
    lists = {"walls": (0, w * h), "enemies": (1, 12), "exits": (1, 4)}
    for key, (lo, hi) in lists.items():
        v = level.get(key)
        if not isinstance(v, list) or not lo <= len(v) <= hi:
            fail(f"`{key}` is not a list of {lo} to {hi} tiles")
    spawn = tile(level.get("spawn"), "`spawn`")
    walls = [tile(t, "a wall") for t in level["walls"]]
    enemies = [tile(t, "an enemy") for t in level["enemies"]]
    exits = [tile(t, "an exit") for t in level["exits"]]
    for what, (x, y) in [("a wall", t) for t in walls] + [("the spawn", spawn)]:
        if not (1 <= x <= w - 2 and 1 <= y <= h - 2):
            fail(f"{what} at ({x}, {y}) lies outside the level's inside")
    wall = set(walls)
    things = [("the spawn", spawn)] + [("an enemy", t) for t in enemies] + [("an exit", t) for t in exits]
    taken = {}
    for what, (x, y) in things:
        if not (1 <= x <= w - 2 and 1 <= y <= h - 2) or (x, y) in wall:
            fail(f"{what} at ({x}, {y}) is not on a floor tile")
        if (x, y) in taken:
            fail(f"{what} at ({x}, {y}) shares its tile with {taken[(x, y)]}")
        taken[(x, y)] = what
    sx, sy = spawn
    for (x, y) in enemies:
        if abs(x - sx) <= 1 and abs(y - sy) <= 1:
            fail(f"an enemy at ({x}, {y}) stands next to the spawn")
    floor = {(x, y) for y in range(1, h - 1) for x in range(1, w - 1)} - wall
    seen = {spawn}
    queue = deque([spawn])
    while queue:
        x, y = queue.popleft()
        for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if n in floor and n not in seen:
                seen.add(n)
                queue.append(n)
    for what, p in things:
        if p not in seen:
            fail(f"{what} at {p} cannot be reached from the spawn")
    unreachable = sorted(floor - seen)
    if unreachable:
        fail(f"{len(unreachable)} floor tiles cannot be reached from the spawn, e.g. {unreachable[0]}")


def main():
    sample = json.load(sys.stdin)
    check(level_of(sample.get("output", "")))
    print(json.dumps({"pass": True}))


if __name__ == "__main__":
    main()
