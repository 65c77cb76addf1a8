//! The built-in long-horizon task family, "reproduce a small paper".
//!
//! A task is generated deterministically from `(seed, horizon)`: the horizon is the number N
//! of experiments in the paper's sweep (1..=[`MAX_HORIZON`]). Each experiment takes several
//! tool calls — read `configs/expK.cfg`, run the `simulate` guest tool with the config's
//! parameters into `runs/expK.log`, append the result line to `results.txt` — and a final
//! `report.md` names the best experiment. `paper.md` states the procedure and the exact
//! formats; it is the pinned statement, and its size does not grow with N (the experiment list
//! lives in `configs/`), so that even a 1,000-experiment task keeps a small pinned prefix.
//!
//! The episode starts with `configs/exp1.cfg` ... `configs/expN.cfg` and a copy of `paper.md`.
//! All progress lives in files: an agent whose context was truncated recovers by reading
//! `results.txt`. Every rubric leaf has a check grader (`grep` over the final files), so the
//! family needs no LLM judge.
//!
//! The expected values in the rubric come from [`simulate_metric`], a port of the guest tool
//! (`sandboxes/tools/src/sim.c`) in integer arithmetic; the two must agree digit for digit
//! (the family's tests run both).
//!
//! Split: seeds below [`HELD_OUT_SEEDS_FROM`] are for training, the others are held out for
//! evaluation ([`held_out`]). Longer horizons for evaluation are just larger N; with the same
//! seed, the experiments of a shorter horizon are a prefix of those of a longer one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Component, Path, PathBuf};

use klong_sandbox::HumanDuration;

use crate::environment::task::{
    CheckSpec, GraderSpec, TaskBudget, TaskSpec, ToolDocs, FILES_DIR, PAPER_FILE, RUBRIC_FILE,
    SPEC_FILE,
};
use crate::judge::rubric::{RubricNode, TaskCategory};

/// The family's name (task folders are `repro-s{seed}-h{horizon}`).
pub const FAMILY: &str = "repro";
/// Most experiments in one task: about 4,000 tool calls for the expert, the far end of the
/// "hundreds of turns" the family is for; it also keeps the rubric and graders small.
pub const MAX_HORIZON: u32 = 1000;
/// Seeds at or above this are held out for evaluation.
pub const HELD_OUT_SEEDS_FROM: u64 = 1_000_000;
/// The results file the paper asks for.
pub const RESULTS_FILE: &str = "results.txt";
/// The report file the paper asks for.
pub const REPORT_FILE: &str = "report.md";
/// The tools an agent of this family may call (`simulate` runs through `bash`).
pub const TOOLS: [&str; 7] = [
    "bash",
    "read_file_chunk",
    "search_file",
    "write_file",
    "append_file",
    "replace_in_file",
    "submit",
];

/// The tools of a [`Style::Compact`] task: what the scripted expert uses, nothing more.
pub const COMPACT_TOOLS: [&str; 5] = [
    "bash",
    "read_file_chunk",
    "write_file",
    "append_file",
    "submit",
];

/// How a task is stated. The work, the files, the rubric and the graders are the same; only
/// the statement and the tool list differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Style {
    /// The full paper (about 2 KB) and seven tools: a pinned prefix of ~6k byte tokens.
    #[default]
    Full,
    /// A short statement (~0.9 KB) that also names the five tools the work needs and their
    /// arguments, and no tool schemas in the prompt: a pinned prefix of ~0.9k byte tokens,
    /// small enough for a tiny byte-level model trained from scratch.
    Compact,
}

/// Share of the score for the experiments vs the report: the report matters, but a sweep
/// that is mostly done must score mostly well, so the experiments dominate.
const EXPERIMENTS_WEIGHT: f64 = 4.0;
const REPORT_WEIGHT: f64 = 1.0;

