//! The statistics of the benchmark stage (DefameLM §4.1–4.2): success rates and their standard
//! errors, McNemar's test between two quantization levels, percentiles and ECDFs of expected
//! attempts and expected time to success, Spearman's rank correlation of per-prompt difficulty,
//! and the "hardest q %" prompt selection.
//!
//! Every function is pure and total: empty input, too few observations, constant input and ties
//! give NaN / `None` / a documented convention, never a panic. Each one names the numpy, scipy or
//! statsmodels function it matches; `scripts/stats_reference.py` computes reference values with
//! those libraries and `tests/stats.rs` checks this module against them (rho and statistics to a
//! relative 1e-9, p-values to 1e-8).
//!
//! The chi-squared, Student-t and binomial distributions come from `statrs`.
//!
//! Infinities are expected, not exceptional: a prompt that never succeeded has success rate 0 and
//! expected attempts `1/0 = ∞`. [`percentile`], [`percentiles`], [`ranks`] and [`ecdf`] order
//! infinities correctly, and the serialized [`Percentiles`] writes them as strings (see
//! [`nonfinite`]) because JSON has no infinity.

use serde::{Deserialize, Serialize};
use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, DiscreteCDF, StudentsT};

/// Arithmetic mean (`numpy.mean`); NaN for empty input.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Standard error of a binomial proportion, `sqrt(p (1 - p) / n)` with `p = successes / n`
/// (the Wald standard error the paper quotes for the overall success rates).
///
/// NaN for `n = 0`; NaN as well for `successes > n` (not a proportion). 0 when `p` is 0 or 1.
pub fn binomial_se(successes: u64, n: u64) -> f64 {
    if n == 0 || successes > n {
        return f64::NAN;
    }
    let n = n as f64;
    let p = successes as f64 / n;
    (p * (1.0 - p) / n).sqrt()
}

/// Standard error of the mean: the sample standard deviation (`ddof = 1`) over `sqrt(n)`, as
/// `scipy.stats.sem(xs, ddof=1)`. NaN for fewer than two values. Two-pass (centred) sum of
/// squares, as numpy's `var`.
pub fn mean_se(xs: &[f64]) -> f64 {
    let n = xs.len();
    if n < 2 {
        return f64::NAN;
    }
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    (ss / (n - 1) as f64).sqrt() / (n as f64).sqrt()
}

/// Sorted copy (ascending, infinities at the ends); `None` when empty or any value is NaN.
fn sorted(xs: &[f64]) -> Option<Vec<f64>> {
    if xs.is_empty() || xs.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v)
}

/// Percentile of already sorted, NaN-free, non-empty data (see [`percentile`]).
fn percentile_sorted(a: &[f64], q: f64) -> f64 {
    if !(0.0..=100.0).contains(&q) {
        return f64::NAN;
    }
    let n = a.len();
    // numpy: quantile = q / 100; virtual index = (n - 1) * quantile.
    let v = (n - 1) as f64 * (q / 100.0);
    if v >= (n - 1) as f64 {
        return a[n - 1];
    }
    let lo = v.floor() as usize;
    let g = v - lo as f64;
    let (x0, x1) = (a[lo], a[lo + 1]);
    if g == 0.0 || x0 == x1 {
        return x0;
    }
    if x0.is_infinite() || x1.is_infinite() {
        // Interpolating towards an infinity with a positive weight gives that infinity;
        // -∞ .. +∞ has no meaningful interpolation.
        return match (x0.is_infinite(), x1.is_infinite()) {
            (true, true) => f64::NAN,
            (true, false) => x0,
            _ => x1,
        };
    }
    // numpy's `_lerp`: a + (b - a) t, or b - (b - a) (1 - t) for t >= 0.5 (exact at the ends).
    let diff = x1 - x0;
    if g >= 0.5 { x1 - diff * (1.0 - g) } else { x0 + diff * g }
}

/// The `q`-th percentile, `q` in `[0, 100]`, with numpy's default method
/// (`numpy.percentile(xs, q)`, `method="linear"`: virtual index `(n - 1) q / 100`, linear
/// interpolation between its neighbours, numpy's `_lerp` rounding). The input need not be sorted.
///
/// NaN for empty input, for any NaN in the input (numpy propagates NaN) and for `q` outside
/// `[0, 100]` or NaN (numpy raises).
///
/// Infinities sort to the ends. Where numpy's arithmetic gives NaN next to an infinity
/// (`∞ · 0`, `∞ - ∞`), this returns the limit: interpolating a finite and an infinite neighbour
/// with a positive weight gives the infinity, a weight of exactly 0 gives the lower neighbour, and
/// interpolating strictly between -∞ and +∞ gives NaN. So the 95th percentile of expected
/// attempts with one never-successful prompt among ten is `∞`, as it should be.
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    match sorted(xs) {
        Some(a) => percentile_sorted(&a, q),
        None => f64::NAN,
    }
}

