//! The `Sft` stage of `klongd run`: data (distilled from a teacher through environment and
//! judge, imported JSONL, synthetic recall conversations, or a mix of them), trajectory
//! splitting, SFT steps, metrics, checkpoints, resume.
//!
//! Durable facts, in order: every distilled episode is stored (`traj/<stage>/<index>`, with its
//! score) as soon as it is judged, so a resumed run never re-runs it; a checkpoint (weights,
//! optimizer moments, the step) every `checkpoint_every` steps and at the end of the stage; the
//! final model as an HF folder in `RUN_DIR/models/<stage>/`. The data order is a function of the
//! seed and the epoch, so a resumed run takes exactly the steps the uninterrupted one would.
//!
//! Distillation episodes run in the actors' pool of environments (any number at once; each is
//! seeded on its own, so the results do not depend on the pool's size); learner steps run one
//! after another in the Learner actor.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::environment::episode::EpisodeLimits;
use klong_actors::environment::expert::MAX_OBSERVATION_BYTES;
use klong_actors::learner::optim::LrSchedule;
use klong_actors::learner::recall::recall_trajectories;
use klong_actors::learner::sft::pack_batches;
use klong_actors::learner::split::{split, Pin, SplitConfig, SubTrajectory};
use klong_actors::messages::{EpisodeRequest, LearnerMsg};
use klong_actors::policy::actor::{PolicyArgs, PolicyBackend};
use klong_actors::policy::chat::ChatTemplate;
use klong_actors::policy::model::{Llama, LlamaConfig};
use klong_actors::policy::pretrained::{save_hf, Pretrained};
use klong_actors::policy::sampling::SamplingParams;
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};
use klong_actors::trajectory::{import_jsonl, ImportOptions, Trajectory};
use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Config, ModelConfig, SftData, SftStage, Teacher};
use crate::progress::Progress;
use crate::store::RunStore;
use crate::supervisor::Actors;
use crate::task_set::family_task;

/// Most passes over the data a `train_tokens` budget may take.
const MAX_PASSES: u32 = 10_000;

/// What the stage runner needs from the run.
pub struct StageEnv<'a> {
    pub config: &'a Config,
    pub run_dir: &'a Path,
    pub store: &'a RunStore,
}

impl StageEnv<'_> {
    /// Where episode `id` of `stage` runs (created fresh from the task's files, removed after).
    pub fn episode_dir(&self, stage: &str, id: u64) -> PathBuf {
        self.run_dir
            .join("episodes")
            .join(stage)
            .join(format!("{id:08}"))
    }

    /// Appends a step's metrics to `RUN_DIR/metrics.jsonl` (opened per line: steps are seconds
    /// apart) and keeps it as the store's `metrics/latest` (`klongd status`).
    pub fn log_metrics(&self, line: &serde_json::Value) -> anyhow::Result<()> {
        let path = self.run_dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{line}")?;
        self.store
            .put("metrics/latest", line.to_string().as_bytes())?;
        Ok(())
    }
}

/// The trainer's state in a checkpoint manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Index of the stage in `config.stages`.
    pub stage: usize,
    pub stage_name: String,
    /// Learner steps done in this stage.
    pub step: u64,
    /// The stage is finished (the next run starts the next stage).
    pub done: bool,
}

/// How an Sft stage ended in this invocation.
#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub stage: String,
    pub episodes: usize,
    pub kept: usize,
    pub sub_trajectories: usize,
    pub steps_done: u64,
    pub total_steps: u64,
    pub finished: bool,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
}

/// One distilled episode as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEpisode {
    task: String,
    score: f64,
    trajectory: Trajectory,
}

