//! f32 matrix products on AMX tiles, each f32 split into three bf16 parts.
//!
//! An f32 has 24 significant bits and a bf16 8, so three round-to-nearest bf16 parts hold an
//! f32 exactly: `x = x0 + x1 + x2`, `x0 = bf16(x)`, `x1 = bf16(x - x0)`, `x2 = x - x0 - x1`,
//! with `|x1| <= 2⁻⁸|x|` and `|x2| <= 2⁻¹⁶|x|`. A product `a · b` is then nine part products,
//! each exact in f32 (8 x 8 bits). The three smallest (`a1·b2`, `a2·b1`, `a2·b2`) are below
//! 2⁻²³·|a||b| together, the size of one f32 rounding, so the kernel sums the other six:
//! `a0·b0`, `a0·b1`, `a1·b0`, `a0·b2`, `a1·b1`, `a2·b0`. The sums are f32, as in any f32
//! gemm. The tests hold each element's error against an f64 reference next to a plain f32
//! sum's (sums of 64-1,100 terms: within 2x at the worst element, 1.5x summed over all).
//!
//! Why: one `tdpbf16ps` is a 16 x 16 x 32 product, 16,384 flops, in ~16 cycles, against
//! AVX-512's 64 f32 flops per cycle. On this host's Xeon, one core ran ~4.5 ns per
//! `tdpbf16ps` with nothing to load and 6.0-7.7 ns in this kernel from packed panels: with six
//! per 32-term f32 product, ~355-460 f32 GFLOP/s per core, against ~180 for gemm's AVX-512
//! kernels. Whole products at model R's training shapes, packing included, ran 1.15-1.9x
//! gemm's; model R's training step is ~8% shorter (`benches/peer/README.md`, session 23).
//!
//! Layout. Operands are packed per 32 x 32 block of the output: A in panels of 32 rows, B in
//! panels of 32 columns, each in K blocks of 32. A K block of a panel holds, for each part,
//! two tiles of 16 rows (A: 16 rows x 32 bf16; B: 16 pairs of K x 16 columns x 2, the
//! pair-interleaved layout `tdpbf16ps` reads), 1 KiB each, 6 KiB per K block, on 64-byte
//! aligned lines (a tile row that straddles two lines halves the kernel's rate). The kernel
//! keeps the 2 x 2 output tiles in `tmm0..3` and loads A and B tiles into `tmm4..7`.

use rayon::prelude::*;
use std::arch::x86_64::*;

/// One tile: 16 rows of 64 bytes.
const TILE: usize = 512; // u16s
/// Rows and columns of an output block, and elements of a K block.
const BLOCK: usize = 32;
/// One K block of a packed panel: 3 parts x 2 tiles.
const KBLOCK: usize = 6 * TILE; // u16s

/// An f32 matrix operand: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub(crate) ptr: *const f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

// SAFETY: an Operand is only read, and the callers keep the memory alive for the product.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

/// 64 bytes of packed bf16, aligned to a cache line: a tile's rows must not straddle lines
/// (unaligned, every row load touches two and the kernel runs at half its rate).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// `len` u16s (a multiple of 32) of zeros, cache-line aligned.
fn lines(len: usize) -> Vec<Line> {
    vec![Line([0; 32]); len / 32]
}

/// The u16s of packed lines.
fn halves(v: &mut [Line]) -> &mut [u16] {
    // SAFETY: a Line is 32 u16s with no padding (repr(C), 64 bytes, align 64 >= 2), so the
    // lines are v.len() * 32 initialized u16s, borrowed exclusively for the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u16>(), v.len() * 32) }
}

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes a disjoint set of output rows.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// The packed B buffer, shared by the tasks that pack distinct K blocks of it.
#[derive(Clone, Copy)]
struct LinesMut(*mut u16);
// SAFETY: tasks write disjoint K blocks of each panel through it, and the buffer outlives them.
unsafe impl Send for LinesMut {}
unsafe impl Sync for LinesMut {}

/// Whether this CPU and OS run AMX bf16 tiles for this process. Asks Linux once for the
/// permission to use tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    let leaf0 = __cpuid_count(0, 0);
    if leaf0.eax < 7 {
        return false;
    }
    // Leaf 7 exists (checked).
    let leaf7 = __cpuid_count(7, 0);
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    // The packing's vector paths are AVX-512F (every CPU with AMX has it).
    if !(amx_bf16 && amx_tile && std::arch::is_x86_feature_detected!("avx512f")) {
        return false;
    }
    extern "C" {
        fn syscall(number: i64, ...) -> i64;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only asks the kernel to allow a state
    // component for this process; it reads and writes no memory of ours.
    unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// The tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

#[inline]
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[inline]
fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The three bf16 parts of x, largest first.
#[inline]
fn split(x: f32) -> [u16; 3] {
    let x0 = bf16(x);
    let r = x - widen(x0);
    let x1 = bf16(r);
    [x0, x1, bf16(r - widen(x1))]
}

/// Where k (0..32) of a K block sits among a tile row's 32 bf16: `tdpbf16ps` multiplies pairs
/// (dwords), and the pair j here is (j, j + 16), so that a K block's two halves of 16 floats
/// combine lane by lane (no shuffles). A and B use the same order, so the products are the same.
#[inline]
fn pos(k: usize) -> usize {
    2 * (k % 16) + k / 16
}

/// Sixteen floats rounded to bf16: the bf16 in each lane's high half (low half zero), which
/// is also the rounded value as f32.
#[target_feature(enable = "avx512f")]
#[inline]
fn round16(x: __m512) -> __m512i {
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32))
}

/// The three parts of two vectors of sixteen floats (k and k + 16 of a pair), each part as
/// sixteen dwords holding (lo's bf16, hi's bf16).
#[target_feature(enable = "avx512f")]
#[inline]
fn split_pairs(lo: __m512, hi: __m512) -> [__m512i; 3] {
    let (mut lo, mut hi) = (lo, hi);
    let mut out = [_mm512_setzero_si512(); 3];
    for part in &mut out {
        let (rl, rh) = (round16(lo), round16(hi));
        *part = _mm512_or_si512(_mm512_srli_epi32::<16>(rl), rh);
        lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(rl));
        hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(rh));
    }
    out
}

/// The first `count` (at most 16) of the 16 floats at `p`, zeros after them: a K block's
/// half past the end of K reads only what K holds.
///
/// # Safety
/// AVX-512F; `p` has `count` readable floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_part(p: *const f32, count: usize) -> __m512 {
    if count >= 16 {
        // SAFETY: the caller's contract (16 readable floats).
        unsafe { _mm512_loadu_ps(p) }
    } else {
        // SAFETY: a masked load reads only the `count` floats its mask selects.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << count) - 1) as u16, p) }
    }
}

/// The two halves' lengths of K block `blk` when K is `k` long: (lo, hi), each 0..=16.
#[inline]
fn halves_of(k: usize, blk: usize) -> (usize, usize) {
    let rem = k.saturating_sub(blk * BLOCK).min(BLOCK);
    (rem.min(16), rem.saturating_sub(16))
}

