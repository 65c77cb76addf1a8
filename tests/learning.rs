//! Does SFT teach the tiny model to act? `examples/sft_compact.ron` distills the scripted
//! expert on compact short-horizon tasks, trains the tiny byte-level model from scratch with
//! trajectory splitting, and evaluates the untrained and the trained model (greedy) on the
//! same held-out tasks; the trained one must score clearly higher.
//!
//! About 15 minutes on 2 cores in a release build, so it is ignored by default. Run it after
//! any change to the model, the learner, splitting, the episode loop or the family:
//!
//!   cargo test --release --test learning -- --ignored

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

#[test]
#[ignore = "about 15 minutes (release); run after changes to training or acting"]
fn sft_makes_the_tiny_model_score_clearly_higher_on_held_out_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let config = std::fs::read_to_string(repo().join("examples/sft_compact.ron"))
        .unwrap()
        .replace("runs/sft-compact", run_dir.to_str().unwrap())
        .replace(
            "sandboxes/tools/manifests",
            repo().join("sandboxes/tools/manifests").to_str().unwrap(),
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
    let before = report(&run_dir, "untrained");
    let after = report(&run_dir, "trained");
    let expert = report(&run_dir, "expert");
    let mean = |r: &Value| r["overall"]["mean"].as_f64().unwrap();
    let calls = |r: &Value| r["overall"]["tool_call_rate"].as_f64().unwrap();
    eprintln!(
        "untrained {:.3} ({:.0}% tool calls), trained {:.3} ({:.0}%), expert {:.3}",
        mean(&before),
        100.0 * calls(&before),
        mean(&after),
        100.0 * calls(&after),
        mean(&expert)
    );
    assert_eq!(before["infra_failures"], 0);
    assert_eq!(after["infra_failures"], 0);
    assert!(
        mean(&after) >= mean(&before) + 0.25,
        "trained {} vs untrained {}",
        mean(&after),
        mean(&before)
    );
    assert!(calls(&after) > calls(&before) + 0.5);
    assert_eq!(mean(&expert), 1.0);
}
