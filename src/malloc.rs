//! Allocator settings for a process that runs the model.

/// Tells glibc's malloc to serve every allocation from one heap and to keep freed memory
/// there, so that a training step reuses the previous step's pages instead of faulting in and
/// zeroing fresh ones. Three settings, each needed:
/// - `M_MMAP_MAX = 0`: by default each large block (attention scores are tens to hundreds of
///   MiB) is mmapped and unmapped on free.
/// - `M_ARENA_MAX = 1`: a thread other than main gets its own arena, whose heaps are at most
///   64 MiB; a larger block there falls back to mmap whatever `M_MMAP_MAX` says (glibc 2.36
///   `sysmalloc`), so the learner's attention scores were mapped and unmapped every step.
/// - `M_TRIM_THRESHOLD = -1`: never give the heap's top back (mallopt(3): -1 disables
///   trimming); the largest positive value, 2 GiB, is less than a long-context step frees.
///
/// Measured: SFT on 2.6k-token trajectories (hidden 96, batches of three) ran at ~700 tokens/s
/// with mmap alone turned off, half of it `clear_page` in the kernel, and ~3,100 with all
/// three; `klongd bench model` (8 x 512) trains at 2,000–2,200 tokens/s (~2,080 with mmap alone
/// off, ~1,230 with malloc left alone). One arena serialises allocation across threads; the
/// compute kernels allocate per op, not per element, so the lock is not hot.
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
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tunables (glibc documents it as callable at
        // any time); main calls this first, before any other thread exists, which is also
        // what makes M_ARENA_MAX apply to every thread.
        let ok = unsafe {
            mallopt(M_MMAP_MAX, 0) == 1
                && mallopt(M_TRIM_THRESHOLD, -1) == 1
                && mallopt(M_ARENA_MAX, 1) == 1
        };
        if !ok {
            tracing::warn!("mallopt refused; large tensors may be mapped and zeroed every step");
        }
    }
}