/// The simulator's models: name, ceiling of the metric (1/10000), best learning rate
/// (millionths). Must match `MODELS` in `sim.c`.
const MODELS: [(&str, i64, i64); 4] = [
    ("mlp", 7200, 3000),
    ("cnn", 8100, 1000),
    ("rnn", 7600, 2000),
    ("transformer", 8700, 300),
];
/// The simulator's metrics and their offsets (1/10000). Must match `METRICS` in `sim.c`.
const METRICS: [(&str, i64); 4] = [
    ("accuracy", 0),
    ("f1", -250),
    ("auroc", 150),
    ("recall", -100),
];
/// Learning rates the configs use, as written (the simulator reads them as text).
const RATES: [&str; 11] = [
    "0.0001", "0.0003", "0.0005", "0.001", "0.002", "0.003", "0.005", "0.01", "0.02", "0.05", "0.1",
];
const STEPS: [u32; 8] = [50, 100, 200, 300, 500, 1000, 2000, 5000];
const BATCH_SIZES: [u32; 4] = [16, 32, 64, 128];
const DATASETS: [&str; 4] = ["blobs-2d", "moons", "spirals", "xor-grid"];
const TOPICS: [&str; 6] = [
    "Learning-rate sensitivity of small classifiers",
    "How many steps does a toy model need?",
    "Architecture choice on synthetic benchmarks",
    "A seed-controlled sweep of tiny networks",
    "Revisiting baselines on toy data",
    "Budgeted training of small models",
];

/// Training seeds are below [`HELD_OUT_SEEDS_FROM`]; evaluation (held-out) seeds are at or
/// above it.
pub fn held_out(seed: u64) -> bool {
    seed >= HELD_OUT_SEEDS_FROM
}

/// One experiment of a generated task, with its ground truth (for graders and tests: an agent
/// learns the parameters only by reading the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    /// `exp1` ... `expN`.
    pub name: String,
    pub model: &'static str,
    /// The learning rate as the config writes it.
    pub lr: &'static str,
    pub steps: u32,
    pub seed: u32,
    /// The simulator's metric, as it prints it (`0.XXXX`).
    pub value: String,
}

/// A generated task: what [`write_task`] puts in a task folder, plus the ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedTask {
    /// The folder name, `repro-s{seed}-h{horizon}`.
    pub name: String,
    pub seed: u64,
    pub horizon: u32,
    /// `paper.md`.
    pub paper: String,
    /// The episode's initial files: (path relative to `files/`, contents): the configs, then a
    /// copy of `paper.md`.
    pub files: Vec<(String, Vec<u8>)>,
    pub rubric: RubricNode,
    pub spec: TaskSpec,
    /// The metric the paper names (`accuracy`, `f1`, ...).
    pub metric: &'static str,
    pub experiments: Vec<Experiment>,
    /// The line `report.md` must contain.
    pub report_line: String,
}

/// SplitMix64: tiny, seedable, and identical everywhere, so that generation (and the expert's
/// noise) depends on the seed alone, not on a crate's version.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant at these sizes).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finalizer, as `splitmix64` in `sim.c` (which adds the increment first).
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn sim_splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// `"0.003"` -> 3000 millionths, exactly as `parse_rate` in `sim.c`: a plain decimal in
/// (0, 1] with at most 6 decimals.
fn parse_rate(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(frac) || whole.len() > 7 || frac.len() > 6 {
        return None;
    }
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    let w: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let f: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let v = w * 1_000_000 + f * 10i64.pow(6 - frac.len() as u32);
    (v > 0 && v <= 1_000_000).then_some(v)
}

/// The metric `simulate` prints for these parameters, in 1/10000 (`None` where the simulator
/// exits 2). A port of `tool_simulate` in `sandboxes/tools/src/sim.c`.
pub fn simulate_metric(model: &str, lr: &str, steps: u64, seed: u64, metric: &str) -> Option<u32> {
    let &(_, base, opt) = MODELS.iter().find(|m| m.0 == model)?;
    let &(_, offset) = METRICS.iter().find(|m| m.0 == metric)?;
    let lr = parse_rate(lr)?;
    if !(1..=1_000_000).contains(&steps) || seed > u64::from(u32::MAX) {
        return None;
    }
    let dist = (lr - opt).abs() * 1000 / (lr + opt);
    let s = steps as i64;
    let sat = s * 1000 / (s + 300);
    let h = sim_splitmix64(
        fnv1a(model)
            ^ sim_splitmix64(lr as u64)
            ^ sim_splitmix64(steps << 20)
            ^ sim_splitmix64(seed << 40)
            ^ fnv1a(metric),
    );
    let noise = (h % 601) as i64 - 300;
    let value = (base + offset - 2 * dist - (1000 - sat) + noise).clamp(0, 9999);
    Some(value as u32)
}

/// A metric in 1/10000 as the simulator prints it: `0.XXXX`.
pub fn format_metric(value: u32) -> String {
    format!("0.{:04}", value.min(9999))
}

/// Escapes a literal for a POSIX basic regular expression (the guest `grep`'s default).
fn bre_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '.' | '[' | ']' | '\\' | '*' | '^' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Generates the task for `(seed, horizon)` in the full style; `horizon` is clamped to
/// 1..=[`MAX_HORIZON`].
pub fn generate(seed: u64, horizon: u32) -> GeneratedTask {
    generate_styled(seed, horizon, Style::Full)
}

