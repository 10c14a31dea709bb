//! "Did you mean ...?" for misspelled names.

/// The candidate closest to `name`, if it is close enough to be a plausible typo.
pub fn closest<'a, I>(name: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut best: Option<(f64, &str)> = None;
    for candidate in candidates {
        let score = strsim::jaro_winkler(name, candidate);
        // A distance-1 edit is a plausible typo even in short names, but not in one-letter ones.
        let close = score > 0.8 || (name.chars().count() >= 3 && strsim::levenshtein(name, candidate) <= 1);
        if close && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// `did you mean `x`?`, or a list of what is valid when nothing is close.
pub fn help<'a, I>(name: &str, what: &str, candidates: I) -> Option<String>
where
    I: IntoIterator<Item = &'a str>,
{
    let candidates: Vec<&str> = candidates.into_iter().collect();
    if let Some(best) = closest(name, candidates.iter().copied()) {
        return Some(format!("did you mean `{best}`?"));
    }
    match candidates.len() {
        0 => Some(format!("no {what} is defined")),
        1..=12 => Some(format!(
            "valid {what}s: {}",
            candidates.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
        )),
        n => Some(format!("{n} {what}s are defined; none is close to `{name}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_typos() {
        assert_eq!(closest("ofline", ["offline", "gpt"]), Some("offline"));
        assert_eq!(closest("lr", ["lr", "rank"]), Some("lr"));
        assert_eq!(closest("rnak", ["rank", "alpha"]), Some("rank"));
        assert_eq!(closest("zebra", ["offline", "gpt"]), None);
    }

    #[test]
    fn lists_candidates_when_nothing_is_close() {
        assert_eq!(help("zzz", "teacher", ["a1", "b2"]).unwrap(), "valid teachers: `a1`, `b2`");
        assert_eq!(help("zzz", "teacher", []).unwrap(), "no teacher is defined");
    }
}
