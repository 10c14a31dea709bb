//! Recipes: the data-generation DAG (`choice`, `template`, `grammar`, `generate`), the
//! student's `input` format, the teacher's `system` and `prompt`, and `validate` checks.

use std::collections::BTreeMap;

use kdl::KdlNode;

use crate::decode::{Cx, NodeReader, unknown_node};
use crate::diagnostic::{Code, Diagnostic};
use crate::model::*;
use crate::parse::{check_name, duplicate};
use crate::source::Spanned;

const RECIPE_NODES: &[&str] =
    &["choice", "template", "grammar", "generate", "input", "system", "prompt", "validate", "judge"];

pub(crate) fn recipe(cx: &mut Cx<'_>, node: &KdlNode) -> Option<Recipe> {
    let mut r = NodeReader::new(cx, node, "recipe \"NAME\" { choice ...; input \"...\"; prompt \"...\" }");
    let name = r.arg_str(cx, 0, "a name");
    r.finish(cx);
    let mut nodes: Vec<RecipeNode> = Vec::new();
    let mut input = None;
    let mut system = None;
    let mut prompt = None;
    let mut prompt_grammar = None;
    let mut validate: Option<(Validation, Spanned<()>)> = None;
    let mut judge: Vec<Criterion> = Vec::new();
    for child in r.child_nodes() {
        let kind = child.name().value();
        match kind {
            "choice" | "template" | "grammar" | "generate" => {
                let Some(n) = dag_node(cx, child) else {
                    continue;
                };
                if let Some(first) = nodes.iter().find(|o| o.name.value == n.name.value) {
                    cx.push(duplicate("node", &n.name, first.name.span));
                } else {
                    nodes.push(n);
                }
            }
            "input" | "system" | "prompt" => {
                let mut c =
                    NodeReader::new(cx, child, "prompt \"Write a poster about {{ target }}\" grammar=\"GRAMMAR_NODE\"");
                let text = c.arg_str(cx, 0, "a template");
                if kind == "prompt"
                    && let Some(g) = c.str(cx, "grammar")
                {
                    prompt_grammar = Some(g);
                }
                c.no_children(cx);
                c.finish(cx);
                let slot = match kind {
                    "input" => &mut input,
                    "system" => &mut system,
                    _ => &mut prompt,
                };
                once(cx, slot, kind, text);
            }
            "validate" => {
                let span = cx.span(child.name().span());
                let v = validation(cx, child);
                if let Some((_, first)) = &validate {
                    cx.push(
                        Diagnostic::new(Code::DuplicateName, span, "`validate` is given twice", "given again here")
                            .with_note(first.span, "first given here")
                            .with_help("put all checks in one `validate` block"),
                    );
                } else {
                    validate = Some((v, Spanned::new((), span)));
                }
            }
            "judge" => judge.extend(criteria(cx, child)),
            _ => unknown_node(cx, child, "a `recipe`", RECIPE_NODES),
        }
    }
    let name = name?;
    check_name(cx, "recipe", &name).then_some(())?;
    Some(Recipe {
        name,
        nodes,
        input,
        system,
        prompt,
        prompt_grammar,
        validate: validate.map(|(v, _)| v).unwrap_or_default(),
        judge,
    })
}

const SITE_NODES: &[&str] = &["fingerprint", "validate", "judge", "promote", "rollback"];

