//! Causal attention in one pass over the keys, with a backward (the FlashAttention algorithm,
//! on CPU): for training and for prompt prefill.
//!
//! The general path materializes `[B, H, T, S]` scores, their softmax and, in the backward,
//! two more such tensors, and computes every masked entry. For the tiny byte models trained
//! on ~3k-token windows that was most of a training step: in a profile of `examples/
//! sft_compact.ron`, attention's matmuls, softmax, `expf`, the gradient sums over the score
//! tensors and their zeroing took about 85% of the samples. Here each tile of query rows walks
//! the key blocks it can see (causal blocks past it are never touched), keeps a running max
//! and sum (online softmax), and keeps only the output and each row's max and normalizer for
//! the backward, which recomputes the probabilities block by block.
//!
//! Masking is exactly the general path's, from the same key mask: query `t` of row `b` sees
//! key `s` when `s <= past + t` and key `s` is a real token; other keys get weight 0. A query
//! that sees no key (a pad position of a left-padded row) gets the general path's uniform
//! weights over all keys (every score plus [`MASKED`]), so results agree everywhere.
//!
//! Determinism: each output element is computed by one thread in a fixed order; the results
//! do not depend on the thread count. They differ from the general path's in the last bits
//! (another summation order, and a polynomial `exp` within 2 ulp of libm's).
//!
//! Served: f32 on x86_64 CPUs with AVX2 and FMA, head dimensions a multiple of 8. Anything
//! else returns `None` and the caller takes the general path. Where the CPU has AVX-512F, the
//! score and accumulate products run 16 lanes wide with the same multiply-adds per element,
//! so the results are the same bits either way.

// The kernels index several register tiles by one row or lane index; iterators would hide that.
#![allow(clippy::needless_range_loop)]

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::aligned::{self, AlignedFloats};
use super::fused;
use super::model::MASKED;

/// Query rows per tile in the forward: the rows that share one walk over the key blocks.
const BR: usize = 16;
/// Query rows per tile in the backward. Each key block's gradients (dK, dV) are read and
/// written once per tile, so taller tiles sum more rows per read: 32 rows took 0.82-0.89x
/// of 16's time on model R's layer (in-process pairs, one thread); with 256-key blocks, 64
/// rows took 0.87-0.95x of 32's, 128 rows the same as 32 (medians of 20 in-process pairs,
/// one and two threads, session 32).
const BACKWARD_BR: usize = 64;
/// Keys per run of [`scores_rows`]: the run's keys (`D · BC` floats) stay in L1 while every
/// group of a tile's rows reads them.
const BC: usize = 64;
/// Keys per block in the backward. Each block of a tile costs its own calls of every kernel
/// (five products of short sums, each call loading and storing its accumulators), so wider
/// blocks spend less per multiply-add: 256 keys took 0.86-0.88x of 64's time on model R's
/// layer, 128 keys 0.87-0.91x, 512 the same as 256 (medians of 20 in-process pairs, one and
/// two threads, session 32). A tile's scores and their gradients: `2 · BACKWARD_BR ·
/// BACKWARD_BC` floats, 128 KiB (on the heap: more than a thread's stack should hold).
const BACKWARD_BC: usize = 256;
/// Keys per block in the forward: the whole causal span of a query up to this many keys in
/// one block, so that rows of up to 512 keys need no online rescaling, and the per-row work
/// of a block (its max, the exponentials' sum, the rescaling) comes once per tile, not once
/// per 64 keys (`BR · FORWARD_BC` floats, 32 KiB).
const FORWARD_BC: usize = 512;
/// f32 lanes of an AVX2 register.
const LANES: usize = 8;

/// Which keys each query sees. Key `s` of row `b` is a real token or a pad (`keys`); the T new
/// queries sit at positions `past .. past + T` of the S = past + T keys, and query `t` sees the
/// real keys at positions `<= past + t`.
#[derive(Debug)]
pub(crate) struct KeyMask {
    /// `[B, S]`: 0 for a real key, [`MASKED`] for a pad.
    bias: Vec<f32>,
    /// `[B, S + 1]`: pads among the first `s` keys of row `b`, at `b · (S + 1) + s`.
    pads_before: Vec<u32>,
    /// Per row, its first real key (S when it has none).
    first: Vec<usize>,
    s: usize,
    past: usize,
}

/// The keys one query row reads: `lo .. hi`, and whether it sees none of them (`dead`: the
/// general path's uniform weights over all keys).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Span {
    lo: usize,
    hi: usize,
    dead: bool,
}

impl Span {
    /// No keys: what a tile's unused rows hold.
    const NONE: Span = Span {
        lo: 0,
        hi: 0,
        dead: false,
    };
}

impl KeyMask {
    /// `keys[b][s]`: key `s` of row `b` is a real token; every row has `S` keys, of which the
    /// last `S - past` are the new tokens.
    pub(crate) fn new(keys: &[Vec<bool>], past: usize) -> Result<Self> {
        let s = keys.first().map_or(0, |r| r.len());
        if keys.iter().any(|r| r.len() != s) || past > s {
            candle_core::bail!("key mask: rows of different lengths, or past {past} > {s} keys");
        }
        let mut bias = Vec::with_capacity(keys.len() * s);
        let mut pads_before = Vec::with_capacity(keys.len() * (s + 1));
        let mut first = Vec::with_capacity(keys.len());
        for row in keys {
            let mut pads = 0u32;
            pads_before.push(0);
            for real in row {
                bias.push(if *real { 0.0 } else { MASKED });
                pads += u32::from(!*real);
                pads_before.push(pads);
            }
            first.push(row.iter().position(|r| *r).unwrap_or(s));
        }
        Ok(KeyMask {
            bias,
            pads_before,
            first,
            s,
            past,
        })
    }

    fn rows(&self) -> usize {
        self.first.len()
    }

    fn span(&self, b: usize, t: usize) -> Span {
        let hi = (self.past + t + 1).min(self.s);
        let lo = self.first[b];
        if lo < hi {
            Span {
                lo,
                hi,
                dead: false,
            }
        } else {
            Span {
                lo: 0,
                hi: self.s,
                dead: true,
            }
        }
    }

    /// The same mask in the general path's additive form, `[B, T, S]` flattened: 0 where
    /// query `t` of row `b` sees key `s`, [`MASKED`] elsewhere.
    pub(crate) fn additive(&self) -> Vec<f32> {
        let t = self.s - self.past;
        let mut m = Vec::with_capacity(self.rows() * t * self.s);
        for bias in self.bias.chunks_exact(self.s.max(1)) {
            for qi in self.past..self.s {
                m.extend(
                    bias.iter()
                        .enumerate()
                        .map(|(j, b)| if j <= qi { *b } else { MASKED }),
                );
            }
        }
        m
    }

    /// Keys before the new queries (a KV cache's).
    pub(crate) fn past(&self) -> usize {
        self.past
    }

    /// `(B, T, S)`: rows, new queries, keys.
    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.rows(), self.s - self.past, self.s)
    }

    /// Whether keys `s0 .. s1` of row `b` are all real.
    fn all_real(&self, b: usize, s0: usize, s1: usize) -> bool {
        let p = &self.pads_before[b * (self.s + 1)..(b + 1) * (self.s + 1)];
        p[s1] == p[s0]
    }
}

// ---------------------------------------------------------------- kernels

#[cfg(target_arch = "x86_64")]
use super::vexp::exp8;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// 8 floats of `s` from `i`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn ld(s: &[f32], i: usize) -> __m256 {
    let s = &s[i..i + LANES];
    // SAFETY: `s` holds exactly the 8 floats read (the slice above is bounds-checked).
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// Stores 8 floats into `s` from `i`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn st(s: &mut [f32], i: usize, v: __m256) {
    let s = &mut s[i..i + LANES];
    // SAFETY: `s` holds exactly the 8 floats written (bounds-checked slice above).
    unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
}

/// `out[r][oc + c] = a[r] · kt[·, c0 + c]` for `c < w8` (a multiple of 8): kt is `[D, stride]`
/// (keys transposed, so that 8 keys are one load). 4 rows x 16 keys per step: 8 accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores<const N: usize, const BW: usize>(
    a: [&[f32]; N],
    kt: &[f32],
    stride: usize,
    (c0, w8): (usize, usize),
    oc: usize,
    out: &mut [[f32; BW]],
) {
    let d = a[0].len();
    let mut c = 0;
    while c + 2 * LANES <= w8 {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for dd in 0..d {
            let k0 = ld(kt, dd * stride + c0 + c);
            let k1 = ld(kt, dd * stride + c0 + c + LANES);
            for r in 0..N {
                let x = _mm256_set1_ps(a[r][dd]);
                acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
            }
        }
        for r in 0..N {
            st(&mut out[r], oc + c, acc[r][0]);
            st(&mut out[r], oc + c + LANES, acc[r][1]);
        }
        c += 2 * LANES;
    }
    if c < w8 {
        let mut acc = [_mm256_setzero_ps(); N];
        for dd in 0..d {
            let k0 = ld(kt, dd * stride + c0 + c);
            for r in 0..N {
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a[r][dd]), k0, acc[r]);
            }
        }
        for r in 0..N {
            st(&mut out[r], oc + c, acc[r]);
        }
    }
}

