//! One episode with a token-level policy: the task's statement and tools become the pinned
//! prefix; then the policy acts, its tool calls run in the sandbox, their results come back as
//! observations, until it submits or a budget ends the episode. The result is a token-exact
//! [`Trajectory`]: the tokens the policy saw and sampled are the tokens stored.
//!
//! **Tokens of a turn.** An assistant turn is exactly the policy's sampled tokens (its
//! end-of-turn token included). The observation turn that follows is the chat template's text
//! between the end of that assistant turn and the next generation prompt: rendered by the
//! template (`render(messages + [tool results], add_generation_prompt)` minus
//! `render(messages)`), tokenized with special tokens parsed for the template's framing, and
//! with special tokens *not* parsed for the tool's output, so a tool cannot forge a turn
//! boundary.
//!
//! **What the policy sees.** The pinned prefix, then as many of the latest turns as fit the
//! model's context (less the turn's token budget); the middle is dropped first, as trajectory
//! splitting does for training.
//!
//! **Budgets.** Turns, generated tokens and optionally wall time (the task's budget, narrowed
//! by the caller's stage budget), the sandbox's episode budget (wall time, fuel, bytes), and the model's context.
//! Whichever ends the episode is recorded in [`EpisodeEnd`]; the episode is then judged on the
//! state it reached.

use klong_sandbox::Sandbox;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use super::observation::{observe, ObservationError, ToolCall, SUBMIT_TOOL};
use super::task::Task;
use crate::policy::chat::{ChatError, ChatMessage, ChatTemplate};
use crate::policy::generate::GenerateError;
use crate::policy::sampling::{SamplingParams, StopReason};
use crate::policy::tokenizer::{Tokenizer, TokenizerError};
use crate::policy::toolcall::parse_assistant;
use crate::policy::{Policy, PolicyContext};
use crate::trajectory::{AssistantTurn, Trajectory, Turn};

/// The system prompt of every episode (the tools are listed by the chat template).
pub const SYSTEM_PROMPT: &str = "You are an agent that completes research tasks by calling \
tools. Call exactly the tools you need, one step at a time, and call `submit` when the task is \
done.";

/// Bounds of one episode.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeLimits {
    /// Policy turns.
    pub max_turns: u32,
    /// Tokens generated across the episode.
    pub max_generated_tokens: u64,
    /// Tokens one turn may generate.
    pub max_turn_tokens: usize,
    /// Bytes of one tool's output shown to the policy.
    pub max_observation_bytes: usize,
    /// Tool calls executed from one turn; more are answered with an error.
    pub max_calls_per_turn: usize,
    /// Wall time of the whole episode (generation and tool calls; judging excluded), checked
    /// before each turn: an RL stage's timeout. `None`: turns and tokens bound the episode.
    /// A wall-clock budget makes the episode depend on the machine's speed.
    pub max_wall_time: Option<std::time::Duration>,
}

/// Why an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpisodeEnd {
    /// The policy called `submit`.
    Submitted,
    /// The turn budget is spent.
    Turns,
    /// The generated-token budget is spent.
    Tokens,
    /// The sandbox's episode budget (wall time, fuel, bytes, files) is spent.
    Sandbox,
    /// The pinned prefix and the next turn no longer fit the model's context.
    Context,
    /// The episode's wall-time budget is spent.
    WallTime,
}

/// A finished episode: the trajectory and how it ended.
#[derive(Debug, Clone)]
pub struct PolicyEpisode {
    pub trajectory: Trajectory,
    pub end: EpisodeEnd,
    pub turns: u32,
    pub generated_tokens: u64,
    /// Turns whose text held no well-formed tool call.
    pub malformed_turns: u32,
    /// The conversation as messages (what export and text-level tools read).
    pub messages: Vec<ChatMessage>,
}

