//! What the tests of the `klongd` binary share: where the repository and its built guest tools
//! are, and how to run the binary with a test-local module cache and no `RUST_LOG`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tools_dir() -> PathBuf {
    let dir = repo().join("sandboxes/tools/manifests");
    assert!(
        repo().join("sandboxes/tools/wasm/coreutils.wasm").exists(),
        "guest tools are not built: run sandboxes/tools/build.sh"
    );
    dir
}

/// Runs `klongd args` in `cwd`.
pub fn klongd(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klongd"))
        .args(args)
        .current_dir(cwd)
        .env("KLONGD_TOOLS_DIR", tools_dir())
        .env(
            "XDG_CACHE_HOME",
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"),
        )
        .env_remove("RUST_LOG")
        .output()
        .expect("klongd runs")
}
