//! Cross-references: every name a manifest uses must be defined, and nothing may depend on
//! itself. Runs once all files are read, so definitions may come from any included file.

use std::collections::{HashMap, HashSet};

use petgraph::graph::{DiGraph, NodeIndex};

use crate::argv::{Piece, parse_arg};
use crate::artifact::{self, ArtifactDecl, ArtifactId, StageKind};
use crate::diagnostic::{Code, Diagnostic};
use crate::model::*;
use crate::recipe::grammar_symbols;
use crate::source::{Span, Spanned};
use crate::suggest;

pub(crate) fn validate(m: &Manifest) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for site in m.sites.values() {
        check_ref(&mut diags, "teacher", &site.upstream, &m.teachers);
    }
    for recipe in m.recipes.values() {
        recipe_refs(m, recipe, &mut diags);
    }
    for target in &m.targets {
        target_refs(m, target, &mut diags);
    }
    let artifacts = artifact::expand(m);
    artifact_refs(m, &artifacts, &mut diags);
    if diags.is_empty() {
        artifact_cycles(&artifacts, &mut diags);
    }
    diags
}

fn unknown<'a>(what: &str, name: &Spanned<String>, candidates: impl IntoIterator<Item = &'a str>) -> Diagnostic {
    Diagnostic::new(
        Code::UnknownReference,
        name.span,
        format!("no {what} named `{}`", name.value),
        format!("unknown {what}"),
    )
    .with_optional_help(suggest::help(&name.value, what, candidates))
}

fn check_ref<T>(
    diags: &mut Vec<Diagnostic>,
    what: &str,
    name: &Option<Spanned<String>>,
    map: &std::collections::BTreeMap<String, T>,
) {
    if let Some(n) = name
        && !map.contains_key(&n.value)
    {
        diags.push(unknown(what, n, map.keys().map(String::as_str)));
    }
}

fn target_refs(m: &Manifest, t: &Target, diags: &mut Vec<Diagnostic>) {
    let pools = &m.workspace.pools;
    if let Some(model) = &t.model {
        check_ref(diags, "recipe", &model.recipe, &m.recipes);
        check_ref(diags, "site", &model.site, &m.sites);
        if let Some(d) = &model.dataset
            && d.source != DataSource::Recipe
        {
            if model.site.is_none() {
                diags.push(
                    Diagnostic::new(
                        Code::MissingProperty,
                        t.name.span,
                        format!("model `{}` learns from captures but names no site", t.name.value),
                        "`site=...` missing",
                    )
                    .with_help("write model \"NAME\" site=\"SITE\" { dataset from=\"captures\" ... }"),
                );
            }
            check_ref(diags, "pool", &d.pool, pools);
        } else if let Some(d) = &model.dataset {
            if model.recipe.is_none() {
                diags.push(
                    Diagnostic::new(
                        Code::MissingProperty,
                        t.name.span,
                        format!("model `{}` builds a dataset but names no recipe", t.name.value),
                        "`recipe=...` missing",
                    )
                    .with_help("write model \"NAME\" recipe=\"RECIPE\" { ... }"),
                );
            }
            check_ref(diags, "teacher", &Some(d.teacher.clone()), &m.teachers);
            check_ref(diags, "pool", &d.pool, pools);
            let recipe = model.recipe.as_ref().and_then(|r| m.recipes.get(&r.value));
            if let Some(recipe) = recipe {
                dataset_recipe(m, d, recipe, diags);
            }
            if let (Some(split), Some(recipe)) = (&d.split_by, recipe)
                && recipe.node(&split.value).is_none()
            {
                diags.push(unknown("recipe node", split, recipe.nodes.iter().map(|n| n.name.value.as_str())));
            }
        }
        if let Some(a) = &model.adapter {
            check_ref(diags, "base", &Some(a.base.clone()), &m.bases);
            check_ref(diags, "pool", &a.pool, pools);
            if let Some(Base { kind: BaseKind::Scratch(sb), name, .. }) = m.bases.get(&a.base.value) {
                context_fits(model, a, sb, name, diags);
            }
        }
        if let Some(q) = &model.quantize {
            check_ref(diags, "pool", &q.pool, pools);
        }
        if let Some(b) = &model.benchmark {
            check_ref(diags, "teacher", &b.judge, &m.teachers);
            check_ref(diags, "pool", &b.pool, pools);
            if let Some(j) = &b.judge
                && matches!(m.teachers.get(&j.value).map(|t| &t.kind), Some(TeacherKind::Grammar))
            {
                diags.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            j.span,
                            format!("teacher `{}` is an offline grammar teacher; it cannot answer judge questions", j.value),
                            "not a model",
                        )
                        .with_help("name an `openai` teacher, or leave `judge` out to grade with the recipe's verifier criteria only"),
                    );
            }
            let levels: Vec<QuantLevel> =
                model.quantize.iter().flat_map(|q| q.levels.iter().map(|l| l.value)).collect();
            for g in &b.gates {
                if let Some(l) = &g.level
                    && !levels.contains(&l.value)
                {
                    diags.push(
                        Diagnostic::new(
                            Code::UnknownReference,
                            l.span,
                            format!("the model is not quantized to `{}`", l.value),
                            "not a quantize level",
                        )
                        .with_help(format!(
                            "gates can name the levels of `quantize`: {}",
                            levels.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
                        )),
                    );
                }
            }
        }
    }
    for c in &t.commands {
        check_ref(diags, "pool", &c.pool, pools);
    }
}

