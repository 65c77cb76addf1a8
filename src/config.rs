//! The run's configuration: RON, typed, validated, every quantity with its unit.
//!
//! Errors name the file, line and column, the field's path and what was expected, and unknown
//! fields are rejected, so a typo never becomes a silent default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use klong_actors::learner::recall::MAX_FILLER_BYTES;
use klong_actors::policy::DeviceName;
use klong_sandbox::{CallLimits, EpisodeBudget, HostSettings, HumanDuration};
use serde::{Deserialize, Serialize};

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The run's name, used in logs and reports.
    #[serde(deserialize_with = "run_name")]
    pub name: String,
    /// Where the run keeps its state; relative paths are relative to the working directory.
    pub run_dir: PathBuf,
    /// The seed every random choice of the run derives from.
    pub seed: u64,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// The actor runtime's sizes and bounds.
    #[serde(default)]
    pub actors: ActorsConfig,
    /// The policy model; needed by any training stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    /// Where the model trains and samples: `"cpu"`, `"cuda"` or `"cuda:N"` (CUDA needs a
    /// klongd built with `--features cuda`).
    #[serde(default)]
    pub device: DeviceName,
    /// The training steps' arithmetic; by default `F32` on the CPU and `Bf16` on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// The stages, run in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageConfig>,
}

/// The actor runtime: how many episodes run at once and how long anything may take. None of
/// it changes what a run computes (every episode is seeded on its own), so a resumed run may
/// change it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorsConfig {
    /// Environments, i.e. episodes running at once.
    #[serde(deserialize_with = "positive_usize")]
    pub environments: usize,
    /// Longest an episode may take, judging included, before its environment is presumed
    /// dead (it is then replaced and the episode re-queued once). It also bounds every wait
    /// on the Learner (a step, an export): past it the stage fails and resumes from its last
    /// checkpoint when run again.
    #[serde(deserialize_with = "klong_sandbox::limits::positive::duration")]
    pub episode_timeout: HumanDuration,
    /// Restarts of failed actors over a run before it gives up.
    pub max_restarts: u32,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig {
            environments: 2,
            episode_timeout: HumanDuration::from_secs(3600),
            max_restarts: 16,
        }
    }
}

/// The arithmetic of training steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// f32 throughout.
    F32,
    /// Forward and backward in bf16 over f32 master weights; the optimizer's update and its
    /// moments stay f32 (`learner::precision`).
    Bf16,
}

/// The policy model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ModelConfig {
    /// A Llama-style model from scratch with the byte-level tokenizer, initialised from the
    /// run's seed.
    Tiny(TinyModel),
    /// An HF folder or a `.gguf` file.
    Pretrained { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinyModel {
    #[serde(deserialize_with = "positive_usize")]
    pub hidden: usize,
    #[serde(deserialize_with = "positive_usize")]
    pub layers: usize,
    #[serde(deserialize_with = "positive_usize")]
    pub heads: usize,
    #[serde(deserialize_with = "positive_usize")]
    pub kv_heads: usize,
    #[serde(deserialize_with = "positive_usize")]
    pub ffn: usize,
    /// Context length in tokens.
    #[serde(deserialize_with = "positive_usize")]
    pub context: usize,
    /// Standard deviation of the normal draw of every weight matrix (HF's
    /// `initializer_range`, 0.02 by default). HF's value suits widths of ~1k. At width 96
    /// (`examples/sft_compact.ron`'s model) trained on synthetic key-value recall, recall
    /// formed after ~750 steps from 0.1 and not within 2,000 steps from 0.02.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

/// HF's `initializer_range` for Llama.
pub const DEFAULT_INIT_STD: f64 = 0.02;

fn default_init_std() -> f64 {
    DEFAULT_INIT_STD
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum StageConfig {
    Sft(SftStage),
    Rl(RlStage),
    Eval(EvalStage),
}

impl StageConfig {
    pub fn name(&self) -> &str {
        match self {
            StageConfig::Sft(s) => &s.name,
            StageConfig::Rl(s) => &s.name,
            StageConfig::Eval(s) => &s.name,
        }
    }
}

/// Tasks a stage runs: generated from the built-in family, or task folders on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum TaskSet {
    Family(TaskSource),
    /// Every subfolder of the directory that holds a `task.ron` (see `klongd tasks`), in name
    /// order; relative paths are relative to the working directory.
    Dir(PathBuf),
}

impl TaskSet {
    fn check(&self, at: &str) -> Result<(), String> {
        match self {
            TaskSet::Family(f) => f.check(at),
            TaskSet::Dir(d) if d.as_os_str().is_empty() => {
                Err(format!("{at}: expected a directory path"))
            }
            TaskSet::Dir(_) => Ok(()),
        }
    }
}

/// One stage of progressive RL (design §6): steps of `tasks_per_step` tasks x `group_size`
/// rollouts of the current policy, judged, group-normalised advantages, the clipped surrogate
/// plus `kl_beta` x KL to the reference (the model as the last Sft stage left it), new weights
/// to the policy. Stages in order with growing `budget`s are progressive RL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlStage {
    #[serde(deserialize_with = "run_name")]
    pub name: String,
    pub tasks: TaskSet,
    /// Learner steps of the stage.
    #[serde(deserialize_with = "positive_u64")]
    pub steps: u64,
    #[serde(deserialize_with = "positive_u32")]
    pub tasks_per_step: u32,
    /// Rollouts per task (`n`); at least 2, or no group could have a spread of rewards.
    pub group_size: u32,
    /// The stage's timeout: what one episode may use before it is judged on its state.
    pub budget: RlBudget,
    /// Tokens one turn may generate.
    #[serde(deserialize_with = "positive_usize")]
    pub max_turn_tokens: usize,
    /// Sampling temperature of the rollouts (> 0; the learner divides logits by it too).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// PPO clip range `eps`.
    pub clip_eps: f64,
    /// Weight `beta` of the KL to the reference (0: no reference pass).
    pub kl_beta: f64,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// How rollouts are split for the learner (design §5), as in SFT.
    pub split: SplitSettings,
    /// Tokens per micro-batch (padding counted); a step accumulates over all its rollouts.
    #[serde(deserialize_with = "positive_usize")]
    pub batch_tokens: usize,
    /// A checkpoint every this many steps (and at the end).
    #[serde(default = "default_one_u64", deserialize_with = "positive_u64")]
    pub checkpoint_every: u64,
}

fn default_temperature() -> f32 {
    1.0
}
fn default_one_u64() -> u64 {
    1
}

/// An RL stage's episode budget. Turns and tokens keep a run exact; a wall-clock budget
/// makes it depend on the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlBudget {
    #[serde(deserialize_with = "positive_u32")]
    pub turns: u32,
    /// Tokens the policy may generate over the episode.
    #[serde(deserialize_with = "positive_u64")]
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time: Option<HumanDuration>,
}

