//! The Llama-family decoder that every policy and learner runs: token embedding, RMSNorm, RoPE
//! (with Llama-3 frequency scaling), grouped-query attention with a causal mask, SwiGLU MLP,
//! and the variants' options (tied embeddings, Qwen2 attention biases, Qwen3 q/k norms).
//!
//! One `forward` serves training (full sequences, gradients through a `VarMap`) and inference
//! (a `KvCache`, incremental decode, left-padded batches). Tensor names are Hugging Face's, so
//! a `VarBuilder` over safetensors loads HF checkpoints unchanged.
//!
//! candle 0.11's fused `candle_nn::RmsNorm` and `softmax_last_dim` have no backward pass on
//! CPU, so a model built on them trains silently wrong (design.md §13). On CPU in f32/f64 the
//! norms, RoPE + attention softmax, SwiGLU and the loss's log-softmax run as this crate's own
//! fused kernels with hand-written backward passes (`fused.rs`); elsewhere they are composed
//! from basic tensor ops, which backpropagate everywhere. The finite-difference tests check
//! the fused gradients (f64); the bf16 test (composed path) checks against them.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// Llama-3 style RoPE frequency scaling (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    #[serde(default = "default_low_freq_factor")]
    pub low_freq_factor: f64,
    #[serde(default = "default_high_freq_factor")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max_pos")]
    pub original_max_position_embeddings: usize,
    /// HF writes "llama3"; other kinds (linear, dynamic, yarn) are not supported and are
    /// refused by `LlamaConfig::validate` rather than silently treated as Llama-3.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "type")]
    pub rope_type: Option<String>,
}

fn default_low_freq_factor() -> f64 {
    1.0
}
fn default_high_freq_factor() -> f64 {
    4.0
}
fn default_original_max_pos() -> usize {
    8192
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

/// A model's configuration, with the field names of Hugging Face's `config.json` (Llama,
/// Qwen2, Qwen3, SmolLM2). Unknown fields are ignored so real config files parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in older Llama configs, where it equals `num_attention_heads` (no GQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Qwen3 sets it explicitly (it need not be hidden_size / heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2: biases on q/k/v projections (never on o_proj).
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen3: RMSNorm over each head's q and k (`self_attn.q_norm` / `k_norm` weights). HF
    /// derives this from `model_type: qwen3`; the loader sets it from there, and it is
    /// written out under this name.
    #[serde(default)]
    pub use_qk_norm: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// HF allows a single id or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<EosTokenId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

impl LlamaConfig {
    /// A tiny configuration for tests and from-scratch experiments.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            attention_bias: false,
            use_qk_norm: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Cross-field checks, so a bad config fails here with a message, not as a shape error
    /// deep inside a forward pass.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |v: usize, name: &str| {
            if v == 0 {
                Err(format!("{name} must be positive"))
            } else {
                Ok(())
            }
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.hidden_size, "hidden_size")?;
        pos(self.intermediate_size, "intermediate_size")?;
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.num_kv_heads(), "num_key_value_heads")?;
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(format!("head_dim ({hd}) must be positive and even (RoPE)"));
        }
        if self.head_dim.is_none() && hd * self.num_attention_heads != self.hidden_size {
            return Err(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_deref() {
                None | Some("llama3") => {}
                Some(other) => return Err(format!("rope_scaling type {other:?} is not supported")),
            }
            if s.low_freq_factor >= s.high_freq_factor {
                return Err("rope_scaling: low_freq_factor must be < high_freq_factor".into());
            }
        }
        Ok(())
    }

    /// RoPE inverse frequencies, with Llama-3 scaling when configured (the same piecewise
    /// rule as transformers' `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// Additive mask value for keys a query must not see. Finite (not -inf) so that a query row
/// with no visible key (a pad position in a left-padded batch) gives a uniform distribution
/// instead of NaN; such rows are never read.
pub(crate) const MASKED: f32 = -1e9;

/// The attention mask of one forward, shared by every layer: key `s` of row `b` is a real
/// token (`rows[b][s]`), and the query at position `past + i` sees the real keys up to it
/// (`keys` holds the same, in the form the kernels read).
struct AttnMask {
    /// Kept for the KV cache, which remembers which of its keys are real.
    rows: Vec<Vec<bool>>,
    keys: Arc<flash::KeyMask>,
    /// The additive form `[B, 1, T, S]` (0 or [`MASKED`]), built on first use: the one-pass
    /// kernel does not need it, and for a 4k-token training batch it is hundreds of MB.
    dense: OnceLock<Tensor>,
    device: Device,
    dtype: DType,
}

impl AttnMask {
    fn new(rows: Vec<Vec<bool>>, past: usize, device: &Device, dtype: DType) -> Result<Self> {
        Ok(AttnMask {
            keys: Arc::new(flash::KeyMask::new(&rows, past)?),
            rows,
            dense: OnceLock::new(),
            device: device.clone(),
            dtype,
        })
    }

    fn dense(&self) -> Result<&Tensor> {
        if let Some(m) = self.dense.get() {
            return Ok(m);
        }
        let (b, t, s) = self.keys.dims();
        let m = Tensor::from_vec(self.keys.additive(), (b, 1, t, s), &self.device)?
            .to_dtype(self.dtype)?;
        Ok(self.dense.get_or_init(|| m))
    }
}