/// What a scratch base's `context` must hold: the training rows and, in the benchmark, a
/// prompt and the answer (a GGUF base's context is in its file, checked when it is read).
fn context_fits(
    model: &ModelStages,
    a: &AdapterStage,
    sb: &ScratchBase,
    base: &Spanned<String>,
    diags: &mut Vec<Diagnostic>,
) {
    let too_long = |what: String, label: &str| {
        Diagnostic::new(Code::InvalidValue, a.span, what, label.to_string())
            .with_note(base.span, format!("base `{}` has context={}", base.value, sb.context))
    };
    if a.seq_len > sb.context {
        diags.push(
            too_long(
                format!("`seq-len` ({}) is longer than the base's context ({})", a.seq_len, sb.context),
                "rows longer than the context",
            )
            .with_help(format!("train at `seq-len={}` or less, or raise the base's `context`", sb.context)),
        );
    }
    if let Some(b) = &model.benchmark
        && b.max_tokens >= sb.context
    {
        diags.push(
            Diagnostic::new(
                Code::InvalidValue,
                b.span,
                format!(
                    "the benchmark's `max-tokens` ({}) leaves no room for a prompt in the base's context ({})",
                    b.max_tokens, sb.context
                ),
                "answers as long as the context",
            )
            .with_note(base.span, format!("base `{}` has context={}", base.value, sb.context))
            .with_help("lower `max-tokens`, or raise the base's `context`"),
        );
    }
}

/// The lore items a choice's `from` can draw on, following `node.sub` through upstream picks.
fn list_items<'m>(m: &'m Manifest, recipe: &'m Recipe, from: &str, depth: usize) -> Option<Vec<&'m LoreItem>> {
    if depth > recipe.nodes.len() {
        return None; // a cycle; reported separately
    }
    match from.split_once('.') {
        None => m.lists.get(from).map(|l| l.items.iter().collect()),
        Some((node, sub)) => {
            let NodeKind::Choice(c) = &recipe.node(node)?.kind else {
                return None;
            };
            let parents = list_items(m, recipe, &c.from.value, depth + 1)?;
            Some(parents.into_iter().filter_map(|p| p.lists.get(sub)).flat_map(|l| l.items.iter()).collect())
        }
    }
}

fn is_grammar_teacher(m: &Manifest, name: &str) -> bool {
    m.teachers.get(name).is_some_and(|t| matches!(t.kind, TeacherKind::Grammar))
}