impl RlBudget {
    /// `self` allows at least what `other` does in every bound, and more in one.
    pub fn grows_from(&self, other: &RlBudget) -> bool {
        let wall = |b: &RlBudget| b.wall_time.map_or(Duration::MAX, |w| w.0);
        let ge =
            self.turns >= other.turns && self.tokens >= other.tokens && wall(self) >= wall(other);
        let gt = self.turns > other.turns || self.tokens > other.tokens || wall(self) > wall(other);
        ge && gt
    }
}

/// Evaluation: a policy on tasks of the built-in family, each episode judged; the report goes
/// to `RUN_DIR/eval/<name>.json` and `.txt` (per task, per horizon, mean ± standard error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    #[serde(deserialize_with = "run_name")]
    pub name: String,
    pub policy: EvalPolicy,
    pub tasks: TaskSet,
    /// Episodes per task, each with its own sampling seed.
    #[serde(default = "default_one", deserialize_with = "positive_u32")]
    pub seeds: u32,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    /// Turn budget of each episode (the task's own budget also applies).
    #[serde(deserialize_with = "positive_u32")]
    pub max_turns: u32,
    /// Tokens one turn may generate.
    #[serde(deserialize_with = "positive_usize")]
    pub max_turn_tokens: usize,
    /// The context the model policy sees, in tokens: the pinned prefix and the latest turns
    /// that fit (default: the model's whole context, `max_position_embeddings`). Set it to the
    /// Sft stage's `split.context` to score a model under the window it was trained in, as
    /// the splitting ablation does. At most the model's context; the model policy only.
    #[serde(default)]
    pub context: Option<usize>,
}

fn default_one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum EvalPolicy {
    /// The run's model with its weights at this point of the run.
    Model,
    /// The scripted expert (the reference score beside the model's).
    Expert { noise: f64 },
}

/// Supervised fine-tuning on split trajectories.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftStage {
    #[serde(deserialize_with = "run_name")]
    pub name: String,
    pub data: SftData,
    pub split: SplitSettings,
    /// Tokens per optimizer step (padding counted); micro-batches are packed to this budget.
    #[serde(deserialize_with = "positive_usize")]
    pub batch_tokens: usize,
    #[serde(deserialize_with = "positive_u32")]
    pub epochs: u32,
    /// Train on this many tokens instead of `epochs` passes: passes over the data repeat, each
    /// in its own seeded order, until the scheduled steps hold this many tokens (what an
    /// equal-token comparison of splitting modes needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_tokens: Option<u64>,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// 0 = no clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// A checkpoint every this many steps (and at the end).
    #[serde(
        default = "default_checkpoint_every",
        deserialize_with = "positive_u64"
    )]
    pub checkpoint_every: u64,
}

fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.0
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_checkpoint_every() -> u64 {
    50
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum SftData {
    /// OpenAI-style JSONL conversations, tokenized once with the model's chat template.
    Jsonl { path: PathBuf },
    /// Roll a teacher out on tasks, judge, keep the episodes scoring at least `min_score`.
    Distill {
        teacher: Teacher,
        tasks: TaskSource,
        min_score: f64,
        /// Turn budget of each episode (the task's own budget also applies).
        #[serde(deserialize_with = "positive_u32")]
        max_turns: u32,
    },
    /// `count` synthetic in-context recall conversations of the data set `seed` (see
    /// `klong_actors::learner::recall`): a warm-up that teaches a model trained from scratch
    /// to copy values out of its context, before it learns from trajectories.
    Recall {
        seed: u64,
        #[serde(deserialize_with = "positive_u32")]
        count: u32,
        /// Most bytes of unrelated text before each conversation's records (a uniform draw per
        /// conversation; at most [`MAX_FILLER_BYTES`]): recall at a task's distances.
        #[serde(default)]
        filler: u32,
    },
    /// The trajectories of several sources trained on together (at most
    /// [`MAX_MIX_PARTS`], none a `Mix`, at most one `Distill`): e.g. recall conversations
    /// beside distilled episodes, so that learning the task does not unlearn recall.
    Mix(Vec<SftData>),
}

/// Most sources in one `Mix`.
pub const MAX_MIX_PARTS: usize = 8;

/// Most recall conversations a stage may generate (~1 KB each once tokenized).
pub const MAX_RECALL_CONVERSATIONS: u32 = 500_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Teacher {
    /// The built-in scripted expert; `noise` is the chance it botches each experiment.
    Expert { noise: f64 },
}

/// Checks a data source; `at` names it in messages. `top` is false inside a `Mix`.
fn check_data(data: &SftData, at: &str, top: bool) -> Result<(), String> {
    match data {
        SftData::Jsonl { .. } => {}
        SftData::Distill {
            teacher: Teacher::Expert { noise },
            tasks,
            min_score,
            ..
        } => {
            if !(0.0..=1.0).contains(noise) {
                return Err(format!("field `{at}.teacher.noise`: expected 0..=1"));
            }
            if !(0.0..=1.0).contains(min_score) {
                return Err(format!("field `{at}.min_score`: expected 0..=1"));
            }
            tasks.check(&format!("field `{at}.tasks`"))?;
        }
        SftData::Recall { count, filler, .. } => {
            if *count > MAX_RECALL_CONVERSATIONS {
                return Err(format!(
                    "field `{at}.count`: {count} is more than the most, \
                     {MAX_RECALL_CONVERSATIONS}"
                ));
            }
            if *filler > MAX_FILLER_BYTES {
                return Err(format!(
                    "field `{at}.filler`: {filler} bytes is more than the most, \
                     {MAX_FILLER_BYTES}"
                ));
            }
        }
        SftData::Mix(parts) => {
            if !top {
                return Err(format!(
                    "field `{at}`: a Mix inside a Mix (list its parts instead)"
                ));
            }
            if parts.is_empty() || parts.len() > MAX_MIX_PARTS {
                return Err(format!(
                    "field `{at}`: a Mix takes 1 to {MAX_MIX_PARTS} sources, not {}",
                    parts.len()
                ));
            }
            // A distilled episode is stored under its stage and index: two sources would
            // overwrite each other's.
            let distills = parts
                .iter()
                .filter(|p| matches!(p, SftData::Distill { .. }))
                .count();
            if distills > 1 {
                return Err(format!(
                    "field `{at}`: at most one Distill in a Mix, not {distills}"
                ));
            }
            for (i, part) in parts.iter().enumerate() {
                check_data(part, &format!("{at}[{i}]"), false)?;
            }
        }
    }
    Ok(())
}

/// Tasks of the built-in family: `count` tasks from `seed`, horizons cycling through
/// `min_horizon..=max_horizon`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSource {
    /// How tasks are stated (`Compact` fits a tiny byte-level model's context).
    #[serde(default)]
    pub style: klong_actors::environment::family::Style,
    pub seed: u64,
    #[serde(deserialize_with = "positive_u32")]
    pub count: u32,
    #[serde(deserialize_with = "positive_u32")]
    pub min_horizon: u32,
    #[serde(deserialize_with = "positive_u32")]
    pub max_horizon: u32,
}

impl TaskSource {
    /// Cross-field checks; `at` names the field in the message.
    fn check(&self, at: &str) -> Result<(), String> {
        if self.min_horizon > self.max_horizon {
            return Err(format!(
                "{at}: min_horizon {} > max_horizon {}",
                self.min_horizon, self.max_horizon
            ));
        }
        Ok(())
    }
}

