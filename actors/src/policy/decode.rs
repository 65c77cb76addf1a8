//! The decode step on the CPU: one new token per row through every layer, as plain loops over
//! the weights' memory, with all compute threads inside one step at once.
//!
//! Why not the graph: a decode step of a small model is ~60 candle ops of a few microseconds
//! each. Each allocates its output, and each product above a few thousand multiply-adds wakes
//! the thread pool and waits for it. In `klongd bench model`'s batch-1 decode (model R), a
//! fifth of the time was the kernel waking and parking threads, against ~37% in the products
//! themselves. Here every pool thread runs the whole step, each on its share of every product
//! (a range of output columns, or of (row, kv head) pairs for attention), and the threads meet
//! at a spinning barrier between phases: four per layer where the kv heads divide among the
//! threads (a thread computes its heads' q, k and v and goes straight on to their attention),
//! five where they do not. A step is one `rayon::broadcast`,
//! or, on a [`Team`] (see [`with_team`]), one round of threads that stay between steps.
//!
//! Results: every number is computed by the kernels, in the order, that the graph path
//! ([`Llama::forward`] with a [`KvCache`], whose decode steps take `skinny`'s kernels) uses: the
//! same products (each output `skinny`'s serial chain over a panel), RMSNorm, RoPE, attention
//! (`skinny::attend_blocked` sums each score in the order of `attend_pair`'s) and SwiGLU
//! arithmetic. So the logits are the same bits as that path's (tested), and each output element
//! is computed by one thread in a fixed order, so they do not depend on the thread count.
//!
//! The products read [`DecodeWeights`]: every projection and the LM head packed in panels,
//! once per frozen model (see [`Llama::from_tensors`]) or per decoder over a model that trains.
//!
//! Served: a CPU f32 model on x86_64 with AVX2 and FMA, at most [`MAX_ROWS`] rows. Anything
//! else gets `None` from [`Decoder::after_prefill`], and the caller steps through the graph.
//! `KLONGD_FUSED_OFF=decode` switches it off.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, TensorId};

use super::fused;
use super::model::{KvCache, Llama, MASKED};
use super::skinny::{self, Panels};

/// The most rows (sequences) a step may have: past this, gemm's blocked products beat the
/// few-row kernels, and the graph path takes them.
pub const MAX_ROWS: usize = skinny::MAX_ROWS;

/// Weight multiply-adds per thread below which another thread costs more (its barrier waits)
/// than it saves: a step takes one thread per this much work, at most the pool's threads, so
/// a small model on a many-core box runs on a few of them.
const PAR_MIN_FMAS: usize = 1 << 16;

/// Spins at a barrier before yielding the core, and yields before sleeping: a phase takes
/// microseconds when the other threads are running, but a pool thread may be busy with another
/// job (a training step on the same pool) for much longer.
const SPINS: u32 = 1 << 14;
const YIELDS: u32 = 64;
const NAP: Duration = Duration::from_micros(50);

/// A model's sizes, as the decode step reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dims {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
    eps: f32,
}

impl Dims {
    fn of(model: &Llama) -> Dims {
        let c = model.config();
        Dims {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            inter: c.intermediate_size,
            vocab: c.vocab_size,
            // As the graph's RMSNorm converts it.
            eps: c.rms_norm_eps as f32,
        }
    }

    /// Columns of the q, k and v projections side by side.
    fn qkv(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Weight multiply-adds per row and step.
    fn fmas(&self) -> usize {
        let h = self.hidden;
        self.layers * (h * self.qkv() + self.heads * self.head_dim * h + 3 * h * self.inter)
            + h * self.vocab
    }
}

/// One (row, kv head) pair's keys and values. The keys are transposed in blocks of
/// `skinny::KEY_BLOCK` positions (`[head_dim, KEY_BLOCK]` per block), so that the scores of a
/// block are vector products without horizontal sums; the values are `[positions, head_dim]`.
#[derive(Debug, Default, Clone)]
struct PairCache {
    kt: Vec<f32>,
    v: Vec<f32>,
}

impl PairCache {
    /// Puts `key` at position `s` (the blocks grow as needed; a position written again, after
    /// a failed step, is overwritten).
    fn put_key(&mut self, s: usize, key: &[f32]) {
        let d = key.len();
        let (blk, lane) = (s / skinny::KEY_BLOCK, s % skinny::KEY_BLOCK);
        let need = (blk + 1) * skinny::KEY_BLOCK * d;
        if self.kt.len() < need {
            self.kt.resize(need, 0.0);
        }
        let base = blk * skinny::KEY_BLOCK * d;
        for (dd, k) in key.iter().enumerate() {
            self.kt[base + dd * skinny::KEY_BLOCK + lane] = *k;
        }
    }
}

/// Generation state after a prefill: the KV cache in the engine's own layout, and which
/// positions are real tokens.
pub struct Decoder {
    dims: Dims,
    rows: usize,
    /// `key_mask[b][s]`: position `s` of row `b` is a real token (pads stay, masked, so that
    /// all rows keep one length).
    key_mask: Vec<Vec<bool>>,
    /// Real tokens per row: the position of its next token.
    seen: Vec<usize>,
    /// `[layer][row][kv head]`, each behind its own lock: a step's threads write disjoint
    /// pairs, so the locks are never contended.
    cache: Vec<Mutex<PairCache>>,
    inv_freq: Vec<f32>,
    /// The model's context: the most positions a row may reach.
    context: usize,
    /// The threads' phase outputs, kept from step to step (sized for the pool the last step
    /// ran on): allocating them per step had the threads free each other's memory, and
    /// glibc's allocator then serialized them on its arena locks.
    parts: Option<Parts>,
    /// The product weights the steps read: the model's frozen ones, or packed for this decoder.
    packed: Arc<DecodeWeights>,
}

impl Decoder {
    /// Whether the engine serves `model` with `rows` rows.
    pub fn serves(model: &Llama, rows: usize) -> bool {
        let w = model.weights();
        model.device().is_cpu()
            && w.dtype == DType::F32
            && (1..=MAX_ROWS).contains(&rows)
            && skinny::simd()
            && fused::enabled(fused::Kind::Decode)
    }

