//! Tool calls in assistant text: the Hermes / Qwen convention
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
//!
//! The parser is strict on purpose: a malformed call is a typed error with a byte offset, never
//! a guess. During RL a malformed call is the policy's mistake and must be visible as one (to be
//! shown to the agent or penalised), not silently repaired into a different action.
//!
//! One leniency: `arguments` may be a JSON *string* holding a JSON object (some models, and
//! OpenAI's wire format, emit arguments that way); it is decoded into the object.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// The opening tag of a tool call.
pub const OPEN_TAG: &str = "<tool_call>";
/// The closing tag of a tool call.
pub const CLOSE_TAG: &str = "</tool_call>";
/// At most this many calls in one assistant turn: bounds the work one turn can request.
pub const MAX_CALLS: usize = 16;
/// At most this many bytes of assistant text are parsed: a bound on parser time and memory
/// whatever the model generated.
pub const MAX_TEXT_BYTES: usize = 256 * 1024;

/// One tool call the assistant requested. `arguments` is always a JSON object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRequest {
    pub name: String,
    pub arguments: Value,
}

/// An assistant turn split into its free text and its tool calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedAssistant {
    /// The text outside the tool calls, concatenated and trimmed of surrounding whitespace.
    pub content: String,
    /// The calls, in the order they appear.
    pub calls: Vec<ToolCallRequest>,
}

/// Why assistant text is not a well-formed turn. `at` is a byte offset into the parsed text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ToolCallError {
    #[error("assistant text is {len} bytes, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("more than {max} tool calls (the one past the limit starts at byte {at})")]
    TooManyCalls { max: usize, at: usize },
    #[error("<tool_call> at byte {at} is never closed")]
    Unclosed { at: usize },
    #[error("</tool_call> at byte {at} closes nothing")]
    StrayClose { at: usize },
    #[error("<tool_call> at byte {at} is nested inside the call opened at byte {outer}")]
    Nested { at: usize, outer: usize },
    #[error("tool call at byte {at} is not valid JSON: {message}")]
    InvalidJson { at: usize, message: String },
    #[error("tool call at byte {at} is not a JSON object")]
    NotAnObject { at: usize },
    #[error("tool call at byte {at} has no \"name\"")]
    MissingName { at: usize },
    #[error("tool call at byte {at}: \"name\" must be a non-empty string")]
    NameNotString { at: usize },
    #[error("tool call at byte {at} has no \"arguments\"")]
    MissingArguments { at: usize },
    #[error(
        "tool call at byte {at}: \"arguments\" must be a JSON object (or a string holding one)"
    )]
    ArgumentsNotObject { at: usize },
    #[error(
        "tool call at byte {at} has the unexpected key {key:?} (only \"name\" and \"arguments\")"
    )]
    ExtraKey { at: usize, key: String },
}

/// Parses assistant text into its content and tool calls; see the module docs for the rules.
pub fn parse_assistant(text: &str) -> Result<ParsedAssistant, ToolCallError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ToolCallError::TooLong {
            len: text.len(),
            max: MAX_TEXT_BYTES,
        });
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut pos = 0;
    loop {
        let open = find_from(text, pos, OPEN_TAG);
        let close = find_from(text, pos, CLOSE_TAG);
        let open_at = match (open, close) {
            (None, None) => {
                content.push_str(&text[pos..]);
                break;
            }
            (_, Some(c)) if open.is_none_or(|o| c < o) => {
                return Err(ToolCallError::StrayClose { at: c });
            }
            (Some(o), _) => o,
            // Unreachable by the guards above, but kept total rather than panicking.
            (None, Some(c)) => return Err(ToolCallError::StrayClose { at: c }),
        };
        content.push_str(&text[pos..open_at]);
        if calls.len() == MAX_CALLS {
            return Err(ToolCallError::TooManyCalls {
                max: MAX_CALLS,
                at: open_at,
            });
        }
        let body_start = open_at + OPEN_TAG.len();
        let close_at = match find_from(text, body_start, CLOSE_TAG) {
            Some(c) => c,
            None => match find_from(text, body_start, OPEN_TAG) {
                Some(inner) => {
                    return Err(ToolCallError::Nested {
                        at: inner,
                        outer: open_at,
                    })
                }
                None => return Err(ToolCallError::Unclosed { at: open_at }),
            },
        };
        if let Some(inner) = find_from(text, body_start, OPEN_TAG).filter(|&i| i < close_at) {
            return Err(ToolCallError::Nested {
                at: inner,
                outer: open_at,
            });
        }
        calls.push(parse_call(&text[body_start..close_at], open_at)?);
        pos = close_at + CLOSE_TAG.len();
    }
    Ok(ParsedAssistant {
        content: content.trim().to_string(),
        calls,
    })
}

/// Renders a call as the model is taught to write it (the Qwen2.5 template's layout).
pub fn render_tool_call(call: &ToolCallRequest) -> String {
    let json = format!(
        "{{\"name\": {}, \"arguments\": {}}}",
        py_json_dumps(&Value::String(call.name.clone()), None),
        py_json_dumps(&call.arguments, None)
    );
    // A string value may hold a tag (decoded from `\u003c...`); written literally it would end
    // the call early. `<` only occurs inside JSON strings, where `\/` and `\u003c` are valid
    // escapes of the same characters, so the JSON still decodes to the same value.
    let json = json
        .replace(CLOSE_TAG, "<\\/tool_call>")
        .replace(OPEN_TAG, "\\u003ctool_call>");
    format!("{OPEN_TAG}\n{json}\n{CLOSE_TAG}")
}

/// Renders a parsed turn back to text: the content, then each call on its own line.
/// `parse_assistant(render_assistant(p)) == p` for every `p` the parser returned.
pub fn render_assistant(parsed: &ParsedAssistant) -> String {
    let mut out = parsed.content.clone();
    for call in &parsed.calls {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&render_tool_call(call));
    }
    out
}

fn find_from(text: &str, from: usize, needle: &str) -> Option<usize> {
    text.get(from..)
        .and_then(|t| t.find(needle))
        .map(|i| i + from)
}

fn parse_call(body: &str, at: usize) -> Result<ToolCallRequest, ToolCallError> {
    let value: Value =
        serde_json::from_str(body.trim()).map_err(|e| ToolCallError::InvalidJson {
            at,
            message: e.to_string(),
        })?;
    let Value::Object(map) = value else {
        return Err(ToolCallError::NotAnObject { at });
    };
    if let Some(key) = map.keys().find(|k| *k != "name" && *k != "arguments") {
        return Err(ToolCallError::ExtraKey {
            at,
            key: key.clone(),
        });
    }
    let name = match map.get("name") {
        None => return Err(ToolCallError::MissingName { at }),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(ToolCallError::NameNotString { at }),
    };
    let arguments = match map.get("arguments") {
        None => return Err(ToolCallError::MissingArguments { at }),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err(ToolCallError::ArgumentsNotObject { at }),
        },
        Some(_) => return Err(ToolCallError::ArgumentsNotObject { at }),
    };
    Ok(ToolCallRequest { name, arguments })
}

/// JSON as Python's `json.dumps(value, ensure_ascii=False, indent=indent)` writes it, which is
/// what transformers' `tojson` filter produces: `", "` and `": "` separators without indent,
/// `","` plus newlines with it. Token-level parity with HF chat templates depends on this.
/// (Object keys come out in `serde_json::Map` order, which is sorted in this workspace.)
pub fn py_json_dumps(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_py_json(&mut out, value, indent, 0);
    out
}

fn write_py_json(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                // serde_json escapes strings as Python does with ensure_ascii=False.
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(out, v, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}
