//! Tokenizers: the built-in byte-level one for tiny models trained from scratch, and Hugging
//! Face `tokenizer.json` (through the `tokenizers` crate, pure Rust: fancy-regex, no C).
//! A `.gguf` file's tokenizer is rebuilt from its metadata (see [`super::gguf`]).

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Hf(String),
    #[error(transparent)]
    Gguf(#[from] super::gguf::GgufError),
}

/// The special tokens of the byte-level tokenizer, in id order from 256.
pub const BYTE_SPECIALS: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<|pad|>",
];

/// Ids 0..=255 are the bytes; 256.. are [`BYTE_SPECIALS`]. Any byte string round-trips;
/// decoding is lossy only where the bytes are not UTF-8.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const VOCAB_SIZE: usize = 256 + BYTE_SPECIALS.len();

    /// With `parse_special`, special-token strings in `text` become their single ids (so a
    /// rendered chat template tokenizes as the model was trained); without, every byte is
    /// its own id (use this for untrusted text such as tool outputs, so they cannot forge
    /// turn boundaries).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if parse_special && bytes[i] == b'<' {
                if let Some(k) = BYTE_SPECIALS
                    .iter()
                    .position(|s| bytes[i..].starts_with(s.as_bytes()))
                {
                    out.push(256 + k as u32);
                    i += BYTE_SPECIALS[k].len();
                    continue;
                }
            }
            out.push(u32::from(bytes[i]));
            i += 1;
        }
        out
    }

    /// Bytes and special-token strings, then lossy UTF-8 (U+FFFD for invalid sequences and for
    /// ids outside the vocabulary).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                0..=255 => out.push(id as u8),
                _ => match BYTE_SPECIALS.get(id as usize - 256) {
                    Some(s) => out.extend_from_slice(s.as_bytes()),
                    None => out.extend_from_slice("\u{FFFD}".as_bytes()),
                },
            }
        }
        out
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        BYTE_SPECIALS
            .iter()
            .position(|s| *s == token)
            .map(|k| 256 + k as u32)
    }

    /// `<|im_end|>` ends an assistant turn; `<|endoftext|>` ends a document.
    pub fn eos_ids(&self) -> Vec<u32> {
        [BYTE_SPECIALS[2], BYTE_SPECIALS[0]]
            .iter()
            .filter_map(|s| self.token_id(s))
            .collect()
    }
}