/// A's rows `i0..i0 + 32` (zeros past `m`) packed over all K blocks into `dst`.
///
/// # Safety
/// `a` holds an `[m, k]` matrix.
unsafe fn pack_a(dst: &mut [u16], a: Operand, i0: usize, m: usize, k: usize) {
    let rows = (m - i0).min(BLOCK);
    if rows == BLOCK {
        if a.cs == 1 {
            // SAFETY: the caller's contract, with a whole block of rows (checked).
            unsafe { pack_a_rows(dst, a, i0, k) };
            return;
        }
        if a.rs == 1 {
            // SAFETY: as above.
            unsafe { pack_a_cols(dst, a, i0, k) };
            return;
        }
    }
    pack_scalar(
        dst,
        (rows, k),
        // SAFETY: (i0 + r, kk) with r < rows lies inside the `[m, k]` matrix a holds.
        |r, kk| unsafe { *a.ptr.add((i0 + r) * a.rs + kk * a.cs) },
        |r, q| (r / 16) * TILE + (r % 16) * 32 + pos(q),
    );
}

/// The packing of any layout, one float at a time: `count` rows of A (or columns of B) over
/// `k`, `element(i, kk)` the float, `place(i, q)` its u16 in part 0 of a K block (q = kk % 32);
/// zeros everywhere else (past the matrix's edge, and in the K blocks' padding).
fn pack_scalar(
    dst: &mut [u16],
    (count, k): (usize, usize),
    element: impl Fn(usize, usize) -> f32,
    place: impl Fn(usize, usize) -> usize,
) {
    dst.fill(0);
    for i in 0..count {
        for kk in 0..k {
            let p = split(element(i, kk));
            let at = (kk / BLOCK) * KBLOCK + place(i, kk % BLOCK);
            dst[at] = p[0];
            dst[at + 2 * TILE] = p[1];
            dst[at + 4 * TILE] = p[2];
        }
    }
}

/// `pack_a` for rows of contiguous floats, 32 rows (the last K block zero-padded past k).
///
/// # Safety
/// AVX-512F; `a` holds its `[.., k]` matrix, with the 32 rows from `i0`.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_rows(dst: &mut [u16], a: Operand, i0: usize, k: usize) {
    let kb = k.div_ceil(BLOCK);
    assert!(dst.len() >= kb * KBLOCK);
    let out = dst.as_mut_ptr();
    for r in 0..BLOCK {
        // SAFETY: the caller's contract: rows i0..i0 + 32 and K blocks 0..kb lie inside a's
        // matrix, so each row and its 32-float blocks do.
        let row = unsafe { a.ptr.add((i0 + r) * a.rs) };
        let base = (r / 16) * TILE + (r % 16) * 32;
        // The next row's same blocks are asked for as this row's are read: rows are runs of a
        // few kilobytes a page or more apart, where the hardware's prefetcher starts over.
        let next = row.wrapping_add(a.rs);
        for b in 0..kb {
            // A prefetch never faults; past the last row it only fetches stray lines.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * BLOCK).cast::<i8>());
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * BLOCK + 16).cast::<i8>());
            let (lo, hi) = halves_of(k, b);
            // SAFETY: as above; the loads read the row's floats b * 32 .. b * 32 + lo + hi,
            // all below k (`halves_of`).
            let parts = unsafe {
                split_pairs(
                    load_part(row.add(b * BLOCK), lo),
                    load_part(row.wrapping_add(b * BLOCK + 16), hi),
                )
            };
            for (p, v) in parts.iter().enumerate() {
                // SAFETY: `b * KBLOCK + p * 2 * TILE + base + 32 <= kb * KBLOCK <= dst.len()`.
                unsafe {
                    _mm512_storeu_si512(out.add(b * KBLOCK + p * 2 * TILE + base).cast(), *v)
                };
            }
        }
    }
}

/// `pack_a` for columns of contiguous floats (A is a row-major matrix's transpose), 32 rows
/// (the last K block zero-padded past k): each K pair's parts come out as a column of dwords
/// over 16 rows, and a 16 x 16 transpose turns them into the tile's rows.
///
/// # Safety
/// AVX-512F; `a` holds its `[.., k]` matrix, with the 32 rows from `i0`.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_cols(dst: &mut [u16], a: Operand, i0: usize, k: usize) {
    let column = |kk: usize, h: usize| {
        if kk < k {
            // SAFETY: rows i0 + 16h .. i0 + 16h + 16 of column kk < k lie inside the matrix
            // a holds (the caller's contract).
            unsafe { _mm512_loadu_ps(a.ptr.add(i0 + 16 * h + kk * a.cs)) }
        } else {
            _mm512_setzero_ps()
        }
    };
    // SAFETY: AVX-512F (the caller's contract).
    unsafe {
        pack_transposed(dst, k.div_ceil(BLOCK), |blk, h, j| {
            (column(blk * BLOCK + j, h), column(blk * BLOCK + j + 16, h))
        })
    }
}

/// `pack_b` for columns of contiguous floats (B is a row-major matrix's transpose, as a
/// weight's in `x · wᵀ`), 32 columns (the last K block zero-padded past k): a column's K
/// pairs come out as a row of dwords, and a 16 x 16 transpose turns 16 columns into the
/// tile's rows of pairs.
///
/// # Safety
/// AVX-512F; `b` holds its `[k, ..]` matrix, with the 32 columns from `j0`.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_cols(dst: &mut [u16], b: Operand, j0: usize, k: usize) {
    // SAFETY: AVX-512F (the caller's contract); column j0 + 16h + c lies inside the matrix b
    // holds, and the loads read its K block's floats below k only (`halves_of`).
    unsafe {
        pack_transposed(dst, k.div_ceil(BLOCK), |blk, h, c| {
            let (lo, hi) = halves_of(k, blk);
            let col = b.ptr.wrapping_add((j0 + 16 * h + c) * b.cs + blk * BLOCK);
            (load_part(col, lo), load_part(col.wrapping_add(16), hi))
        })
    }
}

/// The shared loop of `pack_a_cols` and `pack_b_cols`: for K block `blk`, tile `h` and lane
/// group `i` (0..16), `load` gives the 16 floats of pair halves k and k + 16; their parts are
/// transposed into the tile's rows.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed(
    dst: &mut [u16],
    kb: usize,
    load: impl Fn(usize, usize, usize) -> (__m512, __m512),
) {
    assert!(dst.len() >= kb * KBLOCK);
    let out = dst.as_mut_ptr();
    for blk in 0..kb {
        for h in 0..2 {
            let mut parts = [[_mm512_setzero_si512(); 16]; 3];
            for i in 0..16 {
                let (lo, hi) = load(blk, h, i);
                let p = split_pairs(lo, hi);
                for (part, v) in parts.iter_mut().zip(p) {
                    part[i] = v;
                }
            }
            for (p, part) in parts.iter_mut().enumerate() {
                transpose16(part);
                for (r, v) in part.iter().enumerate() {
                    let at = blk * KBLOCK + p * 2 * TILE + h * TILE + r * 32;
                    // SAFETY: `at + 32 <= kb * KBLOCK <= dst.len()` (asserted).
                    unsafe { _mm512_storeu_si512(out.add(at).cast(), *v) };
                }
            }
        }
    }
}

