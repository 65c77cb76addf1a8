//! `klongd bench sandbox`: measures, on the machine it runs on, the three numbers the sandbox
//! design is judged by:
//!
//! 1. the latency of a trivial tool call, against fork/exec of the same C tool compiled
//!    natively (the design goal: p50 <= 100 µs and at least 10x faster than fork/exec);
//! 2. what module compilation costs cold, from the on-disk cache and from memory (a tool
//!    call must never compile);
//! 3. how many idle, warmed-up sandboxes fit in a GiB of resident memory (goal: >= 1,000).
//!
//! All numbers come from one process and one run, so they are comparable with each other but
//! not across machines: the report says which machine it ran on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use klong_sandbox::engine::new_engine;
use klong_sandbox::{
    CallLimits, EpisodeBudget, HostSettings, ModuleCache, ModuleSource, Outcome, Sandbox,
    SandboxHost, ToolKind, ToolRegistry,
};
use serde::Serialize;

/// Design goal: median latency of a trivial tool call.
pub const GOAL_CALL_P50_US: f64 = 100.0;
/// Design goal: how much faster than fork/exec of the native tool a call must be (p50).
pub const GOAL_FORK_EXEC_RATIO: f64 = 10.0;
/// Design goal: idle sandboxes per GiB of resident memory.
pub const GOAL_SANDBOXES_PER_GIB: f64 = 1_000.0;

const GIB: f64 = (1u64 << 30) as f64;

pub struct SandboxBenchOptions {
    /// The tool manifests directory (`sandboxes/tools/manifests`).
    pub tools_dir: PathBuf,
    /// The natively compiled tools (`sandboxes/tools/wasm/native`, with `bin/TOOL` links).
    pub native_dir: PathBuf,
    /// Timed calls per tool and per side (sandbox, fork/exec).
    pub iterations: usize,
    /// Idle sandboxes kept alive for the memory measurement.
    pub sandboxes: usize,
}

/// Latency distribution of one kind of call, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

/// One command run both ways.
#[derive(Debug, Clone, Serialize)]
pub struct CallComparison {
    /// The command line, e.g. `echo hello`.
    pub command: String,
    pub sandbox: Latency,
    pub fork_exec: Latency,
    /// fork/exec p50 ÷ sandbox p50.
    pub ratio_p50: f64,
    pub meets_p50_goal: bool,
    pub meets_ratio_goal: bool,
}

/// Load times of one module through a [`ModuleCache`], in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct CompileTimes {
    pub module: String,
    pub wasm_bytes: u64,
    /// Fresh cache, empty directory: compile with cranelift, then write the disk cache.
    pub cold_ms: f64,
    /// Fresh cache over the same directory: deserialize the compiled module.
    pub disk_ms: f64,
    /// The same cache again: a hash lookup (dominated by hashing the wasm file).
    pub memory_ms: f64,
}

