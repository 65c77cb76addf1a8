//! One guest execution: a fresh `Store`, WASI preview 1 over the episode directory, and the
//! limits that wasmtime-wasi does not enforce by itself.
//!
//! wasmtime gives us fuel, epochs and memory limits. Output caps, write quotas, a bounded
//! `poll_oneoff` and (in deterministic mode) fixed file times and inode numbers we add by
//! shadowing a few `wasi_snapshot_preview1` imports with host functions that account, forward
//! to wasmtime-wasi, and (for file times and inode numbers) rewrite what it returned. The
//! forwarding goes through a tiny "pass-through" wasm module that imports the guest's memory
//! and re-exports it as `memory`, because wasmtime-wasi's functions find guest memory through
//! their caller's exports.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{
    Caller, Engine, Extern, Instance, InstancePre, Linker, Module, ResourceLimiter, Store, Trap,
    TypedFunc,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::engine::EPOCH_TICK;
use crate::limits::{Effective, Limit, Usage};
use crate::outcome::{Termination, TrapKind};
use crate::SandboxError;

const P1: &str = "wasi_snapshot_preview1";

// WASI preview 1 errno values (witx `errno` enum order).
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOTSUP: i32 = 58;
const OFLAGS_CREAT: i32 = 1;
/// The first preopened directory is fd 3: the episode root.
const ROOT_FD: i32 = 3;
/// Most iovecs one write may pass (POSIX's IOV_MAX).
const MAX_IOVS: u32 = 1024;
/// Most subscriptions one `poll_oneoff` may pass.
const MAX_SUBSCRIPTIONS: u32 = 4096;

/// Seconds since the Unix epoch that a deterministic sandbox's wall clock starts at
/// (2026-01-01T00:00:00Z).
const FIXED_EPOCH_SECS: u64 = 1_767_225_600;

/// Bytes of one output stream, kept up to a cap.
#[derive(Debug, Default)]
pub(crate) struct Capped {
    pub bytes: Vec<u8>,
    pub cap: usize,
    pub truncated: bool,
}

impl Capped {
    pub(crate) fn new(cap: usize) -> Self {
        Capped {
            bytes: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Appends what fits; `false` when `data` did not fit entirely.
    pub(crate) fn push(&mut self, data: &[u8]) -> bool {
        let room = self.cap.saturating_sub(self.bytes.len());
        if data.len() <= room {
            self.bytes.extend_from_slice(data);
            true
        } else {
            self.bytes.extend_from_slice(&data[..room]);
            self.truncated = true;
            false
        }
    }
}

/// The limit that ended a call, carried as the trap's error so that wasmtime unwinds the guest.
#[derive(Debug)]
struct LimitTrap(Limit);

impl std::fmt::Display for LimitTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} exceeded", self.0)
    }
}

impl std::error::Error for LimitTrap {}

struct Limiter {
    memory: usize,
    table_elements: usize,
    peak_memory: usize,
    hit: Option<Limit>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit = Some(Limit::Memory);
            return Err(wasmtime::Error::new(LimitTrap(Limit::Memory)));
        }
        self.peak_memory = self.peak_memory.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = Some(Limit::TableElements);
            return Err(wasmtime::Error::new(LimitTrap(Limit::TableElements)));
        }
        Ok(true)
    }

    // A guest plus the pass-through module: two instances, one memory (shared), few tables.
    fn instances(&self) -> usize {
        4
    }
    fn tables(&self) -> usize {
        8
    }
    fn memories(&self) -> usize {
        2
    }
}

type PathOpenArgs = (i32, i32, i32, i32, i32, i64, i64, i32, i32);
type PathLinkArgs = (i32, i32, i32, i32, i32, i32, i32);

/// The real wasmtime-wasi functions, reached through the pass-through instance.
#[derive(Clone)]
struct Forward {
    fd_write: TypedFunc<(i32, i32, i32, i32), i32>,
    fd_pwrite: TypedFunc<(i32, i32, i32, i64, i32), i32>,
    fd_allocate: TypedFunc<(i32, i64, i64), i32>,
    fd_filestat_set_size: TypedFunc<(i32, i64), i32>,
    path_open: TypedFunc<PathOpenArgs, i32>,
    path_create_directory: TypedFunc<(i32, i32, i32), i32>,
    path_symlink: TypedFunc<(i32, i32, i32, i32, i32), i32>,
    path_link: TypedFunc<PathLinkArgs, i32>,
    fd_renumber: TypedFunc<(i32, i32), i32>,
    fd_close: TypedFunc<i32, i32>,
    poll_oneoff: TypedFunc<(i32, i32, i32, i32), i32>,
    fd_filestat_get: TypedFunc<(i32, i32), i32>,
    path_filestat_get: TypedFunc<(i32, i32, i32, i32, i32), i32>,
    fd_readdir: TypedFunc<(i32, i32, i32, i64, i32), i32>,
}