/// What a dataset needs of its recipe: an input and a prompt, and for offline grammar
/// teachers a grammar to expand wherever the teacher would be asked.
fn dataset_recipe(m: &Manifest, d: &DatasetStage, recipe: &Recipe, diags: &mut Vec<Diagnostic>) {
    for (what, present) in [("input", recipe.input.is_some()), ("prompt", recipe.prompt.is_some())] {
        if !present {
            diags.push(
                Diagnostic::new(
                    Code::MissingNode,
                    recipe.name.span,
                    format!("recipe `{}` has no `{what}`, which a dataset needs", recipe.name.value),
                    format!("no `{what}`"),
                )
                .with_help(if what == "input" {
                    "add `input \"...\"`: the text the student model sees at runtime"
                } else {
                    "add `prompt \"...\"`: what the teacher is asked; its answer is the training target"
                }),
            );
        }
    }
    let grammar_help = |what: &str| {
        format!(
            "teacher `{}` is an offline grammar teacher: give {what} `grammar=\"NODE\"`, a grammar node it expands instead",
            d.teacher.value
        )
    };
    if is_grammar_teacher(m, &d.teacher.value)
        && recipe.prompt_grammar.is_none()
        && let Some(p) = &recipe.prompt
    {
        diags.push(
            Diagnostic::new(
                Code::MissingProperty,
                p.span,
                format!("the dataset's teacher `{}` cannot read prompts", d.teacher.value),
                "`grammar=...` missing",
            )
            .with_help(grammar_help("the prompt")),
        );
    }
    for node in &recipe.nodes {
        if let NodeKind::Generate(g) = &node.kind {
            let teacher = g.teacher.as_ref().unwrap_or(&d.teacher);
            if is_grammar_teacher(m, &teacher.value) && g.grammar.is_none() {
                diags.push(
                    Diagnostic::new(
                        Code::MissingProperty,
                        node.name.span,
                        format!(
                            "generate node `{}` is answered by a grammar teacher but names no grammar",
                            node.name.value
                        ),
                        "`grammar=...` missing",
                    )
                    .with_help(grammar_help("the node")),
                );
            }
        }
    }
}

/// Names a template may use besides the recipe's nodes.
pub const TEMPLATE_BUILTINS: &[&str] = &["sample_index"];

/// The variables a template (or, with `expr`, an expression) reads, as paths (`audience.name`,
/// `target`), sorted, or its syntax error.
fn template_vars(text: &str, expr: bool) -> Result<Vec<String>, String> {
    let env = minijinja::Environment::new();
    let vars = if expr {
        env.compile_expression(text).map_err(|e| e.to_string())?.undeclared_variables(true)
    } else {
        env.template_from_str(text).map_err(|e| e.to_string())?.undeclared_variables(true)
    };
    let mut v: Vec<String> = vars.into_iter().collect();
    v.sort();
    Ok(v)
}

/// The variable a path starts from: `audience` of `audience.name`.
fn head(path: &str) -> &str {
    path.split('.').next().unwrap_or(path)
}

