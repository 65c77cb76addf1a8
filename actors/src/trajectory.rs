//! Trajectories: what an episode was, token for token, and what the learner trains on.
//!
//! A [`Trajectory`] is a pinned prefix (system prompt, task statement, paper-reading turns)
//! followed by turns. The concatenation of every turn's tokens, prefix first, *is* the model's
//! input: nothing is re-tokenized between rollout and learner (design §3, §5).
//!
//! # Where the chat template's framing goes
//!
//! An [`AssistantTurn`] holds exactly the tokens the policy generated, its end-of-turn token
//! included (`<|im_end|>` for ChatML: the policy chose to stop, and that choice is trained).
//! Every token the environment adds around them is a non-assistant turn: the framing that
//! opens the next assistant turn (`<|im_start|>assistant\n`, the generation prompt) ends the
//! [`Turn::Prompt`] or [`Turn::Observation`] before it, and the framing after the end-of-turn
//! token (`\n` in ChatML) starts the turn after it. So a trajectory alternates between what
//! the environment appended and what the policy sampled, and only the latter carries loss.
//! The text after the final assistant turn's end-of-turn token (never seen by the model) is
//! not part of an imported trajectory.
//!
//! # Building one from a rollout
//!
//! The environment starts with [`Trajectory::new`] (the rendered prompt, generation prompt
//! included, as the pinned prefix), then per step pushes [`AssistantTurn::from_completion`]
//! (the completion's tokens and sampling logprobs, as generated) and the observation turn it
//! appends: the framing after the assistant's end-of-turn token, the tool result (tokenized
//! without special tokens: untrusted text must not forge turn boundaries), and the next
//! generation prompt. A turn cut by the token budget has no end-of-turn token; the framing
//! that closes it is then the environment's, in the next turn, and carries no loss.
//!
//! # Turn indices
//!
//! Turns are numbered across the prefix and the body: the prefix's turns are `0..prefix.len()`,
//! the body's follow (see [`Trajectory::turn`]). Splitting reports positions that way.
//!
//! # JSONL
//!
//! [`import_jsonl`] reads OpenAI-style chat data made elsewhere (one conversation per line,
//! `{"messages": [...], "tools"?: [...], "reward"?: number, "id"?: string}`) and tokenizes
//! each conversation once with the model's chat template (see [`tokenize_conversation`]);
//! [`export_jsonl`] writes trajectories back in the same format, the text decoded from the
//! tokens. Export parses the ChatML layout (the built-in template, Qwen and SmolLM2 use it) and
//! checks that re-rendering the messages gives the trajectory's text back.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::policy::chat::{ChatError, ChatMessage, ChatTemplate, Role};
use crate::policy::generate::Completion;
use crate::policy::tokenizer::{Tokenizer, TokenizerError};
use crate::policy::toolcall::{parse_assistant, render_tool_call, ToolCallRequest, OPEN_TAG};

/// The tokens the policy sampled for one assistant turn (end-of-turn token included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantTurn {
    pub tokens: Vec<u32>,
    /// The behaviour policy's logprob of each token (what PPO's ratio divides by); `None` for
    /// data made elsewhere (imported JSONL), which can serve SFT only.
    pub logprobs: Option<Vec<f32>>,
    /// The version of the weights that sampled the turn; `None` for imported data.
    pub policy_version: Option<u64>,
}

impl AssistantTurn {
    /// A turn from a [`Completion`] of [`crate::policy::generate::generate`]: its tokens (EOS
    /// included when it ended on one) and their sampling logprobs.
    pub fn from_completion(completion: &Completion, policy_version: u64) -> Self {
        AssistantTurn {
            tokens: completion.tokens.clone(),
            logprobs: Some(completion.logprobs.clone()),
            policy_version: Some(policy_version),
        }
    }
}

/// One turn of a trajectory. Only [`Turn::Assistant`] tokens ever carry loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Turn {
    /// System or user text, or template framing alone: context only.
    Prompt(Vec<u32>),
    /// What the policy generated.
    Assistant(AssistantTurn),
    /// A tool result as the model reads it, with the template's framing: context only.
    Observation(Vec<u32>),
}

