//! Generation: prompts in, completions out, as one batch through the KV cache.
//!
//! Prompts of different lengths are left-padded into one batch (the model derives positions
//! from the mask, so each row computes what it would alone). Every row has its own
//! `SamplingParams` and its own seeded `Sampler`, so a request's tokens depend on its seed
//! and prompt only, not on what it was batched with. A finished row keeps its place in the
//! batch, fed masked padding, until every row is done.
//!
//! A completion's `tokens` include the EOS token when generation ended on one (with its
//! logprob: the policy chose to stop, and RL must credit that choice); its `text` does not.
//! A completion cut by a stop string keeps all its tokens; `text` ends before the stop string.

use candle_core::{Device, Tensor};
use thiserror::Error;

use super::decode::{with_team, Decoder, Team};
use super::model::{KvCache, Llama};
use super::sampling::{Sampler, SamplingError, SamplingParams, StopChecker, StopReason};
use super::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, Error)]
pub enum GenerateError {
    #[error("request {index}: the prompt is empty")]
    EmptyPrompt { index: usize },
    #[error(
        "request {index}: the prompt has {len} tokens; the model's context is {context}, so \
         nothing can be generated"
    )]
    PromptTooLong {
        index: usize,
        len: usize,
        context: usize,
    },
    #[error("request {index}: token id {id} is outside the vocabulary ({vocab})")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },
    #[error("{requests} requests but {params} sampling parameter sets")]
    ParamsCount { requests: usize, params: usize },
    #[error("request {index}: {source}")]
    Sampling { index: usize, source: SamplingError },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// The policy behind an actor could not answer (gone, overloaded, timed out): an
    /// infrastructure failure of the episode, never the agent's fault.
    #[error("policy unavailable: {0}")]
    Unavailable(String),
}

/// One finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Sampled token ids, in order (an EOS that ended generation included).
    pub tokens: Vec<u32>,
    /// The logprob of each sampled token under the distribution it was drawn from (0 for
    /// greedy: a point mass). This is the behaviour policy's probability that PPO needs.
    pub logprobs: Vec<f32>,
    /// The logprob of each sampled token under the model's plain softmax (temperature 1, no
    /// truncation): what transformers reports as scores, and what a learner recomputes.
    pub model_logprobs: Vec<f32>,
    /// The decoded completion, special tokens kept, up to (not including) the EOS or stop
    /// string that ended it.
    pub text: String,
    pub stop: StopReason,
}

/// Generates one completion per prompt, all in one batch. `eos_ids` end a row.
///
/// Runs on the compute pool (see [`super::on_compute_pool`]): a decode step is dozens of
/// products of a few microseconds each, and each one started from outside the pool would wait
/// for a pool thread to wake.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    eos_ids: &[u32],
) -> Result<Vec<Completion>, GenerateError> {
    super::on_compute_pool(|| generate_on_this_thread(model, tokenizer, prompts, params, eos_ids))
}

