//! Lore lists: `list "NAME" { item "ENTRY" weight=2 key="value" { list "SUB" { ... } } }`.

use std::collections::BTreeMap;
use std::collections::hash_map::{Entry, HashMap};

use kdl::{KdlNode, KdlValue};

use crate::decode::{Cx, NodeReader, unknown_node};
use crate::diagnostic::{Code, Diagnostic};
use crate::model::{AttrValue, LoreItem, LoreList};
use crate::parse::{check_name, duplicate};
use crate::source::{Span, Spanned};

pub(crate) fn list(cx: &mut Cx<'_>, node: &KdlNode) -> Option<LoreList> {
    let mut r = NodeReader::new(cx, node, "list \"NAME\" { item \"ENTRY\"; items \"A\" \"B\" }");
    let name = r.arg_str(cx, 0, "a name");
    r.finish(cx);
    let mut items: Vec<LoreItem> = Vec::new();
    // Entry names seen so far: a list of a million entries is checked in linear time.
    let mut seen: HashMap<String, Span> = HashMap::new();
    for child in r.child_nodes() {
        match child.name().value() {
            "item" => {
                if let Some(item) = self::item(cx, child) {
                    push_item(cx, &mut items, &mut seen, item);
                }
            }
            "items" => {
                let mut c = NodeReader::new(cx, child, "items \"A\" \"B\" \"C\"");
                let names = c.rest_str(cx, 0, 1, "entry names");
                c.no_children(cx);
                c.finish(cx);
                for name in names {
                    let item = LoreItem { name, weight: 1.0, attrs: BTreeMap::new(), lists: BTreeMap::new() };
                    push_item(cx, &mut items, &mut seen, item);
                }
            }
            _ => unknown_node(cx, child, "a `list`", &["item", "items"]),
        }
    }
    let name = name?;
    check_name(cx, "list", &name).then_some(())?;
    if items.is_empty() {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                name.span,
                format!("list `{}` has no entries", name.value),
                "empty list",
            )
            .with_help("add entries with `item \"NAME\"` or `items \"A\" \"B\"`"),
        );
        return None;
    }
    Some(LoreList { name, items })
}

fn push_item(cx: &mut Cx<'_>, items: &mut Vec<LoreItem>, seen: &mut HashMap<String, Span>, item: LoreItem) {
    match seen.entry(item.name.value.clone()) {
        Entry::Occupied(first) => cx.push(duplicate("entry", &item.name, *first.get())),
        Entry::Vacant(slot) => {
            slot.insert(item.name.span);
            items.push(item);
        }
    }
}

fn item(cx: &mut Cx<'_>, node: &KdlNode) -> Option<LoreItem> {
    let mut r = NodeReader::new(cx, node, "item \"NAME\" weight=1 attribute=\"value\" { list \"SUB\" { ... } }");
    let name = r.arg_str(cx, 0, "a name");
    let weight = r.float_in(cx, "weight", 0.0, f64::INFINITY).map(|w| w.value).unwrap_or(1.0);
    if weight == 0.0 {
        let span = name.as_ref().map(|n| n.span).unwrap_or_default();
        cx.push(
            Diagnostic::new(Code::InvalidValue, span, "an entry with weight 0 can never be picked", "weight 0")
                .with_help("remove the entry instead"),
        );
    }
    r.allow_any_props();
    let mut attrs = BTreeMap::new();
    for (key, value, span) in r.other_props(cx) {
        if crate::suggest::closest(&key, ["weight"]).is_some() {
            cx.push(
                Diagnostic::new(
                    Code::UnknownProperty,
                    span.with_len(key.len()),
                    format!("`{key}` looks like a misspelled `weight`"),
                    "unknown property",
                )
                .with_help("did you mean `weight`? (attribute names this close to `weight` are reserved)"),
            );
            continue;
        }
        let v = match value {
            KdlValue::String(s) => AttrValue::String(s.clone()),
            KdlValue::Integer(i) => match i64::try_from(*i) {
                Ok(i) => AttrValue::Int(i),
                Err(_) => {
                    cx.push(Diagnostic::new(Code::InvalidValue, span, "integer out of range", "too large"));
                    continue;
                }
            },
            KdlValue::Float(f) => AttrValue::Float(*f),
            KdlValue::Bool(b) => AttrValue::Bool(*b),
            KdlValue::Null => {
                cx.push(Diagnostic::new(Code::WrongType, span, "attributes cannot be #null", "#null attribute"));
                continue;
            }
        };
        attrs.insert(key, v);
    }
    r.finish(cx);
    let mut lists: BTreeMap<String, LoreList> = BTreeMap::new();
    for child in r.child_nodes() {
        match child.name().value() {
            "list" => {
                if let Some(sub) = list(cx, child) {
                    if let Some(first) = lists.get(&sub.name.value) {
                        cx.push(duplicate("sub-list", &sub.name, first.name.span));
                    } else {
                        lists.insert(sub.name.value.clone(), sub);
                    }
                }
            }
            _ => unknown_node(cx, child, "an `item`", &["list"]),
        }
    }
    let name: Spanned<String> = name?;
    Some(LoreItem { name, weight, attrs, lists })
}