impl Turn {
    pub fn tokens(&self) -> &[u32] {
        match self {
            Turn::Prompt(t) | Turn::Observation(t) => t,
            Turn::Assistant(a) => &a.tokens,
        }
    }
    pub fn len(&self) -> usize {
        self.tokens().len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens().is_empty()
    }
    /// Whether the turn's tokens are training targets (assistant turns only).
    pub fn is_assistant(&self) -> bool {
        matches!(self, Turn::Assistant(_))
    }
    pub fn as_assistant(&self) -> Option<&AssistantTurn> {
        match self {
            Turn::Assistant(a) => Some(a),
            _ => None,
        }
    }
}

/// A judged trajectory's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    pub reward: f64,
    /// Rubric leaf id -> score in `[0, 1]` (empty for imported data with a bare reward).
    pub grades: BTreeMap<String, f64>,
}

/// One episode, token-exact. See the module docs for the layout.
///
/// Serde: every field is plain data (tools are kept as one JSON string), so any serde format
/// works, compact binary ones included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub id: String,
    /// The task the episode ran (`None` for imported data).
    pub task: Option<String>,
    /// The OpenAI-style tools list the prompt was rendered with (for export).
    #[serde(with = "json_string")]
    pub tools: Vec<Value>,
    /// The pinned prefix: present, untruncated, in every sub-trajectory of a split.
    pub prefix: Vec<Turn>,
    /// The turns after the prefix.
    pub turns: Vec<Turn>,
    pub outcome: Option<Judged>,
}

/// Serializes a list of JSON values as one JSON string, so formats that are not
/// self-describing (bincode, postcard) can hold them.
mod json_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(v: &[Value], s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(v).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

/// A broken invariant of a [`Trajectory`]. `turn` is the index across prefix and body.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TrajectoryError {
    #[error("turn {turn}: {tokens} tokens but {logprobs} logprobs")]
    LogprobCount {
        turn: usize,
        tokens: usize,
        logprobs: usize,
    },
    #[error("turn {turn}: logprob {index} is {value}, not a finite number <= 0")]
    BadLogprob {
        turn: usize,
        index: usize,
        value: f32,
    },
    #[error(
        "the first token of the trajectory (turn {turn}) is an assistant token: nothing \
         precedes it, so it cannot be a training target"
    )]
    AssistantFirst { turn: usize },
    #[error("turn {turn}: token id {id} is outside the vocabulary ({vocab})")]
    TokenOutOfRange { turn: usize, id: u32, vocab: usize },
    #[error("the reward is {0}, not a finite number")]
    BadReward(f64),
    #[error("rubric leaf {leaf:?} has the grade {value}, not a finite number")]
    BadGrade { leaf: String, value: f64 },
}

/// Rounding slack for logprobs that should be <= 0.
const LOGPROB_SLACK: f32 = 1e-4;

impl Trajectory {
    /// An empty trajectory with this pinned prefix; the environment pushes turns onto it.
    pub fn new(id: impl Into<String>, task: Option<String>, prefix: Vec<Turn>) -> Self {
        Trajectory {
            id: id.into(),
            task,
            tools: Vec::new(),
            prefix,
            turns: Vec::new(),
            outcome: None,
        }
    }

    /// Appends what the policy generated.
    pub fn push_assistant(&mut self, turn: AssistantTurn) {
        self.turns.push(Turn::Assistant(turn));
    }

    /// Appends a tool observation (with the template framing around it).
    pub fn push_observation(&mut self, tokens: Vec<u32>) {
        self.turns.push(Turn::Observation(tokens));
    }

    /// Appends prompt text or framing that is neither the policy's nor a tool's.
    pub fn push_prompt(&mut self, tokens: Vec<u32>) {
        self.turns.push(Turn::Prompt(tokens));
    }

    /// Records the judge's verdict.
    pub fn judge(&mut self, reward: f64, grades: BTreeMap<String, f64>) {
        self.outcome = Some(Judged { reward, grades });
    }

    /// The number of turns, prefix included.
    pub fn num_turns(&self) -> usize {
        self.prefix.len() + self.turns.len()
    }

    /// Turn `i` counted across the prefix and the body.
    pub fn turn(&self, i: usize) -> Option<&Turn> {
        match i.checked_sub(self.prefix.len()) {
            None => self.prefix.get(i),
            Some(j) => self.turns.get(j),
        }
    }

