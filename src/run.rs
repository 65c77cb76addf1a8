//! `klongd run`: opens (or resumes) the run directory and brings up what the configured
//! stages need. Today that is the sandbox: the tool registry, the compiled-module cache, and a
//! self-check call; training stages arrive with their issues.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use klong_sandbox::{Sandbox, SandboxHost, ToolRegistry};
use serde_json::json;

use crate::config::Config;

/// The run directory's copy of the config it was started with.
const CONFIG_FILE: &str = "config.ron";
const LOCK_FILE: &str = "LOCK";

/// What `run` did, for the final log line and tests.
#[derive(Debug, serde::Serialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub resumed: bool,
    pub tools: usize,
    pub modules_ready: usize,
}

/// Holds the run directory's lock for as long as it lives: two processes never share a run.
pub struct RunDir {
    pub path: PathBuf,
    _lock: std::fs::File,
}

impl RunDir {
    pub fn open(path: &Path) -> anyhow::Result<RunDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create run directory {}", path.display()))?;
        let lock_path = path.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!(
                    "run directory {} is in use by another klongd process",
                    path.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

pub fn run(config: &Config) -> anyhow::Result<RunSummary> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let stored = run_dir.path.join(CONFIG_FILE);
    let plan = config.to_ron();
    let resumed = stored.exists();
    if resumed {
        let previous = Config::load(&stored)
            .with_context(|| format!("cannot read the run's config {}", stored.display()))?;
        if &previous != config {
            bail!(
                "run directory {} holds a run of a different config; use a new run_dir, or restore the config in {}",
                run_dir.path.display(),
                stored.display()
            );
        }
        tracing::info!(run_dir = %run_dir.path.display(), "resuming run");
    } else {
        write_durably(&stored, plan.as_bytes())?;
        tracing::info!(run_dir = %run_dir.path.display(), name = %config.name, "new run");
    }

    let sandbox = &config.sandbox;
    let host = SandboxHost::new(sandbox.host_settings()?)?;
    let registry = Arc::new(ToolRegistry::load_dir(&sandbox.tools_dir).with_context(|| {
        format!(
            "cannot load tools from {} (built by sandboxes/tools/build.sh)",
            sandbox.tools_dir.display()
        )
    })?);
    let modules = registry.modules();
    for module in &modules {
        let started = Instant::now();
        let source = host.load_module(&module.path)?;
        tracing::info!(module = %module.path.display(), ?source, elapsed_ms = started.elapsed().as_millis() as u64, "tool module ready");
    }

    // One real call proves the sandbox works on this machine before any stage relies on it.
    let check_dir = run_dir.path.join("sandbox-check");
    let mut check = Sandbox::new(
        host,
        registry.clone(),
        &check_dir,
        sandbox.call,
        sandbox.episode,
        config.seed,
    )?;
    let outcome = check.exec("bash", &json!({ "command": "echo sandbox ok | wc -c" }))?;
    if outcome.stdout.trim() != "11" {
        bail!(
            "sandbox self-check failed: {}",
            serde_json::to_string(&outcome)?
        );
    }
    std::fs::remove_dir_all(&check_dir).ok();
    tracing::info!(
        tools = registry.tools().count(),
        fuel = outcome.usage.fuel,
        wall_us = outcome.usage.wall_time_us,
        "sandbox self-check passed"
    );
    tracing::info!("no training stages are configured in this build: the run is complete");
    Ok(RunSummary {
        run_dir: run_dir.path.clone(),
        resumed,
        tools: registry.tools().count(),
        modules_ready: modules.len(),
    })
}
