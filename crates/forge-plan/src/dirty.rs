//! Why an artifact must be rebuilt: typed reasons with old and new values.
//!
//! Each reason renders as one line (`param lr changed (0.0002 → 0.0001)`), is serialized for
//! `--json`, and is what `forge why` prints. Reasons come from diffing the fingerprint the
//! artifact was last built with against the one it would be built with now.

use std::collections::BTreeMap;
use std::fmt;

use forge_cache::Digest;
use serde::Serialize;
use serde_json::Value;

use crate::canonical;
use crate::fingerprint::Fingerprint;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum DirtyReason {
    /// No build of this artifact is on record.
    NeverBuilt,
    /// A build is on record but its action-cache entry is gone (gc, clean, or damage).
    RecordMissing,
    ForgeVersion {
        old: String,
        new: String,
    },
    StageKind {
        old: String,
        new: String,
    },
    FormatVersion {
        stage: String,
        old: u32,
        new: u32,
    },
    FingerprintSchema {
        old: u32,
        new: u32,
    },
    /// A parameter changed; `name` is a dotted path into nested parameters. `None` means the
    /// parameter was absent on that side.
    Param {
        name: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    Input {
        path: String,
        old: Option<Digest>,
        new: Option<Digest>,
    },
    Upstream {
        artifact: String,
        old: Option<Digest>,
        new: Option<Digest>,
    },
    Tool {
        name: String,
        old: Option<String>,
        new: Option<String>,
    },
    /// The stored content failed verification and was discarded.
    ContentDamaged {
        detail: String,
    },
    /// The action-cache entry could not be read and was discarded.
    EntryCorrupt {
        detail: String,
    },
}

/// Short rendering of a JSON value for one-line messages.
fn show(v: &Option<Value>) -> String {
    match v {
        None => "unset".to_string(),
        Some(Value::String(s)) if s.chars().count() <= 40 => format!("{s:?}"),
        Some(v) => {
            let s = canonical::to_string(v);
            if s.chars().count() > 40 { format!("{}…", s.chars().take(39).collect::<String>()) } else { s }
        }
    }
}

/// Two long strings, each shown around where they first differ.
fn show_pair(old: &Option<Value>, new: &Option<Value>) -> (String, String) {
    const WIDTH: usize = 40;
    if let (Some(Value::String(a)), Some(Value::String(b))) = (old, new) {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        if a.len() > WIDTH || b.len() > WIDTH {
            let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            let start = common.saturating_sub(WIDTH / 3);
            let window = |s: &[char]| {
                let end = (start + WIDTH).min(s.len());
                let mut out = String::from("\"");
                if start > 0 {
                    out.push('…');
                }
                out.extend(&s[start.min(s.len())..end]);
                if end < s.len() {
                    out.push('…');
                }
                out.push('"');
                out
            };
            return (window(&a), window(&b));
        }
    }
    (show(old), show(new))
}

fn short(d: &Option<Digest>) -> String {
    d.map(|d| d.short()).unwrap_or_else(|| "none".into())
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyReason::NeverBuilt => write!(f, "never built"),
            DirtyReason::RecordMissing => write!(f, "its previous build was removed from the cache"),
            DirtyReason::ForgeVersion { old, new } => write!(f, "forge version changed ({old} → {new})"),
            DirtyReason::StageKind { old, new } => write!(f, "stage kind changed ({old} → {new})"),
            DirtyReason::FormatVersion { stage, old, new } => {
                write!(f, "{stage} output format changed (v{old} → v{new})")
            }
            DirtyReason::FingerprintSchema { old, new } => write!(f, "fingerprint schema changed (v{old} → v{new})"),
            DirtyReason::Param { name, old: None, new } => write!(f, "param {name} added ({})", show(new)),
            DirtyReason::Param { name, old, new: None } => write!(f, "param {name} removed (was {})", show(old)),
            DirtyReason::Param { name, old, new } => {
                let (o, n) = show_pair(old, new);
                write!(f, "param {name} changed ({o} → {n})")
            }
            DirtyReason::Input { path, old: None, .. } => write!(f, "input {path} added"),
            DirtyReason::Input { path, new: None, .. } => write!(f, "input {path} removed"),
            DirtyReason::Input { path, old, new } => {
                write!(f, "input {path} changed ({} → {})", short(old), short(new))
            }
            DirtyReason::Upstream { artifact, old: None, .. } => write!(f, "upstream {artifact} added"),
            DirtyReason::Upstream { artifact, new: None, .. } => write!(f, "upstream {artifact} removed"),
            DirtyReason::Upstream { artifact, old, new } => {
                write!(f, "upstream {artifact} changed ({} → {})", short(old), short(new))
            }
            DirtyReason::Tool { name, old, new } => {
                let (o, n) = (old.as_deref().unwrap_or("none"), new.as_deref().unwrap_or("none"));
                match name.strip_prefix("forge:") {
                    Some(stage) => write!(f, "forge's {stage} stage changed (code {o} → {n})"),
                    None => write!(f, "tool {name} changed ({o} → {n})"),
                }
            }
            DirtyReason::ContentDamaged { detail } => write!(f, "stored content damaged: {detail}"),
            DirtyReason::EntryCorrupt { detail } => write!(f, "cache entry corrupt: {detail}"),
        }
    }
}

