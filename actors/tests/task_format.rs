//! Task folders (`task.ron`, `rubric.json`, `paper.md`, `files/`) and the check grader, on
//! real files and a real sandbox.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use klong_actors::environment::task::{
    copy_tree, CheckSpec, CopyBounds, GraderSpec, Task, TaskError, TaskSet, TaskSpec,
};
use klong_actors::judge::check::{run_check, run_check_bounded, CheckError};
use klong_sandbox::{CallLimits, HostSettings, Limit, SandboxHost, ToolRegistry};

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sandboxes/tools/manifests");
const WASM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sandboxes/tools/wasm");

fn host() -> Arc<SandboxHost> {
    static HOST: OnceLock<Arc<SandboxHost>> = OnceLock::new();
    HOST.get_or_init(|| {
        assert!(
            Path::new(WASM).join("coreutils.wasm").is_file(),
            "guest tools are not built: run sandboxes/tools/build.sh"
        );
        SandboxHost::new(HostSettings {
            cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klong-module-cache")),
            ..Default::default()
        })
        .expect("sandbox host starts")
    })
    .clone()
}

fn registry() -> Arc<ToolRegistry> {
    static REGISTRY: OnceLock<Arc<ToolRegistry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| Arc::new(ToolRegistry::load_dir(Path::new(MANIFESTS)).expect("manifests")))
        .clone()
}

const RUBRIC: &str = r#"{
  "id": "root",
  "requirements": "Reproduce the paper.",
  "weight": 1,
  "sub_tasks": [
    {
      "id": "experiments",
      "requirements": "Every experiment is run.",
      "weight": 3,
      "sub_tasks": [
        {"id": "exp1", "requirements": "exp1 is recorded.", "weight": 1,
         "task_category": "Code Execution", "finegrained_task_category": "Experimental Setup"},
        {"id": "exp2", "requirements": "exp2 is recorded.", "weight": 1,
         "task_category": "Code Execution"}
      ]
    },
    {"id": "report", "requirements": "The report explains the results.", "weight": 1,
     "task_category": "Result Analysis"}
  ]
}"#;

const SPEC: &str = r#"(
    tools: ["bash", "python", "read_file_chunk", "search_file", "write_file", "append_file", "replace_in_file", "submit"],
    budget: (turns: 200, tokens: 400000, wall_time: Some("30m")),
    graders: {
        "exp1": Check((command: "grep -c 'exp1 ' results.txt", exit_code: Some(0), stdout: Some("1\n"), stdout_contains: None)),
        "exp2": Check((command: "grep exp2 results.txt")),
        "report": Llm((files: ["report.md"])),
    },
)
"#;

fn write_task(dir: &Path, spec: &str, rubric: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("files")).expect("mkdir");
    std::fs::write(dir.join("paper.md"), "# A paper\nRun exp1 and exp2.\n").expect("paper");
    std::fs::write(dir.join("rubric.json"), rubric).expect("rubric");
    std::fs::write(dir.join("task.ron"), spec).expect("task.ron");
    std::fs::write(dir.join("files/config.txt"), "exp1 alpha=1\n").expect("files");
    dir.to_path_buf()
}

/// Loads a malformed task; the temp dir is returned so that it lives while the error is read.
fn load_err(spec: &str, rubric: &str) -> (tempfile::TempDir, PathBuf, TaskError) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = write_task(&tmp.path().join("t"), spec, rubric);
    let err = Task::load(&dir).expect_err("the task is malformed");
    (tmp, dir, err)
}

