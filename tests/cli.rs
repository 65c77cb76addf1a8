//! End-to-end tests of the `klongd` binary: exit codes, config errors, `run` and resume, and
//! `sandbox run` / `sandbox tools`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{klongd, repo, tools_dir};

/// Shared by all tests (and with the sandbox crate's tests) so modules compile once.
fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klong-module-cache")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("run.ron");
    std::fs::write(&path, body).unwrap();
    path
}

fn config_text(run_dir: &Path, extra_call: &str) -> String {
    format!(
        r#"(
    name: "e2e",
    run_dir: "{}",
    seed: 3,
    sandbox: (
        tools_dir: "{}",
        cache_dir: Some("{}"),
        call: (wall_time: "5s"{extra_call}),
    ),
)"#,
        run_dir.display(),
        tools_dir().display(),
        cache_dir().display()
    )
}

#[test]
fn check_prints_the_resolved_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &config_text(&tmp.path().join("run"), ""));
    let out = klongd(&["check", cfg.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wall_time: \"5s\""), "{stdout}");
    assert!(
        stdout.contains("files_created: 1000"),
        "defaults are filled in: {stdout}"
    );
    assert!(stdout.contains("bash"), "tools are listed: {stdout}");
}

#[test]
fn bad_configs_exit_2_naming_file_line_column_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "(name: \"x\",\n run_dir: \"r\",\n seed: 1,\n sandbox: (call: (wall_time: \"10\")))",
            ":4:",
            "sandbox.call.wall_time",
        ),
        (
            "(name: \"x\", run_dir: \"r\", seed: 1,\n sandbox: (call: (memory: \"lots\")))",
            ":2:",
            "sandbox.call.memory",
        ),
        (
            "(name: \"x\", run_dir: \"r\", seed: 1,\n  colour: \"red\")",
            ":2:",
            "colour",
        ),
        ("(name: \"x\", run_dir: \"r\", seed: 1", ":1:", ""),
        (
            "(name: \"x\", run_dir: \"r\", seed: 1, sandbox: (episode: (fuel: 0)))",
            ":1:",
            "sandbox.episode.fuel",
        ),
        (
            "(name: \"x\", run_dir: \"r\", seed: 1,\n device: \"gpu\")",
            ":2:",
            "field `device`: device \"gpu\": expected cpu, cuda or cuda:N",
        ),
        (
            "(name: \"x\", run_dir: \"r\", seed: 1,\n precision: Some(F16))",
            ":2:",
            "precision",
        ),
    ];
    for (body, position, field) in cases {
        let cfg = write_config(tmp.path(), body);
        for command in ["check", "run"] {
            let out = klongd(&[command, cfg.to_str().unwrap()], tmp.path());
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{command} {body}: {err}");
            assert!(err.contains(&format!("run.ron{position}")), "{body}: {err}");
            assert!(err.contains(field), "{body}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    let out = klongd(&["check", "/nonexistent/x.ron"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/x.ron"));
}