    /// Every turn, prefix first.
    pub fn all_turns(&self) -> impl Iterator<Item = &Turn> + '_ {
        self.prefix.iter().chain(&self.turns)
    }

    /// Tokens in the pinned prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix.iter().map(Turn::len).sum()
    }

    /// Tokens in the whole trajectory.
    pub fn len(&self) -> usize {
        self.all_turns().map(Turn::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Assistant tokens (the training targets), prefix included.
    pub fn assistant_len(&self) -> usize {
        self.all_turns()
            .filter(|t| t.is_assistant())
            .map(Turn::len)
            .sum()
    }

    /// The model input: every turn's tokens, prefix first.
    pub fn tokens(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len());
        for t in self.all_turns() {
            out.extend_from_slice(t.tokens());
        }
        out
    }

    /// Checks the invariants: one finite logprob (<= 0) per assistant token, a first token
    /// that is not an assistant token, a finite reward and grades.
    pub fn validate(&self) -> Result<(), TrajectoryError> {
        let mut seen_token = false;
        for (turn, t) in self.all_turns().enumerate() {
            if let Turn::Assistant(a) = t {
                if !seen_token && !a.tokens.is_empty() {
                    return Err(TrajectoryError::AssistantFirst { turn });
                }
                if let Some(lp) = &a.logprobs {
                    if lp.len() != a.tokens.len() {
                        return Err(TrajectoryError::LogprobCount {
                            turn,
                            tokens: a.tokens.len(),
                            logprobs: lp.len(),
                        });
                    }
                    if let Some((index, &value)) = lp
                        .iter()
                        .enumerate()
                        .find(|(_, v)| !v.is_finite() || **v > LOGPROB_SLACK)
                    {
                        return Err(TrajectoryError::BadLogprob { turn, index, value });
                    }
                }
            }
            seen_token |= !t.is_empty();
        }
        if let Some(j) = &self.outcome {
            if !j.reward.is_finite() {
                return Err(TrajectoryError::BadReward(j.reward));
            }
            if let Some((leaf, &value)) = j.grades.iter().find(|(_, v)| !v.is_finite()) {
                return Err(TrajectoryError::BadGrade {
                    leaf: leaf.clone(),
                    value,
                });
            }
        }
        Ok(())
    }

    /// Checks every token id against a vocabulary size.
    pub fn validate_vocab(&self, vocab: usize) -> Result<(), TrajectoryError> {
        for (turn, t) in self.all_turns().enumerate() {
            if let Some(&id) = t.tokens().iter().find(|&&id| id as usize >= vocab) {
                return Err(TrajectoryError::TokenOutOfRange { turn, id, vocab });
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizing a conversation

/// Which leading messages of an imported conversation form the pinned prefix.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PrefixRule {
    /// Everything before the first assistant message (system + first user message(s)), and
    /// the generation prompt that opens it.
    #[default]
    BeforeFirstAssistant,
    /// The first `K` messages (with the framing that follows the last of them, when the next
    /// message is an assistant message).
    FirstMessages(usize),
    /// Every message up to and including the first whose content contains the marker.
    ThroughMarker(String),
}

/// Why a conversation does not tokenize into a trajectory; `message` is the index of the
/// message at fault, where there is one.
#[derive(Debug, Error)]
pub enum ConversationError {
    #[error("the conversation has no messages")]
    Empty,
    #[error("message 0 is an assistant message: nothing precedes it to predict it from")]
    AssistantFirst,
    #[error(
        "message {message}: the chat template does not render the conversation incrementally \
         (rendering the messages before it is not a prefix of rendering them all)"
    )]
    NotIncremental { message: usize },
    #[error(
        "message {message}: tokenizing the messages one by one does not give the tokens of the \
         whole conversation (token {position} differs)"
    )]
    TokenBoundary { message: usize, position: usize },
    #[error("no message contains the prefix marker {0:?}")]
    MarkerNotFound(String),
    #[error(transparent)]
    Template(#[from] ChatError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Invalid(#[from] TrajectoryError),
}

impl ConversationError {
    /// The index of the message at fault, where there is one.
    pub fn message(&self) -> Option<usize> {
        match self {
            ConversationError::AssistantFirst => Some(0),
            ConversationError::NotIncremental { message }
            | ConversationError::TokenBoundary { message, .. } => Some(*message),
            _ => None,
        }
    }
}

