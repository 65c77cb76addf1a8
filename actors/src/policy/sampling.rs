//! Token sampling from logits: greedy, temperature, top-k, top-p; seeded; with the logprob of
//! every sampled token.
//!
//! **Which logprob.** `Sampler::sample` returns the log-probability of the sampled token under
//! the distribution it was *actually drawn from*: logits divided by the temperature, softmaxed,
//! then truncated by top-k and then top-p, and **renormalised** over the kept tokens. That is the
//! behaviour policy's true probability, which is what importance ratios (PPO) need; a learner
//! that recomputes logprobs must apply the same `SamplingParams` (see [`distribution`], which
//! is the single implementation both sides use). With no truncation (top_k = 0, top_p = 1)
//! this is the plain temperature softmax. Greedy (temperature 0) is a point mass: logprob 0.
//!
//! **Bad logits.** NaN or +inf logits, an empty slice, or all -inf are a typed
//! [`SamplingError`]; -inf alone is a valid mask (probability 0). Nothing here panics.
//!
//! Arithmetic is f64 with log-sum-exp, so large logits neither overflow nor lose the small
//! probabilities.

use thiserror::Error;

/// How to pick the next token and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, lowest id on ties). Must be finite and >= 0.
    pub temperature: f32,
    /// Nucleus: keep the smallest set of most likely tokens whose mass reaches `top_p`
    /// (at least one). In (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (lowest id on ties); 0 = off.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation stops when the decoded completion contains one of these.
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with the other fields at their defaults.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplingError {
    #[error("no logits")]
    Empty,
    #[error("logit {index} is {value} (NaN and +inf are not valid logits)")]
    NonFinite { index: usize, value: f32 },
    #[error("every logit is -inf: no token can be sampled")]
    NoSupport,
    #[error("invalid sampling parameter: {0}")]
    InvalidParams(String),
}

/// The distribution a draw is made from: the kept token ids (ascending) and their log-probs,
/// which log-sum-exp to 0. Greedy gives the argmax alone with logprob 0.
pub fn distribution(
    logits: &[f32],
    params: &SamplingParams,
) -> Result<Vec<(u32, f64)>, SamplingError> {
    validate(logits, params)?;
    if params.temperature == 0.0 {
        return Ok(vec![(argmax(logits)?, 0.0)]);
    }
    let t = f64::from(params.temperature);
    // Kept candidates as (id, scaled logit); -inf logits have probability 0 and drop out.
    let mut kept: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != f32::NEG_INFINITY)
        .map(|(i, l)| (i as u32, f64::from(*l) / t))
        .collect();
    if kept.is_empty() {
        return Err(SamplingError::NoSupport);
    }
    let truncating = params.top_k > 0 && params.top_k < kept.len() || params.top_p < 1.0;
    if truncating {
        // Most likely first; ties by lowest id, so truncation is deterministic.
        kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            kept.truncate(params.top_k);
        }
        if params.top_p < 1.0 {
            let lse = log_sum_exp(kept.iter().map(|c| c.1));
            let mut mass = 0.0;
            let mut keep = kept.len();
            for (i, c) in kept.iter().enumerate() {
                mass += (c.1 - lse).exp();
                if mass >= f64::from(params.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            kept.truncate(keep);
        }
        kept.sort_by_key(|c| c.0);
    }
    let lse = log_sum_exp(kept.iter().map(|c| c.1));
    Ok(kept.into_iter().map(|(id, x)| (id, x - lse)).collect())
}

fn validate(logits: &[f32], params: &SamplingParams) -> Result<(), SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::Empty);
    }
    if let Some((index, &value)) = logits
        .iter()
        .enumerate()
        .find(|(_, l)| l.is_nan() || **l == f32::INFINITY)
    {
        return Err(SamplingError::NonFinite { index, value });
    }
    if !(params.temperature.is_finite() && params.temperature >= 0.0) {
        return Err(SamplingError::InvalidParams(format!(
            "temperature must be finite and >= 0, not {}",
            params.temperature
        )));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(SamplingError::InvalidParams(format!(
            "top_p must be in (0, 1], not {}",
            params.top_p
        )));
    }
    Ok(())
}

