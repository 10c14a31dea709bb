//! Evaluating a recipe's DAG for one sample: choices, templates and grammars.
//!
//! **Stable sampling.** Every random decision derives from (dataset seed, sample index, node)
//! alone. A choice ranks candidate entries by weighted rendezvous hashing — entry `e` scores
//! `-ln(u(seed, sample, node, e)) / weight(e)` with `u` uniform in (0, 1), and the lowest
//! scores win — so adding or removing one lore entry changes exactly the samples for which that
//! entry is (or was) among the winners, and no other. With the teacher-call cache this makes a
//! lore edit cost only the samples it actually changes. (Rendezvous hashing: Thaler & Ravishankar
//! 1998; the weighted form is the exponential-race construction of Efraimidis & Spirakis 2006.)

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use forge_manifest::{AttrValue, ChoiceNode, LoreItem, Manifest, NodeKind, Recipe, RecipeNode};
use forge_teacher::grammar::Grammar;
use forge_teacher::rng::{SplitMix64, hash64, unit};
use minijinja::value::{Object, ObjectRepr, Value as JValue};
use serde_json::{Value, json};

/// A node's value in one sample.
#[derive(Clone, Debug)]
pub enum NodeValue<'m> {
    /// The entries a choice picked; `multi` when the node may pick more than one.
    Picks {
        items: Vec<&'m LoreItem>,
        multi: bool,
    },
    Text(String),
    Json(Value),
    /// A choice whose `when` was false.
    Skipped,
}

impl NodeValue<'_> {
    /// The text a grammar or a `match` sees.
    pub fn display(&self) -> String {
        match self {
            NodeValue::Picks { items, .. } => {
                items.iter().map(|i| i.name.value.as_str()).collect::<Vec<_>>().join(", ")
            }
            NodeValue::Text(t) => t.clone(),
            NodeValue::Json(v) => v.to_string(),
            NodeValue::Skipped => String::new(),
        }
    }

    /// As recorded in the dataset: entry names, text or JSON.
    pub fn to_json(&self) -> Value {
        match self {
            NodeValue::Picks { items, multi: false } => {
                items.first().map(|i| json!(i.name.value)).unwrap_or(Value::Null)
            }
            NodeValue::Picks { items, multi: true } => {
                json!(items.iter().map(|i| i.name.value.clone()).collect::<Vec<_>>())
            }
            NodeValue::Text(t) => json!(t),
            NodeValue::Json(v) => v.clone(),
            NodeValue::Skipped => Value::Null,
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            NodeValue::Picks { items, .. } => items.iter().map(|i| i.name.value.as_str()).collect(),
            NodeValue::Text(t) => vec![t.as_str()],
            _ => Vec::new(),
        }
    }

    fn to_template(&self) -> JValue {
        match self {
            NodeValue::Picks { items, multi: false } => items.first().map(entry).unwrap_or_else(|| JValue::from("")),
            NodeValue::Picks { items, multi: true } => JValue::from(items.iter().map(entry).collect::<Vec<_>>()),
            NodeValue::Text(t) => JValue::from(t.as_str()),
            NodeValue::Json(v) => JValue::from(minijinja::value::Serde(v.clone())),
            NodeValue::Skipped => JValue::from(""),
        }
    }
}

/// A lore entry in a template: prints as its name; `.name`, `.weight` and its attributes
/// (`{{ sender_country.capital }}`) are readable.
#[derive(Debug)]
struct Entry {
    name: String,
    weight: f64,
    attrs: BTreeMap<String, AttrValue>,
}

fn entry(item: &&LoreItem) -> JValue {
    JValue::from_object(Entry { name: item.name.value.clone(), weight: item.weight, attrs: item.attrs.clone() })
}

impl Object for Entry {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match key.as_str()? {
            "name" => Some(JValue::from(self.name.as_str())),
            "weight" => Some(JValue::from(self.weight)),
            k => self.attrs.get(k).map(|a| match a {
                AttrValue::Bool(b) => JValue::from(*b),
                AttrValue::Int(i) => JValue::from(*i),
                AttrValue::Float(f) => JValue::from(*f),
                AttrValue::String(s) => JValue::from(s.as_str()),
            }),
        }
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The values of one sample, by node name.
pub type Values<'m> = HashMap<String, NodeValue<'m>>;

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("node `{node}`: {message}")]
    Node { node: String, message: String },
}