/// A Hugging Face tokenizer folder: `tokenizer.json`, plus `tokenizer_config.json` (bos, eos,
/// chat template) and `generation_config.json` (extra eos ids) when present.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens encoded as plain text: for untrusted text (tool
    /// outputs), which must not be able to write a turn boundary.
    untrusted: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The default chat template (`chat_template`, or the entry named "default" of a list).
    pub chat_template: Option<String>,
    /// The "tool_use" entry when `chat_template` is a list of named templates.
    pub tool_use_template: Option<String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json_path = dir.join("tokenizer.json");
        let bytes = read(&json_path)?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Parse {
                path: json_path,
                message: e.to_string(),
            })?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let generation = read_json_opt(&dir.join("generation_config.json"))?;
        Ok(Self::from_parts(
            inner,
            config.as_ref(),
            generation.as_ref(),
        ))
    }

    /// From an already parsed `tokenizer.json` and optional `tokenizer_config.json` /
    /// `generation_config.json` values (tests, and GGUF metadata).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        config: Option<&Value>,
        generation: Option<&Value>,
    ) -> Self {
        let token_field = |key: &str| -> Option<String> {
            match config?.get(key)? {
                Value::String(s) => Some(s.clone()),
                // An AddedToken dict: {"content": "...", ...}.
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_field("bos_token");
        let eos_token = token_field("eos_token");
        let (mut chat_template, mut tool_use_template) = (None, None);
        match config.and_then(|c| c.get("chat_template")) {
            Some(Value::String(s)) => chat_template = Some(s.clone()),
            Some(Value::Array(list)) => {
                for entry in list {
                    let name = entry.get("name").and_then(Value::as_str);
                    let template = entry
                        .get("template")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    match name {
                        Some("default") => chat_template = template,
                        Some("tool_use") => tool_use_template = template,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let mut eos_ids: Vec<u32> = eos_token
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        match generation.and_then(|g| g.get("eos_token_id")) {
            Some(Value::Number(n)) => {
                eos_ids.extend(n.as_u64().and_then(|n| u32::try_from(n).ok()))
            }
            Some(Value::Array(a)) => eos_ids.extend(
                a.iter()
                    .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())),
            ),
            _ => {}
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let mut untrusted = inner.clone();
        untrusted.set_encode_special_tokens(true);
        HfTokenizer {
            inner,
            untrusted,
            bos_token,
            eos_token,
            chat_template,
            tool_use_template,
            eos_ids,
        }
    }
}

impl HfTokenizer {
    /// Writes `tokenizer.json` (what `save_hf` puts beside the weights).
    pub fn save_json(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Hf(format!("{}: {e}", path.display())))
    }

    /// A `tokenizer_config.json` carrying what this tokenizer knows: bos, eos, the chat
    /// template(s). `tokenizer_class` is the generic fast tokenizer, so transformers encodes
    /// exactly as `tokenizer.json` says (a model-specific class may add its own BOS logic).
    pub fn config_json(&self) -> Value {
        let mut o = serde_json::Map::new();
        o.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        if let Some(b) = &self.bos_token {
            o.insert("bos_token".into(), b.clone().into());
        }
        if let Some(e) = &self.eos_token {
            o.insert("eos_token".into(), e.clone().into());
        }
        match (&self.chat_template, &self.tool_use_template) {
            (Some(c), Some(t)) => {
                o.insert(
                    "chat_template".into(),
                    serde_json::json!([
                        {"name": "default", "template": c},
                        {"name": "tool_use", "template": t}
                    ]),
                );
            }
            (Some(c), None) => {
                o.insert("chat_template".into(), c.clone().into());
            }
            (None, Some(t)) => {
                o.insert(
                    "chat_template".into(),
                    serde_json::json!([{"name": "tool_use", "template": t}]),
                );
            }
            (None, None) => {}
        }
        Value::Object(o)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read(path)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| TokenizerError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Any tokenizer a policy model can use.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    Byte(ByteTokenizer),
    Hf(Box<HfTokenizer>),
}

impl Tokenizer {
    /// Loads from a model path: an HF folder (with `tokenizer.json`), or a `.gguf` file (the
    /// tokenizer its metadata describes; no tensor data is read).
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Ok(Tokenizer::Hf(Box::new(super::gguf::load_tokenizer(path)?)));
        }
        Ok(Tokenizer::Hf(Box::new(HfTokenizer::from_dir(path)?)))
    }

    /// `add_special`: for the byte tokenizer, recognise special-token strings; for HF, the
    /// tokenizer's own meaning (add BOS / post-processor tokens; HF always recognises its
    /// added tokens in text). Chat prompts rendered by a template pass `false` for HF, as
    /// transformers' `apply_chat_template` does, and `true` for the byte tokenizer.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Byte(b) => Ok(b.encode(text, add_special)),
            Tokenizer::Hf(h) => h
                .inner
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Hf(e.to_string())),
        }
    }

    /// Encodes text a chat template rendered: its special-token strings are the template's
    /// framing and become special ids, and nothing is added (as transformers'
    /// `apply_chat_template`). HF tokenizers always match their added tokens in text; the byte
    /// tokenizer does when asked.
    pub fn encode_template(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(text, matches!(self, Tokenizer::Byte(_)))
    }

    /// The strings that end a turn: the eos token and every eos id decoded (generation
    /// config's too), non-empty, sorted, without repeats.
    pub fn end_of_turn_strings(&self) -> Result<Vec<String>, TokenizerError> {
        let mut eos: Vec<String> = self.eos_token().map(str::to_string).into_iter().collect();
        for id in self.eos_ids() {
            eos.push(self.decode(&[id])?);
        }
        eos.retain(|e| !e.is_empty());
        eos.sort();
        eos.dedup();
        Ok(eos)
    }

    /// Encodes untrusted text (a tool's output): special-token strings in it are ordinary
    /// text, never special ids, and nothing is added.
    pub fn encode_untrusted(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Byte(b) => Ok(b.encode(text, false)),
            Tokenizer::Hf(h) => h
                .untrusted
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Hf(e.to_string())),
        }
    }

    /// Decodes with special tokens kept (the tool-call parser needs `<tool_call>`); partial
    /// UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Byte(b) => Ok(b.decode(ids)),
            Tokenizer::Hf(h) => h
                .inner
                .decode(ids, false)
                .map_err(|e| TokenizerError::Hf(e.to_string())),
        }
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte(_) => ByteTokenizer::VOCAB_SIZE,
            Tokenizer::Hf(h) => h.inner.get_vocab_size(true),
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Byte(b) => b.token_id(token),
            Tokenizer::Hf(h) => h.inner.token_to_id(token),
        }
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        match self {
            Tokenizer::Byte(b) => b.eos_ids(),
            Tokenizer::Hf(h) => h.eos_ids.clone(),
        }
    }

    pub fn bos_token(&self) -> Option<&str> {
        match self {
            Tokenizer::Byte(_) => None,
            Tokenizer::Hf(h) => h.bos_token.as_deref(),
        }
    }

    pub fn eos_token(&self) -> Option<&str> {
        match self {
            Tokenizer::Byte(_) => Some(BYTE_SPECIALS[2]),
            Tokenizer::Hf(h) => h.eos_token.as_deref(),
        }
    }
}
