//! Which call site a request comes from.
//!
//! A site is named by the `X-Forge-Site` header or a `forge_site` field of the request body
//! (removed before the request goes upstream, which would refuse a field it does not know).
//! Otherwise it is recognised by what stays the same at a call site while its values change:
//! its system prompt, its response format and its tools — the template, not the user's turn.

use axum::http::HeaderMap;
use forge_cache::canonical;
use serde_json::{Value, json};

pub const SITE_HEADER: &str = "x-forge-site";
pub const SITE_FIELD: &str = "forge_site";

/// Whether `name` can name a site: it names its capture file, so 1 to 64 letters, digits,
/// `-`, `_` or `.`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The name of the site whose template `body` follows: `site-` and 12 hex digits of the
/// digest of its system messages, response format and tools.
pub fn fingerprint(body: &Value) -> String {
    let system: Vec<&Value> = body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| matches!(m["role"].as_str(), Some("system" | "developer")))
                .map(|m| &m["content"])
                .collect()
        })
        .unwrap_or_default();
    let shape = json!({
        "system": system,
        "response_format": body.get("response_format"),
        "tools": body.get("tools"),
    });
    let digest = blake3::hash(&canonical::to_vec(&shape)).to_hex();
    format!("site-{}", &digest[..12])
}

/// The site of a request, and whether it was named (not recognised). Takes `forge_site` out
/// of `body`.
pub fn site_of(headers: &HeaderMap, body: &mut Value) -> Result<(String, bool), String> {
    let field = body.as_object_mut().and_then(|o| o.remove(SITE_FIELD));
    let named = match headers.get(SITE_HEADER) {
        Some(h) => Some(h.to_str().map_err(|_| format!("the {SITE_HEADER} header is not text"))?.to_string()),
        None => match field {
            Some(Value::String(s)) => Some(s),
            Some(other) => return Err(format!("`{SITE_FIELD}` must be a string, not {other}")),
            None => None,
        },
    };
    match named {
        Some(name) if valid_name(&name) => Ok((name, true)),
        Some(name) => Err(format!(
            "`{}` cannot name a call site: use 1 to 64 letters, digits, `-`, `_` or `.`",
            name.chars().take(80).collect::<String>()
        )),
        None => Ok((fingerprint(body), false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(system: &str, user: &str) -> Value {
        json!({
            "model": "gpt",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "response_format": {"type": "json_object"},
        })
    }

    #[test]
    fn a_site_is_its_template_not_its_values() {
        let a = fingerprint(&level("You design RPG levels as JSON.", "A swamp level, 3 enemies"));
        let b = fingerprint(&level("You design RPG levels as JSON.", "An ice cave, 9 enemies"));
        let c = fingerprint(&level("You write tavern gossip.", "A swamp level, 3 enemies"));
        assert_eq!(a, b, "the same call site with other values");
        assert_ne!(a, c, "another call site");
        assert!(a.starts_with("site-") && a.len() == 17 && valid_name(&a), "{a}");
        let mut schema = level("You design RPG levels as JSON.", "x");
        schema["response_format"] = json!({"type": "text"});
        assert_ne!(fingerprint(&schema), a, "another response format is another site");
    }

    #[test]
    fn a_header_or_a_field_names_the_site() {
        let mut h = HeaderMap::new();
        let mut body = level("s", "u");
        body[SITE_FIELD] = json!("from-field");
        assert_eq!(site_of(&h, &mut body.clone()), Ok(("from-field".into(), true)));
        h.insert(SITE_HEADER, "level-gen".parse().unwrap());
        assert_eq!(site_of(&h, &mut body), Ok(("level-gen".into(), true)), "the header wins");
        assert!(body.get(SITE_FIELD).is_none(), "the field never goes upstream");
        h.insert(SITE_HEADER, "../../etc".parse().unwrap());
        assert!(site_of(&h, &mut level("s", "u")).unwrap_err().contains("cannot name a call site"));
        let mut bad = level("s", "u");
        bad[SITE_FIELD] = json!(7);
        assert!(site_of(&HeaderMap::new(), &mut bad).is_err());
        assert!(!site_of(&HeaderMap::new(), &mut level("s", "u")).unwrap().1, "recognised, not named");
    }
}
