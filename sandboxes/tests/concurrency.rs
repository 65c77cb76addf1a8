//! Many sandboxes at once from tokio tasks, and the host's bounded queue of executions.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use klong_sandbox::{
    CallLimits, EpisodeBudget, HostSettings, HumanDuration, Limit, Sandbox, SandboxError,
    SandboxHost, Termination, ToolRegistry,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sandboxes_at_once_stay_independent() {
    const SANDBOXES: usize = 32;
    let mut tasks = Vec::new();
    for i in 0..SANDBOXES {
        tasks.push(tokio::spawn(async move {
            let (dir, mut sb) = default_sandbox();
            let content = format!("sandbox {i}\n").repeat(i + 1);
            let out = sb
                .exec_async("write_file", json!({"file": "mine.txt", "content": content}))
                .await
                .unwrap();
            assert!(out.success(), "{i}: {out:?}");
            let out = sb
                .exec_async("bash", json!({"command": format!("seq 1 {} | wc -l; wc -l < mine.txt; ls", i * 10)}))
                .await
                .unwrap();
            assert_eq!(
                out.stdout,
                format!("{}\n{}\nmine.txt\n", i * 10, i + 1),
                "{i}: {out:?}"
            );
            let out = sb
                .exec_async("search_file", json!({"file": "mine.txt", "search_term": format!("sandbox {i}\n").trim_end(), "context_lines": 0, "page_size": 100}))
                .await
                .unwrap();
            assert!(
                out.stdout.ends_with(&format!("[matches 1-{n} of {n}, page 1 of 1]\n", n = i + 1)),
                "{i}: {out:?}"
            );
            let out = sb
                .exec_async("bash", json!({"command": "cat mine.txt | sort -u"}))
                .await
                .unwrap();
            assert_eq!(out.stdout, format!("sandbox {i}\n"), "{i}: {out:?}");
            // Each episode saw only its own file.
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["mine.txt"], "{i}");
            (i, sb.used())
        }));
    }
    for task in tasks {
        let (i, used) = task.await.expect("task finished");
        assert_eq!(used.files_created, 1, "{i}: {used:?}");
        assert_eq!(
            used.written_bytes,
            (format!("sandbox {i}\n").len() * (i + 1)) as u64
        );
    }
}

/// A host of its own (its own registry too: compiled modules belong to one host's engine).
fn tight_host() -> (Arc<SandboxHost>, Arc<ToolRegistry>) {
    warm_python_cache();
    let host = SandboxHost::new(HostSettings {
        max_concurrent: 1,
        max_queued: 2,
        queue_timeout: Duration::from_millis(200),
        ..host_settings()
    })
    .unwrap();
    let registry = Arc::new(ToolRegistry::load_dir(Path::new(MANIFESTS)).unwrap());
    (host, registry)
}

/// Awaits `fut` and says when it finished, counted from `started`.
async fn timed<F: std::future::Future>(started: Instant, fut: F) -> (F::Output, Duration) {
    let out = fut.await;
    (out, started.elapsed())
}

