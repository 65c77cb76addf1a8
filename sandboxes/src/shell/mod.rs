//! The `bash` tool. WASI preview 1 has no processes, so the shell runs on the host: it parses
//! the command line and runs every stage of a pipeline as a registry command (a WASM guest) in
//! the episode directory, all under the one call's limits.
//!
//! Stages run one after another; a stage's stdout, kept in memory and bounded by the call's
//! stdout limit, is the next stage's stdin. An endless producer (`seq 1 1000000000 | head`)
//! therefore ends on the stdout limit rather than on SIGPIPE. Redirections read and write
//! files through the `cat`, `write_file` and `append_file` guests, so that every file access
//! stays inside WASI's view of the episode directory and is charged to the write quota.

pub mod glob;
pub mod parse;

use std::path::{Component, Path, PathBuf};

use crate::call::Capped;
use crate::outcome::Termination;
use crate::registry::ToolKind;
use crate::sandbox::{CallRun, StageOutput};
use crate::SandboxError;
use parse::{Command, Connector, Pipeline, RedirectOp, Word};

/// Most words one command line may expand to through globs.
const MAX_GLOB_MATCHES: usize = 10_000;
/// Exit status of a command that is not in the registry (as in POSIX shells).
const STATUS_NOT_FOUND: i32 = 127;

/// Runs a script; the outcome's stdout and stderr are what was not redirected.
pub(crate) fn run(call: &mut CallRun<'_>, line: &str) -> Result<StageOutput, SandboxError> {
    let mut io = Io {
        out: Capped::new(usize::try_from(call.limits().stdout.0).unwrap_or(usize::MAX)),
        err: Capped::new(usize::try_from(call.limits().stderr.0).unwrap_or(usize::MAX)),
    };
    let script = match parse::parse(line) {
        Ok(s) => s,
        Err(e) => {
            io.err.push(format!("bash: {e}\n").as_bytes());
            return Ok(io.finish(Termination::Exited { code: 2 }));
        }
    };
    let mut status = 0;
    for item in &script.items {
        status = match pipeline(call, &item.first, &mut io)? {
            Ok(s) => s,
            Err(stop) => return Ok(io.finish(stop)),
        };
        for (connector, next) in &item.rest {
            let go = match connector {
                Connector::And => status == 0,
                Connector::Or => status != 0,
            };
            if go {
                status = match pipeline(call, next, &mut io)? {
                    Ok(s) => s,
                    Err(stop) => return Ok(io.finish(stop)),
                };
            }
        }
    }
    Ok(io.finish(Termination::Exited { code: status }))
}

struct Io {
    out: Capped,
    err: Capped,
}

impl Io {
    fn finish(self, termination: Termination) -> StageOutput {
        StageOutput {
            termination,
            stdout: self.out,
            stderr: self.err,
        }
    }

    /// A message from the shell itself; overflowing stderr ends the call like a guest's would.
    fn shell_error(&mut self, message: String) -> Result<(), Termination> {
        if self.err.push(format!("bash: {message}\n").as_bytes()) {
            Ok(())
        } else {
            Err(Termination::Limit {
                limit: crate::Limit::Stderr,
            })
        }
    }
}

/// Where a stage's stdout or stderr goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sink {
    /// The next stage's stdin.
    Pipe,
    /// The call's stdout.
    Out,
    /// The call's stderr.
    Err,
    File {
        path: String,
        append: bool,
    },
}

/// Runs one pipeline; `Ok(status)` or `Err(termination)` when a limit or a trap ends the call.
fn pipeline(
    call: &mut CallRun<'_>,
    p: &Pipeline,
    io: &mut Io,
) -> Result<Result<i32, Termination>, SandboxError> {
    let mut input: Vec<u8> = Vec::new();
    let mut status = 0;
    let count = p.commands.len();
    for (i, cmd) in p.commands.iter().enumerate() {
        let last = i + 1 == count;
        let stdin = std::mem::take(&mut input);
        status = match command(call, cmd, stdin, last, io, &mut input)? {
            Ok(s) => s,
            Err(stop) => return Ok(Err(stop)),
        };
    }
    if p.negated {
        status = i32::from(status == 0);
    }
    Ok(Ok(status))
}

