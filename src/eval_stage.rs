//! The `Eval` stage: a policy (the run's model as trained so far, or the scripted expert for
//! reference) on tasks of the built-in family, every episode run by the actors and judged.
//! Reported the PaperBench way: per task, then per horizon and overall, the mean rubric score
//! ± its standard error, turns used and which limits ended the episodes. The report is
//! stored durably (`eval/<stage>`) before it is written out, so a resumed run does not evaluate
//! again; it goes to `RUN_DIR/eval/<stage>.json` and a readable `RUN_DIR/eval/<stage>.txt`, and
//! the policy's actions, decoded, to `RUN_DIR/eval/<stage>.transcripts.jsonl`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::Tensor;
use klong_actors::environment::episode::{EpisodeEnd, EpisodeLimits};
use klong_actors::environment::expert::MAX_OBSERVATION_BYTES;
use klong_actors::messages::EpisodeRequest;
use klong_actors::policy::actor::{PolicyArgs, PolicyBackend};
use klong_actors::policy::local::LocalPolicy;
use klong_actors::policy::model::Llama;
use klong_actors::policy::sampling::SamplingParams;
use klong_actors::trajectory::Turn;
use serde::{Deserialize, Serialize};

use crate::config::{EvalPolicy, EvalStage};
use crate::progress::Progress;
use crate::sft_stage::{StageEnv, TrainModel};
use crate::supervisor::Actors;
use crate::task_set::resolve;

/// Tasks listed one by one in the readable table (the JSON report has all).
const MAX_TABLE_TASKS: usize = 40;

/// One evaluated episode. `score: None` is an infrastructure failure (not a 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalEpisode {
    pub task: String,
    /// The family task's horizon; 0 for a task folder from disk.
    pub horizon: u32,
    pub sample: u32,
    pub score: Option<f64>,
    pub turns: u32,
    pub generated_tokens: u64,
    pub malformed_turns: u32,
    pub end: Option<EpisodeEnd>,
    /// Why there is no score.
    pub failure: Option<String>,
}

/// Mean ± standard error of a group of episodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreRow {
    /// The task, in a per-task row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// `None`: all horizons.
    pub horizon: Option<u32>,
    /// Scored episodes (infrastructure failures excluded).
    pub episodes: usize,
    pub mean: f64,
    pub stderr: f64,
    pub mean_turns: f64,
    /// Share of turns that held a well-formed tool call (a policy can learn the format before
    /// it earns rubric points).
    pub tool_call_rate: f64,
    /// How the episodes ended: `submitted`, `turns`, `tokens`, `sandbox`, `context`.
    pub ends: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub stage: String,
    pub policy: String,
    pub episodes: Vec<EvalEpisode>,
    /// One row per task (its seeds' episodes), in task order.
    #[serde(default)]
    pub by_task: Vec<ScoreRow>,
    pub by_horizon: Vec<ScoreRow>,
    pub overall: ScoreRow,
    pub infra_failures: usize,
}

/// How an episode ended, as its report and metrics name it (`submitted`, `turns`, ...).
pub(crate) fn end_name(end: EpisodeEnd) -> String {
    serde_json::to_value(end)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{end:?}"))
}

fn row(horizon: Option<u32>, eps: &[&EvalEpisode]) -> ScoreRow {
    let scores: Vec<f64> = eps.iter().filter_map(|e| e.score).collect();
    let n = scores.len();
    let mean = if n == 0 {
        0.0
    } else {
        scores.iter().sum::<f64>() / n as f64
    };
    // Sample standard deviation over sqrt(n), as PaperBench reports it.
    let stderr = if n < 2 {
        0.0
    } else {
        let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    };
    let scored: Vec<&&EvalEpisode> = eps.iter().filter(|e| e.score.is_some()).collect();
    let mean_turns = if scored.is_empty() {
        0.0
    } else {
        scored.iter().map(|e| f64::from(e.turns)).sum::<f64>() / scored.len() as f64
    };
    let turns: u32 = scored.iter().map(|e| e.turns).sum();
    let malformed: u32 = scored.iter().map(|e| e.malformed_turns).sum();
    let tool_call_rate = if turns == 0 {
        0.0
    } else {
        1.0 - f64::from(malformed) / f64::from(turns)
    };
    let mut ends = BTreeMap::new();
    for e in &scored {
        if let Some(end) = e.end {
            *ends.entry(end_name(end)).or_insert(0) += 1;
        }
    }
    ScoreRow {
        task: None,
        horizon,
        episodes: n,
        mean,
        stderr,
        mean_turns,
        tool_call_rate,
        ends,
    }
}

