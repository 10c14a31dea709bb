//! Tracery-style grammars: offline, deterministic text expansion.
//!
//! A grammar is a set of rules, each a list of alternatives. `#name#` in an alternative expands
//! rule `name` (or, if there is no such rule, the value of an upstream recipe node), with
//! optional modifiers: `#name.capitalize#`, `.a` (a/an), `.s` (plural), `.upper`, `.lower`.
//! Which alternative is taken is decided by a seeded [`SplitMix64`], so the same seed always
//! gives the same text. (After Kate Compton's Tracery, without its actions.)

use std::collections::BTreeMap;

use crate::rng::SplitMix64;

/// Deeper nesting than this is a runaway recursion in the grammar.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrammarError {
    #[error("`#{0}#` is neither a rule nor an upstream value")]
    Unknown(String),
    #[error("unclosed `#` in {0:?}")]
    Unclosed(String),
    #[error("rule `{0}` has no alternatives")]
    Empty(String),
    #[error("the grammar recurses more than {MAX_DEPTH} levels deep (at `{0}`)")]
    TooDeep(String),
    #[error("unknown modifier `.{0}` (use capitalize, a, s, upper or lower)")]
    Modifier(String),
    /// An expansion failed where the grammar meets the recipe (an upstream value, a node): the
    /// whole message, which names the node.
    #[error("{0}")]
    Expansion(String),
}

pub struct Grammar<'a> {
    pub rules: &'a BTreeMap<String, Vec<String>>,
}

impl Grammar<'_> {
    /// Expands `start`; `value` resolves names that are not rules.
    pub fn expand(
        &self,
        start: &str,
        value: &dyn Fn(&str) -> Option<String>,
        rng: &mut SplitMix64,
    ) -> Result<String, GrammarError> {
        self.expand_symbol(start, value, rng, 0)
    }

    fn expand_symbol(
        &self,
        name: &str,
        value: &dyn Fn(&str) -> Option<String>,
        rng: &mut SplitMix64,
        depth: usize,
    ) -> Result<String, GrammarError> {
        if depth > MAX_DEPTH {
            return Err(GrammarError::TooDeep(name.to_string()));
        }
        match self.rules.get(name) {
            Some(alts) => {
                if alts.is_empty() {
                    return Err(GrammarError::Empty(name.to_string()));
                }
                let alt = &alts[rng.below(alts.len())];
                self.expand_text(alt, value, rng, depth + 1)
            }
            None => value(name).ok_or_else(|| GrammarError::Unknown(name.to_string())),
        }
    }

    /// Expands every `#symbol#` in `text`.
    pub fn expand_text(
        &self,
        text: &str,
        value: &dyn Fn(&str) -> Option<String>,
        rng: &mut SplitMix64,
        depth: usize,
    ) -> Result<String, GrammarError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find('#') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let end = after.find('#').ok_or_else(|| GrammarError::Unclosed(text.to_string()))?;
            let mut parts = after[..end].split('.');
            let name = parts.next().unwrap_or("");
            let mut s = self.expand_symbol(name, value, rng, depth)?;
            for m in parts {
                s = modify(&s, m)?;
            }
            out.push_str(&s);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn modify(s: &str, m: &str) -> Result<String, GrammarError> {
    Ok(match m {
        "capitalize" => {
            let mut c = s.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect(),
                None => String::new(),
            }
        }
        "upper" => s.to_uppercase(),
        "lower" => s.to_lowercase(),
        "a" => {
            let vowel = s.chars().next().is_some_and(|c| "aeiouAEIOU".contains(c));
            format!("{} {s}", if vowel { "an" } else { "a" })
        }
        "s" => {
            if s.ends_with('s') || s.ends_with('x') || s.ends_with("ch") || s.ends_with("sh") {
                format!("{s}es")
            } else if s.ends_with('y') && !s.ends_with("ey") && !s.ends_with("ay") && !s.ends_with("oy") {
                format!("{}ies", &s[..s.len() - 1])
            } else {
                format!("{s}s")
            }
        }
        other => return Err(GrammarError::Modifier(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        r.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn expands_rules_values_and_modifiers() {
        let r = rules(&[
            ("origin", &["#adj.a# #noun# from #place.capitalize#"]),
            ("adj", &["odious"]),
            ("noun", &["goose"]),
        ]);
        let g = Grammar { rules: &r };
        let v = |n: &str| (n == "place").then(|| "highmere".to_string());
        let s = g.expand("origin", &v, &mut SplitMix64::new(1)).unwrap();
        assert_eq!(s, "an odious goose from Highmere");
        assert_eq!(modify("goose", "s").unwrap(), "gooses");
        assert_eq!(modify("city", "s").unwrap(), "cities");
        assert_eq!(modify("day", "s").unwrap(), "days");
        assert_eq!(modify("x", "upper").unwrap(), "X");
    }

    #[test]
    fn is_deterministic_per_seed_and_varies_across_seeds() {
        let r = rules(&[("origin", &["a", "b", "c", "d", "e", "f"])]);
        let g = Grammar { rules: &r };
        let none = |_: &str| None;
        let run = |seed| g.expand("origin", &none, &mut SplitMix64::new(seed)).unwrap();
        assert_eq!(run(7), run(7));
        let distinct: std::collections::BTreeSet<String> = (0..50).map(run).collect();
        assert!(distinct.len() >= 5, "{distinct:?}");
    }

    #[test]
    fn reports_errors() {
        let r = rules(&[("origin", &["#missing#"]), ("loop", &["#loop#"]), ("open", &["#oops"])]);
        let g = Grammar { rules: &r };
        let none = |_: &str| None;
        let mut rng = SplitMix64::new(0);
        assert_eq!(g.expand("origin", &none, &mut rng), Err(GrammarError::Unknown("missing".into())));
        assert_eq!(g.expand("loop", &none, &mut rng), Err(GrammarError::TooDeep("loop".into())));
        assert_eq!(g.expand("open", &none, &mut rng), Err(GrammarError::Unclosed("#oops".into())));
    }
}