/// `site "NAME" upstream="TEACHER" { fingerprint "site-…"; validate { … }; judge { … } }`.
pub(crate) fn site(cx: &mut Cx<'_>, node: &KdlNode) -> Option<crate::model::Site> {
    let mut r = NodeReader::new(cx, node, "site \"NAME\" upstream=\"TEACHER\" { validate { ... }; judge { ... } }");
    let name = r.arg_str(cx, 0, "a name");
    let upstream = r.str(cx, "upstream");
    r.finish(cx);
    let mut fingerprints = Vec::new();
    let mut validate: Option<Validation> = None;
    let mut judge: Vec<Criterion> = Vec::new();
    let mut policy = crate::model::SitePolicy::default();
    for child in r.child_nodes() {
        match child.name().value() {
            "promote" => {
                let mut c = NodeReader::new(
                    cx,
                    child,
                    "promote margin=0.05 confidence=0.95 min-samples=100 attempts=3 level=\"q4_0\"",
                );
                if let Some(v) = c.float_in(cx, "margin", 0.0, 1.0) {
                    policy.margin = v.value;
                }
                if let Some(v) = c.float_in(cx, "confidence", 0.5, 0.999_999) {
                    policy.confidence = v.value;
                }
                if let Some(v) = c.int_in(cx, "min-samples", 1, 10_000_000) {
                    policy.min_samples = v.value as u32;
                }
                if let Some(v) = c.int_in(cx, "attempts", 1, 32) {
                    policy.attempts = v.value as u32;
                }
                policy.level = c.str(cx, "level").map(|l| l.value);
                c.no_children(cx);
                c.finish(cx);
            }
            "rollback" => {
                let mut c = NodeReader::new(cx, child, "rollback below=0.8 window=50");
                if let Some(v) = c.float_in(cx, "below", 0.0, 1.0) {
                    policy.rollback_below = v.value;
                }
                if let Some(v) = c.int_in(cx, "window", 1, 1_000_000) {
                    policy.rollback_window = v.value as u32;
                }
                c.no_children(cx);
                c.finish(cx);
            }
            "fingerprint" => {
                let mut c = NodeReader::new(cx, child, "fingerprint \"site-3fa2c0d9e1b4\"");
                fingerprints.extend(c.rest_str(cx, 0, 1, "the names `forge proxy` gave the site"));
                c.no_children(cx);
                c.finish(cx);
            }
            "validate" => validate_once(cx, &mut validate, child),
            "judge" => judge.extend(criteria(cx, child)),
            _ => unknown_node(cx, child, "a `site`", SITE_NODES),
        }
    }
    let name = name?;
    // The site's name names its capture file (`captures/NAME.jsonl`).
    check_name(cx, "site", &name).then_some(())?;
    let checks = Recipe {
        name: name.clone(),
        nodes: Vec::new(),
        input: None,
        system: None,
        prompt: None,
        prompt_grammar: None,
        validate: validate.unwrap_or_default(),
        judge,
    };
    Some(crate::model::Site { name, upstream, fingerprints, checks, policy })
}

const CRITERIA: &[&str] =
    &["contains", "max-chars", "min-words", "max-words", "regex", "banned", "schema", "command", "llm"];

/// `judge { contains "intel"; max-chars 500; llm "angle" "Does ...?"; ... }`.
fn criteria(cx: &mut Cx<'_>, node: &KdlNode) -> Vec<Criterion> {
    let r = NodeReader::new(cx, node, "judge { contains \"intel\"; max-chars 500; llm \"NAME\" \"QUESTION?\" }");
    r.finish(cx);
    let mut out: Vec<Criterion> = Vec::new();
    for child in r.child_nodes() {
        let kind = child.name().value();
        let usage = match kind {
            "contains" => "contains \"NODE\" name=\"NAME\"",
            "llm" => "llm \"NAME\" \"A yes/no question about the output?\"",
            "command" => "command \"PROGRAM\" \"ARG\" ... name=\"NAME\" timeout=10",
            "banned" => "banned \"as an AI\" \"language model\" name=\"NAME\"",
            _ => "judge { max-chars 500; regex \"...\" name=\"NAME\" }",
        };
        let mut c = NodeReader::new(cx, child, usage);
        let span = cx.span(child.name().span());
        let named = |c: &mut NodeReader<'_>, cx: &mut Cx<'_>, default: String| {
            c.str(cx, "name").unwrap_or_else(|| Spanned::new(default, span))
        };
        let count = |c: &mut NodeReader<'_>, cx: &mut Cx<'_>| {
            c.arg_int(cx, 0, "a count").and_then(|n| {
                if n.value < 0 || n.value > u32::MAX as i128 {
                    cx.push(Diagnostic::new(
                        Code::InvalidValue,
                        n.span,
                        "must be a non-negative count",
                        "out of range",
                    ));
                    None
                } else {
                    Some(n.value as u32)
                }
            })
        };
        let criterion = match kind {
            "contains" => c.arg_str(cx, 0, "a recipe node").map(|node| {
                let name = named(&mut c, cx, format!("contains-{}", node.value));
                Criterion { name, check: Check::Contains { node } }
            }),
            "max-chars" => count(&mut c, cx)
                .map(|max| Criterion { name: named(&mut c, cx, kind.into()), check: Check::MaxChars { max } }),
            "min-words" => count(&mut c, cx)
                .map(|min| Criterion { name: named(&mut c, cx, kind.into()), check: Check::MinWords { min } }),
            "max-words" => count(&mut c, cx)
                .map(|max| Criterion { name: named(&mut c, cx, kind.into()), check: Check::MaxWords { max } }),
            "regex" => c
                .arg_str(cx, 0, "a regular expression")
                .filter(|p| regex_ok(cx, p))
                .map(|pattern| Criterion { name: named(&mut c, cx, kind.into()), check: Check::Regex { pattern } }),
            "banned" => {
                let phrases: Vec<String> = c.rest_str(cx, 0, 1, "phrases").into_iter().map(|s| s.value).collect();
                (!phrases.is_empty())
                    .then(|| Criterion { name: named(&mut c, cx, kind.into()), check: Check::Banned { phrases } })
            }
            "schema" => c.arg_str(cx, 0, "a JSON schema").and_then(|s| {
                match serde_json::from_str::<serde_json::Value>(&s.value) {
                    Ok(_) => Some(Criterion {
                        name: named(&mut c, cx, kind.into()),
                        check: Check::Schema { schema: s.value },
                    }),
                    Err(e) => {
                        cx.push(Diagnostic::new(
                            Code::InvalidValue,
                            s.span,
                            format!("the schema is not valid JSON: {e}"),
                            "invalid JSON",
                        ));
                        None
                    }
                }
            }),
            "command" => {
                let run = c.rest_str(cx, 0, 1, "a program and its arguments");
                let timeout_s = c.float_in(cx, "timeout", 0.001, 86_400.0).map(|v| v.value).unwrap_or(30.0);
                (!run.is_empty()).then(|| Criterion {
                    name: named(&mut c, cx, kind.into()),
                    check: Check::Command { run, timeout_s },
                })
            }
            "llm" => {
                let name = c.arg_str(cx, 0, "a criterion name");
                let question = c.arg_str(cx, 1, "a yes/no question");
                match (name, question) {
                    (Some(name), Some(q)) => Some(Criterion { name, check: Check::Llm { question: q.value } }),
                    _ => None,
                }
            }
            _ => {
                unknown_node(cx, child, "`judge`", CRITERIA);
                continue;
            }
        };
        if criterion.is_none() {
            // Its own error is reported; `name=` is not unknown on top of it.
            let _ = c.str(cx, "name");
        }
        c.no_children(cx);
        c.finish(cx);
        if let Some(cr) = criterion {
            if let Some(first) = out.iter().find(|o| o.name.value == cr.name.value) {
                cx.push(duplicate("criterion", &cr.name, first.name.span));
            } else {
                out.push(cr);
            }
        }
    }
    out
}