fn node_err(node: &str, message: impl Into<String>) -> SampleError {
    SampleError::Node { node: node.to_string(), message: message.into() }
}

pub struct Sampler<'m> {
    manifest: &'m Manifest,
    pub recipe: &'m Recipe,
    /// Nodes in dependency order.
    order: Vec<&'m RecipeNode>,
    /// The nodes each node reads, by name.
    deps: HashMap<String, Vec<String>>,
    seed: u64,
    env: minijinja::Environment<'m>,
}

/// Template names in the environment.
pub fn node_template(node: &str) -> String {
    format!("node:{node}")
}
pub fn generate_prompt(node: &str) -> String {
    format!("generate:{node}:prompt")
}
pub fn generate_system(node: &str) -> String {
    format!("generate:{node}:system")
}

impl<'m> Sampler<'m> {
    pub fn new(manifest: &'m Manifest, recipe: &'m Recipe, seed: u64) -> Result<Sampler<'m>, String> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let mut add = |name: String, src: &'m str| {
            env.add_template_owned(name.clone(), src).map_err(|e| format!("template `{name}`: {e}"))
        };
        for node in &recipe.nodes {
            match &node.kind {
                NodeKind::Template { template } => add(node_template(&node.name), &template.value)?,
                NodeKind::Generate(g) => {
                    add(generate_prompt(&node.name), &g.prompt.value)?;
                    if let Some(s) = &g.system {
                        add(generate_system(&node.name), &s.value)?;
                    }
                }
                _ => {}
            }
        }
        for (name, t) in [("input", &recipe.input), ("prompt", &recipe.prompt), ("system", &recipe.system)] {
            if let Some(t) = t {
                add(name.to_string(), &t.value)?;
            }
        }
        let order = dependency_order(recipe);
        let deps = recipe.nodes.iter().map(|n| (n.name.value.clone(), dependencies(recipe, n))).collect();
        Ok(Sampler { manifest, recipe, order, deps, seed, env })
    }

    pub fn order(&self) -> &[&'m RecipeNode] {
        &self.order
    }

    /// The nodes `node` reads (its edges in the recipe's DAG).
    pub fn dependencies(&self, node: &str) -> &[String] {
        self.deps.get(node).map(Vec::as_slice).unwrap_or_default()
    }

    /// The nodes the recipe's template `name` (`prompt`, `system`, `input`) reads.
    pub fn template_dependencies(&self, name: &str) -> Vec<String> {
        let src = match name {
            "prompt" => self.recipe.prompt.as_ref(),
            "system" => self.recipe.system.as_ref(),
            "input" => self.recipe.input.as_ref(),
            _ => None,
        };
        src.map(|t| template_vars(self.recipe, &t.value, false)).unwrap_or_default()
    }

    /// The template context for `values`.
    pub fn context(&self, index: u64, values: &Values<'m>) -> JValue {
        let mut map: BTreeMap<String, JValue> = values.iter().map(|(k, v)| (k.clone(), v.to_template())).collect();
        map.insert("sample_index".into(), JValue::from(index));
        JValue::from(map)
    }

    pub fn render(&self, template: &str, index: u64, values: &Values<'m>) -> Result<String, SampleError> {
        let t = self.env.get_template(template).map_err(|e| node_err(template, e.to_string()))?;
        t.render(self.context(index, values)).map_err(|e| node_err(template, format!("template failed: {e}")))
    }

    pub fn has_template(&self, name: &str) -> bool {
        self.env.get_template(name).is_ok()
    }

    /// Evaluates a node that needs no teacher.
    pub fn evaluate(
        &self,
        node: &'m RecipeNode,
        index: u64,
        values: &Values<'m>,
    ) -> Result<NodeValue<'m>, SampleError> {
        match &node.kind {
            NodeKind::Choice(c) => self.choose(node, c, index, values),
            NodeKind::Template { .. } => Ok(NodeValue::Text(self.render(&node_template(&node.name), index, values)?)),
            NodeKind::Grammar(g) => {
                let mut rng = SplitMix64::from_parts(&[
                    &self.seed.to_le_bytes(),
                    &index.to_le_bytes(),
                    node.name.as_bytes(),
                    b"grammar",
                ]);
                self.expand(&node.name, g, values, &mut rng).map(NodeValue::Text)
            }
            NodeKind::Generate(_) => Err(node_err(&node.name, "generate nodes are answered by a teacher")),
        }
    }

    /// Expands a grammar node with upstream values available as `#node#`.
    pub fn expand(
        &self,
        name: &str,
        g: &forge_manifest::GrammarNode,
        values: &Values<'m>,
        rng: &mut SplitMix64,
    ) -> Result<String, SampleError> {
        let grammar = Grammar { rules: &g.rules };
        let value = |n: &str| values.get(n).map(|v| v.display());
        grammar.expand(&g.start, &value, rng).map_err(|e| node_err(name, e.to_string()))
    }

    /// The entries a choice may draw from, after `from`, `match` and `distinct-from`.
    fn candidates(&self, node: &str, c: &ChoiceNode, values: &Values<'m>) -> Result<Vec<&'m LoreItem>, SampleError> {
        let base: Vec<&'m LoreItem> = match c.from.value.split_once('.') {
            None => {
                let list = self
                    .manifest
                    .lists
                    .get(&c.from.value)
                    .ok_or_else(|| node_err(node, format!("no list `{}`", c.from.value)))?;
                list.items.iter().collect()
            }
            Some((up, sub)) => match values.get(up) {
                Some(NodeValue::Picks { items, .. }) => {
                    items.iter().filter_map(|i| i.lists.get(sub)).flat_map(|l| l.items.iter()).collect()
                }
                _ => Vec::new(),
            },
        };
        let excluded: Vec<&str> =
            c.distinct_from.iter().filter_map(|d| values.get(&d.value)).flat_map(|v| v.names()).collect();
        Ok(base
            .into_iter()
            .filter(|item| !excluded.contains(&item.name.value.as_str()))
            .filter(|item| {
                c.matching.iter().all(|m| {
                    let wanted = values.get(&m.node.value).map(|v| v.names()).unwrap_or_default();
                    match item.attrs.get(&m.attr) {
                        Some(AttrValue::String(s)) => wanted.contains(&s.as_str()),
                        Some(other) => wanted.contains(&attr_text(other).as_str()),
                        None => false,
                    }
                })
            })
            .collect())
    }

    fn choose(
        &self,
        node: &'m RecipeNode,
        c: &ChoiceNode,
        index: u64,
        values: &Values<'m>,
    ) -> Result<NodeValue<'m>, SampleError> {
        let multi = c.max > 1;
        if let Some(when) = &c.when {
            let expr = self.env.compile_expression(&when.value).map_err(|e| node_err(&node.name, e.to_string()))?;
            let v = expr
                .eval(self.context(index, values))
                .map_err(|e| node_err(&node.name, format!("`when` failed: {e}")))?;
            if !v.is_true() {
                return Ok(NodeValue::Skipped);
            }
        }
        let candidates = self.candidates(&node.name, c, values)?;
        let seed = self.seed.to_le_bytes();
        let idx = index.to_le_bytes();
        let k = if c.min == c.max {
            c.min as usize
        } else {
            let mut rng = SplitMix64::from_parts(&[&seed, &idx, node.name.as_bytes(), b"count"]);
            c.min as usize + rng.below((c.max - c.min + 1) as usize)
        };
        if candidates.len() < k.max(c.min as usize) {
            return Err(node_err(
                &node.name,
                format!(
                    "needs {} entries from `{}` but only {} are left to pick",
                    k.max(c.min as usize),
                    c.from.value,
                    candidates.len()
                ),
            ));
        }
        if c.balance {
            return Ok(NodeValue::Picks { items: dealt(candidates, k, &seed, index, &node.name), multi });
        }
        let mut scored: Vec<(f64, &'m LoreItem)> = candidates
            .into_iter()
            .map(|item| {
                let u = unit(&[&seed, &idx, node.name.as_bytes(), item.name.as_bytes()]);
                (-u.ln() / item.weight, item)
            })
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.name.value.cmp(&b.1.name.value)));
        Ok(NodeValue::Picks { items: scored.into_iter().take(k).map(|(_, i)| i).collect(), multi })
    }
}