/// Everything that differs between the last build's fingerprint and the current one.
pub fn diff(old: &Fingerprint, new: &Fingerprint) -> Vec<DirtyReason> {
    let mut out = Vec::new();
    if old.schema != new.schema {
        out.push(DirtyReason::FingerprintSchema { old: old.schema, new: new.schema });
    }
    if old.forge != new.forge {
        out.push(DirtyReason::ForgeVersion { old: old.forge.clone(), new: new.forge.clone() });
    }
    if old.stage != new.stage {
        out.push(DirtyReason::StageKind { old: old.stage.clone(), new: new.stage.clone() });
    } else if old.format != new.format {
        out.push(DirtyReason::FormatVersion { stage: new.stage.clone(), old: old.format, new: new.format });
    }
    diff_params("", &old.params, &new.params, &mut out);
    for (path, old_d, new_d) in diff_maps(&old.inputs, &new.inputs) {
        out.push(DirtyReason::Input { path, old: old_d, new: new_d });
    }
    for (artifact, old_d, new_d) in diff_maps(&old.upstream, &new.upstream) {
        out.push(DirtyReason::Upstream { artifact, old: old_d, new: new_d });
    }
    for (name, o, n) in diff_maps(&old.tools, &new.tools) {
        out.push(DirtyReason::Tool { name, old: o, new: n });
    }
    out
}

fn diff_maps<V: Clone + PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
) -> Vec<(String, Option<V>, Option<V>)> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (o, n) = (old.get(k), new.get(k));
            (o != n).then(|| (k.clone(), o.cloned(), n.cloned()))
        })
        .collect()
}

fn diff_params(prefix: &str, old: &BTreeMap<String, Value>, new: &BTreeMap<String, Value>, out: &mut Vec<DirtyReason>) {
    for (name, o, n) in diff_maps(old, new) {
        diff_value(&format!("{prefix}{name}"), o.as_ref(), n.as_ref(), out);
    }
}