/// Transposes a 16 x 16 matrix of dwords held as 16 rows.
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + q], 128-bit lane l: element 4l + q of rows 4i..4i + 4.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for q in 0..4 {
        let v1 = _mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]);
        let v2 = _mm512_shuffle_i32x4::<0xDD>(u[q], u[4 + q]);
        let w1 = _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]);
        let w2 = _mm512_shuffle_i32x4::<0xDD>(u[8 + q], u[12 + q]);
        r[q] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        r[4 + q] = _mm512_shuffle_i32x4::<0x88>(v2, w2);
        r[8 + q] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
        r[12 + q] = _mm512_shuffle_i32x4::<0xDD>(v2, w2);
    }
}

/// B's columns `j0..j0 + 32` (zeros past `n`) packed over the K blocks into `dst`.
///
/// # Safety
/// `b` holds a `[k, n]` matrix.
unsafe fn pack_b(dst: &mut [u16], b: Operand, j0: usize, n: usize, k: usize) {
    let cols = (n - j0).min(BLOCK);
    if cols == BLOCK {
        if b.cs == 1 {
            // SAFETY: the caller's contract, with a whole block of columns (checked).
            unsafe { pack_b_rows(dst, b, j0, k) };
            return;
        }
        if b.rs == 1 {
            // SAFETY: as above.
            unsafe { pack_b_cols(dst, b, j0, k) };
            return;
        }
    }
    pack_scalar(
        dst,
        (cols, k),
        // SAFETY: (kk, j0 + c) with c < cols lies inside the `[k, n]` matrix b holds.
        |c, kk| unsafe { *b.ptr.add(kk * b.rs + (j0 + c) * b.cs) },
        // Pair q % 16's row of the tile, the column's dword, q's half of it.
        |c, q| (c / 16) * TILE + (c % 16) * 2 + (q % 16) * 32 + q / 16,
    );
}

/// `pack_b` for rows of contiguous floats, 32 columns (the last K block zero-padded past k).
///
/// # Safety
/// AVX-512F; `b` holds its `[k, ..]` matrix, with the 32 columns from `j0`.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_rows(dst: &mut [u16], b: Operand, j0: usize, k: usize) {
    let kb = k.div_ceil(BLOCK);
    assert!(dst.len() >= kb * KBLOCK);
    let out = dst.as_mut_ptr();
    for blk in 0..kb {
        for j in 0..16 {
            // Row kk's 16 floats from column j0 + 16h, or zeros past k.
            let row = |kk: usize, h: usize| {
                if kk < k {
                    // SAFETY: the caller's contract: row kk < k and columns j0..j0 + 32 lie
                    // inside b's matrix.
                    unsafe { _mm512_loadu_ps(b.ptr.add(kk * b.rs + j0 + 16 * h)) }
                } else {
                    _mm512_setzero_ps()
                }
            };
            let (lo, hi) = (blk * BLOCK + j, blk * BLOCK + j + 16);
            for h in 0..2 {
                let parts = split_pairs(row(lo, h), row(hi, h));
                for (p, v) in parts.iter().enumerate() {
                    // SAFETY: the offset + 32 is at most kb * KBLOCK <= dst.len() (asserted).
                    unsafe {
                        _mm512_storeu_si512(
                            out.add(blk * KBLOCK + p * 2 * TILE + h * TILE + j * 32)
                                .cast(),
                            *v,
                        )
                    };
                }
            }
        }
    }
}

/// Loads the tile configuration on this thread: [`block`] relies on it.
///
/// # Safety
/// `available()`.
unsafe fn configure() {
    // SAFETY: ldtilecfg reads the 64-byte static configuration and sets this thread's tile
    // state. Nothing the compiler emits uses tile state, so it stays as set until `release`
    // on this thread.
    unsafe {
        std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) &CONFIG, options(nostack, readonly))
    };
}

/// Releases this thread's tile state (so a context switch no longer saves 8 KiB of tiles).
///
/// # Safety
/// `available()`.
unsafe fn release() {
    // SAFETY: tilerelease returns the tile state to its initial (unconfigured) state.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// One 32 x 32 output block: `c (+)= a · b` over `kb` K blocks of packed panels. `c0` and `c1`
/// point to the block's rows 0 and 16, rows `ldc` bytes apart.
///
/// The six part products of a K block run in the order `a2·b0, a1·b0, a1·b1, a0·b1, a0·b2,
/// a0·b0`: each changes one operand from the one before, so a K block loads 14 tiles (two per
/// change, four at the start) for its 24 `tdpbf16ps`. The kernel is near the rate L2 feeds
/// tiles at; the order `a0·b0, a0·b1, a0·b2, a1·b0, a1·b1, a2·b0` loaded 18 and ran ~6% slower
/// from L2 (8.75 against 8.2 ns per `tdpbf16ps`, one core, panels of real data).
///
/// # Safety
/// `available()`, and [`configure`] ran on this thread since the last [`release`]; `a` and
/// `b` hold `kb` packed K blocks; `c0`, `c1` point to 16 rows each of 32 floats, `ldc` bytes
/// apart, writable and (with `load`) initialized.
unsafe fn block(
    a: *const u16,
    b: *const u16,
    kb: usize,
    c0: *mut f32,
    c1: *mut f32,
    ldc: usize,
    load: bool,
) {
    // SAFETY: the caller's contract. The asm reads the packed panels and reads and writes the
    // output block named above, and uses the tile registers (declared clobbered) under the
    // configuration the caller loaded.
    unsafe {
        std::arch::asm!(
            "test {load:e}, {load:e}",
            "jz 2f",
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c0} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c1} + {ldc}*1]",
            "tileloadd tmm3, [{c1} + {ldc}*1 + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "3:",
            // a2·b0
            "tileloadd tmm4, [{a} + {s}*1 + 4096]",
            "tileloadd tmm6, [{b} + {s}*1 + 0]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {s}*1 + 5120]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // a1·b0
            "tileloadd tmm4, [{a} + {s}*1 + 2048]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 3072]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // a1·b1
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 3072]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // a0·b1
            "tileloadd tmm4, [{a} + {s}*1 + 0]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // a0·b2
            "tileloadd tmm6, [{b} + {s}*1 + 4096]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 5120]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // a0·b0
            "tileloadd tmm6, [{b} + {s}*1 + 0]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 6144",
            "add {b}, 6144",
            "dec {kb}",
            "jnz 3b",
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c0} + {ldc}*1 + 64], tmm1",
            "tilestored [{c1} + {ldc}*1], tmm2",
            "tilestored [{c1} + {ldc}*1 + 64], tmm3",
            load = in(reg) load as u32,
            c0 = in(reg) c0,
            c1 = in(reg) c1,
            ldc = in(reg) ldc,
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            s = in(reg) 64usize,
            kb = inout(reg) kb => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}