#[test]
fn run_starts_resumes_and_refuses_a_different_config() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &config_text(&run_dir, ""));
    let out = klongd(&["run", cfg.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("sandbox self-check passed"),
        "{}",
        stderr(&out)
    );
    let stored = std::fs::read_to_string(run_dir.join("config.ron")).unwrap();
    assert!(stored.contains("\"e2e\""));

    let out = klongd(
        &["run", cfg.to_str().unwrap(), "--log-format", "json"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stderr(&out)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line: {l}: {e}"))
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "resuming run"),
        "{lines:?}"
    );

    let changed = write_config(tmp.path(), &config_text(&run_dir, ", fuel: 1000000"));
    let out = klongd(&["run", changed.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("different config") && stderr(&out).contains("changed: sandbox"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_locked_run_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let _held = klongd::run::RunDir::open(&run_dir).unwrap();
    let cfg = write_config(tmp.path(), &config_text(&run_dir, ""));
    let out = klongd(&["run", cfg.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another klongd process"),
        "{}",
        stderr(&out)
    );
}

fn sandbox_run(dir: &Path, args: &[&str]) -> (Output, Value) {
    let cache = cache_dir();
    let mut all = vec![
        "sandbox",
        "run",
        "--dir",
        dir.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = klongd(&all, dir.parent().unwrap());
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

#[test]
fn sandbox_run_prints_the_outcome_and_exits_0_whatever_the_guest_did() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = tmp.path().join("ep");
    let (out, o) = sandbox_run(
        &ep,
        &[
            "write_file",
            r#"{"file": "a.txt", "content": "one\ntwo\nthree\n"}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(o["termination"]["kind"], "exited");
    assert_eq!(
        std::fs::read_to_string(ep.join("a.txt")).unwrap(),
        "one\ntwo\nthree\n"
    );

    let (_, o) = sandbox_run(&ep, &["bash", r#"{"command": "grep -n t a.txt | wc -l"}"#]);
    assert_eq!(o["stdout"], "2\n");

    // Raw argv for shell commands, with flags after the tool name.
    let (_, o) = sandbox_run(&ep, &["grep", "-c", "o", "a.txt"]);
    assert_eq!(o["stdout"], "2\n");

    // key=value arguments.
    let (_, o) = sandbox_run(
        &ep,
        &[
            "read_file_chunk",
            "file=a.txt",
            "start_line=2",
            "max_lines=1",
        ],
    );
    assert!(o["stdout"].as_str().unwrap().contains("two"), "{o}");

    // The guest fails: the host did its job, so exit 0 with the guest's code in the outcome.
    let (out, o) = sandbox_run(&ep, &["cat", "missing.txt"]);
    assert!(out.status.success());
    assert_eq!(o["termination"]["code"], 1);
    assert!(o["stderr"].as_str().unwrap().contains("missing.txt"));

    // A limit hit is a typed outcome.
    let (out, o) = sandbox_run(
        &ep,
        &[
            "--fuel",
            "100000",
            "bash",
            r#"{"command": "seq 1 100000000"}"#,
        ],
    );
    assert!(out.status.success());
    assert_eq!(o["termination"]["kind"], "limit");
    assert_eq!(o["termination"]["limit"], "fuel");
}

#[test]
fn sandbox_run_takes_any_wasm_module() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = tmp.path().join("ep");
    let hello = repo().join("sandboxes/tools/wasm/hostile/hello.wasm");
    let (out, o) = sandbox_run(&ep, &[hello.to_str().unwrap(), "--flag", "x"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = o["stdout"].as_str().unwrap();
    assert!(
        stdout.contains("hello") && stdout.contains("--flag"),
        "{stdout}"
    );

    let spin = repo().join("sandboxes/tools/wasm/hostile/spin.wasm");
    let (out, o) = sandbox_run(
        &ep,
        &[
            "--wall-time",
            "200ms",
            "--fuel",
            "100000000000000",
            spin.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert_eq!(o["termination"]["limit"], "wall_time");
}

#[test]
fn sandbox_run_bad_requests_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = tmp.path().join("ep");
    for args in [
        vec!["no_such_tool"],
        vec!["read_file_chunk", r#"{"file": 3}"#],
        vec!["read_file_chunk", r#"{"bogus": "x"}"#],
        vec!["read_file_chunk", "{not json"],
        vec!["submit", "novalue"],
        vec!["--wall-time", "10", "cat"],
    ] {
        let (out, _) = sandbox_run(&ep, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[test]
fn sandbox_tools_lists_the_agent_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let out = klongd(&["sandbox", "tools", "--json"], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let tools: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    for name in [
        "bash",
        "python",
        "read_file_chunk",
        "search_file",
        "submit",
        "write_file",
    ] {
        assert!(names.contains(&name), "{names:?}");
    }
    assert!(
        !names.contains(&"cat"),
        "plain commands are not agent tools: {names:?}"
    );
    let out = klongd(&["sandbox", "tools"], tmp.path());
    assert!(String::from_utf8_lossy(&out.stdout).contains("shell command"));
}

#[test]
fn example_configs_are_valid() {
    for file in [
        "examples/quickstart.ron",
        "examples/sft.ron",
        "examples/split_ablation.ron",
        "examples/sft_compact.ron",
        "examples/sft_recall.ron",
        "examples/split_ablation_recall.ron",
    ] {
        let out = klongd(&["check", file], &repo());
        assert!(out.status.success(), "{file}: {}", stderr(&out));
    }
    // The GPU check's config (tests/cuda/run.sh), on the CPU: valid but for its device.
    let tmp = tempfile::tempdir().unwrap();
    let gpu = std::fs::read_to_string(repo().join("tests/cuda/sft_gpu.ron")).unwrap();
    let cpu = gpu
        .replace("RUN_DIR", &tmp.path().join("run").display().to_string())
        .replace("device: \"cuda:0\"", "device: \"cpu\"");
    assert_ne!(cpu, gpu);
    let cfg = write_config(tmp.path(), &cpu);
    let out = klongd(&["check", cfg.to_str().unwrap()], &repo());
    assert!(
        out.status.success(),
        "tests/cuda/sft_gpu.ron: {}",
        stderr(&out)
    );
}

#[test]
fn stage_config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let text = sft_config(&tmp.path().join("r")).replace("batch_tokens: 1536", "batch_tokens: 100");
    let cfg = write_config(tmp.path(), &text);
    let out = klongd(&["check", cfg.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("stages[0].batch_tokens"),
        "{}",
        stderr(&out)
    );

    let text = sft_config(&tmp.path().join("r")).replace("lr: 1e-2", "lr: -1.0");
    let cfg = write_config(tmp.path(), &text);
    let out = klongd(&["check", cfg.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("stages[0].lr"), "{}", stderr(&out));

    let text = sft_config(&tmp.path().join("r")).replace("mode: Sliding", "mode: Slide");
    let cfg = write_config(tmp.path(), &text);
    let out = klongd(&["check", cfg.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("run.ron:") && err.contains("split.mode"),
        "{err}"
    );
}

#[test]
fn rubric_score_scores_a_paperbench_rubric() {
    let tmp = tempfile::tempdir().unwrap();
    let rubric = repo().join("../shared/paperbench/fixtures/rubrics/hex_flags.json");
    let tree: Value = serde_json::from_str(&std::fs::read_to_string(&rubric).unwrap()).unwrap();
    let leaves: Vec<String> = tree["sub_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    assert!(leaves.len() >= 2);
    // Pass the first leaf only: the root scores its weight share.
    let grades: serde_json::Map<String, Value> = leaves
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), Value::from(u8::from(i == 0))))
        .collect();
    let grades_path = tmp.path().join("grades.json");
    std::fs::write(&grades_path, Value::Object(grades).to_string()).unwrap();
    let out = klongd(
        &[
            "rubric",
            "score",
            rubric.to_str().unwrap(),
            "--grades",
            grades_path.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let scored: Value = serde_json::from_slice(&out.stdout).unwrap();
    let weights: Vec<f64> = tree["sub_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["weight"].as_f64().unwrap())
        .collect();
    let expected = weights[0] / weights.iter().sum::<f64>();
    assert!(
        (scored["root_score"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{scored}"
    );

    // A grade for a leaf that does not exist is bad input.
    std::fs::write(&grades_path, r#"{"no-such-leaf": 1}"#).unwrap();
    let out = klongd(
        &[
            "rubric",
            "score",
            rubric.to_str().unwrap(),
            "--grades",
            grades_path.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-leaf"), "{}", stderr(&out));
}

#[test]
fn tasks_gen_then_solve_with_the_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("tasks");
    let out = klongd(
        &[
            "tasks",
            "gen",
            "--family",
            "repro",
            "--seed",
            "5",
            "--count",
            "2",
            "--horizon",
            "3",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);

    let cache = cache_dir();
    let solve = |noise: &str| {
        klongd(
            &[
                "tasks",
                "solve",
                out_dir.to_str().unwrap(),
                "--expert-noise",
                noise,
                "--cache-dir",
                cache.to_str().unwrap(),
                "--json",
            ],
            tmp.path(),
        )
    };
    let out = solve("0");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(report["mean"], 1.0, "{report}");
    let out = solve("1");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["mean"].as_f64().unwrap() < 0.5,
        "an always-erring expert scores low: {report}"
    );

    let out = klongd(
        &[
            "tasks",
            "gen",
            "--seed",
            "1",
            "--horizon",
            "0",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let out = klongd(
        &[
            "tasks",
            "gen",
            "--family",
            "nope",
            "--seed",
            "1",
            "--horizon",
            "2",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("repro"), "{}", stderr(&out));
}

/// A tiny random model saved as an HF folder with the byte-level tokenizer.
fn tiny_model_dir(dir: &Path) -> PathBuf {
    use klong_actors::policy::model::{Llama, LlamaConfig};
    use klong_actors::policy::pretrained::save_hf;
    use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};
    let cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
    let vm = candle_nn::VarMap::new();
    let vb =
        candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
    Llama::new(&cfg, vb).unwrap();
    let weights = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let out = dir.join("tiny");
    save_hf(&out, &cfg, &weights, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
    out
}

fn generate_json(args: &[&str]) -> Value {
    let mut all = vec!["generate", "--json"];
    all.extend_from_slice(args);
    let out = klongd(&all, &repo());
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_with_a_saved_model_is_seeded_and_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(tmp.path());
    let model = model.to_str().unwrap();
    let base = ["--model", model, "--prompt", "hi", "--max-new-tokens", "6"];
    let sampled = |seed: &str| {
        let mut a = base.to_vec();
        a.extend_from_slice(&["--temperature", "1.0", "--seed", seed]);
        generate_json(&a)
    };
    let (a, b, c) = (sampled("3"), sampled("3"), sampled("4"));
    assert_eq!(a["prompt_ids"], serde_json::json!([104, 105]));
    assert_eq!(a["ids"], b["ids"], "same seed, same tokens");
    assert_ne!(a["ids"], c["ids"], "another seed, other tokens");
    let ids = a["ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 6);
    assert_eq!(a["logprobs"].as_array().unwrap().len(), ids.len());
    for lp in a["logprobs"].as_array().unwrap() {
        assert!(lp.as_f64().unwrap() <= 0.0);
    }

    let mut chat = base.to_vec();
    chat.push("--chat");
    let v = generate_json(&chat);
    assert_eq!(
        v["prompt_text"],
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(v["prompt_ids"][0], 257, "<|im_start|> is one special token");
}

#[test]
fn generate_with_smollm2_gguf_answers() {
    let gguf = repo().join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "model missing: run tests/fetch-models.sh");
    let v = generate_json(&[
        "--model",
        gguf.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
    ]);
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn generate_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = klongd(
        &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/model"),
        "{}",
        stderr(&out)
    );

    let model = tiny_model_dir(tmp.path());
    let model = model.to_str().unwrap();
    let out = klongd(
        &[
            "generate", "--model", model, "--prompt", "x", "--device", "cuda:0",
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`cuda` feature"), "{}", stderr(&out));

    let out = klongd(
        &[
            "generate", "--model", model, "--prompt", "x", "--top-p", "0",
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("top_p"), "{}", stderr(&out));
}

/// A small distill + SFT run: two expert episodes, sliding windows, a tiny model.
fn sft_config(run_dir: &Path) -> String {
    format!(
        r#"(
    name: "sft-e2e",
    run_dir: "{}",
    seed: 5,
    sandbox: (
        tools_dir: "{}",
        cache_dir: Some("{}"),
        deterministic: true,
        call: (wall_time: "10s"),
    ),
    model: Some(Tiny((hidden: 32, layers: 2, heads: 4, kv_heads: 2, ffn: 64, context: 512))),
    stages: [
        Sft((
            name: "sft",
            data: Distill(
                teacher: Expert(noise: 0.0),
                tasks: (seed: 300, count: 2, min_horizon: 1, max_horizon: 1),
                min_score: 0.5,
                max_turns: 60,
            ),
            split: (context: 384, mode: Sliding, overlap: 32),
            batch_tokens: 1536,
            epochs: 6,
            lr: 1e-2,
            warmup_steps: 2,
            checkpoint_every: 4,
        )),
    ],
)"#,
        run_dir.display(),
        tools_dir().display(),
        cache_dir().display()
    )
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_distills_trains_and_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted.
    let a = tmp.path().join("a");
    let cfg_a = write_config(tmp.path(), &sft_config(&a));
    let out = klongd(&["run", cfg_a.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let m = metrics(&a);
    assert!(m.len() >= 6, "{} steps", m.len());
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m[m.len() - 1]["loss"].as_f64().unwrap();
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    for line in &m {
        for key in ["loss", "tokens", "lr", "grad_norm", "tokens_per_s"] {
            assert!(line[key].is_number(), "{key} missing in {line}");
        }
    }
    let weights_a = std::fs::read(a.join("models/sft/model.safetensors")).unwrap();

    // Stopped after 3 steps, then run again: the same final weights, and the distilled
    // episodes are not re-run (the store has them).
    let b = tmp.path().join("b");
    let dir_b = tmp.path().join("cfg-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let cfg_b = write_config(&dir_b, &sft_config(&b));
    let out = klongd(
        &["run", cfg_b.to_str().unwrap(), "--max-steps", "3"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(metrics(&b).len(), 3);
    assert!(!b.join("models/sft").exists());
    // Resumed with settings that do not change results: more environments, other checkpoints.
    let harmless = sft_config(&b)
        .replace("checkpoint_every: 4", "checkpoint_every: 5")
        .replace(
            "    model: Some(",
            "    actors: (environments: 3),\n    model: Some(",
        );
    let cfg_b = write_config(&dir_b, &harmless);
    let out = klongd(&["run", cfg_b.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("do not affect results"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("distilled episode judged"),
        "a stored episode was run again"
    );
    let weights_b = std::fs::read(b.join("models/sft/model.safetensors")).unwrap();
    assert!(
        weights_a == weights_b,
        "resumed run ended with other weights"
    );

    // A finished run run again does nothing and stays finished.
    let out = klongd(&["run", cfg_b.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stage already finished"),
        "{}",
        stderr(&out)
    );

    let out = klongd(&["status", b.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stage finished"), "{text}");
    assert!(text.contains("stored episodes: 2"), "{text}");
    assert!(text.contains("latest metrics"), "{text}");

    // A change that would make it another run is refused, naming what changed.
    let seeded = harmless.replace("seed: 5,", "seed: 6,");
    let cfg_b = write_config(&dir_b, &seeded);
    let out = klongd(&["run", cfg_b.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("changed: seed"), "{}", stderr(&out));
}

/// `sft_config` with bf16 compute over f32 master weights.
fn bf16_sft_config(run_dir: &Path) -> String {
    sft_config(run_dir).replace(
        "    model: Some(",
        "    precision: Some(Bf16),\n    model: Some(",
    )
}

#[test]
fn sft_in_bf16_trains_the_f32_masters_and_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let cfg_a = write_config(tmp.path(), &bf16_sft_config(&a));
    let out = klongd(&["run", cfg_a.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("precision=Bf16"), "{}", stderr(&out));
    let m = metrics(&a);
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m[m.len() - 1]["loss"].as_f64().unwrap();
    assert!(last < 0.8 * first, "bf16 loss {first} -> {last}");
    // The saved model is the masters: f32, as transformers loads it.
    let saved = std::fs::read(a.join("models/sft/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(saved[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&saved[8..8 + header_len]).unwrap();
    for (name, t) in header.as_object().unwrap() {
        if name != "__metadata__" {
            assert_eq!(t["dtype"], "F32", "{name}");
        }
    }

    // The same run in f32 computes other numbers from the same start: the first step's loss
    // is close but not the same (bf16 rounds the forward).
    let f = tmp.path().join("f");
    let dir_f = tmp.path().join("cfg-f");
    std::fs::create_dir_all(&dir_f).unwrap();
    let cfg_f = write_config(&dir_f, &sft_config(&f));
    let out = klongd(
        &["run", cfg_f.to_str().unwrap(), "--max-steps", "1"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let f32_first = metrics(&f)[0]["loss"].as_f64().unwrap();
    assert!(
        f32_first != first,
        "bf16 and f32 gave the same loss {first}"
    );
    assert!(
        (f32_first - first).abs() < 0.02 * f32_first,
        "f32 {f32_first} vs bf16 {first}"
    );

    // Stopped after 3 steps and resumed: the same final weights (the compute copies are
    // re-cast from the checkpoint's masters, as every step re-casts them).
    let b = tmp.path().join("b");
    let dir_b = tmp.path().join("cfg-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let cfg_b = write_config(&dir_b, &bf16_sft_config(&b));
    let out = klongd(
        &["run", cfg_b.to_str().unwrap(), "--max-steps", "3"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Resuming in another precision would be another run: refused, naming it.
    let cfg_f32 = write_config(&dir_b, &sft_config(&b));
    let out = klongd(&["run", cfg_f32.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("changed: precision"),
        "{}",
        stderr(&out)
    );
    let cfg_b = write_config(&dir_b, &bf16_sft_config(&b));
    let out = klongd(&["run", cfg_b.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let resumed = std::fs::read(b.join("models/sft/model.safetensors")).unwrap();
    assert!(
        saved == resumed,
        "the resumed bf16 run ended with other weights"
    );
}

#[test]
fn sft_trains_on_a_mix_of_recall_conversations_and_distilled_episodes() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("mix");
    let config = sft_config(&run_dir).replace(
        "            data: Distill(\n",
        "            data: Mix([Recall(seed: 4, count: 48), Recall(seed: 5, count: 6, filler: 200), Distill(\n",
    );
    let config = config.replace(
        "                max_turns: 60,\n            ),",
        "                max_turns: 60,\n            )]),",
    );
    assert!(config.contains("Mix([Recall"), "{config}");
    let cfg = write_config(tmp.path(), &config);
    let out = klongd(&["run", cfg.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("sft data part ready episodes=48 kept=48"),
        "{err}"
    );
    assert!(
        err.contains("sft data part ready episodes=6 kept=6"),
        "{err}"
    );
    assert!(
        err.contains("sft data part ready episodes=2 kept=2"),
        "{err}"
    );
    assert!(err.contains("sft data ready episodes=56 kept=56"), "{err}");
    let m = metrics(&run_dir);
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m[m.len() - 1]["loss"].as_f64().unwrap();
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    assert!(run_dir.join("models/sft/model.safetensors").is_file());
}

#[test]
fn sft_killed_mid_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let longer = |dir: &Path| sft_config(dir).replace("epochs: 6", "epochs: 24");
    let a = tmp.path().join("a");
    let cfg_a = write_config(tmp.path(), &longer(&a));
    let out = klongd(&["run", cfg_a.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let total = metrics(&a).len();

    let b = tmp.path().join("b");
    let dir_b = tmp.path().join("cfg-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let cfg_b = write_config(&dir_b, &longer(&b));
    let mut child = Command::new(env!("CARGO_BIN_EXE_klongd"))
        .args(["run", cfg_b.to_str().unwrap()])
        .current_dir(tmp.path())
        .env("KLONGD_TOOLS_DIR", tools_dir())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL) once it is well into training, long before the end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let done = std::fs::read_to_string(b.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if done >= 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run made no progress"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        metrics(&b).len() < total,
        "the run finished before it was killed"
    );
    let out = klongd(&["run", cfg_b.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let wa = std::fs::read(a.join("models/sft/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("models/sft/model.safetensors")).unwrap();
    assert!(wa == wb, "the run killed mid-way ended with other weights");
}

#[test]
fn eval_stage_reports_the_expert_on_compact_tasks_and_is_not_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let cfg = write_config(
        tmp.path(),
        &format!(
            r#"(
    name: "eval-e2e",
    run_dir: "{}",
    seed: 3,
    sandbox: (tools_dir: "{}", cache_dir: Some("{}"), deterministic: true),
    actors: (environments: 2),
    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 512))),
    stages: [
        Eval((
            name: "expert",
            policy: Expert(noise: 0.0),
            tasks: Family((style: Compact, seed: 1000000, count: 4, min_horizon: 1, max_horizon: 2)),
            seeds: 2,
            max_turns: 40,
            max_turn_tokens: 256,
        )),
    ],
)"#,
            run_dir.display(),
            tools_dir().display(),
            cache_dir().display()
        ),
    );
    let out = klongd(&["run", cfg.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("eval/expert.json")).unwrap()).unwrap();
    assert_eq!(report["episodes"].as_array().unwrap().len(), 8);
    assert_eq!(report["infra_failures"], 0);
    assert_eq!(report["overall"]["mean"], 1.0);
    assert_eq!(report["by_horizon"].as_array().unwrap().len(), 2);
    for e in report["episodes"].as_array().unwrap() {
        assert!(e["task"].as_str().unwrap().ends_with("-c"), "{e}");
        assert_eq!(e["end"], "submitted");
    }
    let table = std::fs::read_to_string(run_dir.join("eval/expert.txt")).unwrap();
    assert!(table.contains("1.000 ± 0.000"), "{table}");
    // A compact task names its tools in the statement, only those the work needs.
    let spec =
        std::fs::read_to_string(run_dir.join("tasks/expert/repro-s1000000-h1-c/task.ron")).unwrap();
    assert!(
        spec.contains("InStatement") && !spec.contains("search_file"),
        "{spec}"
    );

    let out = klongd(&["run", cfg.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stage already finished"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("episode judged"), "{}", stderr(&out));
}

#[test]
fn an_eval_stage_context_is_the_window_the_model_sees() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    // A compact task's pinned prefix is ~0.9k byte tokens: it fits the model's 2,048 but not a
    // 600-token window, so there every episode fails on the context before its first turn.
    let eval = |name: &str, context: &str| {
        format!(
            r#"Eval((name: "{name}", policy: Model,
            tasks: Family((style: Compact, seed: 1000000, count: 2, min_horizon: 1, max_horizon: 1)),
            max_turns: 1, max_turn_tokens: 8{context}))"#
        )
    };
    let cfg = write_config(
        tmp.path(),
        &format!(
            r#"(
    name: "eval-context",
    run_dir: "{}",
    seed: 3,
    sandbox: (tools_dir: "{}", cache_dir: Some("{}"), deterministic: true),
    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 2048))),
    stages: [{}, {}, {}],
)"#,
            run_dir.display(),
            tools_dir().display(),
            cache_dir().display(),
            eval("whole", ""),
            eval("window", ", context: Some(600)"),
            eval("beyond", ", context: Some(2048)"),
        ),
    );
    let out = klongd(&["run", cfg.to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let episodes = |stage: &str| -> Vec<Value> {
        let path = run_dir.join(format!("eval/{stage}.json"));
        let report: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        report["episodes"].as_array().unwrap().clone()
    };
    for e in episodes("whole") {
        assert_eq!(e["end"], "turns", "{e}");
    }
    for e in episodes("window") {
        let failure = e["failure"].as_str().unwrap_or_default();
        assert!(failure.contains("context of 600 tokens"), "{e}");
    }

    // A checkpoint's own context bounds the stage's: this one has 512 positions.
    let model = tiny_model_dir(tmp.path());
    let out = klongd(
        &[
            "eval",
            cfg.to_str().unwrap(),
            "--checkpoint",
            model.to_str().unwrap(),
            "--stage",
            "beyond",
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains(r#"eval stage "beyond": context 2048 exceeds the model's context (512)"#),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_split_trains_each_mode_on_equal_tokens_and_scores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("bench");
    let cfg = write_config(
        tmp.path(),
        &format!(
            r#"(
    name: "split-e2e",
    run_dir: "{}",
    seed: 4,
    sandbox: (tools_dir: "{}", cache_dir: Some("{}"), deterministic: true),
    model: Some(Tiny((hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64, context: 1536))),
    stages: [
        Sft((
            name: "sft",
            data: Distill(
                teacher: Expert(noise: 0.0),
                tasks: (style: Compact, seed: 300, count: 2, min_horizon: 2, max_horizon: 2),
                min_score: 0.5,
                max_turns: 60,
            ),
            split: (context: 1280, mode: Split, overlap: 32),
            batch_tokens: 2560,
            epochs: 1,
            lr: 1e-2,
        )),
        Eval((
            name: "held-out",
            policy: Model,
            tasks: Family((style: Compact, seed: 1000000, count: 2, min_horizon: 1, max_horizon: 2)),
            max_turns: 1,
            max_turn_tokens: 8,
        )),
    ],
)"#,
            run_dir.display(),
            tools_dir().display(),
            cache_dir().display()
        ),
    );
    let out = klongd(
        &[
            "bench",
            "split",
            cfg.to_str().unwrap(),
            "--tokens",
            "6000",
            "--json",
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["Split", "Truncate", "Sliding"]);
    for m in modes {
        let tokens = m["tokens"].as_u64().unwrap();
        // At least the budget, and at most one step (2,560 tokens) past it.
        assert!((6000..6000 + 2560).contains(&tokens), "{m}");
        let evals = m["evals"].as_array().unwrap();
        assert_eq!(evals.len(), 1, "{m}");
        let dir = m["run_dir"].as_str().unwrap();
        assert!(Path::new(dir).join("eval/held-out.json").exists(), "{dir}");
    }
    let table = klongd(
        &["bench", "split", cfg.to_str().unwrap(), "--tokens", "6000"],
        tmp.path(),
    );
    assert!(table.status.success(), "{}", stderr(&table));
    // Run again, each mode's run is already finished: nothing is trained or evaluated again.
    assert!(!stderr(&table).contains("sft step"), "{}", stderr(&table));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("eval held-out") && text.contains("Sliding"),
        "{text}"
    );
}
