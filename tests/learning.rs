//! Does SFT teach a model to act? Three runs, each ignored by default (minutes of CPU):
//!
//! - `examples/sft_smollm2.ron` fine-tunes a pretrained model (SmolLM2-135M-Instruct, from
//!   `tests/fetch-models.sh`) on 16 trajectories of the scripted expert. Asserted: after SFT
//!   it scores clearly higher on the held-out tasks than before (at least 0.75, and at least
//!   0.5 above the untrained model; measured: 0.000 with no tool call -> 1.000 on 8 of 8).
//!   About 7 minutes on 2 cores in a release build (7 min 10 s in session 24; an earlier
//!   session measured 22).
//! - `examples/sft_compact.ron` trains the tiny byte-level model from scratch. Asserted is what
//!   SFT reaches there today: the untrained model writes no well-formed tool call; the trained
//!   one writes them (at least 40% of its turns; measured 72%, and 54% / 61% with seeds 8 /
//!   9), its opening moves on every held-out task are the expert's, call for call, and on at
//!   least half of them its fourth call is a simulator command of the expert's shape (measured
//!   8, 7 and 5 of 8). It does not earn rubric points: it writes wrong parameter values instead
//!   of copying the config's (no copy circuit forms at this scale and budget). 8 minutes measured beside another run.
//! - `examples/sft_recall.ron` trains the same tiny model from scratch, with an in-context
//!   recall warm-up first (short, then with filler text before the records) and recall mixed
//!   into the task's SFT. Asserted is issue 5's "clearly higher than untrained": the untrained
//!   model scores 0 and the trained one at least 0.5, with at least 16 of 32 held-out tasks
//!   above 0. About 40-55 minutes.
//!
//! Run them after any change to the model, the learner, splitting, the episode loop or the
//! family:
//!
//!   tests/fetch-models.sh && cargo test --release --test learning -- --ignored
//!
//! (add `--skip sft_after_a_recall` to leave out the 40-55-minute recall run).
//!
//! `KLONGD_LEARNING_RUN=runs/sft-compact cargo test --test learning -- --ignored check_an`
//! checks a run directory made by `klongd run examples/sft_compact.ron` instead, and
//! `KLONGD_LEARNING_RUN=runs/sft-smollm2 cargo test --test learning -- --ignored check_a_pre`
//! one made by `klongd run examples/sft_smollm2.ron`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn report(run_dir: &Path, stage: &str) -> Value {
    let path = run_dir.join("eval").join(format!("{stage}.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Per task, the tool calls of its actions as JSON (`None` for an action with no
/// well-formed call).
fn calls(run_dir: &Path, stage: &str) -> Vec<(String, Vec<Option<Value>>)> {
    let path = run_dir
        .join("eval")
        .join(format!("{stage}.transcripts.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let actions = v["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    let a = a.as_str().unwrap();
                    let body = a.split_once("<tool_call>")?.1.split_once("</tool_call>")?.0;
                    serde_json::from_str::<Value>(body.trim()).ok()
                })
                .collect();
            (v["task"].as_str().unwrap().to_string(), actions)
        })
        .collect()
}

/// One Eval stage's overall numbers.
struct Summary {
    mean: f64,
    tool_call_rate: f64,
}

/// The untrained, trained and expert Eval stages' summaries, printed; each stage must have
/// run `episodes` episodes without an infrastructure failure.
fn summaries(run_dir: &Path, episodes: u64) -> [Summary; 3] {
    let summary = |stage: &str| {
        let r = report(run_dir, stage);
        assert_eq!(r["infra_failures"], 0, "{stage}: {r}");
        assert_eq!(r["overall"]["episodes"], episodes, "{stage}: {r}");
        Summary {
            mean: r["overall"]["mean"].as_f64().unwrap(),
            tool_call_rate: r["overall"]["tool_call_rate"].as_f64().unwrap(),
        }
    };
    let [before, after, expert] = ["untrained", "trained", "expert"].map(summary);
    eprintln!(
        "score: untrained {:.3}, trained {:.3}, expert {:.3}; well-formed calls: untrained {:.0}%, trained {:.0}%",
        before.mean,
        after.mean,
        expert.mean,
        100.0 * before.tool_call_rate,
        100.0 * after.tool_call_rate,
    );
    [before, after, expert]
}

fn check(run_dir: &Path) {
    let [before, after, expert] = summaries(run_dir, 8);
    assert_eq!(expert.mean, 1.0);
    assert_eq!(before.tool_call_rate, 0.0);
    assert!(after.tool_call_rate >= 0.4, "{}", after.tool_call_rate);
    assert!(after.mean >= before.mean);

    // The opening moves: read the task summary, the results so far, the first config.
    let expert_calls = calls(run_dir, "expert");
    let trained_calls = calls(run_dir, "trained");
    assert_eq!(expert_calls.len(), trained_calls.len());
    for ((task, e), (task2, t)) in expert_calls.iter().zip(&trained_calls) {
        assert_eq!(task, task2);
        for k in 0..3 {
            assert!(e[k].is_some(), "{task}: expert action {k}");
            assert_eq!(t.get(k), e.get(k), "{task}: action {k}");
        }
    }

    // The fourth call: the simulator, its flags in the expert's order, the log where it goes.
    let shaped = trained_calls
        .iter()
        .filter(|(_, t)| {
            let Some(Some(call)) = t.get(3) else {
                return false;
            };
            let Some(command) = call["arguments"]["command"].as_str() else {
                return false;
            };
            let words: Vec<&str> = command.split(' ').collect();
            call["name"] == "bash"
                && words.len() == 13
                && words[0] == "simulate"
                && ["--model", "--lr", "--steps", "--seed", "--metric"]
                    .iter()
                    .enumerate()
                    .all(|(i, flag)| words[1 + 2 * i] == *flag)
                && words[11..] == [">", "runs/exp1.log"][..]
        })
        .count();
    assert!(
        2 * shaped >= trained_calls.len(),
        "{shaped} of {} held-out tasks call the simulator in the expert's shape",
        trained_calls.len()
    );
}