fn argmax(logits: &[f32]) -> Result<u32, SamplingError> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        // Strictly greater: the lowest id wins ties.
        if l != f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32).ok_or(SamplingError::NoSupport)
}

fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// A seeded sampler: the same seed and the same logits give the same tokens, on every platform
/// (the RNG is xoshiro256** in this file, no global or OS randomness).
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: Xoshiro256,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Sampler {
            rng: Xoshiro256::new(seed),
        }
    }

    /// Draws one token; returns it with its logprob under the distribution drawn from (see the
    /// module docs). Greedy draws consume no randomness.
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
    ) -> Result<(u32, f32), SamplingError> {
        let dist = distribution(logits, params)?;
        if let [(id, lp)] = dist.as_slice() {
            return Ok((*id, *lp as f32));
        }
        let u = self.rng.next_f64();
        let mut cum = 0.0;
        for &(id, lp) in &dist {
            cum += lp.exp();
            if u < cum {
                return Ok((id, lp as f32));
            }
        }
        // Rounding left the cumulative sum just below u: the last kept token.
        dist.last()
            .map(|&(id, lp)| (id, lp as f32))
            .ok_or(SamplingError::NoSupport)
    }
}

/// xoshiro256** (Blackman and Vigna), seeded through splitmix64 as its authors recommend.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was sampled (it is not part of the completion text).
    Eos(u32),
    /// The decoded completion contains `stop` starting at byte `at`; the completion is the
    /// text before `at`.
    StopString { stop: String, at: usize },
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The sequence reached the model's context (`max_position_embeddings`).
    ContextFull,
}

/// Decides after each token whether generation is over: EOS ids first, then stop strings in
/// the decoded completion, then the token budget.
#[derive(Debug, Clone)]
pub struct StopChecker {
    eos_ids: Vec<u32>,
    stop_strings: Vec<String>,
    max_new_tokens: usize,
    generated: usize,
    /// Bytes of the completion already searched for stop strings (a later token can complete a
    /// stop string that began earlier, so each search re-covers the last `longest - 1` bytes).
    searched: usize,
}

impl StopChecker {
    pub fn new(eos_ids: &[u32], params: &SamplingParams) -> Self {
        StopChecker {
            eos_ids: eos_ids.to_vec(),
            stop_strings: params
                .stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            max_new_tokens: params.max_new_tokens,
            generated: 0,
            searched: 0,
        }
    }

    /// Call once per generated token with the decoded completion so far (including that
    /// token, unless it is an EOS id). Returns why to stop, or `None` to go on.
    pub fn check(&mut self, token: u32, completion: &str) -> Option<StopReason> {
        self.generated += 1;
        if self.eos_ids.contains(&token) {
            return Some(StopReason::Eos(token));
        }
        let longest = self.stop_strings.iter().map(String::len).max().unwrap_or(0);
        if longest > 0 {
            let mut from = self
                .searched
                .saturating_sub(longest - 1)
                .min(completion.len());
            while !completion.is_char_boundary(from) {
                from -= 1;
            }
            // Earliest match wins; among matches at the same byte, the first listed.
            let hit = self
                .stop_strings
                .iter()
                .filter_map(|s| completion[from..].find(s.as_str()).map(|i| (from + i, s)))
                .min_by_key(|(at, _)| *at);
            self.searched = completion.len();
            if let Some((at, stop)) = hit {
                return Some(StopReason::StopString {
                    stop: stop.clone(),
                    at,
                });
            }
        }
        if self.generated >= self.max_new_tokens {
            return Some(StopReason::MaxTokens);
        }
        None
    }
}
