//! The built-in task family ("reproduce a small paper") and its scripted expert, end to end:
//! generation, task folders, the `simulate` guest against its Rust port, and the expert's
//! episodes through the real sandbox, graded by the tasks' own check graders.
//!
//! Runtime: about 5,000 tool calls and 3,000 checks, each well under a millisecond of guest
//! time; the tests spread episodes over the machine's cores.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use klong_actors::environment::expert::{run_episode, ExpertEpisode, ScriptedExpert};
use klong_actors::environment::family::{
    self, generate, held_out, simulate_metric, write_task, GeneratedTask, HELD_OUT_SEEDS_FROM,
    MAX_HORIZON, RESULTS_FILE,
};
use klong_actors::environment::task::{copy_tree, CopyBounds, GraderSpec, Task};
use klong_actors::judge::check::run_check;
use klong_actors::judge::rubric::RubricNode;
use klong_sandbox::{CallLimits, EpisodeBudget, HostSettings, Sandbox, SandboxHost, ToolRegistry};
use serde_json::json;

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sandboxes/tools/manifests");

fn env() -> &'static (Arc<SandboxHost>, Arc<ToolRegistry>) {
    static ENV: OnceLock<(Arc<SandboxHost>, Arc<ToolRegistry>)> = OnceLock::new();
    ENV.get_or_init(|| {
        let host = SandboxHost::new(HostSettings {
            cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klong-module-cache")),
            ..Default::default()
        })
        .expect("sandbox host");
        let registry = ToolRegistry::load_dir(Path::new(MANIFESTS)).expect("tool registry");
        (host, Arc::new(registry))
    })
}

fn sandbox(dir: &Path, seed: u64) -> Sandbox {
    let (host, registry) = env();
    Sandbox::new(
        host.clone(),
        registry.clone(),
        dir,
        CallLimits::default(),
        EpisodeBudget::default(),
        seed,
    )
    .expect("sandbox")
}

/// Grades every leaf with the judge's check grader, which copies the final files for each
/// check: leaf id -> 0/1.
fn grade(task: &GeneratedTask, final_files: &Path) -> BTreeMap<String, f64> {
    let (host, registry) = env();
    let mut grades = BTreeMap::new();
    for leaf in task.rubric.leaves() {
        let Some(GraderSpec::Check(spec)) = task.spec.graders.get(&leaf.id) else {
            panic!("leaf {} has no check grader", leaf.id);
        };
        let verdict = run_check(host, registry, final_files, spec, CallLimits::default(), 0)
            .expect("check grader infrastructure");
        grades.insert(leaf.id.clone(), if verdict.passed { 1.0 } else { 0.0 });
    }
    grades
}

/// [`grade`] with one copy of the final files for all the checks (each still in a fresh
/// sandbox). The family's checks only read (`grep`), so sharing the copy cannot change a
/// verdict, and it halves the cost of grading the long episodes; `the_graders_catch_wrong_work`
/// checks that both agree.
fn grade_fast(task: &GeneratedTask, final_files: &Path) -> BTreeMap<String, f64> {
    let copy = tempfile::tempdir().expect("tempdir");
    copy_tree(final_files, copy.path(), CopyBounds::default()).expect("copy final files");
    let mut grades = BTreeMap::new();
    for leaf in task.rubric.leaves() {
        let Some(GraderSpec::Check(spec)) = task.spec.graders.get(&leaf.id) else {
            panic!("leaf {} has no check grader", leaf.id);
        };
        let out = sandbox(copy.path(), 0)
            .exec("bash", &json!({ "command": spec.command }))
            .expect("check infrastructure");
        let passed = spec.exit_code.is_none_or(|c| out.exit_code() == Some(c))
            && spec.stdout.as_ref().is_none_or(|s| &out.stdout == s)
            && spec
                .stdout_contains
                .as_ref()
                .is_none_or(|s| out.stdout.contains(s.as_str()));
        grades.insert(leaf.id.clone(), if passed { 1.0 } else { 0.0 });
    }
    grades
}

/// The rubric's score under the judge's own scoring.
fn score(node: &RubricNode, grades: &BTreeMap<String, f64>) -> f64 {
    klong_actors::judge::rubric::score(node, grades, klong_actors::judge::rubric::Variant::Full)
        .expect("every leaf graded")
        .score
}

struct Solved {
    episode: ExpertEpisode,
    score: f64,
}

