//! The process's wasmtime `Engine`, its epoch ticker, and the compiled-module cache.
//!
//! A tool call must instantiate, never compile: compiling CPython's 26 MB module takes ~9 s
//! here, instantiating a cached module microseconds. Modules are cached in memory and, in
//! serialized form, on disk, keyed by the wasm's content hash and the engine's settings.

use std::collections::HashMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, Module, OptLevel};

use crate::SandboxError;

/// How often the epoch advances. A call's wall-time deadline is counted in these ticks, so a
/// runaway guest is stopped at most one tick after its deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Largest wasm module the cache accepts (CPython is 26 MB).
const MAX_MODULE_BYTES: u64 = 256 << 20;

/// The engine settings every sandbox relies on: fuel, epochs, a bounded native stack.
pub fn new_engine() -> Result<Engine, SandboxError> {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .epoch_interruption(true)
        // Deep recursion in a guest ends as a typed stack-overflow trap, not a host crash.
        .max_wasm_stack(1 << 20)
        .cranelift_opt_level(OptLevel::Speed)
        .parallel_compilation(true);
    Engine::new(&config).map_err(|e| SandboxError::Engine(e.to_string()))
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on its own OS thread. A tokio task would
/// not do: a guest never yields, so on a current-thread runtime the ticker would never run.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: Engine) -> Result<Self, SandboxError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("klong-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| SandboxError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a module came from, for logs and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleSource {
    Memory,
    Disk,
    Compiled,
}

/// Compiled modules, in memory and serialized on disk.
pub struct ModuleCache {
    engine: Engine,
    dir: Option<PathBuf>,
    /// Hash of wasmtime's version and every engine setting that affects compiled code.
    engine_fingerprint: [u8; 32],
    memory: Mutex<HashMap<[u8; 32], Module>>,
}

struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

impl ModuleCache {
    /// `dir`: where serialized modules live; `None` keeps the cache in memory only.
    pub fn new(engine: Engine, dir: Option<PathBuf>) -> Result<Self, SandboxError> {
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|e| SandboxError::io(dir, e))?;
        }
        let mut hasher = ShaHasher(Sha256::new());
        hasher.write(b"klong-sandbox module cache v1\0");
        hasher.write(env!("CARGO_PKG_VERSION").as_bytes());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        Ok(ModuleCache {
            engine,
            dir,
            engine_fingerprint: hasher.0.finalize().into(),
            memory: Mutex::new(HashMap::new()),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads a `.wasm` (or `.wat`) file.
    pub fn load_file(&self, path: &Path) -> Result<(Module, ModuleSource), SandboxError> {
        let len = std::fs::metadata(path)
            .map_err(|e| SandboxError::io(path, e))?
            .len();
        if len > MAX_MODULE_BYTES {
            return Err(SandboxError::Module {
                path: path.to_path_buf(),
                reason: format!("{len} bytes is over the {MAX_MODULE_BYTES}-byte module limit"),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| SandboxError::io(path, e))?;
        self.load_bytes(&bytes).map_err(|e| match e {
            SandboxError::Module { reason, .. } => SandboxError::Module {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Loads a module from its wasm (or wat) bytes.
    pub fn load_bytes(&self, wasm: &[u8]) -> Result<(Module, ModuleSource), SandboxError> {
        let key: [u8; 32] = Sha256::new()
            .chain_update(self.engine_fingerprint)
            .chain_update(wasm)
            .finalize()
            .into();
        if let Some(module) = self.lock_memory().get(&key) {
            return Ok((module.clone(), ModuleSource::Memory));
        }
        let (module, source) = match self.read_disk(&key) {
            Some(module) => (module, ModuleSource::Disk),
            None => {
                let module = Module::new(&self.engine, wasm).map_err(|e| SandboxError::Module {
                    path: PathBuf::from("<bytes>"),
                    reason: format!("{e:#}"),
                })?;
                self.write_disk(&key, &module);
                (module, ModuleSource::Compiled)
            }
        };
        self.lock_memory().insert(key, module.clone());
        Ok((module, source))
    }

    fn lock_memory(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Module>> {
        // A panic while holding this lock cannot leave the map inconsistent (inserts are
        // atomic), so a poisoned lock is still usable.
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disk_path(&self, key: &[u8; 32]) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}.cwasm", hex::encode(key))))
    }

    /// File layout: 32 bytes of SHA-256 over the rest, then wasmtime's serialized module.
    fn read_disk(&self, key: &[u8; 32]) -> Option<Module> {
        let path = self.disk_path(key)?;
        let bytes = std::fs::read(&path).ok()?;
        if bytes.len() < 32 {
            return None;
        }
        let (digest, body) = bytes.split_at(32);
        if Sha256::digest(body).as_slice() != digest {
            tracing::warn!(path = %path.display(), "cached module fails its checksum; recompiling");
            return None;
        }
        // SAFETY: `Module::deserialize` requires bytes produced by `Module::serialize` of a
        // compatible engine, unmodified. `body` is exactly what `write_disk` serialized: it is
        // verified against the SHA-256 that `write_disk` stored beside it (a torn or altered
        // file fails the check above), the file name binds it to this engine's settings, and
        // wasmtime itself re-checks version and settings in the header and errors if they
        // differ. The cache directory is klongd's own, not shared with untrusted writers.
        match unsafe { Module::deserialize(&self.engine, body) } {
            Ok(module) => Some(module),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached module unusable; recompiling");
                None
            }
        }
    }

    /// Best effort: a cache that cannot be written only costs a recompile next time.
    fn write_disk(&self, key: &[u8; 32], module: &Module) {
        let Some(path) = self.disk_path(key) else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            let body = module.serialize().map_err(std::io::Error::other)?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let mut bytes = Vec::with_capacity(32 + body.len());
            bytes.extend_from_slice(&Sha256::digest(&body));
            bytes.extend_from_slice(&body);
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the module cache");
        }
    }
}
