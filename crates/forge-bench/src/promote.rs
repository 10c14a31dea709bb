//! Whether a call site's distilled model may take over from the upstream: promotion on measured
//! parity (seed 003's "switch when confidence thresholds are met").
//!
//! On held-out captured inputs the candidate (the site's local model) and the upstream answer
//! the same inputs and the site's judge grades both, so each input gives a *paired* pass/fail
//! outcome. The candidate is promoted when it is not worse than the upstream by more than the
//! policy's margin — a one-sided non-inferiority test on the difference of paired pass rates,
//!
//! ```text
//! H0: p_candidate − p_upstream ≤ −margin      H1: p_candidate − p_upstream > −margin
//! ```
//!
//! at the policy's confidence. With `n` pairs, `b` of them passed by the candidate alone and `c`
//! by the upstream alone, the difference is `d = (b − c) / n` with the standard error of a
//! difference of paired proportions (the unrestricted, Wald estimate: Nam 1997; Liu et al. 2002)
//!
//! ```text
//! se = √(b + c − (b − c)² / n) / n,
//! ```
//!
//! and with `z = Φ⁻¹(confidence)` the one-sided bounds are `lower = d − z·se` and
//! `upper = d + z·se`:
//!
//! - **promote** when `lower > −margin` (non-inferior at that confidence);
//! - **reject** when `upper < −margin` (worse than the margin allows, at that confidence);
//! - **hold** otherwise (not enough evidence either way), and whenever there are fewer than
//!   `min-samples` pairs (or none).
//!
//! With no discordant pair (`b = c = 0`) the standard error is 0 and both bounds are `d = 0`:
//! the two agree on every input, which promotes.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};

/// `promote margin=0.05 confidence=0.95 min-samples=100`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// How much lower the candidate's pass rate may be than the upstream's.
    pub margin: f64,
    /// One-sided, in (0, 1).
    pub confidence: f64,
    /// Fewer paired outcomes than this: hold.
    pub min_samples: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { margin: 0.05, confidence: 0.95, min_samples: 100 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Promote,
    Hold,
    Reject,
}

/// A decision with the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub n: u64,
    pub candidate_rate: f64,
    pub upstream_rate: f64,
    /// Pairs the candidate alone passed, and the upstream alone.
    pub b: u64,
    pub c: u64,
    /// `candidate_rate − upstream_rate`.
    pub difference: f64,
    pub se: f64,
    pub z: f64,
    pub lower: f64,
    pub upper: f64,
    /// The decision in words.
    pub reason: String,
}

