//! The `report` stage: compares the benchmarked levels as DefameLM §4 does and checks the
//! manifest's gates.
//!
//! Per level: success rate ± standard error, per-criterion pass rates, timings and tokens/s,
//! expected attempts and expected / measured time-to-success percentiles. Between every pair
//! of levels: McNemar's test on the paired answers (same prompt, same seed) and Spearman's ρ of
//! per-prompt success probability, over all prompts and over the hardest 40% (prompts whose mean
//! p̂ across levels falls below the 40th percentile of all p̂, pooled).
//!
//! Writes `report.json`, `report.md` and a self-contained `report.html` with SVG plots: ECDFs
//! of expected attempts and of expected time-to-success per level, per-criterion pass rates, the
//! training loss curve, and sample outputs beside their inputs. The latest report is also copied
//! to `.forge-cache/reports-v1/<target>/`, where it stays when a gate fails the build.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use forge_manifest::{ArtifactDecl, Gate, Manifest, StageKind};
use forge_plan::{ActionContext, ActionError, Executor, StagePlan};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bench::{BenchResult, LevelSummary, read_result};
use forge_bench::plot;
use forge_bench::stats::{self, Correlation, McNemar};

/// Bumped when what the report stage writes changes.
pub const REPORT_FORMAT: u32 = 1;

/// The paper's difficulty threshold: the 40th percentile of pooled success rates.
pub const HARDEST_PERCENTILE: f64 = 40.0;

/// How many prompts the report shows outputs for.
const SHOWN_SAMPLES: usize = 6;