/// RMSNorm: the fused kernel where supported, else composed from basic ops (candle's own
/// fused one has no gradient on CPU in 0.11).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(RmsNorm { weight, eps })
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::supported(x, fused::Kind::RmsNorm) && self.weight.dtype() == x.dtype() {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)
    }
}

/// A projection over the rows of x `[.., K]`, as one 2-D product `[rows, K] x [K, N]`: the
/// weight's gradient is then a single gemm over all rows, where candle's batched form computes
/// one per leading index and sums them.
fn linear_rows(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if let Some(&k) = dims.last() {
        let rows = x.elem_count() / k.max(1);
        if rows <= skinny::MAX_ROWS {
            if let Some(y) = skinny::linear(&x.reshape((rows, k))?, l.weight())? {
                let y = match l.bias() {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let mut out = dims[..dims.len() - 1].to_vec();
                out.push(y.dim(1)?);
                return y.reshape(out);
            }
        }
    }
    if dims.len() <= 2 || !fused::enabled(fused::Kind::LinearRows) {
        return l.forward(x);
    }
    if fused::supported(x, fused::Kind::Linear) && l.weight().dtype() == x.dtype() {
        let y = fused::linear(x, l.weight())?;
        return match l.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let k = dims[dims.len() - 1];
    let y = l.forward(&x.reshape(((), k))?)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

/// HF init: weights normal(0, 0.02), biases 0. (When loading, the hints are ignored.)
fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// One layer's cached keys and values, `[B, Hkv, S, D]` each.
pub(crate) type KeysValues = (Tensor, Tensor);

/// Per-layer keys and values of the tokens seen so far, plus which of them are real tokens
/// (pads stay in the cache, masked, so that all rows keep one length).
///
/// On the CPU, when no gradient can flow into the cached keys and values (the weights are not
/// variables, or the cache was made with [`KvCache::inference`]), they are written in place
/// into buffers with room to grow (doubling), so a decode step copies only its new position
/// instead of the whole cache. Otherwise each step concatenates, and gradients flow through
/// the cache.
#[derive(Debug, Default)]
pub struct KvCache {
    /// Per layer: (keys, values) `[B, Hkv, S, D]` of the positions seen so far (views into
    /// `bufs` when those are used).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per layer: the in-place buffers `[B, Hkv, capacity, D]`, if any.
    bufs: Vec<Option<(Tensor, Tensor)>>,
    /// Store keys and values detached (no gradient into earlier positions), in place.
    detached: bool,
    /// `key_mask[b][j]`: key j of row b is a real token.
    key_mask: Vec<Vec<bool>>,
}

impl Clone for KvCache {
    /// A clone shares the cached tensors (immutable) but not the in-place buffers: its next
    /// step starts buffers of its own, so the two caches never write over each other.
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.clone(),
            bufs: vec![None; self.bufs.len()],
            detached: self.detached,
            key_mask: self.key_mask.clone(),
        }
    }
}

/// One layer's part of a [`KvCache`], lent to the attention for a forward pass.
struct LayerSlot<'a> {
    kv: &'a mut Option<(Tensor, Tensor)>,
    buf: &'a mut Option<(Tensor, Tensor)>,
    detached: bool,
}

