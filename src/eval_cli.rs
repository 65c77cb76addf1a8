//! `klongd eval CONFIG --checkpoint PATH`: the config's Eval stages, run on a checkpoint from
//! outside a run — an HF folder (a stage's `RUN_DIR/models/<stage>/`, or any Llama-family
//! model), a `.gguf` file, or a run directory (its latest checkpoint's weights, with the
//! config's `model`). Every evaluation runs afresh (nothing is read back from an earlier
//! invocation); the reports go to `--out` as in a run's `eval/` folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::Device;
use klong_actors::learner::optim::{AdamW, AdamWParams};
use klong_actors::policy::chat::ChatTemplate;

use crate::config::{Config, EvalStage, StageConfig};
use crate::eval_stage::{run_eval, EvalReport};
use crate::run::{bring_up_sandbox, start_actors};
use crate::sft_stage::{build_model, StageEnv, TrainModel};
use crate::store::RunStore;

/// The model a checkpoint path names.
fn load_checkpoint(config: &Config, path: &Path, device: &Device) -> anyhow::Result<TrainModel> {
    if path.join("state.sled").exists() || path.join("config.ron").is_file() {
        // A run directory: the configured model with the latest checkpoint's weights.
        let Some(model) = &config.model else {
            bail!(
                "{} is a run directory; its weights need the config's `model` to be read",
                path.display()
            );
        };
        let tm = build_model(model, config.seed, device)?;
        let store = RunStore::open(path).with_context(|| {
            format!(
                "cannot open the run database in {} (is a run still using it?)",
                path.display()
            )
        })?;
        let manifest = store
            .manifest()?
            .with_context(|| format!("{} has no checkpoint yet", path.display()))?;
        let tensors = store.load_tensors(&manifest, device)?;
        let mut opt = AdamW::from_varmap(&tm.varmap, AdamWParams::default())?;
        opt.import(&tensors).with_context(|| {
            format!(
                "the checkpoint in {} does not fit the config's model",
                path.display()
            )
        })?;
        tracing::info!(run = %path.display(), seq = manifest.seq, "evaluating the run's latest checkpoint");
        return Ok(tm);
    }
    TrainModel::load(path, device)
}

/// The config's Eval stages named in `only` (all of them when it is empty), or why not.
pub fn eval_stages<'a>(config: &'a Config, only: &[String]) -> Result<Vec<&'a EvalStage>, String> {
    let stages: Vec<&EvalStage> = config
        .stages
        .iter()
        .filter_map(|s| match s {
            StageConfig::Eval(e) if only.is_empty() || only.contains(&e.name) => Some(e),
            _ => None,
        })
        .collect();
    if let Some(name) = only.iter().find(|n| !stages.iter().any(|s| &&s.name == n)) {
        return Err(format!("no Eval stage named {name:?}"));
    }
    if stages.is_empty() {
        return Err("no Eval stage to run".into());
    }
    Ok(stages)
}

/// Runs `stages` (Eval stages of `config`) with the model at `checkpoint`; the reports are
/// written under `out` and returned.
pub fn eval(
    config: &Config,
    stages: &[&EvalStage],
    checkpoint: &Path,
    out: &Path,
) -> anyhow::Result<Vec<EvalReport>> {
    let device = Device::Cpu;
    let tm = load_checkpoint(config, checkpoint, &device)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // The evaluations' own state (episode results), fresh each time: a report must describe
    // this checkpoint and this config, not an earlier invocation's.
    let scratch = tempfile::Builder::new()
        .prefix(".eval-state-")
        .tempdir_in(out)
        .with_context(|| format!("cannot write in {}", out.display()))?;
    let store = RunStore::open(scratch.path())?;
    let (host, registry, _) = bring_up_sandbox(config, scratch.path())?;
    let tokenizer = Arc::new(tm.tokenizer.clone());
    let template = Arc::new(ChatTemplate::for_tokenizer(&tm.tokenizer, true)?);
    let mut actors = start_actors(config, host, registry, tokenizer, template)?;
    let env = StageEnv {
        config,
        run_dir: out,
        store: &store,
    };
    let mut reports = Vec::new();
    let mut failed = None;
    for stage in stages {
        match run_eval(&env, &mut actors, stage, &tm) {
            Ok(r) => reports.push(r),
            Err(e) => {
                failed = Some(e.context(format!("eval stage {}", stage.name)));
                break;
            }
        }
    }
    actors.shutdown();
    // Episode folders and task copies are working files; the reports stay.
    std::fs::remove_dir_all(out.join("episodes")).ok();
    std::fs::remove_dir_all(out.join("tasks")).ok();
    match failed {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// `--out`'s default: `<run_dir>/eval-cli/<checkpoint's folder name>`.
pub fn default_out(config: &Config, checkpoint: &Path) -> PathBuf {
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    config.run_dir.join("eval-cli").join(name)
}
