//! `exp` eight lanes at a time (AVX2 + FMA), or sixteen ([`exp16`], AVX-512F: the same
//! operations per lane, so the same bits), for the softmaxes of attention, SwiGLU,
//! log-softmax and generate's model logprob.
//!
//! libm's `expf` is a call per element: in a decode step of model R at batch 8 the softmax of
//! attention and SwiGLU take ~60k of them, about a tenth of the step; a training step of the
//! same model takes millions. [`exp8`] is Cephes' scheme (the argument reduced by ln 2, a
//! polynomial, the exponent put into the float's bits), within 2 ulp of the true value where
//! libm's is within 1, so results differ from libm's in the last bits.
//!
//! [`exp_in_place`] gives every element the same arithmetic whether it falls in a vector or in
//! the scalar tail ([`exp1`] is `exp8`'s twin, operation for operation), so a result does not
//! depend on where in the slice its input sits.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Below this e^x is under the smallest normal float: such lanes give exactly 0.
const LOW: f32 = -87.33654;
/// Inputs are clamped to this from above (e^x near the largest float).
const HIGH: f32 = 88.37626;
/// ln 2 in two parts, so that n·ln2 is subtracted without rounding the high part.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf`'s polynomial, highest degree first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// e^x per lane; within 2 ulp of the true value for x up to [`HIGH`]. Lanes below [`LOW`]
/// (-inf included) give exactly 0, as masked scores must; lanes above are clamped to it.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOW));
    let x = _mm256_min_ps(x, _mm256_set1_ps(HIGH));
    let x = _mm256_max_ps(x, _mm256_set1_ps(LOW));
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    let y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    _mm256_andnot_ps(tiny, y)
}

/// [`exp8`] with 16 lanes (AVX-512F): the same operations per lane, but for the power of two
/// (below), so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: __m512) -> __m512 {
    let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LOW));
    let x = _mm512_min_ps(x, _mm512_set1_ps(HIGH));
    let x = _mm512_max_ps(x, _mm512_set1_ps(LOW));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    // p · 2ⁿ in one instruction where `exp8` builds 2ⁿ's bits (convert, add the bias, shift)
    // and multiplies: the same product, rounded once, so the same bits. After the clamps n
    // is an integer in -126 ..= 128, where the built bits are exactly 2ⁿ (+inf at 128, as
    // the overflow of p · 2¹²⁸ is here).
    let y = _mm512_scalef_ps(p, n);
    _mm512_maskz_mov_ps(!tiny, y)
}

/// One lane of [`exp8`], operation for operation (the same bits).
fn exp1(x: f32) -> f32 {
    let tiny = x < LOW;
    // As `_mm256_min_ps` / `_mm256_max_ps` with the constant second: a NaN lane takes it.
    let x = if x < HIGH { x } else { HIGH };
    let x = if x > LOW { x } else { LOW };
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r * r, r) + 1.0;
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if tiny {
        0.0
    } else {
        y
    }
}

/// Replaces every element of `xs` by its exponential (NaN stays NaN).
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if super::skinny::simd() && super::flash::avx512() {
            // SAFETY: `simd()` found AVX2 and FMA on this CPU, `avx512()` AVX-512F.
            done = unsafe { exp_chunks16(xs) };
        }
        if super::skinny::simd() {
            // SAFETY: `simd()` found AVX2 and FMA on this CPU.
            done += unsafe { exp_chunks(&mut xs[done..]) };
        }
    }
    for x in &mut xs[done..] {
        *x = if x.is_nan() { *x } else { exp1(*x) };
    }
}

/// The whole groups of eight of `xs`, in place; returns how many elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_chunks(xs: &mut [f32]) -> usize {
    let whole = xs.len() - xs.len() % 8;
    for chunk in xs[..whole].chunks_exact_mut(8) {
        // SAFETY: the chunk holds exactly 8 floats.
        let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let e = _mm256_blendv_ps(exp8(x), x, nan);
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), e) };
    }
    whole
}

/// The whole groups of sixteen of `xs`, in place; returns how many elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_chunks16(xs: &mut [f32]) -> usize {
    let whole = xs.len() - xs.len() % 16;
    for chunk in xs[..whole].chunks_exact_mut(16) {
        // SAFETY: the chunk holds exactly 16 floats.
        let x = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        let e = _mm512_mask_blend_ps(nan, exp16(x), x);
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), e) };
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.to_bits() + 1) - b32) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn within_two_ulp_and_the_same_bits_in_every_position() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.3 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 88.3, -87.3, 1e6, -1e6]);
        // Densely around both clamps, where 2ⁿ is smallest (n = -126) and overflows (n = 128).
        xs.extend((0..4_000).map(|i| -88.0 + 1.5 * i as f32 / 4_000.0));
        xs.extend((0..4_000).map(|i| 88.0 + 0.6 * i as f32 / 4_000.0));
        let mut fast = xs.clone();
        exp_in_place(&mut fast);
        let mut worst = 0f64;
        for (x, e) in xs.iter().zip(&fast) {
            let want = (*x as f64).exp();
            if *x > HIGH || want < f32::MIN_POSITIVE as f64 * 2.0 {
                continue;
            }
            worst = worst.max(ulps(*e, want));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        // The scalar twin gives the vector lanes' bits.
        for (x, e) in xs.iter().zip(&fast) {
            assert_eq!(exp1(*x).to_bits(), e.to_bits(), "exp({x})");
        }
        // And so do the 8-lane kernel's lanes (`exp_in_place` takes 16 at a time where the
        // CPU has AVX-512F, so most of them went through `exp16` above).
        #[cfg(target_arch = "x86_64")]
        if crate::policy::skinny::simd() {
            let mut eight = xs.clone();
            // SAFETY: `simd()` found AVX2 and FMA on this CPU.
            let done = unsafe { exp_chunks(&mut eight) };
            for (x, e) in xs.iter().zip(&eight).take(done) {
                assert_eq!(exp1(*x).to_bits(), e.to_bits(), "exp8({x})");
            }
        }
    }

    #[test]
    fn far_below_is_zero_and_nan_stays_nan() {
        let mut xs = vec![-1e9, -88.0, f32::NEG_INFINITY, f32::NAN, 0.0, 1.0, 1.0, 1.0];
        exp_in_place(&mut xs);
        assert_eq!(&xs[..3], &[0.0, 0.0, 0.0]);
        assert!(xs[3].is_nan());
        assert_eq!(xs[4], 1.0);
        assert!((xs[5] - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
        let mut tail = vec![-1e9, f32::NAN];
        exp_in_place(&mut tail);
        assert_eq!(tail[0], 0.0);
        assert!(tail[1].is_nan());
    }
}
