//! The scripted expert of the built-in task family ([`super::family`]).
//!
//! It solves a task through the same interface as an agent: one [`ToolCall`] at a time, chosen
//! from its own state and the text of the last [`Observation`]. It has no privileged access:
//! it learns the number of experiments and the metric by reading `paper.md`, each
//! experiment's parameters by reading its config, each value from the simulator's log, and
//! the best experiment by reading `results.txt` back. It starts by reading `results.txt`, so
//! it resumes a half-done episode instead of redoing (and double-recording) experiments.
//!
//! Imperfection: for each experiment, with probability `noise`, it errs — half of the time it
//! skips the experiment (no run, no record), half of the time it records a wrong value (the
//! run is right, the recorded value is off by 0.0001–0.0050, always below the true value).
//! The report is computed from `results.txt` as written, so an error on the best experiment
//! also costs the report. With a 50/50 split, the expected score is
//! `0.8 * (1 - 0.75 p) + 0.2 * (1 - p) = 1 - 0.8 p` (see the family's weights).
//! The draws come from a seeded SplitMix64, three per experiment whatever `noise` is, so the
//! same seed gives the same behaviour, and an experiment that errs at some `noise` errs at
//! every larger one.

use std::collections::BTreeSet;

use klong_sandbox::Sandbox;
use serde_json::json;

use super::family::{SplitMix64, REPORT_FILE, RESULTS_FILE};
use super::observation::{observe, Observation, ObservationError, ToolCall, SUBMIT_TOOL};

/// Largest observation the expert reads: the paper (a few KiB) and a page of results fit.
pub const MAX_OBSERVATION_BYTES: usize = 16 * 1024;
/// Lines of `results.txt` read per call (~30 bytes each with the line numbers).
const RESULTS_PAGE: u64 = 200;

/// What the expert does with one experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Correct,
    Skip,
    /// Record the value this many 1/10000 off.
    Wrong {
        delta: u32,
    },
}

/// What the expert learned from `paper.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    experiments: u32,
    metric: String,
}

/// The call whose observation comes next: what the expert expects to read in it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Start,
    Paper,
    /// A page of `results.txt` before the experiments (resuming) or after them (the report).
    Results {
        final_read: bool,
    },
    Config {
        k: u32,
        fate: Fate,
    },
    Run {
        k: u32,
        fate: Fate,
    },
    Log {
        k: u32,
        fate: Fate,
    },
    Record,
    Report,
    Submit,
    Done,
}

/// A scripted solver of the family's tasks; see the module docs.
#[derive(Debug, Clone)]
pub struct ScriptedExpert {
    noise: f64,
    rng: SplitMix64,
    pending: Pending,
    plan: Option<Plan>,
    /// Experiments `results.txt` already has (read at the start).
    recorded: BTreeSet<u32>,
    /// The last experiment started (0: none yet).
    current: u32,
    /// `(K, value)` read back from `results.txt` for the report.
    results: Vec<(u32, String)>,
}

/// One episode of the expert.
#[derive(Debug, Clone)]
pub struct ExpertEpisode {
    /// Every call and what it returned, in order.
    pub transcript: Vec<(ToolCall, Observation)>,
    /// The expert called `submit` and it succeeded.
    pub submitted: bool,
}

fn bash(command: String) -> ToolCall {
    ToolCall {
        name: "bash".into(),
        arguments: json!({ "command": command }),
    }
}

fn read_chunk(file: &str, start: u64, max_lines: u64) -> ToolCall {
    ToolCall {
        name: "read_file_chunk".into(),
        arguments: json!({ "file": file, "start_line": start, "max_lines": max_lines }),
    }
}

impl ScriptedExpert {
    /// `noise`: the probability of erring on each experiment (clamped to [0, 1]); `seed`
    /// drives the errors.
    pub fn new(noise: f64, seed: u64) -> Self {
        let noise = if noise.is_nan() {
            0.0
        } else {
            noise.clamp(0.0, 1.0)
        };
        ScriptedExpert {
            noise,
            rng: SplitMix64::new(seed ^ 0x6578_7065_7274_0001),
            pending: Pending::Start,
            plan: None,
            recorded: BTreeSet::new(),
            current: 0,
            results: Vec::new(),
        }
    }

