//! The `Rl` stage of `klongd run`: one stage of progressive RL (design §6).
//!
//! A step, in order:
//! 1. **Rollouts.** `tasks_per_step` tasks (a seeded pass over the stage's task set), each run
//!    `group_size` times by the current policy (the Local backend, batching the episodes'
//!    requests), sampled at the stage's temperature with the logprob of every token recorded,
//!    under the stage's episode budget; an episode that spends it is judged on the state it
//!    reached. Every judged rollout is stored (`traj/<stage>/<step>-<task>-<sample>`) as soon
//!    as it is judged: a resumed run reads it back and never re-runs it.
//! 2. **Advantages.** Per task, the group-normalised reward; a group whose rewards are all
//!    equal carries no signal and is left out (counted in the metrics), as are rollouts lost
//!    to infrastructure failures (masked, never a reward of 0).
//! 3. **Learn.** Each remaining rollout is split as in SFT, every sub-trajectory carrying its
//!    rollout's advantage; one optimizer step of the clipped surrogate plus `kl_beta` x KL to
//!    the reference (`klong_actors::learner::rl`).
//! 4. **Sync.** The new weights go to the policy as version `step + 1` (through the
//!    supervisor, which keeps them for a restart). Every action records the version that
//!    sampled it, and the learner refuses rollouts that are not from the step's version.
//!
//! Metrics per step go to `RUN_DIR/metrics.jsonl`; checkpoints every `checkpoint_every` steps;
//! the final model to `RUN_DIR/models/<stage>/`.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context};
use klong_actors::environment::episode::EpisodeLimits;
use klong_actors::environment::expert::MAX_OBSERVATION_BYTES;
use klong_actors::learner::optim::LrSchedule;
use klong_actors::learner::rl::{group_advantages, RlHyper};
use klong_actors::learner::sft::pack_batches;
use klong_actors::learner::split::{split, Pin, SplitConfig, SubTrajectory};
use klong_actors::messages::{EpisodeRequest, LearnerMsg, ScoredEpisode};
use klong_actors::policy::actor::{PolicyArgs, PolicyBackend};
use klong_actors::policy::local::LocalPolicy;
use klong_actors::policy::sampling::SamplingParams;
use klong_actors::trajectory::{Trajectory, Turn};
use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::RlStage;
use crate::eval_stage::{end_name, frozen_model};
use crate::progress::Progress;
use crate::sft_stage::{checkpoint, save_stage_model, StageEnv, TrainModel};
use crate::supervisor::Actors;
use crate::task_set::{resolve, StageTask};

/// A judged rollout as stored: the episode and its place in the step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRollout {
    /// The task's slot in its step.
    pub group: u32,
    pub sample: u32,
    #[serde(flatten)]
    pub episode: ScoredEpisode,
}

/// How an Rl stage ended in this invocation.
#[derive(Debug, Clone, Serialize)]
pub struct RlSummary {
    pub stage: String,
    pub steps_done: u64,
    pub total_steps: u64,
    pub finished: bool,
    /// The reward means of the steps taken in this invocation.
    pub reward_means: Vec<f64>,
}