/// An accumulation's weights: `at(r, j)` is output row r's weight on input row j.
trait Weights {
    fn at(&self, r: usize, j: usize) -> f32;

    /// Pointers to the weights `at(r, 0)` of rows `r < R` and the distance between `at(r, j)`
    /// and `at(r, j + 1)`, after checking (panicking otherwise) that every `at(r, j)` with
    /// `r < R`, `j < j_end` lies inside the weights: the 16-lane kernel reads them through
    /// the pointers.
    fn rows<const R: usize>(&self, j_end: usize) -> ([*const f32; R], usize);
}

/// Each output row's weights as a slice: `w[r][j]`.
impl<const N: usize> Weights for [&[f32]; N] {
    #[inline(always)]
    fn at(&self, r: usize, j: usize) -> f32 {
        self[r][j]
    }

    fn rows<const R: usize>(&self, j_end: usize) -> ([*const f32; R], usize) {
        assert!(R <= N, "{R} weight rows of {N}");
        let mut p = [std::ptr::null(); R];
        for (r, p) in p.iter_mut().enumerate() {
            assert!(
                self[r].len() >= j_end,
                "weight row {r} shorter than {j_end}"
            );
            *p = self[r].as_ptr();
        }
        (p, 1)
    }
}

/// A block of scores (or probabilities) `[query row][key]` read with the keys as the output
/// rows: output row r (key `c + r`) weighs input row j (query j) by `t[j][c + r]`. The
/// backward's key and value gradients read their weights so, with no transposed copy.
#[derive(Clone, Copy)]
struct Columns<'a, const BW: usize> {
    t: &'a [[f32; BW]],
    c: usize,
}

impl<const BW: usize> Weights for Columns<'_, BW> {
    #[inline(always)]
    fn at(&self, r: usize, j: usize) -> f32 {
        self.t[j][self.c + r]
    }

    fn rows<const R: usize>(&self, j_end: usize) -> ([*const f32; R], usize) {
        assert!(
            j_end <= self.t.len() && self.c + R <= BW,
            "columns {} + {R} of {j_end} rows",
            self.c
        );
        // The block is rows of BW floats, contiguous: `t[j][c + r]` is float
        // `j · BW + c + r` of it.
        let base = self.t.as_ptr().cast::<f32>();
        // `c + r < BW` (asserted): inside the block's first row.
        (std::array::from_fn(|r| base.wrapping_add(self.c + r)), BW)
    }
}

/// `out[r] += Σ_j w[r][j] · m[j]` for rows `r < N` of `out` (row stride `os`), `j < J`, and
/// `m`'s rows at stride `ms`; every row is D long (a multiple of 8). 4 rows x 16 lanes per
/// step: 8 accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn accumulate<const N: usize>(
    out: &mut [f32],
    os: usize,
    w: &impl Weights,
    m: &[f32],
    ms: usize,
    j_end: usize,
    d: usize,
) {
    let mut c = 0;
    while c < d {
        if d - c == 3 * LANES {
            // 24 lanes at once (head dim 24, or a tail): 12 accumulators.
            let mut acc = [[_mm256_setzero_ps(); 3]; N];
            for r in 0..N {
                acc[r] = [0, 1, 2].map(|v| ld(out, r * os + c + v * LANES));
            }
            for j in 0..j_end {
                let mv = [0, 1, 2].map(|v| ld(m, j * ms + c + v * LANES));
                for r in 0..N {
                    let x = _mm256_set1_ps(w.at(r, j));
                    for v in 0..3 {
                        acc[r][v] = _mm256_fmadd_ps(x, mv[v], acc[r][v]);
                    }
                }
            }
            for r in 0..N {
                for v in 0..3 {
                    st(out, r * os + c + v * LANES, acc[r][v]);
                }
            }
            c += 3 * LANES;
        } else if c + 2 * LANES <= d {
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            for r in 0..N {
                acc[r] = [ld(out, r * os + c), ld(out, r * os + c + LANES)];
            }
            for j in 0..j_end {
                let m0 = ld(m, j * ms + c);
                let m1 = ld(m, j * ms + c + LANES);
                for r in 0..N {
                    let x = _mm256_set1_ps(w.at(r, j));
                    acc[r][0] = _mm256_fmadd_ps(x, m0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(x, m1, acc[r][1]);
                }
            }
            for r in 0..N {
                st(out, r * os + c, acc[r][0]);
                st(out, r * os + c + LANES, acc[r][1]);
            }
            c += 2 * LANES;
        } else {
            let mut acc = [_mm256_setzero_ps(); N];
            for r in 0..N {
                acc[r] = ld(out, r * os + c);
            }
            for j in 0..j_end {
                let m0 = ld(m, j * ms + c);
                for r in 0..N {
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(w.at(r, j)), m0, acc[r]);
                }
            }
            for r in 0..N {
                st(out, r * os + c, acc[r]);
            }
            c += LANES;
        }
    }
}

/// Whether the CPU has AVX-512F, for [`scores16`] and [`accumulate16`] (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && super::fused::enabled(super::fused::Kind::Avx512)
    })
}

/// `scores` with 16-lane registers. Each score is the same chain of multiply-adds over D as
/// in `scores` (only more of them run side by side), so the results are the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scores16<const N: usize, const BW: usize>(
    a: [&[f32]; N],
    kt: &[f32],
    stride: usize,
    (c0, w8): (usize, usize),
    oc: usize,
    out: &mut [[f32; BW]],
) {
    const W: usize = 16;
    let d = a[0].len();
    // Every read of the loops lies inside these bounds, checked once: the loops read through
    // raw pointers. (A bounds check per load and per row's element was over a third of the
    // inner loop's instructions: 21 of 49.)
    assert!(
        a.iter().all(|row| row.len() >= d),
        "query rows shorter than {d}"
    );
    assert!(
        d == 0 || (d - 1) * stride + c0 + w8 <= kt.len(),
        "keys [{d}, {stride}] from {c0} + {w8} past {}",
        kt.len()
    );
    let rows = a.map(<[f32]>::as_ptr);
    let x = |r: usize, dd: usize| -> f32 {
        // SAFETY: dd < d <= the row's length (asserted above).
        unsafe { *rows[r].add(dd) }
    };
    // Columns c .. c + width (width 8 or 16) of key row dd: a load of `width` lanes.
    let load = |dd: usize, c: usize, width: usize| -> __m512 {
        // SAFETY: dd < d and c + width <= w8, so the floats read, dd · stride + c0 + c ..
        // + width, lie inside kt (asserted above); the masked load reads only `width` lanes.
        // AVX-512F is enabled for this function.
        unsafe {
            _mm512_maskz_loadu_ps(
                ((1u32 << width) - 1) as u16,
                kt.as_ptr().add(dd * stride + c0 + c),
            )
        }
    };
    let store = |o: &mut [f32; BW], c: usize, width: usize, v: __m512| {
        let s = &mut o[oc + c..oc + c + width];
        // SAFETY: the masked store writes exactly the `width` floats of the bounds-checked
        // slice `s`.
        unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), ((1u32 << width) - 1) as u16, v) }
    };
    let mut c = 0;
    // 64 keys at a time where the block has them: 4·N accumulators keep both multiply-add
    // ports busy (2·N, for 4 rows, is only their latency's worth).
    while c + 4 * W <= w8 {
        let mut acc = [[_mm512_setzero_ps(); 4]; N];
        for dd in 0..d {
            let k = [0, 1, 2, 3].map(|v| load(dd, c + v * W, W));
            for r in 0..N {
                let x = _mm512_set1_ps(x(r, dd));
                for v in 0..4 {
                    acc[r][v] = _mm512_fmadd_ps(x, k[v], acc[r][v]);
                }
            }
        }
        for r in 0..N {
            for v in 0..4 {
                store(&mut out[r], c + v * W, W, acc[r][v]);
            }
        }
        c += 4 * W;
    }
    while c + 2 * W <= w8 {
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for dd in 0..d {
            let (k0, k1) = (load(dd, c, W), load(dd, c + W, W));
            for r in 0..N {
                let x = _mm512_set1_ps(x(r, dd));
                acc[r][0] = _mm512_fmadd_ps(x, k0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x, k1, acc[r][1]);
            }
        }
        for r in 0..N {
            store(&mut out[r], c, W, acc[r][0]);
            store(&mut out[r], c + W, W, acc[r][1]);
        }
        c += 2 * W;
    }
    while c < w8 {
        let width = (w8 - c).min(W); // 16, or the last 8
        let mut acc = [_mm512_setzero_ps(); N];
        for dd in 0..d {
            let k0 = load(dd, c, width);
            for r in 0..N {
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x(r, dd)), k0, acc[r]);
            }
        }
        for r in 0..N {
            store(&mut out[r], c, width, acc[r]);
        }
        c += width;
    }
}