    /// The next call, given the observation of the previous one (`None` at the start);
    /// `None` when the expert is done.
    pub fn next_call(&mut self, last: Option<&Observation>) -> Option<ToolCall> {
        let text = last.map(|o| o.text.as_str()).unwrap_or_default();
        let pending = std::mem::replace(&mut self.pending, Pending::Done);
        match pending {
            Pending::Start => {
                self.pending = Pending::Paper;
                // The task summary's bullet lines (experiments, metric) are all it needs; the
                // statement itself is already in the pinned prefix, and re-reading it whole
                // would fill a small model's context with one observation.
                Some(bash("grep '^- ' paper.md".into()))
            }
            Pending::Paper => match parse_paper(text) {
                Some(plan) => {
                    self.plan = Some(plan);
                    self.read_results(1, false)
                }
                // Not a task of this family (or the paper is unreadable): nothing sensible
                // to do but say so.
                None => self.submit("could not find the experiment list in paper.md"),
            },
            Pending::Results { final_read } => {
                let page = parse_chunk(text);
                let metric = self.plan.as_ref().map(|p| p.metric.clone());
                for line in &page.lines {
                    if let Some((k, value)) = metric.as_deref().and_then(|m| parse_result(line, m))
                    {
                        if final_read {
                            // The first line for an experiment counts, as in the paper's
                            // "do not record twice"; later ones are ignored.
                            if !self.results.iter().any(|(j, _)| *j == k) {
                                self.results.push((k, value));
                            }
                        } else {
                            self.recorded.insert(k);
                        }
                    }
                }
                match page.more_after {
                    Some(next) => self.read_results(next, final_read),
                    None if final_read => self.write_report(),
                    None => self.next_experiment(),
                }
            }
            Pending::Config { k, fate } => match parse_config(text) {
                Some(cfg) => {
                    let metric = self.metric();
                    self.pending = Pending::Run { k, fate };
                    Some(bash(format!(
                        "simulate --model {} --lr {} --steps {} --seed {} --metric {metric} > runs/exp{k}.log",
                        cfg.model, cfg.lr, cfg.steps, cfg.seed
                    )))
                }
                // A config the expert cannot read: it moves on, as a careless agent would.
                None => self.next_experiment(),
            },
            Pending::Run { k, fate } => {
                if text.contains("[exit code") || text.contains("[stopped") {
                    return self.next_experiment();
                }
                self.pending = Pending::Log { k, fate };
                Some(bash(format!("cat runs/exp{k}.log")))
            }
            Pending::Log { k, fate } => {
                let metric = self.metric();
                let prefix = format!("{metric}=");
                let Some(value) = text
                    .lines()
                    .rev()
                    .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
                    .map(str::to_string)
                else {
                    return self.next_experiment();
                };
                let value = match fate {
                    Fate::Wrong { delta } => perturb(&value, delta),
                    _ => value,
                };
                self.pending = Pending::Record;
                Some(ToolCall {
                    name: "append_file".into(),
                    arguments: json!({
                        "file": RESULTS_FILE,
                        "content": format!("exp{k} {metric}={value}\n"),
                    }),
                })
            }
            Pending::Record => self.next_experiment(),
            Pending::Report => self.submit("all experiments run and recorded; report written"),
            Pending::Submit | Pending::Done => None,
        }
    }

    fn metric(&self) -> String {
        self.plan
            .as_ref()
            .map(|p| p.metric.clone())
            .unwrap_or_default()
    }

    fn read_results(&mut self, start: u64, final_read: bool) -> Option<ToolCall> {
        self.pending = Pending::Results { final_read };
        Some(read_chunk(RESULTS_FILE, start, RESULTS_PAGE))
    }

    fn submit(&mut self, message: &str) -> Option<ToolCall> {
        self.pending = Pending::Submit;
        Some(ToolCall {
            name: SUBMIT_TOOL.into(),
            arguments: json!({ "message": message }),
        })
    }

    /// Starts the next experiment not yet recorded, or reads the results back when all are
    /// done.
    fn next_experiment(&mut self) -> Option<ToolCall> {
        let n = self.plan.as_ref().map_or(0, |p| p.experiments);
        while self.current < n {
            self.current += 1;
            let k = self.current;
            if self.recorded.contains(&k) {
                continue;
            }
            // Three draws per experiment whatever the noise (see the module docs).
            let errs = self.rng.unit() < self.noise;
            let skip = self.rng.unit() < 0.5;
            let delta = 1 + (self.rng.next_u64() % 50) as u32;
            let fate = match (errs, skip) {
                (false, _) => Fate::Correct,
                (true, true) => Fate::Skip,
                (true, false) => Fate::Wrong { delta },
            };
            if fate == Fate::Skip {
                continue;
            }
            self.pending = Pending::Config { k, fate };
            return Some(bash(format!("cat configs/exp{k}.cfg")));
        }
        self.results.clear();
        self.read_results(1, true)
    }

