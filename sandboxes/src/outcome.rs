//! What a tool call produced: how it ended, its (capped) output, and what it consumed.

use serde::{Deserialize, Serialize};

use crate::limits::{Limit, Usage};

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Termination {
    /// The guest ran to completion (or called `proc_exit`).
    Exited { code: i32 },
    /// A limit stopped the guest.
    Limit { limit: Limit },
    /// The guest faulted.
    Trap { trap: TrapKind, message: String },
    /// The episode's budget was already spent: the call did not run.
    NotRun { limit: Limit },
}

/// Why a guest faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrapKind {
    StackOverflow,
    Unreachable,
    MemoryOutOfBounds,
    IntegerDivisionByZero,
    IntegerOverflow,
    BadConversionToInteger,
    IndirectCallToNull,
    BadSignature,
    TableOutOfBounds,
    HeapMisaligned,
    /// Instantiation failed (missing import, bad module, no `_start`), or a host function
    /// returned an error that is not a limit.
    Host,
    Other,
}

impl TrapKind {
    pub(crate) fn from_trap(trap: wasmtime::Trap) -> TrapKind {
        use wasmtime::Trap as T;
        match trap {
            T::StackOverflow => TrapKind::StackOverflow,
            T::UnreachableCodeReached => TrapKind::Unreachable,
            T::MemoryOutOfBounds => TrapKind::MemoryOutOfBounds,
            T::IntegerDivisionByZero => TrapKind::IntegerDivisionByZero,
            T::IntegerOverflow => TrapKind::IntegerOverflow,
            T::BadConversionToInteger => TrapKind::BadConversionToInteger,
            T::IndirectCallToNull => TrapKind::IndirectCallToNull,
            T::BadSignature => TrapKind::BadSignature,
            T::TableOutOfBounds => TrapKind::TableOutOfBounds,
            T::HeapMisaligned => TrapKind::HeapMisaligned,
            _ => TrapKind::Other,
        }
    }
}

/// The result of one tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub tool: String,
    pub termination: Termination,
    /// Captured stdout (lossy UTF-8), at most the call's stdout limit.
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub usage: Usage,
}

impl Outcome {
    /// The exit code, when the guest exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self.termination {
            Termination::Exited { code } => Some(code),
            _ => None,
        }
    }

    /// The limit that stopped or refused the call, if any.
    pub fn limit(&self) -> Option<Limit> {
        match self.termination {
            Termination::Limit { limit } | Termination::NotRun { limit } => Some(limit),
            _ => None,
        }
    }

    /// Whether the guest exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code() == Some(0)
    }

    pub(crate) fn not_run(tool: &str, limit: Limit) -> Outcome {
        Outcome {
            tool: tool.to_string(),
            termination: Termination::NotRun { limit },
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            usage: Usage::default(),
        }
    }
}
