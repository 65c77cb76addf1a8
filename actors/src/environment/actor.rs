//! The Environment actor: runs one episode at a time, end to end.
//!
//! `RunEpisode`: the task's files are copied into a fresh episode directory; the episode loop
//! ([`run_policy_episode`]) runs on tokio's blocking pool (sandbox calls are synchronous CPU
//! work) and asks the Policy actor for every turn; the finished episode goes to the Judge
//! actor; the reply is the judged, token-exact trajectory. The episode directory is removed
//! once judged.
//!
//! Failures: an infrastructure error (the sandbox host, the policy gone or overloaded, the
//! judge) is a typed [`EpisodeFailure`] in the reply. A panic in the episode makes the actor
//! fail: its reply port is dropped (the caller reads that as the environment dying) and its
//! supervisor decides whether to restart it and re-queue the episode.
//!
//! Every wait is bounded: each `Act` by `act_timeout`, the judge by `judge_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use klong_sandbox::{CallLimits, Sandbox, SandboxHost, ToolRegistry};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;

use super::episode::run_policy_episode;
use super::task::{CopyBounds, Task, ToolDocs};
use crate::messages::{
    ActRequest, EnvironmentMsg, EpisodeFailure, EpisodeReply, EpisodeRequest, FinishedEpisode,
    JudgeMsg, PolicyMsg, ScoredEpisode,
};
use crate::policy::chat::ChatTemplate;
use crate::policy::generate::{Completion, GenerateError};
use crate::policy::sampling::SamplingParams;
use crate::policy::tokenizer::Tokenizer;
use crate::policy::{Policy, PolicyContext};

/// What every episode of this environment shares.
#[derive(Clone)]
pub struct EnvironmentArgs {
    pub host: Arc<SandboxHost>,
    pub registry: Arc<ToolRegistry>,
    /// Limits of each tool call.
    pub call_limits: CallLimits,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    /// Longest wait for one `Act`.
    pub act_timeout: Duration,
    /// Longest wait for the judge's verdict.
    pub judge_timeout: Duration,
}

/// The tools of `task`, as the registry describes them to an agent (OpenAI-style), in the
/// registry's order, as briefly as the task asks ([`ToolDocs`]); none when the statement
/// describes them.
pub fn task_tools(registry: &ToolRegistry, task: &Task) -> Vec<Value> {
    if task.spec.tool_docs == ToolDocs::InStatement {
        return Vec::new();
    }
    registry
        .openai_tools()
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| {
                    let name = t["function"]["name"].as_str().unwrap_or_default();
                    task.spec.tools.iter().any(|n| n == name)
                })
                .map(|t| match task.spec.tool_docs {
                    ToolDocs::Brief => brief_tool(t),
                    ToolDocs::Full | ToolDocs::InStatement => t.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A tool entry with the description cut to its first sentence and no parameter
/// descriptions (names, types, enums and `required` stay: they are what a call needs).
fn brief_tool(tool: &Value) -> Value {
    let mut t = tool.clone();
    if let Some(f) = t.get_mut("function") {
        if let Some(desc) = f.get("description").and_then(Value::as_str) {
            let first = match desc.find(". ") {
                Some(i) => &desc[..=i],
                None => desc,
            };
            f["description"] = Value::String(first.to_string());
        }
        if let Some(props) = f
            .get_mut("parameters")
            .and_then(|p| p.get_mut("properties"))
            .and_then(Value::as_object_mut)
        {
            for p in props.values_mut() {
                if let Some(obj) = p.as_object_mut() {
                    obj.remove("description");
                }
            }
        }
    }
    t
}

/// A [`Policy`] that is an actor elsewhere: each `act` is an `Act` call, waited on from this
/// (blocking-pool) thread. The version is the one the answer was sampled with.
struct RemotePolicy {
    policy: ActorRef<PolicyMsg>,
    runtime: tokio::runtime::Handle,
    /// Set when the episode's actor is gone: the episode stops at its next turn.
    cancelled: Arc<AtomicBool>,
    episode_id: u64,
    attempt: u32,
    policy_seed: u64,
    context: usize,
    version: u64,
    timeout: Duration,
}

impl Policy for RemotePolicy {
    fn act(
        &mut self,
        context: &PolicyContext,
        params: &SamplingParams,
    ) -> Result<Completion, GenerateError> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(GenerateError::Unavailable(
                "the episode was cancelled (its environment stopped)".into(),
            ));
        }
        let request = ActRequest {
            episode_id: self.episode_id,
            attempt: self.attempt,
            policy_seed: self.policy_seed,
            tokens: context.tokens.to_vec(),
            messages: context.messages.to_vec(),
            sampling: params.clone(),
        };
        let answer = self.runtime.block_on(
            self.policy
                .call(|reply| PolicyMsg::Act(request, reply), Some(self.timeout)),
        );
        match answer {
            Ok(CallResult::Success(Ok(action))) => {
                self.version = action.policy_version;
                Ok(action.completion)
            }
            Ok(CallResult::Success(Err(e))) => Err(GenerateError::Unavailable(e.to_string())),
            Ok(CallResult::Timeout) => Err(GenerateError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
            Ok(CallResult::SenderError) => Err(GenerateError::Unavailable(
                "the policy stopped before answering".into(),
            )),
            Err(e) => Err(GenerateError::Unavailable(format!(
                "cannot reach the policy: {e}"
            ))),
        }
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn context(&self) -> usize {
        self.context
    }
}

pub struct Environment;

/// Lives as long as the episode's async side: when it ends, normally or because the actor was
/// killed mid-episode, the episode loop is told to stop and the policy to forget the episode.
struct EpisodeGuard {
    cancelled: Arc<AtomicBool>,
    policy: ActorRef<PolicyMsg>,
    episode_id: u64,
    attempt: u32,
}

impl Drop for EpisodeGuard {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Release);
        let _ = self.policy.cast(PolicyMsg::EndEpisode {
            episode_id: self.episode_id,
            attempt: self.attempt,
        });
    }
}

