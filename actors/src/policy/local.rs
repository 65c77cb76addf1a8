//! The local backend: the candle model in this process.

use super::generate::{generate, Completion, GenerateError};
use super::model::{EosTokenId, Llama};
use super::sampling::SamplingParams;
use super::tokenizer::Tokenizer;
use super::{Policy, PolicyContext};

/// A model, its tokenizer, the ids that end a turn, and the weights' version. Cloning shares
/// the weights (candle tensors are reference-counted).
#[derive(Clone)]
pub struct LocalPolicy {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    version: u64,
}

impl LocalPolicy {
    /// End-of-turn ids: the tokenizer's, plus the model config's `eos_token_id`.
    pub fn new(model: Llama, tokenizer: Tokenizer, version: u64) -> Self {
        let mut eos_ids = tokenizer.eos_ids();
        match &model.config().eos_token_id {
            Some(EosTokenId::One(id)) => eos_ids.push(*id),
            Some(EosTokenId::Many(ids)) => eos_ids.extend(ids),
            None => {}
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        LocalPolicy {
            model,
            tokenizer,
            eos_ids,
            version,
        }
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// New weights took effect (the learner bumps the version with every update).
    pub fn set_version(&mut self, version: u64) {
        self.version = version;
    }

    /// Replaces the model (new weights of the same configuration) and its version.
    pub fn set_model(&mut self, model: Llama, version: u64) {
        self.model = model;
        self.version = version;
    }

    /// Many contexts at once, in one batch.
    pub fn act_batch(
        &self,
        contexts: &[Vec<u32>],
        params: &[SamplingParams],
    ) -> Result<Vec<Completion>, GenerateError> {
        generate(
            &self.model,
            &self.tokenizer,
            contexts,
            params,
            &self.eos_ids,
        )
    }
}

impl Policy for LocalPolicy {
    fn act(
        &mut self,
        context: &PolicyContext,
        params: &SamplingParams,
    ) -> Result<Completion, GenerateError> {
        let mut out = generate(
            &self.model,
            &self.tokenizer,
            std::slice::from_ref(&context.tokens.to_vec()),
            std::slice::from_ref(params),
            &self.eos_ids,
        )?;
        out.pop().ok_or(GenerateError::ParamsCount {
            requests: 1,
            params: 0,
        })
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn context(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}