/// The summary the paper's Table 2 lists: min, P25, median, P75, P95, max.
///
/// Serialized with [`nonfinite`]: `+∞` as `"inf"`, `-∞` as `"-inf"`, NaN as `null`, so that an
/// infinite expected time (a prompt that never succeeded) survives a JSON round trip.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Percentiles {
    #[serde(with = "nonfinite")]
    pub min: f64,
    #[serde(with = "nonfinite")]
    pub p25: f64,
    #[serde(with = "nonfinite")]
    pub median: f64,
    #[serde(with = "nonfinite")]
    pub p75: f64,
    #[serde(with = "nonfinite")]
    pub p95: f64,
    #[serde(with = "nonfinite")]
    pub max: f64,
}

/// [`percentile`] at 0, 25, 50, 75, 95 and 100 (one sort). All NaN for empty or NaN-holding input.
pub fn percentiles(xs: &[f64]) -> Percentiles {
    let Some(a) = sorted(xs) else {
        let nan = f64::NAN;
        return Percentiles { min: nan, p25: nan, median: nan, p75: nan, p95: nan, max: nan };
    };
    Percentiles {
        min: percentile_sorted(&a, 0.0),
        p25: percentile_sorted(&a, 25.0),
        median: percentile_sorted(&a, 50.0),
        p75: percentile_sorted(&a, 75.0),
        p95: percentile_sorted(&a, 95.0),
        max: percentile_sorted(&a, 100.0),
    }
}

/// 1-based ranks with ties given their average rank, as `scipy.stats.rankdata(xs, "average")`
/// (ranks are `k` or `k + 0.5`, exact in f64). Infinities rank at the ends. Any NaN makes every
/// rank NaN (scipy's `nan_policy="propagate"`). Empty in, empty out.
pub fn ranks(xs: &[f64]) -> Vec<f64> {
    let n = xs.len();
    if xs.iter().any(|x| x.is_nan()) {
        return vec![f64::NAN; n];
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
    let mut out = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        // `==`, not total_cmp: -0.0 and 0.0 tie, as in scipy.
        while j < n && xs[order[j]] == xs[order[i]] {
            j += 1;
        }
        // Positions i..j (0-based) hold ranks i+1..=j; their average is (i + 1 + j) / 2.
        let r = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            out[k] = r;
        }
        i = j;
    }
    out
}

/// A correlation coefficient with its two-sided p-value and the number of pairs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Correlation {
    pub rho: f64,
    pub p: f64,
    pub n: usize,
}

/// Spearman's rank correlation, as `scipy.stats.spearmanr(x, y)` (two-sided):
/// rho is the Pearson correlation of the average ranks ([`ranks`]), computed in the order of
/// `numpy.corrcoef` and clipped to `[-1, 1]`; the p-value is `2 · sf(|t|)` of Student's t with
/// `n - 2` degrees of freedom, `t = rho · sqrt((n - 2) / ((1 + rho)(1 - rho)))` (scipy's form of
/// `rho · sqrt((n - 2) / (1 - rho²))`). `rho = ±1` gives `t = ±∞` and `p = 0`.
///
/// `None` where scipy returns NaN or raises: fewer than 3 pairs (scipy answers n = 2 with
/// rho = ±1 and p = 1, which says nothing), either input constant (all ties), any NaN, or slices of
/// different lengths.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<Correlation> {
    let n = x.len();
    if n != y.len() || n < 3 {
        return None;
    }
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return None;
    }
    if x.iter().all(|&v| v == x[0]) || y.iter().all(|&v| v == y[0]) {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let (mx, my) = (mean(&rx), mean(&ry));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let ddof = (n - 1) as f64;
    // numpy.corrcoef: c = cov / stddev_x / stddev_y, then clip.
    let rho = (sxy / ddof / (sxx / ddof).sqrt() / (syy / ddof).sqrt()).clamp(-1.0, 1.0);
    let dof = (n - 2) as f64;
    let p = if rho.abs() == 1.0 {
        0.0
    } else {
        let t = rho * (dof / ((rho + 1.0) * (1.0 - rho))).max(0.0).sqrt();
        match StudentsT::new(0.0, 1.0, dof) {
            Ok(dist) => (2.0 * dist.sf(t.abs())).min(1.0),
            Err(_) => f64::NAN,
        }
    };
    Some(Correlation { rho, p, n })
}