impl EvalReport {
    fn new(stage: &str, policy: String, mut episodes: Vec<EvalEpisode>) -> EvalReport {
        episodes
            .sort_by(|a, b| (a.horizon, &a.task, a.sample).cmp(&(b.horizon, &b.task, b.sample)));
        let mut horizons: Vec<u32> = episodes.iter().map(|e| e.horizon).collect();
        horizons.dedup();
        let by_horizon = horizons
            .iter()
            .map(|&h| {
                let eps: Vec<&EvalEpisode> = episodes.iter().filter(|e| e.horizon == h).collect();
                row(Some(h), &eps)
            })
            .collect();
        let mut tasks: Vec<(u32, &str)> = episodes
            .iter()
            .map(|e| (e.horizon, e.task.as_str()))
            .collect();
        tasks.dedup();
        let by_task = tasks
            .iter()
            .map(|&(h, t)| {
                let eps: Vec<&EvalEpisode> = episodes.iter().filter(|e| e.task == t).collect();
                ScoreRow {
                    task: Some(t.to_string()),
                    ..row(Some(h), &eps)
                }
            })
            .collect();
        let all: Vec<&EvalEpisode> = episodes.iter().collect();
        let overall = row(None, &all);
        let infra_failures = episodes.iter().filter(|e| e.score.is_none()).count();
        EvalReport {
            stage: stage.to_string(),
            policy,
            episodes,
            by_task,
            by_horizon,
            overall,
            infra_failures,
        }
    }

    /// The readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "eval {}: policy {}, {} episodes, {} infrastructure failures",
            self.stage,
            self.policy,
            self.episodes.len(),
            self.infra_failures
        );
        if self.by_task.len() > 1 {
            let _ = writeln!(
                t,
                "{:<28} {:>8} {:>18} {:>7}",
                "task", "episodes", "score (mean ± se)", "turns"
            );
            for r in self.by_task.iter().take(MAX_TABLE_TASKS) {
                let _ = writeln!(
                    t,
                    "{:<28} {:>8} {:>10.3} ± {:<5.3} {:>7.1}",
                    r.task.as_deref().unwrap_or("?"),
                    r.episodes,
                    r.mean,
                    r.stderr,
                    r.mean_turns
                );
            }
            if self.by_task.len() > MAX_TABLE_TASKS {
                let _ = writeln!(
                    t,
                    "... {} more tasks in the JSON report",
                    self.by_task.len() - MAX_TABLE_TASKS
                );
            }
        }
        let _ = writeln!(
            t,
            "{:<8} {:>8} {:>18} {:>7} {:>10}  ended by",
            "horizon", "episodes", "score (mean ± se)", "turns", "tool calls"
        );
        for r in self.by_horizon.iter().chain(std::iter::once(&self.overall)) {
            let h = match r.horizon {
                None => "all".to_string(),
                Some(0) => "folders".to_string(),
                Some(h) => h.to_string(),
            };
            let ends: Vec<String> = r.ends.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                t,
                "{:<8} {:>8} {:>10.3} ± {:<5.3} {:>7.1} {:>9.0}%  {}",
                h,
                r.episodes,
                r.mean,
                r.stderr,
                r.mean_turns,
                100.0 * r.tool_call_rate,
                ends.join(", ")
            );
        }
        t
    }
}

/// A copy of the model's current weights that no later training step touches.
pub(crate) fn frozen_model(tm: &TrainModel) -> anyhow::Result<Llama> {
    let data = tm.varmap.data();
    let vars = data
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(Llama::from_tensors(&tm.config, map, tm.model.device())?)
}

