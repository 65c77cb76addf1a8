//! `klongd generate`: loads a model (HF folder or `.gguf`), generates one completion, prints
//! it, or with `--json` the token ids and logprobs. Users check a model with it; the parity
//! tests check this path against transformers.

use std::path::PathBuf;

use anyhow::{bail, Context};
use klong_actors::policy::chat::{ChatMessage, ChatTemplate};
use klong_actors::policy::local::LocalPolicy;
use klong_actors::policy::pretrained::Pretrained;
use klong_actors::policy::sampling::{SamplingParams, StopReason};
use serde::Serialize;

/// The most new tokens one command may ask for; the model's context bounds it further.
pub const MAX_NEW_TOKENS: usize = 1 << 16;

pub struct GenerateOptions {
    pub model: PathBuf,
    pub prompt: String,
    pub chat: bool,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    pub device: String,
}

#[derive(Debug, Serialize)]
pub struct GenerateReport {
    /// The text the model saw (the chat template applied when `--chat`).
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    /// Logprobs under the distribution sampled (0 for greedy).
    pub logprobs: Vec<f32>,
    /// Logprobs under the model's plain softmax.
    pub model_logprobs: Vec<f32>,
    pub text: String,
    /// eos, stop_string, max_tokens or context_full.
    pub stop: String,
}

impl GenerateReport {
    pub fn render(&self) -> String {
        format!("{}\n", self.text)
    }
}

pub fn run(opts: &GenerateOptions) -> anyhow::Result<GenerateReport> {
    if opts.max_new_tokens == 0 || opts.max_new_tokens > MAX_NEW_TOKENS {
        bail!("--max-new-tokens must be in 1..={MAX_NEW_TOKENS}");
    }
    let params = SamplingParams {
        temperature: opts.temperature,
        top_p: opts.top_p,
        top_k: opts.top_k,
        max_new_tokens: opts.max_new_tokens,
        stop_strings: Vec::new(),
        seed: opts.seed,
    };
    let device = klong_actors::policy::device(&opts.device).map_err(anyhow::Error::msg)?;
    let loaded = Pretrained::load(&opts.model, &device)
        .with_context(|| format!("loading {}", opts.model.display()))?;
    let model = loaded.frozen()?;
    let policy = LocalPolicy::new(model, loaded.tokenizer, 0);
    let tokenizer = &policy.tokenizer;

    let (prompt_text, prompt_ids) = if opts.chat {
        let template = ChatTemplate::for_tokenizer(tokenizer, false)
            .with_context(|| format!("{}: chat template", opts.model.display()))?;
        let text = template.render(&[ChatMessage::user(opts.prompt.clone())], &[], true)?;
        let ids = tokenizer.encode_template(&text)?;
        (text, ids)
    } else {
        let ids = tokenizer.encode(&opts.prompt, true)?;
        (opts.prompt.clone(), ids)
    };
    let out = policy.act_batch(std::slice::from_ref(&prompt_ids), &[params])?;
    let Some(c) = out.into_iter().next() else {
        bail!("generation returned no completion");
    };
    let stop = match c.stop {
        StopReason::Eos(_) => "eos",
        StopReason::StopString { .. } => "stop_string",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ContextFull => "context_full",
    };
    Ok(GenerateReport {
        prompt_text,
        prompt_ids,
        ids: c.tokens,
        logprobs: c.logprobs,
        model_logprobs: c.model_logprobs,
        text: c.text,
        stop: stop.to_string(),
    })
}