/// Scores of the pretrained model fine-tuned by `examples/sft_smollm2.ron`.
fn check_pretrained(run_dir: &Path) {
    let [before, after, expert] = summaries(run_dir, 8);
    assert_eq!(expert.mean, 1.0);
    assert!(after.mean >= 0.75, "trained score {}", after.mean);
    assert!(
        after.mean >= before.mean + 0.5,
        "trained {} vs untrained {}",
        after.mean,
        before.mean
    );
}

/// What `examples/sft_recall.ron`'s trained model must reach on its 32 held-out tasks for
/// issue 5 ("clearly higher than untrained", which scores 0): the mean score, and the tasks
/// that score above 0. Well under what it measured (see the example's header), since a
/// model this small is chaotic in the last bits of its numerics.
const MIN_RECALL_SCORE: f64 = 0.5;
const MIN_RECALL_TASKS: usize = 16;

/// Scores of the tiny model trained from scratch by `examples/sft_recall.ron` (recall warm-up,
/// then the task's SFT mixed with recall) on its 32 held-out tasks.
fn check_recall(run_dir: &Path) {
    let [before, after, expert] = summaries(run_dir, 32);
    assert_eq!(expert.mean, 1.0);
    assert_eq!(before.mean, 0.0);
    assert_eq!(before.tool_call_rate, 0.0);
    let solved = report(run_dir, "trained")["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["score"].as_f64().unwrap() > 0.0)
        .count();
    eprintln!("trained: {solved} of 32 held-out tasks score above 0");
    assert!(
        after.mean >= MIN_RECALL_SCORE && solved >= MIN_RECALL_TASKS,
        "trained {} on {solved} tasks; expected at least {MIN_RECALL_SCORE} on {MIN_RECALL_TASKS}",
        after.mean
    );
}

/// Runs `example` (a path under `examples/`) into a temporary run directory, with the paths
/// it names made absolute; returns the directory (kept alive by the returned guard).
fn run_example(example: &str, run_dir_name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let config = std::fs::read_to_string(repo().join(example))
        .unwrap()
        .replace(run_dir_name, run_dir.to_str().unwrap())
        .replace(
            "sandboxes/tools/manifests",
            repo().join("sandboxes/tools/manifests").to_str().unwrap(),
        )
        .replace(
            "\"target/models/",
            &format!("\"{}/", repo().join("target/models").display()),
        );
    let cfg = tmp.path().join("run.ron");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_klongd"))
        .args(["run", cfg.to_str().unwrap()])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (tmp, run_dir)
}

#[test]
#[ignore = "about 10 minutes (release); run after changes to training or acting"]
fn sft_teaches_the_tiny_model_tool_calls_and_the_experts_opening_moves() {
    let (_tmp, run_dir) = run_example("examples/sft_compact.ron", "runs/sft-compact");
    check(&run_dir);
}

#[test]
#[ignore = "about 40-55 minutes (release); run after changes to training, acting or recall data"]
fn sft_after_a_recall_warm_up_makes_the_tiny_model_score() {
    let (_tmp, run_dir) = run_example("examples/sft_recall.ron", "runs/sft-recall");
    check_recall(&run_dir);
}

#[test]
#[ignore = "checks the run directory of examples/sft_recall.ron named by KLONGD_LEARNING_RUN"]
fn check_a_recall_run() {
    check_recall(&learning_run("examples/sft_recall.ron"));
}

#[test]
#[ignore = "about 8 minutes (release) and tests/fetch-models.sh; run after changes to training or acting"]
fn sft_makes_a_pretrained_model_solve_held_out_tasks() {
    let gguf = repo().join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: run tests/fetch-models.sh",
        gguf.display()
    );
    let (_tmp, run_dir) = run_example("examples/sft_smollm2.ron", "runs/sft-smollm2");
    check_pretrained(&run_dir);
}

#[test]
#[ignore = "checks the run directory of examples/sft_smollm2.ron named by KLONGD_LEARNING_RUN"]
fn check_a_pretrained_run() {
    check_pretrained(&learning_run("examples/sft_smollm2.ron"));
}

#[test]
#[ignore = "checks the run directory of examples/sft_compact.ron named by KLONGD_LEARNING_RUN"]
fn check_an_existing_run() {
    check(&learning_run("examples/sft_compact.ron"));
}

/// The run directory `KLONGD_LEARNING_RUN` names (a run of `example`).
fn learning_run(example: &str) -> PathBuf {
    match std::env::var_os("KLONGD_LEARNING_RUN") {
        Some(dir) => dir.into(),
        None => panic!("set KLONGD_LEARNING_RUN to a run directory of {example}"),
    }
}
