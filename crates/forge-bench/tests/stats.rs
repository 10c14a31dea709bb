//! forge-bench's statistics against numpy / scipy / statsmodels.
//!
//! `tests/data/stats_reference.json` is written by `scripts/stats_reference.py` (see its
//! docstring to regenerate); non-finite numbers there are encoded as in `stats::nonfinite`
//! (`"inf"`, `"-inf"`, `null` for NaN). Statistics and rho must agree to a relative 1e-9,
//! p-values to 1e-8.

use forge_bench::stats::{self, Percentiles};
use serde_json::Value;

const STAT_TOL: f64 = 1e-9;
const P_TOL: f64 = 1e-8;

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/stats_reference.json");
    let text = std::fs::read_to_string(path).expect("tests/data/stats_reference.json (run scripts/stats_reference.py)");
    serde_json::from_str(&text).expect("valid JSON")
}

/// A JSON number, or "inf" / "-inf", or null (NaN).
fn num(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) => stats::nonfinite::parse(s).unwrap_or_else(|| panic!("bad number {s:?}")),
        Value::Null => f64::NAN,
        other => panic!("not a number: {other}"),
    }
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(num).collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array().expect("array").iter().map(|b| b.as_bool().expect("bool")).collect()
}

fn close(got: f64, want: f64, rtol: f64, what: &str) {
    let ok = if want.is_nan() {
        got.is_nan()
    } else if want.is_infinite() || want == 0.0 {
        got == want
    } else {
        ((got - want) / want).abs() <= rtol
    };
    assert!(ok, "{what}: got {got:e}, want {want:e} (rtol {rtol:e})");
}

fn cases<'a>(r: &'a Value, key: &str) -> &'a Vec<Value> {
    let v = r[key].as_array().unwrap_or_else(|| panic!("reference has no {key}"));
    assert!(!v.is_empty(), "no {key} cases");
    v
}

#[test]
fn mean_and_standard_errors() {
    let r = reference();
    for c in cases(&r, "mean") {
        let name = c["name"].as_str().unwrap();
        let xs = nums(&c["xs"]);
        close(stats::mean(&xs), num(&c["mean"]), STAT_TOL, &format!("mean {name}"));
        close(stats::mean_se(&xs), num(&c["mean_se"]), STAT_TOL, &format!("mean_se {name}"));
    }
    for c in cases(&r, "binomial_se") {
        let (s, n) = (c["successes"].as_u64().unwrap(), c["n"].as_u64().unwrap());
        close(stats::binomial_se(s, n), num(&c["se"]), STAT_TOL, &format!("binomial_se {s}/{n}"));
    }
}

#[test]
fn percentiles_match_numpy() {
    let r = reference();
    for c in cases(&r, "percentile") {
        let name = c["name"].as_str().unwrap();
        let xs = nums(&c["xs"]);
        for (q, want) in nums(&c["qs"]).into_iter().zip(nums(&c["values"])) {
            close(stats::percentile(&xs, q), want, STAT_TOL, &format!("percentile {name} q={q}"));
        }
        // The expected struct deserializes through the same nonfinite helper.
        let want: Percentiles = serde_json::from_value(c["percentiles"].clone()).unwrap();
        let got = stats::percentiles(&xs);
        for (g, w, f) in [
            (got.min, want.min, "min"),
            (got.p25, want.p25, "p25"),
            (got.median, want.median, "median"),
            (got.p75, want.p75, "p75"),
            (got.p95, want.p95, "p95"),
            (got.max, want.max, "max"),
        ] {
            close(g, w, STAT_TOL, &format!("percentiles {name} {f}"));
        }
        // ... and round-trips through JSON, infinities included.
        let back: Percentiles = serde_json::from_str(&serde_json::to_string(&got).unwrap()).unwrap();
        assert_eq!(back, got, "{name}: JSON round trip");
    }
}

