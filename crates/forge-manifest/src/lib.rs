//! `forge.kdl` → a typed, validated [`Manifest`].
//!
//! [`load`] reads the root manifest and every file it includes, decodes each node strictly
//! (unknown nodes, properties and references are errors), and reports *all* problems as
//! [`ManifestErrors`]: miette diagnostics with a stable `forge::manifest::*` code, a label on
//! the exact span in the right file, and help.

pub mod argv;
pub mod artifact;
mod decode;
pub mod diagnostic;
pub mod glob;
pub mod limits;
mod lore;
pub mod model;
mod parse;
mod recipe;
pub mod source;
mod suggest;
mod target;
mod validate;

pub use artifact::{ArtifactDecl, ArtifactId, Dep, StageKind};
pub use diagnostic::{Code, Diagnostic, ManifestError, ManifestErrors};
pub use model::*;
pub use parse::load;
pub use source::{FileId, SourceMap, Span, Spanned};
pub use suggest::closest;
pub use target::{DEFAULT_LORA_MODULES, LORA_MODULES};
