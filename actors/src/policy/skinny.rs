//! CPU kernels for products with a handful of rows: the decode step of generation, where each
//! sequence brings one new token.
//!
//! gemm (behind candle's matmul) packs its whole right-hand operand on every call. With 1-16
//! rows that packing costs about as much as the product: in `klongd bench model`'s batch-8
//! decode a fifth of the time was gemm packing the weights, and another ~15% was waking the
//! thread pool for products of a few microseconds. These kernels run on the weight in panels
//! of 16 output columns ([`Panels`]: packed once by the decode engine, or panel by panel on the
//! way by [`linear`]), stay on the calling thread below [`PAR_MIN_FMAS`], and above it split
//! over the output columns.
//!
//! Determinism: every output element is one serial chain of multiply-adds in input order,
//! computed by one thread, so results do not depend on the thread count, the row count, how
//! the columns are split, or the CPU's vector width. They differ from gemm's in the last bits
//! (another summation order), as gemm's own kernels differ from each other.
//!
//! Served: f32 on x86_64 CPUs with AVX2 and FMA (checked at run time, once). Anything else
//! returns `None` and the caller takes the general path.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused;

/// The most rows (tokens in a batch, or query rows per kv head) a product may have to take
/// these kernels. Past this, gemm's packing is amortized and its blocking wins.
pub(crate) const MAX_ROWS: usize = 16;

/// Below this many multiply-adds a product runs on the calling thread alone. In `klongd bench
/// model` (model R, 2 threads, generation on the compute pool) 2^14-2^15 was best; started from
/// outside the pool, splitting even products of 2^17-2^18 made batch-1 decode 2.3x slower than
/// one thread (see `on_compute_pool`).
const PAR_MIN_FMAS: usize = 1 << 15;

/// Whether the CPU has the instructions the kernels are compiled for.
pub(crate) fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether these kernels serve `t`'s device and dtype (the row bound is the caller's).
fn serves(t: &Tensor) -> bool {
    fused::supported(t, fused::Kind::Skinny) && t.dtype() == DType::F32 && simd()
}

/// Dot products of each of `R` rows of `x` with each of `C` rows of `w` (all of one length):
/// `R·C` independent 8-lane accumulators, so the multiply-adds do not wait on each other.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tile<const R: usize, const C: usize>(x: [&[f32]; R], w: [&[f32]; C]) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    const LANES: usize = 8;
    let k = x.first().map_or(0, |r| r.len());
    assert!(x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
    let whole = k - k % LANES;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut i = 0;
    while i < whole {
        let mut xv = [_mm256_setzero_ps(); R];
        for (v, xr) in xv.iter_mut().zip(&x) {
            // SAFETY: i + 8 <= whole <= k = xr.len(): the 8 floats read are in the row.
            *v = unsafe { _mm256_loadu_ps(xr.as_ptr().add(i)) };
        }
        for (c, wc) in w.iter().enumerate() {
            // SAFETY: as above; every row of w has length k too.
            let wv = unsafe { _mm256_loadu_ps(wc.as_ptr().add(i)) };
            for r in 0..R {
                acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
        i += LANES;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            // Lanes i and i+4, then pairs, then the last two: a fixed order.
            let a = acc[r][c];
            let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
            let mut s = _mm_cvtss_f32(s1);
            for j in whole..k {
                s = x[r][j].mul_add(w[c][j], s);
            }
            out[r][c] = s;
        }
    }
    out
}

/// The portable form of the x86 `tile`, so that the module builds everywhere; `simd()` keeps
/// other targets on the general path.
#[cfg(not(target_arch = "x86_64"))]
fn tile<const R: usize, const C: usize>(x: [&[f32]; R], w: [&[f32]; C]) -> [[f32; C]; R] {
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = x[r].iter().zip(w[c]).map(|(a, b)| a * b).sum();
        }
    }
    out
}

// ---------------------------------------------------------------- x · wᵀ

/// Where a block of `x · wᵀ` goes: output (row r, column c) of the block at `index(m, r, c)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// `[columns, m]`: one row of `m` per output column.
    Transposed,
    /// `[m, ld]` row-major, the block's columns from index 0 of each row.
    Rows { ld: usize },
}

impl Dest {
    #[inline(always)]
    fn index(self, m: usize, r: usize, c: usize) -> usize {
        match self {
            Dest::Transposed => c * m + r,
            Dest::Rows { ld } => r * ld + c,
        }
    }
}

/// Output columns per panel of a packed weight: one 16-lane register, or two 8-lane ones.
pub(crate) const PANEL: usize = 16;

/// How far ahead (in floats) a panel's stream asks for its weights: one 4 KiB page, since the
/// hardware's prefetcher stops at each page. In a two-thread harness of model R's decode
/// products at batch 8, 1-4 KiB ahead were alike; without it, 30-40% slower.
const PANEL_PREFETCH: usize = 1024;

/// A weight `[n, k]` (a `Linear`'s, as stored) repacked for products with few rows: panels of
/// [`PANEL`] output columns, each `[k, PANEL]` (for every input index, the panel's columns side
/// by side), the last panel padded with zero columns.
///
/// Why: in the stored layout each output is a dot product of two rows, summed in 16 lanes and
/// folded across them at the end; a panel makes each output a lane of its own, so a tile
/// multiplies one weight vector by up to 8 broadcast inputs with no fold, and its stream
/// of weights is one contiguous run. In model R's batch-8 decode the products took ~30% fewer
/// cycles (two-thread harness of a step's products, weights in L3 as in a step).
#[derive(Debug, Clone)]
pub(crate) struct Panels {
    /// The buffer that holds these panels (and, from [`Panels::pack_all`], other weights').
    buf: Arc<Vec<f32>>,
    /// Where these panels start in `buf`.
    at: usize,
    n: usize,
    k: usize,
}

impl Panels {
    /// Each `(w, n, k)` (`[n, k]`, row-major) in panels, all one after another in one buffer,
    /// packed on the compute pool into memory that asks for 2 MiB pages before its first
    /// write: a decode step reads all of it, and a buffer per weight would mostly be too small
    /// to hold a whole huge page (see `pages`).
    pub(crate) fn pack_all(ws: &[(&[f32], usize, usize)]) -> Vec<Panels> {
        // In rows of PANEL numbers: weight j's panel rows are `starts[j] .. starts[j + 1]`.
        let mut starts = Vec::with_capacity(ws.len() + 1);
        let mut total = 0;
        for (w, n, k) in ws {
            assert_eq!(
                w.len(),
                n * k,
                "panels: a [{n}, {k}] weight of {} numbers",
                w.len()
            );
            starts.push(total);
            total += n.div_ceil(PANEL) * k;
        }
        starts.push(total);
        let mut v = Vec::with_capacity(total * PANEL);
        super::pages::ask_before_first_write(v.spare_capacity_mut());
        let (buf, _) = fused::written_in(v, total * PANEL, PANEL, |first, fill| {
            let mut j = 0;
            for r in first..first + fill.len() / PANEL {
                // Weights of no rows (k or n zero) are passed over.
                while starts[j + 1] <= r {
                    j += 1;
                }
                let (w, n, k) = ws[j];
                let (p, i) = ((r - starts[j]) / k, (r - starts[j]) % k);
                fill.extend(&panel_row(w, (n, k), p, i));
            }
        });
        let buf = Arc::new(buf);
        ws.iter()
            .zip(&starts)
            .map(|((_, n, k), at)| Panels {
                buf: Arc::clone(&buf),
                at: at * PANEL,
                n: *n,
                k: *k,
            })
            .collect()
    }

    /// The panels, one after another.
    fn data(&self) -> &[f32] {
        &self.buf[self.at..self.at + self.n.div_ceil(PANEL) * self.k * PANEL]
    }
}

/// Row `i` of panel `p` of `w` (`[n, k]`): the weights of input `i` for the panel's [`PANEL`]
/// columns, zero past `n`.
fn panel_row(w: &[f32], (n, k): (usize, usize), p: usize, i: usize) -> [f32; PANEL] {
    let c0 = p * PANEL;
    let mut row = [0f32; PANEL];
    for (j, v) in row.iter_mut().enumerate().take(n.saturating_sub(c0)) {
        *v = w[(c0 + j) * k + i];
    }
    row
}

