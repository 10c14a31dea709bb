#!/usr/bin/env python3
"""No-op build benchmark: forge against DVC on the same pipeline shape.

Generates a workspace of TARGETS targets with STAGES chained command stages each (every stage
copies its upstream's file), builds it once, then measures a no-op `forge build` and
`forge status` (median wall time with hyperfine, median peak RSS with /usr/bin/time -v). The
same shape is generated as a DVC project (`dvc.yaml`, one stage per command) and `dvc repro` /
`dvc status` no-ops are measured the same way, side by side, and reported as ratios at equal
size.

DVC's first `repro` grows faster than linearly with the number of stages (1,000 stages take
~20 minutes on 2 cores; at 5,000 it had done 900 after 35 minutes), so DVC is compared at
--dvc-targets (default 200, i.e. 1,000 stages); forge is then measured at that size too, for
the ratio, as well as at --targets for the no-op goal.

Usage:
    bench/noop.py [--targets 1000] [--stages 5] [--dvc-targets 200] [--skip-dvc] [--runs 20]

Needs: hyperfine (apt install hyperfine), GNU time (/usr/bin/time), and for DVC a virtual
environment this script creates in bench/.venv (`pip install dvc`). Results are written to
bench/out/noop.md and bench/out/noop.json.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VENV = ROOT / "bench" / ".venv"


def sh(cmd, cwd=None, env=None, quiet=True):
    r = subprocess.run(cmd, cwd=cwd, env=env, shell=isinstance(cmd, str), capture_output=quiet, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {cmd}\n{r.stdout}\n{r.stderr}")
    return r


def forge_workspace(dir: Path, targets: int, stages: int):
    shutil.rmtree(dir, ignore_errors=True)
    (dir / "data").mkdir(parents=True)
    lines = ["forge 1"]
    for t in range(targets):
        (dir / "data" / f"t{t}.txt").write_text(f"target {t}\n")
        lines.append(f'target "t{t}" {{')
        lines.append(f'    command "s0" {{ run "cp" "data/t{t}.txt" "{{out}}/out.txt"; inputs "data/t{t}.txt"; outputs "out.txt"; }}')
        for s in range(1, stages):
            lines.append(
                f'    command "s{s}" {{ run "cp" "{{dep:s{s-1}}}/out.txt" "{{out}}/out.txt"; needs "s{s-1}"; outputs "out.txt"; }}'
            )
        lines.append("}")
    (dir / "forge.kdl").write_text("\n".join(lines) + "\n")


def dvc_project(dir: Path, targets: int, stages: int):
    shutil.rmtree(dir, ignore_errors=True)
    (dir / "data").mkdir(parents=True)
    (dir / "out").mkdir()
    out = ["stages:"]
    for t in range(targets):
        (dir / "data" / f"t{t}.txt").write_text(f"target {t}\n")
        prev = f"data/t{t}.txt"
        for s in range(stages):
            cur = f"out/t{t}_s{s}.txt"
            out += [f"  t{t}_s{s}:", f"    cmd: cp {prev} {cur}", f"    deps: [{prev}]", f"    outs: [{cur}]"]
            prev = cur
    (dir / "dvc.yaml").write_text("\n".join(out) + "\n")


def hyperfine(cmds, cwd, runs, warmup):
    path = OUT / "hyperfine.json"
    args = ["hyperfine", "--style", "basic", "--export-json", str(path), "--runs", str(runs), "--warmup", str(warmup)]
    for name, cmd in cmds:
        args += ["-n", name, cmd]
    sh(args, cwd=cwd, quiet=False)
    res = json.loads(path.read_text())["results"]
    return {r["command"]: {"median_s": r["median"], "mean_s": r["mean"], "stddev_s": r["stddev"], "runs": len(r["times"])} for r in res}


def peak_rss_mib(cmd, cwd, runs):
    peaks = []
    for _ in range(runs):
        r = subprocess.run(["/usr/bin/time", "-v", "sh", "-c", cmd + " > /dev/null"], cwd=cwd, capture_output=True, text=True)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
        if r.returncode != 0 or not m:
            sys.exit(f"failed: {cmd}\n{r.stderr}")
        peaks.append(int(m.group(1)) / 1024)
    return statistics.median(peaks)


def ensure_dvc():
    dvc = VENV / "bin" / "dvc"
    if not dvc.exists():
        print("installing DVC into bench/.venv ...", flush=True)
        sh([sys.executable, "-m", "venv", str(VENV)])
        sh([str(VENV / "bin" / "pip"), "install", "-q", "dvc"])
    return dvc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--dvc-targets", type=int, default=200, help="size of the DVC comparison")
    ap.add_argument("--skip-dvc", action="store_true")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dvc-runs", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    print("building forge (release) ...", flush=True)
    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    forge = ROOT / "target" / "release" / "forge"
    work = Path(os.environ.get("BENCH_DIR", "/tmp/forge-bench"))
    ddir = work / "dvc"

    def measure_forge(targets):
        fdir = work / f"forge-{targets}"
        n = targets * args.stages
        forge_workspace(fdir, targets, args.stages)
        t0 = time.time()
        sh([str(forge), "build", "-q"], cwd=fdir)
        first = time.time() - t0
        print(f"forge: first build of {n} stages took {first:.1f}s", flush=True)
        hf = hyperfine([("forge build (no-op)", f"{forge} build -q"), ("forge status", f"{forge} status -q")], fdir, args.runs, 3)
        r = {"targets": targets, "first_build_s": first, "build": hf["forge build (no-op)"], "status": hf["forge status"]}
        r["build"]["peak_rss_mib"] = peak_rss_mib(f"{forge} build -q", fdir, 5)
        r["status"]["peak_rss_mib"] = peak_rss_mib(f"{forge} status -q", fdir, 5)
        return r

    results = {"stages_per_target": args.stages, "forge": measure_forge(args.targets)}
    if not args.skip_dvc:
        dvc = ensure_dvc()
        dt = args.dvc_targets or args.targets
        dvc_project(ddir, dt, args.stages)
        sh([str(dvc), "init", "--no-scm", "-q"], cwd=ddir)
        print(f"dvc: first repro of {dt * args.stages} stages (slow) ...", flush=True)
        t0 = time.time()
        sh([str(dvc), "repro", "-q"], cwd=ddir)
        dfirst = time.time() - t0
        print(f"dvc: first repro took {dfirst:.1f}s", flush=True)
        hf = hyperfine([("dvc repro (no-op)", f"{dvc} repro -q"), ("dvc status", f"{dvc} status -q")], ddir, args.dvc_runs, 1)
        results["dvc"] = {
            "targets": dt,
            "first_build_s": dfirst,
            "build": hf["dvc repro (no-op)"],
            "status": hf["dvc status"],
        }
        results["dvc"]["build"]["peak_rss_mib"] = peak_rss_mib(f"{dvc} repro -q", ddir, 1)
        results["dvc"]["status"]["peak_rss_mib"] = peak_rss_mib(f"{dvc} status -q", ddir, 1)
        results["forge_at_dvc_size"] = results["forge"] if dt == args.targets else measure_forge(dt)

    (OUT / "noop.json").write_text(json.dumps(results, indent=2))
    rows = [
        "| tool | stages | first build | no-op build (median) | peak RSS | status (median) | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(tool, r):
        ms = lambda v: f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
        rows.append(
            f"| {tool} | {r['targets'] * args.stages} | {r['first_build_s']:.1f} s | {ms(r['build']['median_s'])} "
            f"| {r['build']['peak_rss_mib']:.1f} MiB | {ms(r['status']['median_s'])} | {r['status']['peak_rss_mib']:.1f} MiB |"
        )

    f = results["forge"]
    row("forge", f)
    if "dvc" in results:
        fs, d = results["forge_at_dvc_size"], results["dvc"]
        if fs is not f:
            row("forge", fs)
        row("dvc", d)
        rows.append("")
        rows.append(
            f"at {d['targets'] * args.stages} stages: no-op build dvc/forge = {d['build']['median_s'] / fs['build']['median_s']:.0f}x, "
            f"status dvc/forge = {d['status']['median_s'] / fs['status']['median_s']:.0f}x"
        )
    goal = "met" if f["build"]["median_s"] < 0.1 else "MISSED"
    rows.append("")
    rows.append(f"goal: no-op build of {f['targets'] * args.stages} stages under 100 ms: {goal}")
    text = "\n".join(rows) + "\n"
    (OUT / "noop.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
