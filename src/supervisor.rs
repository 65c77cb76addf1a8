//! The Supervisor: owns the run's actors (Policy, a pool of Environments, Judge, Learner),
//! hands episodes to idle environments, and restarts a child that fails.
//!
//! Episodes: the stage submits [`EpisodeRequest`]s (at most `window` in flight, so the queues
//! below are bounded by it) and reads one [`EpisodeOutcome`] per request. An episode whose
//! environment died (a panic, a stop, or no reply within `episode_timeout`) is re-queued
//! once; the second time it is an infrastructure failure. Other infrastructure failures
//! (sandbox host, policy, judge) come back typed from the environment and are not re-run.
//!
//! Restarts: a failed Policy, Judge or Environment is spawned again from the arguments it was
//! started with, up to `max_restarts` for the whole runtime; past that the supervisor stops
//! and the stage fails with the reason (nothing waits forever). The Learner is not restarted:
//! its state since the last checkpoint is gone with it, so its failure fails the stage, and
//! `klongd run` resumes from the checkpoint.
//!
//! [`Actors`] is the stage runner's handle: a tokio runtime, the supervisor, and blocking
//! calls with timeouts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use candle_core::Tensor;
use klong_actors::environment::actor::{Environment, EnvironmentArgs};
use klong_actors::judge::queue::{Judge, JudgeArgs, JudgeContext};
use klong_actors::learner::actor::{Learner, LearnerArgs};
use klong_actors::messages::{
    EnvironmentMsg, EpisodeFailure, EpisodeReply, EpisodeRequest, JudgeMsg, LearnerMsg, PolicyMsg,
};
use klong_actors::policy::actor::{PolicyActor, PolicyArgs, PolicyBackend};
use klong_actors::policy::model::Llama;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::mpsc;

/// Sizes, bounds and timeouts of the actor runtime.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Environments, i.e. episodes running at once.
    pub environments: usize,
    /// Episodes the stage keeps submitted (running + queued).
    pub window: usize,
    /// Longest an episode may take, judging included, before its environment is presumed dead.
    pub episode_timeout: Duration,
    /// Restarts of failed children over the runtime's life.
    pub max_restarts: u32,
    /// Episodes graded at once, and waiting to be.
    pub judge_concurrency: usize,
    pub judge_queue: usize,
}

/// One finished request.
#[derive(Debug)]
pub struct EpisodeOutcome {
    pub episode_id: u64,
    /// `Err`: an infrastructure failure (masked from training, counted).
    pub result: EpisodeReply,
    /// 1, or 2 when the episode was re-queued once.
    pub attempts: u32,
}

pub enum CallOutcome {
    /// Boxed: a scored episode (its trajectory's header) is large beside `Died`.
    Reply(Box<EpisodeReply>),
    Died(String),
}

pub enum SupervisorMsg {
    Submit(EpisodeRequest),
    /// An environment's call returned (sent by the supervisor's own tasks).
    Done {
        slot: usize,
        /// Boxed: the request is large beside the other messages.
        request: Box<EpisodeRequest>,
        outcome: CallOutcome,
    },
    /// Replace (or start) the policy.
    SetPolicy(
        PolicyArgs,
        RpcReplyPort<Result<ActorRef<PolicyMsg>, String>>,
    ),
    /// New weights for the policy, kept for a restart too (see `PolicyMsg::SyncWeights`).
    SyncPolicy {
        version: u64,
        weights: BTreeMap<String, Tensor>,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// The children now running (for inspection and fault-injection tests).
    Children(RpcReplyPort<Result<Children, String>>),
    StartLearner(
        Box<LearnerArgs>,
        RpcReplyPort<Result<ActorRef<LearnerMsg>, String>>,
    ),
}

/// The children at one moment.
#[derive(Clone)]
pub struct Children {
    pub policy: Option<ActorRef<PolicyMsg>>,
    pub judge: ActorRef<JudgeMsg>,
    pub environments: Vec<ActorRef<EnvironmentMsg>>,
    pub restarts: u32,
}

pub struct SupervisorArgs {
    pub settings: RuntimeSettings,
    pub environment: EnvironmentArgs,
    pub judge: Arc<JudgeContext>,
    pub outcomes: mpsc::Sender<EpisodeOutcome>,
    /// Why the supervisor gave up, for the stage's error message.
    pub failure: Arc<Mutex<Option<String>>>,
}

struct Slot {
    actor: ActorRef<EnvironmentMsg>,
    busy: bool,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    policy: Option<(ActorRef<PolicyMsg>, PolicyArgs)>,
    judge: ActorRef<JudgeMsg>,
    learner: Option<ActorRef<LearnerMsg>>,
    slots: Vec<Slot>,
    queue: VecDeque<(EpisodeRequest, u32)>,
    /// Attempts of each episode in flight, by id.
    attempts: std::collections::HashMap<u64, u32>,
    restarts: u32,
}

pub struct Supervisor;

fn judge_args(args: &SupervisorArgs) -> JudgeArgs {
    JudgeArgs {
        ctx: args.judge.clone(),
        max_concurrent: args.settings.judge_concurrency,
        max_queued: args.settings.judge_queue,
    }
}

impl Supervisor {
    async fn spawn_environment(
        myself: &ActorRef<SupervisorMsg>,
        args: &EnvironmentArgs,
    ) -> Result<ActorRef<EnvironmentMsg>, ActorProcessingErr> {
        let (env, _) =
            Actor::spawn_linked(None, Environment, args.clone(), myself.get_cell()).await?;
        Ok(env)
    }