#[derive(Debug, Error)]
pub enum EpisodeError {
    #[error("policy: {0}")]
    Policy(#[from] GenerateError),
    #[error(transparent)]
    Infrastructure(#[from] ObservationError),
    #[error("chat template: {0}")]
    Template(#[from] ChatError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error(
        "the pinned prefix ({prefix} tokens) plus one turn ({turn} tokens) exceed the \
         model's context of {context} tokens"
    )]
    PrefixTooLong {
        prefix: usize,
        turn: usize,
        context: usize,
    },
    #[error(
        "the chat template does not render incrementally at turn {turn}: the conversation \
         with the tool results does not extend the conversation before them"
    )]
    NotIncremental { turn: u32 },
}

/// Runs one episode of `task` in `sandbox` (its files already in place).
#[allow(clippy::too_many_arguments)]
pub fn run_policy_episode(
    id: &str,
    task: &Task,
    sandbox: &mut Sandbox,
    policy: &mut dyn Policy,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    tools: &[Value],
    sampling: &SamplingParams,
    limits: &EpisodeLimits,
) -> Result<PolicyEpisode, EpisodeError> {
    let mut messages = vec![
        ChatMessage::system(SYSTEM_PROMPT),
        ChatMessage::user(task.paper.clone()),
    ];
    let opening = template.render(&messages, tools, true)?;
    let prefix = tokenizer.encode_template(&opening)?;
    let mut traj = Trajectory::new(id, Some(task.name.clone()), vec![Turn::Prompt(prefix)]);
    traj.tools = tools.to_vec();

    let eos = tokenizer.end_of_turn_strings()?;
    let mut turns = 0u32;
    let mut generated = 0u64;
    let mut malformed = 0u32;
    let started = std::time::Instant::now();
    let end = loop {
        if turns >= limits.max_turns {
            break EpisodeEnd::Turns;
        }
        if limits.max_wall_time.is_some_and(|w| started.elapsed() >= w) {
            break EpisodeEnd::WallTime;
        }
        let left = limits.max_generated_tokens.saturating_sub(generated);
        if left == 0 {
            break EpisodeEnd::Tokens;
        }
        let turn_budget = (limits.max_turn_tokens as u64).min(left) as usize;
        let Some(context) = fit_context(&traj, policy.context(), turn_budget)? else {
            break EpisodeEnd::Context;
        };
        let params = SamplingParams {
            max_new_tokens: turn_budget,
            // Each turn its own stream: the same episode seed gives the same episode.
            seed: sampling.seed.wrapping_add(u64::from(turns)),
            ..sampling.clone()
        };
        // One span per turn (inside the caller's episode span): the action, its tool calls.
        let turn_span = tracing::debug_span!("turn", n = turns + 1);
        let _turn = turn_span.enter();
        let completion = policy.act(
            &PolicyContext {
                tokens: &context,
                messages: &messages,
            },
            &params,
        )?;
        turns += 1;
        generated += completion.tokens.len() as u64;
        let text = completion.text.clone();
        let ended_cleanly = matches!(completion.stop, StopReason::Eos(_));
        traj.push_assistant(AssistantTurn::from_completion(
            &completion,
            policy.version(),
        ));
        messages.push(ChatMessage::assistant(text.clone(), Vec::new()));

        // The policy's tool calls, or an error it can read and correct.
        let mut results: Vec<(String, String)> = Vec::new();
        let mut submitted = false;
        let mut sandbox_spent = false;
        match parse_assistant(&text) {
            Ok(parsed) if parsed.calls.is_empty() => {
                malformed += 1;
                results.push((
                    "error".into(),
                    format!(
                        "error: no tool call found. Call a tool as <tool_call>{{\"name\": \
                         ..., \"arguments\": {{...}}}}</tool_call>, and `{SUBMIT_TOOL}` when \
                         done."
                    ),
                ));
            }
            Ok(parsed) => {
                for (i, call) in parsed.calls.into_iter().enumerate() {
                    if i >= limits.max_calls_per_turn {
                        results.push((
                            call.name.clone(),
                            format!(
                                "error: at most {} tool calls run per turn; this one did not",
                                limits.max_calls_per_turn
                            ),
                        ));
                        continue;
                    }
                    if !task.spec.tools.contains(&call.name) {
                        results.push((
                            call.name.clone(),
                            format!(
                                "error: the tool `{}` is not available in this task; the tools \
                                 are: {}",
                                call.name,
                                task.spec.tools.join(", ")
                            ),
                        ));
                        continue;
                    }
                    let obs = observe(
                        sandbox,
                        &ToolCall {
                            name: call.name.clone(),
                            arguments: call.arguments,
                        },
                        limits.max_observation_bytes,
                    )?;
                    results.push((call.name.clone(), obs.text));
                    if obs.ends_episode {
                        if call.name == SUBMIT_TOOL {
                            submitted = true;
                        } else {
                            sandbox_spent = true;
                        }
                        break;
                    }
                }
            }
            Err(e) => {
                malformed += 1;
                results.push(("error".into(), format!("error: malformed tool call: {e}")));
            }
        }
        if submitted {
            break EpisodeEnd::Submitted;
        }
        if sandbox_spent {
            break EpisodeEnd::Sandbox;
        }
        // The observation turn: template framing + tool outputs, up to the next generation
        // prompt.
        let before = template.render(&messages, tools, false)?;
        let mut with_results = messages.clone();
        for (name, content) in &results {
            with_results.push(ChatMessage::tool(name.clone(), content.clone()));
        }
        let after = template.render(&with_results, tools, true)?;
        let Some(delta) = after.strip_prefix(before.as_str()) else {
            return Err(EpisodeError::NotIncremental { turn: turns });
        };
        // What the template writes after the assistant's text: after its end-of-turn token
        // when the policy emitted one, else from the template's own end-of-turn on.
        let tail = match eos
            .iter()
            .filter_map(|e| before.rfind(e.as_str()).map(|i| (i, e)))
            .max()
        {
            Some((i, e)) if ended_cleanly => &before[i + e.len()..],
            Some((i, _)) => &before[i..],
            None => "",
        };
        let framing = format!("{tail}{delta}");
        let tokens = encode_observation(tokenizer, &framing, &results)?;
        traj.push_observation(tokens);
        messages = with_results;
    };
    Ok(PolicyEpisode {
        trajectory: traj,
        end,
        turns,
        generated_tokens: generated,
        malformed_turns: malformed,
        messages,
    })
}

