//! Shared helpers of the klong-sandbox integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use klong_sandbox::{
    CallLimits, EpisodeBudget, HostSettings, Outcome, Sandbox, SandboxHost, ToolModule,
    ToolRegistry,
};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/manifests");
pub const WASM_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/wasm");

/// Panics with a clear message when the guest tools have not been built.
pub fn require_tools() {
    let coreutils = Path::new(WASM_DIR).join("coreutils.wasm");
    assert!(
        coreutils.is_file(),
        "guest tools are not built: run sandboxes/tools/build.sh (missing {})",
        coreutils.display()
    );
}

/// Settings of the shared host: deterministic, with the compiled-module cache on disk so that
/// CPython compiles once across test binaries and runs.
pub fn host_settings() -> HostSettings {
    HostSettings {
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klong-module-cache")),
        ..Default::default()
    }
}

/// One host per test binary.
pub fn host() -> Arc<SandboxHost> {
    static HOST: OnceLock<Arc<SandboxHost>> = OnceLock::new();
    HOST.get_or_init(|| {
        require_tools();
        SandboxHost::new(host_settings()).expect("sandbox host starts")
    })
    .clone()
}

/// One registry per test binary, so that modules compile (or load from the cache) once.
pub fn registry() -> Arc<ToolRegistry> {
    static REGISTRY: OnceLock<Arc<ToolRegistry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            require_tools();
            Arc::new(ToolRegistry::load_dir(Path::new(MANIFESTS)).expect("manifests load"))
        })
        .clone()
}

/// A fresh episode directory and its sandbox on the shared host (seed 7).
pub fn sandbox(limits: CallLimits, budget: EpisodeBudget) -> (TempDir, Sandbox) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sb = sandbox_in(dir.path(), limits, budget, 7);
    (dir, sb)
}

/// A sandbox with default limits and budget.
pub fn default_sandbox() -> (TempDir, Sandbox) {
    sandbox(CallLimits::default(), EpisodeBudget::default())
}

pub fn sandbox_in(dir: &Path, limits: CallLimits, budget: EpisodeBudget, seed: u64) -> Sandbox {
    Sandbox::new(host(), registry(), dir, limits, budget, seed).expect("sandbox opens")
}

/// A hostile guest from `tools/wasm/hostile/NAME.wasm`.
pub fn hostile(name: &str) -> Arc<ToolModule> {
    require_tools();
    let path = Path::new(WASM_DIR)
        .join("hostile")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "guest tools are not built: run sandboxes/tools/build.sh (missing {})",
        path.display()
    );
    Arc::new(ToolModule::new(path))
}

/// Runs a bash command line; panics on host errors.
pub fn bash(sb: &mut Sandbox, command: &str) -> Outcome {
    sb.exec("bash", &json!({ "command": command }))
        .unwrap_or_else(|e| panic!("bash `{command}`: {e}"))
}

/// Runs a tool with JSON arguments; panics on host errors.
pub fn call(sb: &mut Sandbox, tool: &str, args: Value) -> Outcome {
    sb.exec(tool, &args)
        .unwrap_or_else(|e| panic!("{tool} {args}: {e}"))
}

/// Runs a plain command tool (`cat`, `ls`, ...) with argv words.
pub fn cmd(sb: &mut Sandbox, tool: &str, args: &[&str]) -> Outcome {
    call(sb, tool, json!({ "args": args }))
}

/// Asserts a call exited 0 and returns its stdout.
#[track_caller]
pub fn ok(out: Outcome) -> String {
    assert_eq!(
        out.exit_code(),
        Some(0),
        "`{}` failed: {:?}\nstdout: {}\nstderr: {}",
        out.tool,
        out.termination,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Asserts a call exited with `code`.
#[track_caller]
pub fn exits(out: &Outcome, code: i32) {
    assert_eq!(
        out.exit_code(),
        Some(code),
        "`{}`: expected exit {code}, got {:?}\nstdout: {}\nstderr: {}",
        out.tool,
        out.termination,
        out.stdout,
        out.stderr
    );
}

pub fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, content).unwrap();
}

pub fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

/// Makes sure CPython's compiled module is in the on-disk cache, once per test binary, so that
/// hosts created by tests load it instead of each compiling it (seconds) at the same time.
pub fn warm_python_cache() {
    static WARM: OnceLock<()> = OnceLock::new();
    WARM.get_or_init(|| {
        host()
            .load_module(&Path::new(WASM_DIR).join("python.wasm"))
            .expect("python.wasm compiles");
    });
}
