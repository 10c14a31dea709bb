//! A strict reader over one KDL node.
//!
//! Each accessor records what it was asked for; [`NodeReader::finish`] then reports whatever
//! the node carries that nobody asked for (unknown properties with a "did you mean", surplus
//! arguments). Accessors never stop at an error: they record a diagnostic and return `None`,
//! so one pass over a file reports all of its problems.

use kdl::{KdlEntry, KdlNode, KdlValue};

use crate::diagnostic::{Code, Diagnostic};
use crate::source::{FileId, Span, Spanned};
use crate::suggest;

/// Where diagnostics go while reading one file.
pub(crate) struct Cx<'a> {
    pub file: FileId,
    pub diags: &'a mut Vec<Diagnostic>,
}

impl Cx<'_> {
    pub fn span(&self, s: miette::SourceSpan) -> Span {
        Span::new(self.file, s)
    }

    pub fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }
}

pub(crate) struct NodeReader<'n> {
    node: &'n KdlNode,
    usage: &'static str,
    args: Vec<&'n KdlEntry>,
    props: Vec<&'n KdlEntry>,
    known_props: Vec<&'static str>,
    args_taken: usize,
    any_props: bool,
}

fn type_name(v: &KdlValue) -> &'static str {
    match v {
        KdlValue::String(_) => "a string",
        KdlValue::Integer(_) => "an integer",
        KdlValue::Float(_) => "a number",
        KdlValue::Bool(_) => "a boolean",
        KdlValue::Null => "#null",
    }
}

impl<'n> NodeReader<'n> {
    /// `usage` is shown as help when an argument is missing, e.g. `teacher "NAME" kind="grammar"`.
    pub fn new(cx: &mut Cx<'_>, node: &'n KdlNode, usage: &'static str) -> Self {
        let mut args = Vec::new();
        let mut props: Vec<&KdlEntry> = Vec::new();
        let mut seen: std::collections::HashMap<&str, &KdlEntry> = std::collections::HashMap::new();
        for entry in node.entries() {
            match entry.name() {
                None => args.push(entry),
                Some(name) => {
                    if let Some(&first) = seen.get(name.value()) {
                        cx.push(
                            Diagnostic::new(
                                Code::DuplicateProperty,
                                cx.span(entry.span()),
                                format!("property `{}` is given twice", name.value()),
                                "given again here",
                            )
                            .with_note(cx.span(first.span()), "first given here")
                            .with_help("remove one of them"),
                        );
                        continue;
                    }
                    seen.insert(name.value(), entry);
                    props.push(entry);
                }
            }
        }
        NodeReader { node, usage, args, props, known_props: Vec::new(), args_taken: 0, any_props: false }
    }

