//! The check grader: a command run in a fresh sandbox over a copy of an episode's final files.
//!
//! The copy keeps grading from changing the episode's record (a check may write, or run
//! `rm -rf *`), and the sandbox keeps the submission's files from doing anything to the host:
//! a check runs the agent's artefacts, so it is exactly as untrusted as the agent.
//!
//! Anything the submission causes (a wrong exit code, a limit hit, a trap, too many files to
//! copy) is a failed verdict; only host failures are [`CheckError`], which the judge must
//! treat as an infrastructure failure and never as a score of 0.

use std::path::Path;
use std::sync::Arc;

use klong_sandbox::{
    CallLimits, EpisodeBudget, Outcome, Sandbox, SandboxError, SandboxHost, Termination,
    ToolRegistry,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::environment::task::{copy_tree, CheckSpec, CopyBounds, CopyError};

/// The registry tool that runs a check's command line.
pub const SHELL_TOOL: &str = "bash";
/// Longest explanation; it goes into logs and reports, so it stays short.
pub const MAX_EXPLANATION_BYTES: usize = 2048;
/// Longest excerpt of stdout or stderr quoted in an explanation.
const EXCERPT_BYTES: usize = 400;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckVerdict {
    pub passed: bool,
    /// Why, e.g. `exit code 1, expected 0; stdout: "..."`; at most
    /// [`MAX_EXPLANATION_BYTES`].
    pub explanation: String,
    /// The command's outcome; `None` when it did not run because the final files were over
    /// the copy bounds.
    pub outcome: Option<Outcome>,
}

/// A failure of the host, not of the submission.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("check grader: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("check grader: copying the final files: {0}")]
    Copy(CopyError),
    #[error("check grader: temporary directory: {0}")]
    TempDir(std::io::Error),
}

/// Runs `spec` over a copy of `final_files` within [`CopyBounds::default`].
pub fn run_check(
    host: &Arc<SandboxHost>,
    registry: &Arc<ToolRegistry>,
    final_files: &Path,
    spec: &CheckSpec,
    limits: CallLimits,
    seed: u64,
) -> Result<CheckVerdict, CheckError> {
    run_check_bounded(
        host,
        registry,
        final_files,
        spec,
        limits,
        seed,
        CopyBounds::default(),
    )
}

/// [`run_check`] with explicit bounds on the copy.
pub fn run_check_bounded(
    host: &Arc<SandboxHost>,
    registry: &Arc<ToolRegistry>,
    final_files: &Path,
    spec: &CheckSpec,
    limits: CallLimits,
    seed: u64,
    bounds: CopyBounds,
) -> Result<CheckVerdict, CheckError> {
    // The final files must exist: a missing episode directory is the host's doing.
    match std::fs::metadata(final_files) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CheckError::Copy(CopyError::Io {
                path: final_files.to_path_buf(),
                source: std::io::Error::other("not a directory"),
            }))
        }
        Err(source) => {
            return Err(CheckError::Copy(CopyError::Io {
                path: final_files.to_path_buf(),
                source,
            }))
        }
    }
    // Removed when dropped, whatever happens below.
    let copy = tempfile::Builder::new()
        .prefix("klong-check-")
        .tempdir()
        .map_err(CheckError::TempDir)?;
    match copy_tree(final_files, copy.path(), bounds) {
        Ok(_) => {}
        Err(CopyError::Bound { limit, what, .. }) => {
            return Ok(CheckVerdict {
                passed: false,
                explanation: format!(
                    "not run: the final files are over the check's copy bound of {limit} {what}"
                ),
                outcome: None,
            })
        }
        Err(e) => return Err(CheckError::Copy(e)),
    }
    // One call: the episode budget only has to let it run under the call's own limits, so
    // that a limit hit is named as the call's (on a tie the call's limit is named).
    let budget = budget_for(&limits);
    let mut sandbox = Sandbox::new(
        host.clone(),
        registry.clone(),
        copy.path(),
        limits,
        budget,
        seed,
    )?;
    let outcome = sandbox.exec(SHELL_TOOL, &json!({ "command": spec.command }))?;
    let (passed, explanation) = judge(spec, &outcome);
    drop(sandbox);
    // The verdict stands even if the copy cannot be removed: losing it over a leftover
    // temporary directory would turn a grade into an infrastructure failure.
    let copy_path = copy.path().to_path_buf();
    if let Err(e) = copy.close() {
        tracing::warn!(path = %copy_path.display(), error = %e, "cannot remove a check's copy");
    }
    Ok(CheckVerdict {
        passed,
        explanation: truncate(&explanation, MAX_EXPLANATION_BYTES),
        outcome: Some(outcome),
    })
}

fn budget_for(limits: &CallLimits) -> EpisodeBudget {
    let d = EpisodeBudget::default();
    EpisodeBudget {
        wall_time: d.wall_time.max(limits.wall_time),
        fuel: d.fuel.max(limits.fuel),
        written_bytes: d.written_bytes.max(limits.written_bytes),
        files_created: d.files_created.max(limits.files_created),
    }
}

/// Whether `outcome` meets every condition of `spec`, and why.
fn judge(spec: &CheckSpec, outcome: &Outcome) -> (bool, String) {
    let code = match &outcome.termination {
        Termination::Exited { code } => *code,
        Termination::Limit { limit } | Termination::NotRun { limit } => {
            return (
                false,
                format!(
                    "the check hit the {} limit{}",
                    limit.name(),
                    output_excerpt(outcome)
                ),
            )
        }
        Termination::Trap { trap, message } => {
            return (
                false,
                format!(
                    "the check trapped ({trap:?}): {}{}",
                    excerpt(message),
                    output_excerpt(outcome)
                ),
            )
        }
    };
    let mut failures = Vec::new();
    if let Some(expected) = spec.exit_code {
        if code != expected {
            failures.push(format!("exit code {code}, expected {expected}"));
        }
    }
    if let Some(expected) = &spec.stdout {
        if outcome.stdout != *expected {
            failures.push(format!("stdout is not {}", excerpt(expected)));
        }
    }
    if let Some(needle) = &spec.stdout_contains {
        if !outcome.stdout.contains(needle.as_str()) {
            failures.push(format!("stdout does not contain {}", excerpt(needle)));
        }
    }
    if failures.is_empty() {
        (true, format!("passed: exit code {code}"))
    } else {
        (
            false,
            format!("{}{}", failures.join("; "), output_excerpt(outcome)),
        )
    }
}

fn output_excerpt(outcome: &Outcome) -> String {
    let mut s = format!("; stdout: {}", excerpt(&outcome.stdout));
    if !outcome.stderr.is_empty() {
        s.push_str(&format!("; stderr: {}", excerpt(&outcome.stderr)));
    }
    s
}

/// A quoted, bounded excerpt.
fn excerpt(text: &str) -> String {
    if text.len() <= EXCERPT_BYTES {
        format!("{text:?}")
    } else {
        format!(
            "{:?}... ({} bytes)",
            truncate(text, EXCERPT_BYTES),
            text.len()
        )
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a char boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
