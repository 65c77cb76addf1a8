//! 2 MiB pages under the decode engine's packed weights.
//!
//! A decode step reads every weight once (model R: 13 MB at 4 KiB a page, ~3,300 pages), more
//! than the CPU's second-level TLB maps, so each page's first read also walks the page table.
//! Backed by 2 MiB pages the same weights are 7 entries. Measured on model R (`klongd bench
//! model`, alternating processes): batch-8 decode +2-3% with the weights on 2 MiB pages.
//!
//! The kernel's transparent huge pages do this when asked per range (`madvise`); in the
//! default `madvise` mode nothing else gets them. The engine's weights are packed into memory
//! just allocated, so the range is marked before its first write and the page faults of the
//! packing allocate huge pages directly. (Collapsing memory already written, `MADV_COLLAPSE`,
//! copies it: that took ~0.8 s per SmolLM2-135M model, when the model's own tensors were
//! backed this way.) A hint only: contents never change, and where the kernel cannot (no THP,
//! another OS, memory the allocator had already touched) the memory stays on 4 KiB pages and
//! everything works as before.

use std::mem::MaybeUninit;

/// Bytes in a transparent huge page (x86-64 and most aarch64 kernels).
const HUGE_PAGE: usize = 2 << 20;

/// Marks the whole huge pages inside `spare` (memory not yet written: a vector's spare
/// capacity) for 2 MiB pages (`MADV_HUGEPAGE`). Returns the bytes it asked for (0 where it did
/// nothing).
pub(crate) fn ask_before_first_write<T>(spare: &mut [MaybeUninit<T>]) -> usize {
    let start = spare.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(spare);
    let lo = start.next_multiple_of(HUGE_PAGE);
    let hi = end / HUGE_PAGE * HUGE_PAGE;
    if hi > lo && advise(lo, hi - lo) {
        hi - lo
    } else {
        0
    }
}

/// `MADV_HUGEPAGE` over `[addr, addr + len)`; whether it held.
#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> bool {
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    const MADV_HUGEPAGE: i32 = 14;
    // SAFETY: the advice leaves the memory's contents and mappings as they are (madvise(2):
    // MADV_HUGEPAGE only allows huge pages there), so no Rust reference to it, ours or anyone's,
    // can observe a change. The range lies inside one live allocation; an error (a part not
    // mapped, a kernel without THP) is ignored: this is a hint.
    unsafe { madvise(addr as *mut _, len, MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// Asking for huge pages under a fresh 5 MiB vector asks for whole huge pages only (on a
    /// Linux kernel with transparent huge pages, at least the one inside), and the vector then
    /// holds what is written to it.
    #[test]
    fn huge_pages_are_asked_for_whole_and_change_nothing() {
        let n = 5 << 18; // 5 MiB of f32
        let mut v: Vec<f32> = Vec::with_capacity(n);
        let asked = super::ask_before_first_write(v.spare_capacity_mut());
        assert_eq!(asked % super::HUGE_PAGE, 0);
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        if cfg!(target_os = "linux") && thp.exists() {
            assert!(asked >= super::HUGE_PAGE, "asked for {asked} bytes");
        }
        let values = crate::policy::hashed_values(n, 3);
        v.extend_from_slice(&values);
        assert_eq!(v, values);
        // Nothing under an empty spare capacity.
        let mut empty: Vec<f32> = Vec::new();
        assert_eq!(super::ask_before_first_write(empty.spare_capacity_mut()), 0);
    }
}
