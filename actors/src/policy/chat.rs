//! Chat templates: a model's own Hugging Face Jinja template (rendered with minijinja, set up
//! the way transformers sets up jinja2), and the built-in ChatML template for the byte-level
//! tokenizer. Both take the same messages; tool calls follow the Hermes / Qwen convention.
//!
//! The built-in template writes exactly what the Qwen2.5 template writes for a conversation
//! that starts with a system message, so a tiny model trained on it and a Qwen model see the
//! same layout (a test renders one conversation both ways).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use super::tokenizer::Tokenizer;
use super::toolcall::{py_json_dumps, render_tool_call, ToolCallRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// The calls of an assistant turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallRequest>,
    /// For a tool result: the id of the call it answers, when the format has ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a tool result: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    fn plain(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::plain(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::plain(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCallRequest>) -> Self {
        ChatMessage {
            tool_calls,
            ..Self::plain(Role::Assistant, content)
        }
    }
    pub fn tool(name: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            name: Some(name.into()),
            ..Self::plain(Role::Tool, content)
        }
    }

    /// The message as transformers' templates expect it: tool calls as
    /// `{"type": "function", "function": {"name", "arguments"}}` (arguments an object).
    fn to_template_value(&self) -> Value {
        let mut m = json!({ "role": self.role.as_str(), "content": self.content });
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = Value::Array(
                self.tool_calls
                    .iter()
                    .map(|c| json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect(),
            );
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = json!(id);
        }
        if let Some(name) = &self.name {
            m["name"] = json!(name);
        }
        m
    }
}

#[derive(Debug, Error)]
pub enum ChatError {
    #[error("chat template does not parse: {0}")]
    Syntax(String),
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("the tokenizer has no chat template")]
    NoTemplate,
}

/// A chat template. `render` gives the prompt text; tokenize it with special tokens parsed.
#[derive(Debug)]
pub enum ChatTemplate {
    /// The built-in ChatML layout (see the module docs).
    ChatMl,
    Jinja(Box<JinjaTemplate>),
}

pub struct JinjaTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles an HF `chat_template`. The environment mirrors transformers': `trim_blocks`
    /// and `lstrip_blocks`, `raise_exception`, a `tojson` that writes JSON as Python's
    /// `json.dumps` does (separators and indent matter for token parity), and Python string
    /// methods (`.strip()`, `.startswith()`, `.split()`, ...) from minijinja-contrib.
    pub fn from_jinja(
        source: &str,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter(
            "tojson",
            |v: minijinja::Value,
             kwargs: minijinja::value::Kwargs|
             -> Result<minijinja::Value, minijinja::Error> {
                let indent: Option<usize> = kwargs.get("indent")?;
                kwargs.assert_all_used()?;
                let json = serde_json::to_value(&v).map_err(|e| {
                    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
                })?;
                Ok(minijinja::Value::from_safe_string(py_json_dumps(
                    &json, indent,
                )))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(format!("{e:#}")))?;
        Ok(ChatTemplate::Jinja(Box::new(JinjaTemplate {
            env,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.unwrap_or_default().to_string(),
        })))
    }

    /// The template that goes with a tokenizer: ChatML for the byte tokenizer; the HF folder's
    /// own template (its "tool_use" variant when `with_tools` and it has one) otherwise.
    pub fn for_tokenizer(tokenizer: &Tokenizer, with_tools: bool) -> Result<Self, ChatError> {
        match tokenizer {
            Tokenizer::Byte(_) => Ok(ChatTemplate::ChatMl),
            Tokenizer::Hf(h) => {
                let source = if with_tools {
                    h.tool_use_template.as_ref().or(h.chat_template.as_ref())
                } else {
                    h.chat_template.as_ref()
                };
                let source = source.ok_or(ChatError::NoTemplate)?;
                Self::from_jinja(source, h.bos_token.as_deref(), h.eos_token.as_deref())
            }
        }
    }

    /// Renders the conversation; `tools` is an OpenAI-style tools list (may be empty).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        match self {
            ChatTemplate::ChatMl => Ok(render_chatml(messages, tools, add_generation_prompt)),
            ChatTemplate::Jinja(j) => {
                let template = j
                    .env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| ChatError::Render(format!("{e:#}")))?;
                let msgs: Vec<Value> = messages
                    .iter()
                    .map(ChatMessage::to_template_value)
                    .collect();
                // transformers passes `tools` only when there are some (templates test `if tools`).
                let tools_value = if tools.is_empty() {
                    minijinja::Value::from(())
                } else {
                    minijinja::Value::from_serialize(tools)
                };
                let ctx = minijinja::context! {
                    messages => minijinja::Value::from_serialize(&msgs),
                    tools => tools_value,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => j.bos.as_str(),
                    eos_token => j.eos.as_str(),
                };
                template
                    .render(ctx)
                    .map_err(|e| ChatError::Render(format!("{e:#}")))
            }
        }
    }
}

const TOOLS_PREAMBLE: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const TOOLS_POSTAMBLE: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// `<|im_start|>role\n...<|im_end|>\n` turns; tools listed in the system turn; assistant calls
/// as `<tool_call>` blocks; consecutive tool results grouped in one user turn, each inside
/// `<tool_response>`. Unlike Qwen's template there is no default system prompt: without a
/// system message and tools, no system turn is written.
fn render_chatml(messages: &[ChatMessage], tools: &[Value], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    let first_is_system = messages.first().is_some_and(|m| m.role == Role::System);
    let system = if first_is_system {
        messages.first().map(|m| m.content.as_str())
    } else {
        None
    };
    if !tools.is_empty() {
        out.push_str("<|im_start|>system\n");
        if let Some(s) = system {
            out.push_str(s);
            out.push_str("\n\n");
        }
        out.push_str(TOOLS_PREAMBLE);
        for tool in tools {
            out.push('\n');
            out.push_str(&py_json_dumps(tool, None));
        }
        out.push_str(TOOLS_POSTAMBLE);
        out.push_str("<|im_end|>\n");
    } else if let Some(s) = system {
        out.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
    }
    let skip = usize::from(first_is_system);
    for (i, m) in messages.iter().enumerate().skip(skip) {
        match m.role {
            Role::System | Role::User => out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role.as_str(),
                m.content
            )),
            Role::Assistant => {
                out.push_str("<|im_start|>assistant");
                if !m.content.is_empty() || m.tool_calls.is_empty() {
                    out.push('\n');
                    out.push_str(&m.content);
                }
                for call in &m.tool_calls {
                    out.push('\n');
                    out.push_str(&render_tool_call(call));
                }
                out.push_str("<|im_end|>\n");
            }
            Role::Tool => {
                if i == 0 || messages[i - 1].role != Role::Tool {
                    out.push_str("<|im_start|>user");
                }
                out.push_str("\n<tool_response>\n");
                out.push_str(&m.content);
                out.push_str("\n</tool_response>");
                if messages.get(i + 1).is_none_or(|n| n.role != Role::Tool) {
                    out.push_str("<|im_end|>\n");
                }
            }
        }
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}