fn tight_sandbox(
    host: &Arc<SandboxHost>,
    registry: &Arc<ToolRegistry>,
    dir: &Path,
    wall_ms: u64,
) -> Sandbox {
    let limits = CallLimits {
        wall_time: HumanDuration::from_millis(wall_ms),
        ..CallLimits::default()
    };
    Sandbox::new(
        host.clone(),
        registry.clone(),
        dir,
        limits,
        EpisodeBudget::default(),
        1,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_queue_are_refused_and_queued_ones_time_out() {
    require_tools();
    let (host, registry) = tight_host();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut busy = tight_sandbox(&host, &registry, dirs[0].path(), 1000);
    let mut waiting: Vec<Sandbox> = dirs[1..]
        .iter()
        .map(|d| tight_sandbox(&host, &registry, d.path(), 1000))
        .collect();
    // Load python's compiled module before timing anything.
    let warm = busy
        .exec_async("python", json!({"code": "print('warm')"}))
        .await
        .unwrap();
    assert_eq!(warm.stdout, "warm\n", "{warm:?}");

    let started = Instant::now();
    let [w1, w2, w3] = &mut waiting[..] else {
        unreachable!()
    };
    // `join!` polls in order: the first call takes the only slot, the next two queue, and the
    // fourth finds the queue full.
    let (long, q1, q2, refused) = tokio::join!(
        timed(
            started,
            busy.exec_async("python", json!({"code": "while True: pass"}))
        ),
        timed(
            started,
            w1.exec_async("bash", json!({"command": "echo q1"}))
        ),
        timed(
            started,
            w2.exec_async("bash", json!({"command": "echo q2"}))
        ),
        timed(
            started,
            w3.exec_async("bash", json!({"command": "echo refused"}))
        ),
    );

    let (long, long_took) = long;
    let long = long.unwrap();
    assert_eq!(
        long.termination,
        Termination::Limit {
            limit: Limit::WallTime
        },
        "{long:?}"
    );
    assert!(long_took >= Duration::from_millis(1000), "{long_took:?}");

    let (refused, refused_after) = refused;
    assert!(
        matches!(refused, Err(SandboxError::Overloaded { .. })),
        "{refused:?}"
    );
    assert!(
        refused_after < Duration::from_millis(150),
        "refused after {refused_after:?}"
    );

    for (r, after) in [q1, q2] {
        match r {
            Err(SandboxError::Overloaded { reason }) => {
                assert!(reason.contains("no execution slot"), "{reason}")
            }
            other => panic!("expected a queue timeout, got {other:?}"),
        }
        assert!(
            after >= Duration::from_millis(200) && after < Duration::from_millis(900),
            "queued call gave up after {after:?}"
        );
    }
    // Nothing ran for the refused calls.
    for d in &dirs[1..] {
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
    for sb in &waiting {
        assert_eq!(sb.used().fuel, 0);
    }

    // The host keeps working: one at a time, a queued call waits its turn and runs.
    let (a, b) = tokio::join!(
        busy.exec_async("bash", json!({"command": "seq 3 | wc -l"})),
        waiting[0].exec_async("bash", json!({"command": "echo after"})),
    );
    assert_eq!(a.unwrap().stdout, "3\n");
    assert_eq!(b.unwrap().stdout, "after\n");
}

/// On a single-threaded runtime, a spinning guest must not stall other tasks: `exec_async`
/// runs guests on the blocking pool.
#[tokio::test(flavor = "current_thread")]
async fn exec_async_does_not_block_the_runtime() {
    require_tools();
    let (host, registry) = tight_host();
    let dir = tempfile::tempdir().unwrap();
    let mut sb = tight_sandbox(&host, &registry, dir.path(), 400);
    let warm = sb
        .exec_async("python", json!({"code": "print('warm')"}))
        .await
        .unwrap();
    assert!(warm.success(), "{warm:?}");
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let ticker = tokio::spawn(async move {
        let mut ticks = 0u32;
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ticks += 1;
        }
        ticks
    });
    let started = Instant::now();
    let out = sb
        .exec_async("python", json!({"code": "while True: pass"}))
        .await
        .unwrap();
    let took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    assert_eq!(
        out.termination,
        Termination::Limit {
            limit: Limit::WallTime
        },
        "{out:?}"
    );
    assert!(took >= Duration::from_millis(400), "{took:?}");
    let ticks = ticker.await.unwrap();
    assert!(
        ticks >= 10,
        "the runtime stalled during the call: {ticks} ticks in {took:?}"
    );
}

/// Known bug (reported): a `ToolModule` keeps the `InstancePre` of the first host that ran it,
/// so a registry shared by two hosts fails on the second host with a cross-engine error.
#[test]
fn a_registry_can_serve_two_hosts() {
    require_tools();
    let registry = Arc::new(ToolRegistry::load_dir(Path::new(MANIFESTS)).unwrap());
    for _ in 0..2 {
        let host = SandboxHost::new(host_settings()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::new(
            host,
            registry.clone(),
            dir.path(),
            CallLimits::default(),
            EpisodeBudget::default(),
            1,
        )
        .unwrap();
        assert_eq!(ok(bash(&mut sb, "echo hi")), "hi\n");
    }
}