fn command(
    call: &mut CallRun<'_>,
    cmd: &Command,
    piped_in: Vec<u8>,
    last: bool,
    io: &mut Io,
    pipe_out: &mut Vec<u8>,
) -> Result<Result<i32, Termination>, SandboxError> {
    macro_rules! fail {
        ($status:expr, $($msg:tt)*) => {{
            if let Err(stop) = io.shell_error(format!($($msg)*)) {
                return Ok(Err(stop));
            }
            return Ok(Ok($status));
        }};
    }
    let words = match expand(call.dir(), &cmd.words) {
        Ok(w) => w,
        Err(msg) => fail!(1, "{msg}"),
    };
    let Some(name) = words.first() else {
        fail!(2, "empty command")
    };

    // Redirections, left to right, as POSIX shells apply them.
    let mut stdin_file: Option<String> = None;
    let mut sinks = [
        Sink::Pipe,
        if last { Sink::Out } else { Sink::Pipe },
        Sink::Err,
    ];
    for r in &cmd.redirects {
        let fd = r.fd as usize;
        if fd > 2 {
            fail!(
                1,
                "{name}: only file descriptors 0, 1 and 2 can be redirected"
            );
        }
        match &r.op {
            RedirectOp::Read(w) => {
                let target = match expand_one(call.dir(), w) {
                    Ok(t) => t,
                    Err(msg) => fail!(1, "{msg}"),
                };
                if fd != 0 {
                    fail!(1, "{name}: `<` redirects only stdin");
                }
                stdin_file = Some(target);
            }
            RedirectOp::Write(w) | RedirectOp::Append(w) => {
                let path = match expand_one(call.dir(), w) {
                    Ok(t) => t,
                    Err(msg) => fail!(1, "{msg}"),
                };
                if fd == 0 {
                    fail!(1, "{name}: stdin cannot be redirected for writing");
                }
                sinks[fd] = Sink::File {
                    path,
                    append: matches!(r.op, RedirectOp::Append(_)),
                };
            }
            RedirectOp::DupTo(m) => {
                let m = *m as usize;
                if m > 2 || fd == 0 || m == 0 {
                    fail!(1, "{name}: unsupported duplication {fd}>&{m}");
                }
                sinks[fd] = sinks[m].clone();
            }
        }
    }

    let stdin = match stdin_file {
        None => piped_in,
        Some(path) => match helper(call, "cat", &path, Vec::new(), io)? {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(Ok(1)),
            Err(stop) => return Ok(Err(stop)),
        },
    };

    let registry = call.sandbox.registry().clone();
    let tool = registry.get(name).filter(|t| t.manifest.command);
    let Some(tool) = tool else {
        fail!(
            STATUS_NOT_FOUND,
            "{name}: command not found (commands: {})",
            command_names(call)
        )
    };
    let ToolKind::Module(module) = &tool.kind else {
        fail!(126, "{name}: nested shells are not supported")
    };
    let mut argv = vec![tool.manifest.program_name()];
    argv.extend(words[1..].iter().cloned());
    let module = module.clone();
    let stage = call.stage(&module, &argv, stdin)?;
    let status = match stage.termination {
        Termination::Exited { code } => code,
        other => {
            // The call is over; keep what the stage printed so the agent sees how far it got.
            io.out.push(&stage.stdout.bytes);
            io.err.push(&stage.stderr.bytes);
            io.out.truncated |= stage.stdout.truncated;
            io.err.truncated |= stage.stderr.truncated;
            return Ok(Err(other));
        }
    };

    // Route stdout, then stderr; a file written twice in one command is appended the second time.
    let mut written: Vec<String> = Vec::new();
    for (fd, bytes) in [(1usize, stage.stdout.bytes), (2, stage.stderr.bytes)] {
        match &sinks[fd] {
            Sink::Pipe => pipe_out.extend_from_slice(&bytes),
            Sink::Out => {
                if !io.out.push(&bytes) {
                    return Ok(Err(Termination::Limit {
                        limit: crate::Limit::Stdout,
                    }));
                }
            }
            Sink::Err => {
                if !io.err.push(&bytes) {
                    return Ok(Err(Termination::Limit {
                        limit: crate::Limit::Stderr,
                    }));
                }
            }
            Sink::File { path, append } => {
                let append = *append || written.contains(path);
                let tool = if append { "append_file" } else { "write_file" };
                match helper(call, tool, path, bytes, io)? {
                    Ok(Some(_)) => written.push(path.clone()),
                    Ok(None) => return Ok(Ok(1)),
                    Err(stop) => return Ok(Err(stop)),
                }
            }
        }
    }
    Ok(Ok(status))
}