/// K blocks per pass over the output: a panel's pass is 192 KiB, and a task's four A panels
/// and a group of B's stay in L2. Passes of 2-8 and 64-128 K blocks made model R's training
/// step slower (411-448 ms against 404-405).
const K_CHUNK: usize = 32;
/// B panels per group: a group's panels (~1 MiB) stay in L2 while a task's A panels pass.
const L2_BYTES: usize = 1 << 20;
/// Output rows per task (four blocks): B is read from L3 once per task, not per block row.
const TASK_ROWS: usize = 4 * BLOCK;

/// The most bytes of packed B (three bf16 per f32: 1.5x B's size) one pass of a product
/// packs; a larger B runs in pieces of columns or of K (see [`gemm`]).
const MAX_PACKED_B: usize = 64 << 20;

/// Products of fewer multiply-adds stay with the AVX-512 kernels: with the prefill of the
/// bench's 8 x 16 prompt on tiles, the batch-8 decode that follows it read 0-4% slower.
const MIN_PRODUCT: usize = 1 << 27;

/// Products with a side under this stay with the AVX-512 kernels: a panel is packed once and
/// used for the other side's blocks, so a narrow side leaves the packing unpaid. The
/// quickstart's model (hidden 96) trained ~4% slower with its products on tiles (SFT median
/// 25,351 against 26,299 tokens/s, one run each).
const MIN_SIDE: usize = 256;

/// Whether a `[m, k] x [k, n]` product whose A has strides `a_strides` (row, column) runs
/// here. A's rows or columns must be contiguous (the packing's vector paths), and the product
/// large enough that the packing pays: the panels are 32 x 32 and B is packed first.
pub(crate) fn suits((m, k, n): (usize, usize, usize), (a_rs, a_cs): (usize, usize)) -> bool {
    (a_cs == 1 || a_rs == 1)
        && m.min(k).min(n) >= MIN_SIDE
        && m.saturating_mul(k).saturating_mul(n) >= MIN_PRODUCT
}

type Panels = std::cell::RefCell<Vec<Line>>;

