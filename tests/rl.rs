//! Progressive RL end to end, through the `klongd` binary: a deliberately weak policy (a tiny
//! model fine-tuned on demonstrations that answer right half of the time) on a one-step task,
//! two Rl stages with growing budgets, Eval stages before and after on held-out sampling
//! seeds. Asserted: RL raises the held-out score; the short stage's episodes stop at its turn
//! budget and are judged on the state they reached; every action records the weights'
//! version that sampled it; `klongd check` warns about budgets that do not grow.

use std::path::{Path, PathBuf};

use klong_actors::environment::episode::SYSTEM_PROMPT;
use klong_actors::trajectory::Turn;
use klongd::rl_stage::StoredRollout;
use klongd::store::RunStore;
use serde_json::{json, Value};

mod common;
use common::{klongd, tools_dir};

const PAPER: &str = "Write yes or no to answer.txt with write_file, then call submit.\n\
Tools: write_file(file, content), submit(message). One call per turn, as \
<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n";

/// A task folder whose rubric has one leaf: `answer.txt` says `yes`.
fn write_task(dir: &Path) {
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::write(dir.join("paper.md"), PAPER).unwrap();
    let rubric = json!({
        "id": "answer-yes",
        "requirements": "Answer yes.",
        "weight": 1,
        "sub_tasks": [{
            "id": "answer",
            "requirements": "answer.txt holds the line `yes`.",
            "weight": 1,
            "sub_tasks": [],
            "task_category": "Result Analysis",
            "finegrained_task_category": "Evaluation, Metrics & Benchmarking"
        }]
    });
    std::fs::write(
        dir.join("rubric.json"),
        serde_json::to_string_pretty(&rubric).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("task.ron"),
        r#"(
    tools: ["write_file", "submit"],
    tool_docs: InStatement,
    budget: (turns: 6, tokens: 2000),
    graders: {
        "answer": Check((command: "grep -q '^yes$' answer.txt", exit_code: Some(0))),
    },
)"#,
    )
    .unwrap();
}

/// Demonstrations: half answer `yes`, half `no`; all then submit.
fn write_demonstrations(path: &Path) {
    let mut lines = String::new();
    for i in 0..16 {
        let answer = if i % 2 == 0 { "yes" } else { "no" };
        let call = |name: &str, args: Value| {
            json!({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": args}}
            ]})
        };
        let line = json!({
            "id": format!("demo-{i}"),
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": PAPER},
                call("write_file", json!({"file": "answer.txt", "content": answer})),
                // What the sandbox's write_file answers, so the demonstrations' second turn
                // follows the observation the policy will see.
                {"role": "tool", "name": "write_file",
                 "content": format!("wrote {} bytes to answer.txt\n", answer.len())},
                call("submit", json!({"message": "done"})),
                {"role": "tool", "name": "submit", "content": "submitted"},
            ]
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

fn config(dir: &Path, short_turns: u32, short_tokens: u32) -> String {
    let eval = |name: &str| {
        format!(
            r#"Eval((
            name: "{name}",
            policy: Model,
            tasks: Dir("{}"),
            seeds: 16,
            temperature: 0.5,
            max_turns: 3,
            max_turn_tokens: 96,
        ))"#,
            dir.join("held-out").display()
        )
    };
    let rl = |name: &str, turns: u32, tokens: u32| {
        format!(
            r#"Rl((
            name: "{name}",
            tasks: Dir("{}"),
            steps: 3,
            tasks_per_step: 2,
            group_size: 6,
            budget: (turns: {turns}, tokens: {tokens}),
            max_turn_tokens: 96,
            temperature: 0.5,
            clip_eps: 0.2,
            kl_beta: 0.01,
            // A fresh AdamW's first updates are sign steps of size lr on every weight: 3e-3
            // wrecked this tiny model's tool-call format in one step; 3e-4 and 1e-3 did not.
            lr: 3e-4,
            split: (context: 512, mode: Split),
            batch_tokens: 4096,
        ))"#,
            dir.join("train").display()
        )
    };
    format!(
        r#"(
    name: "rl-e2e",
    run_dir: "{run}",
    seed: 5,
    sandbox: (tools_dir: "{tools}", deterministic: true, call: (wall_time: "10s")),
    actors: (environments: 4),
    model: Some(Tiny((hidden: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 128, context: 512))),
    stages: [
        Sft((
            name: "weak",
            data: Jsonl(path: "{demos}"),
            split: (context: 512, mode: Split),
            batch_tokens: 4096,
            epochs: 30,
            lr: 1e-2,
            warmup_steps: 5,
            checkpoint_every: 1000,
        )),
        {before},
        {short},
        {long},
        {after},
    ],
)"#,
        run = dir.join("run").display(),
        tools = tools_dir().display(),
        demos = dir.join("demos.jsonl").display(),
        before = eval("before"),
        short = rl("short", short_turns, short_tokens),
        long = rl("long", 3, 400),
        after = eval("after"),
    )
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn score(run_dir: &Path, eval: &str) -> f64 {
    let report: Value = serde_json::from_slice(
        &std::fs::read(run_dir.join("eval").join(format!("{eval}.json"))).unwrap(),
    )
    .unwrap();
    report["overall"]["mean"].as_f64().unwrap()
}