    pub fn name(&self) -> &'n str {
        self.node.name().value()
    }

    pub fn name_span(&self, cx: &Cx<'_>) -> Span {
        cx.span(self.node.name().span())
    }

    pub fn child_nodes(&self) -> &'n [KdlNode] {
        self.node.children().map(|c| c.nodes()).unwrap_or(&[])
    }

    /// Properties beyond those asked for are kept as data (lore item attributes).
    pub fn allow_any_props(&mut self) {
        self.any_props = true;
    }

    // ---- arguments ----------------------------------------------------------------------

    fn missing_arg(&self, cx: &mut Cx<'_>, what: &str) {
        let d = Diagnostic::new(
            Code::MissingArgument,
            self.name_span(cx),
            format!("`{}` needs {what}", self.name()),
            format!("{what} missing"),
        )
        .with_help(format!("write it as: {}", self.usage));
        cx.push(d);
    }

    fn take_arg(&mut self, i: usize) -> Option<&'n KdlEntry> {
        self.args_taken = self.args_taken.max(i + 1);
        self.args.get(i).copied()
    }

    /// Required string argument `i`.
    pub fn arg_str(&mut self, cx: &mut Cx<'_>, i: usize, what: &str) -> Option<Spanned<String>> {
        match self.take_arg(i) {
            None => {
                self.missing_arg(cx, what);
                None
            }
            Some(e) => entry_str(cx, e, what),
        }
    }

    /// All arguments from `from` on, as strings; at least `min` of them.
    pub fn rest_str(&mut self, cx: &mut Cx<'_>, from: usize, min: usize, what: &str) -> Vec<Spanned<String>> {
        self.args_taken = self.args_taken.max(self.args.len());
        if self.args.len() < from + min {
            self.missing_arg(cx, what);
        }
        self.args.iter().skip(from).filter_map(|e| entry_str(cx, e, what)).collect()
    }

    /// Required integer argument `i`.
    pub fn arg_int(&mut self, cx: &mut Cx<'_>, i: usize, what: &str) -> Option<Spanned<i128>> {
        match self.take_arg(i) {
            None => {
                self.missing_arg(cx, what);
                None
            }
            Some(e) => entry_int(cx, e, what),
        }
    }

    /// Required number argument `i`.
    pub fn arg_float(&mut self, cx: &mut Cx<'_>, i: usize, what: &str) -> Option<Spanned<f64>> {
        match self.take_arg(i) {
            None => {
                self.missing_arg(cx, what);
                None
            }
            Some(e) => entry_float(cx, e, what),
        }
    }

    /// Optional boolean argument `i` (`json` alone means `json #true`).
    pub fn opt_arg_bool(&mut self, cx: &mut Cx<'_>, i: usize) -> Option<Spanned<bool>> {
        let e = self.take_arg(i)?;
        match e.value() {
            KdlValue::Bool(b) => Some(Spanned::new(*b, cx.span(e.span()))),
            other => {
                wrong_type(cx, e, "#true or #false", other);
                None
            }
        }
    }

    // ---- properties ---------------------------------------------------------------------

    fn prop(&mut self, key: &'static str) -> Option<&'n KdlEntry> {
        if !self.known_props.contains(&key) {
            self.known_props.push(key);
        }
        self.props.iter().copied().find(|p| p.name().map(|n| n.value()) == Some(key))
    }

    /// Marks properties as accepted without reading them (their reader runs elsewhere).
    pub fn has_prop(&mut self, key: &'static str) -> bool {
        self.prop(key).is_some()
    }

    fn missing_prop(&self, cx: &mut Cx<'_>, key: &str) {
        let d = Diagnostic::new(
            Code::MissingProperty,
            self.name_span(cx),
            format!("`{}` needs the property `{key}`", self.name()),
            format!("`{key}=...` missing"),
        )
        .with_help(format!("write it as: {}", self.usage));
        cx.push(d);
    }

    pub fn str(&mut self, cx: &mut Cx<'_>, key: &'static str) -> Option<Spanned<String>> {
        self.prop(key).and_then(|e| entry_str(cx, e, "a string"))
    }

    pub fn req_str(&mut self, cx: &mut Cx<'_>, key: &'static str) -> Option<Spanned<String>> {
        let v = self.str(cx, key);
        if v.is_none() && self.prop(key).is_none() {
            self.missing_prop(cx, key);
        }
        v
    }

    pub fn int(&mut self, cx: &mut Cx<'_>, key: &'static str) -> Option<Spanned<i128>> {
        self.prop(key).and_then(|e| entry_int(cx, e, "an integer"))
    }

    /// An integer property within `min..=max`.
    pub fn int_in(&mut self, cx: &mut Cx<'_>, key: &'static str, min: i128, max: i128) -> Option<Spanned<i128>> {
        let v = self.int(cx, key)?;
        if v.value < min || v.value > max {
            let range = if max == i128::MAX { format!("at least {min}") } else { format!("between {min} and {max}") };
            cx.push(Diagnostic::new(
                Code::InvalidValue,
                v.span,
                format!("`{key}` must be {range}, not {}", v.value),
                format!("must be {range}"),
            ));
            return None;
        }
        Some(v)
    }

    /// A required integer property within `min..=max`.
    pub fn req_int_in(&mut self, cx: &mut Cx<'_>, key: &'static str, min: i128, max: i128) -> Option<Spanned<i128>> {
        if self.prop(key).is_none() {
            self.missing_prop(cx, key);
            return None;
        }
        self.int_in(cx, key, min, max)
    }

    pub fn float(&mut self, cx: &mut Cx<'_>, key: &'static str) -> Option<Spanned<f64>> {
        self.prop(key).and_then(|e| entry_float(cx, e, "a number"))
    }

    /// A number property within `min..=max` (inclusive).
    pub fn float_in(&mut self, cx: &mut Cx<'_>, key: &'static str, min: f64, max: f64) -> Option<Spanned<f64>> {
        let v = self.float(cx, key)?;
        if !(v.value >= min && v.value <= max) {
            let range =
                if max == f64::INFINITY { format!("at least {min}") } else { format!("between {min} and {max}") };
            cx.push(Diagnostic::new(
                Code::InvalidValue,
                v.span,
                format!("`{key}` must be {range}, not {}", v.value),
                format!("must be {range}"),
            ));
            return None;
        }
        Some(v)
    }

    /// A number property in `(0, max]`: a scale or a rate where zero would silently do nothing.
    pub fn float_positive(&mut self, cx: &mut Cx<'_>, key: &'static str, max: f64) -> Option<Spanned<f64>> {
        let v = self.float(cx, key)?;
        if !(v.value > 0.0 && v.value <= max) {
            cx.push(Diagnostic::new(
                Code::InvalidValue,
                v.span,
                format!("`{key}` must be greater than 0 and at most {max}, not {}", v.value),
                format!("must be in (0, {max}]"),
            ));
            return None;
        }
        Some(v)
    }

    pub fn bool(&mut self, cx: &mut Cx<'_>, key: &'static str) -> Option<Spanned<bool>> {
        let e = self.prop(key)?;
        match e.value() {
            KdlValue::Bool(b) => Some(Spanned::new(*b, cx.span(e.span()))),
            other => {
                wrong_type(cx, e, "a boolean (#true or #false)", other);
                None
            }
        }
    }

    /// A string property that must be one of `allowed`.
    pub fn choice(&mut self, cx: &mut Cx<'_>, key: &'static str, allowed: &[&str]) -> Option<Spanned<String>> {
        let v = self.str(cx, key)?;
        if allowed.contains(&v.value.as_str()) {
            return Some(v);
        }
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                v.span,
                format!("`{key}` cannot be `{}`", v.value),
                format!("not a valid `{key}`"),
            )
            .with_optional_help(suggest::help(&v.value, key, allowed.iter().copied())),
        );
        None
    }

    /// Properties not asked for, as (name, value) pairs with spans: lore item attributes.
    pub fn other_props(&self, cx: &Cx<'_>) -> Vec<(String, &'n KdlValue, Span)> {
        self.props
            .iter()
            .filter_map(|p| {
                let name = p.name()?.value();
                (!self.known_props.contains(&name)).then(|| (name.to_string(), p.value(), cx.span(p.span())))
            })
            .collect()
    }

    // ---- children -----------------------------------------------------------------------

    /// Reports a children block on a node that takes none.
    pub fn no_children(&self, cx: &mut Cx<'_>) {
        if let Some(children) = self.node.children() {
            cx.push(Diagnostic::new(
                Code::UnexpectedChildren,
                cx.span(children.span()),
                format!("`{}` takes no children block", self.name()),
                "unexpected block",
            ));
        }
    }

    /// Reports what the node carries that no accessor consumed.
    pub fn finish(&self, cx: &mut Cx<'_>) {
        if let Some(extra) = self.args.get(self.args_taken) {
            let n = self.args.len() - self.args_taken;
            cx.push(
                Diagnostic::new(
                    Code::UnexpectedArgument,
                    cx.span(extra.span()),
                    format!(
                        "`{}` takes {} argument{}, this one has {n} more",
                        self.name(),
                        self.args_taken,
                        if self.args_taken == 1 { "" } else { "s" }
                    ),
                    "unexpected argument",
                )
                .with_help(format!("write it as: {}", self.usage)),
            );
        }
        if self.any_props {
            return;
        }
        for p in &self.props {
            let Some(name) = p.name() else { continue };
            if self.known_props.contains(&name.value()) {
                continue;
            }
            let help = suggest::help(name.value(), "property", self.known_props.iter().copied());
            cx.push(
                Diagnostic::new(
                    Code::UnknownProperty,
                    cx.span(name.span()),
                    format!("`{}` has no property `{}`", self.name(), name.value()),
                    "unknown property",
                )
                .with_optional_help(help),
            );
        }
    }
}