/// One expert episode on a fresh copy of the task's files, graded.
fn solve(task: &GeneratedTask, noise: f64, expert_seed: u64) -> Solved {
    let dir = tempfile::tempdir().expect("tempdir");
    task.write_files_into(dir.path()).expect("task files");
    let mut sb = sandbox(dir.path(), task.seed);
    let mut expert = ScriptedExpert::new(noise, expert_seed);
    let episode =
        run_episode(&mut sb, &mut expert, task.spec.budget.turns).expect("no host failure");
    let grades = grade_fast(task, dir.path());
    Solved {
        episode,
        score: score(&task.rubric, &grades),
    }
}

/// Runs `f` over `items` on the machine's cores, keeping the order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                slots.lock().expect("no poisoned lock")[i] = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

#[test]
fn generation_is_deterministic_and_seeds_differ() {
    let a = generate(7, 12);
    assert_eq!(a, generate(7, 12), "same (seed, horizon), same task");
    assert_eq!(a.name, "repro-s7-h12");
    assert_eq!(a.experiments.len(), 12);
    assert_eq!(a.files.len(), 13, "12 configs and paper.md");
    let b = generate(8, 12);
    assert_ne!(a.files, b.files);
    assert_ne!(a.rubric, b.rubric);
    assert_ne!(a.spec, b.spec);
    // A shorter horizon is a prefix of a longer one with the same seed.
    let short = generate(7, 5);
    assert_eq!(short.experiments[..], a.experiments[..5]);
    assert!(short.files[..5] == a.files[..5], "the configs are a prefix");
    // Horizons are bounded.
    assert_eq!(generate(1, 0).horizon, 1);
    assert_eq!(generate(1, u32::MAX).horizon, MAX_HORIZON);
    // The split.
    assert!(!held_out(0) && !held_out(HELD_OUT_SEEDS_FROM - 1));
    assert!(held_out(HELD_OUT_SEEDS_FROM) && held_out(u64::MAX));

    // Tasks vary in what an agent must read: the metric, the parameters, the key order.
    let metrics: BTreeSet<&str> = (0..40).map(|s| generate(s, 1).metric).collect();
    assert!(metrics.len() >= 3, "{metrics:?}");
    let big = generate(3, 200);
    let models: BTreeSet<&str> = big.experiments.iter().map(|e| e.model).collect();
    assert_eq!(models.len(), 4);
    let first_keys: BTreeSet<String> = big
        .files
        .iter()
        .filter(|(p, _)| p.starts_with("configs/"))
        .filter_map(|(_, b)| {
            let text = String::from_utf8_lossy(b).into_owned();
            text.lines()
                .find(|l| !l.starts_with('#'))
                .map(|l| l.split('=').next().unwrap_or_default().trim().to_string())
        })
        .collect();
    assert!(first_keys.len() >= 4, "{first_keys:?}");

    // The rubric is valid, its ids unique, every leaf has a check grader and vice versa, and
    // the paper stays small whatever the horizon (it is the pinned prefix).
    for t in [&a, &big, &generate(5, MAX_HORIZON)] {
        t.rubric.validate().expect("valid rubric");
        let leaves: BTreeSet<&str> = t.rubric.leaves().map(|l| l.id.as_str()).collect();
        assert_eq!(leaves.len(), 2 * t.experiments.len() + 1);
        let graded: BTreeSet<&str> = t.spec.graders.keys().map(String::as_str).collect();
        assert_eq!(leaves, graded);
        assert!(t
            .spec
            .graders
            .values()
            .all(|g| matches!(g, GraderSpec::Check(_))));
        assert!(t.paper.len() < 4096, "{}", t.paper.len());
        assert!(t.paper.contains(&format!(
            "- Experiments: {} (`exp1` to `exp{}`)",
            t.horizon, t.horizon
        )));
        assert!(t.spec.budget.turns >= 4 * t.horizon + 10);
    }
    // The experiments weigh 4/5 of the score, the report 1/5.
    let weights: Vec<f64> = a.rubric.sub_tasks.iter().map(|c| c.weight).collect();
    assert_eq!(weights, [4.0, 1.0]);
    assert!(a.report_line.starts_with("best: exp"));
}