    /// The engine's state after `cache` holds a prefill of `model`, or `None` when the engine
    /// does not serve this model or batch (the caller keeps stepping through the graph).
    pub fn after_prefill(model: &Llama, cache: &KvCache) -> Result<Option<Decoder>> {
        let (layers, key_mask) = cache.contents();
        let rows = key_mask.len();
        if !Decoder::serves(model, rows) {
            return Ok(None);
        }
        let dims = Dims::of(model);
        let positions = key_mask.first().map_or(0, Vec::len);
        if layers.len() != dims.layers || key_mask.iter().any(|r| r.len() != positions) {
            candle_core::bail!(
                "decoder: the cache has {} layers and rows of {:?} positions; the model has {} \
                 layers",
                layers.len(),
                key_mask.iter().map(Vec::len).collect::<Vec<_>>(),
                dims.layers
            );
        }
        let (hkv, d) = (dims.kv_heads, dims.head_dim);
        let mut cache = Vec::with_capacity(dims.layers * rows * hkv);
        for (i, layer) in layers.iter().enumerate() {
            let Some((k, v)) = layer else {
                candle_core::bail!("decoder: layer {i} of the cache is empty");
            };
            let shape = [rows, hkv, positions, d];
            if k.dims() != shape || v.dims() != shape {
                candle_core::bail!(
                    "decoder: layer {i} caches keys {:?} and values {:?}, expected {shape:?}",
                    k.dims(),
                    v.dims()
                );
            }
            let k = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let v = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let pair = positions * d;
            // Room for a few hundred new tokens up front; a longer generation doubles.
            let room = (positions + 256).min(model.config().max_position_embeddings) * d;
            for (kp, vp) in k.chunks_exact(pair.max(1)).zip(v.chunks_exact(pair.max(1))) {
                let mut pc = PairCache {
                    kt: Vec::with_capacity(
                        room.div_ceil(skinny::KEY_BLOCK * d) * skinny::KEY_BLOCK * d,
                    ),
                    v: Vec::with_capacity(room),
                };
                for (s, key) in kp[..pair].chunks_exact(d).enumerate() {
                    pc.put_key(s, key);
                }
                pc.v.extend_from_slice(&vp[..pair]);
                cache.push(Mutex::new(pc));
            }
            // A cache of zero positions has no chunks: fill the pairs empty.
            cache.resize_with((i + 1) * rows * hkv, || Mutex::new(PairCache::default()));
        }
        Ok(Some(Decoder {
            dims,
            rows,
            seen: key_mask
                .iter()
                .map(|r| r.iter().filter(|m| **m).count())
                .collect(),
            key_mask: key_mask.to_vec(),
            cache,
            inv_freq: model.weights().inv_freq.iter().map(|f| *f as f32).collect(),
            context: model.config().max_position_embeddings,
            parts: None,
            packed: model.decode_weights()?,
        }))
    }

