//! The Policy actor: answers every Environment's `Act` with a sampled turn.
//!
//! Backends:
//! - `Local`: the candle model in this process. Requests that arrive while the model is busy
//!   queue up and go through the model together, as one left-padded batch (up to
//!   `max_batch`): the more episodes run at once, the fuller the batches. Each request keeps
//!   its own seed, so its tokens do not depend on what it was batched with.
//! - `Scripted`: the built-in expert, one per episode (its state is the episode's progress),
//!   seeded from the request; the distillation teacher.
//!
//! Bounds: at most `max_queued` requests wait (more are refused as `Overloaded`); the scripted
//! backend tracks at most `max_episodes` episodes (an environment ends each with
//! `EndEpisode`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use candle_core::Tensor;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::local::LocalPolicy;
use super::model::Llama;
use super::tokenizer::Tokenizer;
use super::{Policy, PolicyContext};
use crate::environment::expert::ScriptedExpert;
use crate::environment::expert_policy::ExpertPolicy;
use crate::messages::{ActReply, ActRequest, Action, PolicyFailure, PolicyMsg};

/// Which policy answers.
#[derive(Clone)]
pub enum PolicyBackend {
    /// The candle model; concurrent requests are batched.
    Local {
        policy: Box<LocalPolicy>,
        max_batch: usize,
    },
    /// The scripted expert; `noise` is its chance of botching each experiment.
    Scripted {
        noise: f64,
        tokenizer: Arc<Tokenizer>,
        /// The context it claims (the episode fits the conversation into it).
        context: usize,
    },
}

#[derive(Clone)]
pub struct PolicyArgs {
    pub backend: PolicyBackend,
    pub max_queued: usize,
    pub max_episodes: usize,
}

pub struct PolicyState {
    args: PolicyArgs,
    queue: VecDeque<(ActRequest, RpcReplyPort<ActReply>)>,
    flush_scheduled: bool,
    experts: HashMap<(u64, u32), ExpertPolicy>,
    /// The scripted backend's version never moves; the local one follows `SyncWeights`.
    version: u64,
}

pub struct PolicyActor;

impl PolicyActor {
    /// Answers queued requests: a batch through the model, or each through its expert.
    fn flush(state: &mut PolicyState) {
        match &mut state.args.backend {
            PolicyBackend::Local { policy, max_batch } => {
                let n = state.queue.len().min((*max_batch).max(1));
                let batch: Vec<_> = state.queue.drain(..n).collect();
                if batch.is_empty() {
                    return;
                }
                let contexts: Vec<Vec<u32>> = batch.iter().map(|(r, _)| r.tokens.clone()).collect();
                let params: Vec<_> = batch.iter().map(|(r, _)| r.sampling.clone()).collect();
                let version = policy.version();
                let span = tracing::debug_span!("policy_batch", rows = batch.len());
                let _enter = span.enter();
                // The forward passes are CPU work: keep them off the async workers' queue.
                let out = tokio::task::block_in_place(|| policy.act_batch(&contexts, &params));
                match out {
                    Ok(completions) => {
                        for ((_, reply), completion) in batch.into_iter().zip(completions) {
                            let _ = reply.send(Ok(Action {
                                completion,
                                policy_version: version,
                            }));
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for (_, reply) in batch {
                            let _ = reply.send(Err(PolicyFailure::Generate(msg.clone())));
                        }
                    }
                }
            }
            PolicyBackend::Scripted {
                noise,
                tokenizer,
                context,
            } => {
                while let Some((req, reply)) = state.queue.pop_front() {
                    let tracked = state.experts.len();
                    let expert = match state.experts.entry((req.episode_id, req.attempt)) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            if tracked >= state.args.max_episodes {
                                let _ = reply.send(Err(PolicyFailure::TooManyEpisodes(tracked)));
                                continue;
                            }
                            e.insert(ExpertPolicy::new(
                                ScriptedExpert::new(*noise, req.policy_seed),
                                tokenizer.clone(),
                                *context,
                            ))
                        }
                    };
                    let out = expert.act(
                        &PolicyContext {
                            tokens: &req.tokens,
                            messages: &req.messages,
                        },
                        &req.sampling,
                    );
                    let _ = reply.send(
                        out.map(|completion| Action {
                            completion,
                            policy_version: state.version,
                        })
                        .map_err(|e| PolicyFailure::Generate(e.to_string())),
                    );
                }
            }
        }
    }

    fn sync_weights(
        state: &mut PolicyState,
        version: u64,
        weights: Option<BTreeMap<String, Tensor>>,
    ) -> Result<(), PolicyFailure> {
        if let (PolicyBackend::Local { policy, .. }, Some(weights)) =
            (&mut state.args.backend, weights)
        {
            let device = policy.model.device().clone();
            let config = policy.model.config().clone();
            let model = Llama::from_tensors(&config, weights.into_iter().collect(), &device)
                .map_err(|e| PolicyFailure::Weights(e.to_string()))?;
            policy.set_model(model, version);
        } else if let PolicyBackend::Local { policy, .. } = &mut state.args.backend {
            policy.set_version(version);
        }
        state.version = version;
        Ok(())
    }
}

impl Actor for PolicyActor {
    type Msg = PolicyMsg;
    type State = PolicyState;
    type Arguments = PolicyArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<PolicyMsg>,
        args: PolicyArgs,
    ) -> Result<PolicyState, ActorProcessingErr> {
        if args.max_queued == 0 || args.max_episodes == 0 {
            return Err("policy max_queued and max_episodes must be at least 1".into());
        }
        let version = match &args.backend {
            PolicyBackend::Local { policy, .. } => policy.version(),
            PolicyBackend::Scripted { .. } => 0,
        };
        Ok(PolicyState {
            args,
            queue: VecDeque::new(),
            flush_scheduled: false,
            experts: HashMap::new(),
            version,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<PolicyMsg>,
        msg: PolicyMsg,
        state: &mut PolicyState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PolicyMsg::Act(req, reply) => {
                if state.queue.len() >= state.args.max_queued {
                    let _ = reply.send(Err(PolicyFailure::Overloaded(state.queue.len())));
                    return Ok(());
                }
                state.queue.push_back((req, reply));
                // The flush goes behind every request already in the mailbox, so it batches
                // them all.
                if !state.flush_scheduled {
                    state.flush_scheduled = true;
                    myself.cast(PolicyMsg::Flush)?;
                }
            }
            PolicyMsg::Flush => {
                state.flush_scheduled = false;
                PolicyActor::flush(state);
                if !state.queue.is_empty() {
                    state.flush_scheduled = true;
                    myself.cast(PolicyMsg::Flush)?;
                }
            }
            PolicyMsg::EndEpisode {
                episode_id,
                attempt,
            } => {
                state.experts.remove(&(episode_id, attempt));
            }
            PolicyMsg::SyncWeights {
                version,
                weights,
                reply,
            } => {
                let _ = reply.send(PolicyActor::sync_weights(state, version, weights));
            }
        }
        Ok(())
    }
}