/// The model, its optimizer variables, tokenizer and chat template.
pub struct TrainModel {
    pub config: LlamaConfig,
    pub varmap: VarMap,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

/// Builds the configured model. A tiny model's weights are drawn from `seed` (candle's own
/// initialisers cannot be seeded), so the same config gives the same start everywhere.
pub fn build_model(model: &ModelConfig, seed: u64, device: &Device) -> anyhow::Result<TrainModel> {
    match model {
        ModelConfig::Tiny(t) => {
            let mut cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
            cfg.hidden_size = t.hidden;
            cfg.num_hidden_layers = t.layers;
            cfg.num_attention_heads = t.heads;
            cfg.num_key_value_heads = Some(t.kv_heads);
            cfg.intermediate_size = t.ffn;
            cfg.max_position_embeddings = t.context;
            let varmap = VarMap::new();
            let model = Llama::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
            seeded_init(&varmap, seed, t.init_std, device)?;
            Ok(TrainModel {
                config: cfg,
                varmap,
                model,
                tokenizer: Tokenizer::Byte(ByteTokenizer),
            })
        }
        ModelConfig::Pretrained { path } => TrainModel::load(path, device),
    }
}

impl TrainModel {
    /// An HF folder or a `.gguf` file, trainable (dequantized, f32).
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<TrainModel> {
        let p = Pretrained::load(path, device)
            .with_context(|| format!("loading the model {}", path.display()))?;
        let (varmap, model) = p.trainable()?;
        Ok(TrainModel {
            config: p.config.clone(),
            varmap,
            model,
            tokenizer: p.tokenizer,
        })
    }
}

/// Matrices ~ N(0, std²) (HF's Llama init draws with std 0.02), norm weights 1, from a
/// splitmix64 stream over the variables in name order.
pub(crate) fn seeded_init(vm: &VarMap, seed: u64, std: f64, device: &Device) -> anyhow::Result<()> {
    let mut vars: Vec<(String, candle_core::Var)> = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = seed ^ 0x6b6c_6f6e_6764_696e;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    for (name, var) in vars {
        let n = var.elem_count();
        let vals: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| {
                    // Box-Muller.
                    let (u1, u2) = (next().max(1e-300), next());
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (std * z) as f32
                })
                .collect()
        };
        var.set(&Tensor::from_vec(vals, var.shape(), device)?)?;
    }
    Ok(())
}

