//! The built-in `command` stage: run an external program, like a make rule or a DVC stage.
//!
//! The program runs in the workspace root with `FORGE_OUT` (and `{out}`) naming an empty
//! directory it must write its outputs to. Its stdout and stderr go to the artifact's log
//! (stdout to a file in `{out}` with `stdout="..."`). It runs contained (`forge-process`): in its
//! own process group, which forge kills on interrupt or timeout, and on Linux it also dies with
//! forge (`PR_SET_PDEATHSIG`), so a killed build leaves no writer behind. A non-zero exit or a missing declared output
//! fails the action, and nothing of it is recorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use forge_process::{Ended, how_it_ended};

use forge_manifest::argv::{Piece, parse_arg};
use forge_manifest::artifact::resolve_ref;
use forge_manifest::{ArtifactDecl, Manifest, StageKind};
use serde_json::{Value, json};

use crate::executor::{ActionContext, ActionError, Executor, StagePlan};

pub struct CommandExecutor;

fn stage<'m>(manifest: &'m Manifest, decl: &ArtifactDecl) -> &'m forge_manifest::CommandStage {
    let StageKind::Command(i) = decl.kind else { panic!("the command executor got a {} stage", decl.kind.name()) };
    &manifest.target_of(decl).commands[i]
}

/// Quotes a word for `sh` when it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl Executor for CommandExecutor {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn format_version(&self) -> u32 {
        1
    }

    fn plan(&self, manifest: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        let c = stage(manifest, decl);
        let mut params = BTreeMap::new();
        params.insert("run".to_string(), json!(c.run.iter().map(|a| a.value.clone()).collect::<Vec<_>>()));
        params.insert("env".to_string(), json!(c.env));
        params.insert("outputs".to_string(), json!(c.outputs.iter().map(|o| o.value.clone()).collect::<Vec<_>>()));
        if let Some(s) = &c.stdout {
            params.insert("stdout".to_string(), Value::String(s.value.clone()));
        }
        let inputs = c.inputs.iter().filter_map(|p| forge_manifest::glob::normalize("", &p.value).ok()).collect();
        StagePlan { params, inputs, tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let c = stage(ctx.manifest, ctx.decl);
        let target = ctx.manifest.target_of(ctx.decl);
        let argv = expand_argv(ctx, c, target)?;
        let (program, args) = argv.split_first().ok_or_else(|| ActionError::Failed("empty command".into()))?;
        ctx.log.line(&format!("$ {}", argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")));

        let log = ctx.log.try_clone_file().map_err(|e| ActionError::io(ctx.log.path(), e))?;
        let stdout = match &c.stdout {
            Some(name) => {
                let path = ctx.out_dir.join(&name.value);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| ActionError::io(dir, e))?;
                }
                Stdio::from(std::fs::File::create(&path).map_err(|e| ActionError::io(&path, e))?)
            }
            None => Stdio::from(log.try_clone().map_err(|e| ActionError::io(ctx.log.path(), e))?),
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(ctx.workspace)
            .envs(&c.env)
            .env("FORGE_OUT", ctx.out_dir)
            .env("FORGE_WORKSPACE", ctx.workspace)
            .env("FORGE_ARTIFACT", ctx.artifact.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::from(log));
        let timeout = c.timeout_s.map(Duration::from_secs_f64);
        let status = run_contained(ctx, &mut cmd, program, timeout)?;
        if !status.success() {
            return Err(ActionError::Failed(format!("`{program}` {}", how_it_ended(&status))));
        }
        let missing: Vec<&str> =
            c.outputs.iter().map(|o| o.value.as_str()).filter(|o| !ctx.out_dir.join(o).exists()).collect();
        if !missing.is_empty() {
            return Err(ActionError::Failed(format!(
                "`{program}` succeeded but did not write the declared output{} {} (write them under $FORGE_OUT or {{out}})",
                if missing.len() == 1 { "" } else { "s" },
                missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }
}

/// Runs `cmd` contained (killed on cancel, on timeout, and with forge; see `forge-process`) and
/// waits for it.
pub fn run_contained(
    ctx: &ActionContext<'_>,
    cmd: &mut Command,
    program: &str,
    timeout: Option<Duration>,
) -> Result<std::process::ExitStatus, ActionError> {
    let cancelled = || ctx.cancel.is_cancelled();
    let finished =
        forge_process::run(cmd, forge_process::Options { timeout, cancelled: Some(&cancelled), ..Default::default() })
            .map_err(|e| ActionError::Failed(format!("cannot run `{program}`: {e}")))?;
    match finished.ended {
        Ended::Exited(status) => Ok(status),
        Ended::Cancelled => Err(ActionError::Cancelled),
        Ended::TimedOut(after) => Err(ActionError::Failed(format!(
            "`{program}` timed out after {:.1}s (timeout={})",
            after.as_secs_f64(),
            timeout.unwrap_or_default().as_secs_f64()
        ))),
    }
}

fn expand_argv(
    ctx: &ActionContext<'_>,
    c: &forge_manifest::CommandStage,
    target: &forge_manifest::Target,
) -> Result<Vec<String>, ActionError> {
    let path_str = |p: &Path| p.to_string_lossy().into_owned();
    let mut argv = Vec::new();
    for arg in &c.run {
        let pieces = parse_arg(&arg.value).map_err(ActionError::Failed)?;
        if pieces == [Piece::Inputs] {
            argv.extend(ctx.inputs.iter().cloned());
            continue;
        }
        let mut s = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => s.push_str(&t),
                Piece::Out => s.push_str(&path_str(ctx.out_dir)),
                Piece::Workspace => s.push_str(&path_str(ctx.workspace)),
                Piece::Inputs => s.push_str(&ctx.inputs.iter().map(|i| shell_quote(i)).collect::<Vec<_>>().join(" ")),
                Piece::Dep(r) => {
                    let id = resolve_ref(target, &r, |id| ctx.deps.contains_key(id))
                        .ok_or_else(|| ActionError::Failed(format!("`{{dep:{r}}}` is not among the stage's needs")))?;
                    s.push_str(&path_str(&ctx.deps[&id]));
                }
            }
        }
        argv.push(s);
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell_only_when_needed() {
        assert_eq!(shell_quote("data/a.txt"), "data/a.txt");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