/// A splitmix64 step: seeds derived from the run's seed, well mixed.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The task of slot `g` (counted over the stage: `step * tasks_per_step + j`): pass
/// `g / len` over the task set, in an order shuffled per pass from `seed`.
fn task_of_slot(g: u64, len: usize, seed: u64) -> usize {
    let pass = g / len as u64;
    let mut order: Vec<usize> = (0..len).collect();
    let mut state = mix(seed ^ pass.wrapping_mul(0xA24B_AED4_963E_E407));
    for i in (1..len).rev() {
        state = mix(state);
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order[(g % len as u64) as usize]
}

/// Runs (or resumes, from `start_step`) the Rl stage `index`. The learner holds the model (as
/// the previous stage or the checkpoint left it) and the reference.
#[allow(clippy::too_many_arguments)]
pub fn run_rl(
    env: &StageEnv,
    actors: &mut Actors,
    learner: &ActorRef<LearnerMsg>,
    index: usize,
    stage: &RlStage,
    tm: &TrainModel,
    start_step: u64,
    steps_budget: &mut Option<u64>,
) -> anyhow::Result<RlSummary> {
    let span = tracing::info_span!("stage", name = %stage.name);
    let _enter = span.enter();
    let timeout = env.config.actors.episode_timeout.0;
    let seed = mix(env.config.seed ^ mix(index as u64));
    let tasks_dir = env.run_dir.join("tasks").join(&stage.name);
    let tasks = resolve(&stage.tasks, &tasks_dir, env.config.seed)?;
    let context = tm.config.max_position_embeddings;
    let split_cfg = SplitConfig {
        context: stage.split.context,
        mode: stage.split.mode,
        overlap: stage.split.overlap,
        pin: Pin::Recorded,
    };
    let hyper = RlHyper {
        clip_eps: stage.clip_eps,
        kl_beta: stage.kl_beta,
        temperature: f64::from(stage.temperature),
    };
    let lr = LrSchedule {
        peak_lr: stage.lr,
        warmup_steps: stage.warmup_steps,
        total_steps: stage.steps,
        min_ratio: stage.min_lr_ratio,
    };

    // The policy: a copy of the weights as they are now (the learner trains `tm`'s
    // variables in place), version = steps taken.
    let model = frozen_model(tm)?;
    let window = actors.window();
    actors.set_policy(PolicyArgs {
        backend: PolicyBackend::Local {
            policy: Box::new(LocalPolicy::new(model, tm.tokenizer.clone(), start_step)),
            max_batch: window,
        },
        max_queued: window,
        max_episodes: window,
    })?;

    let mut progress = Progress::starting_at(&stage.name, start_step, stage.steps);
    let mut reward_means = Vec::new();
    let mut step = start_step;
    while step < stage.steps {
        if *steps_budget == Some(0) {
            break;
        }
        let started = Instant::now();
        let rollouts = rollouts(env, actors, stage, seed, &tasks, step, context)?;
        let rollout_s = started.elapsed().as_secs_f64();

        // Advantages per group; rollouts of groups without a spread are left out.
        let mut groups: BTreeMap<u32, Vec<&StoredRollout>> = BTreeMap::new();
        for r in rollouts.iter().flatten() {
            check_version(&r.episode.trajectory, step)?;
            groups.entry(r.group).or_default().push(r);
        }
        let mut subs: Vec<SubTrajectory> = Vec::new();
        let mut zero_groups = 0usize;
        for members in groups.values() {
            let rewards: Vec<f64> = members.iter().map(|r| r.episode.score).collect();
            let Some(adv) = group_advantages(&rewards) else {
                zero_groups += 1;
                continue;
            };
            for (r, a) in members.iter().zip(adv) {
                for mut s in split(&r.episode.trajectory, &split_cfg)
                    .with_context(|| format!("splitting {}", r.episode.trajectory.id))?
                {
                    s.advantage = Some(a as f32);
                    subs.push(s);
                }
            }
        }
        let groups_without_members = stage.tasks_per_step as usize - groups.len();

        // One optimizer step over every sub-trajectory, packed into micro-batches.
        let learn_started = Instant::now();
        let step_lr = lr.lr(step);
        let stats = if subs.is_empty() {
            None
        } else {
            let micro: Vec<Vec<SubTrajectory>> =
                pack_batches(&subs, stage.batch_tokens, seed ^ step)?
                    .into_iter()
                    .map(|rows| rows.into_iter().map(|i| subs[i].clone()).collect())
                    .collect();
            let max_grad_norm = stage.max_grad_norm;
            Some(
                actors
                    .call(
                        learner,
                        |reply| LearnerMsg::RlStep {
                            micro,
                            hyper,
                            lr: step_lr,
                            max_grad_norm,
                            reply,
                        },
                        timeout,
                        "learner step",
                    )?
                    .with_context(|| format!("stage {} step {}", stage.name, step + 1))?,
            )
        };
        let learn_s = learn_started.elapsed().as_secs_f64();
        let sync_started = Instant::now();
        let weights = actors
            .call(learner, LearnerMsg::Weights, timeout, "learner weights")?
            .context("the weights after the step")?;
        actors.sync_policy(step + 1, weights)?;
        let sync_s = sync_started.elapsed().as_secs_f64();
        step += 1;
        if let Some(b) = steps_budget.as_mut() {
            *b -= 1;
        }

        let scored: Vec<&StoredRollout> = rollouts.iter().flatten().collect();
        let infra_failures = rollouts.iter().filter(|r| r.is_none()).count();
        let count = scored.len().max(1) as f64;
        let mean = scored.iter().map(|r| r.episode.score).sum::<f64>() / count;
        let std = (scored
            .iter()
            .map(|r| (r.episode.score - mean).powi(2))
            .sum::<f64>()
            / count)
            .sqrt();
        let mut ends: BTreeMap<String, usize> = BTreeMap::new();
        for r in &scored {
            *ends.entry(end_name(r.episode.end)).or_insert(0) += 1;
        }
        reward_means.push(mean);
        let line = json!({
            "stage": stage.name,
            "step": step,
            "policy_version": step - 1,
            "rollouts": scored.len(),
            "infra_failures": infra_failures,
            "reward_mean": mean,
            "reward_std": std,
            "score_mean": mean,
            "success_rate": scored.iter().filter(|r| r.episode.score >= 1.0 - 1e-9).count() as f64 / count,
            "turns_mean": scored.iter().map(|r| f64::from(r.episode.turns)).sum::<f64>() / count,
            "generated_tokens": scored.iter().map(|r| r.episode.generated_tokens).sum::<u64>(),
            "malformed_turns": scored.iter().map(|r| u64::from(r.episode.malformed_turns)).sum::<u64>(),
            "ends": ends,
            "groups": groups.len(),
            "zero_variance_groups": zero_groups,
            "groups_lost": groups_without_members,
            "sub_trajectories": subs.len(),
            "loss": stats.map(|s| s.loss),
            "pg_loss": stats.map(|s| s.pg_loss),
            "kl": stats.map(|s| s.kl),
            "clip_fraction": stats.map(|s| s.clip_fraction),
            "ratio": stats.map(|s| s.ratio),
            "entropy": stats.map(|s| s.entropy),
            "targets": stats.map(|s| s.targets),
            "tokens": stats.map(|s| s.tokens),
            "grad_norm": stats.map(|s| s.grad_norm),
            "lr": step_lr,
            "rollout_s": rollout_s,
            "judge_s": scored.iter().map(|r| r.episode.judge_seconds).sum::<f64>(),
            "learn_s": learn_s,
            "sync_s": sync_s,
            "step_s": started.elapsed().as_secs_f64(),
        });
        env.log_metrics(&line)?;
        tracing::info!(
            step,
            total = stage.steps,
            reward = mean,
            zero_groups,
            kl = stats.map(|s| s.kl),
            "rl step"
        );
        progress.inc(1, &format!("reward {mean:.3}"));
        if step == stage.steps {
            // Before the checkpoint that marks the stage done (see `save_stage_model`).
            save_stage_model(env, actors, learner, &stage.name, tm)?;
        }
        if step.is_multiple_of(stage.checkpoint_every) || step == stage.steps {
            checkpoint(
                env,
                actors,
                learner,
                index,
                &stage.name,
                step,
                step == stage.steps,
            )?;
        }
    }
    progress.finish();
    if step < stage.steps && step > start_step && !step.is_multiple_of(stage.checkpoint_every) {
        // Stopped by the step budget: keep what was done.
        checkpoint(env, actors, learner, index, &stage.name, step, false)?;
    }
    let finished = step == stage.steps;
    Ok(RlSummary {
        stage: stage.name.clone(),
        steps_done: step,
        total_steps: stage.steps,
        finished,
        reward_means,
    })
}

/// Every action of a rollout of step `step` was sampled by version `step` (on-policy).
fn check_version(traj: &Trajectory, step: u64) -> anyhow::Result<()> {
    for turn in &traj.turns {
        if let Turn::Assistant(a) = turn {
            if a.policy_version != Some(step) {
                bail!(
                    "rollout {} of step {} holds an action of policy version {:?}: rollouts \
                     must come from the step's weights",
                    traj.id,
                    step + 1,
                    a.policy_version
                );
            }
        }
    }
    Ok(())
}

/// The step's rollouts, in slot order (`None`: lost to an infrastructure failure): stored ones
/// read back, the others run by the actors and stored as they are judged.
#[allow(clippy::too_many_arguments)]
fn rollouts(
    env: &StageEnv,
    actors: &mut Actors,
    stage: &RlStage,
    seed: u64,
    tasks: &[StageTask],
    step: u64,
    context: usize,
) -> anyhow::Result<Vec<Option<StoredRollout>>> {
    let n = stage.group_size;
    let key = |j: u32, k: u32| format!("traj/{}/{step:06}-{j:03}-{k:03}", stage.name);
    let mut out: Vec<Option<StoredRollout>> = Vec::new();
    let mut requests = Vec::new();
    for j in 0..stage.tasks_per_step {
        let g = step * u64::from(stage.tasks_per_step) + u64::from(j);
        let t = &tasks[task_of_slot(g, tasks.len(), seed)];
        for k in 0..n {
            let id = g * u64::from(n) + u64::from(k);
            if let Some(bytes) = env.store.get(&key(j, k))? {
                let stored: StoredRollout = serde_json::from_slice(&bytes)
                    .with_context(|| format!("stored rollout {} does not parse", key(j, k)))?;
                out.push(Some(stored));
                continue;
            }
            out.push(None);
            let budget = &stage.budget;
            requests.push(EpisodeRequest {
                episode_id: id,
                key: key(j, k),
                attempt: 0,
                limits: EpisodeLimits {
                    max_turns: budget.turns.min(t.task.spec.budget.turns),
                    max_generated_tokens: budget.tokens.min(t.task.spec.budget.tokens),
                    max_turn_tokens: stage.max_turn_tokens,
                    max_observation_bytes: MAX_OBSERVATION_BYTES,
                    max_calls_per_turn: 4,
                    max_wall_time: budget.wall_time.map(|w| w.0),
                },
                task: t.task.clone(),
                episode_dir: env.episode_dir(&stage.name, id),
                sandbox_seed: t.seed,
                policy_seed: mix(seed ^ id),
                sampling: SamplingParams {
                    temperature: stage.temperature,
                    top_p: 1.0,
                    top_k: 0,
                    seed: mix(seed ^ mix(id)),
                    ..SamplingParams::default()
                },
                sandbox_budget: env.config.sandbox.episode,
                context,
                // Earlier steps first, should a judge queue hold several.
                priority: -(step as i64),
            });
        }
    }
    let slot = |id: u64| -> usize {
        let first = step * u64::from(stage.tasks_per_step) * u64::from(n);
        (id - first) as usize
    };
    let mut failures = 0usize;
    let label = format!("{} step {} rollouts", stage.name, step + 1);
    let mut progress = Progress::new(&label, requests.len() as u64);
    actors.run_episodes(requests, |outcome| {
        progress.inc(1, "");
        let at = slot(outcome.episode_id);
        let (j, k) = ((at / n as usize) as u32, (at % n as usize) as u32);
        match outcome.result {
            Ok(s) => {
                let stored = StoredRollout {
                    group: j,
                    sample: k,
                    episode: s,
                };
                env.store.put(&key(j, k), &serde_json::to_vec(&stored)?)?;
                out[at] = Some(stored);
            }
            Err(failure) => {
                // Masked: no reward, not stored (a resumed run tries it again).
                failures += 1;
                tracing::warn!(episode = outcome.episode_id, %failure, "rollout failed (infrastructure)");
            }
        }
        Ok(())
    })?;
    progress.finish();
    if failures > 0 {
        tracing::warn!(
            failures,
            step = step + 1,
            "rollouts lost to infrastructure failures"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pass_visits_every_task_once_in_a_seeded_order() {
        let len = 7;
        for pass in 0..3u64 {
            let mut seen: Vec<usize> = (0..len as u64)
                .map(|i| task_of_slot(pass * len as u64 + i, len, 42))
                .collect();
            seen.sort();
            assert_eq!(seen, (0..len).collect::<Vec<_>>());
        }
        let a: Vec<usize> = (0..7).map(|g| task_of_slot(g, 7, 1)).collect();
        let b: Vec<usize> = (0..7).map(|g| task_of_slot(g, 7, 2)).collect();
        assert_ne!(a, b, "the order depends on the seed");
    }
}