/// Runs (or resumes, from `start_step`) the Sft stage `index`: distillation through the
/// actors' environments, then steps of the Learner actor (which owns the model and the
/// optimizer). `steps_budget` counts down the steps this invocation may still take
/// (`klongd run --max-steps`).
#[allow(clippy::too_many_arguments)]
pub fn run_sft(
    env: &StageEnv,
    actors: &mut Actors,
    learner: &ActorRef<LearnerMsg>,
    index: usize,
    stage: &SftStage,
    tm: &TrainModel,
    start_step: u64,
    steps_budget: &mut Option<u64>,
) -> anyhow::Result<SftSummary> {
    let span = tracing::info_span!("stage", name = %stage.name);
    let _enter = span.enter();
    let template = ChatTemplate::for_tokenizer(&tm.tokenizer, true)?;
    let step_timeout = env.config.actors.episode_timeout.0;

    // Data.
    let (episodes, trajectories) = load_data(env, actors, stage, &stage.data, tm, &template)?;
    let kept = trajectories.len();
    if kept == 0 {
        bail!(
            "stage {}: no trajectory to train on ({} episodes, none kept)",
            stage.name,
            episodes
        );
    }

    // Splitting.
    let split_cfg = SplitConfig {
        context: stage.split.context,
        mode: stage.split.mode,
        overlap: stage.split.overlap,
        pin: Pin::Recorded,
    };
    let mut subs: Vec<SubTrajectory> = Vec::new();
    for t in &trajectories {
        subs.extend(split(t, &split_cfg).with_context(|| format!("splitting {}", t.id))?);
    }
    let seed = env.config.seed;
    let pass = |e: u32| pack_batches(&subs, stage.batch_tokens, seed ^ (u64::from(e) << 32));
    // Tokens a step trains on, as `sft_step` counts them.
    let step_tokens = |rows: &[usize]| -> u64 {
        rows.iter()
            .map(|&i| subs[i].len().saturating_sub(1) as u64)
            .sum()
    };
    let mut schedule: Vec<Vec<usize>> = Vec::new();
    match stage.train_tokens {
        None => {
            for e in 0..stage.epochs {
                schedule.extend(pass(e)?);
            }
        }
        Some(budget) => {
            let mut scheduled = 0u64;
            let mut e = 0u32;
            'passes: while scheduled < budget {
                if e >= MAX_PASSES {
                    bail!(
                        "stage {}: {budget} train_tokens need more than {MAX_PASSES} passes over \
                         the data",
                        stage.name
                    );
                }
                for rows in pass(e)? {
                    if scheduled >= budget {
                        break 'passes;
                    }
                    scheduled += step_tokens(&rows);
                    schedule.push(rows);
                }
                e += 1;
            }
        }
    }
    let total = schedule.len() as u64;
    let scheduled_tokens: u64 = schedule.iter().map(|r| step_tokens(r)).sum();
    let lr = LrSchedule {
        peak_lr: stage.lr,
        warmup_steps: stage.warmup_steps,
        total_steps: total,
        min_ratio: stage.min_lr_ratio,
    };
    let traj_tokens: usize = trajectories.iter().map(|t| t.len()).sum();
    let prefix_tokens = trajectories
        .iter()
        .map(|t| t.prefix.iter().map(|p| p.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    tracing::info!(
        episodes,
        kept,
        mean_trajectory_tokens = traj_tokens / kept.max(1),
        max_prefix_tokens = prefix_tokens,
        sub_trajectories = subs.len(),
        steps = total,
        tokens = scheduled_tokens,
        resume_at = start_step,
        "sft data ready"
    );

    let (mut first_loss, mut last_loss) = (None, None);
    let mut step = start_step;
    let mut progress = Progress::starting_at(&stage.name, start_step, total);
    while step < total {
        if *steps_budget == Some(0) {
            break;
        }
        let rows: Vec<SubTrajectory> = schedule[step as usize]
            .iter()
            .map(|&i| subs[i].clone())
            .collect();
        let started = Instant::now();
        let (step_lr, max_grad_norm) = (lr.lr(step), stage.max_grad_norm);
        let st = actors
            .call(
                learner,
                |reply| LearnerMsg::SftStep {
                    micro: vec![rows],
                    lr: step_lr,
                    max_grad_norm,
                    reply,
                },
                step_timeout,
                "learner step",
            )?
            .with_context(|| format!("stage {} step {}", stage.name, step + 1))?;
        let secs = started.elapsed().as_secs_f64();
        step += 1;
        if let Some(b) = steps_budget.as_mut() {
            *b -= 1;
        }
        first_loss.get_or_insert(st.loss);
        last_loss = Some(st.loss);
        let line = json!({
            "stage": stage.name,
            "step": step,
            "loss": st.loss,
            "targets": st.targets,
            "tokens": st.tokens,
            "lr": st.lr,
            "grad_norm": st.grad_norm,
            "tokens_per_s": st.tokens as f64 / secs.max(1e-9),
        });
        env.log_metrics(&line)?;
        tracing::info!(
            step,
            total,
            loss = st.loss,
            lr = st.lr,
            grad_norm = st.grad_norm,
            "sft step"
        );
        progress.inc(1, &format!("loss {:.3}", st.loss));
        if step == total {
            // Before the checkpoint that marks the stage done: a later stage (RL's reference)
            // reads this folder, and a finished stage is never run again to write it.
            save_stage_model(env, actors, learner, &stage.name, tm)?;
        }
        if step.is_multiple_of(stage.checkpoint_every) || step == total {
            checkpoint(
                env,
                actors,
                learner,
                index,
                &stage.name,
                step,
                step == total,
            )?;
        }
    }
    progress.finish();
    if step < total && step > start_step && !step.is_multiple_of(stage.checkpoint_every) {
        // Stopped by the step budget: keep what was done.
        checkpoint(env, actors, learner, index, &stage.name, step, false)?;
    }
    let finished = step == total;
    Ok(SftSummary {
        stage: stage.name.clone(),
        episodes,
        kept,
        sub_trajectories: subs.len(),
        steps_done: step,
        total_steps: total,
        finished,
        first_loss,
        last_loss,
    })
}

/// The learner's weights as an HF folder in `RUN_DIR/models/<stage>/`.
pub(crate) fn save_stage_model(
    env: &StageEnv,
    actors: &Actors,
    learner: &ActorRef<LearnerMsg>,
    stage_name: &str,
    tm: &TrainModel,
) -> anyhow::Result<()> {
    let out = stage_model_dir(env.run_dir, stage_name);
    let weights = actors
        .call(
            learner,
            LearnerMsg::Weights,
            env.config.actors.episode_timeout.0,
            "learner weights",
        )?
        .context("exporting the stage's model")?;
    save_hf(&out, &tm.config, &weights, Some(&tm.tokenizer))?;
    tracing::info!(model = %out.display(), "stage model saved");
    Ok(())
}

/// The learner's state (weights, moments) and the step, durable, then the manifest switch.
pub(crate) fn checkpoint(
    env: &StageEnv,
    actors: &Actors,
    learner: &ActorRef<LearnerMsg>,
    index: usize,
    stage_name: &str,
    step: u64,
    done: bool,
) -> anyhow::Result<()> {
    let state = TrainState {
        stage: index,
        stage_name: stage_name.to_string(),
        step,
        done,
    };
    let tensors = actors
        .call(
            learner,
            LearnerMsg::ExportState,
            env.config.actors.episode_timeout.0,
            "learner state",
        )?
        .context("exporting the learner's state for a checkpoint")?;
    let m = env
        .store
        .commit_checkpoint(serde_json::to_value(&state)?, &tensors)?;
    tracing::info!(seq = m.seq, step, done, "checkpoint");
    Ok(())
}

/// A stage's trajectories from its data source: `(episodes seen, trajectories kept)`. A `Mix`
/// is the concatenation of its parts in order (the packer shuffles batches across them).
fn load_data(
    env: &StageEnv,
    actors: &mut Actors,
    stage: &SftStage,
    data: &SftData,
    tm: &TrainModel,
    template: &ChatTemplate,
) -> anyhow::Result<(usize, Vec<Trajectory>)> {
    Ok(match data {
        SftData::Jsonl { path } => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let trajs = import_jsonl(
                std::io::BufReader::new(file),
                &path.display().to_string(),
                &tm.tokenizer,
                template,
                &ImportOptions::default(),
            )?;
            (trajs.len(), trajs)
        }
        SftData::Distill { .. } => {
            distill(env, actors, stage, data, &Arc::new(tm.tokenizer.clone()))?
        }
        SftData::Recall {
            seed,
            count,
            filler,
        } => {
            let trajs =
                recall_trajectories(*seed, u64::from(*count), *filler, &tm.tokenizer, template)
                    .with_context(|| format!("stage {}: recall conversations", stage.name))?;
            (trajs.len(), trajs)
        }
        SftData::Mix(parts) => {
            let (mut episodes, mut trajs) = (0, Vec::new());
            for part in parts {
                // The config refuses nested mixes, so this recursion is one level deep.
                let (e, t) = load_data(env, actors, stage, part, tm, template)?;
                tracing::info!(episodes = e, kept = t.len(), "sft data part ready");
                episodes += e;
                trajs.extend(t);
            }
            (episodes, trajs)
        }
    })
}

