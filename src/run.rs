//! `klongd run`: opens (or resumes) the run directory, brings up the sandbox (the tool
//! registry, the compiled-module cache, a self-check call) and the actors (the supervisor and
//! its children), then runs the configured stages in order from the last checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use klong_sandbox::{Sandbox, SandboxHost, ToolRegistry};
use serde_json::json;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use klong_actors::learner::optim::{AdamW, AdamWParams};
use klong_actors::learner::precision::MixedPrecision;

use crate::config::{Config, Precision, StageConfig};
use klong_actors::environment::actor::EnvironmentArgs;
use klong_actors::judge::queue::JudgeContext;
use klong_actors::learner::actor::LearnerArgs;
use klong_actors::policy::chat::ChatTemplate;
use klong_actors::policy::tokenizer::Tokenizer;

use crate::eval_stage::{run_eval, EvalReport};
use crate::rl_stage::{run_rl, RlSummary};
use crate::sft_stage::{
    build_model, run_sft, stage_model_dir, SftSummary, StageEnv, TrainModel, TrainState,
};
use crate::store::RunStore;
use crate::supervisor::{Actors, RuntimeSettings};
use klong_actors::policy::model::{Llama, LlamaConfig};
use klong_actors::policy::pretrained::read_safetensors;

/// The run directory's copy of the config it was started with.
const CONFIG_FILE: &str = "config.ron";
const LOCK_FILE: &str = "LOCK";

/// What `run` did, for the final log line and tests.
#[derive(Debug, serde::Serialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub resumed: bool,
    pub tools: usize,
    pub modules_ready: usize,
    pub stages: Vec<SftSummary>,
    pub rl: Vec<RlSummary>,
    pub evals: Vec<EvalReport>,
}

/// What the stages did in this invocation.
#[derive(Default)]
struct StagesDone {
    sft: Vec<SftSummary>,
    rl: Vec<RlSummary>,
    evals: Vec<EvalReport>,
}

/// Holds the run directory's lock for as long as it lives: two processes never share a run.
pub struct RunDir {
    pub path: PathBuf,
    _lock: std::fs::File,
}

