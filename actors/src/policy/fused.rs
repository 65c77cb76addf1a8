//! Fused CPU kernels with hand-written backward passes, for the f32/f64 CPU paths of the
//! model and the loss: RMSNorm, RoPE (with the attention scale folded in), masked softmax,
//! SwiGLU's `silu(gate) * up`, and log-softmax. candle 0.11's own fused norm/softmax have no
//! CPU backward; these do, and the finite-difference tests check them. Other devices and
//! dtypes take the composed path (`fused::supported`).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::aligned::AlignedFloats;
use super::wide;

/// The fused kernels, each of which can be switched off for measurements and debugging
/// with `KLONGD_FUSED_OFF` (a comma-separated list of these names, or `all`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    RmsNorm,
    Attention,
    SiluMul,
    LogSoftmax,
    AdamW,
    LinearRows,
    /// A projection over the rows of an activation as one graph node ([`Linear`]).
    Linear,
    /// The few-row kernels of `skinny` (decode steps).
    Skinny,
    /// The one-pass causal attention of `flash` (training and prefill).
    Flash,
    /// The 16-lane (AVX-512F) products of `flash` and `skinny`, where the CPU has them.
    Avx512,
    /// The decode engine of `decode` (generation's steps after the prefill).
    Decode,
    /// A decoder layer's SwiGLU MLP as one graph node (`swiglu`).
    SwiGlu,
    /// A decoder layer's self-attention as one graph node (`attention_block`).
    AttentionBlock,
    /// All of a decoder's layers as one graph node (`decoder_stack`).
    DecoderStack,
    /// Products on AMX tiles (`amx`), where the CPU has them.
    Amx,
    /// The output layer's product on `gemm_new` ([`projection`]).
    Projection,
    /// The decoder stack's weight gradients handed to the gradient store directly, not
    /// through candle's `cat` backward (`decoder_stack::WeightGradients`).
    WeightGrads,
    /// Log-softmax and the gather of the targets' log-probabilities as one graph node
    /// ([`TokenLogprobs`]).
    TokenLogprobs,
}

pub(crate) fn enabled(kind: Kind) -> bool {
    static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let off = OFF.get_or_init(|| {
        std::env::var("KLONGD_FUSED_OFF")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let name = match kind {
        Kind::RmsNorm => "rms_norm",
        Kind::Attention => "attention",
        Kind::SiluMul => "silu_mul",
        Kind::LogSoftmax => "log_softmax",
        Kind::AdamW => "adamw",
        Kind::LinearRows => "linear_rows",
        Kind::Linear => "linear",
        Kind::Skinny => "skinny",
        Kind::Flash => "flash",
        Kind::Avx512 => "avx512",
        Kind::Decode => "decode",
        Kind::Amx => "amx",
        Kind::SwiGlu => "swiglu",
        Kind::AttentionBlock => "attention_block",
        Kind::DecoderStack => "decoder_stack",
        Kind::Projection => "projection",
        Kind::WeightGrads => "weight_grads",
        Kind::TokenLogprobs => "token_logprobs",
    };
    !off.iter().any(|o| o == "all" || o == name)
}

/// Whether the fused kernel `kind` serves `t` (CPU, f32 or f64, not switched off).
pub(crate) fn supported(t: &Tensor, kind: Kind) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && enabled(kind)
}

pub(crate) trait Real: WithDType + Default + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
    /// `exp` of every element, in place (vectorized for f32: see `vexp`).
    fn exp_all(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    fn lowest() -> Self;
    /// The elements of a CPU storage of this type, for ops that write in place.
    fn storage_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn exp_all(xs: &mut [Self]) {
        super::vexp::exp_in_place(xs)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn lowest() -> Self {
        f32::MIN
    }
    fn storage_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("expected f32 storage"),
        }
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn lowest() -> Self {
        f64::MIN
    }
    fn storage_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            _ => candle_core::bail!("expected f64 storage"),
        }
    }
}

/// The contiguous slice of a CPU storage under `l`.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fused op: non-contiguous input"),
    }
}

/// Runs `f` over a tensor's contiguous CPU data.
pub(crate) fn with_data<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(slice::<T>(c, l)?),
        _ => candle_core::bail!("fused op: CPU tensors only"),
    }
}

/// Runs `f` over several f32 tensors' contiguous CPU data at once (an op's operands and the
/// output's gradient, in a backward).
pub(crate) fn with_f32s<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let owned = ts.map(Tensor::contiguous);
    let mut tensors = Vec::with_capacity(N);
    for t in owned {
        tensors.push(t?);
    }
    let guards: Vec<_> = tensors.iter().map(Tensor::storage_and_layout).collect();
    let mut data = Vec::with_capacity(N);
    for (st, l) in &guards {
        match &**st {
            Storage::Cpu(c) => data.push(slice::<f32>(c, l)?),
            _ => candle_core::bail!("fused op: CPU tensors only"),
        }
    }
    match <[&[f32]; N]>::try_from(data) {
        Ok(data) => f(data),
        Err(_) => candle_core::bail!("fused op: {N} operands expected"),
    }
}

/// A gradient's data as a tensor shaped like its operand, for an op's `bwd`.
pub(crate) fn like(data: Vec<f32>, operand: &Tensor) -> Result<Option<Tensor>> {
    Tensor::from_vec(data, operand.shape(), operand.device()).map(Some)
}

/// What an op's forward keeps for its backward, handed over once: a second backward over one
/// forward (or one without a forward) is an error that names the op.
pub(crate) struct ForwardState<S> {
    op: &'static str,
    slot: std::sync::Mutex<Option<S>>,
}

impl<S> ForwardState<S> {
    pub(crate) fn new(op: &'static str) -> Self {
        ForwardState {
            op,
            slot: std::sync::Mutex::new(None),
        }
    }

    /// Keeps the forward's state (a later forward's replaces it).
    pub(crate) fn put(&self, state: S) -> Result<()> {
        *self.lock()? = Some(state);
        Ok(())
    }