/// Which instructions the panel tiles run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Plain,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if simd() && super::flash::avx512() {
                return Isa::Avx512;
            }
            if simd() {
                return Isa::Avx2;
            }
        }
        Isa::Plain
    }
}

/// A tile's outputs: per row, per panel, its [`PANEL`] columns.
type TileOut<const R: usize, const P: usize> = [[[f32; PANEL]; P]; R];

/// `R` rows of x (each `k` long) against `P` panels (each `k · PANEL`): every output is the
/// chain `s = x[i]·w[i] + s` over i = 0, 1, .., k-1 from s = 0, one fused multiply-add per
/// step. Every version below computes exactly that chain per output, so they give the same
/// bits, whatever the tile's shape or the CPU.
fn panel_tile<const R: usize, const P: usize>(
    isa: Isa,
    x: [&[f32]; R],
    w: [&[f32]; P],
    k: usize,
) -> TileOut<R, P> {
    assert!(x.iter().all(|r| r.len() == k) && w.iter().all(|p| p.len() == k * PANEL));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose Avx512 only where AVX-512F, AVX2 and FMA were found.
        Isa::Avx512 => unsafe { panel_tile16::<R, P>(x, w, k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose Avx2 only where AVX2 and FMA were found.
        Isa::Avx2 => unsafe { panel_tile8::<R, P>(x, w, k) },
        _ => {
            let mut out = [[[0f32; PANEL]; P]; R];
            for (r, xr) in x.iter().enumerate() {
                for (j, wp) in w.iter().enumerate() {
                    for (l, o) in out[r][j].iter_mut().enumerate() {
                        let mut s = 0f32;
                        for (i, xv) in xr.iter().enumerate() {
                            s = xv.mul_add(wp[i * PANEL + l], s);
                        }
                        *o = s;
                    }
                }
            }
            out
        }
    }
}

/// [`panel_tile`] in 16-lane registers: one weight load per panel and input index, one
/// broadcast per row, `R · P` multiply-adds.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn panel_tile16<const R: usize, const P: usize>(
    x: [&[f32]; R],
    w: [&[f32]; P],
    k: usize,
) -> TileOut<R, P> {
    use std::arch::x86_64::*;
    let xp = x.map(<[f32]>::as_ptr);
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for i in 0..k {
        let mut wv = [_mm512_setzero_ps(); P];
        for (v, wp) in wv.iter_mut().zip(&w) {
            // SAFETY: i < k and every panel holds k · PANEL floats: the 16 read are inside.
            *v = unsafe { _mm512_loadu_ps(wp.as_ptr().add(i * PANEL)) };
            // A prefetch never faults: past the panel it asks for the next one's lines (or a
            // stray line past the last).
            let ahead = wp.as_ptr().wrapping_add(i * PANEL + PANEL_PREFETCH);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
        }
        for r in 0..R {
            // SAFETY: i < k and every row of x holds k floats (`panel_tile` asserts it); no
            // bounds check per input keeps the row pointers in registers.
            let xv = _mm512_set1_ps(unsafe { *xp[r].add(i) });
            for j in 0..P {
                acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
            }
        }
    }
    let mut out = [[[0f32; PANEL]; P]; R];
    for r in 0..R {
        for j in 0..P {
            // SAFETY: out[r][j] holds 16 floats.
            unsafe { _mm512_storeu_ps(out[r][j].as_mut_ptr(), acc[r][j]) };
        }
    }
    out
}

/// [`panel_tile`] in 8-lane registers: each panel as two halves.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn panel_tile8<const R: usize, const P: usize>(
    x: [&[f32]; R],
    w: [&[f32]; P],
    k: usize,
) -> TileOut<R, P> {
    use std::arch::x86_64::*;
    let xp = x.map(<[f32]>::as_ptr);
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    for i in 0..k {
        let mut wv = [[_mm256_setzero_ps(); 2]; P];
        for (v, wp) in wv.iter_mut().zip(&w) {
            // SAFETY: i < k and every panel holds k · PANEL floats: the 16 read are inside.
            unsafe {
                v[0] = _mm256_loadu_ps(wp.as_ptr().add(i * PANEL));
                v[1] = _mm256_loadu_ps(wp.as_ptr().add(i * PANEL + 8));
            }
            let ahead = wp.as_ptr().wrapping_add(i * PANEL + PANEL_PREFETCH);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
        }
        for r in 0..R {
            // SAFETY: i < k and every row of x holds k floats (`panel_tile` asserts it).
            let xv = _mm256_set1_ps(unsafe { *xp[r].add(i) });
            for j in 0..P {
                for h in 0..2 {
                    acc[r][j][h] = _mm256_fmadd_ps(xv, wv[j][h], acc[r][j][h]);
                }
            }
        }
    }
    let mut out = [[[0f32; PANEL]; P]; R];
    for r in 0..R {
        for j in 0..P {
            // SAFETY: out[r][j] holds 16 floats: two stores of 8.
            unsafe {
                _mm256_storeu_ps(out[r][j].as_mut_ptr(), acc[r][j][0]);
                _mm256_storeu_ps(out[r][j].as_mut_ptr().add(8), acc[r][j][1]);
            }
        }
    }
    out
}

/// Where one panel tile's outputs go: the block's columns `n0 .. n0 + cols` of rows `r0 ..`,
/// as `dest` says (column indices relative to `n0`).
struct Block<'a> {
    out: &'a mut [f32],
    dest: Dest,
    m: usize,
    n0: usize,
    cols: usize,
}

impl Block<'_> {
    fn store<const R: usize, const P: usize>(&mut self, r0: usize, p: usize, t: TileOut<R, P>) {
        for (rr, row) in t.iter().enumerate() {
            for (j, lanes) in row.iter().enumerate() {
                let c0 = (p + j) * PANEL;
                let lo = c0.max(self.n0);
                let hi = (c0 + PANEL).min(self.n0 + self.cols);
                if lo >= hi {
                    continue;
                }
                let r = r0 + rr;
                match self.dest {
                    Dest::Rows { ld } => {
                        let at = r * ld + lo - self.n0;
                        self.out[at..at + hi - lo].copy_from_slice(&lanes[lo - c0..hi - c0]);
                    }
                    Dest::Transposed => {
                        for c in lo..hi {
                            self.out[Dest::Transposed.index(self.m, r, c - self.n0)] =
                                lanes[c - c0];
                        }
                    }
                }
            }
        }
    }
}

/// Rows `r0 .. r0 + R` of `x` against `P` panels from `p` on (`panel(p)` gives a panel).
fn tile_rows<'w, const R: usize, const P: usize>(
    isa: Isa,
    (x, k, r0): (&[f32], usize, usize),
    panel: &impl Fn(usize) -> &'w [f32],
    p: usize,
    block: &mut Block,
) {
    let rows: [&[f32]; R] = std::array::from_fn(|i| &x[(r0 + i) * k..(r0 + i + 1) * k]);
    let w: [&[f32]; P] = std::array::from_fn(|j| panel(p + j));
    block.store(r0, p, panel_tile::<R, P>(isa, rows, w, k));
}

/// Panels `panels` of a product into `block`: rows in groups of up to 8 against each panel
/// (the later groups find it in cache); with one or two rows, four or two panels side by
/// side, so that more chains run at once (each waits on its previous multiply-add).
///
/// With three rows or more, two panels side by side too: 8 rows against one panel load the
/// panel's 16 weights and broadcast 8 inputs for 8 multiply-adds, more loads than the CPU
/// issues per multiply-add; against two panels the same 8 inputs serve 16. Batch-8 decode of
/// model R: 1.03-1.41x (median 1.18) the tokens/s of one panel, 6 alternating runs (session
/// 33). Eight panels side by side for one row did not help (its products wait on memory).
fn run_panels<'w>(
    isa: Isa,
    (x, k): (&[f32], usize),
    panel: impl Fn(usize) -> &'w [f32],
    panels: std::ops::Range<usize>,
    block: &mut Block,
) {
    let m = block.m;
    let side = match m {
        1 => 4,
        2 => 2,
        _ => 1,
    };
    let mut p = panels.start;
    while p < panels.end {
        if side > 1 && p + side <= panels.end {
            match m {
                1 => tile_rows::<1, 4>(isa, (x, k, 0), &panel, p, block),
                _ => tile_rows::<2, 2>(isa, (x, k, 0), &panel, p, block),
            }
            p += side;
            continue;
        }
        if m >= 3 && p + 2 <= panels.end {
            every_row::<2>(isa, (x, k), &panel, p, block);
            p += 2;
            continue;
        }
        every_row::<1>(isa, (x, k), &panel, p, block);
        p += 1;
    }
}