    fn write_report(&mut self) -> Option<ToolCall> {
        let metric = self.metric();
        // Highest value, lowest K on a tie; values are fixed-width decimals, so comparing
        // the strings compares the numbers.
        let mut best: Option<&(u32, String)> = None;
        for r in &self.results {
            best = match best {
                Some(b)
                    if (b.1.as_str(), std::cmp::Reverse(b.0))
                        >= (r.1.as_str(), std::cmp::Reverse(r.0)) =>
                {
                    Some(b)
                }
                _ => Some(r),
            };
        }
        let best_line = match best {
            Some((k, v)) => format!("best: exp{k} {metric}={v}"),
            None => "best: none".to_string(),
        };
        let content = format!(
            "# Report\n\nExperiments recorded: {}.\n\n{best_line}\n",
            self.results.len()
        );
        self.pending = Pending::Report;
        Some(ToolCall {
            name: "write_file".into(),
            arguments: json!({ "file": REPORT_FILE, "content": content }),
        })
    }
}

/// A wrong value: `delta` (0.0001 to 0.0050) below the true one (above it only near zero).
fn perturb(value: &str, delta: u32) -> String {
    let bp = value
        .strip_prefix("0.")
        .filter(|d| d.len() == 4)
        .and_then(|d| d.parse::<u32>().ok());
    match bp {
        Some(bp) if bp >= delta => format!("0.{:04}", bp - delta),
        Some(bp) => format!("0.{:04}", bp + delta),
        None => "0.0000".into(),
    }
}

/// Finds "- Experiments: N" and "- Metric: `NAME`" in the paper.
fn parse_paper(text: &str) -> Option<Plan> {
    let mut experiments = None;
    let mut metric = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("- Experiments:") {
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            experiments = digits.parse::<u32>().ok();
        } else if let Some(rest) = line.strip_prefix("- Metric:") {
            metric = rest
                .trim()
                .trim_end_matches('.')
                .trim_matches('`')
                .split_whitespace()
                .next()
                .map(str::to_string);
        }
    }
    Some(Plan {
        experiments: experiments?,
        metric: metric.filter(|m| !m.is_empty())?,
    })
}

/// A page of `read_file_chunk` output.
struct Chunk {
    lines: Vec<String>,
    /// The first line of the next page, when the file has more.
    more_after: Option<u64>,
}

/// Parses `read_file_chunk` output: numbered lines (`%6d\t...`) and a footer
/// `[lines A-B of T]`. Anything else (a missing file, an empty file) is an empty last page.
fn parse_chunk(text: &str) -> Chunk {
    let mut lines = Vec::new();
    let mut more_after = None;
    for line in text.lines() {
        if let Some((num, body)) = line.split_once('\t') {
            if num.trim().parse::<u64>().is_ok() {
                lines.push(body.to_string());
                continue;
            }
        }
        if let Some(footer) = line
            .strip_prefix("[lines ")
            .and_then(|l| l.strip_suffix(']'))
        {
            // "A-B of T"
            let parsed = footer.split_once(" of ").and_then(|(range, total)| {
                let (_, end) = range.split_once('-')?;
                Some((end.parse::<u64>().ok()?, total.parse::<u64>().ok()?))
            });
            if let Some((end, total)) = parsed {
                if end < total {
                    more_after = Some(end + 1);
                }
            }
        }
    }
    Chunk { lines, more_after }
}

/// `expK METRIC=VALUE` -> (K, VALUE).
fn parse_result(line: &str, metric: &str) -> Option<(u32, String)> {
    let (name, rest) = line.trim().split_once(' ')?;
    let k = name.strip_prefix("exp")?.parse::<u32>().ok()?;
    let value = rest.trim().strip_prefix(metric)?.strip_prefix('=')?;
    Some((k, value.to_string()))
}

/// The simulator's parameters of one config.
struct Config {
    model: String,
    lr: String,
    steps: String,
    seed: String,
}

/// Reads `key = value` lines, skipping comments; the four simulator keys must be present and
/// plain (no spaces or shell metacharacters, since they go on a command line).
fn parse_config(text: &str) -> Option<Config> {
    let get = |key: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| {
                !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
            })
    };
    Some(Config {
        model: get("model")?,
        lr: get("lr")?,
        steps: get("steps")?,
        seed: get("seed")?,
    })
}

/// Runs `expert` in `sandbox` until it submits, stops, the episode's budget ends it, or
/// `max_turns` calls were made. The sandbox's directory must already hold the task's files.
pub fn run_episode(
    sandbox: &mut Sandbox,
    expert: &mut ScriptedExpert,
    max_turns: u32,
) -> Result<ExpertEpisode, ObservationError> {
    let mut transcript: Vec<(ToolCall, Observation)> = Vec::new();
    let mut submitted = false;
    for _ in 0..max_turns {
        let Some(call) = expert.next_call(transcript.last().map(|(_, o)| o)) else {
            break;
        };
        let obs = observe(sandbox, &call, MAX_OBSERVATION_BYTES)?;
        let ends = obs.ends_episode;
        let is_submit = call.name == SUBMIT_TOOL;
        transcript.push((call, obs));
        if ends {
            submitted = is_submit;
            break;
        }
    }
    Ok(ExpertEpisode {
        transcript,
        submitted,
    })
}