impl RunDir {
    pub fn open(path: &Path) -> anyhow::Result<RunDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create run directory {}", path.display()))?;
        let lock_path = path.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!(
                    "run directory {} is in use by another klongd process",
                    path.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Starts or resumes the run; `max_steps` stops it after that many learner steps.
pub fn run(config: &Config, max_steps: Option<u64>) -> anyhow::Result<RunSummary> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let stored = run_dir.path.join(CONFIG_FILE);
    let plan = config.to_ron();
    let resumed = stored.exists();
    if resumed {
        let previous = Config::load(&stored)
            .with_context(|| format!("cannot read the run's config {}", stored.display()))?;
        let conflicts = config.resume_conflicts(&previous);
        if !conflicts.is_empty() {
            bail!(
                "run directory {} holds a run of a different config (changed: {}); resuming \
                 would not continue that run. Use a new run_dir, or restore the config in {}",
                run_dir.path.display(),
                conflicts.join(", "),
                stored.display()
            );
        }
        if &previous != config {
            // Only settings that do not change results differ: keep the latest.
            write_durably(&stored, plan.as_bytes())?;
            tracing::info!("config changed in settings that do not affect results; accepted");
        }
        tracing::info!(run_dir = %run_dir.path.display(), "resuming run");
    } else {
        write_durably(&stored, plan.as_bytes())?;
        tracing::info!(run_dir = %run_dir.path.display(), name = %config.name, "new run");
    }

    let (host, registry, modules) = bring_up_sandbox(config, &run_dir.path)?;
    let done = run_stages(config, &run_dir.path, host, registry.clone(), max_steps)?;
    Ok(RunSummary {
        run_dir: run_dir.path.clone(),
        resumed,
        tools: registry.tools().count(),
        modules_ready: modules,
        stages: done.sft,
        rl: done.rl,
        evals: done.evals,
    })
}

/// The sandbox for `config`: the host, the tool registry with every module compiled (or read
/// from the cache), and one real call in `dir/sandbox-check` that proves the sandbox works on
/// this machine before anything relies on it. Returns the modules' count too.
pub fn bring_up_sandbox(
    config: &Config,
    dir: &Path,
) -> anyhow::Result<(Arc<SandboxHost>, Arc<ToolRegistry>, usize)> {
    let sandbox = &config.sandbox;
    let host = SandboxHost::new(sandbox.host_settings()?)?;
    let registry = Arc::new(ToolRegistry::load_dir(&sandbox.tools_dir).with_context(|| {
        format!(
            "cannot load tools from {} (built by sandboxes/tools/build.sh)",
            sandbox.tools_dir.display()
        )
    })?);
    let modules = registry.modules();
    for module in &modules {
        let started = Instant::now();
        let source = host.load_module(&module.path)?;
        tracing::info!(module = %module.path.display(), ?source, elapsed_ms = started.elapsed().as_millis() as u64, "tool module ready");
    }

    // One real call proves the sandbox works on this machine before any stage relies on it.
    let check_dir = dir.join("sandbox-check");
    let mut check = Sandbox::new(
        host.clone(),
        registry.clone(),
        &check_dir,
        sandbox.call,
        sandbox.episode,
        config.seed,
    )?;
    let outcome = check.exec("bash", &json!({ "command": "echo sandbox ok | wc -c" }))?;
    if outcome.stdout.trim() != "11" {
        bail!(
            "sandbox self-check failed: {}",
            serde_json::to_string(&outcome)?
        );
    }
    std::fs::remove_dir_all(&check_dir).ok();
    tracing::info!(
        tools = registry.tools().count(),
        fuel = outcome.usage.fuel,
        wall_us = outcome.usage.wall_time_us,
        "sandbox self-check passed"
    );
    Ok((host, registry, modules.len()))
}

/// Runs the configured stages in order, resuming from the last checkpoint: a finished stage is
/// skipped, an unfinished one continues at its step with its weights and optimizer moments.
fn run_stages(
    config: &Config,
    run_dir: &Path,
    host: Arc<SandboxHost>,
    registry: Arc<ToolRegistry>,
    max_steps: Option<u64>,
) -> anyhow::Result<StagesDone> {
    if config.stages.is_empty() {
        tracing::info!("no stages configured: the run is complete");
        return Ok(StagesDone::default());
    }
    let Some(model) = &config.model else {
        bail!("the config has stages but no `model`");
    };
    let store = RunStore::open(run_dir)?;
    let device = open_device(config)?;
    let tm = build_model(model, config.seed, &device)?;
    let manifest = store.manifest()?;
    let state: Option<TrainState> = match &manifest {
        Some(m) => Some(
            serde_json::from_value(m.state.clone())
                .context("the run's checkpoint manifest does not parse")?,
        ),
        None => None,
    };
    // The checkpoint's weights go into the model once, here; its optimizer moments serve the
    // stage it was taken in, if that stage is unfinished.
    let resumed_opt = match &manifest {
        Some(m) => {
            let tensors = store.load_tensors(m, &device)?;
            let mut opt = AdamW::from_varmap(&tm.varmap, AdamWParams::default())?;
            opt.import(&tensors)
                .context("the run's checkpoint does not fit the configured model")?;
            Some(opt)
        }
        None => None,
    };
    let tokenizer = Arc::new(tm.tokenizer.clone());
    let template = Arc::new(ChatTemplate::for_tokenizer(&tm.tokenizer, true)?);
    let mut actors = start_actors(config, host, registry, tokenizer, template)?;
    let result = run_stage_list(
        config,
        run_dir,
        &store,
        &tm,
        &mut actors,
        state,
        resumed_opt,
        max_steps,
    );
    actors.shutdown();
    result
}

/// The supervisor and its children for this run's config.
pub(crate) fn start_actors(
    config: &Config,
    host: Arc<SandboxHost>,
    registry: Arc<ToolRegistry>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
) -> anyhow::Result<Actors> {
    let a = &config.actors;
    let settings = RuntimeSettings {
        environments: a.environments,
        window: 2 * a.environments,
        episode_timeout: a.episode_timeout.0,
        max_restarts: a.max_restarts,
        judge_concurrency: a.environments,
        judge_queue: 2 * a.environments,
    };
    let judge = Arc::new(JudgeContext {
        host: host.clone(),
        registry: registry.clone(),
        check_limits: config.sandbox.call,
        llm: None,
        seed: config.seed,
    });
    let environment = EnvironmentArgs {
        host,
        registry,
        call_limits: config.sandbox.call,
        tokenizer,
        template,
        act_timeout: a.episode_timeout.0,
        judge_timeout: a.episode_timeout.0,
    };
    Actors::start(settings, environment, judge)
}

#[allow(clippy::too_many_arguments)]
fn run_stage_list(
    config: &Config,
    run_dir: &Path,
    store: &RunStore,
    tm: &TrainModel,
    actors: &mut Actors,
    state: Option<TrainState>,
    mut resumed_opt: Option<AdamW>,
    max_steps: Option<u64>,
) -> anyhow::Result<StagesDone> {
    let mut budget = max_steps;
    let mut done = StagesDone::default();
    for (i, stage) in config.stages.iter().enumerate() {
        let env = StageEnv {
            config,
            run_dir,
            store,
        };
        let (lr, weight_decay) = match stage {
            StageConfig::Sft(s) => (s.lr, s.weight_decay),
            StageConfig::Rl(s) => (s.lr, s.weight_decay),
            StageConfig::Eval(ev) => {
                // Evaluations are stored when done (a finished one is read back, not re-run).
                done.evals.push(run_eval(&env, actors, ev, tm)?);
                continue;
            }
        };
        let start = match &state {
            Some(s) if s.stage > i || (s.stage == i && s.done) => {
                tracing::info!(stage = %stage.name(), "stage already finished");
                continue;
            }
            Some(s) if s.stage == i => s.step,
            _ => 0,
        };
        let hp = AdamWParams {
            lr,
            weight_decay,
            ..AdamWParams::default()
        };
        let opt = match (start, resumed_opt.take()) {
            (s, Some(mut resumed)) if s > 0 => {
                resumed.hp = hp;
                resumed
            }
            _ => AdamW::from_varmap(&tm.varmap, hp)?,
        };
        let reference = match stage {
            StageConfig::Rl(rl) if rl.kl_beta > 0.0 => Some(reference_model(
                config,
                run_dir,
                i,
                &tm.config,
                tm.model.device(),
            )?),
            _ => None,
        };
        // Mixed precision's compute copies are taken from the masters as they stand now (a
        // resumed checkpoint's weights included).
        let precision = match config.precision() {
            Precision::F32 => None,
            Precision::Bf16 => Some(MixedPrecision::new(&tm.varmap, DType::BF16)?),
        };
        let model = match &precision {
            Some(mp) => Llama::new(
                &tm.config,
                VarBuilder::from_varmap(mp.compute(), mp.dtype(), tm.model.device()),
            )?,
            None => tm.model.clone(),
        };
        let learner = actors.start_learner(LearnerArgs {
            model,
            opt,
            reference,
            precision,
        })?;
        let finished = match stage {
            StageConfig::Sft(sft) => {
                let summary = run_sft(&env, actors, &learner, i, sft, tm, start, &mut budget)?;
                let finished = summary.finished;
                done.sft.push(summary);
                finished
            }
            StageConfig::Rl(rl) => {
                let summary = run_rl(&env, actors, &learner, i, rl, tm, start, &mut budget)?;
                let finished = summary.finished;
                done.rl.push(summary);
                finished
            }
            StageConfig::Eval(_) => true,
        };
        if !finished {
            tracing::info!(stage = %stage.name(), "stopped at the step limit; run again to go on");
            break;
        }
    }
    Ok(done)
}

/// The frozen reference of RL stage `index`'s KL term: the model as the last Sft stage before
/// it left it (read from its saved folder, so a resumed run gets the same one), or the
/// configured model's starting weights when no Sft stage comes first.
fn reference_model(
    config: &Config,
    run_dir: &Path,
    index: usize,
    model_config: &LlamaConfig,
    device: &Device,
) -> anyhow::Result<Llama> {
    let last_sft = config.stages[..index].iter().rev().find_map(|s| match s {
        StageConfig::Sft(sft) => Some(&sft.name),
        _ => None,
    });
    match last_sft {
        None => {
            let Some(model) = &config.model else {
                bail!("the config has stages but no `model`");
            };
            Ok(build_model(model, config.seed, device)?.model)
        }
        Some(name) => {
            let dir = stage_model_dir(run_dir, name);
            let weights = read_safetensors(&dir, device).with_context(|| {
                format!(
                    "reading the RL reference, stage {name}'s model in {}",
                    dir.display()
                )
            })?;
            Ok(Llama::from_tensors(
                model_config,
                weights.into_iter().collect(),
                device,
            )?)
        }
    }
}

/// The config's device, opened: a GPU that is not there fails the run here, before any work.
fn open_device(config: &Config) -> anyhow::Result<Device> {
    let device = config.device.open().map_err(anyhow::Error::msg)?;
    tracing::info!(device = %config.device, precision = ?config.precision(), "training device");
    Ok(device)
}

/// `klongd status RUN_DIR`: the checkpoint's stage and step and the latest metrics. While a run
/// holds the directory, its database is locked: the metrics file still tells.
pub fn status(run_dir: &Path) -> anyhow::Result<String> {
    if !run_dir.join(CONFIG_FILE).exists() {
        bail!(
            "{} is not a run directory (no {CONFIG_FILE})",
            run_dir.display()
        );
    }
    let mut out = format!("run: {}\n", run_dir.display());
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(run_dir.join(LOCK_FILE));
    let running = match &lock {
        Ok(f) => f.try_lock().is_err(),
        Err(_) => false,
    };
    if running {
        out.push_str("state: running (another klongd holds the run)\n");
    } else {
        let store = RunStore::open(run_dir)?;
        match store.manifest()? {
            Some(m) => {
                let s: TrainState = serde_json::from_value(m.state)?;
                out.push_str(&format!(
                    "checkpoint: #{} stage {} ({}) step {}{}\n",
                    m.seq,
                    s.stage,
                    s.stage_name,
                    s.step,
                    if s.done { ", stage finished" } else { "" }
                ));
            }
            None => out.push_str("checkpoint: none yet\n"),
        }
        let trajectories = store.scan("traj/")?;
        out.push_str(&format!("stored episodes: {}\n", trajectories.len()));
    }
    let metrics = run_dir.join("metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        if let Some(last) = text.lines().last() {
            out.push_str(&format!("latest metrics: {last}\n"));
        }
    }
    Ok(out)
}