/// Every row of x, in groups of up to 8, against the `P` panels from `p` on.
fn every_row<'w, const P: usize>(
    isa: Isa,
    (x, k): (&[f32], usize),
    panel: &impl Fn(usize) -> &'w [f32],
    p: usize,
    block: &mut Block,
) {
    let mut r0 = 0;
    while r0 < block.m {
        let take = (block.m - r0).min(8);
        let at = (x, k, r0);
        match take {
            1 => tile_rows::<1, P>(isa, at, panel, p, block),
            2 => tile_rows::<2, P>(isa, at, panel, p, block),
            3 => tile_rows::<3, P>(isa, at, panel, p, block),
            4 => tile_rows::<4, P>(isa, at, panel, p, block),
            5 => tile_rows::<5, P>(isa, at, panel, p, block),
            6 => tile_rows::<6, P>(isa, at, panel, p, block),
            7 => tile_rows::<7, P>(isa, at, panel, p, block),
            _ => tile_rows::<8, P>(isa, at, panel, p, block),
        }
        r0 += take;
    }
}

/// Columns `n0 .. n0 + cols` of `x · wᵀ` (x `[m, k]`, w packed) into `out` as `dest` says.
/// Each output is the chain of [`panel_tile`], so the results do not depend on how the columns
/// or rows are split, on the row count, or on the CPU's vector width.
pub(crate) fn panel_columns_into(
    x: &[f32],
    w: &Panels,
    (m, n0, cols): (usize, usize, usize),
    out: &mut [f32],
    dest: Dest,
) {
    panel_columns_on(Isa::detect(), x, w, (m, n0, cols), out, dest)
}

/// [`panel_columns_into`] on the given instructions (tests compare them).
fn panel_columns_on(
    isa: Isa,
    x: &[f32],
    w: &Panels,
    (m, n0, cols): (usize, usize, usize),
    out: &mut [f32],
    dest: Dest,
) {
    let k = w.k;
    assert!(
        n0 + cols <= w.n && x.len() >= m * k,
        "panels: columns or rows out of range"
    );
    if cols == 0 || m == 0 {
        return;
    }
    let size = k * PANEL;
    let data = w.data();
    let panel = |p: usize| &data[p * size..(p + 1) * size];
    let mut block = Block {
        out,
        dest,
        m,
        n0,
        cols,
    };
    let panels = n0 / PANEL..(n0 + cols).div_ceil(PANEL);
    run_panels(isa, (x, k), panel, panels, &mut block);
}

/// Columns `n0 .. n0 + cols` of `x · wᵀ` (x `[m, k]`, w `[n, k]` as stored) into `out` as
/// `dest` says: the same chains, and so the same bits, as [`panel_columns_into`] on
/// `Panels::pack_all`'s panels of w; each group of panels is packed on the way, into a scratch of four.
pub(crate) fn columns_into(
    x: &[f32],
    w: &[f32],
    (m, k, n0, cols): (usize, usize, usize, usize),
    out: &mut [f32],
    dest: Dest,
) {
    if cols == 0 || m == 0 {
        return;
    }
    let n = w.len() / k.max(1);
    assert!(
        n0 + cols <= n && x.len() >= m * k,
        "skinny: columns or rows out of range"
    );
    let isa = Isa::detect();
    let size = k * PANEL;
    let mut scratch = vec![0f32; 4 * size];
    let mut block = Block {
        out,
        dest,
        m,
        n0,
        cols,
    };
    let (first, end) = (n0 / PANEL, (n0 + cols).div_ceil(PANEL));
    let mut p = first;
    while p < end {
        let group = (end - p).min(4);
        for (j, chunk) in scratch.chunks_exact_mut(size).take(group).enumerate() {
            for (i, dst) in chunk.chunks_exact_mut(PANEL).enumerate() {
                dst.copy_from_slice(&panel_row(w, (n, k), p + j, i));
            }
        }
        let scratch = &scratch;
        let panel = |q: usize| &scratch[(q - p) * size..(q - p + 1) * size];
        run_panels(isa, (x, k), panel, p..p + group, &mut block);
        p += group;
    }
}

/// Columns `n0 ..` of `x · wᵀ`, written transposed: `out_t` holds `out_t.len() / m` rows of
/// `m` (one per output column). x: `[m, k]`, w: `[n, k]`.
fn columns(x: &[f32], w: &[f32], m: usize, k: usize, n0: usize, out_t: &mut [f32]) {
    let cols = out_t.len() / m.max(1);
    columns_into(x, w, (m, k, n0, cols), out_t, Dest::Transposed);
}

/// `x · wᵀ` for x `[m, k]`, w `[n, k]`, both contiguous; returns `[m, n]`.
fn linear_f32(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let run = |n0: usize, chunk: &mut [f32]| columns(x, w, m, k, n0, chunk);
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    if threads == 1 || m * n * k < PAR_MIN_FMAS {
        run(0, &mut out_t);
    } else {
        // Column blocks of whole panels, one per thread.
        let per = n.div_ceil(threads).div_ceil(PANEL) * PANEL;
        out_t
            .par_chunks_mut(per * m)
            .enumerate()
            .for_each(|(i, c)| run(i * per, c));
    }
    let mut out = vec![0f32; m * n];
    for (col, o) in out_t.chunks_exact(m).enumerate() {
        for (r, v) in o.iter().enumerate() {
            out[r * n + col] = *v;
        }
    }
    out
}

/// `x · wᵀ` with x `[M, K]`, w `[N, K]` (a `Linear`'s weight as stored); backward through
/// candle's matmul.
struct SkinnyLinear;

impl CustomOp2 for SkinnyLinear {
    fn name(&self) -> &'static str {
        "klong-skinny-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, kw) = lw.shape().dims2()?;
        if k != kw {
            candle_core::bail!("skinny linear: x [{m}, {k}] against w [{n}, {kw}]");
        }
        let (x, w) = (fused::slice::<f32>(x, lx)?, fused::slice::<f32>(w, lw)?);
        Ok((
            CpuStorage::F32(linear_f32(x, w, m, k, n)),
            Shape::from((m, n)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.matmul(w)?), Some(g.t()?.matmul(x)?)))
    }
}

/// `x · wᵀ` for x `[M, K]` with `M <= MAX_ROWS` and w `[N, K]`, or `None` when these kernels
/// do not serve it (the caller then takes candle's matmul).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((m, _)), Ok(_)) = (x.dims2(), w.dims2()) else {
        return Ok(None);
    };
    if m == 0 || m > MAX_ROWS || !serves(x) || !serves(w) {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?.apply_op2(&w.contiguous()?, SkinnyLinear)?,
    ))
}

// ---------------------------------------------------------------- attention

/// A CPU f32 tensor's data, strides and start offset.
fn strided(
    t: &Tensor,
    f: impl FnOnce(&[f32], &[usize], usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::F32(all)) => f(all, l.stride(), l.start_offset()),
        _ => candle_core::bail!("skinny attention: CPU f32 tensors only"),
    }
}

/// Which keys count in a query row's softmax: those its additive mask leaves visible, or every
/// key when it hides them all (a pad row: its output is meaningless, but finite).
#[derive(Clone, Copy)]
struct Live<'a> {
    mask: &'a [f32],
    /// Every key counts: none is masked, or all are.
    all: bool,
}

