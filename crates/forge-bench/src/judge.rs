//! The judge suite: grades one student output against every criterion of the recipe's `judge`
//! block. As in DefameLM (§4.1, eq. 1) an output passes only if every criterion passes.
//!
//! Verifier criteria run locally and deterministically:
//! - `contains "NODE"`: every value of the recipe node (each pick of a multi-pick) appears in the
//!   output, ignoring case and spacing — "all intelligence items present", "target named";
//! - `max-chars`, `min-words`, `max-words`, `regex`, `banned`, `schema`: the same checks, with
//!   the same semantics, as the dataset's `validate` block (`forge_data::validate::Checks`);
//! - `command`: an external program gets the sample as JSON on stdin (`input`, `output`,
//!   `prompt`, `values`, `criterion`) and answers on stdout with `pass` or `fail`, or a JSON
//!   object `{"pass": true|false, "reason": "..."}`. A non-zero exit, a timeout or any other
//!   answer is an *error*: the criterion counts as failed and the error is reported.
//!
//! `llm` criteria ask a judge model a yes/no question through the teacher client. Its answers
//! are cached by (judge model, endpoint, criterion text, input, output) in the teacher-call
//! cache, so re-grading the same outputs costs nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use forge_data::validate::{Checks, normalize};
use forge_manifest::{Check, Criterion, Validation};
use forge_process::Ended;
use forge_teacher::{CallCache, ChatRequest, Message, OpenAiClient};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What a criterion sees: the student's input, the instructions behind it, and the output.
#[derive(Clone, Debug, Serialize)]
pub struct Subject<'a> {
    /// What the student model was given.
    pub input: &'a str,
    /// The full instructions (the teacher's prompt for this sample): what an `llm` judge reads.
    pub prompt: &'a str,
    pub output: &'a str,
    /// The sample's recipe node values.
    pub values: &'a std::collections::BTreeMap<String, Value>,
}

/// One criterion's verdict on one output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub pass: bool,
    /// Why it failed (a verifier's reason), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The criterion could not be evaluated (a crashed or hung command, a judge model's
    /// unreadable answer); it counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Outcome {
    fn pass() -> Outcome {
        Outcome { pass: true, reason: None, error: None }
    }
    fn fail(reason: impl Into<String>) -> Outcome {
        Outcome { pass: false, reason: Some(reason.into()), error: None }
    }
    fn error(e: impl Into<String>) -> Outcome {
        Outcome { pass: false, reason: None, error: Some(e.into()) }
    }
}

// One per criterion of a recipe: a handful, so the large variant is not boxed.
#[allow(clippy::large_enum_variant)]
enum Compiled {
    Contains(String),
    Checks(Checks),
    Command { run: Vec<String>, timeout: Duration },
    Llm(String),
}

/// A recipe's judge suite, compiled.
pub struct Judge {
    names: Vec<String>,
    criteria: Vec<Compiled>,
    /// Where `command` verifiers run (the workspace root).
    cwd: PathBuf,
}

/// The judge model for `llm` criteria, with its answer cache.
pub struct LlmJudge<'a> {
    pub client: &'a OpenAiClient,
    pub cache: CallCache,
}

impl Judge {
    /// Compiles `criteria`; `skip_llm` leaves the `llm` ones out (no judge model configured).
    pub fn new(criteria: &[Criterion], cwd: &Path, skip_llm: bool) -> Result<Judge, String> {
        let mut names = Vec::new();
        let mut compiled = Vec::new();
        for c in criteria {
            let one = |v: Validation| Checks::new(&v, None).map(Compiled::Checks);
            let item = match &c.check {
                Check::Contains { node } => Ok(Compiled::Contains(node.value.clone())),
                Check::MaxChars { max } => one(Validation { max_chars: Some(*max), ..Validation::default() }),
                Check::MinWords { min } => one(Validation { min_words: Some(*min), ..Validation::default() }),
                Check::MaxWords { max } => one(Validation { max_words: Some(*max), ..Validation::default() }),
                Check::Regex { pattern } => one(Validation { regex: vec![pattern.clone()], ..Validation::default() }),
                Check::Banned { phrases } => one(Validation { banned: phrases.clone(), ..Validation::default() }),
                Check::Schema { schema } => one(Validation { schema: Some(schema.clone()), ..Validation::default() }),
                Check::Command { run, timeout_s } => Ok(Compiled::Command {
                    run: run.iter().map(|a| a.value.clone()).collect(),
                    timeout: Duration::from_secs_f64(*timeout_s),
                }),
                Check::Llm { question } => {
                    if skip_llm {
                        continue;
                    }
                    Ok(Compiled::Llm(question.clone()))
                }
            };
            compiled.push(item.map_err(|e| format!("judge criterion `{}`: {e}", c.name.value))?);
            names.push(c.name.value.clone());
        }
        Ok(Judge { names, criteria: compiled, cwd: cwd.to_path_buf() })
    }