/// A `regex` must compile (with the `regex` crate's syntax and size limit, as the build does).
fn regex_ok(cx: &mut Cx<'_>, pattern: &Spanned<String>) -> bool {
    match regex::Regex::new(&pattern.value) {
        Ok(_) => true,
        Err(e) => {
            let detail = match &e {
                regex::Error::Syntax(s) => s.lines().last().unwrap_or(s).trim_start_matches("error: ").to_string(),
                other => other.to_string(),
            };
            cx.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    pattern.span,
                    format!("invalid regular expression: {detail}"),
                    "does not compile",
                )
                .with_help("the syntax is Rust's `regex` crate (no look-around or backreferences)"),
            );
            false
        }
    }
}

fn once(cx: &mut Cx<'_>, slot: &mut Option<Spanned<String>>, what: &str, value: Option<Spanned<String>>) {
    let Some(value) = value else { return };
    if let Some(first) = slot {
        cx.push(
            Diagnostic::new(Code::DuplicateName, value.span, format!("`{what}` is given twice"), "given again here")
                .with_note(first.span, "first given here"),
        );
    } else {
        *slot = Some(value);
    }
}

/// Node names are template variables, so they must be valid minijinja identifiers.
fn check_node_name(cx: &mut Cx<'_>, name: &Spanned<String>) -> bool {
    let ok = name.value.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        let suggestion = name.value.to_ascii_lowercase().replace(['-', '.', ' '], "_");
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                name.span,
                format!("`{}` is not a valid node name", name.value),
                "not a template variable name",
            )
            .with_help(format!(
                "node names are used as template variables: use lowercase letters, digits and `_` (e.g. `{suggestion}`)"
            )),
        );
    }
    ok
}

