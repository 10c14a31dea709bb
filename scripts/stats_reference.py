#!/usr/bin/env python3
"""Reference values for forge-bench's statistics (crates/forge-bench/src/stats.rs).

Computes, with numpy, scipy and statsmodels, the expected outputs of every function in
`forge_bench::stats` for a handful of fixed, deterministic inputs and writes inputs and expected
outputs together to `crates/forge-bench/tests/data/stats_reference.json`, which
`crates/forge-bench/tests/stats.rs` checks the Rust code against.

Install and run (from the repository root):

    # either the check scripts' venv (scripts/setup.sh) plus the two statistics packages ...
    scripts/.venv/bin/pip install numpy scipy statsmodels
    scripts/.venv/bin/python scripts/stats_reference.py
    # ... or a fresh, small venv
    python3 -m venv /tmp/stats-venv
    /tmp/stats-venv/bin/pip install numpy scipy statsmodels
    /tmp/stats-venv/bin/python scripts/stats_reference.py

then `cargo test -p forge-bench --test stats`. The output is deterministic (no randomness beyond a
seeded numpy Generator), so regenerating it only changes the file when numpy/scipy/statsmodels
change their answers.

JSON cannot hold infinities or NaN: like the serde helper in stats.rs (`stats::nonfinite`), +inf
is written as the string "inf", -inf as "-inf" and NaN as null.

Where forge deliberately differs from the libraries, the reference encodes forge's documented
choice and says so:
* percentiles of data holding infinities: numpy's lerp computes `inf * 0` / `inf - inf` and
  returns NaN; forge returns the limit (interpolating a finite and an infinite value with a
  weight > 0 gives the infinity; weight 0 gives the lower value). `percentile_limit` below
  computes that, and agrees with np.percentile on finite data (asserted).
* McNemar with b + c = 0: statsmodels divides by zero (statistic inf, p 0); forge reports
  statistic 0, p 1 (no discordant pairs, no evidence). That case lives in the Rust edge-case tests.
"""

import json
import math
import os
import sys

import numpy as np
import scipy
import scipy.stats
import statsmodels
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "forge-bench", "tests", "data", "stats_reference.json")

PERCENTILE_QS = [0, 5, 10, 25, 33.3, 40, 50, 62.5, 75, 90, 95, 99, 100]


