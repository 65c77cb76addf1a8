//! A `Sandbox` is one episode's world: its directory of files, the only thing a guest sees,
//! and the episode's budget across calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::call::{execute, Capped, ExecRequest, Execution};
use crate::host::SandboxHost;
use crate::limits::{CallLimits, Effective, EpisodeBudget, Limit, Usage};
use crate::outcome::{Outcome, Termination};
use crate::registry::{
    build_invocation, validate_arguments, Tool, ToolKind, ToolModule, ToolRegistry,
    MAX_ARGUMENT_BYTES,
};
use crate::{shell, SandboxError};

#[derive(Clone)]
pub struct Sandbox {
    host: Arc<SandboxHost>,
    registry: Arc<ToolRegistry>,
    dir: PathBuf,
    limits: CallLimits,
    budget: EpisodeBudget,
    used: Usage,
    seed: u64,
    calls: u64,
}

impl Sandbox {
    /// Opens (creating it if needed) the episode directory `dir`.
    pub fn new(
        host: Arc<SandboxHost>,
        registry: Arc<ToolRegistry>,
        dir: &Path,
        limits: CallLimits,
        budget: EpisodeBudget,
        seed: u64,
    ) -> Result<Sandbox, SandboxError> {
        std::fs::create_dir_all(dir).map_err(|e| SandboxError::io(dir, e))?;
        let dir = dir.canonicalize().map_err(|e| SandboxError::io(dir, e))?;
        Ok(Sandbox {
            host,
            registry,
            dir,
            limits,
            budget,
            used: Usage::default(),
            seed,
            calls: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn registry(&self) -> &Arc<ToolRegistry> {
        &self.registry
    }

    /// What all calls so far consumed.
    pub fn used(&self) -> Usage {
        self.used
    }

    pub fn budget(&self) -> &EpisodeBudget {
        &self.budget
    }

    /// Calls one registry tool with the agent's JSON arguments.
    pub fn exec(&mut self, tool: &str, args: &Value) -> Result<Outcome, SandboxError> {
        let registry = self.registry.clone();
        let t = lookup(&registry, tool)?;
        let invalid = |reason: String| SandboxError::InvalidArguments {
            tool: tool.to_string(),
            reason,
        };
        let args = validate_arguments(&t.manifest.parameters, args).map_err(invalid)?;
        match &t.kind {
            ToolKind::Shell => {
                let command = args
                    .get("command")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("missing `command`".into()))?;
                check_size(tool, command.len())?;
                self.run_call(tool, |run| shell::run(run, command))
            }
            ToolKind::Module(module) => {
                let (argv, stdin) = build_invocation(&t.manifest, &args);
                self.module_call(tool, module, &argv, stdin)
            }
        }
    }

    /// Runs a registry tool with a raw argv after its own `argv[0]`, as `bash` would.
    pub fn exec_argv(
        &mut self,
        tool: &str,
        args: &[String],
        stdin: Vec<u8>,
    ) -> Result<Outcome, SandboxError> {
        let registry = self.registry.clone();
        let t = lookup(&registry, tool)?;
        let ToolKind::Module(module) = &t.kind else {
            return Err(SandboxError::InvalidArguments {
                tool: tool.to_string(),
                reason: "the shell takes a command line: call it with {\"command\": ...}".into(),
            });
        };
        let mut argv = vec![t.manifest.program_name()];
        argv.extend(args.iter().cloned());
        self.module_call(tool, module, &argv, stdin)
    }

    /// Runs any WASI command module (not necessarily in the registry) with `argv`.
    pub fn exec_module(
        &mut self,
        module: &Arc<ToolModule>,
        argv: &[String],
        stdin: Vec<u8>,
    ) -> Result<Outcome, SandboxError> {
        let name = argv.first().cloned().unwrap_or_default();
        self.module_call(&name, module, argv, stdin)
    }

    fn module_call(
        &mut self,
        tool: &str,
        module: &Arc<ToolModule>,
        argv: &[String],
        stdin: Vec<u8>,
    ) -> Result<Outcome, SandboxError> {
        check_size(
            tool,
            argv.iter().map(String::len).sum::<usize>() + stdin.len(),
        )?;
        self.run_call(tool, |run| run.stage(module, argv, stdin))
    }

    /// [`Sandbox::exec`] for tokio tasks: waits (bounded) for an execution slot, then runs on
    /// the blocking pool, so that a guest never stalls the runtime.
    pub async fn exec_async(&mut self, tool: &str, args: Value) -> Result<Outcome, SandboxError> {
        let permit = self.host.acquire().await?;
        let mut me = self.clone();
        let tool = tool.to_string();
        let (me, outcome) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let outcome = me.exec(&tool, &args);
            (me, outcome)
        })
        .await
        .map_err(|e| SandboxError::Engine(format!("sandbox worker failed: {e}")))?;
        *self = me;
        outcome
    }