#[test]
fn written_tasks_load_and_are_replaced_whole() {
    let parent = tempfile::tempdir().expect("tempdir");
    for (seed, horizon) in [(1, 1), (2, 30), (HELD_OUT_SEEDS_FROM + 4, 100)] {
        let task = generate(seed, horizon);
        let dir = write_task(parent.path(), &task).expect("write task");
        assert_eq!(dir, parent.path().join(&task.name));
        let loaded = Task::load(&dir).expect("the task folder loads");
        assert_eq!(loaded.name, task.name);
        assert_eq!(loaded.paper, task.paper);
        assert_eq!(loaded.rubric, task.rubric);
        assert_eq!(loaded.spec, task.spec);
        loaded
            .check_tools(&env().1)
            .expect("the tools exist for agents");
        // The initial files round-trip through the folder.
        let episode = tempfile::tempdir().expect("tempdir");
        loaded
            .copy_files_into(episode.path(), CopyBounds::default())
            .expect("copy files");
        for (rel, bytes) in &task.files {
            assert_eq!(
                &std::fs::read(episode.path().join(rel)).expect("file"),
                bytes
            );
        }
        // Writing again replaces the folder (a stray file disappears), atomically.
        std::fs::write(dir.join("files/stray.txt"), "x").expect("stray");
        write_task(parent.path(), &task).expect("rewrite");
        assert!(!dir.join("files/stray.txt").exists());
    }
    let names: Vec<String> = std::fs::read_dir(parent.path())
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(names.len(), 3, "no temporary folders left: {names:?}");
}

#[test]
fn the_simulator_matches_its_rust_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sb = sandbox(dir.path(), 0);
    // Every model and metric, awkward rates, step counts and seeds at their bounds.
    let models = ["mlp", "cnn", "rnn", "transformer"];
    let metrics = ["accuracy", "f1", "auroc", "recall"];
    let rates = [
        "0.000001", "0.0003", ".5", "1", "1.", "0.003", "0.1", "0.999999",
    ];
    let steps = [1u64, 7, 300, 5000, 1_000_000];
    let seeds = [0u64, 1, 99_999, 4_294_967_295];
    let mut cases = Vec::new();
    let mut i = 0usize;
    for m in models {
        for r in rates {
            for s in steps {
                cases.push((m, r, s, seeds[i % seeds.len()], metrics[i % metrics.len()]));
                i += 1;
            }
        }
    }
    for chunk in cases.chunks(40) {
        let line = chunk
            .iter()
            .map(|(m, r, s, seed, metric)| {
                format!("simulate --model {m} --lr {r} --steps {s} --seed {seed} --metric {metric} | tail -n 1")
            })
            .collect::<Vec<_>>()
            .join(" ; ");
        let out = sb
            .exec("bash", &json!({ "command": line }))
            .expect("bash runs");
        assert!(out.success(), "{out:?}");
        let got: Vec<&str> = out.stdout.lines().collect();
        let want: Vec<String> = chunk
            .iter()
            .map(|(m, r, s, seed, metric)| {
                let v = simulate_metric(m, r, *s, *seed, metric).expect("valid parameters");
                format!("{metric}={}", family::format_metric(v))
            })
            .collect();
        assert_eq!(got, want);
    }
    // The full log: a header, four progress lines, the metric line.
    let out = sb
        .exec(
            "bash",
            &json!({ "command": "simulate --model cnn --lr 0.003 --steps 200 --seed 7 --metric f1" }),
        )
        .expect("bash runs");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", out.stdout);
    assert_eq!(
        lines[0],
        "simulate: model=cnn lr=0.003 steps=200 seed=7 metric=f1"
    );
    assert!(lines[4].starts_with("step 200/200 loss="));
    // Invalid parameters: exit 2 with a message, and the port says None.
    for (args, port) in [
        (
            "--model cnn --lr 1.5 --steps 10 --seed 1",
            simulate_metric("cnn", "1.5", 10, 1, "accuracy"),
        ),
        (
            "--model cnn --lr 0 --steps 10 --seed 1",
            simulate_metric("cnn", "0", 10, 1, "accuracy"),
        ),
        (
            "--model cnn --lr 1e-3 --steps 10 --seed 1",
            simulate_metric("cnn", "1e-3", 10, 1, "accuracy"),
        ),
        (
            "--model cnn --lr 0.0000001 --steps 10 --seed 1",
            simulate_metric("cnn", "0.0000001", 10, 1, "accuracy"),
        ),
        (
            "--model vit --lr 0.1 --steps 10 --seed 1",
            simulate_metric("vit", "0.1", 10, 1, "accuracy"),
        ),
        (
            "--model cnn --lr 0.1 --steps 0 --seed 1",
            simulate_metric("cnn", "0.1", 0, 1, "accuracy"),
        ),
        (
            "--model cnn --lr 0.1 --steps 1000001 --seed 1",
            simulate_metric("cnn", "0.1", 1_000_001, 1, "accuracy"),
        ),
        (
            "--model cnn --lr 0.1 --steps 10 --seed 4294967296",
            simulate_metric("cnn", "0.1", 10, 4_294_967_296, "accuracy"),
        ),
        (
            "--model cnn --lr 0.1 --steps 10 --seed 1 --metric bleu",
            simulate_metric("cnn", "0.1", 10, 1, "bleu"),
        ),
        ("--model cnn --lr 0.1 --steps 10", None),
        ("--model cnn --lr 0.1 --steps 10 --seed", None),
        ("--model cnn --lr 0.1 --steps -5 --seed 1", None),
        ("--model cnn --lr 0.1 --steps 10 --seed 1 --batch 3", None),
    ] {
        assert_eq!(port, None, "{args}");
        let out = sb
            .exec("bash", &json!({ "command": format!("simulate {args}") }))
            .expect("bash runs");
        assert_eq!(out.exit_code(), Some(2), "{args}: {out:?}");
        assert!(out.stdout.is_empty(), "{args}");
        assert!(
            out.stderr.starts_with("simulate: "),
            "{args}: {}",
            out.stderr
        );
    }
}