    fn is(cell: &ActorCell, actor: ractor::ActorId) -> bool {
        cell.get_id() == actor
    }

    /// Sends the outcome to the stage. The channel holds `window` outcomes and the stage never
    /// has more than `window` episodes submitted, so it cannot be full.
    fn report(state: &SupervisorState, outcome: EpisodeOutcome) -> Result<(), ActorProcessingErr> {
        state
            .args
            .outcomes
            .try_send(outcome)
            .map_err(|e| format!("cannot report an episode outcome: {e}").into())
    }

    async fn dispatch(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        while !state.queue.is_empty() {
            let Some(slot) = state.slots.iter().position(|s| !s.busy) else {
                return Ok(());
            };
            let Some((policy, _)) = &state.policy else {
                // No policy: every queued episode fails at once (a stage bug, but not a hang).
                while let Some((request, attempts)) = state.queue.pop_front() {
                    Supervisor::report(
                        state,
                        EpisodeOutcome {
                            episode_id: request.episode_id,
                            result: Err(EpisodeFailure::Setup("no policy is running".into())),
                            attempts: attempts + 1,
                        },
                    )?;
                }
                return Ok(());
            };
            let policy = policy.clone();
            if state.slots[slot].actor.get_status() != ActorStatus::Running {
                state.slots[slot].actor =
                    Supervisor::spawn_environment(myself, &state.args.environment).await?;
            }
            let Some((request, attempts)) = state.queue.pop_front() else {
                return Ok(());
            };
            state.attempts.insert(request.episode_id, attempts + 1);
            state.slots[slot].busy = true;
            let env = state.slots[slot].actor.clone();
            let judge = state.judge.clone();
            let me = myself.clone();
            let timeout = state.args.settings.episode_timeout;
            tokio::spawn(async move {
                let sent = request.clone();
                let answer = env
                    .call(
                        |reply| EnvironmentMsg::RunEpisode {
                            request: sent,
                            policy,
                            judge,
                            reply,
                        },
                        Some(timeout),
                    )
                    .await;
                let outcome = match answer {
                    Ok(CallResult::Success(r)) => CallOutcome::Reply(Box::new(r)),
                    Ok(CallResult::Timeout) => {
                        // Presumed stuck: stop it; the supervisor restarts the slot.
                        env.kill();
                        CallOutcome::Died(format!("no result within {timeout:?}"))
                    }
                    Ok(CallResult::SenderError) => {
                        CallOutcome::Died("it stopped before answering".into())
                    }
                    Err(e) => CallOutcome::Died(format!("it cannot be reached: {e}")),
                };
                let _ = me.cast(SupervisorMsg::Done {
                    slot,
                    request: Box::new(request),
                    outcome,
                });
            });
        }
        Ok(())
    }

    fn count_restart(
        state: &mut SupervisorState,
        what: &str,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        state.restarts += 1;
        tracing::warn!(
            child = what,
            reason = why,
            restarts = state.restarts,
            "child actor failed; restarting"
        );
        if state.restarts > state.args.settings.max_restarts {
            return Err(Supervisor::give_up(
                state,
                format!(
                    "{} child restarts (limit {}); last: {what} failed: {why}",
                    state.restarts, state.args.settings.max_restarts
                ),
            ));
        }
        Ok(())
    }