#[test]
fn loads_a_valid_task() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = write_task(&tmp.path().join("exp-task-1"), SPEC, RUBRIC);
    let task = Task::load(&dir).expect("valid task loads");
    assert_eq!(task.name, "exp-task-1");
    assert!(task.paper.starts_with("# A paper"));
    assert_eq!(task.rubric.id, "root");
    assert_eq!(task.spec.tools.len(), 8);
    assert_eq!(task.spec.budget.turns, 200);
    assert_eq!(task.spec.budget.tokens, 400_000);
    assert_eq!(
        task.spec.budget.wall_time.map(|d| d.0),
        Some(std::time::Duration::from_secs(1800))
    );
    assert_eq!(
        task.spec.graders.get("exp2"),
        Some(&GraderSpec::Check(CheckSpec {
            command: "grep exp2 results.txt".into(),
            exit_code: Some(0),
            stdout: None,
            stdout_contains: None,
        })),
        "omitted conditions default to exit code 0 and nothing else"
    );
    assert_eq!(task.files_dir(), dir.join("files"));
    task.check_tools(&registry()).expect("every tool exists");

    // What the family generator writes reads back equal.
    let ron = task.spec.to_ron().expect("serializes");
    let back = TaskSpec::parse(Path::new("gen/task.ron"), &ron).expect("reads back");
    assert_eq!(back, task.spec);

    // `files/` may be absent: the episode starts empty.
    std::fs::remove_dir_all(dir.join("files")).expect("rm files");
    let task = Task::load(&dir).expect("loads without files/");
    let dest = tmp.path().join("episode");
    let stats = task
        .copy_files_into(&dest, CopyBounds::default())
        .expect("copies nothing");
    assert_eq!(stats.files, 0);
    assert!(dest.is_dir());
}

