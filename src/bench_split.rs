//! `klongd bench split CONFIG`: the trajectory-splitting ablation. The config's Sft stage is
//! trained three times, once per splitting mode (`Split`, KLong's; `Truncate` and `Sliding`,
//! the baselines), on the same data and the same number of training tokens, each in its own
//! run directory; the config's Eval stages then score each model on held-out tasks. The report
//! puts the scores side by side per eval stage and horizon.
//!
//! Each of the three is an ordinary `klongd run` (durable, resumable): a bench stopped half way
//! and started again goes on where it stopped.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use klong_actors::learner::split::SplitMode;
use serde::Serialize;

use crate::config::{Config, StageConfig};
use crate::eval_stage::ScoreRow;

pub const MODES: [SplitMode; 3] = [SplitMode::Split, SplitMode::Truncate, SplitMode::Sliding];

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: SplitMode,
    pub run_dir: PathBuf,
    pub steps: u64,
    pub tokens: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Per eval stage: its per-horizon rows and the overall row.
    pub evals: Vec<(String, Vec<ScoreRow>, ScoreRow)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitBenchReport {
    pub config: String,
    pub train_tokens: u64,
    pub modes: Vec<ModeResult>,
}

/// The config run for one mode: its own run directory and name, the mode, the token budget.
pub fn mode_config(base: &Config, mode: SplitMode, tokens: u64) -> anyhow::Result<Config> {
    let mut c = base.clone();
    let tag = format!("{mode:?}").to_lowercase();
    c.name = format!("{}-{tag}", base.name);
    c.run_dir = base.run_dir.join(&tag);
    let mut sft_stages = 0;
    for stage in &mut c.stages {
        if let StageConfig::Sft(s) = stage {
            s.split.mode = mode;
            s.train_tokens = Some(tokens);
            sft_stages += 1;
        }
    }
    if sft_stages != 1 {
        bail!("the split bench needs a config with exactly one Sft stage ({sft_stages} found)");
    }
    if c.stages.iter().any(|s| matches!(s, StageConfig::Rl(_))) {
        bail!("the split bench compares SFT alone: remove the config's Rl stages");
    }
    if !c.stages.iter().any(|s| matches!(s, StageConfig::Eval(_))) {
        bail!("the split bench needs an Eval stage after the Sft stage to score the modes");
    }
    Ok(c)
}

/// Runs the three modes; `tokens` is the training budget of each (default: the Sft stage's
/// `train_tokens`).
pub fn run(config_path: &std::path::Path, tokens: Option<u64>) -> anyhow::Result<SplitBenchReport> {
    let base = Config::load(config_path)?;
    let budget = match tokens {
        Some(t) => t,
        None => base
            .stages
            .iter()
            .find_map(|s| match s {
                StageConfig::Sft(s) => s.train_tokens,
                StageConfig::Rl(_) | StageConfig::Eval(_) => None,
            })
            .context("give --tokens N, or train_tokens in the config's Sft stage")?,
    };
    if budget == 0 {
        bail!("--tokens must be positive");
    }
    let mut modes = Vec::new();
    for mode in MODES {
        let cfg = mode_config(&base, mode, budget)?;
        tracing::info!(?mode, run_dir = %cfg.run_dir.display(), tokens = budget, "split bench: training");
        let summary =
            crate::run::run(&cfg, None).with_context(|| format!("split bench, mode {mode:?}"))?;
        if summary.stages.iter().any(|s| !s.finished) {
            bail!("mode {mode:?}: the Sft stage did not finish");
        }
        // From the metrics, which also cover a stage finished by an earlier invocation.
        let (steps, tokens, first_loss, last_loss) = training_totals(&cfg.run_dir)?;
        modes.push(ModeResult {
            mode,
            run_dir: cfg.run_dir.clone(),
            steps,
            tokens,
            first_loss,
            last_loss,
            evals: summary
                .evals
                .iter()
                .map(|e| (e.stage.clone(), e.by_horizon.clone(), e.overall.clone()))
                .collect(),
        });
    }
    Ok(SplitBenchReport {
        config: config_path.display().to_string(),
        train_tokens: budget,
        modes,
    })
}

/// Steps, tokens, first and last loss of a run's training, from `metrics.jsonl` (a step
/// re-done after a resume counts once: its last line wins).
fn training_totals(
    run_dir: &std::path::Path,
) -> anyhow::Result<(u64, u64, Option<f64>, Option<f64>)> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut by_step = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let (Some(step), Some(tokens)) = (v["step"].as_u64(), v["tokens"].as_u64()) else {
            bail!("{}:{}: no step or tokens", path.display(), i + 1);
        };
        by_step.insert(step, (tokens, v["loss"].as_f64()));
    }
    let tokens = by_step.values().map(|(t, _)| t).sum();
    let steps = by_step.len() as u64;
    let first = by_step.values().next().and_then(|(_, l)| *l);
    let last = by_step.values().next_back().and_then(|(_, l)| *l);
    Ok((steps, tokens, first, last))
}

impl SplitBenchReport {
    pub fn render(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "split bench: {} ({} training tokens per mode)",
            self.config, self.train_tokens
        );
        for m in &self.modes {
            let _ = writeln!(
                t,
                "  {:<8} {} steps, {} tokens, loss {} -> {}",
                format!("{:?}", m.mode),
                m.steps,
                m.tokens,
                m.first_loss.map_or("-".into(), |l| format!("{l:.3}")),
                m.last_loss.map_or("-".into(), |l| format!("{l:.3}")),
            );
        }
        let Some(first) = self.modes.first() else {
            return t;
        };
        for (i, (stage, rows, _)) in first.evals.iter().enumerate() {
            let _ = writeln!(
                t,
                "\neval {stage}: held-out score (mean ± se) by horizon (well-formed tool calls)"
            );
            let _ = write!(t, "{:<8}", "horizon");
            for m in &self.modes {
                let _ = write!(t, " {:>22}", format!("{:?}", m.mode));
            }
            t.push('\n');
            let mut horizons: Vec<Option<u32>> = rows.iter().map(|r| r.horizon).collect();
            horizons.push(None);
            for h in horizons {
                let _ = write!(t, "{:<8}", h.map_or("all".into(), |h| h.to_string()));
                for m in &self.modes {
                    let cell = m.evals.get(i).and_then(|(_, rows, overall)| match h {
                        None => Some(overall),
                        Some(h) => rows.iter().find(|r| r.horizon == Some(h)),
                    });
                    let text = cell.map_or("-".into(), |r| {
                        format!(
                            "{:.3} ± {:.3} ({:.0}%)",
                            r.mean,
                            r.stderr,
                            100.0 * r.tool_call_rate
                        )
                    });
                    let _ = write!(t, " {text:>22}");
                }
                t.push('\n');
            }
        }
        t
    }
}