    fn give_up(state: &SupervisorState, why: String) -> ActorProcessingErr {
        if let Ok(mut slot) = state.args.failure.lock() {
            *slot = Some(why.clone());
        }
        why.into()
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let s = &args.settings;
        if s.environments == 0 || s.window == 0 || s.judge_concurrency == 0 || s.judge_queue == 0 {
            return Err("environments, window and the judge's sizes must be at least 1".into());
        }
        let (judge, _) =
            Actor::spawn_linked(None, Judge, judge_args(&args), myself.get_cell()).await?;
        let mut slots = Vec::with_capacity(s.environments);
        for _ in 0..s.environments {
            slots.push(Slot {
                actor: Supervisor::spawn_environment(&myself, &args.environment).await?,
                busy: false,
            });
        }
        Ok(SupervisorState {
            args,
            policy: None,
            judge,
            learner: None,
            slots,
            queue: VecDeque::new(),
            attempts: Default::default(),
            restarts: 0,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for slot in &state.slots {
            slot.actor.stop(None);
        }
        if let Some((p, _)) = &state.policy {
            p.stop(None);
        }
        if let Some(l) = &state.learner {
            l.stop(None);
        }
        state.judge.stop(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Submit(request) => {
                if state.queue.len() >= state.args.settings.window {
                    Supervisor::report(
                        state,
                        EpisodeOutcome {
                            episode_id: request.episode_id,
                            result: Err(EpisodeFailure::Setup(format!(
                                "the episode queue is full ({} waiting)",
                                state.queue.len()
                            ))),
                            attempts: 0,
                        },
                    )?;
                } else {
                    state.queue.push_back((request, 0));
                }
            }
            SupervisorMsg::Done {
                slot,
                request,
                outcome,
            } => {
                if let Some(s) = state.slots.get_mut(slot) {
                    s.busy = false;
                }
                let attempts = state.attempts.remove(&request.episode_id).unwrap_or(1);
                match outcome {
                    CallOutcome::Reply(result) => Supervisor::report(
                        state,
                        EpisodeOutcome {
                            episode_id: request.episode_id,
                            result: *result,
                            attempts,
                        },
                    )?,
                    CallOutcome::Died(why) if attempts < 2 => {
                        tracing::warn!(episode = request.episode_id, reason = %why, "environment died; re-queueing the episode once");
                        // A directory of its own: the dead attempt's thread may still write in
                        // the old one. First in line: it has waited longest.
                        let mut request = *request;
                        request.episode_dir = request.episode_dir.with_extension("retry");
                        request.attempt += 1;
                        state.queue.push_front((request, attempts));
                    }
                    CallOutcome::Died(why) => Supervisor::report(
                        state,
                        EpisodeOutcome {
                            episode_id: request.episode_id,
                            result: Err(EpisodeFailure::EnvironmentDied(why)),
                            attempts,
                        },
                    )?,
                }
            }
            SupervisorMsg::SetPolicy(args, reply) => {
                if let Some((old, _)) = state.policy.take() {
                    old.stop(None);
                }
                match Actor::spawn_linked(None, PolicyActor, args.clone(), myself.get_cell()).await
                {
                    Ok((p, _)) => {
                        state.policy = Some((p.clone(), args));
                        let _ = reply.send(Ok(p));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            SupervisorMsg::SyncPolicy {
                version,
                weights,
                reply,
            } => {
                let Some((policy, args)) = &mut state.policy else {
                    let _ = reply.send(Err("no policy is running".into()));
                    return Ok(());
                };
                // A restarted policy must come back with these weights, not its first ones.
                if let PolicyBackend::Local { policy: local, .. } = &mut args.backend {
                    let cfg = local.model.config().clone();
                    let device = local.model.device().clone();
                    let copy = weights
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    match Llama::from_tensors(&cfg, copy, &device) {
                        Ok(model) => local.set_model(model, version),
                        Err(e) => {
                            let _ = reply.send(Err(format!("weights do not fit the policy: {e}")));
                            return Ok(());
                        }
                    }
                }
                let answer = policy
                    .call(
                        |r| PolicyMsg::SyncWeights {
                            version,
                            weights: Some(weights),
                            reply: r,
                        },
                        // Within the caller's own wait, so it gets the policy's answer.
                        Some(CONTROL_TIMEOUT / 2),
                    )
                    .await;
                let _ = reply.send(match answer {
                    Ok(CallResult::Success(Ok(()))) => Ok(()),
                    Ok(CallResult::Success(Err(e))) => Err(e.to_string()),
                    Ok(CallResult::Timeout) => {
                        Err("the policy did not take the weights in time".into())
                    }
                    Ok(CallResult::SenderError) | Err(_) => Err("the policy stopped".into()),
                });
            }
            SupervisorMsg::Children(reply) => {
                let _ = reply.send(Ok(Children {
                    policy: state.policy.as_ref().map(|(p, _)| p.clone()),
                    judge: state.judge.clone(),
                    environments: state.slots.iter().map(|s| s.actor.clone()).collect(),
                    restarts: state.restarts,
                }));
            }
            SupervisorMsg::StartLearner(args, reply) => {
                if let Some(old) = state.learner.take() {
                    old.stop(None);
                }
                match Actor::spawn_linked(None, Learner, *args, myself.get_cell()).await {
                    Ok((l, _)) => {
                        state.learner = Some(l.clone());
                        let _ = reply.send(Ok(l));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
        }
        Supervisor::dispatch(&myself, state).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // A child we replaced or stopped ourselves is no longer in the state, so it matches
        // nothing below; any other child that ends (a panic, an error, a kill) is restarted.
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_string()))
            }
            _ => return Ok(()),
        };
        if Supervisor::is(&cell, state.judge.get_id()) {
            Supervisor::count_restart(state, "judge", &why)?;
            let (judge, _) =
                Actor::spawn_linked(None, Judge, judge_args(&state.args), myself.get_cell())
                    .await?;
            state.judge = judge;
        } else if let Some((policy, args)) = &state.policy {
            if Supervisor::is(&cell, policy.get_id()) {
                let args = args.clone();
                Supervisor::count_restart(state, "policy", &why)?;
                let (p, _) =
                    Actor::spawn_linked(None, PolicyActor, args.clone(), myself.get_cell()).await?;
                state.policy = Some((p, args));
            }
        }
        if let Some(i) = state
            .slots
            .iter()
            .position(|s| Supervisor::is(&cell, s.actor.get_id()))
        {
            Supervisor::count_restart(state, "environment", &why)?;
            state.slots[i].actor =
                Supervisor::spawn_environment(&myself, &state.args.environment).await?;
        }
        if let Some(l) = &state.learner {
            if Supervisor::is(&cell, l.get_id()) {
                return Err(Supervisor::give_up(
                    state,
                    format!(
                        "the learner failed ({why}); run again to resume from the last checkpoint"
                    ),
                ));
            }
        }
        Supervisor::dispatch(&myself, state).await
    }
}

/// The stage runner's handle on the actors.
pub struct Actors {
    runtime: tokio::runtime::Runtime,
    supervisor: ActorRef<SupervisorMsg>,
    outcomes: mpsc::Receiver<EpisodeOutcome>,
    settings: RuntimeSettings,
    supervisor_done: Option<tokio::task::JoinHandle<()>>,
    failure: Arc<Mutex<Option<String>>>,
}

/// Longest wait for a control call (spawning a policy or learner).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

impl Actors {
    pub fn start(
        settings: RuntimeSettings,
        environment: EnvironmentArgs,
        judge: Arc<JudgeContext>,
    ) -> anyhow::Result<Actors> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("klongd-actors")
            .build()
            .context("cannot start the actor runtime")?;
        let (tx, rx) = mpsc::channel(settings.window.max(1));
        let failure = Arc::new(Mutex::new(None));
        let args = SupervisorArgs {
            settings: settings.clone(),
            environment,
            judge,
            outcomes: tx,
            failure: failure.clone(),
        };
        let (supervisor, done) = runtime
            .block_on(Actor::spawn(None, Supervisor, args))
            .map_err(|e| anyhow!("cannot start the supervisor: {e}"))?;
        Ok(Actors {
            runtime,
            supervisor,
            outcomes: rx,
            settings,
            supervisor_done: Some(done),
            failure,
        })
    }

    /// Episodes the stage keeps submitted at once.
    pub fn window(&self) -> usize {
        self.settings.window
    }

    fn control<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<Result<T, String>>) -> SupervisorMsg,
        what: &str,
    ) -> anyhow::Result<T> {
        match self
            .runtime
            .block_on(self.supervisor.call(build, Some(CONTROL_TIMEOUT)))
        {
            Ok(CallResult::Success(Ok(v))) => Ok(v),
            Ok(CallResult::Success(Err(e))) => bail!("cannot start the {what}: {e}"),
            Ok(CallResult::Timeout) => {
                bail!("the supervisor did not start the {what} within {CONTROL_TIMEOUT:?}")
            }
            Ok(CallResult::SenderError) | Err(_) => bail!("the supervisor stopped"),
        }
    }

    /// Starts (or replaces) the policy every following episode uses.
    pub fn set_policy(&self, args: PolicyArgs) -> anyhow::Result<ActorRef<PolicyMsg>> {
        self.control(|r| SupervisorMsg::SetPolicy(args, r), "policy")
    }

    /// Hands the policy new weights and their version (an RL step's result). The supervisor
    /// keeps them, so a policy restarted later comes back with them.
    pub fn sync_policy(
        &self,
        version: u64,
        weights: BTreeMap<String, Tensor>,
    ) -> anyhow::Result<()> {
        self.control(
            |reply| SupervisorMsg::SyncPolicy {
                version,
                weights,
                reply,
            },
            "weight sync",
        )
    }

    pub fn children(&self) -> anyhow::Result<Children> {
        self.control(SupervisorMsg::Children, "children listing")
    }

    pub fn start_learner(&self, args: LearnerArgs) -> anyhow::Result<ActorRef<LearnerMsg>> {
        self.control(
            |r| SupervisorMsg::StartLearner(Box::new(args), r),
            "learner",
        )
    }

    /// A call to an actor, waited on for at most `timeout`.
    pub fn call<M: Send + 'static, T: Send + 'static>(
        &self,
        actor: &ActorRef<M>,
        build: impl FnOnce(RpcReplyPort<T>) -> M,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<T> {
        match self.runtime.block_on(actor.call(build, Some(timeout))) {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => bail!("{what}: no answer within {timeout:?}"),
            Ok(CallResult::SenderError) => bail!("{what}: the actor stopped before answering"),
            Err(e) => bail!("{what}: cannot reach the actor: {e}"),
        }
    }

    /// Runs `requests` with at most `window` submitted at once; `on_outcome` sees each
    /// outcome as it comes (in completion order). An error from `on_outcome` stops submitting
    /// and is returned once the episodes in flight are drained.
    pub fn run_episodes(
        &mut self,
        requests: impl IntoIterator<Item = EpisodeRequest>,
        mut on_outcome: impl FnMut(EpisodeOutcome) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut pending = requests.into_iter();
        let mut in_flight = 0usize;
        let mut failed: Option<anyhow::Error> = None;
        // Two attempts per episode, and every queued episode ahead of it.
        let wait = self.settings.episode_timeout * 2 * (self.settings.window as u32).max(1);
        loop {
            while failed.is_none() && in_flight < self.settings.window {
                let Some(request) = pending.next() else { break };
                self.supervisor
                    .cast(SupervisorMsg::Submit(request))
                    .map_err(|_| anyhow!("the supervisor stopped: {}", self.stop_reason()))?;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let next = self
                .runtime
                .block_on(async { tokio::time::timeout(wait, self.outcomes.recv()).await });
            let outcome = match next {
                Ok(Some(o)) => o,
                Ok(None) => bail!("the actor runtime stopped: {}", self.stop_reason()),
                Err(_) => bail!("no episode finished within {wait:?}"),
            };
            in_flight -= 1;
            if failed.is_none() {
                if let Err(e) = on_outcome(outcome) {
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop_reason(&self) -> String {
        if let Some(why) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return why;
        }
        match self.supervisor.get_status() {
            ActorStatus::Running => "it is still running".into(),
            s => format!("supervisor status {s:?} (see the log for the failed child)"),
        }
    }

    /// Stops every actor and waits (bounded) for the supervisor to end.
    pub fn shutdown(mut self) {
        self.supervisor.stop(None);
        if let Some(done) = self.supervisor_done.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(30), done).await });
        }
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }
}
