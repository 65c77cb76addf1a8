//! The scripted expert as a [`Policy`]: it reads the conversation's last tool result, decides
//! its next call, and writes it as assistant text (`<tool_call>{...}</tool_call>` and the
//! end-of-turn token), tokenized by the episode's tokenizer. Through this adapter the expert's
//! episodes are ordinary token-exact trajectories: the teacher of SFT distillation.
//!
//! The expert is not a distribution over tokens: its actions carry logprob 0 (what a
//! deterministic policy would give). They are for SFT, which reads no logprobs; an RL learner
//! must not take them as behaviour probabilities.

use std::sync::Arc;

use super::expert::ScriptedExpert;
use super::observation::Observation;
use crate::policy::chat::Role;
use crate::policy::generate::{Completion, GenerateError};
use crate::policy::sampling::{SamplingParams, StopReason};
use crate::policy::tokenizer::Tokenizer;
use crate::policy::toolcall::{render_tool_call, ToolCallRequest};
use crate::policy::{Policy, PolicyContext};

pub struct ExpertPolicy {
    expert: ScriptedExpert,
    tokenizer: Arc<Tokenizer>,
    context: usize,
}

impl ExpertPolicy {
    /// `context`: the token context it claims (the episode fits the conversation into it).
    pub fn new(expert: ScriptedExpert, tokenizer: Arc<Tokenizer>, context: usize) -> Self {
        ExpertPolicy {
            expert,
            tokenizer,
            context,
        }
    }
}

impl Policy for ExpertPolicy {
    fn act(
        &mut self,
        context: &PolicyContext,
        _params: &SamplingParams,
    ) -> Result<Completion, GenerateError> {
        let last = context
            .messages
            .last()
            .filter(|m| m.role == Role::Tool)
            .map(|m| Observation {
                text: m.content.clone(),
                ends_episode: false,
                limit: None,
                outcome: None,
            });
        let text = match self.expert.next_call(last.as_ref()) {
            Some(call) => render_tool_call(&ToolCallRequest {
                name: call.name,
                arguments: call.arguments,
            }),
            // Done without a call left: say so (the episode's turn budget ends it).
            None => "I have nothing left to do.".to_string(),
        };
        let eos_token = self.tokenizer.eos_token().unwrap_or_default().to_string();
        let mut tokens = self.tokenizer.encode_template(&text)?;
        let eos = self.tokenizer.token_id(&eos_token);
        if let Some(id) = eos {
            tokens.push(id);
        }
        let n = tokens.len();
        Ok(Completion {
            tokens,
            logprobs: vec![0.0; n],
            model_logprobs: vec![0.0; n],
            text,
            stop: eos.map_or(StopReason::MaxTokens, StopReason::Eos),
        })
    }

    fn version(&self) -> u64 {
        0
    }

    fn context(&self) -> usize {
        self.context
    }
}