/// Generates the task for `(seed, horizon)` stated in `style` (a compact task's folder name
/// ends in `-c`).
pub fn generate_styled(seed: u64, horizon: u32, style: Style) -> GeneratedTask {
    let n = horizon.clamp(1, MAX_HORIZON);
    let name = match style {
        Style::Full => format!("{FAMILY}-s{seed}-h{n}"),
        Style::Compact => format!("{FAMILY}-s{seed}-h{n}-c"),
    };
    // Task-level choices and experiments draw from separate streams, so that the experiments
    // of a shorter horizon are a prefix of a longer one with the same seed.
    let mut task_rng = SplitMix64::new(seed ^ 0x6B6C_6F6E_6764_0001);
    let metric = METRICS[task_rng.below(METRICS.len())].0;
    let title = TOPICS[task_rng.below(TOPICS.len())];
    let mut exp_rng = SplitMix64::new(seed ^ 0x6B6C_6F6E_6764_0002);

    let mut experiments = Vec::with_capacity(n as usize);
    let mut files = Vec::with_capacity(n as usize + 1);
    for k in 1..=n {
        let model = MODELS[exp_rng.below(MODELS.len())].0;
        let lr = RATES[exp_rng.below(RATES.len())];
        let steps = STEPS[exp_rng.below(STEPS.len())];
        let exp_seed = (exp_rng.next_u64() % 100_000) as u32;
        let batch = BATCH_SIZES[exp_rng.below(BATCH_SIZES.len())];
        let dataset = DATASETS[exp_rng.below(DATASETS.len())];
        // The parameters always come from the tables above, so the simulator accepts them.
        let value = simulate_metric(model, lr, u64::from(steps), u64::from(exp_seed), metric)
            .map(format_metric)
            .unwrap_or_default();
        let exp = Experiment {
            name: format!("exp{k}"),
            model,
            lr,
            steps,
            seed: exp_seed,
            value,
        };
        // Key order varies per experiment, with keys the simulator does not take, so that an
        // agent has to read each config rather than pattern-match one.
        let mut lines = [
            format!("model = {model}"),
            format!("lr = {lr}"),
            format!("steps = {steps}"),
            format!("seed = {exp_seed}"),
            format!("batch_size = {batch}"),
            format!("dataset = {dataset}"),
        ];
        for i in (1..lines.len()).rev() {
            lines.swap(i, exp_rng.below(i + 1));
        }
        let cfg = format!(
            "# configs/{0}.cfg: experiment {0} of \"{title}\"\n# key = value\n{1}\n",
            exp.name,
            lines.join("\n")
        );
        files.push((format!("configs/{}.cfg", exp.name), cfg.into_bytes()));
        experiments.push(exp);
    }

    // The best experiment: the highest value, the lowest K on a tie (values are fixed-width,
    // so comparing the strings compares the numbers).
    let best = experiments
        .iter()
        .fold(None::<&Experiment>, |best, e| match best {
            Some(b) if b.value >= e.value => Some(b),
            _ => Some(e),
        });
    let report_line = best
        .map(|b| format!("best: {} {metric}={}", b.name, b.value))
        .unwrap_or_default();

    let paper = match style {
        Style::Full => paper_text(title, n, metric),
        Style::Compact => compact_paper_text(title, n, metric),
    };
    let tools: &[&str] = match style {
        Style::Full => &TOOLS,
        Style::Compact => &COMPACT_TOOLS,
    };
    // The statement is also a file of the episode, as in PaperBench, so that it can be
    // re-read (or paged) through tools like any other file.
    files.push((PAPER_FILE.to_string(), paper.clone().into_bytes()));
    let (rubric, graders) = rubric_and_graders(&name, title, metric, &experiments, &report_line);
    let turns = 6 * n + 20;
    let spec = TaskSpec {
        tools: tools.iter().map(|t| t.to_string()).collect(),
        tool_docs: match style {
            Style::Full => ToolDocs::Full,
            Style::Compact => ToolDocs::InStatement,
        },
        budget: TaskBudget {
            turns,
            // Generated tokens: a tool call is tens to hundreds of tokens; 1,000 a turn leaves
            // room for reasoning.
            tokens: u64::from(turns) * 1000,
            wall_time: Some(HumanDuration::from_secs(120 + 10 * u64::from(n))),
        },
        graders,
    };
    GeneratedTask {
        name,
        seed,
        horizon: n,
        paper,
        files,
        rubric,
        spec,
        metric,
        experiments,
        report_line,
    }
}