impl LayerSlot<'_> {
    /// Appends this step's keys and values `[B, Hkv, T, D]` along the sequence; returns all
    /// of them.
    fn append(self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let in_place = k.device().is_cpu() && (self.detached || !(k.track_op() || v.track_op()));
        if !in_place {
            *self.buf = None;
            let kv = match self.kv.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            *self.kv = Some(kv.clone());
            return Ok(kv);
        }
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let (b, h, t, d) = k.dims4()?;
        let len = self.kv.as_ref().map_or(Ok(0), |(pk, _)| pk.dim(2))?;
        let need = len + t;
        let cap = self.buf.as_ref().map_or(Ok(0), |(bk, _)| bk.dim(2))?;
        let fits = self.buf.as_ref().is_some_and(|(bk, _)| {
            bk.dims4()
                .is_ok_and(|(bb, bh, _, bd)| (bb, bh, bd) == (b, h, d))
        });
        if !fits || need > cap {
            let cap = need.max(2 * cap).max(64);
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some((pk, pv)) = self.kv.as_ref() {
                nk.slice_set(&pk.contiguous()?, 2, 0)?;
                nv.slice_set(&pv.contiguous()?, 2, 0)?;
            }
            *self.buf = Some((nk, nv));
        }
        let Some((bk, bv)) = self.buf.as_ref() else {
            candle_core::bail!("kv cache buffer missing");
        };
        bk.slice_set(&k, 2, len)?;
        bv.slice_set(&v, 2, len)?;
        let kv = (bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?);
        *self.kv = Some(kv.clone());
        Ok(kv)
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache for inference only: keys and values are stored detached, in place, even when
    /// the model's weights are variables (no gradient flows into earlier positions).
    pub fn inference() -> Self {
        KvCache {
            detached: true,
            ..Self::default()
        }
    }

    /// Number of cached positions (pads included).
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, |r| r.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real tokens seen by row `b`: the position of its next token.
    pub fn seen(&self, b: usize) -> usize {
        self.key_mask
            .get(b)
            .map_or(0, |r| r.iter().filter(|m| **m).count())
    }

    /// Per layer the cached (keys, values) `[B, Hkv, S, D]`, and per row which of the `S`
    /// positions are real tokens: what the decode engine starts from after a prefill.
    pub(crate) fn contents(&self) -> (&[Option<KeysValues>], &[Vec<bool>]) {
        (&self.layers, &self.key_mask)
    }
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// rotate_half as in HF Llama: the head dimension is split in halves, (x1, x2) -> (-x2, x1).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// x: [B, H, T, D]; cos/sin: [B, 1, T, D].
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated for its query group
/// (the order of HF's `repeat_kv`).
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, h, s, d) = x.dims4()?;
    Tensor::cat(&vec![&x; n_rep], 2)?.reshape((b, h * n_rep, s, d))
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let hd = cfg.head_dim();
        let (h, hkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let bias = cfg.attention_bias;
        let (q_norm, k_norm) = if cfg.use_qk_norm {
            (
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?),
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            q_proj: linear(cfg.hidden_size, h * hd, bias, vb.pp("q_proj"))?,
            k_proj: linear(cfg.hidden_size, hkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: linear(cfg.hidden_size, hkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: linear(h * hd, cfg.hidden_size, false, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: hd,
        })
    }

    /// `x + self(norm(x))` as one graph node (`attention_block`) for a forward without a
    /// cache over more rows than a decode step's, when the layer has no biases and no q/k
    /// norms (Llama's layers, trained or scored); `None` otherwise.
    #[cfg(target_arch = "x86_64")]
    fn block(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
    ) -> Result<Option<Tensor>> {
        let Some((heads, weights)) = self.block_operands(x)? else {
            return Ok(None);
        };
        let norm = (&norm.weight, norm.eps);
        attention_block::block(x, norm, weights, heads, cos, sin, &mask.keys)
    }

    /// The heads and the q/k/v/o weights `attention_block` takes for this layer over x's
    /// rows, or `None` where it does not serve them: a decode step's few rows, q/k norms or
    /// biases.
    #[cfg(target_arch = "x86_64")]
    fn block_operands(&self, x: &Tensor) -> Result<Option<(attention_block::Heads, [&Tensor; 4])>> {
        let (b, t, _) = x.dims3()?;
        let linears = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        if b * t <= skinny::MAX_ROWS
            || self.q_norm.is_some()
            || self.k_norm.is_some()
            || linears.iter().any(|l| l.bias().is_some())
        {
            return Ok(None);
        }
        let heads = attention_block::Heads {
            q: self.n_heads,
            kv: self.n_kv_heads,
            dim: self.head_dim,
        };
        Ok(Some((heads, linears.map(|l| l.weight()))))
    }

    /// `block`'s output for a prompt's prefill into this layer's empty cache slot, with the
    /// keys and values appended to the slot; `None` (the slot untouched) where `block` would
    /// not serve the layer, the slot holds keys already, or a gradient could flow (x or a
    /// weight is tracked): this path keeps no state for a backward.
    #[cfg(target_arch = "x86_64")]
    fn prefill(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        (cos, sin): (&Tensor, &Tensor),
        mask: &AttnMask,
        slot: &mut Option<LayerSlot<'_>>,
    ) -> Result<Option<Tensor>> {
        let empty = slot.as_ref().is_some_and(|s| s.kv.is_none());
        let Some((heads, weights)) = self.block_operands(x)? else {
            return Ok(None);
        };
        let tracked =
            x.track_op() || norm.weight.track_op() || weights.iter().any(|w| w.track_op());
        if !empty || tracked {
            return Ok(None);
        }
        let norm = (&norm.weight, norm.eps);
        let Some((y, k, v)) =
            attention_block::prefill(x, norm, weights, heads, cos, sin, &mask.keys)?
        else {
            return Ok(None);
        };
        if let Some(slot) = slot.take() {
            slot.append(k, v)?;
        }
        Ok(Some(y))
    }

    /// The CPU f32/f64 path: fused RoPE (scale folded into q), GQA without repeating k/v
    /// (each kv head's query group is one [n_rep·T, D] matrix), fused masked softmax.
    fn forward_fused(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<LayerSlot<'_>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let (h, hkv) = (self.n_heads, self.n_kv_heads);
        // q, k [B, T, n, D]: the projection's own layout, no copy; v [B, n, T, D].
        let heads_node = self.q_proj.bias().is_none()
            && b * t > skinny::MAX_ROWS
            && fused::supported(x, fused::Kind::Linear)
            && fused::enabled(fused::Kind::LinearRows)
            && self.q_proj.weight().dtype() == x.dtype();
        let (mut q, mut k, v) = if heads_node {
            // Each projection and its split into heads as one graph node.
            (
                fused::linear_heads(x, self.q_proj.weight(), h, false)?,
                fused::linear_heads(x, self.k_proj.weight(), hkv, false)?,
                fused::linear_heads(x, self.v_proj.weight(), hkv, true)?,
            )
        } else {
            (
                linear_rows(&self.q_proj, x)?.reshape((b, t, h, hd))?,
                linear_rows(&self.k_proj, x)?.reshape((b, t, hkv, hd))?,
                linear_rows(&self.v_proj, x)?
                    .reshape((b, t, hkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?,
            )
        };
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let q = fused::rope(&q, cos, sin, scale)?; // [B, H, T, D], pre-scaled
        let k = fused::rope(&k, cos, sin, 1.0)?; // [B, Hkv, T, D]
        let (k, v) = match cache {
            Some(slot) => slot.append(k, v)?,
            None => (k, v),
        };
        let n_rep = h / hkv;
        // Query heads j·n_rep .. (j+1)·n_rep share kv head j (HF's repeat_kv order).
        let q = q.reshape((b, hkv, n_rep * t, hd))?;
        // Decode steps take the few-row kernel, training and prefill the one-pass one; what
        // neither serves, the general path.
        let few = if n_rep * t <= skinny::MAX_ROWS {
            skinny::attention(&q, &k, &v, mask.dense()?)?
        } else {
            None
        };
        // [B, Hkv, n_rep·T, D] -> the rows the output projection reads, [B, T, H·D].
        let rows = |y: Tensor| {
            y.reshape((b, h, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, h * hd))
        };
        let y = match few {
            Some(y) => rows(y)?,
            // The one-pass kernel returns the rows itself.
            None => match flash::attention(&q, &k, &v, &mask.keys)? {
                Some(y) => y,
                None => {
                    let att = q.matmul(&k.t()?)?; // [B, Hkv, n_rep·T, S]
                    let att = fused::masked_softmax(&att, mask.dense()?)?;
                    rows(att.matmul(&v)?)?
                }
            },
        };
        linear_rows(&self.o_proj, &y)
    }

    /// x: [B, T, hidden]; cos/sin: [B, T, D]; mask: which keys each query sees; cache: this
    /// layer's (k, v).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<LayerSlot<'_>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        if fused::supported(x, fused::Kind::Attention) {
            return self.forward_fused(x, cos, sin, mask, cache);
        }
        let (cos, sin) = (&cos.unsqueeze(1)?, &sin.unsqueeze(1)?);
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let mut q = heads(self.q_proj.forward(x)?, self.n_heads)?;
        let mut k = heads(self.k_proj.forward(x)?, self.n_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads)?.contiguous()?;
        // Qwen3 normalizes each head before RoPE.
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let q = apply_rope(&q.contiguous()?, cos, sin)?;
        let k = apply_rope(&k.contiguous()?, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => slot.append(k, v)?,
            None => (k, v),
        };
        let n_rep = self.n_heads / self.n_kv_heads;
        let k = repeat_kv(k, n_rep)?.contiguous()?;
        let v = repeat_kv(v, n_rep)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask.dense()?)?;
        // `softmax` (not `softmax_last_dim`): it backpropagates on CPU.
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?; // [B, H, T, D]
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_heads * hd))?;
        self.o_proj.forward(&y)
    }
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: linear(h, i, false, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, false, vb.pp("up_proj"))?,
            down_proj: linear(i, h, false, vb.pp("down_proj"))?,
        })
    }

    /// `x + self(norm(x))` as one graph node (`swiglu`) over more rows than a decode step's
    /// (few rows go to skinny's kernels through `forward`); `None` where it does not serve.
    fn block(&self, x: &Tensor, norm: &RmsNorm) -> Result<Option<Tensor>> {
        let (gate, up, down) = (
            self.gate_proj.weight(),
            self.up_proj.weight(),
            self.down_proj.weight(),
        );
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        if rows <= skinny::MAX_ROWS || !swiglu::serves(x, [&norm.weight, gate, up, down]) {
            return Ok(None);
        }
        swiglu::block(x, (&norm.weight, norm.eps), gate, up, down).map(Some)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = linear_rows(&self.gate_proj, x)?;
        let up = linear_rows(&self.up_proj, x)?;
        let h = if fused::supported(&gate, fused::Kind::SiluMul) {
            fused::silu_mul(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        linear_rows(&self.down_proj, &h)
    }
}

/// One decoder layer's weights (HF layouts: a projection's weight is `[out, in]`).
pub(crate) struct LayerWeights<'a> {
    pub input_norm: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub q_bias: Option<&'a Tensor>,
    pub k_bias: Option<&'a Tensor>,
    pub v_bias: Option<&'a Tensor>,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    pub o: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub down: &'a Tensor,
}