#[test]
fn task_ron_syntax_errors_name_file_line_and_column() {
    // Line 3 lacks the comma after `tools: [...]`.
    let broken = SPEC.replacen("\"submit\"],", "\"submit\"]", 1);
    let (_tmp, dir, err) = load_err(&broken, RUBRIC);
    let msg = err.to_string();
    match &err {
        TaskError::Syntax {
            file, line, col, ..
        } => {
            assert_eq!(file, &dir.join("task.ron"));
            assert_eq!(*line, 3, "{msg}");
            assert!(*col > 0, "{msg}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    assert!(
        msg.starts_with(&format!("{}:3:", dir.join("task.ron").display())),
        "{msg}"
    );

    // A value of the wrong type names the field's path too.
    let wrong = SPEC.replacen("turns: 200", "turns: \"many\"", 1);
    let (_tmp, _, err) = load_err(&wrong, RUBRIC);
    let msg = err.to_string();
    assert!(matches!(err, TaskError::Syntax { line: 3, .. }), "{msg}");
    assert!(msg.contains("budget.turns"), "{msg}");

    // Zero turns are refused while parsing, with the path.
    let zero = SPEC.replacen("turns: 200", "turns: 0", 1);
    let (_tmp, _, err) = load_err(&zero, RUBRIC);
    let msg = err.to_string();
    assert!(
        msg.contains("budget.turns") && msg.contains("positive"),
        "{msg}"
    );
}

#[test]
fn unknown_fields_are_rejected() {
    let extra = SPEC.replacen("tokens: 400000,", "tokens: 400000, tokenz: 5,", 1);
    let (_tmp, _, err) = load_err(&extra, RUBRIC);
    let msg = err.to_string();
    assert!(matches!(err, TaskError::Syntax { .. }), "{msg}");
    assert!(msg.contains("tokenz"), "{msg}");

    let in_check = SPEC.replacen(
        "Check((command: \"grep exp2 results.txt\"))",
        "Check((command: \"grep exp2 results.txt\", stderr: Some(\"\")))",
        1,
    );
    let (_tmp, _, err) = load_err(&in_check, RUBRIC);
    let msg = err.to_string();
    assert!(msg.contains("stderr") && msg.contains("exp2"), "{msg}");

    let kind = SPEC.replacen("Llm((files", "Human((files", 1);
    let (_tmp, _, err) = load_err(&kind, RUBRIC);
    assert!(err.to_string().contains("Human"), "{err}");

    let in_rubric = RUBRIC.replacen("\"weight\": 3,", "\"weight\": 3, \"wieght\": 1,", 1);
    let (_tmp, dir, err) = load_err(SPEC, &in_rubric);
    let msg = err.to_string();
    assert!(
        msg.starts_with(&dir.join("rubric.json").display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("wieght") && msg.contains("sub_tasks[0]"),
        "{msg}"
    );
}

#[test]
fn graders_must_match_rubric_leaves() {
    // A leaf without a grader.
    let missing = SPEC.replacen("\"report\": Llm((files: [\"report.md\"])),", "", 1);
    let (_tmp, dir, err) = load_err(&missing, RUBRIC);
    let msg = err.to_string();
    match &err {
        TaskError::Invalid { file, node, .. } => {
            assert_eq!(file, &dir.join("task.ron"));
            assert_eq!(node, "graders[\"report\"]");
        }
        other => panic!("expected an invalid node, got {other:?}"),
    }
    assert!(msg.contains("root \"root\" > [1] \"report\""), "{msg}");

    // A grader for a node with sub_tasks.
    let non_leaf = SPEC.replacen(
        "\"report\": Llm",
        "\"experiments\": Llm((files: [\"a.md\"])),\n        \"report\": Llm",
        1,
    );
    let (_tmp, _, err) = load_err(&non_leaf, RUBRIC);
    let msg = err.to_string();
    assert!(msg.contains("graders[\"experiments\"]"), "{msg}");
    assert!(msg.contains("not a leaf"), "{msg}");

    // A grader for an id the rubric does not have.
    let unknown = SPEC.replacen(
        "\"report\": Llm",
        "\"exp9\": Llm((files: [\"a.md\"])),\n        \"report\": Llm",
        1,
    );
    let (_tmp, _, err) = load_err(&unknown, RUBRIC);
    let msg = err.to_string();
    assert!(
        msg.contains("graders[\"exp9\"]") && msg.contains("no node"),
        "{msg}"
    );

    // Two graders for one leaf.
    let twice = SPEC.replacen(
        "\"report\": Llm",
        "\"exp1\": Llm((files: [\"a.md\"])),\n        \"report\": Llm",
        1,
    );
    let (_tmp, _, err) = load_err(&twice, RUBRIC);
    let msg = err.to_string();
    assert!(msg.contains("two graders") && msg.contains("exp1"), "{msg}");

    // An LLM grader may not read outside the episode.
    let escape = SPEC.replacen(
        "[\"report.md\"]",
        "[\"report.md\", \"../../etc/passwd\"]",
        1,
    );
    let (_tmp, _, err) = load_err(&escape, RUBRIC);
    let msg = err.to_string();
    assert!(msg.contains("graders[\"report\"].files[1]"), "{msg}");

    // A check with no condition would pass everything.
    let vacuous = SPEC.replacen(
        "Check((command: \"grep exp2 results.txt\"))",
        "Check((command: \"true\", exit_code: None))",
        1,
    );
    let (_tmp, _, err) = load_err(&vacuous, RUBRIC);
    assert!(err.to_string().contains("no condition"), "{err}");

    // No tools.
    let no_tools = SPEC.replacen("tools: [", "tools: [], old: [", 1);
    let (_tmp, _, err) = load_err(&no_tools, RUBRIC);
    assert!(err.to_string().contains("old"), "unknown field: {err}");
    let no_tools = "(tools: [], budget: (turns: 1, tokens: 1), graders: {})";
    let err = TaskSpec::parse(Path::new("t/task.ron"), no_tools).expect_err("no tools");
    assert!(
        matches!(&err, TaskError::Invalid { node, .. } if node == "tools"),
        "{err}"
    );
}

#[test]
fn invalid_rubrics_name_the_node() {
    let no_category = RUBRIC.replacen(",\n         \"task_category\": \"Code Execution\"}", "}", 1);
    assert_ne!(no_category, RUBRIC);
    let (_tmp, dir, err) = load_err(SPEC, &no_category);
    let msg = err.to_string();
    assert!(matches!(err, TaskError::Rubric { .. }), "{msg}");
    assert!(
        msg.starts_with(&dir.join("rubric.json").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("\"exp2\""), "{msg}");
}

#[test]
fn task_sets_sort_skip_and_refuse_half_tasks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    write_task(&root.join("b-task"), SPEC, RUBRIC);
    write_task(&root.join("a-task"), SPEC, RUBRIC);
    write_task(&root.join("c-task"), SPEC, RUBRIC);
    std::fs::create_dir(root.join("notes")).expect("mkdir");
    std::fs::write(root.join("notes/todo.txt"), "x").expect("write");
    std::fs::write(root.join("README.md"), "tasks").expect("write");
    let set = TaskSet::load_dir(root).expect("loads");
    let names: Vec<&str> = set.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a-task", "b-task", "c-task"]);
    assert!(set.get("b-task").is_some());

    // A folder that looks like a task but lacks task.ron is an error, not skipped.
    std::fs::create_dir(root.join("d-task")).expect("mkdir");
    std::fs::write(root.join("d-task/paper.md"), "# half").expect("write");
    let err = TaskSet::load_dir(root).expect_err("half task");
    assert!(err.to_string().contains("d-task"), "{err}");
    std::fs::remove_dir_all(root.join("d-task")).expect("rm");

    // One malformed task fails the set, naming it.
    std::fs::write(root.join("b-task/task.ron"), "(tools: [").expect("write");
    let err = TaskSet::load_dir(root).expect_err("malformed");
    assert!(err.to_string().contains("b-task"), "{err}");

    // `files` must be a directory when present.
    std::fs::write(root.join("b-task/task.ron"), SPEC).expect("write");
    std::fs::remove_dir_all(root.join("b-task/files")).expect("rm");
    std::fs::write(root.join("b-task/files"), "oops").expect("write");
    let err = TaskSet::load_dir(root).expect_err("files is a file");
    assert!(err.to_string().contains("files"), "{err}");
}

#[test]
fn oversized_paper_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = write_task(&tmp.path().join("big"), SPEC, RUBRIC);
    std::fs::write(dir.join("paper.md"), vec![b'a'; (1 << 20) + 1]).expect("write");
    let err = Task::load(&dir).expect_err("too large");
    assert!(
        err.to_string().contains("paper.md") && err.to_string().contains("limit"),
        "{err}"
    );
}

// ---- check grader ----

fn final_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("results.txt"), "exp1 0.93\nexp2 0.71\n").expect("write");
    std::fs::create_dir(dir.path().join("logs")).expect("mkdir");
    std::fs::write(dir.path().join("logs/run.log"), "ok\n").expect("write");
    dir
}