impl Live<'_> {
    fn of(mask: &[f32]) -> Live<'_> {
        let half_masked = super::model::MASKED / 2.0;
        let visible = mask.iter().filter(|m| **m > half_masked).count();
        Live {
            mask,
            all: visible == 0 || visible == mask.len(),
        }
    }

    fn get(&self, j: usize) -> bool {
        self.all || self.mask[j] > super::model::MASKED / 2.0
    }
}

/// The softmax of one query row's scores, in place: `exp(score - max) · (1 / sum)` for the
/// keys `live` allows, exactly 0 for the others. The sum is sixteen running sums (key j into
/// sum j % 16 over the whole groups of sixteen), folded by [`fold16`], then the rest in key
/// order: sixteen short chains of adds instead of one as long as the context. Both versions
/// below do exactly these operations, so they give the same bits.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn softmax(scores: &mut [f32], live: Live) {
    #[cfg(target_arch = "x86_64")]
    {
        if live.all && super::flash::avx512() {
            // SAFETY: `avx512()` found AVX-512F on this CPU; AVX2 and FMA are this function's
            // own target features, so its callers found them.
            unsafe { softmax16(scores) };
            return;
        }
    }
    softmax_lanes(scores, live)
}

/// The sixteen running sums of a softmax folded to one: lanes i and i + 8 first, then as
/// `tile` folds eight.
fn fold16(s: [f32; 16]) -> f32 {
    let [a, b, c, d, e, f, g, h] = std::array::from_fn(|i| s[i] + s[i + 8]);
    ((a + e) + (c + g)) + ((b + f) + (d + h))
}

/// [`softmax`] in plain loops (vectorized by the compiler).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn softmax_lanes(scores: &mut [f32], live: Live) {
    // The max over every key: a masked key's score carries MASKED (-1e9), so it never holds
    // the maximum while some key is live, and when none is, every key counts. Eight running
    // maxima, so that the loop compiles to vector max instructions (a max is exact: any order
    // gives the same one).
    let mut lanes = [f32::MIN; 8];
    let whole8 = scores.len() - scores.len() % 8;
    for c in scores[..whole8].chunks_exact(8) {
        for (m, s) in lanes.iter_mut().zip(c) {
            if *s > *m {
                *m = *s;
            }
        }
    }
    let mx = lanes
        .iter()
        .chain(&scores[whole8..])
        .fold(f32::MIN, |m, s| if *s > m { *s } else { m });
    for sc in scores.iter_mut() {
        *sc -= mx;
    }
    super::vexp::exp_in_place(scores);
    if !live.all {
        for (j, sc) in scores.iter_mut().enumerate() {
            if !live.get(j) {
                *sc = 0.0;
            }
        }
    }
    let whole = scores.len() - scores.len() % 16;
    let mut sums = [0f32; 16];
    for chunk in scores[..whole].chunks_exact(16) {
        for (s, sc) in sums.iter_mut().zip(chunk) {
            *s += *sc;
        }
    }
    let mut sum = fold16(sums);
    for sc in &scores[whole..] {
        sum += *sc;
    }
    let inv = 1.0 / sum;
    for sc in scores.iter_mut() {
        *sc *= inv;
    }
}

/// [`softmax`] of a row whose every key counts, in 16-lane registers: `softmax_lanes`'
/// operations (the exponentials are `exp16`'s, which are `exp_in_place`'s bits, NaN kept).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax16(scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = scores.len();
    let whole = n - n % 16;
    let p = scores.as_mut_ptr();
    // SAFETY (every load and store below): chunk c < whole covers p[c .. c + 16] within the
    // row; the tail's masked ones touch only lanes below n - whole.
    let ld = |c: usize| unsafe { _mm512_loadu_ps(p.add(c)) };
    let tail = ((1u32 << (n - whole)) - 1) as u16;
    let mut mv = _mm512_set1_ps(f32::MIN);
    for c in (0..whole).step_by(16) {
        mv = _mm512_max_ps(mv, ld(c));
    }
    let mut mx = _mm512_reduce_max_ps(mv);
    for j in whole..n {
        // SAFETY: j < n.
        let sc = unsafe { *p.add(j) };
        if sc > mx {
            mx = sc;
        }
    }
    let mxv = _mm512_set1_ps(mx);
    let exp = |x: __m512| {
        let x = _mm512_sub_ps(x, mxv);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_blend_ps(nan, super::vexp::exp16(x), x)
    };
    let mut acc = _mm512_setzero_ps();
    for c in (0..whole).step_by(16) {
        let e = exp(ld(c));
        acc = _mm512_add_ps(acc, e);
        unsafe { _mm512_storeu_ps(p.add(c), e) };
    }
    if tail != 0 {
        let e = exp(unsafe { _mm512_maskz_loadu_ps(tail, p.add(whole)) });
        unsafe { _mm512_mask_storeu_ps(p.add(whole), tail, e) };
    }
    let mut sums = [0f32; 16];
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), acc) };
    let mut sum = fold16(sums);
    for j in whole..n {
        // SAFETY: j < n.
        sum += unsafe { *p.add(j) };
    }
    let inv = _mm512_set1_ps(1.0 / sum);
    for c in (0..whole).step_by(16) {
        unsafe { _mm512_storeu_ps(p.add(c), _mm512_mul_ps(ld(c), inv)) };
    }
    if tail != 0 {
        let x = unsafe { _mm512_maskz_loadu_ps(tail, p.add(whole)) };
        unsafe { _mm512_mask_storeu_ps(p.add(whole), tail, _mm512_mul_ps(x, inv)) };
    }
}

/// softmax(scores)·v for one query row whose scores (mask added) are in `scores`, over the
/// keys `live` allows. Keys whose weight is exactly 0 (the others, and weights that underflow)
/// are skipped.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn weigh_values<'a>(
    scores: &mut [f32],
    live: Live,
    value: impl Fn(usize) -> &'a [f32],
    y: &mut [f32],
) {
    softmax(scores, live);
    // y[e] = Σ_j p_j·v_j[e] as two sums, over the even keys and over the odd ones, each one
    // multiply-add per key in key order, added at the end: two chains of multiply-adds per
    // element instead of one as long as the context. On x86_64 in blocks of 32 numbers kept
    // in eight registers over all the keys; the plain loop below does the same per element
    // for the rest.
    let d = y.len();
    let mut e0 = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        while e0 + 32 <= d {
            // Key j's multiply-adds into `acc` (skipped when its weight is exactly 0).
            let add = |acc: &mut [__m256; 4], j: usize| {
                let p = scores[j];
                if p == 0.0 {
                    return;
                }
                let pv = _mm256_set1_ps(p);
                let v = &value(j)[e0..e0 + 32];
                for (h, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `v` holds 32 floats; 8·h + 8 <= 32.
                    let vv = unsafe { _mm256_loadu_ps(v.as_ptr().add(8 * h)) };
                    *a = _mm256_fmadd_ps(pv, vv, *a);
                }
            };
            // Two named sets (not an array indexed by j % 2), so that both stay in registers.
            let (mut even, mut odd) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            let mut j = 0;
            while j + 1 < scores.len() {
                add(&mut even, j);
                add(&mut odd, j + 1);
                j += 2;
            }
            if j < scores.len() {
                add(&mut even, j);
            }
            for h in 0..4 {
                let sum = _mm256_add_ps(even[h], odd[h]);
                // SAFETY: e0 + 32 <= d = y.len().
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(e0 + 8 * h), sum) };
            }
            e0 += 32;
        }
    }
    let y = &mut y[e0..];
    let mut odd = vec![0f32; y.len()];
    y.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        if *p == 0.0 {
            continue;
        }
        let acc = if j % 2 == 0 { &mut *y } else { &mut odd[..] };
        for (yv, vv) in acc.iter_mut().zip(&value(j)[e0..]) {
            *yv = p.mul_add(*vv, *yv);
        }
    }
    for (yv, o) in y.iter_mut().zip(&odd) {
        *yv += o;
    }
}