/// `accumulate` with 16-lane registers, for D a multiple of 16. Each output element gets the
/// same multiply-adds in the same order of `j` as in `accumulate`: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn accumulate16<const N: usize>(
    out: &mut [f32],
    os: usize,
    w: &impl Weights,
    m: &[f32],
    ms: usize,
    j_end: usize,
    d: usize,
) {
    const W: usize = 16;
    // The inner loops read the weights and m through raw pointers, their bounds checked
    // once here (per-element checks spilled the weight rows' pointers to the stack).
    let (wp, js) = w.rows::<N>(j_end);
    assert!(
        d.is_multiple_of(W) && (j_end == 0 || (j_end - 1) * ms + d <= m.len()),
        "m [{j_end}, {d}] at stride {ms} past {}",
        m.len()
    );
    let weight = |r: usize, j: usize| -> f32 {
        // SAFETY: r < N and j < j_end, inside the weights (`rows` checked).
        unsafe { *wp[r].add(j * js) }
    };
    let m_at = |j: usize, c: usize| -> __m512 {
        // SAFETY: j < j_end and c + 16 <= d, so the floats read, j · ms + c .. + 16, lie
        // inside m (asserted above). AVX-512F is enabled for this function.
        unsafe { _mm512_loadu_ps(m.as_ptr().add(j * ms + c)) }
    };
    let ld16 = |s: &[f32], i: usize| -> __m512 {
        let s = &s[i..i + W];
        // SAFETY: `s` holds exactly the 16 floats read (bounds-checked slice above).
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    };
    let st16 = |s: &mut [f32], i: usize, v: __m512| {
        let s = &mut s[i..i + W];
        // SAFETY: `s` holds exactly the 16 floats written (bounds-checked slice above).
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
    };
    let mut c = 0;
    while c + 2 * W <= d {
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for r in 0..N {
            acc[r] = [ld16(out, r * os + c), ld16(out, r * os + c + W)];
        }
        for j in 0..j_end {
            let (m0, m1) = (m_at(j, c), m_at(j, c + W));
            for r in 0..N {
                let x = _mm512_set1_ps(weight(r, j));
                acc[r][0] = _mm512_fmadd_ps(x, m0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x, m1, acc[r][1]);
            }
        }
        for r in 0..N {
            st16(out, r * os + c, acc[r][0]);
            st16(out, r * os + c + W, acc[r][1]);
        }
        c += 2 * W;
    }
    if c < d {
        let mut acc = [_mm512_setzero_ps(); N];
        for r in 0..N {
            acc[r] = ld16(out, r * os + c);
        }
        for j in 0..j_end {
            let m0 = m_at(j, c);
            for r in 0..N {
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(weight(r, j)), m0, acc[r]);
            }
        }
        for r in 0..N {
            st16(out, r * os + c, acc[r]);
        }
    }
}

/// `scores` over `n <= out.len()` rows (`row(i)` is row i; a tile of the forward or the
/// backward), 4 at a time, [`BC`] keys at a time: every row's scores against one run of keys
/// before the next, so that the run's keys (`D · BC` floats) are read from L1 by each group
/// of rows. Row i gets its first `ends[i]` columns (a multiple of 8); a group of 4 rows gets
/// as many as the widest of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores_rows<'a, const BW: usize>(
    n: usize,
    row: impl Fn(usize) -> &'a [f32],
    kt: &[f32],
    stride: usize,
    c0: usize,
    ends: &[usize],
    out: &mut [[f32; BW]],
) {
    let wide = avx512();
    let ends = &ends[..n];
    let widest = |rows: &[usize]| rows.iter().copied().max().unwrap_or(0);
    for oc in (0..widest(ends)).step_by(BC) {
        let mut i = 0;
        while i + 4 <= n {
            let end = widest(&ends[i..i + 4]);
            if oc < end {
                let cols = (c0 + oc, BC.min(end - oc));
                let rows = [row(i), row(i + 1), row(i + 2), row(i + 3)];
                let out = &mut out[i..i + 4];
                if wide {
                    // SAFETY: `avx512()` found AVX-512F on this CPU.
                    unsafe { scores16::<4, BW>(rows, kt, stride, cols, oc, out) };
                } else {
                    scores::<4, BW>(rows, kt, stride, cols, oc, out);
                }
            }
            i += 4;
        }
        while i < n {
            if oc < ends[i] {
                let cols = (c0 + oc, BC.min(ends[i] - oc));
                let out = &mut out[i..i + 1];
                if wide {
                    // SAFETY: as above.
                    unsafe { scores16::<1, BW>([row(i)], kt, stride, cols, oc, out) };
                } else {
                    scores::<1, BW>([row(i)], kt, stride, cols, oc, out);
                }
            }
            i += 1;
        }
    }
}

/// `accumulate` over `n` output rows (`out` at stride `os`), weights `w(i)`, 8 (AVX-512) or 4
/// rows at a time. Row i sums its first `ends[i]` terms; a group of rows sums as many as the
/// longest of them (the caller makes the other rows' extra terms 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn accumulate_rows<'a>(
    n: usize,
    out: &mut [f32],
    os: usize,
    w: impl Fn(usize) -> &'a [f32],
    m: &[f32],
    ms: usize,
    ends: &[usize],
    d: usize,
) {
    let wide = d.is_multiple_of(16) && avx512();
    let longest = |i: usize, rows: usize| ends[i..i + rows].iter().copied().max().unwrap_or(0);
    let mut i = 0;
    // Eight rows at a time on AVX-512: 16 accumulators, as many as keep both multiply-add
    // ports busy.
    while wide && i + 8 <= n {
        let ws = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| w(i + r));
        let j_end = longest(i, 8);
        // SAFETY: `avx512()` found AVX-512F on this CPU.
        unsafe { accumulate16::<8>(&mut out[i * os..], os, &ws, m, ms, j_end, d) };
        i += 8;
    }
    while i + 4 <= n {
        let ws = [w(i), w(i + 1), w(i + 2), w(i + 3)];
        let j_end = longest(i, 4);
        if wide {
            // SAFETY: `avx512()` found AVX-512F on this CPU.
            unsafe { accumulate16::<4>(&mut out[i * os..], os, &ws, m, ms, j_end, d) };
        } else {
            accumulate::<4>(&mut out[i * os..], os, &ws, m, ms, j_end, d);
        }
        i += 4;
    }
    while i < n {
        let j_end = ends[i];
        if wide {
            // SAFETY: as above.
            unsafe { accumulate16::<1>(&mut out[i * os..], os, &[w(i)], m, ms, j_end, d) };
        } else {
            accumulate::<1>(&mut out[i * os..], os, &[w(i)], m, ms, j_end, d);
        }
        i += 1;
    }
}

/// `accumulate` over `n` output rows that are the columns (keys) of a block `t`: output row `c`
/// gets `Σ_j t[j][c] · m[j]`, 8 (AVX-512) or 4 rows at a time, over `first(c) <= j < j_end`
/// (the caller's `t[j][c..]` is 0 for the rows before `first(c)`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn accumulate_cols<const BW: usize>(
    n: usize,
    out: &mut [f32],
    os: usize,
    t: &[[f32; BW]],
    (m, ms): (&[f32], usize),
    (first, j_end): (impl Fn(usize) -> usize, usize),
    d: usize,
) {
    let wide = d.is_multiple_of(16) && avx512();
    let mut c = 0;
    while c < n {
        // Keys c .. c + 8 sum from row `first(c)` on: the rows before it are 0 at key c and
        // past it, and a sum that leaves out terms of 0 is the same number.
        let j0 = first(c).min(j_end);
        let (t, m, j_end) = (&t[j0..], &m[j0 * ms..], j_end - j0);
        let w = Columns { t, c };
        let rows = &mut out[c * os..];
        if wide && c + 8 <= n {
            // SAFETY: `avx512()` found AVX-512F on this CPU.
            unsafe { accumulate16::<8>(rows, os, &w, m, ms, j_end, d) };
            c += 8;
        } else if c + 4 <= n {
            if wide {
                // SAFETY: `avx512()` found AVX-512F on this CPU.
                unsafe { accumulate16::<4>(rows, os, &w, m, ms, j_end, d) };
            } else {
                accumulate::<4>(rows, os, &w, m, ms, j_end, d);
            }
            c += 4;
        } else {
            if wide {
                // SAFETY: as above.
                unsafe { accumulate16::<1>(rows, os, &w, m, ms, j_end, d) };
            } else {
                accumulate::<1>(rows, os, &w, m, ms, j_end, d);
            }
            c += 1;
        }
    }
}

/// `x` `[S, D]` transposed into `[D, stride]` (stride >= S + 7; the extra columns are 0).
///
/// 8 x 8 blocks at a time in registers: one float at a time, the writes went down the
/// columns `stride` floats apart, and the transposes were ~3% of flash's time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn transpose(x: &[f32], s: usize, d: usize, stride: usize) -> AlignedFloats {
    assert!(
        stride >= s && x.len() >= s * d,
        "transpose: [{s}, {d}] from {} floats into rows of {stride}",
        x.len()
    );
    let mut t = AlignedFloats::zeroed(d * stride);
    let (s8, d8) = (s - s % LANES, d - d % LANES);
    for j in (0..s8).step_by(LANES) {
        for c in (0..d8).step_by(LANES) {
            let block = transpose8(std::array::from_fn(|i| ld(x, (j + i) * d + c)));
            for (k, col) in block.into_iter().enumerate() {
                st(&mut t, (c + k) * stride + j, col);
            }
        }
    }
    // What the blocks leave: the columns past d8 of their rows, and the rows past s8.
    for (j, row) in x.chunks_exact(d.max(1)).take(s).enumerate() {
        let from = if j < s8 { d8 } else { 0 };
        for (dd, v) in row.iter().enumerate().skip(from) {
            t[dd * stride + j] = *v;
        }
    }
    t
}