    /// Positions cached per row (pads included).
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feeds one token per row (`live[b]` false: a pad, masked, for a row that has finished)
    /// and returns each row's logits for the next token. With a `team` (see [`with_team`]) the
    /// step runs on its threads; without, on the compute pool's threads, woken for the step.
    pub fn step(
        &mut self,
        model: &Llama,
        ids: &[u32],
        live: &[bool],
        team: Option<&Team>,
    ) -> Result<Vec<Vec<f32>>> {
        let d = self.dims;
        if Dims::of(model) != d {
            candle_core::bail!("decoder: stepped with another model than it was filled by");
        }
        if ids.len() != self.rows || live.len() != self.rows {
            candle_core::bail!(
                "decoder: {} ids and {} live flags for {} rows",
                ids.len(),
                live.len(),
                self.rows
            );
        }
        if let Some(id) = ids.iter().find(|id| **id as usize >= d.vocab) {
            candle_core::bail!(
                "decoder: token id {id} is outside the vocabulary ({})",
                d.vocab
            );
        }
        // Positions are per row (pads take none), so a row is full at the model's context;
        // the cache (pads included) holds at most a prompt and a generation, each shorter.
        if let Some(r) = (0..self.rows).find(|r| live[*r] && self.seen[*r] >= self.context) {
            candle_core::bail!(
                "decoder: row {r} is at position {}, past the model's context ({})",
                self.seen[r],
                self.context
            );
        }
        if self.len() >= 2 * self.context {
            candle_core::bail!(
                "decoder: the cache holds {} positions, twice the model's context",
                self.len()
            );
        }
        // Positions, RoPE angles (as the graph computes them: f32 position times f32
        // frequency, the halves repeated) and the additive key mask of this step.
        let (b, hd) = (self.rows, d.head_dim);
        let mut cos = vec![0f32; b * hd];
        let mut sin = vec![0f32; b * hd];
        for r in 0..b {
            let pos = self.seen[r] as f32;
            let (c, s) = (
                &mut cos[r * hd..(r + 1) * hd],
                &mut sin[r * hd..(r + 1) * hd],
            );
            for i in 0..hd / 2 {
                let (si, ci) = (pos * self.inv_freq[i]).sin_cos();
                (c[i], c[i + hd / 2], s[i], s[i + hd / 2]) = (ci, ci, si, si);
            }
        }
        // The keys so far and this step's own: the state itself changes only once the step has
        // succeeded, so a failed step leaves the decoder as it was.
        let masks: Vec<Vec<f32>> = self
            .key_mask
            .iter()
            .zip(live)
            .map(|(row, new)| {
                row.iter()
                    .chain(std::iter::once(new))
                    .map(|m| if *m { 0.0 } else { MASKED })
                    .collect()
            })
            .collect();

        if !self.packed.of(model) {
            candle_core::bail!(
                "decoder: stepped with another model's weights than it was filled by"
            );
        }
        let weights = model.weights();
        let mut tensors = vec![weights.embed, weights.norm];
        for l in &weights.layers {
            tensors.extend([l.input_norm, l.post_norm]);
            tensors.extend(
                [l.q_bias, l.k_bias, l.v_bias, l.q_norm, l.k_norm]
                    .into_iter()
                    .flatten(),
            );
        }
        // Read guards on the weights for the step: an optimizer writing them waits for it. (The
        // products read their panels, packed when the decoder was filled.)
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut data = guards.iter().map(|(st, l)| cpu_f32(st, l));
        let mut next = |len: usize, what: &str| -> Result<&[f32]> {
            let s = data
                .next()
                .ok_or_else(|| candle_core::Error::msg("decoder: a weight is missing"))??;
            if s.len() != len {
                candle_core::bail!("decoder: {what} has {} numbers, expected {len}", s.len());
            }
            Ok(s)
        };
        let (h, q_cols, kv_cols) = (d.hidden, d.heads * hd, d.kv_heads * hd);
        let embed = next(d.vocab * h, "the embedding")?;
        let norm = next(h, "the final norm")?;
        let mut layers = Vec::with_capacity(d.layers);
        for (l, p) in weights.layers.iter().zip(&self.packed.layers) {
            let mut lw = LayerData {
                input_norm: next(h, "input_layernorm")?,
                post_norm: next(h, "post_attention_layernorm")?,
                p,
                q_bias: None,
                k_bias: None,
                v_bias: None,
                q_norm: None,
                k_norm: None,
            };
            if l.q_bias.is_some() {
                lw.q_bias = Some(next(q_cols, "q_proj.bias")?);
            }
            if l.k_bias.is_some() {
                lw.k_bias = Some(next(kv_cols, "k_proj.bias")?);
            }
            if l.v_bias.is_some() {
                lw.v_bias = Some(next(kv_cols, "v_proj.bias")?);
            }
            if l.q_norm.is_some() {
                lw.q_norm = Some(next(hd, "q_norm")?);
            }
            if l.k_norm.is_some() {
                lw.k_norm = Some(next(hd, "k_norm")?);
            }
            layers.push(lw);
        }

        let mut x0 = Vec::with_capacity(b * h);
        for id in ids {
            let id = *id as usize;
            x0.extend_from_slice(&embed[id * h..(id + 1) * h]);
        }
        let pool = team.map_or_else(rayon::current_num_threads, |t| t.threads);
        let threads = (b * d.fmas() / PAR_MIN_FMAS).clamp(1, pool.max(1));
        let parts = match self.parts.take() {
            Some(p) if p.qkv.len() == threads => p,
            _ => Parts::new(threads),
        };
        let step = Step {
            d,
            b,
            past: self.len(),
            x0: &x0,
            cos: &cos,
            sin: &sin,
            masks: &masks,
            layers: &layers,
            norm,
            lm_head: &self.packed.lm_head,
            cache: &self.cache,
            parts,
            barrier: Barrier::new(threads),
        };
        match team {
            _ if threads == 1 => step.run(0, 1),
            Some(team) => team.run(&|i, t| step.run(i, t))?,
            None => {
                rayon::broadcast(|ctx| step.run(ctx.index(), ctx.num_threads()));
            }
        }
        if step.barrier.poisoned.load(Ordering::Acquire) {
            candle_core::bail!("decoder: a step's thread failed");
        }
        let mut logits = vec![0f32; b * d.vocab];
        gather(&step.parts.logits, d.vocab, b, threads, &mut logits);
        self.parts = Some(step.parts);
        for ((keys, seen), new) in self.key_mask.iter_mut().zip(&mut self.seen).zip(live) {
            keys.push(*new);
            *seen += usize::from(*new);
        }
        Ok(logits.chunks_exact(d.vocab).map(<[f32]>::to_vec).collect())
    }
}

/// The compute pool's threads, held for a whole generation: between steps they wait for the
/// next one (spinning, then yielding, then napping) instead of going back to the pool, where
/// they fall asleep and each step would wait ~10-50 µs for the kernel to wake them again.
///
/// Hold a team only around the decode steps: while it is held, the pool runs nothing else, so
/// a prefill (whose products use the pool) belongs before it.
pub struct Team {
    threads: usize,
    /// Bumped by the leader to start a round; a worker runs the round's job once per bump.
    round: AtomicUsize,
    /// Workers done with the current round.
    finished: AtomicUsize,
    job: Mutex<Option<JobPtr>>,
    /// The leader has returned: workers leave.
    done: AtomicBool,
    /// Workers that unwound out of a job: the leader stops waiting for them.
    unwound: AtomicUsize,
}

/// A round's job, with its borrow's lifetime erased (see the SAFETY note of [`Team::run`]).
struct JobPtr(*const (dyn Fn(usize, usize) + Sync + 'static));

// SAFETY: the pointer is only dereferenced while the job it points to is alive and borrowed by
// `Team::run`, and the job is `Sync`, so calling it from several threads at once is allowed.
unsafe impl Send for JobPtr {}
// SAFETY: as above.
unsafe impl Sync for JobPtr {}

/// Runs `f` with a [`Team`] of every thread of the current compute pool (the calling thread
/// leads, the others wait for rounds) and returns its result. With one thread, `f` gets a team
/// of one and nothing is held.
pub fn with_team<R: Send>(f: impl FnOnce(&Team) -> R + Send) -> Result<R> {
    let threads = rayon::current_num_threads().max(1);
    let team = Team {
        threads,
        round: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        job: Mutex::new(None),
        done: AtomicBool::new(false),
        unwound: AtomicUsize::new(0),
    };
    if threads == 1 {
        return Ok(f(&team));
    }
    let leader = rayon::current_thread_index().unwrap_or(0);
    let f = Mutex::new(Some(f));
    let out = Mutex::new(None);
    rayon::broadcast(|ctx| {
        if ctx.num_threads() != threads {
            // Not the pool the team was sized for: nobody leads, and `f` runs below, alone.
            return;
        }
        if ctx.index() == leader {
            let _leave = Leave(&team.done);
            let f = f.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(f) = f {
                *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(f(&team));
            }
        } else {
            let i = if ctx.index() < leader {
                ctx.index() + 1
            } else {
                ctx.index()
            };
            team.serve(i);
        }
    });
    if let Some(r) = out.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Ok(r);
    }
    // The broadcast ran no leader (the pool is not the one the team was sized for): `f` runs
    // here, with a team of one.
    let solo = Team { threads: 1, ..team };
    match f.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(f) => Ok(f(&solo)),
        None => candle_core::bail!("decoder team: the leader returned no result"),
    }
}

/// Tells the workers to leave when the leader returns or unwinds.
struct Leave<'a>(&'a AtomicBool);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Counts a worker that unwinds, so that the leader stops waiting for it.
struct CountUnwind<'a>(&'a Team);