/// Trajectory splitting (design §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSettings {
    /// `L`, tokens per sub-trajectory.
    #[serde(deserialize_with = "positive_usize")]
    pub context: usize,
    pub mode: klong_actors::learner::split::SplitMode,
    #[serde(default)]
    pub overlap: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Directory of tool manifests (`*.json`).
    pub tools_dir: PathBuf,
    /// Where compiled modules are cached; `None` resolves to `$XDG_CACHE_HOME/klongd/modules`
    /// or `$HOME/.cache/klongd/modules`.
    pub cache_dir: Option<PathBuf>,
    /// Tool calls executing at once.
    #[serde(deserialize_with = "positive_usize")]
    pub max_concurrent: usize,
    /// Tool calls that may wait for a slot; more are refused at once.
    pub max_queued: usize,
    /// How long a queued call waits before it is refused.
    #[serde(deserialize_with = "klong_sandbox::limits::positive::duration")]
    pub queue_timeout: HumanDuration,
    /// Fixed ticking clocks, fixed file times and inode numbers, and seeded randomness in
    /// guests.
    pub deterministic: bool,
    /// Limits of every tool call.
    pub call: CallLimits,
    /// Totals of an episode across its calls.
    pub episode: EpisodeBudget,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        let host = HostSettings::default();
        SandboxConfig {
            tools_dir: PathBuf::from("sandboxes/tools/manifests"),
            cache_dir: None,
            max_concurrent: host.max_concurrent,
            max_queued: host.max_queued,
            queue_timeout: HumanDuration(host.queue_timeout),
            deterministic: host.deterministic,
            call: CallLimits::default(),
            episode: EpisodeBudget::default(),
        }
    }
}

impl SandboxConfig {
    /// The host settings, with the cache directory resolved.
    pub fn host_settings(&self) -> Result<HostSettings, ConfigError> {
        Ok(HostSettings {
            cache_dir: Some(match &self.cache_dir {
                Some(dir) => dir.clone(),
                None => default_cache_dir()?,
            }),
            max_concurrent: self.max_concurrent,
            max_queued: self.max_queued,
            queue_timeout: self.queue_timeout.0,
            deterministic: self.deterministic,
        })
    }
}

/// `$XDG_CACHE_HOME/klongd/modules`, else `$HOME/.cache/klongd/modules`.
pub fn default_cache_dir() -> Result<PathBuf, ConfigError> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("klongd/modules"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home).join(".cache/klongd/modules"));
    }
    Err(ConfigError::Invalid {
        file: PathBuf::new(),
        message: "sandbox.cache_dir is not set and neither XDG_CACHE_HOME nor HOME is: set one"
            .into(),
    })
}

fn run_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(serde::de::Error::custom(format!(
            "expected a name of 1 to 64 ASCII letters, digits, `-`, `_` or `.`, got {name:?}"
        )));
    }
    Ok(name)
}

fn positive_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("expected a positive integer"));
    }
    Ok(v)
}

fn positive_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("expected a positive integer"));
    }
    Ok(v)
}

fn positive_usize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("expected a positive integer"));
    }
    Ok(v)
}

/// A training stage's settings that every such stage checks the same way.
struct Training<'a> {
    lr: f64,
    min_lr_ratio: f64,
    max_grad_norm: f64,
    weight_decay: f64,
    batch_tokens: usize,
    split: &'a SplitSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// `line`/`col` are 1-based.
    #[error("{}:{line}:{col}: {path}{message}", file.display(), path = field_prefix(field))]
    Syntax {
        file: PathBuf,
        line: usize,
        col: usize,
        field: String,
        message: String,
    },
    #[error("{}: {message}", file.display())]
    Invalid { file: PathBuf, message: String },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() || field == "." {
        String::new()
    } else {
        format!("field `{field}`: ")
    }
}

/// Reads a RON file of any settings type, bounded in size, with positioned errors.
pub fn load_ron<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let read_err = |source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(file).map_err(read_err)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(ConfigError::Invalid {
            file: file.to_path_buf(),
            message: format!("{len} bytes is over the {MAX_CONFIG_BYTES}-byte config limit"),
        });
    }
    let text = std::fs::read_to_string(file).map_err(read_err)?;
    parse_ron(file, &text)
}

/// Parses RON text; errors carry `file:line:col` and the path of the field.
pub fn parse_ron<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let syntax = |e: ron::error::SpannedError, field: String| ConfigError::Syntax {
        file: file.to_path_buf(),
        line: e.span.start.line,
        col: e.span.start.col,
        field,
        message: e.code.to_string(),
    };
    let mut de = ron::Deserializer::from_str(text).map_err(|e| syntax(e, String::new()))?;
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let field = e.path().to_string();
            let spanned = de.span_error(e.into_inner());
            return Err(syntax(spanned, field));
        }
    };
    de.end()
        .map_err(|e| syntax(de.span_error(e), String::new()))?;
    Ok(value)
}

