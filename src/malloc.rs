//! Allocator settings for a process that runs the model.

/// Tells glibc's malloc to serve every allocation from its heap and to keep freed memory
/// there. By default it maps each large block (the attention scores of a training step are
/// 64 MiB each) with mmap and unmaps it on free, so every step page-faults and zeroes its
/// activations afresh: that was a third of a training step's time (`klongd bench model`).
/// Every command that runs the model wants it, so `main` calls it first. A no-op on other C
/// libraries.
pub fn keep_freed_memory() {
    // For measuring what this is worth: KLONGD_MALLOC=default leaves malloc alone.
    if std::env::var("KLONGD_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only changes allocator tunables (glibc documents it as callable at
        // any time); main calls this first, before any other thread exists.
        let ok = unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 };
        if !ok {
            tracing::warn!("mallopt refused; large tensors stay on mmap");
        }
    }
}