/// One (batch entry, kv head) pair: its query rows (`out.len() / d` of them) against `s` keys
/// and values, two rows at a time (GQA's query heads of one kv head read the same keys).
/// `scores` is working space (the caller's, so that a decode step allocates nothing).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
pub(crate) fn attend_pair(
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    mask: &[f32],
    (k_off, v_off, k_row, v_row): (usize, usize, usize, usize),
    (t, s, d): (usize, usize, usize),
    scores: &mut [Vec<f32>; 2],
    out: &mut [f32],
) {
    let key = |j: usize| &k[k_off + j * k_row..k_off + j * k_row + d];
    let value = |j: usize| &v[v_off + j * v_row..v_off + j * v_row + d];
    let rows = out.len() / d;
    for sc in scores.iter_mut() {
        sc.clear();
        sc.resize(s, 0.0);
    }
    let mut r = 0;
    while r < rows {
        let n = if r + 1 < rows { 2 } else { 1 };
        let qs = [&q[r * d..(r + 1) * d], &q[(r + n - 1) * d..(r + n) * d]];
        let ms = [(r % t) * s, ((r + n - 1) % t) * s].map(|o| &mask[o..o + s]);
        // Every key is scored (masked ones cost the same and are dropped below).
        let mut j = 0;
        while j < s {
            let wide = (s - j).min(4);
            if wide == 4 && n == 2 {
                let o = tile::<2, 4>(qs, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
                for (i, row) in o.iter().enumerate() {
                    for c in 0..4 {
                        scores[i][j + c] = row[c] + ms[i][j + c];
                    }
                }
            } else {
                for c in j..j + wide {
                    for i in 0..n {
                        scores[i][c] = tile::<1, 1>([qs[i]], [key(c)])[0][0] + ms[i][c];
                    }
                }
            }
            j += wide;
        }
        for i in 0..n {
            let y = &mut out[(r + i) * d..(r + i + 1) * d];
            weigh_values(&mut scores[i], Live::of(ms[i]), value, y);
        }
        r += n;
    }
}

/// Positions per block of a decode engine's keys (see [`attend_blocked`]).
pub(crate) const KEY_BLOCK: usize = 16;

/// How far ahead (in floats: one 4 KB page) the 16-lane attention kernels prefetch the keys
/// and values they read. The hardware's prefetcher stops at each page's end, and a pair's
/// cache comes from L3 at every step (the step's weights stream through L2 in between).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 1024;

/// The scores `q · k_s` of keys `0 .. out.len()` stored in transposed blocks (`kt`: per block
/// of [`KEY_BLOCK`] positions, `[d, KEY_BLOCK]`), so that one vector holds one dimension of a
/// block's keys and no score needs a horizontal sum. Each score is summed exactly as `tile`
/// sums a dot product (eight partial sums over d, each a chain of multiply-adds, combined in
/// `tile`'s order, then the tail), so the scores are the same bits as `attend_pair`'s.
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn scores_blocked_body(q: &[f32], kt: &[f32], out: &mut [f32]) {
    let d = q.len();
    let whole = d - d % 8;
    for (blk, o) in out.chunks_mut(KEY_BLOCK).enumerate() {
        let base = blk * KEY_BLOCK * d;
        let key = |dd: usize| &kt[base + dd * KEY_BLOCK..base + (dd + 1) * KEY_BLOCK];
        let mut acc = [[0f32; KEY_BLOCK]; 8];
        for c in 0..whole / 8 {
            for (j, a) in acc.iter_mut().enumerate() {
                let dd = 8 * c + j;
                let (qv, row) = (q[dd], key(dd));
                for (a, k) in a.iter_mut().zip(row) {
                    *a = qv.mul_add(*k, *a);
                }
            }
        }
        for (l, o) in o.iter_mut().enumerate() {
            let s4 = [
                acc[0][l] + acc[4][l],
                acc[1][l] + acc[5][l],
                acc[2][l] + acc[6][l],
                acc[3][l] + acc[7][l],
            ];
            let mut s = (s4[0] + s4[2]) + (s4[1] + s4[3]);
            for (dd, qv) in q.iter().enumerate().skip(whole) {
                s = qv.mul_add(key(dd)[l], s);
            }
            *o = s;
        }
    }
}

/// `scores_blocked_body` in AVX-512F registers: one register per block and dimension.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scores_blocked16(q: &[f32], kt: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    let whole = d - d % 8;
    for (blk, o) in out.chunks_mut(KEY_BLOCK).enumerate() {
        let block = &kt[blk * KEY_BLOCK * d..(blk + 1) * KEY_BLOCK * d];
        // SAFETY: `block` holds d rows of 16 floats; every load below reads row dd < d.
        let key = |dd: usize| unsafe { _mm512_loadu_ps(block.as_ptr().add(dd * KEY_BLOCK)) };
        let mut acc = [_mm512_setzero_ps(); 8];
        for c in 0..whole / 8 {
            for (j, a) in acc.iter_mut().enumerate() {
                let dd = 8 * c + j;
                *a = _mm512_fmadd_ps(_mm512_set1_ps(q[dd]), key(dd), *a);
            }
        }
        let s4 = [0, 1, 2, 3].map(|j| _mm512_add_ps(acc[j], acc[j + 4]));
        let mut s = _mm512_add_ps(_mm512_add_ps(s4[0], s4[2]), _mm512_add_ps(s4[1], s4[3]));
        for (dd, qv) in q.iter().enumerate().skip(whole) {
            s = _mm512_fmadd_ps(_mm512_set1_ps(*qv), key(dd), s);
        }
        let mut lanes = [0f32; KEY_BLOCK];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), s) };
        o.copy_from_slice(&lanes[..o.len()]);
    }
}

/// `scores_blocked_body` in AVX2 registers: two per block and dimension.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores_blocked8(q: &[f32], kt: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    let whole = d - d % 8;
    for (blk, o) in out.chunks_mut(KEY_BLOCK).enumerate() {
        let block = &kt[blk * KEY_BLOCK * d..(blk + 1) * KEY_BLOCK * d];
        // SAFETY: `block` holds d rows of 16 floats; every load reads 8 of row dd < d.
        let key = |dd: usize, h: usize| unsafe {
            _mm256_loadu_ps(block.as_ptr().add(dd * KEY_BLOCK + 8 * h))
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; 8];
        for c in 0..whole / 8 {
            for (j, a) in acc.iter_mut().enumerate() {
                let dd = 8 * c + j;
                let qv = _mm256_set1_ps(q[dd]);
                for (h, ah) in a.iter_mut().enumerate() {
                    *ah = _mm256_fmadd_ps(qv, key(dd, h), *ah);
                }
            }
        }
        let mut lanes = [0f32; KEY_BLOCK];
        for (h, half) in lanes.chunks_exact_mut(8).enumerate() {
            let s4 = [0, 1, 2, 3].map(|j| _mm256_add_ps(acc[j][h], acc[j + 4][h]));
            let mut s = _mm256_add_ps(_mm256_add_ps(s4[0], s4[2]), _mm256_add_ps(s4[1], s4[3]));
            for (dd, qv) in q.iter().enumerate().skip(whole) {
                s = _mm256_fmadd_ps(_mm256_set1_ps(*qv), key(dd, h), s);
            }
            // SAFETY: `half` holds 8 floats.
            unsafe { _mm256_storeu_ps(half.as_mut_ptr(), s) };
        }
        o.copy_from_slice(&lanes[..o.len()]);
    }
}

/// The portable form, so that the module builds everywhere (`simd()` keeps other targets off
/// the decode engine).
#[cfg(not(target_arch = "x86_64"))]
fn scores_blocked8(q: &[f32], kt: &[f32], out: &mut [f32]) {
    scores_blocked_body(q, kt, out)
}