/// Runs a file helper (`cat`, `write_file`, `append_file`) for a redirection. `Ok(Some(stdout))`
/// on success; `Ok(None)` when it failed (its stderr is passed on).
fn helper(
    call: &mut CallRun<'_>,
    tool: &str,
    path: &str,
    stdin: Vec<u8>,
    io: &mut Io,
) -> Result<Result<Option<Vec<u8>>, Termination>, SandboxError> {
    let registry = call.sandbox.registry().clone();
    let Some((ToolKind::Module(module), argv0)) = registry
        .get(tool)
        .map(|t| (&t.kind, t.manifest.program_name()))
    else {
        return Ok(io
            .shell_error(format!(
                "redirection needs the `{tool}` tool, which the registry lacks"
            ))
            .map(|_| None));
    };
    let module = module.clone();
    let stage = call.stage(&module, &[argv0, path.to_string()], stdin)?;
    match stage.termination {
        Termination::Exited { code: 0 } => Ok(Ok(Some(stage.stdout.bytes))),
        Termination::Exited { .. } => {
            if !io.err.push(&stage.stderr.bytes) {
                return Ok(Err(Termination::Limit {
                    limit: crate::Limit::Stderr,
                }));
            }
            Ok(Ok(None))
        }
        other => Ok(Err(other)),
    }
}

fn command_names(call: &CallRun<'_>) -> String {
    call.registry()
        .tools()
        .filter(|t| t.manifest.command)
        .map(|t| t.manifest.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Expands glob words against the episode directory (sorted; a pattern with no match stays as
/// written, as in bash).
fn expand(root: &Path, words: &[Word]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for word in words {
        if !word.glob {
            out.push(word.text.clone());
            continue;
        }
        let matches = glob_paths(root, &word.text, MAX_GLOB_MATCHES.saturating_sub(out.len()))?;
        if matches.is_empty() {
            out.push(glob::unescape(&word.text));
        } else {
            out.extend(matches);
        }
        if out.len() > MAX_GLOB_MATCHES {
            return Err(format!(
                "globs expand to more than {MAX_GLOB_MATCHES} words"
            ));
        }
    }
    Ok(out)
}

/// A redirection target: a glob must name exactly one path.
fn expand_one(root: &Path, word: &Word) -> Result<String, String> {
    if !word.glob {
        return Ok(word.text.clone());
    }
    let matches = glob_paths(root, &word.text, 2)?;
    match matches.as_slice() {
        [] => Ok(glob::unescape(&word.text)),
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "{}: ambiguous redirect",
            glob::unescape(&word.text)
        )),
    }
}

/// Paths under `root` matching `pattern`, component by component. Absolute patterns and `..`
/// are not expanded (the guest will refuse them anyway), and symlinks are never descended,
/// so expansion cannot list anything outside the episode directory.
fn glob_paths(root: &Path, pattern: &str, max: usize) -> Result<Vec<String>, String> {
    if pattern.starts_with('/') {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Ok(Vec::new());
    }
    let mut current: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let mut next = Vec::new();
        for (host, shown) in &current {
            if !glob::has_magic(part) {
                let literal = glob::unescape(part);
                let host = host.join(&literal);
                if (last || is_real_dir(&host)) && host.symlink_metadata().is_ok() {
                    next.push((host, join_shown(shown, &literal)));
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(host) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| glob::matches(part, n))
                .collect();
            names.sort();
            for name in names {
                let child = host.join(&name);
                if last || is_real_dir(&child) {
                    next.push((child, join_shown(shown, &name)));
                }
                if next.len() > max {
                    return Err(format!(
                        "{}: matches more than {max} paths",
                        glob::unescape(pattern)
                    ));
                }
            }
        }
        current = next;
    }
    Ok(current.into_iter().map(|(_, shown)| shown).collect())
}

fn is_real_dir(path: &Path) -> bool {
    path.symlink_metadata().is_ok_and(|m| m.is_dir())
        && path
            .components()
            .all(|c| !matches!(c, Component::ParentDir))
}

fn join_shown(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}