def enc(v):
    """Encode floats for JSON the way stats::nonfinite does: inf -> "inf", -inf -> "-inf", NaN -> null."""
    if isinstance(v, dict):
        return {k: enc(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [enc(x) for x in v]
    if isinstance(v, np.ndarray):
        return enc(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return v


def percentile_limit(xs, q):
    """numpy's default ('linear') percentile, with the limit instead of NaN next to infinities."""
    a = np.sort(np.asarray(xs, dtype=np.float64))
    n = len(a)
    if n == 0 or np.isnan(a).any():
        return math.nan
    if np.isfinite(a).all():
        return float(np.percentile(a, q))
    v = (n - 1) * (q / 100)
    if v >= n - 1:
        return float(a[-1])
    lo = int(math.floor(v))
    g = v - lo
    x0, x1 = float(a[lo]), float(a[lo + 1])
    if g == 0 or x0 == x1:
        return x0
    if math.isinf(x0) and math.isinf(x1):
        return math.nan  # -inf .. +inf: undefined
    if math.isinf(x0):
        return x0
    if math.isinf(x1):
        return x1
    return float(np.percentile(a, q))


def percentiles(xs):
    return {
        "min": percentile_limit(xs, 0),
        "p25": percentile_limit(xs, 25),
        "median": percentile_limit(xs, 50),
        "p75": percentile_limit(xs, 75),
        "p95": percentile_limit(xs, 95),
        "max": percentile_limit(xs, 100),
    }


def ecdf(xs):
    a = np.asarray(xs, dtype=np.float64)
    if np.isfinite(a).all():
        res = scipy.stats.ecdf(a).cdf
        return [[float(x), float(p)] for x, p in zip(res.quantiles, res.probabilities)]
    # scipy.stats.ecdf rejects infinities; the same definition by hand.
    s = np.sort(a)
    u = np.unique(s)
    return [[float(x), float(np.searchsorted(s, x, side="right")) / len(s)] for x in u]


def spearman(x, y):
    res = scipy.stats.spearmanr(x, y)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(x)}


def mcnemar_case(name, n11, n10, n01, n00, seed):
    """Paired outcomes: n11 both pass, n10 a passes & b fails, n01 the reverse, n00 both fail."""
    rng = np.random.default_rng(seed)
    pairs = [(True, True)] * n11 + [(True, False)] * n10 + [(False, True)] * n01 + [(False, False)] * n00
    order = rng.permutation(len(pairs))
    a = [pairs[i][0] for i in order]
    b = [pairs[i][1] for i in order]
    bb = sum(1 for x, y in zip(a, b) if x and not y)
    cc = sum(1 for x, y in zip(a, b) if not x and y)
    assert (bb, cc) == (n10, n01)
    # statsmodels' table: rows = a (pass, fail), columns = b (pass, fail); it tests table[0,1] vs table[1,0].
    table = np.array([[n11, n10], [n01, n00]])
    asym = sm_mcnemar(table, exact=False, correction=True)
    ex = sm_mcnemar(table, exact=True)
    return {
        "name": name,
        "a": a,
        "b": b,
        "expected": {
            "b": bb,
            "c": cc,
            "statistic": float(asym.statistic),
            "p_value": float(asym.pvalue),
            "exact_p": float(ex.pvalue),
        },
    }


def hardest(p, q):
    arr = np.asarray(p, dtype=np.float64)
    pooled = arr.ravel()
    threshold = float(np.percentile(pooled, q))
    means = arr.mean(axis=0)
    prompts = [int(i) for i in np.nonzero(means < threshold)[0]]
    return {"threshold": threshold, "prompts": prompts, "means": means.tolist()}


def main():
    rng = np.random.default_rng(20250611)

    # --- mean, mean_se (scipy.stats.sem, ddof=1), binomial_se ---------------------------------
    mean_cases = []
    for name, xs in [
        ("small", [1.0, 2.0, 3.0, 4.0]),
        ("ties", [0.5, 0.5, 0.5, 0.875, 1.0, 0.125]),
        ("negative", [-3.25, 7.5, 0.0, -1.0, 2.0]),
        ("rates_k_over_8", (rng.integers(0, 9, size=50) / 8).tolist()),
        ("pair", [10.0, 12.0]),
    ]:
        mean_cases.append(
            {"name": name, "xs": xs, "mean": float(np.mean(xs)), "mean_se": float(scipy.stats.sem(xs, ddof=1))}
        )
    binomial_cases = []
    for s, n in [(0, 10), (10, 10), (3, 8), (330, 360), (281, 360), (1, 1), (17, 50)]:
        p = s / n
        binomial_cases.append({"successes": s, "n": n, "se": math.sqrt(p * (1 - p) / n)})

    # --- percentile / percentiles ---------------------------------------------------------------
    inf = math.inf
    pct_data = [
        ("ties", [3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 9.0]),
        ("unsorted_negative", [0.3, -1.5, 12.25, 4.0, -0.75, 8.5, 2.0]),
        ("single", [42.0]),
        ("two", [1.0, 2.0]),
        ("all_equal", [7.0, 7.0, 7.0]),
        ("with_infinity", [1.0, inf, 2.5, 1.25, 4.0]),
        ("two_infinities", [inf, 2.0, 1.0, inf, 1.5, 3.0, 2.0]),
        ("neg_infinity", [-inf, 0.0, 1.0, 2.0]),
        # expected attempts 1/p for per-prompt success rates k/8 (p = 0 -> infinite)
        ("expected_attempts", [1 / p if p > 0 else inf for p in [1.0, 0.875, 0.5, 0.125, 0.0, 0.75, 0.625, 1.0, 0.25, 0.5]]),
        ("uniform_50", rng.uniform(1.5, 15.0, size=50).tolist()),
    ]
    percentile_cases = []
    for name, xs in pct_data:
        if np.isfinite(xs).all():
            for q in PERCENTILE_QS:
                assert percentile_limit(xs, q) == float(np.percentile(xs, q))
        percentile_cases.append(
            {
                "name": name,
                "xs": xs,
                "qs": PERCENTILE_QS,
                "values": [percentile_limit(xs, q) for q in PERCENTILE_QS],
                "percentiles": percentiles(xs),
            }
        )

    # --- ranks (scipy.stats.rankdata, method='average') ----------------------------------------
    rank_cases = []
    for name, xs in [
        ("distinct", [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]),
        ("ties", [2.0, 1.0, 2.0, 3.0, 1.0, 2.0, 5.0]),
        ("all_ties", [4.0, 4.0, 4.0, 4.0]),
        ("with_infinity", [inf, 0.5, inf, -1.0, 0.5]),
        ("rates", [0.125, 1.0, 0.875, 1.0, 0.5, 0.0, 0.875, 1.0]),
    ]:
        rank_cases.append({"name": name, "xs": xs, "ranks": scipy.stats.rankdata(xs, method="average").tolist()})

    # --- spearman (scipy.stats.spearmanr) ------------------------------------------------------
    lvl16 = rng.integers(0, 9, size=50) / 8
    lvl4 = np.clip(lvl16 - rng.integers(0, 4, size=50) / 8 + rng.integers(0, 2, size=50) / 8, 0, 1)
    xs20 = np.arange(20, dtype=np.float64)
    spearman_pairs = [
        ("ties", [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0], [2.0, 1.0, 3.0, 3.0, 5.0, 4.0, 6.0, 6.0]),
        ("monotone_nonlinear", xs20.tolist(), (xs20**3 - 5.0).tolist()),
        ("perfect_negative", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [9.0, 7.0, 4.0, 2.0, 1.0, -3.0]),
        ("negative", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
         [9.0, 10.0, 7.0, 8.0, 4.0, 6.0, 5.0, 1.0, 3.0, 2.0]),
        ("n3", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]),
        ("n4_ties", [1.0, 1.0, 2.0, 3.0], [0.5, 0.25, 0.25, 1.0]),
        ("zero_correlation", [1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 1.0, 5.0, 2.0, 4.0]),
        ("rates_50", lvl16.tolist(), lvl4.tolist()),
        ("random_60", rng.normal(size=60).tolist(), rng.normal(size=60).tolist()),
    ]
    spearman_cases = []
    for name, x, y in spearman_pairs:
        spearman_cases.append({"name": name, "x": x, "y": y, "expected": spearman(x, y)})

    # --- McNemar (statsmodels mcnemar exact=False correction=True, and exact=True) ------------
    mcnemar_cases = [
        mcnemar_case("small_1_4", 20, 1, 4, 3, 1),
        mcnemar_case("small_0_3", 10, 0, 3, 2, 2),
        mcnemar_case("small_equal_2_2", 5, 2, 2, 1, 3),
        mcnemar_case("small_5_0", 7, 5, 0, 0, 4),
        mcnemar_case("single_discordant", 3, 0, 1, 0, 5),
        mcnemar_case("large_40_20", 250, 40, 20, 50, 6),
        mcnemar_case("large_120_95", 100, 120, 95, 45, 7),
        mcnemar_case("tiny_p_60_10", 200, 60, 10, 90, 8),
        mcnemar_case("paper_like", 300, 14, 9, 37, 9),
    ]

    # --- ECDF (scipy.stats.ecdf) ---------------------------------------------------------------
    ecdf_cases = []
    for name, xs in [
        ("ties", [2.0, 1.0, 2.0, 3.0, 1.0, 2.0, 8.0]),
        ("distinct", [0.5, -1.0, 3.5]),
        ("single", [4.0]),
        ("expected_attempts", [1.0, 8.0, inf, 1.0, 2.0, 1.1428571428571428, inf, 1.6]),
    ]:
        ecdf_cases.append({"name": name, "xs": xs, "points": ecdf(xs)})

    # --- hardest q% (DefameLM §4.2: pooled q-th percentile, mean across levels below it) -------
    # 3 levels x 12 prompts of success rates k/8 (8 generations per prompt), level 0 = 16-bit.
    m16 = [8, 7, 3, 8, 5, 2, 8, 6, 4, 8, 1, 7]
    m8 = [8, 8, 3, 7, 5, 1, 8, 6, 5, 8, 2, 6]
    m4 = [7, 6, 1, 6, 2, 2, 5, 4, 3, 8, 0, 5]
    matrix = [[k / 8 for k in row] for row in (m16, m8, m4)]
    rand_matrix = (rng.integers(0, 9, size=(3, 50)) / 8).tolist()
    hardest_cases = [
        {"name": "paper_3x12_q40", "p": matrix, "q": 40.0, "expected": hardest(matrix, 40.0)},
        {"name": "paper_3x12_q25", "p": matrix, "q": 25.0, "expected": hardest(matrix, 25.0)},
        {"name": "random_3x50_q40", "p": rand_matrix, "q": 40.0, "expected": hardest(rand_matrix, 40.0)},
    ]

    # --- expected attempts and time to success (eq. 2 and 3) -----------------------------------
    time_cases = []
    for p, prep, per_tok, toks in [
        (0.9, 1.145, 0.0036, 150.0),
        (0.6, 1.397, 0.0051, 155.0),
        (0.125, 1.782, 0.016, 159.0),
        (1.0, 0.5, 0.01, 100.0),
        (0.0, 1.0, 0.01, 100.0),
    ]:
        time_cases.append(
            {
                "p": p,
                "prep_s": prep,
                "per_token_s": per_tok,
                "tokens": toks,
                "attempts": (1 / p) if p > 0 else inf,
                "time_s": ((1 / p) if p > 0 else inf) * (prep + toks * per_tok),
            }
        )

    out = {
        "generated_by": "scripts/stats_reference.py",
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "statsmodels": statsmodels.__version__,
        },
        "mean": mean_cases,
        "binomial_se": binomial_cases,
        "percentile": percentile_cases,
        "ranks": rank_cases,
        "spearman": spearman_cases,
        "mcnemar": mcnemar_cases,
        "ecdf": ecdf_cases,
        "hardest": hardest_cases,
        "expected_time": time_cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(enc(out), f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
