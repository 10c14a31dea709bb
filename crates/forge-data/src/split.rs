//! The train/eval split: deterministic, by hash of the sample id, optionally stratified.
//!
//! Each sample gets a uniform number from (seed, id); the samples of each stratum with the
//! smallest numbers go to eval. A stratum's share of the eval split is proportional to its size,
//! rounded by largest remainder so the shares add up to exactly `eval` (so `samples=1800 eval=360`
//! is always 1440/360, as in the DefameLM paper).

use std::collections::BTreeMap;

use forge_teacher::rng::unit;

/// Returns, for each sample, whether it goes to eval. `strata[i]` is sample i's stratum.
pub fn split(ids: &[String], strata: &[String], eval: usize, seed: u64) -> Vec<bool> {
    let n = ids.len();
    assert_eq!(n, strata.len());
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in strata.iter().enumerate() {
        groups.entry(s.as_str()).or_default().push(i);
    }
    let eval = eval.min(n);
    // Largest-remainder apportionment of `eval` over the strata.
    let mut quotas: Vec<(&str, usize, f64)> = groups
        .iter()
        .map(|(k, members)| {
            let exact = eval as f64 * members.len() as f64 / n.max(1) as f64;
            (*k, exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    let mut left = eval - quotas.iter().map(|q| q.1).sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..quotas.len()).collect();
    by_remainder.sort_by(|&a, &b| quotas[b].2.total_cmp(&quotas[a].2).then_with(|| quotas[a].0.cmp(quotas[b].0)));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        if quotas[i].1 < groups[quotas[i].0].len() {
            quotas[i].1 += 1;
            left -= 1;
        }
    }
    let seed = seed.to_le_bytes();
    let mut is_eval = vec![false; n];
    for (stratum, quota, _) in quotas {
        let mut members = groups[stratum].clone();
        members.sort_by(|&a, &b| {
            let ua = unit(&[&seed, b"split", ids[a].as_bytes()]);
            let ub = unit(&[&seed, b"split", ids[b].as_bytes()]);
            ua.total_cmp(&ub).then_with(|| ids[a].cmp(&ids[b]))
        });
        for &m in members.iter().take(quota) {
            is_eval[m] = true;
        }
    }
    is_eval
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sizes_and_stable() {
        let ids: Vec<String> = (0..1800).map(|i| format!("s{i:06}")).collect();
        let strata = vec![String::new(); 1800];
        let a = split(&ids, &strata, 360, 7);
        assert_eq!(a.iter().filter(|e| **e).count(), 360);
        assert_eq!(a, split(&ids, &strata, 360, 7));
        assert_ne!(a, split(&ids, &strata, 360, 8));
    }

    #[test]
    fn stratified_shares_are_proportional_and_exact() {
        let ids: Vec<String> = (0..100).map(|i| format!("s{i:06}")).collect();
        let strata: Vec<String> = (0..100).map(|i| if i % 4 == 0 { "rare".into() } else { "common".into() }).collect();
        let e = split(&ids, &strata, 20, 1);
        assert_eq!(e.iter().filter(|x| **x).count(), 20);
        let rare = e.iter().zip(&strata).filter(|(x, s)| **x && *s == "rare").count();
        assert_eq!(rare, 5);
        // Uneven: 3 strata of 1/3 each, 10 eval: 4/3/3 by largest remainder.
        let strata: Vec<String> = (0..99).map(|i| format!("g{}", i % 3)).collect();
        let ids: Vec<String> = (0..99).map(|i| format!("s{i:06}")).collect();
        let e = split(&ids, &strata, 10, 1);
        assert_eq!(e.iter().filter(|x| **x).count(), 10);
    }
}