/// Runs (or reads back, when a previous invocation finished it) the Eval stage.
pub fn run_eval(
    env: &StageEnv,
    actors: &mut Actors,
    stage: &EvalStage,
    tm: &TrainModel,
) -> anyhow::Result<EvalReport> {
    let key = format!("eval/{}", stage.name);
    if let Some(bytes) = env.store.get(&key)? {
        tracing::info!(stage = %stage.name, "stage already finished");
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("stored report {key} does not parse"));
    }
    let span = tracing::info_span!("stage", name = %stage.name);
    let _enter = span.enter();
    let window = actors.window();
    let (backend, context, policy_name) = match &stage.policy {
        EvalPolicy::Model => {
            let model_context = tm.config.max_position_embeddings;
            // A pretrained model's context is known only once it is loaded, so this bound is
            // checked here rather than in the config's validation.
            let context = match stage.context {
                Some(c) if c > model_context => bail!(
                    "eval stage {:?}: context {c} exceeds the model's context ({model_context})",
                    stage.name
                ),
                Some(c) => c,
                None => model_context,
            };
            let policy = LocalPolicy::new(frozen_model(tm)?, tm.tokenizer.clone(), 0);
            (
                PolicyBackend::Local {
                    policy: Box::new(policy),
                    max_batch: window,
                },
                context,
                if stage.temperature == 0.0 {
                    "model (greedy)".to_string()
                } else {
                    format!("model (temperature {})", stage.temperature)
                },
            )
        }
        EvalPolicy::Expert { noise } => (
            PolicyBackend::Scripted {
                noise: *noise,
                tokenizer: Arc::new(tm.tokenizer.clone()),
                context: usize::MAX,
            },
            usize::MAX,
            format!("scripted expert (noise {noise})"),
        ),
    };
    actors.set_policy(PolicyArgs {
        backend,
        max_queued: window,
        max_episodes: window,
    })?;

    let tasks = &stage.tasks;
    let tasks_dir = env.run_dir.join("tasks").join(&stage.name);
    let mut requests = Vec::new();
    let mut meta: HashMap<u64, (String, u32, u32)> = HashMap::new();
    for (i, t) in resolve(tasks, &tasks_dir, env.config.seed)?
        .into_iter()
        .enumerate()
    {
        let (task, seed, horizon) = (t.task, t.seed, t.horizon.unwrap_or(0));
        let i = u32::try_from(i).context("too many tasks")?;
        for sample in 0..stage.seeds {
            let id = u64::from(i) * u64::from(stage.seeds) + u64::from(sample);
            meta.insert(id, (task.name.clone(), horizon, sample));
            requests.push(EpisodeRequest {
                episode_id: id,
                key: format!("eval/{}/{id:08}", stage.name),
                attempt: 0,
                limits: EpisodeLimits {
                    max_turns: stage.max_turns.min(task.spec.budget.turns),
                    max_generated_tokens: task.spec.budget.tokens,
                    max_turn_tokens: stage.max_turn_tokens,
                    max_observation_bytes: MAX_OBSERVATION_BYTES,
                    max_calls_per_turn: 4,
                    max_wall_time: None,
                },
                task: task.clone(),
                episode_dir: env.episode_dir(&stage.name, id),
                sandbox_seed: seed,
                policy_seed: env.config.seed ^ (id << 20),
                sampling: SamplingParams {
                    temperature: stage.temperature,
                    seed: env.config.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..SamplingParams::greedy()
                },
                sandbox_budget: env.config.sandbox.episode,
                context,
                priority: 0,
            });
        }
    }
    let mut progress = Progress::new(&format!("{} eval", stage.name), requests.len() as u64);
    let mut episodes = Vec::new();
    // What the policy did, for a person to read: one line per episode, its actions decoded.
    let mut transcripts: Vec<(u64, serde_json::Value)> = Vec::new();
    actors.run_episodes(requests, |outcome| {
        progress.inc(1, "");
        let (task, horizon, sample) = meta
            .get(&outcome.episode_id)
            .cloned()
            .unwrap_or_else(|| (format!("episode {}", outcome.episode_id), 0, 0));
        if let Ok(s) = &outcome.result {
            let actions: Vec<String> = s
                .trajectory
                .turns
                .iter()
                .filter_map(|t| match t {
                    Turn::Assistant(a) => Some(
                        tm.tokenizer
                            .decode(&a.tokens)
                            .unwrap_or_else(|e| format!("[cannot decode: {e}]")),
                    ),
                    _ => None,
                })
                .collect();
            transcripts.push((
                outcome.episode_id,
                serde_json::json!({
                    "task": task, "sample": sample, "score": s.score, "actions": actions,
                }),
            ));
        }
        episodes.push(match outcome.result {
            Ok(s) => EvalEpisode {
                task,
                horizon,
                sample,
                score: Some(s.score),
                turns: s.turns,
                generated_tokens: s.generated_tokens,
                malformed_turns: s.malformed_turns,
                end: Some(s.end),
                failure: None,
            },
            Err(f) => {
                tracing::warn!(episode = outcome.episode_id, failure = %f, "evaluation episode failed (infrastructure)");
                EvalEpisode {
                    task,
                    horizon,
                    sample,
                    score: None,
                    turns: 0,
                    generated_tokens: 0,
                    malformed_turns: 0,
                    end: None,
                    failure: Some(f.to_string()),
                }
            }
        });
        Ok(())
    })?;
    progress.finish();
    let report = EvalReport::new(&stage.name, policy_name, episodes);
    let json = serde_json::to_vec_pretty(&report)?;
    env.store.put(&key, &json)?;
    let out = env.run_dir.join("eval");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::run::write_durably(&out.join(format!("{}.json", stage.name)), &json)?;
    transcripts.sort_by_key(|t| t.0);
    let mut lines = String::new();
    for (_, t) in &transcripts {
        lines.push_str(&t.to_string());
        lines.push('\n');
    }
    crate::run::write_durably(
        &out.join(format!("{}.transcripts.jsonl", stage.name)),
        lines.as_bytes(),
    )?;
    let table = report.table();
    crate::run::write_durably(&out.join(format!("{}.txt", stage.name)), table.as_bytes())?;
    for line in table.lines() {
        tracing::info!("{line}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(horizon: u32, score: Option<f64>, end: EpisodeEnd) -> EvalEpisode {
        EvalEpisode {
            task: format!("t{horizon}"),
            horizon,
            sample: 0,
            score,
            turns: 10,
            generated_tokens: 0,
            malformed_turns: if horizon == 2 { 5 } else { 0 },
            end: score.map(|_| end),
            failure: score.is_none().then(|| "judge failed".to_string()),
        }
    }

    #[test]
    fn mean_and_standard_error_by_horizon_with_failures_excluded() {
        let r = EvalReport::new(
            "e",
            "p".into(),
            vec![
                ep(2, Some(1.0), EpisodeEnd::Submitted),
                ep(1, Some(0.2), EpisodeEnd::Turns),
                ep(1, Some(0.6), EpisodeEnd::Submitted),
                ep(1, None, EpisodeEnd::Submitted),
                ep(2, Some(0.0), EpisodeEnd::Context),
            ],
        );
        assert_eq!(r.infra_failures, 1);
        assert_eq!(r.by_horizon.len(), 2);
        let h1 = &r.by_horizon[0];
        assert_eq!((h1.horizon, h1.episodes), (Some(1), 2));
        assert!((h1.mean - 0.4).abs() < 1e-12);
        // Sample sd of {0.2, 0.6} = 0.2828..., over sqrt(2) = 0.2.
        assert!((h1.stderr - 0.2).abs() < 1e-12, "{}", h1.stderr);
        assert_eq!(h1.ends.get("turns"), Some(&1));
        let all = &r.overall;
        assert_eq!(all.episodes, 4);
        assert!((all.mean - 0.45).abs() < 1e-12);
        assert_eq!(all.ends.get("context"), Some(&1));
        // 10 malformed turns of 40.
        assert!((all.tool_call_rate - 0.75).abs() < 1e-12);
        let table = r.table();
        assert!(table.contains("1 infrastructure failures"), "{table}");
        assert!(table.contains("0.400 ± 0.200"), "{table}");
        // Per task: t1 (horizon 1: 0.2, 0.6, one failure) and t2 (1.0, 0.0).
        assert_eq!(r.by_task.len(), 2);
        assert_eq!(r.by_task[0].task.as_deref(), Some("t1"));
        assert_eq!(r.by_task[0].episodes, 2);
        assert!((r.by_task[1].mean - 0.5).abs() < 1e-12);
        assert!(table.contains("t2 "), "{table}");
    }
}