/// A model's weights by role (see [`Llama::weights`]).
pub(crate) struct ModelWeights<'a> {
    pub embed: &'a Tensor,
    pub layers: Vec<LayerWeights<'a>>,
    pub norm: &'a Tensor,
    pub lm_head: &'a Tensor,
    pub inv_freq: &'a [f64],
    pub dtype: DType,
}

#[derive(Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// `x + attention(input_norm(x))`: one graph node where `attention_block` serves it, and
    /// no node at all for a prompt's prefill into an empty inference cache.
    fn attention_half(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        slot: Option<LayerSlot<'_>>,
    ) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        let slot = {
            let norm = &self.input_layernorm;
            let mut slot = slot;
            let y = match slot {
                None => self.self_attn.block(x, norm, cos, sin, mask)?,
                Some(_) => self
                    .self_attn
                    .prefill(x, norm, (cos, sin), mask, &mut slot)?,
            };
            if let Some(y) = y {
                return Ok(y);
            }
            slot
        };
        let h = self.input_layernorm.forward(x)?;
        x + self.self_attn.forward(&h, cos, sin, mask, slot)?
    }

    /// `x + mlp(post_norm(x))`: one graph node where `swiglu` serves it.
    fn mlp_half(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.mlp.block(x, &self.post_attention_layernorm)? {
            return Ok(y);
        }
        x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(x)?)?
    }
}

