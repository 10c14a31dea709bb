//! Manifest diagnostics: stable codes, exact spans, actionable help.
//!
//! Loading collects every problem it finds into a `Vec<Diagnostic>` instead of stopping at the
//! first; [`ManifestErrors`] turns them into miette diagnostics (one per problem, `#[related]`
//! under a summary) that carry the source of the file each one points into.

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, NamedSource, Severity};
use serde::Serialize;

use crate::source::{SourceMap, Span};

/// The stable code of a manifest diagnostic, rendered as `forge::manifest::<name>`.
///
/// Codes are part of forge's interface: scripts and editors match on them. Never rename one;
/// add a new one instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Code {
    /// The KDL itself does not parse.
    Syntax,
    /// A manifest file could not be read.
    Io,
    /// `forge <version>` is missing or names a version this forge does not read.
    Version,
    /// An `include` pattern is malformed or matches no file.
    Include,
    /// A node this position does not accept.
    UnknownNode,
    /// A property this node does not accept.
    UnknownProperty,
    /// A required property is missing.
    MissingProperty,
    /// A required argument is missing.
    MissingArgument,
    /// A required child node is missing (`run` in a `command`).
    MissingNode,
    /// More arguments than the node takes.
    UnexpectedArgument,
    /// A children block on a node that takes none.
    UnexpectedChildren,
    /// The same property given twice on one node.
    DuplicateProperty,
    /// A value of the wrong type (a string where a number belongs, ...).
    WrongType,
    /// A value of the right type outside its allowed range or set.
    InvalidValue,
    /// Two definitions with the same name.
    DuplicateName,
    /// A reference to a teacher, base, list, recipe, node, pool or artifact that does not exist.
    UnknownReference,
    /// A dependency cycle (between recipe nodes or between stages).
    Cycle,
    /// A node that may appear only in the root `forge.kdl`.
    RootOnly,
    /// A path that leaves the workspace or is otherwise unusable.
    InvalidPath,
    /// A file beyond one of forge's bounds (nesting depth, size).
    Limit,
}

impl Code {
    pub const ALL: [Code; 20] = [
        Code::Syntax,
        Code::Io,
        Code::Version,
        Code::Include,
        Code::UnknownNode,
        Code::UnknownProperty,
        Code::MissingProperty,
        Code::MissingArgument,
        Code::MissingNode,
        Code::UnexpectedArgument,
        Code::UnexpectedChildren,
        Code::DuplicateProperty,
        Code::WrongType,
        Code::InvalidValue,
        Code::DuplicateName,
        Code::UnknownReference,
        Code::Cycle,
        Code::RootOnly,
        Code::InvalidPath,
        Code::Limit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "forge::manifest::syntax",
            Code::Io => "forge::manifest::io",
            Code::Version => "forge::manifest::version",
            Code::Include => "forge::manifest::include",
            Code::UnknownNode => "forge::manifest::unknown-node",
            Code::UnknownProperty => "forge::manifest::unknown-property",
            Code::MissingProperty => "forge::manifest::missing-property",
            Code::MissingArgument => "forge::manifest::missing-argument",
            Code::MissingNode => "forge::manifest::missing-node",
            Code::UnexpectedArgument => "forge::manifest::unexpected-argument",
            Code::UnexpectedChildren => "forge::manifest::unexpected-children",
            Code::DuplicateProperty => "forge::manifest::duplicate-property",
            Code::WrongType => "forge::manifest::wrong-type",
            Code::InvalidValue => "forge::manifest::invalid-value",
            Code::DuplicateName => "forge::manifest::duplicate-name",
            Code::UnknownReference => "forge::manifest::unknown-reference",
            Code::Cycle => "forge::manifest::cycle",
            Code::RootOnly => "forge::manifest::root-only",
            Code::InvalidPath => "forge::manifest::invalid-path",
            Code::Limit => "forge::manifest::limit",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secondary location worth showing ("first defined here", "the cycle continues here").
#[derive(Clone, Debug)]
pub struct Note {
    pub span: Span,
    pub label: String,
}

/// One problem in a manifest, before it is attached to its source text.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    pub span: Span,
    pub label: String,
    pub help: Option<String>,
    pub notes: Vec<Note>,
}

impl Diagnostic {
    pub fn new(code: Code, span: Span, message: impl Into<String>, label: impl Into<String>) -> Self {
        Diagnostic { code, message: message.into(), span, label: label.into(), help: None, notes: Vec::new() }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_optional_help(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }

    pub fn with_note(mut self, span: Span, label: impl Into<String>) -> Self {
        self.notes.push(Note { span, label: label.into() });
        self
    }
}

/// One diagnostic bound to the text of the file it points into: what miette renders.
#[derive(Debug)]
pub struct ManifestError {
    diagnostic: Diagnostic,
    file: Option<String>,
    source: Option<NamedSource<Arc<str>>>,
    /// Notes that point into other files than the primary span, rendered as advice.
    related: Vec<ManifestError>,
    severity: Severity,
}

impl ManifestError {
    fn bind(sources: &SourceMap, diagnostic: Diagnostic, severity: Severity) -> Self {
        let file = sources.get(diagnostic.span.file);
        let source = file.map(|f| NamedSource::new(&f.name, f.text.clone()).with_language("kdl"));
        let mut related = Vec::new();
        for note in &diagnostic.notes {
            if note.span.file != diagnostic.span.file && note.span.is_known() {
                let advice = Diagnostic::new(diagnostic.code, note.span, note.label.clone(), note.label.clone());
                related.push(ManifestError::bind(sources, advice, Severity::Advice));
            }
        }
        ManifestError { file: file.map(|f| f.name.clone()), diagnostic, source, related, severity }
    }

