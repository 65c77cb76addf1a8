//! Floats in storage that starts on a 64-byte boundary (a cache line, and one AVX-512
//! register), for the attention kernels' operands and working buffers.
//!
//! A 16-float load or store that starts off a line boundary touches two lines and costs two of
//! the core's L1 accesses. `Vec<f32>` from the system allocator starts 16 bytes past a line
//! (a large allocation is a mapping plus malloc's header), so every 16-lane load of a row of
//! such a buffer was split. Measured on one layer of model R's training lane (4 rows of 512
//! tokens, one thread, calls alternating in one process, medians of 98): the flash forward
//! took 5.31 and 5.25 ms with its operands and buffers on lines against 5.89 and 5.80 ms
//! with all of them 16 bytes past one; the backward 11.28 and 10.96 ms against 12.19 and
//! 11.93 ms.

use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};

/// One cache line of floats.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; LINE]);

/// Floats per [`Line`].
pub(crate) const LINE: usize = 16;

/// `len` floats from a 64-byte boundary.
pub(crate) struct AlignedFloats {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedFloats {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedFloats {
            lines: vec![Line([0.0; LINE]); len.div_ceil(LINE)],
            len,
        }
    }

    /// `len` floats written by `fill`, which gets them uninitialized, and its result.
    ///
    /// # Safety
    ///
    /// `fill` returns only after writing every one of the floats it is given (it may panic).
    pub(crate) unsafe fn written<R>(
        len: usize,
        fill: impl FnOnce(&mut [MaybeUninit<f32>]) -> R,
    ) -> (Self, R) {
        let n_lines = len.div_ceil(LINE);
        let mut lines: Vec<Line> = Vec::with_capacity(n_lines);
        let spare = &mut lines.spare_capacity_mut()[..n_lines];
        // SAFETY: `MaybeUninit<Line>` has `Line`'s layout, `LINE` floats with no padding (see
        // `rows_mut`), so the spare lines are `n_lines · LINE` contiguous `MaybeUninit<f32>`,
        // borrowed mutably here and nowhere else.
        let floats = unsafe {
            std::slice::from_raw_parts_mut(
                spare.as_mut_ptr().cast::<MaybeUninit<f32>>(),
                n_lines * LINE,
            )
        };
        let (head, tail) = floats.split_at_mut(len);
        for x in tail {
            x.write(0.0);
        }
        let r = fill(head);
        // SAFETY: `fill` wrote the first `len` floats (the caller's promise) and the loop
        // above the rest of the last line, so the first `n_lines` lines are initialized.
        unsafe { lines.set_len(n_lines) };
        (AlignedFloats { lines, len }, r)
    }

    /// The floats as `len / W` rows of `W` (`W` a multiple of [`LINE`], so that every row
    /// starts on a boundary too); panics if `W` does not divide the length.
    pub(crate) fn rows_mut<const W: usize>(&mut self) -> &mut [[f32; W]] {
        assert!(
            W > 0 && W.is_multiple_of(LINE) && self.len.is_multiple_of(W),
            "{} floats as rows of {W}",
            self.len
        );
        let rows = self.len / W;
        // SAFETY: the lines are `lines.len() · LINE >= len` contiguous floats (`Line` is
        // `repr(C)` around `[f32; LINE]`, 64 bytes, so no padding lies between lines), owned
        // by `self` and borrowed mutably for the result's lifetime; `[f32; W]` has the
        // alignment of f32, which the lines' 64 satisfies, and `rows · W = len` floats.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<[f32; W]>(), rows) }
    }
}

impl Deref for AlignedFloats {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: as in `rows_mut`: `len` contiguous, initialized floats owned by `self`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl DerefMut for AlignedFloats {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `rows_mut`, borrowed mutably for the result's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_line_and_holds_its_length() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut a = AlignedFloats::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().all(|x| *x == 0.0));
            for (i, x) in a.iter_mut().enumerate() {
                *x = i as f32;
            }
            assert_eq!(a.last().copied(), len.checked_sub(1).map(|i| i as f32));
        }
        let mut a = AlignedFloats::zeroed(3 * 32);
        a[33] = 7.0;
        let rows = a.rows_mut::<32>();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1][1], 7.0);
        assert_eq!(rows[2].as_ptr() as usize % 64, 0);
        for len in [0, 5, 16, 40] {
            // SAFETY: the closure writes every float it is given.
            let (a, n) = unsafe {
                AlignedFloats::written(len, |xs| {
                    for (i, x) in xs.iter_mut().enumerate() {
                        x.write(i as f32 + 0.5);
                    }
                    xs.len()
                })
            };
            assert_eq!((a.len(), n), (len, len));
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().enumerate().all(|(i, x)| *x == i as f32 + 0.5));
        }
    }
}