/// The pinned prefix plus the latest whole turns that fit `context - turn_budget`, or `None`
/// when the prefix itself no longer leaves room (the episode ends on the context).
fn fit_context(
    traj: &Trajectory,
    context: usize,
    turn_budget: usize,
) -> Result<Option<Vec<u32>>, EpisodeError> {
    let prefix: Vec<u32> = traj
        .prefix
        .iter()
        .flat_map(|t| t.tokens())
        .copied()
        .collect();
    if prefix.len() + 1 > context {
        return Err(EpisodeError::PrefixTooLong {
            prefix: prefix.len(),
            turn: turn_budget,
            context,
        });
    }
    let room = context.saturating_sub(turn_budget);
    if prefix.len() >= room {
        return Ok(None);
    }
    let mut take = 0usize;
    let mut used = prefix.len();
    for turn in traj.turns.iter().rev() {
        if used + turn.len() > room {
            break;
        }
        used += turn.len();
        take += 1;
    }
    let mut out = prefix;
    for turn in &traj.turns[traj.turns.len() - take..] {
        out.extend_from_slice(turn.tokens());
    }
    Ok(Some(out))
}

/// The observation's text, with each tool output's first occurrence (in order) encoded as
/// untrusted text and everything around it as framing.
fn encode_observation(
    tokenizer: &Tokenizer,
    text: &str,
    results: &[(String, String)],
) -> Result<Vec<u32>, TokenizerError> {
    let mut out = Vec::new();
    let mut rest = text;
    for (_, content) in results {
        if content.is_empty() {
            continue;
        }
        let Some(at) = rest.find(content.as_str()) else {
            continue;
        };
        out.extend(tokenizer.encode_template(&rest[..at])?);
        out.extend(tokenizer.encode_untrusted(content)?);
        rest = &rest[at + content.len()..];
    }
    out.extend(tokenizer.encode_template(rest)?);
    Ok(out)
}
