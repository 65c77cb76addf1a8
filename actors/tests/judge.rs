//! The Judge actor: priority order, the concurrency and queue bounds, and failures that stay
//! infrastructure failures instead of becoming scores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use klong_actors::environment::task::Task;
use klong_actors::judge::queue::{
    FinishedEpisode, GradeReply, Judge, JudgeArgs, JudgeContext, JudgeFailure, JudgeMsg,
};
use klong_sandbox::{ByteSize, CallLimits, HostSettings, HumanDuration, SandboxHost, ToolRegistry};
use ractor::{Actor, ActorRef};

fn host() -> Arc<SandboxHost> {
    SandboxHost::new(HostSettings {
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klong-module-cache")),
        ..HostSettings::default()
    })
    .expect("sandbox host")
}

fn registry() -> Arc<ToolRegistry> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../sandboxes/tools/manifests");
    assert!(
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sandboxes/tools/wasm/coreutils.wasm"
        ))
        .exists(),
        "guest tools are not built: run sandboxes/tools/build.sh"
    );
    Arc::new(ToolRegistry::load_dir(Path::new(dir)).expect("registry"))
}

/// A task with two weighted check leaves (`a.txt` exists: weight 3; `b.txt` says "yes":
/// weight 1), plus optionally a leaf graded by an LLM, or a slow leaf.
fn write_task(root: &Path, name: &str, extra: Option<&str>) -> Task {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::write(dir.join("paper.md"), "Write a.txt, and b.txt saying yes.\n").unwrap();
    let mut leaves = vec![
        r#"{"id": "a", "requirements": "a.txt exists", "weight": 3, "sub_tasks": [], "task_category": "Code Execution"}"#.to_string(),
        r#"{"id": "b", "requirements": "b.txt says yes", "weight": 1, "sub_tasks": [], "task_category": "Result Analysis"}"#.to_string(),
    ];
    let mut graders = vec![
        r#""a": Check((command: "test -f a.txt || ls a.txt"))"#.to_string(),
        r#""b": Check((command: "cat b.txt", stdout: Some("yes\n")))"#.to_string(),
    ];
    match extra {
        Some("llm") => {
            leaves.push(r#"{"id": "c", "requirements": "the report is good", "weight": 1, "sub_tasks": [], "task_category": "Result Analysis"}"#.into());
            graders.push(r#""c": Llm((files: ["report.md"]))"#.into());
        }
        Some("slow") => {
            leaves.push(r#"{"id": "c", "requirements": "slow", "weight": 1, "sub_tasks": [], "task_category": "Code Execution"}"#.into());
            graders.push(r#""c": Check((command: "python -c 'while True: pass'"))"#.into());
        }
        _ => {}
    }
    let rubric = format!(
        r#"{{"id": "root", "requirements": "all", "weight": 1, "sub_tasks": [{}]}}"#,
        leaves.join(",")
    );
    std::fs::write(dir.join("rubric.json"), rubric).unwrap();
    let spec = format!(
        "(tools: [\"bash\", \"submit\"], budget: (turns: 10, tokens: 1000), graders: {{ {} }})",
        graders.join(", ")
    );
    std::fs::write(dir.join("task.ron"), spec).unwrap();
    Task::load(&dir).unwrap_or_else(|e| panic!("task loads: {e}"))
}

fn final_dir(root: &Path, name: &str, a: bool, b: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    if a {
        std::fs::write(dir.join("a.txt"), "").unwrap();
    }
    std::fs::write(dir.join("b.txt"), b).unwrap();
    dir
}

async fn judge(
    check_limits: CallLimits,
    max_concurrent: usize,
    max_queued: usize,
) -> ActorRef<JudgeMsg> {
    let ctx = Arc::new(JudgeContext {
        host: host(),
        registry: registry(),
        check_limits,
        llm: None,
        seed: 1,
    });
    let (actor, _handle) = Actor::spawn(
        None,
        Judge,
        JudgeArgs {
            ctx,
            max_concurrent,
            max_queued,
        },
    )
    .await
    .expect("judge starts");
    actor
}

async fn grade(judge: &ActorRef<JudgeMsg>, episode: FinishedEpisode, priority: i64) -> GradeReply {
    judge
        .call(
            |reply| JudgeMsg::Grade {
                episode,
                priority,
                reply,
            },
            Some(Duration::from_secs(60)),
        )
        .await
        .expect("judge reachable")
        .success_or(())
        .expect("judge answered in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grades_leaves_and_weights_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let task = Arc::new(write_task(tmp.path(), "t", None));
    let judge = judge(CallLimits::default(), 2, 16).await;
    let cases = [
        (true, "yes\n", 1.0),
        (true, "no\n", 0.75),
        (false, "yes\n", 0.25),
        (false, "", 0.0),
    ];
    for (i, (a, b, expected)) in cases.into_iter().enumerate() {
        let dir = final_dir(tmp.path(), &format!("final{i}"), a, b);
        let graded = grade(
            &judge,
            FinishedEpisode {
                episode_id: i as u64,
                task: task.clone(),
                final_dir: dir,
            },
            0,
        )
        .await
        .expect("graded");
        assert!(
            (graded.score - expected).abs() < 1e-12,
            "case {i}: {} != {expected}",
            graded.score
        );
        assert_eq!(graded.leaves.len(), 2);
        assert_eq!(graded.episode_id, i as u64);
        let b_leaf = graded.leaves.iter().find(|l| l.leaf_id == "b").unwrap();
        assert_eq!(b_leaf.passed, b == "yes\n");
        if !b_leaf.passed {
            assert!(!b_leaf.explanation.is_empty());
        }
    }
    judge.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_is_graded_first() {
    let tmp = tempfile::tempdir().unwrap();
    // The slow leaf spins (python) until its 400 ms wall time: the first episode holds the
    // only slot while the others queue.
    let slow = Arc::new(write_task(tmp.path(), "slow", Some("slow")));
    let fast = Arc::new(write_task(tmp.path(), "fast", None));
    let limits = CallLimits {
        wall_time: HumanDuration::from_millis(400),
        fuel: u64::MAX / 4,
        ..CallLimits::default()
    };
    let judge = judge(limits, 1, 16).await;
    let dir = final_dir(tmp.path(), "final", true, "yes\n");
    let first = {
        let (judge, slow, dir) = (judge.clone(), slow.clone(), dir.clone());
        tokio::spawn(async move {
            grade(
                &judge,
                FinishedEpisode {
                    episode_id: 0,
                    task: slow,
                    final_dir: dir,
                },
                0,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut waiting = Vec::new();
    for (id, priority) in [(1u64, 1i64), (2, 5), (3, 3), (4, 5)] {
        let (judge, fast, dir) = (judge.clone(), fast.clone(), dir.clone());
        waiting.push(tokio::spawn(async move {
            let graded = grade(
                &judge,
                FinishedEpisode {
                    episode_id: id,
                    task: fast,
                    final_dir: dir,
                },
                priority,
            )
            .await;
            (Instant::now(), graded.expect("graded").episode_id)
        }));
        // Enqueue in a known order (the actor handles messages in arrival order).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slow_graded = first.await.unwrap().expect("slow episode graded");
    assert!(
        slow_graded.score < 1.0,
        "the slow leaf hit its wall time and failed"
    );
    let mut done = Vec::new();
    for w in waiting {
        done.push(w.await.unwrap());
    }
    done.sort();
    let order: Vec<u64> = done.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        order,
        vec![2, 4, 3, 1],
        "priority first, arrival order among equals"
    );
    judge.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_instead_of_growing() {
    let tmp = tempfile::tempdir().unwrap();
    let slow = Arc::new(write_task(tmp.path(), "slow", Some("slow")));
    let limits = CallLimits {
        wall_time: HumanDuration::from_millis(300),
        fuel: u64::MAX / 4,
        ..CallLimits::default()
    };
    let judge = judge(limits, 1, 1).await;
    let dir = final_dir(tmp.path(), "final", true, "yes\n");
    let mut running = Vec::new();
    for id in 0..2u64 {
        let (judge, slow, dir) = (judge.clone(), slow.clone(), dir.clone());
        running.push(tokio::spawn(async move {
            grade(
                &judge,
                FinishedEpisode {
                    episode_id: id,
                    task: slow,
                    final_dir: dir,
                },
                0,
            )
            .await
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = grade(
        &judge,
        FinishedEpisode {
            episode_id: 9,
            task: slow.clone(),
            final_dir: dir.clone(),
        },
        0,
    )
    .await;
    assert!(
        matches!(refused, Err(JudgeFailure::Overloaded(1))),
        "{refused:?}"
    );
    for r in running {
        assert!(r.await.unwrap().is_ok(), "queued episodes are still graded");
    }
    // And the judge keeps working afterwards.
    assert!(grade(
        &judge,
        FinishedEpisode {
            episode_id: 10,
            task: slow,
            final_dir: dir
        },
        0
    )
    .await
    .is_ok());
    judge.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judge_failures_are_infrastructure_failures_not_zero_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let judge = judge(CallLimits::default(), 2, 16).await;
    let dir = final_dir(tmp.path(), "final", true, "yes\n");

    // An LLM leaf with no LLM grader configured.
    let llm_task = Arc::new(write_task(tmp.path(), "llm", Some("llm")));
    let r = grade(
        &judge,
        FinishedEpisode {
            episode_id: 1,
            task: llm_task,
            final_dir: dir.clone(),
        },
        0,
    )
    .await;
    assert!(
        matches!(&r, Err(JudgeFailure::NoLlmGrader { leaf }) if leaf == "c"),
        "{r:?}"
    );

    // The final state vanished: the check cannot run.
    let task = Arc::new(write_task(tmp.path(), "t", None));
    let r = grade(
        &judge,
        FinishedEpisode {
            episode_id: 2,
            task,
            final_dir: tmp.path().join("gone"),
        },
        0,
    )
    .await;
    assert!(
        matches!(
            &r,
            Err(JudgeFailure::FinalState { .. }) | Err(JudgeFailure::Check { .. })
        ),
        "{r:?}"
    );
    judge.stop(None);
}

#[test]
fn limits_are_typed_in_the_explanation() {
    // A check stopped by its own limit is the submission's fault: a failed leaf, with the limit
    // named, not an infrastructure failure.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let task = Arc::new(write_task(tmp.path(), "slow", Some("slow")));
        let limits = CallLimits {
            fuel: 5_000_000,
            stdout: ByteSize::kib(64),
            ..CallLimits::default()
        };
        let judge = judge(limits, 1, 4).await;
        let dir = final_dir(tmp.path(), "final", true, "yes\n");
        let graded = grade(
            &judge,
            FinishedEpisode {
                episode_id: 0,
                task,
                final_dir: dir,
            },
            0,
        )
        .await
        .expect("graded");
        let c = graded.leaves.iter().find(|l| l.leaf_id == "c").unwrap();
        assert!(!c.passed);
        assert!(c.explanation.contains("fuel"), "{}", c.explanation);
        assert!((graded.score - 0.8).abs() < 1e-12, "{}", graded.score);
        judge.stop(None);
    });
}