/// Distillation: the teacher's episodes on the configured tasks, run by the actors (a pool of
/// environments, the scripted expert as the policy, the judge), each stored as soon as it is
/// judged (a stored one is read back, never re-run); those scoring at least `min_score` are
/// kept, in task order whatever order they finished in.
fn distill(
    env: &StageEnv,
    actors: &mut Actors,
    stage: &SftStage,
    data: &SftData,
    tokenizer: &Arc<Tokenizer>,
) -> anyhow::Result<(usize, Vec<Trajectory>)> {
    let SftData::Distill {
        teacher: Teacher::Expert { noise },
        tasks,
        min_score,
        max_turns,
    } = data
    else {
        bail!("not a distillation source");
    };
    let tasks_dir = env.run_dir.join("tasks").join(&stage.name);
    let window = actors.window();
    actors.set_policy(PolicyArgs {
        backend: PolicyBackend::Scripted {
            noise: *noise,
            tokenizer: tokenizer.clone(),
            context: usize::MAX,
        },
        max_queued: window,
        max_episodes: window,
    })?;
    let key = |i: u32| format!("traj/{}/{i:08}", stage.name);
    let mut requests = Vec::new();
    for i in 0..tasks.count {
        if env.store.get(&key(i))?.is_some() {
            continue;
        }
        let (task, seed, _) = family_task(&tasks_dir, tasks, i)?;
        requests.push(EpisodeRequest {
            episode_id: u64::from(i),
            key: key(i),
            attempt: 0,
            limits: EpisodeLimits {
                max_turns: (*max_turns).min(task.spec.budget.turns),
                max_generated_tokens: task.spec.budget.tokens,
                max_turn_tokens: 4096,
                max_observation_bytes: MAX_OBSERVATION_BYTES,
                max_calls_per_turn: 4,
                max_wall_time: None,
            },
            task,
            episode_dir: env.episode_dir(&stage.name, u64::from(i)),
            sandbox_seed: seed,
            policy_seed: env.config.seed ^ (u64::from(i) << 20),
            sampling: SamplingParams::greedy(),
            sandbox_budget: env.config.sandbox.episode,
            context: usize::MAX,
            priority: 0,
        });
    }
    let todo = requests.len();
    let mut failures = 0usize;
    let mut progress = Progress::new(&format!("{} distill", stage.name), todo as u64);
    actors.run_episodes(requests, |outcome| {
        progress.inc(1, "");
        match outcome.result {
            Ok(scored) => {
                let stored = StoredEpisode {
                    task: scored.task.clone(),
                    score: scored.score,
                    trajectory: scored.trajectory,
                };
                env.store.put(
                    &stored.trajectory.id.clone(),
                    &serde_json::to_vec(&stored)?,
                )?;
                tracing::info!(episode = outcome.episode_id, task = %stored.task, score = stored.score, turns = scored.turns, end = ?scored.end, "distilled episode judged");
            }
            Err(failure) => {
                // Masked: never scored 0, not stored (a resumed run tries it again).
                failures += 1;
                tracing::warn!(episode = outcome.episode_id, attempts = outcome.attempts, %failure, "distillation episode failed (infrastructure)");
            }
        }
        Ok(())
    })?;
    progress.finish();
    if failures > 0 {
        tracing::warn!(
            failures,
            "distillation episodes lost to infrastructure failures"
        );
    }
    let mut kept = Vec::new();
    let mut episodes = 0usize;
    for i in 0..tasks.count {
        let Some(bytes) = env.store.get(&key(i))? else {
            continue;
        };
        let stored: StoredEpisode = serde_json::from_slice(&bytes)
            .with_context(|| format!("stored episode {} does not parse", key(i)))?;
        episodes += 1;
        if stored.score >= *min_score {
            kept.push(stored.trajectory);
        }
    }
    Ok((episodes, kept))
}