impl Drop for CountUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.unwound.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Spins, then yields, then naps: one more wait of a loop that waits for another thread.
fn pause(tries: &mut u32) {
    *tries = tries.saturating_add(1);
    if *tries < SPINS {
        std::hint::spin_loop();
    } else if *tries < SPINS + YIELDS {
        std::thread::yield_now();
    } else {
        std::thread::sleep(NAP);
    }
}

impl Team {
    /// A worker's loop: run each round's job as thread `i`, until the leader leaves.
    fn serve(&self, i: usize) {
        let _unwind = CountUnwind(self);
        let mut seen = 0;
        loop {
            let mut tries = 0;
            let round = loop {
                let r = self.round.load(Ordering::Acquire);
                if r != seen {
                    break r;
                }
                if self.done.load(Ordering::Acquire) {
                    return;
                }
                pause(&mut tries);
            };
            seen = round;
            let job = self
                .job
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(|j| j.0);
            if let Some(job) = job {
                // SAFETY: `run` published this pointer before bumping `round`, and clears it
                // only after every worker has counted itself in `finished` below; until then
                // the job it points to is alive (borrowed by `run`).
                unsafe { (*job)(i, self.threads) };
            }
            self.finished.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Runs `job(i, threads)` on every thread of the team (the leader as 0) and returns when
    /// all are done. Only the leader (the thread inside `with_team`'s `f`) may call it.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) -> Result<()> {
        if self.threads == 1 {
            job(0, 1);
            return Ok(());
        }
        let ptr: *const (dyn Fn(usize, usize) + Sync + '_) = job;
        // SAFETY: only the lifetime changes. A worker dereferences the pointer between the
        // bump of `round` below and its increment of `finished` (or of `unwound`, once a panic
        // has left the job's frame), and this function returns only once every worker has done
        // one of the two, so `job` outlives every use.
        let ptr: *const (dyn Fn(usize, usize) + Sync + 'static) =
            unsafe { std::mem::transmute(ptr) };
        *self.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(JobPtr(ptr));
        self.round.fetch_add(1, Ordering::AcqRel);
        job(0, self.threads);
        // Every worker either counts itself done or unwound (a panic inside the job, which the
        // broadcast carries out of `with_team` once the leader has returned).
        let mut tries = 0;
        while self.finished.load(Ordering::Acquire) + self.unwound.load(Ordering::Acquire)
            < self.threads - 1
        {
            pause(&mut tries);
        }
        let failed = self.unwound.load(Ordering::Acquire) > 0;
        self.finished.store(0, Ordering::Release);
        *self.job.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if failed {
            candle_core::bail!("decoder team: a worker thread failed");
        }
        Ok(())
    }
}

/// A CPU f32 tensor's contiguous data.
fn cpu_f32<'a>(st: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match st {
        Storage::Cpu(c @ CpuStorage::F32(_)) => fused::slice::<f32>(c, l),
        _ => candle_core::bail!("decoder: a weight is not a CPU f32 tensor"),
    }
}

/// One layer's weights: the products' in panels, the rest as slices.
struct LayerData<'a> {
    input_norm: &'a [f32],
    post_norm: &'a [f32],
    p: &'a LayerPanels,
    q_bias: Option<&'a [f32]>,
    k_bias: Option<&'a [f32]>,
    v_bias: Option<&'a [f32]>,
    q_norm: Option<&'a [f32]>,
    k_norm: Option<&'a [f32]>,
}

/// One layer's product weights in panels.
struct LayerPanels {
    q: Panels,
    k: Panels,
    v: Panels,
    o: Panels,
    gate: Panels,
    up: Panels,
    down: Panels,
}

/// A model's product weights (every layer's projections and the LM head) packed in panels for
/// the engine: read by every step, packed once per model (see [`Llama`]'s frozen weights) or
/// per decoder over a model that trains.
pub(crate) struct DecodeWeights {
    layers: Vec<LayerPanels>,
    lm_head: Panels,
    /// The ids of the tensors they came from (q, k, v, o, gate, up, down per layer, then the
    /// head): a step checks that its model is still the one they were packed from.
    ids: Vec<TensorId>,
}

impl DecodeWeights {
    /// Packs `model`'s product weights (CPU f32) into one buffer, on 2 MiB pages where the
    /// kernel allows (`Panels::pack_all`).
    pub(crate) fn pack(model: &Llama) -> Result<DecodeWeights> {
        let d = Dims::of(model);
        let weights = model.weights();
        let (h, q_cols, kv_cols) = (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let mut named: Vec<(&Tensor, (usize, usize), &str)> = Vec::with_capacity(7 * d.layers + 1);
        for l in &weights.layers {
            named.extend([
                (l.q, (q_cols, h), "q_proj"),
                (l.k, (kv_cols, h), "k_proj"),
                (l.v, (kv_cols, h), "v_proj"),
                (l.o, (h, q_cols), "o_proj"),
                (l.gate, (d.inter, h), "gate_proj"),
                (l.up, (d.inter, h), "up_proj"),
                (l.down, (h, d.inter), "down_proj"),
            ]);
        }
        named.push((weights.lm_head, (d.vocab, h), "the LM head"));
        let guards: Vec<_> = named.iter().map(|(t, ..)| t.storage_and_layout()).collect();
        let mut ws = Vec::with_capacity(named.len());
        for ((st, l), (_, (n, k), what)) in guards.iter().zip(&named) {
            let w = cpu_f32(st, l)?;
            if w.len() != n * k {
                candle_core::bail!(
                    "decoder: {what} has {} numbers, expected {}",
                    w.len(),
                    n * k
                );
            }
            ws.push((w, *n, *k));
        }
        let mut packed = Panels::pack_all(&ws).into_iter();
        let mut next = || packed.next().expect("one panel set per weight");
        let layers = (0..d.layers)
            .map(|_| LayerPanels {
                q: next(),
                k: next(),
                v: next(),
                o: next(),
                gate: next(),
                up: next(),
                down: next(),
            })
            .collect();
        let lm_head = next();
        Ok(DecodeWeights {
            layers,
            lm_head,
            ids: named.iter().map(|(t, ..)| t.id()).collect(),
        })
    }

    /// Whether these were packed from `model`'s tensors.
    fn of(&self, model: &Llama) -> bool {
        let w = model.weights();
        let now = w
            .layers
            .iter()
            .flat_map(|l| [l.q, l.k, l.v, l.o, l.gate, l.up, l.down].map(Tensor::id))
            .chain(std::iter::once(w.lm_head.id()));
        now.eq(self.ids.iter().copied())
    }
}

/// Each thread's outputs of a phase, `[rows, its columns]` (row-major, so that gathering a
/// row is one copy per thread), read by every thread after the barrier that ends the phase.
struct Parts {
    /// Each thread's working buffers (only its own thread locks it).
    scratch: Vec<Mutex<Scratch>>,
    qkv: Vec<RwLock<Vec<f32>>>,
    att: Vec<RwLock<Vec<f32>>>,
    resid: Vec<RwLock<Vec<f32>>>,
    act: Vec<RwLock<Vec<f32>>>,
    logits: Vec<RwLock<Vec<f32>>>,
}

impl Parts {
    fn new(threads: usize) -> Parts {
        let v = || (0..threads).map(|_| RwLock::new(Vec::new())).collect();
        Parts {
            scratch: (0..threads)
                .map(|_| Mutex::new(Scratch::default()))
                .collect(),
            qkv: v(),
            att: v(),
            resid: v(),
            act: v(),
            logits: v(),
        }
    }
}

/// One thread's working buffers in a step.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    act: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    e: Vec<f32>,
    qbuf: Vec<f32>,
    kbuf: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
    /// This thread's kv heads' q, k and v columns of every row (when heads are split).
    own_q: Vec<f32>,
    own_k: Vec<f32>,
    own_v: Vec<f32>,
}