/// McNemar's test for paired pass/fail outcomes of two models on the same prompts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct McNemar {
    /// Pairs where the first model passes and the second fails.
    pub b: u64,
    /// Pairs where the first model fails and the second passes.
    pub c: u64,
    /// `(|b - c| - 1)² / (b + c)`: the chi-squared statistic with continuity correction.
    pub statistic: f64,
    /// `P(χ²₁ ≥ statistic)`.
    pub p_value: f64,
    /// Two-sided exact binomial p-value, `min(1, 2 · BinomCDF(min(b, c); b + c, 1/2))`.
    pub exact_p: f64,
}

/// McNemar's test of `a` against `b` (`a[i]`, `b[i]`: did each model pass prompt/sample `i`).
///
/// `statistic` and `p_value` match statsmodels'
/// `mcnemar([[n11, b], [c, n00]], exact=False, correction=True)`, `exact_p` matches
/// `mcnemar(..., exact=True)`. Note that with `b = c > 0` the corrected statistic is
/// `1 / (b + c)`, not 0, exactly as in statsmodels. Prefer `exact_p` when `b + c` is small
/// (below ~25), where the chi-squared approximation is poor.
///
/// With no discordant pairs (`b + c = 0`) there is no evidence of a difference: statistic 0,
/// p 1, exact p 1 (statsmodels divides by zero there). Pairs past the end of the shorter slice are
/// ignored.
pub fn mcnemar(a: &[bool], b: &[bool]) -> McNemar {
    let (mut nb, mut nc) = (0u64, 0u64);
    for (&x, &y) in a.iter().zip(b) {
        match (x, y) {
            (true, false) => nb += 1,
            (false, true) => nc += 1,
            _ => {}
        }
    }
    let n = nb + nc;
    if n == 0 {
        return McNemar { b: nb, c: nc, statistic: 0.0, p_value: 1.0, exact_p: 1.0 };
    }
    let diff = nb.abs_diff(nc) as f64;
    let statistic = (diff - 1.0) * (diff - 1.0) / n as f64;
    let p_value = match ChiSquared::new(1.0) {
        Ok(chi2) => chi2.sf(statistic),
        Err(_) => f64::NAN,
    };
    let exact_p = match Binomial::new(0.5, n) {
        Ok(binom) => (2.0 * binom.cdf(nb.min(nc))).min(1.0),
        Err(_) => f64::NAN,
    };
    McNemar { b: nb, c: nc, statistic, p_value, exact_p }
}

/// The empirical CDF's step points: each distinct value in ascending order with the fraction of
/// values `≤` it (ties collapsed into one point), as `scipy.stats.ecdf(xs).cdf`'s
/// `quantiles`/`probabilities`. The last point's fraction is 1. Infinities are kept (an infinite
/// expected attempt count is a real step at `+∞`); NaN values are left out (they are neither
/// below nor above anything). Empty in, empty out.
pub fn ecdf(xs: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (i, &x) in v.iter().enumerate() {
        let frac = (i + 1) as f64 / n;
        match out.last_mut() {
            Some(last) if last.0 == x => last.1 = frac,
            _ => out.push((x, frac)),
        }
    }
    out
}

/// The hardest prompts and the threshold that selected them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hardest {
    /// The `q`-th percentile of all success rates pooled across levels and prompts.
    #[serde(with = "nonfinite")]
    pub threshold: f64,
    /// Prompt indices (ascending) whose mean success rate across levels is strictly below
    /// `threshold`.
    pub prompts: Vec<usize>,
}

/// The paper's hardest-prompt selection (§4.2, `q = 40`): `p[level][prompt]` holds per-prompt
/// success probabilities; pool every rate of every level and prompt, take their `q`-th
/// [`percentile`] as the threshold, and keep the prompts whose mean rate across levels is strictly
/// below it. In numpy: `t = np.percentile(P.ravel(), q); np.nonzero(P.mean(axis=0) < t)`.
///
/// Rows should have equal lengths; if they do not, the prompt count is the longest row's and a
/// prompt's mean is taken over the levels that have it. No levels, no rates, a NaN rate or `q`
/// outside `[0, 100]` give a NaN threshold and no prompts.
pub fn hardest(p: &[Vec<f64>], q: f64) -> Hardest {
    let pooled: Vec<f64> = p.iter().flatten().copied().collect();
    let threshold = percentile(&pooled, q);
    let width = p.iter().map(Vec::len).max().unwrap_or(0);
    let prompts = (0..width)
        .filter(|&j| {
            let column: Vec<f64> = p.iter().filter_map(|row| row.get(j).copied()).collect();
            mean(&column) < threshold
        })
        .collect();
    Hardest { threshold, prompts }
}