    fn run_call(
        &mut self,
        tool: &str,
        body: impl FnOnce(&mut CallRun<'_>) -> Result<StageOutput, SandboxError>,
    ) -> Result<Outcome, SandboxError> {
        let effective = match Effective::narrow(&self.limits, &self.budget, &self.used) {
            Ok(e) => e,
            Err(limit) => return Ok(Outcome::not_run(tool, limit)),
        };
        self.calls += 1;
        let mut run = CallRun {
            sandbox: self,
            effective,
            usage: Usage::default(),
            started: Instant::now(),
            stages: 0,
        };
        let out = body(&mut run)?;
        let mut usage = run.usage;
        usage.wall_time_us = u64::try_from(run.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.used.add(&usage);
        Ok(Outcome {
            tool: tool.to_string(),
            termination: out.termination,
            stdout: String::from_utf8_lossy(&out.stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr.bytes).into_owned(),
            stdout_truncated: out.stdout.truncated,
            stderr_truncated: out.stderr.truncated,
            usage,
        })
    }
}

fn lookup<'r>(registry: &'r ToolRegistry, tool: &str) -> Result<&'r Tool, SandboxError> {
    registry.get(tool).ok_or_else(|| SandboxError::UnknownTool {
        tool: tool.to_string(),
    })
}

fn check_size(tool: &str, bytes: usize) -> Result<(), SandboxError> {
    if bytes > MAX_ARGUMENT_BYTES {
        return Err(SandboxError::InvalidArguments {
            tool: tool.to_string(),
            reason: format!(
                "{bytes} bytes of arguments is over the {MAX_ARGUMENT_BYTES}-byte limit"
            ),
        });
    }
    Ok(())
}

/// The output of one call (one module, or a whole shell script).
pub(crate) struct StageOutput {
    pub termination: Termination,
    pub stdout: Capped,
    pub stderr: Capped,
}

/// One call in progress. Every stage of a shell pipeline runs through `stage`, under what is
/// left of the call's limits.
pub(crate) struct CallRun<'a> {
    pub(crate) sandbox: &'a Sandbox,
    effective: Effective,
    usage: Usage,
    started: Instant,
    stages: u64,
}

impl CallRun<'_> {
    pub(crate) fn limits(&self) -> &CallLimits {
        &self.sandbox.limits
    }

    pub(crate) fn registry(&self) -> &ToolRegistry {
        &self.sandbox.registry
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.sandbox.dir
    }

    /// What is left of the call's limits, or the first one exhausted.
    fn remaining(&self) -> Result<Effective, Limit> {
        let e = &self.effective;
        let elapsed = self.started.elapsed();
        if elapsed >= e.wall_time.0 {
            return Err(e.wall_time.1);
        }
        if self.usage.fuel >= e.fuel.0 {
            return Err(e.fuel.1);
        }
        Ok(Effective {
            wall_time: (e.wall_time.0 - elapsed, e.wall_time.1),
            fuel: (e.fuel.0 - self.usage.fuel, e.fuel.1),
            written_bytes: (
                e.written_bytes.0.saturating_sub(self.usage.written_bytes),
                e.written_bytes.1,
            ),
            files_created: (
                e.files_created.0.saturating_sub(self.usage.files_created),
                e.files_created.1,
            ),
        })
    }

    /// Runs one module. Its stdout, whether the call's or a pipe's, is bounded by the call's
    /// stdout limit.
    pub(crate) fn stage(
        &mut self,
        module: &ToolModule,
        argv: &[String],
        stdin: Vec<u8>,
    ) -> Result<StageOutput, SandboxError> {
        let limits = match self.remaining() {
            Ok(l) => l,
            Err(limit) => {
                return Ok(StageOutput {
                    termination: Termination::Limit { limit },
                    stdout: Capped::new(0),
                    stderr: Capped::new(0),
                })
            }
        };
        let pre = module.instance_pre(&self.sandbox.host)?;
        let call_limits = &self.sandbox.limits;
        self.stages += 1;
        let seed = mix(self.sandbox.seed, self.sandbox.calls, self.stages);
        let Execution {
            termination,
            stdout,
            stderr,
            usage,
        } = execute(
            &self.sandbox.host.kit,
            self.sandbox.host.engine(),
            &pre,
            ExecRequest {
                root: &self.sandbox.dir,
                argv,
                stdin,
                limits: &limits,
                memory: call_limits.memory.0,
                table_elements: call_limits.table_elements,
                stdout_cap: call_limits.stdout.0,
                stderr_cap: call_limits.stderr.0,
                deterministic: self.sandbox.host.settings.deterministic,
                seed,
            },
        )?;
        self.usage.fuel = self.usage.fuel.saturating_add(usage.fuel);
        self.usage.written_bytes = self.usage.written_bytes.saturating_add(usage.written_bytes);
        self.usage.files_created = self.usage.files_created.saturating_add(usage.files_created);
        self.usage.peak_memory = self.usage.peak_memory.max(usage.peak_memory);
        Ok(StageOutput {
            termination,
            stdout,
            stderr,
        })
    }
}

/// Per-stage seed: distinct for every call and stage, fixed by the episode's seed.
fn mix(seed: u64, call: u64, stage: u64) -> u64 {
    let mut z =
        seed ^ call.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stage.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