#[test]
fn ranks_match_scipy_rankdata() {
    let r = reference();
    for c in cases(&r, "ranks") {
        let name = c["name"].as_str().unwrap();
        assert_eq!(stats::ranks(&nums(&c["xs"])), nums(&c["ranks"]), "ranks {name}");
    }
}

#[test]
fn spearman_matches_scipy() {
    let r = reference();
    for c in cases(&r, "spearman") {
        let name = c["name"].as_str().unwrap();
        let e = &c["expected"];
        let got = stats::spearman(&nums(&c["x"]), &nums(&c["y"])).unwrap_or_else(|| panic!("spearman {name}: None"));
        assert_eq!(got.n as u64, e["n"].as_u64().unwrap(), "spearman {name} n");
        close(got.rho, num(&e["rho"]), STAT_TOL, &format!("spearman {name} rho"));
        close(got.p, num(&e["p"]), P_TOL, &format!("spearman {name} p"));
    }
}

#[test]
fn mcnemar_matches_statsmodels() {
    let r = reference();
    for c in cases(&r, "mcnemar") {
        let name = c["name"].as_str().unwrap();
        let e = &c["expected"];
        let got = stats::mcnemar(&bools(&c["a"]), &bools(&c["b"]));
        assert_eq!((got.b, got.c), (e["b"].as_u64().unwrap(), e["c"].as_u64().unwrap()), "mcnemar {name} b, c");
        close(got.statistic, num(&e["statistic"]), STAT_TOL, &format!("mcnemar {name} statistic"));
        close(got.p_value, num(&e["p_value"]), P_TOL, &format!("mcnemar {name} p"));
        close(got.exact_p, num(&e["exact_p"]), P_TOL, &format!("mcnemar {name} exact p"));
        // Swapping the models swaps b and c and leaves the test unchanged.
        let swapped = stats::mcnemar(&bools(&c["b"]), &bools(&c["a"]));
        assert_eq!((swapped.b, swapped.c), (got.c, got.b));
        assert_eq!(swapped.statistic, got.statistic);
        assert_eq!(swapped.p_value, got.p_value);
        assert_eq!(swapped.exact_p, got.exact_p);
    }
}

#[test]
fn ecdf_matches_scipy() {
    let r = reference();
    for c in cases(&r, "ecdf") {
        let name = c["name"].as_str().unwrap();
        let got = stats::ecdf(&nums(&c["xs"]));
        let want: Vec<(f64, f64)> = c["points"].as_array().unwrap().iter().map(|p| (num(&p[0]), num(&p[1]))).collect();
        assert_eq!(got.len(), want.len(), "ecdf {name}: {got:?} vs {want:?}");
        for ((gx, gp), (wx, wp)) in got.iter().zip(&want) {
            assert_eq!(gx, wx, "ecdf {name} value");
            close(*gp, *wp, STAT_TOL, &format!("ecdf {name} fraction at {wx}"));
        }
    }
}