#[test]
fn the_expert_without_noise_scores_one_on_fifty_tasks() {
    // 50 tasks: 12 each at horizons 1, 3 and 10, 13 at 30, one at 250 (two pages of
    // results to read back); some held out.
    let mut jobs: Vec<(u64, u32)> = Vec::new();
    for (i, h) in [1u32, 3, 10].into_iter().enumerate() {
        for j in 0..12u64 {
            jobs.push((100 * i as u64 + j, h));
        }
    }
    for j in 0..13u64 {
        jobs.push((HELD_OUT_SEEDS_FROM + j, 30));
    }
    jobs.push((HELD_OUT_SEEDS_FROM + 77, 250));
    assert_eq!(jobs.len(), 50);
    let results = parallel(&jobs, |&(seed, horizon)| {
        let task = generate(seed, horizon);
        let solved = solve(&task, 0.0, seed);
        (task, solved)
    });
    for (task, solved) in &results {
        assert!(solved.episode.submitted, "{}: did not submit", task.name);
        let turns = solved.episode.transcript.len() as u32;
        // Paper, results read, 4 calls per experiment, results read back, report, submit.
        let pages = task.horizon.div_ceil(200);
        assert_eq!(turns, 4 * task.horizon + 4 + pages, "{}", task.name);
        assert!(turns <= task.spec.budget.turns, "{}", task.name);
        assert_eq!(solved.score, 1.0, "{}", task.name);
    }
}

#[test]
fn the_expert_with_noise_scores_about_one_minus_point_eight_p() {
    // With noise p, an experiment is skipped (loses both leaves) with probability p/2 and
    // mis-recorded (loses one leaf of two) with probability p/2: it keeps 1 - 0.75p of its
    // weight. The report is right iff the true best experiment was recorded right: 1 - p.
    // With weights 4:1, E[score] = 0.8 (1 - 0.75p) + 0.2 (1 - p) = 1 - 0.8p.
    //
    // Tolerance: per task (N = 10), Var = 0.64 Var(L)/N + 0.04 p(1-p) (+ a small positive
    // covariance), with Var(L) = 0.625p - 0.5625p^2 the per-experiment loss variance; at
    // p = 0.6 that is about 0.021, so the mean of 30 tasks has a standard deviation of about
    // 0.027. 0.1 is almost 4 of them. The seeds are fixed, so the test is deterministic.
    const TASKS: u64 = 30;
    const TOLERANCE: f64 = 0.1;
    let tasks: Vec<GeneratedTask> = (0..TASKS).map(|s| generate(500 + s, 10)).collect();
    let mut means = Vec::new();
    let mut per_task: Vec<Vec<f64>> = Vec::new();
    for p in [0.3, 0.6] {
        let scores = parallel(&tasks, |t| solve(t, p, t.seed).score);
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        let expected = 1.0 - 0.8 * p;
        eprintln!("noise {p}: mean score {mean:.4} over {TASKS} tasks (expected {expected:.2})");
        assert!(mean < 1.0, "p = {p}: mean {mean}");
        assert!(
            (mean - expected).abs() <= TOLERANCE,
            "p = {p}: mean {mean}, expected {expected} ± {TOLERANCE}"
        );
        means.push(mean);
        per_task.push(scores);
    }
    assert!(means[1] < means[0], "{means:?}");
    // The expert's errors are coupled across noise levels (same draws): an experiment that
    // errs at 0.3 errs the same way at 0.6, so no task scores better with more noise.
    for (i, (a, b)) in per_task[0].iter().zip(&per_task[1]).enumerate() {
        assert!(b <= a, "task {i}: {b} at p = 0.6 > {a} at p = 0.3");
    }
}

