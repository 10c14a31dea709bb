//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const EXIT_CODES: &str = "\
Exit status:
  0    success
  1    a build, check or verification failed (an action failed, an artifact is not built,
       the cache has damaged entries)
  2    invalid arguments or an invalid manifest
  3    forge could not do its work (an unreadable cache, an I/O error, a full disk)
  75   busy: another forge process holds this workspace's lock (try again later;
       `forge build` waits for it)
  130  interrupted (Ctrl-C)";

#[derive(Parser, Debug)]
#[command(
    name = "forge",
    version,
    about = "Build small, fast, offline language models for games the way make builds code",
    long_about = None,
    after_help = EXIT_CODES,
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Run as if started in DIR (the workspace is the nearest directory with a forge.kdl).
    #[arg(short = 'C', long = "directory", value_name = "DIR", global = true)]
    pub directory: Option<PathBuf>,
    /// Keep the cache here instead of <workspace>/.forge-cache.
    #[arg(long, value_name = "DIR", env = "FORGE_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Share artifacts through this remote cache (Bazel's HTTP layout: nginx with WebDAV,
    /// bazel-remote), instead of the manifest's `workspace { cache remote=... }`.
    #[arg(long, value_name = "URL", env = "FORGE_REMOTE_CACHE", global = true)]
    pub remote_cache: Option<String>,
    /// Fetch from the remote cache but never upload (untrusted jobs).
    #[arg(long, env = "FORGE_REMOTE_CACHE_READ_ONLY", global = true)]
    pub remote_read_only: bool,
    /// Seconds a remote-cache request may stall before forge builds locally [default: 10].
    #[arg(long, value_name = "SECONDS", env = "FORGE_REMOTE_CACHE_TIMEOUT", global = true)]
    pub remote_timeout: Option<f64>,
    /// Print less.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more (fresh artifacts too).
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build artifacts (all of them by default), rebuilding only what is stale.
    Build(BuildArgs),
    /// Show every artifact as fresh, stale (and why), pending or blocked.
    Status(StatusArgs),
    /// Explain why an artifact is stale, or when it was built.
    Why(WhyArgs),
    /// Print the artifact graph.
    Graph(GraphArgs),
    /// Validate forge.kdl and the files it includes, without building.
    Check(CheckArgs),
    /// Remove built artifacts from the cache (the teacher-call cache is kept unless --all).
    Clean(CleanArgs),
    /// Inspect and maintain the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Query built artifacts (for scripts).
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    /// Look at a built dataset.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate with a trained model: `forge gen defame --input '{"input": "..."}'`.
    Gen(GenArgs),
    /// Show a GGUF file's metadata and tensors, and check it has what llama.cpp needs.
    Inspect(InspectArgs),
    /// Serve the built models over HTTP: OpenAI's chat API, and `/list`, `/chat/NPC`, `/preload/NPC`.
    Serve(ServeArgs),
    /// Write what a game ships: the GGUF files, models.json, Ollama Modelfiles, a llama.cpp server config.
    Export(ExportArgs),
    /// Rebuild what becomes stale as files are saved (training and later stages only if asked).
    Watch(WatchArgs),
    /// Stand in front of an upstream teacher (OpenAI's chat API) and capture every answered
    /// call per call site, for distilling each site into a local model.
    Proxy(ProxyArgs),
    /// Call sites: their captures, promoted versions and live numbers; promotion and rollback.
    #[command(subcommand)]
    Site(SiteCommand),
}