/// Balanced picks: the entries are dealt like cards. Sample `i` takes the `k` picks at positions
/// `i*k .. i*k+k` of an endless stream in which every `n` consecutive positions (a "deck") are a
/// fresh permutation of the `n` candidates, shuffled by hashing (seed, node, deck, entry). So
/// every deck uses each entry exactly once and counts never differ by more than one deck's
/// worth, while which sample gets which entry stays pseudo-random. A pick that repeats one
/// already taken by this sample (possible across a deck boundary) is skipped.
fn dealt<'m>(mut candidates: Vec<&'m LoreItem>, k: usize, seed: &[u8], index: u64, node: &str) -> Vec<&'m LoreItem> {
    let n = candidates.len() as u64;
    candidates.sort_by(|a, b| a.name.value.cmp(&b.name.value));
    let deck = |d: u64| {
        let mut order: Vec<(u64, &'m LoreItem)> = candidates
            .iter()
            .map(|item| (hash64(&[seed, &d.to_le_bytes(), node.as_bytes(), item.name.as_bytes()]), *item))
            .collect();
        order.sort_by_key(|(h, _)| *h);
        order.into_iter().map(|(_, i)| i).collect::<Vec<_>>()
    };
    let mut picks: Vec<&'m LoreItem> = Vec::with_capacity(k);
    let mut pos = index * k as u64;
    let mut current: Option<(u64, Vec<&'m LoreItem>)> = None;
    while picks.len() < k {
        let d = pos / n;
        if current.as_ref().is_none_or(|(cd, _)| *cd != d) {
            current = Some((d, deck(d)));
        }
        let item = current.as_ref().expect("dealt above").1[(pos % n) as usize];
        if !picks.iter().any(|p| std::ptr::eq(*p, item)) {
            picks.push(item);
        }
        pos += 1;
    }
    picks
}

fn attr_text(a: &AttrValue) -> String {
    match a {
        AttrValue::Bool(b) => b.to_string(),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::Float(f) => f.to_string(),
        AttrValue::String(s) => s.clone(),
    }
}

/// Names a node reads: the recipe DAG's edges (as validated by forge-manifest).
fn dependencies(recipe: &Recipe, node: &RecipeNode) -> Vec<String> {
    let mut deps = Vec::new();
    let names: Vec<&str> = recipe.nodes.iter().map(|n| n.name.value.as_str()).collect();
    let mut template_vars = |src: &str, expr: bool| deps.extend(template_vars(recipe, src, expr));
    match &node.kind {
        NodeKind::Choice(c) => {
            if let Some((up, _)) = c.from.value.split_once('.') {
                template_vars(up, true);
            }
            if let Some(w) = &c.when {
                template_vars(&w.value, true);
            }
            deps.extend(c.distinct_from.iter().map(|d| d.value.clone()));
            deps.extend(c.matching.iter().map(|m| m.node.value.clone()));
        }
        NodeKind::Template { template } => template_vars(&template.value, false),
        NodeKind::Generate(g) => {
            template_vars(&g.prompt.value, false);
            if let Some(s) = &g.system {
                template_vars(&s.value, false);
            }
            if let Some(gr) = &g.grammar {
                deps.push(gr.value.clone());
            }
        }
        NodeKind::Grammar(g) => {
            for alt in g.rules.values().flatten() {
                for sym in alt.split('#').skip(1).step_by(2) {
                    let sym = sym.split('.').next().unwrap_or("");
                    if !g.rules.contains_key(sym) && names.contains(&sym) {
                        deps.push(sym.to_string());
                    }
                }
            }
        }
    }
    deps.retain(|d| d != &node.name.value);
    deps
}

/// The recipe's nodes that the template (or, with `expr`, the expression) `src` reads.
fn template_vars(recipe: &Recipe, src: &str, expr: bool) -> Vec<String> {
    let env = minijinja::Environment::new();
    let vars = if expr {
        env.compile_expression(src).map(|e| e.undeclared_variables(false)).unwrap_or_default()
    } else {
        env.template_from_str(src).map(|t| t.undeclared_variables(false)).unwrap_or_default()
    };
    let mut vars: Vec<String> = vars.into_iter().filter(|v| recipe.nodes.iter().any(|n| n.name.value == *v)).collect();
    vars.sort();
    vars
}

/// Nodes in an order where each comes after what it reads; ties keep declaration order.
fn dependency_order(recipe: &Recipe) -> Vec<&RecipeNode> {
    let deps: Vec<Vec<String>> = recipe.nodes.iter().map(|n| dependencies(recipe, n)).collect();
    let mut done: Vec<bool> = vec![false; recipe.nodes.len()];
    let mut order = Vec::with_capacity(recipe.nodes.len());
    while order.len() < recipe.nodes.len() {
        let before = order.len();
        for (i, n) in recipe.nodes.iter().enumerate() {
            if done[i] {
                continue;
            }
            let ready =
                deps[i].iter().all(|d| recipe.nodes.iter().position(|o| o.name.value == *d).is_none_or(|j| done[j]));
            if ready {
                done[i] = true;
                order.push(n);
                break;
            }
        }
        assert!(order.len() > before, "validated recipes are acyclic");
    }
    order
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use forge_manifest::{LoreItem, Spanned};

    use super::dealt;

    fn names(picks: Vec<&LoreItem>) -> Vec<String> {
        picks.into_iter().map(|i| i.name.value.clone()).collect()
    }

    fn items(names: &[&str]) -> Vec<LoreItem> {
        names
            .iter()
            .map(|n| LoreItem {
                name: Spanned::new(n.to_string(), Default::default()),
                weight: 1.0,
                attrs: BTreeMap::new(),
                lists: BTreeMap::new(),
            })
            .collect()
    }

    #[test]
    fn balanced_picks_use_every_entry_once_per_deck() {
        let entries = items(&["a", "b", "c", "d", "e"]);
        let refs: Vec<&LoreItem> = entries.iter().collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut picks = Vec::new();
        for i in 0..50 {
            let p = dealt(refs.clone(), 1, b"seed", i, "category");
            assert_eq!(names(p.clone()), names(dealt(refs.clone(), 1, b"seed", i, "category")), "deterministic");
            *counts.entry(p[0].name.value.as_str()).or_default() += 1;
            picks.push(p[0].name.value.clone());
        }
        assert!(counts.values().all(|c| *c == 10), "{counts:?}");
        for deck in picks.chunks(5) {
            let distinct: std::collections::BTreeSet<&String> = deck.iter().collect();
            assert_eq!(distinct.len(), 5, "each deck is a permutation: {deck:?}");
        }
        // Decks are shuffled differently, and the input order does not matter.
        assert!(picks.chunks(5).collect::<std::collections::BTreeSet<_>>().len() > 1);
        let reversed: Vec<&LoreItem> = refs.iter().rev().copied().collect();
        assert_eq!(
            names(dealt(reversed, 1, b"seed", 7, "category")),
            names(dealt(refs.clone(), 1, b"seed", 7, "category"))
        );

        // Two picks per sample are always distinct, and still balanced overall.
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..25 {
            let p = dealt(refs.clone(), 2, b"seed", i, "lore");
            assert_ne!(p[0].name.value, p[1].name.value);
            for x in p {
                *counts.entry(x.name.value.as_str()).or_default() += 1;
            }
        }
        assert!(counts.values().all(|c| (8..=12).contains(c)), "{counts:?}");
    }
}
