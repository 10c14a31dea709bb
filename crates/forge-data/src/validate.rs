//! Acceptance checks on teacher answers (seed 004's validators, generalised): length in words
//! and characters, banned phrases, regular expressions, JSON (recovered robustly) against a JSON
//! schema, and exact / near duplicate detection across the dataset.

use std::collections::HashSet;

use forge_manifest::Validation;
use serde_json::Value;

use crate::json_recovery;

/// Why an answer was rejected. `key()` is the stable name used in dataset statistics.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    Empty,
    TooFewWords {
        min: u32,
        got: usize,
    },
    TooManyWords {
        max: u32,
        got: usize,
    },
    TooFewChars {
        min: u32,
        got: usize,
    },
    TooManyChars {
        max: u32,
        got: usize,
    },
    Banned(String),
    Regex(String),
    NotJson,
    Schema(String),
    Duplicate,
    NearDuplicate(f64),
    /// The server stopped at the `max_tokens` the checks set.
    Truncated {
        max_tokens: u32,
    },
}

impl Rejection {
    pub fn key(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooFewWords { .. } => "min-words",
            Rejection::TooManyWords { .. } => "max-words",
            Rejection::TooFewChars { .. } => "min-chars",
            Rejection::TooManyChars { .. } => "max-chars",
            Rejection::Banned(_) => "banned",
            Rejection::Regex(_) => "regex",
            Rejection::NotJson => "json",
            Rejection::Schema(_) => "schema",
            Rejection::Duplicate => "dedup",
            Rejection::NearDuplicate(_) => "near-dup",
            Rejection::Truncated { .. } => "truncated",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Empty => write!(f, "the answer is empty"),
            Rejection::TooFewWords { min, got } => write!(f, "{got} words, fewer than min-words {min}"),
            Rejection::TooManyWords { max, got } => write!(f, "{got} words, more than max-words {max}"),
            Rejection::TooFewChars { min, got } => write!(f, "{got} characters, fewer than min-chars {min}"),
            Rejection::TooManyChars { max, got } => write!(f, "{got} characters, more than max-chars {max}"),
            Rejection::Banned(p) => write!(f, "contains the banned phrase {p:?}"),
            Rejection::Regex(r) => write!(f, "does not match /{r}/"),
            Rejection::NotJson => write!(f, "no JSON could be recovered from the answer"),
            Rejection::Schema(e) => write!(f, "the JSON does not match the schema: {e}"),
            Rejection::Duplicate => write!(f, "duplicates an accepted answer"),
            Rejection::NearDuplicate(j) => write!(f, "near-duplicates an accepted answer (Jaccard {j:.2})"),
            Rejection::Truncated { max_tokens } => {
                write!(f, "cut off at max_tokens {max_tokens} (the bound its length checks allow)")
            }
        }
    }
}