/// A piece of the rendered conversation: a byte range of the text, the turn kind, the message
/// it belongs to.
struct Piece {
    start: usize,
    end: usize,
    role: PieceRole,
    message: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PieceRole {
    Prompt,
    Assistant,
    Observation,
}

/// Tokenizes a conversation once with the chat template into (prefix, turns).
///
/// The conversation is rendered whole; each message's share of the text is found by
/// rendering incrementally: an assistant message starts where `messages[..i]` rendered with
/// the generation prompt ends, and ends after the last end-of-turn token (the tokenizer's eos
/// token or eos ids) within `messages[..=i]` (with it, when there is none); any other message
/// ends where `messages[..=i]` stops agreeing with the whole text (templates that group
/// consecutive tool results close the group only after the last one). Each share is tokenized on its own (special tokens parsed, as generation
/// prompts are) and the shares must concatenate to the tokenization of the whole text, else
/// [`ConversationError::TokenBoundary`] names the message where they part.
///
/// One turn per message, tool results as [`Turn::Observation`], system and user messages as
/// [`Turn::Prompt`]; the framing between two consecutive assistant messages is a prompt turn
/// of its own. Assistant turns carry no logprobs and no policy version.
pub fn tokenize_conversation(
    messages: &[ChatMessage],
    tools: &[Value],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    prefix: &PrefixRule,
) -> Result<(Vec<Turn>, Vec<Turn>), ConversationError> {
    if messages.is_empty() {
        return Err(ConversationError::Empty);
    }
    if messages[0].role == Role::Assistant {
        return Err(ConversationError::AssistantFirst);
    }
    let full = template.render(messages, tools, false)?;
    let eos = tokenizer.end_of_turn_strings()?;
    let mut pieces: Vec<Piece> = Vec::with_capacity(messages.len() + 1);
    let mut cursor = 0usize;
    for (j, m) in messages.iter().enumerate() {
        let not_incremental = ConversationError::NotIncremental { message: j };
        if m.role == Role::Assistant {
            let opened = template.render(&messages[..j], tools, true)?;
            if !full.starts_with(&opened) || opened.len() < cursor {
                return Err(not_incremental);
            }
            let start = opened.len();
            if start > cursor {
                match pieces.last_mut() {
                    Some(p) if p.role != PieceRole::Assistant => p.end = start,
                    _ => pieces.push(Piece {
                        start: cursor,
                        end: start,
                        role: PieceRole::Prompt,
                        message: j,
                    }),
                }
            }
            let closed = template.render(&messages[..=j], tools, false)?;
            if !full.starts_with(&closed) || closed.len() < start {
                return Err(not_incremental);
            }
            // Through the last end-of-turn token; all of it when the template writes none.
            let end = eos
                .iter()
                .filter_map(|e| {
                    closed[start..]
                        .rfind(e.as_str())
                        .map(|k| start + k + e.len())
                })
                .max()
                .unwrap_or(closed.len());
            pieces.push(Piece {
                start,
                end,
                role: PieceRole::Assistant,
                message: j,
            });
            cursor = end;
        } else {
            let closed = template.render(&messages[..=j], tools, false)?;
            let end = common_prefix(&closed, &full);
            if end < cursor {
                return Err(not_incremental);
            }
            let role = if m.role == Role::Tool {
                PieceRole::Observation
            } else {
                PieceRole::Prompt
            };
            pieces.push(Piece {
                start: cursor,
                end,
                role,
                message: j,
            });
            cursor = end;
        }
    }
    // Text after the last piece: framing after a final assistant turn is dropped (the model
    // never saw it); after anything else it belongs to the last turn.
    if let Some(last) = pieces.last_mut() {
        if last.role != PieceRole::Assistant {
            last.end = full.len();
            cursor = full.len();
        }
    }

    // Tokenize piece by piece and check against the whole.
    let whole = tokenizer.encode_template(&full[..cursor])?;
    let mut toks: Vec<Vec<u32>> = Vec::with_capacity(pieces.len());
    let mut pos = 0usize;
    for p in &pieces {
        let t = tokenizer.encode_template(&full[p.start..p.end])?;
        let fits = whole
            .get(pos..pos + t.len())
            .is_some_and(|w| w == t.as_slice());
        if !fits {
            let offset = t
                .iter()
                .zip(whole.get(pos..).unwrap_or_default())
                .take_while(|(a, b)| a == b)
                .count();
            return Err(ConversationError::TokenBoundary {
                message: p.message,
                position: pos + offset,
            });
        }
        pos += t.len();
        toks.push(t);
    }
    if pos != whole.len() {
        let message = pieces.last().map_or(0, |p| p.message);
        return Err(ConversationError::TokenBoundary {
            message,
            position: pos,
        });
    }

    // The prefix: the pieces of the first K messages.
    let k = match prefix {
        PrefixRule::BeforeFirstAssistant => messages
            .iter()
            .position(|m| m.role == Role::Assistant)
            .unwrap_or(messages.len()),
        PrefixRule::FirstMessages(k) => (*k).min(messages.len()),
        PrefixRule::ThroughMarker(marker) => {
            messages
                .iter()
                .position(|m| m.content.contains(marker.as_str()))
                .ok_or_else(|| ConversationError::MarkerNotFound(marker.clone()))?
                + 1
        }
    };
    let mut prefix_turns = Vec::new();
    let mut turns = Vec::new();
    for (p, t) in pieces.iter().zip(toks) {
        let turn = match p.role {
            PieceRole::Prompt => Turn::Prompt(t),
            PieceRole::Observation => Turn::Observation(t),
            PieceRole::Assistant => Turn::Assistant(AssistantTurn {
                tokens: t,
                logprobs: None,
                policy_version: None,
            }),
        };
        if p.message < k {
            prefix_turns.push(turn);
        } else {
            turns.push(turn);
        }
    }
    Ok((prefix_turns, turns))
}

/// The length of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// JSONL import

/// Bounds and the prefix rule for [`import_jsonl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    pub prefix: PrefixRule,
    /// A longer line is an error (the line is not read into memory past this).
    pub max_line_bytes: usize,
    /// A conversation with more messages is an error. Finding the messages' shares renders
    /// the conversation once per message, so the cost grows with messages x text.
    pub max_messages: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            prefix: PrefixRule::default(),
            max_line_bytes: 64 << 20,
            max_messages: 4096,
        }
    }
}