    /// The criteria graded, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn has_llm(&self) -> bool {
        self.criteria.iter().any(|c| matches!(c, Compiled::Llm(_)))
    }

    /// Grades `s` on every verifier criterion; `llm` criteria are left as `None` for
    /// [`Judge::grade_llm`].
    pub fn grade_verifiers(&self, s: &Subject<'_>) -> Vec<Option<Outcome>> {
        self.criteria
            .iter()
            .zip(&self.names)
            .map(|(c, name)| match c {
                Compiled::Contains(node) => Some(contains(s, node)),
                Compiled::Checks(checks) => Some(match checks.check(s.output) {
                    Ok(_) => Outcome::pass(),
                    Err(r) => Outcome::fail(r.to_string()),
                }),
                Compiled::Command { run, timeout } => Some(run_command(run, *timeout, &self.cwd, name, s)),
                Compiled::Llm(_) => None,
            })
            .collect()
    }

    /// Asks the judge model every `llm` criterion about `s`, filling the `None`s that
    /// [`Judge::grade_verifiers`] left.
    pub async fn grade_llm(&self, s: &Subject<'_>, judge: &LlmJudge<'_>, out: &mut [Option<Outcome>]) {
        for (i, c) in self.criteria.iter().enumerate() {
            if let Compiled::Llm(question) = c {
                out[i] = Some(ask(judge, question, s).await);
            }
        }
    }
}

impl Judge {
    /// Grades `s` on every criterion — the verifiers, then the `llm` ones asked of `llm` — and
    /// names the criteria it failed or that could not be graded (none: it passed). A judge
    /// compiled without its `llm` criteria needs no `llm`.
    pub async fn failures(&self, s: &Subject<'_>, llm: Option<&LlmJudge<'_>>) -> Vec<String> {
        let mut out = self.grade_verifiers(s);
        if let Some(llm) = llm {
            self.grade_llm(s, llm, &mut out).await;
        }
        let passed = |o: &Option<Outcome>| o.as_ref().is_some_and(|o| o.pass);
        self.names.iter().zip(&out).filter(|(_, o)| !passed(o)).map(|(n, _)| n.clone()).collect()
    }
}