/// Expected number of attempts until the first success of a Bernoulli(p) process (the mean of
/// the geometric distribution, the paper's eq. 2): `1 / p`, `+∞` for `p = 0` (also `-0.0`).
pub fn expected_attempts(p: f64) -> f64 {
    if p == 0.0 { f64::INFINITY } else { 1.0 / p }
}

/// Expected time to success with retry-until-success (the paper's eq. 3):
/// `(1 / p) · (prep_s + tokens · per_token_s)`, i.e. [`expected_attempts`] times the time of one
/// attempt (preparation plus generating `tokens` tokens). `+∞` for `p = 0` and a positive attempt
/// time (NaN if the attempt time is 0 as well).
pub fn expected_time_to_success(p: f64, prep_s: f64, per_token_s: f64, tokens: f64) -> f64 {
    expected_attempts(p) * (prep_s + tokens * per_token_s)
}

/// Serde helper for `f64` fields that may be infinite or NaN (`#[serde(with = "nonfinite")]`).
///
/// JSON has no infinity, and serde_json would write both infinities and NaN as `null`, which
/// cannot be read back into an `f64`. This writes finite values as numbers, `+∞` as the string
/// `"inf"`, `-∞` as `"-inf"` and NaN as `null`; it reads all of those back (and also accepts
/// `"infinity"`, `"+inf"`, `"-infinity"` and `"nan"`, case-insensitively). Reading uses
/// `deserialize_any`, so it needs a self-describing format such as JSON.
pub mod nonfinite {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_nan() {
            s.serialize_none()
        } else if *x == f64::INFINITY {
            s.serialize_str("inf")
        } else if *x == f64::NEG_INFINITY {
            s.serialize_str("-inf")
        } else {
            s.serialize_f64(*x)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(Visitor)
    }