/// What went wrong on one line of a JSONL file.
#[derive(Debug, Error)]
pub enum ImportErrorKind {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("the line is longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error("the line is not UTF-8")]
    NotUtf8,
    #[error("not a conversation: {0}")]
    Json(String),
    #[error("{count} messages, more than the {max} allowed")]
    TooManyMessages { count: usize, max: usize },
    #[error("{0}")]
    Message(String),
    #[error(transparent)]
    Conversation(#[from] ConversationError),
}

/// An import error: `file:line`, the message index where there is one, and what went wrong.
#[derive(Debug, Error)]
pub struct ImportError {
    pub file: String,
    pub line: usize,
    pub message: Option<usize>,
    /// Boxed: the error travels up through `Result`s, and most of its variants are large.
    pub kind: Box<ImportErrorKind>,
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        match self.message {
            // ConversationError's own text already names the message.
            Some(m) if !matches!(*self.kind, ImportErrorKind::Conversation(_)) => {
                write!(f, "message {m}: {}", self.kind)
            }
            _ => write!(f, "{}", self.kind),
        }
    }
}

/// One line of the JSONL format.
#[derive(Debug, Deserialize)]
struct WireRecord {
    messages: Vec<WireMessage>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    reward: Option<f64>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: Role,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    arguments: Value,
}

impl WireMessage {
    /// Content may be a string, null, or OpenAI's list of parts (text parts only).
    fn into_chat(self) -> Result<ChatMessage, String> {
        let content = match self.content {
            Value::Null => String::new(),
            Value::String(s) => s,
            Value::Array(parts) => {
                let mut out = String::new();
                for (i, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => out.push_str(t),
                        _ => return Err(format!("content part {i} is not a text part")),
                    }
                }
                out
            }
            _ => return Err("content must be a string, null or a list of text parts".into()),
        };
        let mut tool_calls = Vec::with_capacity(self.tool_calls.len());
        for (i, c) in self.tool_calls.into_iter().enumerate() {
            if self.role != Role::Assistant {
                return Err("only assistant messages may have tool_calls".into());
            }
            if c.function.name.is_empty() {
                return Err(format!("tool call {i} has an empty name"));
            }
            let arguments = match c.function.arguments {
                v @ Value::Object(_) => v,
                Value::String(s) => match serde_json::from_str::<Value>(&s) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return Err(format!(
                            "tool call {i}: arguments must be a JSON object (or a string \
                             holding one)"
                        ))
                    }
                },
                _ => {
                    return Err(format!(
                        "tool call {i}: arguments must be a JSON object (or a string holding one)"
                    ))
                }
            };
            tool_calls.push(ToolCallRequest {
                name: c.function.name,
                arguments,
            });
        }
        Ok(ChatMessage {
            role: self.role,
            content,
            tool_calls,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

/// Reads OpenAI-style chat JSONL (see the module docs); `file` names the source in errors.
/// Blank lines are skipped. A trajectory's id is the line's `id`, else `file:line`; a
/// `reward` becomes an outcome without rubric grades.
pub fn import_jsonl<R: BufRead>(
    mut reader: R,
    file: &str,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    options: &ImportOptions,
) -> Result<Vec<Trajectory>, ImportError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        line += 1;
        let err = |message: Option<usize>, kind: ImportErrorKind| ImportError {
            file: file.to_string(),
            line,
            message,
            kind: Box::new(kind),
        };
        buf.clear();
        let limit = options.max_line_bytes as u64 + 1;
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|e| err(None, e.into()))?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > options.max_line_bytes {
            return Err(err(
                None,
                ImportErrorKind::LineTooLong {
                    max: options.max_line_bytes,
                },
            ));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let text = std::str::from_utf8(&buf).map_err(|_| err(None, ImportErrorKind::NotUtf8))?;
        if text.trim().is_empty() {
            continue;
        }
        let record: WireRecord = serde_json::from_str(text)
            .map_err(|e| err(None, ImportErrorKind::Json(e.to_string())))?;
        if record.messages.len() > options.max_messages {
            return Err(err(
                None,
                ImportErrorKind::TooManyMessages {
                    count: record.messages.len(),
                    max: options.max_messages,
                },
            ));
        }
        let mut messages = Vec::with_capacity(record.messages.len());
        for (i, m) in record.messages.into_iter().enumerate() {
            messages.push(
                m.into_chat()
                    .map_err(|e| err(Some(i), ImportErrorKind::Message(e)))?,
            );
        }
        let (prefix, turns) = tokenize_conversation(
            &messages,
            &record.tools,
            tokenizer,
            template,
            &options.prefix,
        )
        .map_err(|e| err(e.message(), e.into()))?;
        let traj = Trajectory {
            id: record.id.unwrap_or_else(|| format!("{file}:{line}")),
            task: None,
            tools: record.tools,
            prefix,
            turns,
            outcome: record.reward.map(|reward| Judged {
                reward,
                grades: BTreeMap::new(),
            }),
        };
        traj.validate()
            .map_err(|e| err(None, ConversationError::from(e).into()))?;
        out.push(traj);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// JSONL export

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("trajectory {id}: {message}")]
    NotChatMl { id: String, message: String },
    #[error("trajectory {id}: the exported messages do not render back to the trajectory's text")]
    NotRoundTrip { id: String },
    #[error("trajectory {id}: {source}")]
    Template { id: String, source: ChatError },
    #[error("trajectory {id}: {source}")]
    Tokenizer { id: String, source: TokenizerError },
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const TOOLS_HEADER: &str = "# Tools\n\nYou may call one or more functions";
const TOOL_RESPONSE_OPEN: &str = "<tool_response>\n";
const TOOL_RESPONSE_CLOSE: &str = "\n</tool_response>";

/// The messages of a trajectory, read back from its decoded text (ChatML layout). Checks that
/// rendering them with `template` reproduces the text.
pub fn to_messages(
    traj: &Trajectory,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Vec<ChatMessage>, ExportError> {
    let id = || traj.id.clone();
    let text = tokenizer
        .decode(&traj.tokens())
        .map_err(|source| ExportError::Tokenizer { id: id(), source })?;
    let messages =
        parse_chatml(&text).map_err(|message| ExportError::NotChatMl { id: id(), message })?;
    let rendered = template
        .render(&messages, &traj.tools, false)
        .map_err(|source| ExportError::Template { id: id(), source })?;
    if !rendered.starts_with(&text) {
        return Err(ExportError::NotRoundTrip { id: id() });
    }
    Ok(messages)
}

/// Splits ChatML text into messages: `<|im_start|>role\n...<|im_end|>\n` blocks, the tools
/// section of the system block dropped, `<tool_response>` blocks of a user block as tool
/// messages, assistant blocks parsed for `<tool_call>`s (kept as plain text when they do not
/// parse, e.g. a turn cut by the token budget).
fn parse_chatml(text: &str) -> Result<Vec<ChatMessage>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let Some(block) = rest.strip_prefix(IM_START) else {
            return Err(format!(
                "expected {IM_START} at byte {}",
                text.len() - rest.len()
            ));
        };
        let (body, next) = match block.find(IM_END) {
            Some(k) => {
                let after = &block[k + IM_END.len()..];
                (&block[..k], after.strip_prefix('\n').unwrap_or(after))
            }
            None => (block, ""),
        };
        rest = next;
        let (role, content) = body.split_once('\n').unwrap_or((body, ""));
        match role {
            // A system block that is only the tools section had no system message.
            "system" => match content.find(TOOLS_HEADER) {
                Some(0) => {}
                Some(k) => out.push(ChatMessage::system(
                    content[..k].strip_suffix("\n\n").unwrap_or(&content[..k]),
                )),
                None => out.push(ChatMessage::system(content)),
            },
            "user" if content.starts_with(TOOL_RESPONSE_OPEN) => {
                let mut r = content;
                while let Some(after) = r.strip_prefix(TOOL_RESPONSE_OPEN) {
                    let (c, tail) = match after.find(TOOL_RESPONSE_CLOSE) {
                        Some(k) => (&after[..k], &after[k + TOOL_RESPONSE_CLOSE.len()..]),
                        None => (after, ""),
                    };
                    out.push(ChatMessage {
                        role: Role::Tool,
                        content: c.to_string(),
                        tool_calls: Vec::new(),
                        tool_call_id: None,
                        name: None,
                    });
                    r = tail.strip_prefix('\n').unwrap_or(tail);
                }
                if !r.is_empty() {
                    return Err("text after the last <tool_response> of a user block".into());
                }
            }
            "user" => out.push(ChatMessage::user(content)),
            "assistant" => out.push(assistant_message(content)),
            other => return Err(format!("unknown role {other:?}")),
        }
    }
    Ok(out)
}

