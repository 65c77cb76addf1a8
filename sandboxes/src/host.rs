//! The sandbox host: one per process. It owns the wasmtime `Engine`, the epoch ticker, the
//! module cache, the linker, and the bound on concurrent executions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Engine, InstancePre};

use crate::call::{CallKit, CallState};
use crate::engine::{new_engine, EpochTicker, ModuleCache, ModuleSource};
use crate::SandboxError;

/// Process-wide settings of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    /// Where compiled modules are cached on disk; `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Executions running at once; further async calls queue.
    pub max_concurrent: usize,
    /// Calls that may wait in the queue; one more is refused at once.
    pub max_queued: usize,
    /// How long a queued call waits before it is refused.
    pub queue_timeout: Duration,
    /// Fixed, ticking clocks, file times read as the clock's epoch, inode numbers in the
    /// order a call meets its files, and seeded randomness, so that the same calls give the
    /// same run.
    pub deterministic: bool,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            cache_dir: None,
            max_concurrent: 4,
            max_queued: 256,
            queue_timeout: Duration::from_secs(60),
            deterministic: true,
        }
    }
}

pub struct SandboxHost {
    engine: Engine,
    pub(crate) kit: Arc<CallKit>,
    cache: ModuleCache,
    pub(crate) settings: HostSettings,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pub(crate) queued: AtomicUsize,
    _ticker: EpochTicker,
}

impl SandboxHost {
    pub fn new(settings: HostSettings) -> Result<Arc<SandboxHost>, SandboxError> {
        if settings.max_concurrent == 0 {
            return Err(SandboxError::Engine(
                "max_concurrent must be at least 1".into(),
            ));
        }
        let engine = new_engine()?;
        let kit = CallKit::new(&engine)?;
        let cache = ModuleCache::new(engine.clone(), settings.cache_dir.clone())?;
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Arc::new(SandboxHost {
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent)),
            queued: AtomicUsize::new(0),
            engine,
            kit,
            cache,
            settings,
            _ticker: ticker,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn settings(&self) -> &HostSettings {
        &self.settings
    }

    pub fn cache(&self) -> &ModuleCache {
        &self.cache
    }

    /// Compiles (or fetches from the cache) and links a module; the result instantiates
    /// without further lookups.
    pub(crate) fn prepare(&self, path: &Path) -> Result<InstancePre<CallState>, SandboxError> {
        let (module, source) = self.cache.load_file(path)?;
        tracing::debug!(path = %path.display(), ?source, "module ready");
        self.kit
            .linker
            .instantiate_pre(&module)
            .map_err(|e| SandboxError::Module {
                path: path.to_path_buf(),
                reason: format!("cannot link as a WASI preview-1 command: {e:#}"),
            })
    }

    /// Loads a module through the cache and reports where it came from.
    pub fn load_module(&self, path: &Path) -> Result<ModuleSource, SandboxError> {
        self.cache.load_file(path).map(|(_, source)| source)
    }

    /// Waits for an execution slot, within the queue's bounds.
    pub(crate) async fn acquire(&self) -> Result<tokio::sync::OwnedSemaphorePermit, SandboxError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        let result = if waiting >= self.settings.max_queued {
            Err(SandboxError::Overloaded {
                reason: format!("{waiting} calls already queued"),
            })
        } else {
            match tokio::time::timeout(
                self.settings.queue_timeout,
                self.permits.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(permit)) => Ok(permit),
                Ok(Err(_)) => Err(SandboxError::Overloaded {
                    reason: "host is shutting down".into(),
                }),
                Err(_) => Err(SandboxError::Overloaded {
                    reason: format!("no execution slot within {:?}", self.settings.queue_timeout),
                }),
            }
        };
        self.queued.fetch_sub(1, Ordering::SeqCst);
        result
    }
}