/// The decoder stack's weight gradients from backwards not yet added to their gradient store,
/// each with its weight: what its op's backward hands past candle's graph (see
/// `decoder_stack`'s module comment). One per model, shared by every op its forwards build.
#[derive(Default)]
pub(crate) struct WeightGradients {
    /// (weight, gradient) pairs, in the order the backwards produced them.
    pending: Mutex<Vec<(Tensor, Tensor)>>,
}

impl WeightGradients {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>>> {
        self.pending
            .lock()
            .map_err(|_| candle_core::Error::msg("weight gradients' lock poisoned"))
    }

    /// Whether a backward left gradients that were never added to a store.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the stack is x86-64's
    pub(crate) fn is_pending(&self) -> Result<bool> {
        Ok(!self.lock()?.is_empty())
    }

    /// Adds a backward's gradients to those pending.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn deposit(&self, grads: Vec<(Tensor, Tensor)>) -> Result<()> {
        self.lock()?.extend(grads);
        Ok(())
    }

    /// Takes the pending gradients (none are left pending, whatever follows).
    pub(crate) fn take(&self) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(std::mem::take(&mut *self.lock()?))
    }

    /// Adds `grads` (from [`WeightGradients::take`]) to `store`: a weight's gradient is
    /// inserted, or added to the one the store holds (a weight that the graph reached too, or
    /// that several forwards' backwards reached).
    pub(crate) fn add_to(grads: Vec<(Tensor, Tensor)>, store: &mut GradStore) -> Result<()> {
        for (weight, grad) in grads {
            let sum = match store.get(&weight) {
                Some(held) => (held + &grad)?,
                None => grad,
            };
            store.insert(&weight, sum);
        }
        Ok(())
    }
}

/// The decoder with its LM head. Cloning shares the weights (candle tensors are
/// reference-counted): a clone over a `VarMap` sees every optimizer step.
#[derive(Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `[V, hidden]`; the embedding matrix itself when tied.
    lm_head: Tensor,
    inv_freq: Vec<f64>,
    dtype: DType,
    device: Device,
    /// The decode engine's packed product weights, for a frozen model: built by its first
    /// decoder and shared by its clones. `None` for a model over a `VarMap` (it trains, so each
    /// decoder packs the weights as they are when it is filled).
    decode_weights: Option<Arc<Mutex<Option<Arc<DecodeWeights>>>>>,
    /// The decoder stack's weight gradients between a backward and [`Llama::backward`]
    /// adding them to its store (shared by clones, which share the weights).
    weight_grads: Arc<WeightGradients>,
}