/// The transpose of the 8 x 8 block whose rows are `r`: row k of the result is lane k of
/// every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves: the usual
    // three rounds of shuffles (lane k of row i ends at lane i of row k).
    let a = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let b = [
        _mm256_shuffle_ps::<0x44>(a[0], a[2]),
        _mm256_shuffle_ps::<0xEE>(a[0], a[2]),
        _mm256_shuffle_ps::<0x44>(a[1], a[3]),
        _mm256_shuffle_ps::<0xEE>(a[1], a[3]),
        _mm256_shuffle_ps::<0x44>(a[4], a[6]),
        _mm256_shuffle_ps::<0xEE>(a[4], a[6]),
        _mm256_shuffle_ps::<0x44>(a[5], a[7]),
        _mm256_shuffle_ps::<0xEE>(a[5], a[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(b[0], b[4]),
        _mm256_permute2f128_ps::<0x20>(b[1], b[5]),
        _mm256_permute2f128_ps::<0x20>(b[2], b[6]),
        _mm256_permute2f128_ps::<0x20>(b[3], b[7]),
        _mm256_permute2f128_ps::<0x31>(b[0], b[4]),
        _mm256_permute2f128_ps::<0x31>(b[1], b[5]),
        _mm256_permute2f128_ps::<0x31>(b[2], b[6]),
        _mm256_permute2f128_ps::<0x31>(b[3], b[7]),
    ]
}

/// `a · b` for two rows of D floats (a multiple of 8, as `operand_dims` requires), as eight
/// running sums (lane `i` sums the products at `i`, `i + 8`, ...) added at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert!(
        a.len() == b.len() && a.len().is_multiple_of(LANES),
        "dot: rows of {} and {} floats",
        a.len(),
        b.len()
    );
    let mut sv = _mm256_setzero_ps();
    for c in (0..a.len()).step_by(LANES) {
        sv = _mm256_fmadd_ps(ld(a, c), ld(b, c), sv);
    }
    let mut lanes = [0f32; LANES];
    st(&mut lanes, 0, sv);
    lanes.iter().sum()
}

/// Applies the mask to one block of scores (keys `s0 .. s0 + w` for the tile's rows): keys a
/// row does not read become -inf (weight exactly 0), pads get [`MASKED`] added, and a dead row
/// gets [`MASKED`] added everywhere (the general path's additive mask, entry for entry).
#[cfg(target_arch = "x86_64")]
fn mask_block<const BW: usize>(
    mask: &KeyMask,
    b: usize,
    spans: &[Span],
    s0: usize,
    w: usize,
    sc: &mut [[f32; BW]],
) {
    let s1 = s0 + w;
    let bias = &mask.bias[b * mask.s..(b + 1) * mask.s];
    let clean = mask.all_real(b, s0, s1);
    for (row, sp) in sc.iter_mut().zip(spans) {
        if sp.dead {
            for v in &mut row[..w] {
                *v += MASKED;
            }
        } else {
            // The keys outside the span are -inf. A row's span is one run, so they are the
            // block's two ends (the causal edge of a diagonal block).
            let (a, z) = (sp.lo.clamp(s0, s1) - s0, sp.hi.clamp(s0, s1) - s0);
            row[..a].fill(f32::NEG_INFINITY);
            row[z.max(a)..w].fill(f32::NEG_INFINITY);
            // Inside it, a block of real keys only keeps its scores (their bias is 0);
            // otherwise each score gets its key's bias. (With a branch per key, as before
            // session 33, model R's layer with left pads took 1.4-1.5x this forward's time:
            // medians of 15 calls, 4 alternating runs of two builds.)
            if !clean && a < z {
                for (v, b) in row[a..z].iter_mut().zip(&bias[s0 + a..s0 + z]) {
                    *v += b;
                }
            }
        }
    }
}

/// The largest of `row` (-inf for an empty row or one of -inf and NaN only), as four 8-lane
/// running maxima: a max is exact, so the order changes nothing, and four chains keep the
/// vector units busy where one waited out each `max`'s latency (a single chain was ~15% of
/// the forward's time with 512-key blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_max(row: &[f32]) -> f32 {
    const GROUP: usize = 4 * LANES;
    let whole = row.len() - row.len() % GROUP;
    let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    for chunk in row[..whole].chunks_exact(GROUP) {
        for (k, m) in m.iter_mut().enumerate() {
            // `max_ps(v, m)` is m where v is NaN: NaN never wins, as with `>` below.
            *m = _mm256_max_ps(ld(chunk, k * LANES), *m);
        }
    }
    let eights = row.len() - row.len() % LANES;
    for chunk in row[whole..eights].chunks_exact(LANES) {
        m[0] = _mm256_max_ps(ld(chunk, 0), m[0]);
    }
    let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    let mut lanes = [0f32; LANES];
    st(&mut lanes, 0, m);
    lanes
        .iter()
        .chain(&row[eights..])
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m })
}

/// Running sums of exponentials, four of 8 lanes: group g (floats `8g .. 8g + 8`) of a row
/// is added to sum `g % 4`, so that four adds are in flight instead of one chain (the chain
/// of one sum held the 16-lane loop to its adds' latency). The 16-lane loop keeps the same
/// four sums (two registers of two) and so gets the same bits.
#[cfg(target_arch = "x86_64")]
type ExpSums = [__m256; 4];

/// `row[c] = e^(row[c] - shift) · scale` for `c < w`, and 0 for the padding columns
/// `w .. row.len()` (a multiple of 8); returns the sum of the exponentials (before `scale`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted(row: &mut [f32], w: usize, shift: f32, scale: f32) -> f32 {
    row[w..].fill(f32::NEG_INFINITY);
    let (mut c, mut sums) = (0, [_mm256_setzero_ps(); 4]);
    if avx512() {
        // SAFETY: `avx512()` found AVX-512F on this CPU.
        (c, sums) = unsafe { exp_shifted16(row, shift, scale) };
    }
    exp_shifted_from(row, (c, sums), shift, scale)
}

/// `exp_shifted`'s 8-lane loop from float `c` (a multiple of 32), with the sums so far, and
/// the row's sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_from(
    row: &mut [f32],
    (mut c, mut sums): (usize, ExpSums),
    shift: f32,
    scale: f32,
) -> f32 {
    assert!(
        row.len().is_multiple_of(LANES) && c.is_multiple_of(4 * LANES),
        "exp_shifted: {} floats from {c}",
        row.len()
    );
    let (mv, kv) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    while c < row.len() {
        let e = exp8(_mm256_sub_ps(ld(row, c), mv));
        st(row, c, _mm256_mul_ps(e, kv));
        let g = (c / LANES) % 4;
        sums[g] = _mm256_add_ps(sums[g], e);
        c += LANES;
    }
    let total = _mm256_add_ps(
        _mm256_add_ps(sums[0], sums[1]),
        _mm256_add_ps(sums[2], sums[3]),
    );
    let mut lanes = [0f32; LANES];
    st(&mut lanes, 0, total);
    lanes.iter().sum()
}

/// `exp_shifted`'s loop over the whole groups of 32 of `row`, 16 lanes at a time: `exp16` is
/// `exp8`'s bits, and the two registers of sums are the 8-lane loop's four (sums 0 | 1 and
/// 2 | 3), so the results are the same bits. Returns the floats done and the sums so far.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp_shifted16(row: &mut [f32], shift: f32, scale: f32) -> (usize, ExpSums) {
    let (mv, kv) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let whole = row.len() - row.len() % 32;
    for chunk in row[..whole].chunks_exact_mut(32) {
        // SAFETY: the chunk holds exactly the 32 floats read and written.
        let (x0, x1) = unsafe {
            (
                _mm512_loadu_ps(chunk.as_ptr()),
                _mm512_loadu_ps(chunk.as_ptr().add(16)),
            )
        };
        let e0 = super::vexp::exp16(_mm512_sub_ps(x0, mv));
        let e1 = super::vexp::exp16(_mm512_sub_ps(x1, mv));
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(chunk.as_mut_ptr(), _mm512_mul_ps(e0, kv));
            _mm512_storeu_ps(chunk.as_mut_ptr().add(16), _mm512_mul_ps(e1, kv));
        }
        lo = _mm512_add_ps(lo, e0);
        hi = _mm512_add_ps(hi, e1);
    }
    // The upper halves through a 64-bit view: AVX-512F alone has no 32x8 extract.
    let upper = |v: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let sums = [
        _mm512_castps512_ps256(lo),
        upper(lo),
        _mm512_castps512_ps256(hi),
        upper(hi),
    ];
    (whole, sums)
}

/// The tile's key range: the union of its rows' spans, as the first key and the end.
#[cfg(target_arch = "x86_64")]
fn union(spans: &[Span]) -> (usize, usize) {
    let lo = spans.iter().map(|s| s.lo).min().unwrap_or(0);
    let hi = spans.iter().map(|s| s.hi).max().unwrap_or(0);
    (lo, hi)
}