#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// Every site (or those named): captures, versions, the live one, and what the proxy served.
    Status {
        sites: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Grade the site's model against the upstream on held-out captures and promote it if the
    /// site's policy says so (`--force`: whatever it says); `--to vN` makes a version live.
    Promote {
        site: String,
        #[arg(long, value_name = "vN")]
        to: Option<String>,
        #[arg(long, conflicts_with = "to")]
        force: bool,
        /// Ask the upstream each held-out input again (one call each, not captured) instead of
        /// grading the answers it gave when the calls were captured.
        #[arg(long, conflicts_with = "to")]
        ask_upstream: bool,
        /// Do nothing when this candidate was graded already under the same judge, policy and
        /// held-out captures (what `forge proxy --train` runs).
        #[arg(long, conflicts_with = "to")]
        if_new: bool,
    },
    /// Make the version live before the current one (or `--to vN`, or `--to upstream`).
    Rollback {
        site: String,
        #[arg(long, value_name = "vN|upstream")]
        to: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Where to listen (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub addr: String,
    /// The manifest's teacher to forward to (default: its only OpenAI-compatible teacher).
    #[arg(long, value_name = "TEACHER")]
    pub upstream: Option<String>,
    /// Where captures go, one `SITE.jsonl` per call site [default: `captures/` in the workspace].
    #[arg(long, value_name = "DIR")]
    pub store: Option<std::path::PathBuf>,
    /// Distil in the background: at the start and each time `min-new` new captures of a site
    /// have come, rebuild its model (`forge build`) and grade it for promotion
    /// (`forge site promote --if-new`), one site at a time; a promoted version answers at once.
    #[arg(long, conflicts_with = "store")]
    pub train: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Targets, artifacts or stages to keep fresh; all when none.
    pub targets: Vec<String>,
    /// Keep the selected targets fresh up to this stage (e.g. `gguf`), training included.
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Keep every stage fresh, training and benchmarks included.
    #[arg(long, conflicts_with = "until")]
    pub all: bool,
    /// Run at most N actions at once [default: the manifest's `jobs`, else the CPU count].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model targets to export.
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// The directory to write (created; replaced only with --force).
    #[arg(long)]
    pub to: std::path::PathBuf,
    /// Levels to export (default: every level each target quantizes to).
    #[arg(long)]
    pub level: Vec<String>,
    /// Replace DIR if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model targets to serve (default: every target with a GGUF at `--level`).
    pub targets: Vec<String>,
    /// Serve a GGUF file under a name instead (repeatable; no workspace needed), e.g.
    /// `--model guard=exported/models/guard-q4_0.gguf`.
    #[arg(long, value_name = "NAME=FILE")]
    pub model: Vec<String>,
    /// Where to listen (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Which of each target's GGUF files (`TARGET:gguf:LEVEL`; `adapter`: the LoRA adapter on its
    /// base, `TARGET:gguf-adapter`, one base in memory for every NPC trained on it).
    #[arg(long, default_value = "q4_0")]
    pub level: String,
    /// Bytes of models resident at once (least recently used dropped first), e.g. 2GiB, 512MiB.
    #[arg(long, default_value = "2GiB")]
    pub memory: String,
    /// Decoding threads per model (default: the CPU count).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Requests each model answers together (their next tokens in one forward pass).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Requests that may wait per model beyond those, before the server answers 503.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Require `Authorization: Bearer <key>`, the key read from this environment variable.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// The most tokens one answer may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A .gguf file (any: forge's, llama.cpp's, other tools').
    pub file: std::path::PathBuf,
    /// The whole report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print every tensor (by default the first and last few).
    #[arg(long)]
    pub all: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum GenStage {
    /// The merged weights (`TARGET:merged`).
    Merged,
    /// The adapter on its base, unmerged (`TARGET:adapter`).
    Adapter,
}

#[derive(Args, Debug)]
pub struct GenArgs {
    /// The model target, e.g. `defame`.
    pub target: String,
    #[arg(long, value_enum, default_value = "merged")]
    pub stage: GenStage,
    /// Generate with the quantized file `TARGET:gguf:LEVEL` instead (forge's runtime, the file
    /// the benchmark measured), e.g. `--gguf q4_0`.
    #[arg(long, value_name = "LEVEL", conflicts_with = "stage")]
    pub gguf: Option<String>,
    /// The student's input: a file (text, a JSON sample, or JSON lines of samples: one answer
    /// each), `-` for stdin, or the text itself; JSON objects give their `input` field.
    #[arg(long)]
    pub input: String,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// At most this many inputs from a JSON-lines file.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub limit: usize,
    /// One JSON object per answer (input, output, tokens, timings).
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Split {
    Train,
    Eval,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Print samples of a target's dataset.
    Show {
        /// The model target, e.g. `defame`.
        target: String,
        #[arg(long, value_enum, default_value = "train")]
        split: Split,
        /// At most this many samples.
        #[arg(short = 'n', long, default_value_t = 5)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Summarise a target's dataset: sizes, rejections, token usage, lengths, pick distributions.
    Stats {
        target: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Targets (`defame`), artifacts (`defame:gguf:q4_0`) or stages (`defame:gguf`); all when none.
    pub artifacts: Vec<String>,
    /// Build the selected targets only up to this stage (`dataset`, `adapter`, `gguf`, ...).
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Run at most N actions at once [default: the manifest's `jobs`, else the CPU count].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Show what would be built, and why, without building.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Keep building what does not depend on a failed artifact.
    #[arg(short, long)]
    pub keep_going: bool,
    /// Stream events as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// CI mode (also when `CI=true`): no progress bars, and a summary of what each artifact
    /// did and why at the end.
    #[arg(long)]
    pub ci: bool,
    /// Write the summary as JSON to FILE (what was built, fresh, cut off, failed, and why).
    #[arg(long, value_name = "FILE")]
    pub summary: Option<std::path::PathBuf>,
    /// Build only this job's share of the targets, K of N (`2/4`): jobs that share a remote
    /// cache split a workspace between them; a target's shard follows from its name alone.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<crate::ci::Shard>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Limit to these targets, artifacts or stages.
    pub artifacts: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WhyArgs {
    /// The artifact to explain, e.g. `defame:adapter`.
    pub artifact: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Json,
}

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[arg(long, value_enum, default_value = "dot")]
    pub format: GraphFormat,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print diagnostics as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CleanArgs {
    /// Only these targets or artifacts; everything when none.
    pub artifacts: Vec<String>,
    /// Also remove the teacher-call cache (paid-for LLM answers).
    #[arg(long)]
    pub all: bool,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List the action cache.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove unused entries, stale buckets and leftovers of killed builds.
    Gc {
        /// Keep unused entries younger than this many days.
        #[arg(long, value_name = "DAYS", default_value_t = 7.0)]
        max_age: f64,
        #[arg(short = 'n', long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every stored artifact and report damage.
    Verify {
        /// Remove damaged entries so the next build rebuilds them.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ArtifactCommand {
    /// Print the directory holding a built, fresh artifact.
    Path {
        /// e.g. `defame:gguf:q4_0`
        artifact: String,
    },
}