    /// Parse `"inf"`, `"-inf"`, `"nan"` and friends; `None` for anything else.
    pub fn parse(s: &str) -> Option<f64> {
        match s.to_ascii_lowercase().as_str() {
            "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
            "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
            "nan" => Some(f64::NAN),
            _ => None,
        }
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number, \"inf\", \"-inf\" or null")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
        fn visit_unit<E: de::Error>(self) -> Result<f64, E> {
            Ok(f64::NAN)
        }
        fn visit_none<E: de::Error>(self) -> Result<f64, E> {
            Ok(f64::NAN)
        }
        fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<f64, D::Error> {
            d.deserialize_any(self)
        }
    }

    /// The same for a `Vec<f64>` (per-prompt expected attempts, where p̂ = 0 gives ∞).
    pub mod vec {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        #[derive(Serialize, Deserialize)]
        struct Item(#[serde(with = "super")] f64);

        pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
            v.iter().map(|x| Item(*x)).collect::<Vec<_>>().serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
            Ok(Vec::<Item>::deserialize(d)?.into_iter().map(|i| i.0).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_se_edges() {
        assert!(mean(&[]).is_nan());
        assert_eq!(mean(&[2.0, 4.0]), 3.0);
        assert!(mean_se(&[]).is_nan());
        assert!(mean_se(&[1.0]).is_nan());
        assert_eq!(mean_se(&[5.0, 5.0, 5.0]), 0.0);
        assert!((mean_se(&[1.0, 2.0, 3.0, 4.0]) - (1.25f64 / 3.0).sqrt() / 1.0).abs() < 1e-15);
        assert!(binomial_se(0, 0).is_nan());
        assert!(binomial_se(5, 4).is_nan());
        assert_eq!(binomial_se(0, 10), 0.0);
        assert_eq!(binomial_se(10, 10), 0.0);
        assert_eq!(binomial_se(1, 4), (0.25f64 * 0.75 / 4.0).sqrt());
    }

    #[test]
    fn percentile_basics() {
        assert!(percentile(&[], 50.0).is_nan());
        assert!(percentile(&[1.0, f64::NAN], 50.0).is_nan());
        assert!(percentile(&[1.0, 2.0], 101.0).is_nan());
        assert!(percentile(&[1.0, 2.0], -1.0).is_nan());
        assert!(percentile(&[1.0, 2.0], f64::NAN).is_nan());
        assert_eq!(percentile(&[3.0], 37.0), 3.0);
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 50.0), 2.5);
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 0.0), 1.0);
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 100.0), 4.0);
        let inf = f64::INFINITY;
        assert_eq!(percentile(&[1.0, 2.0, inf], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, inf], 50.1), inf);
        assert_eq!(percentile(&[inf, 1.0, 2.0], 100.0), inf);
        assert_eq!(percentile(&[-inf, 1.0, 2.0], 10.0), -inf);
        assert!(percentile(&[-inf, inf], 50.0).is_nan());
        assert_eq!(percentile(&[inf, inf], 50.0), inf);
        let p = percentiles(&[]);
        assert!(p.min.is_nan() && p.max.is_nan());
    }

    #[test]
    fn ranks_ties() {
        assert_eq!(ranks(&[]), Vec::<f64>::new());
        assert_eq!(ranks(&[2.0, 1.0, 2.0, 3.0]), vec![2.5, 1.0, 2.5, 4.0]);
        assert_eq!(ranks(&[7.0, 7.0, 7.0]), vec![2.0, 2.0, 2.0]);
        assert!(ranks(&[1.0, f64::NAN]).iter().all(|r| r.is_nan()));
    }

    #[test]
    fn spearman_edges() {
        assert!(spearman(&[], &[]).is_none());
        assert!(spearman(&[1.0, 2.0], &[2.0, 1.0]).is_none());
        assert!(spearman(&[1.0, 2.0, 3.0], &[1.0, 2.0]).is_none());
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
        assert!(spearman(&[1.0, 2.0, 3.0], &[4.0, 4.0, 4.0]).is_none());
        assert!(spearman(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).is_none());
        let c = spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 300.0]).unwrap();
        assert_eq!((c.rho, c.p, c.n), (1.0, 0.0, 3));
        let c = spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap();
        assert_eq!((c.rho, c.p), (-1.0, 0.0));
    }

    #[test]
    fn mcnemar_edges() {
        let m = mcnemar(&[], &[]);
        assert_eq!((m.b, m.c, m.statistic, m.p_value, m.exact_p), (0, 0, 0.0, 1.0, 1.0));
        let m = mcnemar(&[true, false, true], &[true, false, true]);
        assert_eq!((m.b, m.c, m.statistic, m.p_value, m.exact_p), (0, 0, 0.0, 1.0, 1.0));
        let m = mcnemar(&[true, false], &[false, true]);
        assert_eq!((m.b, m.c), (1, 1));
        assert_eq!(m.statistic, 0.5);
        assert_eq!(m.exact_p, 1.0);
        // Shorter slice decides.
        let m = mcnemar(&[true, true, true], &[false]);
        assert_eq!((m.b, m.c), (1, 0));
    }

    #[test]
    fn ecdf_and_hardest_edges() {
        assert!(ecdf(&[]).is_empty());
        assert!(ecdf(&[f64::NAN]).is_empty());
        assert_eq!(ecdf(&[2.0, 1.0, 2.0, 2.0]), vec![(1.0, 0.25), (2.0, 1.0)]);
        let h = hardest(&[], 40.0);
        assert!(h.threshold.is_nan() && h.prompts.is_empty());
        let h = hardest(&[vec![], vec![]], 40.0);
        assert!(h.threshold.is_nan() && h.prompts.is_empty());
        // All equal: nothing is strictly below the threshold.
        let h = hardest(&[vec![0.5; 4], vec![0.5; 4]], 40.0);
        assert_eq!((h.threshold, h.prompts.len()), (0.5, 0));
    }

    #[test]
    fn attempts_and_time() {
        assert_eq!(expected_attempts(0.0), f64::INFINITY);
        assert_eq!(expected_attempts(-0.0), f64::INFINITY);
        assert_eq!(expected_attempts(0.25), 4.0);
        assert_eq!(expected_time_to_success(0.5, 1.0, 0.01, 100.0), 4.0);
        assert_eq!(expected_time_to_success(0.0, 1.0, 0.01, 100.0), f64::INFINITY);
    }

    #[test]
    fn percentiles_json_round_trip() {
        let p = percentiles(&[1.0, 2.0, f64::INFINITY]);
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains("\"max\":\"inf\""), "{s}");
        assert_eq!(serde_json::from_str::<Percentiles>(&s).unwrap(), p);
        let nan = percentiles(&[]);
        let s = serde_json::to_string(&nan).unwrap();
        assert!(s.contains("\"min\":null"), "{s}");
        assert!(serde_json::from_str::<Percentiles>(&s).unwrap().median.is_nan());
        let neg = Percentiles { min: f64::NEG_INFINITY, p25: 0.0, median: 1.5, p75: 2.0, p95: 3.0, max: 7.0 };
        let s = serde_json::to_string(&neg).unwrap();
        assert_eq!(serde_json::from_str::<Percentiles>(&s).unwrap(), neg);
    }
}