fn paper_text(title: &str, n: u32, metric: &str) -> String {
    let mut p = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        p,
        "# {title}

## Abstract

We sweep small classifiers on synthetic data over model, learning rate, training steps and
seed, and report the {metric} of each run. You are asked to reproduce the sweep with the
provided simulator, record every result, and write a short report. This document is the
complete specification: it names every file and format you need; it is also the file
`paper.md` of the working directory.

## Task summary

- Experiments: {n} (`exp1` to `exp{n}`); experiment `expK`'s configuration is `configs/expK.cfg`.
- Metric: `{metric}`.
- Results file: `{RESULTS_FILE}`.
- Report file: `{REPORT_FILE}`.

## Procedure

Do the following for every experiment `expK` (K = 1 to {n}); the experiments are independent.

1. Read `configs/expK.cfg`. Its lines are `key = value`; lines starting with `#` are comments.
   The keys `model`, `lr`, `steps` and `seed` are the simulator's parameters. The other keys
   (`batch_size`, `dataset`) only document the setup: do not pass them.
2. Run the simulator with those values, exactly as the config writes them, and the metric
   `{metric}`, saving its log:

   `simulate --model MODEL --lr LR --steps STEPS --seed SEED --metric {metric} > runs/expK.log`

   The log ends with the line `{metric}=VALUE` (VALUE has 4 decimals, e.g. `0.8123`).
3. Append one line to `{RESULTS_FILE}`:

   `expK {metric}=VALUE`

   with VALUE copied exactly from the log. One line per experiment, in any order; do not
   record an experiment twice.

## Report

When every experiment is recorded, write `{REPORT_FILE}` containing the line

`best: expK {metric}=VALUE`

for the experiment with the highest VALUE (on a tie, the lowest K). Then call `submit`.

## Keeping track

The files are the record of progress: `{RESULTS_FILE}` lists the experiments done. If you lose
track, read it (e.g. with `read_file_chunk`) and continue with the experiments not yet
recorded.

## Grading

For each experiment: `runs/expK.log` holds the simulator's output for its configuration (the
run), and `{RESULTS_FILE}` has its exact line (the record). The experiments together make up
80% of the score, evenly; the report line makes up 20%.
"
    );
    p
}