/// Lowercase, whitespace collapsed: the text dedup and banned phrases compare.
pub fn normalize(text: &str) -> String {
    text.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// The checks of one `validate` block, compiled.
pub struct Checks {
    spec: Validation,
    regexes: Vec<(String, regex::Regex)>,
    schema: Option<jsonschema::Validator>,
    banned: Vec<(String, String)>,
}

impl Checks {
    /// `extra_schema` is a generate node's structured-output schema, checked like `schema`.
    pub fn new(spec: &Validation, extra_schema: Option<&str>) -> Result<Checks, String> {
        let regexes = spec
            .regex
            .iter()
            .map(|r| {
                regex::Regex::new(&r.value)
                    .map(|c| (r.value.clone(), c))
                    .map_err(|e| format!("invalid regex /{}/: {e}", r.value))
            })
            .collect::<Result<_, _>>()?;
        let schema_text = spec.schema.as_deref().or(extra_schema);
        let schema = match schema_text {
            None => None,
            Some(s) => {
                let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON schema: {e}"))?;
                Some(jsonschema::validator_for(&v).map_err(|e| format!("invalid JSON schema: {e}"))?)
            }
        };
        let banned = spec.banned.iter().map(|b| (b.clone(), normalize(b))).collect();
        Ok(Checks { spec: spec.clone(), regexes, schema, banned })
    }

    pub fn wants_json(&self) -> bool {
        self.spec.json || self.schema.is_some()
    }

    /// Checks one answer on its own. Returns the recovered JSON when the checks ask for JSON.
    pub fn check(&self, text: &str) -> Result<Option<Value>, Rejection> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Rejection::Empty);
        }
        let s = &self.spec;
        let words = text.split_whitespace().count();
        let chars = text.chars().count();
        if let Some(min) = s.min_words.filter(|m| words < *m as usize) {
            return Err(Rejection::TooFewWords { min, got: words });
        }
        if let Some(max) = s.max_words.filter(|m| words > *m as usize) {
            return Err(Rejection::TooManyWords { max, got: words });
        }
        if let Some(min) = s.min_chars.filter(|m| chars < *m as usize) {
            return Err(Rejection::TooFewChars { min, got: chars });
        }
        if let Some(max) = s.max_chars.filter(|m| chars > *m as usize) {
            return Err(Rejection::TooManyChars { max, got: chars });
        }
        let norm = normalize(text);
        if let Some((phrase, _)) = self.banned.iter().find(|(_, n)| norm.contains(n.as_str())) {
            return Err(Rejection::Banned(phrase.clone()));
        }
        if let Some((src, _)) = self.regexes.iter().find(|(_, r)| !r.is_match(text)) {
            return Err(Rejection::Regex(src.clone()));
        }
        if !self.wants_json() {
            return Ok(None);
        }
        let value = json_recovery::recover(text).ok_or(Rejection::NotJson)?;
        if let Some(schema) = &self.schema
            && let Some(e) = schema.iter_errors(&value).next()
        {
            return Err(Rejection::Schema(e.to_string()));
        }
        Ok(Some(value))
    }

    pub fn dedup(&self) -> Dedup {
        Dedup {
            enabled: self.spec.dedup,
            field: self.spec.dedup_field.clone(),
            exact: HashSet::new(),
            near: self.spec.near_dup,
            shingles: Vec::new(),
        }
    }
}

/// Duplicate detection across accepted answers, in acceptance order.
pub struct Dedup {
    enabled: bool,
    /// Compare this top-level field of a JSON value instead of the whole value.
    field: Option<String>,
    exact: HashSet<[u8; 32]>,
    near: Option<f64>,
    shingles: Vec<Vec<u64>>,
}