/// Recurses into objects and equal-length arrays so a change deep inside a recipe reads as
/// `param recipe.nodes[2].from changed ("a" → "b")` rather than two unreadable blobs.
fn diff_value(name: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<DirtyReason>) {
    match (old, new) {
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let o: BTreeMap<String, Value> = o.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let n: BTreeMap<String, Value> = n.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            diff_params(&format!("{name}."), &o, &n, out);
        }
        (Some(Value::Array(o)), Some(Value::Array(n))) if o.len() == n.len() => {
            for (i, (a, b)) in o.iter().zip(n).enumerate() {
                if a != b {
                    diff_value(&format!("{name}[{i}]"), Some(a), Some(b), out);
                }
            }
        }
        _ => out.push(DirtyReason::Param { name: name.to_string(), old: old.cloned(), new: new.cloned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::FINGERPRINT_SCHEMA;
    use serde_json::json;

    fn fp() -> Fingerprint {
        Fingerprint {
            schema: FINGERPRINT_SCHEMA,
            forge: "0.1.0".into(),
            stage: "adapter".into(),
            format: 1,
            params: [("lr".to_string(), json!(2e-4)), ("recipe".to_string(), json!({"nodes": [{"from": "a"}]}))].into(),
            upstream: [("defame:dataset".to_string(), Digest::of(b"d1"))].into(),
            inputs: [("worlds/a.kdl".to_string(), Digest::of(b"w1"))].into(),
            tools: BTreeMap::new(),
        }
    }

    fn lines(old: &Fingerprint, new: &Fingerprint) -> Vec<String> {
        diff(old, new).iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn param_change() {
        let mut new = fp();
        new.params.insert("lr".into(), json!(1e-4));
        assert_eq!(lines(&fp(), &new), ["param lr changed (0.0002 → 0.0001)"]);
        assert_eq!(
            diff(&fp(), &new),
            [DirtyReason::Param { name: "lr".into(), old: Some(json!(2e-4)), new: Some(json!(1e-4)) }]
        );
    }

    #[test]
    fn nested_param_change_names_the_path() {
        let mut new = fp();
        new.params.insert("recipe".into(), json!({"nodes": [{"from": "b"}]}));
        assert_eq!(lines(&fp(), &new), [r#"param recipe.nodes[0].from changed ("a" → "b")"#]);
    }

    #[test]
    fn long_strings_are_shown_where_they_differ() {
        let mut old = fp();
        let mut new = fp();
        old.params.insert("prompt".into(), json!(format!("{} tone: grim {}", "x".repeat(60), "y".repeat(60))));
        new.params.insert("prompt".into(), json!(format!("{} tone: wry {}", "x".repeat(60), "y".repeat(60))));
        assert_eq!(
            lines(&old, &new),
            [
                r#"param prompt changed ("…xxxxxx tone: grim yyyyyyyyyyyyyyyyyyyyyy…" → "…xxxxxx tone: wry yyyyyyyyyyyyyyyyyyyyyyy…")"#
            ]
        );
    }

    #[test]
    fn param_added_and_removed() {
        let mut new = fp();
        new.params.remove("lr");
        new.params.insert("rank".into(), json!(8));
        assert_eq!(lines(&fp(), &new), ["param lr removed (was 0.0002)", "param rank added (8)"]);
    }

    #[test]
    fn input_file_change() {
        let mut new = fp();
        new.inputs.insert("worlds/a.kdl".into(), Digest::of(b"w2"));
        new.inputs.insert("worlds/b.kdl".into(), Digest::of(b"b"));
        let l = lines(&fp(), &new);
        assert_eq!(l.len(), 2);
        assert!(l[0].starts_with("input worlds/a.kdl changed ("), "{}", l[0]);
        assert_eq!(l[1], "input worlds/b.kdl added");
        assert!(
            matches!(&diff(&fp(), &new)[0], DirtyReason::Input { path, old: Some(_), new: Some(_) } if path == "worlds/a.kdl")
        );
    }

    #[test]
    fn upstream_change() {
        let mut new = fp();
        new.upstream.insert("defame:dataset".into(), Digest::of(b"d2"));
        assert_eq!(
            lines(&fp(), &new),
            [format!(
                "upstream defame:dataset changed ({} → {})",
                Digest::of(b"d1").short(),
                Digest::of(b"d2").short()
            )]
        );
    }

    #[test]
    fn forge_version_change() {
        let mut new = fp();
        new.forge = "0.2.0".into();
        assert_eq!(lines(&fp(), &new), ["forge version changed (0.1.0 → 0.2.0)"]);
    }

    #[test]
    fn format_and_tool_changes() {
        let mut new = fp();
        new.format = 2;
        new.tools.insert("candle-core".into(), "0.11.1".into());
        assert_eq!(
            lines(&fp(), &new),
            ["adapter output format changed (v1 → v2)", "tool candle-core changed (none → 0.11.1)"]
        );
    }

    #[test]
    fn a_change_of_forges_stage_code_is_named() {
        let mut old = fp();
        old.tools.insert("forge:adapter".into(), "1a2b".into());
        let mut new = fp();
        new.tools.insert("forge:adapter".into(), "3c4d".into());
        assert_eq!(lines(&old, &new), ["forge's adapter stage changed (code 1a2b → 3c4d)"]);
    }

    #[test]
    fn reasons_serialize_with_a_tag() {
        let r = DirtyReason::Param { name: "lr".into(), old: Some(json!(1)), new: None };
        assert_eq!(serde_json::to_value(&r).unwrap(), json!({"reason": "param", "name": "lr", "old": 1, "new": null}));
    }
}