/// `v` resized to `n` numbers (its old contents are overwritten by every user).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// Thread `i` of `t`'s share of `n` columns: whole panels, the last share short.
fn share(n: usize, t: usize, i: usize) -> (usize, usize) {
    let per = n.div_ceil(t.max(1)).div_ceil(skinny::PANEL) * skinny::PANEL;
    let a = (i * per).min(n);
    (a, (a + per).min(n))
}

/// Thread `i` of `t`'s share of `n` items, as even as it goes.
fn share_even(n: usize, t: usize, i: usize) -> (usize, usize) {
    (n * i / t.max(1), n * (i + 1) / t.max(1))
}

/// This thread's output of a phase, locked for writing and sized to `n` zeros.
fn fresh(l: &RwLock<Vec<f32>>, n: usize) -> RwLockWriteGuard<'_, Vec<f32>> {
    let mut part = l.write().unwrap_or_else(PoisonError::into_inner);
    part.clear();
    part.resize(n, 0.0);
    part
}

fn read(l: &RwLock<Vec<f32>>) -> RwLockReadGuard<'_, Vec<f32>> {
    // A poisoned lock means a thread panicked; the barrier reports that step as failed.
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes the threads' column blocks (each `[rows, its columns]`) of an `[rows, n]` matrix
/// into `out`, row by row.
fn gather(parts: &[RwLock<Vec<f32>>], n: usize, rows: usize, t: usize, out: &mut [f32]) {
    for (i, part) in parts.iter().enumerate().take(t) {
        let (c0, c1) = share(n, t, i);
        let p = read(part);
        let w = c1 - c0;
        for r in 0..rows {
            out[r * n + c0..r * n + c1].copy_from_slice(&p[r * w..(r + 1) * w]);
        }
    }
}

/// Columns `n0 .. n0 + cols` of `x · wᵀ` (x `[rows, k]`, w packed from `[n, k]`) into `out`,
/// row-major with `ld` numbers per row.
fn project(
    x: &[f32],
    w: &Panels,
    (rows, n0, cols): (usize, usize, usize),
    out: &mut [f32],
    ld: usize,
) {
    skinny::panel_columns_into(x, w, (rows, n0, cols), out, skinny::Dest::Rows { ld })
}

/// `project` plus each column's `bias` (`cols` numbers) on every row.
fn project_with_bias(
    x: &[f32],
    w: &Panels,
    bias: Option<&[f32]>,
    (rows, n0, cols): (usize, usize, usize),
    out: &mut [f32],
    ld: usize,
) {
    project(x, w, (rows, n0, cols), out, ld);
    if let Some(bias) = bias {
        for r in 0..rows {
            for (v, bv) in out[r * ld..r * ld + cols].iter_mut().zip(bias) {
                *v += bv;
            }
        }
    }
}

/// One (row, kv head) pair's new q heads, key and value, before RoPE.
struct PairInput<'a> {
    queries: &'a [f32],
    key: &'a [f32],
    value: &'a [f32],
}

/// A thread's working buffers for one pair's attention.
struct PairWork<'a> {
    /// The pair's query heads after RoPE (`group · head_dim`).
    queries: &'a mut [f32],
    /// Its key after RoPE.
    key: &'a mut [f32],
    /// A q or k norm's output.
    tmp: &'a mut [f32],
    scores: &'a mut Vec<f32>,
}

/// RMSNorm of each `w.len()`-long row of `x` into `out`, in the graph kernel's order.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    let nn = n as f32;
    for (o, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        fused::rms_row(xr, w, (nn, eps), o);
    }
}

/// A reusable barrier for a fixed number of threads that spins, then yields, then naps. It is
/// poisoned when a thread panics, and a thread waiting at it then gives up.
struct Barrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

impl Barrier {
    fn new(threads: usize) -> Barrier {
        Barrier {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Waits for every thread; `false` when the barrier was poisoned.
    #[must_use]
    fn wait(&self) -> bool {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // The reset happens before the release of the waiters, so none of them can arrive
            // at the next barrier before it.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return !self.poisoned.load(Ordering::Acquire);
        }
        let mut tries = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            if self.poisoned.load(Ordering::Acquire) {
                return false;
            }
            tries = tries.saturating_add(1);
            if tries < SPINS {
                std::hint::spin_loop();
            } else if tries < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(NAP);
            }
        }
        !self.poisoned.load(Ordering::Acquire)
    }
}

/// Poisons the barrier if its thread unwinds, so that the others stop waiting for it.
struct PoisonOnPanic<'a>(&'a Barrier);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::Release);
        }
    }
}

/// Everything one step's threads share.
struct Step<'a> {
    d: Dims,
    b: usize,
    /// Positions cached before this step: the new token's position in the cache.
    past: usize,
    /// The new tokens' embeddings, `[rows, hidden]`.
    x0: &'a [f32],
    /// RoPE tables per row, `[rows, head_dim]`.
    cos: &'a [f32],
    sin: &'a [f32],
    /// Per row, the additive mask over the `past + 1` keys.
    masks: &'a [Vec<f32>],
    layers: &'a [LayerData<'a>],
    norm: &'a [f32],
    lm_head: &'a Panels,
    cache: &'a [Mutex<PairCache>],
    parts: Parts,
    barrier: Barrier,
}

