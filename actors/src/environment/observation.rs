//! From the agent's tool call to the text it observes.
//!
//! Every guest result, including a limit hit or a trap, becomes an observation: the episode
//! goes on and the agent learns what happened. Only host failures (I/O, engine, overload) are
//! errors: they are infrastructure failures and must never be shown to the agent or scored.

use klong_sandbox::{Limit, Outcome, Sandbox, SandboxError, Termination};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tool whose call ends the episode.
pub const SUBMIT_TOOL: &str = "submit";

/// A tool call as the agent made it (OpenAI style: a name and JSON arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// What the agent sees after a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub text: String,
    /// The agent submitted, or the episode's wall time or fuel is spent: no further call can run.
    pub ends_episode: bool,
    /// The limit that stopped or refused the call, if any.
    pub limit: Option<Limit>,
    /// The sandbox outcome, when the call ran (or was refused by the budget).
    pub outcome: Option<Outcome>,
}

/// A failure of the host, not of the agent.
#[derive(Debug, thiserror::Error)]
#[error("infrastructure failure during tool call `{tool}`: {source}")]
pub struct ObservationError {
    pub tool: String,
    #[source]
    pub source: SandboxError,
}

/// Runs `call` in `sandbox` and renders the observation, at most `max_bytes` long (the middle
/// of a longer text is cut: the start and the end of an output say the most).
pub fn observe(
    sandbox: &mut Sandbox,
    call: &ToolCall,
    max_bytes: usize,
) -> Result<Observation, ObservationError> {
    let outcome = match sandbox.exec(&call.name, &call.arguments) {
        Ok(outcome) => outcome,
        Err(SandboxError::UnknownTool { tool }) => {
            let names: Vec<String> = sandbox
                .registry()
                .tools()
                .filter(|t| t.manifest.agent)
                .map(|t| t.manifest.name.clone())
                .collect();
            let text = format!(
                "error: there is no tool `{tool}`; the tools are: {}",
                names.join(", ")
            );
            return Ok(Observation {
                text: bound(&text, max_bytes),
                ends_episode: false,
                limit: None,
                outcome: None,
            });
        }
        Err(SandboxError::InvalidArguments { tool, reason }) => {
            let text = format!("error: invalid arguments for `{tool}`: {reason}");
            return Ok(Observation {
                text: bound(&text, max_bytes),
                ends_episode: false,
                limit: None,
                outcome: None,
            });
        }
        Err(source) => {
            return Err(ObservationError {
                tool: call.name.clone(),
                source,
            })
        }
    };
    Ok(render(call, outcome, max_bytes))
}

fn render(call: &ToolCall, outcome: Outcome, max_bytes: usize) -> Observation {
    let mut text = String::new();
    text.push_str(&outcome.stdout);
    if outcome.stdout_truncated {
        text.push_str("\n[stdout truncated]");
    }
    if !outcome.stderr.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&outcome.stderr);
        if outcome.stderr_truncated {
            text.push_str("\n[stderr truncated]");
        }
    }
    let note = match &outcome.termination {
        Termination::Exited { code: 0 } => None,
        Termination::Exited { code } => Some(format!("[exit code {code}]")),
        Termination::Limit { limit } => Some(format!("[stopped: {limit} limit exceeded]")),
        Termination::Trap { trap, message } => {
            let first_line = message.lines().next().unwrap_or_default();
            Some(format!("[crashed: {trap:?}: {first_line}]"))
        }
        Termination::NotRun { limit } => Some(format!("[not run: the {limit} budget is spent]")),
    };
    if let Some(note) = note {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&note);
    }
    if text.is_empty() {
        text.push_str("[no output]");
    }
    let limit = outcome.limit();
    let submitted = call.name == SUBMIT_TOOL && outcome.success();
    let budget_spent = limit.is_some_and(Limit::ends_episode);
    Observation {
        text: bound(&text, max_bytes),
        ends_episode: submitted || budget_spent,
        limit,
        outcome: Some(outcome),
    }
}

/// Keeps the head and the tail of `text` within `max_bytes`, on char boundaries.
fn bound(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let marker = format!(
        "\n[... {} bytes cut ...]\n",
        text.len().saturating_sub(max_bytes)
    );
    let keep = max_bytes.saturating_sub(marker.len());
    let mut head = keep / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - (keep - head);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{marker}{}", &text[..head], &text[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use klong_sandbox::Usage;

    fn outcome(termination: Termination, stdout: &str, stderr: &str) -> Outcome {
        Outcome {
            tool: "bash".into(),
            termination,
            stdout: stdout.into(),
            stderr: stderr.into(),
            stdout_truncated: false,
            stderr_truncated: false,
            usage: Usage::default(),
        }
    }

    fn call(name: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: Value::Null,
        }
    }

    #[test]
    fn limits_and_exit_codes_are_named() {
        let o = render(
            &call("bash"),
            outcome(
                Termination::Limit {
                    limit: Limit::WallTime,
                },
                "partial",
                "",
            ),
            1000,
        );
        assert_eq!(o.text, "partial\n[stopped: call wall_time limit exceeded]");
        assert!(!o.ends_episode);
        let o = render(
            &call("bash"),
            outcome(
                Termination::Exited { code: 1 },
                "",
                "cat: x: No such file\n",
            ),
            1000,
        );
        assert_eq!(o.text, "cat: x: No such file\n[exit code 1]");
        let o = render(
            &call("bash"),
            outcome(
                Termination::NotRun {
                    limit: Limit::EpisodeFuel,
                },
                "",
                "",
            ),
            1000,
        );
        assert!(o.ends_episode);
        assert_eq!(o.limit, Some(Limit::EpisodeFuel));
    }

    #[test]
    fn submit_ends_the_episode_only_when_it_succeeds() {
        assert!(
            render(
                &call("submit"),
                outcome(Termination::Exited { code: 0 }, "submitted: done", ""),
                100
            )
            .ends_episode
        );
        assert!(
            !render(
                &call("submit"),
                outcome(Termination::Exited { code: 2 }, "", "usage"),
                100
            )
            .ends_episode
        );
        assert!(
            !render(
                &call("bash"),
                outcome(Termination::Exited { code: 0 }, "ok", ""),
                100
            )
            .ends_episode
        );
    }

    #[test]
    fn long_text_keeps_head_and_tail_on_char_boundaries() {
        let text = "é".repeat(1000);
        let b = bound(&text, 100);
        assert!(b.len() <= 100, "{}", b.len());
        assert!(b.starts_with('é') && b.ends_with('é'));
        assert!(b.contains("bytes cut"));
        assert_eq!(bound("short", 100), "short");
    }
}