/// Every value of `node` appears in the output (case and spacing ignored).
fn contains(s: &Subject<'_>, node: &str) -> Outcome {
    let Some(v) = s.values.get(node) else {
        return Outcome::error(format!("the sample has no value for node `{node}`"));
    };
    let items: Vec<String> = match v {
        Value::Array(a) => a.iter().map(text_of).collect(),
        other => vec![text_of(other)],
    };
    let out = normalize(s.output);
    let missing: Vec<&String> = items.iter().filter(|i| !out.contains(&normalize(i))).collect();
    if missing.is_empty() {
        Outcome::pass()
    } else {
        Outcome::fail(format!("missing {}", missing.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ")))
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs a `command` verifier on one sample.
fn run_command(run: &[String], timeout: Duration, cwd: &Path, name: &str, s: &Subject<'_>) -> Outcome {
    let payload = json!({
        "criterion": name,
        "input": s.input,
        "prompt": s.prompt,
        "output": s.output,
        "values": s.values,
    });
    let mut cmd = Command::new(&run[0]);
    cmd.args(&run[1..]).current_dir(cwd);
    // Contained like a command stage: a timeout kills the verifier and anything it started,
    // and it dies with forge.
    let opts = forge_process::Options {
        timeout: Some(timeout),
        stdin: Some(serde_json::to_vec(&payload).expect("samples serialize")),
        capture: Some(1 << 20),
        ..Default::default()
    };
    let finished = match forge_process::run(&mut cmd, opts) {
        Ok(f) => f,
        Err(e) => return Outcome::error(format!("cannot run `{}`: {e}", run[0])),
    };
    let status = match finished.ended {
        Ended::Exited(status) => status,
        Ended::TimedOut(_) | Ended::Cancelled => {
            return Outcome::error(format!("`{}` timed out after {:.1}s", run[0], timeout.as_secs_f64()));
        }
    };
    let stdout = String::from_utf8_lossy(&finished.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&finished.stderr).into_owned();
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
        return Outcome::error(format!("`{}` exited with {status}: {}", run[0], tail.join(" | ")));
    }
    parse_verdict(&stdout).unwrap_or_else(|| {
        let shown: String = stdout.trim().chars().take(80).collect();
        Outcome::error(format!("`{}` answered {shown:?}: expected `pass`, `fail` or {{\"pass\": bool}}", run[0]))
    })
}

/// `pass`, `fail`, or `{"pass": bool, "reason": "..."}`.
fn parse_verdict(stdout: &str) -> Option<Outcome> {
    let t = stdout.trim();
    match t.to_ascii_lowercase().as_str() {
        "pass" => return Some(Outcome::pass()),
        "fail" => return Some(Outcome::fail("the verifier said fail")),
        _ => {}
    }
    let v: Value = serde_json::from_str(t).ok()?;
    let pass = v.get("pass")?.as_bool()?;
    let reason = v.get("reason").and_then(Value::as_str).map(str::to_string);
    Some(Outcome {
        pass,
        reason: if pass { None } else { reason.or(Some("the verifier said fail".into())) },
        error: None,
    })
}

/// The judge model's system message: a strict yes/no grader.
const JUDGE_SYSTEM: &str = "You are a strict evaluator of text written for a video game. You are given the \
instructions a writer received, the text they wrote, and one yes/no question about the text. Answer with \
exactly one word: YES if the text satisfies the question, NO otherwise.";

/// The messages asking `question` about `s`: everything the answer depends on is here, so the
/// call cache keys on (model, criterion, input, output).
pub fn judge_messages(question: &str, s: &Subject<'_>) -> Vec<Message> {
    vec![
        Message::system(JUDGE_SYSTEM),
        Message::user(format!(
            "Instructions given to the writer:\n{}\n\nThe writer's input:\n{}\n\nThe text:\n{}\n\nQuestion: {}\nAnswer YES or NO.",
            s.prompt, s.input, s.output, question
        )),
    ]
}

async fn ask(judge: &LlmJudge<'_>, question: &str, s: &Subject<'_>) -> Outcome {
    let c = judge.client.config();
    let req = ChatRequest {
        provider: "openai".into(),
        model: c.model.clone(),
        base_url: c.base_url.clone(),
        messages: judge_messages(question, s),
        temperature: Some(0.0),
        top_p: None,
        max_tokens: Some(8),
        seed: None,
        response_schema: None,
        node: "judge".into(),
        sample: 0,
        repeat: 0,
    };
    let resp = match judge.cache.get(&req) {
        Some(r) => r,
        None => match judge.client.chat(&req).await {
            Ok(r) => {
                let _ = judge.cache.put(&req, &r); // a failed write only costs a re-ask
                r
            }
            Err(e) => return Outcome::error(format!("judge model: {e}")),
        },
    };
    parse_yes_no(&resp.content).unwrap_or_else(|| {
        let shown: String = resp.content.trim().chars().take(80).collect();
        Outcome::error(format!("the judge model answered {shown:?}, not YES or NO"))
    })
}

/// The first word of a judge model's answer: yes or no (any case, punctuation ignored).
pub fn parse_yes_no(answer: &str) -> Option<Outcome> {
    let word: String = answer
        .trim_start_matches(|c: char| !c.is_alphanumeric())
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    match word.as_str() {
        "yes" | "pass" => Some(Outcome::pass()),
        "no" | "fail" => Some(Outcome::fail("the judge model said no")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse() {
        assert_eq!(parse_verdict("pass\n"), Some(Outcome::pass()));
        assert_eq!(parse_verdict(" FAIL ").map(|o| o.pass), Some(false));
        assert_eq!(parse_verdict(r#"{"pass": true}"#), Some(Outcome::pass()));
        let o = parse_verdict(r#"{"pass": false, "reason": "no exit"}"#).unwrap();
        assert_eq!((o.pass, o.reason.as_deref()), (false, Some("no exit")));
        assert_eq!(parse_verdict("passed, probably"), None);
        assert_eq!(parse_verdict(r#"{"ok": true}"#), None);
        assert_eq!(parse_verdict(""), None);
    }

    #[test]
    fn yes_no_parse() {
        assert!(parse_yes_no("YES").unwrap().pass);
        assert!(parse_yes_no("Yes.").unwrap().pass);
        assert!(!parse_yes_no("**No**, because").unwrap().pass);
        assert!(parse_yes_no("Maybe").is_none());
        assert!(parse_yes_no("").is_none());
    }
}