fn recipe_refs(m: &Manifest, r: &Recipe, diags: &mut Vec<Diagnostic>) {
    let node_names: Vec<&str> = r.nodes.iter().map(|n| n.name.value.as_str()).collect();
    let node_ref = |diags: &mut Vec<Diagnostic>, n: &Spanned<String>| {
        if r.node(&n.value).is_none() {
            diags.push(unknown("recipe node", n, node_names.iter().copied()));
            false
        } else {
            true
        }
    };
    for c in &r.judge {
        if let Check::Contains { node } = &c.check {
            node_ref(diags, node);
        }
    }
    // Edges of the node DAG: (from, to, where the dependency is written).
    let mut edges: Vec<(&str, &str, Span)> = Vec::new();
    for node in &r.nodes {
        let me = node.name.value.as_str();
        match &node.kind {
            NodeKind::Choice(c) => {
                match c.from.value.split_once('.') {
                    None => {
                        if !m.lists.contains_key(&c.from.value) {
                            diags.push(unknown("list", &c.from, m.lists.keys().map(String::as_str)));
                        }
                    }
                    Some((up, sub)) => {
                        let up_ref = Spanned::new(up.to_string(), c.from.span);
                        if node_ref(diags, &up_ref) {
                            edges.push((me, r.node(up).map(|n| n.name.value.as_str()).unwrap_or(up), c.from.span));
                            match r.node(up).map(|n| &n.kind) {
                                Some(NodeKind::Choice(upc)) => {
                                    if let Some(items) = list_items(m, r, &upc.from.value, 0)
                                        && !items.is_empty()
                                        && items.iter().all(|i| !i.lists.contains_key(sub))
                                    {
                                        let subs: HashSet<&str> =
                                            items.iter().flat_map(|i| i.lists.keys().map(String::as_str)).collect();
                                        let sub_ref = Spanned::new(sub.to_string(), c.from.span);
                                        diags.push(unknown("sub-list", &sub_ref, subs));
                                    }
                                }
                                Some(_) => diags.push(
                                    Diagnostic::new(
                                        Code::InvalidValue,
                                        c.from.span,
                                        format!("`{up}` is not a choice node, so it has no sub-lists"),
                                        "not a choice",
                                    )
                                    .with_help("`from=\"NODE.SUB\"` draws from the sub-list of the entry NODE picked"),
                                ),
                                None => {}
                            }
                        }
                    }
                }
                for d in &c.distinct_from {
                    if node_ref(diags, d) {
                        edges.push((me, d.value.as_str(), d.span));
                    }
                }
                for mt in &c.matching {
                    if node_ref(diags, &mt.node) {
                        edges.push((me, mt.node.value.as_str(), mt.node.span));
                    }
                }
            }
            NodeKind::Generate(g) => {
                check_ref(diags, "teacher", &g.teacher, &m.teachers);
                if let Some(gr) = &g.grammar {
                    grammar_ref(r, gr, diags);
                }
            }
            NodeKind::Template { .. } => {}
            NodeKind::Grammar(g) => {
                for alts in g.rules.values() {
                    for alt in alts {
                        for sym in grammar_symbols(alt) {
                            if g.rules.contains_key(sym) {
                                continue;
                            }
                            match r.node(sym) {
                                Some(n) => edges.push((me, n.name.value.as_str(), node.name.span)),
                                None => diags.push(
                                    Diagnostic::new(
                                        Code::UnknownReference,
                                        node.name.span,
                                        format!("grammar `{me}` uses `#{sym}#`, which is neither one of its rules nor a node"),
                                        "unknown symbol",
                                    )
                                    .with_optional_help(suggest::help(
                                        sym,
                                        "rule or node",
                                        g.rules.keys().map(String::as_str).chain(node_names.iter().copied()),
                                    )),
                                ),
                            }
                        }
                    }
                }
            }
        }
        // Templates and expressions: every variable must be a node (and becomes an edge).
        let mut texts: Vec<(&Spanned<String>, bool)> = Vec::new();
        match &node.kind {
            NodeKind::Template { template } => texts.push((template, false)),
            NodeKind::Generate(g) => {
                texts.push((&g.prompt, false));
                texts.extend(g.system.iter().map(|s| (s, false)));
            }
            NodeKind::Choice(c) => texts.extend(c.when.iter().map(|w| (w, true))),
            NodeKind::Grammar(_) => {}
        }
        for (text, expr) in texts {
            let paths = template_refs(text, expr, &node_names, diags);
            let mut nodes: Vec<&str> = paths.iter().map(|p| head(p)).collect();
            nodes.sort();
            nodes.dedup();
            for var in nodes {
                if let Some(n) = r.node(var) {
                    edges.push((me, n.name.value.as_str(), text.span));
                }
            }
            attribute_refs(m, r, text.span, &paths, diags);
        }
    }
    for text in [&r.input, &r.system, &r.prompt].into_iter().flatten() {
        let paths = template_refs(text, false, &node_names, diags);
        attribute_refs(m, r, text.span, &paths, diags);
    }
    if let Some(gr) = &r.prompt_grammar {
        grammar_ref(r, gr, diags);
    }
    for (a, b, span) in &edges {
        if a == b {
            diags.push(Diagnostic::new(
                Code::Cycle,
                *span,
                format!("recipe node `{a}` depends on itself"),
                "refers to its own node",
            ));
        }
    }
    let mut graph = DiGraph::<&str, Span>::new();
    let idx: HashMap<&str, NodeIndex> = node_names.iter().map(|n| (*n, graph.add_node(*n))).collect();
    for (a, b, span) in &edges {
        if a != b {
            graph.add_edge(idx[a], idx[b], *span);
        }
    }
    report_cycles(&graph, "recipe node", diags);
}