/// Word 3-shingles, hashed and sorted.
fn shingles(norm: &str) -> Vec<u64> {
    let words: Vec<&str> = norm.split(' ').collect();
    let mut out: Vec<u64> = if words.len() < 3 {
        vec![forge_teacher::rng::hash64(&[norm.as_bytes()])]
    } else {
        words
            .windows(3)
            .map(|w| forge_teacher::rng::hash64(&[w[0].as_bytes(), w[1].as_bytes(), w[2].as_bytes()]))
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - inter;
    if union == 0 { 1.0 } else { inter as f64 / union as f64 }
}

impl Dedup {
    /// The text of a recorded value that this dedup compares: the value's text, or its
    /// `field` when it is a JSON object that has one.
    pub fn text_of(&self, value: &Value) -> String {
        let v = match (&self.field, value) {
            (Some(f), Value::Object(map)) => map.get(f).unwrap_or(value),
            _ => value,
        };
        v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
    }

    /// Whether `text` may be accepted, without recording it.
    pub fn check(&self, text: &str) -> Result<(), Rejection> {
        if !self.enabled && self.near.is_none() {
            return Ok(());
        }
        let norm = normalize(text);
        if self.enabled && self.exact.contains(blake3::hash(norm.as_bytes()).as_bytes()) {
            return Err(Rejection::Duplicate);
        }
        if let Some(threshold) = self.near {
            let sh = shingles(&norm);
            if let Some(best) = self.shingles.iter().map(|o| jaccard(&sh, o)).find(|j| *j >= threshold) {
                return Err(Rejection::NearDuplicate(best));
            }
        }
        Ok(())
    }

    /// Records `text` as accepted.
    pub fn insert(&mut self, text: &str) {
        let norm = normalize(text);
        if self.near.is_some() {
            self.shingles.push(shingles(&norm));
        }
        self.exact.insert(*blake3::hash(norm.as_bytes()).as_bytes());
    }

    /// [`check`](Self::check), then [`insert`](Self::insert) if it passed.
    pub fn accept(&mut self, text: &str) -> Result<(), Rejection> {
        self.check(text)?;
        self.insert(text);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forge_manifest::Spanned;

    fn spec() -> Validation {
        Validation { dedup: true, ..Validation::default() }
    }

    #[test]
    fn length_checks() {
        let v = Validation { min_words: Some(3), max_chars: Some(20), ..spec() };
        let c = Checks::new(&v, None).unwrap();
        assert_eq!(c.check("two words"), Err(Rejection::TooFewWords { min: 3, got: 2 }));
        assert_eq!(c.check("one two three"), Ok(None));
        assert!(matches!(c.check("one two three four five six"), Err(Rejection::TooManyChars { max: 20, .. })));
        assert_eq!(c.check("   "), Err(Rejection::Empty));
        let v = Validation { max_words: Some(2), min_chars: Some(5), ..spec() };
        let c = Checks::new(&v, None).unwrap();
        assert_eq!(c.check("a b c"), Err(Rejection::TooManyWords { max: 2, got: 3 }));
        assert_eq!(c.check("ab"), Err(Rejection::TooFewChars { min: 5, got: 2 }));
    }

    #[test]
    fn banned_phrases_ignore_case_and_spacing() {
        let v = Validation { banned: vec!["as an AI".into(), "language model".into()], ..spec() };
        let c = Checks::new(&v, None).unwrap();
        assert_eq!(c.check("As  an ai, I cannot insult nobles."), Err(Rejection::Banned("as an AI".into())));
        assert_eq!(c.check("I am but a humble LANGUAGE\nmodel"), Err(Rejection::Banned("language model".into())));
        assert_eq!(c.check("Hear ye! The baron fears geese."), Ok(None));
    }

    #[test]
    fn regex_and_json_schema() {
        let v = Validation { regex: vec![Spanned::new("^HEAR YE".to_string(), Default::default())], ..spec() };
        let c = Checks::new(&v, None).unwrap();
        assert_eq!(c.check("hear ye"), Err(Rejection::Regex("^HEAR YE".into())));
        assert_eq!(c.check("HEAR YE, all"), Ok(None));

        let schema = r#"{"type":"object","required":["seed","tone"],"properties":{"seed":{"type":"string"},"tone":{"enum":["stern","playful"]}}}"#;
        let v = Validation { schema: Some(schema.into()), json: true, ..spec() };
        let c = Checks::new(&v, None).unwrap();
        assert_eq!(c.check("Sure! {'seed': 'a lost goose', 'tone': 'stern',}").unwrap().unwrap()["tone"], "stern");
        assert!(matches!(c.check(r#"{"seed": "x", "tone": "grim"}"#), Err(Rejection::Schema(_))));
        assert_eq!(c.check("no json at all"), Err(Rejection::NotJson));
        assert!(
            Checks::new(&Validation { regex: vec![Spanned::new("(".into(), Default::default())], ..spec() }, None)
                .is_err()
        );
    }

    #[test]
    fn exact_and_near_duplicates() {
        let v = Validation { near_dup: Some(0.6), ..spec() };
        let c = Checks::new(&v, None).unwrap();
        let mut d = c.dedup();
        d.accept("The baron of Highmere fears geese and cannot read his own decrees").unwrap();
        assert_eq!(
            d.accept("the baron of  HIGHMERE fears geese and cannot read his own decrees"),
            Err(Rejection::Duplicate)
        );
        assert!(matches!(
            d.accept("The baron of Highmere fears geese and cannot read his own letters"),
            Err(Rejection::NearDuplicate(j)) if j >= 0.6
        ));
        d.accept("A completely different poster about the salt guild's debts").unwrap();
        let mut off = Checks::new(&Validation::default(), None).unwrap().dedup();
        off.accept("same").unwrap();
        off.accept("same").unwrap();
    }

    #[test]
    fn dedup_on_a_json_field() {
        let v = Validation { dedup_field: Some("seed".into()), ..spec() };
        let mut d = Checks::new(&v, None).unwrap().dedup();
        let a = serde_json::json!({"seed": "A lost goose", "tone": "stern"});
        let b = serde_json::json!({"seed": "a LOST goose", "tone": "playful"});
        let c = serde_json::json!({"seed": "A found goose", "tone": "stern"});
        assert_eq!(d.text_of(&a), "A lost goose");
        d.accept(&d.text_of(&a)).unwrap();
        assert_eq!(d.accept(&d.text_of(&b)), Err(Rejection::Duplicate), "same seed, other tone");
        d.accept(&d.text_of(&c)).unwrap();
        // Without the field (or not an object) the whole value is compared.
        assert_eq!(d.text_of(&serde_json::json!("plain")), "plain");
        assert_eq!(d.text_of(&serde_json::json!({"other": 1})), r#"{"other":1}"#);
    }
}