pub struct ReportExecutor;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub levels: Vec<LevelEntry>,
    pub pairs: Vec<PairEntry>,
    /// The difficulty threshold and how many prompts fell below it.
    pub hardest_threshold: f64,
    pub hardest_prompts: usize,
    pub gates: Vec<GateResult>,
    /// Graded criteria and those skipped for want of a judge model.
    pub criteria: Vec<String>,
    pub skipped: Vec<String>,
    pub loss: Option<Value>,
    pub samples: Vec<SampleRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LevelEntry {
    pub level: String,
    pub model_bytes: u64,
    pub prompts: usize,
    pub samples: u32,
    pub summary: LevelSummary,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairEntry {
    pub a: String,
    pub b: String,
    pub mcnemar: McNemar,
    pub spearman: Option<Correlation>,
    pub spearman_hardest: Option<Correlation>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateResult {
    pub metric: String,
    pub level: String,
    pub limit: f64,
    #[serde(with = "forge_bench::stats::nonfinite")]
    pub measured: f64,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleRow {
    pub id: String,
    pub input: String,
    pub reference: String,
    /// Per level: the first answer and whether it passed.
    pub outputs: Vec<(String, String, bool)>,
}

impl Executor for ReportExecutor {
    fn kind(&self) -> &'static str {
        "report"
    }

    fn format_version(&self) -> u32 {
        REPORT_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        assert_eq!(decl.kind, StageKind::Report);
        let model = m.target_of(decl).model.as_ref().expect("report belongs to a model");
        let b = model.benchmark.as_ref().expect("planned from a benchmark");
        let mut params = BTreeMap::new();
        params.insert("gates".into(), serde_json::to_value(&b.gates).expect("serializes"));
        let levels: Vec<&str> = model.quantize.iter().flat_map(|q| q.levels.iter().map(|l| l.value.as_str())).collect();
        params.insert("levels".into(), json!(levels));
        StagePlan { params, inputs: Vec::new(), tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let model = ctx.manifest.target_of(ctx.decl).model.as_ref().expect("report belongs to a model");
        let b = model.benchmark.as_ref().expect("planned from a benchmark");
        let order: Vec<String> =
            model.quantize.iter().flat_map(|q| q.levels.iter().map(|l| l.value.as_str().to_string())).collect();
        let mut results = Vec::new();
        let mut loss = None;
        for (id, dir) in ctx.deps {
            match id.stage.as_str() {
                "bench" => results.push(read_result(dir).map_err(ActionError::msg)?),
                "adapter" => {
                    loss =
                        std::fs::read_to_string(dir.join("loss.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
                }
                _ => {}
            }
        }
        results.sort_by_key(|r| order.iter().position(|l| *l == r.level).unwrap_or(usize::MAX));
        let report = build(&ctx.artifact.target, &results, &b.gates, loss);
        let files = render_all(&report);
        for (name, body) in &files {
            let path = ctx.out_dir.join(name);
            std::fs::write(&path, body).map_err(|e| ActionError::io(&path, e))?;
        }
        // The latest report, outside the content store: it survives a gate failing the build.
        let latest = latest_dir(ctx.cache.root(), &ctx.artifact.target);
        std::fs::create_dir_all(&latest).map_err(|e| ActionError::io(&latest, e))?;
        for (name, body) in &files {
            let path = latest.join(name);
            forge_cache::fsutil::write_atomic(&path, body.as_bytes()).map_err(ActionError::from_error)?;
        }
        for l in &report.levels {
            ctx.log.line(&format!(
                "{}: success {:.3} ± {:.3}, expected time-to-success median {}",
                l.level,
                l.summary.success,
                l.summary.success_se,
                secs(l.summary.expected_seconds.median)
            ));
        }
        let missed: Vec<&GateResult> = report.gates.iter().filter(|g| !g.pass).collect();
        if !missed.is_empty() {
            let html = latest.join("report.html");
            let lines: Vec<String> = missed.iter().map(|g| format!("  {}", describe_gate(g))).collect();
            return Err(ActionError::msg(format!(
                "{} gate{} missed:\n{}\nsee the report: {}",
                missed.len(),
                if missed.len() == 1 { "" } else { "s" },
                lines.join("\n"),
                display(&html)
            )));
        }
        Ok(())
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// "gate p95-seconds=3.4 at q4_0: measured 5.12 s".
pub fn describe_gate(g: &GateResult) -> String {
    let (cmp, unit) = gate_direction(&g.metric);
    format!(
        "gate {}={} at {}: measured {}{} (must be {} {}{})",
        g.metric,
        g.limit,
        g.level,
        fmt_num(g.measured),
        unit,
        if cmp { "at least" } else { "at most" },
        g.limit,
        unit
    )
}

/// (higher is better, unit) for a gate metric.
fn gate_direction(metric: &str) -> (bool, &'static str) {
    match metric {
        "success" => (true, ""),
        "tokens-per-second" => (true, " tokens/s"),
        "expected-attempts" => (false, ""),
        _ => (false, " s"),
    }
}

/// The value a gate metric measures on one level.
pub fn gate_value(metric: &str, s: &LevelSummary, ps: &[f64]) -> f64 {
    match metric {
        "success" => s.success,
        "p50-seconds" => s.expected_seconds.median,
        "p95-seconds" => s.expected_seconds.p95,
        "max-seconds" => s.expected_seconds.max,
        // Over every prompt: one a level never solved makes it infinite.
        "expected-attempts" => stats::mean(&ps.iter().map(|p| stats::expected_attempts(*p)).collect::<Vec<_>>()),
        "tokens-per-second" => s.decode_tokens_per_s,
        other => unreachable!("validated gate metric `{other}`"),
    }
}

/// Everything the report says, computed from the levels' results.
pub fn build(target: &str, results: &[BenchResult], gates: &[Gate], loss: Option<Value>) -> Report {
    // Prompts every level benchmarked, in order (the same eval prompts unless settings differ).
    let common: Vec<String> = results
        .first()
        .map(|r| {
            r.prompts
                .iter()
                .map(|p| p.id.clone())
                .filter(|id| results.iter().all(|o| o.prompts.iter().any(|q| &q.id == id)))
                .collect()
        })
        .unwrap_or_default();
    let p_of = |r: &BenchResult| -> Vec<f64> {
        common.iter().map(|id| r.prompts.iter().find(|p| &p.id == id).map(|p| p.p).unwrap_or(f64::NAN)).collect()
    };
    let outcomes_of = |r: &BenchResult| -> Vec<bool> {
        common
            .iter()
            .flat_map(|id| {
                r.prompts.iter().find(|p| &p.id == id).map(|p| p.samples.iter().map(|s| s.pass).collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    };
    let ps: Vec<Vec<f64>> = results.iter().map(p_of).collect();
    let hard = stats::hardest(&ps, HARDEST_PERCENTILE);
    let mut pairs = Vec::new();
    for i in 0..results.len() {
        for j in i + 1..results.len() {
            let (a, b) = (&results[i], &results[j]);
            let (oa, ob) = (outcomes_of(a), outcomes_of(b));
            let n = oa.len().min(ob.len());
            let pick = |v: &[f64]| hard.prompts.iter().map(|k| v[*k]).collect::<Vec<f64>>();
            pairs.push(PairEntry {
                a: a.level.clone(),
                b: b.level.clone(),
                mcnemar: stats::mcnemar(&oa[..n], &ob[..n]),
                spearman: stats::spearman(&ps[i], &ps[j]),
                spearman_hardest: stats::spearman(&pick(&ps[i]), &pick(&ps[j])),
            });
        }
    }
    let mut gate_results = Vec::new();
    for g in gates {
        for (r, p) in results.iter().zip(&ps) {
            if g.level.as_ref().is_some_and(|l| l.value.as_str() != r.level) {
                continue;
            }
            let measured = gate_value(&g.metric.value, &r.summary, p);
            let (higher, _) = gate_direction(&g.metric.value);
            let pass = if higher { measured >= g.value } else { measured <= g.value };
            gate_results.push(GateResult {
                metric: g.metric.value.clone(),
                level: r.level.clone(),
                limit: g.value,
                measured,
                pass,
            });
        }
    }
    let samples = common
        .iter()
        .take(SHOWN_SAMPLES)
        .map(|id| {
            let first = results[0].prompts.iter().find(|p| &p.id == id).expect("a common prompt");
            SampleRow {
                id: id.clone(),
                input: first.input.clone(),
                reference: first.reference.clone(),
                outputs: results
                    .iter()
                    .filter_map(|r| {
                        let p = r.prompts.iter().find(|p| &p.id == id)?;
                        let s = p.samples.first()?;
                        Some((r.level.clone(), s.text.clone(), s.pass))
                    })
                    .collect(),
            }
        })
        .collect();
    Report {
        target: target.to_string(),
        levels: results
            .iter()
            .map(|r| LevelEntry {
                level: r.level.clone(),
                model_bytes: r.model_bytes,
                prompts: r.prompts.len(),
                samples: r.settings.samples,
                summary: r.summary.clone(),
            })
            .collect(),
        pairs,
        hardest_threshold: hard.threshold,
        hardest_prompts: hard.prompts.len(),
        gates: gate_results,
        criteria: results.first().map(|r| r.criteria.clone()).unwrap_or_default(),
        skipped: results.first().map(|r| r.skipped.clone()).unwrap_or_default(),
        loss,
        samples,
    }
}

fn fmt_num(v: f64) -> String {
    if v.is_infinite() {
        "∞".into()
    } else if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A p-value: three decimals, or scientific notation when tiny.
fn pval(p: f64) -> String {
    if p.is_nan() {
        "n/a".into()
    } else if p != 0.0 && p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

fn secs(v: f64) -> String {
    if v.is_infinite() { "∞ (never succeeded)".into() } else { format!("{} s", fmt_num(v)) }
}

/// One level's row of the quality-and-speed table, cell by cell (Markdown and HTML alike).
fn level_cells(l: &LevelEntry) -> [String; 10] {
    let m = &l.summary;
    [
        l.level.clone(),
        mib(l.model_bytes),
        format!("{:.3} ± {:.3}", m.success, m.success_se),
        format!("{}/{}", m.unsolved_prompts, l.prompts),
        fmt_num(m.expected_attempts_mean),
        format!("{} s", fmt_num(m.load_s)),
        format!("{} s", fmt_num(m.prompt_s)),
        format!("{:.2} ms", m.per_token_s * 1e3),
        format!("{:.0}", m.decode_tokens_per_s),
        format!("{:.0}", m.prompt_tokens_per_s),
    ]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn corr(c: &Option<Correlation>) -> String {
    match c {
        Some(c) => format!("ρ = {:.3} (p = {}, n = {})", c.rho, pval(c.p), c.n),
        None => "n/a (too few prompts, or a constant ranking)".into(),
    }
}

/// `report.json`, `report.md`, `report.html`.
pub fn render_all(r: &Report) -> Vec<(&'static str, String)> {
    let json = serde_json::to_string_pretty(r).expect("serializes");
    vec![("report.json", json), ("report.md", markdown(r)), ("report.html", html(r))]
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {} — benchmark report\n", r.target);
    let _ = writeln!(s, "Criteria graded (an answer passes only if all pass): {}.", r.criteria.join(", "));
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "Not graded (no `judge` model named): {}.", r.skipped.join(", "));
    }
    let _ = writeln!(s, "\n## Quality and speed per level\n");
    let _ = writeln!(
        s,
        "| level | size | success ± SE | unsolved prompts | E[attempts] (solved) | load | prompt | per token | decode tok/s | prompt tok/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for l in &r.levels {
        let _ = writeln!(s, "| {} |", level_cells(l).join(" | "));
    }
    let _ = writeln!(s, "\n## Time to success (expected, eq. 3; measured retry-until-success)\n");
    let _ = writeln!(s, "| level | | min | P25 | median | P75 | P95 | max |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for l in &r.levels {
        for (what, p) in [("expected", &l.summary.expected_seconds), ("measured", &l.summary.measured_seconds)] {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                l.level,
                what,
                fmt_num(p.min),
                fmt_num(p.p25),
                fmt_num(p.median),
                fmt_num(p.p75),
                fmt_num(p.p95),
                fmt_num(p.max)
            );
        }
    }
    let _ = writeln!(s, "\n## Per-criterion pass rates\n");
    let _ = write!(s, "| criterion |");
    for l in &r.levels {
        let _ = write!(s, " {} |", l.level);
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(r.levels.len()));
    for (ci, name) in r.criteria.iter().enumerate() {
        let _ = write!(s, "| {name} |");
        for l in &r.levels {
            let c = &l.summary.criteria[ci];
            let err = if c.errors > 0 { format!(" ({} errors)", c.errors) } else { String::new() };
            let _ = write!(s, " {:.3}{err} |", c.pass);
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\n## Between levels\n");
    let _ = writeln!(
        s,
        "Hardest prompts: mean p̂ below {:.3} (the 40th percentile of all p̂, pooled): {} prompts.\n",
        r.hardest_threshold, r.hardest_prompts
    );
    let _ = writeln!(s, "| levels | McNemar χ² (p; exact p) | Spearman ρ, all prompts | Spearman ρ, hardest 40% |");
    let _ = writeln!(s, "|---|---|---|---|");
    for p in &r.pairs {
        let _ = writeln!(
            s,
            "| {} vs {} | {:.3} (p = {}; exact {}; b = {}, c = {}) | {} | {} |",
            p.a,
            p.b,
            p.mcnemar.statistic,
            pval(p.mcnemar.p_value),
            pval(p.mcnemar.exact_p),
            p.mcnemar.b,
            p.mcnemar.c,
            corr(&p.spearman),
            corr(&p.spearman_hardest)
        );
    }
    if !r.gates.is_empty() {
        let _ = writeln!(s, "\n## Gates\n");
        for g in &r.gates {
            let _ = writeln!(s, "- {} {}", if g.pass { "✅" } else { "❌" }, describe_gate(g));
        }
    }
    let _ = writeln!(s, "\n## Samples (first answer per level)\n");
    for row in &r.samples {
        let _ = writeln!(s, "### {}\n\n```text\n{}\n```\n", row.id, row.input);
        let _ = writeln!(s, "- **teacher**: {}", row.reference.replace('\n', " "));
        for (level, text, pass) in &row.outputs {
            let _ = writeln!(s, "- **{level}** ({}): {}", if *pass { "pass" } else { "fail" }, text.replace('\n', " "));
        }
        let _ = writeln!(s);
    }
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html(r: &Report) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} — forge benchmark report</title><style>\
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}\
th{{background:#f4f4f4}}td:first-child,th:first-child{{text-align:left}}pre{{white-space:pre-wrap;background:#f8f8f8;padding:.6em}}\
.pass{{color:#176c2e}}.fail{{color:#b3261e}}.plots{{display:flex;flex-wrap:wrap;gap:1em}}</style></head><body>\
<h1>{t} — benchmark report</h1>",
        t = esc(&r.target)
    );
    // The tables are the Markdown report's, as HTML.
    let _ = write!(s, "<p>Criteria graded (an answer passes only if all pass): {}.</p>", esc(&r.criteria.join(", ")));
    if !r.skipped.is_empty() {
        let _ = write!(s, "<p>Not graded (no <code>judge</code> model named): {}.</p>", esc(&r.skipped.join(", ")));
    }
    let _ = write!(
        s,
        "<h2>Quality and speed per level</h2><table><tr><th>level</th><th>size</th><th>success ± SE</th><th>unsolved prompts</th>\
<th>E[attempts] (solved)</th><th>load</th><th>prompt</th><th>per token</th><th>decode tok/s</th><th>prompt tok/s</th></tr>"
    );
    for l in &r.levels {
        let cells: Vec<String> = level_cells(l).iter().map(|c| esc(c)).collect();
        let _ = write!(s, "<tr><td>{}</td></tr>", cells.join("</td><td>"));
    }
    let _ = write!(
        s,
        "</table><h2>Time to success</h2><table><tr><th>level</th><th></th><th>min</th><th>P25</th><th>median</th><th>P75</th><th>P95</th><th>max</th></tr>"
    );
    for l in &r.levels {
        for (what, p) in [("expected", &l.summary.expected_seconds), ("measured", &l.summary.measured_seconds)] {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{what}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&l.level),
                fmt_num(p.min),
                fmt_num(p.p25),
                fmt_num(p.median),
                fmt_num(p.p75),
                fmt_num(p.p95),
                fmt_num(p.max)
            );
        }
    }
    let _ = write!(s, "</table><div class=\"plots\">");
    let levels: Vec<&str> = r.levels.iter().map(|l| l.level.as_str()).collect();
    let ecdf_attempts: Vec<Vec<f64>> = r.levels.iter().map(|l| l.summary.expected_attempts.clone()).collect();
    let ecdf_seconds: Vec<Vec<f64>> = r.levels.iter().map(|l| l.summary.expected_seconds_per_prompt.clone()).collect();
    s.push_str(&plot::ecdf_svg(
        "Expected attempts per prompt (ECDF)",
        "expected attempts 1/p̂",
        &levels,
        &ecdf_attempts,
    ));
    s.push_str(&plot::ecdf_svg("Expected time to success per prompt (ECDF)", "seconds", &levels, &ecdf_seconds));
    let rates: Vec<Vec<f64>> = r.levels.iter().map(|l| l.summary.criteria.iter().map(|c| c.pass).collect()).collect();
    s.push_str(&plot::criteria_svg(&r.criteria, &levels, &rates));
    if let Some(loss) = &r.loss {
        s.push_str(&plot::loss_svg(loss));
    }
    let _ = write!(
        s,
        "</div><h2>Between levels</h2><p>Hardest prompts: mean p̂ below {:.3} (the 40th percentile of all p̂, pooled): {} prompts.</p>",
        r.hardest_threshold, r.hardest_prompts
    );
    let _ = write!(
        s,
        "<table><tr><th>levels</th><th>McNemar χ²</th><th>p</th><th>exact p</th><th>b / c</th><th>Spearman ρ, all</th><th>Spearman ρ, hardest 40%</th></tr>"
    );
    for p in &r.pairs {
        let _ = write!(
            s,
            "<tr><td>{} vs {}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.a),
            esc(&p.b),
            p.mcnemar.statistic,
            pval(p.mcnemar.p_value),
            pval(p.mcnemar.exact_p),
            p.mcnemar.b,
            p.mcnemar.c,
            esc(&corr(&p.spearman)),
            esc(&corr(&p.spearman_hardest))
        );
    }
    s.push_str("</table>");
    if !r.gates.is_empty() {
        s.push_str("<h2>Gates</h2><ul>");
        for g in &r.gates {
            let _ = write!(
                s,
                "<li class=\"{}\">{} {}</li>",
                if g.pass { "pass" } else { "fail" },
                if g.pass { "passed:" } else { "MISSED:" },
                esc(&describe_gate(g))
            );
        }
        s.push_str("</ul>");
    }
    s.push_str("<h2>Samples</h2>");
    for row in &r.samples {
        let _ = write!(
            s,
            "<h3>{}</h3><table><tr><th>input</th><td style=\"text-align:left\"><pre>{}</pre></td></tr>",
            esc(&row.id),
            esc(&row.input)
        );
        let _ = write!(s, "<tr><th>teacher</th><td style=\"text-align:left\">{}</td></tr>", esc(&row.reference));
        for (level, text, pass) in &row.outputs {
            let _ = write!(
                s,
                "<tr><th>{} <span class=\"{c}\">{c}</span></th><td style=\"text-align:left\">{}</td></tr>",
                esc(level),
                esc(text),
                c = if *pass { "pass" } else { "fail" }
            );
        }
        s.push_str("</table>");
    }
    s.push_str("</body></html>\n");
    s
}

/// Where the latest report of `target` is kept outside the content store.
pub fn latest_dir(cache_root: &Path, target: &str) -> PathBuf {
    cache_root.join(forge_cache::Bucket::Reports.dir_name()).join(target)
}