/// The paths `text` reads from nodes (`audience.name`), sorted; reports syntax errors and
/// unknown variables.
fn template_refs(text: &Spanned<String>, expr: bool, nodes: &[&str], diags: &mut Vec<Diagnostic>) -> Vec<String> {
    match template_vars(&text.value, expr) {
        Err(e) => {
            let what = if expr { "expression" } else { "template" };
            diags.push(Diagnostic::new(
                Code::InvalidValue,
                text.span,
                format!("invalid {what}: {e}"),
                format!("invalid {what}"),
            ));
            Vec::new()
        }
        Ok(paths) => {
            let mut vars: Vec<&str> = paths.iter().map(|p| head(p)).collect();
            vars.sort();
            vars.dedup();
            for var in vars.into_iter().filter(|v| !TEMPLATE_BUILTINS.contains(v) && !nodes.contains(v)) {
                diags.push(
                    Diagnostic::new(
                        Code::UnknownReference,
                        text.span,
                        format!("the template uses `{var}`, which is not a node of this recipe"),
                        format!("unknown variable `{var}`"),
                    )
                    .with_optional_help(suggest::help(
                        var,
                        "node",
                        nodes.iter().copied().chain(TEMPLATE_BUILTINS.iter().copied()),
                    )),
                );
            }
            paths.into_iter().filter(|p| nodes.contains(&head(p))).collect()
        }
    }
}

/// `{{ node.attr }}` on a choice that picks one entry: `attr` must be `name`, `weight` or an
/// attribute that some entry the node can pick has (templates render strictly, so a misspelled
/// attribute would fail every sample at build time).
fn attribute_refs(m: &Manifest, r: &Recipe, span: Span, paths: &[String], diags: &mut Vec<Diagnostic>) {
    for var in paths {
        let mut path = var.split('.');
        let (Some(node), Some(attr)) = (path.next(), path.next()) else { continue };
        let Some(NodeKind::Choice(c)) = r.node(node).map(|n| &n.kind) else { continue };
        if c.max > 1 {
            diags.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    span,
                    format!("`{node}` picks up to {} entries, so `{node}.{attr}` has no single value", c.max),
                    format!("`{node}` is a list"),
                )
                .with_help(format!("loop over the picks: {{% for x in {node} %}}{{{{ x.{attr} }}}}{{% endfor %}}")),
            );
            continue;
        }
        let Some(items) = list_items(m, r, &c.from.value, 0) else { continue };
        if items.is_empty() || matches!(attr, "name" | "weight") || items.iter().any(|i| i.attrs.contains_key(attr)) {
            continue;
        }
        let known: std::collections::BTreeSet<&str> =
            items.iter().flat_map(|i| i.attrs.keys().map(String::as_str)).chain(["name", "weight"]).collect();
        diags.push(
            Diagnostic::new(
                Code::UnknownReference,
                span,
                format!("no entry `{node}` can pick (from `{}`) has an attribute `{attr}`", c.from.value),
                format!("unknown attribute `{node}.{attr}`"),
            )
            .with_optional_help(suggest::help(attr, "attribute", known.iter().copied())),
        );
    }
}

/// `grammar="NODE"` must name a grammar node.
fn grammar_ref(r: &Recipe, name: &Spanned<String>, diags: &mut Vec<Diagnostic>) {
    match r.node(&name.value).map(|n| &n.kind) {
        Some(NodeKind::Grammar(_)) => {}
        Some(_) => diags.push(Diagnostic::new(
            Code::InvalidValue,
            name.span,
            format!("`{}` is not a grammar node", name.value),
            "not a grammar",
        )),
        None => {
            let grammars =
                r.nodes.iter().filter(|n| matches!(n.kind, NodeKind::Grammar(_))).map(|n| n.name.value.as_str());
            diags.push(unknown("grammar node", name, grammars));
        }
    }
}