/// `scores_blocked16` for two query rows at once: each block of keys is loaded once for both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scores_blocked16_pair(q: [&[f32]; 2], kt: &[f32], out: [&mut [f32]; 2]) {
    use std::arch::x86_64::*;
    let d = q[0].len();
    let whole = d - d % 8;
    let [o0, o1] = out;
    let blocks = o0.len().div_ceil(KEY_BLOCK);
    assert!(q[1].len() == d && o1.len() == o0.len() && kt.len() >= blocks * KEY_BLOCK * d);
    let (qa, qb) = (q[0].as_ptr(), q[1].as_ptr());
    for (blk, (b0, b1)) in o0
        .chunks_mut(KEY_BLOCK)
        .zip(o1.chunks_mut(KEY_BLOCK))
        .enumerate()
    {
        // SAFETY (`key`, `qa`/`qb` reads): block `blk` < `blocks` holds d rows of 16 floats
        // inside `kt` (asserted), every read is of a row or query index dd < d.
        let block = unsafe { kt.as_ptr().add(blk * KEY_BLOCK * d) };
        let key = |dd: usize| unsafe { _mm512_loadu_ps(block.add(dd * KEY_BLOCK)) };
        let (mut acc_a, mut acc_b) = ([_mm512_setzero_ps(); 8], [_mm512_setzero_ps(); 8]);
        for c in 0..whole / 8 {
            for (j, (a, b)) in acc_a.iter_mut().zip(acc_b.iter_mut()).enumerate() {
                let dd = 8 * c + j;
                let k = key(dd);
                // One line a page ahead per line read (a prefetch never faults: past the cache
                // it only fetches a stray line).
                let ahead = block.wrapping_add(dd * KEY_BLOCK + PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
                let (xa, xb) = unsafe { (*qa.add(dd), *qb.add(dd)) };
                *a = _mm512_fmadd_ps(_mm512_set1_ps(xa), k, *a);
                *b = _mm512_fmadd_ps(_mm512_set1_ps(xb), k, *b);
            }
        }
        let acc = [acc_a, acc_b];
        for (r, o) in [b0, b1].into_iter().enumerate() {
            let a = &acc[r];
            let s4 = [0, 1, 2, 3].map(|j| _mm512_add_ps(a[j], a[j + 4]));
            let mut s = _mm512_add_ps(_mm512_add_ps(s4[0], s4[2]), _mm512_add_ps(s4[1], s4[3]));
            for (dd, qv) in q[r].iter().enumerate().skip(whole) {
                s = _mm512_fmadd_ps(_mm512_set1_ps(*qv), key(dd), s);
            }
            if o.len() == KEY_BLOCK {
                // SAFETY: `o` holds 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), s) };
            } else {
                let mut lanes = [0f32; KEY_BLOCK];
                // SAFETY: `lanes` holds 16 floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), s) };
                o.copy_from_slice(&lanes[..o.len()]);
            }
        }
    }
}

/// `weigh_values`' weighted sum for two query rows at once (each value row is loaded once for
/// both), `p` their softmax weights; `d` a multiple of 16. Each output is summed as in
/// `weigh_values`: even and odd keys in two chains, in key order, skipping weights of exactly
/// 0, then added, so the results are the same bits. Up to 64 columns go per pass over the
/// values (16 chains in registers), so that at head dims up to 64 the values are read once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn weigh_values16_pair(p: [&[f32]; 2], v: &[f32], d: usize, y: [&mut [f32]; 2]) {
    let [y0, y1] = y;
    // Rows with no weight of 0 (the usual case) run without a test per key.
    let skips = p.iter().any(|row| row.contains(&0.0));
    let mut e0 = 0;
    while e0 < d {
        let (ya, yb) = (&mut y0[e0..], &mut y1[e0..]);
        let (at, y) = ((d, e0), [ya, yb]);
        // The same target features as this function's: safe calls.
        e0 += match ((d - e0) / 16, skips) {
            (1, false) => weigh_values16_cols::<1, false>(p, v, at, y),
            (2, false) => weigh_values16_cols::<2, false>(p, v, at, y),
            (3, false) => weigh_values16_cols::<3, false>(p, v, at, y),
            (_, false) => weigh_values16_cols::<4, false>(p, v, at, y),
            (1, true) => weigh_values16_cols::<1, true>(p, v, at, y),
            (2, true) => weigh_values16_cols::<2, true>(p, v, at, y),
            (3, true) => weigh_values16_cols::<3, true>(p, v, at, y),
            (_, true) => weigh_values16_cols::<4, true>(p, v, at, y),
        };
    }
}

/// Columns `e0 .. e0 + 16·C` of `weigh_values16_pair` in one pass over the keys; returns the
/// columns done. `SKIP`: test each weight for 0 (else the caller found none).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn weigh_values16_cols<const C: usize, const SKIP: bool>(
    p: [&[f32]; 2],
    v: &[f32],
    (d, e0): (usize, usize),
    y: [&mut [f32]; 2],
) -> usize {
    use std::arch::x86_64::*;
    let n = p[0].len();
    assert!(p[1].len() == n && e0 + 16 * C <= d && v.len() >= n * d);
    assert!(y.iter().all(|y| y.len() >= 16 * C));
    let (pa, pb) = (p[0].as_ptr(), p[1].as_ptr());
    // SAFETY (`load`, and the weights' reads in `add`): key j < n has the row
    // v[j·d .. (j+1)·d] and the weights p[0][j], p[1][j]; e0 + 16·C <= d (all asserted).
    let load = |j: usize, c: usize| unsafe { _mm512_loadu_ps(v.as_ptr().add(j * d + e0 + 16 * c)) };
    let add = |acc: &mut [[__m512; C]; 2], j: usize, vv: &[__m512; C]| {
        let pj = unsafe { [*pa.add(j), *pb.add(j)] };
        for (a, pj) in acc.iter_mut().zip(pj) {
            if SKIP && pj == 0.0 {
                continue;
            }
            let w = _mm512_set1_ps(pj);
            for (a, vv) in a.iter_mut().zip(vv) {
                *a = _mm512_fmadd_ps(w, *vv, *a);
            }
        }
    };
    // Two named sets (not an array indexed by j % 2), so that both stay in registers.
    let mut even = [[_mm512_setzero_ps(); C]; 2];
    let mut odd = [[_mm512_setzero_ps(); C]; 2];
    let mut j = 0;
    while j + 1 < n {
        let (va, vb) = (
            std::array::from_fn(|c| load(j, c)),
            std::array::from_fn(|c| load(j + 1, c)),
        );
        add(&mut even, j, &va);
        add(&mut odd, j + 1, &vb);
        // The lines of these two keys' columns a page ahead (as in `scores_blocked16_pair`).
        let ahead = v.as_ptr().wrapping_add(j * d + e0 + PREFETCH_AHEAD);
        for c in 0..C {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * c).cast::<i8>());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(d + 16 * c).cast::<i8>());
        }
        j += 2;
    }
    if j < n {
        add(&mut even, j, &std::array::from_fn(|c| load(j, c)));
    }
    for (r, y) in y.into_iter().enumerate() {
        for c in 0..C {
            // SAFETY: 16·C <= y.len() (asserted).
            unsafe {
                _mm512_storeu_ps(
                    y.as_mut_ptr().add(16 * c),
                    _mm512_add_ps(even[r][c], odd[r][c]),
                )
            };
        }
    }
    16 * C
}