/// The compact statement: the same procedure and formats, no prose. It keeps the full paper's
/// `- Experiments:` and `- Metric:` lines, which the scripted expert reads.
fn compact_paper_text(title: &str, n: u32, metric: &str) -> String {
    format!(
        "# {title}

- Experiments: {n} (`exp1` to `exp{n}`).
- Metric: `{metric}`.

For each expK: read `configs/expK.cfg` (`key = value`; use only model, lr, steps, seed), run
`simulate --model MODEL --lr LR --steps STEPS --seed SEED --metric {metric} > runs/expK.log`,
then append `expK {metric}=VALUE` (VALUE from the log's last line) to `{RESULTS_FILE}`.
Then write `{REPORT_FILE}` with `best: expK {metric}=VALUE` for the highest VALUE (lowest K on
a tie) and call `submit`. `{RESULTS_FILE}` records progress.

Tools (one call per turn, as `<tool_call>{{\"name\": ..., \"arguments\": {{...}}}}</tool_call>`):
bash(command), read_file_chunk(file, start_line, max_lines), write_file(file, content),
append_file(file, content), submit(message).
"
    )
}

fn leaf(id: String, requirements: String, category: TaskCategory, fine: &str) -> RubricNode {
    RubricNode {
        id,
        requirements,
        weight: 1.0,
        sub_tasks: Vec::new(),
        task_category: Some(category),
        finegrained_task_category: Some(fine.to_string()),
    }
}

fn check(command: String) -> GraderSpec {
    GraderSpec::Check(CheckSpec {
        command,
        exit_code: Some(0),
        stdout: None,
        stdout_contains: None,
    })
}

fn rubric_and_graders(
    name: &str,
    title: &str,
    metric: &str,
    experiments: &[Experiment],
    report_line: &str,
) -> (RubricNode, BTreeMap<String, GraderSpec>) {
    let mut graders = BTreeMap::new();
    let mut exp_nodes = Vec::with_capacity(experiments.len());
    for e in experiments {
        let metric_line = format!("{metric}={}", e.value);
        let result_line = format!("{} {metric_line}", e.name);
        let run_id = format!("{}-run", e.name);
        let rec_id = format!("{}-recorded", e.name);
        // The run: the log's metric line. The value depends on every parameter through the
        // simulator's hash, so it also checks that the right parameters were passed.
        graders.insert(
            run_id.clone(),
            check(format!(
                "grep -q '^{}$' runs/{}.log",
                bre_escape(&metric_line),
                e.name
            )),
        );
        // The record: the exact line, and exactly one line for this experiment (the trailing
        // space keeps exp1 from matching exp10).
        graders.insert(
            rec_id.clone(),
            check(format!(
                "grep -q '^{}$' {RESULTS_FILE} && grep -c '^{} ' {RESULTS_FILE} | grep -q '^1$'",
                bre_escape(&result_line),
                e.name
            )),
        );
        exp_nodes.push(RubricNode {
            id: e.name.clone(),
            requirements: format!(
                "Experiment {} (model {}, lr {}, steps {}, seed {}) is run and its {metric} recorded.",
                e.name, e.model, e.lr, e.steps, e.seed
            ),
            weight: 1.0,
            sub_tasks: vec![
                leaf(
                    run_id,
                    format!(
                        "runs/{}.log holds the simulator's output for {}'s configuration, ending in `{metric_line}`.",
                        e.name, e.name
                    ),
                    TaskCategory::CodeExecution,
                    "Experimental Setup",
                ),
                leaf(
                    rec_id,
                    format!(
                        "{RESULTS_FILE} has exactly one line for {}, and it is `{result_line}`.",
                        e.name
                    ),
                    TaskCategory::ResultAnalysis,
                    "Evaluation, Metrics & Benchmarking",
                ),
            ],
            task_category: None,
            finegrained_task_category: None,
        });
    }
    let report_id = "report".to_string();
    graders.insert(
        report_id.clone(),
        check(format!(
            "grep -q '^{}$' {REPORT_FILE}",
            bre_escape(report_line)
        )),
    );
    let mut report = leaf(
        report_id,
        format!("{REPORT_FILE} names the best experiment with the line `{report_line}`."),
        TaskCategory::ResultAnalysis,
        "Logging, Analysis & Presentation",
    );
    report.weight = REPORT_WEIGHT;
    let rubric = RubricNode {
        id: name.to_string(),
        requirements: format!("Reproduce \"{title}\": run the sweep, record it, report the best."),
        weight: 1.0,
        sub_tasks: vec![
            RubricNode {
                id: "experiments".into(),
                requirements: format!(
                    "Every one of the {} experiments is run and recorded.",
                    experiments.len()
                ),
                weight: EXPERIMENTS_WEIGHT,
                sub_tasks: exp_nodes,
                task_category: None,
                finegrained_task_category: None,
            },
            report,
        ],
        task_category: None,
        finegrained_task_category: None,
    };
    (rubric, graders)
}

impl GeneratedTask {
    /// Writes the episode's initial files into `dir` (an episode directory, or `files/`).
    pub fn write_files_into(&self, dir: &Path) -> io::Result<()> {
        for (rel, bytes) in &self.files {
            let rel = Path::new(rel);
            // Generated paths are plain relative ones; refuse anything else rather than write
            // outside `dir`.
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain relative path", rel.display()),
                ));
            }
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
        }
        Ok(())
    }
}

/// Writes `task` as a task folder `parent/<task.name>` (paper.md, files/, rubric.json,
/// task.ron) and returns its path. An existing folder of that name is replaced: the folder is
/// built beside it first and renamed into place, so a reader never sees half a task.
pub fn write_task(parent: &Path, task: &GeneratedTask) -> io::Result<PathBuf> {
    std::fs::create_dir_all(parent)?;
    let dest = parent.join(&task.name);
    let tmp = parent.join(format!(".{}.tmp-{}", task.name, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    let result = (|| {
        std::fs::write(tmp.join(PAPER_FILE), &task.paper)?;
        let files = tmp.join(FILES_DIR);
        std::fs::create_dir(&files)?;
        task.write_files_into(&files)?;
        let rubric = serde_json::to_string_pretty(&task.rubric).map_err(io::Error::other)?;
        std::fs::write(tmp.join(RUBRIC_FILE), rubric + "\n")?;
        let spec = task.spec.to_ron().map_err(io::Error::other)?;
        std::fs::write(tmp.join(SPEC_FILE), spec + "\n")?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::rename(&tmp, &dest)
    })();
    if result.is_err() {
        // Best effort: the error being returned says more than a failed cleanup would.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| dest)
}