fn artifact_refs(m: &Manifest, artifacts: &[ArtifactDecl], diags: &mut Vec<Diagnostic>) {
    let ids: HashSet<&ArtifactId> = artifacts.iter().map(|a| &a.id).collect();
    let all: Vec<String> = artifacts.iter().map(|a| a.id.to_string()).collect();
    for decl in artifacts {
        let (StageKind::Command(ci), Some(ti)) = (decl.kind, decl.target) else {
            continue;
        };
        let target = &m.targets[ti];
        let stage = &target.commands[ci];
        let local: Vec<String> =
            artifacts.iter().filter(|a| a.target == decl.target).map(|a| a.id.local_name()).collect();
        for need in &stage.needs {
            if artifact::resolve_ref(target, &need.value, |id| ids.contains(id)).is_none() {
                let candidates = local.iter().chain(all.iter()).map(String::as_str);
                diags.push(unknown("artifact", need, candidates).with_help(
                    match suggest::closest(&need.value, local.iter().chain(all.iter()).map(String::as_str)) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => "write a stage of this target (`lint`) or TARGET:STAGE[:VARIANT]".to_string(),
                    },
                ));
            }
        }
        for arg in &stage.run {
            match parse_arg(&arg.value) {
                Err(e) => diags.push(Diagnostic::new(Code::InvalidValue, arg.span, e, "invalid placeholder")),
                Ok(pieces) => {
                    for p in pieces {
                        if let Piece::Dep(r) = p
                            && !stage.needs.iter().any(|n| n.value == r)
                        {
                            diags.push(
                                Diagnostic::new(
                                    Code::UnknownReference,
                                    arg.span,
                                    format!("`{{dep:{r}}}` refers to `{r}`, which this stage does not need"),
                                    "not in `needs`",
                                )
                                .with_help(format!("add `needs \"{r}\"` to the stage")),
                            );
                        }
                    }
                }
            }
        }
    }
}

fn artifact_cycles(artifacts: &[ArtifactDecl], diags: &mut Vec<Diagnostic>) {
    let mut graph = DiGraph::<String, Span>::new();
    let idx: HashMap<&ArtifactId, NodeIndex> =
        artifacts.iter().map(|a| (&a.id, graph.add_node(a.id.to_string()))).collect();
    for a in artifacts {
        for d in &a.deps {
            if d.id == a.id {
                diags.push(Diagnostic::new(
                    Code::Cycle,
                    d.span,
                    format!("`{}` needs itself", a.id),
                    "a stage cannot need its own output",
                ));
            } else if let Some(&to) = idx.get(&d.id) {
                graph.add_edge(idx[&a.id], to, d.span);
            }
        }
    }
    report_cycles(&graph, "artifact", diags);
}

/// One diagnostic per strongly connected component, naming the cycle in order.
fn report_cycles<N: std::fmt::Display>(graph: &DiGraph<N, Span>, what: &str, diags: &mut Vec<Diagnostic>) {
    for scc in petgraph::algo::tarjan_scc(graph) {
        if scc.len() < 2 {
            continue;
        }
        // Walk the component from its first node, always following an edge that stays inside,
        // until a node repeats: that is a cycle.
        let members: HashSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc.iter().min().unwrap_or(&scc[0]);
        let mut path = vec![start];
        let mut spans = Vec::new();
        let mut at = start;
        while let Some(edge) = graph
            .edges(at)
            .filter(|e| members.contains(&petgraph::visit::EdgeRef::target(e)))
            .min_by_key(petgraph::visit::EdgeRef::target)
        {
            let next = petgraph::visit::EdgeRef::target(&edge);
            spans.push(*edge.weight());
            if let Some(pos) = path.iter().position(|n| *n == next) {
                path.drain(..pos);
                spans.drain(..pos);
                path.push(next);
                break;
            }
            path.push(next);
            at = next;
        }
        let names: Vec<String> = path.iter().map(|n| graph[*n].to_string()).collect();
        let mut d = Diagnostic::new(
            Code::Cycle,
            spans.first().copied().unwrap_or_default(),
            format!("dependency cycle between {what}s: {}", names.join(" → ")),
            format!("`{}` depends on `{}` here", names[0], names.get(1).map(String::as_str).unwrap_or("")),
        )
        .with_help("break the cycle by removing one of these dependencies");
        for (i, span) in spans.iter().enumerate().skip(1) {
            d = d.with_note(*span, format!("`{}` depends on `{}` here", names[i], names[i + 1]));
        }
        diags.push(d);
    }
}
