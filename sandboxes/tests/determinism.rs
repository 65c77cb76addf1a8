//! A deterministic host gives the same outcomes for the same calls and seed.

mod common;

use common::*;
use klong_sandbox::{CallLimits, EpisodeBudget, Outcome, Sandbox, Usage};
use serde_json::{json, Value};

const PY: &str = "import random, time, os\n\
print(random.random())\n\
print(time.time())\n\
print(time.monotonic() > 0)\n\
print(list({'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'}))\n\
print(os.urandom(8).hex())\n\
print(hash('klong'))\n";

fn script() -> Vec<(&'static str, Value)> {
    vec![
        (
            "write_file",
            json!({"file": "a.txt", "content": "b\na\nc\nb\n"}),
        ),
        (
            "bash",
            json!({"command": "sort -u a.txt > s.txt; cat s.txt | wc -l; ls -l"}),
        ),
        ("read_file_chunk", json!({"file": "s.txt"})),
        (
            "bash",
            json!({"command": "cat missing.txt; seq 5 | grep -v 3"}),
        ),
        ("python", json!({ "code": PY })),
        ("python", json!({ "code": PY })),
        (
            "replace_in_file",
            json!({"file": "a.txt", "old": "c", "new": "C"}),
        ),
    ]
}

/// An outcome without the one field that measures the host: elapsed wall time.
fn comparable(out: &Outcome) -> Outcome {
    let mut out = out.clone();
    out.usage = Usage {
        wall_time_us: 0,
        ..out.usage
    };
    out
}

fn run(seed: u64) -> Vec<Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let mut sb: Sandbox = sandbox_in(
        dir.path(),
        CallLimits::default(),
        EpisodeBudget::default(),
        seed,
    );
    script()
        .into_iter()
        .map(|(tool, args)| call(&mut sb, tool, args))
        .collect()
}

fn python_lines(outcomes: &[Outcome]) -> Vec<&str> {
    let py = outcomes.iter().find(|o| o.tool == "python").unwrap();
    assert!(py.success(), "{py:?}");
    py.stdout.lines().collect()
}

#[test]
fn same_seed_same_outcomes() {
    let first = run(42);
    let second = run(42);
    assert_eq!(first.len(), second.len());
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(comparable(a), comparable(b), "{} differs", a.tool);
        assert!(a.usage.fuel > 0);
    }
    // The deterministic clock starts at 2026-01-01T00:00:00Z.
    let lines = python_lines(&first);
    assert_eq!(lines.len(), 6, "{lines:?}");
    let t: f64 = lines[1].parse().unwrap();
    assert!(
        (1_767_225_600.0..1_767_225_700.0).contains(&t),
        "time.time() = {t}"
    );
    assert_eq!(lines[2], "True");
    // Two python calls in one episode draw different numbers (each call has its own seed).
    let pys: Vec<_> = first.iter().filter(|o| o.tool == "python").collect();
    assert_ne!(
        pys[0].stdout.lines().next(),
        pys[1].stdout.lines().next(),
        "random.random() repeated across calls"
    );
}

/// One `python` call with seed 7 in a fresh sandbox over episode directory `dir`.
fn python_in(dir: &std::path::Path, code: &str) -> Outcome {
    let mut sb = sandbox_in(dir, CallLimits::default(), EpisodeBudget::default(), 7);
    call(&mut sb, "python", json!({ "code": code }))
}

/// Host file times differ between any two runs; a deterministic guest sees none of them. The
/// episode directory's own time mattered even to code that prints nothing of it: CPython's
/// importer stats the working directory on every import, and the fuel its float arithmetic
/// took depended on the nanoseconds (CI once saw 506 fuel apart between two runs).
#[test]
fn file_times_are_the_fixed_epoch_whatever_the_host_says() {
    require_tools();
    let stat = "import os\n\
for p in ['.', 'a.txt']:\n    s = os.stat(p)\n    print(s.st_atime_ns, s.st_mtime_ns, s.st_ctime_ns)\n";
    let host_times = [
        std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 999_999_999),
        std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 1_000),
    ];
    let outcomes: Vec<Outcome> = host_times
        .iter()
        .map(|&t| {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "a.txt", "x\n");
            for path in [dir.path().join("a.txt"), dir.path().to_path_buf()] {
                let file = std::fs::File::open(&path).unwrap();
                let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
                file.set_times(times).unwrap();
            }
            python_in(dir.path(), stat)
        })
        .collect();
    let epoch_ns = "1767225600000000000";
    let line = format!("{epoch_ns} {epoch_ns} {epoch_ns}");
    assert_eq!(ok(outcomes[0].clone()), format!("{line}\n{line}\n"));
    assert_eq!(comparable(&outcomes[0]), comparable(&outcomes[1]));
}

/// Host inode numbers differ between any two episode directories; a deterministic guest sees
/// numbers in the order its call first met each file, the same in both, and the same from
/// `stat` as from a directory listing. CPython builds an int from every `stat`'s `st_ino`, and
/// the fuel that took depended on the value (this test's two runs, and CI's, were 506 apart).
/// Distinct files keep distinct numbers and a hard link shares its file's, so `samefile`
/// still tells them apart.
#[test]
fn inode_numbers_are_the_order_the_call_meets_them() {
    require_tools();
    let code = "import os\n\
os.link('a.txt', 'b.txt')\n\
d, a, b = (os.stat(p).st_ino for p in ['.', 'a.txt', 'b.txt'])\n\
print(d, a, b)\n\
print(sorted((e.name, e.inode() == os.stat(e.name).st_ino) for e in os.scandir('.')))\n\
print(os.path.samefile('a.txt', 'b.txt'), os.path.samefile('a.txt', '.'))\n";
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let outcomes: Vec<Outcome> = dirs
        .iter()
        .map(|dir| {
            write(dir.path(), "a.txt", "x\n");
            python_in(dir.path(), code)
        })
        .collect();
    let out = ok(outcomes[0].clone());
    let lines: Vec<&str> = out.lines().collect();
    let inos: Vec<u64> = lines[0].split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(inos[0] != inos[1] && inos[1] == inos[2], "{inos:?}");
    assert!(
        inos.iter().all(|&i| i < 1_000),
        "host numbers passed through: {inos:?}"
    );
    assert_eq!(lines[1], "[('a.txt', True), ('b.txt', True)]");
    assert_eq!(lines[2], "True False");
    assert_eq!(comparable(&outcomes[0]), comparable(&outcomes[1]));
}

#[test]
fn different_seed_different_random() {
    let a = run(1);
    let b = run(2);
    let (la, lb) = (python_lines(&a), python_lines(&b));
    assert_ne!(la[0], lb[0], "random.random() ignores the seed");
    assert_ne!(la[4], lb[4], "os.urandom ignores the seed");
    // What does not depend on randomness is the same.
    assert_eq!(la[1], lb[1], "the clock does not depend on the seed");
    assert_eq!(comparable(&a[1]), comparable(&b[1]));
    assert_eq!(comparable(&a[2]), comparable(&b[2]));
}
