//! 2 MiB pages under a frozen model's weights.
//!
//! A decode step reads every weight once (model R: 13 MB at 4 KiB a page, ~3,300 pages), more
//! than the CPU's second-level TLB maps, so each page's first read also walks the page table.
//! Backed by 2 MiB pages the same weights are 7 entries. Measured on model R (`klongd bench
//! model`, alternating processes): batch-8 decode +2-3% with the weights on 2 MiB pages
//! (+3-5% with the whole heap; training steps unchanged either way).
//!
//! The kernel's transparent huge pages do this when asked per range (`madvise`); in the
//! default `madvise` mode nothing else gets them. A hint only: contents never change, and where
//! the kernel cannot (no THP, a kernel before 6.1 without `MADV_COLLAPSE`, another OS) the
//! weights stay on 4 KiB pages and everything works as before.

use candle_core::{Storage, Tensor};

/// Bytes in a transparent huge page (x86-64 and most aarch64 kernels).
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the memory under `tensors` (their CPU storage) with 2 MiB pages,
/// at once: ranges of storage less than a huge page apart are joined, and each joined range's
/// whole huge pages are marked (`MADV_HUGEPAGE`, so pages faulted later there are huge too)
/// and collapsed now (`MADV_COLLAPSE`, which copies the 4 KiB pages into huge ones). Returns
/// the bytes it asked for (0 where it did nothing).
pub(crate) fn back_with_huge_pages(tensors: &[&Tensor]) -> usize {
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (storage, _) = t.storage_and_layout();
        if let Storage::Cpu(c) = &*storage {
            if let Ok(v) = c.as_slice::<f32>() {
                let start = v.as_ptr() as usize;
                ranges.push((start, start + std::mem::size_of_val(v)));
            }
        }
    }
    back_ranges(ranges)
}

/// [`back_with_huge_pages`] for plain slices: the decode engine's packed weights.
pub(crate) fn back_slices_with_huge_pages(slices: &[&[f32]]) -> usize {
    back_ranges(
        slices
            .iter()
            .map(|v| {
                (
                    v.as_ptr() as usize,
                    v.as_ptr() as usize + std::mem::size_of_val(*v),
                )
            })
            .collect(),
    )
}

/// Joins `ranges` (start, end) less than a huge page apart and asks for each joined range's
/// whole huge pages.
fn back_ranges(mut ranges: Vec<(usize, usize)>) -> usize {
    ranges.sort_unstable();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (start, end) in ranges {
        match spans.last_mut() {
            Some(last) if start <= last.1.saturating_add(HUGE_PAGE) => last.1 = last.1.max(end),
            _ => spans.push((start, end)),
        }
    }
    let mut asked = 0;
    for (start, end) in spans {
        let lo = start.next_multiple_of(HUGE_PAGE);
        let hi = end / HUGE_PAGE * HUGE_PAGE;
        if hi > lo && advise(lo, hi - lo) {
            asked += hi - lo;
        }
    }
    asked
}

/// `MADV_HUGEPAGE` then `MADV_COLLAPSE` over `[addr, addr + len)`; whether the first held.
#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> bool {
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    const MADV_HUGEPAGE: i32 = 14;
    const MADV_COLLAPSE: i32 = 25;
    // SAFETY: both advices leave the memory's contents and mappings as they are (madvise(2):
    // MADV_COLLAPSE is "semantically a no-op"; MADV_HUGEPAGE only allows huge pages there), so
    // no Rust reference to it, ours or anyone's, can observe a change. The range lies inside
    // the process's heap between live tensors; any part that is not mapped is an ENOMEM error
    // and left alone. Errors are ignored: this is a hint.
    unsafe {
        let marked = madvise(addr as *mut _, len, MADV_HUGEPAGE) == 0;
        if marked {
            madvise(addr as *mut _, len, MADV_COLLAPSE);
        }
        marked
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    /// Asking for huge pages under three tensors (one larger than two huge pages) leaves
    /// their values as they were, asks for whole huge pages only, and on a Linux kernel with
    /// transparent huge pages asks for at least the one that lies inside the large tensor.
    #[test]
    fn huge_pages_leave_the_weights_as_they_were() {
        let sizes = [5 << 18, 3, 1 << 20]; // 5 MiB, 12 B, 4 MiB of f32
        let tensors: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let v = crate::policy::hashed_values(*n, i as u32);
                Tensor::from_vec(v, *n, &Device::Cpu).expect("tensor")
            })
            .collect();
        let before: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| t.to_vec1().expect("values"))
            .collect();
        let asked = super::back_with_huge_pages(&tensors.iter().collect::<Vec<_>>());
        let after: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| t.to_vec1().expect("values"))
            .collect();
        assert_eq!(before, after);
        assert_eq!(asked % super::HUGE_PAGE, 0);
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        if cfg!(target_os = "linux") && thp.exists() {
            assert!(asked >= super::HUGE_PAGE, "asked for {asked} bytes");
        }
    }
}
