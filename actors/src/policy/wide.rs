//! Elementwise loops compiled for the widest vectors the CPU has, and row sums in an order
//! that vectors can keep.
//!
//! The crate is built for plain x86-64, so the compiler vectorizes a loop such as RMSNorm's
//! scaling or SwiGLU's `x / (1 + e) · u` four lanes wide (SSE2). [`run`] calls a [`Kernel`]
//! (a loop and its operands) from a function compiled with AVX-512F (or AVX2 + FMA) enabled,
//! into which the loop is inlined, so the same loop runs sixteen (or eight) lanes wide. Rust never contracts a
//! multiply and an add into a fused multiply-add, and the vectorizer does not reorder float
//! sums, so every element gets the same operations in the same order at any width: the
//! results are the same bits whichever version runs.
//!
//! A sum along a row (RMSNorm's sum of squares, its backward's dot product) is a chain of
//! dependent adds that no vectorizer may split. [`sum_sq`] and [`sum_prod3`] fix another
//! order instead: element `j` goes to partial sum `j % 16`, and the sixteen partials are
//! added pairwise in a fixed tree. Each partial is one lane of a vector (or of two, or four),
//! so a row of 256 floats is 16 dependent vector adds, not 256 scalar ones. Measured on model
//! R's training step (CPU model 207, 2 threads; three runs of each build alternating, medians
//! of 8 steps, session 32 in `benches/peer/README.md`): RMSNorm's forwards and backwards took
//! 13-23 ms of the step before, 10-13 after; SwiGLU's elementwise passes 20-30 ms before,
//! 18-21 after (they move ~100 MB a step and wait on memory as much as on arithmetic).
//! Attention's head merge ran 1.2-1.6x slower at 16 lanes, so it stays as built.

/// Partial sums of a row sum: one per lane of a 512-bit vector of f32.
pub(crate) const LANES: usize = 16;

/// A loop to run at the widest vectors the CPU has: its operands, and the loop itself in
/// [`Kernel::call`], which must be `#[inline(always)]` so that it is compiled into each of
/// [`run`]'s versions. (A closure cannot be marked so, and the inliner declined the closures'
/// bodies, leaving them at SSE2 width.)
pub(crate) trait Kernel {
    type Out;
    fn call(self) -> Self::Out;
}

/// `k.call()`, compiled for AVX-512F where the CPU has it (and `KLONGD_FUSED_OFF` does not
/// name `avx512`), for AVX2 and FMA where it has those, and as built otherwise. The results
/// are the same bits every way (see the module's comment); only the speed differs.
#[inline]
pub(crate) fn run<K: Kernel>(k: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    {
        if super::flash::avx512() {
            // SAFETY: `avx512()` found AVX-512F on this CPU.
            return unsafe { with_avx512(k) };
        }
        if super::skinny::simd() {
            // SAFETY: `simd()` found AVX2 and FMA on this CPU.
            return unsafe { with_avx2(k) };
        }
    }
    k.call()
}

/// `k.call()` with AVX-512F enabled: the loop, inlined here, is vectorized 16 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn with_avx512<K: Kernel>(k: K) -> K::Out {
    k.call()
}

/// `k.call()` with AVX2 and FMA enabled (8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<K: Kernel>(k: K) -> K::Out {
    k.call()
}

/// The sixteen partial sums added pairwise: lanes `l` and `l + 8`, then `l + 4`, `l + 2`,
/// `l + 1` (the order a vector's halves fold in).
#[inline(always)]
fn fold<T: Copy + std::ops::Add<Output = T>>(mut p: [T; LANES]) -> T {
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            p[l] = p[l] + p[l + half];
        }
        half /= 2;
    }
    p[0]
}

/// `Σ x_j²`, element j summed into partial `j % 16` in order of j, the partials folded by
/// [`fold`].
#[inline(always)]
pub(crate) fn sum_sq<T>(x: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let mut p = [T::default(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            p[l] = p[l] + c[l] * c[l];
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        p[l] = p[l] + v * v;
    }
    fold(p)
}

/// `Σ a_j · b_j · c_j` (each term `(a · b) · c`), summed as [`sum_sq`] sums.
#[inline(always)]
pub(crate) fn sum_prod3<T>(a: &[T], b: &[T], c: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut p = [T::default(); LANES];
    let whole = n - n % LANES;
    for j in (0..whole).step_by(LANES) {
        let (a, b, c) = (&a[j..j + LANES], &b[j..j + LANES], &c[j..j + LANES]);
        for l in 0..LANES {
            p[l] = p[l] + a[l] * b[l] * c[l];
        }
    }
    for l in 0..n - whole {
        p[l] = p[l] + a[whole + l] * b[whole + l] * c[whole + l];
    }
    fold(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sums are the partials' order, to the bit, at every length around the 16-float
    /// groups; and within rounding of the plain sums.
    #[test]
    fn row_sums_keep_their_order() {
        for n in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 255, 256, 257] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 11 % 7) as f32 - 3.0) * 1.3).collect();
            let z: Vec<f32> = (0..n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.11).collect();
            // The order spelled out: partial j % 16, then the fold.
            let mut p = [0f32; LANES];
            let mut q = [0f32; LANES];
            for j in 0..n {
                p[j % LANES] += x[j] * x[j];
                q[j % LANES] += x[j] * y[j] * z[j];
            }
            let tree = |mut p: [f32; LANES]| {
                for half in [8, 4, 2, 1] {
                    for l in 0..half {
                        p[l] += p[l + half];
                    }
                }
                p[0]
            };
            let ours = (sum_sq(&x), sum_prod3(&x, &y, &z));
            let wide = run(Sums(&x, &y, &z));
            assert_eq!(ours.0.to_bits(), tree(p).to_bits(), "sum_sq, {n} floats");
            assert_eq!(ours.1.to_bits(), tree(q).to_bits(), "sum_prod3, {n} floats");
            assert_eq!(
                wide.0.to_bits(),
                ours.0.to_bits(),
                "sum_sq wide, {n} floats"
            );
            assert_eq!(wide.1.to_bits(), ours.1.to_bits(), "sum_prod3 wide, {n}");
            let plain: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
            assert!(
                (f64::from(ours.0) - plain).abs() <= 1e-5 * plain.max(1.0),
                "{n}"
            );
        }
    }

    /// The row sums of the tests, as a kernel.
    struct Sums<'a>(&'a [f32], &'a [f32], &'a [f32]);
    impl Kernel for Sums<'_> {
        type Out = (f32, f32);
        #[inline(always)]
        fn call(self) -> (f32, f32) {
            (sum_sq(self.0), sum_prod3(self.0, self.1, self.2))
        }
    }

    /// Divisions, products and sums per element, as RMSNorm and SwiGLU have them.
    struct Elementwise<'a>(&'a [f32], &'a [f32]);
    impl Kernel for Elementwise<'_> {
        type Out = Vec<f32>;
        #[inline(always)]
        fn call(self) -> Vec<f32> {
            self.0
                .iter()
                .zip(self.1)
                .map(|(&a, &b)| a / (1.0 + (a * 0.5 + b)) * b - a * b)
                .collect()
        }
    }

    /// A loop run through [`run`] gives the bits of the same loop built for plain x86-64.
    #[test]
    fn wide_loops_are_the_plain_ones_to_the_bit() {
        let n = 1000;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
        let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.219).cos() * 2.0).collect();
        let plain = Elementwise(&x, &u).call();
        let wide = run(Elementwise(&x, &u));
        assert!(plain
            .iter()
            .zip(&wide)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