fn dag_node(cx: &mut Cx<'_>, node: &KdlNode) -> Option<RecipeNode> {
    let kind = node.name().value();
    let usage = match kind {
        "choice" => {
            "choice \"NAME\" from=\"LIST\" min=1 max=2 distinct-from=\"NODE\" when=\"EXPR\" balance=#true { match ATTR=\"NODE\" }"
        }
        "template" => "template \"NAME\" \"{{ a }} of {{ b }}\"",
        "grammar" => "grammar \"NAME\" start=\"origin\" { rule \"origin\" \"#adj# #noun#\" }",
        _ => {
            "generate \"NAME\" teacher=\"TEACHER\" grammar=\"GRAMMAR_NODE\" { system \"...\"; prompt \"...\"; schema \"{...}\"; validate { ... } }"
        }
    };
    let mut r = NodeReader::new(cx, node, usage);
    let name = r.arg_str(cx, 0, "a name");
    let node_kind = match kind {
        "choice" => choice(cx, &mut r),
        "template" => {
            let t = r.arg_str(cx, 1, "a template");
            r.no_children(cx);
            t.map(|template| NodeKind::Template { template })
        }
        "grammar" => grammar(cx, &mut r),
        _ => generate(cx, &mut r),
    };
    r.finish(cx);
    let name = name?;
    check_node_name(cx, &name).then_some(())?;
    Some(RecipeNode { name, kind: node_kind? })
}

fn choice(cx: &mut Cx<'_>, r: &mut NodeReader<'_>) -> Option<NodeKind> {
    let from = r.req_str(cx, "from");
    let count = r.int_in(cx, "count", 1, 1000);
    let min = r.int_in(cx, "min", 0, 1000);
    let max = r.int_in(cx, "max", 1, 1000);
    if let (Some(count), true) = (&count, min.is_some() || max.is_some()) {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                count.span,
                "give either `count` or `min`/`max`, not both",
                "conflicts",
            )
            .with_help("`count=2` is short for `min=2 max=2`"),
        );
    }
    let (min_v, max_v) = match (&count, &min, &max) {
        (Some(c), _, _) => (c.value, c.value),
        (None, Some(lo), Some(hi)) => (lo.value, hi.value),
        (None, Some(lo), None) => (lo.value, lo.value.max(1)),
        (None, None, Some(hi)) => (1.min(hi.value), hi.value),
        (None, None, None) => (1, 1),
    };
    if min_v > max_v {
        let span = min.as_ref().map(|m| m.span).unwrap_or_default();
        cx.push(Diagnostic::new(
            Code::InvalidValue,
            span,
            format!("`min` ({min_v}) is larger than `max` ({max_v})"),
            "larger than max",
        ));
    }
    let distinct_from = r.str(cx, "distinct-from").into_iter().collect();
    let when = r.str(cx, "when");
    let balance = r.bool(cx, "balance").map(|b| b.value).unwrap_or(false);
    let mut matching = Vec::new();
    for child in r.child_nodes() {
        match child.name().value() {
            "match" => {
                let mut c = NodeReader::new(cx, child, "match ATTRIBUTE=\"NODE\"");
                c.allow_any_props();
                let props = c.other_props(cx);
                if props.is_empty() {
                    cx.push(
                        Diagnostic::new(
                            Code::MissingProperty,
                            cx.span(child.name().span()),
                            "`match` needs at least one ATTRIBUTE=\"NODE\" pair",
                            "nothing to match",
                        )
                        .with_help(
                            "`match class=\"sender_class\"` keeps entries whose `class` equals that node's pick",
                        ),
                    );
                }
                for (attr, value, span) in props {
                    match value.as_string() {
                        Some(node) => matching.push(Match { attr, node: Spanned::new(node.to_string(), span) }),
                        None => cx.push(Diagnostic::new(
                            Code::WrongType,
                            span,
                            "`match` values name a recipe node (a string)",
                            "expected a node name",
                        )),
                    }
                }
                c.no_children(cx);
                c.finish(cx);
            }
            _ => unknown_node(cx, child, "a `choice`", &["match"]),
        }
    }
    let from = from?;
    Some(NodeKind::Choice(ChoiceNode {
        from,
        min: min_v.max(0) as u32,
        max: max_v.max(0) as u32,
        distinct_from,
        matching,
        when,
        balance,
    }))
}

/// `#name#` symbols of a grammar alternative (`#name.capitalize#` names `name`).
pub(crate) fn grammar_symbols(alt: &str) -> Vec<&str> {
    alt.split('#').skip(1).step_by(2).map(|s| s.split('.').next().unwrap_or("")).collect()
}