impl Step<'_> {
    /// Thread `i` of `t`'s part of the step.
    fn run(&self, i: usize, t: usize) {
        let _poison = PoisonOnPanic(&self.barrier);
        if t < self.barrier.threads {
            // rayon ran the broadcast on a smaller pool than the one asked: every thread
            // leaves, and the step reports the failure.
            self.barrier.poisoned.store(true, Ordering::Release);
            return;
        }
        // A step of little work takes fewer threads than the pool has; the rest sit it out.
        let t = self.barrier.threads;
        if i >= t {
            return;
        }
        let (d, b) = (self.d, self.b);
        let (h, hd, g) = (d.hidden, d.head_dim, d.group());
        let nqkv = d.qkv();
        let (q_cols, kv_cols) = (d.heads * hd, d.kv_heads * hd);
        let mut guard = self.parts.scratch[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sc = &mut *guard;
        let x = sized(&mut sc.x, b * h);
        x.copy_from_slice(self.x0);
        let normed = sized(&mut sc.normed, b * h);
        let qkv = sized(&mut sc.qkv, b * nqkv);
        let y = sized(&mut sc.y, b * q_cols);
        let act = sized(&mut sc.act, b * d.inter);
        let (gate, up, e) = (&mut sc.gate, &mut sc.up, &mut sc.e);
        let mut work = PairWork {
            queries: sized(&mut sc.qbuf, g * hd),
            key: sized(&mut sc.kbuf, hd),
            tmp: sized(&mut sc.tmp, hd),
            scores: &mut sc.scores,
        };
        let (own_q, own_k, own_v) = (&mut sc.own_q, &mut sc.own_k, &mut sc.own_v);
        let pairs = b * d.kv_heads;
        let (p0, p1) = share_even(pairs, t, i);
        // The kv heads split among the threads when they divide evenly: a thread's attention
        // then needs only its own heads' q, k and v columns, and phases 1 and 2 become one.
        let split = d.kv_heads % t == 0;
        let (j0, j1) = share_even(d.kv_heads, t, i);
        let nh = j1 - j0;
        for (li, lw) in self.layers.iter().enumerate() {
            if li > 0 {
                gather(&self.parts.resid, h, b, t, x);
            }
            rms_norm(x, lw.input_norm, d.eps, normed);
            let part = if split {
                // Phases 1 and 2 at once: q, k and v of this thread's kv heads for every row,
                // then their attention; no other thread's columns are needed before phase 3.
                let (nq, nkv) = (nh * g * hd, nh * hd);
                let q_own = sized(own_q, b * nq);
                let k_own = sized(own_k, b * nkv);
                let v_own = sized(own_v, b * nkv);
                let jobs = [
                    (&lw.p.q, lw.q_bias, j0 * g * hd, nq, &mut *q_own),
                    (&lw.p.k, lw.k_bias, j0 * hd, nkv, &mut *k_own),
                    (&lw.p.v, lw.v_bias, j0 * hd, nkv, &mut *v_own),
                ];
                for (w, bias, n0, cols, out) in jobs {
                    let bias = bias.map(|bv| &bv[n0..n0 + cols]);
                    project_with_bias(normed, w, bias, (b, n0, cols), out, cols);
                }
                let mut part = fresh(&self.parts.att[i], b * nq);
                for r in 0..b {
                    for j in j0..j1 {
                        let (e, f) = ((j - j0) * g * hd, (j - j0) * hd);
                        let pair = PairInput {
                            queries: &q_own[r * nq + e..r * nq + e + g * hd],
                            key: &k_own[r * nkv + f..r * nkv + f + hd],
                            value: &v_own[r * nkv + f..r * nkv + f + hd],
                        };
                        let o = (r * nh + j - j0) * g * hd;
                        let out = &mut part[o..o + g * hd];
                        self.attend(li, lw, (r, j), pair, &mut work, out);
                    }
                }
                part
            } else {
                // Phase 1: q, k and v side by side, this thread's columns.
                {
                    let (c0, c1) = share(nqkv, t, i);
                    let mut part = fresh(&self.parts.qkv[i], (c1 - c0) * b);
                    let segments = [
                        (0, q_cols, &lw.p.q, lw.q_bias),
                        (q_cols, kv_cols, &lw.p.k, lw.k_bias),
                        (q_cols + kv_cols, kv_cols, &lw.p.v, lw.v_bias),
                    ];
                    for (start, len, w, bias) in segments {
                        let (lo, hi) = (c0.max(start), c1.min(start + len));
                        if lo >= hi {
                            continue;
                        }
                        let ld = c1 - c0;
                        let bias = bias.map(|bv| &bv[lo - start..hi - start]);
                        let at = (b, lo - start, hi - lo);
                        project_with_bias(normed, w, bias, at, &mut part[lo - c0..], ld);
                    }
                }
                if !self.barrier.wait() {
                    return;
                }
                // Phase 2: attention for this thread's (row, kv head) pairs.
                gather(&self.parts.qkv, nqkv, b, t, qkv);
                let mut part = fresh(&self.parts.att[i], (p1 - p0) * g * hd);
                for p in p0..p1 {
                    let (r, j) = (p / d.kv_heads, p % d.kv_heads);
                    let row = &qkv[r * nqkv..(r + 1) * nqkv];
                    let (k0, v0) = (q_cols + j * hd, q_cols + kv_cols + j * hd);
                    let pair = PairInput {
                        queries: &row[j * g * hd..(j + 1) * g * hd],
                        key: &row[k0..k0 + hd],
                        value: &row[v0..v0 + hd],
                    };
                    let out = &mut part[(p - p0) * g * hd..(p - p0 + 1) * g * hd];
                    self.attend(li, lw, (r, j), pair, &mut work, out);
                }
                part
            };
            // Released before the barrier: every thread reads every part in phase 3.
            drop(part);
            if !self.barrier.wait() {
                return;
            }
            // Phase 3: the output projection plus the residual, this thread's columns.
            for (ti, part) in self.parts.att.iter().enumerate().take(t) {
                let part = read(part);
                if split {
                    // Thread ti's part: its heads' outputs, row by row.
                    let (h0, h1) = share_even(d.kv_heads, t, ti);
                    let (c0, c1) = (h0 * g * hd, h1 * g * hd);
                    for r in 0..b {
                        y[r * q_cols + c0..r * q_cols + c1]
                            .copy_from_slice(&part[r * (c1 - c0)..(r + 1) * (c1 - c0)]);
                    }
                    continue;
                }
                let (a0, a1) = share_even(pairs, t, ti);
                for p in a0..a1 {
                    let (r, j) = (p / d.kv_heads, p % d.kv_heads);
                    y[r * q_cols + j * g * hd..r * q_cols + (j + 1) * g * hd]
                        .copy_from_slice(&part[(p - a0) * g * hd..(p - a0 + 1) * g * hd]);
                }
            }
            self.residual(i, t, y, &lw.p.o, x);
            if !self.barrier.wait() {
                return;
            }
            // Phase 4: the MLP's gate and up projections and SwiGLU, this thread's columns.
            gather(&self.parts.resid, h, b, t, x);
            rms_norm(x, lw.post_norm, d.eps, normed);
            {
                let (c0, c1) = share(d.inter, t, i);
                let mut part = fresh(&self.parts.act[i], (c1 - c0) * b);
                let gate = sized(gate, (c1 - c0) * b);
                let up = sized(up, (c1 - c0) * b);
                let ld = c1 - c0;
                project(normed, &lw.p.gate, (b, c0, ld), gate, ld);
                project(normed, &lw.p.up, (b, c0, ld), up, ld);
                fused::silu_mul_into(gate, up, e, &mut part);
            }
            if !self.barrier.wait() {
                return;
            }
            // Phase 5: the down projection plus the residual, this thread's columns.
            gather(&self.parts.act, d.inter, b, t, act);
            self.residual(i, t, act, &lw.p.down, x);
            if !self.barrier.wait() {
                return;
            }
        }
        // The final norm and this thread's columns of the logits.
        if !self.layers.is_empty() {
            gather(&self.parts.resid, h, b, t, x);
        }
        rms_norm(x, self.norm, d.eps, normed);
        let (c0, c1) = share(d.vocab, t, i);
        let mut part = fresh(&self.parts.logits[i], (c1 - c0) * b);
        project(normed, self.lm_head, (b, c0, c1 - c0), &mut part, c1 - c0);
    }

    /// Attention of layer `li`'s pair (row `r`, kv head `j`): RoPE (after the q and k norms
    /// where the model has them) on its query heads and its key, the key and value appended
    /// to the pair's cache, then the queries against every key so far into `out`.
    fn attend(
        &self,
        li: usize,
        lw: &LayerData,
        (r, j): (usize, usize),
        pair: PairInput,
        work: &mut PairWork,
        out: &mut [f32],
    ) {
        let d = self.d;
        let (hd, g) = (d.head_dim, d.group());
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (c, s) = (
            &self.cos[r * hd..(r + 1) * hd],
            &self.sin[r * hd..(r + 1) * hd],
        );
        for e in 0..g {
            let head = &pair.queries[e * hd..(e + 1) * hd];
            let src = match lw.q_norm {
                Some(w) => {
                    rms_norm(head, w, d.eps, work.tmp);
                    &work.tmp[..]
                }
                None => head,
            };
            fused::rope_vec(src, c, s, scale, &mut work.queries[e * hd..(e + 1) * hd]);
        }
        let src = match lw.k_norm {
            Some(w) => {
                rms_norm(pair.key, w, d.eps, work.tmp);
                &work.tmp[..]
            }
            None => pair.key,
        };
        fused::rope_vec(src, c, s, 1.0, work.key);
        let slot = (li * self.b + r) * d.kv_heads + j;
        let mut pc = self.cache[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pc.put_key(self.past, work.key);
        pc.v.truncate(self.past * hd);
        pc.v.extend_from_slice(pair.value);
        let keys = self.past + 1;
        // SAFETY: `attend_blocked` needs AVX2 and FMA on x86_64, which `Decoder::serves` found
        // on this CPU.
        #[allow(unused_unsafe)]
        unsafe {
            skinny::attend_blocked(
                work.queries,
                (&pc.kt, &pc.v),
                &self.masks[r],
                (keys, hd),
                work.scores,
                out,
            )
        };
    }

    /// This thread's columns of `x + input · wᵀ` (w `[hidden, k]`) into its residual part.
    fn residual(&self, i: usize, t: usize, input: &[f32], w: &Panels, x: &[f32]) {
        let (b, h) = (self.b, self.d.hidden);
        let (c0, c1) = share(h, t, i);
        let mut part = fresh(&self.parts.resid[i], (c1 - c0) * b);
        let ld = c1 - c0;
        project(input, w, (b, c0, ld), &mut part, ld);
        for r in 0..b {
            let xr = &x[r * h + c0..r * h + c1];
            for (v, xv) in part[r * ld..(r + 1) * ld].iter_mut().zip(xr) {
                *v += xv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::LlamaConfig;
    use candle_core::{Device, IndexOp, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    /// A model of `cfg` whose every weight (norms and biases too) is drawn at random, frozen
    /// as generation's policies hold it.
    fn model(cfg: &LlamaConfig, seed: u64) -> Llama {
        let vm = VarMap::new();
        Llama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).expect("model");
        let mut tensors = std::collections::HashMap::new();
        let data = vm.data().lock().expect("varmap");
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        for (i, name) in names.iter().enumerate() {
            let shape = data[name].as_tensor().shape().clone();
            let n = shape.elem_count();
            // A small LCG: the test's weights depend on its seed only.
            let mut s = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i as u64 + 1);
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((s >> 40) as f32) / ((1u64 << 24) as f32) - 0.5;
                    if name.ends_with("norm.weight") {
                        1.0 + u
                    } else {
                        0.2 * u
                    }
                })
                .collect();
            let t = Tensor::from_vec(vals, shape, &Device::Cpu).expect("tensor");
            tensors.insert(name.clone(), t);
        }
        Llama::from_tensors(cfg, tensors, &Device::Cpu).expect("frozen model")
    }

    fn wide() -> LlamaConfig {
        let mut cfg = LlamaConfig::tiny(100);
        cfg.hidden_size = 64;
        cfg.intermediate_size = 160;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = Some(2);
        cfg
    }

    /// Prefills left-padded prompts, then steps the graph (`Llama::forward` with the cache)
    /// and the decoder side by side with the same tokens, a row finishing midway; the live
    /// rows' logits must be the same bits.
    fn same_bits_as_the_graph(cfg: &LlamaConfig, seed: u64) {
        let m = model(cfg, seed);
        let vocab = cfg.vocab_size as u32;
        let lens = [5usize, 9, 2];
        let longest = 9;
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for (r, len) in lens.iter().enumerate() {
            for p in 0..longest {
                let real = p >= longest - len;
                ids.push(if real {
                    (r as u32 * 31 + p as u32 * 7) % vocab
                } else {
                    0
                });
                mask.push(u8::from(real));
            }
        }
        let b = lens.len();
        let ids = Tensor::from_vec(ids, (b, longest), &Device::Cpu).expect("ids");
        let mask = Tensor::from_vec(mask, (b, longest), &Device::Cpu).expect("mask");
        let mut cache = KvCache::inference();
        m.forward(&ids, Some(&mask), Some(&mut cache))
            .expect("prefill");
        let mut dec = Decoder::after_prefill(&m, &cache)
            .expect("decoder")
            .expect("served");
        for step in 0..40u32 {
            let live: Vec<bool> = (0..b).map(|r| !(r == 1 && step >= 10)).collect();
            let next: Vec<u32> = (0..b as u32)
                .map(|r| {
                    if live[r as usize] {
                        (step * 13 + r * 5 + 1) % vocab
                    } else {
                        0
                    }
                })
                .collect();
            let t_ids = Tensor::from_vec(next.clone(), (b, 1), &Device::Cpu).expect("ids");
            let t_mask: Vec<u8> = live.iter().map(|l| u8::from(*l)).collect();
            let t_mask = Tensor::from_vec(t_mask, (b, 1), &Device::Cpu).expect("mask");
            let graph = m
                .forward(&t_ids, Some(&t_mask), Some(&mut cache))
                .expect("graph step");
            let ours = if step % 2 == 0 {
                dec.step(&m, &next, &live, None).expect("decoder step")
            } else {
                // Every other step on a team of the pool's threads.
                with_team(|team| dec.step(&m, &next, &live, Some(team)))
                    .expect("team")
                    .expect("decoder step on a team")
            };
            for r in 0..b {
                if !live[r] {
                    continue;
                }
                let g = graph.i((r, 0)).expect("row").to_vec1::<f32>().expect("vec");
                assert_eq!(g.len(), ours[r].len());
                let same = g
                    .iter()
                    .zip(&ours[r])
                    .all(|(a, o)| a.to_bits() == o.to_bits());
                assert!(
                    same,
                    "step {step}, row {r}: {:?} vs {:?}",
                    &g[..4],
                    &ours[r][..4]
                );
            }
        }
        assert_eq!(dec.len(), longest + 40);
    }

    #[test]
    fn steps_are_the_graph_paths_to_the_bit() {
        if !skinny::simd() {
            return;
        }
        // One thread (a step below `PAR_MIN_FMAS`), then all of them (up to 4).
        let small = LlamaConfig::tiny(32);
        assert!(3 * Dims::of(&model(&small, 1)).fmas() < PAR_MIN_FMAS);
        same_bits_as_the_graph(&small, 1);
        let wide = wide();
        assert!(Dims::of(&model(&wide, 2)).fmas() >= PAR_MIN_FMAS);
        same_bits_as_the_graph(&wide, 2);
        // Qwen2's attention biases, Qwen3's q/k norms, tied embeddings; with two kv heads
        // (split among two threads, as `wide`'s are) and with one (which two threads cannot
        // split: the q/k/v columns are shared out, then the (row, kv head) pairs).
        let mut qwen = wide;
        qwen.attention_bias = true;
        qwen.use_qk_norm = true;
        qwen.tie_word_embeddings = true;
        same_bits_as_the_graph(&qwen, 3);
        qwen.num_key_value_heads = Some(1);
        same_bits_as_the_graph(&qwen, 4);
    }

    #[test]
    fn bad_steps_are_refused_with_the_reason() {
        if !skinny::simd() {
            return;
        }
        let mut cfg = LlamaConfig::tiny(32);
        cfg.max_position_embeddings = 6;
        let m = model(&cfg, 4);
        let mut cache = KvCache::inference();
        let ids = Tensor::from_vec(vec![1u32, 2, 3, 4], (2, 2), &Device::Cpu).expect("ids");
        m.forward(&ids, None, Some(&mut cache)).expect("prefill");
        let mut dec = Decoder::after_prefill(&m, &cache)
            .expect("decoder")
            .expect("served");
        let err = |r: Result<Vec<Vec<f32>>>| r.expect_err("refused").to_string();
        assert!(
            err(dec.step(&m, &[1], &[true], None)).contains("1 ids and 1 live flags for 2 rows")
        );
        assert!(err(dec.step(&m, &[1, 32], &[true, true], None)).contains("token id 32"));
        let other = model(&wide(), 5);
        assert!(err(dec.step(&other, &[1, 2], &[true, true], None)).contains("another model"));
        // The same sizes, other weights: its panels are not the ones packed at the prefill.
        let twin = model(&cfg, 6);
        assert!(
            err(dec.step(&twin, &[1, 2], &[true, true], None)).contains("another model's weights")
        );
        for _ in 0..4 {
            dec.step(&m, &[1, 2], &[true, true], None).expect("step");
        }
        assert!(err(dec.step(&m, &[1, 2], &[true, true], None))
            .contains("row 0 is at position 6, past the model's context (6)"));
        // A finished row (fed pads) takes no position: the other row is the one that is full.
        assert!(err(dec.step(&m, &[0, 2], &[false, true], None)).contains("row 1 is at position 6"));
        // More rows than the engine serves: the caller keeps the graph.
        let rows = MAX_ROWS + 1;
        let ids = Tensor::from_vec(vec![1u32; rows], (rows, 1), &Device::Cpu).expect("ids");
        let mut cache = KvCache::inference();
        m.forward(&ids, None, Some(&mut cache)).expect("prefill");
        assert!(Decoder::after_prefill(&m, &cache)
            .expect("decoder")
            .is_none());
    }
}
