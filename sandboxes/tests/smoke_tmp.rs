use klong_sandbox::*;
use serde_json::json;
use std::sync::Arc;

#[test]
fn smoke() {
    let host = SandboxHost::new(HostSettings {
        cache_dir: Some("/tmp/klong-cache".into()),
        ..Default::default()
    })
    .unwrap();
    let reg = Arc::new(
        ToolRegistry::load_dir(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/manifests"
        )))
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Sandbox::new(
        host,
        reg,
        dir.path(),
        CallLimits::default(),
        EpisodeBudget::default(),
        7,
    )
    .unwrap();
    for (tool, args) in [
        (
            "write_file",
            json!({"file": "a.txt", "content": "hello\nworld\n"}),
        ),
        ("read_file_chunk", json!({"file": "a.txt"})),
        (
            "bash",
            json!({"command": "seq 1 10 | grep 1 > out.txt && cat out.txt | wc -l; ls -l; echo *.txt"}),
        ),
        (
            "bash",
            json!({"command": "cat nope.txt || echo failed 2>&1"}),
        ),
        (
            "python",
            json!({"code": "import os; print(os.listdir('.')); print(sum(range(10)))"}),
        ),
    ] {
        let t = std::time::Instant::now();
        let out = sb.exec(tool, &args).unwrap();
        println!(
            "{tool} {:?} {:?}\n{}\n{}",
            t.elapsed(),
            out.termination,
            out.stdout,
            out.stderr
        );
    }
}