fn grammar(cx: &mut Cx<'_>, r: &mut NodeReader<'_>) -> Option<NodeKind> {
    let start = r.str(cx, "start").map(|s| s.value).unwrap_or_else(|| "origin".to_string());
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut spans = BTreeMap::new();
    for child in r.child_nodes() {
        match child.name().value() {
            "rule" => {
                let mut c = NodeReader::new(cx, child, "rule \"NAME\" \"alternative\" \"another #rule#\"");
                let name = c.arg_str(cx, 0, "a rule name");
                let alts = c.rest_str(cx, 1, 1, "at least one alternative");
                c.no_children(cx);
                c.finish(cx);
                let Some(name) = name else { continue };
                if let Some(first) = spans.get(&name.value) {
                    cx.push(duplicate("rule", &name, *first));
                    continue;
                }
                spans.insert(name.value.clone(), name.span);
                rules.insert(name.value, alts.into_iter().map(|a| a.value).collect());
            }
            _ => unknown_node(cx, child, "a `grammar`", &["rule"]),
        }
    }
    if !rules.contains_key(&start) {
        cx.push(
            Diagnostic::new(
                Code::UnknownReference,
                r.name_span(cx),
                format!("the grammar has no start rule `{start}`"),
                "no start rule",
            )
            .with_optional_help(crate::suggest::help(&start, "rule", rules.keys().map(String::as_str))),
        );
        return None;
    }
    // A rule whose every alternative needs an unfinishable rule (itself, say) never finishes:
    // find the rules that can, by a fixpoint, and report the rest.
    let mut finishes: std::collections::HashSet<&str> = std::collections::HashSet::new();
    loop {
        let before = finishes.len();
        for (name, alts) in &rules {
            if !finishes.contains(name.as_str())
                && alts
                    .iter()
                    .any(|a| grammar_symbols(a).iter().all(|s| !rules.contains_key(*s) || finishes.contains(s)))
            {
                finishes.insert(name);
            }
        }
        if finishes.len() == before {
            break;
        }
    }
    let mut ok = true;
    for name in rules.keys().filter(|n| !finishes.contains(n.as_str())) {
        ok = false;
        cx.push(
            Diagnostic::new(
                Code::Cycle,
                spans[name],
                format!("grammar rule `{name}` never finishes: each of its alternatives expands a rule that recurses forever"),
                "recurses forever",
            )
            .with_help("give the rule an alternative without `#...#` recursion, e.g. `rule \"list\" \"#item#\" \"#item#, #list#\"`"),
        );
    }
    ok.then_some(NodeKind::Grammar(GrammarNode { start, rules }))
}

fn generate(cx: &mut Cx<'_>, r: &mut NodeReader<'_>) -> Option<NodeKind> {
    let teacher = r.str(cx, "teacher");
    let temperature = r.float_in(cx, "temperature", 0.0, 2.0).map(|v| v.value);
    let top_p = r.float_in(cx, "top-p", 0.0, 1.0).map(|v| v.value);
    let max_tokens = r.int_in(cx, "max-tokens", 1, 1 << 20).map(|v| v.value as u32);
    let grammar = r.str(cx, "grammar");
    let mut system = None;
    let mut prompt = None;
    let mut schema = None;
    let mut node_validate: Option<Validation> = None;
    for child in r.child_nodes() {
        let kind = child.name().value();
        match kind {
            "system" | "prompt" | "schema" => {
                let mut c = NodeReader::new(cx, child, "prompt \"Describe {{ sender }}\"");
                let text = c.arg_str(cx, 0, "a text");
                c.no_children(cx);
                c.finish(cx);
                if kind == "schema"
                    && let Some(t) = &text
                    && let Err(e) = serde_json::from_str::<serde_json::Value>(&t.value)
                {
                    cx.push(Diagnostic::new(
                        Code::InvalidValue,
                        t.span,
                        format!("the schema is not valid JSON: {e}"),
                        "invalid JSON",
                    ));
                }
                let slot = match kind {
                    "system" => &mut system,
                    "prompt" => &mut prompt,
                    _ => &mut schema,
                };
                once(cx, slot, kind, text);
            }
            "validate" => validate_once(cx, &mut node_validate, child),
            _ => unknown_node(cx, child, "a `generate`", &["system", "prompt", "schema", "validate"]),
        }
    }
    let Some(prompt) = prompt else {
        cx.push(
            Diagnostic::new(Code::MissingNode, r.name_span(cx), "`generate` needs a `prompt`", "no prompt")
                .with_help("add a block: generate \"NAME\" { prompt \"Describe {{ sender }}\" }"),
        );
        return None;
    };
    Some(NodeKind::Generate(GenerateNode {
        teacher,
        system,
        prompt,
        schema: schema.map(|s| s.value),
        temperature,
        top_p,
        max_tokens,
        grammar,
        validate: node_validate,
    }))
}