fn check(command: &str) -> CheckSpec {
    CheckSpec {
        command: command.into(),
        exit_code: Some(0),
        stdout: None,
        stdout_contains: None,
    }
}

#[test]
fn check_passes_and_fails_on_exit_code_and_output() {
    let (host, registry) = (host(), registry());
    let files = final_files();
    let run = |spec: &CheckSpec| {
        run_check(
            &host,
            &registry,
            files.path(),
            spec,
            CallLimits::default(),
            3,
        )
        .expect("no host failure")
    };

    let v = run(&CheckSpec {
        stdout: Some("1\n".into()),
        ..check("grep -c 'exp1 ' results.txt")
    });
    assert!(v.passed, "{}", v.explanation);

    let v = run(&check("grep exp3 results.txt"));
    assert!(!v.passed);
    assert!(
        v.explanation.contains("exit code 1, expected 0"),
        "{}",
        v.explanation
    );
    assert_eq!(v.outcome.as_ref().and_then(|o| o.exit_code()), Some(1));

    // Expecting a failure works too.
    let v = run(&CheckSpec {
        exit_code: Some(1),
        ..check("grep exp3 results.txt")
    });
    assert!(v.passed, "{}", v.explanation);

    let v = run(&CheckSpec {
        stdout: Some("exp2 0.70\n".into()),
        ..check("grep exp2 results.txt")
    });
    assert!(!v.passed);
    assert!(
        v.explanation.contains("stdout is not") && v.explanation.contains("exp2 0.71"),
        "{}",
        v.explanation
    );

    let v = run(&CheckSpec {
        exit_code: None,
        stdout_contains: Some("0.71".into()),
        ..check("cat results.txt logs/run.log")
    });
    assert!(v.passed, "{}", v.explanation);

    let v = run(&CheckSpec {
        stdout_contains: Some("0.99".into()),
        ..check("cat results.txt")
    });
    assert!(!v.passed);
    assert!(
        v.explanation.contains("does not contain \"0.99\""),
        "{}",
        v.explanation
    );
}