/// `attend_pair` for the decode engine's cache: the query rows `q` (`out.len() / d` of them,
/// one new position each) against `keys` keys held transposed in blocks (`kt`, see
/// [`scores_blocked_body`]) and values `v` (`[keys, d]`), with the additive `mask` over the
/// keys. The same scores, softmax and weighted sum as `attend_pair`, so the same bits. On
/// AVX-512F CPUs, with `d` a multiple of 16, query rows go two at a time, reading the keys and
/// values once for both: at long contexts a decode step is the cache's memory.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
pub(crate) fn attend_blocked(
    q: &[f32],
    (kt, v): (&[f32], &[f32]),
    mask: &[f32],
    (keys, d): (usize, usize),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let mask = &mask[..keys];
    // Masked keys drop out unless every key is masked (then all count, as in `attend_pair`).
    let live = Live::of(mask);
    let rows = out.len() / d;
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if super::flash::avx512() && d % 16 == 0 {
            while r + 1 < rows {
                scores.clear();
                scores.resize(2 * keys, 0.0);
                let (s0, s1) = scores.split_at_mut(keys);
                let (qa, qb) = (&q[r * d..(r + 1) * d], &q[(r + 1) * d..(r + 2) * d]);
                // SAFETY: `avx512()` found AVX-512F on this CPU.
                unsafe { scores_blocked16_pair([qa, qb], kt, [&mut *s0, &mut *s1]) };
                for sc in [&mut *s0, &mut *s1] {
                    for (s, m) in sc.iter_mut().zip(mask) {
                        *s += m;
                    }
                }
                softmax(s0, live);
                softmax(s1, live);
                let (ya, yb) = out[r * d..(r + 2) * d].split_at_mut(d);
                // SAFETY: as above; d is a multiple of 16.
                unsafe { weigh_values16_pair([s0, s1], v, d, [ya, yb]) };
                r += 2;
            }
        }
    }
    for (qr, y) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).skip(r) {
        scores.clear();
        scores.resize(keys, 0.0);
        #[cfg(target_arch = "x86_64")]
        {
            if super::flash::avx512() {
                // SAFETY: `avx512()` found AVX-512F on this CPU (and AVX2 + FMA were needed to
                // get here).
                unsafe { scores_blocked16(qr, kt, scores) };
            } else {
                scores_blocked8(qr, kt, scores);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        scores_blocked8(qr, kt, scores);
        for (sc, m) in scores.iter_mut().zip(mask) {
            *sc += m;
        }
        weigh_values(scores, live, |j| &v[j * d..(j + 1) * d], y);
    }
}

/// softmax(q·kᵀ + mask)·v for inference: q `[B, G, R, D]` (pre-scaled; row r belongs to query
/// position `r % T`), k and v `[B, G, S, D]` (any strides with contiguous rows: the KV cache's
/// views of its buffers are read in place), mask `[B, 1, T, S]` additive. Returns `[B, G, R, D]`,
/// or `None` when these kernels do not serve it: more than [`MAX_ROWS`] query rows, or any
/// operand tracking gradients (this kernel has no backward).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Option<Tensor>> {
    let (Ok((b, g, r, d)), Ok((kb, kg, s, kd)), Ok((_, _, t, ms))) =
        (q.dims4(), k.dims4(), mask.dims4())
    else {
        return Ok(None);
    };
    let tracks = q.track_op() || k.track_op() || v.track_op();
    if r == 0 || r > MAX_ROWS || tracks || !serves(q) || !serves(k) || !serves(v) || !serves(mask) {
        return Ok(None);
    }
    if (kb, kg, kd) != (b, g, d) || v.dims() != k.dims() || ms != s || t == 0 || r % t != 0 {
        candle_core::bail!(
            "skinny attention: q {:?}, k {:?}, v {:?}, mask {:?} do not agree",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    if k.stride()[3] != 1 || v.stride()[3] != 1 {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let mask = mask.contiguous()?;
    let out = fused::with_data::<f32, _>(&q, |qd| {
        fused::with_data::<f32, _>(&mask, |md| {
            strided(k, |kdat, kst, koff| {
                strided(v, |vd, vst, voff| {
                    let mut out = vec![0f32; b * g * r * d];
                    let run = |pair: usize, o: &mut [f32]| {
                        let (bi, gi) = (pair / g, pair % g);
                        let qp = &qd[pair * r * d..(pair + 1) * r * d];
                        let mp = &md[bi * t * s..(bi + 1) * t * s];
                        let offsets = (
                            koff + bi * kst[0] + gi * kst[1],
                            voff + bi * vst[0] + gi * vst[1],
                            kst[2],
                            vst[2],
                        );
                        // SAFETY: `attend_pair` needs AVX2 and FMA on x86_64; `serves`
                        // (checked above) found both on this CPU.
                        #[allow(unused_unsafe)]
                        unsafe {
                            let mut scores = [Vec::new(), Vec::new()];
                            attend_pair(qp, (kdat, vd), mp, offsets, (t, s, d), &mut scores, o)
                        }
                    };
                    let threads = candle_core::utils::get_num_threads().clamp(1, b * g);
                    if threads == 1 || 2 * b * g * r * s * d < PAR_MIN_FMAS {
                        for (pair, o) in out.chunks_exact_mut(r * d).enumerate() {
                            run(pair, o);
                        }
                    } else {
                        out.par_chunks_exact_mut(r * d)
                            .enumerate()
                            .for_each(|(pair, o)| run(pair, o));
                    }
                    Ok(out)
                })
            })
        })
    })?;
    Ok(Some(Tensor::from_vec(out, (b, g, r, d), q.device())?))
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff as max_diff;
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG: the tests need varied values, not a distribution.
        let n: usize = shape.iter().product();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// Every tile shape and tail: rows 1..16, K not a multiple of 8, N not a multiple of 4,
    /// and products big enough to split over threads.
    #[test]
    fn linear_matches_matmul() {
        if !simd() {
            return; // nothing to compare: `linear` declines on this CPU
        }
        let mut seed = 1;
        for m in [1, 2, 3, 4, 5, 8, 16] {
            for (k, n) in [(8, 4), (7, 1), (67, 13), (256, 300), (64, 1031)] {
                seed += 1;
                let x = randn(&[m, k], seed);
                let w = randn(&[n, k], seed + 100);
                let got = linear(&x, &w).expect("linear").expect("served");
                let want = x.matmul(&w.t().expect("t")).expect("matmul");
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "m {m} k {k} n {n}: max diff {d}");
            }
        }
        // Past the row bound the caller takes gemm.
        let x = randn(&[MAX_ROWS + 1, 8], 9);
        assert!(linear(&x, &randn(&[4, 8], 10)).expect("linear").is_none());
    }

    /// The op's gradients are matmul's.
    #[test]
    fn linear_backward_matches_matmul() {
        if !simd() {
            return;
        }
        let x = Var::from_tensor(&randn(&[3, 19], 1)).expect("x");
        let w = Var::from_tensor(&randn(&[11, 19], 2)).expect("w");
        let g = randn(&[3, 11], 3);
        let grads = |y: Tensor| {
            let loss = (y * &g).and_then(|p| p.sum_all()).expect("loss");
            let gr = loss.backward().expect("backward");
            let gx = gr.get(x.as_tensor()).expect("dx").clone();
            let gw = gr.get(w.as_tensor()).expect("dw").clone();
            (gx, gw)
        };
        let (gx, gw) = grads(
            linear(x.as_tensor(), w.as_tensor())
                .expect("op")
                .expect("served"),
        );
        let (rx, rw) = grads(
            x.as_tensor()
                .matmul(&w.as_tensor().t().expect("t"))
                .expect("matmul"),
        );
        assert!(max_diff(&gx, &rx) < 1e-5);
        assert!(max_diff(&gw, &rw) < 1e-5);
    }

    /// The general path of the model's attention: q·kᵀ, masked softmax, ·v.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let att = q.matmul(&k.t().expect("t")).expect("qk");
        let att = fused::masked_softmax(&att, mask).expect("softmax");
        att.matmul(&v.contiguous().expect("v")).expect("av")
    }

    fn additive_mask(
        b: usize,
        t: usize,
        s: usize,
        visible: impl Fn(usize, usize, usize) -> bool,
    ) -> Tensor {
        let mut m = Vec::with_capacity(b * t * s);
        for bi in 0..b {
            for ti in 0..t {
                for j in 0..s {
                    m.push(if visible(bi, ti, j) {
                        0.0
                    } else {
                        super::super::model::MASKED
                    });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).expect("mask")
    }

    /// Decode steps (T = 1) and short chunks (T = 3) with GQA rows, left pads, a fully masked
    /// pad row, and keys read in place from a larger cache buffer (strided views).
    #[test]
    fn attention_matches_the_general_path() {
        if !simd() {
            return;
        }
        let (b, g, d) = (2, 2, 12);
        for (t, n_rep, s) in [(1, 2, 37), (1, 1, 5), (3, 2, 22), (1, 3, 4)] {
            let r = t * n_rep;
            let q = randn(&[b, g, r, d], 7 + s as u64);
            // Keys and values: the first s positions of a buffer of capacity s + 9.
            let kb = randn(&[b, g, s + 9, d], 8 + s as u64);
            let vb = randn(&[b, g, s + 9, d], 9 + s as u64);
            let (k, v) = (
                kb.narrow(2, 0, s).expect("k"),
                vb.narrow(2, 0, s).expect("v"),
            );
            assert!(!k.is_contiguous());
            // Row 0: causal over all keys; row 1: its first 3 keys are pads, and with t = 3
            // its first query position sees no key at all (a pad query).
            let mask = additive_mask(b, t, s, |bi, ti, j| {
                let qpos = s - t + ti;
                j <= qpos && (bi == 0 || (j >= 3 && !(t == 3 && ti == 0)))
            });
            let got = attention(&q, &k, &v, &mask).expect("op").expect("served");
            let want = reference(&q, &k, &v, &mask);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "t {t} n_rep {n_rep} s {s}: max diff {diff}");
        }
    }

    /// Declined: gradients to track (the kernel has no backward), or too many query rows.
    #[test]
    fn attention_declines_what_it_does_not_serve() {
        let (b, g, s, d) = (1, 1, 6, 8);
        let k = randn(&[b, g, s, d], 1);
        let v = randn(&[b, g, s, d], 2);
        let mask = additive_mask(b, 1, s, |_, _, _| true);
        let q = Var::from_tensor(&randn(&[b, g, 1, d], 3)).expect("q");
        assert!(attention(q.as_tensor(), &k, &v, &mask)
            .expect("op")
            .is_none());
        let rows = MAX_ROWS + 1;
        let q = randn(&[b, g, rows, d], 4);
        let mask = additive_mask(b, rows, s, |_, _, _| true);
        assert!(attention(&q, &k, &v, &mask).expect("op").is_none());
    }

    /// The blocked score kernels are `scores_blocked_body` to the bit (whose order is
    /// `tile`'s), over head sizes with and without a tail and key counts around a block.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_scores_are_the_reference_order_to_the_bit() {
        if !simd() {
            return;
        }
        for d in [4usize, 16, 32, 36] {
            for keys in [1usize, 15, 16, 17, 50] {
                let q = randn(&[d], 7).to_vec1::<f32>().expect("q");
                let blocks = keys.div_ceil(KEY_BLOCK);
                let kt = randn(&[blocks * KEY_BLOCK * d], 8)
                    .to_vec1::<f32>()
                    .expect("kt");
                let mut want = vec![0f32; keys];
                scores_blocked_body(&q, &kt, &mut want);
                // The reference is `tile`'s dot product of q with each key.
                for (s, w) in want.iter().enumerate() {
                    let key: Vec<f32> = (0..d)
                        .map(|dd| {
                            kt[(s / KEY_BLOCK) * KEY_BLOCK * d + dd * KEY_BLOCK + s % KEY_BLOCK]
                        })
                        .collect();
                    // SAFETY: `simd()` found AVX2 and FMA.
                    let t = unsafe { tile::<1, 1>([&q], [&key]) }[0][0];
                    assert_eq!(t.to_bits(), w.to_bits(), "d {d}, key {s}");
                }
                let mut got = vec![0f32; keys];
                // SAFETY: as above.
                unsafe { scores_blocked8(&q, &kt, &mut got) };
                assert_eq!(got, want, "8 lanes, d {d}, {keys} keys");
                if super::super::flash::avx512() {
                    // SAFETY: `avx512()` found AVX-512F.
                    unsafe { scores_blocked16(&q, &kt, &mut got) };
                    assert_eq!(got, want, "16 lanes, d {d}, {keys} keys");
                }
            }
        }
    }

    /// Every output of a product with few rows is the chain `s = x[i]·w[i] + s` in input order,
    /// to the bit: packed or packed on the way, on every instruction set this CPU has, for 1
    /// to 16 rows, column ranges that start and end inside panels, both destinations, and a
    /// last panel that is part padding. And close to the f64 dot product.
    #[test]
    fn panel_products_are_the_serial_chain_to_the_bit() {
        let mut isas = vec![Isa::Plain];
        if simd() {
            isas.push(Isa::Avx2);
            if super::super::flash::avx512() {
                isas.push(Isa::Avx512);
            }
        }
        assert_eq!(*isas.last().expect("plain"), Isa::detect());
        let n = 37;
        for k in [1usize, 16, 40, 256] {
            let x = randn(&[16 * k], k as u64).to_vec1::<f32>().expect("x");
            let w = randn(&[n * k], k as u64 + 1).to_vec1::<f32>().expect("w");
            // Between two other weights in one buffer, as the decode engine packs them.
            let (before, after) = (vec![1f32; 5 * k], vec![2f32; 17 * k]);
            let all = Panels::pack_all(&[(&before, 5, k), (&w, n, k), (&after, 17, k)]);
            let packed = all[1].clone();
            assert_eq!((packed.n, packed.k, packed.at), (n, k, PANEL * k));
            assert_eq!(packed.data().len(), 3 * PANEL * k);
            assert_eq!(packed.buf.len(), 6 * PANEL * k);
            assert_eq!(Panels::pack_all(&[(&w, n, k)])[0].data(), packed.data());
            let chain = |r: usize, c: usize| {
                let (xr, wc) = (&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
                xr.iter().zip(wc).fold(0f32, |s, (a, b)| a.mul_add(*b, s))
            };
            for m in 1..=16 {
                for (n0, cols) in [(0, n), (3, 30), (16, 21), (20, 5), (36, 1)] {
                    for dest in [Dest::Rows { ld: cols + 2 }, Dest::Transposed] {
                        let len = match dest {
                            Dest::Rows { ld } => m * ld,
                            Dest::Transposed => m * cols,
                        };
                        let mut outs = Vec::new();
                        for isa in &isas {
                            let mut got = vec![f32::NAN; len];
                            let at = (m, n0, cols);
                            panel_columns_on(*isa, &x[..m * k], &packed, at, &mut got, dest);
                            outs.push(got);
                        }
                        let mut got = vec![f32::NAN; len];
                        columns_into(&x[..m * k], &w, (m, k, n0, cols), &mut got, dest);
                        outs.push(got);
                        for got in &outs {
                            for r in 0..m {
                                for c in 0..cols {
                                    let v = got[dest.index(m, r, c)];
                                    let want = chain(r, n0 + c);
                                    let at = format!("k {k} m {m} n0 {n0} ({r}, {c}) {dest:?}");
                                    assert_eq!(v.to_bits(), want.to_bits(), "{at}");
                                    let plain: f64 = (0..k)
                                        .map(|i| x[r * k + i] as f64 * w[(n0 + c) * k + i] as f64)
                                        .sum();
                                    assert!((v as f64 - plain).abs() < 1e-3, "{at}: {v} {plain}");
                                }
                            }
                            if let Dest::Rows { ld } = dest {
                                // The two numbers past each row's columns are left alone.
                                for r in 0..m {
                                    assert!(got[r * ld + cols..(r + 1) * ld]
                                        .iter()
                                        .all(|v| v.is_nan()));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The 16-lane softmax does `softmax_lanes`' operations: the same bits at every length
    /// around the groups of sixteen, with scores spread wide enough that some weights
    /// underflow to 0.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_sixteen_lane_softmax_is_the_plain_ones_bits() {
        if !simd() || !super::super::flash::avx512() {
            return;
        }
        for n in [1usize, 7, 15, 16, 17, 31, 32, 33, 100] {
            let scores: Vec<f32> = randn(&[n], n as u64)
                .to_vec1::<f32>()
                .expect("scores")
                .iter()
                .map(|x| x * 40.0)
                .collect();
            let mask = vec![0f32; n];
            let mut want = scores.clone();
            // SAFETY: `simd()` found AVX2 and FMA, `avx512()` AVX-512F.
            unsafe { softmax_lanes(&mut want, Live::of(&mask)) };
            let mut got = scores.clone();
            unsafe { softmax16(&mut got) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{n} keys");
            let total: f32 = got.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{n} keys sum to {total}");
        }
    }
}