/// A `validate` block into `slot`, unless one was given already.
fn validate_once(cx: &mut Cx<'_>, slot: &mut Option<Validation>, child: &KdlNode) {
    if slot.is_some() {
        cx.push(Diagnostic::new(
            Code::DuplicateName,
            cx.span(child.name().span()),
            "`validate` is given twice",
            "given again here",
        ));
    } else {
        *slot = Some(validation(cx, child));
    }
}

fn validation(cx: &mut Cx<'_>, node: &KdlNode) -> Validation {
    let r = NodeReader::new(cx, node, "validate { min-words 110; max-chars 500; banned \"as an AI\" }");
    r.finish(cx);
    let mut v = Validation { dedup: true, ..Validation::default() };
    for child in r.child_nodes() {
        let name = child.name().value();
        let mut c = NodeReader::new(cx, child, "validate { min-words 110; max-chars 500; banned \"as an AI\" }");
        let count = |cx: &mut Cx<'_>, c: &mut NodeReader<'_>| {
            let n = c.arg_int(cx, 0, "a count")?;
            if n.value < 0 || n.value > u32::MAX as i128 {
                cx.push(Diagnostic::new(Code::InvalidValue, n.span, "must be a non-negative count", "out of range"));
                return None;
            }
            Some(n.value as u32)
        };
        let flag = |cx: &mut Cx<'_>, c: &mut NodeReader<'_>| c.opt_arg_bool(cx, 0).map(|b| b.value).unwrap_or(true);
        match name {
            "min-words" => v.min_words = count(cx, &mut c),
            "max-words" => v.max_words = count(cx, &mut c),
            "min-chars" => v.min_chars = count(cx, &mut c),
            "max-chars" => v.max_chars = count(cx, &mut c),
            "banned" => v.banned.extend(c.rest_str(cx, 0, 1, "phrases").into_iter().map(|s| s.value)),
            "regex" => {
                v.regex.extend(c.rest_str(cx, 0, 1, "a regular expression").into_iter().filter(|p| regex_ok(cx, p)))
            }
            "json" => v.json = flag(cx, &mut c),
            "dedup" => {
                v.dedup = flag(cx, &mut c);
                v.dedup_field = c.str(cx, "field").map(|f| f.value);
            }
            "schema" => {
                if let Some(s) = c.arg_str(cx, 0, "a JSON schema") {
                    match serde_json::from_str::<serde_json::Value>(&s.value) {
                        Ok(_) => {
                            v.schema = Some(s.value);
                            v.json = true;
                        }
                        Err(e) => cx.push(Diagnostic::new(
                            Code::InvalidValue,
                            s.span,
                            format!("the schema is not valid JSON: {e}"),
                            "invalid JSON",
                        )),
                    }
                }
            }
            "near-dup" => {
                if let Some(t) = c.arg_float(cx, 0, "a similarity threshold") {
                    if t.value > 0.0 && t.value <= 1.0 {
                        v.near_dup = Some(t.value);
                    } else {
                        cx.push(Diagnostic::new(
                            Code::InvalidValue,
                            t.span,
                            "`near-dup` is a Jaccard similarity between 0 and 1",
                            "out of range",
                        ));
                    }
                }
            }
            _ => {
                unknown_node(
                    cx,
                    child,
                    "`validate`",
                    &[
                        "min-words",
                        "max-words",
                        "min-chars",
                        "max-chars",
                        "banned",
                        "regex",
                        "json",
                        "schema",
                        "dedup",
                        "near-dup",
                    ],
                );
                continue;
            }
        }
        c.no_children(cx);
        c.finish(cx);
    }
    if let (Some(lo), Some(hi)) = (v.min_words, v.max_words)
        && lo > hi
    {
        cx.push(Diagnostic::new(
            Code::InvalidValue,
            cx.span(node.name().span()),
            format!("`min-words` ({lo}) is larger than `max-words` ({hi})"),
            "no answer can pass",
        ));
    }
    if let (Some(lo), Some(hi)) = (v.min_chars, v.max_chars)
        && lo > hi
    {
        cx.push(Diagnostic::new(
            Code::InvalidValue,
            cx.span(node.name().span()),
            format!("`min-chars` ({lo}) is larger than `max-chars` ({hi})"),
            "no answer can pass",
        ));
    }
    v
}
