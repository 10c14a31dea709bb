//! Getting JSON out of what a teacher actually wrote.
//!
//! Models asked for JSON answer with a preamble, Markdown fences, one object per line, Python
//! dict syntax, trailing commas... Following the NPC persona pipeline (seed 004, "Robust JSON
//! Parsing"), recovery tries, in order: the whole text; each line as JSON (JSON lines); a
//! top-level array; every balanced `{...}` block in the text. Each candidate is parsed as is,
//! then with trailing commas removed, then as single-quoted pseudo-JSON (Python literals).

use serde_json::Value;

/// Every JSON object or array that can be recovered from `text`, in order of appearance.
pub fn recover_all(text: &str) -> Vec<Value> {
    let text = strip_fences(text.trim());
    if let Some(v) = parse_lenient(text) {
        return flatten(v);
    }
    let lines: Vec<Value> = text.lines().filter_map(|l| parse_lenient(l.trim())).flat_map(flatten).collect();
    if !lines.is_empty() && lines.len() == text.lines().filter(|l| l.trim().starts_with(['{', '['])).count() {
        return lines;
    }
    if let Some(Value::Array(items)) = balanced(text, '[', ']').into_iter().find_map(parse_lenient)
        && !items.is_empty()
        && items.iter().all(Value::is_object)
    {
        return items;
    }
    balanced(text, '{', '}').into_iter().filter_map(parse_lenient).collect()
}

/// The first JSON value recoverable from `text`.
pub fn recover(text: &str) -> Option<Value> {
    recover_all(text).into_iter().next()
}

/// A top-level array of objects stands for its objects.
fn flatten(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => items,
        v => vec![v],
    }
}

fn strip_fences(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else { return text };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

fn parse_lenient(s: &str) -> Option<Value> {
    let s = s.trim();
    if !(s.starts_with('{') || s.starts_with('[')) {
        return None;
    }
    if let Ok(v) = serde_json::from_str(s) {
        return Some(v);
    }
    let no_trailing = remove_trailing_commas(s);
    if let Ok(v) = serde_json::from_str(&no_trailing) {
        return Some(v);
    }
    serde_json::from_str(&remove_trailing_commas(&python_to_json(s)?)).ok()
}

/// Removes commas directly before `}` or `]`, outside strings.
fn remove_trailing_commas(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut in_str = false;
    let mut escaped = false;
    for (i, &c) in chars.iter().enumerate() {
        if in_str {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        if c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Python literal syntax (`{'a': 'it\'s', 'b': True, 'c': None}`) to JSON, the way
/// `ast.literal_eval` would read it. `None` when it is not that either.
fn python_to_json(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let quote = c;
                out.push('"');
                loop {
                    let c = chars.next()?;
                    match c {
                        '\\' => {
                            let n = chars.next()?;
                            match n {
                                '\'' => out.push('\''),
                                '"' => out.push_str("\\\""),
                                other => {
                                    out.push('\\');
                                    out.push(other);
                                }
                            }
                        }
                        c if c == quote => break,
                        '"' => out.push_str("\\\""),
                        '\n' => out.push_str("\\n"),
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            c if c.is_ascii_alphabetic() => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        word.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(match word.as_str() {
                    "True" | "true" => "true",
                    "False" | "false" => "false",
                    "None" | "null" => "null",
                    _ => return None,
                });
            }
            '(' => out.push('['),
            ')' => out.push(']'),
            c => out.push(c),
        }
    }
    Some(out)
}

/// Every top-level balanced `open ... close` block, skipping brackets inside strings.
fn balanced(text: &str, open: char, close: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut in_str: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if let Some(q) = in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, c) if c == q => in_str = None,
                _ => {}
            }
            continue;
        }
        match c {
            '"' | '\'' if depth > 0 => in_str = Some(c),
            c if c == open => {
                if depth == 0 {
                    start = i;
                }
                depth += 1;
            }
            c if c == close && depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push(&text[start..i + c.len_utf8()]);
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_and_fenced_json() {
        assert_eq!(recover(r#"{"a": 1}"#), Some(json!({"a": 1})));
        assert_eq!(recover("```json\n{\"a\": 1}\n```"), Some(json!({"a": 1})));
    }

    #[test]
    fn json_lines() {
        let text = "{\"seed\": \"a\"}\n{\"seed\": \"b\"}\n\n{\"seed\": \"c\",}\n";
        assert_eq!(recover_all(text), vec![json!({"seed": "a"}), json!({"seed": "b"}), json!({"seed": "c"})]);
    }

    #[test]
    fn single_quoted_pseudo_json() {
        assert_eq!(
            recover("{'seed': 'it\\'s late', 'ok': True, 'n': None, 'tags': ('a', 'b')}"),
            Some(json!({"seed": "it's late", "ok": true, "n": null, "tags": ["a", "b"]}))
        );
    }

    #[test]
    fn top_level_array_in_prose() {
        let text = "Here are your seeds:\n[{\"seed\": \"a\"}, {\"seed\": \"b\"},]\nEnjoy!";
        assert_eq!(recover_all(text), vec![json!({"seed": "a"}), json!({"seed": "b"})]);
    }

    #[test]
    fn balanced_braces_in_prose_with_braces_in_strings() {
        let text = "Sure! {\"line\": \"a } tricky { one\", \"n\": 1} and also {\"n\": 2,} done";
        assert_eq!(recover_all(text), vec![json!({"line": "a } tricky { one", "n": 1}), json!({"n": 2})]);
    }

    #[test]
    fn nothing_to_recover() {
        assert!(recover_all("no json here").is_empty());
        assert!(recover("{unquoted: keys}").is_none());
    }
}