const PASS_THROUGH_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_pwrite" (func $fd_pwrite (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_allocate" (func $fd_allocate (param i32 i64 i64) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_set_size" (func $fd_filestat_set_size (param i32 i64) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory" (func $path_create_directory (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func $path_symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_link" (func $path_link (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_renumber" (func $fd_renumber (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_get" (func $fd_filestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_filestat_get" (func $path_filestat_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_readdir" (func $fd_readdir (param i32 i32 i32 i64 i32) (result i32)))
  (import "guest" "memory" (memory 0))
  (export "memory" (memory 0))
  (func (export "fd_write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_write)
  (func (export "fd_pwrite") (param i32 i32 i32 i64 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $fd_pwrite)
  (func (export "fd_allocate") (param i32 i64 i64) (result i32)
    local.get 0 local.get 1 local.get 2 call $fd_allocate)
  (func (export "fd_filestat_set_size") (param i32 i64) (result i32)
    local.get 0 local.get 1 call $fd_filestat_set_size)
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4
    local.get 5 local.get 6 local.get 7 local.get 8 call $path_open)
  (func (export "path_create_directory") (param i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 call $path_create_directory)
  (func (export "path_symlink") (param i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $path_symlink)
  (func (export "path_link") (param i32 i32 i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 local.get 5 local.get 6 call $path_link)
  (func (export "fd_renumber") (param i32 i32) (result i32)
    local.get 0 local.get 1 call $fd_renumber)
  (func (export "fd_close") (param i32) (result i32)
    local.get 0 call $fd_close)
  (func (export "poll_oneoff") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $poll_oneoff)
  (func (export "fd_filestat_get") (param i32 i32) (result i32)
    local.get 0 local.get 1 call $fd_filestat_get)
  (func (export "path_filestat_get") (param i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $path_filestat_get)
  (func (export "fd_readdir") (param i32 i32 i32 i64 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $fd_readdir)
)
"#;

/// Engine-wide pieces every call shares: the linker with the shadowing functions, and the
/// pass-through module with a linker of the unshadowed WASI functions.
pub(crate) struct CallKit {
    pub(crate) linker: Linker<CallState>,
    real_wasi: Linker<CallState>,
    pass_through: Module,
}

pub(crate) struct CallState {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    stdout: Capped,
    stderr: Capped,
    /// Bytes still allowed into files, and the limit that names it.
    bytes_left: u64,
    bytes_limit: Limit,
    written: u64,
    files_left: u64,
    files_limit: Limit,
    created: u64,
    /// fds 0-2 still hold the captured streams (a guest may close or renumber over them).
    stdio_intact: [bool; 3],
    root: PathBuf,
    /// File times read as the fixed clock's epoch and inode numbers as the order the call
    /// first saw them in (see [`deterministic_filestat`]).
    deterministic: bool,
    inodes: GuestInodes,
    deadline: Instant,
    wall_limit: Limit,
    kit: Arc<CallKit>,
    forward: Option<Forward>,
    hit: Option<Limit>,
}

impl CallKit {
    pub(crate) fn new(engine: &Engine) -> Result<Arc<CallKit>, SandboxError> {
        let engine_err = |e: wasmtime::Error| SandboxError::Engine(format!("{e:#}"));
        let mut real_wasi: Linker<CallState> = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut real_wasi, |s: &mut CallState| &mut s.wasi)
            .map_err(engine_err)?;
        let mut linker: Linker<CallState> = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut CallState| &mut s.wasi)
            .map_err(engine_err)?;
        linker.allow_shadowing(true);
        add_shadows(&mut linker).map_err(engine_err)?;
        let pass_through = Module::new(engine, PASS_THROUGH_WAT).map_err(engine_err)?;
        Ok(Arc::new(CallKit {
            linker,
            real_wasi,
            pass_through,
        }))
    }
}

/// What one guest execution produced.
pub(crate) struct Execution {
    pub termination: Termination,
    pub stdout: Capped,
    pub stderr: Capped,
    pub usage: Usage,
}

/// Everything one execution needs besides the module.
pub(crate) struct ExecRequest<'a> {
    pub root: &'a Path,
    pub argv: &'a [String],
    pub stdin: Vec<u8>,
    pub limits: &'a Effective,
    pub memory: u64,
    pub table_elements: u32,
    pub stdout_cap: u64,
    pub stderr_cap: u64,
    pub deterministic: bool,
    pub seed: u64,
}

/// Runs `pre`'s `_start` once under `req`'s limits. Errors are host failures only; whatever the
/// guest does ends as a [`Termination`].
pub(crate) fn execute(
    kit: &Arc<CallKit>,
    engine: &Engine,
    pre: &InstancePre<CallState>,
    req: ExecRequest<'_>,
) -> Result<Execution, SandboxError> {
    let started = Instant::now();
    let mut builder = WasiCtxBuilder::new();
    builder
        .args(req.argv)
        .stdin(MemoryInputPipe::new(req.stdin))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .preopened_dir(req.root, ".", FsPerms::ReadWrite)
        .map_err(|e| SandboxError::io(req.root, std::io::Error::other(format!("{e:#}"))))?;
    if req.deterministic {
        builder
            .wall_clock(TickingWallClock::default())
            .monotonic_clock(TickingMonotonicClock::default())
            .secure_random(SplitMix64(req.seed))
            .insecure_random(SplitMix64(req.seed ^ 0x9e37_79b9_7f4a_7c15))
            .insecure_random_seed(u128::from(req.seed));
    }
    let (wall, wall_limit) = req.limits.wall_time;
    let (fuel, fuel_limit) = req.limits.fuel;
    let state = CallState {
        wasi: builder.build_p1(),
        limiter: Limiter {
            memory: usize::try_from(req.memory).unwrap_or(usize::MAX),
            table_elements: req.table_elements as usize,
            peak_memory: 0,
            hit: None,
        },
        stdout: Capped::new(usize::try_from(req.stdout_cap).unwrap_or(usize::MAX)),
        stderr: Capped::new(usize::try_from(req.stderr_cap).unwrap_or(usize::MAX)),
        bytes_left: req.limits.written_bytes.0,
        bytes_limit: req.limits.written_bytes.1,
        written: 0,
        files_left: req.limits.files_created.0,
        files_limit: req.limits.files_created.1,
        created: 0,
        stdio_intact: [true; 3],
        root: req.root.to_path_buf(),
        deterministic: req.deterministic,
        inodes: GuestInodes::default(),
        deadline: started + wall,
        wall_limit,
        kit: kit.clone(),
        forward: None,
        hit: None,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    store
        .set_fuel(fuel)
        .map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
    // With epochs on, a new Store's deadline is "now": set it on every Store.
    let ticks = wall.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1);
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    store.epoch_deadline_trap();

    let run = instantiate(pre, &mut store).and_then(|instance| {
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call(&mut store, ())
    });

    let fuel_left = store.get_fuel().unwrap_or(0);
    let state = store.into_data();
    let hit = state.hit.or(state.limiter.hit);
    let termination = match (run, hit) {
        (Ok(()), _) => Termination::Exited { code: 0 },
        // A limit our host functions or the limiter enforced: it names itself.
        (Err(_), Some(limit)) => Termination::Limit { limit },
        (Err(e), None) => classify(e, wall_limit, fuel_limit),
    };
    let usage = Usage {
        wall_time_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        fuel: fuel.saturating_sub(fuel_left),
        written_bytes: state.written,
        files_created: state.created,
        peak_memory: state.limiter.peak_memory as u64,
    };
    Ok(Execution {
        termination,
        stdout: state.stdout,
        stderr: state.stderr,
        usage,
    })
}

/// Attempts at instantiating a module whose memory image could not be made.
const INSTANTIATE_TRIES: usize = 3;

/// `pre` instantiated in `store`, tried again (up to [`INSTANTIATE_TRIES`] times in all) when
/// wasmtime could not seal the memfd that holds the module's memory image. It makes that
/// image at a module's first instantiation and seals it read-only (`F_SEAL_WRITE`), which
/// the kernel refuses with EBUSY while it holds the memfd's pages for a moment; CI saw it
/// once, as a tool call that died before its first instruction. Nothing of the guest ran, and
/// wasmtime keeps no failed image, so the next attempt starts afresh. Any other error, or the
/// last attempt's, is the call's.
fn instantiate<T>(pre: &InstancePre<T>, store: &mut Store<T>) -> wasmtime::Result<Instance> {
    let mut attempt = 1;
    loop {
        match pre.instantiate(&mut *store) {
            Err(e) if attempt < INSTANTIATE_TRIES && memfd_unsealed(&e) => attempt += 1,
            result => return result,
        }
    }
}

/// Whether `e` is the memfd crate's failure to add seals (its message, the only trace it
/// leaves through wasmtime's error).
fn memfd_unsealed(e: &wasmtime::Error) -> bool {
    e.chain()
        .any(|c| c.to_string() == "cannot add seals to the memfd")
}

fn classify(e: wasmtime::Error, wall_limit: Limit, fuel_limit: Limit) -> Termination {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Termination::Exited { code: exit.0 };
    }
    if let Some(LimitTrap(limit)) = e.downcast_ref::<LimitTrap>() {
        return Termination::Limit { limit: *limit };
    }
    let message = format!("{e:#}");
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Termination::Limit { limit: wall_limit },
        Some(Trap::OutOfFuel) => Termination::Limit { limit: fuel_limit },
        Some(trap) => Termination::Trap {
            trap: TrapKind::from_trap(*trap),
            message,
        },
        None => Termination::Trap {
            trap: TrapKind::Host,
            message,
        },
    }
}

/// A wall clock that starts at a fixed date and advances 1 µs per reading, so runs repeat.
#[derive(Default)]
struct TickingWallClock(std::sync::atomic::AtomicU64);

impl wasmtime_wasi::HostWallClock for TickingWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_micros(1)
    }
    fn now(&self) -> Duration {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Duration::from_secs(FIXED_EPOCH_SECS) + Duration::from_micros(n)
    }
}

#[derive(Default)]
struct TickingMonotonicClock(std::sync::atomic::AtomicU64);

impl wasmtime_wasi::HostMonotonicClock for TickingMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0
            .fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Seeded generator for the guest's `random_get` in deterministic mode (not cryptographic:
/// deterministic sandboxes exist for reproducible runs, not secrets).
struct SplitMix64(u64);

impl rand_core::TryRng for SplitMix64 {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok((self.try_next_u64()? >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Ok(z ^ (z >> 31))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Shadowing functions.

fn trap(caller: &mut Caller<'_, CallState>, limit: Limit) -> wasmtime::Error {
    caller.data_mut().hit = Some(limit);
    wasmtime::Error::new(LimitTrap(limit))
}

fn guest_memory(caller: &mut Caller<'_, CallState>) -> Option<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// The pass-through instance, created on the first forwarded call of this Store.
fn forward(caller: &mut Caller<'_, CallState>) -> wasmtime::Result<Forward> {
    if let Some(f) = &caller.data().forward {
        return Ok(f.clone());
    }
    let memory =
        guest_memory(caller).ok_or_else(|| wasmtime::format_err!("guest exports no memory"))?;
    let kit = caller.data().kit.clone();
    let mut imports = Vec::new();
    for import in kit.pass_through.imports() {
        if import.module() == "guest" {
            imports.push(Extern::Memory(memory));
        } else {
            let item = kit
                .real_wasi
                .get(&mut *caller, import.module(), import.name())?;
            imports.push(item);
        }
    }
    let instance = Instance::new(&mut *caller, &kit.pass_through, &imports)?;
    let f = Forward {
        fd_write: instance.get_typed_func(&mut *caller, "fd_write")?,
        fd_pwrite: instance.get_typed_func(&mut *caller, "fd_pwrite")?,
        fd_allocate: instance.get_typed_func(&mut *caller, "fd_allocate")?,
        fd_filestat_set_size: instance.get_typed_func(&mut *caller, "fd_filestat_set_size")?,
        path_open: instance.get_typed_func(&mut *caller, "path_open")?,
        path_create_directory: instance.get_typed_func(&mut *caller, "path_create_directory")?,
        path_symlink: instance.get_typed_func(&mut *caller, "path_symlink")?,
        path_link: instance.get_typed_func(&mut *caller, "path_link")?,
        fd_renumber: instance.get_typed_func(&mut *caller, "fd_renumber")?,
        fd_close: instance.get_typed_func(&mut *caller, "fd_close")?,
        poll_oneoff: instance.get_typed_func(&mut *caller, "poll_oneoff")?,
        fd_filestat_get: instance.get_typed_func(&mut *caller, "fd_filestat_get")?,
        path_filestat_get: instance.get_typed_func(&mut *caller, "path_filestat_get")?,
        fd_readdir: instance.get_typed_func(&mut *caller, "fd_readdir")?,
    };
    caller.data_mut().forward = Some(f.clone());
    Ok(f)
}

fn read_u32(mem: &[u8], at: usize) -> Option<u32> {
    let bytes = mem.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(mem: &[u8], at: usize) -> Option<u64> {
    let bytes = mem.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Total length of an iovec array, or `None` if it lies outside guest memory.
fn iovecs_len(mem: &[u8], iovs: u32, count: u32) -> Option<u64> {
    if count > MAX_IOVS {
        return None;
    }
    let mut total = 0u64;
    for i in 0..count as usize {
        let at = (iovs as usize).checked_add(i * 8)?;
        let ptr = read_u32(mem, at)? as usize;
        let len = read_u32(mem, at + 4)? as usize;
        mem.get(ptr..ptr.checked_add(len)?)?;
        total += len as u64;
    }
    Some(total)
}

/// Copies at most `max` bytes of an iovec array into `out` (already bounds-checked by
/// `iovecs_len`).
fn gather(mem: &[u8], iovs: u32, count: u32, max: usize, out: &mut Vec<u8>) -> Option<()> {
    for i in 0..count as usize {
        let at = (iovs as usize).checked_add(i * 8)?;
        let ptr = read_u32(mem, at)? as usize;
        let len = read_u32(mem, at + 4)? as usize;
        let take = len.min(max.saturating_sub(out.len()));
        out.extend_from_slice(mem.get(ptr..ptr.checked_add(take)?)?);
        if out.len() >= max {
            break;
        }
    }
    Some(())
}

/// Whether `path` (relative to `dir_fd`) names something that exists. Exact for paths under
/// the episode root; anything else is assumed new, which errs towards counting a creation.
fn exists_under_root(state: &CallState, dir_fd: i32, path: &[u8]) -> bool {
    if dir_fd != ROOT_FD {
        return false;
    }
    let Ok(path) = std::str::from_utf8(path) else {
        return false;
    };
    let rel = Path::new(path);
    if !rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return false;
    }
    state.root.join(rel).symlink_metadata().is_ok()
}

fn read_path(caller: &mut Caller<'_, CallState>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = guest_memory(caller)?;
    let data = mem.data(&*caller);
    let start = ptr as u32 as usize;
    Some(
        data.get(start..start.checked_add(len as u32 as usize)?)?
            .to_vec(),
    )
}

/// Runs `op`, the forwarded call that may create `path` under `dir_fd`, charging the
/// creation to the file quota: refused beforehand when the quota is spent, counted afterwards
/// when the call succeeded and the path did not exist.
fn creating(
    caller: &mut Caller<'_, CallState>,
    dir_fd: i32,
    path: i32,
    path_len: i32,
    op: impl FnOnce(&mut Caller<'_, CallState>, &Forward) -> wasmtime::Result<i32>,
) -> wasmtime::Result<i32> {
    let Some(p) = read_path(caller, path, path_len) else {
        return Ok(ERRNO_FAULT);
    };
    let new = !exists_under_root(caller.data(), dir_fd, &p);
    if new && caller.data().files_left == 0 {
        let limit = caller.data().files_limit;
        return Err(trap(caller, limit));
    }
    let f = forward(caller)?;
    let errno = op(caller, &f)?;
    if new && errno == ERRNO_SUCCESS {
        let s = caller.data_mut();
        s.files_left = s.files_left.saturating_sub(1);
        s.created += 1;
    }
    Ok(errno)
}

/// Charges `len` bytes of file writes, or ends the call when the quota cannot cover them.
fn admit_bytes(caller: &mut Caller<'_, CallState>, len: u64) -> wasmtime::Result<()> {
    let s = caller.data_mut();
    if len > s.bytes_left {
        let limit = s.bytes_limit;
        return Err(trap(caller, limit));
    }
    s.bytes_left -= len;
    s.written += len;
    Ok(())
}

fn add_shadows(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        P1,
        "fd_write",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         iovs: i32,
         count: i32,
         nwritten: i32|
         -> wasmtime::Result<i32> {
            let Some(mem) = guest_memory(&mut caller) else {
                return Ok(ERRNO_FAULT);
            };
            let captured = (fd == 1 || fd == 2) && caller.data().stdio_intact[fd as usize];
            let Some(total) = iovecs_len(mem.data(&caller), iovs as u32, count as u32) else {
                return Ok(ERRNO_FAULT);
            };
            if captured {
                // stdout / stderr go straight into the capped buffers; never copy more than
                // the room left, whatever length the guest claims.
                let (room, limit) = {
                    let s = caller.data();
                    let stream = if fd == 1 { &s.stdout } else { &s.stderr };
                    let limit = if fd == 1 {
                        Limit::Stdout
                    } else {
                        Limit::Stderr
                    };
                    (stream.cap.saturating_sub(stream.bytes.len()), limit)
                };
                let mut data = Vec::with_capacity(room.min(total as usize));
                if gather(
                    mem.data(&caller),
                    iovs as u32,
                    count as u32,
                    room.saturating_add(1),
                    &mut data,
                )
                .is_none()
                {
                    return Ok(ERRNO_FAULT);
                }
                let state = caller.data_mut();
                let stream = if fd == 1 {
                    &mut state.stdout
                } else {
                    &mut state.stderr
                };
                if !stream.push(&data) {
                    return Err(trap(&mut caller, limit));
                }
                let at = nwritten as u32 as usize;
                let out = mem.data_mut(&mut caller);
                let Some(slot) = out.get_mut(at..at.saturating_add(4)) else {
                    return Ok(ERRNO_FAULT);
                };
                slot.copy_from_slice(&(total as u32).to_le_bytes());
                return Ok(ERRNO_SUCCESS);
            }
            admit_bytes(&mut caller, total)?;
            let f = forward(&mut caller)?;
            f.fd_write.call(&mut caller, (fd, iovs, count, nwritten))
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_pwrite",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         iovs: i32,
         count: i32,
         offset: i64,
         nwritten: i32|
         -> wasmtime::Result<i32> {
            let Some(mem) = guest_memory(&mut caller) else {
                return Ok(ERRNO_FAULT);
            };
            let Some(total) = iovecs_len(mem.data(&caller), iovs as u32, count as u32) else {
                return Ok(ERRNO_FAULT);
            };
            // A write past the end leaves a sparse hole that takes no disk: charge the data.
            admit_bytes(&mut caller, total)?;
            let f = forward(&mut caller)?;
            f.fd_pwrite
                .call(&mut caller, (fd, iovs, count, offset, nwritten))
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_allocate",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         offset: i64,
         len: i64|
         -> wasmtime::Result<i32> {
            if offset < 0 || len < 0 {
                return Ok(ERRNO_INVAL);
            }
            admit_bytes(&mut caller, (offset as u64).saturating_add(len as u64))?;
            let f = forward(&mut caller)?;
            f.fd_allocate.call(&mut caller, (fd, offset, len))
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_filestat_set_size",
        |mut caller: Caller<'_, CallState>, fd: i32, size: i64| -> wasmtime::Result<i32> {
            if size < 0 {
                return Ok(ERRNO_INVAL);
            }
            // Growing a file (even sparsely) may claim disk: charge the new size.
            admit_bytes(&mut caller, size as u64)?;
            let f = forward(&mut caller)?;
            f.fd_filestat_set_size.call(&mut caller, (fd, size))
        },
    )?;
    linker.func_wrap(
        P1,
        "path_open",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         dirflags: i32,
         path: i32,
         path_len: i32,
         oflags: i32,
         rights_base: i64,
         rights_inheriting: i64,
         fdflags: i32,
         opened: i32|
         -> wasmtime::Result<i32> {
            let args = (
                fd,
                dirflags,
                path,
                path_len,
                oflags,
                rights_base,
                rights_inheriting,
                fdflags,
                opened,
            );
            if oflags & OFLAGS_CREAT == 0 {
                let f = forward(&mut caller)?;
                return f.path_open.call(&mut caller, args);
            }
            creating(&mut caller, fd, path, path_len, |c, f| {
                f.path_open.call(c, args)
            })
        },
    )?;
    linker.func_wrap(
        P1,
        "path_create_directory",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         path: i32,
         path_len: i32|
         -> wasmtime::Result<i32> {
            creating(&mut caller, fd, path, path_len, |c, f| {
                f.path_create_directory.call(c, (fd, path, path_len))
            })
        },
    )?;
    linker.func_wrap(
        P1,
        "path_symlink",
        |mut caller: Caller<'_, CallState>,
         old: i32,
         old_len: i32,
         fd: i32,
         new_path: i32,
         new_len: i32|
         -> wasmtime::Result<i32> {
            creating(&mut caller, fd, new_path, new_len, |c, f| {
                f.path_symlink
                    .call(c, (old, old_len, fd, new_path, new_len))
            })
        },
    )?;
    linker.func_wrap(
        P1,
        "path_link",
        |mut caller: Caller<'_, CallState>,
         old_fd: i32,
         old_flags: i32,
         old: i32,
         old_len: i32,
         new_fd: i32,
         new_path: i32,
         new_len: i32|
         -> wasmtime::Result<i32> {
            creating(&mut caller, new_fd, new_path, new_len, |c, f| {
                f.path_link.call(
                    c,
                    (old_fd, old_flags, old, old_len, new_fd, new_path, new_len),
                )
            })
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_renumber",
        |mut caller: Caller<'_, CallState>, from: i32, to: i32| -> wasmtime::Result<i32> {
            // Renumbering a file onto fd 1 or 2 would let its writes bypass the write quota.
            if (0..3).contains(&to) {
                return Ok(ERRNO_NOTSUP);
            }
            let f = forward(&mut caller)?;
            let errno = f.fd_renumber.call(&mut caller, (from, to))?;
            if errno == ERRNO_SUCCESS && (0..3).contains(&from) {
                caller.data_mut().stdio_intact[from as usize] = false;
            }
            Ok(errno)
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_close",
        |mut caller: Caller<'_, CallState>, fd: i32| -> wasmtime::Result<i32> {
            let f = forward(&mut caller)?;
            let errno = f.fd_close.call(&mut caller, fd)?;
            if errno == ERRNO_SUCCESS && (0..3).contains(&fd) {
                // The number may now be reused for a file, whose writes must be charged.
                caller.data_mut().stdio_intact[fd as usize] = false;
            }
            Ok(errno)
        },
    )?;
    linker.func_wrap(
        P1,
        "poll_oneoff",
        |mut caller: Caller<'_, CallState>,
         subs: i32,
         events: i32,
         count: i32,
         nevents: i32|
         -> wasmtime::Result<i32> {
            // A guest sleeping inside the host cannot be interrupted by epochs: refuse a
            // sleep that would outlast the call's wall-time deadline.
            let Some(mem) = guest_memory(&mut caller) else {
                return Ok(ERRNO_FAULT);
            };
            if count as u32 > MAX_SUBSCRIPTIONS {
                return Ok(ERRNO_INVAL);
            }
            let Some(wait) = poll_wait(mem.data(&caller), subs as u32, count as u32) else {
                return Ok(ERRNO_FAULT);
            };
            let left = caller
                .data()
                .deadline
                .saturating_duration_since(Instant::now());
            if wait > left {
                let limit = caller.data().wall_limit;
                return Err(trap(&mut caller, limit));
            }
            let f = forward(&mut caller)?;
            f.poll_oneoff
                .call(&mut caller, (subs, events, count, nevents))
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_filestat_get",
        |mut caller: Caller<'_, CallState>, fd: i32, buf: i32| -> wasmtime::Result<i32> {
            let f = forward(&mut caller)?;
            let errno = f.fd_filestat_get.call(&mut caller, (fd, buf))?;
            Ok(deterministic_filestat(&mut caller, errno, buf))
        },
    )?;
    linker.func_wrap(
        P1,
        "path_filestat_get",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         flags: i32,
         path: i32,
         path_len: i32,
         buf: i32|
         -> wasmtime::Result<i32> {
            let f = forward(&mut caller)?;
            let errno = f
                .path_filestat_get
                .call(&mut caller, (fd, flags, path, path_len, buf))?;
            Ok(deterministic_filestat(&mut caller, errno, buf))
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_readdir",
        |mut caller: Caller<'_, CallState>,
         fd: i32,
         buf: i32,
         buf_len: i32,
         cookie: i64,
         used: i32|
         -> wasmtime::Result<i32> {
            let f = forward(&mut caller)?;
            let errno = f
                .fd_readdir
                .call(&mut caller, (fd, buf, buf_len, cookie, used))?;
            Ok(deterministic_dirents(&mut caller, errno, buf, used))
        },
    )?;
    Ok(())
}

/// Byte offsets in a WASI p1 `filestat`: `ino` (u64), and `atim`, which `mtim` and `ctim`
/// follow (u64 ns each).
const FILESTAT_INO: usize = 8;
const FILESTAT_ATIM: usize = 40;
/// Byte offsets in a WASI p1 `dirent` header: `d_ino` (u64) and `d_namlen` (u32); the name
/// follows the 24-byte header.
const DIRENT_INO: usize = 8;
const DIRENT_NAMLEN: usize = 16;
const DIRENT_HEADER: usize = 24;

/// The most inode numbers one call maps (one per file or directory it stats or lists): past
/// it, host numbers pass through, and runs that see more files may differ in them (a host
/// number is a 64-bit hash, so it meeting one of the small guest numbers is not a concern).
const MAX_GUEST_INODES: usize = 1 << 20;

/// Inode numbers as the guest sees them in deterministic mode: 1, 2, 3, ... in the order the
/// call first meets each host number. The host's (what wasmtime-wasi reports, derived from the
/// host file system's) differ between two episode directories, and guests read them without
/// printing them: CPython builds an int from every `stat`'s `st_ino`, and the fuel that takes
/// depends on the value (two runs of the same call in two directories were 506 fuel apart).
/// Distinct files keep distinct numbers within a call, so `os.path.samefile` still holds.
#[derive(Default)]
struct GuestInodes(std::collections::HashMap<u64, u64>);

impl GuestInodes {
    fn guest(&mut self, host: u64) -> u64 {
        let next = self.0.len() as u64 + 1;
        match self.0.get(&host) {
            Some(&ino) => ino,
            None if self.0.len() < MAX_GUEST_INODES => {
                self.0.insert(host, next);
                next
            }
            None => host,
        }
    }
}

/// In deterministic mode, rewrites the `filestat` that a successful call wrote at `buf`: its
/// three times read as the fixed clock's epoch, its inode number as [`GuestInodes`] maps it.
/// Host file times differ between any two runs, and guests read them even when they print
/// nothing of them (CPython's importer stats the working directory on every import; how much
/// fuel its float arithmetic takes depends on the value), so passing them through made fuel,
/// `ls -l` and `os.stat` differ run to run. The guest's world then has one instant, the one
/// its wall clock starts at: files keep their sizes, kinds and contents, and all their times
/// are equal. Returns `errno`, or `FAULT` if the struct lies outside guest memory.
fn deterministic_filestat(caller: &mut Caller<'_, CallState>, errno: i32, buf: i32) -> i32 {
    if errno != ERRNO_SUCCESS || !caller.data().deterministic {
        return errno;
    }
    let Some(mem) = guest_memory(caller) else {
        return ERRNO_FAULT;
    };
    let (data, state) = mem.data_and_store_mut(&mut *caller);
    let at = buf as u32 as usize;
    let Some(stat) = data.get_mut(at..at + FILESTAT_ATIM + 24) else {
        return ERRNO_FAULT;
    };
    let ino = &mut stat[FILESTAT_INO..FILESTAT_INO + 8];
    let host = u64::from_le_bytes(ino.try_into().unwrap_or([0; 8]));
    ino.copy_from_slice(&state.inodes.guest(host).to_le_bytes());
    let epoch = (FIXED_EPOCH_SECS * 1_000_000_000).to_le_bytes();
    for t in stat[FILESTAT_ATIM..].chunks_exact_mut(8) {
        t.copy_from_slice(&epoch);
    }
    ERRNO_SUCCESS
}

/// In deterministic mode, rewrites the `d_ino` of every entry that a successful `fd_readdir`
/// wrote whole enough to hold it (`*used` bytes at `buf`; the last entry may be cut short) as
/// [`GuestInodes`] maps it, as `stat` reports it. Returns `errno`, or `FAULT` if the buffer
/// lies outside guest memory.
fn deterministic_dirents(
    caller: &mut Caller<'_, CallState>,
    errno: i32,
    buf: i32,
    used: i32,
) -> i32 {
    if errno != ERRNO_SUCCESS || !caller.data().deterministic {
        return errno;
    }
    let Some(mem) = guest_memory(caller) else {
        return ERRNO_FAULT;
    };
    let (data, state) = mem.data_and_store_mut(&mut *caller);
    let Some(len) = read_u32(data, used as u32 as usize) else {
        return ERRNO_FAULT;
    };
    let start = buf as u32 as usize;
    let Some(entries) = data.get_mut(start..start.saturating_add(len as usize)) else {
        return ERRNO_FAULT;
    };
    let mut at = 0;
    while let Some(ino) = entries.get_mut(at + DIRENT_INO..at + DIRENT_INO + 8) {
        let host = u64::from_le_bytes(ino.try_into().unwrap_or([0; 8]));
        ino.copy_from_slice(&state.inodes.guest(host).to_le_bytes());
        let Some(namlen) = read_u32(entries, at + DIRENT_NAMLEN) else {
            break;
        };
        at += DIRENT_HEADER + namlen as usize;
    }
    ERRNO_SUCCESS
}

/// How long a `poll_oneoff` may block: zero if any fd subscription (always ready here, as all
/// streams are in memory or files), else the shortest relative clock timeout. Absolute
/// timeouts are bounded by treating them as relative, which only errs towards refusing.
fn poll_wait(mem: &[u8], subs: u32, count: u32) -> Option<Duration> {
    let mut shortest: Option<u64> = None;
    for i in 0..count as usize {
        let base = (subs as usize).checked_add(i.checked_mul(48)?)?;
        let tag = *mem.get(base + 8)?;
        if tag != 0 {
            return Some(Duration::ZERO);
        }
        let timeout = read_u64(mem, base + 24)?;
        shortest = Some(shortest.map_or(timeout, |s| s.min(timeout)));
    }
    Some(Duration::from_nanos(shortest.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the memfd crate's sealing failure, wherever it sits in the chain, is tried again.
    #[test]
    fn only_an_unsealed_memfd_is_tried_again() {
        let sealing = wasmtime::Error::msg("cannot add seals to the memfd");
        assert!(memfd_unsealed(&sealing));
        assert!(memfd_unsealed(&sealing.context("instantiating python")));
        let other = wasmtime::Error::msg("cannot create the memfd");
        assert!(!memfd_unsealed(&other));
        assert!(!memfd_unsealed(&wasmtime::Error::msg("out of fuel")));
    }
}