#[test]
fn a_looping_check_fails_naming_the_limit() {
    let files = final_files();
    let limits = CallLimits {
        fuel: 5_000_000,
        ..CallLimits::default()
    };
    let v = run_check(
        &host(),
        &registry(),
        files.path(),
        &check("seq 1 1000000000 | wc -l"),
        limits,
        3,
    )
    .expect("a limit is not a host failure");
    assert!(!v.passed);
    assert_eq!(
        v.outcome.as_ref().and_then(|o| o.limit()),
        Some(Limit::Fuel)
    );
    assert!(v.explanation.contains("call fuel"), "{}", v.explanation);
}

#[test]
fn a_check_cannot_modify_the_final_files() {
    let files = final_files();
    let v = run_check(
        &host(),
        &registry(),
        files.path(),
        &check("rm -rf * && ls"),
        CallLimits::default(),
        3,
    )
    .expect("runs");
    assert!(v.passed, "{}", v.explanation);
    assert_eq!(
        v.outcome.as_ref().map(|o| o.stdout.as_str()),
        Some(""),
        "the copy was emptied"
    );
    assert_eq!(
        std::fs::read_to_string(files.path().join("results.txt")).expect("original survives"),
        "exp1 0.93\nexp2 0.71\n"
    );
    assert!(files.path().join("logs/run.log").is_file());
}

#[cfg(unix)]
#[test]
fn symlinks_out_of_the_final_files_are_not_followed() {
    let outside = tempfile::tempdir().expect("tmp");
    std::fs::write(outside.path().join("secret.txt"), "TOP SECRET\n").expect("write");
    let files = final_files();
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        files.path().join("leak.txt"),
    )
    .expect("symlink");
    std::os::unix::fs::symlink(outside.path(), files.path().join("leakdir")).expect("symlink");

    let v = run_check(
        &host(),
        &registry(),
        files.path(),
        &CheckSpec {
            exit_code: None,
            stdout_contains: Some("SECRET".into()),
            ..check("cat leak.txt leakdir/secret.txt")
        },
        CallLimits::default(),
        3,
    )
    .expect("runs");
    assert!(!v.passed, "the secret leaked: {}", v.explanation);

    let v = run_check(
        &host(),
        &registry(),
        files.path(),
        &check("ls"),
        CallLimits::default(),
        3,
    )
    .expect("runs");
    let listing = v.outcome.map(|o| o.stdout).unwrap_or_default();
    assert!(listing.contains("results.txt"), "{listing}");
    assert!(!listing.contains("leak"), "{listing}");

    let dest = tempfile::tempdir().expect("tmp");
    let stats =
        copy_tree(files.path(), &dest.path().join("c"), CopyBounds::default()).expect("copies");
    assert_eq!((stats.files, stats.dirs, stats.skipped), (2, 1, 2));
}

#[test]
fn final_files_over_the_copy_bound_fail_the_check() {
    let files = final_files();
    let v = run_check_bounded(
        &host(),
        &registry(),
        files.path(),
        &check("true"),
        CallLimits::default(),
        3,
        CopyBounds {
            max_entries: 100,
            max_bytes: 10,
        },
    )
    .expect("a bound is the submission's fault, not the host's");
    assert!(!v.passed);
    assert!(v.outcome.is_none());
    assert!(v.explanation.contains("10 bytes"), "{}", v.explanation);
}

#[test]
fn missing_final_files_are_a_host_failure() {
    let tmp = tempfile::tempdir().expect("tmp");
    let err = run_check(
        &host(),
        &registry(),
        &tmp.path().join("nope"),
        &check("true"),
        CallLimits::default(),
        3,
    )
    .expect_err("no final files");
    assert!(matches!(err, CheckError::Copy(_)), "{err}");
}