/// The run directory's path for a stage's final model.
pub fn stage_model_dir(run_dir: &Path, stage: &str) -> PathBuf {
    run_dir.join("models").join(stage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::Init;

    #[test]
    fn seeded_init_draws_matrices_at_the_given_std_and_norms_at_one() {
        let device = Device::Cpu;
        let vm = VarMap::new();
        let w = vm.get(
            (256, 256),
            "w.weight",
            Init::Const(0.0),
            DType::F32,
            &device,
        );
        let n = vm.get(
            64,
            "input_layernorm.weight",
            Init::Const(0.0),
            DType::F32,
            &device,
        );
        let (w, n) = (w.expect("w"), n.expect("n"));
        for std in [0.02, 0.1] {
            seeded_init(&vm, 7, std, &device).expect("init");
            let v: Vec<f32> = w.flatten_all().and_then(|t| t.to_vec1()).expect("w");
            let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
            let var = v
                .iter()
                .map(|x| (f64::from(*x) - mean).powi(2))
                .sum::<f64>()
                / v.len() as f64;
            assert!(
                (var.sqrt() / std - 1.0).abs() < 0.02,
                "std {std}: got {}",
                var.sqrt()
            );
            assert!(mean.abs() < std * 0.01, "std {std}: mean {mean}");
            let ones: Vec<f32> = n.to_vec1().expect("n");
            assert!(ones.iter().all(|x| *x == 1.0));
        }
    }
}