impl Llama {
    /// A model over named f32 tensors (HF names), tracking no gradients: generation,
    /// frozen references, weights synced to a policy.
    ///
    /// Every tensor is detached (shared storage, no graph). A tensor that still tracks ops (a
    /// `Var`, or `var.as_tensor().copy()`, which records a `Copy` op) would make every forward
    /// pass record its graph, so a generation's prefill would keep every layer's activations
    /// and attention scores alive until its logits were dropped: with SmolLM2-135M, memory grew
    /// by ~0.6 GB per episode turn (17.7 GB after a few turns of two episodes).
    ///
    /// The tensors are the model's from then on, never written (callers pass copies, as the
    /// learner's weight exports are): the decode engine packs the products' weights once per
    /// model, so a later write to them would not reach its steps.
    pub fn from_tensors(
        cfg: &LlamaConfig,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect();
        let mut model = Llama::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, device))?;
        model.decode_weights = Some(Arc::default());
        Ok(model)
    }

    /// The decode engine's packed product weights: a frozen model's, packed by the first call;
    /// packed anew each call for a model that trains.
    pub(crate) fn decode_weights(&self) -> Result<Arc<DecodeWeights>> {
        let Some(cell) = &self.decode_weights else {
            return Ok(Arc::new(DecodeWeights::pack(self)?));
        };
        let mut packed = cell.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = &*packed {
            return Ok(Arc::clone(w));
        }
        let w = Arc::new(DecodeWeights::pack(self)?);
        *packed = Some(Arc::clone(&w));
        Ok(w)
    }

    /// Builds the model from `vb` under HF names. Over a `VarMap` this creates the variables
    /// (HF init); over loaded tensors it reads them.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let m = vb.pp("model");
        let emb = m.pp("embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(Block {
                input_layernorm: RmsNorm::new(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    l.pp("input_layernorm"),
                )?,
                self_attn: Attention::new(cfg, l.pp("self_attn"))?,
                post_attention_layernorm: RmsNorm::new(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    l.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(cfg, l.pp("mlp"))?,
            });
        }
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            emb.clone()
        } else {
            vb.pp("lm_head").get_with_hints(
                (cfg.vocab_size, cfg.hidden_size),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens: Embedding::new(emb, cfg.hidden_size),
            layers,
            norm,
            lm_head,
            inv_freq: cfg.inv_freq(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            decode_weights: None,
            weight_grads: Arc::default(),
        })
    }

    /// The gradients of `loss` (a scalar computed from this model's forwards) for every
    /// tensor it depends on: `loss.backward()`, plus the decoder stack's weight gradients,
    /// which its backward hands past the graph (`decoder_stack`'s module comment). Training
    /// backpropagates through this, never `loss.backward()` alone: the model's next training
    /// forward is an error if a backward's weight gradients were left out of their store.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let store = loss.backward();
        // Taken whatever the backward's outcome: a failed one leaves nothing pending.
        let stack = self.weight_grads.take()?;
        let mut store = store?;
        WeightGradients::add_to(stack, &mut store)?;
        Ok(store)
    }

    /// A clone (the same weights) with its own slot for the decoder stack's weight gradients,
    /// so that its training forward and backward may run on one thread while the model's run
    /// on another (`learner::lanes`): clones share the slot, and a backward takes every
    /// gradient pending in it, another thread's too.
    pub fn replica(&self) -> Llama {
        let mut r = self.clone();
        r.weight_grads = Arc::default();
        r
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Every weight the forward pass reads, by role: what the decode engine runs on.
    pub(crate) fn weights(&self) -> ModelWeights<'_> {
        ModelWeights {
            embed: self.embed_tokens.embeddings(),
            layers: self
                .layers
                .iter()
                .map(|l| {
                    let a = &l.self_attn;
                    LayerWeights {
                        input_norm: l.input_layernorm.weight(),
                        q: a.q_proj.weight(),
                        k: a.k_proj.weight(),
                        v: a.v_proj.weight(),
                        q_bias: a.q_proj.bias(),
                        k_bias: a.k_proj.bias(),
                        v_bias: a.v_proj.bias(),
                        q_norm: a.q_norm.as_ref().map(RmsNorm::weight),
                        k_norm: a.k_norm.as_ref().map(RmsNorm::weight),
                        o: a.o_proj.weight(),
                        post_norm: l.post_attention_layernorm.weight(),
                        gate: l.mlp.gate_proj.weight(),
                        up: l.mlp.up_proj.weight(),
                        down: l.mlp.down_proj.weight(),
                    }
                })
                .collect(),
            norm: self.norm.weight(),
            lm_head: &self.lm_head,
            inv_freq: &self.inv_freq,
            dtype: self.dtype,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every layer over x as one graph node (`decoder_stack`), for a forward without a cache
    /// that a backward may follow; `None` where a layer's halves would not each be one node
    /// (`Attention::block_operands`), the norms' epsilons differ, or the stack declines.
    #[cfg(target_arch = "x86_64")]
    fn stack(
        &self,
        x: &Tensor,
        angles: (&Tensor, &Tensor),
        mask: &AttnMask,
    ) -> Result<Option<Tensor>> {
        let Some(eps) = self.layers.first().map(|l| l.input_layernorm.eps) else {
            return Ok(None);
        };
        let mut heads = None;
        let mut operands = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let Some((h, [q, k, v, o])) = layer.self_attn.block_operands(x)? else {
                return Ok(None);
            };
            let norms = [&layer.input_layernorm, &layer.post_attention_layernorm];
            if norms.iter().any(|n| n.eps != eps) {
                return Ok(None);
            }
            heads = Some(h);
            operands.push(decoder_stack::LayerOperands {
                input_norm: &layer.input_layernorm.weight,
                q,
                k,
                v,
                o,
                post_norm: &layer.post_attention_layernorm.weight,
                gate: layer.mlp.gate_proj.weight(),
                up: layer.mlp.up_proj.weight(),
                down: layer.mlp.down_proj.weight(),
            });
        }
        let Some(heads) = heads else {
            return Ok(None);
        };
        let grads = Some(&self.weight_grads);
        decoder_stack::stack(x, &operands, eps, heads, angles, &mask.keys, grads)
    }

    /// Logits `[B, T, V]` for `input_ids` `[B, T]` (u32).
    ///
    /// `attention_mask` `[B, T]` (1 = token, 0 = pad; any numeric dtype) covers the new tokens
    /// only; the cache remembers earlier ones. Positions are per row: the count of real tokens
    /// before each token (cache included), so a left-padded row gets the same positions, and
    /// thus the same logits, as the sequence alone. Pads are masked as keys; their own outputs
    /// are meaningless. With a cache, new keys/values are appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let new_mask: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    candle_core::bail!(
                        "attention_mask shape {:?} != input_ids [{b}, {t}]",
                        m.dims()
                    );
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v != 0.0).collect())
                    .collect()
            }
            None => vec![vec![true; t]; b],
        };
        let past: Vec<Vec<bool>> = match cache.as_deref() {
            Some(c) if !c.is_empty() => {
                if c.key_mask.len() != b {
                    candle_core::bail!("cache has batch {} but input has {b}", c.key_mask.len());
                }
                c.key_mask.clone()
            }
            _ => vec![Vec::new(); b],
        };
        let p = past.first().map_or(0, |r| r.len());

        // Positions, built on the host ([B, T]), and the mask.
        let mut positions = Vec::with_capacity(b * t);
        for (row_past, row_new) in past.iter().zip(&new_mask) {
            let mut seen = row_past.iter().filter(|m| **m).count();
            for real in row_new {
                positions.push(seen as f32);
                if *real {
                    seen += 1;
                }
            }
        }
        let keys: Vec<Vec<bool>> = past
            .iter()
            .zip(&new_mask)
            .map(|(a, n)| a.iter().chain(n).copied().collect())
            .collect();
        let mask = AttnMask::new(keys, p, &self.device, self.dtype)?;
        // RoPE angles in f32 whatever the compute dtype (as HF does): bf16 holds integers
        // exactly only up to 256, so positions and angles in bf16 would be wrong past that.
        let angle_dtype = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let positions =
            Tensor::from_vec(positions, (b, t, 1), &self.device)?.to_dtype(angle_dtype)?;
        let inv_freq = Tensor::new(self.inv_freq.as_slice(), &self.device)?
            .to_dtype(angle_dtype)?
            .reshape((1, 1, self.inv_freq.len()))?;
        let freqs = positions.broadcast_mul(&inv_freq)?; // [B, T, D/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // [B, T, D]
        let (cos, sin) = (
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        );

        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
            if c.bufs.len() != self.layers.len() {
                c.bufs = vec![None; self.layers.len()];
            }
        }
        let mut x = self.embed_tokens.forward(input_ids)?;
        #[cfg(target_arch = "x86_64")]
        let stacked = if cache.is_none() {
            self.stack(&x, (&cos, &sin), &mask)?
        } else {
            None
        };
        #[cfg(not(target_arch = "x86_64"))]
        let stacked: Option<Tensor> = None;
        match stacked {
            Some(y) => x = y,
            None => {
                for (i, layer) in self.layers.iter().enumerate() {
                    let slot = cache.as_deref_mut().map(|c| LayerSlot {
                        kv: &mut c.layers[i],
                        buf: &mut c.bufs[i],
                        detached: c.detached,
                    });
                    x = layer.attention_half(&x, &cos, &sin, &mask, slot)?;
                    x = layer.mlp_half(&x)?;
                }
            }
        }
        if let Some(c) = cache {
            c.key_mask = mask.rows;
        }
        let x = self.norm.forward(&x)?;
        if fused::enabled(fused::Kind::LinearRows) {
            // One [B·T, hidden] x [hidden, V] product: its backward is one gemm per operand
            // instead of a batch of them plus a reduction over the batch.
            let (b, t, hd) = x.dims3()?;
            let rows = x.reshape((b * t, hd))?;
            if let Some(y) = skinny::linear(&rows, &self.lm_head)? {
                return y.reshape((b, t, self.cfg.vocab_size));
            }
            // f32 on the CPU: the products on tiles where they suit, over [B, T, hidden] as
            // is (no reshape node before or after, whose gradients candle would zero and add).
            if fused::supported(&x, fused::Kind::Projection)
                && x.dtype() == DType::F32
                && self.lm_head.dtype() == DType::F32
            {
                return fused::projection(&x, &self.lm_head);
            }
            return rows
                .matmul(&self.lm_head.t()?)?
                .reshape((b, t, self.cfg.vocab_size));
        }
        x.broadcast_matmul(&self.lm_head.t()?)
    }
}