#[test]
fn the_expert_is_reproducible_and_resumes_from_the_files() {
    let task = generate(42, 10);
    // Same seed, same behaviour (with noise, so that the draws matter).
    let a = solve(&task, 0.5, 9);
    let b = solve(&task, 0.5, 9);
    let calls = |s: &Solved| -> Vec<_> {
        s.episode
            .transcript
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    };
    assert_eq!(calls(&a), calls(&b));
    assert_eq!(a.score, b.score);

    // A truncated context: the first expert stops after 4 experiments (2 + 4 * 4 turns); a
    // fresh one, knowing nothing, reads results.txt and finishes the rest without redoing or
    // double-recording anything.
    let dir = tempfile::tempdir().expect("tempdir");
    task.write_files_into(dir.path()).expect("task files");
    let mut sb = sandbox(dir.path(), 1);
    let first =
        run_episode(&mut sb, &mut ScriptedExpert::new(0.0, 1), 2 + 4 * 4).expect("no host failure");
    assert!(!first.submitted);
    let recorded = std::fs::read_to_string(dir.path().join(RESULTS_FILE)).expect("results");
    assert_eq!(recorded.lines().count(), 4);
    let second =
        run_episode(&mut sb, &mut ScriptedExpert::new(0.0, 2), 1000).expect("no host failure");
    assert!(second.submitted);
    // Paper, results read, 6 experiments, results read back, report, submit.
    assert_eq!(second.transcript.len(), 2 + 4 * 6 + 3);
    let results = std::fs::read_to_string(dir.path().join(RESULTS_FILE)).expect("results");
    assert_eq!(results.lines().count(), 10);
    let grades = grade(&task, dir.path());
    assert_eq!(score(&task.rubric, &grades), 1.0);
}

#[test]
fn the_graders_catch_wrong_work() {
    let task = generate(11, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    task.write_files_into(dir.path()).expect("task files");
    let mut sb = sandbox(dir.path(), 0);
    let m = task.metric;
    let [e1, e2, e3] = &task.experiments[..] else {
        panic!("three experiments")
    };
    let run = |sb: &mut Sandbox, e: &family::Experiment, seed: u32, log: &str| {
        let cmd = format!(
            "simulate --model {} --lr {} --steps {} --seed {seed} --metric {m} > runs/{log}.log",
            e.model, e.lr, e.steps
        );
        let out = sb.exec("bash", &json!({ "command": cmd })).expect("bash");
        assert!(out.success(), "{out:?}");
    };
    // exp1 run with a wrong seed, and recorded (with its true value) twice; exp2 not run and
    // recorded under the name exp20; exp3 done right; a report naming the wrong experiment.
    let wrong_seed = e1.seed + 1;
    let wrong_value = simulate_metric(e1.model, e1.lr, e1.steps.into(), wrong_seed.into(), m)
        .map(family::format_metric);
    assert_ne!(
        wrong_value.as_deref(),
        Some(e1.value.as_str()),
        "the seed matters"
    );
    run(&mut sb, e1, wrong_seed, "exp1");
    run(&mut sb, e3, e3.seed, "exp3");
    let lines = format!(
        "exp1 {m}={v1}\nexp20 {m}={v2}\nexp3 {m}={v3}\nexp1 {m}={v1}\n",
        v1 = e1.value,
        v2 = e2.value,
        v3 = e3.value
    );
    std::fs::write(dir.path().join(RESULTS_FILE), lines).expect("results");
    let wrong_best = task
        .experiments
        .iter()
        .map(|e| format!("best: {} {m}={}", e.name, e.value))
        .find(|l| *l != task.report_line)
        .expect("another experiment");
    std::fs::write(dir.path().join(family::REPORT_FILE), wrong_best + "\n").expect("report");

    let grades = grade(&task, dir.path());
    assert_eq!(grades, grade_fast(&task, dir.path()), "both graders agree");
    let expected: BTreeMap<String, f64> = [
        ("exp1-run", 0.0),
        ("exp1-recorded", 0.0),
        ("exp2-run", 0.0),
        ("exp2-recorded", 0.0),
        ("exp3-run", 1.0),
        ("exp3-recorded", 1.0),
        ("report", 0.0),
    ]
    .into_iter()
    .map(|(id, g)| (id.to_string(), g))
    .collect();
    assert_eq!(grades, expected);
    // exp3 is one experiment of three, the experiments weigh 4/5.
    assert!((score(&task.rubric, &grades) - 0.8 / 3.0).abs() < 1e-12);

    // Fixing the report (with the right line among others) earns its 1/5.
    std::fs::write(
        dir.path().join(family::REPORT_FILE),
        format!("# Report\n\n{}\n", task.report_line),
    )
    .expect("report");
    assert_eq!(grade_fast(&task, dir.path())["report"], 1.0);
}