fn generate_on_this_thread(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    eos_ids: &[u32],
) -> Result<Vec<Completion>, GenerateError> {
    if prompts.len() != params.len() {
        return Err(GenerateError::ParamsCount {
            requests: prompts.len(),
            params: params.len(),
        });
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let cfg = model.config();
    let (context, vocab) = (cfg.max_position_embeddings, cfg.vocab_size);
    for (index, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(GenerateError::EmptyPrompt { index });
        }
        if p.len() >= context {
            return Err(GenerateError::PromptTooLong {
                index,
                len: p.len(),
                context,
            });
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::TokenOutOfRange { index, id, vocab });
        }
    }
    let device = model.device().clone();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);

    // Prefill: left-padded prompts.
    let mut ids = Vec::with_capacity(b * longest);
    let mut mask = Vec::with_capacity(b * longest);
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, p.len())));
    }
    // Generation never backpropagates: the in-place cache, even over trainable weights.
    let mut cache = KvCache::inference();
    let mut logits = last_logits(model, &device, ids, mask, b, longest, &mut cache)?;
    // The steps after the prefill go through the decode engine where it serves the model,
    // with the cache moved into its own layout.
    let mut decoder = Decoder::after_prefill(model, &cache)?;
    if decoder.is_some() {
        cache = KvCache::inference();
    }

    let mut rows: Vec<Row> = prompts
        .iter()
        .zip(params)
        .map(|(p, sp)| Row {
            sampler: Sampler::new(sp.seed),
            stop: StopChecker::new(eos_ids, sp),
            params: sp.clone(),
            len: p.len(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            model_logprobs: Vec::new(),
            text: String::new(),
            done: None,
        })
        .collect();

    // Sampling and the steps; with the decode engine, on a team that holds the compute pool's
    // threads from one step to the next (the prefill above had the pool to itself).
    let engine = decoder.is_some();
    let mut decode_all = |team: Option<&Team>| -> Result<(), GenerateError> {
        // `plain_logprob`'s working row, kept across rows and steps.
        let mut shifted = Vec::with_capacity(vocab);
        loop {
            let mut next = Vec::with_capacity(b);
            let mut next_mask = Vec::with_capacity(b);
            for (index, (row, row_logits)) in rows.iter_mut().zip(&logits).enumerate() {
                if row.done.is_some() {
                    next.push(0);
                    next_mask.push(0u8);
                    continue;
                }
                let (token, lp) = row
                    .sampler
                    .sample(row_logits, &row.params)
                    .map_err(|source| GenerateError::Sampling { index, source })?;
                row.tokens.push(token);
                row.logprobs.push(lp);
                row.model_logprobs
                    .push(plain_logprob(row_logits, token, &mut shifted));
                row.len += 1;
                // Stop strings need the text after every token; without them it is decoded once,
                // at the end (decoding every step would cost O(n²) over a long turn).
                let watch = !row.params.stop_strings.is_empty();
                if watch && !eos_ids.contains(&token) {
                    row.text = tokenizer.decode(&row.tokens)?;
                }
                let mut stop = row.stop.check(token, &row.text);
                if stop.is_none() && row.len >= context {
                    stop = Some(StopReason::ContextFull);
                }
                match stop {
                    Some(reason) => {
                        if let StopReason::StopString { at, .. } = &reason {
                            row.text.truncate(*at);
                        } else if !watch {
                            let end = row.tokens.len()
                                - usize::from(matches!(reason, StopReason::Eos(_)));
                            row.text = tokenizer.decode(&row.tokens[..end])?;
                        }
                        row.done = Some(reason);
                        next.push(0);
                        next_mask.push(0u8);
                    }
                    None => {
                        next.push(token);
                        next_mask.push(1u8);
                    }
                }
            }
            if rows.iter().all(|r| r.done.is_some()) {
                break;
            }
            logits = match decoder.as_mut() {
                Some(d) => {
                    let live: Vec<bool> = next_mask.iter().map(|m| *m != 0).collect();
                    d.step(model, &next, &live, team)?
                }
                None => last_logits(model, &device, next, next_mask, b, 1, &mut cache)?,
            };
        }
        Ok(())
    };
    if engine {
        with_team(|team| decode_all(Some(team)))??;
    } else {
        decode_all(None)?;
    }

    Ok(rows
        .into_iter()
        .map(|r| Completion {
            tokens: r.tokens,
            logprobs: r.logprobs,
            model_logprobs: r.model_logprobs,
            text: r.text,
            stop: r.done.unwrap_or(StopReason::MaxTokens),
        })
        .collect())
}

struct Row {
    sampler: Sampler,
    stop: StopChecker,
    params: SamplingParams,
    /// Real tokens in the sequence so far (prompt + generated).
    len: usize,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    model_logprobs: Vec<f32>,
    text: String,
    done: Option<StopReason>,
}

/// `log softmax(logits)[token]` (the sampler has already refused non-finite logits). The
/// exponentials are `vexp`'s (within 2 ulp of f32's), summed in f64: the result is an f32,
/// so f64 exponentials bought nothing but a libm call per logit, every row, every step.
fn plain_logprob(logits: &[f32], token: u32, shifted: &mut Vec<f32>) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    shifted.clear();
    shifted.extend(logits.iter().map(|x| x - max));
    super::vexp::exp_in_place(shifted);
    let lse = max as f64 + shifted.iter().map(|e| *e as f64).sum::<f64>().ln();
    logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&x| (x as f64 - lse) as f32)
}

/// Runs `[b, t]` new tokens through the model and returns each row's logits at its last
/// position.
fn last_logits(
    model: &Llama,
    device: &Device,
    ids: Vec<u32>,
    mask: Vec<u8>,
    b: usize,
    t: usize,
    cache: &mut KvCache,
) -> Result<Vec<Vec<f32>>, GenerateError> {
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let mask = Tensor::from_vec(mask, (b, t), device)?;
    let logits = model.forward(&ids, Some(&mask), Some(cache))?;
    let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?;
    let last = last.to_dtype(candle_core::DType::F32)?;
    Ok(last.to_vec2::<f32>()?)
}