#[cfg(target_arch = "x86_64")]
use super::attention_block;
use super::decode::DecodeWeights;
#[cfg(target_arch = "x86_64")]
use super::decoder_stack;
use super::{flash, fused, skinny, swiglu};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// Decoding through the in-place cache (growing past its first capacity, cloned midway)
    /// gives the logits of the concatenating cache and of the full forward.
    #[test]
    fn in_place_kv_cache_matches_concatenating_cache_and_full_forward() {
        let mut cfg = LlamaConfig::tiny(32);
        cfg.max_position_embeddings = 256;
        let vm = VarMap::new();
        let model = Llama::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .expect("model");
        let (b, n) = (2usize, 80usize); // 80 > the first capacity (64)
        let ids: Vec<u32> = (0..b * n).map(|i| ((i * 7 + 3) % 32) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, n), &Device::Cpu).expect("ids");
        let full = model.forward(&ids, None, None).expect("full");
        let decode = |mut cache: KvCache| -> (Tensor, Tensor) {
            let mut parts = vec![model
                .forward(
                    &ids.narrow(1, 0, 5).expect("prefix"),
                    None,
                    Some(&mut cache),
                )
                .expect("prefill")];
            let mut fork = None;
            for p in 5..n {
                let step = ids.narrow(1, p, 1).expect("step");
                parts.push(model.forward(&step, None, Some(&mut cache)).expect("step"));
                if p == 40 {
                    fork = Some(cache.clone());
                }
            }
            // The clone, advanced on its own, still sees its own history.
            let mut fork = fork.expect("fork");
            let next = ids.narrow(1, 41, 1).expect("next");
            let forked = model
                .forward(&next, None, Some(&mut fork))
                .expect("fork step");
            (Tensor::cat(&parts, 1).expect("cat"), forked)
        };
        let (in_place, fork_a) = decode(KvCache::inference());
        let (concat, fork_b) = decode(KvCache::new());
        let diff = super::super::max_abs_diff;
        assert!(diff(&in_place, &concat) < 1e-5);
        assert!(diff(&in_place, &full) < 1e-4);
        assert!(diff(&fork_a, &fork_b) < 1e-5);
        assert!(diff(&fork_a, &full.narrow(1, 41, 1).expect("col")) < 1e-4);
    }

    /// A prompt's prefill into an empty cache over frozen weights runs the attention block's
    /// forward (`Attention::prefill`), which gives the composed path's output and cached keys
    /// and values to rounding; over variables (a gradient could flow) it declines. Through
    /// the whole model, the prefill's logits, cache and next step agree with the composed
    /// path's, which the same weights as variables take. Left pads on one row; 3 x 9 rows,
    /// more than a decode step's.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_prefill_through_the_block_is_the_composed_one() {
        if !skinny::simd() {
            return; // the attention kernels need AVX2 and FMA
        }
        let mut cfg = LlamaConfig::tiny(48);
        (cfg.hidden_size, cfg.intermediate_size) = (64, 96); // head_dim 16
        let vm = VarMap::new();
        let tracked = Llama::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .expect("model");
        let tensors = vm
            .data()
            .lock()
            .expect("varmap")
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        let frozen = Llama::from_tensors(&cfg, tensors, &Device::Cpu).expect("frozen");
        let (b, t) = (3usize, 9usize);
        let mut real = vec![vec![true; t]; b];
        real[1][..4].fill(false); // row 1: four left pads
        let diff = super::super::max_abs_diff;

        // One layer's attention half, called directly.
        let values = |n: usize, seed: u32, shape: &[usize]| {
            Tensor::from_vec(super::super::hashed_values(n, seed), shape, &Device::Cpu)
                .expect("values")
        };
        let x = values(b * t * 64, 1, &[b, t, 64]);
        let (cos, sin) = (
            values(b * t * 16, 2, &[b, t, 16]),
            values(b * t * 16, 3, &[b, t, 16]),
        );
        let mask = AttnMask::new(real.clone(), 0, &Device::Cpu, DType::F32).expect("mask");
        let half = |m: &Llama, prefill: bool| {
            let layer = &m.layers[0];
            let (mut kv, mut buf) = (None, None);
            let mut slot = Some(LayerSlot {
                kv: &mut kv,
                buf: &mut buf,
                detached: true,
            });
            let norm = &layer.input_layernorm;
            let y = if prefill {
                layer
                    .self_attn
                    .prefill(&x, norm, (&cos, &sin), &mask, &mut slot)
                    .expect("prefill")
            } else {
                let h = norm.forward(&x).expect("norm");
                let att = layer.self_attn.forward(&h, &cos, &sin, &mask, slot.take());
                Some((&x + att.expect("attention")).expect("residual"))
            };
            (y, slot.is_some(), kv)
        };
        let (y, slot_left, kv) = half(&frozen, true);
        let y = y.expect("the block serves a frozen layer's prefill");
        assert!(!slot_left, "the prefill fills the slot");
        let (yc, _, kvc) = half(&frozen, false);
        assert!(diff(&y, &yc.expect("composed")) < 1e-5);
        let ((k, v), (kc, vc)) = (kv.expect("keys"), kvc.expect("keys"));
        assert_eq!(k.dims(), [b, 2, t, 16]);
        assert!(diff(&k, &kc) < 1e-5 && diff(&v, &vc) < 1e-5);
        let (declined, slot_left, _) = half(&tracked, true);
        assert!(
            declined.is_none() && slot_left,
            "variables: the composed path"
        );

        // The whole model.
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 11 + 5) % 48) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).expect("ids");
        let mask: Vec<f32> = real
            .iter()
            .flatten()
            .map(|r| f32::from(u8::from(*r)))
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).expect("mask");
        let prefill = |m: &Llama| {
            let mut cache = KvCache::inference();
            let logits = m
                .forward(&ids, Some(&mask), Some(&mut cache))
                .expect("prefill");
            (logits, cache)
        };
        let (block, mut block_cache) = prefill(&frozen);
        let (composed, mut composed_cache) = prefill(&tracked);
        assert!(diff(&block, &composed) < 1e-5);
        let (layers_a, keys_a) = block_cache.contents();
        let (layers_b, keys_b) = composed_cache.contents();
        assert_eq!(keys_a, keys_b);
        assert_eq!(layers_a.len(), cfg.num_hidden_layers);
        for (a, c) in layers_a.iter().zip(layers_b) {
            let ((ka, va), (kc, vc)) = (a.as_ref().expect("keys"), c.as_ref().expect("keys"));
            assert!(diff(ka, kc) < 1e-5 && diff(va, vc) < 1e-5);
        }
        let next = Tensor::from_vec(vec![7u32, 8, 9], (b, 1), &Device::Cpu).expect("next");
        let step_a = frozen
            .forward(&next, None, Some(&mut block_cache))
            .expect("step");
        let step_b = tracked
            .forward(&next, None, Some(&mut composed_cache))
            .expect("step");
        assert!(diff(&step_a, &step_b) < 1e-5);
    }

    /// Clones share the weights and the weight-gradient slot; a replica shares the weights
    /// only, so its backward never takes another thread's gradients (`learner::lanes`).
    #[test]
    fn a_replica_shares_the_weights_but_not_the_gradient_slot() {
        let vm = VarMap::new();
        let model = Llama::new(
            &LlamaConfig::tiny(32),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .expect("model");
        let (clone, replica) = (model.clone(), model.replica());
        assert!(Arc::ptr_eq(&model.weight_grads, &clone.weight_grads));
        assert!(!Arc::ptr_eq(&model.weight_grads, &replica.weight_grads));
        assert_eq!(model.lm_head.id(), replica.lm_head.id());
    }
}
