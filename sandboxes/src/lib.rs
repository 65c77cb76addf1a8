//! klong-sandbox: tool calls of LLM agents, run as WebAssembly (WASI preview 1) guests under
//! enforced limits.
//!
//! - [`SandboxHost`]: one per process; the wasmtime engine, module cache, epoch ticker and the
//!   bound on concurrent executions.
//! - [`ToolRegistry`]: tools (a module + a manifest) loaded from a directory.
//! - [`Sandbox`]: one episode's directory and budget; `exec(tool, args) -> Outcome`.
//!
//! This crate knows nothing of actors, models or the run directory.

mod call;
pub mod engine;
pub mod host;
pub mod limits;
pub mod outcome;
pub mod registry;
pub mod sandbox;
pub mod shell;
pub mod units;

use std::path::{Path, PathBuf};

pub use engine::{ModuleCache, ModuleSource};
pub use host::{HostSettings, SandboxHost};
pub use limits::{CallLimits, EpisodeBudget, Limit, Usage};
pub use outcome::{Outcome, Termination, TrapKind};
pub use registry::{Tool, ToolKind, ToolManifest, ToolModule, ToolRegistry};
pub use sandbox::Sandbox;
pub use units::{ByteSize, HumanDuration};

/// Host-side failures. Whatever a guest does is an [`Outcome`], never an error.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("wasm engine: {0}")]
    Engine(String),
    #[error("module {path}: {reason}")]
    Module { path: PathBuf, reason: String },
    #[error("tool manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("unknown tool `{tool}`")]
    UnknownTool { tool: String },
    #[error("invalid arguments for tool `{tool}`: {reason}")]
    InvalidArguments { tool: String, reason: String },
    #[error("sandbox overloaded: {reason}")]
    Overloaded { reason: String },
}

impl SandboxError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        SandboxError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