impl Environment {
    async fn run(
        args: &EnvironmentArgs,
        request: EpisodeRequest,
        policy: ActorRef<PolicyMsg>,
        judge: ActorRef<JudgeMsg>,
    ) -> Result<EpisodeReply, ActorProcessingErr> {
        // Entered only on the blocking thread (an entered guard must not live across an await).
        let span =
            tracing::info_span!("episode", id = request.episode_id, task = %request.task.name);
        let dir = request.episode_dir.clone();
        if dir.exists() {
            // Left by an attempt that did not finish: start again from the task's files.
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                return Ok(Err(EpisodeFailure::Setup(format!(
                    "cannot clear {}: {e}",
                    dir.display()
                ))));
            }
        }
        if let Err(e) = request.task.copy_files_into(&dir, CopyBounds::default()) {
            return Ok(Err(EpisodeFailure::Setup(e.to_string())));
        }
        let episode_id = request.episode_id;
        let guard = EpisodeGuard {
            cancelled: Arc::new(AtomicBool::new(false)),
            policy: policy.clone(),
            episode_id,
            attempt: request.attempt,
        };
        let cancelled = guard.cancelled.clone();
        let (a, req, pol, span2) = (args.clone(), request.clone(), policy.clone(), span.clone());
        let runtime = tokio::runtime::Handle::current();
        let ran = tokio::task::spawn_blocking(move || {
            let _enter = span2.enter();
            let mut sandbox = Sandbox::new(
                a.host.clone(),
                a.registry.clone(),
                &req.episode_dir,
                a.call_limits,
                req.sandbox_budget,
                req.sandbox_seed,
            )
            .map_err(|e| EpisodeFailure::Setup(e.to_string()))?;
            let mut remote = RemotePolicy {
                policy: pol,
                runtime,
                cancelled: cancelled.clone(),
                episode_id: req.episode_id,
                attempt: req.attempt,
                policy_seed: req.policy_seed,
                context: req.context,
                version: 0,
                timeout: a.act_timeout,
            };
            let tools = task_tools(&a.registry, &req.task);
            let run = run_policy_episode(
                &req.key,
                &req.task,
                &mut sandbox,
                &mut remote,
                &a.tokenizer,
                &a.template,
                &tools,
                &req.sampling,
                &req.limits,
            );
            if cancelled.load(Ordering::Acquire) {
                // Nobody will judge this attempt: leave no files behind.
                std::fs::remove_dir_all(&req.episode_dir).ok();
            }
            run.map_err(|e| EpisodeFailure::Episode(e.to_string()))
        })
        .await;
        // The policy may keep per-episode state; it is no longer needed, whatever happened.
        drop(guard);
        // A panic in the episode loop is this actor's failure (the supervisor decides).
        let run = match ran? {
            Ok(run) => run,
            Err(failure) => {
                std::fs::remove_dir_all(&dir).ok();
                return Ok(Err(failure));
            }
        };
        let judging = std::time::Instant::now();
        let graded = judge
            .call(
                |reply| JudgeMsg::Grade {
                    episode: FinishedEpisode {
                        episode_id,
                        task: request.task.clone(),
                        final_dir: dir.clone(),
                    },
                    priority: request.priority,
                    reply,
                },
                Some(args.judge_timeout),
            )
            .await;
        std::fs::remove_dir_all(&dir).ok();
        let graded = match graded {
            Ok(CallResult::Success(Ok(g))) => g,
            Ok(CallResult::Success(Err(e))) => {
                return Ok(Err(EpisodeFailure::Judge(e.to_string())))
            }
            Ok(CallResult::Timeout) => {
                return Ok(Err(EpisodeFailure::Judge(format!(
                    "no verdict within {:?}",
                    args.judge_timeout
                ))))
            }
            Ok(CallResult::SenderError) => {
                return Ok(Err(EpisodeFailure::Judge(
                    "the judge stopped before answering".into(),
                )))
            }
            Err(e) => {
                return Ok(Err(EpisodeFailure::Judge(format!(
                    "cannot reach the judge: {e}"
                ))))
            }
        };
        let mut trajectory = run.trajectory;
        let grades = graded
            .leaves
            .iter()
            .map(|l| (l.leaf_id.clone(), if l.passed { 1.0 } else { 0.0 }))
            .collect();
        trajectory.judge(graded.score, grades);
        tracing::info!(parent: &span, score = graded.score, turns = run.turns, end = ?run.end, "episode judged");
        Ok(Ok(ScoredEpisode {
            episode_id,
            task: request.task.name.clone(),
            trajectory,
            score: graded.score,
            end: run.end,
            turns: run.turns,
            generated_tokens: run.generated_tokens,
            malformed_turns: run.malformed_turns,
            judge_seconds: judging.elapsed().as_secs_f64(),
        }))
    }
}

impl Actor for Environment {
    type Msg = EnvironmentMsg;
    type State = EnvironmentArgs;
    type Arguments = EnvironmentArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<EnvironmentMsg>,
        args: EnvironmentArgs,
    ) -> Result<EnvironmentArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<EnvironmentMsg>,
        msg: EnvironmentMsg,
        state: &mut EnvironmentArgs,
    ) -> Result<(), ActorProcessingErr> {
        let EnvironmentMsg::RunEpisode {
            request,
            policy,
            judge,
            reply,
        } = msg;
        let result = Environment::run(state, request, policy, judge).await?;
        // The caller may have given up waiting; nothing else to do then.
        let _ = reply.send(result);
        Ok(())
    }
}