fn wrong_type(cx: &mut Cx<'_>, e: &KdlEntry, expected: &str, got: &KdlValue) {
    cx.push(Diagnostic::new(
        Code::WrongType,
        cx.span(e.span()),
        format!("expected {expected}, found {}", type_name(got)),
        format!("expected {expected}"),
    ));
}

pub(crate) fn entry_str(cx: &mut Cx<'_>, e: &KdlEntry, what: &str) -> Option<Spanned<String>> {
    match e.value() {
        KdlValue::String(s) => Some(Spanned::new(s.clone(), cx.span(e.span()))),
        other => {
            let expected = if what == "a string" { what.to_string() } else { format!("{what} (a string)") };
            wrong_type(cx, e, &expected, other);
            None
        }
    }
}

fn entry_int(cx: &mut Cx<'_>, e: &KdlEntry, what: &str) -> Option<Spanned<i128>> {
    match e.value() {
        KdlValue::Integer(i) => Some(Spanned::new(*i, cx.span(e.span()))),
        other => {
            wrong_type(cx, e, what, other);
            None
        }
    }
}

fn entry_float(cx: &mut Cx<'_>, e: &KdlEntry, what: &str) -> Option<Spanned<f64>> {
    match e.value() {
        KdlValue::Float(f) => Some(Spanned::new(*f, cx.span(e.span()))),
        KdlValue::Integer(i) => Some(Spanned::new(*i as f64, cx.span(e.span()))),
        other => {
            wrong_type(cx, e, what, other);
            None
        }
    }
}

/// Reports a node that is not valid where it stands, with a suggestion from `valid`.
pub(crate) fn unknown_node(cx: &mut Cx<'_>, node: &KdlNode, place: &str, valid: &[&str]) {
    let name = node.name().value();
    cx.push(
        Diagnostic::new(
            Code::UnknownNode,
            cx.span(node.name().span()),
            format!("unknown node `{name}` in {place}"),
            "unknown node",
        )
        .with_optional_help(suggest::help(name, "node", valid.iter().copied())),
    );
}