/// The operands of one (batch row, kv head) pair.
#[cfg(target_arch = "x86_64")]
struct Pair<'a> {
    b: usize,
    /// `[R, D]`: the query rows of the kv head's group, row `r` at position `r % T`.
    q: &'a [f32],
    /// `[S, D]` each.
    k: &'a [f32],
    v: &'a [f32],
    /// `k` transposed, `[D, stride]`.
    kt: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl<'a> Pair<'a> {
    /// Pair `i` (= b · G + g) of q `[B, G, R, D]`, k and v `[B, G, S, D]`, with its
    /// transposed keys `kts[i]`.
    fn nth(
        i: usize,
        groups: usize,
        (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
        kts: &'a [AlignedFloats],
        r: usize,
        dm: Dims,
    ) -> Self {
        let (s, d) = (dm.s, dm.d);
        Pair {
            b: i / groups,
            q: &q[i * r * d..(i + 1) * r * d],
            k: &k[i * s * d..(i + 1) * s * d],
            v: &v[i * s * d..(i + 1) * s * d],
            kt: &kts[i],
        }
    }
}

/// Dims shared by every pair: query positions T, keys S (and its padded stride), head dim D.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    t: usize,
    s: usize,
    stride: usize,
    d: usize,
}

/// The key block from `s0`: at most BW keys, not past `hi`. Returns its width and that
/// width rounded up to 8 (the columns a block's rows fill).
#[cfg(target_arch = "x86_64")]
fn block_width<const BW: usize>(s0: usize, hi: usize) -> (usize, usize) {
    let w = (hi - s0).min(BW);
    (w, w.div_ceil(LANES) * LANES)
}

/// The masked scores of a tile's rows (`spans`, `qrow(i)`) against the key block of `w` keys
/// from `s0`: row i's first `ends[i]` columns (a multiple of 8, past the keys its span
/// reads, or all of them for a dead row), and -inf where the mask says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn block_scores<'a, const BW: usize>(
    p: &Pair,
    mask: &KeyMask,
    spans: &[Span],
    qrow: impl Fn(usize) -> &'a [f32],
    stride: usize,
    (s0, w): (usize, usize),
    ends: &[usize],
    sc: &mut [[f32; BW]],
) {
    scores_rows(spans.len(), qrow, p.kt, stride, s0, ends, sc);
    mask_block(mask, p.b, spans, s0, w, sc);
}

/// Where a query head's rows go: the output row of query position `i` (counted from the
/// first position written) at `rows[i · stride ..][..D]`, its score max and inverse
/// normalizer at `state[i · state_stride ..][..2]`.
#[cfg(target_arch = "x86_64")]
struct HeadOut<'a> {
    rows: &'a mut [f32],
    stride: usize,
    state: &'a mut [f32],
    state_stride: usize,
}

/// A forward's working memory, reused from call to call (the scores are 32 KiB): every score
/// a call reads it wrote first.
#[cfg(target_arch = "x86_64")]
struct ForwardScratch<const BW: usize> {
    /// A tile's scores, then its weights, against one key block: `[BR, BW]`.
    sc: AlignedFloats,
    /// A tile's output rows, `[BR, D]`.
    acc: AlignedFloats,
}

#[cfg(target_arch = "x86_64")]
impl<const BW: usize> ForwardScratch<BW> {
    /// For heads of `d` dims.
    fn new(d: usize) -> Self {
        ForwardScratch {
            sc: AlignedFloats::zeroed(BR * BW),
            acc: AlignedFloats::zeroed(BR * d),
        }
    }
}

/// The forward of one query head (rows `r0 ..` of one pair) at positions `ta .. tb`, into
/// `out`.
///
/// The key blocks start at multiples of BW, whatever the tile's rows, so that a row's result
/// does not depend on which rows share its tile (the positions each thread takes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_head<const BW: usize>(
    p: &Pair,
    mask: &KeyMask,
    dm: Dims,
    (r0, ta, tb): (usize, usize, usize),
    out: &mut HeadOut,
    scratch: &mut ForwardScratch<BW>,
) {
    let Dims { stride, d, .. } = dm;
    let ForwardScratch { sc, acc } = scratch;
    assert_eq!(acc.len(), BR * d, "forward scratch for another head dim");
    let sc = sc.rows_mut::<BW>();
    for t0 in (ta..tb).step_by(BR) {
        let n = (tb - t0).min(BR);
        let mut spans = [Span::NONE; BR];
        for (i, sp) in spans[..n].iter_mut().enumerate() {
            *sp = mask.span(p.b, t0 + i);
        }
        let spans = &spans[..n];
        let (lo, hi) = union(spans);
        let mut mx = [f32::NEG_INFINITY; BR];
        let mut sum = [0f32; BR];
        acc.fill(0.0);
        let qrow = |i: usize| &p.q[(r0 + t0 + i) * d..(r0 + t0 + i + 1) * d];
        let mut s0 = lo - lo % BW;
        while s0 < hi {
            let (w, w8) = block_width::<BW>(s0, hi);
            block_scores(
                p,
                mask,
                spans,
                qrow,
                stride,
                (s0, w),
                &[w8; BR],
                &mut sc[..],
            );
            for i in 0..n {
                let row = &mut sc[i][..w8];
                // The padding columns (up to 8) join the max as -inf, so that it reads whole
                // groups of 8 (`exp_shifted` sets them so again).
                row[w..].fill(f32::NEG_INFINITY);
                let block_max = row_max(row);
                if block_max == f32::NEG_INFINITY {
                    row.fill(0.0); // no key of this block is read: weights 0
                    continue;
                }
                let m_new = mx[i].max(block_max);
                let s = exp_shifted(row, w, m_new, 1.0);
                // The first visible block finds the sum and the row's output 0, and a max
                // that stays gives e⁰ = 1: neither needs the rescaling (nor `exp`, ~1% of
                // the forward when it ran once per row and block).
                if mx[i] != f32::NEG_INFINITY && m_new != mx[i] {
                    let alpha = (mx[i] - m_new).exp();
                    sum[i] *= alpha;
                    for a in &mut acc[i * d..(i + 1) * d] {
                        *a *= alpha;
                    }
                }
                sum[i] += s;
                mx[i] = m_new;
            }
            accumulate_rows(n, acc, d, |i| &sc[i][..], &p.v[s0 * d..], d, &[w; BR], d);
            s0 += w;
        }
        for i in 0..n {
            let at = t0 - ta + i;
            let inv = 1.0 / sum[i];
            let o = &mut out.rows[at * out.stride..at * out.stride + d];
            for (o, a) in o.iter_mut().zip(&acc[i * d..(i + 1) * d]) {
                *o = a * inv;
            }
            let st = &mut out.state[at * out.state_stride..at * out.state_stride + 2];
            st[0] = mx[i];
            st[1] = inv;
        }
    }
}

/// The columns each of a backward tile's rows fills against the block of `w` keys from `s0`
/// (`w8`: w rounded up to 8). Rows in groups of 8 share the last key any of them reads,
/// rounded up to 8: past it (the upper triangle of a causal tile's diagonal block) nothing is
/// computed or summed, ~11% of the products with 64-row tiles over 512 positions. A group
/// with a dead row (which reads every key) takes all `w8`.
///
/// The results are the same bits as over the whole block: the probabilities and score
/// gradients the caller leaves out are exactly 0 (weight 0 of a masked key), and a sum less
/// its terms of 0 is the same number. On model R's layer (with left pads) the backward took
/// 0.93x the time (medians of 10 calls, 6 alternating runs of two builds, session 33).
#[cfg(target_arch = "x86_64")]
fn causal_ends(spans: &[Span], s0: usize, (w, w8): (usize, usize)) -> [usize; BACKWARD_BR] {
    let mut ends = [0; BACKWARD_BR];
    for (group, out) in spans.chunks(8).zip(ends.chunks_mut(8)) {
        let end = if group.iter().any(|sp| sp.dead) {
            w8
        } else {
            let last = group.iter().map(|sp| sp.hi.clamp(s0, s0 + w) - s0).max();
            last.unwrap_or(0).div_ceil(LANES) * LANES
        };
        out[..group.len()].fill(end);
    }
    ends
}

/// One batch row's forward rows, their gradients and state, as the backward of one of its
/// pairs reads them: `[T, H, D]`, `[T, H, D]` and `[T, H, 2]`; the pair's query row `j·T + t`
/// is head `h0 + j` of position t.
#[cfg(target_arch = "x86_64")]
struct Rows<'a> {
    o: &'a [f32],
    g: &'a [f32],
    state: &'a [f32],
    heads: usize,
    h0: usize,
}