    pub fn code(&self) -> Code {
        self.diagnostic.code
    }

    pub fn span(&self) -> Span {
        self.diagnostic.span
    }

    /// Workspace-relative name of the file the primary span points into.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    pub fn message(&self) -> &str {
        &self.diagnostic.message
    }

    pub fn label(&self) -> &str {
        &self.diagnostic.label
    }

    pub fn help_text(&self) -> Option<&str> {
        self.diagnostic.help.as_deref()
    }

    /// The source text under the primary span.
    pub fn snippet(&self) -> &str {
        let Some(source) = &self.source else {
            return "";
        };
        let span = self.diagnostic.span;
        source.inner().get(span.offset as usize..(span.offset + span.len) as usize).unwrap_or("")
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diagnostic.message)
    }
}

impl std::error::Error for ManifestError {}

impl miette::Diagnostic for ManifestError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.diagnostic.code.as_str()))
    }

    fn severity(&self) -> Option<Severity> {
        Some(self.severity)
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.diagnostic.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.source.as_ref()?;
        let d = &self.diagnostic;
        let primary = LabeledSpan::new_primary_with_span(Some(d.label.clone()), d.span.source_span());
        let notes = d
            .notes
            .iter()
            .filter(|n| n.span.file == d.span.file)
            .map(|n| LabeledSpan::new_with_span(Some(n.label.clone()), n.span.source_span()));
        Some(Box::new(std::iter::once(primary).chain(notes)))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            return None;
        }
        Some(Box::new(self.related.iter().map(|r| r as &dyn miette::Diagnostic)))
    }
}

/// Every problem found while loading a manifest; renders as one report listing all of them.
#[derive(Debug)]
pub struct ManifestErrors {
    errors: Vec<ManifestError>,
}

impl ManifestErrors {
    /// Binds diagnostics to their sources, ordered by file and position.
    pub fn new(sources: &SourceMap, mut diagnostics: Vec<Diagnostic>) -> Self {
        diagnostics.sort_by_key(|d| (d.span.file, d.span.offset, d.span.len));
        let errors = diagnostics.into_iter().map(|d| ManifestError::bind(sources, d, Severity::Error)).collect();
        ManifestErrors { errors }
    }

    pub fn errors(&self) -> &[ManifestError] {
        &self.errors
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.len() {
            1 => write!(f, "the manifest has 1 error"),
            n => write!(f, "the manifest has {n} errors"),
        }
    }
}

impl std::error::Error for ManifestErrors {}

impl miette::Diagnostic for ManifestErrors {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new("forge::manifest"))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        Some(Box::new(self.errors.iter().map(|e| e as &dyn miette::Diagnostic)))
    }
}