#[test]
fn rl_raises_the_score_of_a_weak_policy_under_growing_budgets() {
    // KLONGD_RL_TEST_DIR keeps the run for a person to read (it must not exist yet).
    let tmp = tempfile::tempdir().unwrap();
    let kept = std::env::var_os("KLONGD_RL_TEST_DIR").map(PathBuf::from);
    let dir = kept.as_deref().unwrap_or(tmp.path());
    for t in ["train/pick-a", "train/pick-b", "held-out/pick-c"] {
        write_task(&dir.join(t));
    }
    write_demonstrations(&dir.join("demos.jsonl"));

    // Budgets that do not grow are valid, and warned about.
    let flat = dir.join("flat.ron");
    std::fs::write(&flat, config(dir, 3, 400)).unwrap();
    let out = klongd(&["check", flat.to_str().unwrap()], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning")
            && text.contains("\"long\"")
            && text.contains("larger episode budget"),
        "{text}"
    );

    let path = dir.join("rl.ron");
    std::fs::write(&path, config(dir, 1, 96)).unwrap();
    let out = klongd(&["check", path.to_str().unwrap()], dir);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("larger episode budget"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The run in three invocations: one SFT step (its log says how many the stage has), then
    // up to the RL stage's second step, then the rest. The resumed run re-runs no stored
    // rollout.
    let run_for = |max_steps: Option<u64>| {
        let mut args = vec!["--log-format", "json", "run", path.to_str().unwrap()];
        let n = max_steps.map(|n| n.to_string());
        if let Some(n) = &n {
            args.extend(["--max-steps", n.as_str()]);
        }
        let out = klongd(&args, dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let log = run_for(Some(1));
    let sft_steps = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "sft data ready")
        .and_then(|l| l["fields"]["steps"].as_u64())
        .expect("the SFT stage logs its steps");
    run_for(Some(sft_steps - 1 + 2));
    let run = dir.join("run");
    let first_rollouts = {
        let store = RunStore::open(&run).unwrap();
        store.scan("traj/short/").unwrap()
    };
    assert_eq!(first_rollouts.len(), 24, "two steps of 2 tasks x 6");
    run_for(None);
    {
        let store = RunStore::open(&run).unwrap();
        for (key, bytes) in &first_rollouts {
            assert_eq!(
                store.get(key).unwrap().as_ref(),
                Some(bytes),
                "{key} was re-run"
            );
        }
    }

    // RL raises the held-out score.
    let (before, after) = (score(&run, "before"), score(&run, "after"));
    eprintln!("held-out score: before RL {before:.3}, after {after:.3}");
    assert!(
        before > 0.05 && before < 0.95,
        "the SFT policy is meant to be weak but not hopeless: {before}"
    );
    // Up by 0.2, or to a perfect score where the SFT policy leaves less headroom than that
    // (its score depends on the CPU's float kernels: 0.812 on one AVX-512 machine, 1.000 after).
    assert!(
        after >= (before + 0.2).min(1.0),
        "before {before}, after {after}"
    );

    // Metrics per RL step.
    let m = metrics(&run);
    let rl: Vec<&Value> = m
        .iter()
        .filter(|l| l.get("reward_mean").is_some())
        .collect();
    assert_eq!(rl.len(), 6, "3 steps per stage");
    for (i, l) in rl.iter().enumerate() {
        for key in [
            "reward_std",
            "success_rate",
            "turns_mean",
            "generated_tokens",
            "kl",
            "clip_fraction",
            "entropy",
            "infra_failures",
            "zero_variance_groups",
            "rollout_s",
            "judge_s",
            "learn_s",
        ] {
            assert!(l.get(key).is_some(), "step {i}: no {key}: {l}");
        }
        assert_eq!(l["rollouts"], 12, "{l}");
        assert_eq!(l["infra_failures"], 0, "{l}");
        assert_eq!(l["policy_version"], (i % 3) as u64, "{l}");
    }
    // The short stage: every episode stopped at its one-turn budget, before submitting, and
    // was judged on the file it had written (some earn the point).
    for l in &rl[..3] {
        assert_eq!(l["ends"], json!({"turns": 12}), "{l}");
        assert!(l["turns_mean"].as_f64().unwrap() == 1.0, "{l}");
    }
    assert!(rl[..3]
        .iter()
        .any(|l| l["reward_mean"].as_f64().unwrap() > 0.0));
    // The long stage's episodes have room to submit.
    assert!(rl[3..].iter().any(|l| l["ends"].get("submitted").is_some()));

    // Every action of every stored rollout carries the version of the step that sampled it.
    let store = RunStore::open(&run).unwrap();
    for stage in ["short", "long"] {
        let rows = store.scan(&format!("traj/{stage}/")).unwrap();
        assert_eq!(rows.len(), 36, "{stage}");
        for (key, bytes) in rows {
            let r: StoredRollout = serde_json::from_slice(&bytes).unwrap();
            let step: u64 = key.rsplit('/').next().unwrap()[..6].parse().unwrap();
            let versions: Vec<Option<u64>> = r
                .episode
                .trajectory
                .turns
                .iter()
                .filter_map(|t| match t {
                    Turn::Assistant(a) => Some(a.policy_version),
                    _ => None,
                })
                .collect();
            assert!(!versions.is_empty());
            assert!(
                versions.iter().all(|v| *v == Some(step)),
                "{key}: {versions:?}"
            );
            assert!(r.episode.trajectory.turns.iter().all(|t| match t {
                Turn::Assistant(a) => a.logprobs.is_some(),
                _ => true,
            }));
        }
    }
    drop(store);

    // `klongd eval` on the last stage's model, and on the run directory (its latest
    // checkpoint: the same weights), reproduces the run's own final evaluation.
    for checkpoint in [run.join("models/long"), run.clone()] {
        let out_dir = dir.join("eval-out").join(checkpoint.file_name().unwrap());
        let out = klongd(
            &[
                "eval",
                path.to_str().unwrap(),
                "--checkpoint",
                checkpoint.to_str().unwrap(),
                "--stage",
                "after",
                "--out",
                out_dir.to_str().unwrap(),
                "--json",
            ],
            dir,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reports.as_array().unwrap().len(), 1);
        assert_eq!(reports[0]["overall"]["mean"].as_f64().unwrap(), after);
        assert!(out_dir.join("eval/after.txt").is_file());
    }
    let out = klongd(
        &[
            "eval",
            path.to_str().unwrap(),
            "--checkpoint",
            run.to_str().unwrap(),
            "--stage",
            "nope",
        ],
        dir,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a stage that is not there is bad input"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Eval stage named \"nope\""));

    // A second invocation re-runs nothing: every stage is finished.
    let lines = m.len();
    let out = klongd(&["run", path.to_str().unwrap()], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(metrics(&run).len(), lines);
}