/// Resident memory of idle sandboxes.
#[derive(Debug, Clone, Serialize)]
pub struct IdleMemory {
    pub sandboxes: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// What the sandboxes' own structures occupy at least (struct and directory path), per
    /// sandbox, not counting allocator overhead.
    pub struct_bytes_per_sandbox: f64,
    /// (after − before) ÷ sandboxes, or `struct_bytes_per_sandbox` when RSS grew by less:
    /// the allocator then served the sandboxes from memory freed earlier, and RSS cannot
    /// see them.
    pub bytes_per_sandbox: f64,
    /// Whether `bytes_per_sandbox` is the RSS growth (true) or the structural floor (false).
    pub rss_resolved: bool,
    pub sandboxes_per_gib: f64,
    pub meets_goal: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SandboxBenchReport {
    /// CPU model and count, so that numbers are read against the right machine.
    pub machine: String,
    pub iterations: usize,
    pub calls: Vec<CallComparison>,
    pub compile: Vec<CompileTimes>,
    pub idle: IdleMemory,
}

impl SandboxBenchReport {
    /// A small aligned table, with each goal beside its number.
    pub fn render(&self) -> String {
        let mut s = format!(
            "sandbox benchmark ({} iterations, {})\n",
            self.iterations, self.machine
        );
        for c in &self.calls {
            s.push('\n');
            row(
                &mut s,
                &format!("tool call `{}`", c.command),
                &latency_columns(&c.sandbox),
                &format!(
                    "(goal p50 <= {GOAL_CALL_P50_US} µs: {})",
                    verdict(c.meets_p50_goal)
                ),
            );
            row(
                &mut s,
                &format!("fork/exec native `{}`", c.command),
                &latency_columns(&c.fork_exec),
                "",
            );
            row(
                &mut s,
                "ratio fork/exec / sandbox (p50)",
                &format!("{:.1}x", c.ratio_p50),
                &format!(
                    "(goal >= {GOAL_FORK_EXEC_RATIO}x: {})",
                    verdict(c.meets_ratio_goal)
                ),
            );
        }
        s.push('\n');
        let columns =
            |a: &str, b: &str, c: &str, d: &str| format!("{a:>10} {b:>14} {c:>12} {d:>12}");
        row(
            &mut s,
            "module load",
            &columns("wasm size", "cold compile", "disk cache", "memory"),
            "",
        );
        for m in &self.compile {
            row(
                &mut s,
                &m.module,
                &columns(
                    &format_bytes(m.wasm_bytes as f64),
                    &format_ms(m.cold_ms),
                    &format_ms(m.disk_ms),
                    &format_ms(m.memory_ms),
                ),
                "",
            );
        }
        s.push('\n');
        let i = &self.idle;
        let grown = i.rss_after_bytes.saturating_sub(i.rss_before_bytes);
        let each = if i.rss_resolved {
            format!("{} each", format_bytes(i.bytes_per_sandbox))
        } else {
            // RSS grew less than the sandboxes' own structures: freed memory was reused.
            format!(
                "{} each (struct floor; RSS did not resolve it)",
                format_bytes(i.bytes_per_sandbox)
            )
        };
        row(
            &mut s,
            &format!("idle sandboxes ({} warmed)", i.sandboxes),
            &format!("RSS +{}, {each}", format_bytes(grown as f64)),
            "",
        );
        row(
            &mut s,
            "sandboxes per GiB of RSS",
            &format!("{:.0}", i.sandboxes_per_gib),
            &format!(
                "(goal >= {GOAL_SANDBOXES_PER_GIB}: {})",
                verdict(i.meets_goal)
            ),
        );
        s
    }
}

/// One line of the table: label, numbers, goal, in fixed columns.
fn row(out: &mut String, label: &str, numbers: &str, goal: &str) {
    let line = format!("{label:<34} {numbers:<52}   {goal}");
    out.push_str(line.trim_end());
    out.push('\n');
}

fn latency_columns(l: &Latency) -> String {
    format!(
        "p50 {:>8.1} µs   p99 {:>8.1} µs   mean {:>8.1} µs",
        l.p50_us, l.p99_us, l.mean_us
    )
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn format_ms(ms: f64) -> String {
    if ms >= 1_000.0 {
        format!("{:.2} s", ms / 1_000.0)
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.1} µs", ms * 1_000.0)
    }
}

fn format_bytes(b: f64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Runs the whole benchmark. Takes tens of seconds: CPython's module is compiled once cold.
pub fn sandbox(opts: &SandboxBenchOptions) -> Result<SandboxBenchReport> {
    ensure!(opts.iterations > 0, "iterations must be at least 1");
    ensure!(opts.sandboxes > 0, "sandboxes must be at least 1");
    let native_bin = opts.native_dir.join("bin");
    for tool in ["true", "echo"] {
        let path = native_bin.join(tool);
        ensure!(
            path.is_file(),
            "native tools missing ({} not found): run sandboxes/tools/build.sh",
            path.display()
        );
    }
    let registry =
        Arc::new(ToolRegistry::load_dir(&opts.tools_dir).with_context(|| {
            format!("loading tool manifests from {}", opts.tools_dir.display())
        })?);
    let host_cache = tempfile::tempdir().context("creating a temporary module cache")?;
    let host = SandboxHost::new(HostSettings {
        cache_dir: Some(host_cache.path().to_path_buf()),
        deterministic: true,
        ..Default::default()
    })
    .context("starting the sandbox host")?;

    // Order matters for the memory measurement: it comes first, so that the memory the
    // latency loops and the compile benchmark (CPython) allocate and free is not lying in the
    // allocator's free lists, where the idle sandboxes would be served from it unseen by RSS.
    let episodes = tempfile::tempdir().context("creating a temporary episode directory")?;
    let idle = idle_memory(&host, &registry, episodes.path(), opts.sandboxes)?;
    let calls = vec![
        compare_call(
            &host,
            &registry,
            episodes.path(),
            &native_bin,
            "true",
            &[],
            opts.iterations,
        )?,
        compare_call(
            &host,
            &registry,
            episodes.path(),
            &native_bin,
            "echo",
            &["hello"],
            opts.iterations,
        )?,
    ];
    episodes
        .close()
        .context("removing the temporary episode directories")?;

    let compile = compile_times(&registry)?;
    drop(host);
    host_cache
        .close()
        .context("removing the temporary module cache")?;

    Ok(SandboxBenchReport {
        machine: machine_description(),
        iterations: opts.iterations,
        calls,
        compile,
        idle,
    })
}

/// Times `tool args` in a sandbox, then as a native process, `iterations` times each after a
/// warm-up. Back to back rather than interleaved: an agent's calls come in runs, and a
/// process spawn between two sandbox calls would evict the caches a real run keeps warm.
fn compare_call(
    host: &Arc<SandboxHost>,
    registry: &Arc<ToolRegistry>,
    episodes: &Path,
    native_bin: &Path,
    tool: &str,
    args: &[&str],
    iterations: usize,
) -> Result<CallComparison> {
    let command = std::iter::once(tool)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    // What the tool prints: `true` nothing, `echo` its arguments and a newline.
    let expected = if args.is_empty() {
        String::new()
    } else {
        format!("{}\n", args.join(" "))
    };
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let warmup = (iterations / 10).clamp(10, 200);

    let mut sandbox = Sandbox::new(
        host.clone(),
        registry.clone(),
        &episodes.join(format!("latency-{tool}")),
        CallLimits::default(),
        EpisodeBudget::default(),
        0,
    )
    .context("creating the latency sandbox")?;
    tracing::info!(%command, warmup, iterations, "timing sandbox calls");
    // The first call compiles the module (or loads it from the cache); the rest of the
    // warm-up settles allocator and branch-predictor state.
    for _ in 0..warmup {
        let outcome = sandbox
            .exec_argv(tool, &args, Vec::new())
            .with_context(|| format!("sandbox call `{command}`"))?;
        check_outcome(&command, &outcome, &expected)?;
    }
    let mut sandbox_us = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let outcome = sandbox.exec_argv(tool, &args, Vec::new());
        let elapsed = started.elapsed();
        let outcome = outcome.with_context(|| format!("sandbox call `{command}`"))?;
        check_outcome(&command, &outcome, &expected)?;
        sandbox_us.push(micros(elapsed));
    }

    let program = native_bin.join(tool);
    tracing::info!(%command, program = %program.display(), "timing fork/exec");
    let mut native_us = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let started = Instant::now();
        // stdout is piped and read, as the sandbox captures it; stdin and stderr are closed
        // off so that the child does not touch the terminal.
        let output = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output();
        let elapsed = started.elapsed();
        let output = output.with_context(|| format!("running {}", program.display()))?;
        ensure!(
            output.status.success() && output.stdout == expected.as_bytes(),
            "native `{command}` misbehaved: {} with stdout {:?}",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
        if i >= warmup {
            native_us.push(micros(elapsed));
        }
    }

    let sandbox = latency(&mut sandbox_us)?;
    let fork_exec = latency(&mut native_us)?;
    let ratio_p50 = fork_exec.p50_us / sandbox.p50_us.max(f64::MIN_POSITIVE);
    tracing::info!(%command, sandbox_p50_us = sandbox.p50_us, fork_exec_p50_us = fork_exec.p50_us, ratio_p50, "call latency");
    Ok(CallComparison {
        command,
        meets_p50_goal: sandbox.p50_us <= GOAL_CALL_P50_US,
        meets_ratio_goal: ratio_p50 >= GOAL_FORK_EXEC_RATIO,
        sandbox,
        fork_exec,
        ratio_p50,
    })
}

/// A benchmark of a call that fails measures the failure path; refuse to report it.
fn check_outcome(command: &str, outcome: &Outcome, expected_stdout: &str) -> Result<()> {
    if !outcome.success() || outcome.stdout != expected_stdout {
        bail!(
            "sandbox `{command}` misbehaved: {:?}, stdout {:?}, stderr {:?}",
            outcome.termination,
            outcome.stdout,
            outcome.stderr
        );
    }
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Summarises samples (sorting them in place).
fn latency(samples: &mut [f64]) -> Result<Latency> {
    samples.sort_by(f64::total_cmp);
    let (Some(&min_us), Some(&max_us)) = (samples.first(), samples.last()) else {
        bail!("no latency samples");
    };
    Ok(Latency {
        samples: samples.len(),
        p50_us: percentile(samples, 50.0),
        p99_us: percentile(samples, 99.0),
        mean_us: samples.iter().sum::<f64>() / samples.len() as f64,
        min_us,
        max_us,
    })
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p` percent
/// of all samples at or below it. Unlike interpolation it always returns an observed value,
/// which is what a tail latency should be. `NaN` for no samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Creates `count` sandboxes, each with its own episode directory and one `true` call behind
/// it, and measures how much resident memory keeping them alive costs.
fn idle_memory(
    host: &Arc<SandboxHost>,
    registry: &Arc<ToolRegistry>,
    episodes: &Path,
    count: usize,
) -> Result<IdleMemory> {
    let root = episodes.join("idle");
    // One sandbox first, so that what every sandbox shares (the compiled module, the host's
    // first-call allocations) is in the baseline rather than in the per-sandbox cost.
    let mut first = Sandbox::new(
        host.clone(),
        registry.clone(),
        &root.join("warm"),
        CallLimits::default(),
        EpisodeBudget::default(),
        0,
    )
    .context("creating the warm-up sandbox")?;
    let outcome = first
        .exec_argv("true", &[], Vec::new())
        .context("sandbox call `true`")?;
    check_outcome("true", &outcome, "")?;

    let before = rss_bytes()?;
    tracing::info!(count, rss_before = before, "creating idle sandboxes");
    let mut alive = Vec::with_capacity(count);
    for i in 0..count {
        let mut sandbox = Sandbox::new(
            host.clone(),
            registry.clone(),
            &root.join(format!("ep-{i}")),
            CallLimits::default(),
            EpisodeBudget::default(),
            i as u64,
        )
        .with_context(|| format!("creating idle sandbox {i}"))?;
        let outcome = sandbox
            .exec_argv("true", &[], Vec::new())
            .context("sandbox call `true`")?;
        check_outcome("true", &outcome, "")?;
        alive.push(sandbox);
    }
    let after = rss_bytes()?;
    // The floor: each sandbox's slot in `alive` plus its canonical directory path on the heap.
    let struct_bytes = alive
        .iter()
        .map(|s| std::mem::size_of::<Sandbox>() + s.dir().as_os_str().len())
        .sum::<usize>() as f64
        / count as f64;
    tracing::info!(
        count,
        rss_after = after,
        struct_bytes,
        "idle sandboxes alive"
    );
    drop(alive);
    drop(first);

    let rss_per_sandbox = after.saturating_sub(before) as f64 / count as f64;
    let rss_resolved = rss_per_sandbox >= struct_bytes;
    let bytes_per_sandbox = rss_per_sandbox.max(struct_bytes);
    let sandboxes_per_gib = GIB / bytes_per_sandbox.max(1.0);
    Ok(IdleMemory {
        sandboxes: count,
        rss_before_bytes: before,
        rss_after_bytes: after,
        struct_bytes_per_sandbox: struct_bytes,
        bytes_per_sandbox,
        rss_resolved,
        sandboxes_per_gib,
        meets_goal: sandboxes_per_gib >= GOAL_SANDBOXES_PER_GIB,
    })
}

/// Resident set size of this process. `smaps_rollup` reports kB directly, so no page size
/// is needed; `statm` (in pages, assumed 4 KiB) is the fallback for kernels before 4.14.
fn rss_bytes() -> Result<u64> {
    if let Ok(text) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        if let Some(kb) = text
            .lines()
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            return Ok(kb * 1024);
        }
    }
    let statm = std::fs::read_to_string("/proc/self/statm")
        .context("reading /proc/self/statm (the benchmark needs Linux's /proc)")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected /proc/self/statm: {statm:?}"))?;
    Ok(pages * 4096)
}

/// Cold, disk-cached and in-memory load of every distinct module of the registry that the
/// benchmark cares about: coreutils (which `true` lives in) and CPython, if present.
fn compile_times(registry: &ToolRegistry) -> Result<Vec<CompileTimes>> {
    let mut modules = Vec::new();
    for tool in ["true", "python"] {
        match registry.get(tool).map(|t| &t.kind) {
            Some(ToolKind::Module(m)) if m.path.is_file() => modules.push(m.path.clone()),
            // `true` is what the call benchmark ran, so it exists; python is optional.
            _ if tool == "python" => tracing::info!("no python module; skipping its compile time"),
            _ => bail!("the registry has no `{tool}` module"),
        }
    }
    let engine = new_engine().context("creating a wasm engine")?;
    let mut times = Vec::new();
    for path in modules {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let wasm_bytes = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let dir = tempfile::tempdir().context("creating a temporary module cache")?;
        tracing::info!(module = %name, wasm_bytes, "compiling cold");
        let cold = timed_load(
            &ModuleCache::new(engine.clone(), Some(dir.path().to_path_buf()))?,
            &path,
            ModuleSource::Compiled,
        )?;
        let cache = ModuleCache::new(engine.clone(), Some(dir.path().to_path_buf()))?;
        let disk = timed_load(&cache, &path, ModuleSource::Disk)?;
        let memory = timed_load(&cache, &path, ModuleSource::Memory)?;
        drop(cache);
        dir.close().context("removing the temporary module cache")?;
        tracing::info!(module = %name, cold_ms = cold, disk_ms = disk, memory_ms = memory, "module load times");
        times.push(CompileTimes {
            module: name,
            wasm_bytes,
            cold_ms: cold,
            disk_ms: disk,
            memory_ms: memory,
        });
    }
    Ok(times)
}

/// Milliseconds one `load_file` took; errors if the module did not come from `expected`, as
/// then the number would mean something else.
fn timed_load(cache: &ModuleCache, path: &Path, expected: ModuleSource) -> Result<f64> {
    let started = Instant::now();
    let (_module, source) = cache
        .load_file(path)
        .with_context(|| format!("loading {}", path.display()))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    ensure!(
        source == expected,
        "{}: expected a {expected:?} load, got {source:?}",
        path.display()
    );
    Ok(ms)
}

/// "Model name, N CPUs", best effort from /proc/cpuinfo (both benchmarks report it).
pub(crate) fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model}, {cpus} CPUs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), 50.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
        assert_eq!(percentile(&samples, 100.0), 100.0);
        assert_eq!(percentile(&samples, 0.0), 1.0);
        // Between ranks it rounds up to an observed sample, never interpolates.
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 51.0), 3.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn latency_summary_sorts_and_averages() {
        let mut samples = vec![3.0, 1.0, 2.0, 10.0];
        let l = latency(&mut samples).expect("samples");
        assert_eq!(
            (l.min_us, l.max_us, l.p50_us, l.p99_us),
            (1.0, 10.0, 2.0, 10.0)
        );
        assert_eq!(l.mean_us, 4.0);
        assert!(latency(&mut []).is_err());
    }
}