/// An assistant block's text as a message: content and tool calls when the text is exactly
/// how ChatML writes them (`content`, then `\n<tool_call>...` per call), else all of it as
/// content (a turn cut short, free text between calls, ...), which renders back the same.
fn assistant_message(body: &str) -> ChatMessage {
    if let Ok(p) = parse_assistant(body) {
        if let Some(k) = body.find(OPEN_TAG).filter(|_| !p.calls.is_empty()) {
            let content = &body[..k];
            let content = content.strip_suffix('\n').unwrap_or(content);
            let mut rendered = String::new();
            if !content.is_empty() {
                rendered.push_str(content);
                rendered.push('\n');
            }
            let calls: Vec<String> = p.calls.iter().map(render_tool_call).collect();
            rendered.push_str(&calls.join("\n"));
            if rendered == body {
                return ChatMessage::assistant(content, p.calls);
            }
        }
    }
    ChatMessage::assistant(body, Vec::new())
}

/// One message in OpenAI's wire format (arguments as a JSON string).
fn wire_message(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role.as_str(), "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({"type": "function", "function": {
                    "name": c.name,
                    "arguments": c.arguments.to_string(),
                }})
            })
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    if let Some(name) = &m.name {
        v["name"] = json!(name);
    }
    v
}

/// Writes trajectories as OpenAI-style chat JSONL, one line each: `id`, `messages` (text
/// decoded from the tokens, see [`to_messages`]), `tools` when there are some, `reward` when
/// judged.
pub fn export_jsonl<W: Write>(
    mut writer: W,
    trajectories: &[Trajectory],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<(), ExportError> {
    for t in trajectories {
        let messages = to_messages(t, tokenizer, template)?;
        let mut line = json!({
            "id": t.id,
            "messages": messages.iter().map(wire_message).collect::<Vec<_>>(),
        });
        if !t.tools.is_empty() {
            line["tools"] = Value::Array(t.tools.clone());
        }
        if let Some(j) = &t.outcome {
            line["reward"] = json!(j.reward);
        }
        serde_json::to_writer(&mut writer, &line).map_err(std::io::Error::from)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()?;
    Ok(())
}