/// The backward of one pair: `dq` `[R, D]`, `dk` and `dv` `[S, D]` (zeroed) from the
/// forward's rows, their gradients and state (`rows`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_pair<const BW: usize>(
    p: &Pair,
    mask: &KeyMask,
    dm: Dims,
    rows: &Rows,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Dims { t, s, stride, d } = dm;
    let hd = rows.heads * d;
    let vt = transpose(p.v, s, d, stride);
    let n_rows = p.q.len() / d;
    let (mut sc, mut dp) = (
        AlignedFloats::zeroed(BACKWARD_BR * BW),
        AlignedFloats::zeroed(BACKWARD_BR * BW),
    );
    let (sc, dp) = (sc.rows_mut::<BW>(), dp.rows_mut::<BW>());
    let mut dq_tile = AlignedFloats::zeroed(BACKWARD_BR * d);
    for r0 in (0..n_rows).step_by(t) {
        // Position ti of this query head: row `ti · H + h` of the batch row's rows.
        let h = rows.h0 + r0 / t;
        let at = |ti: usize| ti * rows.heads + h;
        for t0 in (0..t).step_by(BACKWARD_BR) {
            let n = (t - t0).min(BACKWARD_BR);
            let first = r0 + t0;
            let mut spans = [Span::NONE; BACKWARD_BR];
            for (i, sp) in spans[..n].iter_mut().enumerate() {
                *sp = mask.span(p.b, t0 + i);
            }
            let spans = &spans[..n];
            let (lo, hi) = union(spans);
            let qrow = |i: usize| &p.q[(first + i) * d..(first + i + 1) * d];
            let grow = |i: usize| &rows.g[at(t0 + i) * d..at(t0 + i) * d + d];
            let mut delta = [0f32; BACKWARD_BR];
            let mut shift = [0f32; BACKWARD_BR];
            let mut inv = [0f32; BACKWARD_BR];
            for i in 0..n {
                let y = &rows.o[at(t0 + i) * d..at(t0 + i) * d + d];
                delta[i] = dot(y, grow(i));
                shift[i] = rows.state[at(t0 + i) * 2];
                inv[i] = rows.state[at(t0 + i) * 2 + 1];
            }
            dq_tile.fill(0.0);
            let mut s0 = lo;
            while s0 < hi {
                let (w, w8) = block_width::<BW>(s0, hi);
                let all_ends = causal_ends(spans, s0, (w, w8));
                let ends = &all_ends[..n];
                block_scores(p, mask, spans, qrow, stride, (s0, w), ends, sc);
                scores_rows(n, grow, &vt, stride, s0, ends, dp);
                for i in 0..n {
                    // The probabilities, as the forward had them, and dS = P ⊙ (dP − Δ) in
                    // place of dP; both 0 past the row's columns (the keys it does not read).
                    let (e8, e) = (ends[i], ends[i].min(w));
                    exp_shifted(&mut sc[i][..e8], e, shift[i], inv[i]);
                    sc[i][e8..w8].fill(0.0);
                    let di = delta[i];
                    for (ds, &pr) in dp[i][..e].iter_mut().zip(&sc[i][..e]) {
                        *ds = pr * (*ds - di);
                    }
                    dp[i][e..w].fill(0.0);
                }
                let k_block = &p.k[s0 * d..];
                let row_ends = all_ends.map(|e| e.min(w));
                accumulate_rows(n, &mut dq_tile, d, |i| &dp[i][..], k_block, d, &row_ends, d);
                // dK += dSᵀ·Q and dV += Pᵀ·dO: the blocks read by columns. Key c's sums start
                // at the first row that reads past it (the rows before are 0 there).
                let first_row = |c: usize| ends.iter().take_while(|&&e| e <= c).count();
                let q_tile = (&p.q[first * d..], d);
                accumulate_cols(w, &mut dk[s0 * d..], d, dp, q_tile, (first_row, n), d);
                let g_tile = (&rows.g[at(t0) * d..], hd);
                accumulate_cols(w, &mut dv[s0 * d..], d, sc, g_tile, (first_row, n), d);
                s0 += w;
            }
            dq[first * d..(first + n) * d].copy_from_slice(&dq_tile[..n * d]);
        }
    }
}

/// The op: q `[B, G, R, D]`, k and v `[B, G, S, D]` (contiguous) -> `[B, T, G·n_rep·D]`, the
/// rows the output projection reads (head `g·n_rep + j` of position `t` is query row
/// `j·T + t` of group `g`).
///
/// The kernels write the rows and, for the backward, each row's score max and inverse
/// normalizer (`[B, T, H, 2]`), which the op keeps: the graph holds one node where slicing off
/// the state and moving the heads next to each other took four, each of which candle's
/// backward would zero and add a gradient for.
#[cfg(target_arch = "x86_64")]
struct FlashAttention {
    mask: Arc<KeyMask>,
    /// Each query row's score max and inverse normalizer, `[B, T, H, 2]`, for the backward.
    state: std::sync::Mutex<Vec<f32>>,
}

/// `(B, G, R, dims)` of operands q `[B, G, R, D]` and k `[B, G, S, D]` under `mask`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn operand_dims(
    mask: &KeyMask,
    q: &[usize],
    k: &[usize],
) -> Result<(usize, usize, usize, Dims)> {
    let (&[b, g, r, d], &[kb, kg, s, kd]) = (q, k) else {
        candle_core::bail!("flash attention: q {q:?} and k {k:?} are not 4-D");
    };
    let t = s.saturating_sub(mask.past);
    if (kb, kg, kd) != (b, g, d) || mask.rows() != b || mask.s != s || t == 0 {
        candle_core::bail!("flash attention: q {q:?} and k {k:?} do not agree with the mask");
    }
    if r % t != 0 || d % LANES != 0 {
        candle_core::bail!("flash attention: {r} query rows for {t} positions, head dim {d}");
    }
    // A block starts at any key, so its last load may reach 7 columns past S; a whole number
    // of cache lines, so that every row of the transposed keys starts on one.
    let stride = (s + LANES).div_ceil(aligned::LINE) * aligned::LINE;
    Ok((b, g, r, Dims { t, s, stride, d }))
}

/// Each pair's keys transposed (`[D, stride]`).
#[cfg(target_arch = "x86_64")]
fn transposed_keys(k: &[f32], pairs: usize, dm: Dims) -> Vec<AlignedFloats> {
    let Dims { s, stride, d, .. } = dm;
    (0..pairs)
        .into_par_iter()
        // SAFETY: `transpose` needs AVX2 and FMA; the callers run only after `serves`
        // found both on this CPU.
        .map(|i| unsafe { transpose(&k[i * s * d..(i + 1) * s * d], s, d, stride) })
        .collect()
}

/// Query positions whose rows the forward computes together, all heads at once, before
/// handing them to the output (`POSITIONS · H · D` floats: 64 KiB for model R).
const POSITIONS: usize = 64;

/// The forward over every pair: the backward's state, each query row's score max and inverse
/// normalizer (`[B, T, H, 2]`, H = G·R/T query heads), and the rows the output projection
/// reads, `[B, T, H·D]` (head `g·R/T + j` of position t is query row `j·T + t` of group g).
#[cfg(target_arch = "x86_64")]
pub(crate) fn forward_rows(
    mask: &KeyMask,
    (b, per_b, r, dm): (usize, usize, usize, Dims),
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>) {
    let pairs = b * per_b;
    let Dims { t, d, .. } = dm;
    let kts = transposed_keys(k, pairs, dm);
    let n_rep = r / t;
    let heads = per_b * n_rep;
    let hd = heads * d;
    // The threads take runs of POSITIONS positions as they come free (a causal row's cost
    // grows with its position, and on a shared host one thread can fall behind: one run per
    // thread left the other waiting, ~12% of the forward's time on model R's layer, medians
    // of 30 calls alternating, session 32). A run writes its rows in order, up to POSITIONS
    // of one batch row at a time: every head's rows for them into `rows`, then out. A row's
    // result does not depend on where a run starts (see `forward_head`).
    let body = |p0: usize, out: &mut fused::Fill<'_, f32>| {
        let end = p0 + out.len() / hd.max(1);
        let mut chunk_rows = vec![0f32; POSITIONS * hd];
        let mut state = Vec::with_capacity((end - p0) * heads * 2);
        let mut chunk_state = vec![0f32; POSITIONS * heads * 2];
        let mut scratch = ForwardScratch::<FORWARD_BC>::new(d);
        let mut p = p0;
        while p < end {
            let (bi, ta) = (p / t, p % t);
            let tb = t.min(ta + POSITIONS).min(ta + end - p);
            let n = tb - ta;
            for h in 0..heads {
                let pair = Pair::nth(bi * per_b + h / n_rep, per_b, (q, k, v), &kts, r, dm);
                let mut head = HeadOut {
                    rows: &mut chunk_rows[h * d..],
                    stride: hd,
                    state: &mut chunk_state[h * 2..],
                    state_stride: heads * 2,
                };
                let at = ((h % n_rep) * t, ta, tb);
                // SAFETY: `forward_head` needs AVX2 and FMA; the callers run only after
                // `serves` found both on this CPU.
                #[allow(unused_unsafe)]
                unsafe {
                    forward_head(&pair, mask, dm, at, &mut head, &mut scratch)
                }
            }
            out.extend(&chunk_rows[..n * hd]);
            state.extend_from_slice(&chunk_state[..n * heads * 2]);
            p += n;
        }
        state
    };
    let (rows, states) = fused::written_by(b * t * hd, hd, POSITIONS, body);
    (states.concat(), rows)
}

