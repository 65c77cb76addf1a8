//! The protocol between the actors: every message type, nothing else (design §4).
//!
//! Who talks to whom:
//! - the supervisor (in the `klongd` crate) sends an Environment `RunEpisode`, naming the
//!   Policy and Judge it is to use (so a restarted Policy or Judge is picked up by the next
//!   episode without telling every Environment);
//! - an Environment sends the Policy `Act` for every turn and `EndEpisode` when it is done,
//!   and the Judge `Grade` (defined with the judge: [`JudgeMsg`]);
//! - the stage runner sends the Learner `SftStep`, `RlStep` and `ExportState`/`Weights`, and
//!   the Policy `SyncWeights`.
//!
//! Every request carries an [`RpcReplyPort`]: the caller waits on it with a timeout, and a
//! reply port dropped by an actor that died reads as a failure, never as a hang.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use klong_sandbox::EpisodeBudget;
use ractor::{ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::judge::queue::{FinishedEpisode, GradedEpisode, JudgeFailure, JudgeMsg};

use crate::environment::episode::{EpisodeEnd, EpisodeLimits};
use crate::environment::task::Task;
use crate::learner::rl::{RlHyper, RlStepStats};
use crate::learner::sft::StepStats;
use crate::learner::split::SubTrajectory;
use crate::policy::chat::ChatMessage;
use crate::policy::generate::Completion;
use crate::policy::sampling::SamplingParams;
use crate::trajectory::Trajectory;

// ---------------------------------------------------------------------------------------------
// Policy.

/// One turn's request: what the policy sees and how to sample.
#[derive(Debug, Clone)]
pub struct ActRequest {
    pub episode_id: u64,
    /// Which attempt of the episode (a re-queued episode starts afresh, and the policy keeps
    /// per-episode state by `(episode_id, attempt)`).
    pub attempt: u32,
    /// Seeds the episode's per-episode state (the scripted expert's noise); sampling has its
    /// own seed in `sampling`.
    pub policy_seed: u64,
    /// The tokens that fit the policy's context (pinned prefix + latest turns).
    pub tokens: Vec<u32>,
    /// The whole conversation (what a text-level policy such as the scripted expert reads).
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
}

/// The policy's answer: the completion and the version of the weights that sampled it.
#[derive(Debug, Clone)]
pub struct Action {
    pub completion: Completion,
    pub policy_version: u64,
}

#[derive(Debug, Clone, Error)]
pub enum PolicyFailure {
    #[error("policy queue is full ({0} requests waiting)")]
    Overloaded(usize),
    #[error("policy tracks {0} episodes already; end some first")]
    TooManyEpisodes(usize),
    #[error("generation failed: {0}")]
    Generate(String),
    #[error("weights do not fit the policy's model: {0}")]
    Weights(String),
}

pub type ActReply = Result<Action, PolicyFailure>;

pub enum PolicyMsg {
    /// Sample one turn.
    Act(ActRequest, RpcReplyPort<ActReply>),
    /// The episode ended: drop its per-episode state.
    EndEpisode { episode_id: u64, attempt: u32 },
    /// New weights (by name; `None`: the weights changed in place, only the version moves).
    /// The stage runner sends it through the supervisor (`Actors::sync_policy`), which keeps
    /// the weights for a policy it has to restart.
    SyncWeights {
        version: u64,
        weights: Option<BTreeMap<String, Tensor>>,
        reply: RpcReplyPort<Result<(), PolicyFailure>>,
    },
    /// Generate for what is queued (sent by the policy to itself).
    Flush,
}

// ---------------------------------------------------------------------------------------------
// Environment.

/// Everything one episode needs.
#[derive(Debug, Clone)]
pub struct EpisodeRequest {
    /// Unique within the stage; orders results and names the trajectory.
    pub episode_id: u64,
    /// The trajectory's id (also the durable key of its result).
    pub key: String,
    /// 0, or 1 for a re-queued episode (set by the supervisor).
    pub attempt: u32,
    pub task: Arc<Task>,
    /// The episode's working directory: created fresh from the task's files, judged, removed.
    pub episode_dir: PathBuf,
    /// Seeds the sandbox (deterministic clocks and randomness).
    pub sandbox_seed: u64,
    /// Seeds the policy's per-episode state.
    pub policy_seed: u64,
    pub sampling: SamplingParams,
    pub limits: EpisodeLimits,
    /// The sandbox's totals for the episode (wall time, fuel, bytes, files).
    pub sandbox_budget: EpisodeBudget,
    /// The policy's context in tokens: the episode fits the conversation into it.
    pub context: usize,
    /// Judge queue priority (higher first).
    pub priority: i64,
}

/// A judged episode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoredEpisode {
    pub episode_id: u64,
    pub task: String,
    /// Token-exact, with the judge's grades and reward attached.
    pub trajectory: Trajectory,
    pub score: f64,
    pub end: EpisodeEnd,
    pub turns: u32,
    pub generated_tokens: u64,
    pub malformed_turns: u32,
    /// Time from handing the episode to the judge to its verdict (queueing included).
    pub judge_seconds: f64,
}

/// Why an episode has no score. Every one is an infrastructure failure: masked from training,
/// counted in metrics, never scored 0.
#[derive(Debug, Clone, Error, Serialize)]
pub enum EpisodeFailure {
    #[error("episode setup failed: {0}")]
    Setup(String),
    #[error("episode failed: {0}")]
    Episode(String),
    #[error("judge failed: {0}")]
    Judge(String),
    /// The environment running it died (twice, when it was re-queued once).
    #[error("the environment running the episode died: {0}")]
    EnvironmentDied(String),
}

pub type EpisodeReply = Result<ScoredEpisode, EpisodeFailure>;

pub enum EnvironmentMsg {
    RunEpisode {
        request: EpisodeRequest,
        policy: ActorRef<PolicyMsg>,
        judge: ActorRef<JudgeMsg>,
        reply: RpcReplyPort<EpisodeReply>,
    },
}

// ---------------------------------------------------------------------------------------------
// Learner.

#[derive(Debug, Clone, Error)]
pub enum LearnerFailure {
    #[error("learner step failed: {0}")]
    Step(String),
    #[error("cannot export the learner's state: {0}")]
    Export(String),
}

pub enum LearnerMsg {
    /// One optimizer step over micro-batches of sub-trajectories.
    SftStep {
        micro: Vec<Vec<SubTrajectory>>,
        lr: f64,
        max_grad_norm: f64,
        reply: RpcReplyPort<Result<StepStats, LearnerFailure>>,
    },
    /// One policy-gradient step over micro-batches of judged rollouts' sub-trajectories,
    /// each carrying its behaviour logprobs and its rollout's advantage.
    RlStep {
        micro: Vec<Vec<SubTrajectory>>,
        hyper: RlHyper,
        lr: f64,
        max_grad_norm: f64,
        reply: RpcReplyPort<Result<RlStepStats, LearnerFailure>>,
    },
    /// Weights and optimizer moments as named tensors (what a checkpoint stores).
    ExportState(RpcReplyPort<Result<BTreeMap<String, Tensor>, LearnerFailure>>),
    /// The weights alone, by HF name (what the policy and `save_hf` take).
    Weights(RpcReplyPort<Result<BTreeMap<String, Tensor>, LearnerFailure>>),
}
