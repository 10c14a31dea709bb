//! Source files and spans.
//!
//! Every value read from a manifest keeps the [`Span`] it came from, so that later checks
//! (references, cycles) can point at the exact bytes in the right file. Spans are deliberately
//! *not* serialized: a [`Spanned`] value serializes as its inner value, so moving a node inside a
//! file never changes a fingerprint, and a manifest restored from the configuration cache simply
//! carries [`Span::UNKNOWN`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Index of a file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A byte range in one manifest file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub offset: u32,
    pub len: u32,
}

impl Span {
    /// The span of a value restored from a cache rather than parsed from source.
    pub const UNKNOWN: Span = Span { file: FileId(u32::MAX), offset: 0, len: 0 };

    pub fn new(file: FileId, span: miette::SourceSpan) -> Span {
        Span { file, offset: span.offset() as u32, len: span.len() as u32 }
    }

    /// The first `len` bytes of this span.
    pub fn with_len(self, len: usize) -> Span {
        Span { len: (len as u32).min(self.len), ..self }
    }

    pub fn is_known(&self) -> bool {
        self.file.0 != u32::MAX
    }

    pub fn source_span(&self) -> miette::SourceSpan {
        (self.offset as usize, self.len as usize).into()
    }
}

impl Default for Span {
    fn default() -> Self {
        Span::UNKNOWN
    }
}

/// A value together with where it was written.
#[derive(Clone, Debug, Default)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Self {
        Spanned { value, span }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Spanned<U> {
        Spanned { value: f(self.value), span: self.span }
    }
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Spanned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: fmt::Display> fmt::Display for Spanned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: Serialize> Serialize for Spanned<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(|value| Spanned { value, span: Span::UNKNOWN })
    }
}

/// One manifest file: its path relative to the workspace root and its text.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Workspace-relative path with `/` separators, as shown in diagnostics.
    pub name: String,
    /// Absolute path on disk.
    pub path: PathBuf,
    pub text: Arc<str>,
}

/// All manifest files read while loading a workspace, in load order.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn add(&mut self, name: String, path: PathBuf, text: Arc<str>) -> FileId {
        self.files.push(SourceFile { name, path, text });
        FileId(self.files.len() as u32 - 1)
    }

    pub fn get(&self, id: FileId) -> Option<&SourceFile> {
        self.files.get(id.0 as usize)
    }

    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    pub fn contains_path(&self, path: &Path) -> bool {
        self.files.iter().any(|f| f.path == path)
    }

    /// The text a span covers (empty for an unknown span).
    pub fn snippet(&self, span: Span) -> &str {
        self.get(span.file)
            .and_then(|f| f.text.get(span.offset as usize..(span.offset + span.len) as usize))
            .unwrap_or("")
    }
}