/// The backward over every pair: `(dq, dk, dv)` in the operands' layouts from the forward's
/// `state` (`[B, T, H, 2]`), its rows `o_rows` and their gradient `g_rows` (both
/// `[B, T, H·D]`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn backward_rows(
    mask: &KeyMask,
    (b, per_b, r, dm): (usize, usize, usize, Dims),
    (q, k, v): (&[f32], &[f32], &[f32]),
    state: &[f32],
    (o_rows, g_rows): (&[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let pairs = b * per_b;
    let Dims { t, s, d, .. } = dm;
    let heads = r / t * per_b;
    let n = b * t * heads;
    if state.len() != n * 2 || o_rows.len() != n * d || g_rows.len() != n * d {
        candle_core::bail!("flash attention: backward without its forward's state");
    }
    let kts = transposed_keys(k, pairs, dm);
    let mut dq = fused::zeroed(pairs * r * d, 0f32);
    let mut dk = fused::zeroed(pairs * s * d, 0f32);
    let mut dv = fused::zeroed(pairs * s * d, 0f32);
    dq.par_chunks_exact_mut(r * d)
        .zip(dk.par_chunks_exact_mut(s * d))
        .zip(dv.par_chunks_exact_mut(s * d))
        .enumerate()
        .for_each(|(i, ((dq, dk), dv))| {
            let pair = Pair::nth(i, per_b, (q, k, v), &kts, r, dm);
            // This batch row's positions, and the pair's first query head among them.
            let rows = Rows {
                o: &o_rows[pair.b * t * heads * d..(pair.b + 1) * t * heads * d],
                g: &g_rows[pair.b * t * heads * d..(pair.b + 1) * t * heads * d],
                state: &state[pair.b * t * heads * 2..(pair.b + 1) * t * heads * 2],
                heads,
                h0: (i % per_b) * (r / t),
            };
            // SAFETY: as in the forward, AVX2 and FMA were found.
            #[allow(unused_unsafe)]
            unsafe {
                backward_pair::<BACKWARD_BC>(&pair, mask, dm, &rows, dq, dk, dv)
            }
        });
    Ok((dq, dk, dv))
}

#[cfg(target_arch = "x86_64")]
impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "klong-flash-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = operand_dims(&self.mask, lq.dims(), lk.dims())?;
        let (b, per_b, r, dm) = dims;
        let operands = (
            fused::slice::<f32>(q, lq)?,
            fused::slice::<f32>(k, lk)?,
            fused::slice::<f32>(v, lv)?,
        );
        let (out, rows) = forward_rows(&self.mask, dims, operands);
        *self
            .state
            .lock()
            .map_err(|_| candle_core::Error::msg("flash attention: state lock poisoned"))? = out;
        let heads = per_b * (r / dm.t);
        Ok((CpuStorage::F32(rows), Shape::from((b, dm.t, heads * dm.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let dims = operand_dims(&self.mask, q.dims(), k.dims())?;
        let state = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::msg("flash attention: state lock poisoned"))?;
        let (dq, dk, dv) = fused::with_data::<f32, _>(&q, |q| {
            fused::with_data::<f32, _>(&k, |k| {
                fused::with_data::<f32, _>(&v, |v| {
                    fused::with_data::<f32, _>(g, |g_rows| {
                        fused::with_data::<f32, _>(rows, |o_rows| {
                            let rows = (o_rows, g_rows);
                            backward_rows(&self.mask, dims, (q, k, v), &state, rows)
                        })
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Whether these kernels serve `t`'s device and dtype.
pub(crate) fn serves(t: &Tensor) -> bool {
    fused::supported(t, fused::Kind::Flash)
        && t.dtype() == candle_core::DType::F32
        && super::skinny::simd()
}

/// softmax(q·kᵀ + mask)·v with gradients: q `[B, G, R, D]` (pre-scaled; row r belongs to
/// query position `r % T`, T = S − past), k and v `[B, G, S, D]`, the mask as key validity.
/// Returns the rows `[B, T, G·(R/T)·D]` (head `g·R/T + j` of position t is row `j·T + t` of
/// group g: HF's head order), or `None` when these kernels do not serve it (then the caller
/// takes the general path).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<KeyMask>,
) -> Result<Option<Tensor>> {
    let (Ok((b, _, r, d)), Ok((_, _, s, _))) = (q.dims4(), k.dims4()) else {
        return Ok(None);
    };
    let t = s.saturating_sub(mask.past);
    if !serves(q) || !serves(k) || !serves(v) || d % LANES != 0 || t == 0 || r % t != 0 {
        return Ok(None);
    }
    if mask.rows() != b || mask.s != s {
        candle_core::bail!(
            "flash attention: mask for {} rows of {} keys, q {:?}, k {:?}",
            mask.rows(),
            mask.s,
            q.dims(),
            k.dims()
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        let out = q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            FlashAttention {
                mask: mask.clone(),
                state: std::sync::Mutex::new(Vec::new()),
            },
        )?;
        Ok(Some(out))
    }
    // `serves` is false off x86_64 (no AVX2): never reached there.
    #[cfg(not(target_arch = "x86_64"))]
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// The general path: q·kᵀ, the additive mask, softmax, ·v, then the heads side by side
    /// per position (`[B, T, H·D]`, what `attention` returns).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, keys: &[Vec<bool>], past: usize) -> Tensor {
        let km = KeyMask::new(keys, past).expect("mask");
        let (b, t, s) = km.dims();
        let mask = Tensor::from_vec(km.additive(), (b, 1, t, s), &Device::Cpu).expect("mask");
        let att = q.matmul(&k.t().expect("t")).expect("qk");
        let att = fused::masked_softmax(&att, &mask).expect("softmax");
        let y = att.matmul(v).expect("av");
        let (_, g, r, d) = y.dims4().expect("dims");
        let h = g * r / t;
        y.reshape((b, h, t, d))
            .and_then(|y| y.transpose(1, 2))
            .and_then(|y| y.reshape((b, t, h * d)))
            .expect("rows")
    }

    /// Gradients of `Σ y ⊙ w` with respect to q, k and v.
    fn grads(y: &Tensor, w: &Tensor, vars: &[&Var; 3]) -> Vec<Tensor> {
        let loss = (y * w).and_then(|p| p.sum_all()).expect("loss");
        let g = loss.backward().expect("backward");
        vars.iter()
            .map(|v| g.get(v.as_tensor()).expect("grad").clone())
            .collect()
    }

    /// Forward and gradients against the general path: several key blocks (forward and
    /// backward) and query tiles with tails, GQA groups, head dims 8-32, right pads (training
    /// batches), left pads with dead queries and a hole (generation), and cached keys before
    /// the new queries.
    #[test]
    fn attention_matches_the_general_path() {
        if !super::super::skinny::simd() {
            return; // nothing to compare: `attention` declines on this CPU
        }
        let cases: [(usize, usize, usize, usize, usize); 7] = [
            // (T, past, n_rep, D, G)
            (150, 0, 2, 24, 2),
            // More keys than one forward block: the online rescaling between blocks.
            (600, 0, 1, 8, 1),
            (37, 0, 1, 8, 1),
            (70, 0, 3, 32, 1),
            (5, 20, 2, 16, 2),
            (131, 3, 1, 24, 2),
            (17, 0, 4, 16, 1),
        ];
        for (case, (t, past, n_rep, d, g)) in cases.into_iter().enumerate() {
            let s = past + t;
            let b = 3;
            // Row 0: all real. Row 1: right pads (the last third). Row 2: four left pads (its
            // first queries, when new, see no key) and a pad in the middle.
            let keys: Vec<Vec<bool>> = vec![
                vec![true; s],
                (0..s).map(|j| j < s - s / 3).collect(),
                (0..s).map(|j| j >= 4 && j != s / 2).collect(),
            ];
            let seed = 10 * case as u64;
            let q = Var::from_tensor(&randn(&[b, g, n_rep * t, d], seed + 1, 1.5)).expect("q");
            let k = Var::from_tensor(&randn(&[b, g, s, d], seed + 2, 1.5)).expect("k");
            let v = Var::from_tensor(&randn(&[b, g, s, d], seed + 3, 1.0)).expect("v");
            let w = randn(&[b, t, g * n_rep * d], seed + 4, 1.0);
            let mask = Arc::new(KeyMask::new(&keys, past).expect("mask"));
            let got = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask)
                .expect("op")
                .expect("served");
            let want = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &keys, past);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "case {case}: forward max diff {diff}");
            let vars = [&q, &k, &v];
            for (i, (a, e)) in grads(&got, &w, &vars)
                .iter()
                .zip(grads(&want, &w, &vars))
                .enumerate()
            {
                let diff = max_abs_diff(a, &e);
                assert!(diff < 2e-5, "case {case}: gradient {i} max diff {diff}");
            }
        }
    }

    /// A row's forward does not depend on which rows share its tile (the runs of positions
    /// each thread takes decide that): positions computed in one run and split into two, where
    /// the second run's first tile has no dead query (its key blocks would start at the first
    /// real key instead of key 0), give the same bits. Left pads, dead queries, more keys than
    /// one forward block.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_rows_forward_does_not_depend_on_its_tile() {
        if !super::super::skinny::simd() {
            return; // nothing to run on this CPU
        }
        let (t, d) = (600, 16);
        let keys = vec![(0..t).map(|j| j >= 37).collect::<Vec<bool>>()];
        let mask = KeyMask::new(&keys, 0).expect("mask");
        let dims = operand_dims(&mask, &[1, 1, t, d], &[1, 1, t, d]).expect("dims");
        let data = |seed: u64| randn(&[t * d], seed, 1.5).to_vec1::<f32>().expect("vec");
        let (q, k, v) = (data(81), data(82), data(83));
        let kts = transposed_keys(&k, 1, dims.3);
        let pair = Pair::nth(0, 1, (&q, &k, &v), &kts, t, dims.3);
        let run = |ranges: &[(usize, usize)]| -> (Vec<f32>, Vec<f32>) {
            let (mut rows, mut state) = (vec![0f32; t * d], vec![0f32; t * 2]);
            let mut scratch = ForwardScratch::<FORWARD_BC>::new(d);
            for &(ta, tb) in ranges {
                let mut out = HeadOut {
                    rows: &mut rows[ta * d..],
                    stride: d,
                    state: &mut state[ta * 2..],
                    state_stride: 2,
                };
                // SAFETY: `simd()` found AVX2 and FMA on this CPU.
                unsafe { forward_head(&pair, &mask, dims.3, (0, ta, tb), &mut out, &mut scratch) };
            }
            (rows, state)
        };
        let (whole, split) = (run(&[(0, t)]), run(&[(0, 37), (37, t)]));
        let differs = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .position(|(a, b)| a.to_bits() != b.to_bits())
        };
        assert_eq!(
            differs(&whole.0, &split.0),
            None,
            "rows: first float that differs"
        );
        assert_eq!(
            differs(&whole.1, &split.1),
            None,
            "state: first float that differs"
        );
    }

    /// The four-chain max is the plain fold's: every length around the 32-float groups, the
    /// largest value in a group, in the tail, and behind NaNs; rows of -inf and NaN only.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_max_is_the_plain_fold() {
        if !super::super::skinny::simd() {
            return; // nothing to run on this CPU
        }
        let plain = |r: &[f32]| {
            r.iter()
                .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m })
        };
        for len in 0..100usize {
            for top in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut row: Vec<f32> = (0..len).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
                if let Some(at) = top.filter(|&at| at < len) {
                    row[at] = 99.0;
                }
                if len > 3 {
                    row[3] = f32::NAN;
                }
                // SAFETY: `simd()` found AVX2 and FMA on this CPU.
                let got = unsafe { row_max(&row) };
                assert_eq!(
                    got.to_bits(),
                    plain(&row).to_bits(),
                    "length {len}, top {top:?}"
                );
            }
            let dead: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 3 == 0 {
                        f32::NAN
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            // SAFETY: as above.
            assert_eq!(unsafe { row_max(&dead) }, f32::NEG_INFINITY, "length {len}");
        }
    }

    /// The blocked transpose puts every float where the plain one does and zeroes the
    /// padding columns: sizes with and without whole 8 x 8 blocks, strides past S.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_blocked_transpose_is_the_plain_one() {
        if !super::super::skinny::simd() {
            return; // nothing to run on this CPU
        }
        for (s, d, stride) in [
            (1, 8, 16),
            (7, 16, 16),
            (8, 8, 16),
            (13, 24, 24),
            (600, 32, 616),
        ] {
            let x: Vec<f32> = (0..s * d).map(|i| i as f32 + 0.5).collect();
            let mut plain = vec![0f32; d * stride];
            for j in 0..s {
                for dd in 0..d {
                    plain[dd * stride + j] = x[j * d + dd];
                }
            }
            // SAFETY: `simd()` found AVX2 and FMA on this CPU.
            let blocked = unsafe { transpose(&x, s, d, stride) };
            assert_eq!(&blocked[..], &plain[..], "S {s}, D {d}, stride {stride}");
        }
    }

    /// The 16-lane products give the 8-lane ones' bits: scores over block widths with a
    /// tail of 8 columns, and accumulations over head dims 16, 32 and 48.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lane_products_are_the_eight_lane_ones_to_the_bit() {
        if !(super::super::skinny::simd() && avx512()) {
            return; // nothing to compare on this CPU
        }
        let data = |n: usize, seed: u64| -> Vec<f32> {
            randn(&[n], seed, 1.0).to_vec1::<f32>().expect("vec")
        };
        for d in [16usize, 32, 48] {
            let stride = 2 * BC + LANES;
            let kt = data(d * stride, d as u64);
            let q = data(4 * d, 1 + d as u64);
            let a = [&q[..d], &q[d..2 * d], &q[2 * d..3 * d], &q[3 * d..]];
            for w8 in [8usize, 16, 24, 40, 64] {
                let (mut x, mut y) = ([[0f32; BC]; 4], [[0f32; BC]; 4]);
                // SAFETY: AVX2, FMA and AVX-512F were found above.
                unsafe {
                    scores::<4, BC>(a, &kt, stride, (5, w8), 0, &mut x);
                    scores16::<4, BC>(a, &kt, stride, (5, w8), 0, &mut y);
                }
                assert_eq!(x, y, "scores, d {d}, width {w8}");
            }
            let j_end = 37;
            let m = data(j_end * d, 7);
            let wts = data(4 * j_end, 8);
            let ws = [
                &wts[..j_end],
                &wts[j_end..2 * j_end],
                &wts[2 * j_end..3 * j_end],
                &wts[3 * j_end..],
            ];
            let (mut x, mut y) = (data(4 * d, 9), data(4 * d, 9));
            // SAFETY: as above.
            unsafe {
                accumulate::<4>(&mut x, d, &ws, &m, d, j_end, d);
                accumulate16::<4>(&mut y, d, &ws, &m, d, j_end, d);
            }
            assert_eq!(x, y, "accumulate, d {d}");
        }
    }

    /// `exp_shifted`'s 16-lane loop gives the 8-lane one's bits, rows and sums, at widths that
    /// are multiples of 8 (with and without an 8-wide tail) and with padding.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lane_exponentials_are_the_eight_lane_ones_to_the_bit() {
        if !(super::super::skinny::simd() && avx512()) {
            return; // nothing to compare on this CPU
        }
        // Rows longer than a block too: more groups, more chances for an order to show.
        for w8 in [8usize, 16, 24, 40, 64, 136, 520] {
            for w in [w8 - 3, w8] {
                let row: Vec<f32> = randn(&[w8], w8 as u64, 4.0).to_vec1::<f32>().expect("row");
                let (mut x, mut y) = (row.clone(), row.clone());
                // SAFETY: AVX2, FMA and AVX-512F were found above.
                let (sx, sy) = unsafe {
                    let sx = exp_shifted(&mut x, w, 1.5, 0.25);
                    y[w..].fill(f32::NEG_INFINITY);
                    let sy = exp_shifted_from(&mut y, (0, [_mm256_setzero_ps(); 4]), 1.5, 0.25);
                    (sx, sy)
                };
                assert_eq!(sx.to_bits(), sy.to_bits(), "sum, width {w} of {w8}");
                assert_eq!(x, y, "row, width {w} of {w8}");
            }
        }
    }

    /// A row whose queries see one key each (a single real token) and scores large enough
    /// that a naive exp would overflow: weights are still exact.
    #[test]
    fn extreme_scores_stay_finite() {
        if !super::super::skinny::simd() {
            return;
        }
        let (t, d) = (40, 8);
        let keys = vec![(0..t).map(|j| j == 0 || j > 20).collect::<Vec<_>>()];
        let q = randn(&[1, 1, t, d], 5, 40.0);
        let k = randn(&[1, 1, t, d], 6, 40.0);
        let v = randn(&[1, 1, t, d], 7, 1.0);
        let mask = Arc::new(KeyMask::new(&keys, 0).expect("mask"));
        let got = attention(&q, &k, &v, &mask).expect("op").expect("served");
        let want = reference(&q, &k, &v, &keys, 0);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "max diff {diff}");
        // Queries 0..=20 see key 0 alone: their output is v's row 0 exactly.
        let v0 = v
            .get(0)
            .and_then(|x| x.get(0))
            .and_then(|x| x.get(0))
            .expect("v0");
        let y5 = got.get(0).and_then(|x| x.get(5)).expect("y5");
        assert_eq!(max_abs_diff(&v0, &y5), 0.0);
    }

    /// Declined: a head dim that is not a multiple of 8 (the caller takes the general path).
    #[test]
    fn attention_declines_odd_head_dims() {
        let keys = vec![vec![true; 6]];
        let mask = Arc::new(KeyMask::new(&keys, 0).expect("mask"));
        let q = randn(&[1, 1, 6, 12], 1, 1.0);
        let k = randn(&[1, 1, 6, 12], 2, 1.0);
        assert!(attention(&q, &k, &k, &mask).expect("op").is_none());
    }

    #[test]
    fn key_masks_must_be_rectangular() {
        assert!(KeyMask::new(&[vec![true; 3], vec![true; 2]], 0).is_err());
        assert!(KeyMask::new(&[vec![true; 3]], 4).is_err());
    }
}
