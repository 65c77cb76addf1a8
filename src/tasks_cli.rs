//! `klongd tasks gen` and `klongd tasks solve`: the built-in task family, and its scripted
//! expert run through the sandbox and judged by the Judge actor.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use klong_actors::environment::expert::{run_episode, ScriptedExpert};
use klong_actors::environment::family;
use klong_actors::environment::task::{CopyBounds, Task, TaskSet};
use klong_actors::judge::llm::{LlmGrader, LlmJudgeSettings};
use klong_actors::judge::queue::{
    FinishedEpisode, GradedEpisode, Judge, JudgeArgs, JudgeContext, JudgeMsg,
};
use klong_sandbox::{CallLimits, EpisodeBudget, HostSettings, HumanDuration, Sandbox, SandboxHost};
use serde::Serialize;

use crate::sandbox_cli::load_registry;

/// Most tasks one `tasks gen` writes.
const MAX_GENERATED: u32 = 10_000;
/// How long `tasks solve` waits for the judge on one episode.
const JUDGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Writes `count` tasks of the family, seeds `seed..seed+count`; returns their folders.
pub fn generate(
    family_name: &str,
    seed: u64,
    count: u32,
    horizon: u32,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    if family_name != family::FAMILY {
        bail!(
            "unknown task family `{family_name}`; the built-in family is `{}`",
            family::FAMILY
        );
    }
    if horizon == 0 || horizon > family::MAX_HORIZON {
        bail!("--horizon must be between 1 and {}", family::MAX_HORIZON);
    }
    if count == 0 || count > MAX_GENERATED {
        bail!("--count must be between 1 and {MAX_GENERATED}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut dirs = Vec::new();
    for i in 0..u64::from(count) {
        let task = family::generate(seed.wrapping_add(i), horizon);
        let dir = family::write_task(out, &task)
            .with_context(|| format!("cannot write a task into {}", out.display()))?;
        dirs.push(dir);
    }
    Ok(dirs)
}

pub struct SolveOptions {
    pub dir: PathBuf,
    pub tools_dir: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub expert_noise: f64,
    pub seed: u64,
    pub judge_concurrency: usize,
    /// Settings of the LLM grader (an OpenAI-compatible endpoint), for tasks with LLM leaves.
    pub llm_judge: Option<LlmJudgeSettings>,
}

#[derive(Debug, Serialize)]
pub struct SolvedTask {
    pub task: String,
    pub turns: usize,
    pub submitted: bool,
    pub score: f64,
}

#[derive(Debug, Serialize)]
pub struct SolveReport {
    pub expert_noise: f64,
    pub tasks: Vec<SolvedTask>,
    pub mean: f64,
    pub stderr: f64,
}

impl SolveReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<40} {:>6} {:>10} {:>7}\n",
            "task", "turns", "submitted", "score"
        );
        for t in &self.tasks {
            out.push_str(&format!(
                "{:<40} {:>6} {:>10} {:>7.4}\n",
                t.task, t.turns, t.submitted, t.score
            ));
        }
        out.push_str(&format!(
            "mean score {:.4} ± {:.4} (standard error) over {} tasks, expert noise {}\n",
            self.mean,
            self.stderr,
            self.tasks.len(),
            self.expert_noise
        ));
        out
    }
}

/// A folder holding one task, or a folder of task folders.
fn load_tasks(dir: &Path) -> anyhow::Result<Vec<Task>> {
    if dir.join("task.ron").exists() {
        return Ok(vec![Task::load(dir)?]);
    }
    let set = TaskSet::load_dir(dir)?;
    if set.tasks.is_empty() {
        bail!("{} holds no task folders", dir.display());
    }
    Ok(set.tasks)
}

pub async fn solve(opts: SolveOptions) -> anyhow::Result<SolveReport> {
    if !(0.0..=1.0).contains(&opts.expert_noise) {
        bail!(
            "--expert-noise must be between 0 and 1, got {}",
            opts.expert_noise
        );
    }
    let tasks = load_tasks(&opts.dir)?;
    let host = SandboxHost::new(HostSettings {
        cache_dir: opts.cache_dir.clone(),
        ..HostSettings::default()
    })?;
    let registry = Arc::new(load_registry(&opts.tools_dir)?);
    let ctx = Arc::new(JudgeContext {
        host: host.clone(),
        registry: registry.clone(),
        check_limits: CallLimits::default(),
        llm: match opts.llm_judge {
            Some(settings) => Some(Arc::new(
                LlmGrader::new(settings).context("cannot set up the LLM grader")?,
            )),
            None => None,
        },
        seed: opts.seed,
    });
    let (judge, judge_handle) = ractor::Actor::spawn(
        None,
        Judge,
        JudgeArgs {
            ctx,
            max_concurrent: opts.judge_concurrency,
            max_queued: tasks.len().max(1),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the judge: {e}"))?;

    let work = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut solved = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let task = Arc::new(task);
        let episode_dir = work.path().join(format!("episode-{i}"));
        task.copy_files_into(&episode_dir, CopyBounds::default())
            .with_context(|| format!("cannot lay out the episode of {}", task.name))?;
        let budget = EpisodeBudget {
            wall_time: task
                .spec
                .budget
                .wall_time
                .unwrap_or(HumanDuration::from_secs(3600)),
            ..EpisodeBudget::default()
        };
        let mut sandbox = Sandbox::new(
            host.clone(),
            registry.clone(),
            &episode_dir,
            CallLimits::default(),
            budget,
            opts.seed ^ i as u64,
        )?;
        let mut expert = ScriptedExpert::new(opts.expert_noise, opts.seed.wrapping_add(i as u64));
        let turns = task.spec.budget.turns;
        let (episode, sandbox_back) = tokio::task::spawn_blocking(move || {
            let episode = run_episode(&mut sandbox, &mut expert, turns);
            (episode, sandbox)
        })
        .await?;
        drop(sandbox_back);
        let episode =
            episode.with_context(|| format!("episode of {} failed on the host", task.name))?;
        let finished = FinishedEpisode {
            episode_id: i as u64,
            task: task.clone(),
            final_dir: episode_dir,
        };
        let graded: GradedEpisode = judge
            .call(
                |reply| JudgeMsg::Grade {
                    episode: finished,
                    priority: 0,
                    reply,
                },
                Some(JUDGE_TIMEOUT),
            )
            .await
            .map_err(|e| anyhow::anyhow!("judge unreachable: {e}"))?
            .success_or(anyhow::anyhow!("judge timed out"))?
            .with_context(|| {
                format!(
                    "judging {} failed (an infrastructure failure, not a score)",
                    task.name
                )
            })?;
        tracing::info!(task = %task.name, score = graded.score, turns = episode.transcript.len(), "episode judged");
        solved.push(SolvedTask {
            task: task.name.clone(),
            turns: episode.transcript.len(),
            submitted: episode.submitted,
            score: graded.score,
        });
    }
    judge.stop(None);
    let _ = judge_handle.await;

    let n = solved.len() as f64;
    let mean = solved.iter().map(|t| t.score).sum::<f64>() / n;
    let var = if solved.len() > 1 {
        solved.iter().map(|t| (t.score - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Ok(SolveReport {
        expert_noise: opts.expert_noise,
        tasks: solved,
        mean,
        stderr: (var / n).sqrt(),
    })
}