/// The decision for paired outcomes (`candidate[i]`, `upstream[i]`: did each pass input `i`;
/// pairs past the end of the shorter slice are ignored).
pub fn decide(candidate: &[bool], upstream: &[bool], policy: &Policy) -> Decision {
    let n = candidate.len().min(upstream.len()) as u64;
    let (mut pc, mut pu, mut b, mut c) = (0u64, 0u64, 0u64, 0u64);
    for (&x, &y) in candidate.iter().zip(upstream) {
        pc += x as u64;
        pu += y as u64;
        match (x, y) {
            (true, false) => b += 1,
            (false, true) => c += 1,
            _ => {}
        }
    }
    let nf = n.max(1) as f64;
    let difference = (b as f64 - c as f64) / nf;
    let var = (b + c) as f64 - (b as f64 - c as f64).powi(2) / nf;
    let se = var.max(0.0).sqrt() / nf;
    let z = Normal::standard().inverse_cdf(policy.confidence.clamp(1e-12, 1.0 - 1e-12));
    let (lower, upper) = (difference - z * se, difference + z * se);
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let (verdict, reason) = if n < policy.min_samples.max(1) {
        (Verdict::Hold, format!("{n} paired outcomes of the {} the policy asks for", policy.min_samples))
    } else if lower > -policy.margin {
        (
            Verdict::Promote,
            format!(
                "not worse than the upstream by more than {}: the difference is at least {} with {} confidence",
                pct(policy.margin),
                pct(lower),
                pct(policy.confidence)
            ),
        )
    } else if upper < -policy.margin {
        (
            Verdict::Reject,
            format!(
                "worse than the upstream by more than {}: the difference is at most {} with {} confidence",
                pct(policy.margin),
                pct(upper),
                pct(policy.confidence)
            ),
        )
    } else {
        (
            Verdict::Hold,
            format!(
                "inconclusive: the difference lies between {} and {}, and the margin is {}",
                pct(lower),
                pct(upper),
                pct(policy.margin)
            ),
        )
    };
    Decision {
        verdict,
        n,
        candidate_rate: pc as f64 / nf,
        upstream_rate: pu as f64 / nf,
        b,
        c,
        difference,
        se,
        z,
        lower,
        upper,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pairs: `both` passed by both, `b` by the candidate alone, `c` by the upstream alone,
    /// the rest by neither.
    fn pairs(n: usize, both: usize, b: usize, c: usize) -> (Vec<bool>, Vec<bool>) {
        let mut cand = Vec::new();
        let mut up = Vec::new();
        for i in 0..n {
            let (x, y) = if i < both {
                (true, true)
            } else if i < both + b {
                (true, false)
            } else if i < both + b + c {
                (false, true)
            } else {
                (false, false)
            };
            cand.push(x);
            up.push(y);
        }
        (cand, up)
    }

    const Z95: f64 = 1.6448536269514722;

    #[test]
    fn a_candidate_within_the_margin_is_promoted() {
        // n = 200, b = 10, c = 12: d = −2/200 = −0.01; se = √(22 − 4/200)/200 = √21.98/200
        // = 0.0234414…; lower = −0.01 − 1.6448536·0.0234414 = −0.0485577 > −0.05.
        let (cand, up) = pairs(200, 150, 10, 12);
        let d = decide(&cand, &up, &Policy::default());
        assert_eq!(d.verdict, Verdict::Promote, "{d:?}");
        assert_eq!((d.n, d.b, d.c), (200, 10, 12));
        assert!((d.candidate_rate - 0.80).abs() < 1e-12 && (d.upstream_rate - 0.81).abs() < 1e-12);
        assert!((d.difference + 0.01).abs() < 1e-12);
        assert!((d.se - 21.98f64.sqrt() / 200.0).abs() < 1e-12, "{}", d.se);
        assert!((d.z - Z95).abs() < 1e-9, "{}", d.z);
        assert!((d.lower - (-0.01 - Z95 * 21.98f64.sqrt() / 200.0)).abs() < 1e-12);
        assert!((d.lower + 0.0485577).abs() < 1e-6, "{}", d.lower);
    }

    #[test]
    fn an_inconclusive_comparison_holds() {
        // b = 10, c = 14: d = −0.02; se = √(24 − 16/200)/200 = √23.92/200 = 0.0244540…;
        // lower = −0.0602236 < −0.05 < upper = 0.0202236.
        let (cand, up) = pairs(200, 150, 10, 14);
        let d = decide(&cand, &up, &Policy::default());
        assert_eq!(d.verdict, Verdict::Hold, "{d:?}");
        assert!((d.lower + 0.0602236).abs() < 1e-6 && (d.upper - 0.0202236).abs() < 1e-6, "{d:?}");
        assert!(d.reason.starts_with("inconclusive"), "{}", d.reason);
    }

    #[test]
    fn a_clearly_worse_candidate_is_rejected() {
        // b = 2, c = 40: d = −0.19; se = √(42 − 1444/200)/200 = √34.78/200 = 0.0294873…;
        // upper = −0.19 + 0.0485028 = −0.1414972 < −0.05.
        let (cand, up) = pairs(200, 100, 2, 40);
        let d = decide(&cand, &up, &Policy::default());
        assert_eq!(d.verdict, Verdict::Reject, "{d:?}");
        assert!((d.upper + 0.1414972).abs() < 1e-6, "{}", d.upper);
    }

    #[test]
    fn too_few_samples_hold_and_full_agreement_promotes() {
        let (cand, up) = pairs(50, 50, 0, 0);
        let d = decide(&cand, &up, &Policy::default());
        assert_eq!(d.verdict, Verdict::Hold);
        assert!(d.reason.contains("50 paired outcomes of the 100"), "{}", d.reason);
        let (cand, up) = pairs(100, 70, 0, 0);
        let d = decide(&cand, &up, &Policy::default());
        assert_eq!((d.verdict, d.se, d.lower), (Verdict::Promote, 0.0, 0.0), "agreement on every input");
        // A stricter policy turns the first promotion into a hold: 99 % confidence.
        let (cand, up) = pairs(200, 150, 10, 12);
        let strict = Policy { confidence: 0.99, ..Policy::default() };
        assert_eq!(decide(&cand, &up, &strict).verdict, Verdict::Hold);
        assert_eq!(
            decide(&[], &[], &Policy { min_samples: 0, ..Policy::default() }).verdict,
            Verdict::Hold,
            "no evidence"
        );
    }
}
