//! `exp` over a slice of f32, eight at a time (AVX2 + FMA).
//!
//! libm's `expf` is a call per element: in a decode step of model R at batch 8 the softmax of
//! attention and SwiGLU take ~60k of them, about a tenth of the step. This is the classic
//! Cephes scheme: `x = n·ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by a degree-7 polynomial,
//! `2^n` put into the exponent bits. Its error is within 2 ulp of the true value (tested
//! against f64 `exp`); libm's is within 1, so results differ from libm's in the last bits.
//!
//! Every element gets the same arithmetic whether it falls in a vector or in the scalar tail
//! (the same constants, the same fused multiply-adds, the same rounding), so a result does
//! not depend on where in the slice its input sits. Inputs below [`LOW`] give exactly 0 (as
//! libm's underflow does, a little earlier) and above [`HIGH`] +inf; NaN stays NaN.

/// Below this e^x is subnormal; such values are returned as 0.
const LOW: f32 = -87.336_55;
/// Above this e^x overflows f32.
const HIGH: f32 = 88.722_84;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two, the high part with few enough bits that `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf`'s polynomial for (e^r - 1 - r) / r², highest degree first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x for one value, the same operations as one lane of the vector form.
#[inline]
fn exp1(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < LOW {
        return 0.0;
    }
    if x > HIGH {
        return f32::INFINITY;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let r2 = r * r;
    let y = p.mul_add(r2, r) + 1.0;
    // n is in [-126, 128]: 2^n as exponent bits, split in two factors so that n = 128 fits.
    let half = (n as i32) / 2;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((n as i32 - half + 127) as u32) << 23);
    y * a * b
}

/// Replaces every element of `xs` by its exponential.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if super::skinny::simd() {
            // SAFETY: `simd()` found AVX2 and FMA on this CPU.
            done = unsafe { exp8(xs) };
        }
    }
    for x in &mut xs[done..] {
        *x = exp1(*x);
    }
}

/// The whole groups of eight of `xs`, in place; returns how many elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp8(xs: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = xs.len() - xs.len() % 8;
    let low = _mm256_set1_ps(LOW);
    let high = _mm256_set1_ps(HIGH);
    // The exponents of in-range inputs.
    let (n_min, n_max) = (_mm256_set1_ps(-126.0), _mm256_set1_ps(128.0));
    let bias = _mm256_set1_epi32(127);
    for chunk in xs[..whole].chunks_exact_mut(8) {
        // SAFETY: the chunk holds exactly 8 floats.
        let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // Clamped so that out-of-range lanes build valid exponents; they are replaced below.
        let ni = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(n, n_min), n_max));
        let half = _mm256_srai_epi32::<1>(_mm256_add_epi32(
            ni,
            _mm256_srli_epi32::<31>(ni), // truncating division by 2, as `i32 / 2`
        ));
        let a = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
        let b = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_sub_epi32(ni, half),
            bias,
        )));
        let mut e = _mm256_mul_ps(_mm256_mul_ps(y, a), b);
        e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, low));
        e = _mm256_blendv_ps(
            e,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, high),
        );
        // NaN in, NaN out.
        e = _mm256_blendv_ps(e, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), e) };
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
            .map(|i| -87.0 + 175.5 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 88.7, -87.3]);
        let mut fast = xs.clone();
        exp_in_place(&mut fast);
        let mut worst = 0f64;
        for (x, e) in xs.iter().zip(&fast) {
            let want = (*x as f64).exp();
            if want < f32::MIN_POSITIVE as f64 * 2.0 {
                continue;
            }
            worst = worst.max(ulps(*e, want));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        // The scalar form gives the vector lanes' bits.
        for (x, e) in xs.iter().zip(&fast) {
            assert_eq!(exp1(*x).to_bits(), e.to_bits(), "exp({x})");
        }
    }

    #[test]
    fn out_of_range_and_nan() {
        let mut xs = vec![
            -1e9,
            -88.0,
            89.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            1.0,
        ];
        exp_in_place(&mut xs);
        assert_eq!(&xs[..5], &[0.0, 0.0, f32::INFINITY, f32::INFINITY, 0.0]);
        assert!(xs[5].is_nan());
        assert_eq!(xs[6], 1.0);
        assert!((xs[7] - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
        let mut tail = vec![-1e9, 89.0, f32::NAN];
        exp_in_place(&mut tail);
        assert_eq!(&tail[..2], &[0.0, f32::INFINITY]);
        assert!(tail[2].is_nan());
    }
}