impl Config {
    /// The training steps' arithmetic: as configured, else `Bf16` on a GPU and `F32` on the
    /// CPU.
    pub fn precision(&self) -> Precision {
        self.precision.unwrap_or(match self.device {
            DeviceName::Cuda(_) => Precision::Bf16,
            DeviceName::Cpu => Precision::F32,
        })
    }

    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let config: Config = load_ron(file)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Parses `text`; `file` only names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_ron(file, text)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks that span several fields (single fields are checked while parsing).
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            message,
        };
        if self.run_dir.as_os_str().is_empty() {
            return Err(invalid(
                "field `run_dir`: expected a directory path, got an empty string".into(),
            ));
        }
        let call = &self.sandbox.call;
        let episode = &self.sandbox.episode;
        if call.wall_time > episode.wall_time {
            return Err(invalid(format!(
                "field `sandbox.call.wall_time` ({}) is longer than `sandbox.episode.wall_time` ({}): \
                 an episode could not fit one call",
                call.wall_time, episode.wall_time
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, stage) in self.stages.iter().enumerate() {
            if !names.insert(stage.name()) {
                return Err(invalid(format!(
                    "field `stages[{i}].name`: {:?} names an earlier stage too",
                    stage.name()
                )));
            }
            let at = |f: &str| format!("field `stages[{i}].{f}`");
            let sft = match stage {
                StageConfig::Sft(sft) => sft,
                StageConfig::Rl(rl) => {
                    self.validate_rl(rl, &at).map_err(invalid)?;
                    continue;
                }
                StageConfig::Eval(ev) => {
                    if let EvalPolicy::Model = ev.policy {
                        if self.model.is_none() {
                            return Err(invalid(format!(
                                "stage {:?} evaluates the model, but the config has no `model`",
                                ev.name
                            )));
                        }
                    }
                    if let EvalPolicy::Expert { noise } = ev.policy {
                        if !(0.0..=1.0).contains(&noise) {
                            return Err(invalid(format!("{}: expected 0..=1", at("policy.noise"))));
                        }
                    }
                    if let Some(context) = ev.context {
                        if let EvalPolicy::Expert { .. } = ev.policy {
                            return Err(invalid(format!(
                                "{}: the scripted expert has no context window; set it for `policy: Model` only",
                                at("context")
                            )));
                        }
                        if context == 0 {
                            return Err(invalid(format!("{}: expected > 0", at("context"))));
                        }
                        if let Some(ModelConfig::Tiny(t)) = &self.model {
                            if context > t.context {
                                return Err(invalid(format!(
                                    "{}: {context} exceeds the model's context ({})",
                                    at("context"),
                                    t.context
                                )));
                            }
                        }
                    }
                    if !(ev.temperature.is_finite() && ev.temperature >= 0.0) {
                        return Err(invalid(format!("{}: expected >= 0", at("temperature"))));
                    }
                    ev.tasks.check(&at("tasks")).map_err(invalid)?;
                    continue;
                }
            };
            if self.model.is_none() {
                return Err(invalid(format!(
                    "stage {:?} trains a model, but the config has no `model`",
                    sft.name
                )));
            }
            if sft.train_tokens == Some(0) {
                return Err(invalid(format!(
                    "{}: expected a positive number of tokens",
                    at("train_tokens")
                )));
            }
            self.check_training(
                &Training {
                    lr: sft.lr,
                    min_lr_ratio: sft.min_lr_ratio,
                    max_grad_norm: sft.max_grad_norm,
                    weight_decay: sft.weight_decay,
                    batch_tokens: sft.batch_tokens,
                    split: &sft.split,
                },
                &at,
            )
            .map_err(invalid)?;
            check_data(&sft.data, &format!("stages[{i}].data"), true).map_err(invalid)?;
        }
        if let Some(ModelConfig::Tiny(t)) = &self.model {
            if t.hidden % t.heads != 0 || t.heads % t.kv_heads != 0 {
                return Err(invalid(format!(
                    "field `model`: hidden ({}) must be a multiple of heads ({}), and heads of kv_heads ({})",
                    t.hidden, t.heads, t.kv_heads
                )));
            }
            if !(t.init_std > 0.0 && t.init_std <= 1.0) {
                return Err(invalid(format!(
                    "field `model.init_std` ({}): expected a number in (0, 1]",
                    t.init_std
                )));
            }
        }
        if call.wall_time.0 > Duration::from_secs(3600) {
            return Err(invalid(format!(
                "field `sandbox.call.wall_time` ({}) is over 1h: split long work into several calls",
                call.wall_time
            )));
        }
        Ok(())
    }

    /// The checks every training stage's optimizer and splitting settings get.
    fn check_training(&self, t: &Training, at: &dyn Fn(&str) -> String) -> Result<(), String> {
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(format!("{}: expected a positive learning rate", at("lr")));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(format!("{}: expected 0..=1", at("min_lr_ratio")));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return Err(format!("{}: expected >= 0", at("max_grad_norm")));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(format!("{}: expected >= 0", at("weight_decay")));
        }
        if t.batch_tokens < t.split.context {
            return Err(format!(
                "{} ({}) is smaller than `split.context` ({}): a sub-trajectory would not fit a step",
                at("batch_tokens"),
                t.batch_tokens,
                t.split.context
            ));
        }
        if let Some(ModelConfig::Tiny(m)) = &self.model {
            if t.split.context > m.context {
                return Err(format!(
                    "{} ({}) is longer than the model's context ({})",
                    at("split.context"),
                    t.split.context,
                    m.context
                ));
            }
        }
        Ok(())
    }

    fn validate_rl(&self, rl: &RlStage, at: &dyn Fn(&str) -> String) -> Result<(), String> {
        if self.model.is_none() {
            return Err(format!(
                "stage {:?} trains a model, but the config has no `model`",
                rl.name
            ));
        }
        if rl.group_size < 2 {
            return Err(format!(
                "{}: expected at least 2 (advantages are normalised within a group)",
                at("group_size")
            ));
        }
        if !(rl.temperature.is_finite() && rl.temperature > 0.0) {
            return Err(format!(
                "{}: expected > 0 (a policy gradient needs sampled actions)",
                at("temperature")
            ));
        }
        if !(rl.clip_eps.is_finite() && rl.clip_eps > 0.0 && rl.clip_eps < 1.0) {
            return Err(format!("{}: expected 0 < eps < 1", at("clip_eps")));
        }
        if !(rl.kl_beta.is_finite() && rl.kl_beta >= 0.0) {
            return Err(format!("{}: expected >= 0", at("kl_beta")));
        }
        self.check_training(
            &Training {
                lr: rl.lr,
                min_lr_ratio: rl.min_lr_ratio,
                max_grad_norm: rl.max_grad_norm,
                weight_decay: rl.weight_decay,
                batch_tokens: rl.batch_tokens,
                split: &rl.split,
            },
            at,
        )?;
        if rl.budget.wall_time.is_some_and(|w| w.0.is_zero()) {
            return Err(format!(
                "{}: expected a positive duration",
                at("budget.wall_time")
            ));
        }
        rl.tasks.check(&at("tasks"))
    }

    /// Things that are valid but likely not what was meant (`klongd check` prints them).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut previous: Option<&RlStage> = None;
        for stage in &self.stages {
            if let StageConfig::Rl(rl) = stage {
                if let Some(p) = previous {
                    if !rl.budget.grows_from(&p.budget) {
                        out.push(format!(
                            "RL stage {:?} does not have a larger episode budget than {:?} before                              it ({:?} after {:?}): progressive RL grows the budget stage by stage",
                            rl.name, p.name, rl.budget, p.budget
                        ));
                    }
                }
                previous = Some(rl);
            }
        }
        out
    }

    /// Why a run started with `previous` cannot be resumed with this config, or `None` when it
    /// can. Settings that do not change what the run computes may differ: the actor runtime's
    /// sizes and timeouts, the sandbox's concurrency and cache, and how often stages
    /// checkpoint. Anything else (model, data, seed, stages, limits) would make the resumed
    /// run a different run.
    pub fn resume_conflicts(&self, previous: &Config) -> Vec<String> {
        let harmless = |c: &Config| {
            let mut c = c.clone();
            c.actors = ActorsConfig::default();
            c.sandbox.max_concurrent = 1;
            c.sandbox.max_queued = 0;
            c.sandbox.queue_timeout = HumanDuration::from_secs(1);
            c.sandbox.cache_dir = None;
            for stage in &mut c.stages {
                match stage {
                    StageConfig::Sft(s) => s.checkpoint_every = 1,
                    StageConfig::Rl(s) => s.checkpoint_every = 1,
                    StageConfig::Eval(_) => {}
                }
            }
            c
        };
        let (now, before) = (harmless(self), harmless(previous));
        let mut out = Vec::new();
        let mut field = |name: &str, same: bool| {
            if !same {
                out.push(name.to_string());
            }
        };
        field("name", now.name == before.name);
        field("run_dir", now.run_dir == before.run_dir);
        field("seed", now.seed == before.seed);
        field("sandbox", now.sandbox == before.sandbox);
        field("model", now.model == before.model);
        field("device", now.device == before.device);
        field("precision", now.precision() == before.precision());
        if now.stages.len() != before.stages.len() {
            field("stages", false);
        } else {
            for (i, (a, b)) in now.stages.iter().zip(&before.stages).enumerate() {
                field(&format!("stages[{i}] ({})", b.name()), a == b);
            }
        }
        out
    }

    /// The resolved plan, as RON with every default filled in.
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new().struct_names(false);
        ron::ser::to_string_pretty(self, pretty)
            .unwrap_or_else(|e| format!("<cannot print config: {e}>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.ron"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(r#"(name: "t", run_dir: "runs/t", seed: 7)"#).unwrap();
        assert_eq!(c.sandbox, SandboxConfig::default());
        assert_eq!(c.seed, 7);
    }

    #[test]
    fn units_are_parsed() {
        let c = parse(
            r#"(name: "t", run_dir: "r", seed: 1,
                sandbox: (call: (wall_time: "250ms", memory: "64MiB"), episode: (wall_time: "2h")))"#,
        )
        .unwrap();
        assert_eq!(c.sandbox.call.wall_time.0, Duration::from_millis(250));
        assert_eq!(c.sandbox.call.memory.0, 64 << 20);
        assert_eq!(c.sandbox.episode.wall_time.0, Duration::from_secs(7200));
        // The printed plan parses back to the same config.
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
    }

    #[test]
    fn the_device_and_precision_default_to_f32_on_the_cpu() {
        let c = parse(r#"(name: "t", run_dir: "r", seed: 1)"#).unwrap();
        assert_eq!(c.device, DeviceName::Cpu);
        assert_eq!(c.precision(), Precision::F32);
        let c = parse(r#"(name: "t", run_dir: "r", seed: 1, precision: Some(Bf16))"#).unwrap();
        assert_eq!(c.precision(), Precision::Bf16);
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        // Precision and device change what a run computes: a resume may not change them.
        let f32 = parse(r#"(name: "t", run_dir: "r", seed: 1)"#).unwrap();
        assert_eq!(c.resume_conflicts(&f32), vec!["precision".to_string()]);
        let explicit = parse(r#"(name: "t", run_dir: "r", seed: 1, precision: Some(F32))"#);
        assert!(explicit.unwrap().resume_conflicts(&f32).is_empty());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_cuda_feature_is_a_config_error() {
        let err = parse("(name: \"t\", run_dir: \"r\", seed: 1,\n device: \"cuda:1\")")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.ron:2:"), "{err}");
        assert!(err.contains("device"), "{err}");
        assert!(err.contains("`cuda` feature"), "{err}");
    }

    #[test]
    fn errors_name_file_line_column_and_field() {
        let err = parse(
            "(name: \"t\",\n run_dir: \"r\",\n seed: 1,\n sandbox: (call: (wall_time: \"30\")))",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.ron:4:"), "{err}");
        assert!(err.contains("sandbox.call.wall_time"), "{err}");
        assert!(err.contains("has no unit"), "{err}");

        let err = parse("(name: \"t\", run_dir: \"r\", seed: 1, sandbx: ())")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.ron:1:"), "{err}");
        assert!(err.contains("sandbx"), "{err}");

        let err = parse("(name: \"t\", run_dir: \"r\",\n  seed: -3)")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.ron:2:"), "{err}");
        assert!(err.contains("seed"), "{err}");

        let err = parse("(name: \"t\", run_dir: \"r\", seed: 1, sandbox: (max_concurrent: 0))")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sandbox.max_concurrent") && err.contains("positive"),
            "{err}"
        );

        let err = parse("(name: \"t\", run_dir: \"r\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.ron:1:"), "{err}");

        let err = parse("(name: \"bad name!\", run_dir: \"r\", seed: 1)")
            .unwrap_err()
            .to_string();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn cross_field_checks() {
        let err = parse(
            r#"(name: "t", run_dir: "r", seed: 1, sandbox: (call: (wall_time: "3h"), episode: (wall_time: "2h")))"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sandbox.call.wall_time"), "{err}");
    }

    #[test]
    fn tiny_init_std_defaults_to_hf_and_is_bounded() {
        let tiny = |extra: &str| {
            format!(
                r#"(name: "t", run_dir: "r", seed: 1,
                    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 512{extra}))))"#
            )
        };
        let std_of = |c: &Config| match &c.model {
            Some(ModelConfig::Tiny(t)) => t.init_std,
            other => panic!("{other:?}"),
        };
        let c = parse(&tiny("")).unwrap();
        assert_eq!(std_of(&c), DEFAULT_INIT_STD);
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        assert_eq!(std_of(&parse(&tiny(", init_std: 0.1")).unwrap()), 0.1);
        for bad in ["0.0", "-0.1", "2.0", "NaN"] {
            let e = parse(&tiny(&format!(", init_std: {bad}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("model.init_std"), "{bad}: {e}");
        }
    }

    #[test]
    fn recall_data_is_counted_and_bounded() {
        let cfg = |count: &str| {
            format!(
                r#"(name: "t", run_dir: "r", seed: 1,
                    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 512))),
                    stages: [Sft((name: "recall", data: Recall(seed: 3, count: {count}),
                        split: (context: 512, mode: Split), batch_tokens: 1024, epochs: 1, lr: 1e-3))])"#
            )
        };
        let c = parse(&cfg("1000")).unwrap();
        match &c.stages[0] {
            StageConfig::Sft(s) => assert_eq!(
                s.data,
                SftData::Recall {
                    seed: 3,
                    count: 1000,
                    filler: 0,
                }
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        let e = parse(&cfg("0")).unwrap_err().to_string();
        assert!(e.contains("positive"), "{e}");
        let e = parse(&cfg(&(MAX_RECALL_CONVERSATIONS + 1).to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stages[0].data.count"), "{e}");
        let filler = |bytes: u32| cfg(&format!("1000, filler: {bytes}"));
        match &parse(&filler(MAX_FILLER_BYTES)).unwrap().stages[0] {
            StageConfig::Sft(s) => assert!(matches!(
                s.data,
                SftData::Recall { filler, .. } if filler == MAX_FILLER_BYTES
            )),
            other => panic!("{other:?}"),
        }
        let e = parse(&filler(MAX_FILLER_BYTES + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stages[0].data.filler"), "{e}");
    }

    #[test]
    fn an_eval_context_is_positive_within_the_model_and_for_the_model_only() {
        let cfg = |policy: &str, context: &str| {
            format!(
                r#"(name: "t", run_dir: "r", seed: 1,
                    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 512))),
                    stages: [Eval((name: "e", policy: {policy},
                        tasks: Family((style: Compact, seed: 1, count: 2, min_horizon: 1, max_horizon: 2)),
                        max_turns: 10, max_turn_tokens: 64{context}))])"#
            )
        };
        let context_of = |c: &Config| match &c.stages[0] {
            StageConfig::Eval(e) => e.context,
            other => panic!("{other:?}"),
        };
        let c = parse(&cfg("Model", "")).unwrap();
        assert_eq!(context_of(&c), None);
        let c = parse(&cfg("Model", ", context: Some(256)")).unwrap();
        assert_eq!(context_of(&c), Some(256));
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        assert!(parse(&cfg("Model", ", context: Some(512)")).is_ok());
        for (policy, context, says) in [
            ("Model", "0", "expected > 0"),
            ("Model", "513", "exceeds the model's context (512)"),
            ("Expert(noise: 0.0)", "256", "scripted expert"),
        ] {
            let e = parse(&cfg(policy, &format!(", context: Some({context})")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("stages[0].context") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_mix_takes_a_bounded_flat_list_with_one_distill_at_most() {
        let cfg = |data: &str| {
            format!(
                r#"(name: "t", run_dir: "r", seed: 1,
                    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 512))),
                    stages: [Sft((name: "s", data: {data},
                        split: (context: 512, mode: Split), batch_tokens: 1024, epochs: 1, lr: 1e-3))])"#
            )
        };
        let distill = |noise: &str| {
            format!(
                "Distill(teacher: Expert(noise: {noise}), tasks: (seed: 1, count: 4, \
                 min_horizon: 1, max_horizon: 1), min_score: 0.5, max_turns: 8)"
            )
        };
        let recall = "Recall(seed: 2, count: 10)";
        let c = parse(&cfg(&format!("Mix([{recall}, {}])", distill("0.0")))).unwrap();
        match &c.stages[0] {
            StageConfig::Sft(s) => match &s.data {
                SftData::Mix(parts) => assert_eq!(parts.len(), 2),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        for (data, want) in [
            ("Mix([])".to_string(), "1 to 8 sources, not 0"),
            (
                format!("Mix([{}])", [recall; 9].join(", ")),
                "1 to 8 sources, not 9",
            ),
            (
                format!("Mix([Mix([{recall}])])"),
                "stages[0].data[0]`: a Mix inside a Mix",
            ),
            (
                format!("Mix([{}, {}])", distill("0.0"), distill("0.1")),
                "at most one Distill",
            ),
            (
                format!("Mix([{recall}, {}])", distill("2.0")),
                "stages[0].data[1].teacher.noise",
            ),
        ] {
            let e = parse(&cfg(&data)).unwrap_err().to_string();
            assert!(e.contains(want), "{data}: {e}");
        }
    }

    fn rl_config(group: u32, temperature: &str, second_turns: u32) -> String {
        let stage = |name: &str, turns: u32, group: u32, temperature: &str| {
            format!(
                r#"Rl((name: "{name}", tasks: Dir("tasks"), steps: 1, tasks_per_step: 1,
                    group_size: {group}, budget: (turns: {turns}, tokens: 100),
                    max_turn_tokens: 16, temperature: {temperature}, clip_eps: 0.2,
                    kl_beta: 0.0, lr: 1e-4, split: (context: 256, mode: Split),
                    batch_tokens: 512))"#
            )
        };
        format!(
            r#"(name: "t", run_dir: "r", seed: 1,
                model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 512))),
                stages: [{}, {}])"#,
            stage("a", 4, group, temperature),
            stage("b", second_turns, 2, "1.0")
        )
    }

    #[test]
    fn rl_stages_are_checked_and_flat_budgets_warned_about() {
        let c = parse(&rl_config(4, "1.0", 8)).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        let w = parse(&rl_config(4, "1.0", 4)).unwrap().warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("\"b\"") && w[0].contains("\"a\""), "{}", w[0]);
        let e = parse(&rl_config(1, "1.0", 8)).unwrap_err().to_string();
        assert!(e.contains("stages[0].group_size"), "{e}");
        let e = parse(&rl_config(4, "0.0", 8)).unwrap_err().to_string();
        assert!(e.contains("stages[0].temperature"), "{e}");
    }
}