#[test]
fn hardest_matches_numpy() {
    let r = reference();
    for c in cases(&r, "hardest") {
        let name = c["name"].as_str().unwrap();
        let p: Vec<Vec<f64>> = c["p"].as_array().unwrap().iter().map(nums).collect();
        let got = stats::hardest(&p, num(&c["q"]));
        let e = &c["expected"];
        close(got.threshold, num(&e["threshold"]), STAT_TOL, &format!("hardest {name} threshold"));
        let want: Vec<usize> = e["prompts"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(got.prompts, want, "hardest {name} prompts");
    }
}

#[test]
fn expected_attempts_and_time() {
    let r = reference();
    for c in cases(&r, "expected_time") {
        let (p, prep, per_tok, toks) = (num(&c["p"]), num(&c["prep_s"]), num(&c["per_token_s"]), num(&c["tokens"]));
        close(stats::expected_attempts(p), num(&c["attempts"]), STAT_TOL, &format!("attempts p={p}"));
        close(
            stats::expected_time_to_success(p, prep, per_tok, toks),
            num(&c["time_s"]),
            STAT_TOL,
            &format!("time p={p}"),
        );
    }
}

// ---- edge cases the libraries answer with NaN, warnings or exceptions ------------------------

#[test]
fn empty_inputs() {
    assert!(stats::mean(&[]).is_nan());
    assert!(stats::mean_se(&[]).is_nan());
    assert!(stats::binomial_se(0, 0).is_nan());
    assert!(stats::percentile(&[], 50.0).is_nan());
    let p = stats::percentiles(&[]);
    assert!([p.min, p.p25, p.median, p.p75, p.p95, p.max].iter().all(|x| x.is_nan()));
    assert!(stats::ranks(&[]).is_empty());
    assert!(stats::spearman(&[], &[]).is_none());
    assert!(stats::ecdf(&[]).is_empty());
    let h = stats::hardest(&[], 40.0);
    assert!(h.threshold.is_nan() && h.prompts.is_empty());
    let m = stats::mcnemar(&[], &[]);
    assert_eq!((m.b, m.c, m.statistic, m.p_value, m.exact_p), (0, 0, 0.0, 1.0, 1.0));
}

#[test]
fn small_n() {
    assert!(stats::mean_se(&[3.0]).is_nan());
    assert_eq!(stats::percentile(&[3.0], 95.0), 3.0);
    assert!(stats::spearman(&[1.0], &[2.0]).is_none());
    assert!(stats::spearman(&[1.0, 2.0], &[1.0, 2.0]).is_none());
    let c = stats::spearman(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap();
    assert_eq!(c.n, 3);
    assert!((c.rho - 0.5).abs() < 1e-15);
}

#[test]
fn constant_and_all_ties() {
    let k = [0.5; 6];
    assert_eq!(stats::mean(&k), 0.5);
    assert_eq!(stats::mean_se(&k), 0.0);
    assert_eq!(stats::ranks(&k), vec![3.5; 6]);
    assert!(stats::spearman(&k, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).is_none());
    assert!(stats::spearman(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &k).is_none());
    assert_eq!(stats::ecdf(&k), vec![(0.5, 1.0)]);
    let p = stats::percentiles(&k);
    assert!([p.min, p.p25, p.median, p.p75, p.p95, p.max].iter().all(|&x| x == 0.5));
    // Every prompt equally hard: none is strictly below the pooled percentile.
    let h = stats::hardest(&[k.to_vec(), k.to_vec(), k.to_vec()], 40.0);
    assert_eq!(h.threshold, 0.5);
    assert!(h.prompts.is_empty());
}

#[test]
fn mcnemar_without_discordant_pairs() {
    let a = [true, true, false, true, false];
    let m = stats::mcnemar(&a, &a);
    assert_eq!((m.b, m.c), (0, 0));
    assert_eq!((m.statistic, m.p_value, m.exact_p), (0.0, 1.0, 1.0));
}

#[test]
fn never_successful_prompts_are_infinitely_hard() {
    let rates = [1.0, 0.5, 0.0, 0.25];
    let attempts: Vec<f64> = rates.iter().map(|&p| stats::expected_attempts(p)).collect();
    assert_eq!(attempts, vec![1.0, 2.0, f64::INFINITY, 4.0]);
    let p = stats::percentiles(&attempts);
    assert_eq!((p.min, p.median, p.max), (1.0, 3.0, f64::INFINITY));
    assert_eq!(p.p95, f64::INFINITY);
    assert_eq!(stats::ecdf(&attempts).last(), Some(&(f64::INFINITY, 1.0)));
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["max"], "inf");
    assert_eq!(json["min"], 1.0);
}

#[test]
fn per_prompt_vectors_keep_their_infinities_in_json() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct T {
        #[serde(with = "forge_bench::stats::nonfinite::vec")]
        v: Vec<f64>,
    }
    let text = serde_json::to_string(&T { v: vec![1.5, f64::INFINITY, f64::NAN] }).unwrap();
    assert_eq!(text, r#"{"v":[1.5,"inf",null]}"#);
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(back.v[..2], [1.5, f64::INFINITY]);
    assert!(back.v[2].is_nan());
}