    /// Takes the forward's state back.
    pub(crate) fn take(&self) -> Result<S> {
        match self.lock()?.take() {
            Some(state) => Ok(state),
            None => candle_core::bail!(
                "{}: backward without its forward's state (or twice)",
                self.op
            ),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<S>>> {
        self.slot
            .lock()
            .map_err(|_| candle_core::Error::msg(format!("{}: state lock poisoned", self.op)))
    }
}

/// Below this many elements an op runs on the calling thread alone.
const PAR_MIN: usize = 1 << 15;

/// `n` zeros. A large buffer is zeroed by the compute pool's threads together: on the calling
/// thread alone, `vec![0; n]` of a reused allocation is a serial `memset` while the other
/// threads wait (~3% of model R's training step).
pub(crate) fn zeroed<T: Copy + Send + Sync>(n: usize, zero: T) -> Vec<T> {
    if n < 4 * PAR_MIN {
        return vec![zero; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(zero, n));
    v
}

/// A copy of `x`, made by the compute pool's threads together when it is large.
pub(crate) fn copied<T: Copy + Send + Sync>(x: &[T]) -> Vec<T> {
    if x.len() < 4 * PAR_MIN {
        return x.to_vec();
    }
    let mut v = Vec::with_capacity(x.len());
    v.par_extend(x.par_iter().copied());
    v
}

/// An output that the code computing it writes whole, in order, without zeroing it first
/// (see [`written`]).
pub(crate) struct Fill<'a, T> {
    out: &'a mut [MaybeUninit<T>],
    /// Elements written so far: `out[..at]`.
    at: usize,
}

impl<T: Copy> Fill<'_, T> {
    /// Elements this run holds.
    pub(crate) fn len(&self) -> usize {
        self.out.len()
    }

    /// Writes `src` after what is written (panics past the run's end).
    #[inline]
    pub(crate) fn extend(&mut self, src: &[T]) {
        let end = self.at + src.len();
        for (d, &v) in self.out[self.at..end].iter_mut().zip(src) {
            d.write(v);
        }
        self.at = end;
    }
}

/// `n` elements, rows of `row`, written once each without a zeroing pass first: zeroing
/// outputs that their op then overwrites whole moved ~230 MB per model R training step.
/// The rows are shared out as [`par_rows`] does (one contiguous run per thread), and
/// `f(first_row, fill)` writes its run's every element, in order, through `fill`; its result
/// per run comes back in run order. Panics if a run is left short (the elements are then
/// never read).
pub(crate) fn written<T: Copy + Send + Sync, R: Send>(
    n: usize,
    row: usize,
    f: impl Fn(usize, &mut Fill<'_, T>) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    written_in(Vec::with_capacity(n), n, row, f)
}

/// [`written`] into the spare capacity of `v` (empty, with room for `n`): for memory prepared
/// before its first write (the decode engine's weights ask for huge pages there).
pub(crate) fn written_in<T: Copy + Send + Sync, R: Send>(
    v: Vec<T>,
    n: usize,
    row: usize,
    f: impl Fn(usize, &mut Fill<'_, T>) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    let per = rows_per_run(n, row);
    fill_runs(v, n, row, per, f)
}

/// [`written`] in runs of `per` rows (the last may be shorter), taken by the compute pool's
/// threads as each comes free: for work whose cost varies along the rows or with the host's
/// moment, where one run per thread leaves one thread waiting for the other. The runs'
/// results come back in run order.
pub(crate) fn written_by<T: Copy + Send + Sync, R: Send>(
    n: usize,
    row: usize,
    per: usize,
    f: impl Fn(usize, &mut Fill<'_, T>) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    let per = rows_per_run(n, row).map(|_| per.max(1));
    fill_runs(Vec::with_capacity(n), n, row, per, f)
}

/// The body of [`written_in`] and [`written_by`]: runs of `per` rows in parallel, or one
/// run on the calling thread (`None`).
fn fill_runs<T: Copy + Send + Sync, R: Send>(
    mut v: Vec<T>,
    n: usize,
    row: usize,
    per: Option<usize>,
    f: impl Fn(usize, &mut Fill<'_, T>) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    assert!(
        v.is_empty() && v.capacity() >= n,
        "written_in: a vector of {} elements with room for {}, asked for {n}",
        v.len(),
        v.capacity()
    );
    let results = fill_slice(&mut v.spare_capacity_mut()[..n], row, per, f);
    // SAFETY: `fill_slice` returned, so it wrote each of the n elements it was given, the
    // first n of v's allocation (a failed assertion there unwinds before this line, leaving v
    // empty). So v's first n elements are initialized.
    unsafe { v.set_len(n) };
    (v, results)
}

/// [`written`] into 64-byte-aligned storage: for the attention kernels' operands, whose
/// 16-float loads each touched two cache lines when their rows started off a line.
pub(crate) fn written_aligned<R: Send>(
    n: usize,
    row: usize,
    f: impl Fn(usize, &mut Fill<'_, f32>) -> R + Sync,
) -> (AlignedFloats, Vec<R>) {
    let per = rows_per_run(n, row);
    // SAFETY: `fill_slice` returns only after writing every element it is given (it panics
    // otherwise).
    unsafe { AlignedFloats::written(n, |spare| fill_slice(spare, row, per, f)) }
}

/// Writes every element of `spare` (rows of `row`) through `f`, in runs of `per` rows in
/// parallel or one run on the calling thread (`None`); returns only once every element is
/// written, and panics otherwise.
fn fill_slice<T: Copy + Send + Sync, R: Send>(
    spare: &mut [MaybeUninit<T>],
    row: usize,
    per: Option<usize>,
    f: impl Fn(usize, &mut Fill<'_, T>) -> R + Sync,
) -> Vec<R> {
    let n = spare.len();
    assert!(
        n == 0 || (row > 0 && n.is_multiple_of(row)),
        "{n} elements in rows of {row}"
    );
    let run = |first: usize, out: &mut [MaybeUninit<T>]| {
        let mut fill = Fill { out, at: 0 };
        let r = f(first, &mut fill);
        assert_eq!(fill.at, fill.out.len(), "an output run left unwritten");
        r
    };
    // The runs are chunks of `spare` that together cover it; each run's `Fill` writes each of
    // its elements once, in order, and `at` reaching the run's length is asserted.
    match per {
        None => vec![run(0, spare)],
        Some(per) => spare
            .par_chunks_mut(per * row)
            .enumerate()
            .map(|(i, c)| run(i * per, c))
            .collect(),
    }
}

/// Rows per thread's run when `len` elements in rows of `row` are shared out, one contiguous
/// run per thread; `None` where one run on the calling thread does (one thread, or too little
/// work to share).
fn rows_per_run(len: usize, row: usize) -> Option<usize> {
    let rows = len / row.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    (threads > 1 && len >= PAR_MIN).then(|| rows.div_ceil(threads))
}

/// Splits `out` (rows of `row` elements) into one contiguous run of rows per thread and
/// calls `f(first_row, rows)` on each, in parallel.
pub(crate) fn par_rows<T: Send>(out: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let Some(per) = rows_per_run(out.len(), row) else {
        f(0, out);
        return;
    };
    out.par_chunks_mut(per * row)
        .enumerate()
        .for_each(|(i, c)| f(i * per, c));
}

/// Dispatches on the dtype of a CPU storage to a generic body.
macro_rules! dispatch {
    ($s:expr, $body:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $body::<f32>($($arg),*),
            CpuStorage::F64(_) => $body::<f64>($($arg),*),
            _ => candle_core::bail!("fused op: f32/f64 only"),
        }
    };
}

// ---------------------------------------------------------------- gemm

/// A matrix operand of [`gemm_into`]: element (i, j) is `data[i · rs + j · cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// The transpose: the same data, rows and columns swapped.
    pub fn t(self) -> Self {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// A row-major matrix with rows of `cols` elements.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with rows of `cols` elements.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether an `r x c` matrix with these strides lies inside `data`.
    fn holds(&self, r: usize, c: usize) -> bool {
        if self.rs > isize::MAX as usize || self.cs > isize::MAX as usize {
            return false;
        }
        if r == 0 || c == 0 {
            return true;
        }
        let last = (r - 1)
            .checked_mul(self.rs)
            .zip((c - 1).checked_mul(self.cs))
            .and_then(|(a, b)| a.checked_add(b));
        last.is_some_and(|l| l < self.data.len())
    }
}

/// `dst = a · b`, or `dst += a · b` with `accumulate`, for a `[m, k]`, b `[k, n]` and dst
/// `[m, n]` row-major: the kernels of candle's CPU matmul (`gemm`), on the compute pool, with
/// the thread count candle gives them. Called here, a product neither zeroes its output first
/// (candle's does) nor needs a separate add to accumulate.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    accumulate: bool,
    (m, k, n): (usize, usize, usize),
    a: Mat,
    b: Mat,
) -> Result<()> {
    if m.checked_mul(n) != Some(dst.len()) || !a.holds(m, k) || !b.holds(k, n) {
        candle_core::bail!("gemm: operands do not hold [{m}, {k}] x [{k}, {n}]");
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let threads = candle_core::utils::get_num_threads();
    // SAFETY: every operand holds its matrix (checked above), `dst` is an initialized,
    // exclusively borrowed `[m, n]`, and gemm reads and writes nothing else.
    unsafe { gemm_raw(dst.as_mut_ptr(), accumulate, (m, k, n), a, b, threads) };
    Ok(())
}

/// Sums at least this long, and at least twice as long as the output is wide or tall, run as
/// two halves side by side (see [`gemm_new`]).
const SPLIT_K_MIN: usize = 2048;

/// A long sum's output at least this many times taller than wide is computed as its
/// transpose (see [`gemm_new`]).
const TALL: usize = 4;

/// `a · b` for a `[m, k]` and b `[k, n]`, into a new row-major `[m, n]` that is never zeroed.
///
/// A long sum over a small output (a weight's gradient sums over every token of the batch) is
/// computed as two halves side by side, then added: gemm shares out an output's blocks, and
/// an output of a few hundred rows and columns leaves its threads short of work (model R's
/// weight gradients ran at ~180-215 GFLOP/s whole, ~235-275 in halves, on this 2-core host;
/// on AMX tiles, 210-360 whole and 315-400 in halves, each half's B packed by its own thread).
/// Always two halves, whatever the thread count, so results do not depend on it. On AMX tiles
/// the product runs as [`super::amx::gemm_long`] instead: parts of K, each packed and summed
/// by one task.
///
/// Elsewhere, a long sum's output at least [`TALL`] times taller than wide (the MLP's stacked
/// gate/up weight gradient, `[2F, K]`) is computed as its transpose `bᵀ · aᵀ` and transposed
/// back: gemm lays every product out with the output's columns contiguous, and for this shape
/// the transposed layout's kernels ran faster. Model R's `[1536, 4096] x [4096, 256]`:
/// 0.83x the time alone, transpose included (in one process, alternating, 11 pairs), 0.92-0.95x
/// inside training steps (medians of 44 calls each way, two runs); shapes 2-3x taller or
/// wider than wide gained nothing or lost (1.05-1.09x), hence the threshold.
pub(crate) fn gemm_new(m: usize, k: usize, n: usize, a: Mat, b: Mat) -> Result<Vec<f32>> {
    let Some(len) = m.checked_mul(n) else {
        candle_core::bail!("gemm: [{m}, {n}] overflows");
    };
    if !a.holds(m, k) || !b.holds(k, n) {
        candle_core::bail!("gemm: operands do not hold [{m}, {k}] x [{k}, {n}]");
    }
    if k == 0 {
        return Ok(vec![0.0; len]);
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    if k < SPLIT_K_MIN || k < 2 * m.max(n) || len == 0 {
        return Ok(gemm_fresh(len, (m, k, n), a, b, threads));
    }
    #[cfg(target_arch = "x86_64")]
    if on_amx((m, k, n), &a) && super::amx::suits_long(n) {
        // The halves, each an AMX product of its own, read B packed by both threads from L3;
        // gemm_long's tasks pack what they read (model R's step ~5% shorter, session 27 in
        // `benches/peer/README.md`).
        let mut dst: Vec<f32> = Vec::with_capacity(len);
        let operand = |x: Mat| super::amx::Operand {
            ptr: x.data.as_ptr(),
            rs: x.rs,
            cs: x.cs,
        };
        // SAFETY: the operands hold their matrices (checked above), k > 0, `dst` has room
        // for `m · n` floats, and `gemm_long` writes every one of them.
        unsafe {
            super::amx::gemm_long(dst.as_mut_ptr(), (m, k, n), operand(a), operand(b));
            dst.set_len(len);
        }
        return Ok(dst);
    }
    if m >= TALL * n {
        // Computed as its transpose, bᵀ · aᵀ `[n, m]`, then transposed back.
        let t = gemm_new(n, k, m, b.t(), a.t())?;
        return Ok(transposed(&t, n, m));
    }
    let h = k / 2;
    // The halves of the sum: a's first h columns and b's first h rows, then the rest (both
    // hold their parts, as a and b hold the whole).
    let (a0, b0) = (a, b);
    let a1 = Mat {
        data: &a.data[h * a.cs..],
        ..a
    };
    let b1 = Mat {
        data: &b.data[h * b.rs..],
        ..b
    };
    let per_half = (threads / 2).max(1);
    let (mut first, second) = rayon::join(
        || gemm_fresh(len, (m, h, n), a0, b0, per_half),
        || gemm_fresh(len, (m, k - h, n), a1, b1, per_half),
    );
    add_into(&mut first, &second);
    Ok(first)
}

/// Output rows a transpose builds at a time: one 64-byte line of each source row.
const TRANSPOSE_ROWS: usize = 16;

/// The transpose `[c, r]` of a row-major `[r, c]`, built by the compute pool's threads. Each
/// takes [`TRANSPOSE_ROWS`] output rows at a time, reading that many adjacent floats of every
/// source row, so every line it reads is used whole.
pub(crate) fn transposed(src: &[f32], r: usize, c: usize) -> Vec<f32> {
    assert_eq!(
        src.len(),
        r * c,
        "transposed: {} floats for [{r}, {c}]",
        src.len()
    );
    if r == 0 || c == 0 {
        return Vec::new();
    }
    let (out, _) = written(r * c, r, |first, fill| {
        let rows = fill.len() / r;
        let mut block = vec![0f32; TRANSPOSE_ROWS * r];
        for at in (first..first + rows).step_by(TRANSPOSE_ROWS) {
            let n = TRANSPOSE_ROWS.min(first + rows - at);
            for (j, line) in src.chunks_exact(c).enumerate() {
                for (q, v) in line[at..at + n].iter().enumerate() {
                    block[q * r + j] = *v;
                }
            }
            fill.extend(&block[..n * r]);
        }
    });
    out
}

/// `a · b` into a new `[m, n]` (`len` = m · n) on `threads` threads; the operands hold their
/// matrices and k > 0 (checked by the caller).
fn gemm_fresh(
    len: usize,
    (m, k, n): (usize, usize, usize),
    a: Mat,
    b: Mat,
    threads: usize,
) -> Vec<f32> {
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the operands hold their matrices (the caller checked) and `dst` has room for
    // `m · n` floats. With `read_dst` false and k > 0, gemm writes every element of the
    // `[m, n]` output without reading it, so all `len` elements are initialized before
    // `set_len`.
    unsafe {
        gemm_raw(dst.as_mut_ptr(), false, (m, k, n), a, b, threads);
        dst.set_len(len);
    }
    dst
}

/// Whether [`gemm_raw`] runs a `[m, k] x [k, n]` product on AMX tiles (`amx`).
fn on_amx(mkn: (usize, usize, usize), a: &Mat) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::amx::suits(mkn, (a.rs, a.cs)) && enabled(Kind::Amx) && super::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// # Safety
/// `a` and `b` hold their `[m, k]` and `[k, n]` matrices (k > 0), `dst` points to `m · n`
/// writable floats that nothing else accesses during the call, initialized if `accumulate`.
unsafe fn gemm_raw(
    dst: *mut f32,
    accumulate: bool,
    (m, k, n): (usize, usize, usize),
    a: Mat,
    b: Mat,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if on_amx((m, k, n), &a) {
        let operand = |x: Mat| super::amx::Operand {
            ptr: x.data.as_ptr(),
            rs: x.rs,
            cs: x.cs,
        };
        // SAFETY: the caller's contract, which is amx::gemm's; `available` checked.
        unsafe { super::amx::gemm(dst, accumulate, (m, k, n), operand(a), operand(b)) };
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract; `holds` checked that the strides fit `isize`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

// ---------------------------------------------------------------- Linear

/// `x · wᵀ` over the rows of x `[.., K]` with w `[N, K]`, as one graph node.
///
/// Composed, the same product is four nodes: the rows reshaped to `[M, K]`, `w.t()`, the
/// matmul, and the result reshaped back. candle's backward gives every node's input a
/// gradient of its own, zeroed and then added to (`GradStore::or_insert` + `add`), so each
/// reshape costs a zeroing and a full add over an activation: in model R's training step that
/// was ~15% of the time (`__memset` and `binary_map_vec_par` in a profile). Here the backward
/// computes the two products candle's matmul backward computes, with the same operands and
/// layouts, so the gradients are the same numbers.
///
/// With `heads`, x is `[B, T, K]` and the output is split into attention heads in the same
/// node: `[B, T, H, N/H]`, or `[B, H, T, N/H]` with `heads_first` (a copy, as the composed
/// transpose-and-contiguous makes).
pub(crate) struct Linear {
    pub heads: Option<(usize, bool)>,
}

/// `[B, T, H, D]` (as `[B·T, H·D]` rows) -> `[B, H, T, D]`.
fn heads_first<T: Copy + Default>(y: &[T], (b, t, h, d): (usize, usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::default(); y.len()];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let src = ((bi * t + ti) * h + hi) * d;
                let dst = ((bi * h + hi) * t + ti) * d;
                out[dst..dst + d].copy_from_slice(&y[src..src + d]);
            }
        }
    }
    out
}

impl Linear {
    /// `(M, K, N)` and the layouts of x as `[M, K]` and of `wᵀ` as `[K, N]`.
    fn operands(lx: &Layout, lw: &Layout) -> Result<((usize, usize, usize), Layout, Layout)> {
        let k = *lx.dims().last().unwrap_or(&0);
        let (n, kw) = lw.shape().dims2()?;
        if k == 0 || kw != k {
            candle_core::bail!(
                "klong-linear: x {:?} and w {:?} do not agree",
                lx.dims(),
                lw.dims()
            );
        }
        let m = lx.shape().elem_count() / k;
        let Some((start, _)) = lx.contiguous_offsets() else {
            candle_core::bail!("klong-linear: non-contiguous input");
        };
        Ok((
            (m, k, n),
            Layout::contiguous_with_offset((m, k), start),
            lw.transpose(0, 1)?,
        ))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "klong-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let ((m, k, n), lx2, lwt) = Self::operands(lx, lw)?;
        // The storage-level product `Tensor::matmul` runs for `x2.matmul(&w.t())`.
        let y = x.matmul(w, (1, m, n, k), &lx2, &lwt)?;
        let Some((h, first)) = self.heads else {
            let mut dims = lx.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            return Ok((y, Shape::from(dims)));
        };
        let (b, t, _) = lx.shape().dims3()?;
        if h == 0 || n % h != 0 {
            candle_core::bail!("klong-linear: {n} outputs do not split into {h} heads");
        }
        let d = n / h;
        if !first {
            return Ok((y, Shape::from((b, t, h, d))));
        }
        let dims = (b, t, h, d);
        let y = match y {
            CpuStorage::F32(v) => CpuStorage::F32(heads_first(&v, dims)),
            CpuStorage::F64(v) => CpuStorage::F64(heads_first(&v, dims)),
            _ => candle_core::bail!("klong-linear: f32/f64 only"),
        };
        Ok((y, Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // candle's matmul backward for `x2.matmul(&wt)`: dx2 = g·wtᵀ (wtᵀ is w as stored),
        // dwt = x2ᵀ·g; dw = dwtᵀ.
        let (x, w) = (x.detach(), w.detach());
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        let x2 = x.reshape((m, k))?;
        let g2 = match self.heads {
            // [B, H, T, D] back to rows (a copy, as the composed transpose's gradient).
            Some((_, true)) => g.transpose(1, 2)?.contiguous()?.reshape((m, n))?,
            _ => g.reshape((m, n))?,
        };
        let dx = g2.matmul(&w)?.reshape(x.shape())?;
        let dw = x2.t()?.matmul(&g2)?.t()?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x · wᵀ` over the rows of `x` `[.., K]`, w `[N, K]` -> `[.., N]` (one graph node).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, Linear { heads: None })
}

/// `x · wᵀ` for f32 rows x `[.., K]` and w `[N, K]` -> `[.., N]` (one graph node), the product
/// and both gradients through [`gemm_new`], so on AMX tiles where they suit: the output layer,
/// whose products `Linear` leaves to candle's matmul (the same bits as the composed graph)
/// and thus to gemm's AVX-512 kernels. Its results are f32-accurate, not those bits. Rows of
/// any leading shape (`[B, T, K]` in training), so that no reshape node sits on either side:
/// candle's backward would zero and add a gradient of the whole activation for each.
pub(crate) fn projection(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Projection)
}

struct Projection;

impl Projection {
    /// (m, k, n) of x `[.., K]` (m rows: the product of the leading dims) and w `[N, K]`.
    fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
        match (x.split_last(), w) {
            (Some((&k, rows)), &[n, wk]) if k == wk && !rows.is_empty() => {
                Ok((rows.iter().product(), k, n))
            }
            _ => candle_core::bail!("klong-projection: x {x:?} and w {w:?} do not agree"),
        }
    }

    /// x's shape with its last dim (K) replaced by n.
    fn out_shape(x: &[usize], n: usize) -> Shape {
        let mut dims = x.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Shape::from(dims)
    }
}

impl CustomOp2 for Projection {
    fn name(&self) -> &'static str {
        "klong-projection"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = Self::dims(lx.dims(), lw.dims())?;
        let (x, w) = (slice::<f32>(x, lx)?, slice::<f32>(w, lw)?);
        let y = gemm_new(m, k, n, Mat::rows(x, k), Mat::transposed(w, k))?;
        Ok((CpuStorage::F32(y), Self::out_shape(lx.dims(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k, n) = Self::dims(x.dims(), w.dims())?;
        let (dx, dw) = with_data::<f32, _>(x, |xd| {
            with_data::<f32, _>(w, |wd| {
                with_data::<f32, _>(g, |gd| {
                    // dx = g · w ([M, N] x [N, K]); dw = gᵀ · x ([N, M] x [M, K]).
                    let dx = gemm_new(m, n, k, Mat::rows(gd, n), Mat::rows(wd, k))?;
                    let dw = gemm_new(n, m, k, Mat::transposed(gd, n), Mat::rows(xd, k))?;
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, (n, k), w.device())?),
        ))
    }
}

/// `x · wᵀ` for x `[B, T, K]` split into `heads`: `[B, T, H, D]`, or `[B, H, T, D]` with
/// `heads_first` (one graph node).
pub(crate) fn linear_heads(
    x: &Tensor,
    w: &Tensor,
    heads: usize,
    heads_first: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        w,
        Linear {
            heads: Some((heads, heads_first)),
        },
    )
}

// ---------------------------------------------------------------- RMSNorm

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension. x: [.., N], w: [N].
pub(crate) struct RmsNorm {
    pub eps: f64,
}

fn rms_fwd<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let out = rms_forward(slice::<T>(x, lx)?, slice::<T>(w, lw)?, eps);
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

/// RMSNorm of the rows of x (rows of `w.len()`), in parallel.
pub(crate) fn rms_forward<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let eps = T::from_f64(eps);
    let nn = T::from_f64(n as f64);
    let (out, _) = written(x.len(), n, |r0, out| {
        wide::run(RmsRows {
            x,
            w,
            nn,
            eps,
            r0,
            out,
        })
    });
    out
}

/// RMSNorm of a run of rows from `r0` on, into `out` (a [`wide::Kernel`]).
struct RmsRows<'a, 'b, 'c, T> {
    x: &'a [T],
    w: &'a [T],
    nn: T,
    eps: T,
    r0: usize,
    out: &'b mut Fill<'c, T>,
}

impl<T: Real> wide::Kernel for RmsRows<'_, '_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn call(self) {
        let RmsRows {
            x,
            w,
            nn,
            eps,
            r0,
            out,
        } = self;
        let n = w.len();
        let mut o = vec![T::zero(); n];
        for i in 0..out.len() / n.max(1) {
            let xr = &x[(r0 + i) * n..(r0 + i + 1) * n];
            rms_row(xr, w, (nn, eps), &mut o);
            out.extend(&o);
        }
    }
}

/// One row of RMSNorm: `out = x / sqrt(Σx² / n + eps) · w`, the sum in [`wide::sum_sq`]'s
/// order. The decode engine's norm calls this too, so that both give the same bits.
#[inline(always)]
pub(crate) fn rms_row<T: Real>(x: &[T], w: &[T], (nn, eps): (T, T), out: &mut [T]) {
    let s = (wide::sum_sq(x) / nn + eps).sqrt();
    for ((o, &v), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = v / s * wv;
    }
}

/// The backward of a block's `x + f(rms_norm(x))` around f: x's gradient (through the norm,
/// plus the residual's `g` unchanged) and the norm weight's, from the gradient of the
/// normalized input `d_normed`.
pub(crate) fn pre_norm_residual_backward(
    x: &[f32],
    (w_norm, eps): (&[f32], f64),
    d_normed: &[f32],
    g: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (mut dx, d_norm) = rms_backward(x, w_norm, d_normed, eps);
    add_into(&mut dx, g);
    (dx, d_norm)
}

/// `dst += src`, elementwise, in parallel.
pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
    const CHUNK: usize = 4096;
    let n = dst.len().min(src.len());
    par_rows(&mut dst[..n], CHUNK, |r0, d| {
        wide::run(AddInto(d, &src[r0 * CHUNK..]))
    });
}

/// `dst += src` over dst's length (a [`wide::Kernel`]).
struct AddInto<'a, 'b>(&'a mut [f32], &'b [f32]);

impl wide::Kernel for AddInto<'_, '_> {
    type Out = ();
    #[inline(always)]
    fn call(self) {
        for (a, b) in self.0.iter_mut().zip(self.1) {
            *a += *b;
        }
    }
}

/// (dx, dw) for RMSNorm.
fn rms_bwd<T: Real>(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (dx, dw) = with_data::<T, _>(x, |x| {
        with_data::<T, _>(w, |w| {
            with_data::<T, _>(g, |g| Ok(rms_backward(x, w, g, eps)))
        })
    })?;
    Ok((
        Tensor::from_vec(dx, x.shape(), x.device())?,
        Tensor::from_vec(dw, w.shape(), w.device())?,
    ))
}

/// (dx, dw) of `rms_forward` for the output's gradient `g`, in parallel over rows (dw's
/// per-thread partial sums added in a fixed order).
pub(crate) fn rms_backward<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let n = w.len();
    let eps = T::from_f64(eps);
    let nn = T::from_f64(n as f64);
    // dw's partial sums per run of rows, summed after in run order.
    let (dx, partial) = written(x.len(), n, |r0, dx| {
        wide::run(RmsGradRows {
            x,
            w,
            g,
            nn,
            eps,
            r0,
            dx,
        })
    });
    let mut dw = vec![T::zero(); n];
    for p in &partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += *b;
        }
    }
    (dx, dw)
}

/// RMSNorm's backward over a run of rows from `r0` on: their dx into `dx`, and the run's
/// part of dw returned (a [`wide::Kernel`]).
struct RmsGradRows<'a, 'b, 'c, T> {
    x: &'a [T],
    w: &'a [T],
    g: &'a [T],
    nn: T,
    eps: T,
    r0: usize,
    dx: &'b mut Fill<'c, T>,
}

impl<T: Real> wide::Kernel for RmsGradRows<'_, '_, '_, T> {
    type Out = Vec<T>;
    #[inline(always)]
    fn call(self) -> Vec<T> {
        let RmsGradRows {
            x,
            w,
            g,
            nn,
            eps,
            r0,
            dx,
        } = self;
        let n = w.len();
        let mut dw = vec![T::zero(); n];
        let mut d = vec![T::zero(); n];
        for i in 0..dx.len() / n.max(1) {
            let r = r0 + i;
            let (xr, gr) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
            let ss = wide::sum_sq(xr);
            let dot = wide::sum_prod3(w, gr, xr);
            let s = (ss / nn + eps).sqrt();
            // d/dx_j of x_j / s: 1/s - x_j Σ(...) / (N s³).
            let c = dot / (nn * s * s * s);
            for k in 0..n {
                d[k] = w[k] * gr[k] / s - xr[k] * c;
                dw[k] += gr[k] * (xr[k] / s);
            }
            dx.extend(&d);
        }
        dw
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "klong-rms-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(x, rms_fwd(x, lx, w, lw, self.eps))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = match x.dtype() {
            DType::F32 => rms_bwd::<f32>(x, w, g, self.eps)?,
            DType::F64 => rms_bwd::<f64>(x, w, g, self.eps)?,
            dt => candle_core::bail!("klong-rms-norm: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw)))
    }
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

// ---------------------------------------------------------------- RoPE

/// RoPE on x `[B, T, H, D]` (the projection's layout) with cos/sin `[B, T, D]`, times
/// `scale`, written out as `[B, H, T, D]`: HF's `x·cos + rotate_half(x)·sin`.
pub(crate) struct Rope {
    pub scale: f64,
}

/// One head vector: out = scale · (x·cos + rot(x)·sin), rot(x) = (-x2, x1).
#[inline]
pub(crate) fn rope_vec<T: Real>(x: &[T], c: &[T], s: &[T], scale: T, out: &mut [T]) {
    let h = x.len() / 2;
    for i in 0..h {
        out[i] = (x[i] * c[i] - x[i + h] * s[i]) * scale;
        out[i + h] = (x[i + h] * c[i + h] + x[i] * s[i + h]) * scale;
    }
}

/// The transpose of `rope_vec` (its gradient): dx = scale · (g·cos + rotᵀ(g·sin)).
#[inline]
pub(crate) fn rope_vec_t<T: Real>(g: &[T], c: &[T], s: &[T], scale: T, out: &mut [T]) {
    let h = g.len() / 2;
    for i in 0..h {
        out[i] = (g[i] * c[i] + g[i + h] * s[i + h]) * scale;
        out[i + h] = (g[i + h] * c[i + h] - g[i] * s[i]) * scale;
    }
}

fn rope_fwd<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    c: &CpuStorage,
    lc: &Layout,
    s: &CpuStorage,
    ls: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let (b, t, h, d) = lx.shape().dims4()?;
    let (x, c, s) = (slice::<T>(x, lx)?, slice::<T>(c, lc)?, slice::<T>(s, ls)?);
    let scale = T::from_f64(scale);
    let mut out = vec![T::zero(); x.len()];
    // Output rows are (b, h, t) vectors of d.
    par_rows(&mut out, t * d, |r0, out| {
        for (i, o) in out.chunks_mut(t * d).enumerate() {
            let (bi, hi) = ((r0 + i) / h, (r0 + i) % h);
            for ti in 0..t {
                let xo = ((bi * t + ti) * h + hi) * d;
                let co = (bi * t + ti) * d;
                rope_vec(
                    &x[xo..xo + d],
                    &c[co..co + d],
                    &s[co..co + d],
                    scale,
                    &mut o[ti * d..(ti + 1) * d],
                );
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from((b, h, t, d))))
}

fn rope_bwd<T: Real>(
    g: &Tensor,
    c: &Tensor,
    s: &Tensor,
    shape: &Shape,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, d) = shape.dims4()?;
    let scale = T::from_f64(scale);
    let dx = with_data::<T, _>(g, |g| {
        with_data::<T, _>(c, |c| {
            with_data::<T, _>(s, |s| {
                let mut dx = vec![T::zero(); g.len()];
                // dx rows are (b, t) blocks of h·d; g is [B, H, T, D].
                par_rows(&mut dx, h * d, |r0, dx| {
                    for (i, o) in dx.chunks_mut(h * d).enumerate() {
                        let (bi, ti) = ((r0 + i) / t, (r0 + i) % t);
                        let co = (bi * t + ti) * d;
                        for hi in 0..h {
                            let go = ((bi * h + hi) * t + ti) * d;
                            rope_vec_t(
                                &g[go..go + d],
                                &c[co..co + d],
                                &s[co..co + d],
                                scale,
                                &mut o[hi * d..(hi + 1) * d],
                            );
                        }
                    }
                });
                Ok(dx)
            })
        })
    })?;
    let _ = b;
    Tensor::from_vec(dx, shape, g.device())
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "klong-rope"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        c: &CpuStorage,
        lc: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(x, rope_fwd(x, lx, c, lc, s, ls, self.scale))
    }
    fn bwd(
        &self,
        x: &Tensor,
        c: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // cos/sin come from positions, which are constants.
        let dx = match x.dtype() {
            DType::F32 => rope_bwd::<f32>(g, c, s, x.shape(), self.scale)?,
            DType::F64 => rope_bwd::<f64>(g, c, s, x.shape(), self.scale)?,
            dt => candle_core::bail!("klong-rope: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), None, None))
    }
}

/// x `[B, T, H, D]`, cos/sin `[B, T, D]` -> `[B, H, T, D]`, scaled.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { scale })
}

// ---------------------------------------------------------------- masked softmax

/// softmax(att + mask) over the last dimension. att: `[B, R, S]` viewed as rows of S
/// (R rows per batch entry), mask `[B, T, S]` (additive); att row r of batch entry b takes
/// mask row `r % T` (so att may be `[B, H, T, S]` or GQA's `[B, Hkv, n_rep·T, S]`).
pub(crate) struct MaskedSoftmax;

fn softmax_fwd<T: Real>(
    a: &CpuStorage,
    la: &Layout,
    m: &CpuStorage,
    lm: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let dims = lm.shape().dims();
    let (b, t, s) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
    let (a, m) = (slice::<T>(a, la)?, slice::<T>(m, lm)?);
    let per_batch = a.len() / b.max(1);
    let half_masked = T::from_f64(f64::from(super::model::MASKED) / 2.0);
    let mut out = vec![T::zero(); a.len()];
    par_rows(&mut out, s, |r0, out| {
        for (i, o) in out.chunks_mut(s).enumerate() {
            let r = r0 + i;
            let (bi, ri) = (r * s / per_batch, (r * s % per_batch) / s);
            let mr = &m[(bi * t + ri % t) * s..(bi * t + ri % t + 1) * s];
            let ar = &a[r * s..(r + 1) * s];
            let mut mx = T::lowest();
            for ((o, &av), &mv) in o.iter_mut().zip(ar).zip(mr) {
                let z = av + mv;
                *o = z;
                if z > mx {
                    mx = z;
                }
            }
            let mut sum = T::zero();
            if mx > half_masked {
                // Some key is visible: masked keys sit ~1e9 below the max, where exp is
                // exactly 0, so they are set to 0 without computing it (causal rows skip
                // half their exps, and glibc's slow underflow path).
                for (o, &mv) in o.iter_mut().zip(mr) {
                    let e = if mv < half_masked {
                        T::zero()
                    } else {
                        (*o - mx).exp()
                    };
                    *o = e;
                    sum += e;
                }
            } else {
                for o in o.iter_mut() {
                    let e = (*o - mx).exp();
                    *o = e;
                    sum += e;
                }
            }
            let inv = T::one() / sum;
            for o in o.iter_mut() {
                *o *= inv;
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), la.shape().clone()))
}

/// dz = y ⊙ (g − Σ g⊙y), row-wise.
fn softmax_bwd<T: Real>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let s = y.dim(candle_core::D::Minus1)?;
    let dz = with_data::<T, _>(y, |y| {
        with_data::<T, _>(g, |g| {
            let mut dz = vec![T::zero(); y.len()];
            par_rows(&mut dz, s, |r0, dz| {
                for (i, d) in dz.chunks_mut(s).enumerate() {
                    let r = r0 + i;
                    let (yr, gr) = (&y[r * s..(r + 1) * s], &g[r * s..(r + 1) * s]);
                    let mut dot = T::zero();
                    for (&yv, &gv) in yr.iter().zip(gr) {
                        dot += yv * gv;
                    }
                    for ((d, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                        *d = yv * (gv - dot);
                    }
                }
            });
            Ok(dz)
        })
    })?;
    Tensor::from_vec(dz, y.shape(), y.device())
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "klong-masked-softmax"
    }
    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        m: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(a, softmax_fwd(a, la, m, lm))
    }
    fn bwd(
        &self,
        a: &Tensor,
        _m: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The mask is a constant.
        let da = match a.dtype() {
            DType::F32 => softmax_bwd::<f32>(res, g)?,
            DType::F64 => softmax_bwd::<f64>(res, g)?,
            dt => candle_core::bail!("klong-masked-softmax: unsupported dtype {dt:?}"),
        };
        Ok((Some(da), None))
    }
}

/// softmax(att + mask) with att `[B, X, R, S]` and mask `[B, 1, T, S]`, `R` a multiple
/// of `T` (see [`MaskedSoftmax`]).
pub(crate) fn masked_softmax(att: &Tensor, mask: &Tensor) -> Result<Tensor> {
    att.contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax)
}

// ---------------------------------------------------------------- SwiGLU

/// silu(gate) · up, elementwise.
pub(crate) struct SiluMul;

fn silu_mul_fwd<T: Real>(
    a: &CpuStorage,
    la: &Layout,
    u: &CpuStorage,
    lu: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (a, u) = (slice::<T>(a, la)?, slice::<T>(u, lu)?);
    let mut out = vec![T::zero(); a.len()];
    let row = 1024.min(a.len().max(1));
    par_rows(&mut out, row, |r0, out| {
        let (o0, n) = (r0 * row, out.len());
        let mut e = Vec::new();
        silu_mul_into(&a[o0..o0 + n], &u[o0..o0 + n], &mut e, out);
    });
    Ok((T::to_cpu_storage_owned(out), la.shape().clone()))
}

/// `out = gate / (1 + exp(-gate)) * up`, elementwise (`e` is working space): the one
/// formula of SwiGLU, shared by the graph's op and the decode engine so that both give the
/// same bits.
#[inline(always)]
pub(crate) fn silu_mul_into<T: Real>(gate: &[T], up: &[T], e: &mut Vec<T>, out: &mut [T]) {
    e.clear();
    e.extend(gate.iter().map(|x| -*x));
    T::exp_all(e);
    for (((o, &x), &u), &ex) in out.iter_mut().zip(gate).zip(up).zip(e.iter()) {
        *o = x / (T::one() + ex) * u;
    }
}

/// `e = exp(-x)` for a chunk of x.
fn exp_neg<T: Real>(x: &[T]) -> Vec<T> {
    let mut e: Vec<T> = x.iter().map(|v| -*v).collect();
    T::exp_all(&mut e);
    e
}

/// (d gate, d up): σ = sigmoid(a); d silu = σ(1 + a(1 − σ)).
fn silu_mul_bwd<T: Real>(a: &Tensor, u: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = a.elem_count();
    let (da, du) = with_data::<T, _>(a, |a| {
        with_data::<T, _>(u, |u| {
            with_data::<T, _>(g, |g| {
                let mut da = vec![T::zero(); n];
                let mut du = vec![T::zero(); n];
                let row = 1024.min(n).max(1);
                par_rows(&mut da, row, |r0, out| {
                    let e0 = r0 * row;
                    let e = exp_neg(&a[e0..e0 + out.len()]);
                    for (k, o) in out.iter_mut().enumerate() {
                        let (x, i) = (a[e0 + k], e0 + k);
                        let sg = T::one() / (T::one() + e[k]);
                        *o = g[i] * u[i] * sg * (T::one() + x * (T::one() - sg));
                    }
                });
                par_rows(&mut du, row, |r0, out| {
                    let e0 = r0 * row;
                    let e = exp_neg(&a[e0..e0 + out.len()]);
                    for (k, o) in out.iter_mut().enumerate() {
                        let x = a[e0 + k];
                        *o = g[e0 + k] * (x / (T::one() + e[k]));
                    }
                });
                Ok((da, du))
            })
        })
    })?;
    Ok((
        Tensor::from_vec(da, a.shape(), a.device())?,
        Tensor::from_vec(du, u.shape(), u.device())?,
    ))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "klong-silu-mul"
    }
    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(a, silu_mul_fwd(a, la, u, lu))
    }
    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, du) = match a.dtype() {
            DType::F32 => silu_mul_bwd::<f32>(a, u, g)?,
            DType::F64 => silu_mul_bwd::<f64>(a, u, g)?,
            dt => candle_core::bail!("klong-silu-mul: unsupported dtype {dt:?}"),
        };
        Ok((Some(da), Some(du)))
    }
}

pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

// ---------------------------------------------------------------- log-softmax

/// Log-softmax over the last dimension.
pub(crate) struct LogSoftmax;

fn log_softmax_fwd<T: Real>(x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
    let v = *lx.shape().dims().last().unwrap_or(&1);
    let x = slice::<T>(x, lx)?;
    let mut out = vec![T::zero(); x.len()];
    par_rows(&mut out, v, |r0, out| {
        for (i, o) in out.chunks_mut(v).enumerate() {
            let xr = &x[(r0 + i) * v..(r0 + i + 1) * v];
            // The exponentials go through `o` (overwritten below), in one vector pass.
            let (mx, sum) = shifted_exps(xr, o);
            let lse = sum.ln();
            for (o, &z) in o.iter_mut().zip(xr) {
                *o = (z - mx) - lse;
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

/// dz = g − softmax · Σ g, with softmax = exp(log-softmax).
fn log_softmax_bwd<T: Real>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let v = y.dim(candle_core::D::Minus1)?;
    let dz = with_data::<T, _>(y, |y| {
        with_data::<T, _>(g, |g| {
            let mut dz = vec![T::zero(); y.len()];
            par_rows(&mut dz, v, |r0, dz| {
                for (i, d) in dz.chunks_mut(v).enumerate() {
                    let r = r0 + i;
                    let (yr, gr) = (&y[r * v..(r + 1) * v], &g[r * v..(r + 1) * v]);
                    let mut sg = T::zero();
                    for &gv in gr {
                        sg += gv;
                    }
                    // softmax = exp(y), in one vector pass through `d`.
                    d.copy_from_slice(yr);
                    T::exp_all(d);
                    for (d, &gv) in d.iter_mut().zip(gr) {
                        *d = gv - *d * sg;
                    }
                }
            });
            Ok(dz)
        })
    })?;
    Tensor::from_vec(dz, y.shape(), y.device())
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "klong-log-softmax"
    }
    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(x, log_softmax_fwd(x, lx))
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dz = match x.dtype() {
            DType::F32 => log_softmax_bwd::<f32>(res, g)?,
            DType::F64 => log_softmax_bwd::<f64>(res, g)?,
            dt => candle_core::bail!("klong-log-softmax: unsupported dtype {dt:?}"),
        };
        Ok(Some(dz))
    }
}

pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LogSoftmax)
}

// ---------------------------------------------------------------- token logprobs

/// The log-probability of each row's target token under the softmax of its logits
/// (`[.., V]`, targets `[..]` u32 -> `[..]`): log-softmax and gather as one graph node.
///
/// Composed, the two leave three full `[.., V]` tensors in the graph: the log-softmax's
/// output, the gather's gradient (zero-filled, then scattered into) and the log-softmax's
/// input gradient, each of the last two zeroed and then added to by candle's backward
/// (`GradStore::or_insert` + `add`). On model R's training batch (`[8, 512, 512]`) the
/// composed tail of the loss took 3.3 ms forward and 14.3 ms backward, ~4% of a step
/// (`benches/peer/README.md`, session 34). Here the forward is one pass per row, and the
/// backward writes the logits' gradient `g · (onehot(target) − softmax)` in one pass.
///
/// The forward's arithmetic is the log-softmax's (both take a row's max and exponentials'
/// sum from [`shifted_exps`]), so each log-probability is the same bits as the composed
/// log-softmax's element at the target.
pub(crate) struct TokenLogprobs;

/// A row's max and the exponentials `exp(z − max)` (into `e`); returns (max, Σ e). The
/// log-softmax and [`TokenLogprobs`] both take their rows' sums from here, so they agree to
/// the bit.
fn shifted_exps<T: Real>(xr: &[T], e: &mut [T]) -> (T, T) {
    // Eight running maxima and eight partial sums, lane j taking elements j, j + 8, ...: the
    // loops vectorize (one running value made each a serial chain, ~10 instructions per
    // element for the max). The max is the same value in any order; the sum's order is fixed
    // by the row's length alone.
    const L: usize = 8;
    let mut lanes = [T::lowest(); L];
    let (whole, tail) = xr.split_at(xr.len() - xr.len() % L);
    for c in whole.chunks_exact(L) {
        for (m, &z) in lanes.iter_mut().zip(c) {
            *m = if z > *m { z } else { *m };
        }
    }
    let mut mx = T::lowest();
    for &z in lanes.iter().chain(tail) {
        if z > mx {
            mx = z;
        }
    }
    for (o, &z) in e.iter_mut().zip(xr) {
        *o = z - mx;
    }
    T::exp_all(e);
    let mut sums = [T::zero(); L];
    let (whole, tail) = e.split_at(e.len() - e.len() % L);
    for c in whole.chunks_exact(L) {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    let mut sum = T::zero();
    for &v in sums.iter().chain(tail) {
        sum += v;
    }
    (mx, sum)
}

/// Every target below the vocabulary size `v`, or an error naming the first that is not.
fn check_targets(targets: &[u32], v: usize) -> Result<()> {
    match targets.iter().position(|&t| t as usize >= v) {
        Some(r) => candle_core::bail!(
            "klong-token-logprobs: target {} at row {r} is not below the vocabulary size {v}",
            targets[r]
        ),
        None => Ok(()),
    }
}

fn token_logprobs_fwd<T: Real>(
    x: &CpuStorage,
    lx: &Layout,
    targets: &[u32],
) -> Result<(CpuStorage, Shape)> {
    let dims = lx.shape().dims();
    let Some((&v, rows_shape)) = dims.split_last() else {
        candle_core::bail!("klong-token-logprobs: logits have no dimensions");
    };
    let x = slice::<T>(x, lx)?;
    let rows = rows_shape.iter().product::<usize>();
    if targets.len() != rows || v == 0 {
        candle_core::bail!(
            "klong-token-logprobs: {} targets for logits {dims:?}",
            targets.len()
        );
    }
    check_targets(targets, v)?;
    let mut out = vec![T::zero(); rows];
    let run = |r0: usize, out: &mut [T]| {
        let mut e = vec![T::zero(); v];
        for (i, o) in out.iter_mut().enumerate() {
            let r = r0 + i;
            let xr = &x[r * v..(r + 1) * v];
            let (mx, sum) = shifted_exps(xr, &mut e);
            *o = (xr[targets[r] as usize] - mx) - sum.ln();
        }
    };
    // Shared out by the logits' size (one output per row of V).
    match rows_per_run(x.len(), v) {
        Some(per) => out
            .par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, o)| run(i * per, o)),
        None => run(0, &mut out),
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from(rows_shape)))
}

/// dz = g · (onehot(target) − softmax), row by row.
fn token_logprobs_bwd<T: Real>(x: &Tensor, targets: &[u32], g: &Tensor) -> Result<Tensor> {
    let v = x.dim(candle_core::D::Minus1)?;
    let dz = with_data::<T, _>(x, |x| {
        with_data::<T, _>(g, |g| {
            if g.len() != targets.len() || x.len() != targets.len() * v {
                candle_core::bail!("klong-token-logprobs: gradient does not match the logits");
            }
            // The targets are the forward's, which checked each against V.
            // Each row is built in an L1-resident buffer and written once: the gradient is
            // never zeroed first.
            let (dz, _) = written(x.len(), v, |r0, fill| {
                let mut d = vec![T::zero(); v];
                for r in r0..r0 + fill.len() / v {
                    let (_, sum) = shifted_exps(&x[r * v..(r + 1) * v], &mut d);
                    // softmax = e / Σ e; d = −g · softmax, plus g at the target.
                    let k = -(g[r] / sum);
                    for d in d.iter_mut() {
                        *d *= k;
                    }
                    d[targets[r] as usize] += g[r];
                    fill.extend(&d);
                }
            });
            Ok(dz)
        })
    })?;
    Tensor::from_vec(dz, x.shape(), x.device())
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "klong-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let targets = slice::<u32>(t, lt)?;
        dispatch!(x, token_logprobs_fwd(x, lx, targets))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = with_data::<u32, _>(t, |targets| match x.dtype() {
            DType::F32 => token_logprobs_bwd::<f32>(x, targets, g),
            DType::F64 => token_logprobs_bwd::<f64>(x, targets, g),
            dt => candle_core::bail!("klong-token-logprobs: unsupported dtype {dt:?}"),
        })?;
        Ok((Some(dz), None))
    }
}

/// `log_softmax(logits)` at each row's target: logits `[.., V]` (f32 or f64 on the CPU),
/// targets `[..]` (u32, each below V) -> `[..]`.
pub(crate) fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let rows = logits.dims().split_last().map(|(_, r)| r);
    if rows != Some(targets.dims()) {
        candle_core::bail!(
            "klong-token-logprobs: targets {:?} for logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(&targets, TokenLogprobs)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::policy::hashed_values as values;

    /// The fused node's log-probabilities are the log-softmax's elements at the targets, to the
    /// bit, and its logits' gradient is the composed log-softmax-and-gather's, in f32 and f64.
    #[test]
    fn token_logprobs_are_the_log_softmax_at_the_targets() {
        let dev = Device::Cpu;
        let (b, t, v) = (3usize, 5usize, 37usize);
        let targets: Vec<u32> = (0..b * t).map(|i| ((i * 11 + 3) % v) as u32).collect();
        let targets = Tensor::from_vec(targets, (b, t), &dev).expect("targets");
        for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
            let logits = values(b * t * v, 7)
                .iter()
                .map(|x| x * 9.0)
                .collect::<Vec<_>>();
            let logits = Tensor::from_vec(logits, (b, t, v), &dev)
                .and_then(|l| l.to_dtype(dtype))
                .and_then(|l| Var::from_tensor(&l))
                .expect("logits");
            let weights = Tensor::from_vec(values(b * t, 9), (b, t), &dev)
                .and_then(|w| w.to_dtype(dtype))
                .expect("weights");
            let fused = super::token_logprobs(logits.as_tensor(), &targets).expect("fused");
            let idx = targets.unsqueeze(2).expect("idx");
            let composed = super::log_softmax(logits.as_tensor())
                .and_then(|l| l.gather(&idx, 2))
                .and_then(|l| l.squeeze(2))
                .expect("composed");
            assert_eq!(fused.dims(), [b, t]);
            let as_f64 = |x: &Tensor| -> Vec<f64> {
                x.to_dtype(candle_core::DType::F64)
                    .and_then(|x| x.flatten_all())
                    .and_then(|x| x.to_vec1::<f64>())
                    .expect("values")
            };
            assert_eq!(as_f64(&fused), as_f64(&composed), "{dtype:?} values");
            let grad = |lp: &Tensor| -> Vec<f64> {
                let loss = (lp * &weights).and_then(|p| p.sum_all()).expect("loss");
                let grads = loss.backward().expect("backward");
                as_f64(grads.get(logits.as_tensor()).expect("logits' gradient"))
            };
            let (gf, gc) = (grad(&fused), grad(&composed));
            let tol = if dtype == candle_core::DType::F32 {
                1e-6
            } else {
                1e-13
            };
            let worst = gf
                .iter()
                .zip(&gc)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < tol, "{dtype:?} gradient off by {worst}");
            // The gradient is not trivially 0: each row's sums to 0, its target's entry is
            // positive where the weight is.
            assert!(
                gf.iter().any(|g| g.abs() > 1e-3),
                "{dtype:?} gradient is all ~0"
            );
        }
    }

    /// A target outside the vocabulary, or targets of another shape, are errors that say so.
    #[test]
    fn token_logprobs_reject_targets_outside_the_vocabulary() {
        let dev = Device::Cpu;
        let logits = Tensor::from_vec(values(2 * 4, 1), (2, 4), &dev).expect("logits");
        let bad = Tensor::from_vec(vec![1u32, 4], 2, &dev).expect("targets");
        let err = super::token_logprobs(&logits, &bad).expect_err("target 4 of 4");
        assert!(
            err.to_string().contains("target 4 at row 1"),
            "unexpected error: {err}"
        );
        let short = Tensor::from_vec(vec![1u32], 1, &dev).expect("targets");
        let err = super::token_logprobs(&logits, &short).expect_err("one target for two rows");
        assert!(
            err.to_string().contains("targets [1]"),
            "unexpected error: {err}"
        );
    }

    /// The output layer's product and both gradients match the composed matmul's within f32
    /// accuracy: a shape whose products run on AMX tiles where the CPU has them, and a small
    /// one on gemm's kernels.
    #[test]
    fn projection_matches_the_composed_matmul() {
        let dev = Device::Cpu;
        // Rows of any leading shape: [M, K] and, as training's logits, [B, T, K].
        for (rows, k, n) in [(vec![256], 256, 2048), (vec![3], 5, 7), (vec![2, 3], 5, 7)] {
            let m: usize = rows.iter().product();
            let shape = |last: usize| [rows.as_slice(), &[last]].concat();
            let x = Var::from_vec(values(m * k, 1), shape(k), &dev).expect("x");
            let w = Var::from_vec(values(n * k, 2), (n, k), &dev).expect("w");
            let g = Tensor::from_vec(values(m * n, 3), shape(n), &dev).expect("g");
            let run = |y: Tensor| {
                let grads = (&y * &g)
                    .and_then(|p| p.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward");
                [
                    y,
                    grads.get(&x).expect("dx").clone(),
                    grads.get(&w).expect("dw").clone(),
                ]
            };
            let ours = run(super::projection(&x, &w).expect("projection"));
            let plain = run(x.broadcast_matmul(&w.t().expect("t")).expect("matmul"));
            for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(ours.iter().zip(&plain)) {
                assert_eq!(a.dims(), b.dims(), "{what}");
                let diff = super::super::max_abs_diff(a, b);
                assert!(diff < 1e-4, "{rows:?}x{k}x{n} {what}: max diff {diff}");
            }
        }
        // A weight of another width is an error, not a product.
        let x = Tensor::from_vec(values(15, 1), (3, 5), &dev).expect("x");
        let w = Tensor::from_vec(values(28, 2), (7, 4), &dev).expect("w");
        let err = super::projection(&x, &w).expect_err("K 5 against 4");
        assert!(
            err.to_string().contains("do not agree"),
            "unexpected error: {err}"
        );
    }

    /// `written` hands out runs of whole rows that cover the output in order (one per
    /// thread, each run's result in run order), on one thread and on several; a run left
    /// short panics instead of returning the vector.
    #[test]
    fn written_outputs_are_the_runs_in_order_and_whole() {
        let (rows, row) = (5000, 7); // over PAR_MIN elements: parallel runs
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let (v, firsts) = pool.install(|| {
                super::written(rows * row, row, |first, out| {
                    for r in first..first + out.len() / row {
                        let vals: Vec<u32> = (0..row as u32).map(|c| r as u32 * 10 + c).collect();
                        out.extend(&vals);
                    }
                    first
                })
            });
            let want: Vec<u32> = (0..rows as u32)
                .flat_map(|r| (0..row as u32).map(move |c| r * 10 + c))
                .collect();
            assert!(v == want, "{threads} threads");
            assert!(firsts.windows(2).all(|w| w[0] < w[1]) && firsts[0] == 0);
        }
        let short = std::panic::catch_unwind(|| {
            super::written(4 * 3, 3, |_, out: &mut super::Fill<'_, f32>| {
                out.extend(&[1.0, 2.0]);
            })
        });
        assert!(short.is_err(), "a run left short must not return");
        let small = super::written(0, 0, |_, _: &mut super::Fill<'_, f32>| ()).0;
        assert!(small.is_empty());
    }

    /// The output of `y`, and the gradients of `Σ y ⊙ g` with respect to x and w.
    fn output_and_grads(y: &Tensor, g: &Tensor, x: &Var, w: &Var) -> [Vec<f32>; 3] {
        let grads = (y * g)
            .and_then(|p| p.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        let flat = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("vec")
        };
        [
            flat(y),
            flat(grads.get(x.as_tensor()).expect("dx")),
            flat(grads.get(w.as_tensor()).expect("dw")),
        ]
    }

    /// `gemm_new` and `gemm_into` against a plain f64 sum, for every layout of the operands
    /// and for sums long enough to run as two halves (k = 2,500 over a 7 x 5 output, and over a
    /// 41 x 7 one, which runs as its transpose), and the
    /// same bits when all the work runs on one thread. The two largest run on AMX tiles where
    /// the CPU has them (checked), one in whole 32 x 32 blocks and one with partial blocks.
    #[test]
    fn gemm_products_are_the_plain_sums() {
        use super::{gemm_into, gemm_new, on_amx, Mat};
        let shapes = [
            (7usize, 13usize, 5usize),
            (7, 2500, 5),
            // Four times taller than wide: computed as its transpose.
            (41, 2500, 7),
            (33, 40, 17),
            (512, 512, 512),
            (520, 513, 520),
        ];
        for (m, k, n) in shapes {
            let a = values(m * k, 11);
            let b = values(k * n, 12);
            let plain: Vec<f32> = (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    (0..k)
                        .map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j]))
                        .sum::<f64>() as f32
                })
                .collect();
            // The same matrices stored transposed: a as [k, m], b as [n, k].
            let at: Vec<f32> = (0..k * m).map(|e| a[(e % m) * k + e / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|e| b[(e % k) * n + e / k]).collect();
            let layouts = [
                (Mat::rows(&a, k), Mat::rows(&b, n)),
                (Mat::transposed(&at, m), Mat::rows(&b, n)),
                (Mat::rows(&a, k), Mat::transposed(&bt, k)),
                (Mat::transposed(&at, m), Mat::transposed(&bt, k)),
            ];
            for (case, (ma, mb)) in layouts.into_iter().enumerate() {
                #[cfg(target_arch = "x86_64")]
                if m >= 512 && super::super::amx::available() {
                    assert!(
                        on_amx((m, k, n), &ma),
                        "{m}x{k}x{n} case {case}: not on AMX"
                    );
                }
                let got = gemm_new(m, k, n, ma, mb).expect("gemm_new");
                let single = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("pool")
                    .install(|| gemm_new(m, k, n, ma, mb).expect("gemm_new"));
                assert_eq!(got, single, "{m}x{k}x{n} case {case}: one thread");
                let mut acc = vec![1.0f32; m * n];
                gemm_into(&mut acc, true, (m, k, n), ma, mb).expect("gemm_into");
                for (e, ((g, p), c)) in got.iter().zip(&plain).zip(&acc).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt();
                    assert!(
                        (g - p).abs() <= tol,
                        "{m}x{k}x{n} case {case} [{e}]: {g} vs {p}"
                    );
                    assert!(
                        (c - 1.0 - p).abs() <= tol,
                        "{m}x{k}x{n} case {case} [{e}]: +="
                    );
                }
            }
        }
        let short = [0f32; 3];
        assert!(gemm_new(2, 2, 2, Mat::rows(&short, 2), Mat::rows(&short, 2)).is_err());
    }

    /// A transpose moves every float to its place, for sizes that fill no block of rows
    /// exactly (the last is large enough to be shared out between threads, in runs of rows
    /// that are not whole blocks), on one thread and on the pool.
    #[test]
    fn transposed_is_the_transpose() {
        for (r, c) in [
            (1usize, 1usize),
            (3, 40),
            (37, 19),
            (300, 17),
            (16, 16),
            (700, 61),
        ] {
            let x = values(r * c, 5);
            let t = super::transposed(&x, r, c);
            assert_eq!(t.len(), r * c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], x[i * c + j], "[{r}, {c}] ({i}, {j})");
                }
            }
            let single = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .expect("pool")
                .install(|| super::transposed(&x, r, c));
            assert_eq!(t, single);
        }
        assert!(super::transposed(&[], 0, 5).is_empty());
    }

    /// The one-node projection gives the composed one's output and gradients, bit for bit
    /// (the same storage-level products with the same operands), with the rows as they are
    /// or split into 4 heads of 10, heads after or before the positions.
    #[test]
    fn linear_is_the_composed_projection_to_the_bit() {
        let dev = Device::Cpu;
        let (b, t, k, n, h) = (3, 37, 24, 40, 4);
        let x = Var::from_vec(values(b * t * k, 1), (b, t, k), &dev).expect("x");
        let w = Var::from_vec(values(n * k, 2), (n, k), &dev).expect("w");
        let composed = x
            .as_tensor()
            .reshape((b * t, k))
            .and_then(|x2| x2.matmul(&w.as_tensor().t()?))
            .expect("composed");
        let cases = [
            (
                super::linear(x.as_tensor(), w.as_tensor()),
                composed.reshape((b, t, n)),
            ),
            (
                super::linear_heads(x.as_tensor(), w.as_tensor(), h, false),
                composed.reshape((b, t, h, n / h)),
            ),
            (
                super::linear_heads(x.as_tensor(), w.as_tensor(), h, true),
                composed
                    .reshape((b, t, h, n / h))
                    .and_then(|y| y.transpose(1, 2))
                    .and_then(|y| y.contiguous()),
            ),
        ];
        for (i, (fused, composed)) in cases.into_iter().enumerate() {
            let (fused, composed) = (fused.expect("fused"), composed.expect("composed"));
            assert_eq!(fused.dims(), composed.dims(), "case {i}");
            let g = Tensor::from_vec(values(b * t * n, 3), composed.shape(), &dev).expect("g");
            let [y, dx, dw] = output_and_grads(&fused, &g, &x, &w);
            let [y0, dx0, dw0] = output_and_grads(&composed, &g, &x, &w);
            assert_eq!(y, y0, "case {i}: output");
            assert_eq!(dx, dx0, "case {i}: dx");
            assert_eq!(dw, dw0, "case {i}: dw");
        }
    }
}