thread_local! {
    /// B's packed panels on the thread that calls a product, kept between products so that
    /// a product neither allocates nor zeroes them.
    static B_PANELS: Panels = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's packed A panels on a pool thread.
    static A_PANELS: Panels = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` u16s of one of this thread's panel buffers (contents unspecified).
fn with_panels<R>(
    which: &'static std::thread::LocalKey<Panels>,
    len: usize,
    f: impl FnOnce(&mut [u16]) -> R,
) -> R {
    which.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() * 32 < len {
                *v = lines(len);
            }
            f(&mut halves(&mut v)[..len])
        }
        // Re-entered on this thread (rayon ran another task while this one waited): a
        // buffer of its own.
        Err(_) => f(halves(&mut lines(len))),
    })
}

/// `dst = a · b` (or `+=` with `accumulate`) for `[m, k] x [k, n]` into row-major `[m, n]`.
///
/// B is packed at most [`MAX_PACKED_B`] bytes at a time (a large vocabulary's output layer
/// is 170 MB packed): a wider product runs as pieces of B's columns, each into its columns of
/// dst (A packed again per piece, which is cheap where K is the short side), a longer one as
/// pieces of K summed into dst. K pieces are whole K chunks, so each element's sum runs in the
/// same order as in one pass: the pieces change no bit.
///
/// # Safety
/// `available()`; `a`, `b` hold their matrices; `dst` points to `m · n` writable floats,
/// initialized with `accumulate`, that nothing else touches during the call; m, n, k > 0.
pub(crate) unsafe fn gemm(
    dst: *mut f32,
    accumulate: bool,
    mkn: (usize, usize, usize),
    a: Operand,
    b: Operand,
) {
    // SAFETY: the caller's contract.
    unsafe { gemm_in_pieces(dst, accumulate, mkn, a, b, MAX_PACKED_B) }
}

/// [`gemm`] with B packed at most `max_packed` bytes at a time.
///
/// # Safety
/// As [`gemm`].
unsafe fn gemm_in_pieces(
    dst: *mut f32,
    accumulate: bool,
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    max_packed: usize,
) {
    let block_bytes = KBLOCK * 2; // one packed 32 x 32 block of B
    let (kb, nb) = (k.div_ceil(BLOCK), n.div_ceil(BLOCK));
    if kb * nb * block_bytes <= max_packed {
        // SAFETY: the caller's contract, with dst's rows n apart.
        return unsafe { gemm_pass(dst, n, accumulate, (m, k, n), a, b) };
    }
    if n >= k {
        // Pieces of whole column blocks (at least one).
        let cols = (max_packed / (kb * block_bytes)).max(1) * BLOCK;
        let mut j0 = 0;
        while j0 < n {
            let nc = cols.min(n - j0);
            // SAFETY: columns j0.. of b and of dst's rows lie inside them (j0 < n); dst's rows
            // stay n apart, and the piece writes its columns only.
            unsafe {
                let bj = Operand {
                    ptr: b.ptr.add(j0 * b.cs),
                    ..b
                };
                gemm_pass(dst.add(j0), n, accumulate, (m, k, nc), a, bj);
            }
            j0 += nc;
        }
    } else {
        // Pieces of whole K chunks (at least one), summed into dst in K's order.
        let chunk_bytes = K_CHUNK * nb * block_bytes;
        let rows = (max_packed / chunk_bytes).max(1) * K_CHUNK * BLOCK;
        let mut k0 = 0;
        while k0 < k {
            let kc = rows.min(k - k0);
            // SAFETY: columns k0.. of a and rows k0.. of b lie inside them (k0 < k).
            unsafe {
                let ak = Operand {
                    ptr: a.ptr.add(k0 * a.cs),
                    ..a
                };
                let bk = Operand {
                    ptr: b.ptr.add(k0 * b.rs),
                    ..b
                };
                gemm_pass(dst, n, accumulate || k0 > 0, (m, kc, n), ak, bk);
            }
            k0 += kc;
        }
    }
}

/// One pass of [`gemm`]: B packed whole, dst's rows `ldc` floats apart.
///
/// # Safety
/// As [`gemm`], with dst's `m` rows of `n` floats `ldc` apart.
unsafe fn gemm_pass(
    dst: *mut f32,
    ldc: usize,
    accumulate: bool,
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
) {
    let kb = k.div_ceil(BLOCK);
    let panel = kb * KBLOCK;
    let nb = n.div_ceil(BLOCK);
    with_panels(&B_PANELS, nb * panel, |bp| {
        if b.cs == 1 && n.is_multiple_of(BLOCK) {
            // Rows contiguous: each thread takes a run of K blocks and packs them for every
            // panel, reading B's rows whole. Panel by panel, a thread read 128 bytes of every
            // row of B (strides of kilobytes, which the prefetcher does not follow).
            let lines = LinesMut(bp.as_mut_ptr());
            let runs = kb.div_ceil(rayon::current_num_threads().max(1));
            (0..kb).into_par_iter().with_min_len(runs).for_each(|blk| {
                let (lines, b) = (lines, b);
                let bk = Operand {
                    // SAFETY: the caller's contract; row blk * 32 < k lies inside b's matrix,
                    // and `bk` holds its `[k - blk * 32, n]` rest.
                    ptr: unsafe { b.ptr.add(blk * BLOCK * b.rs) },
                    ..b
                };
                for j in 0..nb {
                    // SAFETY: K block blk of panel j: KBLOCK u16s inside the `nb * panel`
                    // buffer, written by this task alone (tasks take distinct K blocks).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            lines.0.add(j * panel + blk * KBLOCK),
                            KBLOCK,
                        )
                    };
                    // SAFETY: `bk` holds the block's rows (32, or k's rest) and columns
                    // j * 32 .. j * 32 + 32 (n is whole blocks).
                    unsafe { pack_b(dst, bk, j * BLOCK, n, BLOCK.min(k - blk * BLOCK)) }
                }
            });
        } else {
            bp.par_chunks_mut(panel).enumerate().for_each(|(j, p)| {
                // SAFETY: the caller's contract.
                unsafe { pack_b(p, b, j * BLOCK, n, k) }
            });
        }
        let bp = &*bp;
        let out = Out(dst);
        let tasks = m.div_ceil(TASK_ROWS);
        (0..tasks).into_par_iter().for_each(|t| {
            let (out, a) = (out, a);
            let r0 = t * TASK_ROWS;
            let rows = (m - r0).min(TASK_ROWS);
            let blocks = rows.div_ceil(BLOCK);
            let mut k0 = 0;
            while k0 < kb {
                let kc = K_CHUNK.min(kb - k0);
                let chunk = kc * KBLOCK;
                let load = accumulate || k0 > 0;
                let group = (L2_BYTES / (chunk * 2)).max(1);
                with_panels(&A_PANELS, blocks * chunk, |ap| {
                    // SAFETY: the caller's contract: a holds `[m, k]`, rows r0.. and K blocks
                    // k0..k0 + kc lie inside it.
                    unsafe { pack_a_panels(ap, a, (m, k), (r0, rows), (k0, kc)) };
                    // SAFETY: the caller's contract (`available`).
                    unsafe { configure() };
                    let mut g0 = 0;
                    while g0 < nb {
                        let g1 = (g0 + group).min(nb);
                        let panels = BPanels {
                            first: bp[k0 * KBLOCK..].as_ptr(),
                            stride: panel,
                        };
                        // SAFETY: rows r0..r0 + rows of dst belong to this task; the panels
                        // hold kc K blocks from k0 for columns g0 * 32 .. g1 * 32.
                        unsafe {
                            run_blocks(
                                out,
                                ldc,
                                (m, n),
                                (ap, chunk, r0),
                                panels,
                                (g0, g1),
                                (kc, load),
                            )
                        };
                        g0 = g1;
                    }
                    // SAFETY: as above.
                    unsafe { release() };
                });
                k0 += kc;
            }
        });
    });
}

/// Output bytes per group of rows of a long product: the group's rows of its part's sum stay
/// in L2 while the group's blocks run.
const LONG_OUT_BYTES: usize = 256 << 10;
/// Packed B bytes per K chunk of a long product (all of B's panels over the chunk).
const LONG_B_BYTES: usize = 512 << 10;
/// K blocks per part of a long product, at least (1,024 of K); at most [`LONG_PARTS`] parts.
const LONG_PART: usize = 32;
/// Parts of a long product, at most: each part's sum but the first is a buffer of its own.
const LONG_PARTS: usize = 8;
/// The most bytes of those buffers: a wide output has fewer, longer parts.
const LONG_SUM_BYTES: usize = 64 << 20;
/// Output rows per task of a long product, at most (whole groups of rows): a tall output (a
/// large vocabulary's output layer) runs as tasks of rows as well as parts, each packing B's
/// chunks again.
const LONG_TASK_ROWS: usize = 2048;
/// The widest B of a long product: its packed chunk must stay small ([`LONG_B_BYTES`]).
const LONG_MAX_N: usize = 1024;

/// Whether a product with K long against its sides and B `n` columns wide runs as
/// [`gemm_long`]: no wider than [`LONG_MAX_N`] (a task's packed chunk of B is one K block of
/// all its panels at least).
pub(crate) fn suits_long(n: usize) -> bool {
    n <= LONG_MAX_N
}

/// `dst = a · b` for a `[m, k] x [k, n]` product whose K is long against m and n (a weight's
/// gradient: a sum over every token of the batch): sums over parts of K, each task packing
/// the panels it reads itself.
///
/// [`gemm`] packs B whole up front, spread over the threads, and each task of 128 output rows
/// reads all of it: with m and n a few hundred, B is megabytes, and every task read it from
/// L3, much of it packed by the other core (model R's weight gradients ran at 25-45 ns per
/// `tdpbf16ps`, packing included, against 18-24 for its other products). Here a task is a
/// part of K (1,024 at least) for up to [`LONG_TASK_ROWS`] rows: it walks its part in chunks,
/// packs the chunk's B panels (at most [`LONG_B_BYTES`]), then, group of rows by group (each
/// group's rows of the sum at most [`LONG_OUT_BYTES`]), the group's A panels, and runs the
/// group's blocks, so that what the kernel reads was written by the same core moments before
/// and is still in its L2. The parts' sums are added in K's order at the end. Alone, at model
/// R's weight-gradient shapes with K 4,096 (2 threads, best of eight rounds): 1.25-1.4x
/// faster than [`gemm`] where m is 256 or 512, the same where it is 1,536.
///
/// The parts, tasks, groups and chunks depend on the shapes only and each element's sum in a
/// part runs on one thread in a fixed order, so the results do not depend on the thread
/// count; the price is threads left idle where there are fewer tasks than threads (4 for
/// model R's K of 4,096).
///
/// # Safety
/// `available()`; `a`, `b` hold their matrices; `dst` points to `m · n` writable floats that
/// nothing else touches during the call; m, n, k > 0 and `suits_long`.
pub(crate) unsafe fn gemm_long(dst: *mut f32, mkn: (usize, usize, usize), a: Operand, b: Operand) {
    // SAFETY: the caller's contract.
    unsafe { gemm_long_in_tasks(dst, mkn, a, b, LONG_TASK_ROWS) }
}

/// [`gemm_long`] with tasks of at most `max_task_rows` rows (whole groups).
///
/// # Safety
/// As [`gemm_long`].
unsafe fn gemm_long_in_tasks(
    dst: *mut f32,
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    max_task_rows: usize,
) {
    let kb = k.div_ceil(BLOCK);
    let nb = n.div_ceil(BLOCK);
    let max_parts = (1 + LONG_SUM_BYTES / (4 * m * n).max(1)).min(LONG_PARTS);
    let part = LONG_PART.max(kb.div_ceil(max_parts));
    let parts = kb.div_ceil(part);
    let group_rows = (LONG_OUT_BYTES / (4 * nb * BLOCK) / BLOCK).max(1) * BLOCK;
    let kc_max = (LONG_B_BYTES / (nb * KBLOCK * 2)).clamp(1, K_CHUNK);
    // Part 0 sums into dst, part p > 0 into a buffer of its own; every element of each is
    // written (the first chunk of a part stores its blocks without reading them).
    let mut sums: Vec<Vec<f32>> = (1..parts).map(|_| Vec::with_capacity(m * n)).collect();
    let outs: Vec<Out> = std::iter::once(Out(dst))
        .chain(sums.iter_mut().map(|v| Out(v.as_mut_ptr())))
        .collect();
    let task_rows = (max_task_rows / group_rows).max(1) * group_rows;
    let row_tasks = m.div_ceil(task_rows);
    (0..parts * row_tasks).into_par_iter().for_each(|t| {
        let (a, b) = (a, b);
        let (p, first_row) = (t % parts, (t / parts) * task_rows);
        let out = outs[p];
        let (k_first, k_end) = (p * part, ((p + 1) * part).min(kb));
        let mut k0 = k_first;
        while k0 < k_end {
            let kc = kc_max.min(k_end - k0);
            let chunk = kc * KBLOCK;
            let kk = (k - k0 * BLOCK).min(kc * BLOCK);
            with_panels(&B_PANELS, nb * chunk, |bp| {
                // A K block of every panel at a time: B's rows are read in order.
                for blk in 0..kc {
                    let bk = Operand {
                        // SAFETY: the caller's contract; row (k0 + blk) * 32 < k lies inside
                        // b's matrix, and `bk` holds its rest.
                        ptr: unsafe { b.ptr.add((k0 + blk) * BLOCK * b.rs) },
                        ..b
                    };
                    let width = BLOCK.min(kk - blk * BLOCK);
                    for j in 0..nb {
                        let at = j * chunk + blk * KBLOCK;
                        // SAFETY: `bk` holds the block's `width` rows and columns j * 32.. .
                        unsafe { pack_b(&mut bp[at..at + KBLOCK], bk, j * BLOCK, n, width) };
                    }
                }
                let task_end = (first_row + task_rows).min(m);
                for r0 in (first_row..task_end).step_by(group_rows) {
                    let rows = (task_end - r0).min(group_rows);
                    let blocks = rows.div_ceil(BLOCK);
                    with_panels(&A_PANELS, blocks * chunk, |ap| {
                        // SAFETY: the caller's contract; rows r0.. < m, K blocks k0.. < kb.
                        unsafe { pack_a_panels(ap, a, (m, k), (r0, rows), (k0, kc)) };
                        let panels = BPanels {
                            first: bp.as_ptr(),
                            stride: chunk,
                        };
                        // SAFETY: `available` (the caller's contract); rows first_row..task_end
                        // of part p's sum are this task's, each block written by its first
                        // chunk before any reads it.
                        unsafe {
                            configure();
                            let load = k0 > k_first;
                            run_blocks(
                                out,
                                n,
                                (m, n),
                                (ap, chunk, r0),
                                panels,
                                (0, nb),
                                (kc, load),
                            );
                            release();
                        }
                    });
                }
            });
            k0 += kc;
        }
    });
    // SAFETY: every element of each part's sum was written above (its tasks cover all rows,
    // their blocks all columns, and a part's first chunk writes without reading).
    unsafe {
        for v in &mut sums {
            v.set_len(m * n);
        }
    }
    // SAFETY: the caller's contract: dst holds m · n floats, all written above.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst, m * n) };
    dst.par_chunks_mut(n * 64).enumerate().for_each(|(i, d)| {
        let at = i * n * 64;
        let len = d.len();
        for s in &sums {
            for (x, y) in d.iter_mut().zip(&s[at..at + len]) {
                *x += y;
            }
        }
    });
}

/// A task's A panels: the `rows` rows from `r0` (a multiple of 32; zeros past `m`), over the
/// `kc` K blocks from `k0`, packed into `ap` (one run of `kc` K blocks per panel).
///
/// # Safety
/// `a` holds `[m, k]`; `r0 < m`, `k0 < k.div_ceil(32)`; `ap` holds `rows.div_ceil(32)` runs.
unsafe fn pack_a_panels(
    ap: &mut [u16],
    a: Operand,
    (m, k): (usize, usize),
    (r0, rows): (usize, usize),
    (k0, kc): (usize, usize),
) {
    let chunk = kc * KBLOCK;
    let blocks = rows.div_ceil(BLOCK);
    // SAFETY: the caller's contract; column k0 * 32 < k lies inside a's matrix, and `ak`
    // holds its `[m, k - k0 * 32]` rest.
    let ak = Operand {
        ptr: unsafe { a.ptr.add(k0 * BLOCK * a.cs) },
        ..a
    };
    let kk = (k - k0 * BLOCK).min(kc * BLOCK);
    if a.rs == 1 && rows == blocks * BLOCK {
        // Columns contiguous (an activation's transpose): a K block of all the task's panels
        // at a time, so that each of its 32 rows of the source is read as one run of the
        // task's columns, not a panel's 128 bytes.
        for blk in 0..kc {
            let at = Operand {
                // SAFETY: as above; column blk * 32 < kk of ak.
                ptr: unsafe { ak.ptr.add(blk * BLOCK * a.cs) },
                ..ak
            };
            // The next K block's 32 source rows (the task's columns of each), asked for while
            // this one is packed: rows kilobytes apart are beyond the hardware prefetcher.
            if blk + 1 < kc {
                let next = at.ptr.wrapping_add(BLOCK * a.cs + r0);
                for row in 0..BLOCK {
                    for line in 0..rows.div_ceil(16) {
                        let p = next.wrapping_add(row * a.cs + line * 16);
                        // SAFETY: a prefetch never faults.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
                    }
                }
            }
            let width = BLOCK.min(kk - blk * BLOCK);
            for (i, p) in ap.chunks_mut(chunk).take(blocks).enumerate() {
                let dst = &mut p[blk * KBLOCK..(blk + 1) * KBLOCK];
                // SAFETY: `at` holds `[m, kk - blk * 32]`, of which this K block's `width`
                // columns are read.
                unsafe { pack_a(dst, at, r0 + i * BLOCK, m, width) };
            }
        }
    } else {
        for (i, p) in ap.chunks_mut(chunk).take(blocks).enumerate() {
            // SAFETY: as above.
            unsafe { pack_a(p, ak, r0 + i * BLOCK, m, kk) };
        }
    }
}

/// Packed B panels: panel j's K blocks start at `first + j * stride` (u16s).
#[derive(Clone, Copy)]
struct BPanels {
    first: *const u16,
    stride: usize,
}

/// The output blocks of a task's rows `r0..` (A's packed panels `ap`, `chunk` u16s apart)
/// and B's panels `g0..g1`, each `c (+)= a · b` over `kc` K blocks (`load`: add to dst).
/// Blocks past dst's edge (`m`, `n`) run on a copy.
///
/// # Safety
/// `available()` and [`configure`] on this thread; dst's rows `r0..` (`ap`'s panels' rows,
/// below m) and columns `g0 * 32..` (below n) are this caller's, `ldc` floats apart, and
/// initialized with `load`; the panels hold `kc` K blocks.
unsafe fn run_blocks(
    out: Out,
    ldc: usize,
    (m, n): (usize, usize),
    (ap, chunk, r0): (&[u16], usize, usize),
    panels: BPanels,
    (g0, g1): (usize, usize),
    (kc, load): (usize, bool),
) {
    let blocks = ap.len() / chunk;
    for i in 0..blocks {
        let i0 = r0 + i * BLOCK;
        if i0 >= m {
            break;
        }
        let rows = (m - i0).min(BLOCK);
        let ai = ap[i * chunk..].as_ptr();
        for j in g0..g1 {
            let j0 = j * BLOCK;
            let cols = (n - j0).min(BLOCK);
            let bj = panels.first.wrapping_add(j * panels.stride);
            // The next block's output lines, asked for while this block runs: its stores
            // (and, with `load`, its loads) otherwise wait on lines of an output that is
            // megabytes, not in cache (a K of 256 is 192 `tdpbf16ps` per 4 KiB of output).
            let (ni, nj) = if j + 1 < g1 {
                (i0, j0 + BLOCK)
            } else {
                (i0 + BLOCK, g0 * BLOCK)
            };
            // Only this caller's blocks: another task may be writing the rows past them.
            let end = (r0 + blocks * BLOCK).min(m);
            if ni < end {
                let next = out.0.wrapping_add(ni * ldc + nj);
                for r in 0..BLOCK.min(end - ni) {
                    let p = next.wrapping_add(r * ldc);
                    // A prefetch never faults (a row's second line may lie past the block's
                    // columns; it is then a stray fetch).
                    _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(16).cast::<i8>());
                }
            }
            // SAFETY: the caller's contract: block (i0, j0) of dst is this caller's.
            unsafe {
                let c = out.0.add(i0 * ldc + j0);
                if rows == BLOCK && cols == BLOCK {
                    block(ai, bj, kc, c, c.add(16 * ldc), ldc * 4, load);
                } else {
                    // A block past dst's edge (only where m or n is not whole blocks).
                    let mut cbuf = [Line([0; 32]); 2 * BLOCK];
                    let cb = halves(&mut cbuf).as_mut_ptr().cast::<f32>();
                    for r in 0..rows {
                        for cc in 0..cols {
                            *cb.add(r * BLOCK + cc) = if load { *c.add(r * ldc + cc) } else { 0.0 };
                        }
                    }
                    block(ai, bj, kc, cb, cb.add(16 * BLOCK), BLOCK * 4, true);
                    for r in 0..rows {
                        for cc in 0..cols {
                            *c.add(r * ldc + cc) = *cb.add(r * BLOCK + cc);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of mixed signs and magnitudes (several binades), so that all three bf16 parts
    /// of most values are non-zero.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::policy::hashed_values(len, seed)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % 7) as f32)
            .collect()
    }

    /// An operand over `data` holding an `[r, c]` matrix, row-major or its transpose.
    fn operand(data: &[f32], (r, c): (usize, usize), transposed: bool) -> Operand {
        let (rs, cs) = if transposed { (1, r) } else { (c, 1) };
        Operand {
            ptr: data.as_ptr(),
            rs,
            cs,
        }
    }

    fn at(x: Operand, i: usize, j: usize) -> f32 {
        // SAFETY: the tests index inside the matrices they built.
        unsafe { *x.ptr.add(i * x.rs + j * x.cs) }
    }

    /// Each vector packing (rows or columns contiguous, A and B) writes what the scalar
    /// packing writes, element for element, padding included: K in whole blocks, or ending in
    /// a block of 6 or 17.
    #[test]
    fn vector_packings_are_the_scalar_ones() {
        if !available() {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        // Whole K blocks, a last block of 6 (its high half empty) and one of 17.
        for (m, k, n) in [(64, 96, 64), (64, 70, 64), (64, 17, 64)] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let len = k.div_ceil(BLOCK) * KBLOCK;
            for transposed in [false, true] {
                let (ao, bo) = (
                    operand(&a, (m, k), transposed),
                    operand(&b, (k, n), transposed),
                );
                // The scalar path, forced by operands with neither stride 1 over the same
                // elements: copies with every other float a gap.
                let spread = |x: Operand, (r, c): (usize, usize)| {
                    let mut v = vec![0.0f32; 2 * r * c];
                    for i in 0..r {
                        for j in 0..c {
                            v[2 * (i * c + j)] = at(x, i, j);
                        }
                    }
                    v
                };
                let (ap, bp) = (spread(ao, (m, k)), spread(bo, (k, n)));
                let (ao_s, bo_s) = (
                    Operand {
                        ptr: ap.as_ptr(),
                        rs: 2 * k,
                        cs: 2,
                    },
                    Operand {
                        ptr: bp.as_ptr(),
                        rs: 2 * n,
                        cs: 2,
                    },
                );
                for i0 in [0, 32] {
                    let (mut fast, mut slow) = (lines(len), lines(len));
                    // Not zeros: the vector paths must write the padding themselves.
                    halves(&mut fast).fill(0xBEEF);
                    // SAFETY: the operands hold their matrices.
                    unsafe {
                        pack_a(halves(&mut fast), ao, i0, m, k);
                        pack_a(halves(&mut slow), ao_s, i0, m, k);
                    }
                    assert!(
                        halves(&mut fast) == halves(&mut slow),
                        "A, k {k}, transposed {transposed}"
                    );
                    let packed = halves(&mut fast).to_vec();
                    for r in 0..BLOCK {
                        for kk in 0..k {
                            let p = split(at(ao, i0 + r, kk));
                            let idx = (kk / BLOCK) * KBLOCK + (r / 16) * TILE + (r % 16) * 32;
                            let idx = idx + pos(kk % BLOCK);
                            assert_eq!(
                                [packed[idx], packed[idx + 2 * TILE], packed[idx + 4 * TILE]],
                                p,
                                "A ({r}, {kk}), k {k}, transposed {transposed}"
                            );
                        }
                    }
                }
                for j0 in [0, 32] {
                    let (mut fast, mut slow) = (lines(len), lines(len));
                    halves(&mut fast).fill(0xBEEF);
                    // SAFETY: as above.
                    unsafe {
                        pack_b(halves(&mut fast), bo, j0, n, k);
                        pack_b(halves(&mut slow), bo_s, j0, n, k);
                    }
                    assert!(
                        halves(&mut fast) == halves(&mut slow),
                        "B, k {k}, transposed {transposed}"
                    );
                    let packed = halves(&mut fast).to_vec();
                    for c in 0..BLOCK {
                        for kk in 0..k {
                            let p = split(at(bo, kk, j0 + c));
                            let q = kk % BLOCK;
                            let idx = (kk / BLOCK) * KBLOCK + (c / 16) * TILE + (c % 16) * 2;
                            let idx = idx + (q % 16) * 32 + q / 16;
                            assert_eq!(
                                [packed[idx], packed[idx + 2 * TILE], packed[idx + 4 * TILE]],
                                p,
                                "B ({kk}, {c}), k {k}, transposed {transposed}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Model R's training products run here (forward, input and weight gradients); a decode
    /// step's prefill and layouts with neither stride 1 do not.
    #[test]
    fn model_r_products_suit_and_small_ones_do_not() {
        for (mkn, a) in [
            ((4096, 256, 1536), (256, 1)),
            ((4096, 1536, 256), (1536, 1)),
            ((256, 4096, 768), (1, 256)),
        ] {
            assert!(suits(mkn, a), "{mkn:?}");
        }
        assert!(!suits((128, 256, 1536), (256, 1)));
        assert!(
            !suits((6144, 96, 512), (96, 1)),
            "the quickstart's hidden 96"
        );
        assert!(!suits((4096, 256, 1536), (512, 2)));
        assert!(
            suits((1080, 576, 49_152), (576, 1)),
            "a large vocabulary's output layer, in pieces"
        );
    }

    /// A product whose packed B is over the bound runs in pieces (of B's columns where N is
    /// the long side, of whole K chunks where K is) and gives the one-pass product's bits.
    #[test]
    fn pieces_are_the_one_pass_product_to_the_bit() {
        if !available() {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        for (m, k, n) in [(96, 70, 200), (96, 2100, 64)] {
            let a = values(m * k, 8);
            let b = values(k * n, 9);
            let start = values(m * n, 10);
            let (ao, bo) = (operand(&a, (m, k), false), operand(&b, (k, n), true));
            for accumulate in [false, true] {
                let run = |max_packed: usize| {
                    let mut c = if accumulate {
                        start.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    // SAFETY: the operands hold their matrices; c is [m, n] and ours.
                    unsafe {
                        gemm_in_pieces(c.as_mut_ptr(), accumulate, (m, k, n), ao, bo, max_packed)
                    };
                    c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                // One byte: the smallest pieces (one column block, or one K chunk).
                assert!(run(1) == run(usize::MAX), "{m}x{k}x{n} +{accumulate}");
            }
        }
    }

    /// The three parts hold an f32 exactly.
    #[test]
    fn three_parts_sum_to_the_float() {
        for x in values(10_000, 3) {
            let p = split(x);
            let sum = widen(p[0]) as f64 + widen(p[1]) as f64 + widen(p[2]) as f64;
            assert_eq!(sum, x as f64, "{x}");
        }
    }

    /// Products of every operand layout, edges that are not whole blocks, and `+=`: each
    /// element within f32's accuracy of an f64 reference (no worse than a plain f32 sum in
    /// order, by more than a small factor), the same bits on one thread as on two.
    #[test]
    fn products_are_f32_accurate_and_thread_independent() {
        if !available() {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        let shapes = [(128, 64, 64), (160, 96, 96), (133, 70, 97), (256, 1100, 64)];
        for (m, k, n) in shapes {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = values(m * k, 4);
                let b = values(k * n, 5);
                let (ao, bo) = (operand(&a, (m, k), ta), operand(&b, (k, n), tb));
                let start = values(m * n, 6);
                let run = |threads: usize, accumulate: bool| {
                    let mut c = if accumulate {
                        start.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    // SAFETY: the operands hold their matrices; c is [m, n] and ours.
                    on_threads(threads, || unsafe {
                        gemm(c.as_mut_ptr(), accumulate, (m, k, n), ao, bo)
                    });
                    c
                };
                for accumulate in [false, true] {
                    let two = run(2, accumulate);
                    assert!(two == run(1, accumulate), "threads: {m}x{k}x{n} {ta} {tb}");
                    let base = |i: usize| if accumulate { start[i] } else { 0.0 };
                    let what = format!("{m}x{k}x{n} {ta} {tb} +{accumulate}");
                    assert_f32_accurate(&two, base, (m, k, n), (ao, bo), &what);
                }
            }
        }
    }

    /// Runs `f` on a pool of `threads` threads of its own.
    fn on_threads(threads: usize, f: impl FnOnce() + Send) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(f);
    }

    /// `c` (`[m, n]`, `base(i)` plus `a · b` at element i) against an f64 reference, next to a
    /// plain f32 sum's error: within 2x at the worst element and 1.5x summed over all.
    fn assert_f32_accurate(
        c: &[f32],
        base: impl Fn(usize) -> f32,
        (m, k, n): (usize, usize, usize),
        (ao, bo): (Operand, Operand),
        what: &str,
    ) {
        let (mut err, mut plain_err, mut sum_err, mut sum_plain) = (0f64, 0f64, 0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let b0 = base(i * n + j);
                let (mut exact, mut plain) = (b0 as f64, b0);
                for kk in 0..k {
                    let (x, y) = (at(ao, i, kk), at(bo, kk, j));
                    exact += x as f64 * y as f64;
                    plain = x.mul_add(y, plain);
                }
                let e = (c[i * n + j] as f64 - exact).abs();
                let pe = (plain as f64 - exact).abs();
                err = err.max(e);
                plain_err = plain_err.max(pe);
                sum_err += e;
                sum_plain += pe;
            }
        }
        assert!(
            err <= 2.0 * plain_err && sum_err <= 1.5 * sum_plain,
            "{what}: max {err:e} (plain {plain_err:e}), sum {sum_err:e} (plain {sum_plain:e})"
        );
    }

    /// A long product: parts of K (the last one short, and the last K block too), groups of
    /// rows, chunks of K within a part, and blocks past the edges of m and n. Its results are
    /// f32-accurate and the same bits on any number of threads.
    #[test]
    fn long_products_are_f32_accurate_and_thread_independent() {
        if !available() {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        // (300, 2100, 200): three parts (32, 32 and 2 K blocks), two groups of rows (288 and
        // 12), chunks of 12, 12 and 8 K blocks; (70, 1100, 40): two parts, one group.
        for ((m, k, n), (ta, tb)) in [
            ((300, 2100, 200), (true, false)),
            ((70, 1100, 40), (false, true)),
        ] {
            assert!(suits_long(n));
            let a = values(m * k, 11);
            let b = values(k * n, 12);
            let (ao, bo) = (operand(&a, (m, k), ta), operand(&b, (k, n), tb));
            let run = |threads: usize| {
                let mut c = vec![f32::NAN; m * n];
                // SAFETY: the operands hold their matrices; c is [m, n] and ours.
                on_threads(threads, || unsafe {
                    gemm_long(c.as_mut_ptr(), (m, k, n), ao, bo)
                });
                c
            };
            let two = run(2);
            let bits = |c: &[f32]| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for threads in [1, 3] {
                assert!(
                    bits(&two) == bits(&run(threads)),
                    "{m}x{k}x{n} on {threads} threads"
                );
            }
            assert_f32_accurate(
                &two,
                |_| 0.0,
                (m, k, n),
                (ao, bo),
                &format!("long {m}x{k}x{n}"),
            );
            // Tasks of one group of rows each (a tall output's split) change no bit: each
            // element's sum in a part runs the same chunks in the same order.
            let mut c = vec![f32::NAN; m * n];
            // SAFETY: as above.
            unsafe { gemm_long_in_tasks(c.as_mut_ptr(), (m, k, n), ao, bo, 1) };
            assert!(bits(&two) == bits(&c), "{m}x{k}x{n} in tasks of one group");
        }
    }
}
